"""The ratio rule's chi-square tail (tail="chi2", docs/algorithm.md "Tail bound"): the quantile
table, the effective dimension from pilot_dispersion's sums, the budget it gives, and
decode against the float64 reference."""
from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from tests.helpers import gen
from tests.pilot.reference import pilot_dispersion_ref
from vattention import VAttentionConfig, reference
from vattention import budget as br
from vattention.decode import decode

F64 = torch.float64


@pytest.mark.parametrize("delta", [0.01, 0.05, 0.1, 0.3])
def test_chi2_table_is_the_exact_quantile_over_h(delta):
    table = torch.tensor(br.chi2_quantile_table(delta), dtype=F64)
    assert table.numel() == br.CHI2_TABLE_DIMS
    z = NormalDist().inv_cdf(1 - delta / 2)
    h = torch.arange(1, br.CHI2_TABLE_DIMS + 1, dtype=F64)
    cdf = torch.special.gammainc(h / 2, h * table / 2)
    # Rounded up: the CDF at the tabled quantile reaches 1 - delta; where q_h decreases in h
    # (delta < ~0.16) it is the exact quantile, above that the suffix max of exact ones.
    assert (cdf >= 1 - delta - 1e-15).all()
    assert (table[1:] <= table[:-1]).all()                       # non-increasing in h
    assert (table > 1).all()
    if delta <= 0.1:
        assert table[0] == pytest.approx(z * z, rel=1e-12)      # h = 1: the normal tail
        assert (cdf <= 1 - delta + 1e-9).all()
    else:
        assert table[0] > z * z and table[0] == table.max()


def test_chi2_table_known_values():
    # chi^2 quantiles from standard tables: (h, 1 - delta, value)
    for h, delta, value in ((10, 0.05, 18.307), (30, 0.1, 40.256), (2, 0.05, 5.991)):
        assert h * br.chi2_quantile_table(delta)[h - 1] == pytest.approx(value, abs=1e-3)


def test_chi2_factor_reads_floor_h_clamped_and_keeps_nan():
    table = br.chi2_quantile_table(0.1)
    h = torch.tensor([1.0, 2.9, 3.0, 0.5, 1e6, math.inf, math.nan], dtype=F64)
    got = br.chi2_factor(h, 0.1)
    want = [table[0], table[1], table[2], table[0], table[-1], table[-1]]
    assert got[:6].tolist() == want
    assert math.isnan(got[6])


def test_satterthwaite_tail_holds_for_gaussian_errors():
    """The lemma behind the rule: for e ~ N(0, Sigma), P(||e||^2 > q_h Tr Sigma) <= delta
    (within Monte-Carlo error), with h = (Tr Sigma)^2 / Tr(Sigma^2) read at floor(h); the
    normal tail's z^2 is far too wide there, and for a rank-one Sigma the two agree."""
    g = gen(0)
    for eigen in (torch.ones(16), 0.8 ** torch.arange(32.0), torch.tensor([1.0] + [1e-3] * 7)):
        eigen = eigen.double()
        h = float(eigen.sum() ** 2 / (eigen ** 2).sum())
        e2 = (torch.randn(200_000, eigen.numel(), generator=g, dtype=F64) ** 2 * eigen).sum(1)
        for delta in (0.05, 0.1):
            q = float(br.chi2_factor(torch.tensor([h], dtype=F64), delta))
            rate = float((e2 > q * eigen.sum()).double().mean())
            assert rate <= delta + 4 * math.sqrt(delta / 200_000), (h, delta, rate)
            assert rate >= 0.5 * delta                            # and not wildly loose
            z2 = NormalDist().inv_cdf(1 - delta / 2) ** 2
            assert float((e2 > z2 * eigen.sum()).double().mean()) <= rate


def dispersion_of(terms):
    """pilot_dispersion's sums for explicit terms (one head), via the plain reference's maths."""
    c = terms - terms.mean(0)
    cov = c.T @ c
    return torch.stack([cov.trace(), (cov ** 2).sum(), ((c ** 2).sum(1) ** 2).sum()])


def test_effective_dimension_estimates_h_from_draws():
    """Isotropic terms in k dimensions: the U-statistic recovers k (times the shrink), also
    with heavy-tailed weights, where the plug-in (Tr S)^2 / Tr(S^2) collapses."""
    g = gen(1)
    for k in (8, 32):
        x = torch.zeros(4096, 64, dtype=F64)
        x[:, :k] = torch.randn(4096, k, generator=g, dtype=F64)
        h = float(br.effective_dimension(dispersion_of(x)))
        assert h == pytest.approx(br.TAIL_DIM_SHRINK * k, rel=0.1)
        w = torch.exp(2.0 * torch.randn(4096, 1, generator=g, dtype=F64))   # heavy tail
        d = dispersion_of(w * x)
        plug_in = float(d[0] ** 2 / d[1])
        assert plug_in < 0.7 * k
        assert float(br.effective_dimension(d)) / br.TAIL_DIM_SHRINK > 1.5 * plug_in


