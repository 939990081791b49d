"""Thin wrappers over torch.ops.vattention.* and their fake kernels.

The fake (meta) kernels give torch.compile and CUDA-graph capture the output
shapes without running anything. The semantics of each op are documented in the
torch-free headers under csrc/vattention/.

Every op that reads K/V rows or the key summary takes `block_table=None`: given an int32
[batch, max_blocks] table, k / v (and the summary's codes / params) are pools of physical
blocks [num_blocks, kv_heads, block_size, ...] (any strides, e.g. an NHD cache passed as
`cache.permute(0, 2, 1, 3)`), logical row r of batch row b lives in block
block_table[b, r // block_size] at slot r % block_size, and the logical length is
max_blocks * block_size (attention_params.h; vattention.paged builds and undoes one).
On CUDA the table's ids are not checked (that would need a host sync): every id a read row
maps to must be a block of the pool, as in vLLM and FlashInfer. The CPU ops check them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _C  # loads the library that registers torch.ops.vattention; host rules
from .config import _slackened, check_qkv, kv_length

Tensor = torch.Tensor

# The two independent Philox draw sets of a decode step (DrawSet in csrc/vattention/sample.h):
# the pilot's draws must not be reused as the final sample's, or the budget would depend on
# the very draws it sizes.
PILOT_DRAWS = 0
FINAL_DRAWS = 1


def select_topk(scores: Tensor, starts: Tensor, ends: Tensor, ks: Tensor, k_max: int) -> Tensor:
    """Top-ks[r] positions of scores[r, starts[r]:ends[r]], ascending, -1 padded to k_max."""
    return torch.ops.vattention.select_topk(scores, starts, ends, ks, k_max)


def select_topk_into(scores: Tensor, starts: Tensor, ends: Tensor, ks: Tensor, out: Tensor) -> None:
    """select_topk(scores, starts, ends, ks, out.shape[1]) written into out: int32 [rows, k_max]
    with any row stride >= k_max and a contiguous last dim (e.g. a column slice of a wider
    index list, which then needs no copy)."""
    torch.ops.vattention.select_topk_into(scores, starts, ends, ks, out)


def sample_residual(heavy: Tensor, starts: Tensor, ends: Tensor, num_samples: Tensor,
                    rng: Tensor, max_out: int, draw_set: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Uniform draws from each row's residual: (indices, log_weights, counts).

    draw_set is PILOT_DRAWS or FINAL_DRAWS: which of the step's two independent Philox
    draw sets to use. heavy may have any row stride (its last dim contiguous). Only the
    first counts[r] entries of row r of indices / log_weights are written: the entries
    past the count are unspecified (sample.h)."""
    return torch.ops.vattention.sample_residual(heavy, starts, ends, num_samples, rng, max_out,
                                                draw_set)


