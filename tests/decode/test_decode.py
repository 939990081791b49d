"""vattention.decode end to end: against the float64 reference on every device, the
estimator's statistics, CUDA against CPU, bad input at the Python boundary."""
import math

import pytest
import torch

import vattention
from tests.helpers import cuda_only, make_qkv, peaked_inputs, qkv
from tests.sparse_attention.reference import dense_attention_ref
from vattention import VAttentionConfig, ops, reference

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# decode's budget comes from float32 pilot moments, the reference's from float64 pilot
# terms: they agree to REQUIRED_RTOL relative before rounding up to whole samples (checked
# by test_matches_reference). Two backends' budgets can then differ by that much plus the
# one sample that ceil() may flip (test_cuda_matches_cpu).
REQUIRED_RTOL = 5e-3


def random_qkv(batch, q_heads, kv_heads, length, dim, dtype, device, seed, value_mean=0.5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, dim, generator=g) * 1.5
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g) + value_mean
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def relative_error(out, exact):
    return ((out.double().cpu() - exact).norm(dim=-1) / exact.norm(dim=-1).clamp(min=1e-30))


def list_budgets(stats, group, share):
    budget = stats["budget"].cpu()
    return budget[:, ::group] if share else budget


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 7])
def test_matches_reference(device, dtype, dim, group):
    kv_heads = 2
    lengths = [1900, 700, 1]
    q, k, v = random_qkv(3, kv_heads * group, kv_heads, 1900, dim, dtype, device,
                         seed=dim * 10 + group)
    for share, rule in ((True, "ratio"), (False, "denominator")):
        cfg = VAttentionConfig(sink=8, local=16, heavy=0.04, base_rate=0.05, epsilon=0.2,
                               delta=0.2, rule=rule, share_gqa=share)
        out, stats = vattention.decode(q, k, v, cfg, seq_lens=torch.tensor(lengths), seed=11,
                                       return_stats=True)
        assert out.dtype == dtype and out.shape == q.shape
        heavy = stats["heavy_indices"].cpu()
        heavy_lists = [[[int(i) for i in row if i >= 0] for row in batch_row] for batch_row in heavy]
        expected, traces = reference.decode(
            q.cpu(), k.cpu(), v.cpu(), cfg, seq_lens=lengths, seed=11,
            heavy_override=heavy_lists, budget_override=list_budgets(stats, group, share).tolist(),
            return_trace=True)
        error = (out.double().cpu() - expected).abs().max() / expected.abs().max()
        assert error < TOLERANCE[dtype], (share, rule, float(error))
        # The budget the fast path computed from pilot moments agrees with the reference's
        # budget from explicit pilot terms (before rounding up to whole tokens).
        required = stats["required"].cpu()
        for b, row_traces in enumerate(traces):
            for lst, trace in enumerate(row_traces):
                for h, value in trace.required.items():
                    if math.isfinite(value) and value > 1 and len(trace.pilot) < len(trace.residual):
                        assert required[b, h].item() == pytest.approx(value, rel=REQUIRED_RTOL,
                                                                      abs=1e-3)


def test_selection_matches_reference_in_float32():
    q, k, v = random_qkv(2, 8, 2, 3000, 64, torch.float32, "cpu", seed=5)
    cfg = VAttentionConfig(sink=4, local=4, heavy=0.05, epsilon=0.1, delta=0.1)
    out, stats = vattention.decode(q, k, v, cfg, seed=3, return_stats=True)
    expected, traces = reference.decode(q, k, v, cfg, seed=3, return_trace=True)
    for b in range(2):
        for lst in range(2):
            fast = sorted(int(i) for i in stats["heavy_indices"][b, lst] if i >= 0)
            assert fast == traces[b][lst].heavy
    # Same heavy set, same pilot and the same budget: the whole estimate agrees.
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("length,lengths", [(1, [1, 0]), (40, [40, 17]), (300, [300, 256])])
def test_short_contexts_are_exact(device, length, lengths):
    # N smaller than sink + local (or than the deterministic set): no sampling, dense answer.
    q, k, v = random_qkv(2, 4, 2, length, 64, torch.float32, device, seed=length)
    cfg = VAttentionConfig(sink=128, local=128, heavy=0.05)
    out, stats = vattention.decode(q, k, v, cfg, seq_lens=torch.tensor(lengths), seed=0,
                                   return_stats=True)
    exact = reference.dense(q.cpu(), k.cpu(), v.cpu(), seq_lens=lengths)
    assert torch.allclose(out.double().cpu(), exact, atol=1e-5)
    assert bool(stats["exact"].all())
    nonempty = torch.tensor(lengths) > 0
    assert torch.allclose(stats["density"].cpu()[nonempty], torch.ones(4)[None].expand(2, 4)[nonempty])


