"""Stage "select": scores that rank heavy-hitter candidates, one row per index list."""
from __future__ import annotations

from typing import Optional

import torch

from . import _C, ops
from .config import SELECTORS
from .key_summary import KeySummary, build_key_summary, dequantize_torch
from .paged import paged_to_contiguous

Tensor = torch.Tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def select_scores(q: Tensor, k: Tensor, lengths: Tensor, scale: float, share_gqa: bool,
                  selector: str = "oracle", key_summary: Optional[KeySummary] = None, *,
                  block_table: Optional[Tensor] = None) -> Tensor:
    """Selection scores: [B, Hkv, N] when shared over a GQA group, else [B, Hq, N].

    A shared list ranks token i by max over the group's heads of its log-probability
    log p_h(i), so a token that dominates any one head is kept for all of them; raw
    logits would let the head with the largest logit scale decide alone.

    selector "oracle": the exact logits; runs torch.ops.vattention.select_scores (reads K once
    per KV group, fp32 dot products without rounding the logits to q's dtype) where it
    supports the inputs, else the plain torch composition `select_scores_torch`.
    selector "int4": the same scores of the dequantised int4 key summary
    (vattention.key_summary; built from k when key_summary is None) and K is not read: the
    select_scores_summary op, else `select_scores_torch` on the dequantised keys in fp32.
    selector "int3_channel": the same on its 3-bit per-channel summary (built from k's valid
    rows when None), through `select_scores_torch` (no kernel for this format yet).

    block_table (int32 [B, max_blocks]): k is a paged cache's pool [num_blocks, Hkv,
    block_size, D] (vattention.ops' layout) and N = max_blocks * block_size; a key_summary
    must then be a paged one (KeySummary.paged) of the same pool, read through that table.
    """
    if selector == "oracle":
        if _op_supports(q, k, lengths):
            return ops.select_scores(q, k, lengths, scale, share_gqa, block_table=block_table)
        return select_scores_torch(q, k, lengths, scale, share_gqa, block_table=block_table)
    if selector not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
    if key_summary is None:
        if block_table is None:
            key_summary = build_key_summary(k, selector, lengths)
        else:
            key_summary = build_key_summary(k, selector, block_table=block_table)
    if key_summary.format != selector:
        raise ValueError(f"key_summary is an {key_summary.format!r} summary; selector "
                         f"{selector!r} needs a {selector!r} one")
    if key_summary.paged != (block_table is not None):
        raise ValueError("key_summary must be paged (KeySummary.paged) exactly when a "
                         f"block_table is given; got paged={key_summary.paged} and block_table "
                         f"{'given' if block_table is not None else 'None'}")
    if selector == "int4" and _summary_op_supports(q, key_summary, lengths):
        return ops.select_scores_summary(q, key_summary.codes, key_summary.params, lengths,
                                         scale, share_gqa, block_table=block_table)
    return select_scores_torch(q.float(), dequantize_torch(key_summary), lengths, scale,
                               share_gqa, block_table=block_table)


def _op_supports(q: Tensor, k: Tensor, lengths: Tensor) -> bool:
    dim = q.shape[-1]
    return (q.dtype in _DTYPES and k.dtype == q.dtype and k.device == q.device
            and lengths.device == q.device and lengths.dtype in (torch.int32, torch.int64)
            and q.shape[1] > 0 and q.stride(-1) == 1 and k.stride(-1) == 1
            and (q.device.type == "cpu" or (q.device.type == "cuda" and dim in _C.cuda_head_dims)))


def _summary_op_supports(q: Tensor, summary: KeySummary, lengths: Tensor) -> bool:
    dim = q.shape[-1]
    codes, params = summary.codes, summary.params
    if not (q.dtype in _DTYPES and codes.device == q.device and params.device == q.device
            and lengths.device == q.device and lengths.dtype in (torch.int32, torch.int64)
            and q.shape[1] > 0 and q.stride(-1) == 1 and codes.stride(-1) == 1
            and params.stride(-1) == 1 and params.stride(-2) == 2):
        return False
    if q.device.type == "cpu":
        return True
    return (q.device.type == "cuda" and dim in _C.cuda_head_dims
            and torch._C._dispatch_has_kernel_for_dispatch_key(
                "vattention::select_scores_summary", "CUDA"))


def select_scores_torch(q: Tensor, k: Tensor, lengths: Tensor, scale: float,
                        share_gqa: bool, *, block_table: Optional[Tensor] = None) -> Tensor:
    """The plain-torch composition of `select_scores` (the reference of the op's tests).
    block_table: k is a paged pool, gathered into [B, Hkv, N, D] first (paged_to_contiguous)."""
    if block_table is not None:
        k = paged_to_contiguous(k, block_table)
    batch, q_heads, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    logits = torch.matmul(q.view(batch, kv_heads, group, dim), k.transpose(-1, -2)).float()
    logits = logits * scale
    positions = torch.arange(length, device=q.device)
    beyond = positions[None, :] >= lengths[:, None]
    logits = logits.masked_fill(beyond[:, None, None, :], float("-inf"))
    if not share_gqa:
        return logits.reshape(batch, q_heads, length)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    log_probs = logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return log_probs.amax(dim=2)
