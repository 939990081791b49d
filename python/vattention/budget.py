"""Sample budgets from pilot statistics: the (epsilon, delta) maths of docs/algorithm.md.

Everything here is vectorised torch on the device of its inputs, with no host
synchronisation: budgets stay device tensors. decode's fixed path runs the same maths as
one op (plan_fixed_budget -> op plan_budget, csrc/vattention/budget.h) instead of about a
hundred small torch ops; the functions below are its float64 reference and what the
adaptive heavy-size path runs.

Per query head, with R the residual (n_r tokens), a pilot of P uniform draws from R and
the exact deterministic part:

    Z^ = Z_f + n_r mean(w),  N^ = Z_f O_f + n_r mean(w V),  O^ = N^ / Z^

and the CLT lemma  b >= (z n_r sqrt(Tr Sigma) / tau)^2  for the rules:

    denominator  r = w,              tau = eps Z^,           z = Phi^-1(1 - delta)  (one-sided)
    paper        r = w V and r = w,  tau = eps/4 ||N^||, eps/4 Z^,  z = Phi^-1(1 - delta/4)
    ratio        r = w (V - O^),     tau = eps Z^ ||O||_lcb, z = Phi^-1(1 - delta/2)

The ratio rule divides by ||O||; where ||O|| is small, pilot noise inflates ||O^||
and the budget comes out too small. Its guard replaces ||O^|| by a lower
confidence bound ||O^|| - z se(O^) from the pilot's own variance; when that bound
is not positive the budget is infinite, i.e. the residual is attended exactly.

Tail (the ratio rule's tail="chi2"): the ratio rule's error is a D-vector, and z^2 is
exact only for a one-dimensional one. By Satterthwaite ||e||^2 ~ g chi^2_h with the
effective dimension h = (Tr Sigma)^2 / Tr(Sigma^2), so z^2 becomes
q_h = chi^2_{h, 1-delta} / h (q_1 = z^2, and q_h decreases in h). h comes from the
pilot's centred terms (op pilot_dispersion, a p x p Gram in draw space) and q_h from an
exact table over integer h, read at floor(h): conservative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from . import ops
from .device import host_values

Tensor = torch.Tensor


# Host constants of the config: torch.compile takes their value instead of tracing
# statistics.NormalDist.
@torch.compiler.assume_constant_result
def z_two_sided(delta: float) -> float:
    return NormalDist().inv_cdf(1.0 - delta / 2.0)


@torch.compiler.assume_constant_result
def z_one_sided(delta: float) -> float:
    return NormalDist().inv_cdf(1.0 - delta)


# The chi-square table's last effective dimension: h is at most min(p - 1, D), and
# D <= 256 for the CUDA kernels; a larger h reads this entry (conservative).
CHI2_TABLE_DIMS = 256


@torch.compiler.assume_constant_result
def chi2_quantile_table(delta: float) -> Tuple[float, ...]:
    """(q_1, ..., q_H): q_h = max over h' >= h of chi^2_{h', 1-delta} / h', h = 1..CHI2_TABLE_DIMS.

    Bisection on the chi-square CDF P(h/2, x/2) (torch.special.gammainc, float64) down to
    a bracket of relative width 2^-45; the upper end is returned, so a rounding error
    makes the budget larger, never smaller. chi^2_{h,1-delta} / h decreases in h for
    delta below about 0.16 but not above (delta = 0.3: 1.07 at h = 1, 1.20 at h = 2):
    the suffix max keeps the table non-increasing, so reading it at floor(h) stays
    conservative for every delta."""
    return _chi2_quantile_table(float(delta))


def _chi2_quantile_table(delta: float) -> Tuple[float, ...]:
    cached = _HOST_TABLES.get(delta)
    if cached is None:
        f64 = torch.float64
        h = torch.arange(1, CHI2_TABLE_DIMS + 1, dtype=f64)
        target = torch.full_like(h, 1.0 - delta)
        lo = torch.zeros_like(h)
        # chi^2_h's 1-delta quantile is below h + sqrt(2h) z' + 2 z'^2 for any delta >= 1e-12;
        # a generous bracket, checked below.
        hi = h + 20.0 * torch.sqrt(2.0 * h) * (1.0 + math.log(1.0 / delta)) + 200.0
        if not bool((torch.special.gammainc(h / 2, hi / 2) >= target).all()):
            raise ValueError(f"chi-square table: delta {delta} too small for the bracket")
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            below = torch.special.gammainc(h / 2, mid / 2) < target
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
            if bool(((hi - lo) <= hi * 2.0 ** -45).all()):
                break
        factor = (hi / h).flip(0).cummax(0).values.flip(0)
        cached = tuple(factor.tolist())
        _HOST_TABLES[delta] = cached
    return cached


_HOST_TABLES: Dict[float, Tuple[float, ...]] = {}
_DEVICE_TABLES: Dict[Tuple[float, str], Tensor] = {}


def _chi2_table(delta: float, device: torch.device) -> Tensor:
    """The table as a float64 tensor on `device`, with no host sync after its first use.

    Eager: built once per (delta, device) and kept for the process, so a CUDA graph that
    captured it can replay it. If that first use is under capture, each entry is a fill
    kernel (a copy from pageable host memory cannot be captured). Under torch.compile the
    table is a constant of the graph."""
    values = chi2_quantile_table(delta)
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float64, device=device)
    key = (float(delta), str(device))
    table = _DEVICE_TABLES.get(key)
    if table is None:
        table = host_values(values, torch.float64, device)
        _DEVICE_TABLES[key] = table
    return table


# The U-statistic h^ is about unbiased but spread (on SmolLM2 / Gemma heads, p = 128, it
# exceeds the true h in ~60% of draws, twice the true h in 2-5%). Halving it still let one
# Gemma-3 head (4K, int4, (0.05, 0.05)) violate 10/24 times, so a quarter: q_h is flat
# enough in h (q_5 / q_20 = 1.30 at delta = 0.1) that this keeps most of the saving.
TAIL_DIM_SHRINK = 0.25


def effective_dimension(dispersion: Tensor) -> Tensor:
    """h^ from pilot_dispersion's (A, B, C) = (sum |c_i|^2, sum_ij (c_i . c_j)^2, sum |c_i|^4):
    TAIL_DIM_SHRINK times the U-statistic ratio (A^2 - C) / (B - C), i.e. over pairs i != j.

    The plug-in A^2 / B keeps the i = j terms, which dominate both sums for heavy-tailed
    terms (a few draws carrying most of the weight): it then measures the draws, not Sigma
    (SmolLM2: plug-in median 4 where the residual's own h is 17). Float64, >= 1; 1 (the
    normal tail) where no two terms vary (B = C: a budget of 0 or a single draw); NaN
    where an input is NaN."""
    dispersion = dispersion.to(torch.float64)
    trace, frobenius, fourth = dispersion[..., 0], dispersion[..., 1], dispersion[..., 2]
    pairs = frobenius - fourth
    numerator = trace ** 2 - fourth
    defined = pairs > 0
    safe = torch.where(defined, pairs, torch.ones_like(pairs))
    h = torch.where(defined, TAIL_DIM_SHRINK * numerator / safe, torch.ones_like(trace))
    h = h.clamp(min=1.0)
    nan = torch.isnan(trace) | torch.isnan(frobenius) | torch.isnan(fourth)
    return torch.where(nan, torch.full_like(h, math.nan), h)


def chi2_factor(effective_dim: Tensor, delta: float) -> Tensor:
    """q_h = chi^2_{h, 1-delta} / h at floor(h) (clamped to [1, CHI2_TABLE_DIMS]), NaN for NaN."""
    table = _chi2_table(delta, effective_dim.device)
    h = torch.nan_to_num(effective_dim.to(torch.float64), nan=1.0, posinf=float(CHI2_TABLE_DIMS))
    index = h.floor().clamp(1, CHI2_TABLE_DIMS).to(torch.int64) - 1
    factor = table[index]
    return torch.where(torch.isnan(effective_dim), torch.full_like(factor, math.nan), factor)


@dataclass
class ResidualEstimate:
    """Pilot-based estimates per query head, all scaled by exp(-shift) for range."""

    z_hat: Tensor          # Z^            [...]
    n_hat: Tensor          # N^            [..., D]
    o_hat: Tensor          # O^ = N^ / Z^  [..., D]
    var_w: Tensor          # variance of w over R
    trace_wv: Tensor       # Tr Cov(w V) over R
    trace_ratio: Tensor    # Tr Cov(w (V - O^)) over R


def pilot_spread(moments: Tensor, vector_moments: Tensor, pilot_count: Tensor,
                 pilot_scale: Tensor, o_hat: Tensor):
    """(var_w, Tr Cov(w V), Tr Cov(w (V - O^))) over the residual from the pilot's moments
    (pilot.h), ddof 1, each clamped at 0, in units of exp(shift) (pilot_scale = exp(pilot's
    max logit - shift)); centred at the O^ given."""
    f64 = torch.float64
    p = pilot_count.to(f64).clamp(min=1.0)
    bessel = torch.where(pilot_count > 1, p / (p - 1.0).clamp(min=1.0), torch.zeros_like(p))
    mean_w = moments[..., 0].to(f64) / p
    mean_w2 = moments[..., 1].to(f64) / p
    mean_w2_norm2 = moments[..., 2].to(f64) / p
    mean_wv = vector_moments[..., 0, :].to(f64) / p[..., None]
    mean_w2v = vector_moments[..., 1, :].to(f64) / p[..., None]
    scale2 = pilot_scale ** 2 * bessel
    var_w = (mean_w2 - mean_w ** 2) * scale2
    trace_wv = (mean_w2_norm2 - (mean_wv ** 2).sum(-1)) * scale2
    centred_mean = mean_wv - o_hat * mean_w[..., None]
    trace_ratio = (mean_w2_norm2 - 2.0 * (o_hat * mean_w2v).sum(-1)
                   + (o_hat ** 2).sum(-1) * mean_w2 - (centred_mean ** 2).sum(-1)) * scale2
    return var_w.clamp(min=0.0), trace_wv.clamp(min=0.0), trace_ratio.clamp(min=0.0)


def estimate(det_out: Tensor, det_lse: Tensor, pilot_max: Tensor, moments: Tensor,
             vector_moments: Tensor, pilot_count: Tensor, n_residual: Tensor) -> ResidualEstimate:
    """Combines the exact deterministic part (out, lse) with pilot moments (see pilot.h)."""
    f64 = torch.float64
    det_lse, pilot_max = det_lse.to(f64), pilot_max.to(f64)
    shift = torch.maximum(det_lse, pilot_max)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    z_det = torch.exp(det_lse - shift)
    pilot_scale = torch.exp(pilot_max - shift)

    p = pilot_count.to(f64).clamp(min=1.0)
    n_r = n_residual.to(f64)
    mean_w = moments[..., 0].to(f64) / p
    mean_wv = vector_moments[..., 0, :].to(f64) / p[..., None]
    z_hat = z_det + n_r * mean_w * pilot_scale
    n_hat = z_det[..., None] * det_out.to(f64) + (n_r * pilot_scale)[..., None] * mean_wv
    o_hat = n_hat / z_hat.clamp(min=torch.finfo(f64).tiny)[..., None]
    return ResidualEstimate(z_hat, n_hat, o_hat,
                            *pilot_spread(moments, vector_moments, pilot_count, pilot_scale, o_hat))


def _clt_samples(z: float, n_residual: Tensor, trace: Tensor, tau: Tensor,
                 z2: Optional[Tensor] = None) -> Tensor:
    """(z n_r sqrt(Tr Sigma) / tau)^2 (z^2 replaced by z2 where given), infinite where tau
    is not positive, NaN where either is."""
    numerator = (z * n_residual) ** 2 * trace if z2 is None else z2 * n_residual ** 2 * trace
    safe_tau = torch.where(tau > 0, tau, torch.ones_like(tau))
    samples = torch.where(tau > 0, numerator / safe_tau ** 2,
                          torch.where(numerator > 0, torch.full_like(tau, float("inf")),
                                      torch.zeros_like(tau)))
    # The comparisons above are false for a NaN, which would make a budget of 0 from a NaN
    # the pilot read; decode attends the residual exactly for a NaN budget instead.
    return torch.where(torch.isnan(numerator) | torch.isnan(tau),
                       torch.full_like(samples, float("nan")), samples)


def finite_population_correction(samples: Tensor, n_residual: Tensor) -> Tensor:
    """b' = b / (1 + (b - 1) / n_r): valid only for sampling without replacement."""
    n_r = n_residual.to(samples.dtype).clamp(min=1.0)
    return torch.where(torch.isinf(samples), n_r, samples / (1.0 + (samples - 1.0) / n_r))


