"""Plain reference of sample_residual (sample.h) and of the Philox 4x32-10 draws it uses
(philox.h).

Written from the headers' documentation, not from the kernels: Philox with numpy uint64
arithmetic (vectorised over counters, checked against the Random123 known-answer vectors by
`philox_self_test`), the residual as an explicit list of positions. Takes and returns CPU
tensors; log-weights are float64.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import torch

Tensor = torch.Tensor

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


def philox_draw_words(seed: int, call_offset: int, row: int, draw_set: int,
                      num_draws: int) -> List[int]:
    """The 64-bit random word of draws 0..num_draws-1 of (seed, offset, row, draw_set):
    draw j uses block j // 2 with counter (block lo, block hi, subsequence lo, subsequence hi),
    block = (j // 2) | offset << 32, subsequence = row | draw_set << 32, key = seed (lo, hi);
    even draws take words (x, y), odd draws (z, w), low word first."""
    if num_draws <= 0:
        return []
    seed &= (1 << 64) - 1
    pairs = np.arange((num_draws + 1) // 2, dtype=np.uint64)
    block = pairs | (np.uint64(call_offset) << _S32)
    sub = int(row) | (int(draw_set) << 32)
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
                        rng: Tensor, max_out: int, draw_set: int):
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
            words = philox_draw_words(seed, offset, r, draw_set, d)
            chosen = [residual[scale_to_range_ref(wd, n_r)] for wd in words]
            lw = math.log(n_r / d)
        counts[r] = len(chosen)
        if chosen:
            indices[r, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            log_weights[r, :len(chosen)] = lw
    return indices, log_weights, counts
