"""Operations one call dispatches: what issue 8's "launches per step" counts.

Counted with a TorchDispatchMode: every ATen op that is not a view and not a bare
allocation (those launch no kernel), plus every vattention op. On CUDA each is at least one
kernel launch (a vattention op may launch a few); on the CPU it is the same count, so a
reader without a GPU sees the number the CUDA path is held to.

    python benchmarks/launch_count.py [--config 'tail="chi2"'] [--device cuda]
                                      [--emulator build/cmake/vattention_emu_test]

prints one decode step's count, split by stage ("-": outside every stage) and op. With the
CPU emulator's test binary (--emulator, or the first build/*/vattention_emu_test found), it
also prints the CUDA kernels each vattention op launches, measured by running
`vattention_emu_test --launch-count` (tests/cuda_emulator/test_launch_count.cpp: the default
step's CUDA entry points under the emulator, whose launch_kernel counts launches) at its
shape, B=1, 32/8 heads, D=128, N=8192 and 32768, whatever this script's shape.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import os
import re
import subprocess

from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh",
             "_local_scalar_dense"}


class DispatchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.stages = collections.Counter()      # per decode stage (count_stages); "-": none
        self.stage_ops = collections.defaultdict(collections.Counter)
        self.stage = "-"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.ops[f"{func.namespace}::{name}"] += 1
            self.stages[self.stage] += 1
            self.stage_ops[self.stage][f"{func.namespace}::{name}"] += 1
        return func(*args, **(kwargs or {}))

    def timer(self, name: str):
        """A decode stage_timer that books the ops dispatched inside the stage to it."""
        @contextlib.contextmanager
        def span():
            outer, self.stage = self.stage, name
            try:
                yield
            finally:
                self.stage = outer
        return span()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def custom(self) -> int:
        return sum(n for op, n in self.ops.items() if op.startswith("vattention::"))


def count_dispatches(fn) -> DispatchCounter:
    """Runs fn() once under the counter and returns it (.total, .custom, .ops)."""
    with DispatchCounter() as counter:
        fn()
    return counter


def count_stages(fn) -> DispatchCounter:
    """Runs fn(stage_timer) once (e.g. lambda t: decode(..., stage_timer=t)) under the
    counter; .stages and .stage_ops split the count by decode stage ("-": outside them)."""
    counter = DispatchCounter()
    with counter:
        fn(counter.timer)
    return counter


_EMU_HEADER = re.compile(r"CUDA kernels per default decode step .* N=(\d+)")
_EMU_ROW = re.compile(r"^  (\S.*?)\s+(\d+)  \((.*)\)$")


def emulator_kernels(binary: str) -> dict:
    """{N: [(op, kernels, entry points)]} from `binary --launch-count` (runs the emulator)."""
    run = subprocess.run([binary, "--launch-count"], capture_output=True, text=True,
                         check=False)
    if run.returncode != 0:
        raise RuntimeError(f"{binary} --launch-count failed:\n{run.stdout}{run.stderr}")
    tables, current = {}, None
    for line in run.stdout.splitlines():
        header = _EMU_HEADER.search(line)
        if header:
            current = tables.setdefault(int(header.group(1)), [])
        elif current is not None and (row := _EMU_ROW.match(line)):
            current.append((row.group(1), int(row.group(2)), row.group(3)))
    return tables


def _find_emulator() -> str | None:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build")
    found = sorted(glob.glob(os.path.join(root, "*", "vattention_emu_test")),
                   key=os.path.getmtime, reverse=True)
    return found[0] if found else None


def main() -> None:
    """Prints the operations one decode step dispatches, by stage and by op."""
    import torch

    import vattention
    from vattention.key_summary import FORMATS, build_key_summary

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", default="tensor", choices=("tensor", "int", "none"),
                        help="how the step gets its seed: a device [seed, offset] tensor (a "
                             "serving loop's), a host int, or None (torch's generator)")
    parser.add_argument("--config", default="",
                        help="VAttentionConfig fields, e.g. 'tail=\"chi2\", reuse_pilot=False'")
    parser.add_argument("--emulator", default=None,
                        help="vattention_emu_test binary for the emulator-measured CUDA kernels "
                             "per op (default: the newest build/*/vattention_emu_test; 'none' "
                             "skips them)")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(args.batch, args.q_heads, args.dim, generator=g).to(device)
    k, v = (torch.randn(args.batch, args.kv_heads, args.context, args.dim,
                        generator=g).to(device) for _ in range(2))
    cfg = eval(f"vattention.VAttentionConfig({args.config})")   # noqa: S307 (a CLI of ours)
    # A cache keeps the selector's summary beside K: built once, not per step.
    summary = build_key_summary(k, cfg.selector) if cfg.selector in FORMATS else None
    seed = {"tensor": torch.tensor([1234, 0], dtype=torch.int64, device=device), "int": 1234,
            "none": None}[args.seed]
    step = lambda timer=None: vattention.decode(q, k, v, cfg, seed=seed, key_summary=summary,
                                                stage_timer=timer)
    step()   # one-time work (device tables) out of the count
    counter = count_stages(step)
    print(f"config: {cfg}")
    print(f"shape: B={args.batch} Hq={args.q_heads} Hkv={args.kv_heads} N={args.context} "
          f"D={args.dim} on {device}, seed as {args.seed}")
    print(f"launches per decode step: {counter.total} ({counter.custom} vattention ops)")
    for stage, n in counter.stages.most_common():
        ops = ", ".join(f"{op.split('::')[1]} x{c}" if c > 1 else op.split("::")[1]
                        for op, c in counter.stage_ops[stage].most_common())
        print(f"  {stage:>13}: {n:3d}  {ops}")

    binary = _find_emulator() if args.emulator is None else args.emulator
    if binary in (None, "none"):
        print("CUDA kernels per op: no vattention_emu_test built (cmake target "
              "vattention_emu_test), not measured")
        return
    tables = emulator_kernels(binary)
    for n, rows in sorted(tables.items()):
        print(f"CUDA kernels (emulator-measured per op: {os.path.relpath(binary)} "
              f"--launch-count, its default step at B=1 Hq=32 Hkv=8 D=128 N={n} bf16):")
        print(f"  {'op':<26} {'dispatched here':>15} {'CUDA kernels':>12}")
        per_op = {}   # the emulator's rows summed per op ("sample_residual (pilot)" etc.)
        for op, kernels, entries in rows:
            name = op.split(" ")[0]
            k, e = per_op.get(name, (0, []))
            per_op[name] = (k + kernels, e if entries in e else e + [entries])
        for name, (kernels, entries) in per_op.items():
            dispatched = counter.ops.get(f"vattention::{name}", 0)
            print(f"  {name:<26} {dispatched:>15} {kernels:>12}  ({'; '.join(entries)})")
        others = {op: c for op, c in counter.ops.items()
                  if op.split("::")[1] not in per_op}
        print(f"  {'total':<26} {counter.total:>15} {sum(r[1] for r in rows):>12}"
              + (f"  (not in the emulator's step: {others})" if others else ""))


if __name__ == "__main__":
    main()
