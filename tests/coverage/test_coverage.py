"""The promise, measured: P(||O^ - O|| > eps ||O||) <= delta on average and per head.

Each verified rule runs many independent trials (seeds) on every head of several
attention families, small contexts included. The allowed number of violations is
the binomial quantile at rate delta with a small false-alarm level, so a correct
rule fails these tests rarely and a rule that violates at 2x delta fails them
reliably. Per head, the level is split over the heads (Bonferroni): a few heads
failing on every call cannot hide behind a good average.
"""
import pytest
import torch

from tests.helpers import requires_model
from vattention.config import VAttentionConfig
from vattention.coverage import FAMILIES, binomial_upper, measure, synthetic_heads

FALSE_ALARM = 1e-3
HEADS, TRIALS = 8, 160
SETTINGS = [(0.05, 0.05), (0.1, 0.1)]
SELECTORS = ["oracle", "int4"]

# The pilot's settings (VAttentionConfig.base_rate, .reuse_pilot): the tests below that name
# no pilot run the defaults; each other setting that the README offers is tested on its own
# by the test_pilot_settings_* tests, so whatever the defaults are, every one is covered.
PILOTS = {"fraction": {"base_rate": 0.05, "reuse_pilot": False},
          "count": {"base_rate": 128, "reuse_pilot": False},
          "count+reuse": {"base_rate": 128, "reuse_pilot": True}}
_DEFAULT = VAttentionConfig()
DEFAULT_PILOT = next(name for name, pilot in PILOTS.items()
                     if all(getattr(_DEFAULT, f) == x for f, x in pilot.items()))
OTHER_PILOTS = [name for name in PILOTS if name != DEFAULT_PILOT]


def assert_violations_covered(violations, trials, delta, label):
    """violations [heads]: each head's violations in `trials` calls. The total and the worst
    head within the binomial quantiles at rate delta (false-alarm level FALSE_ALARM, split
    over the heads for the worst one)."""
    heads = violations.numel()
    total_allowed = binomial_upper(heads * trials, delta, FALSE_ALARM)
    per_head_allowed = binomial_upper(trials, delta, FALSE_ALARM / heads)
    total = int(violations.sum())
    assert total <= total_allowed, f"{label}: {total} violations > {total_allowed} allowed"
    worst = int(violations.max())
    assert worst <= per_head_allowed, (
        f"{label}: a head violated {worst}/{trials} times > {per_head_allowed} allowed")


def assert_covered(coverage, delta, label):
    assert_violations_covered(coverage.violations, coverage.trials, delta, label)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["ratio", "paper"])
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
@pytest.mark.parametrize("length", [512, 4096])
@pytest.mark.parametrize("family", FAMILIES)
def test_verified_rules_keep_their_promise(family, length, epsilon, delta, rule):
    q, k, v = synthetic_heads(family, HEADS, length, 64, torch.Generator().manual_seed(length))
    cfg = VAttentionConfig(sink=16, local=16, heavy=0.05, epsilon=epsilon, delta=delta,
                           rule=rule)
    coverage = measure(q, k, v, cfg, trials=TRIALS, seed=1)
    assert_covered(coverage, delta, f"{rule} {family} n={length} ({epsilon}, {delta})")


@pytest.mark.slow
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
@pytest.mark.parametrize("length", [512, 4096])
@pytest.mark.parametrize("family", FAMILIES)
def test_int4_selector_keeps_the_promise(family, length, epsilon, delta):
    # The selector only chooses the deterministic set, yet a selector that leaves heavy
    # tokens in the residual makes the pilot miss them: coverage is the int4 summary's test.
    q, k, v = synthetic_heads(family, HEADS, length, 64, torch.Generator().manual_seed(length))
    cfg = VAttentionConfig(sink=16, local=16, heavy=0.05, epsilon=epsilon, delta=delta,
                           selector="int4")
    coverage = measure(q, k, v, cfg, trials=TRIALS, seed=1)
    assert_covered(coverage, delta, f"int4 {family} n={length} ({epsilon}, {delta})")


