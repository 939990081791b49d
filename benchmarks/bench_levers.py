"""The pilot levers of the density diet, measured one at a time with the coverage machinery.

    python benchmarks/bench_levers.py                   # synthetic families + SmolLM2 if installed
    python benchmarks/bench_levers.py --no-model --trials 64

Levers (everything else as tests/coverage/test_coverage.py sets it: ratio rule, heavy 5%,
sink = local = 16 on the synthetic families, 128 on SmolLM2, GQA-shared lists):
  a  base_rate=0.05                    the pilot as 5% of the residual, not reused
  b  base_rate=128                     the pilot as a count
  c  base_rate=128, reuse_pilot=True   ... and its draws counted in the final estimate
                                       (today's defaults)
  h02, h01, h256, h512, h1024          c with heavy = 2% / 1% of n, or 256 / 512 / 1024 tokens
  h10, h2048, h4096                    ... 10% of n, 2048 / 4096 tokens
  p                                    c with per-head lists (share_gqa=False)
  u, u02, u01                          c with gqa_heavy="union" (heavy 5% / 2% / 1% per head)
  t                                    c with tail="chi2" (effective-dimension tail)
  a10                                  c with an adaptive heavy size per list:
                                       heavy_candidates = 1.25 / 2.5 / 5 / 10% of n
  a10t                                 a10 with tail="chi2"
per selector (oracle, int4) and (epsilon, delta). For each: the violation rate (mean over
heads and seeds, and the worst head's), mean relative_bytes and density, and whether the
coverage tests' criteria hold (total violations and per-head violations within the binomial
quantiles at false-alarm level 1e-3, Bonferroni over heads). JSON out and a printed table.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vattention.config import VAttentionConfig
from vattention.coverage import FAMILIES, binomial_upper, measure, synthetic_heads

LEVERS = {
    "a": {"base_rate": 0.05, "reuse_pilot": False},
    "b": {"base_rate": 128, "reuse_pilot": False},
    "c": {"base_rate": 128, "reuse_pilot": True},
    # Heavy set sizing (with c's pilot): a smaller fraction, or a token count.
    "h02": {"heavy": 0.02},
    "h01": {"heavy": 0.01},
    "h256": {"heavy": 256},
    "h512": {"heavy": 512},
    "h1024": {"heavy": 1024},
    "h10": {"heavy": 0.1},
    "h2048": {"heavy": 2048},
    "h4096": {"heavy": 4096},
    # GQA-shared lists: the union of each head's own top-`heavy` (gqa_heavy="union").
    "p": {"share_gqa": False},
    "u": {"gqa_heavy": "union"},
    "u02": {"gqa_heavy": "union", "heavy": 0.02},
    "u01": {"gqa_heavy": "union", "heavy": 0.01},
    # The ratio rule's tail: chi-square with the pilot's effective dimension.
    "t": {"tail": "chi2"},
    # Adaptive heavy size: per list the cheapest of nested top-m candidates (heavy_size.py).
    "a10": {"heavy_candidates": (0.0125, 0.025, 0.05, 0.1)},
    "a10t": {"heavy_candidates": (0.0125, 0.025, 0.05, 0.1), "tail": "chi2"},
}
FALSE_ALARM = 1e-3


def synthetic_cases(lengths, heads):
    for family in FAMILIES:
        for length in lengths:
            q, k, v = synthetic_heads(family, heads, length, 64,
                                      torch.Generator().manual_seed(length))
            yield f"{family}/n={length}", q, k, v, None


def gqa_cases(lengths, kind):
    """issue 9's GQA case: 2 KV heads with 4 query heads each. "dissimilar": independent
    q = 3 randn(64) per head; "similar": one such direction per group plus 0.3 randn(64).
    k, v = randn (v + 0.3). Decoded with sink = local = 16, like the synthetic families."""
    for length in lengths:
        g = torch.Generator().manual_seed(length)
        base = 3 * torch.randn(1, 2, 1, 64, generator=g)
        own = 3 * torch.randn(1, 2, 4, 64, generator=g)
        q = (own if kind == "dissimilar" else base + 0.1 * own).reshape(1, 8, 64)
        k = torch.randn(1, 2, length, 64, generator=g)
        v = torch.randn(1, 2, length, 64, generator=g) + 0.3
        yield f"gqa_{kind}/n={length}", q, k, v, None


def capture_cases(paths):
    """Records saved by benchmarks/capture_gemma3.py --save (or a list of smollm2 capture
    records saved with torch.save): each record's heads decoded as one [1, Hq, D] case."""
    for path in paths:
        for item in torch.load(path, weights_only=False):
            name = f"{Path(path).stem}/L{item.get('layer', '?')}/p{item.get('position', '?')}"
            yield name, item["q"][None], item["k"][None], item["v"][None], item["scale"]


def smollm2_cases(n_tokens, positions):
    from vattention.models import smollm2

    for item in smollm2.capture_decode_attention(n_tokens=n_tokens, positions=positions):
        yield (f"smollm2/L{item['layer']}/p{item['position']}", item["q"][None], item["k"][None],
               item["v"][None], item["scale"])


