"""Score-guided sampling of the residual by importance: a float64 reference (issue 9).

Not used by `vattention.decode` yet: this is the estimator that
benchmarks/study_score_guided.py measured (design "IS"), kept here so that kernels can be
scheduled for it and checked against it.

The maths, per (batch row, list) with the deterministic set I_f and the residual R
(n_r tokens) exactly as in `reference.decode` (sink, local, heavy top-k of the selector):

Proposal. With a_hi the selector's approximate logits (the int4 summary's, or the
oracle's) of head h of the list's group, G heads,

    p_i = (1 - lam) * (1/G) sum_h softmax_R(a_h / T)_i + lam / n_r          (i in R)

a mixture of the group's approximate attention restricted to R and the uniform
distribution. Every p_i >= lam / n_r > 0, so the estimator below is unbiased whatever
the selector got wrong, and the per-draw term r_i / p_i is at most n_r r_i / lam: the
variance is at most 1 / lam times that of uniform sampling (2x at lam = 1/2), which
bounds what a misleading summary can cost; where the summary is right, the heavy tokens
left in R are drawn often and the pilot sees them (the failure mode of a uniform pilot).

Estimator. t draws J_1..J_t i.i.d. from p (with replacement), and with w_i = exp(s_i)
(exact logits) the Horvitz-Thompson sums

    Z^ = sum_{I_f} w_i       + (1/t) sum_j w_J / p_J
    N^ = sum_{I_f} w_i V_i   + (1/t) sum_j w_J V_J / p_J,        O^ = N^ / Z^.

As weights: 1 on I_f, 1 / (t p_J) on a draw (a log-weight -log(t p_J) per entry of
`sparse_attention`'s list; a token drawn twice carries it twice).

Budget (the ratio rule, unchanged but for the terms). To first order
O^ - O = (1/Z) (1/t) sum_j y_J with y_i = w_i (V_i - O) / p_i, E_p[y] = 0, so the CLT
lemma gives P(||O^ - O|| > eps ||O||) <= delta once

    t >= z^2 Tr Cov_p(y) / (eps Z ||O||)^2,        z = Phi^-1(1 - delta/2).

A pilot of P draws from the same p estimates Z^, O^ (the formulas above with t = P),
Tr Cov_p(y) (sample covariance, ddof 1, of y_J = w_J (V_J - O^) / p_J) and the lower
confidence bound ||O||_lcb = ||O^|| - z sqrt(Tr Cov / P) / Z^ (the budget is infinite,
i.e. the residual is attended exactly, when it is not positive). With lam = 1 this is the
uniform ratio rule exactly (p_i = 1 / n_r, y = n_r r). The list's budget is the max over
its heads of max(b_h, min_samples), ceiled; a budget >= n_r (or NaN) enumerates R with
weight 1. The pilot is reused as in `reference.decode`: the final sample tops it up to
t = max(b, P) draws, all weighing 1 / (t p_J) (a stopping rule, unbiased only
asymptotically, as for the uniform reuse; the study measured coverage).

Cost. A draw loads a K and V row like any other; the proposal needs the selector's
scores of every residual token (the selector computes them anyway) and a prefix sum of p
per list for inverse-CDF sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .budget import z_two_sided
from .config import VAttentionConfig, check_qkv, resolve_size

Tensor = torch.Tensor
F64 = torch.float64


def proposal(approx_logits: Tensor, lam: float = 0.5, temperature: float = 1.0) -> Tensor:
    """p [n_r] over the residual from the group's approximate logits [G, n_r]."""
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"lam must lie in (0, 1], got {lam!r}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    n_r = approx_logits.shape[-1]
    guided = torch.softmax(approx_logits.to(F64) / temperature, dim=-1).mean(0)
    return (1.0 - lam) * guided + lam / n_r


def draw(cdf: Tensor, trials: int, count: int, generator: Optional[torch.Generator]) -> Tensor:
    """[trials, count] i.i.d. indices from the distribution whose running sum is cdf."""
    u = torch.rand(trials, count, generator=generator, dtype=F64) * cdf[-1]
    return torch.searchsorted(cdf, u).clamp(max=cdf.numel() - 1)


