"""Bytes per decode step, per selector and rule, on real attention: density, relative bytes,
violation rate (mean and worst head) and the selector's mass recall against the oracle.

    python benchmarks/bench_bytes.py                       # SmolLM2 at 7K, Gemma-3 global at 8K
    python benchmarks/bench_bytes.py --gemma-tokens 8192,16384,32768 --trials 16

Real attention is captured from SmolLM2-135M (all 30 layers x 9 heads) and from
Gemma-3-270M's 3 global layers (4 heads each, D = 256), then cast to the cache dtype
(default bf16: bytes are counted at the cache's dtype). Each head is decoded `--trials`
times with fresh seeds; the reference is float64 dense attention of the same cast inputs.

relative_bytes is `stats["relative_bytes"]` (docs/api.md): bytes the kernels read in the
step for the KV group (selector included) over dense attention's K and V bytes. "mass
recall" is the share of the oracle top-k's softmax mass that the selector's heavy set
keeps, per head (1.0 for the oracle). The H100 time is a MODEL, not a measurement:
bytes / 3.0 TB/s (the device-copy bandwidth measured on an H100 before this project's
kernels), with dense attention's bytes beside it; launches and latency are ignored.

Writes JSON (benchmarks/results/bytes.json), prints a table, and plots relative bytes
against context per selector (benchmarks/results/bytes.png, when matplotlib is there).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from vattention import VAttentionConfig, decode  # noqa: E402
from vattention.coverage import measure  # noqa: E402
from vattention.key_summary import build_key_summary  # noqa: E402

H100_COPY_BYTES_PER_S = 3.0e12
SELECTORS = ("oracle", "int4")
SETTINGS = ((0.05, 0.05), (0.1, 0.1))


def mass_recall(q, k, v, cfg, scale):
    """Per query head: oracle top-k softmax mass kept by cfg's selector's heavy set."""
    _, stats = decode(q, k, v, cfg, scale=scale, seed=0, return_stats=True,
                      key_summary=build_key_summary(k) if cfg.selector == "int4" else None)
    chosen = stats["heavy_indices"][0]                      # [lists, heavy_max]
    _, oracle_stats = decode(q, k, v, cfg.replace(selector="oracle"), scale=scale, seed=0,
                             return_stats=True)
    best = oracle_stats["heavy_indices"][0]
    q_heads, kv_heads = q.shape[1], k.shape[1]
    group = q_heads // kv_heads
    logits = torch.einsum("hd,hnd->hn", q[0].double(),
                          k[0].double().repeat_interleave(group, 0)) * scale
    probs = torch.softmax(logits, dim=-1)
    recall = []
    for h in range(q_heads):
        lst = h // group if chosen.shape[0] == kv_heads else h
        pick, ref = chosen[lst], best[lst]
        pick, ref = pick[pick >= 0].long(), ref[ref >= 0].long()
        ref_mass = float(probs[h, ref].sum())
        recall.append(float(probs[h, pick].sum()) / ref_mass if ref_mass > 0 else 1.0)
    return recall


def run_model(name, records, args, dtype):
    rows = []
    for eps, delta in SETTINGS:
        for selector in SELECTORS:
            cfg = VAttentionConfig(epsilon=eps, delta=delta, selector=selector)
            t0 = time.time()
            viol = dens = rbytes = 0.0
            worst = 0.0
            heads = 0
            recalls = []
            for rec in records:
                q = rec["q"][None].to(dtype)
                k = rec["k"][None].to(dtype)
                v = rec["v"][None].to(dtype)
                cov = measure(q, k, v, cfg, trials=args.trials, seed=rec["layer"] * 7919 + 1,
                              scale=rec["scale"])
                n_heads = q.shape[1]
                heads += n_heads
                viol += float(cov.violations.sum())
                worst = max(worst, float(cov.violations.max()) / args.trials)
                dens += float(cov.density.sum())
                rbytes += float(cov.relative_bytes.sum())
                recalls += mass_recall(q, k, v, cfg, rec["scale"])
            n = records[0]["k"].shape[1]
            dense_bytes = 2 * records[0]["k"].shape[0] * n * records[0]["k"].shape[2] * \
                torch.finfo(dtype).bits // 8
            row = {
                "model": name, "tokens": n, "selector": selector, "rule": cfg.rule,
                "epsilon": eps, "delta": delta, "heads": heads, "trials": args.trials,
                "violation_rate": viol / (heads * args.trials), "worst_head_rate": worst,
                "density": dens / heads, "relative_bytes": rbytes / heads,
                "mass_recall_mean": sum(recalls) / len(recalls), "mass_recall_min": min(recalls),
                "model_dense_us_per_layer": dense_bytes / H100_COPY_BYTES_PER_S * 1e6,
                "model_vattention_us_per_layer":
                    rbytes / heads * dense_bytes / H100_COPY_BYTES_PER_S * 1e6,
                "seconds": time.time() - t0,
            }
            rows.append(row)
            print(f"{name:8s} n={n:6d} {selector:6s} ({eps},{delta}): viol {row['violation_rate']:.4f} "
                  f"worst {worst:.3f} density {row['density']:.3f} relB {row['relative_bytes']:.3f} "
                  f"recall {row['mass_recall_mean']:.3f} (min {row['mass_recall_min']:.3f}) "
                  f"[{row['seconds']:.0f}s]", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smollm2-tokens", type=int, default=7168)
    parser.add_argument("--gemma-tokens", default="8192",
                        help="comma-separated contexts for Gemma-3-270M's global layers")
    parser.add_argument("--positions", default="-1",
                        help="comma-separated query positions (negative: from the end)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-gemma", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bytes.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    dtype = getattr(torch, args.dtype)
    positions = tuple(int(p) for p in args.positions.split(","))
    rows = []
    if not args.skip_smollm2:
        from vattention.models import smollm2
        records = smollm2.capture_decode_attention(n_tokens=args.smollm2_tokens,
                                                   positions=positions)
        rows += run_model("smollm2", records, args, dtype)
    if not args.skip_gemma:
        from vattention.models import gemma3
        for n in (int(x) for x in args.gemma_tokens.split(",")):
            records = gemma3.capture_decode_attention(n_tokens=n, positions=positions)
            rows += run_model("gemma3", records, args, dtype)

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dtype": args.dtype, "rows": rows}, indent=1))
    print("\n| model | n | selector | (eps, delta) | violations | worst head | density | "
          "relative bytes | mass recall | H100 model: dense us / vattention us per layer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tokens']} | {r['selector']} | ({r['epsilon']}, {r['delta']}) | "
              f"{r['violation_rate']:.2%} | {r['worst_head_rate']:.2f} | {r['density']:.3f} | "
              f"{r['relative_bytes']:.3f} | {r['mass_recall_mean']:.3f} | "
              f"{r['model_dense_us_per_layer']:.2f} / {r['model_vattention_us_per_layer']:.2f} |")
    print("(H100 columns are a bytes model, bytes / 3.0 TB/s, not a measurement)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return rows
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in rows}):
        for selector in SELECTORS:
            for eps, delta in SETTINGS:
                pts = sorted((r["tokens"], r["relative_bytes"]) for r in rows
                             if r["model"] == model and r["selector"] == selector
                             and r["epsilon"] == eps)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=f"{model} {selector} ({eps},{delta})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("relative bytes (vs dense K+V)")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    return rows


if __name__ == "__main__":
    main()
