"""Thin wrappers over torch.ops.vattention.* and their fake kernels.

The fake (meta) kernels give torch.compile and CUDA-graph capture the output
shapes without running anything. The semantics of each op are documented in the
torch-free headers under csrc/vattention/.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _C  # noqa: F401  (loads the library that registers torch.ops.vattention)
from .config import check_qkv

Tensor = torch.Tensor

# The two independent Philox draw sets of a decode step (DrawSet in csrc/vattention/sample.h):
# the pilot's draws must not be reused as the final sample's, or the budget would depend on
# the very draws it sizes.
PILOT_DRAWS = 0
FINAL_DRAWS = 1


def select_topk(scores: Tensor, starts: Tensor, ends: Tensor, ks: Tensor, k_max: int) -> Tensor:
    """Top-ks[r] positions of scores[r, starts[r]:ends[r]], ascending, -1 padded to k_max."""
    return torch.ops.vattention.select_topk(scores, starts, ends, ks, k_max)


def sample_residual(heavy: Tensor, starts: Tensor, ends: Tensor, num_samples: Tensor,
                    rng: Tensor, max_out: int, draw_set: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Uniform draws from each row's residual: (indices, log_weights, counts).

    draw_set is PILOT_DRAWS or FINAL_DRAWS: which of the step's two independent Philox
    draw sets to use."""
    return torch.ops.vattention.sample_residual(heavy, starts, ends, num_samples, rng, max_out,
                                                draw_set)