def required_samples(rule: str, est: ResidualEstimate, n_residual: Tensor, pilot_count: Tensor,
                     epsilon: float, delta: float, fpc: bool = False,
                     effective_dim: Optional[Tensor] = None) -> Tensor:
    """Budget b (float64, may be inf) per head for `rule` at (epsilon, delta).

    effective_dim (ratio rule only): the chi-square tail's h^ per head
    (effective_dimension); None is the normal tail, z^2."""
    if effective_dim is not None and rule != "ratio":
        raise ValueError(f"the chi-square tail applies to the ratio rule only, not {rule!r}")
    n_r = n_residual.to(torch.float64)
    if rule == "denominator":
        z = z_one_sided(delta)
        samples = _clt_samples(z, n_r, est.var_w, epsilon * est.z_hat)
    elif rule == "paper":
        z = z_two_sided(delta / 2.0)
        quarter = epsilon / 4.0
        numerator = _clt_samples(z, n_r, est.trace_wv, quarter * est.n_hat.norm(dim=-1))
        denominator = _clt_samples(z, n_r, est.var_w, quarter * est.z_hat)
        samples = torch.maximum(numerator, denominator)
    elif rule == "ratio":
        z = z_two_sided(delta)
        p = pilot_count.to(torch.float64).clamp(min=1.0)
        standard_error = z * n_r * torch.sqrt(est.trace_ratio / p) / est.z_hat.clamp(
            min=torch.finfo(torch.float64).tiny)
        o_lower = est.o_hat.norm(dim=-1) - standard_error
        # The guard keeps the normal z: ||O^|| is a scalar.
        z2 = None if effective_dim is None else chi2_factor(effective_dim, delta)
        samples = _clt_samples(z, n_r, est.trace_ratio, epsilon * est.z_hat * o_lower, z2)
    else:
        raise ValueError(f"unknown budget rule {rule!r}")
    if fpc:
        samples = finite_population_correction(samples, n_residual)
    return samples


