"""The whole vAttention algorithm in plain PyTorch, one (batch row, index list) at a time.

Readable and float64-capable: the oracle the tests compare the kernels and
`vattention.decode` against. It shares no code with the fast path except the
configuration and the budget formulas' constants: the Philox stream is re-derived
with numpy, the residual is an explicit list of positions, and the budget
statistics come from the pilot's explicit terms r_i rather than from moments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from .budget import (CHI2_TABLE_DIMS, TAIL_DIM_SHRINK, chi2_quantile_table, z_one_sided,
                     z_two_sided)
from .config import VAttentionConfig, check_qkv, resolve_size

Tensor = torch.Tensor

_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """Philox 4x32-10 on numpy uint64 arrays holding 32-bit words (Random123's constants)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.uint64(k) for k in key)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32)
        k0 = (k0 + np.uint64(0x9E3779B9)) & _MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _MASK32
    return c0, c1, c2, c3


def uniform_ranks(seed: int, offset: int, row: int, draw_set: int, draws: int, n: int) -> List[int]:
    """Draw j of (seed, offset, row, draw_set): 64 random bits scaled to a rank in [0, n)."""
    j = np.arange(draws, dtype=np.uint64)
    words = philox4x32_10(
        (j >> np.uint64(1), np.full_like(j, offset), np.full_like(j, row), np.full_like(j, draw_set)),
        (seed & 0xFFFFFFFF, seed >> 32))
    odd = (j & np.uint64(1)).astype(bool)
    lo = np.where(odd, words[2], words[0])
    hi = np.where(odd, words[3], words[1])
    n64 = np.uint64(n)
    ranks = (hi * n64 + ((lo * n64) >> np.uint64(32))) >> np.uint64(32)
    return [int(r) for r in ranks]


def top_positions(scores: Tensor, start: int, end: int, k: int) -> List[int]:
    """The k best positions of scores[start:end] (ties: lower position), ascending."""
    candidates = sorted(range(start, end), key=lambda i: (-float(scores[i]), i))
    return sorted(candidates[:k])


def draw_residual(residual: List[int], wanted: int, seed: int, offset: int, row: int,
                  draw_set: int, max_out: int):
    """(positions, weight) of a uniform with-replacement sample, or all of R when wanted >= n_r."""
    n_r = len(residual)
    if n_r == 0 or wanted <= 0:
        return [], 1.0
    if wanted >= n_r and n_r <= max_out:
        return list(residual), 1.0
    count = min(wanted, max_out)
    ranks = uniform_ranks(seed, offset, row, draw_set, count, n_r)
    return [residual[r] for r in ranks], n_r / count


@dataclass
class ListTrace:
    """What the reference did for one (batch row, index list)."""

    deterministic: List[int]
    heavy: List[int]
    residual: List[int]
    pilot: List[int]
    sample: List[int]          # the draws the estimate uses: pilot ++ final with reuse_pilot
    sample_weight: float
    required: Dict[int, float] = field(default_factory=dict)  # per query head


def effective_dimension(terms: Tensor) -> float:
    """TAIL_DIM_SHRINK x the U-statistic (Tr Sigma)^2 / Tr(Sigma^2) of terms [p, D]: sums
    over pairs i != j of the centred terms, written from the explicit D x D matrix
    C^T C and the row norms (the fast path works in draw space); at least 1, 1 where no
    two terms vary, NaN for NaN terms."""
    centred = terms - terms.mean(0)
    cov = centred.T @ centred
    fourth = ((centred ** 2).sum(1) ** 2).sum()
    numerator, pairs = cov.trace() ** 2 - fourth, (cov ** 2).sum() - fourth
    if bool(torch.isnan(numerator) or torch.isnan(pairs)):
        return math.nan
    return max(float(TAIL_DIM_SHRINK * numerator / pairs), 1.0) if pairs > 0 else 1.0


def chi2_factor(h: float, delta: float) -> float:
    """chi^2_{h', 1-delta} / h' at h' = floor(h) clamped to [1, CHI2_TABLE_DIMS]."""
    if math.isnan(h):
        return math.nan
    return chi2_quantile_table(delta)[min(max(int(math.floor(h)), 1), CHI2_TABLE_DIMS) - 1]


def _budget(rule: str, epsilon: float, delta: float, n_r: int, s_det: Tensor, v_det: Tensor,
            s_pilot: Tensor, v_pilot: Tensor, tail: str = "normal") -> float:
    """Budget from the explicit pilot terms r_i; sample (co)variances with ddof = 1.
    tail "chi2" (ratio rule): z^2 in front of the trace becomes chi^2_{h,1-delta} / h with
    h the terms' effective dimension (docs/algorithm.md, "Tail bound").

    NaN where the pilot read a NaN (whatever the rule reads of it), or where a statistic is
    NaN: decode then attends the residual exactly, so that the NaN reaches the output."""
    every_draw = [True] * len(s_pilot)
    return _candidate_budget(rule, epsilon, delta, n_r, n_r, s_det, v_det, s_pilot, v_pilot,
                             every_draw, tail)


def _candidate_budget(rule: str, epsilon: float, delta: float, n_r0: int, n_r: int,
                      s_det: Tensor, v_det: Tensor, s_pilot: Tensor, v_pilot: Tensor,
                      inside: List[bool], tail: str = "normal") -> float:
    """_budget for one candidate of the adaptive heavy size: Z^ and O^ from the smallest
    set's exact part and every pilot draw (a uniform sample of R_0, n_r0 tokens); the terms'
    spread from the draws in this candidate's residual (inside[i]; n_r tokens). With every
    draw inside and n_r0 = n_r, this is _budget."""
    if bool(torch.isnan(s_pilot).any() or torch.isnan(v_pilot).any()):
        return math.nan
    shift = torch.cat([s_det, s_pilot]).max()
    w_det, w_all = torch.exp(s_det - shift), torch.exp(s_pilot - shift)
    z_hat = w_det.sum() + n_r0 * w_all.mean()
    n_hat = (w_det[:, None] * v_det).sum(0) + n_r0 * (w_all[:, None] * v_pilot).mean(0)
    o_hat = n_hat / z_hat
    mask = torch.tensor(inside, dtype=torch.bool)
    w_pilot, v_in = w_all[mask], v_pilot[mask]
    p = len(w_pilot)

    def trace_cov(terms: Tensor) -> Tensor:  # terms [p, D]: trace of the sample covariance
        return ((terms - terms.mean(0)) ** 2).sum() / (p - 1)

    def clt(z: float, trace: Tensor, tau: Tensor, z2: Optional[float] = None) -> float:
        z2 = z * z if z2 is None else z2
        if bool(torch.isnan(trace) or torch.isnan(tau)) or math.isnan(z2):
            return math.nan
        if tau <= 0:
            return math.inf if trace > 0 else 0.0
        return float(z2 * n_r ** 2 * trace / tau ** 2)

    var_w = trace_cov(w_pilot[:, None])
    if rule == "denominator":
        return clt(z_one_sided(delta), var_w, epsilon * z_hat)
    if rule == "paper":
        z = z_two_sided(delta / 2)
        numerator = clt(z, trace_cov(w_pilot[:, None] * v_in), epsilon / 4 * n_hat.norm())
        denominator = clt(z, var_w, epsilon / 4 * z_hat)
        return math.nan if math.isnan(numerator + denominator) else max(numerator, denominator)
    if rule == "ratio":
        z = z_two_sided(delta)
        terms = w_pilot[:, None] * (v_in - o_hat)
        trace = trace_cov(terms)
        o_lower = o_hat.norm() - z * n_r * torch.sqrt(trace / p) / z_hat
        # The tail's effective dimension from all the pilot's terms (decode: one re-read).
        z2 = chi2_factor(effective_dimension(w_all[:, None] * (v_pilot - o_hat)), delta) \
            if tail == "chi2" else None
        return clt(z, trace, epsilon * z_hat * o_lower, z2)
    raise ValueError(f"unknown rule {rule!r}")


def _attend_list(out: Tensor, heads, logits, values: Tensor, deterministic: List[int],
                 sample: List[int], weight: float) -> None:
    """out[h] for each head of a list: attention over the deterministic positions (weight 1)
    and the sample (each draw `weight`, a duplicate counting again), in out's dtype."""
    positions = deterministic + sample
    if not positions:
        return
    weights = torch.tensor([1.0] * len(deterministic) + [weight] * len(sample),
                           dtype=out.dtype)
    for h in heads:
        s = logits[h][positions]
        w = weights * torch.exp(s - s.max())
        out[h] = (w[:, None] * values[positions]).sum(0) / w.sum()


def _adaptive_list(cfg: VAttentionConfig, scores: Tensor, logits: Dict[int, Tensor],
                   values: Tensor, heads: List[int], sink: int, end: int, n: int, length: int,
                   seed: int, offset: int, row: int, out: Tensor) -> "ListTrace":
    """One list of heavy_candidates (docs/algorithm.md, "Adaptive heavy size"): writes
    out[h] for its heads and returns the trace of the chosen candidate."""
    start = sink
    sizes = [min(resolve_size(c, n), end - start) for c in cfg.heavy_sizes]
    tops = [top_positions(scores, start, end, m) for m in sizes]
    fixed = list(range(sink)) + list(range(end, n))
    residual0 = [i for i in range(start, end) if i not in set(tops[0])]
    n_r0 = len(residual0)
    pilot_wanted = max(2, resolve_size(cfg.base_rate, n_r0)) if n_r0 else 0
    pilot_max = max(2, resolve_size(cfg.base_rate, length))
    pilot, _ = draw_residual(residual0, pilot_wanted, seed, offset, row, 0, pilot_max)
    det0 = sorted(set(fixed) | set(tops[0]))
    best = None
    for m, top in zip(sizes, tops):
        top_set = set(top)
        inside = [i not in top_set for i in pilot]
        p, n_r = sum(inside), end - start - m
        required = {}
        wanted = 0
        for h in heads:
            if n_r == 0 or p >= n_r or p < 2:
                required[h] = float(n_r)
            else:
                required[h] = _candidate_budget(
                    cfg.rule, cfg.epsilon, cfg.delta, n_r0, n_r, logits[h][det0],
                    values[det0], logits[h][pilot], values[pilot], inside, cfg.tail)
            exactly = p >= n_r or p < 2 or math.isnan(required[h])
            per_head = n_r if exactly else max(required[h], cfg.min_samples)
            wanted = max(wanted, math.ceil(min(per_head, n_r)))
        exact = wanted >= n_r
        extra = n_r if exact else (max(wanted - p, 0) if cfg.reuse_pilot else wanted)
        if best is None or m + extra < best[0]:
            best = (m + extra, top, inside, wanted, exact, required)
    _, heavy, inside, wanted, exact, required = best
    heavy_set = set(heavy)
    residual = [i for i in range(start, end) if i not in heavy_set]
    n_r = len(residual)
    deterministic = sorted(set(fixed) | heavy_set)
    reuse = cfg.reuse_pilot and not exact
    reused = [i for i, keep in zip(pilot, inside) if keep] if reuse else []
    final_wanted = max(wanted - len(reused), 0) if reuse else wanted
    sample, weight = draw_residual(residual, final_wanted, seed, offset, row, 1, max(length, 1))
    if reuse:
        sample = reused + sample
        weight = n_r / len(sample) if sample else 1.0
    _attend_list(out, heads, logits, values, deterministic, sample, weight)
    return ListTrace(deterministic, heavy, residual, pilot, sample, weight, required)


def decode(q: Tensor, k: Tensor, v: Tensor, cfg: VAttentionConfig, seq_lens=None,
           scale: Optional[float] = None, seed: int = 0, offset: int = 0,
           dtype: torch.dtype = torch.float64, heavy_override=None, budget_override=None,
           return_trace: bool = False):
    """Reference vAttention decode (see vattention.decode for the arguments).

    heavy_override[b][l] / budget_override[b][l] replace the reference's own heavy set or
    sample size for list l of row b, so a test can replay the fast path's choices and
    compare outputs exactly where float32 and float64 would round a tie differently.
    """
    check_qkv(q, k, v, dtypes=None)
    batch, q_heads, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    list_heads = kv_heads if cfg.share_gqa else q_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    lengths = [length] * batch if seq_lens is None else [int(n) for n in seq_lens]
    # The int4 selector ranks tokens by the logits of the dequantised key summary, built from
    # K as stored (its dtype), scored here in `dtype`; the estimate still uses the true K.
    select_keys = None
    if cfg.selector == "int4":
        from .key_summary import dequantize_torch, summarize_keys_torch

        select_keys = dequantize_torch(summarize_keys_torch(k)).to(dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = torch.zeros(batch, q_heads, dim, dtype=dtype)
    traces: List[List[ListTrace]] = []

    for b in range(batch):
        n = lengths[b]
        sink = resolve_size(cfg.sink, n)
        local = min(resolve_size(cfg.local, n), n - sink)
        if 0 < cfg.dense_below and n <= cfg.dense_below:
            # The dense fallback: the local part covers the window, nothing is selected or
            # sampled, and the row's output is exact attention over its n rows.
            local = n - sink
        start, end = sink, n - local
        heavy_k = min(resolve_size(cfg.heavy, n), end - start)
        row_traces = []
        for lst in range(list_heads):
            heads = list(range(lst * group, (lst + 1) * group)) if cfg.share_gqa else [lst]
            kv = heads[0] // group
            logits = {h: scale * (k[b, kv, :n] @ q[b, h]) for h in heads}

            # Select: top-k of the (group-combined) log-probabilities.
            if select_keys is None:
                selection = logits
            else:
                selection = {h: scale * (select_keys[b, kv, :n] @ q[b, h]) for h in heads}
            if cfg.share_gqa:
                scores = torch.stack([selection[h] - torch.logsumexp(selection[h], 0)
                                      for h in heads]).amax(0)
            else:
                scores = selection[heads[0]]
            if cfg.heavy_sizes:
                if heavy_override is not None or budget_override is not None:
                    raise ValueError("heavy_override / budget_override do not apply to "
                                     "heavy_candidates")
                row_traces.append(_adaptive_list(cfg, scores, logits, v[b, kv], heads, sink,
                                                 end, n, length, seed, offset,
                                                 b * list_heads + lst, out[b]))
                continue
            if heavy_override is not None:
                heavy = sorted(int(i) for i in heavy_override[b][lst])
            elif cfg.share_gqa and cfg.gqa_heavy == "union" and group > 1:
                # Each head's own top-k, and the list holds their union.
                heavy = sorted(set().union(*(top_positions(selection[h], start, end, heavy_k)
                                             for h in heads)))
            else:
                heavy = top_positions(scores, start, end, heavy_k)
            deterministic = sorted(set(range(sink)) | set(range(end, n)) | set(heavy))
            heavy_set = set(heavy)
            residual = [i for i in range(start, end) if i not in heavy_set]
            n_r = len(residual)
            row = b * list_heads + lst

            # Pilot.
            pilot_wanted = max(2, resolve_size(cfg.base_rate, n_r)) if n_r else 0
            pilot_max = max(2, resolve_size(cfg.base_rate, length))
            pilot, _ = draw_residual(residual, pilot_wanted, seed, offset, row, 0, pilot_max)

            # Budget: per head, then the max over the heads sharing the list.
            required = {}
            for h in heads:
                if n_r == 0 or len(pilot) >= n_r:
                    required[h] = float(n_r)
                    continue
                required[h] = _budget(cfg.rule, cfg.epsilon, cfg.delta, n_r,
                                      logits[h][deterministic], v[b, kv, deterministic],
                                      logits[h][pilot], v[b, kv, pilot], cfg.tail)
            wanted = 0
            for h in heads:
                exactly = len(pilot) >= n_r or math.isnan(required[h])
                per_head = n_r if exactly else max(required[h], cfg.min_samples)
                wanted = max(wanted, math.ceil(min(per_head, n_r)))
            if budget_override is not None:
                wanted = int(budget_override[b][lst])

            # Sample and estimate: weight 1 on the deterministic set, n_r / b on the sample.
            # With reuse_pilot (and a residual not enumerated) the pilot's draws count too:
            # the final sample tops them up to the budget, every draw weighing n_r / (p + d).
            # The total is max(budget, p), as stats["budget"] reports it; budget_override
            # replaces that total (one below p keeps the pilot's first draws only, which
            # decode never does: a test's way to attend the deterministic set alone).
            reuse = cfg.reuse_pilot and wanted < n_r
            if reuse and budget_override is None:
                wanted = max(wanted, len(pilot))
            final_wanted = max(wanted - len(pilot), 0) if reuse else wanted
            sample, weight = draw_residual(residual, final_wanted, seed, offset, row, 1,
                                           max(length, 1))
            if reuse:
                sample = (pilot + sample)[:wanted]
                weight = n_r / len(sample) if sample else 1.0
            _attend_list(out[b], heads, logits, v[b, kv], deterministic, sample, weight)
            row_traces.append(ListTrace(deterministic, heavy, residual, pilot, sample, weight,
                                        required))
        traces.append(row_traces)
    return (out, traces) if return_trace else out


def dense(q: Tensor, k: Tensor, v: Tensor, seq_lens=None, scale: Optional[float] = None,
          dtype: torch.dtype = torch.float64) -> Tensor:
    """Exact attention of one query per head over each row's valid prefix."""
    check_qkv(q, k, v, dtypes=None)
    batch, q_heads, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    lengths = [length] * batch if seq_lens is None else [int(n) for n in seq_lens]
    out = torch.zeros(batch, q_heads, dim, dtype=dtype)
    for b in range(batch):
        n = lengths[b]
        if n == 0:
            continue
        kk = k[b, :, :n].to(dtype).repeat_interleave(group, 0)
        vv = v[b, :, :n].to(dtype).repeat_interleave(group, 0)
        probs = torch.softmax(scale * torch.einsum("hd,hnd->hn", q[b].to(dtype), kk), dim=-1)
        out[b] = torch.einsum("hn,hnd->hd", probs, vv)
    return out
