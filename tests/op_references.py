"""Slow, obviously-correct references for torch.ops.vattention.*.

Written from the documentation in the torch-free headers (csrc/vattention/*.h), not from
the C++ kernels: plain Python loops and float64 torch, one (row, head) at a time. Every
function takes and returns CPU tensors; floating outputs are float64 unless noted.

Philox 4x32-10 is implemented with numpy uint64 arithmetic (vectorised over counters)
and checked against the Random123 known-answer vectors by `philox_self_test`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

Tensor = torch.Tensor

# --------------------------------------------------------------------------------------
# select_topk (select_topk.h)
# --------------------------------------------------------------------------------------


def select_topk_ref(scores: Tensor, starts: Tensor, ends: Tensor, ks: Tensor, k_max: int) -> Tensor:
    """Row r: the min(k, end - start) highest scores among [start, end) (end clipped to the
    row length); ties -> lower position; NaN ranks below every number; chosen positions
    ascending, the rest of the row -1."""
    rows, length = scores.shape
    values = scores.to(torch.float64)
    out = torch.full((rows, k_max), -1, dtype=torch.int32)
    for r in range(rows):
        start = int(starts[r])
        end = min(int(ends[r]), length)
        width = end - start
        # select_topk.h does not say what k > k_max means; the output row only has k_max slots.
        take = min(int(ks[r]), width, k_max)
        if take <= 0:
            continue
        row = values[r].tolist()

        def key(pos: int):
            x = row[pos]
            if math.isnan(x):
                return (1, 0.0, pos)          # below every number
            return (0, -x, pos)               # higher first, then lower position
        chosen = sorted(sorted(range(start, end), key=key)[:take])
        out[r, :take] = torch.tensor(chosen, dtype=torch.int32)
    return out


# --------------------------------------------------------------------------------------
# Philox 4x32-10 and the draw mapping (philox.h)
# --------------------------------------------------------------------------------------

_MASK32 = np.uint64(0xFFFFFFFF)
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_S32 = np.uint64(32)


def philox4x32_10(counter, key) -> Tuple[np.ndarray, ...]:
    """Philox 4x32-10 (Salmon et al. 2011, Random123). counter: 4 arrays (or ints) of 32-bit
    words (x, y, z, w); key: 2 words. Returns the 4 output words as uint64 arrays < 2^32."""
    x, y, z, w = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) & _MASK32 for k in key)
    for _ in range(10):
        p0 = _M0 * x                       # < 2^64: exact in uint64
        p1 = _M1 * z
        hi0, lo0 = p0 >> _S32, p0 & _MASK32
        hi1, lo1 = p1 >> _S32, p1 & _MASK32
        x, y, z, w = hi1 ^ y ^ k0, lo1, hi0 ^ w ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return x, y, z, w


# Random123 known-answer vectors for philox4x32_10 (kat_vectors): (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_self_test() -> None:
    for counter, key, expected in PHILOX_KAT:
        got = tuple(int(v) for v in philox4x32_10(counter, key))
        assert got == expected, (counter, key, [hex(v) for v in got])


def philox_draw_words(seed: int, call_offset: int, row: int, stream: int,
                      num_draws: int) -> List[int]:
    """The 64-bit random word of draws 0..num_draws-1 of stream (seed, offset, row, stream):
    draw j uses block j // 2 with counter (block lo, block hi, subsequence lo, subsequence hi),
    block = (j // 2) | offset << 32, subsequence = row | stream << 32, key = seed (lo, hi);
    even draws take words (x, y), odd draws (z, w), low word first."""
    if num_draws <= 0:
        return []
    seed &= (1 << 64) - 1
    pairs = np.arange((num_draws + 1) // 2, dtype=np.uint64)
    block = pairs | (np.uint64(call_offset) << _S32)
    sub = int(row) | (int(stream) << 32)
    x, y, z, w = philox4x32_10(
        (block & _MASK32, block >> _S32, np.full_like(pairs, sub & 0xFFFFFFFF),
         np.full_like(pairs, sub >> 32)),
        (seed & 0xFFFFFFFF, seed >> 32))
    words = []
    for j in range(num_draws):
        p = j // 2
        if j % 2 == 0:
            words.append(int(x[p]) | (int(y[p]) << 32))
        else:
            words.append(int(z[p]) | (int(w[p]) << 32))
    return words


def scale_to_range_ref(word: int, n: int) -> int:
    """floor(word * n / 2^64) with unbounded integers."""
    return (int(word) * int(n)) >> 64


# --------------------------------------------------------------------------------------
# sample_residual (sample.h)
# --------------------------------------------------------------------------------------


def heavy_prefix(heavy_row: Sequence[int]) -> List[int]:
    """The valid (non-negative) prefix of a -1 padded heavy list."""
    out = []
    for h in heavy_row:
        if h < 0:
            break
        out.append(int(h))
    return out


def residual_positions(heavy_row: Sequence[int], start: int, end: int) -> List[int]:
    """The residual as an explicit ascending list: [start, end) minus the heavy positions."""
    heavy = set(heavy_prefix(heavy_row))
    return [p for p in range(start, end) if p not in heavy]


def sample_residual_ref(heavy: Tensor, starts: Tensor, ends: Tensor, num_samples: Tensor,
                        rng: Tensor, max_out: int, stream: int):
    """(indices int32 [rows, max_out] -1 padded, log_weights float64 [rows, max_out] (0 in
    padding), counts int32 [rows]) as documented in sample.h."""
    rows = heavy.shape[0]
    seed, offset = int(rng[0]), int(rng[1])
    indices = torch.full((rows, max_out), -1, dtype=torch.int32)
    log_weights = torch.zeros((rows, max_out), dtype=torch.float64)
    counts = torch.zeros(rows, dtype=torch.int32)
    for r in range(rows):
        residual = residual_positions(heavy[r].tolist(), int(starts[r]), int(ends[r]))
        n_r = len(residual)
        b = int(num_samples[r])
        if n_r == 0 or b <= 0:
            continue
        if b >= n_r and n_r <= max_out:
            chosen, lw = residual, 0.0
        else:
            d = min(b, max_out)
            if d <= 0:
                continue
            words = philox_draw_words(seed, offset, r, stream, d)
            chosen = [residual[scale_to_range_ref(wd, n_r)] for wd in words]
            lw = math.log(n_r / d)
        counts[r] = len(chosen)
        if chosen:
            indices[r, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            log_weights[r, :len(chosen)] = lw
    return indices, log_weights, counts


# --------------------------------------------------------------------------------------
# Index lists over q/K/V (attention_params.h)
# --------------------------------------------------------------------------------------


def _list_entries(indices: Tensor, counts: Tensor, log_weights: Optional[Tensor], b: int,
                  lst: int):
    """(positions, log-weights) of list (b, lst): its first `count` entries, skipping < 0."""
    count = int(counts[b, lst])
    pos, lw = [], []
    for j in range(count):
        i = int(indices[b, lst, j])
        if i < 0:
            continue
        pos.append(i)
        lw.append(0.0 if log_weights is None else float(log_weights[b, lst, j]))
    return pos, lw


def _list_of(h: int, q_heads: int, list_heads: int) -> int:
    return h if list_heads == q_heads else h // (q_heads // list_heads)


def _logits(q: Tensor, k: Tensor, b: int, h: int, pos: List[int], scale: float) -> Tensor:
    q_heads, kv_heads = q.shape[1], k.shape[1]
    kvh = h // (q_heads // kv_heads)
    rows = k[b, kvh, pos].to(torch.float64)
    return scale * (rows @ q[b, h].to(torch.float64))


# --------------------------------------------------------------------------------------
# pilot_stats (pilot.h)
# --------------------------------------------------------------------------------------


def pilot_stats_ref(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor,
                    scale: float):
    batch, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    list_heads = indices.shape[1]
    max_logit = torch.full((batch, q_heads), -math.inf, dtype=torch.float64)
    moments = torch.zeros((batch, q_heads, 3), dtype=torch.float64)
    vector_moments = torch.zeros((batch, q_heads, 2, dim), dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            pos, _ = _list_entries(indices, counts, None, b, _list_of(h, q_heads, list_heads))
            if not pos:
                continue
            s = _logits(q, k, b, h, pos, scale)
            m = s.max()
            w = torch.exp(s - m)
            vv = v[b, h // (q_heads // kv_heads), pos].to(torch.float64)
            max_logit[b, h] = m
            moments[b, h, 0] = w.sum()
            moments[b, h, 1] = (w ** 2).sum()
            moments[b, h, 2] = ((w ** 2) * (vv ** 2).sum(-1)).sum()
            vector_moments[b, h, 0] = (w[:, None] * vv).sum(0)
            vector_moments[b, h, 1] = ((w ** 2)[:, None] * vv).sum(0)
    return max_logit, moments, vector_moments


# --------------------------------------------------------------------------------------
# sparse_attention (sparse_attention.h): one dense softmax, no splits
# --------------------------------------------------------------------------------------


def sparse_attention_ref(q: Tensor, k: Tensor, v: Tensor, indices: Tensor,
                         log_weights: Optional[Tensor], counts: Tensor, scale: float):
    """(out [B, Hq, D], lse [B, Hq]) float64: softmax over s_i + log_weight_i of the listed
    rows; an empty list (or one whose weights are all zero) gives lse -inf and out 0."""
    batch, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    list_heads = indices.shape[1]
    out = torch.zeros((batch, q_heads, dim), dtype=torch.float64)
    lse = torch.full((batch, q_heads), -math.inf, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            pos, lw = _list_entries(indices, counts, log_weights, b,
                                    _list_of(h, q_heads, list_heads))
            if not pos:
                continue
            s = _logits(q, k, b, h, pos, scale) + torch.tensor(lw, dtype=torch.float64)
            total = torch.logsumexp(s, 0)
            if not math.isfinite(float(total)):
                continue
            p = torch.exp(s - total)
            out[b, h] = p @ v[b, h // (q_heads // kv_heads), pos].to(torch.float64)
            lse[b, h] = total
    return out, lse


def dense_attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float,
                        lengths: Optional[Sequence[int]] = None) -> Tensor:
    """Full attention [B, Hq, D] float64 over the first lengths[b] tokens."""
    batch, q_heads, dim = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros((batch, q_heads, dim), dtype=torch.float64)
    for b in range(batch):
        nb = n if lengths is None else int(lengths[b])
        for h in range(q_heads):
            if nb == 0:
                continue
            s = scale * (k[b, h // group, :nb].to(torch.float64) @ q[b, h].to(torch.float64))
            out[b, h] = torch.softmax(s, 0) @ v[b, h // group, :nb].to(torch.float64)
    return out


# --------------------------------------------------------------------------------------
# combine (combine.h / online_softmax.h)
# --------------------------------------------------------------------------------------


def combine_ref(partial_out: Tensor, partial_lse: Tensor):
    """Merges partials [S, ..., D] / [S, ...]: lse = logsumexp_s lse_s, out = sum_s
    exp(lse_s - lse) out_s; a partial with lse -inf is empty and contributes nothing; all
    empty gives lse -inf and out 0."""
    po = partial_out.to(torch.float64)
    pl = partial_lse.to(torch.float64)
    splits = po.shape[0]
    item_shape = pl.shape[1:]
    po = po.reshape(splits, -1, po.shape[-1])
    pl = pl.reshape(splits, -1)
    items, dim = po.shape[1], po.shape[2]
    out = torch.zeros((items, dim), dtype=torch.float64)
    lse = torch.full((items,), -math.inf, dtype=torch.float64)
    for m in range(items):
        live = [s for s in range(splits) if pl[s, m] != -math.inf]
        if not live:
            continue
        lses = pl[live, m]
        total = torch.logsumexp(lses, 0)
        lse[m] = total
        for s in live:
            out[m] += torch.exp(pl[s, m] - total) * po[s, m]
    return out.reshape(*item_shape, dim), lse.reshape(item_shape)
