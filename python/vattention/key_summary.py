"""The int4 key summary: a 4-bit copy of K kept beside the KV cache, scored by the "int4"
selector instead of K (csrc/vattention/key_summary.h has the exact layout and rounding).

Per token and KV head, channel group g of 32 channels keeps a zero z_g and a step s_g
(fp16) and one 4-bit code per channel; the dequantised key is K~_d = z_g + s_g * code_d.
A token costs D / 2 + 4 D / 32 bytes (80 at D = 128), 0.156 of the K and V rows of a
16-bit cache, where the oracle selector reads K itself (0.5).

The summary is built once at prefill (`build_key_summary`) and kept in step with the cache
as decode appends tokens (`update_key_summary`, in place); both run the summarize_keys op
where it supports the inputs, else the plain-torch reference `summarize_keys_torch`, which
writes the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from . import ops
from .config import KERNEL_DTYPES

Tensor = torch.Tensor

GROUP = 32    # channels per (zero, step) pair (kSummaryGroup)
LEVELS = 15   # codes 0..15 (kSummaryLevels)


def summary_bytes_per_token(head_dim: int) -> int:
    """Bytes of one token's summary (per KV head) for head dim `head_dim`."""
    return head_dim // 2 + 4 * (head_dim // GROUP)


@dataclass
class KeySummary:
    """codes [B, Hkv, N, D / 2] uint8 (channel 2j in the low nibble of byte j) and
    params [B, Hkv, N, D / 32, 2] fp16 (zero, step) of every channel group."""

    codes: Tensor
    params: Tensor

    @property
    def head_dim(self) -> int:
        return 2 * self.codes.shape[-1]

    @property
    def length(self) -> int:
        return self.codes.shape[2]

    @property
    def bytes_per_token(self) -> int:
        """Summary bytes of one token of one KV head, as it sits in the cache."""
        return summary_bytes_per_token(self.head_dim)

    def check(self, batch: int, kv_heads: int, length: int, head_dim: int,
              device: torch.device, name: str = "key_summary") -> None:
        """Raises a ValueError naming `name` unless this summarises such a K."""
        codes, params = self.codes, self.params
        if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.dim() != 4:
            raise ValueError(f"{name}.codes must be a uint8 tensor [batch, kv_heads, length, "
                             f"head_dim / 2], got {_describe(codes)}")
        if not isinstance(params, Tensor) or params.dtype != torch.float16 or params.dim() != 5:
            raise ValueError(f"{name}.params must be a float16 tensor [batch, kv_heads, length, "
                             f"head_dim / 32, 2], got {_describe(params)}")
        want_codes = (batch, kv_heads, length, head_dim // 2)
        want_params = (batch, kv_heads, length, head_dim // GROUP, 2)
        if tuple(codes.shape) != want_codes:
            raise ValueError(f"{name}.codes must have shape {want_codes} for k, got "
                             f"{tuple(codes.shape)}")
        if tuple(params.shape) != want_params:
            raise ValueError(f"{name}.params must have shape {want_params} for k, got "
                             f"{tuple(params.shape)}")
        if codes.device != device or params.device != device:
            raise ValueError(f"{name} must be on {device}, got {codes.device} and {params.device}")


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} {tuple(t.shape)}"
    return type(t).__name__


def _check_head_dim(head_dim: int) -> None:
    if head_dim <= 0 or head_dim % GROUP != 0:
        raise ValueError(f"the key summary needs a head_dim that is a multiple of {GROUP}, "
                         f"got {head_dim}")


def _check_k(k, name: str = "k") -> None:
    if not isinstance(k, Tensor) or k.dim() != 4 or not k.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [batch, kv_heads, rows, "
                         f"head_dim], got {_describe(k)}")
    _check_head_dim(k.shape[-1])


def empty_key_summary(batch: int, kv_heads: int, length: int, head_dim: int,
                      device=None) -> KeySummary:
    """An uninitialised summary of `length` tokens (a cache's capacity), to fill in place."""
    _check_head_dim(head_dim)
    return KeySummary(
        torch.empty(batch, kv_heads, length, head_dim // 2, dtype=torch.uint8, device=device),
        torch.empty(batch, kv_heads, length, head_dim // GROUP, 2, dtype=torch.float16,
                    device=device))


def _op_supports(k: Tensor, summary: KeySummary) -> bool:
    device = k.device
    if k.dtype not in KERNEL_DTYPES or k.stride(-1) != 1:
        return False
    if device.type == "cpu":
        return True
    return (device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(
        "vattention::summarize_keys", "CUDA"))


def build_key_summary(k: Tensor) -> KeySummary:
    """The summary of every row of k [B, Hkv, N, D] (prefill)."""
    _check_k(k)
    batch, kv_heads, length, dim = k.shape
    summary = empty_key_summary(batch, kv_heads, length, dim, device=k.device)
    update_key_summary(summary, k, 0)
    return summary


def update_key_summary(summary: KeySummary, k_new: Tensor,
                       row_begin: Union[int, Tensor]) -> None:
    """Writes the summary of k_new [B, Hkv, rows, D] into positions row_begin[b] + [0, rows)
    of `summary`, in place (decode: the appended tokens). Positions at or beyond the
    summary's length are skipped. row_begin: an int for every row, or an int64 [B] tensor on
    k_new's device (no host sync)."""
    _check_k(k_new, "k_new")
    batch, kv_heads, _, dim = k_new.shape
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
    if _op_supports(k_new, summary):
        ops.summarize_keys(k_new, summary.codes, summary.params, row_begin)
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


def summarize_keys_torch(k: Tensor) -> KeySummary:
    """Plain-torch reference of the summarize_keys op: the same bytes (key_summary.h).

    Every step is a correctly rounded fp32 or fp16 operation as the kernels do it: the
    group min / max (NaN propagates), z = fp16(min), s = fp16((max - z) / 15),
    code = clamp(rint((x - z) / s), 0, 15), 0 where s == 0 or the quotient is NaN."""
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


def dequantize_torch(summary: KeySummary) -> Tensor:
    """The keys the int4 selector scores: K~ = z + s * code, float32 [B, Hkv, N, D]."""
    codes = summary.codes
    batch, kv_heads, length, half = codes.shape
    levels = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(
        batch, kv_heads, length, half * 2 // GROUP, GROUP).float()
    params = summary.params.float()
    keys = params[..., 0:1] + params[..., 1:2] * levels
    return keys.reshape(batch, kv_heads, length, 2 * half)
