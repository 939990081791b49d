"""Bytes per decode step, per selector and rule, on real attention: density, relative bytes,
violation rate (mean and worst head), the selector's mass recall against the oracle, and
next-token KL against dense over a teacher-forced continuation, against top-k alone and
uniform sampling alone at equal relative bytes.

    python benchmarks/bench_bytes.py                       # SmolLM2 at 7K, Gemma-3 global at 8K, KL at 8K
    python benchmarks/bench_bytes.py --gemma-tokens 8192,16384,32768 --trials 16
    python benchmarks/bench_bytes.py --only-kl --kl-tokens 8192,32768 --kl-steps 24

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

Next-token KL (``--kl-tokens``): Gemma-3-270M prefills ``n`` tokens of real text (dense),
then the next ``--kl-steps`` tokens of the same text are fed one by one (teacher forcing:
every method sees the same tokens). Each method decodes in its own batch row with its own
KV cache, through the transformers integration (sliding-window layers dense, the global
layers through the method): dense; vattention at ``VAttentionConfig(epsilon, delta,
selector=s)`` (every other field at its default) for each setting and selector; and for
each of those a top-k alone and a uniform sample alone matched to the bytes that
vattention row read at that step, layer and KV head (at the ``--dtype`` byte count):
top-k is charged its selector too (ranked by exact logits it reads all of K, 0.5 of dense;
ranked by the int4 summary it reads the summary), so it gets ``(bytes - selector) * n``
rows; uniform reads no selector and gets ``bytes * n`` rows (both include sink + local,
as in ``vattention.baselines``). Per step: KL(dense || method) of the next-token
distributions. The model runs in float32 (CPU); bytes are counted at ``--dtype``.

Writes JSON (benchmarks/results/bytes.json), prints tables, and plots relative bytes
against context per selector (benchmarks/results/bytes.png, when matplotlib is there).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from vattention import VAttentionConfig, baselines, decode  # noqa: E402
from vattention.coverage import measure, selector_share  # noqa: E402
from vattention.key_summary import build_key_summary, dequantize_torch  # noqa: E402

H100_COPY_BYTES_PER_S = 3.0e12
SELECTORS = ("oracle", "int4")
SETTINGS = ((0.05, 0.05), (0.1, 0.1))


def mass_recall(q, k, v, cfg, scale):
    """Per query head: oracle top-k softmax mass kept by cfg's selector's heavy set."""
    _, stats = decode(q, k, v, cfg, scale=scale, seed=0, return_stats=True,
                      key_summary=(None if cfg.selector == "oracle"
                                   else build_key_summary(k, cfg.selector)))
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
            cfg = VAttentionConfig(epsilon=eps, delta=delta, selector=selector,
                                   **(config or {}))
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


# --------------------------------------------------------------------------- next-token KL

class MatchedMethods:
    """One global layer's decode method for every batch row: row m runs methods[m].

    methods: ("dense",), ("vattention", cfg) or (baseline, selector, index of the
    vattention row it is matched to), baseline "topk" or "uniform". Baselines get, per KV
    head, the rows that spend what the matched vattention row read in this step (bytes at
    `elem` bytes per element). `bytes[m]` collects each step's mean relative bytes.
    """

    def __init__(self, methods, elem):
        self.methods, self.elem = methods, elem
        self.bytes = [[] for _ in methods]

    def decode(self, q, k, v, seq_lens=None, scale=None, seed=None, return_stats=False):
        if seq_lens is not None or q.shape[0] != len(self.methods):
            raise ValueError("MatchedMethods expects one unpadded batch row per method")
        n, dim = k.shape[2], k.shape[3]
        kv_heads, group = k.shape[1], q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        matched = {}
        for m, method in enumerate(self.methods):
            qm, km, vm = q[m:m + 1], k[m:m + 1], v[m:m + 1]
            if method[0] == "dense":
                out[m:m + 1] = torch.nn.functional.scaled_dot_product_attention(
                    qm[:, :, None], km, vm, scale=scale, enable_gqa=True)[:, :, 0]
                self.bytes[m].append(1.0)
            elif method[0] == "vattention":
                cfg = method[1]
                om, stats = decode(qm, km, vm, cfg, scale=scale, seed=seed, return_stats=True)
                out[m:m + 1] = om
                # decode counts at the run's dtype; the selector's share is what changes
                # with the element size, the K/V rows' share (rows / n) does not.
                rows_share = stats["relative_bytes"][0].double().view(kv_heads, group)[:, 0] - \
                    selector_share(cfg.selector, dim, km.element_size())
                if int(stats["heavy_indices"].shape[-1]) == 0:
                    raise ValueError("no heavy set: the selector did not run")
                matched[m] = (rows_share, cfg)
                self.bytes[m].append(float(rows_share.mean())
                                     + selector_share(cfg.selector, dim, self.elem))
            else:
                name, selector, of = method
                rows_share, cfg = matched[of]
                target = rows_share + selector_share(cfg.selector, dim, self.elem)
                spend = target - (selector_share(selector, dim, self.elem)
                                  if name == "topk" else 0.0)
                counts = torch.round(spend.clamp(min=0) * n).to(torch.int64)
                counts = counts.repeat_interleave(group)[None]              # [1, Hq]
                kwargs = dict(sink=cfg.sink, local=cfg.local, scale=scale,
                              share_gqa=cfg.share_gqa, return_selection=True)
                if name == "topk":
                    rank_k = (None if selector == "oracle" else
                              dequantize_torch(build_key_summary(km, selector)).to(km.dtype))
                    om, sel = baselines.topk_attention(qm, km, vm, counts, rank_k=rank_k,
                                                       **kwargs)
                    share = selector_share(selector, dim, self.elem)
                else:
                    om, sel = baselines.uniform_attention(qm, km, vm, counts, seed=seed,
                                                          **kwargs)
                    share = 0.0
                out[m:m + 1] = om
                # what it actually read (sink + local are read even past the match)
                self.bytes[m].append(float(sel.read.sum(-1).double().mean()) / n + share)
        return (out, {}) if return_stats else out


def kl_methods(selectors, settings, config=None):
    methods, labels = [("dense",)], ["dense"]
    for eps, delta in settings:
        for selector in selectors:
            cfg = VAttentionConfig(epsilon=eps, delta=delta, selector=selector,
                                   **(config or {}))
            of = len(methods)
            methods.append(("vattention", cfg))
            labels.append(f"vattention {selector} ({eps},{delta})")
            methods.append(("topk", selector, of))
            labels.append(f"top-k [{selector} ranking] @ vattention {selector} ({eps},{delta})")
            methods.append(("uniform", None, of))
            labels.append(f"uniform @ vattention {selector} ({eps},{delta})")
    return methods, labels


def next_token_kl(n, args, elem, log=print):
    """Teacher-forced next-token KL(dense || method) on Gemma-3-270M at context n."""
    from vattention.integrations import transformers as vt
    from vattention.models import gemma3

    model, tokenizer = gemma3.load_gemma3(torch.float32)
    ids = gemma3.token_ids(tokenizer, n + args.kl_steps + 1)
    methods, labels = kl_methods(SELECTORS, SETTINGS, args.config)
    count = len(methods)
    t0 = time.time()
    cache = gemma3.prefill(model, ids[:n])
    prefill_s = time.time() - t0
    log(f"[kl] Gemma-3-270M prefill of {n} tokens: {prefill_s:.0f} s; {count} methods x "
        f"{args.kl_steps} teacher-forced steps")
    cache.batch_repeat_interleave(count)
    per_layer = {}

    def entry(layer):
        per_layer[layer] = MatchedMethods(methods, elem)
        return per_layer[layer]

    vt.configure(model, entry, seed=args.seed)
    cache_arg = ("cache" if "cache" in __import__("inspect").signature(model.forward).parameters
                 else "past_key_values")
    kl = [[] for _ in methods]
    agree = [[] for _ in methods]
    t0 = time.time()
    try:
        with torch.no_grad():
            for t in range(args.kl_steps):
                pos = torch.full((count, 1), n + t)
                token = ids[n + t].expand(count)[:, None]
                logits = model(input_ids=token, position_ids=pos, cache_position=pos[0],
                               use_cache=True, logits_to_keep=1,
                               **{cache_arg: cache}).logits[:, -1].double()
                logp = torch.log_softmax(logits, dim=-1)
                dense = logp[0]
                for m in range(count):
                    kl[m].append(float((dense.exp() * (dense - logp[m])).sum()))
                    agree[m].append(bool(logp[m].argmax() == dense.argmax()))
    finally:
        vt.disable(model, "sdpa")
    steps_s = time.time() - t0
    layers = sorted(lay for lay, mm in per_layer.items() if mm.bytes[0])
    if tuple(layers) != gemma3.global_layers(model):
        raise RuntimeError(f"expected the global layers {gemma3.global_layers(model)} to run "
                           f"the methods, got {layers}")
    rows = []
    for m, label in enumerate(labels):
        rel = [sum(per_layer[lay].bytes[m]) / len(per_layer[lay].bytes[m]) for lay in layers]
        method = methods[m]
        rows.append({
            "model": "gemma3", "tokens": n, "steps": args.kl_steps, "method": label,
            "kind": method[0],
            "selector": (method[1].selector if method[0] == "vattention" else
                         method[1] if method[0] == "topk" else None),
            "config": repr(method[1]) if method[0] == "vattention" else None,
            "relative_bytes": sum(rel) / len(rel),
            "relative_bytes_per_layer": dict(zip(layers, rel)),
            "mean_kl": sum(kl[m]) / len(kl[m]), "max_kl": max(kl[m]), "kl_per_step": kl[m],
            "agreement": sum(agree[m]) / len(agree[m]),
            "prefill_seconds": prefill_s, "steps_seconds": steps_s,
        })
        log(f"[kl] n={n:6d} {label:55s} relB {rows[-1]['relative_bytes']:.3f} "
            f"KL {rows[-1]['mean_kl']:.2e} (max {rows[-1]['max_kl']:.2e}) "
            f"argmax agree {rows[-1]['agreement']:.2f}", flush=True)
    log(f"[kl] {args.kl_steps} steps in {steps_s:.0f} s")
    return rows


def print_kl_table(rows):
    print("\n| Gemma n | method | relative bytes | mean KL(dense \\|\\| method) | max KL | "
          "argmax agrees |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "dense":
            continue
        print(f"| {r['tokens']} | {r['method']} | {r['relative_bytes']:.3f} | "
              f"{r['mean_kl']:.2e} | {r['max_kl']:.2e} | {r['agreement']:.2f} |")


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
    parser.add_argument("--kl-tokens", default="8192",
                        help="comma-separated Gemma contexts for the next-token KL (empty: none)")
    parser.add_argument("--kl-steps", type=int, default=24,
                        help="teacher-forced continuation tokens per context")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=json.loads, default={},
                        help='other VAttentionConfig fields as JSON, e.g. \'{"adaptive_heavy": true}\'')
    parser.add_argument("--captures", default="",
                        help="comma-separated records saved by capture_gemma3.py --save (or a "
                             "torch.save'd SmolLM2 capture) to measure instead of capturing; "
                             "the file's stem names the model")
    parser.add_argument("--only-kl", action="store_true",
                        help="only the next-token KL (no bytes / coverage records)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bytes.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    dtype = getattr(torch, args.dtype)
    positions = tuple(int(p) for p in args.positions.split(","))
    rows = []
    if args.only_kl:
        args.skip_smollm2 = args.skip_gemma = True
    for path in filter(None, args.captures.split(",")):
        records = torch.load(path, weights_only=False)
        rows += run_model(pathlib.Path(path).stem, records, args, dtype)
    if args.captures:
        args.skip_smollm2 = args.skip_gemma = True
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

    kl_rows = []
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in (int(x) for x in args.kl_tokens.split(",") if x):
        kl_rows += next_token_kl(n, args, torch.finfo(dtype).bits // 8)
        # written after each context: a 32K run is long
        out.write_text(json.dumps({"dtype": args.dtype, "rows": rows, "kl": kl_rows}, indent=1))
    out.write_text(json.dumps({"dtype": args.dtype, "rows": rows, "kl": kl_rows}, indent=1))
    if kl_rows:
        print_kl_table(kl_rows)
    if not rows:
        return kl_rows
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
