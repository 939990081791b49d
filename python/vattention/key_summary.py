"""Key summaries: a low-bit copy of K kept beside the KV cache, scored by a cheap selector
instead of K. Two formats, each named like the selector that scores it:

"int4" (csrc/vattention/key_summary.h has the exact layout and rounding):
Per token and KV head, channel group g of 32 channels keeps a zero z_g and a step s_g
(fp16) and one 4-bit code per channel; the dequantised key is K~_d = z_g + s_g * code_d.
A token costs D / 2 + 4 D / 32 bytes (80 at D = 128), 0.156 of the K and V rows of a
16-bit cache, where the oracle selector reads K itself (0.5).

The summary is built once at prefill (`build_key_summary`) and kept in step with the cache
as decode appends tokens (`update_key_summary`, in place); both run the summarize_keys op
where it supports the inputs, else the plain-torch reference `summarize_keys_torch`, which
writes the same bytes. A paged cache (decode's block_table) keeps a paged int4 summary
(KeySummary.paged): per physical block like the pool, read and written through the same
block table.

"int3_channel" (KIVI-style per-channel quantisation): 3-bit codes, with a zero and a step per
channel and block of 64 consecutive tokens (fp16), quantising each channel over the block's
tokens instead of each token over its channels. Keys have outlier channels (large offsets
and ranges that differ per channel); a per-token group spends its levels on the outlier,
a per-channel block does not. A token costs 3 D / 8 + 4 D / 64 bytes (0.109 of a 16-bit
cache's K and V rows, against int4's 0.156), and on captured real attention its top-5% keeps
as much of the oracle's mass as int4 (benchmarks/study_summaries.py, mass recall mean and
min over heads: 0.992 and 0.88 on SmolLM2 7K, 0.991-0.994 and 0.955-0.984 on Gemma-3's global
layers at 16-32K, against int4's 0.995 and 0.87, 0.983-0.989 and 0.91-0.965). Layout:
  codes  [B, Hkv, N, 3 D / 8] uint8: bytes [0, D / 4) hold the codes' low two bits (channel
         4j + t at bits 2t..2t+1 of byte j), bytes [D / 4, 3 D / 8) their high bit (channel
         8j + t at bit t of byte D / 4 + j);
  params [B, Hkv, ceil(N / 64), D, 2] fp16: (zero, step) of channel d over block j's tokens.
Over the valid tokens x_i of block j (those below the summarised length; a NaN propagates):
  z = fp16_rn(min_i x_i), s = fp16_rn((max_i x_i - float(z)) / 7),
  code_i = 0 if s == 0, else clamp(rint((x_i - z) / s), 0, 7); K~_i = z + s * code_i.
A token's code depends on the other tokens of its block, so an update re-summarises every
block the new tokens touch from the cache's keys (`update_key_summary(..., k_cache=...)`):
reading up to 64 K rows per appended token (a write-time cost, like the build: a decode
step's scoring reads the summary only), and the summary stays byte-equal to a rebuild of
the cache. A NaN key makes its block's channel NaN: the whole block scores NaN and is
selected first, so the NaN row still reaches the output. This format has no kernel yet: it
is built, updated and scored (dequantised, then select_scores_torch) in plain torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from . import ops
from .config import KERNEL_DTYPES
from .paged import check_table

Tensor = torch.Tensor

GROUP = 32    # channels per (zero, step) pair (kSummaryGroup)
LEVELS = 15   # codes 0..15 (kSummaryLevels)
CHANNEL_BLOCK = 64   # "int3_channel": tokens per (zero, step) of a channel
CHANNEL_LEVELS = 7   # "int3_channel": codes 0..7
FORMATS = ("int4", "int3_channel")


def summary_bytes_per_token(head_dim: int, format: str = "int4") -> float:
    """Bytes of one token's summary (per KV head) for head dim `head_dim`: int4's exact
    count; int3_channel's codes plus its per-block parameters amortised over the block."""
    _check_format(format)
    if format == "int3_channel":
        return 3 * head_dim / 8 + 4 * head_dim / CHANNEL_BLOCK
    return head_dim // 2 + 4 * (head_dim // GROUP)


