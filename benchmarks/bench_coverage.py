"""Coverage report: violation rate and density of every budget rule, synthetic and real heads.

    python benchmarks/bench_coverage.py                 # synthetic families + SmolLM2 if installed
    python benchmarks/bench_coverage.py --no-model --trials 64

For each rule and (epsilon, delta): the violation rate P(||O^ - O|| > eps ||O||) over all
heads and seeds, the worst head's rate, the number of heads whose violations are
improbable at rate delta (binomial tail < 1e-3 / heads), the mean density (K/V rows
read, pilot included) and the mean relative error. JSON out and a printed table.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vattention.config import VAttentionConfig
from vattention.coverage import FAMILIES, Coverage, binomial_upper, measure, synthetic_heads

RULES = ("ratio", "paper", "denominator")


def synthetic_cases(lengths, heads):
    for family in FAMILIES:
        for length in lengths:
            q, k, v = synthetic_heads(family, heads, length, 64,
                                      torch.Generator().manual_seed(length))
            yield f"{family}/n={length}", q, k, v, None


def smollm2_cases(n_tokens, positions):
    from vattention.models import smollm2

    for item in smollm2.capture_decode_attention(n_tokens=n_tokens, positions=positions):
        yield (f"smollm2/L{item['layer']}/p{item['position']}", item["q"][None], item["k"][None],
               item["v"][None], item["scale"])


def summarise(results, delta):
    violations = torch.cat([c.violations for c in results])
    trials = results[0].trials
    density = torch.cat([c.density for c in results])
    error = torch.cat([c.mean_error for c in results])
    allowed = binomial_upper(trials, delta, 1e-3 / violations.numel())
    return {"violation_rate": float(violations.sum()) / (violations.numel() * trials),
            "worst_head_rate": float(violations.max()) / trials,
            "heads": violations.numel(), "heads_over_chance": int((violations > allowed).sum()),
            "density": float(density.mean()), "mean_error": float(error.mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="0.05:0.05,0.1:0.1")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--lengths", default="512,4096")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--model-tokens", type=int, default=2048)
    parser.add_argument("--model-positions", default="-1,-257")
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--base-rate", type=float, default=0.05)
    parser.add_argument("--heavy", type=float, default=0.05)
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--local", type=int, default=128)
    parser.add_argument("--per-head-lists", action="store_true",
                        help="one index list per query head instead of one per GQA group")
    parser.add_argument("--json", default="benchmarks/results/coverage.json")
    args = parser.parse_args(argv)

    settings = [tuple(float(x) for x in s.split(":")) for s in args.settings.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    sources = {"synthetic": list(synthetic_cases(lengths, args.heads))}
    if not args.no_model:
        from vattention.models import smollm2

        if smollm2.is_available():
            positions = tuple(int(x) for x in args.model_positions.split(","))
            sources["smollm2"] = list(smollm2_cases(args.model_tokens, positions))
        else:
            print("SmolLM2 extra not installed: synthetic heads only", file=sys.stderr)

    report = []
    print(f"{'source':10s} {'rule':12s} {'eps':>5s} {'delta':>5s} {'viol':>7s} {'worst':>6s} "
          f"{'bad heads':>10s} {'density':>8s} {'err':>7s} {'time':>6s}")
    for source, cases in sources.items():
        for rule in args.rules.split(","):
            for epsilon, delta in settings:
                # Synthetic contexts are short: a small deterministic set keeps them sparse.
                small = source == "synthetic"
                cfg = VAttentionConfig(sink=16 if small else args.sink,
                                       local=16 if small else args.local, heavy=args.heavy,
                                       base_rate=args.base_rate, epsilon=epsilon, delta=delta,
                                       rule=rule, share_gqa=not args.per_head_lists)
                start = time.time()
                results = [measure(q, k, v, cfg, trials=args.trials, seed=i, scale=scale)
                           for i, (_, q, k, v, scale) in enumerate(cases)]
                row = {"source": source, "rule": rule, "epsilon": epsilon, "delta": delta,
                       "trials_per_head": args.trials, **summarise(results, delta),
                       "per_case": {name: c.summary() for (name, *_), c in zip(cases, results)}}
                report.append(row)
                print(f"{source:10s} {rule:12s} {epsilon:5.2f} {delta:5.2f} "
                      f"{row['violation_rate']:7.4f} {row['worst_head_rate']:6.3f} "
                      f"{row['heads_over_chance']:4d}/{row['heads']:<5d} {row['density']:8.3f} "
                      f"{row['mean_error']:7.4f} {time.time() - start:5.0f}s", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