def covered(violations, trials, delta):
    """The coverage tests' criteria over these heads: (passes, per-head allowance)."""
    heads = violations.numel()
    total_allowed = binomial_upper(heads * trials, delta, FALSE_ALARM)
    per_head_allowed = binomial_upper(trials, delta, FALSE_ALARM / heads)
    return (int(violations.sum()) <= total_allowed and int(violations.max()) <= per_head_allowed,
            per_head_allowed)


def summarise(results, delta, per_case):
    """per_case: judge each case's heads on their own (the synthetic tests do, one test per
    family and length); otherwise all heads together (the SmolLM2 tests)."""
    violations = torch.cat([c.violations for c in results])
    trials = results[0].trials
    heads = violations.numel()
    if per_case:
        verdicts = [covered(c.violations, trials, delta) for c in results]
        passes = all(ok for ok, _ in verdicts)
        over = sum(int((c.violations > allowed).sum()) for c, (_, allowed) in zip(results, verdicts))
    else:
        passes, allowed = covered(violations, trials, delta)
        over = int((violations > allowed).sum())
    return {"violation_rate": float(violations.sum()) / (heads * trials),
            "worst_head_rate": float(violations.max()) / trials,
            "heads": heads,
            "heads_over_chance": over,
            "passes": bool(passes),
            "relative_bytes": float(torch.cat([c.relative_bytes for c in results]).mean()),
            "density": float(torch.cat([c.density for c in results]).mean()),
            "mean_error": float(torch.cat([c.mean_error for c in results]).mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--selectors", default="oracle,int4")
    parser.add_argument("--settings", default="0.05:0.05,0.1:0.1")
    # The defaults are tests/coverage/test_coverage.py's, so a "passes" here is its verdict.
    parser.add_argument("--trials", type=int, default=160, help="seeds per synthetic head")
    parser.add_argument("--model-trials", type=int, default=48, help="seeds per SmolLM2 head")
    parser.add_argument("--lengths", default="512,4096")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--model-tokens", type=int, default=4096)
    parser.add_argument("--model-positions", default="-1,-2049")
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--gqa", action="store_true",
                        help="also the GQA sources: 4 dissimilar / similar query heads per KV "
                             "head (gqa_cases), at --gqa-lengths")
    parser.add_argument("--gqa-lengths", default="4096,20000")
    parser.add_argument("--captures", default="",
                        help="comma-separated capture files (torch.save'd records), each a "
                             "source of its own, decoded with sink = local = 128")
    parser.add_argument("--capture-trials", type=int, default=16, help="seeds per captured head")
    parser.add_argument("--json", default="benchmarks/results/levers.json")
    args = parser.parse_args(argv)

    settings = [tuple(float(x) for x in s.split(":")) for s in args.settings.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    sources = {}
    if not args.no_synthetic:
        sources["synthetic"] = (list(synthetic_cases(lengths, args.heads)), args.trials, 16)
    if args.gqa:
        gqa_lengths = [int(x) for x in args.gqa_lengths.split(",")]
        for kind in ("dissimilar", "similar"):
            sources[f"gqa_{kind}"] = (list(gqa_cases(gqa_lengths, kind)), args.trials, 16)
    for path in filter(None, args.captures.split(",")):
        sources[Path(path).stem] = (list(capture_cases([path])), args.capture_trials, 128)
    if not args.no_model:
        from vattention.models import smollm2

        if smollm2.is_available():
            positions = tuple(int(x) for x in args.model_positions.split(","))
            sources["smollm2"] = (list(smollm2_cases(args.model_tokens, positions)),
                                  args.model_trials, 128)
        else:
            print("SmolLM2 extra not installed: synthetic heads only", file=sys.stderr)

    report = []
    print(f"{'source':9s} {'lever':5s} {'selector':8s} {'eps':>5s} {'delta':>5s} {'viol':>7s} "
          f"{'worst':>6s} {'bad':>4s} {'pass':>5s} {'rel.bytes':>9s} {'density':>8s} "
          f"{'time':>5s}")
    for source, (cases, trials, edge) in sources.items():
        for selector in args.selectors.split(","):
            for epsilon, delta in settings:
                for lever in args.levers.split(","):
                    base = dict(sink=edge, local=edge, heavy=0.05, epsilon=epsilon,
                                delta=delta, rule="ratio", selector=selector)
                    cfg = VAttentionConfig(**{**base, **LEVERS[lever]})
                    start = time.time()
                    results = [measure(q, k, v, cfg, trials=trials, seed=i, scale=scale)
                               for i, (_, q, k, v, scale) in enumerate(cases)]
                    row = {"source": source, "lever": lever, **LEVERS[lever],
                           "selector": selector, "epsilon": epsilon, "delta": delta,
                           "trials_per_head": trials,
                           **summarise(results, delta,
                                        per_case=source == "synthetic" or source.startswith("gqa"))}
                    report.append(row)
                    print(f"{source:9s} {lever:5s} {selector:8s} {epsilon:5.2f} {delta:5.2f} "
                          f"{row['violation_rate']:7.4f} {row['worst_head_rate']:6.3f} "
                          f"{row['heads_over_chance']:4d} {str(row['passes']):>5s} "
                          f"{row['relative_bytes']:9.3f} {row['density']:8.3f} "
                          f"{time.time() - start:4.0f}s", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
