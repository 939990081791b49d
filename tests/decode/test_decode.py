"""vattention.decode against the float64 reference, and the estimator's statistics."""
import math

import pytest
import torch

import vattention
from vattention import reference
from vattention.config import VAttentionConfig

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


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
                        assert required[b, h].item() == pytest.approx(value, rel=5e-3, abs=1e-3)


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
    from vattention import ops
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
                                            length, 1)
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


def test_output_mean_converges_to_exact():
    # O^ = N^ / Z^ is a ratio estimator (bias O(1/b)); averaged over many seeds it sits
    # far closer to O than any single estimate does.
    q, k, v = random_qkv(1, 2, 2, 6000, 64, torch.float32, "cpu", seed=4)
    cfg = VAttentionConfig(sink=8, local=8, heavy=0.01, epsilon=0.3, delta=0.3, rule="denominator")
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
