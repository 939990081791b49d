"""python -m vattention.demo: vAttention decoding checked against dense attention.

With the ``models`` extra (SmolLM2-135M-Instruct, offline): one prefill over a long prompt
of real text, then greedy generation twice from the same KV cache, once with dense
attention and once with ``attn_implementation="vattention"``. Prints how many generated
tokens agree, the density and budget per layer, the measured error of every head of a
few layers at the last decode step against dense float64 attention, and the time per
token of both. Without the extra: one decode step on synthetic heads, per-head error,
density and budget.
"""
from __future__ import annotations

import argparse
import copy
import time
from statistics import median
from typing import Dict, List, Optional

import torch

from . import decode, reference
from .config import VAttentionConfig
from .coverage import synthetic_heads

PROBE_LAYERS = (3, 15, 27)


def _error(out, q, k, v, scale, seq_lens=None):
    exact = reference.dense(q, k, v, seq_lens=seq_lens, scale=scale)
    return (out.double() - exact).norm(dim=-1) / exact.norm(dim=-1)


def _head_table(rows, epsilon: float) -> None:
    """rows: (name, error [Hq], stats of one batch row) per input."""
    print(f"{'input':28s} {'head':>4s} {'rel. error':>10s} {'epsilon':>8s} {'density':>8s} "
          f"{'budget':>7s} {'residual':>8s}  mode")
    for name, error, stats in rows:
        for h in range(error.shape[0]):
            mode = "exact" if bool(stats["exact"][0, h]) else "sampled"
            print(f"{name:28s} {h:4d} {float(error[h]):10.4f} {epsilon:8.3f} "
                  f"{float(stats['density'][0, h]):8.3f} {int(stats['budget'][0, h]):7d} "
                  f"{int(stats['n_residual'][0, h]):8d}  {mode}")
    print("\nrel. error: ||O^ - O|| / ||O|| against dense float64 attention; density: fraction "
          "of the context's K/V rows read (deterministic set, pilot and sample).")


# --------------------------------------------------------------------------- synthetic

def synthetic_demo(cfg: VAttentionConfig, length: int, seed: int, device: torch.device) -> None:
    print(f"vAttention decode step, {cfg}\nsource: synthetic heads, context {length} tokens, "
          f"device {device}\n")
    rows = []
    for family in ("peaked", "heavy_tailed", "flat"):
        q, k, v = synthetic_heads(family, 4, length, 64, torch.Generator().manual_seed(0))
        out, stats = decode(q.to(device), k.to(device), v.to(device), cfg, seed=seed,
                            return_stats=True)
        rows.append((f"synthetic {family}", _error(out.cpu(), q, k, v, None)[0],
                     {n: t.cpu() for n, t in stats.items()}))
    _head_table(rows, cfg.epsilon)


# --------------------------------------------------------------------------- SmolLM2

class _Probe:
    """A decode method for a few layers: vattention.decode, keeping the last call's inputs."""

    def __init__(self, cfg: VAttentionConfig):
        self.cfg = cfg
        self.last: Optional[dict] = None

    def decode(self, q, k, v, seq_lens=None, scale=None, seed=None, return_stats=False):
        out, stats = decode(q, k, v, self.cfg, seq_lens=seq_lens, scale=scale, seed=seed,
                            return_stats=True)
        self.last = dict(q=q, k=k, v=v, seq_lens=seq_lens, scale=scale, out=out, stats=stats)
        return (out, stats) if return_stats else out


def _prompt(smollm2, tokenizer, n_tokens: int) -> torch.Tensor:
    """About n_tokens of real text, cut after the last paragraph break so the model goes on
    with a new paragraph rather than mid-table."""
    ids = smollm2._token_ids(tokenizer, n_tokens, None)
    tail = min(len(ids), 512)
    for back in range(tail):
        i = len(ids) - 1 - back
        if "\n\n" in tokenizer.decode(ids[i - 1:i + 1]):
            return ids[:i + 1]
    return ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _greedy(model, cache, token, steps: int, device: torch.device):
    """Greedy decoding of `steps` tokens from (cache, first token); returns (tokens, s/token)."""
    tokens: List[int] = [int(token)]
    times = []
    with torch.no_grad():
        for _ in range(steps - 1):
            _sync(device)
            start = time.perf_counter()
            out = model(token.view(1, 1), cache=cache, use_cache=True)
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))  # reads the token back: the step is complete
            times.append(time.perf_counter() - start)
    # The first steps warm up allocators and kernels.
    warm = times[2:] if len(times) > 4 else times
    return tokens, (median(warm) if warm else float("nan"))