@dataclass
class ResidualSums:
    """The residual's part of Z^ and N^ per trial, and what it read."""

    z: Tensor          # [S, G]
    n: Tensor          # [S, G, D]
    budget: Tensor     # [S, G] the pilot's b per head (float64, may be inf / NaN)
    exact: Tensor      # [S] bool: R enumerated with weight 1
    loads: Tensor      # [S] row loads (pilot + final draws, or pilot + n_r when exact)
    distinct: Tensor   # [S] distinct residual rows read


def _sums(weight: Tensor, w: Tensor, v: Tensor):
    weighted = weight[:, None, :] * w[None]                         # [S, G, n_r]
    return weighted.sum(-1), weighted @ v


def estimate_residual(w: Tensor, v: Tensor, approx_logits: Tensor, z_f: Tensor, n_f: Tensor,
                      epsilon: float, delta: float, trials: int = 1, pilot: int = 128,
                      lam: float = 0.5, temperature: float = 1.0, min_samples: int = 32,
                      generator: Optional[torch.Generator] = None) -> ResidualSums:
    """Importance-sampled residual sums of one list, `trials` independent times.

    w [G, n_r]: exp(exact logits) of the residual (any common shift per head, the same
    as z_f's and n_f's); v [n_r, D]; approx_logits [G, n_r]; z_f [G], n_f [G, D]: the
    deterministic set's exact sums. float64 throughout."""
    z = z_two_sided(delta)
    n_r = w.shape[1]
    if n_r == 0 or pilot >= n_r:
        zs, ns = _sums(torch.ones(1, n_r, dtype=F64), w, v)
        full = torch.full((trials,), n_r, dtype=torch.int64)
        return ResidualSums(zs.expand(trials, -1), ns.expand(trials, -1, -1),
                            torch.full((trials, w.shape[0]), float(n_r), dtype=F64),
                            torch.ones(trials, dtype=torch.bool), full, full)
    prob = proposal(approx_logits, lam, temperature)
    cdf = torch.cumsum(prob, 0)
    idx = draw(cdf, trials, pilot, generator)                        # [S, P]
    ratio = w[:, idx].permute(1, 0, 2) / prob[idx][:, None]          # [S, G, P]: w / p
    vp = v[idx]                                                      # [S, P, D]
    z_hat = z_f + ratio.mean(-1)
    n_hat = n_f + torch.einsum("sgp,spd->sgd", ratio, vp) / pilot
    o_hat = n_hat / z_hat[..., None]
    terms = ratio[..., None] * (vp[:, None] - o_hat[:, :, None])    # y_J [S, G, P, D]
    trace = (((terms - terms.mean(2, keepdim=True)) ** 2).sum((2, 3)) / (pilot - 1)).clamp(min=0)
    tau = epsilon * z_hat * (o_hat.norm(dim=-1) - z * (trace / pilot).sqrt() / z_hat)
    numerator = z * z * trace
    budget = torch.where(tau > 0, numerator / torch.where(tau > 0, tau, 1.0) ** 2,
                         torch.where(numerator > 0, math.inf, 0.0))
    budget = torch.where(torch.isnan(numerator) | torch.isnan(tau), math.nan, budget)
    per_head = torch.where(torch.isnan(budget), float(n_r),
                           torch.ceil(budget.clamp(min=float(min_samples), max=float(n_r))))
    wanted = per_head.amax(1)
    exact = wanted >= n_r
    total = torch.where(exact, 0.0, wanted.clamp(min=float(pilot)))
    extra = (total - pilot).clamp(min=0).long()
    counts = torch.zeros(trials, n_r, dtype=F64)
    counts.scatter_add_(1, idx, torch.ones(trials, pilot, dtype=F64))
    d_max = int(extra.max())
    if d_max > 0:
        final = draw(cdf, trials, d_max, generator)
        keep = (torch.arange(d_max)[None] < extra[:, None]).to(F64)
        counts.scatter_add_(1, final, keep)
    weight = torch.where(exact[:, None], torch.ones_like(counts),
                         counts / (total.clamp(min=1.0)[:, None] * prob[None]))
    z_r, n_r_sum = _sums(weight, w, v)
    loads = torch.where(exact, pilot + n_r, pilot + extra)
    distinct = torch.where(exact, n_r, (counts > 0).sum(1))
    return ResidualSums(z_r, n_r_sum, budget, exact, loads, distinct)


