"""Operations one call dispatches: what issue 8's "launches per step" counts.

Counted with a TorchDispatchMode: every ATen op that is not a view and not a bare
allocation (those launch no kernel), plus every vattention op. On CUDA each is at least one
kernel launch (a vattention op may launch a few); on the CPU it is the same count, so a
reader without a GPU sees the number the CUDA path is held to.

    python benchmarks/launch_count.py [--config 'tail="chi2"'] [--device cuda]

prints one decode step's count, split by stage ("-": outside every stage) and op.
"""
from __future__ import annotations

import argparse
import collections
import contextlib

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


if __name__ == "__main__":
    main()
