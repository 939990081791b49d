"""Matched-density baselines for the quality benchmark: top-k alone and uniform sampling alone.

Both read a given number of K/V rows per index list, so that they can be compared with a
vAttention call at the same density (``matched_counts(stats)`` turns a vAttention call's
stats into those counts):

- ``topk_attention``: exact attention over sink + local + the tokens with the highest
  scores among the rest (the same oracle scores as vAttention's selector), filling the
  count; no sampling, no guarantee.
- ``uniform_attention``: sink + local exactly, plus a uniform sample without replacement
  of ``b = count - sink - local`` tokens of the rest (the ``n_r`` tokens between sink and
  local window), each weighted ``n_r / b`` (Horvitz-Thompson: the estimates of the
  numerator and denominator are unbiased); no top-k, no budget rule.

Plain torch (logits of every token are computed: these are quality baselines, not fast
kernels). Shapes follow ``vattention.decode``: q ``[B, Hq, D]``, k/v ``[B, Hkv, N, D]``,
``seq_lens`` ``[B]``; with ``share_gqa`` (default, as in ``VAttentionConfig``) the query
heads of one KV head share one index list, so counts are rows read per KV head. ``TopK``
and ``UniformSample`` wrap them as decode methods for ``vattention.integrations``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

from .config import check_qkv, check_size, resolve_sizes

Tensor = torch.Tensor
Size = Union[int, float]
Count = Union[int, float, Tensor]

_MASK64 = (1 << 64) - 1


class Selection(NamedTuple):
    """Per index list [B, L, N]: rows ``read``, the ``sampled`` ones among them, and the
    ``log_weights`` of every row (0 on the deterministic set, log(n_r / b) on the sample,
    -inf where not read)."""

    read: Tensor
    sampled: Tensor
    log_weights: Tensor


def _lengths(seq_lens, batch: int, length: int, device) -> Tensor:
    if seq_lens is None:
        return torch.full((batch,), length, dtype=torch.int64, device=device)
    lengths = torch.as_tensor(seq_lens).to(device=device, dtype=torch.int64)
    if lengths.shape != (batch,):
        raise ValueError(f"seq_lens must have shape [{batch}], got {tuple(lengths.shape)}")
    return lengths


def _row_size(size: Size, lengths: Tensor, name: str) -> Tensor:
    """Per-row count of a size, as vattention.decode counts it."""
    check_size(size, f"sizes: {name}")
    return resolve_sizes(size, lengths)


def token_counts(count: Count, lengths: Tensor, q_heads: int) -> Tensor:
    """Rows to read per (batch row, query head) as int64 [B, Hq].

    count: an int (tokens), a float (fraction of each row's length) or a tensor of token
    counts broadcastable to [B, Hq].
    """
    batch = lengths.shape[0]
    if isinstance(count, Tensor):
        counts = count.to(device=lengths.device)
        if counts.is_floating_point():
            counts = torch.round(counts)
        counts = counts.to(torch.int64)
        if counts.dim() == 1 and counts.shape[0] == batch:
            counts = counts[:, None]
        counts = counts.expand(batch, q_heads)
    else:
        counts = _row_size(count, lengths, "count")[:, None].expand(batch, q_heads)
    return torch.minimum(counts.clamp(min=0), lengths[:, None])


def matched_counts(stats: dict, seq_lens=None, length: Optional[int] = None) -> Tensor:
    """Rows a vAttention call read per head (``density * n``), as int64 [B, Hq] counts.

    seq_lens: the call's seq_lens (default: ``length`` tokens for every row).
    """
    density = stats["density"].to(torch.float64)
    if seq_lens is None:
        if length is None:
            raise ValueError("matched_counts needs seq_lens or length")
        n = torch.full((density.shape[0], 1), float(length), dtype=torch.float64,
                       device=density.device)
    else:
        n = torch.as_tensor(seq_lens).to(device=density.device, dtype=torch.float64)[:, None]
    return torch.round(density * n).to(torch.int64)


def _layout(q: Tensor, k: Tensor, v: Tensor, seq_lens, sink: Size, local: Size, count: Count,
            share_gqa: bool, scale: Optional[float]):
    check_qkv(q, k, v, dtypes=None)
    batch, q_heads, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    device = q.device
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    lengths = _lengths(seq_lens, batch, length, device)
    logits = torch.matmul(q.float().reshape(batch, kv_heads, group, dim),
                          k.float().transpose(-1, -2)) * scale            # [B, Hkv, G, N]
    positions = torch.arange(length, device=device)
    valid = positions[None, :] < lengths[:, None]                          # [B, N]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    counts = token_counts(count, lengths, q_heads)                         # [B, Hq]
    lists = kv_heads if share_gqa else q_heads
    if share_gqa:
        counts = counts.view(batch, kv_heads, group).amax(dim=2)
    sink_n = _row_size(sink, lengths, "sink")
    local_n = torch.minimum(_row_size(local, lengths, "local"), lengths - sink_n)
    start, end = sink_n, lengths - local_n                                 # window [start, end)
    fixed = (positions[None, :] < start[:, None]) | (
        (positions[None, :] >= end[:, None]) & valid)                      # [B, N]
    window = (positions[None, :] >= start[:, None]) & (positions[None, :] < end[:, None])
    n_r = (end - start)[:, None].expand(batch, lists)                      # [B, L]
    extra = torch.minimum((counts - (sink_n + local_n)[:, None]).clamp(min=0), n_r)
    return dict(batch=batch, q_heads=q_heads, kv_heads=kv_heads, group=group, lists=lists,
                length=length, logits=logits, fixed=fixed, window=window, n_r=n_r,
                extra=extra, share_gqa=share_gqa)


def _pick(keys: Tensor, extra: Tensor) -> Tensor:
    """[B, L, N] bool: the extra[b, l] largest keys of each row (keys -inf where not allowed)."""
    k_max = int(extra.max()) if extra.numel() else 0
    chosen = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
    if k_max == 0:
        return chosen
    top = torch.topk(keys, k_max, dim=-1).indices                          # [B, L, k_max]
    keep = torch.arange(k_max, device=keys.device)[None, None, :] < extra[..., None]
    return chosen.scatter_(-1, top, keep)


def _attend(lay: dict, v: Tensor, log_weights: Tensor, dtype: torch.dtype) -> Tensor:
    batch, kv_heads, group = lay["batch"], lay["kv_heads"], lay["group"]
    lw = log_weights.view(batch, kv_heads, 1 if lay["share_gqa"] else group, -1)
    scores = lay["logits"] + lw
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)                               # rows with no token
    out = torch.matmul(probs, v.float())                                   # [B, Hkv, G, D]
    return out.reshape(batch, lay["q_heads"], -1).to(dtype)


def topk_attention(q: Tensor, k: Tensor, v: Tensor, count: Count, *, sink: Size = 128,
                   local: Size = 128, seq_lens=None, scale: Optional[float] = None,
                   share_gqa: bool = True, return_selection: bool = False,
                   rank_k: Optional[Tensor] = None):
    """Exact attention over sink + local + the top tokens of the rest, ``count`` rows in all.

    Heavy tokens are ranked by the exact logits (with ``share_gqa``, by the max over the
    group's heads of their log-probabilities, as vAttention's oracle selector does), or by
    the logits of ``rank_k`` (same shape as ``k``) when given: e.g. the keys the int4
    selector scores (``key_summary.dequantize_torch``), for a top-k that reads a summary
    instead of all of K. Attention itself always uses the exact ``k``.
    Returns out [B, Hq, D] in q's dtype (and a ``Selection`` with ``return_selection``).
    """
    lay = _layout(q, k, v, seq_lens, sink, local, count, share_gqa, scale)
    logits = lay["logits"]
    if rank_k is not None:
        if rank_k.shape != k.shape:
            raise ValueError(f"rank_k must have k's shape {tuple(k.shape)}, got "
                             f"{tuple(rank_k.shape)}")
        batch, q_heads, dim = q.shape
        kv_heads = k.shape[1]
        rank_scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
        logits = torch.matmul(q.float().reshape(batch, kv_heads, q_heads // kv_heads, dim),
                              rank_k.float().transpose(-1, -2)) * rank_scale
        logits = torch.where(torch.isneginf(lay["logits"]), lay["logits"], logits)
    if share_gqa:
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        scores = (logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))).amax(2)
    else:
        scores = logits.reshape(lay["batch"], lay["q_heads"], -1)
    scores = scores.masked_fill(~lay["window"][:, None, :], float("-inf"))
    read = _pick(scores, lay["extra"]) | lay["fixed"][:, None, :]
    log_weights = torch.where(read, 0.0, float("-inf"))
    out = _attend(lay, v, log_weights, q.dtype)
    return (out, Selection(read, torch.zeros_like(read), log_weights)) if return_selection else out


def _generator(seed, device: torch.device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    if isinstance(seed, (tuple, list)) and len(seed) == 2:
        seed, offset = seed
    else:
        offset = 0
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    x = (seed * 0x9E3779B97F4A7C15 + offset + 1) & _MASK64     # splitmix64 of (seed, offset)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return torch.Generator(device=device).manual_seed((x ^ (x >> 31)) & ((1 << 63) - 1))


def uniform_attention(q: Tensor, k: Tensor, v: Tensor, count: Count, *, sink: Size = 128,
                      local: Size = 128, seq_lens=None, scale: Optional[float] = None,
                      share_gqa: bool = True, seed=None, return_selection: bool = False):
    """Sink + local exactly plus a uniform sample of the rest weighted n_r / b; ``count`` rows.

    The sample is drawn without replacement from the tokens between the sink and the local
    window (``n_r`` of them), ``b = count - sink - local`` per list. seed: None (torch's
    generator), an int or a (seed, offset) pair.
    """
    lay = _layout(q, k, v, seq_lens, sink, local, count, share_gqa, scale)
    generator = _generator(seed, q.device)
    shape = (lay["batch"], lay["lists"], lay["length"])
    keys = torch.rand(shape, generator=generator, device=q.device)
    keys = keys.masked_fill(~lay["window"][:, None, :], float("-inf"))
    sample = _pick(keys, lay["extra"])
    weight = torch.log(lay["n_r"].double() / lay["extra"].clamp(min=1).double()).float()
    log_weights = torch.where(sample, weight[..., None], float("-inf"))
    log_weights = torch.where(lay["fixed"][:, None, :], 0.0, log_weights)
    read = sample | lay["fixed"][:, None, :]
    out = _attend(lay, v, log_weights, q.dtype)
    return (out, Selection(read, sample, log_weights)) if return_selection else out


def _stats(sel: Selection, lengths: Tensor, q_heads: int) -> dict:
    """density and budget (sampled rows) per query head, like vattention.decode's stats."""
    read, sampled = sel.read, sel.sampled.sum(-1)
    lists = read.shape[1]
    density = read.sum(-1).float() / lengths.clamp(min=1)[:, None].float()
    if lists != q_heads:
        density = density.repeat_interleave(q_heads // lists, dim=1)
        sampled = sampled.repeat_interleave(q_heads // lists, dim=1)
    return {"density": density, "budget": sampled}


@dataclass(frozen=True)
class TopK:
    """``topk_attention`` as a decode method (for ``vattention.integrations``): count rows."""

    count: Size
    sink: Size = 128
    local: Size = 128
    share_gqa: bool = True

    def decode(self, q, k, v, seq_lens=None, scale=None, seed=None, return_stats=False):
        out, sel = topk_attention(q, k, v, self.count, sink=self.sink, local=self.local,
                                  seq_lens=seq_lens, scale=scale, share_gqa=self.share_gqa,
                                  return_selection=True)
        if not return_stats:
            return out
        lengths = _lengths(seq_lens, q.shape[0], k.shape[2], q.device)
        return out, _stats(sel, lengths, q.shape[1])


@dataclass(frozen=True)
class UniformSample:
    """``uniform_attention`` as a decode method (for ``vattention.integrations``)."""

    count: Size
    sink: Size = 128
    local: Size = 128
    share_gqa: bool = True

    def decode(self, q, k, v, seq_lens=None, scale=None, seed=None, return_stats=False):
        out, sel = uniform_attention(q, k, v, self.count, sink=self.sink, local=self.local,
                                     seq_lens=seq_lens, scale=scale, share_gqa=self.share_gqa,
                                     seed=seed, return_selection=True)
        if not return_stats:
            return out
        lengths = _lengths(seq_lens, q.shape[0], k.shape[2], q.device)
        return out, _stats(sel, lengths, q.shape[1])


__all__ = ["Selection", "TopK", "UniformSample", "matched_counts", "token_counts",
           "topk_attention", "uniform_attention"]
