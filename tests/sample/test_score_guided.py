"""vattention.score_guided (the importance-sampling reference benchmarks/study_score_guided.py
measured): the proposal's floor, unbiasedness of the residual sums, and the uniform limit."""
import math

import pytest
import torch

from vattention import score_guided
from vattention.config import VAttentionConfig
from vattention.reference import dense

F64 = torch.float64


def test_proposal_is_a_distribution_with_a_uniform_floor():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0), dtype=F64) * 4
    p = score_guided.proposal(logits, lam=0.25)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    assert float(p.min()) >= 0.25 / 500 * (1 - 1e-12)
    with pytest.raises(ValueError, match="lam"):
        score_guided.proposal(logits, lam=0.0)


def _residual_case(n_r=400, dim=8, group=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(group, n_r, generator=g, dtype=F64)
    w = torch.exp(logits - logits.max())
    v = torch.randn(n_r, dim, generator=g, dtype=F64) + 2.0
    # A proposal from noisy logits: right on average, wrong per token.
    approx = logits + 0.7 * torch.randn(group, n_r, generator=g, dtype=F64)
    return w, v, approx, g


def test_residual_sums_are_unbiased():
    w, v, approx, g = _residual_case()
    zero_f = torch.zeros(w.shape[0], dtype=F64)
    # A loose (epsilon, delta): every budget stays within the pilot, so each trial draws
    # exactly `pilot` times (no stopping rule) and the sums must be unbiased, not only
    # asymptotically.
    sums = score_guided.estimate_residual(w, v, approx, zero_f, torch.zeros(w.shape[0], v.shape[1],
                                          dtype=F64), epsilon=0.5, delta=0.5, trials=4000,
                                          pilot=64, min_samples=8, generator=g)
    assert not bool(sums.exact.any())       # the case must exercise sampling
    assert bool((sums.loads == 64).all())
    exact_z = w.sum(-1)
    mean_z = sums.z.mean(0)
    se_z = sums.z.std(0) / math.sqrt(sums.z.shape[0])
    assert bool(((mean_z - exact_z).abs() <= 4 * se_z).all()), (mean_z, exact_z, se_z)
    exact_n = w @ v
    mean_n = sums.n.mean(0)
    se_n = sums.n.std(0) / math.sqrt(sums.n.shape[0])
    assert bool(((mean_n - exact_n).abs() <= 4 * se_n + 1e-12).all())


def test_decode_is_close_to_dense_and_reads_fewer_rows():
    g = torch.Generator().manual_seed(3)
    n, dim = 3000, 32
    q = 3.0 * torch.randn(1, 4, dim, generator=g, dtype=F64)
    k = torch.randn(1, 2, n, dim, generator=g, dtype=F64)
    v = torch.randn(1, 2, n, dim, generator=g, dtype=F64) + 1.0
    cfg = VAttentionConfig(sink=16, local=16, epsilon=0.1, delta=0.1, selector="oracle")
    out, stats = score_guided.decode(q, k, v, cfg, seed=0)
    error = (out - dense(q, k, v)).norm(dim=-1) / dense(q, k, v).norm(dim=-1)
    assert float(error.max()) < 3 * cfg.epsilon
    assert float(stats["density"].max()) < 1.0
