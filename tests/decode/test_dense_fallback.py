"""VAttentionConfig.dense_below, the dense fallback: a row of n <= dense_below valid tokens
attends exactly to all of them, decided per row on the device (plan_lists); longer rows are
untouched. Checked: dense rows against float64 dense attention and the float64 reference
decode, rows above the threshold bit for bit against dense_below = 0 (CPU), the stats of
both kinds, every config path (per-head lists, gqa_heavy="union", adaptive heavy size, the
chi-square tail, no pilot reuse), the all-dense step (N <= dense_below: one attention, no
selection, counted), a paged cache, NaN propagation, torch.compile, no host sync on CUDA."""
from __future__ import annotations

import pytest
import torch

import vattention
from benchmarks.launch_count import count_stages
from tests.helpers import DEVICES, cuda_only, gen, make_qkv, no_sync
from vattention import reference
from vattention.config import VAttentionConfig
from vattention.key_summary import FORMATS, summary_bytes
from vattention.paged import to_paged

SMALL = dict(sink=8, local=16, heavy=0.05, base_rate=16)
CONFIGS = {
    "default": VAttentionConfig(),
    "small": VAttentionConfig(**SMALL),
    "oracle": VAttentionConfig(selector="oracle", **SMALL),
    "per-head": VAttentionConfig(share_gqa=False, **SMALL),
    "union": VAttentionConfig(gqa_heavy="union", **SMALL),
    "adaptive": VAttentionConfig(adaptive_heavy=True, **SMALL),
    "chi2": VAttentionConfig(tail="chi2", **SMALL),
    "no-reuse": VAttentionConfig(reuse_pilot=False, base_rate=0.05, sink=8, local=16),
}
# Rows below, at, just above and far above the threshold, and an empty one.
LENGTH, THRESHOLD = 1500, 600
SEQ_LENS = [1500, 600, 601, 230, 0, 1100]


def _inputs(device, dtype=torch.float32, length=LENGTH, batch=len(SEQ_LENS)):
    q, k, v = make_qkv(batch, 8, 2, length, 32, dtype, gen(3), value_shift=0.3)
    return q.to(device), k.to(device), v.to(device)


def _dense_rows(seq_lens, threshold):
    return [b for b, n in enumerate(seq_lens) if n <= threshold]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_dense_rows_are_exact_and_the_rest_unchanged(device, name):
    q, k, v = _inputs(device)
    seq_lens = torch.tensor(SEQ_LENS, device=device)
    base = CONFIGS[name]
    seed = torch.tensor([11, 0], dtype=torch.int64, device=device)
    out0, stats0 = vattention.decode(q, k, v, base, seq_lens=seq_lens, seed=seed,
                                     return_stats=True)
    cfg = base.replace(dense_below=THRESHOLD)
    out, stats = vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=seed,
                                   return_stats=True)
    dense = _dense_rows(SEQ_LENS, THRESHOLD)
    sparse = [b for b in range(len(SEQ_LENS)) if b not in dense]
    exact = reference.dense(q.cpu(), k.cpu(), v.cpu(), seq_lens=SEQ_LENS)
    torch.testing.assert_close(out[dense].cpu().double(), exact[dense], rtol=1e-5, atol=1e-6)
    # The float64 reference decode implements the same rule: exact on those rows.
    ref = reference.decode(q.cpu(), k.cpu(), v.cpu(), cfg, seq_lens=SEQ_LENS, seed=11)
    torch.testing.assert_close(ref[dense], exact[dense], rtol=1e-12, atol=1e-12)
    # Without the fallback some of those rows ran the pilot (the test's rows do change path).
    assert (stats0["pilot"][dense] > 0).any()

    # Rows above the threshold: the dense_below = 0 step. On the CPU bit for bit (the same
    # lists, counts and split); CUDA's balanced split-K sees the dense rows' counts in its
    # launch total, so there only to fp rounding.
    same = torch.equal if device == "cpu" else (
        lambda a, b: torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6))
    assert same(out[sparse], out0[sparse])
    for key, value in stats.items():
        if key == "heavy_indices":
            continue
        assert same(value[sparse], stats0[key][sparse]), key

    # The dense rows' stats: exact, nothing sampled, density 1 (0 for the empty row),
    # error bound 0, every valid row deterministic, K and V read once plus the selector.
    n = torch.tensor(SEQ_LENS, device=device)[dense][:, None].expand(-1, q.shape[1])
    assert stats["exact"][dense].all()
    for key in ("budget", "pilot", "n_residual", "error_bound", "required"):
        assert (stats[key][dense] == 0).all(), key
    assert torch.equal(stats["deterministic"][dense], n)
    assert torch.equal(stats["density"][dense], (n > 0).float())
    group_lists = 1 if cfg.share_gqa else q.shape[1] // k.shape[1]
    dim, elem = k.shape[3], k.element_size()
    selector = ((summary_bytes(n.double(), dim, cfg.selector) if cfg.selector in FORMATS
                 else n.double() * dim * elem) / (n.double() * 2 * dim * elem).clamp(min=1))
    want = torch.where(n > 0, group_lists + selector, torch.zeros_like(selector))
    torch.testing.assert_close(stats["relative_bytes"][dense].double(), want, rtol=1e-6,
                               atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_dense_step_is_one_attention(device, dtype):
    """N <= dense_below: every row dense, known on the host from N alone. The step is
    plan_lists, one sparse_attention over each row's [0, n) and the cast: no selection,
    pilot, budget or sample."""
    q, k, v = _inputs(device, dtype)
    cfg = VAttentionConfig(dense_below=LENGTH)
    seq_lens = torch.tensor(SEQ_LENS, device=device)
    seed = torch.tensor([5, 0], dtype=torch.int64, device=device)
    out, stats = vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=seed,
                                   return_stats=True)
    exact = reference.dense(q.cpu(), k.cpu(), v.cpu(), seq_lens=SEQ_LENS)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.cpu().double(), exact.to(dtype).double(), rtol=tol,
                               atol=tol)
    assert out.dtype == dtype
    n = seq_lens[:, None].expand(-1, q.shape[1])
    assert stats["exact"].all() and (stats["budget"] == 0).all()
    assert (stats["error_bound"] == 0).all() and (stats["n_residual"] == 0).all()
    assert torch.equal(stats["density"], (n > 0).float())
    assert torch.equal(stats["relative_bytes"], (n > 0).float())   # K and V once, no selector
    assert torch.equal(stats["deterministic"], n)
    assert stats["heavy_indices"].shape == (q.shape[0], k.shape[1], 0)

    # The same rows in a step that is not all dense (N above the threshold): the same
    # dtypes for every stat, the same values but relative_bytes (that step scores K), and
    # on the CPU the same output bit for bit.
    big = torch.cat([k, k[:, :, :100]], dim=2), torch.cat([v, v[:, :, :100]], dim=2)
    mixed, mixed_stats = vattention.decode(q, *big, cfg, seq_lens=seq_lens, seed=seed,
                                           return_stats=True)
    for key, value in stats.items():
        assert value.dtype == mixed_stats[key].dtype, key
        if key not in ("relative_bytes", "heavy_indices"):
            assert torch.equal(value, mixed_stats[key]), key
    if device == "cpu":
        assert torch.equal(out, mixed)

    if device == "cpu":
        counter = count_stages(lambda timer: vattention.decode(
            q, k, v, cfg, seq_lens=seq_lens, seed=seed, stage_timer=timer))
        ops = dict(counter.ops)
        want = {"vattention::plan_lists": 1, "vattention::sparse_attention": 1}
        if dtype != torch.float32:
            want["aten::_to_copy"] = 1        # the cast to q's dtype
        assert ops == want, dict(counter.stage_ops)


