"""A paged KV cache in plain torch: the layout the ops read with `block_table`, built from
and turned back into a contiguous cache (for tests, references and benchmarks).

Layout (csrc/vattention/attention_params.h): a pool of physical blocks
[num_blocks, H, block_size, ...] (any strides; an NHD cache [num_blocks, block_size, H, D]
is passed as `cache.permute(0, 2, 1, 3)`) and an int32 block table [B, max_blocks]:
logical row r of batch row b lives in block block_table[b, r // block_size] at slot
r % block_size, so the logical length is max_blocks * block_size.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def check_table(block_table, device: Optional[torch.device] = None,
                owner: str = "cache") -> None:
    """Raises a ValueError naming block_table unless it is an int32 tensor [batch,
    max_blocks] (on `device`, `owner`'s, when given)."""
    if (not isinstance(block_table, Tensor) or block_table.dim() != 2
            or block_table.dtype != torch.int32):
        got = (f"{block_table.dtype} {tuple(block_table.shape)}"
               if isinstance(block_table, Tensor) else type(block_table).__name__)
        raise ValueError(f"block_table must be an int32 tensor [batch, max_blocks], got {got}")
    if device is not None and block_table.device != device:
        raise ValueError(f"block_table must be on {owner}'s device {device}, got "
                         f"{block_table.device}")


def paged_to_contiguous(cache: Tensor, block_table: Tensor) -> Tensor:
    """[B, H, max_blocks * block_size, ...]: row r of batch row b is
    cache[block_table[b, r // block_size], :, r % block_size] (a torch gather, no host sync).

    cache: a pool [num_blocks, H, block_size, ...] (any strides); block_table: int32
    [B, max_blocks] on cache's device. An id outside [0, num_blocks) (a table's unused tail
    may hold anything, as vLLM's does) gives rows of zeros rather than an error: the ops
    never read such rows, so a reference must not either."""
    if cache.dim() < 3:
        raise ValueError(f"cache must be a pool [num_blocks, H, block_size, ...], got shape "
                         f"{tuple(cache.shape)}")
    check_table(block_table, cache.device)
    num_blocks, heads, block_size = cache.shape[:3]
    rest = tuple(cache.shape[3:])
    batch, max_blocks = block_table.shape
    ids = block_table.long()
    valid = (ids >= 0) & (ids < num_blocks)
    if num_blocks == 0:
        blocks = cache.new_zeros((batch, max_blocks, heads, block_size) + rest)
    else:
        blocks = cache[ids.clamp(0, num_blocks - 1)]         # [B, max_blocks, H, bs, ...]
        mask = valid.view((batch, max_blocks) + (1,) * (blocks.dim() - 2))
        blocks = torch.where(mask, blocks, torch.zeros((), dtype=cache.dtype,
                                                       device=cache.device))
    return blocks.movedim(1, 2).reshape((batch, heads, max_blocks * block_size) + rest)


def to_paged(x: Tensor, block_size: int, *, generator: Optional[torch.Generator] = None,
             extra_blocks: int = 0, fill: float = 0) -> Tuple[Tensor, Tensor]:
    """Scatters a contiguous cache x [B, H, N, ...] into (pool, block_table).

    pool [B * ceil(N / block_size) + extra_blocks, H, block_size, ...] (x's dtype and
    device, contiguous) holds batch row b's j-th block of rows at block block_table[b, j]
    (int32 [B, ceil(N / block_size)] on x's device); the physical blocks are a random
    permutation drawn from `generator` (a CPU generator; None: torch's default), so the
    table is shuffled and `extra_blocks` blocks stay unused. Slots past N in the last block
    and the unused blocks hold `fill` (e.g. NaN, to show that nothing reads them).
    paged_to_contiguous(pool, block_table)[:, :, :N] == x."""
    if x.dim() < 3:
        raise ValueError(f"x must be [B, H, N, ...], got shape {tuple(x.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be an int > 0, got {block_size!r}")
    if isinstance(extra_blocks, bool) or not isinstance(extra_blocks, int) or extra_blocks < 0:
        raise ValueError(f"extra_blocks must be an int >= 0, got {extra_blocks!r}")
    batch, heads, length = x.shape[:3]
    rest = tuple(x.shape[3:])
    max_blocks = -(-length // block_size)
    num_blocks = batch * max_blocks + extra_blocks
    order = torch.randperm(num_blocks, generator=generator)
    block_table = order[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    pool = torch.full((num_blocks, heads, block_size) + rest, fill, dtype=x.dtype,
                      device=x.device)
    padded = x.new_full((batch, heads, max_blocks * block_size) + rest, fill)
    padded[:, :, :length] = x
    blocks = padded.view((batch, heads, max_blocks, block_size) + rest).movedim(2, 1)
    pool[order[: batch * max_blocks].to(x.device)] = blocks.reshape(
        (batch * max_blocks, heads, block_size) + rest)
    return pool, block_table.to(x.device)
