"""Stage "select": scores that rank heavy-hitter candidates, one row per index list."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def oracle_scores(q: Tensor, k: Tensor, lengths: Tensor, scale: float, share_gqa: bool) -> Tensor:
    """Exact logits as selection scores: [B, Hkv, N] when shared over a GQA group, else [B, Hq, N].

    A shared list ranks token i by max over the group's heads of its log-probability
    log p_h(i), so a token that dominates any one head is kept for all of them; raw
    logits would let the head with the largest logit scale decide alone.
    """
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