def test_tiny_epsilon_gives_dense_attention(device):
    q, k, v = random_qkv(2, 8, 2, 2000, 64, torch.float32, device, seed=1)
    cfg = VAttentionConfig(sink=16, local=16, heavy=0.02, epsilon=1e-4, delta=0.01)
    out, stats = vattention.decode(q, k, v, cfg, seed=1, return_stats=True)
    assert bool(stats["exact"].all())
    assert torch.allclose(out.double().cpu(), reference.dense(q.cpu(), k.cpu(), v.cpu()), atol=1e-5)
    assert torch.allclose(stats["density"].cpu(), torch.ones(2, 8))


def test_same_seed_same_answer_and_seeds_differ(device):
    q, k, v = random_qkv(2, 4, 4, 4000, 64, torch.float32, device, seed=2)
    cfg = VAttentionConfig(sink=8, local=8, heavy=0.02, epsilon=0.3, delta=0.3, rule="denominator")
    first = vattention.decode(q, k, v, cfg, seed=123)
    assert torch.equal(first, vattention.decode(q, k, v, cfg, seed=123))
    assert not torch.equal(first, vattention.decode(q, k, v, cfg, seed=124))
    assert not torch.equal(first, vattention.decode(q, k, v, cfg, seed=(123, 1)))


def test_default_generator_seeding(device):
    q, k, v = random_qkv(1, 4, 4, 4000, 64, torch.float32, device, seed=3)
    cfg = VAttentionConfig(sink=8, local=8, heavy=0.02, epsilon=0.3, delta=0.3, rule="denominator")
    torch.manual_seed(0)
    a1, a2 = vattention.decode(q, k, v, cfg), vattention.decode(q, k, v, cfg)
    torch.manual_seed(0)
    b1 = vattention.decode(q, k, v, cfg)
    assert torch.equal(a1, b1)
    assert not torch.equal(a1, a2)


def test_residual_estimates_are_unbiased():
    # N^ and Z^ of the sampled residual are unbiased: their mean over independent
    # draws converges to the exact residual sums within a few standard errors.
    g = torch.Generator().manual_seed(0)
    rows, length, dim = 512, 1000, 16
    q = torch.randn(1, 1, dim, generator=g).expand(rows, 1, dim).contiguous()
    k = torch.randn(1, 1, length, dim, generator=g).expand(rows, 1, length, dim)
    v = (torch.randn(1, 1, length, dim, generator=g) + 1).expand(rows, 1, length, dim)
    heavy = torch.topk(k[0, 0] @ q[0, 0], 20).indices.sort().values.to(torch.int32)
    heavy = heavy[None].expand(rows, -1).contiguous()
    starts = torch.zeros(rows, dtype=torch.int32)
    ends = torch.full((rows,), length, dtype=torch.int32)
    budget = torch.full((rows,), 25, dtype=torch.int32)
    idx, logw, counts = ops.sample_residual(heavy, starts, ends, budget, torch.tensor([9, 0]),
                                            length, ops.FINAL_DRAWS)
    out, lse = ops.sparse_attention(q, k, v, idx[:, None], logw[:, None], counts[:, None], 0.25, 0)
    z_hat = lse[:, 0].double().exp()
    n_hat = out[:, 0].double() * z_hat[:, None]
    mask = torch.ones(length, dtype=torch.bool)
    mask[heavy[0].long()] = False
    w = torch.exp(0.25 * (k[0, 0, mask].double() @ q[0, 0].double()))
    z_true = w.sum()
    n_true = (w[:, None] * v[0, 0, mask].double()).sum(0)
    se_z = z_hat.std() / math.sqrt(rows)
    assert abs(z_hat.mean() - z_true) < 4 * se_z
    se_n = n_hat.std(0) / math.sqrt(rows)
    assert ((n_hat.mean(0) - n_true).abs() < 4 * se_n + 1e-9).float().mean() >= 0.95


