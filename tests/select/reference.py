"""Plain reference of select_topk (select_topk.h).

Written from the header's documentation, not from the kernels: a Python sort per row.
Takes and returns CPU tensors.
"""
from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def select_topk_ref(scores: Tensor, starts: Tensor, ends: Tensor, ks: Tensor, k_max: int) -> Tensor:
    """Row r: the min(k, end - start) highest scores among [start, end) (end clipped to the
    row length, start to 0); NaN ranks above every number, as in torch.topk; ties (NaN
    among NaN too, and -0.0 with +0.0) -> lower position; chosen positions ascending, the
    rest of the row -1. fp64 keeps every subnormal of the dtypes distinct from zero."""
    rows, length = scores.shape
    values = scores.to(torch.float64)
    out = torch.full((rows, k_max), -1, dtype=torch.int32)
    for r in range(rows):
        start = max(int(starts[r]), 0)
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
                return (0, 0.0, pos)          # above every number
            return (1, -x, pos)               # higher first (-0.0 == 0.0), then lower position
        chosen = sorted(sorted(range(start, end), key=key)[:take])
        out[r, :take] = torch.tensor(chosen, dtype=torch.int32)
    return out