def smollm2_demo(cfg: VAttentionConfig, n_tokens: int, new_tokens: int, seed: int,
                 device: torch.device, dtype: torch.dtype) -> None:
    from .integrations import transformers as vt
    from .models import smollm2

    print(f"vAttention in SmolLM2-135M-Instruct generation, {cfg}\n"
          f"prompt: about {n_tokens} tokens of real text (Python's documentation), {new_tokens} "
          f"new tokens, greedy, device {device}, {dtype}")
    model, tokenizer = smollm2.load_smollm2(dtype, "sdpa")
    model.to(device)
    ids = _prompt(smollm2, tokenizer, n_tokens)[None].to(device)
    n_tokens = ids.shape[1]
    try:
        with torch.no_grad():
            _sync(device)
            start = time.perf_counter()
            prefill = model(ids, use_cache=True, logits_to_keep=1)
            _sync(device)
            prefill_s = time.perf_counter() - start
        cache = prefill.cache if hasattr(prefill, "cache") else prefill.past_key_values
        first = prefill.logits[0, -1].argmax()
        print(f"prefill (dense) of {n_tokens} tokens: {prefill_s:.1f} s\n")

        dense_tokens, dense_s = _greedy(model, copy.deepcopy(cache), first, new_tokens, device)

        probes = {layer: _Probe(cfg) for layer in PROBE_LAYERS}
        vt.configure(model, lambda layer: probes.get(layer, cfg), seed=seed)
        with vt.collect_stats(model, keys=("density", "budget", "exact")) as stats:
            sparse_tokens, sparse_s = _greedy(model, cache, first, new_tokens, device)
    finally:
        vt.disable(model, "sdpa")

    agree = sum(a == b for a, b in zip(dense_tokens, sparse_tokens))
    diverge = next((i for i, (a, b) in enumerate(zip(dense_tokens, sparse_tokens)) if a != b),
                   None)
    print(f"generated tokens that agree with dense decoding: {agree}/{new_tokens}"
          + ("" if diverge is None else f" (first difference at token {diverge})"))
    print(f"  dense:       {tokenizer.decode(dense_tokens)!r}")
    print(f"  vattention:  {tokenizer.decode(sparse_tokens)!r}\n")

    print("per layer over all decode steps and heads (budget: sampled tokens per head):")
    print(f"{'layer':>5s} {'density':>8s} {'budget min':>10s} {'median':>7s} {'max':>6s} "
          f"{'exact':>6s}")
    summary: Dict[int, dict] = stats.summary()
    for layer, row in summary.items():
        print(f"{layer:5d} {row['density']:8.3f} {row['budget_min']:10.0f} "
              f"{row['budget_median']:7.0f} {row['budget_max']:6.0f} {row['exact']:6.2f}")
    mean_density = sum(r["density"] for r in summary.values()) / len(summary)
    print(f"mean density {mean_density:.3f} (context {n_tokens}-{n_tokens + new_tokens - 1} "
          f"tokens; exact: share of heads whose whole residual was read)\n")

    rows = []
    for layer, probe in probes.items():
        last = probe.last
        q, k, v = (last[n].detach().cpu().float() for n in ("q", "k", "v"))
        error = _error(last["out"].cpu(), q, k, v, last["scale"], last["seq_lens"])[0]
        rows.append((f"SmolLM2 layer {layer}, step {new_tokens - 1}", error,
                     {n: t.cpu() for n, t in last["stats"].items()}))
    print("every head of a few layers at the last decode step:")
    _head_table(rows, cfg.epsilon)

    print(f"\ntime per generated token (median): dense {1e3 * dense_s:.1f} ms, vattention "
          f"{1e3 * sparse_s:.1f} ms on {device}"
          + (" (CPU: vattention's CPU kernels are for correctness; the speed case is the GPU)"
             if device.type == "cpu" else ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", "--length", type=int, default=2048, dest="tokens",
                        help="prompt / context length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--rule", default="ratio", choices=("ratio", "paper", "denominator"))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16",
                                                            "bfloat16"),
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--source", default="auto", choices=("auto", "smollm2", "synthetic"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    dtype = (getattr(torch, args.dtype) if args.dtype != "auto"
             else torch.bfloat16 if device.type == "cuda" else torch.float32)
    source = args.source
    if source == "auto":
        from .models import smollm2

        source = "smollm2" if smollm2.is_available() else "synthetic"
        if source == "synthetic":
            print("(the SmolLM2 `models` extra is not installed: synthetic heads instead)\n")
    cfg = VAttentionConfig(epsilon=args.epsilon, delta=args.delta, rule=args.rule)
    if source == "smollm2":
        smollm2_demo(cfg, args.tokens, args.new_tokens, args.seed, device, dtype)
    else:
        synthetic_demo(cfg, args.tokens, args.seed, device)


if __name__ == "__main__":
    main()
