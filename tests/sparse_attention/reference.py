"""Plain references of sparse_attention (sparse_attention.h) and of dense attention.

Written from the header's documentation, not from the kernels: one softmax per head in
float64, no splits, the lists read as attention_params.h says (tests/helpers.py). Takes and
returns CPU tensors; outputs are float64.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from tests.helpers import list_entries, list_of, logits

Tensor = torch.Tensor


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
            pos, lw = list_entries(indices, counts, log_weights, b,
                                   list_of(h, q_heads, list_heads))
            if not pos:
                continue
            s = logits(q, k, b, h, pos, scale) + torch.tensor(lw, dtype=torch.float64)
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
