"""Plain reference of pilot_stats (pilot.h).

Written from the header's documentation, not from the kernels: float64 torch, one
(row, head) at a time, the lists read as attention_params.h says (tests/helpers.py).
Takes and returns CPU tensors; outputs are float64.
"""
from __future__ import annotations

import math

import torch

from tests.helpers import list_entries, list_of, logits

Tensor = torch.Tensor


def listed_rows(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor, scale: float):
    """(b, h, logits s, V rows) in float64 of every head whose list has entries."""
    batch, q_heads, _ = q.shape
    kv_heads = k.shape[1]
    list_heads = indices.shape[1]
    for b in range(batch):
        for h in range(q_heads):
            pos, _ = list_entries(indices, counts, None, b, list_of(h, q_heads, list_heads))
            if pos:
                yield (b, h, logits(q, k, b, h, pos, scale),
                       v[b, h // (q_heads // kv_heads), pos].to(torch.float64))


def pilot_stats_ref(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor,
                    scale: float):
    """(max_logit [B, Hq], moments [B, Hq, 3], vector_moments [B, Hq, 2, D]) of each head's
    listed rows with w = exp(s - max): (sum w, sum w^2, sum w^2 |v|^2) and
    (sum w v, sum w^2 v); an empty list gives -inf and zeros."""
    batch, q_heads, dim = q.shape
    max_logit = torch.full((batch, q_heads), -math.inf, dtype=torch.float64)
    moments = torch.zeros((batch, q_heads, 3), dtype=torch.float64)
    vector_moments = torch.zeros((batch, q_heads, 2, dim), dtype=torch.float64)
    for b, h, s, vv in listed_rows(q, k, v, indices, counts, scale):
        m = s.max()
        w = torch.exp(s - m)
        max_logit[b, h] = m
        moments[b, h, 0] = w.sum()
        moments[b, h, 1] = (w ** 2).sum()
        moments[b, h, 2] = ((w ** 2) * (vv ** 2).sum(-1)).sum()
        vector_moments[b, h, 0] = (w[:, None] * vv).sum(0)
        vector_moments[b, h, 1] = ((w ** 2)[:, None] * vv).sum(0)
    return max_logit, moments, vector_moments


def pilot_dispersion_ref(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor,
                         scale: float, center: Tensor) -> Tensor:
    """[B, Hq, 3] float64: (Tr C^T C, ||C^T C||_F^2, sum_i |c_i|^4) with C the rows c_i = x_i - mean(x),
    x_i = w_i (v_i - center), w = exp(s - max), over each head's listed rows: the D x D
    form of what pilot.h computes in draw space. Zeros for an empty list."""
    batch, q_heads, _ = q.shape
    out = torch.zeros((batch, q_heads, 3), dtype=torch.float64)
    for b, h, s, vv in listed_rows(q, k, v, indices, counts, scale):
        w = torch.exp(s - s.max())
        x = w[:, None] * (vv - center[b, h].to(torch.float64))
        c = x - x.mean(0)
        cov = c.T @ c
        out[b, h, 0] = cov.trace()
        out[b, h, 1] = (cov ** 2).sum()
        out[b, h, 2] = ((c ** 2).sum(1) ** 2).sum()
    return out