def pilot_stats(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor,
                scale: float, *, block_table: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """(max_logit [B,Hq], moments [B,Hq,3], vector_moments [B,Hq,2,D]) of a pilot list."""
    return torch.ops.vattention.pilot_stats(q, k, v, indices, counts, scale, block_table)


def pilot_dispersion(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, counts: Tensor,
                     scale: float, center: Tensor, *,
                     block_table: Optional[Tensor] = None) -> Tensor:
    """[B, Hq, 3] fp32: (sum_i |c_i|^2, sum_ij (c_i . c_j)^2, sum_i |c_i|^4) of the centred terms
    c_i = x_i - mean(x), x_i = w_i (V_i - center), over a pilot list (pilot.h)."""
    return torch.ops.vattention.pilot_dispersion(q, k, v, indices, counts, scale, center,
                                                 block_table)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor,
                     log_weights: Optional[Tensor], counts: Tensor, scale: float,
                     num_splits: int = 0, *,
                     block_table: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Attention over index lists with per-index log-weights: (out fp32 [B,Hq,D], lse [B,Hq])."""
    return torch.ops.vattention.sparse_attention(q, k, v, indices, log_weights, counts, scale,
                                                 num_splits, block_table)


def sparse_attention_partials(q: Tensor, k: Tensor, v: Tensor, indices: Tensor,
                              log_weights: Optional[Tensor], counts: Tensor, scale: float,
                              num_splits: int = 0, *,
                              block_table: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """sparse_attention's split partials before their combine: (partial_out fp32
    [B, Hq, S, D], partial_lse fp32 [B, Hq, S]), S = attention_splits(...). A partial of lse
    -inf is empty and its out unspecified (never read); combine(partial_out.movedim(2, 0),
    partial_lse.movedim(2, 0)) is sparse_attention's result, and merge_estimate takes them
    as its sample."""
    return torch.ops.vattention.sparse_attention_partials(q, k, v, indices, log_weights, counts,
                                                          scale, num_splits, block_table)


def attention_splits(device: torch.device, heads: int, max_count: int, num_splits: int) -> int:
    """The split count S of sparse_attention(_partials) for B * Hq = heads query heads over
    lists of max_count entries: num_splits when > 0; automatic (0): on the CPU
    choose_num_splits(heads, max_count, intra-op threads), on CUDA the balanced grid
    choose_split_grid(max_count, SMs) (heuristics.h)."""
    if num_splits > 0:
        return int(num_splits)
    device = torch.device(device)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return _C.split_count(1, max_count, sms, True)
    return _C.split_count(heads, max_count, torch.get_num_threads(), False)


def combine(partial_out: Tensor, partial_lse: Tensor) -> Tuple[Tensor, Tensor]:
    """Merges partials [S, ..., D] / [S, ...] into (out [..., D], lse [...])."""
    return torch.ops.vattention.combine(partial_out, partial_lse)


def select_scores(q: Tensor, k: Tensor, lengths: Tensor, scale: float,
                  share_gqa: bool, *, block_table: Optional[Tensor] = None) -> Tensor:
    """Oracle selection scores, fp32: [B, Hkv, N] with share_gqa (max over the group's heads of
    the log-probability), else the logits [B, Hq, N]; -inf at positions >= lengths[b]."""
    return torch.ops.vattention.select_scores(q, k, lengths, float(scale), bool(share_gqa),
                                              block_table)


def _check_rank(t: Tensor, rank: int, name: str, layout: str) -> None:
    torch._check(t.dim() == rank,
                 lambda: f"vattention: {name} must be {layout}, got shape {tuple(t.shape)}")


@torch.library.register_fake("vattention::select_topk")
def _select_topk_fake(scores, starts, ends, ks, k_max):
    _check_rank(scores, 2, "scores", "[rows, length]")
    torch._check(k_max >= 0, lambda: f"vattention: k_max must be >= 0, got {k_max}")
    return scores.new_empty((scores.shape[0], k_max), dtype=torch.int32)


@torch.library.register_fake("vattention::select_topk_into")
def _select_topk_into_fake(scores, starts, ends, ks, out):
    _check_rank(scores, 2, "scores", "[rows, length]")
    _check_rank(out, 2, "out", "[rows, k_max]")
    torch._check(out.shape[0] == scores.shape[0],
                 lambda: f"vattention: out must have {scores.shape[0]} rows, got {out.shape[0]}")


@torch.library.register_fake("vattention::sample_residual")
def _sample_residual_fake(heavy, starts, ends, num_samples, rng, max_out, draw_set):
    _check_rank(heavy, 2, "heavy", "[rows, heavy_max]")
    torch._check(max_out >= 0, lambda: f"vattention: max_out must be >= 0, got {max_out}")
    rows = heavy.shape[0]
    return (heavy.new_empty((rows, max_out), dtype=torch.int32),
            heavy.new_empty((rows, max_out), dtype=torch.float32),
            heavy.new_empty((rows,), dtype=torch.int32))


@torch.library.register_fake("vattention::pilot_stats")
def _pilot_stats_fake(q, k, v, indices, counts, scale, block_table=None):
    check_qkv(q, k, v, block_table=block_table)
    _check_rank(indices, 3, "indices", "[batch, list_heads, max_count]")
    b, h, d = q.shape
    return (q.new_empty((b, h), dtype=torch.float32),
            q.new_empty((b, h, 3), dtype=torch.float32),
            q.new_empty((b, h, 2, d), dtype=torch.float32))


@torch.library.register_fake("vattention::pilot_dispersion")
def _pilot_dispersion_fake(q, k, v, indices, counts, scale, center, block_table=None):
    check_qkv(q, k, v, block_table=block_table)
    _check_rank(indices, 3, "indices", "[batch, list_heads, max_count]")
    b, h, d = q.shape
    torch._check(center.shape == (b, h, d) and center.dtype == torch.float32,
                 lambda: f"vattention: center must be float32 [{b}, {h}, {d}], got "
                 f"{center.dtype} {tuple(center.shape)}")
    return q.new_empty((b, h, 3), dtype=torch.float32)


@torch.library.register_fake("vattention::sparse_attention")
def _sparse_attention_fake(q, k, v, indices, log_weights, counts, scale, num_splits,
                           block_table=None):
    check_qkv(q, k, v, block_table=block_table)
    _check_rank(indices, 3, "indices", "[batch, list_heads, max_count]")
    b, h, d = q.shape
    return (q.new_empty((b, h, d), dtype=torch.float32),
            q.new_empty((b, h), dtype=torch.float32))


@torch.library.register_fake("vattention::sparse_attention_partials")
def _sparse_attention_partials_fake(q, k, v, indices, log_weights, counts, scale, num_splits,
                                    block_table=None):
    check_qkv(q, k, v, block_table=block_table)
    _check_rank(indices, 3, "indices", "[batch, list_heads, max_count]")
    torch._check(num_splits >= 0, lambda: "vattention: num_splits must be >= 0 (0 = automatic), "
                 f"got {num_splits}")
    b, h, d = q.shape
    splits = attention_splits(q.device, b * h, indices.shape[2], num_splits)
    return (q.new_empty((b, h, splits, d), dtype=torch.float32),
            q.new_empty((b, h, splits), dtype=torch.float32))


@torch.library.register_fake("vattention::combine")
def _combine_fake(partial_out, partial_lse):
    torch._check(partial_out.dim() >= 2, lambda: "vattention: partial_out must be "
                 f"[splits, ..., head_dim], got shape {tuple(partial_out.shape)}")
    torch._check(partial_out.shape[0] > 0, lambda: "vattention: combine needs at least one partial")
    return partial_out.new_empty(partial_out.shape[1:]), partial_lse.new_empty(partial_lse.shape[1:])


@torch.library.register_fake("vattention::select_scores")
def _select_scores_fake(q, k, lengths, scale, share_gqa, block_table=None):
    check_qkv(q, k, block_table=block_table)
    _check_rank(lengths, 1, "lengths", "[batch]")
    batch, q_heads = q.shape[0], q.shape[1]
    kv_heads, length = k.shape[1], kv_length(k, block_table)
    return q.new_empty((batch, kv_heads if share_gqa else q_heads, length), dtype=torch.float32)



def summarize_keys(k: Tensor, codes: Tensor, params: Tensor, row_begin: Tensor, *,
                   block_table: Optional[Tensor] = None) -> None:
    """Writes the int4 summary of k [B, Hkv, rows, D] into codes / params (in place) at
    positions row_begin[b] + [0, rows); positions >= the summary's length are skipped.
    With block_table only the summary is paged (k is the new rows, contiguous layout)."""
    torch.ops.vattention.summarize_keys(k, codes, params, row_begin, block_table)


def select_scores_summary(q: Tensor, codes: Tensor, params: Tensor, lengths: Tensor,
                          scale: float, share_gqa: bool, *,
                          block_table: Optional[Tensor] = None) -> Tensor:
    """select_scores with K replaced by the dequantised int4 summary (the "int4" selector).
    With block_table the summary is paged by K's table."""
    return torch.ops.vattention.select_scores_summary(q, codes, params, lengths, float(scale),
                                                      bool(share_gqa), block_table)


