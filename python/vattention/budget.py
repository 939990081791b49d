"""Sample budgets from pilot statistics: the (epsilon, delta) maths of docs/algorithm.md.

Everything here is vectorised torch on the device of its inputs, with no host
synchronisation: budgets stay device tensors. Per query head, with R the residual
(n_r tokens), a pilot of P uniform draws from R and the exact deterministic part:

    Z^ = Z_f + n_r mean(w),  N^ = Z_f O_f + n_r mean(w V),  O^ = N^ / Z^

and the CLT lemma  b >= (z n_r sqrt(Tr Sigma) / tau)^2  for the rules:

    denominator  r = w,              tau = eps Z^,           z = Phi^-1(1 - delta)  (one-sided)
    paper        r = w V and r = w,  tau = eps/4 ||N^||, eps/4 Z^,  z = Phi^-1(1 - delta/4)
    ratio        r = w (V - O^),     tau = eps Z^ ||O||_lcb, z = Phi^-1(1 - delta/2)

The ratio rule divides by ||O||; where ||O|| is small, pilot noise inflates ||O^||
and the budget comes out too small. Its guard replaces ||O^|| by a lower
confidence bound ||O^|| - z se(O^) from the pilot's own variance; when that bound
is not positive the budget is infinite, i.e. the residual is attended exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import torch

Tensor = torch.Tensor


# Host constants of the config: torch.compile takes their value instead of tracing
# statistics.NormalDist.
@torch.compiler.assume_constant_result
def z_two_sided(delta: float) -> float:
    return NormalDist().inv_cdf(1.0 - delta / 2.0)


@torch.compiler.assume_constant_result
def z_one_sided(delta: float) -> float:
    return NormalDist().inv_cdf(1.0 - delta)


@dataclass
class ResidualEstimate:
    """Pilot-based estimates per query head, all scaled by exp(-shift) for range."""

    z_hat: Tensor          # Z^            [...]
    n_hat: Tensor          # N^            [..., D]
    o_hat: Tensor          # O^ = N^ / Z^  [..., D]
    var_w: Tensor          # variance of w over R
    trace_wv: Tensor       # Tr Cov(w V) over R
    trace_ratio: Tensor    # Tr Cov(w (V - O^)) over R


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
    bessel = torch.where(pilot_count > 1, p / (p - 1.0).clamp(min=1.0), torch.zeros_like(p))
    n_r = n_residual.to(f64)
    mean_w = moments[..., 0].to(f64) / p
    mean_w2 = moments[..., 1].to(f64) / p
    mean_w2_norm2 = moments[..., 2].to(f64) / p
    mean_wv = vector_moments[..., 0, :].to(f64) / p[..., None]
    mean_w2v = vector_moments[..., 1, :].to(f64) / p[..., None]

    z_hat = z_det + n_r * mean_w * pilot_scale
    n_hat = z_det[..., None] * det_out.to(f64) + (n_r * pilot_scale)[..., None] * mean_wv
    o_hat = n_hat / z_hat.clamp(min=torch.finfo(f64).tiny)[..., None]

    scale2 = pilot_scale ** 2 * bessel
    var_w = (mean_w2 - mean_w ** 2) * scale2
    trace_wv = (mean_w2_norm2 - (mean_wv ** 2).sum(-1)) * scale2
    centred_mean = mean_wv - o_hat * mean_w[..., None]
    trace_ratio = (mean_w2_norm2 - 2.0 * (o_hat * mean_w2v).sum(-1)
                   + (o_hat ** 2).sum(-1) * mean_w2 - (centred_mean ** 2).sum(-1)) * scale2
    return ResidualEstimate(z_hat, n_hat, o_hat, var_w.clamp(min=0.0), trace_wv.clamp(min=0.0),
                            trace_ratio.clamp(min=0.0))


def _clt_samples(z: float, n_residual: Tensor, trace: Tensor, tau: Tensor) -> Tensor:
    """(z n_r sqrt(Tr Sigma) / tau)^2, infinite where tau is not positive, NaN where either is."""
    numerator = (z * n_residual) ** 2 * trace
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
                     epsilon: float, delta: float, fpc: bool = False) -> Tensor:
    """Budget b (float64, may be inf) per head for `rule` at (epsilon, delta)."""
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
        samples = _clt_samples(z, n_r, est.trace_ratio, epsilon * est.z_hat * o_lower)
    else:
        raise ValueError(f"unknown budget rule {rule!r}")
    if fpc:
        samples = finite_population_correction(samples, n_residual)
    return samples
