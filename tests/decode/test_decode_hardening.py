"""vattention.decode hardening: one size conversion, one q/k/v check, NaN never dropped,
no select stage without heavy hitters, CUDA-graph capture with every seed and seq_lens form.

NaN policy (docs/algorithm.md): a NaN in q gives NaN in that head's output; a NaN in a K or
V row that any stage reads (selector, deterministic set, pilot, sample) gives NaN in the
outputs of the heads that read it, and every other head stays finite. A NaN in the pilot
makes the budget NaN, which decode treats as "attend the residual exactly". Every case runs
on the CPU and, where a GPU is present, on CUDA.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import vattention
from vattention import baselines, budget, ops, reference
from vattention.config import (FRACTION_SLACK, VAttentionConfig, check_qkv, resolve_size,
                               resolve_sizes)
from vattention.coverage import synthetic_heads
from tests.helpers import cuda_only, gen, no_sync

decode_module = importlib.import_module("vattention.decode")
device_module = importlib.import_module("vattention.device")

NAN = float("nan")

# --------------------------------------------------------------------------------------
# one size conversion
# --------------------------------------------------------------------------------------

FRACTIONS = [0.0, 0.05, 0.1, 0.3, 1 / 3, 0.07, 0.123456789, 0.5, 0.999, 1.0, 2.0 ** -30,
             5e-324, 0.05 * (1 + 2 ** -52)]
INT_SIZES = [0, 1, 7, 128, 10 ** 9]
BIG_LENGTHS = [2 ** 20, 2 ** 24 + 1, 10 ** 8 + 7, 2 ** 31 - 2, 2 ** 31 - 1]


def test_host_and_device_sizes_agree(device):
    lengths = list(range(0, 5001)) + BIG_LENGTHS
    lengths_t = torch.tensor(lengths, dtype=torch.int64, device=device)
    for size in FRACTIONS + INT_SIZES:
        host = [resolve_size(size, n) for n in lengths]
        assert resolve_sizes(size, lengths_t).cpu().tolist() == host, size
        # Monotone in the length: the count at the buffer length bounds every row's.
        assert all(a <= b for a, b in zip(host, host[1:])), size


def test_fraction_slack_forgives_only_the_representation_error():
    assert math.ceil(0.07 * 100) == 8                     # what the slack is for
    assert resolve_size(0.07, 100) == 7
    assert resolve_size(0.07, 101) == 8                   # 7.07: a real part of a token
    assert resolve_size(0.05, 2000) == 100 and resolve_size(0.1, 30) == 3
    assert resolve_size(1.0, 2 ** 31 - 2) == 2 ** 31 - 2
    assert resolve_size(0.5, 3) == 2 and resolve_size(1e-9, 5) == 1
    # The slack is relative and tiny: a product 2^-30 above an integer still rounds up.
    assert resolve_size(0.5 + 2.0 ** -31, 2) == 2
    assert FRACTION_SLACK < 2.0 ** -30
    assert resolve_size(7, 3) == 3 and resolve_size(0, 3) == 0


def test_decode_row_counts_are_the_host_counts(device):
    q, k, v = (t.to(device) for t in _qkv(2, 4, 2, 2000, 64, seed=1))
    cfg = VAttentionConfig(sink=3, local=0.01, heavy=0.05, base_rate=0.05)
    lengths = [2000, 1379]
    _, stats = vattention.decode(q, k, v, cfg, seq_lens=torch.tensor(lengths, device=device),
                                 seed=0, return_stats=True)
    for b, n in enumerate(lengths):
        sink = resolve_size(cfg.sink, n)
        local = min(resolve_size(cfg.local, n), n - sink)
        heavy = min(resolve_size(cfg.heavy, n), n - sink - local)
        counts = (stats["heavy_indices"][b] >= 0).sum(-1).cpu()
        assert counts.tolist() == [heavy] * 2
        assert stats["deterministic"][b].cpu().tolist() == [sink + local + heavy] * 4
        assert stats["n_residual"][b].cpu().tolist() == [n - sink - local - heavy] * 4
    assert stats["heavy_indices"].shape[-1] == resolve_size(cfg.heavy, 2000) == 100


# --------------------------------------------------------------------------------------
# one q/k/v check
# --------------------------------------------------------------------------------------


def _entry_points():
    """Every public function that takes q/k/v, and the fake kernel torch.compile sees."""
    cfg = VAttentionConfig(sink=2, local=2, heavy=2)

    def fake_sparse_attention(q, k, v):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            counts = torch.ones(q.shape[0], k.shape[1], dtype=torch.int32)
            idx = torch.zeros(q.shape[0], k.shape[1], 1, dtype=torch.int32)
            ops.sparse_attention(q, k, v, idx, None, counts, 0.5, 0)

    return {
        "decode": lambda q, k, v: vattention.decode(q, k, v, cfg, seed=0),
        "reference.decode": lambda q, k, v: reference.decode(q, k, v, cfg),
        "reference.dense": lambda q, k, v: reference.dense(q, k, v),
        "topk_attention": lambda q, k, v: baselines.topk_attention(q, k, v, 4, sink=2, local=2),
        "uniform_attention": lambda q, k, v: baselines.uniform_attention(q, k, v, 4, sink=2,
                                                                         local=2, seed=0),
        "fake sparse_attention": fake_sparse_attention,
    }


QKV_BAD = [
    ("q_rank", lambda q, k, v: (q[0], k, v), r"\bq must be \[batch, q_heads, head_dim\]"),
    ("k_rank", lambda q, k, v: (q, k[0], v), r"\bk must be \[batch, kv_heads, length, head_dim\]"),
    ("v_shape", lambda q, k, v: (q, k, v[:, :, :4]), r"\bv must have k's shape"),
    ("dtype", lambda q, k, v: (q, k.half(), v), r"q, k and v must share a dtype"),
    ("batch", lambda q, k, v: (torch.cat([q, q]), k, v), r"\bk has batch 2 but q has 4"),
    ("head_dim", lambda q, k, v: (torch.cat([q, q], -1), k, v), r"\bk has head_dim 8 but q has 16"),
    ("gqa", lambda q, k, v: (q[:, :3], k, v), r"q_heads \(3\) must be a multiple of kv_heads \(2\)"),
]


@pytest.mark.parametrize("case,bad,match", QKV_BAD, ids=[c[0] for c in QKV_BAD])
@pytest.mark.parametrize("entry", list(_entry_points()))
def test_every_entry_point_names_the_bad_argument_alike(entry, case, bad, match):
    g = gen(0)
    q, k, v = (torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g),
               torch.randn(2, 2, 16, 8, generator=g))
    fn = _entry_points()[entry]
    with pytest.raises((ValueError, TypeError), match=match):
        fn(*bad(q, k, v))


def test_check_qkv_dtypes():
    q, k, v = torch.zeros(1, 2, 4), torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4)
    with pytest.raises(TypeError, match=r"\bq must be float32, float16 or bfloat16"):
        check_qkv(q.double(), k.double(), v.double())
    check_qkv(q.double(), k.double(), v.double(), dtypes=None)      # the float64 references
    with pytest.raises(TypeError, match=r"\bq must be a floating-point tensor"):
        check_qkv(q.int(), k.int(), v.int(), dtypes=None)
    with pytest.raises(TypeError, match=r"q and k must share a dtype"):
        check_qkv(q, k.half())                                       # an op that reads only K


# --------------------------------------------------------------------------------------
# NaN never dropped
# --------------------------------------------------------------------------------------

N = 800
# Two KV heads of two query heads each: the NaN goes to KV head 0, heads 2 and 3 must stay
# finite. base_rate 0.02 gives a pilot of 16 of ~790 residual tokens; a loose epsilon and
# values with a clear mean give a small budget, so that pilot and sample are small subsets.
# The oracle selector: these tests are about the stages after selection, on a head dim
# the int4 summary does not take.
BASE = VAttentionConfig(sink=4, local=4, heavy=16, base_rate=0.02, epsilon=0.5, delta=0.5,
                        min_samples=4, selector="oracle")


def _qkv(batch, q_heads, kv_heads, length, dim, seed, value_mean=1.0):
    g = gen(seed)
    q = torch.randn(batch, q_heads, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g) + value_mean
    return q, k, v


def _inputs(device, seed=0):
    return tuple(t.to(device) for t in _qkv(1, 4, 2, N, 64, seed))


def _assert_nan_only_in(out, nan_heads, whole_head=False):
    """NaN in every head of nan_heads (in all its dims if whole_head), all others finite."""
    out = out.float().cpu()[0]
    for h in range(out.shape[0]):
        if h in nan_heads:
            got = torch.isnan(out[h])
            assert (got.all() if whole_head else got.any()), (h, out[h])
        else:
            assert torch.isfinite(out[h]).all(), (h, out[h])


def _pilot_and_sample(q, k, v, cfg, seed):
    """Rows of list 0 (KV head 0) that decode's pilot and final sample read, replayed with the
    same ops and inputs as decode, plus decode's stats."""
    _, stats = vattention.decode(q, k, v, cfg, seed=seed, return_stats=True)
    device = q.device
    heavy = stats["heavy_indices"][0].contiguous()                 # [2 lists, heavy_max]
    starts = torch.full((2,), resolve_size(cfg.sink, N), dtype=torch.int32, device=device)
    ends = torch.full((2,), N - resolve_size(cfg.local, N), dtype=torch.int32, device=device)
    rng = torch.tensor([seed, 0], dtype=torch.int64).to(device)
    n_r = int(stats["n_residual"][0, 0])
    pilot_wanted = torch.full((2,), max(2, resolve_size(cfg.base_rate, n_r)), dtype=torch.int32,
                              device=device)
    pilot_max = max(2, resolve_size(cfg.base_rate, N))
    pilot, _, pilot_n = ops.sample_residual(heavy, starts, ends, pilot_wanted, rng, pilot_max,
                                            ops.PILOT_DRAWS)
    budget_lists = stats["budget"][0, ::2].to(torch.int32)
    if cfg.reuse_pilot:
        # stats["budget"] then counts the pilot's draws too: the final sample drew the rest
        # (all of the budget where the residual was enumerated and the pilot not counted).
        budget_lists = torch.where(stats["exact"][0, ::2], budget_lists,
                                   budget_lists - stats["pilot"][0, ::2].to(torch.int32))
    budget_lists = budget_lists.contiguous()
    sample, _, sample_n = ops.sample_residual(heavy, starts, ends, budget_lists, rng, N,
                                              ops.FINAL_DRAWS)
    assert pilot_n.tolist()[0] == int(stats["pilot"][0, 0])
    assert sample_n.tolist()[0] == int(budget_lists[0])
    return (set(pilot[0, :int(pilot_n[0])].tolist()), set(sample[0, :int(sample_n[0])].tolist()),
            stats)