@pytest.mark.slow
@pytest.mark.parametrize("pilot", OTHER_PILOTS)
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
@pytest.mark.parametrize("length", [512, 4096])
@pytest.mark.parametrize("family", FAMILIES)
def test_pilot_settings_keep_the_promise(family, length, epsilon, delta, selector, pilot):
    # Pilot reuse makes the sample size depend on the pilot's draws (a stopping rule): the
    # estimator is unbiased only asymptotically, so coverage decides whether it may ship.
    q, k, v = synthetic_heads(family, HEADS, length, 64, torch.Generator().manual_seed(length))
    cfg = VAttentionConfig(sink=16, local=16, heavy=0.05, epsilon=epsilon, delta=delta,
                           selector=selector, **PILOTS[pilot])
    coverage = measure(q, k, v, cfg, trials=TRIALS, seed=1)
    assert_covered(coverage, delta, f"{pilot} {selector} {family} n={length} ({epsilon}, {delta})")


@pytest.mark.slow
def test_ratio_samples_rather_than_reading_everything():
    # Coverage that comes from attending everything proves nothing: on the families where
    # a sample suffices, the ratio rule must actually sample, at a fraction of the context.
    for family in ("flat", "peaked", "heavy_tailed"):
        q, k, v = synthetic_heads(family, HEADS, 4096, 64, torch.Generator().manual_seed(4096))
        cfg = VAttentionConfig(sink=16, local=16, heavy=0.05, epsilon=0.05, delta=0.05)
        coverage = measure(q, k, v, cfg, trials=32, seed=2)
        assert float(coverage.density.mean()) < 0.35, family


@pytest.mark.slow
def test_denominator_rule_is_not_verified():
    # The authors' public rule bounds only the softmax denominator; on heads with a small
    # ||O|| its output error is far above epsilon. Documented, and kept true by this test.
    q, k, v = synthetic_heads("small_norm", HEADS, 4096, 64, torch.Generator().manual_seed(1))
    cfg = VAttentionConfig(sink=16, local=16, heavy=0.05, epsilon=0.05, delta=0.05,
                           rule="denominator")
    coverage = measure(q, k, v, cfg, trials=32, seed=3)
    assert coverage.rate > 0.5


# Real attention: SmolLM2-135M over Python's own documentation, every layer and head.
MODEL_TOKENS, MODEL_POSITIONS, MODEL_TRIALS = 4096, (-1, -2049), 48


@pytest.fixture(scope="module")
def smollm2_heads():
    from vattention.models import smollm2

    return smollm2.capture_decode_attention(n_tokens=MODEL_TOKENS, positions=MODEL_POSITIONS)


def measure_model(items, cfg, with_bytes=False, trials=MODEL_TRIALS, first_seed=0):
    """Coverage of cfg on captured heads (records of vattention.models' captures), `trials`
    seeds each: (violations, density[, relative_bytes]), one entry per query head."""
    results = [measure(it["q"][None], it["k"][None], it["v"][None], cfg, trials=trials,
                       seed=first_seed + i, scale=it["scale"]) for i, it in enumerate(items)]
    violations = torch.cat([c.violations for c in results])
    density = torch.cat([c.density for c in results])
    if with_bytes:
        return violations, density, torch.cat([c.relative_bytes for c in results])
    return violations, density


@pytest.mark.slow
@pytest.mark.model
@requires_model
@pytest.mark.parametrize("rule", ["ratio", "paper"])
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
def test_verified_rules_keep_their_promise_on_smollm2(smollm2_heads, rule, epsilon, delta):
    cfg = VAttentionConfig(sink=128, local=128, heavy=0.05, epsilon=epsilon, delta=delta,
                           rule=rule)
    violations, density = measure_model(smollm2_heads, cfg)
    heads = violations.numel()
    assert heads == 30 * 9 * len(MODEL_POSITIONS)
    assert_violations_covered(violations, MODEL_TRIALS, delta, f"{cfg}")
    if rule == "ratio":
        # Honest coverage at a real saving: well under half of the K/V rows are read.
        assert float(density.mean()) < 0.5


