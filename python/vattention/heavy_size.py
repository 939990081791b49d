"""Adaptive heavy size (VAttentionConfig.heavy_candidates): the candidate maths.

The candidates are nested top-m sets T_0 c T_1 c ... c T_{C-1} of the selector's ranking.
One pilot is drawn uniformly from R_0 = window minus T_0; its draws outside T_c are then a
uniform sample of R_c = window minus T_c, for every c at once. Per candidate:
    Z^, O^      from the exact part over the fixed set and T_0 plus all pilot draws (the
                best estimate of the head's output, shared by every candidate);
    Tr Sigma_c  of the rule's terms over the pilot draws in R_c (centred at the shared O^);
    budget_c    budget.required_samples with n_r = |R_c| and p = those draws;
    cost_c      m_c + the residual rows still to read: all of R_c when the budget reaches
                it, else the budget beyond the reused draws.
Each list takes the cheapest candidate (the smallest on a tie). Everything is device-side
torch on static shapes: no host sync, capturable. decode._decode_adaptive runs the kernels.

The pilot's draws are split by depth, the first candidate that holds them (a "band"), so
one pilot_stats call per band reads every pilot row once, and the moments over R_c are the
merge of the bands beyond c: sums of the bands' non-negative moments, no cancellation.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .budget import ResidualEstimate, pilot_spread
from .config import Size, resolve_size, resolve_sizes

Tensor = torch.Tensor


def candidate_sizes(candidates: Sequence[Size], lengths: Tensor, window: Tensor,
                    length: int) -> Tuple[List[Tensor], List[int]]:
    """Per candidate: the heavy count of every row ([B] int64, within the window) and its
    static bound (host int). Non-decreasing along the candidates (config checks them)."""
    counts = [torch.minimum(resolve_sizes(size, lengths), window) for size in candidates]
    return counts, [resolve_size(size, length) for size in candidates]


def members(positions: Tensor, heavy: Tensor, length: int) -> Tensor:
    """positions [rows, P] in heavy [rows, M] (ascending, -1 padded): bool [rows, P]."""
    if heavy.shape[1] == 0:
        return torch.zeros_like(positions, dtype=torch.bool)
    sorted_heavy = torch.where(heavy >= 0, heavy, length).to(torch.int64).contiguous()
    where = torch.searchsorted(sorted_heavy, positions.to(torch.int64).contiguous())
    found = sorted_heavy.gather(1, where.clamp(max=heavy.shape[1] - 1))
    return (found == positions) & (positions >= 0)


def pilot_depth(pilot_idx: Tensor, valid: Tensor, candidates: Sequence[Tensor],
                length: int) -> Tensor:
    """Per pilot draw [rows, P] int64: the first candidate c that holds it (C when none;
    never 0, the pilot avoids T_0); -1 for an invalid entry. Draw j is in R_c iff depth > c."""
    outside = torch.ones_like(pilot_idx, dtype=torch.int64)       # counts T_0, which never holds it
    for heavy in candidates[1:]:
        outside = outside + (~members(pilot_idx, heavy, length)).to(torch.int64)
    return torch.where(valid, outside, -1)


def merge_bands(bands: Sequence[Tuple[Tensor, Tensor, Tensor]]):
    """Suffix merges of pilot_stats outputs (max_logit, moments, vector_moments) over
    disjoint bands 1..C: entry c is the statistics of bands c+1..C, i.e. of R_c's draws.
    Stacked [C, ...], float64. Empty bands (max_logit -inf) add nothing."""
    f64 = torch.float64
    max_logits = torch.stack([b[0] for b in bands]).to(f64)             # [C, B, H]
    moments = torch.stack([b[1] for b in bands]).to(f64)                # [C, B, H, 3]
    vector = torch.stack([b[2] for b in bands]).to(f64)                 # [C, B, H, 2, D]
    # Suffix max over bands, then each band rescaled to it: first-order moments by
    # exp(m_b - m), second-order ones (w^2) by its square.
    suffix_max = torch.flip(torch.cummax(torch.flip(max_logits, [0]), 0).values, [0])
    safe = torch.where(torch.isfinite(suffix_max), suffix_max, torch.zeros_like(suffix_max))
    out_m, out_mom, out_vec = [], [], []
    count = max_logits.shape[0]
    for c in range(count):
        band_max = max_logits[c:]
        ratio = torch.where(torch.isinf(band_max) & (band_max < 0), torch.zeros_like(band_max),
                            torch.exp(band_max - safe[c]))
        scales = torch.stack([ratio, ratio ** 2, ratio ** 2], dim=-1)       # [C-c, B, H, 3]
        out_mom.append((moments[c:] * scales).sum(0))
        vec_scales = torch.stack([ratio, ratio ** 2], dim=-1)[..., None]  # [C-c, B, H, 2, 1]
        out_vec.append((vector[c:] * vec_scales).sum(0))
        out_m.append(suffix_max[c])
    # A NaN logit in a band makes its max NaN; cummax keeps it, so it reaches every suffix
    # that holds the band, and the budget is NaN there.
    return torch.stack(out_m), torch.stack(out_mom), torch.stack(out_vec)


def candidate_estimate(det_out: Tensor, det_lse: Tensor, max_logit: Tensor, moments: Tensor,
                       vector_moments: Tensor, pilot_count: Tensor,
                       n_residual: Tensor) -> ResidualEstimate:
    """budget.estimate for every candidate at once (leading dim C, merge_bands' output):
    z_hat, n_hat, o_hat from candidate 0 (T_0 exact plus every pilot draw, the same for all),
    the variances per candidate over its draws in R_c, centred at that shared O^. (estimate
    applied to candidate c would give Z_f(T_0) + n_r(c) mean(w): a Z^ missing T_c minus T_0.)"""
    f64 = torch.float64
    det_lse = det_lse.to(f64)
    shift = torch.maximum(det_lse, max_logit[0])
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    z_det = torch.exp(det_lse - shift)
    pilot_scale = torch.where(torch.isinf(max_logit) & (max_logit < 0),
                              torch.zeros_like(max_logit), torch.exp(max_logit - shift))
    p = pilot_count.to(f64).clamp(min=1.0)
    n_r = n_residual.to(f64)
    mean_w = moments[..., 0].to(f64) / p
    mean_wv = vector_moments[..., 0, :].to(f64) / p[..., None]
    z_hat = z_det + n_r[0] * mean_w[0] * pilot_scale[0]
    n_hat = z_det[..., None] * det_out.to(f64) + (n_r[0] * pilot_scale[0])[..., None] * mean_wv[0]
    o_hat = n_hat / z_hat.clamp(min=torch.finfo(f64).tiny)[..., None]
    count = moments.shape[0]
    return ResidualEstimate(z_hat.expand(count, *z_hat.shape), n_hat.expand(count, *n_hat.shape),
                            o_hat.expand(count, *o_hat.shape),
                            *pilot_spread(moments, vector_moments, pilot_count, pilot_scale, o_hat))


def plan(required: Tensor, pilot_count: Tensor, n_residual: Tensor, heavy: Tensor,
         min_samples: int, reuse_pilot: bool, group: int):
    """Per candidate and list: what the list would read, and the choice.

    required, pilot_count, n_residual: [C, B, Hq] per head (the candidate's budget, its
    pilot draws in R_c, |R_c|); heavy [C, B, Hl] the candidate's heavy count; group: query
    heads per list. Returns (wanted [C, rows] float64: the sample size b_c, max over the
    list's heads; exact [C, rows] bool: R_c attended exactly; choice [rows] int64)."""
    f64 = torch.float64
    count = required.shape[0]
    n_r = n_residual.to(f64)
    p = pilot_count.to(f64)
    # A NaN budget, a pilot that holds R_c (or more draws than its rows), or fewer than two
    # draws in R_c (no variance to size a budget from): R_c exactly.
    exactly = (p >= n_r) | (p < 2) | torch.isnan(required)
    wanted = torch.where(exactly, n_r, required.clamp(min=float(min_samples)))
    wanted = torch.minimum(torch.ceil(wanted), n_r)
    lists = heavy.shape[-1]
    wanted_lists = wanted.view(count, -1, lists, group).amax(dim=3).reshape(count, -1)
    n_r_lists = n_r.view(count, -1, lists, group)[..., 0].reshape(count, -1)
    p_lists = p.view(count, -1, lists, group)[..., 0].reshape(count, -1)
    exact_lists = wanted_lists >= n_r_lists
    if reuse_pilot:
        extra = (wanted_lists - p_lists).clamp(min=0.0)
    else:
        extra = wanted_lists
    cost = heavy.reshape(count, -1).to(f64) + torch.where(exact_lists, n_r_lists, extra)
    return wanted_lists, exact_lists, torch.argmin(cost, dim=0)


def pick(values: Tensor, choice: Tensor) -> Tensor:
    """values [C, B, H, ...] at the chosen candidate of each (b, h): choice [B, H]."""
    index = choice.reshape(1, *choice.shape, *([1] * (values.dim() - 1 - choice.dim())))
    index = index.expand(1, *values.shape[1:])
    return values.gather(0, index)[0]