def rule_z(rule: str, delta: float) -> float:
    """The normal quantile z of `rule` at delta, as required_samples uses it (host float)."""
    if rule == "denominator":
        return z_one_sided(delta)
    if rule == "paper":
        return z_two_sided(delta / 2.0)
    if rule == "ratio":
        return z_two_sided(delta)
    raise ValueError(f"unknown budget rule {rule!r}")


class FixedBudget(NamedTuple):
    """The fixed decode path's budget stage, as the later stages read it."""

    final_wanted: Tensor       # int32 [lists]: the final sample's num_samples
    reused: Tensor             # int32 [lists]: pilot draws the estimate reuses (0 without reuse)
    exact: Tensor              # bool [lists]: the residual is attended exactly
    required: Tensor           # float64 [B, Hq]: the rule's budget b (inf / NaN kept)
    n_residual_heads: Tensor   # int64 [B, Hq]: each head's list's n_r


def plan_fixed_budget(det_out: Tensor, det_lse: Tensor, pilot_max: Tensor, moments: Tensor,
                      vector_moments: Tensor, pilot_counts: Tensor, n_residual: Tensor,
                      rule: str, epsilon: float, delta: float, min_samples: int,
                      reuse_pilot: bool, dispersion: Optional[Tensor] = None) -> FixedBudget:
    """Op plan_budget (csrc/vattention/budget.h): estimate, required_samples (dispersion
    given: the chi-square tail, via effective_dimension and chi2_factor), the NaN-pilot and
    enumerated-pilot exact fallbacks, min_samples, the max over a list's heads and the
    pilot reuse, in one kernel. pilot_counts int32 / n_residual int64 are per list
    [B * lists]; the other inputs per query head, as pilot_stats / sparse_attention
    return them."""
    table = None if dispersion is None else _chi2_table(delta, det_out.device)
    return FixedBudget(*ops.plan_budget(
        det_out, det_lse, pilot_max, moments, vector_moments, pilot_counts, n_residual,
        dispersion, table, rule, epsilon, rule_z(rule, delta), TAIL_DIM_SHRINK, min_samples,
        reuse_pilot))
