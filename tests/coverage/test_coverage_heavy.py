"""The promise with the heavy-set levers. GQA-shared lists whose heavy set is the union of
each head's own top-k (VAttentionConfig(gqa_heavy="union")): on dissimilar heads sharing a
KV head (issue 9's GQA case, where the group's max-log-probability heavy set falls back to
exact attention), on near-identical heads (the common real case), and on SmolLM2's real
attention (3 query heads per KV head). The adaptive heavy size (heavy_candidates): on the
synthetic families and SmolLM2, since its choice reuses the pilot that sizes the budget (a
stopping rule, docs/algorithm.md "Adaptive heavy size"). Criteria and machinery are
test_coverage.py's."""
import pytest
import torch

from tests.coverage.test_coverage import (HEADS, MODEL_TRIALS, SELECTORS, SETTINGS,
                                          TRIALS as FAMILY_TRIALS, assert_covered,
                                          assert_violations_covered, measure_model,
                                          smollm2_heads)
from tests.helpers import requires_model
from vattention.config import VAttentionConfig
from vattention.coverage import FAMILIES, measure, synthetic_heads

KV_HEADS, GROUP, TRIALS = 2, 4, 160

__all__ = ["smollm2_heads"]   # the module-scoped fixture, shared with test_coverage.py


def gqa_heads(kind, length, seed):
    """q [1, KV_HEADS * GROUP, 64], k, v [1, KV_HEADS, length, 64]: "dissimilar" heads are
    independent q = 3 randn(64); "similar" ones one such direction plus 0.3 randn(64)."""
    g = torch.Generator().manual_seed(seed)
    base = 3 * torch.randn(1, KV_HEADS, 1, 64, generator=g)
    own = 3 * torch.randn(1, KV_HEADS, GROUP, 64, generator=g)
    q = own if kind == "dissimilar" else base + 0.1 * own
    k = torch.randn(1, KV_HEADS, length, 64, generator=g)
    v = torch.randn(1, KV_HEADS, length, 64, generator=g) + 0.3
    return q.reshape(1, KV_HEADS * GROUP, 64), k, v


@pytest.mark.slow
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("kind", ["dissimilar", "similar"])
def test_union_heavy_keeps_the_promise_on_gqa_heads(kind, length, epsilon, delta, selector):
    q, k, v = gqa_heads(kind, length, seed=length + (kind == "similar"))
    cfg = VAttentionConfig(sink=16, local=16, heavy=0.05, epsilon=epsilon, delta=delta,
                           selector=selector, gqa_heavy="union")
    coverage = measure(q, k, v, cfg, trials=TRIALS, seed=2)
    assert_covered(coverage, delta, f"union {selector} {kind} n={length} ({epsilon}, {delta})")


@pytest.mark.slow
@pytest.mark.model
@requires_model
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
def test_union_heavy_keeps_the_promise_on_smollm2(smollm2_heads, epsilon, delta):
    cfg = VAttentionConfig(sink=128, local=128, heavy=0.05, epsilon=epsilon, delta=delta,
                           selector="int4", gqa_heavy="union")
    violations, _ = measure_model(smollm2_heads, cfg)
    assert_violations_covered(violations, MODEL_TRIALS, delta, f"{cfg}")


# Nested candidates around the fixed default (5%): 1.25% ... 10% of n.
ADAPTIVE = (0.0125, 0.025, 0.05, 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
@pytest.mark.parametrize("length", [512, 4096])
@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_heavy_keeps_the_promise(family, length, epsilon, delta, selector):
    q, k, v = synthetic_heads(family, HEADS, length, 64, torch.Generator().manual_seed(length))
    cfg = VAttentionConfig(sink=16, local=16, heavy_candidates=ADAPTIVE, epsilon=epsilon,
                           delta=delta, selector=selector)
    coverage = measure(q, k, v, cfg, trials=FAMILY_TRIALS, seed=1)
    assert_covered(coverage, delta,
                   f"adaptive {selector} {family} n={length} ({epsilon}, {delta})")


@pytest.mark.slow
@pytest.mark.model
@requires_model
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
def test_adaptive_heavy_keeps_the_promise_on_smollm2(smollm2_heads, epsilon, delta):
    cfg = VAttentionConfig(sink=128, local=128, heavy_candidates=ADAPTIVE, epsilon=epsilon,
                           delta=delta, selector="int4")
    violations, _ = measure_model(smollm2_heads, cfg)
    assert_violations_covered(violations, MODEL_TRIALS, delta, f"{cfg}")
