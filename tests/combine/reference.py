"""Plain reference of combine (combine.h / online_softmax.h).

Written from the headers' documentation, not from the kernels: float64 torch, one item at
a time. Takes and returns CPU tensors; outputs are float64.
"""
from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


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