@pytest.mark.parametrize("reuse_pilot", [False, True])
def test_output_mean_converges_to_exact(reuse_pilot):
    # O^ = N^ / Z^ is a ratio estimator (bias O(1/b)); averaged over many seeds it sits
    # far closer to O than any single estimate does. With pilot reuse the sample size
    # depends on the pilot's draws (a stopping rule): unbiased only asymptotically, and
    # still far closer on average than one estimate.
    q, k, v = random_qkv(1, 2, 2, 6000, 64, torch.float32, "cpu", seed=4)
    cfg = VAttentionConfig(sink=8, local=8, heavy=0.01, epsilon=0.3, delta=0.3, rule="denominator",
                           base_rate=128, reuse_pilot=reuse_pilot)
    trials = 256
    out, stats = vattention.decode(q.expand(trials, -1, -1), k.expand(trials, -1, -1, -1),
                                   v.expand(trials, -1, -1, -1), cfg, seed=5, return_stats=True)
    assert not bool(stats["exact"].any())
    exact = reference.dense(q, k, v)[0]
    single = relative_error(out, exact).mean()
    averaged = relative_error(out.double().mean(0, keepdim=True), exact[None]).max()
    assert single > 0.005
    assert averaged < single / 8


def test_stats_are_consistent(device):
    q, k, v = random_qkv(2, 8, 2, 5000, 64, torch.float32, device, seed=6)
    cfg = VAttentionConfig(sink=32, local=32, heavy=0.03, base_rate=0.05, epsilon=0.2, delta=0.2)
    lengths = torch.tensor([5000, 2600])
    out, stats = vattention.decode(q, k, v, cfg, seq_lens=lengths, seed=0, return_stats=True)
    for key in ("budget", "density", "pilot", "required", "exact", "n_residual", "error_bound"):
        assert stats[key].shape == (2, 8), key
        assert stats[key].device == q.device
    n_res = torch.tensor([5000 - 64 - 150, 2600 - 64 - 78])[:, None]
    assert torch.equal(stats["n_residual"].cpu(), n_res.expand(2, 8))
    assert bool((stats["budget"].cpu() <= n_res).all())
    assert bool((stats["pilot"].cpu() == torch.ceil(0.05 * n_res.double()).long()).all())
    density = stats["density"].cpu()
    assert bool(((density > 0) & (density <= 1)).all())
    # Shared GQA lists: all heads of a group read the same rows.
    assert torch.equal(density[:, :4], density[:, :1].expand(2, 4))
    not_exact = ~stats["exact"].cpu()
    assert bool((stats["error_bound"].cpu()[not_exact] <= cfg.epsilon + 1e-9).all())


