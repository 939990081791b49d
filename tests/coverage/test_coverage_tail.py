"""The chi-square tail (VAttentionConfig(tail="chi2")) keeps the promise: the criteria and
machinery of tests/coverage/test_coverage.py, on the synthetic families, SmolLM2 and
Gemma-3-270M, for every selector; and it samples fewer tokens than the normal tail."""
import pytest
import torch

from tests.coverage.test_coverage import (GEMMA_POSITIONS, HEADS, MODEL_POSITIONS,
                                          MODEL_TRIALS, SELECTORS, SETTINGS, TRIALS,
                                          assert_covered, assert_violations_covered,
                                          measure_model, requires_gemma3)
# The model fixtures: imported, pytest finds them in this module.
from tests.coverage.test_coverage import gemma3_heads, smollm2_heads  # noqa: F401
from tests.helpers import requires_model
from vattention.config import VAttentionConfig
from vattention.coverage import FAMILIES, measure, synthetic_heads


@pytest.mark.slow
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
@pytest.mark.parametrize("length", [512, 4096])
@pytest.mark.parametrize("family", FAMILIES)
def test_chi2_tail_keeps_the_promise(family, length, epsilon, delta, selector):
    q, k, v = synthetic_heads(family, HEADS, length, 64, torch.Generator().manual_seed(length))
    cfg = VAttentionConfig(sink=16, local=16, heavy=0.05, epsilon=epsilon, delta=delta,
                           selector=selector, tail="chi2")
    coverage = measure(q, k, v, cfg, trials=TRIALS, seed=1)
    assert_covered(coverage, delta, f"chi2 {selector} {family} n={length} ({epsilon}, {delta})")


@pytest.mark.slow
def test_chi2_tail_samples_fewer_tokens():
    # Same heads, same seeds: the normal tail's budget times q_h / z^2 <= 1, so never more
    # tokens, and fewer where the budget is not at the exact fallback or min_samples.
    q, k, v = synthetic_heads("flat", HEADS, 4096, 64, torch.Generator().manual_seed(4096))
    cfg = VAttentionConfig(sink=16, local=16, heavy=0.05, epsilon=0.05, delta=0.05)
    normal = measure(q, k, v, cfg, trials=32, seed=1)
    chi2 = measure(q, k, v, cfg.replace(tail="chi2"), trials=32, seed=1)
    assert (chi2.density <= normal.density + 1e-12).all()
    # (flat: 0.156 -> 0.097 when this test was written)
    assert float(chi2.density.mean()) < 0.8 * float(normal.density.mean())


@pytest.mark.slow
@pytest.mark.model
@requires_model
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
def test_chi2_tail_keeps_the_promise_on_smollm2(smollm2_heads, epsilon, delta, selector):
    cfg = VAttentionConfig(sink=128, local=128, heavy=0.05, epsilon=epsilon, delta=delta,
                           selector=selector, tail="chi2")
    violations, density = measure_model(smollm2_heads, cfg)
    heads = violations.numel()
    assert heads == 30 * 9 * len(MODEL_POSITIONS)
    assert_violations_covered(violations, MODEL_TRIALS, delta, f"{cfg}")


@pytest.mark.slow
@pytest.mark.model
@requires_gemma3
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
def test_chi2_tail_keeps_the_promise_on_gemma3(gemma3_heads, epsilon, delta, selector):
    cfg = VAttentionConfig(epsilon=epsilon, delta=delta, selector=selector, tail="chi2")
    trials = 24
    violations, _ = measure_model(gemma3_heads, cfg, trials=trials, first_seed=100)
    assert violations.numel() == 3 * 4 * len(GEMMA_POSITIONS)
    assert_violations_covered(violations, trials, delta, f"{cfg}")
