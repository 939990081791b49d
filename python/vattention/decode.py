"""vattention.decode: one decode step of verified sparse attention.

The pipeline, each stage a file under python/vattention or csrc/vattention:
select (heavy hitters) -> sparse attention over the deterministic set -> pilot
sample and its statistics -> budget -> sample the residual -> sparse attention
over the sample -> combine the two halves (three with reuse_pilot: the pilot's
draws then join the estimate through their own statistics, and the final sample
only tops them up to the budget). Budgets and counts stay on the device: no step
reads a tensor back to the host.
"""
from __future__ import annotations

import math
import contextlib
from typing import Callable, ContextManager, Optional, Sequence, Union

import torch

from . import budget as budget_rules
from . import heavy_size
from . import ops
from .config import VAttentionConfig, check_qkv, kv_length, resolve_size, resolve_sizes
from .device import host_values
from .key_summary import FORMATS as SUMMARY_FORMATS, KeySummary, summary_bytes
from .select import select_scores

Tensor = torch.Tensor
SeedLike = Union[None, int, Tensor]

MAX_RNG_OFFSET = 1 << 30


def _no_timer(name: str) -> ContextManager:
    return contextlib.nullcontext()


def _lengths(seq_lens, batch: int, length: int, device: torch.device,
             paged: bool = False) -> Tensor:
    if seq_lens is None:
        return torch.full((batch,), length, dtype=torch.int64, device=device)
    if not isinstance(seq_lens, Tensor):
        seq_lens = torch.as_tensor(seq_lens)
    if seq_lens.dtype not in (torch.int32, torch.int64) or seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be an int32/int64 tensor of shape [{batch}], got "
                         f"{seq_lens.dtype} {tuple(seq_lens.shape)}")
    if seq_lens.device.type == "cpu" and not torch.compiler.is_compiling():
        # Host data: checking it costs no synchronisation.
        values = seq_lens.tolist()
        if any(n < 0 or n > length for n in values):
            what = "max_blocks * block_size" if paged else "k's length"
            raise ValueError(f"seq_lens must lie in [0, {length}] ({what}), got {values}")
        return host_values(values, torch.int64, device)
    if seq_lens.device != device and seq_lens.device.type != "cpu":
        raise ValueError(f"seq_lens must be on the CPU or on {device}, got {seq_lens.device}")
    seq_lens = seq_lens.to(device, non_blocking=True)
    torch._assert_async(((seq_lens >= 0) & (seq_lens <= length)).all(),
                        f"seq_lens must lie in [0, {length}]")
    return seq_lens.to(torch.int64)