@pytest.mark.parametrize("reuse_pilot", [False, True])
@pytest.mark.parametrize("share_gqa", [True, False])
def test_decode_is_exact_when_the_residual_is_enumerated(device, share_gqa, reuse_pilot):
    # With reuse_pilot the pilot enumerated the residual and so does the final sample: the
    # pilot must not be counted twice.
    g = torch.Generator().manual_seed(23)
    q, k, v = make_qkv(3, 8, 2, 200, 64, torch.float32, g)
    seq_lens = torch.tensor([200, 57, 1])
    cfg = vattention.VAttentionConfig(sink=3, local=5, heavy=10, base_rate=1.0,
                                      share_gqa=share_gqa, reuse_pilot=reuse_pilot)
    out = vattention.decode(q.to(device), k.to(device), v.to(device), cfg,
                            seq_lens=seq_lens.to(device), seed=5)
    dense = dense_attention_ref(q, k, v, 1 / 8, seq_lens.tolist())
    torch.testing.assert_close(out.cpu().to(torch.float64), dense, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------
# The pilot as a count, and pilot reuse
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reuse_pilot", [False, True])
@pytest.mark.parametrize("base_rate", [0.05, 64])
@pytest.mark.parametrize("group,share", [(4, True), (4, False), (1, False)])
def test_pilot_settings_match_reference(device, base_rate, group, share, reuse_pilot):
    q, k, v = random_qkv(3, 2 * group, 2, 1900, 64, torch.float32, device, seed=31 + group)
    lengths = [1900, 700, 1]
    cfg = VAttentionConfig(sink=8, local=16, heavy=0.04, base_rate=base_rate, epsilon=0.2,
                           delta=0.2, share_gqa=share, reuse_pilot=reuse_pilot)
    out, stats = vattention.decode(q, k, v, cfg, seq_lens=torch.tensor(lengths), seed=11,
                                   return_stats=True)
    heavy = stats["heavy_indices"].cpu()
    heavy_lists = [[[int(i) for i in row if i >= 0] for row in batch_row] for batch_row in heavy]
    budgets = list_budgets(stats, group, share)
    expected, traces = reference.decode(
        q.cpu(), k.cpu(), v.cpu(), cfg, seq_lens=lengths, seed=11, heavy_override=heavy_lists,
        budget_override=budgets.tolist(), return_trace=True)
    error = (out.double().cpu() - expected).abs().max() / expected.abs().max()
    assert error < TOLERANCE[torch.float32], float(error)
    pilot = stats["pilot"].cpu()
    pilot_lists = pilot[:, ::group] if share else pilot
    sampled = 0
    for b, row_traces in enumerate(traces):
        for lst, trace in enumerate(row_traces):
            assert len(trace.sample) == int(budgets[b, lst])
            if reuse_pilot and len(trace.pilot) < len(trace.residual) \
                    and budgets[b, lst] < len(trace.residual):
                # The estimate's draws begin with the pilot's, all weighing n_r / budget.
                sampled += 1
                assert trace.sample[:len(trace.pilot)] == trace.pilot
                assert int(budgets[b, lst]) >= int(pilot_lists[b, lst])
                assert trace.sample_weight == pytest.approx(len(trace.residual) / len(trace.sample))
    assert sampled >= 2 or not reuse_pilot
    if isinstance(base_rate, int):
        n_res = stats["n_residual"].cpu()
        assert torch.equal(pilot.long(), torch.where(n_res > 0, n_res.clamp(min=2, max=64), 0))


def test_reuse_pilot_saves_the_pilots_rows(device):
    # Same seed, same pilot, same budget b: without reuse the kernels load p + b residual
    # rows, with reuse p + max(b - p, 0) (the pilot's share of the estimate comes from its
    # statistics, not from loading its rows again), at least min_samples draws in all.
    q, k, v = random_qkv(2, 8, 2, 5000, 64, torch.float32, device, seed=6)
    cfg = VAttentionConfig(sink=32, local=32, heavy=0.03, base_rate=128, epsilon=0.2, delta=0.2,
                           reuse_pilot=False)
    lengths = torch.tensor([5000, 2600])
    _, plain = vattention.decode(q, k, v, cfg, seq_lens=lengths, seed=0, return_stats=True)
    _, reused = vattention.decode(q, k, v, cfg.replace(reuse_pilot=True), seq_lens=lengths,
                                  seed=0, return_stats=True)
    assert torch.equal(plain["pilot"], reused["pilot"])
    assert torch.equal(plain["required"], reused["required"])
    assert not bool(reused["exact"].any())
    pilot, budget = plain["pilot"].cpu(), plain["budget"].cpu()
    assert torch.equal(reused["budget"].cpu(), torch.maximum(budget, pilot))
    assert bool((reused["budget"].cpu() >= cfg.min_samples).all())
    saved_rows = (plain["relative_bytes"] - reused["relative_bytes"]).cpu().double() \
        * lengths[:, None].double()
    assert torch.allclose(saved_rows, torch.minimum(budget, pilot).double(), atol=0.05)
    assert bool((reused["density"] <= plain["density"]).all())
    # The promise at the draws taken: error_bound uses the estimate's whole sample.
    expected_bound = cfg.epsilon * torch.sqrt(reused["required"].cpu()
                                              / reused["budget"].cpu().double())
    assert torch.allclose(reused["error_bound"].cpu(), expected_bound)


@pytest.mark.parametrize("share_gqa", [True, False])
def test_reuse_pilot_is_exact_when_the_budget_reaches_the_residual(device, share_gqa):
    # The pilot did not enumerate the residual but the budget did: the final sample then
    # enumerates it with weight 1, and the pilot's draws must not be added on top.
    q, k, v = random_qkv(2, 8, 2, 2000, 64, torch.float32, device, seed=1)
    cfg = VAttentionConfig(sink=16, local=16, heavy=0.02, base_rate=64, epsilon=1e-4,
                           delta=0.01, share_gqa=share_gqa, reuse_pilot=True)
    out, stats = vattention.decode(q, k, v, cfg, seed=1, return_stats=True)
    assert bool(stats["exact"].all())
    assert bool((stats["pilot"] < stats["n_residual"]).all())
    assert torch.equal(stats["budget"].long().cpu(), stats["n_residual"].cpu())
    assert torch.allclose(out.double().cpu(), reference.dense(q.cpu(), k.cpu(), v.cpu()), atol=1e-5)


# --------------------------------------------------------------------------------------
# CUDA against CPU
# --------------------------------------------------------------------------------------

CUDA_CFG = VAttentionConfig(sink=16, local=16, heavy=0.03, base_rate=0.05, epsilon=0.1, delta=0.1)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("share", [True, False])
def test_cuda_matches_cpu(dtype, share):
    q, k, v = peaked_inputs(3, 4, 5000, dtype, seed=1)
    k = k[:, :2].contiguous()
    v = v[:, :2].contiguous()
    cfg = CUDA_CFG.replace(share_gqa=share)
    lengths = torch.tensor([5000, 3100, 40])
    out_cpu, stats_cpu = vattention.decode(q, k, v, cfg, seq_lens=lengths, seed=5,
                                           return_stats=True)
    out_gpu, stats_gpu = vattention.decode(q.cuda(), k.cuda(), v.cuda(), cfg,
                                           seq_lens=lengths.cuda(), seed=5, return_stats=True)
    assert torch.equal(stats_cpu["heavy_indices"], stats_gpu["heavy_indices"].cpu())
    budget_cpu = stats_cpu["budget"].to(torch.float64)
    budget_gpu = stats_gpu["budget"].cpu().to(torch.float64)
    # Not exact: 1 sample (ceil) plus the documented relative agreement of the budgets.
    slack = 1 + REQUIRED_RTOL * budget_cpu
    assert bool(((budget_gpu - budget_cpu).abs() <= slack).all()), (budget_cpu, budget_gpu)
    # Heads with the same budget drew the same sample (same Philox draws on both devices).
    same = budget_gpu == budget_cpu
    atol = 2e-2 if dtype != torch.float32 else 1e-4
    assert torch.allclose(out_cpu.float()[same], out_gpu.float().cpu()[same], atol=atol)
    if not same.all():
        # A budget that rounded the other way draws one sample more or less: such a head
        # is checked against the reference replaying the GPU's own heavy set and budget.
        group = q.shape[1] // k.shape[1]
        heavy = stats_gpu["heavy_indices"].cpu()
        heavy_lists = [[[int(i) for i in row if i >= 0] for row in batch_row] for batch_row in heavy]
        expected = reference.decode(q, k, v, cfg, seq_lens=lengths.tolist(), seed=5,
                                    heavy_override=heavy_lists,
                                    budget_override=list_budgets(stats_gpu, group, share).tolist())
        error = (out_gpu.double().cpu() - expected)[~same].abs().max() / expected.abs().max()
        assert error < TOLERANCE[dtype], float(error)


# --------------------------------------------------------------------------------------
# bad input at the Python boundary
# --------------------------------------------------------------------------------------


def test_decode_rejects_bad_cfg():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="cfg"):
        vattention.decode(q, k, v, cfg={"epsilon": 0.1})


