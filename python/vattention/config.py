"""VAttentionConfig: what the user asks for, validated once on the host."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Union

Size = Union[int, float]

RULES = ("ratio", "paper", "denominator")
VERIFIED_RULES = ("ratio", "paper")
SELECTORS = ("oracle",)


@dataclass(frozen=True)
class VAttentionConfig:
    """Sparse-attention settings for one layer.

    Sizes are token counts when int and fractions of each row's length when float.

    sink, local: the first / last tokens, always attended exactly.
    heavy: heavy hitters chosen by ``selector`` among the remaining tokens.
    base_rate: pilot sample size as a fraction of the residual (at least 2 tokens).
        The pilot costs bytes like any other token: it is a first-order speed knob.
    epsilon, delta: each head's output is within relative L2 error epsilon of dense
        attention with probability at least 1 - delta (for the verified rules).
    rule: budget rule, one of "ratio" (default: the tightest rule that passes the
        coverage tests), "paper" (numerator and denominator bounded separately:
        safe, about twice the density) or "denominator" (the authors' public code:
        NOT verified, kept for comparison).
    selector: how heavy hitters are chosen; "oracle" is exact top-k of the logits.
    share_gqa: query heads of one KV head share one index list (scores combined,
        budget = max over the group), so every K/V row is read once per group.
    num_splits: split-K factor of the attention kernel; 0 picks one from the device.
    min_samples: the fewest residual tokens ever sampled: the normal approximation behind
        every budget rule needs a few dozen draws, whatever the pilot suggests.
    """

    sink: Size = 128
    local: Size = 128
    heavy: Size = 0.05
    base_rate: float = 0.05
    epsilon: float = 0.05
    delta: float = 0.05
    rule: str = "ratio"
    selector: str = "oracle"
    share_gqa: bool = True
    num_splits: int = 0
    min_samples: int = 32

    def __post_init__(self):
        for name in ("sink", "local", "heavy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"VAttentionConfig.{name} must be an int count or a float "
                                 f"fraction, got {value!r}")
            if isinstance(value, int) and value < 0:
                raise ValueError(f"VAttentionConfig.{name} must be >= 0 tokens, got {value}")
            if isinstance(value, float) and not (0.0 <= value <= 1.0):
                raise ValueError(f"VAttentionConfig.{name} as a fraction must lie in [0, 1], "
                                 f"got {value}")
        if isinstance(self.base_rate, bool) or not (
                isinstance(self.base_rate, (int, float)) and 0.0 < self.base_rate <= 1.0):
            raise ValueError(f"VAttentionConfig.base_rate must lie in (0, 1], got {self.base_rate!r}")
        if not (isinstance(self.epsilon, (int, float)) and 0.0 < self.epsilon < 1.0):
            raise ValueError(f"VAttentionConfig.epsilon must lie in (0, 1), got {self.epsilon!r}")
        if not (isinstance(self.delta, (int, float)) and 0.0 < self.delta < 1.0):
            raise ValueError(f"VAttentionConfig.delta must lie in (0, 1), got {self.delta!r}")
        if self.rule not in RULES:
            raise ValueError(f"VAttentionConfig.rule must be one of {RULES}, got {self.rule!r}")
        if self.selector not in SELECTORS:
            raise ValueError(f"VAttentionConfig.selector must be one of {SELECTORS}, "
                             f"got {self.selector!r}")
        if not isinstance(self.share_gqa, bool):
            raise ValueError(f"VAttentionConfig.share_gqa must be a bool, got {self.share_gqa!r}")
        if isinstance(self.num_splits, bool) or not isinstance(self.num_splits, int) \
                or self.num_splits < 0:
            raise ValueError(f"VAttentionConfig.num_splits must be an int >= 0, "
                             f"got {self.num_splits!r}")

        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int) \
                or self.min_samples < 1:
            raise ValueError(f"VAttentionConfig.min_samples must be an int >= 1, "
                             f"got {self.min_samples!r}")

    @property
    def verified(self) -> bool:
        return self.rule in VERIFIED_RULES

    def replace(self, **changes) -> "VAttentionConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return VAttentionConfig(**values)


def resolve_size(size: Size, length: int) -> int:
    """Host-side token count of a size for a row of `length` tokens (the static bound)."""
    if isinstance(size, float):
        return min(int(math.ceil(size * length - FRACTION_SLACK)), length)
    return min(size, length)


# 0.05 * 2000 is 100.00000000000001 in floating point; a fraction never means one
# token more than the exact product.
FRACTION_SLACK = 1e-9