def decode(q: Tensor, k: Tensor, v: Tensor, cfg: VAttentionConfig, scale: Optional[float] = None,
           seed: int = 0, lam: float = 0.5, temperature: float = 1.0,
           approx_k: Optional[Tensor] = None):
    """Float64 vattention decode with importance-sampled residual: (out [B, Hq, D], stats).

    Same selection as `reference.decode` (cfg.sink, local, heavy, selector, share_gqa);
    cfg.base_rate must be an int (the pilot's draw count) and cfg.reuse_pilot True.
    approx_k [B, Hkv, N, D]: the keys whose logits drive the selector and the proposal
    (default: the int4 summary's for selector "int4", K itself for "oracle"). stats:
    "density" (distinct rows read / n) and "loads" (rows loaded) [B, lists], "budget"
    [B, Hq] (the pilot's b per head), "exact" [B, lists]. Draws come from torch's
    generator seeded with `seed` (not the Philox stream of the kernels)."""
    check_qkv(q, k, v, dtypes=None)
    if isinstance(cfg.base_rate, float) or not cfg.reuse_pilot:
        raise ValueError("score_guided.decode needs cfg.base_rate as an int count and "
                         "cfg.reuse_pilot=True")
    batch, q_heads, dim = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if approx_k is None:
        if cfg.selector == "int4":
            from .key_summary import dequantize_torch, summarize_keys_torch
            approx_k = dequantize_torch(summarize_keys_torch(k))
        else:
            approx_k = k
    q, k, v, approx_k = q.to(F64), k.to(F64), v.to(F64), approx_k.to(F64)
    sink = resolve_size(cfg.sink, n)
    local = min(resolve_size(cfg.local, n), n - sink)
    start, end = sink, n - local
    heavy_k = min(resolve_size(cfg.heavy, n), end - start)
    list_heads = kv_heads if cfg.share_gqa else q_heads
    per_list = group if cfg.share_gqa else 1
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros(batch, q_heads, dim, dtype=F64)
    density = torch.zeros(batch, list_heads, dtype=F64)
    loads = torch.zeros(batch, list_heads, dtype=torch.int64)
    exact = torch.zeros(batch, list_heads, dtype=torch.bool)
    budget = torch.zeros(batch, q_heads, dtype=F64)
    for b in range(batch):
        for lst in range(list_heads):
            heads = slice(lst * per_list, (lst + 1) * per_list)
            kv = (lst * per_list) // group
            s = scale * q[b, heads] @ k[b, kv].T                      # [G, n]
            a = scale * q[b, heads] @ approx_k[b, kv].T
            combined = (a - torch.logsumexp(a, 1, keepdim=True)).amax(0)
            order = torch.sort(combined[start:end], descending=True, stable=True).indices + start
            residual = order[heavy_k:].sort().values
            det = torch.cat([torch.arange(sink), torch.arange(end, n), order[:heavy_k]])
            w = torch.exp(s - s.amax(1, keepdim=True))
            z_f, n_f = w[:, det].sum(1), w[:, det] @ v[b, kv, det]
            res = estimate_residual(w[:, residual], v[b, kv, residual], a[:, residual], z_f, n_f,
                                    cfg.epsilon, cfg.delta, 1, cfg.base_rate, lam, temperature,
                                    cfg.min_samples, generator)
            out[b, heads] = (n_f + res.n[0]) / (z_f + res.z[0])[:, None]
            density[b, lst] = float(det.numel() + res.distinct[0]) / max(n, 1)
            loads[b, lst] = det.numel() + res.loads[0]
            exact[b, lst] = res.exact[0]
            budget[b, heads] = res.budget[0]
    return out, {"density": density, "loads": loads, "exact": exact, "budget": budget}