def test_effective_dimension_edges():
    d = torch.tensor([[4.0, 16.0, 16.0],            # a single varying term: no pair, h = 1
                      [0.0, 0.0, 0.0],              # no variation
                      [math.nan, 1.0, 1.0],
                      [10.0, 20.0, math.nan],
                      [10.0, 60.0, 5.0]], dtype=torch.float32)
    h = br.effective_dimension(d)
    assert h.dtype == F64
    assert h[:2].tolist() == [1.0, 1.0]
    assert math.isnan(h[2]) and math.isnan(h[3])
    assert float(h[4]) == pytest.approx(max(br.TAIL_DIM_SHRINK * (100 - 5) / (60 - 5), 1.0))


def test_chi2_budget_is_the_normal_budget_times_q_over_z2():
    g = gen(2)
    est = br.ResidualEstimate(z_hat=torch.rand(5, generator=g, dtype=F64) + 1,
                              n_hat=torch.randn(5, 8, generator=g, dtype=F64),
                              o_hat=torch.randn(5, 8, generator=g, dtype=F64) + 3,
                              var_w=torch.rand(5, generator=g, dtype=F64),
                              trace_wv=torch.rand(5, generator=g, dtype=F64),
                              trace_ratio=torch.rand(5, generator=g, dtype=F64) * 1e-6)
    n_r = torch.full((5,), 500, dtype=torch.int64)
    p = torch.full((5,), 128, dtype=torch.int64)
    h = torch.tensor([1.0, 2.5, 7.0, 30.0, 300.0], dtype=F64)
    normal = br.required_samples("ratio", est, n_r, p, 0.1, 0.1)
    chi2 = br.required_samples("ratio", est, n_r, p, 0.1, 0.1, effective_dim=h)
    z2 = br.z_two_sided(0.1) ** 2
    torch.testing.assert_close(chi2, normal * br.chi2_factor(h, 0.1) / z2)
    assert torch.isfinite(normal).all() and chi2[0] == pytest.approx(float(normal[0]))
    assert (chi2[1:] < normal[1:]).all()
    with pytest.raises(ValueError, match="ratio rule only"):
        br.required_samples("paper", est, n_r, p, 0.1, 0.1, effective_dim=h)


def test_config_tail_field():
    assert VAttentionConfig().tail == "normal"
    VAttentionConfig(tail="chi2")
    for bad in ("Chi2", "t", None):
        with pytest.raises(ValueError, match=r"VAttentionConfig\.tail"):
            VAttentionConfig(tail=bad)
    with pytest.raises(ValueError, match="ratio rule only"):
        VAttentionConfig(tail="chi2", rule="paper")


@pytest.mark.parametrize("share_gqa", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_chi2_tail_matches_the_float64_reference(device, share_gqa, dtype):
    """Per-head budgets (stats["required"]) and outputs of decode against reference.decode
    with tail="chi2", GQA lists shared or per head, ragged lengths."""
    g = gen(3)
    batch, q_heads, kv_heads, n, dim = 2, 4, 2, 2500, 64
    q = (2 * torch.randn(batch, q_heads, dim, generator=g)).to(dtype)
    k = torch.randn(batch, kv_heads, n, dim, generator=g).to(dtype)
    v = (torch.randn(batch, kv_heads, n, dim, generator=g) + 0.5).to(dtype)
    seq_lens = [n, 1900]
    cfg = VAttentionConfig(sink=16, local=16, heavy=64, epsilon=0.1, delta=0.1, tail="chi2",
                           share_gqa=share_gqa)
    out, stats = decode(*(t.to(device) for t in (q, k, v)), cfg, seq_lens=seq_lens, seed=5,
                        return_stats=True)
    ref, traces = reference.decode(q, k, v, cfg, seq_lens=seq_lens, seed=5, return_trace=True)
    per_list = q_heads // len(traces[0])
    want = torch.tensor([[traces[b][h // per_list].required[h] for h in range(q_heads)]
                         for b in range(batch)], dtype=F64)
    got = stats["required"].cpu()
    assert torch.isfinite(want).all() and (want < 2000).any()        # some heads sample
    torch.testing.assert_close(got, want, rtol=2e-3, atol=0.0)
    normal = decode(*(t.to(device) for t in (q, k, v)), VAttentionConfig(
        sink=16, local=16, heavy=64, epsilon=0.1, delta=0.1, share_gqa=share_gqa),
        seq_lens=seq_lens, seed=5, return_stats=True)[1]["required"].cpu()
    assert (got < normal).all()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_decode_chi2_tail_lets_a_nan_the_pilot_read_reach_the_output(device):
    g = gen(6)
    q = 2 * torch.randn(1, 4, 64, generator=g)
    k = torch.randn(1, 2, 3000, 64, generator=g)
    v = torch.randn(1, 2, 3000, 64, generator=g) + 0.5
    v[0, 1, 100:2800, 9] = math.nan           # every residual row of KV head 1: the pilot reads one
    cfg = VAttentionConfig(sink=16, local=16, heavy=64, epsilon=0.1, delta=0.1, tail="chi2")
    out, stats = decode(*(t.to(device) for t in (q, k, v)), cfg, seed=1, return_stats=True)
    out = out.cpu()
    assert torch.isnan(out[0, 2:, 9]).all() and not torch.isnan(out[0, :2]).any()
    assert torch.isnan(stats["required"].cpu()[0, 2:]).all()