@pytest.mark.slow
@pytest.mark.model
@requires_model
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
def test_int4_selector_keeps_the_promise_on_smollm2(smollm2_heads, epsilon, delta):
    cfg = VAttentionConfig(sink=128, local=128, heavy=0.05, epsilon=epsilon, delta=delta,
                           selector="int4")
    violations, _, relative_bytes = measure_model(smollm2_heads, cfg, with_bytes=True)
    heads = violations.numel()
    assert heads == 30 * 9 * len(MODEL_POSITIONS)
    assert_violations_covered(violations, MODEL_TRIALS, delta, f"{cfg}")
    # What the summary is for: fewer bytes than the oracle, which reads all of K.
    oracle = cfg.replace(selector="oracle")
    _, _, oracle_bytes = measure_model(smollm2_heads[:6], oracle, with_bytes=True)
    assert float(relative_bytes[:oracle_bytes.numel()].mean()) < float(oracle_bytes.mean())


@pytest.mark.slow
@pytest.mark.model
@requires_model
@pytest.mark.parametrize("pilot", OTHER_PILOTS)
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
def test_pilot_settings_keep_the_promise_on_smollm2(smollm2_heads, epsilon, delta, selector,
                                                    pilot):
    cfg = VAttentionConfig(sink=128, local=128, heavy=0.05, epsilon=epsilon, delta=delta,
                           selector=selector, **PILOTS[pilot])
    violations, _ = measure_model(smollm2_heads, cfg)
    assert_violations_covered(violations, MODEL_TRIALS, delta, f"{cfg}")


@pytest.mark.slow
@pytest.mark.model
@requires_model
def test_denominator_rule_fails_real_heads(smollm2_heads):
    cfg = VAttentionConfig(epsilon=0.05, delta=0.05, rule="denominator")
    violations, _ = measure_model(smollm2_heads, cfg)
    per_head_allowed = binomial_upper(MODEL_TRIALS, 0.05, FALSE_ALARM / violations.numel())
    # Some heads violate on (nearly) every call: the average hides them, the per-head test
    # does not.
    assert int((violations > per_head_allowed).sum()) >= 10


# Real attention at long context: Gemma-3-270M's global layers (5, 11, 17; 4 query heads on
# 1 KV head, D = 256) over standard-library source. One chunked prefill of GEMMA_TOKENS
# serves every test below (about 7 s on two cores, after the model's load); the trials per
# head are fewer than SmolLM2's because a Gemma head is 4x the bytes and the budget is set
# by the whole suite's time, not by this test alone.
GEMMA_TOKENS, GEMMA_POSITIONS = 4096, (-1, -1025)
GEMMA_TRIALS = {"ratio": 24, "paper": 12}


def _gemma3_available() -> bool:
    from vattention.models import gemma3

    return gemma3.is_available()


requires_gemma3 = pytest.mark.skipif(not _gemma3_available(),
                                     reason="Gemma-3-270M (the gemma3 extra) not installed")


@pytest.fixture(scope="module")
def gemma3_heads():
    from vattention.models import gemma3

    return gemma3.capture_decode_attention(n_tokens=GEMMA_TOKENS, positions=GEMMA_POSITIONS)


@pytest.mark.slow
@pytest.mark.model
@requires_gemma3
@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("rule", ["ratio", "paper"])
@pytest.mark.parametrize("epsilon,delta", SETTINGS)
def test_verified_rules_keep_their_promise_on_gemma3(gemma3_heads, rule, epsilon, delta,
                                                     selector):
    # Every field but the promise, the rule and the selector at its default: what a user of
    # VAttentionConfig(epsilon, delta) gets on a long-context model.
    cfg = VAttentionConfig(epsilon=epsilon, delta=delta, rule=rule, selector=selector)
    trials = GEMMA_TRIALS[rule]
    violations, density = measure_model(gemma3_heads, cfg, trials=trials, first_seed=100)
    assert violations.numel() == 3 * 4 * len(GEMMA_POSITIONS)
    assert_violations_covered(violations, trials, delta, f"{cfg}")
    if rule == "ratio" and epsilon == 0.1:
        # Not by reading everything: at (0.1, 0.1) the ratio rule samples (density 0.44 with
        # the oracle and 0.60 with int4 when this test was written; exact would be 1).
        assert float(density.mean()) < 0.8, float(density.mean())