def _check_block_table_rank(block_table: Optional[Tensor]) -> None:
    if block_table is not None:
        _check_rank(block_table, 2, "block_table", "[batch, max_blocks]")
        torch._check(block_table.dtype == torch.int32,
                     lambda: f"vattention: block_table must be int32, got {block_table.dtype}")


@torch.library.register_fake("vattention::summarize_keys")
def _summarize_keys_fake(k, codes, params, row_begin, block_table=None):
    _check_rank(k, 4, "k", "[batch, kv_heads, rows, head_dim]")
    _check_rank(codes, 4, "codes", "[batch, kv_heads, length, head_dim / 2]")
    _check_rank(params, 5, "params", "[batch, kv_heads, length, head_dim / 32, 2]")
    _check_rank(row_begin, 1, "row_begin", "[batch]")
    _check_block_table_rank(block_table)
    return None


@torch.library.register_fake("vattention::select_scores_summary")
def _select_scores_summary_fake(q, codes, params, lengths, scale, share_gqa, block_table=None):
    _check_rank(q, 3, "q", "[batch, q_heads, head_dim]")
    _check_rank(codes, 4, "codes", "[batch, kv_heads, length, head_dim / 2]")
    _check_rank(params, 5, "params", "[batch, kv_heads, length, head_dim / 32, 2]")
    _check_rank(lengths, 1, "lengths", "[batch]")
    _check_block_table_rank(block_table)
    batch, q_heads = q.shape[0], q.shape[1]
    kv_heads, length = codes.shape[1], kv_length(codes, block_table)
    return q.new_empty((batch, kv_heads if share_gqa else q_heads, length), dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# Stage "budget" (csrc/vattention/budget.h): one op for the fixed path's budget maths.
# ---------------------------------------------------------------------------------------

def plan_budget(det_out: Tensor, det_lse: Tensor, pilot_max_logit: Tensor, moments: Tensor,
                vector_moments: Tensor, pilot_counts: Tensor, n_residual: Tensor,
                dispersion: Optional[Tensor], chi2_table: Optional[Tensor], rule: str,
                epsilon: float, z: float, tail_dim_shrink: float, min_samples: int,
                reuse_pilot: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(final_wanted int32 [lists], reused int32 [lists], exact bool [lists],
    required float64 [B, Hq], n_residual_heads int64 [B, Hq]) from the deterministic part
    (det_out, det_lse), the pilot statistics of pilot_stats and per-list pilot_counts (int32)
    / n_residual (int64) [B * lists]; dispersion + chi2_table for the chi-square tail. z is
    the rule's normal quantile (vattention.budget.plan_fixed_budget computes it)."""
    return torch.ops.vattention.plan_budget(
        det_out, det_lse, pilot_max_logit, moments, vector_moments, pilot_counts, n_residual,
        dispersion, chi2_table, rule, float(epsilon), float(z), float(tail_dim_shrink),
        int(min_samples), bool(reuse_pilot))


@torch.library.register_fake("vattention::plan_budget")
def _plan_budget_fake(det_out, det_lse, pilot_max_logit, moments, vector_moments, pilot_counts,
                      n_residual, dispersion, chi2_table, rule, epsilon, z, tail_dim_shrink,
                      min_samples, reuse_pilot):
    _check_rank(det_out, 3, "det_out", "[batch, q_heads, head_dim]")
    _check_rank(pilot_counts, 1, "pilot_counts", "[batch * list_heads]")
    torch._check(n_residual.shape == pilot_counts.shape,
                 lambda: f"vattention: n_residual must have shape {tuple(pilot_counts.shape)}, "
                 f"got {tuple(n_residual.shape)}")
    torch._check(rule in ("ratio", "paper", "denominator"),
                 lambda: f"vattention: rule must be ratio, paper or denominator, got {rule!r}")
    lists = pilot_counts.shape[0]
    batch, q_heads = det_out.shape[0], det_out.shape[1]
    return (pilot_counts.new_empty((lists,), dtype=torch.int32),
            pilot_counts.new_empty((lists,), dtype=torch.int32),
            pilot_counts.new_empty((lists,), dtype=torch.bool),
            det_out.new_empty((batch, q_heads), dtype=torch.float64),
            det_out.new_empty((batch, q_heads), dtype=torch.int64))


def residual_center(det_out: Tensor, det_lse: Tensor, pilot_max_logit: Tensor, moments: Tensor,
                    vector_moments: Tensor, pilot_counts: Tensor, n_residual: Tensor) -> Tensor:
    """O^ = N^ / Z^ float32 [B, Hq, D] (budget.estimate's o_hat), the center pilot_dispersion
    needs for the chi-square tail; inputs as for plan_budget."""
    return torch.ops.vattention.residual_center(det_out, det_lse, pilot_max_logit, moments,
                                                vector_moments, pilot_counts, n_residual)


@torch.library.register_fake("vattention::residual_center")
def _residual_center_fake(det_out, det_lse, pilot_max_logit, moments, vector_moments,
                          pilot_counts, n_residual):
    _check_rank(det_out, 3, "det_out", "[batch, q_heads, head_dim]")
    _check_rank(pilot_counts, 1, "pilot_counts", "[batch * list_heads]")
    return det_out.new_empty(det_out.shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# Stage "plan" (csrc/vattention/plan.h): the fixed path's sizes and fixed index lists.
# ---------------------------------------------------------------------------------------

PLAN_OUTPUTS = ("lengths", "sink", "local", "window_end", "heavy", "starts_rows", "ends_rows",
                "heavy_rows", "pilot_wanted", "n_residual", "det_idx", "det_counts")


def plan_dense_max(length: int, dense_below: int, sink_max: int, local_max: int) -> int:
    """The extra det_idx columns plan_lists gives the dense rows (plan.h): room for
    min(length, dense_below) rows beside the sink_max + local_max fixed columns."""
    return _C.plan_dense_max(int(length), int(dense_below), int(sink_max), int(local_max))


def plan_lists(q: Tensor, lengths: Optional[Tensor], length: int, list_heads: int, sizes,
               sink_max: int, local_max: int, heavy_max: int,
               dense_below: int = 0) -> Tuple[Tensor, ...]:
    """The twelve tensors of PLAN_OUTPUTS (plan.h) from the valid lengths (int64 / int32 [B]
    on q's device; None: `length` for every row): sink, local, window_end and heavy per
    row as config.resolve_sizes and decode's clamps give them; the samplers' per-list rows
    (int32 [B * list_heads]); n_residual (int64) and pilot_wanted (int32) per list;
    det_idx int32 [B, list_heads, sink_max + local_max + heavy_max + plan_dense_max(...)],
    the sink and local positions -1 padded and the heavy columns -1; det_counts the
    entries each list's kernel reads (sink_max + local_max + heavy_max).
    sizes: (sink, local, heavy, base_rate) as VAttentionConfig holds them (an int count or
    a float fraction, slackened here as config.resolve_size does).
    dense_below > 0: a row of n <= dense_below valid tokens attends exactly to all of
    them (sink as usual, local = n - sink, heavy and residual 0); its det_idx holds
    0 .. n - 1 in the fixed columns and then in the extra ones past the heavy columns
    (which select_topk fills with -1 for it), its count just covering them."""
    sizes = tuple(sizes)
    if len(sizes) != 4:
        raise ValueError(f"sizes must be (sink, local, heavy, base_rate), got {sizes!r}")
    fractions = [isinstance(s, float) for s in sizes]
    values = [_slackened(s) if f else float(s) for s, f in zip(sizes, fractions)]
    return torch.ops.vattention.plan_lists(q, lengths, int(length), int(list_heads), values,
                                           fractions, int(sink_max), int(local_max),
                                           int(heavy_max), int(dense_below))


@torch.library.register_fake("vattention::plan_lists")
def _plan_lists_fake(q, lengths, length, list_heads, sizes, fractions, sink_max, local_max,
                     heavy_max, dense_below=0):
    _check_rank(q, 3, "q", "[batch, q_heads, head_dim]")
    if lengths is not None:
        _check_rank(lengths, 1, "lengths", "[batch]")
    torch._check(list_heads >= 1, lambda: f"vattention: list_heads must be >= 1, got {list_heads}")
    torch._check(len(sizes) == 4 and len(fractions) == 4,
                 lambda: "vattention: sizes and fractions must hold 4 entries")
    torch._check(dense_below >= 0,
                 lambda: f"vattention: dense_below must be >= 0 (0: off), got {dense_below}")
    batch, lists = q.shape[0], q.shape[0] * list_heads
    width = (sink_max + local_max + heavy_max
             + plan_dense_max(length, dense_below, sink_max, local_max))
    i64 = [q.new_empty((batch,), dtype=torch.int64) for _ in range(5)]
    i32 = [q.new_empty((lists,), dtype=torch.int32) for _ in range(4)]
    return (*i64, *i32, q.new_empty((lists,), dtype=torch.int64),
            q.new_empty((batch, list_heads, width), dtype=torch.int32),
            q.new_empty((batch, list_heads), dtype=torch.int32))


# ---------------------------------------------------------------------------------------
# Stage "combine" (csrc/vattention/combine.h): the estimate's partials merged and cast.
# ---------------------------------------------------------------------------------------

def merge_estimate(det_out: Tensor, det_lse: Tensor, extra: Optional[Tuple[Tensor, Tensor]],
                   sample_out: Tensor, sample_lse: Tensor, sample_counts: Tensor,
                   reused: Optional[Tensor], pilot_max_logit: Tensor, moments: Tensor,
                   vector_moments: Tensor, n_residual_heads: Tensor,
                   out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(out [B, Hq, D] in out_dtype, lse float32 [B, Hq]): the deterministic partial, the
    optional extra exact partial (out, lse), with reuse (reused int32 [B * lists]) the
    reused pilot's partial from its statistics (pilot_stats' outputs, float32 or float64)
    and the sample's partial (sample_counts int32 [B * lists]) reweighted to
    reused + count draws, merged by online_softmax.h's rule (combine.h). The sample is
    either merged (sample_out [B, Hq, D], sample_lse [B, Hq]) or sparse_attention_partials'
    split partials ([B, Hq, S, D], [B, Hq, S]), merged here first as combine would."""
    extra_out, extra_lse = (None, None) if extra is None else extra
    return torch.ops.vattention.merge_estimate(det_out, det_lse, extra_out, extra_lse,
                                               sample_out, sample_lse, sample_counts, reused,
                                               pilot_max_logit, moments, vector_moments,
                                               n_residual_heads, out_dtype)


@torch.library.register_fake("vattention::merge_estimate")
def _merge_estimate_fake(det_out, det_lse, extra_out, extra_lse, sample_out, sample_lse,
                         sample_counts, reused, pilot_max_logit, moments, vector_moments,
                         n_residual_heads, out_dtype):
    _check_rank(det_out, 3, "det_out", "[batch, q_heads, head_dim]")
    _check_rank(sample_counts, 1, "sample_counts", "[batch * list_heads]")
    torch._check((extra_out is None) == (extra_lse is None),
                 lambda: "vattention: extra_out and extra_lse go together")
    torch._check(sample_out.dim() in (3, 4),
                 lambda: "vattention: sample_out must be [batch, q_heads, head_dim] or "
                 f"[batch, q_heads, splits, head_dim], got shape {tuple(sample_out.shape)}")
    torch._check(out_dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"vattention: out_dtype must be float32, float16 or bfloat16, "
                 f"got {out_dtype}")
    return (det_out.new_empty(det_out.shape, dtype=out_dtype),
            det_out.new_empty(det_out.shape[:2], dtype=torch.float32))