def summary_bytes(tokens: Tensor, head_dim: int, format: str = "int4") -> Tensor:
    """Bytes a selector reads to score `tokens` (a tensor of counts) of one KV head: the
    codes of every token and, for int3_channel, the parameters of every block they touch."""
    _check_format(format)
    if format == "int3_channel":
        blocks = torch.div(tokens + CHANNEL_BLOCK - 1, CHANNEL_BLOCK, rounding_mode="floor")
        return tokens * (3 * head_dim // 8) + blocks * (4 * head_dim)
    return tokens * summary_bytes_per_token(head_dim)


def _check_format(format) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")


def _blocks(length: int) -> int:
    return (length + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK


@dataclass
class KeySummary:
    """format "int4": codes [B, Hkv, N, D / 2] uint8 (channel 2j in the low nibble of byte j)
    and params [B, Hkv, N, D / 32, 2] fp16 (zero, step) of every channel group.
    format "int3_channel": codes [B, Hkv, N, 3 D / 8] uint8 and params
    [B, Hkv, ceil(N / 64), D, 2] fp16 (zero, step) of every channel and block of 64 tokens
    (the module's docstring has the bit layout).

    paged (int4 only): the summary of a paged cache, kept per physical block like the cache:
    codes [num_blocks, Hkv, block_size, D / 2] and params [num_blocks, Hkv, block_size,
    D / 32, 2], read through the cache's block table (the same bytes per token). `length` is
    then the block size."""

    codes: Tensor
    params: Tensor
    format: str = "int4"
    paged: bool = False

    @property
    def head_dim(self) -> int:
        if self.format == "int3_channel":
            return self.codes.shape[-1] * 8 // 3
        return 2 * self.codes.shape[-1]

    @property
    def length(self) -> int:
        return self.codes.shape[2]

    @property
    def bytes_per_token(self) -> float:
        """Summary bytes of one token of one KV head, as it sits in the cache (int3_channel:
        its block parameters amortised over the block's 64 tokens)."""
        return summary_bytes_per_token(self.head_dim, self.format)

    def check(self, batch: int, kv_heads: int, length: int, head_dim: int,
              device: torch.device, name: str = "key_summary", format: str = None,
              pool: Optional[Tuple[int, int]] = None) -> None:
        """Raises a ValueError naming `name` unless this summarises such a K (in `format`,
        when given: the selector that will score it). pool: (num_blocks, block_size) of a
        paged cache, whose summary must then be a paged one of that pool (batch and length
        are the logical ones and are not checked against it); None: a contiguous cache."""
        if self.format not in FORMATS:
            raise ValueError(f"{name}.format must be one of {FORMATS}, got {self.format!r}")
        if format is not None and self.format != format:
            raise ValueError(f"{name} is an {self.format!r} summary; selector {format!r} "
                             f"needs a {format!r} one")
        if pool is not None and not self.paged:
            raise ValueError(f"{name} is not paged but the cache is (block_table given): build "
                             f"it over the pool with build_key_summary(k, block_table=...)")
        if pool is None and self.paged:
            raise ValueError(f"{name} is paged (one row per pool slot): pass the cache's "
                             f"block_table, or a contiguous summary for a contiguous cache")
        if self.paged and self.format != "int4":
            raise ValueError(f"{name}: only an 'int4' summary can be paged, got {self.format!r}")
        if pool is not None:
            batch, length = pool
        codes, params = self.codes, self.params
        channel = self.format == "int3_channel"
        code_shape = "3 head_dim / 8" if channel else "head_dim / 2"
        if self.paged:
            rows, param_rows = "num_blocks, kv_heads, block_size", "block_size, head_dim / 32, 2"
        else:
            rows = "batch, kv_heads, length"
            param_rows = ("ceil(length / 64), head_dim, 2" if channel
                          else "length, head_dim / 32, 2")
        if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.dim() != 4:
            raise ValueError(f"{name}.codes must be a uint8 tensor [{rows}, {code_shape}], "
                             f"got {_describe(codes)}")
        if not isinstance(params, Tensor) or params.dtype != torch.float16 or params.dim() != 5:
            raise ValueError(f"{name}.params must be a float16 tensor "
                             f"[{rows.rsplit(', ', 1)[0]}, {param_rows}], got {_describe(params)}")
        if channel:
            want_codes = (batch, kv_heads, length, 3 * head_dim // 8)
            want_params = (batch, kv_heads, _blocks(length), head_dim, 2)
        else:
            want_codes = (batch, kv_heads, length, head_dim // 2)
            want_params = (batch, kv_heads, length, head_dim // GROUP, 2)
        of = "k's pool" if self.paged else "k"
        if tuple(codes.shape) != want_codes:
            raise ValueError(f"{name}.codes must have shape {want_codes} for {of}, got "
                             f"{tuple(codes.shape)}")
        if tuple(params.shape) != want_params:
            raise ValueError(f"{name}.params must have shape {want_params} for {of}, got "
                             f"{tuple(params.shape)}")
        if codes.device != device or params.device != device:
            raise ValueError(f"{name} must be on {device}, got {codes.device} and {params.device}")


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} {tuple(t.shape)}"
    return type(t).__name__


def _check_head_dim(head_dim: int, format: str = "int4") -> None:
    multiple = 8 if format == "int3_channel" else GROUP
    if head_dim <= 0 or head_dim % multiple != 0:
        raise ValueError(f"the {format} key summary needs a head_dim that is a multiple of "
                         f"{multiple}, got {head_dim} (VAttentionConfig(selector=\"oracle\") takes any head_dim)")


def _check_k(k, name: str = "k", format: str = "int4") -> None:
    if not isinstance(k, Tensor) or k.dim() != 4 or not k.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [batch, kv_heads, rows, "
                         f"head_dim], got {_describe(k)}")
    _check_head_dim(k.shape[-1], format)


def empty_key_summary(batch: int, kv_heads: int, length: int, head_dim: int,
                      device=None, format: str = "int4", paged: bool = False) -> KeySummary:
    """An uninitialised summary of `length` tokens (a cache's capacity), to fill in place.
    paged: the summary of a paged cache's pool, `batch` its num_blocks and `length` its
    block_size (int4 only): a side buffer kept per physical block beside the cache."""
    _check_format(format)
    _check_head_dim(head_dim, format)
    if paged and format != "int4":
        raise ValueError(f"only an 'int4' summary can be paged, got format {format!r}")
    if format == "int3_channel":
        return KeySummary(
            torch.empty(batch, kv_heads, length, 3 * head_dim // 8, dtype=torch.uint8,
                        device=device),
            torch.empty(batch, kv_heads, _blocks(length), head_dim, 2, dtype=torch.float16,
                        device=device), format)
    return KeySummary(
        torch.empty(batch, kv_heads, length, head_dim // 2, dtype=torch.uint8, device=device),
        torch.empty(batch, kv_heads, length, head_dim // GROUP, 2, dtype=torch.float16,
                    device=device), paged=paged)


def _op_supports(k: Tensor, summary: KeySummary) -> bool:
    device = k.device
    if k.dtype not in KERNEL_DTYPES or k.stride(-1) != 1:
        return False
    if device.type == "cpu":
        return True
    return (device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(
        "vattention::summarize_keys", "CUDA"))


def build_key_summary(k: Tensor, format: str = "int4", lengths: Optional[Tensor] = None,
                      block_table: Optional[Tensor] = None) -> KeySummary:
    """The summary of every row of k [B, Hkv, N, D] (prefill). lengths ([B], optional):
    batch row b's valid rows; int3_channel leaves the rows beyond it out of its block
    parameters (int4 summarises each row alone, so it needs none).

    block_table (int32 [B, max_blocks]): k is a paged cache's pool [num_blocks, Hkv,
    block_size, D] (any strides) and the result a paged summary of every slot of the pool
    (int4 only; lengths unused). An int4 row's summary depends on that row alone, so the
    pool is summarised as it lies, blocks as batch rows: the table changes nothing but the
    reading, and a slot the table does not reach costs a few bytes and is never scored."""
    _check_format(format)
    _check_k(k, format=format)
    if block_table is not None:
        if format != "int4":
            raise ValueError(f"only an 'int4' summary can be paged (block_table given), got "
                             f"format {format!r}")
        check_table(block_table, k.device, "k")
    if format == "int3_channel":
        return summarize_keys_torch(k, format, lengths)
    batch, kv_heads, length, dim = k.shape
    summary = empty_key_summary(batch, kv_heads, length, dim, device=k.device)
    update_key_summary(summary, k, 0)
    summary.paged = block_table is not None
    return summary


def update_key_summary(summary: KeySummary, k_new: Tensor, row_begin: Union[int, Tensor],
                       block_table: Optional[Tensor] = None, *,
                       k_cache: Optional[Tensor] = None) -> None:
    """Writes the summary of k_new [B, Hkv, rows, D] into positions row_begin[b] + [0, rows)
    of `summary`, in place (decode: the appended tokens). Positions at or beyond the
    summary's length are skipped. row_begin: an int for every row, or an int64 [B] tensor on
    k_new's device (int4: no host sync).

    block_table (int32 [B, max_blocks], on k_new's device): `summary` is a paged one
    (build_key_summary(pool, block_table=...) or empty_key_summary(..., paged=True)) and
    logical position p of batch row b is written at slot p % block_size of block
    block_table[b, p // block_size]; positions at or beyond max_blocks * block_size are
    skipped. k_new stays contiguous rows [B, Hkv, rows, D] (the new tokens' keys).

    int3_channel needs k_cache [B, Hkv, >= row_begin + rows, D], the cache's keys with k_new
    already at those rows: every block the new rows touch is re-summarised from k_cache's
    rows [block start, row_begin[b] + rows), rows beyond that are left out (they are not the
    cache's yet). int4 ignores k_cache."""
    _check_k(k_new, "k_new", summary.format if summary.format in FORMATS else "int4")
    batch, kv_heads, _, dim = k_new.shape
    if block_table is not None:
        check_table(block_table, k_new.device, "k_new")
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table has batch {block_table.shape[0]} but k_new has "
                             f"{batch}")
        pool = (summary.codes.shape[0], summary.codes.shape[2])
        summary.check(batch, kv_heads, 0, dim, k_new.device, "summary", pool=pool)
    else:
        summary.check(batch, kv_heads, summary.length, dim, k_new.device, "summary")
    if isinstance(row_begin, Tensor):
        if row_begin.dtype != torch.int64 or tuple(row_begin.shape) != (batch,):
            raise ValueError(f"row_begin must be an int64 tensor [{batch}], got "
                             f"{_describe(row_begin)}")
        if row_begin.device != k_new.device:
            raise ValueError(f"row_begin must be on {k_new.device}, got {row_begin.device}")
    else:
        if isinstance(row_begin, bool) or not isinstance(row_begin, int) or row_begin < 0:
            raise ValueError(f"row_begin must be an int >= 0 or an int64 tensor, got {row_begin!r}")
        row_begin = torch.full((batch,), row_begin, dtype=torch.int64, device=k_new.device)
    if summary.format == "int3_channel":
        if (not isinstance(k_cache, Tensor) or k_cache.dim() != 4
                or tuple(k_cache.shape[:2]) != (batch, kv_heads) or k_cache.shape[3] != dim
                or k_cache.device != k_new.device or not k_cache.is_floating_point()):
            raise ValueError(f"k_cache must be the cache's keys, a floating-point tensor "
                             f"[{batch}, {kv_heads}, rows, {dim}] on {k_new.device}, for an "
                             f"int3_channel summary (its blocks are re-summarised from the "
                             f"cache), got {_describe(k_cache)}")
        _update_channel_torch(summary, k_cache, row_begin, k_new.shape[2])
        return
    if _op_supports(k_new, summary):
        ops.summarize_keys(k_new, summary.codes, summary.params, row_begin,
                           block_table=block_table)
        return
    if block_table is not None:
        _update_paged_torch(summary, k_new, row_begin, block_table)
        return
    _update_torch(summary, k_new, row_begin)


def _update_torch(summary: KeySummary, k_new: Tensor, row_begin: Tensor) -> None:
    fresh = summarize_keys_torch(k_new)
    rows, length = k_new.shape[2], summary.length
    positions = row_begin.to(summary.codes.device)[:, None] + torch.arange(
        rows, device=summary.codes.device)[None, :]                     # [B, rows]
    for b in range(k_new.shape[0]):
        keep = (positions[b] >= 0) & (positions[b] < length)
        pos = positions[b][keep]
        summary.codes[b, :, pos] = fresh.codes[b][:, keep]
        summary.params[b, :, pos] = fresh.params[b][:, keep]


def _update_paged_torch(summary: KeySummary, k_new: Tensor, row_begin: Tensor,
                        block_table: Tensor) -> None:
    """_update_torch through a block table: position p of batch row b at (block_table[b,
    p // block_size], p % block_size); positions outside [0, max_blocks * block_size) skipped."""
    fresh = summarize_keys_torch(k_new)
    batch, _, rows, _ = k_new.shape
    block_size = summary.codes.shape[2]
    device = summary.codes.device
    positions = row_begin.to(device)[:, None] + torch.arange(rows, device=device)[None, :]
    keep = (positions >= 0) & (positions < block_table.shape[1] * block_size)   # [B, rows]
    safe = torch.where(keep, positions, 0)
    blocks = torch.gather(block_table.to(device).long(), 1, safe // block_size)[keep]
    slots = (safe % block_size)[keep]
    # [B, H, rows, ...] -> [B, rows, H, ...], then the kept (b, row) pairs in row-major order,
    # the order of blocks / slots.
    summary.codes[blocks, :, slots] = fresh.codes.transpose(1, 2)[keep]
    summary.params[blocks, :, slots] = fresh.params.transpose(1, 2)[keep]


def _update_channel_torch(summary: KeySummary, k_cache: Tensor, row_begin: Tensor,
                          rows: int) -> None:
    """Re-summarises every block that rows row_begin[b] + [0, rows) touch (int3_channel).
    A host loop over the batch rows: this format has no kernel yet."""
    length = summary.length
    for b, begin in enumerate(row_begin.tolist()):
        end = min(begin + rows, length, k_cache.shape[2])
        begin = max(begin, 0)
        if rows == 0 or begin >= end:
            continue
        first = begin // CHANNEL_BLOCK
        fresh = summarize_keys_torch(k_cache[b:b + 1, :, first * CHANNEL_BLOCK:end],
                                     "int3_channel")
        summary.codes[b, :, first * CHANNEL_BLOCK:end] = fresh.codes[0]
        summary.params[b, :, first:first + fresh.params.shape[2]] = fresh.params[0]


def summarize_keys_torch(k: Tensor, format: str = "int4",
                         lengths: Optional[Tensor] = None) -> KeySummary:
    """Plain-torch reference of the summarize_keys op: the same bytes (key_summary.h).
    format "int3_channel": that format's summary (the module's docstring), rows of batch row
    b at or beyond lengths[b] (when given) left out of the block parameters, their codes 0.

    Every step is a correctly rounded fp32 or fp16 operation as the kernels do it: the
    group min / max (NaN propagates), z = fp16(min), s = fp16((max - z) / 15),
    code = clamp(rint((x - z) / s), 0, 15), 0 where s == 0 or the quotient is NaN."""
    _check_format(format)
    if format == "int3_channel":
        return _summarize_channel_torch(k, lengths)
    _check_k(k)
    batch, kv_heads, length, dim = k.shape
    x = k.float().reshape(batch, kv_heads, length, dim // GROUP, GROUP)
    zero = x.amin(dim=-1).to(torch.float16)
    step = ((x.amax(dim=-1) - zero.float()) / LEVELS).to(torch.float16)
    z, s = zero.float()[..., None], step.float()[..., None]
    level = torch.round((x - z) / s)
    level = torch.where(s == 0, torch.zeros_like(level), level)
    level = torch.nan_to_num(level, nan=0.0).clamp(0, LEVELS).to(torch.uint8)
    level = level.reshape(batch, kv_heads, length, dim // 2, 2)
    codes = level[..., 0] | (level[..., 1] << 4)
    return KeySummary(codes.contiguous(), torch.stack([zero, step], dim=-1).contiguous())


def _summarize_channel_torch(k: Tensor, lengths: Optional[Tensor]) -> KeySummary:
    _check_k(k, format="int3_channel")
    batch, kv_heads, length, dim = k.shape
    blocks = _blocks(length)
    pad = blocks * CHANNEL_BLOCK - length
    x = k.float()
    if pad:
        x = torch.cat([x, x.new_zeros(batch, kv_heads, pad, dim)], dim=2)
    positions = torch.arange(blocks * CHANNEL_BLOCK, device=k.device)
    limit = (torch.full((batch,), length, device=k.device) if lengths is None
             else lengths.to(k.device).clamp(0, length))
    valid = (positions[None, :] < limit[:, None])[:, None, :, None]       # [B, 1, rows, 1]
    x = x.reshape(batch, kv_heads, blocks, CHANNEL_BLOCK, dim)
    valid = valid.reshape(batch, 1, blocks, CHANNEL_BLOCK, 1)
    inf = torch.tensor(float("inf"), device=k.device)
    # amin / amax propagate a NaN of a valid row; rows left out cannot win either.
    zero = torch.where(valid, x, inf).amin(dim=3).to(torch.float16)        # [B, H, blocks, D]
    step = ((torch.where(valid, x, -inf).amax(dim=3) - zero.float()) / CHANNEL_LEVELS
            ).to(torch.float16)
    z, s = zero.float()[:, :, :, None], step.float()[:, :, :, None]
    level = torch.round((x - z) / s)
    level = torch.where((s == 0) | ~valid, torch.zeros_like(level), level)
    level = torch.nan_to_num(level, nan=0.0).clamp(0, CHANNEL_LEVELS).to(torch.uint8)
    level = level.reshape(batch, kv_heads, blocks * CHANNEL_BLOCK, dim)[:, :, :length]
    low = (level & 3).reshape(batch, kv_heads, length, dim // 4, 4)
    high = (level >> 2).reshape(batch, kv_heads, length, dim // 8, 8)
    low = sum(low[..., t] << (2 * t) for t in range(4))
    high = sum(high[..., t] << t for t in range(8))
    codes = torch.cat([low, high], dim=-1).to(torch.uint8)
    return KeySummary(codes.contiguous(), torch.stack([zero, step], dim=-1).contiguous(),
                      "int3_channel")


def dequantize_torch(summary: KeySummary) -> Tensor:
    """The keys the summary's selector scores: K~ = z + s * code, float32 [B, Hkv, N, D]."""
    if summary.format == "int3_channel":
        return _dequantize_channel_torch(summary)
    codes = summary.codes
    batch, kv_heads, length, half = codes.shape
    levels = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(
        batch, kv_heads, length, half * 2 // GROUP, GROUP).float()
    params = summary.params.float()
    keys = params[..., 0:1] + params[..., 1:2] * levels
    return keys.reshape(batch, kv_heads, length, 2 * half)


def _dequantize_channel_torch(summary: KeySummary) -> Tensor:
    codes = summary.codes
    batch, kv_heads, length, width = codes.shape
    dim = width * 8 // 3
    low, high = codes[..., : dim // 4], codes[..., dim // 4:]
    low = torch.stack([(low >> (2 * t)) & 3 for t in range(4)], dim=-1).reshape(
        batch, kv_heads, length, dim)
    high = torch.stack([(high >> t) & 1 for t in range(8)], dim=-1).reshape(
        batch, kv_heads, length, dim)
    level = (low | (high << 2)).float()
    block = torch.arange(length, device=codes.device) // CHANNEL_BLOCK
    params = summary.params[:, :, :_blocks(length)].float()[:, :, block]  # [B, H, N, D, 2]
    return params[..., 0] + params[..., 1] * level
