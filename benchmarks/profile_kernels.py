"""CUDA kernels one decode step launches, counted by the torch profiler (CUPTI).

benchmarks/launch_count.py counts the operations a step dispatches (the same on the CPU
and on CUDA); a vattention op may launch more than one kernel, and an ATen op may launch
a memset or a copy. This script counts what the GPU actually ran: kernels, memsets and
memcpys of one warm step, by name.

    python benchmarks/profile_kernels.py [--batch 1] [--context 131072] [--config '...']

Needs a CUDA device; without one it says so and exits 0 (the emulator test
tests/cuda_emulator/test_launch_count.cpp counts each CUDA entry point's launches on
the CPU instead).
"""
from __future__ import annotations

import argparse
import collections
from typing import Callable, Dict


def count_cuda_kernels(fn: Callable[[], object]) -> Dict[str, collections.Counter]:
    """Runs fn() once under the profiler; returns {"kernel"|"memset"|"memcpy": Counter of
    names}. Call fn() once before, so one-time work (device tables) is not counted."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds = {"kernel": collections.Counter(), "memset": collections.Counter(),
             "memcpy": collections.Counter()}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name
        lowered = name.lower()
        kind = ("memset" if "memset" in lowered else
                "memcpy" if "memcpy" in lowered else "kernel")
        kinds[kind][name] += 1
    return kinds


def main() -> None:
    import torch

    import vattention
    from vattention.key_summary import FORMATS, build_key_summary

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--config", default="",
                        help="VAttentionConfig fields, e.g. 'selector=\"oracle\"'")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_kernels: no CUDA device; the CPU count is benchmarks/launch_count.py, "
              "the per-op CUDA launches tests/cuda_emulator/test_launch_count.cpp")
        return
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(args.batch, args.q_heads, args.dim, generator=g, device=device,
                    dtype=torch.bfloat16)
    k, v = (torch.randn(args.batch, args.kv_heads, args.context, args.dim, generator=g,
                        device=device, dtype=torch.bfloat16) for _ in range(2))
    cfg = eval(f"vattention.VAttentionConfig({args.config})")   # noqa: S307 (a CLI of ours)
    summary = build_key_summary(k, cfg.selector) if cfg.selector in FORMATS else None
    seed = torch.tensor([1234, 0], dtype=torch.int64, device=device)
    step = lambda: vattention.decode(q, k, v, cfg, seed=seed, key_summary=summary)
    step()
    kinds = count_cuda_kernels(step)
    print(f"config: {cfg}")
    print(f"shape: B={args.batch} Hq={args.q_heads} Hkv={args.kv_heads} N={args.context} "
          f"D={args.dim} bf16 on {torch.cuda.get_device_name(device)}")
    total = {kind: sum(c.values()) for kind, c in kinds.items()}
    print(f"CUDA kernels per decode step: {total['kernel']} (+ {total['memset']} memsets, "
          f"{total['memcpy']} memcpys)")
    for kind, names in kinds.items():
        for name, n in names.most_common():
            print(f"  {kind:6s} x{n}  {name[:110]}")


if __name__ == "__main__":
    main()