def _row_read_only_by(stage, q, k, v, cfg):
    """(seed, row): a residual row of list 0 that only the pilot (or only the final sample)
    reads, with a budget short of the residual (the sample does not enumerate it)."""
    for seed in range(40):
        pilot, sample, stats = _pilot_and_sample(q, k, v, cfg, seed)
        if bool(stats["exact"][0, 0]):
            continue
        rows = sorted(pilot - sample) if stage == "pilot" else sorted(sample - pilot)
        if rows:
            return seed, rows[0]
    pytest.fail(f"no seed reads a row in the {stage} only")


@pytest.mark.parametrize("share", [True, False])
def test_nan_in_q_reaches_that_head_only(device, share):
    q, k, v = _inputs(device)
    q[0, 1, 5] = NAN
    out, stats = vattention.decode(q, k, v, BASE.replace(share_gqa=share), seed=3,
                                   return_stats=True)
    _assert_nan_only_in(out, {1}, whole_head=True)
    assert torch.isnan(stats["required"][0, 1].cpu())


@pytest.mark.parametrize("row", [1, N - 2], ids=["sink", "local"])
@pytest.mark.parametrize("tensor", ["k", "v"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_nan_in_a_sink_or_local_row(device, row, tensor, num_splits):
    q, k, v = _inputs(device)
    (k if tensor == "k" else v)[0, 0, row, 7] = NAN
    out = vattention.decode(q, k, v, BASE.replace(num_splits=num_splits), seed=3)
    _assert_nan_only_in(out, {0, 1}, whole_head=tensor == "k")


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_nan_in_k_is_selected_and_reaches_the_heads_that_read_it(device, share, num_splits):
    q, k, v = _inputs(device)
    row = 300
    k[0, 0, row, 2] = NAN
    cfg = BASE.replace(share_gqa=share, num_splits=num_splits)
    out, stats = vattention.decode(q, k, v, cfg, seed=3, return_stats=True)
    heavy = stats["heavy_indices"][0].cpu()
    lists_of_kv0 = [0] if share else [0, 1]
    for lst in lists_of_kv0:          # select_topk ranks the NaN score above every number
        assert row in heavy[lst].tolist(), (lst, heavy[lst])
    _assert_nan_only_in(out, {0, 1}, whole_head=True)


@pytest.mark.parametrize("tensor,rule", [("k", "ratio"), ("v", "ratio"), ("v", "denominator")])
def test_nan_read_by_the_pilot_only_makes_the_residual_exact(device, tensor, rule):
    q, k, v = _inputs(device)
    # A NaN K row must stay out of the heavy set to reach the pilot: no heavy hitters.
    cfg = BASE.replace(rule=rule, heavy=0 if tensor == "k" else BASE.heavy)
    seed, row = _row_read_only_by("pilot", q, k, v, cfg)
    (k if tensor == "k" else v)[0, 0, row, 3] = NAN
    out, stats = vattention.decode(q, k, v, cfg, seed=seed, return_stats=True)
    # The pilot read the NaN: NaN budget, so the sample enumerates the residual.
    assert torch.isnan(stats["required"][0, :2].cpu()).all()
    assert stats["exact"][0, :2].cpu().all()
    assert (stats["budget"][0, :2].cpu() == stats["n_residual"][0, :2].cpu()).all()
    _assert_nan_only_in(out, {0, 1}, whole_head=tensor == "k")


@pytest.mark.parametrize("reuse_pilot", [False, True])
@pytest.mark.parametrize("tensor", ["k", "v"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_nan_read_by_the_sample_only(device, tensor, num_splits, reuse_pilot):
    q, k, v = _inputs(device)
    # With reuse the final sample draws only what the budget wants beyond the pilot: a
    # 4-token pilot leaves it some draws.
    cfg = BASE.replace(heavy=0 if tensor == "k" else BASE.heavy, num_splits=num_splits,
                       reuse_pilot=reuse_pilot, base_rate=4 if reuse_pilot else BASE.base_rate)
    seed, row = _row_read_only_by("sample", q, k, v, cfg)
    clean_budget = vattention.decode(q, k, v, cfg, seed=seed, return_stats=True)[1]["budget"]
    (k if tensor == "k" else v)[0, 0, row, 3] = NAN
    out, stats = vattention.decode(q, k, v, cfg, seed=seed, return_stats=True)
    # The pilot did not see it: same budget, same sample, which reads the NaN row.
    assert torch.equal(stats["budget"].cpu(), clean_budget.cpu())
    _assert_nan_only_in(out, {0, 1}, whole_head=tensor == "k")


def test_nan_no_stage_reads_leaves_every_output_finite(device):
    q, k, v = _inputs(device)
    k[0, :, 750, 0] = NAN
    v[0, :, 760, 1] = NAN
    k[0, :, N - 1] = NAN
    seq_lens = torch.tensor([700], device=device)
    for cfg in (BASE, BASE.replace(share_gqa=False), BASE.replace(heavy=0),
                BASE.replace(base_rate=1.0)):
        out = vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=3)
        _assert_nan_only_in(out, set())


@pytest.mark.parametrize("rule", ["ratio", "paper", "denominator"])
def test_a_nan_statistic_gives_a_nan_budget(rule):
    ones = torch.ones(3, dtype=torch.float64)
    est = budget.ResidualEstimate(
        z_hat=torch.tensor([NAN, 1.0, 1.0], dtype=torch.float64),
        n_hat=torch.ones(3, 4, dtype=torch.float64), o_hat=torch.ones(3, 4, dtype=torch.float64),
        var_w=torch.tensor([1e-4, NAN, 1e-4], dtype=torch.float64),
        trace_wv=torch.tensor([1e-4, NAN, 1e-4], dtype=torch.float64),
        trace_ratio=torch.tensor([1e-4, NAN, 1e-4], dtype=torch.float64))
    got = budget.required_samples(rule, est, 100 * ones, 10 * ones, 0.1, 0.1)
    # Comparisons with NaN are false: without care, a NaN tau or trace becomes a budget of 0.
    assert torch.isnan(got[:2]).all() and torch.isfinite(got[2]), got


def test_reference_attends_exactly_when_its_pilot_reads_a_nan():
    q, k, v = _inputs("cpu")
    cfg = BASE.replace(heavy=0)
    seed, row = _row_read_only_by("pilot", q, k, v, cfg)
    k[0, 0, row, 3] = NAN
    out, traces = reference.decode(q, k, v, cfg, seed=seed, return_trace=True)
    trace = traces[0][0]
    assert row in trace.pilot and sorted(trace.sample) == trace.residual
    _assert_nan_only_in(out, {0, 1}, whole_head=True)


# --------------------------------------------------------------------------------------
# no select stage without heavy hitters
# --------------------------------------------------------------------------------------


def test_no_heavy_hitters_skips_the_select_stage(device, monkeypatch):
    q, k, v = _inputs(device)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the select stage ran although no row has a heavy hitter")

    cfg = BASE.replace(heavy=0.0, base_rate=1.0)              # the pilot enumerates: exact
    expected = reference.decode(q.cpu(), k.cpu(), v.cpu(), cfg, seed=3)
    monkeypatch.setattr(decode_module, "select_scores", must_not_run)
    monkeypatch.setattr(ops, "select_topk", must_not_run)
    stages = []
    out, stats = vattention.decode(q, k, v, cfg, seed=3, return_stats=True,
                                   stage_timer=lambda name: stages.append(name) or _nullcontext())
    assert "select_scores" not in stages and "select_topk" not in stages
    assert stats["heavy_indices"].shape == (1, 2, 0)
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="select stage ran"):   # one heavy hitter: it runs
        vattention.decode(q, k, v, cfg.replace(heavy=1e-9), seed=3)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# CUDA graphs: every seed form, CPU and device seq_lens
# --------------------------------------------------------------------------------------

GRAPH_CFG = VAttentionConfig(sink=16, local=16, heavy=0.03, base_rate=0.05, epsilon=0.1,
                             delta=0.1)


def _peaked(seed, length=4096):
    q, k, v = synthetic_heads("peaked", 8, length, 64, gen(seed))
    q, k, v = (t.expand(2, *t.shape[1:]).contiguous() for t in (q, k, v))
    return q.half(), k[:, :2].contiguous().half(), v[:, :2].contiguous().half()


def _seed_form(form):
    return {"none": None, "int": 11, "pair": (11, 3),
            "tensor": torch.tensor([11, 3], dtype=torch.int64, device="cuda")}[form]


@pytest.mark.parametrize("values", [[5], [2 ** 63 - 1, 0], [7, 7, 3, 3, 3, 9, 7], list(range(9))])
def test_host_ints_fill_the_same_values_as_a_copy(device, monkeypatch, values):
    copied = device_module.host_values(values, torch.int64, device)
    monkeypatch.setattr(device_module, "capturing", lambda device: True)   # as under capture
    filled = device_module.host_values(values, torch.int64, device)
    assert filled.dtype == copied.dtype == torch.int64 and filled.device.type == device.type
    assert filled.tolist() == copied.tolist() == values


@cuda_only
@pytest.mark.parametrize("seed_form", ["none", "int", "pair", "tensor"])
@pytest.mark.parametrize("lens_device", ["cpu", "cuda"])
def test_cuda_graph_capture_and_replay_match_eager(seed_form, lens_device):
    static = [t.cuda() for t in _peaked(3)]
    seq_lens = torch.tensor([4096, 3000], device=lens_device)
    seed = _seed_form(seed_form)

    def step():
        return vattention.decode(*static, GRAPH_CFG, seq_lens=seq_lens, seed=seed)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):            # warm-up off the capture stream, as graphs need
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for trial in range(2):
        for dst, src in zip(static, _peaked(10 + trial)):
            dst.copy_(src)
        # seed None: the graph draws from torch's generator like eager code does, so the
        # same generator state gives the same draws.
        torch.cuda.manual_seed(100 + trial)
        graph.replay()
        got = captured.clone()
        torch.cuda.manual_seed(100 + trial)
        expected = step()
        torch.cuda.synchronize()
        assert torch.isfinite(got.float()).all()
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)


@cuda_only
@pytest.mark.parametrize("seed_form", ["none", "int", "pair", "tensor"])
def test_cuda_decode_never_syncs_with_host_seeds_and_cpu_seq_lens(seed_form):
    q, k, v = (t.cuda() for t in _peaked(2))
    seq_lens = torch.tensor([4096, 2500])              # CPU: read on the host, no sync
    seed = _seed_form(seed_form)
    vattention.decode(q, k, v, GRAPH_CFG, seq_lens=seq_lens, seed=seed)   # warm-up
    with no_sync():
        vattention.decode(q, k, v, GRAPH_CFG, seq_lens=seq_lens, seed=seed)
        vattention.decode(q, k, v, GRAPH_CFG, seq_lens=[4096, 4096], seed=seed,
                          return_stats=True)
