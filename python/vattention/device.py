"""Host values onto a device without a host sync and capturable in a CUDA graph: the one
place decode (lengths, seeds), the budget's chi-square table and the integrations ask
whether the current stream is capturing."""
from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor


def capturing(device: torch.device) -> bool:
    """Whether `device`'s current CUDA stream is capturing a graph (False off CUDA)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def host_values(values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host numbers as a `dtype` tensor on `device`, with no host sync and capturable.

    The usual way, a non-blocking copy from pageable host memory, cannot be captured in a
    CUDA graph: a replay would re-read host memory that is gone. Pinned memory could be, but
    only if the pinned buffer outlived every replay of every graph that captured it, which
    no tensor we return can promise. So under capture (and under torch.compile, whose
    CUDA graphs capture the same way) each run of equal values is a fill kernel, its value
    baked into the graph: host values are constants of a graph anyway (a graph replays the
    draws of an int seed and the lengths of CPU seq_lens that it captured). Outside capture
    one copy costs one launch where the fills cost one per run.
    """
    if torch.compiler.is_compiling() or capturing(device):
        out = torch.empty(len(values), dtype=dtype, device=device)
        start = 0
        for i in range(1, len(values) + 1):
            if i == len(values) or values[i] != values[start]:
                out[start:i].fill_(values[start])
                start = i
        return out
    if device.type == "cpu":
        return torch.tensor(list(values), dtype=dtype)
    return torch.tensor(list(values), dtype=dtype).to(device, non_blocking=True)