def _rng_state(seed: SeedLike, device: torch.device) -> Tensor:
    """[seed, offset] as an int64 device tensor, the state the samplers read."""
    if seed is None:
        # Drawn on the device from torch's generator: reproducible under torch.manual_seed,
        # fresh on every call, and replay-safe in CUDA graphs like torch's own random ops.
        # One launch draws both words below MAX_RNG_OFFSET: a random offset is as valid as 0,
        # and the pair names one of 2^60 Philox streams.
        return torch.randint(0, MAX_RNG_OFFSET, (2,), device=device, dtype=torch.int64)
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.shape != (2,):
            raise ValueError(f"seed as a tensor must be int64 [seed, offset], got {seed.dtype} "
                             f"{tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"seed tensor must be on {device}, got {seed.device}")
        return seed
    if isinstance(seed, (tuple, list)) and len(seed) == 2:
        seed, offset = seed
    else:
        offset = 0
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be None, an int in [0, 2^63), a (seed, offset) pair or an "
                         f"int64 tensor [2], got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < MAX_RNG_OFFSET:
        raise ValueError(f"seed offset must be an int in [0, 2^30), got {offset!r}")
    return host_values((seed, offset), torch.int64, device)


def _per_list(rows: Tensor, list_heads: int) -> Tensor:
    """[B] per-batch values -> [B * list_heads] int32, the samplers' row layout."""
    return rows[:, None].expand(-1, list_heads).reshape(-1).to(torch.int32)


def _per_head(values: Tensor, batch: int, list_heads: int, q_heads: int) -> Tensor:
    """Per-list values ([B * list_heads] or [B, list_heads]) -> [B, q_heads] per query head."""
    values = values.reshape(batch, list_heads)
    if list_heads == q_heads:
        return values
    return values.repeat_interleave(q_heads // list_heads, dim=1)


def decode(q: Tensor, k: Tensor, v: Tensor, cfg: Optional[VAttentionConfig] = None,
           seq_lens: Union[None, Tensor, Sequence[int]] = None, scale: Optional[float] = None,
           seed: SeedLike = None, return_stats: bool = False,
           stage_timer: Optional[Callable[[str], ContextManager]] = None,
           key_summary: Optional[KeySummary] = None, block_table: Optional[Tensor] = None):
    """Sparse attention of one decode query per (batch, head) with an (epsilon, delta) guarantee.

    q: [B, Hq, D]; k, v: [B, Hkv, N, D] with Hq % Hkv == 0; seq_lens: [B] valid lengths
    (default N); scale: logit scale (default 1/sqrt(D)); seed: None (torch's generator),
    an int, a (seed, offset) pair, or an int64 device tensor [seed, offset].
    block_table: a paged KV cache (int32 [B, max_blocks] on q's device, last dim
    contiguous): k and v are then pools [num_blocks, Hkv, block_size, D] of any strides (an
    NHD cache [num_blocks, block_size, Hkv, D] is passed as cache.permute(0, 2, 1, 3)),
    batch row b's logical row r is slot r % block_size of block block_table[b, r //
    block_size], N = max_blocks * block_size, and seq_lens is required. No row is copied:
    every stage reads the pool through the table, and a step gives the same heavy sets,
    budgets, samples and (to fp rounding) output as on the contiguous cache it pages. A
    key_summary is then a paged one over the same pool and table
    (key_summary.build_key_summary(k, block_table=...); "int4" and "oracle" only).
    key_summary: the summary of k (vattention.key_summary, kept beside the cache) that
    selector "int4" or "int3_channel" scores, in that selector's format; None builds one from k (convenient for one-off calls, and not
    counted in relative_bytes: a cache pays it once per appended token). Ignored by "oracle".
    Returns out [B, Hq, D] in q's dtype, and with return_stats a dict of per-head
    device tensors (see README and docs/api.md). stage_timer(name), if given, wraps each stage
    (select_scores, select_topk, attend, pilot, budget, sample, combine) so a benchmark can
    time them; the select stage is skipped where no row has a heavy hitter. With
    cfg.heavy_sizes (adaptive_heavy, the default, or heavy_candidates) each list chooses its heavy size (_decode_adaptive, heavy_size.py).
    """
    stage = stage_timer or _no_timer
    cfg = VAttentionConfig() if cfg is None else cfg
    if not isinstance(cfg, VAttentionConfig):
        raise TypeError(f"cfg must be a VAttentionConfig, got {type(cfg).__name__}")
    check_qkv(q, k, v, block_table=block_table)
    batch, q_heads, dim = q.shape
    kv_heads, length = k.shape[1], kv_length(k, block_table)
    device = q.device
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    if block_table is not None:
        if seq_lens is None:
            # A pool has no batch rows: the valid lengths cannot default to N.
            raise ValueError("seq_lens is required with block_table (a paged cache)")
        if cfg.selector == "int3_channel":
            raise ValueError("selector 'int3_channel' does not support a paged cache "
                             "(block_table): its 64-token blocks cross the cache's blocks; "
                             "use 'int4' or 'oracle'")
    lengths = (None if seq_lens is None else
               _lengths(seq_lens, batch, length, device, paged=block_table is not None))
    rng = _rng_state(seed, device)
    list_heads = kv_heads if cfg.share_gqa else q_heads
    if cfg.selector in SUMMARY_FORMATS and key_summary is not None:
        # (None: select_scores builds one from k, and only if a row has a heavy hitter.)
        if not isinstance(key_summary, KeySummary):
            raise TypeError(f"key_summary must be a vattention.key_summary.KeySummary, got "
                            f"{type(key_summary).__name__}")
        key_summary.check(batch, kv_heads, length, dim, device, format=cfg.selector,
                          pool=None if block_table is None else (k.shape[0], k.shape[2]))

    # Their static upper bounds size the buffers (resolve_size agrees with resolve_sizes).
    sink_max, local_max = resolve_size(cfg.sink, length), resolve_size(cfg.local, length)
    heavy_max = resolve_size(cfg.heavy, length)
    pilot_max = max(2, resolve_size(cfg.base_rate, length))
    # A shared list of gqa_heavy="union" holds each head's own top `heavy`: up to group x
    # heavy rows, so its heavy count (and residual) is per list.
    union = cfg.share_gqa and cfg.gqa_heavy == "union" and q_heads > kv_heads
    heavy_width = heavy_max * (q_heads // kv_heads) if union else heavy_max
    # The adaptive path's deterministic list holds its smallest candidate, T_0.
    heavy_size = cfg.heavy_sizes[0] if cfg.heavy_sizes else cfg.heavy
    if cfg.heavy_sizes:
        heavy_width = resolve_size(heavy_size, length)
    # The dense fallback: a row of n <= dense_below attends exactly to its n rows (plan_lists
    # decides it on the device). Where N itself is at most dense_below every row does, and
    # no list has a heavy column.
    all_dense = length <= cfg.dense_below
    if all_dense:
        heavy_width = 0

    # One op (plan.h): every row's sizes (resolve_sizes and the clamps), the samplers' rows,
    # each list's residual and pilot size, and the deterministic list with its fixed part
    # (sink, local, or a dense row's [0, n)) filled and its heavy columns -1 (select_topk
    # writes them: det_idx[:, :, F:F + heavy_width], F = sink_max + local_max; the dense
    # rows' extra columns follow them).
    (lengths, sink, local, window_end, heavy, starts_rows, ends_rows, heavy_rows,
     pilot_wanted, n_residual, det_idx, det_counts) = ops.plan_lists(
        q, lengths, length, list_heads, (cfg.sink, cfg.local, heavy_size, cfg.base_rate),
        sink_max, local_max, heavy_width, cfg.dense_below)
    window_start = sink
    if all_dense:
        return _decode_dense(q, k, v, cfg, scale, stage, return_stats, lengths, det_idx,
                             det_counts, list_heads, block_table)
    if cfg.heavy_sizes:
        return _decode_adaptive(q, k, v, cfg, lengths, rng, scale, key_summary, stage,
                                return_stats, (sink, local, det_idx, det_counts), pilot_max,
                                list_heads, starts_rows, ends_rows, block_table)

    if heavy_max > 0 and union:
        with stage("select_scores"):
            scores = select_scores(q, k, lengths, scale, False, cfg.selector, key_summary,
                                   block_table=block_table)
        with stage("select_topk"):
            per_head = ops.select_topk(scores.reshape(batch * q_heads, length),
                                       _per_list(window_start, q_heads),
                                       _per_list(window_end, q_heads),
                                       _per_list(heavy, q_heads), heavy_max)
            heavy_idx = _merge_heavy(per_head.view(batch * list_heads, heavy_width), length)
    elif heavy_max > 0:
        with stage("select_scores"):
            scores = select_scores(q, k, lengths, scale, cfg.share_gqa, cfg.selector,
                                   key_summary, block_table=block_table)
        with stage("select_topk"):
            # Written straight into the deterministic list's heavy columns (no copy); the
            # samplers read it there, a row stride of the list's width apart.
            heavy_idx = det_idx.view(batch * list_heads, -1)[
                :, sink_max + local_max:sink_max + local_max + heavy_width]
            ops.select_topk_into(scores.reshape(batch * list_heads, length), starts_rows,
                                 ends_rows, heavy_rows, heavy_idx)
    else:
        # No row has a heavy hitter (heavy_max bounds every row's count): scoring would read
        # all of K to choose nothing.
        heavy_idx = torch.empty((batch * list_heads, 0), dtype=torch.int32, device=device)
    if union:
        heavy_lists = (heavy_idx >= 0).sum(dim=1).view(batch, list_heads)
        n_residual = ((window_end - window_start)[:, None] - heavy_lists).reshape(-1)
        pilot_wanted = torch.where(n_residual > 0,
                                   resolve_sizes(cfg.base_rate, n_residual).clamp(min=2),
                                   torch.zeros_like(n_residual)).to(torch.int32)
    if union and heavy_width > 0:
        det_idx[:, :, sink_max + local_max:sink_max + local_max + heavy_width].copy_(
            heavy_idx.view(batch, list_heads, heavy_width))

    # Exact attention over the deterministic set.
    with stage("attend"):
        det_out, det_lse = ops.sparse_attention(q, k, v, det_idx, None, det_counts, scale,
                                                cfg.num_splits, block_table=block_table)

    with stage("pilot"):
        pilot_idx, _, pilot_counts = ops.sample_residual(
            heavy_idx, starts_rows, ends_rows, pilot_wanted, rng,
            pilot_max, ops.PILOT_DRAWS)
        pilot_max_logit, moments, vector_moments = ops.pilot_stats(
            q, k, v, pilot_idx.view(batch, list_heads, pilot_max),
            pilot_counts.view(batch, list_heads), scale, block_table=block_table)

    # Budget per query head, then per list (max over the heads that share it).
    with stage("budget"):
        dispersion = None
        if cfg.tail == "chi2":
            # The terms' spread needs O^, known only after the pilot: a second read of the
            # pilot's rows (the rows stay few: p = base_rate).
            center = ops.residual_center(det_out, det_lse, pilot_max_logit, moments,
                                         vector_moments, pilot_counts, n_residual)
            dispersion = ops.pilot_dispersion(
                q, k, v, pilot_idx.view(batch, list_heads, pilot_max),
                pilot_counts.view(batch, list_heads), scale, center, block_table=block_table)
        # One op (budget.h): the rule's budget per head (NaN where the pilot read a NaN,
        # whatever the rule, so that the NaN reaches the output), the exact fallback (a
        # pilot that enumerated its residual, or a NaN budget), min_samples, the max over
        # a list's heads, and the pilot draws the final sample tops up.
        final_wanted, reused, exact_lists, required, n_residual_heads = (
            budget_rules.plan_fixed_budget(det_out, det_lse, pilot_max_logit, moments,
                                           vector_moments, pilot_counts, n_residual, cfg.rule,
                                           cfg.epsilon, cfg.delta, cfg.min_samples,
                                           cfg.reuse_pilot, dispersion))
        if return_stats:
            pilot_heads = _per_head(pilot_counts, batch, list_heads, q_heads)
            n_residual_f = n_residual_heads.to(torch.float64)

    reused_counts = reused if cfg.reuse_pilot else None
    out, sample_idx, sample_counts = _sample_and_combine(
        q, k, v, cfg, scale, stage, rng, heavy_idx, starts_rows, ends_rows, final_wanted,
        [(det_out, det_lse)], reused_counts, (pilot_max_logit, moments, vector_moments),
        n_residual_heads, length, block_table)
    if not return_stats:
        return out

    # With reuse the estimate's draws are the pilot's and the final sample's together.
    draws = sample_counts if reused_counts is None else reused_counts + sample_counts
    sampled_heads = _per_head(draws.to(torch.int32), batch, list_heads, q_heads)
    exact = _per_head(exact_lists, batch, list_heads, q_heads)
    read = torch.zeros(batch * list_heads, length + 1, dtype=torch.bool, device=device)
    for idx in (_within_count(pilot_idx, pilot_counts), _within_count(sample_idx, sample_counts)):
        read.scatter_(1, torch.where(idx >= 0, idx, length).to(torch.int64), True)
    sampled_rows_read = read[:, :length].sum(dim=1)
    if not union:
        heavy_lists = heavy[:, None].expand(-1, list_heads)
    deterministic = (sink + local)[:, None] + heavy_lists                  # [B, lists]
    rows_read = deterministic + sampled_rows_read.view(batch, list_heads)
    density = rows_read.to(torch.float32) / lengths.clamp(min=1)[:, None].to(torch.float32)
    achieved = torch.where(
        exact | (n_residual_f == 0), torch.zeros_like(required),
        cfg.epsilon * torch.sqrt(required / sampled_heads.to(torch.float64).clamp(min=1.0)))
    # The chi-square tail's pilot_dispersion reads the pilot's rows a second time.
    pilot_reads, pilot_read_counts = pilot_idx, pilot_counts
    if cfg.tail == "chi2":
        valid = _within_count(pilot_idx, pilot_counts)
        pilot_reads = torch.cat([valid, valid], dim=1)
        pilot_read_counts = torch.full_like(pilot_counts, 2 * pilot_max)
    relative_bytes = _relative_bytes(cfg, k, lengths, heavy_max, det_idx, det_counts,
                                     (pilot_reads, pilot_read_counts),
                                     (sample_idx, sample_counts), list_heads, q_heads)
    stats = {
        "relative_bytes": relative_bytes,
        "budget": sampled_heads,
        "required": required,
        "pilot": pilot_heads,
        "density": _per_head(density, batch, list_heads, q_heads),
        "exact": exact,
        "n_residual": n_residual_heads,
        "deterministic": _per_head(deterministic, batch, list_heads, q_heads),
        "error_bound": achieved,
        "heavy_indices": heavy_idx.view(batch, list_heads, heavy_width),
    }
    return out, stats


def _decode_dense(q, k, v, cfg, scale, stage, return_stats, lengths, det_idx, det_counts,
                  list_heads, block_table):
    """decode where every row is dense (N <= cfg.dense_below): one exact attention over
    plan_lists' lists, each row's [0, n), and the cast; no selection, pilot or sample.
    The stats are those the full path gives a dense row (exact, budget 0, density 1)."""
    batch, q_heads, _ = q.shape
    with stage("attend"):
        det_out, _ = ops.sparse_attention(q, k, v, det_idx, None, det_counts, scale,
                                          cfg.num_splits, block_table=block_table)
    with stage("combine"):
        out = det_out.to(q.dtype)
    if not return_stats:
        return out
    device, rows = q.device, batch * list_heads
    heads = (batch, q_heads)
    nothing = (torch.empty((rows, 0), dtype=torch.int32, device=device),
               torch.zeros(rows, dtype=torch.int32, device=device))
    n = lengths[:, None].expand(heads)
    return out, {
        "relative_bytes": _relative_bytes(cfg, k, lengths, 0, det_idx, det_counts, nothing,
                                          nothing, list_heads, q_heads),
        "budget": torch.zeros(heads, dtype=torch.int32, device=device),
        "required": torch.zeros(heads, dtype=torch.float64, device=device),
        "pilot": torch.zeros(heads, dtype=torch.int32, device=device),
        "density": (n > 0).to(torch.float32),
        "exact": torch.ones(heads, dtype=torch.bool, device=device),
        "n_residual": torch.zeros(heads, dtype=torch.int64, device=device),
        "deterministic": n.clone(),
        "error_bound": torch.zeros(heads, dtype=torch.float64, device=device),
        "heavy_indices": torch.empty((batch, list_heads, 0), dtype=torch.int32,
                                     device=device),
    }


def _within_count(indices: Tensor, counts: Tensor) -> Tensor:
    """indices [rows, W] with the entries at or beyond each row's count set to -1."""
    slots = torch.arange(indices.shape[1], device=indices.device)
    return torch.where(slots[None, :] < counts.reshape(-1, 1), indices, -1)


def _decode_adaptive(q, k, v, cfg, lengths, rng, scale, key_summary, stage, return_stats,
                     fixed, pilot_max, list_heads, starts_rows, ends_rows, block_table):
    """decode with cfg.heavy_sizes: per list the heavy size of heavy_size.plan's choice.

    Kernels: one select_topk per candidate; exact attention over the fixed set and T_0; one
    pilot from R_0, its statistics by band (every pilot row read once); the budgets of all
    candidates (budget.required_samples, so cfg's rule and tail apply); then exact attention
    over T_chosen minus T_0, the final sample from R_chosen topping up the pilot draws that
    lie in R_chosen (reuse_pilot), and one combine."""
    batch, q_heads, _ = q.shape
    length = kv_length(k, block_table)
    device = q.device
    group = q_heads // list_heads
    rows = batch * list_heads
    # plan_lists' deterministic list: the fixed part, bounds[0] heavy columns (T_0 goes
    # there), the dense rows' extra columns; det_counts what each list's kernel reads.
    sink, local, det_idx, det_counts = fixed
    window_start, window_end = sink, lengths - local
    window = window_end - window_start
    counts, bounds = heavy_size.candidate_sizes(cfg.heavy_sizes, lengths, window, length)
    top_max = bounds[-1]

    if top_max > 0:
        with stage("select_scores"):
            scores = select_scores(q, k, lengths, scale, cfg.share_gqa, cfg.selector,
                                   key_summary, block_table=block_table).reshape(rows, length)
        with stage("select_topk"):
            candidates = [ops.select_topk(scores, starts_rows, ends_rows,
                                          _per_list(m, list_heads), bound)
                          for m, bound in zip(counts, bounds)]
    else:
        candidates = [torch.empty((rows, 0), dtype=torch.int32, device=device)
                      for _ in bounds]
    padded = torch.stack([torch.nn.functional.pad(c, (0, top_max - c.shape[1]), value=-1)
                          for c in candidates])                            # [C, rows, top_max]
    heavy_c = torch.stack(counts)[:, :, None].expand(-1, -1, list_heads)    # [C, B, Hl]
    n_residual_c = window[None, :, None] - heavy_c                         # [C, B, Hl]

    fixed_width = resolve_size(cfg.sink, length) + resolve_size(cfg.local, length)
    if bounds[0] > 0:
        det_idx[:, :, fixed_width:fixed_width + bounds[0]].copy_(
            candidates[0].view(batch, list_heads, bounds[0]))
    with stage("attend"):
        det_out, det_lse = ops.sparse_attention(q, k, v, det_idx, None, det_counts, scale,
                                                cfg.num_splits, block_table=block_table)

    n_r0 = n_residual_c[0].reshape(-1)
    pilot_wanted = torch.where(n_r0 > 0, resolve_sizes(cfg.base_rate, n_r0).clamp(min=2),
                               torch.zeros_like(n_r0))
    with stage("pilot"):
        pilot_idx, _, pilot_counts = ops.sample_residual(
            candidates[0], starts_rows, ends_rows, pilot_wanted.to(torch.int32), rng,
            pilot_max, ops.PILOT_DRAWS)
        pilot_idx = _within_count(pilot_idx, pilot_counts)
        depth = heavy_size.pilot_depth(pilot_idx, pilot_idx >= 0, list(padded), length)
        full_counts = torch.full((batch, list_heads), pilot_max, dtype=torch.int32,
                                 device=device)
        bands = [ops.pilot_stats(q, k, v, torch.where(depth == band, pilot_idx, -1).view(
                     batch, list_heads, pilot_max), full_counts, scale, block_table=block_table)
                 for band in range(1, len(bounds) + 1)]
        max_logit_c, moments_c, vector_c = heavy_size.merge_bands(bands)
        p_lists = torch.stack([(depth > c).sum(dim=1) for c in range(len(bounds))])
        p_c = torch.stack([_per_head(p, batch, list_heads, q_heads) for p in p_lists])

    with stage("budget"):
        n_residual_heads = torch.stack([_per_head(n, batch, list_heads, q_heads)
                                        for n in n_residual_c])         # [C, B, Hq]
        estimate = heavy_size.candidate_estimate(det_out, det_lse, max_logit_c, moments_c,
                                                 vector_c, p_c, n_residual_heads)
        effective_dim = None
        extra_pilot_reads = []
        if cfg.tail == "chi2":
            # One effective dimension from all the pilot's draws (R_0's), for every candidate:
            # one re-read of the pilot's rows, not one per candidate. The draws in T_c \ T_0
            # are the heaviest and concentrate the spread, so R_0's h is the smaller one.
            center = estimate.o_hat[0].to(torch.float32).contiguous()
            extra_pilot_reads.append(pilot_idx)
            effective_dim = budget_rules.effective_dimension(ops.pilot_dispersion(
                q, k, v, pilot_idx.view(batch, list_heads, pilot_max), full_counts, scale,
                center, block_table=block_table))[None].expand(len(bounds), -1, -1)
        required = budget_rules.required_samples(cfg.rule, estimate, n_residual_heads, p_c,
                                                 cfg.epsilon, cfg.delta,
                                                 effective_dim=effective_dim)
        # A NaN any pilot draw read reaches Z^ / O^ and so every candidate (see decode).
        pilot_nan = torch.zeros_like(required[0], dtype=torch.bool)
        for band_max, band_moments, band_vector in bands:
            pilot_nan = (pilot_nan | torch.isnan(band_max) | torch.isnan(band_moments).any(-1)
                         | torch.isnan(band_vector).flatten(-2).any(-1))
        required = torch.where(pilot_nan[None], torch.full_like(required, math.nan), required)
        wanted_c, exact_c, choice = heavy_size.plan(required, p_c, n_residual_heads, heavy_c,
                                                    cfg.min_samples, cfg.reuse_pilot, group)
        choice_heads = _per_head(choice, batch, list_heads, q_heads)
        lists_range = torch.arange(rows, device=device)
        heavy_idx = padded[choice, lists_range]                              # [rows, top_max]
        wanted_lists = wanted_c[choice, lists_range]
        exact_lists = exact_c[choice, lists_range]
        reused = torch.where(exact_lists | (not cfg.reuse_pilot),
                             torch.zeros_like(pilot_counts),
                             p_lists[choice, lists_range].to(pilot_counts.dtype))
        final_wanted = torch.where(exact_lists, wanted_lists,
                                   (wanted_lists - reused.to(torch.float64)).clamp(min=0.0))
        required = heavy_size.pick(required, choice_heads)
        n_residual_heads = heavy_size.pick(n_residual_heads, choice_heads)

    # T_chosen minus T_0, exactly (T_0 is in det_out already).
    extra_idx = torch.where(heavy_size.members(heavy_idx, candidates[0], length), -1,
                            heavy_idx).to(torch.int32)
    extra_counts = torch.full((batch, list_heads), top_max, dtype=torch.int32, device=device)
    partials = [(det_out, det_lse)]
    if top_max > bounds[0]:
        with stage("attend"):
            partials.append(ops.sparse_attention(q, k, v, extra_idx.view(batch, list_heads,
                                                                         top_max),
                                                 None, extra_counts, scale, cfg.num_splits,
                                                 block_table=block_table))
    pilot_stats_chosen = (heavy_size.pick(max_logit_c, choice_heads).to(torch.float32),
                          heavy_size.pick(moments_c, choice_heads),
                          heavy_size.pick(vector_c, choice_heads))
    out, sample_idx, sample_counts = _sample_and_combine(
        q, k, v, cfg, scale, stage, rng, heavy_idx, starts_rows, ends_rows, final_wanted,
        partials, reused if cfg.reuse_pilot else None, pilot_stats_chosen, n_residual_heads,
        length, block_table)
    if not return_stats:
        return out

    draws = sample_counts + reused if cfg.reuse_pilot else sample_counts
    sampled_heads = _per_head(draws.to(torch.int32), batch, list_heads, q_heads)
    exact = _per_head(exact_lists, batch, list_heads, q_heads)
    n_residual_f = n_residual_heads.to(torch.float64)
    sample_read = _within_count(sample_idx, sample_counts)
    read = torch.zeros(rows, length + 1, dtype=torch.bool, device=device)
    for idx in (det_idx.view(rows, -1), extra_idx, pilot_idx, sample_read):
        read.scatter_(1, torch.where(idx >= 0, idx, length).to(torch.int64), True)
    rows_read = read[:, :length].sum(dim=1).view(batch, list_heads)
    density = rows_read.to(torch.float32) / lengths.clamp(min=1)[:, None].to(torch.float32)
    heavy_lists = torch.stack(counts)[choice.view(batch, list_heads),
                                      torch.arange(batch, device=device)[:, None]]
    deterministic = (sink + local)[:, None] + heavy_lists                  # [B, lists]
    achieved = torch.where(
        exact | (n_residual_f == 0), torch.zeros_like(required),
        cfg.epsilon * torch.sqrt(required / sampled_heads.to(torch.float64).clamp(min=1.0)))
    # Every row a kernel loads: the fixed set and T_0, T_chosen minus T_0 (when that launch
    # runs), each band's pilot rows (once in all), the chi-square tail's re-reads, the sample.
    loaded = [det_idx.view(rows, -1)] + ([extra_idx] if top_max > bounds[0] else [])
    pilot_loaded = torch.cat([pilot_idx] + extra_pilot_reads, dim=1)
    relative_bytes = _relative_bytes(
        cfg, k, lengths, top_max, torch.cat(loaded, dim=1),
        torch.full((rows,), sum(t.shape[1] for t in loaded), dtype=torch.int32, device=device),
        (pilot_loaded, torch.full((rows,), pilot_loaded.shape[1], dtype=torch.int32,
                                  device=device)),
        (sample_idx, sample_counts), list_heads, q_heads)
    return out, {
        "relative_bytes": relative_bytes,
        "budget": sampled_heads,
        "required": required,
        "pilot": _per_head(pilot_counts, batch, list_heads, q_heads),
        "density": _per_head(density, batch, list_heads, q_heads),
        "exact": exact,
        "n_residual": n_residual_heads,
        "deterministic": _per_head(deterministic, batch, list_heads, q_heads),
        "error_bound": achieved,
        "heavy_indices": heavy_idx.view(batch, list_heads, top_max),
    }


def _sample_and_combine(q, k, v, cfg, scale, stage, rng, heavy_idx, starts_rows, ends_rows,
                        final_wanted, partials, reused, pilot_stats, n_residual_heads, length,
                        block_table):
    """The final sample of the residual, its attention, and the combine of every partial:
    partials (the exact parts), then with reuse_pilot the reused pilot draws (reused [lists]
    counts; pilot_stats: their max_logit, moments, vector_moments per head) and the sample.
    Returns (out in q's dtype, sample indices, sample counts); the estimate's draws are
    reused + counts (counts without reuse), which only the stats compute."""
    batch, q_heads, _ = q.shape
    list_heads = heavy_idx.shape[0] // batch
    sample_max = max(length, 1)
    with stage("sample"):
        sample_idx, sample_log_weights, sample_counts = ops.sample_residual(
            heavy_idx, starts_rows, ends_rows, final_wanted.to(torch.int32), rng,
            sample_max, ops.FINAL_DRAWS)
    with stage("attend"):
        # The split partials, unmerged: merge_estimate merges them with the rest (one
        # kernel fewer than sparse_attention's gather + combine).
        sample_out, sample_lse = ops.sparse_attention_partials(
            q, k, v, sample_idx.view(batch, list_heads, sample_max),
            sample_log_weights.view(batch, list_heads, sample_max),
            sample_counts.view(batch, list_heads), scale, cfg.num_splits,
            block_table=block_table)
    with stage("combine"):
        # One op (combine.h): the exact partials, then with reuse_pilot the reused pilot's
        # partial from its statistics (so no kernel loads a pilot row twice; every draw,
        # pilot or final, weighs n_r / (p + d)) and the sample's split partials, merged and
        # reweighted to their share of the p + d draws; merged by online_softmax.h's rule
        # and cast to q's dtype.
        max_logit, moments, vector_moments = pilot_stats
        out, _ = ops.merge_estimate(partials[0][0], partials[0][1],
                                    partials[1] if len(partials) > 1 else None,
                                    sample_out, sample_lse, sample_counts, reused, max_logit,
                                    moments, vector_moments, n_residual_heads, q.dtype)
    return out, sample_idx, sample_counts


def _merge_heavy(heavy: Tensor, length: int) -> Tensor:
    """Union of the heads' heavy lists of each shared list: [lists, group x heavy] int32,
    each list ascending and without duplicates, -1 after the valid entries (sample.h's
    residual_position counts heavy[j] - start - j non-heavy tokens before heavy[j], which a
    duplicate would miscount). Two sorts of static shape: no host sync, capturable."""
    sentinel = length                           # above every position: sorts after them
    merged = torch.where(heavy >= 0, heavy, sentinel).sort(dim=1).values
    repeat = torch.zeros_like(merged, dtype=torch.bool)
    repeat[:, 1:] = merged[:, 1:] == merged[:, :-1]
    merged = torch.where(repeat, sentinel, merged).sort(dim=1).values
    return torch.where(merged == sentinel, -1, merged).to(torch.int32)


def _valid_entries(indices: Tensor, counts: Tensor) -> Tensor:
    """Entries each list's kernel loads: the first `count`, skipping -1 padding. [rows]"""
    return (_within_count(indices.reshape(counts.numel(), -1), counts) >= 0).sum(dim=1)


def _relative_bytes(cfg: VAttentionConfig, k: Tensor, lengths: Tensor, heavy_max: int,
                    det_idx: Tensor, det_counts: Tensor, pilot, sample, list_heads: int,
                    q_heads: int) -> Tensor:
    """stats["relative_bytes"] [B, Hq] float32 (docs/api.md): the bytes this step's kernels
    read for the head's KV group over dense attention's bytes for that group.

    Dense reads K and V of every valid token once per group: 2 n D elem. The selector
    reads, once per group, all n valid K rows (oracle: n D elem) or their summaries
    (int4: n summary_bytes_per_token; int3_channel: n codes and the parameters of the
    ceil(n / 64) blocks, key_summary.summary_bytes); it does not run when no row has a
    heavy hitter. Each attention / pilot list loads the K and V rows of its valid entries
    (2 D elem each), a duplicate or a row also in another kernel's list counting again; a
    list shared by the group counts once for the group, per-head lists each count for it."""
    # k: the cache or its pool (paged): only its heads, head dim and element size count.
    batch, kv_heads, dim = lengths.shape[0], k.shape[1], k.shape[3]
    elem = k.element_size()
    group_lists = list_heads // kv_heads                    # lists per KV group: 1 or group
    rows = _valid_entries(det_idx, det_counts)
    for indices, counts in (pilot, sample):
        rows = rows + _valid_entries(indices, counts)
    rows = rows.view(batch, kv_heads, group_lists).sum(dim=2).to(torch.float64)
    n = lengths.to(torch.float64)[:, None]
    if heavy_max == 0:
        selector_bytes = torch.zeros_like(n)
    elif cfg.selector in SUMMARY_FORMATS:
        selector_bytes = summary_bytes(n, dim, cfg.selector)
    else:
        selector_bytes = n * (dim * elem)
    read = selector_bytes + rows * (2 * dim * elem)
    dense_bytes = n * (2 * dim * elem)
    relative = torch.where(n > 0, read / dense_bytes.clamp(min=1.0), torch.zeros_like(read))
    return relative.to(torch.float32).repeat_interleave(q_heads // kv_heads, dim=1)
