"""VAttentionConfig: what the user asks for, validated once on the host."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Union

import torch

Size = Union[int, float]

RULES = ("ratio", "paper", "denominator")
VERIFIED_RULES = ("ratio", "paper")
SELECTORS = ("oracle", "int4")


@dataclass(frozen=True)
class VAttentionConfig:
    """Sparse-attention settings for one layer.

    Sizes are token counts when int and fractions of each row's length when float.

    sink, local: the first / last tokens, always attended exactly.
    heavy: heavy hitters chosen by ``selector`` among the remaining tokens.
    base_rate: pilot sample size: an int is a token count (>= 2), a float a fraction of the
        residual (in (0, 1]); at least 2 draws, at most the residual. The pilot costs bytes
        like any other token: it is a first-order speed knob. At long context the budget is
        roughly constant in n, so a count keeps the pilot from dominating the sample.
        Default 128 with reuse_pilot (benchmarks/bench_levers.py: the coverage tests pass
        on the synthetic families and SmolLM2 with both selectors); base_rate=0.05,
        reuse_pilot=False is the earlier default.
    reuse_pilot: count the pilot's draws in the final estimate: the final sample draws only
        the budget's remainder max(b - p, 0), and the pilot and final draws are one uniform
        sample of p + that many draws. Saves up to p rows a step; because the sample size
        then depends on the pilot's draws (a stopping rule), the estimator is unbiased only
        asymptotically, and the coverage tests decide (docs/algorithm.md, section 5). Never
        applies when the residual is attended exactly.
    epsilon, delta: each head's output is within relative L2 error epsilon of dense
        attention with probability at least 1 - delta (for the verified rules).
    rule: budget rule, one of "ratio" (default: the tightest rule that passes the
        coverage tests), "paper" (numerator and denominator bounded separately:
        safe, about twice the density) or "denominator" (the authors' public code:
        NOT verified, kept for comparison).
    selector: how heavy hitters are chosen. "oracle": exact top-k of the logits (reads all of
        K: half of dense attention's bytes). "int4": top-k of the logits of a 4-bit copy of K
        (vattention.key_summary: a zero and a step per 32 channels, D / 2 + 4 D / 32 bytes a
        token, 0.156 of a 16-bit cache's K and V rows) kept beside the cache; decode builds
        it from k when no key_summary is passed. Both are unbiased whatever they select;
        the guarantee needs the selector to keep most of the attention mass, which the
        coverage tests check for each.
    share_gqa: query heads of one KV head share one index list (scores combined,
        budget = max over the group), so every K/V row is read once per group.
    num_splits: split-K factor of the attention kernel; 0 picks one from the device.
    min_samples: the fewest residual tokens ever sampled: the normal approximation behind
        every budget rule needs a few dozen draws, whatever the pilot suggests.
    """

    sink: Size = 128
    local: Size = 128
    heavy: Size = 0.05
    base_rate: Size = 128
    epsilon: float = 0.05
    delta: float = 0.05
    rule: str = "ratio"
    selector: str = "oracle"
    share_gqa: bool = True
    num_splits: int = 0
    min_samples: int = 32
    reuse_pilot: bool = True

    def __post_init__(self):
        for name in ("sink", "local", "heavy"):
            check_size(getattr(self, name), f"VAttentionConfig.{name}")
        check_pilot_size(self.base_rate, "VAttentionConfig.base_rate")
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
        if not isinstance(self.reuse_pilot, bool):
            raise ValueError(f"VAttentionConfig.reuse_pilot must be a bool, "
                             f"got {self.reuse_pilot!r}")

    @property
    def verified(self) -> bool:
        return self.rule in VERIFIED_RULES

    def replace(self, **changes) -> "VAttentionConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return VAttentionConfig(**values)


# ---------------------------------------------------------------------------------------
# Sizes: a config size (int token count, or float fraction of a row) as a token count.
# ---------------------------------------------------------------------------------------

# A float size means ceil(size * n) tokens, except that a product within a relative
# FRACTION_SLACK above an integer counts as that integer: 0.07 is not exact in binary64 and
# 0.07 * 100 is 7.000000000000001, yet a fraction never means one token more than the
# decimal product its user wrote. (A relative slack, because the representation error of a
# fraction is relative: for rows up to 2^31 tokens it forgives at most 2^-9 of a token.)
FRACTION_SLACK = 2.0 ** -40


def _slackened(fraction: float) -> float:
    # The slack is folded into the fraction once, on the host, so that both versions below
    # evaluate a single binary64 multiplication, ceil(fraction' * n). That is why they agree
    # exactly: n < 2^53 converts to binary64 exactly; a multiplication is correctly rounded
    # in Python, in torch's CPU and CUDA kernels, and in any kernel torch.compile fuses (a
    # lone multiply has no addition to be contracted into an FMA with, which
    # ceil(size * n - slack) would); ceil and the integer clamps are exact. It matters: the
    # host count at the buffer's length is the static bound that sizes every buffer of a
    # decode step, and a device count one above it would silently drop a token; the plain
    # references count on the host and must pick the tokens the device picks.
    return fraction * (1.0 - FRACTION_SLACK)


def check_size(size, name: str) -> None:
    """Raises a ValueError naming `name` unless size is an int >= 0 or a float in [0, 1]."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"{name} must be an int count or a float fraction, got {size!r}")
    if isinstance(size, int) and size < 0:
        raise ValueError(f"{name} must be >= 0 tokens, got {size}")
    if isinstance(size, float) and not (0.0 <= size <= 1.0):
        raise ValueError(f"{name} as a fraction must lie in [0, 1], got {size}")


def check_pilot_size(size, name: str) -> None:
    """Raises a ValueError naming `name` unless size is an int >= 2 (a pilot of fewer than two
    draws has no variance) or a float in (0, 1] (a fraction of the residual)."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"{name} must be an int count (>= 2) or a float fraction in (0, 1], "
                         f"got {size!r}")
    if isinstance(size, int) and size < 2:
        raise ValueError(f"{name} as a count must be >= 2 tokens, got {size}")
    if isinstance(size, float) and not (0.0 < size <= 1.0):
        raise ValueError(f"{name} as a fraction must lie in (0, 1], got {size}")


def resolve_size(size: Size, length: int) -> int:
    """Token count of a size for a row of `length` tokens, as a host int (static bounds).

    Counts are monotone in `length`, so the count at a buffer's length bounds every row's."""
    if isinstance(size, float):
        return min(max(math.ceil(_slackened(size) * length), 0), length)
    return min(max(size, 0), length)


def resolve_sizes(size: Size, lengths: torch.Tensor) -> torch.Tensor:
    """resolve_size for every row of an int64 tensor of lengths, on its device, without a sync.

    Equal to ``[resolve_size(size, n) for n in lengths]`` bit for bit (see _slackened)."""
    if isinstance(size, float):
        counts = torch.ceil(lengths.to(torch.float64) * _slackened(size)).to(torch.int64)
        return torch.minimum(counts.clamp(min=0), lengths)
    return lengths.clamp(min=0, max=max(size, 0))


# ---------------------------------------------------------------------------------------
# q, k, v: the one check of the attention inputs (decode, reference, baselines, fake ops).
# ---------------------------------------------------------------------------------------

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Positions are int32 in every kernel, and -1 marks an unused slot.
MAX_LENGTH = 2 ** 31 - 1


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_qkv(q, k, v=None, *, dtypes=KERNEL_DTYPES) -> None:
    """Raises a ValueError / TypeError naming the argument unless q [batch, q_heads, head_dim]
    and k, v [batch, kv_heads, length, head_dim] fit together (q_heads a multiple of kv_heads,
    one dtype, one device). v may be None (an op that reads only K). dtypes: the allowed
    dtypes, or None for any floating-point dtype (the plain-torch references)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got {_shape(q)}")
    named = (("k", k),) if v is None else (("k", k), ("v", v))
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be [batch, kv_heads, length, head_dim], "
                             f"got {_shape(t)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if dtypes is None:
        if not q.is_floating_point():
            raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    elif q.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        raise TypeError(f"q must be {', '.join(names[:-1])} or {names[-1]}, got {q.dtype}")
    tensors = [t for _, t in named]
    which = "q and k" if v is None else "q, k and v"
    if any(t.dtype != q.dtype for t in tensors):
        raise TypeError(f"{which} must share a dtype, got "
                        f"{', '.join(str(t.dtype) for t in [q] + tensors)}")
    if any(t.device != q.device for t in tensors):
        raise ValueError(f"{which} must be on one device, got "
                         f"{', '.join(str(t.device) for t in [q] + tensors)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has {q.shape[0]}")
    if k.shape[3] != q.shape[2]:
        raise ValueError(f"k has head_dim {k.shape[3]} but q has {q.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]})")
    if k.shape[2] >= MAX_LENGTH:
        raise ValueError(f"k's length must be < 2^31 - 1, got {k.shape[2]}")