@pytest.mark.parametrize("case,error,match", [
    ("q_rank", ValueError, r"\bq must be"),
    ("q_not_tensor", ValueError, r"\bq must be"),
    ("k_rank", ValueError, r"\bk must be"),
    ("v_rank", ValueError, r"\bv must be"),
    ("v_shape", ValueError, r"\bv must have k's shape"),
    ("dtype_mismatch", TypeError, r"q, k and v must share a dtype"),
    ("float64", TypeError, r"\bq must be float32"),
    ("int_q", TypeError, r"\bq must be float32"),
    ("device_mismatch", ValueError, r"one device"),
    ("batch_mismatch", ValueError, r"batch"),
    ("head_dim_mismatch", ValueError, r"head_dim"),
    ("gqa", ValueError, r"q_heads \(6\) must be a multiple of kv_heads \(4\)"),
    ("zero_kv_heads", ValueError, r"kv_heads"),
])
def test_decode_rejects_bad_qkv(case, error, match):
    q, k, v = qkv()
    if case == "q_rank":
        q = q[0]
    elif case == "q_not_tensor":
        q = q.tolist()
    elif case == "k_rank":
        k = k[0]
    elif case == "v_rank":
        v = v[:, 0]
    elif case == "v_shape":
        v = v[:, :, :8]
    elif case == "dtype_mismatch":
        k = k.half()
    elif case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "int_q":
        q, k, v = q.int(), k.int(), v.int()
    elif case == "device_mismatch":
        k, v = k.to("meta"), v.to("meta")
    elif case == "batch_mismatch":
        q = torch.cat([q, q])
    elif case == "head_dim_mismatch":
        q = torch.cat([q, q], dim=-1)
    elif case == "gqa":
        q = torch.randn(2, 6, 8)
        k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    elif case == "zero_kv_heads":
        k, v = k[:, :0], v[:, :0]
    with pytest.raises(error, match=match):
        vattention.decode(q, k, v, seed=0)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_decode_rejects_bad_scale(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale"):
        vattention.decode(q, k, v, scale=scale, seed=0)


@pytest.mark.parametrize("seq_lens", [
    torch.tensor([16, 17]),            # > length
    torch.tensor([-1, 3]),             # < 0
    torch.tensor([16]),                # wrong shape
    torch.tensor([[16, 16]]),          # wrong rank
    torch.tensor([16.0, 3.0]),         # wrong dtype
    torch.tensor([True, True]),        # wrong dtype
    [16, 17],                          # a list, out of range
    [3],                               # a list, wrong length
])
def test_decode_rejects_bad_seq_lens(seq_lens):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="seq_lens"):
        vattention.decode(q, k, v, seq_lens=seq_lens, seed=0)


