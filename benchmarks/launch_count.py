"""Operations one call dispatches: what issue 8's "launches per step" counts.

Counted with a TorchDispatchMode: every ATen op that is not a view and not a bare
allocation (those launch no kernel), plus every vattention op. On CUDA each is at least one
kernel launch (a vattention op may launch a few); on the CPU it is the same count, so a
reader without a GPU sees the number the CUDA path is held to.
"""
from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh",
             "_local_scalar_dense"}


class DispatchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.ops[f"{func.namespace}::{name}"] += 1
        return func(*args, **(kwargs or {}))

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
