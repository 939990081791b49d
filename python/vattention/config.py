"""VAttentionConfig: what the user asks for, validated once on the host."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Tuple, Union

import torch

Size = Union[int, float]

RULES = ("ratio", "paper", "denominator")
VERIFIED_RULES = ("ratio", "paper")
SELECTORS = ("oracle", "int4", "int3_channel")
GQA_HEAVY = ("max", "union")
TAILS = ("normal", "chi2")


@dataclass(frozen=True)
class VAttentionConfig:
    """Sparse-attention settings for one layer.

    Sizes are token counts when int and fractions of each row's length when float.

    sink, local: the first / last tokens, always attended exactly.
    heavy: heavy hitters chosen by ``selector`` among the remaining tokens.
    adaptive_heavy: adaptive heavy size (opt-in, default False): each index list chooses its heavy set
        among the selector's nested top-m sets of sizes heavy x (1/4, 1/2, 1, 2) (fractions
        capped at 1; counts rounded down, zeros and repeats dropped), taking the one that
        reads the fewest rows, m + the residual's rows (its budget beyond the pilot's draws,
        or all of it when the budget reaches it); every candidate's budget comes from one
        pilot drawn outside the smallest set (vattention.heavy_size; docs/algorithm.md,
        "Adaptive heavy size"). So ``heavy`` is the nominal size, and a step never reads more
        heavy rows than 2 x heavy. False: the single size ``heavy``. Not with
        gqa_heavy="union" (which then keeps the single size). benchmarks/bench_levers.py,
        lever a10, measured it: 0.03-0.33 fewer relative bytes on SmolLM2 and Gemma-3 with
        the coverage tests passing, but benchmarks/bench_bytes.py saw a Gemma-3 32K head
        violate 4/8 times at (0.1, 0.1) (the choice reuses the pilot that sizes the budget, a
        stopping rule), so it is not the default yet.
    heavy_candidates: an explicit tuple of candidate sizes instead of the ones adaptive_heavy
        derives from ``heavy``: strictly increasing, all counts or all fractions, e.g.
        (0.0125, 0.025, 0.05, 0.1); ``heavy`` and ``adaptive_heavy`` are then unused. Needs
        gqa_heavy="max". () (default): derived from ``heavy``.
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
    selector: how heavy hitters are chosen (default "int4"). "oracle": exact top-k of the logits (reads all of
        K: half of dense attention's bytes). "int4": top-k of the logits of a 4-bit copy of K
        (vattention.key_summary: a zero and a step per 32 channels, D / 2 + 4 D / 32 bytes a
        token, 0.156 of a 16-bit cache's K and V rows) kept beside the cache; decode builds
        it from k when no key_summary is passed. "int3_channel": the same with a 3-bit copy
        of K quantised per channel over blocks of 64 tokens (a zero and a step per channel
        and block, 3 D / 8 + D / 16 bytes a token, 0.109 of the K and V rows; scored in
        plain torch, no kernel yet). All are unbiased whatever they select;
        the guarantee needs the selector to keep most of the attention mass, which the
        coverage tests check for each.
    share_gqa: query heads of one KV head share one index list (scores combined,
        budget = max over the group), so every K/V row is read once per group.
    gqa_heavy: how a shared list (share_gqa, more than one query head per KV head) picks its
        heavy set. "max" (default): the top ``heavy`` tokens of the group's max
        log-probability, one heavy set the size of one head's. "union": the union of each
        head's own top ``heavy`` tokens (deduplicated, up to group x heavy rows), so no head's
        heavy hitters are left in the residual: on dissimilar heads "max" splits one head's
        worth of heavy rows over the group and the shared budget (the max over the heads)
        falls back to exact attention, where "union" reads at most the rows of per-head
        lists' heavy sets plus one shared pilot and sample. Ignored without sharing.
    tail: the ratio rule's tail bound. "normal" (default): z^2 = Phi^-1(1 - delta/2)^2 in
        front of Tr(Sigma), exact for a one-dimensional error. "chi2": the error is a
        D-vector; by Satterthwaite ||e||^2 ~ g chi^2_h with the effective dimension
        h = (Tr Sigma)^2 / Tr(Sigma^2), estimated per head from the pilot (op
        pilot_dispersion, which reads the pilot's rows a second time), so z^2 becomes
        chi^2_{h, 1-delta} / h (the same at h = 1, smaller above): fewer samples at the
        same (epsilon, delta) (docs/algorithm.md, "Tail bound"). Ratio rule only.
    num_splits: split-K factor of the attention kernel; 0 picks one from the device.
    min_samples: the fewest residual tokens ever sampled: the normal approximation behind
        every budget rule needs a few dozen draws, whatever the pilot suggests.
    dense_below: the dense fallback, in tokens (0, the default: off). A batch row of at
        most dense_below valid tokens attends exactly to all of them (its stats: exact,
        density 1, error bound 0), decided per row on the device from seq_lens, with no
        host sync; longer rows are sparse as without it. Where the cache's length N is at
        most dense_below every row is dense, and the step is one exact attention over the
        valid rows (no selection, pilot or sample). For short contexts where sparse
        attention cannot beat dense (its fixed costs: selection, a few launches).
    """

    sink: Size = 128
    local: Size = 128
    heavy: Size = 0.05
    adaptive_heavy: bool = False
    heavy_candidates: Tuple[Size, ...] = ()
    base_rate: Size = 128
    epsilon: float = 0.05
    delta: float = 0.05
    rule: str = "ratio"
    selector: str = "int4"
    share_gqa: bool = True
    gqa_heavy: str = "max"
    num_splits: int = 0
    min_samples: int = 32
    reuse_pilot: bool = True
    tail: str = "normal"
    dense_below: int = 0

    def __post_init__(self):
        for name in ("sink", "local", "heavy"):
            check_size(getattr(self, name), f"VAttentionConfig.{name}")
        check_pilot_size(self.base_rate, "VAttentionConfig.base_rate")
        self._check_heavy_candidates()
        if not isinstance(self.adaptive_heavy, bool):
            raise ValueError(f"VAttentionConfig.adaptive_heavy must be a bool, "
                             f"got {self.adaptive_heavy!r}")
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
        if self.tail not in TAILS:
            raise ValueError(f"VAttentionConfig.tail must be one of {TAILS}, got {self.tail!r}")
        if self.tail != "normal" and self.rule != "ratio":
            raise ValueError(f"VAttentionConfig.tail={self.tail!r} applies to the ratio rule "
                             f"only, got rule={self.rule!r}")
        if self.gqa_heavy not in GQA_HEAVY:
            raise ValueError(f"VAttentionConfig.gqa_heavy must be one of {GQA_HEAVY}, "
                             f"got {self.gqa_heavy!r}")
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
        if isinstance(self.dense_below, bool) or not isinstance(self.dense_below, int) \
                or self.dense_below < 0:
            raise ValueError(f"VAttentionConfig.dense_below must be an int >= 0 (tokens; "
                             f"0: off), got {self.dense_below!r}")

    def _check_heavy_candidates(self) -> None:
        name = "VAttentionConfig.heavy_candidates"
        candidates = self.heavy_candidates
        if not isinstance(candidates, (tuple, list)):
            raise ValueError(f"{name} must be a tuple of sizes, got {candidates!r}")
        candidates = tuple(candidates)
        for size in candidates:
            check_size(size, name)
        # Nested candidate sets need counts in the same order in every row: sizes of one kind,
        # increasing (resolve_sizes is then non-decreasing along the tuple for every length).
        if len({type(size) for size in candidates}) > 1:
            raise ValueError(f"{name} must be all int counts or all float fractions, "
                             f"got {candidates!r}")
        if any(b <= a for a, b in zip(candidates, candidates[1:])):
            raise ValueError(f"{name} must be strictly increasing, got {candidates!r}")
        if candidates and self.gqa_heavy != "max":
            raise ValueError(f"{name} needs gqa_heavy='max', got gqa_heavy={self.gqa_heavy!r}")
        object.__setattr__(self, "heavy_candidates", candidates)   # a list -> a hashable tuple

    @property
    def heavy_sizes(self) -> Tuple[Size, ...]:
        """The candidate heavy sizes decode chooses from per list; () for the single size
        ``heavy`` (adaptive_heavy off, gqa_heavy="union", or no heavy set at all)."""
        if self.heavy_candidates:
            return self.heavy_candidates
        if not self.adaptive_heavy or self.gqa_heavy != "max":
            return ()
        if isinstance(self.heavy, float):
            sizes = [self.heavy / 4, self.heavy / 2, self.heavy, min(2 * self.heavy, 1.0)]
        else:
            sizes = [self.heavy // 4, self.heavy // 2, self.heavy, 2 * self.heavy]
        kept = []
        for size in sizes:
            if size > 0 and (not kept or size > kept[-1]):
                kept.append(size)
        return tuple(kept)

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


def check_qkv(q, k, v=None, *, dtypes=KERNEL_DTYPES, block_table=None) -> None:
    """Raises a ValueError / TypeError naming the argument unless q [batch, q_heads, head_dim]
    and k, v [batch, kv_heads, length, head_dim] fit together (q_heads a multiple of kv_heads,
    one dtype, one device). v may be None (an op that reads only K). dtypes: the allowed
    dtypes, or None for any floating-point dtype (the plain-torch references).

    block_table (int32 [batch, max_blocks], last dim contiguous, on q's device): a paged
    cache (attention_params.h). k and v are then pools [num_blocks, kv_heads, block_size,
    head_dim] of any strides, and the logical length is max_blocks * block_size
    (`kv_length`)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got {_shape(q)}")
    paged = block_table is not None
    layout = ("[num_blocks, kv_heads, block_size, head_dim] (a paged cache's pool)" if paged
              else "[batch, kv_heads, length, head_dim]")
    named = (("k", k),) if v is None else (("k", k), ("v", v))
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be {layout}, got {_shape(t)}")
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
    if paged:
        _check_block_table(block_table, q, k)
    elif k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has {q.shape[0]}")
    if k.shape[3] != q.shape[2]:
        raise ValueError(f"k has head_dim {k.shape[3]} but q has {q.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]})")
    length = kv_length(k, block_table)
    if length >= MAX_LENGTH:
        what = "max_blocks * block_size" if paged else "k's length"
        raise ValueError(f"{what} must be < 2^31 - 1, got {length}")


def kv_length(k, block_table=None) -> int:
    """The logical length N of a cache: k.shape[2], or max_blocks * block_size when paged."""
    if block_table is None:
        return k.shape[2]
    return block_table.shape[1] * k.shape[2]


def _check_block_table(block_table, q, k) -> None:
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        raise ValueError(f"block_table must be an int32 tensor [batch, max_blocks], got "
                         f"{_shape(block_table)}")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table has batch {block_table.shape[0]} but q has {q.shape[0]}")
    if block_table.device != q.device:
        raise ValueError(f"block_table must be on q's device {q.device}, got "
                         f"{block_table.device}")
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        raise ValueError(f"block_table's last dim must be contiguous, got strides "
                         f"{tuple(block_table.stride())}")
    if k.shape[2] == 0:
        raise ValueError(f"k's block_size (dim 2 of the pool) must be > 0, got {tuple(k.shape)}")