def pilot_stats(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor,
                scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(max_logit [B,Hq], moments [B,Hq,3], vector_moments [B,Hq,2,D]) of a pilot list."""
    return torch.ops.vattention.pilot_stats(q, k, v, indices, counts, scale)


def pilot_dispersion(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor,
                     scale: float, center: Tensor) -> Tensor:
    """[B, Hq, 3] fp32: (sum_i |c_i|^2, sum_ij (c_i . c_j)^2, sum_i |c_i|^4) of the centred terms
    c_i = x_i - mean(x), x_i = w_i (V_i - center), over a pilot list (pilot.h)."""
    return torch.ops.vattention.pilot_dispersion(q, k, v, indices, counts, scale, center)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor,
                     log_weights: Optional[Tensor], counts: Tensor, scale: float,
                     num_splits: int = 0) -> Tuple[Tensor, Tensor]:
    """Attention over index lists with per-index log-weights: (out fp32 [B,Hq,D], lse [B,Hq])."""
    return torch.ops.vattention.sparse_attention(q, k, v, indices, log_weights, counts, scale,
                                                 num_splits)


def combine(partial_out: Tensor, partial_lse: Tensor) -> Tuple[Tensor, Tensor]:
    """Merges partials [S, ..., D] / [S, ...] into (out [..., D], lse [...])."""
    return torch.ops.vattention.combine(partial_out, partial_lse)


def select_scores(q: Tensor, k: Tensor, lengths: Tensor, scale: float,
                  share_gqa: bool) -> Tensor:
    """Oracle selection scores, fp32: [B, Hkv, N] with share_gqa (max over the group's heads of
    the log-probability), else the logits [B, Hq, N]; -inf at positions >= lengths[b]."""
    return torch.ops.vattention.select_scores(q, k, lengths, float(scale), bool(share_gqa))


def _check_rank(t: Tensor, rank: int, name: str, layout: str) -> None:
    torch._check(t.dim() == rank,
                 lambda: f"vattention: {name} must be {layout}, got shape {tuple(t.shape)}")


@torch.library.register_fake("vattention::select_topk")
def _select_topk_fake(scores, starts, ends, ks, k_max):
    _check_rank(scores, 2, "scores", "[rows, length]")
    torch._check(k_max >= 0, lambda: f"vattention: k_max must be >= 0, got {k_max}")
    return scores.new_empty((scores.shape[0], k_max), dtype=torch.int32)


@torch.library.register_fake("vattention::sample_residual")
def _sample_residual_fake(heavy, starts, ends, num_samples, rng, max_out, draw_set):
    _check_rank(heavy, 2, "heavy", "[rows, heavy_max]")
    torch._check(max_out >= 0, lambda: f"vattention: max_out must be >= 0, got {max_out}")
    rows = heavy.shape[0]
    return (heavy.new_empty((rows, max_out), dtype=torch.int32),
            heavy.new_empty((rows, max_out), dtype=torch.float32),
            heavy.new_empty((rows,), dtype=torch.int32))


@torch.library.register_fake("vattention::pilot_stats")
def _pilot_stats_fake(q, k, v, indices, counts, scale):
    check_qkv(q, k, v)
    _check_rank(indices, 3, "indices", "[batch, list_heads, max_count]")
    b, h, d = q.shape
    return (q.new_empty((b, h), dtype=torch.float32),
            q.new_empty((b, h, 3), dtype=torch.float32),
            q.new_empty((b, h, 2, d), dtype=torch.float32))


@torch.library.register_fake("vattention::pilot_dispersion")
def _pilot_dispersion_fake(q, k, v, indices, counts, scale, center):
    check_qkv(q, k, v)
    _check_rank(indices, 3, "indices", "[batch, list_heads, max_count]")
    b, h, d = q.shape
    torch._check(center.shape == (b, h, d) and center.dtype == torch.float32,
                 lambda: f"vattention: center must be float32 [{b}, {h}, {d}], got "
                 f"{center.dtype} {tuple(center.shape)}")
    return q.new_empty((b, h, 3), dtype=torch.float32)


@torch.library.register_fake("vattention::sparse_attention")
def _sparse_attention_fake(q, k, v, indices, log_weights, counts, scale, num_splits):
    check_qkv(q, k, v)
    _check_rank(indices, 3, "indices", "[batch, list_heads, max_count]")
    b, h, d = q.shape
    return (q.new_empty((b, h, d), dtype=torch.float32),
            q.new_empty((b, h), dtype=torch.float32))


@torch.library.register_fake("vattention::combine")
def _combine_fake(partial_out, partial_lse):
    torch._check(partial_out.dim() >= 2, lambda: "vattention: partial_out must be "
                 f"[splits, ..., head_dim], got shape {tuple(partial_out.shape)}")
    torch._check(partial_out.shape[0] > 0, lambda: "vattention: combine needs at least one partial")
    return partial_out.new_empty(partial_out.shape[1:]), partial_lse.new_empty(partial_lse.shape[1:])


@torch.library.register_fake("vattention::select_scores")
def _select_scores_fake(q, k, lengths, scale, share_gqa):
    check_qkv(q, k)
    _check_rank(lengths, 1, "lengths", "[batch]")
    batch, q_heads = q.shape[0], q.shape[1]
    kv_heads, length = k.shape[1], k.shape[2]
    return q.new_empty((batch, kv_heads if share_gqa else q_heads, length), dtype=torch.float32)



def summarize_keys(k: Tensor, codes: Tensor, params: Tensor, row_begin: Tensor) -> None:
    """Writes the int4 summary of k [B, Hkv, rows, D] into codes / params (in place) at
    positions row_begin[b] + [0, rows); positions >= the summary's length are skipped."""
    torch.ops.vattention.summarize_keys(k, codes, params, row_begin)


def select_scores_summary(q: Tensor, codes: Tensor, params: Tensor, lengths: Tensor,
                          scale: float, share_gqa: bool) -> Tensor:
    """select_scores with K replaced by the dequantised int4 summary (the "int4" selector)."""
    return torch.ops.vattention.select_scores_summary(q, codes, params, lengths, float(scale),
                                                      bool(share_gqa))


@torch.library.register_fake("vattention::summarize_keys")
def _summarize_keys_fake(k, codes, params, row_begin):
    _check_rank(k, 4, "k", "[batch, kv_heads, rows, head_dim]")
    _check_rank(codes, 4, "codes", "[batch, kv_heads, length, head_dim / 2]")
    _check_rank(params, 5, "params", "[batch, kv_heads, length, head_dim / 32, 2]")
    _check_rank(row_begin, 1, "row_begin", "[batch]")
    return None


@torch.library.register_fake("vattention::select_scores_summary")
def _select_scores_summary_fake(q, codes, params, lengths, scale, share_gqa):
    _check_rank(q, 3, "q", "[batch, q_heads, head_dim]")
    _check_rank(codes, 4, "codes", "[batch, kv_heads, length, head_dim / 2]")
    _check_rank(params, 5, "params", "[batch, kv_heads, length, head_dim / 32, 2]")
    _check_rank(lengths, 1, "lengths", "[batch]")
    batch, q_heads = q.shape[0], q.shape[1]
    kv_heads, length = codes.shape[1], codes.shape[2]
    return q.new_empty((batch, kv_heads if share_gqa else q_heads, length), dtype=torch.float32)