def test_full_length_rows_and_no_seq_lens():
    """seq_lens None (every row N) below and above the threshold."""
    q, k, v = _inputs("cpu", batch=2)
    exact = reference.dense(q, k, v)
    out = vattention.decode(q, k, v, VAttentionConfig(dense_below=LENGTH), seed=1)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)
    base = VAttentionConfig(**SMALL)
    assert torch.equal(vattention.decode(q, k, v, base.replace(dense_below=LENGTH - 1), seed=1),
                       vattention.decode(q, k, v, base, seed=1))


def test_paged_cache():
    q, k, v = _inputs("cpu")
    seq_lens = torch.tensor(SEQ_LENS)
    k_pool, table = to_paged(k, 32, generator=gen(4))
    v_pool, _ = to_paged(v, 32, generator=gen(4))
    for cfg in (VAttentionConfig(dense_below=THRESHOLD, **SMALL),
                VAttentionConfig(dense_below=LENGTH + 100)):   # N = 1504 (47 blocks)
        want = vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=2)
        got = vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, seed=2,
                                block_table=table)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dense_below", [THRESHOLD, LENGTH])
def test_nan_in_a_dense_row_reaches_its_output(dense_below):
    q, k, v = _inputs("cpu")
    k[3, 1, 100, 5] = float("nan")                        # row 3 (n = 230), KV head 1
    out = vattention.decode(q, k, v, VAttentionConfig(dense_below=dense_below, **SMALL),
                            seq_lens=torch.tensor(SEQ_LENS), seed=2)
    assert torch.isnan(out[3, 4:]).all() and not torch.isnan(out[3, :4]).any()
    assert not torch.isnan(out[[0, 1, 2, 5]]).any()


def test_bad_dense_below():
    for bad in (-1, 1.5, True, "8192"):
        with pytest.raises(ValueError, match="VAttentionConfig.dense_below"):
            VAttentionConfig(dense_below=bad)


@pytest.mark.parametrize("dense_below", [THRESHOLD, LENGTH])
def test_compile_fullgraph(monkeypatch, dense_below):
    from statistics import NormalDist

    from vattention import budget
    # As test_capture.test_compile_fullgraph_decode_with_seq_lens: constant z-scores.
    table = {d: NormalDist().inv_cdf(1 - d / 2) for d in (0.05,)}
    monkeypatch.setattr(budget, "z_two_sided", lambda delta: table[delta])
    torch._dynamo.reset()
    q, k, v = _inputs("cpu")
    seq_lens = torch.tensor(SEQ_LENS)
    cfg = VAttentionConfig(dense_below=dense_below, **SMALL)

    def step(q, k, v, seq_lens):
        return vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=77)

    expected = step(q, k, v, seq_lens)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, seq_lens)
    torch.testing.assert_close(got, expected)


@cuda_only
@pytest.mark.parametrize("dense_below", [THRESHOLD, LENGTH])
def test_never_syncs_on_cuda(dense_below):
    q, k, v = _inputs("cuda", torch.bfloat16)
    seq_lens = torch.tensor(SEQ_LENS, device="cuda")
    seed = torch.tensor([3, 0], dtype=torch.int64, device="cuda")
    cfg = VAttentionConfig(dense_below=dense_below)
    vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=seed)     # warm up
    with no_sync():
        vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=seed)
        vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=seed, return_stats=True)