def test_decode_rejects_seq_lens_on_another_device():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="seq_lens must be on"):
        vattention.decode(q, k, v, seq_lens=torch.tensor([3, 4], device="meta"), seed=0)


@pytest.mark.parametrize("seed,match", [
    (-1, r"\bseed must be"),
    (2 ** 63, r"\bseed must be"),
    (1.5, r"\bseed must be"),
    (True, r"\bseed must be"),
    ("7", r"\bseed must be"),
    ((1, 2, 3), r"\bseed must be"),
    ((-5, 0), r"\bseed must be"),
    ((5, -1), r"seed offset"),
    ((5, 2 ** 30), r"seed offset"),
    ((5, 1.0), r"seed offset"),
    ((5, False), r"seed offset"),
    (torch.tensor([1, 2], dtype=torch.int32), r"seed as a tensor"),
    (torch.tensor([1, 2, 3]), r"seed as a tensor"),
    (torch.tensor([[1, 2]]), r"seed as a tensor"),
    (torch.tensor([1, 2], device="meta"), r"seed tensor must be on"),
])
def test_decode_rejects_bad_seed(seed, match):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        vattention.decode(q, k, v, seed=seed)


def test_decode_seed_tensor_with_offset_out_of_range_is_caught_by_the_sampler():
    q, k, v = qkv(length=400)
    cfg = VAttentionConfig(sink=2, local=2, heavy=2, base_rate=0.01, selector="oracle")
    with pytest.raises(RuntimeError, match="rng offset"):
        vattention.decode(q, k, v, cfg, seed=torch.tensor([1, 2 ** 30]))


def test_decode_accepts_good_seeds():
    q, k, v = qkv()
    for seed in (None, 0, 2 ** 63 - 1, (3, 2 ** 30 - 1), torch.tensor([4, 5])):
        assert vattention.decode(q, k, v, VAttentionConfig(selector="oracle"),
                                 seed=seed).shape == q.shape
