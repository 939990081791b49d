"""Measuring the (epsilon, delta) promise: attention families and violation counts.

A violation is ||O^ - O||_2 > epsilon ||O||_2 for one head on one call. The
promise holds when violations are at most delta on average *and* per head: a
rule that meets delta on average while a few heads fail on every call is not
verified. Trials of one head run as a batch: each batch row samples from its own
Philox stream, so B rows of the same (q, K, V) are B independent trials.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .config import VAttentionConfig
from .decode import decode
from .key_summary import FORMATS as SUMMARY_FORMATS
from .key_summary import KeySummary, build_key_summary, summary_bytes_per_token
from .reference import dense

Tensor = torch.Tensor

FAMILIES = ("flat", "peaked", "heavy_tailed", "small_norm")


def synthetic_heads(family: str, heads: int, length: int, dim: int = 64,
                    generator: Optional[torch.Generator] = None):
    """(q [1, heads, D], k, v [1, heads, length, D]) whose logits follow a named family.

    The logit of token i is set directly in K's first coordinate (q = sqrt(D) e_1 and the
    default scale 1/sqrt(D)), so each family controls the attention distribution exactly.
    Values are a per-head mean vector mu ~ N(0, I) plus token noise, as in real heads where
    values share a direction:
      flat          logits N(0, 0.5^2): near-uniform attention; V = mu + 0.5 noise
      peaked        logits N(0, 1) plus +8 on 0.5% of tokens: a few tokens hold the mass
      heavy_tailed  exp(logit) Pareto with index 1.2: no clean top-k, a long tail
      small_norm    logits N(0, 1); V = 0.05 mu + noise: ||O|| is small, the ratio rule's
                    weak spot
    """
    g = generator
    shape = (1, heads, length)
    mean = torch.randn(1, heads, 1, dim, generator=g, dtype=torch.float64)
    noise = torch.randn(shape + (dim,), generator=g, dtype=torch.float64)
    values = mean + 0.5 * noise
    if family == "flat":
        logits = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    elif family == "peaked":
        logits = torch.randn(shape, generator=g, dtype=torch.float64)
        spikes = torch.rand(shape, generator=g, dtype=torch.float64) < 0.005
        logits = logits + 8.0 * spikes
    elif family == "heavy_tailed":
        uniform = torch.rand(shape, generator=g, dtype=torch.float64).clamp(min=1e-12)
        logits = -torch.log(uniform) / 1.2
    elif family == "small_norm":
        logits = torch.randn(shape, generator=g, dtype=torch.float64)
        values = 0.05 * mean + noise
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    keys = torch.randn(shape + (dim,), generator=g, dtype=torch.float64)
    keys[..., 0] = logits
    q = torch.zeros(1, heads, dim, dtype=torch.float64)
    q[..., 0] = math.sqrt(dim)
    return q.float(), keys.float(), values.float()


@dataclass
class Coverage:
    violations: Tensor   # [heads] violations per head over `trials` calls
    trials: int
    density: Tensor      # [heads] mean density
    mean_error: Tensor   # [heads] mean relative error
    relative_bytes: Optional[Tensor] = None  # [heads] mean stats["relative_bytes"]

    @property
    def rate(self) -> float:
        return float(self.violations.sum()) / (self.violations.numel() * self.trials)

    def summary(self) -> Dict[str, float]:
        return {"violation_rate": self.rate, "density": float(self.density.mean()),
                "worst_head_rate": float(self.violations.max()) / self.trials,
                "mean_error": float(self.mean_error.mean()),
                "relative_bytes": (math.nan if self.relative_bytes is None
                                   else float(self.relative_bytes.mean()))}


def measure(q: Tensor, k: Tensor, v: Tensor, cfg: VAttentionConfig, trials: int,
            seed: int = 0, scale: Optional[float] = None, chunk: int = 64) -> Coverage:
    """Violations of cfg's promise for every head of (q [1,Hq,D], k/v [1,Hkv,n,D])."""
    exact = dense(q, k, v, scale=scale)[0]                     # [Hq, D] float64
    exact_norm = exact.norm(dim=-1)
    violations = torch.zeros(q.shape[1], dtype=torch.int64)
    density = torch.zeros(q.shape[1], dtype=torch.float64)
    error_sum = torch.zeros(q.shape[1], dtype=torch.float64)
    bytes_sum = torch.zeros(q.shape[1], dtype=torch.float64)
    # The trials share one K: summarise it once, as a cache would, not once per trial.
    summary = build_key_summary(k, cfg.selector) if cfg.selector in SUMMARY_FORMATS else None
    done = 0
    call = 0
    while done < trials:
        batch = min(chunk, trials - done)
        trial_summary = None if summary is None else KeySummary(
            summary.codes.expand(batch, -1, -1, -1), summary.params.expand(batch, -1, -1, -1, -1),
            summary.format)
        out, stats = decode(q.expand(batch, -1, -1), k.expand(batch, -1, -1, -1),
                            v.expand(batch, -1, -1, -1), cfg, scale=scale,
                            seed=(seed, call), return_stats=True, key_summary=trial_summary)
        error = (out.double() - exact).norm(dim=-1) / exact_norm
        violations += (error > cfg.epsilon).sum(0)
        density += stats["density"].double().sum(0)
        bytes_sum += stats["relative_bytes"].double().sum(0)
        error_sum += error.sum(0)
        done += batch
        call += 1
    return Coverage(violations, trials, density / trials, error_sum / trials,
                    bytes_sum / trials)


def binomial_upper(trials: int, p: float, alpha: float) -> int:
    """Smallest c with P(Binomial(trials, p) > c) <= alpha: the most violations that chance
    allows at rate p before we call the rate too high at level alpha."""
    cumulative, c = 0.0, 0
    log_q = math.log1p(-p)
    while c <= trials:
        log_pmf = (math.lgamma(trials + 1) - math.lgamma(c + 1) - math.lgamma(trials - c + 1)
                   + c * math.log(p) + (trials - c) * log_q)
        cumulative += math.exp(log_pmf)
        if 1.0 - cumulative <= alpha:
            return c
        c += 1
    return trials


def selector_share(selector: str, head_dim: int, elem: int) -> float:
    """Bytes the selector reads per token over dense attention's K+V bytes per token, for a
    cache of ``elem`` bytes per element: all of K for the oracle (0.5), the summary for a
    summary selector (its bytes are fixed, whatever the cache's dtype)."""
    if selector in SUMMARY_FORMATS:
        return summary_bytes_per_token(head_dim, selector) / (2 * head_dim * elem)
    return 0.5


def relative_bytes_at(relative_bytes, selector: str, head_dim: int, elem: int, to_elem: int):
    """``stats["relative_bytes"]`` of a cache of ``elem`` bytes per element, recounted for one
    of ``to_elem`` (e.g. a float32 CPU run counted as the bf16 cache a GPU would hold).

    The K/V rows' share (rows / n) does not depend on the element size; a summary's does
    (its size is fixed in bytes). Assumes the selector ran (a non-empty heavy set), and
    counts int3_channel's block parameters amortised over the block."""
    return (relative_bytes - selector_share(selector, head_dim, elem)
            + selector_share(selector, head_dim, to_elem))
