"""python -m vattention.demo: vAttention at its recommended setting on a long real context.

With the ``models`` extra (SmolLM2-135M-Instruct, offline): one dense prefill of about 8K
tokens of real text (the model's whole context), then greedy generation twice from the
same KV cache, once with dense attention and once with vattention in every layer at
``VAttentionConfig(epsilon, delta)`` (every other field at its default, printed). Every
vattention call is checked against exact attention of the same inputs. Prints the
tokens that agree; per layer the relative bytes (what the kernels read over dense
attention's K and V bytes, counted for a bf16 cache) beside the measured error of each
head; the violations seen (error > epsilon) against the delta asked for, on average and
for the worst head; and a bytes MODEL of the attention time per token on an H100 (bytes /
3.0 TB/s; a model, not a measurement). ``--tokens 2048`` gives a shorter run. Without the
extra: one decode step on synthetic heads.
"""
from __future__ import annotations

import argparse
import copy
import time
from statistics import median
from typing import Dict, List

import torch

from . import decode, reference
from .config import VAttentionConfig
from .coverage import binomial_upper, relative_bytes_at, synthetic_heads

# The bytes model: an H100's device-copy bandwidth, the cache dtype a GPU decode would hold.
H100_BYTES_PER_S = 3.0e12
MODEL_ELEM = 2  # bf16


def _error(out, q, k, v, scale, seq_lens=None):
    exact = reference.dense(q, k, v, seq_lens=seq_lens, scale=scale)
    return (out.double() - exact).norm(dim=-1) / exact.norm(dim=-1)


def _head_table(rows, epsilon: float) -> None:
    """rows: (name, error [Hq], stats of one batch row) per input."""
    print(f"{'input':28s} {'head':>4s} {'rel. error':>10s} {'epsilon':>8s} {'density':>8s} "
          f"{'rel. bytes':>10s} {'budget':>7s} {'residual':>8s}  mode")
    for name, error, stats in rows:
        for h in range(error.shape[0]):
            mode = "exact" if bool(stats["exact"][0, h]) else "sampled"
            print(f"{name:28s} {h:4d} {float(error[h]):10.4f} {epsilon:8.3f} "
                  f"{float(stats['density'][0, h]):8.3f} "
                  f"{float(stats['relative_bytes'][0, h]):10.3f} {int(stats['budget'][0, h]):7d} "
                  f"{int(stats['n_residual'][0, h]):8d}  {mode}")
    print("\nrel. error: ||O^ - O|| / ||O|| against dense float64 attention; density: fraction "
          "of the context's K/V rows read (deterministic set, pilot and sample); rel. bytes: "
          "bytes read (selector included) over dense attention's K and V bytes.")


# --------------------------------------------------------------------------- synthetic

def synthetic_demo(cfg: VAttentionConfig, length: int, seed: int, device: torch.device) -> None:
    print(f"vAttention decode step, config: {cfg!r}\nsource: synthetic heads, context {length} tokens, "
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
    """One layer's decode method: vattention.decode, each call checked against exact attention
    of the same inputs (relative error per head, ``_check``) and its stats kept.

    With selector "int4" decode builds the key summary from the cache each call (the
    integration would keep one; the bytes counted are the same, only CPU time differs)."""

    def __init__(self, cfg: VAttentionConfig):
        self.cfg = cfg
        self.errors: List[torch.Tensor] = []       # [Hq] per call
        self.bytes: List[torch.Tensor] = []        # [Hq] per call, bf16 cache
        self.density: List[torch.Tensor] = []
        self.exact: List[torch.Tensor] = []
        self.tokens = 0
        self.dims = (0, 0)                         # (Hkv, D)

    def decode(self, q, k, v, seq_lens=None, scale=None, seed=None, return_stats=False):
        out, stats = decode(q, k, v, self.cfg, seq_lens=seq_lens, scale=scale, seed=seed,
                            return_stats=True)
        error = _check(out, q, k, v, scale, seq_lens)
        self.errors.append(error)
        self.bytes.append(relative_bytes_at(stats["relative_bytes"][0].double().cpu(),
                                            self.cfg.selector, k.shape[-1], k.element_size(),
                                            MODEL_ELEM))
        self.density.append(stats["density"][0].double().cpu())
        self.exact.append(stats["exact"][0].cpu())
        self.tokens = int(k.shape[2]) if seq_lens is None else int(seq_lens.max())
        self.dims = (k.shape[1], k.shape[3])
        return (out, stats) if return_stats else out


def _check(out, q, k, v, scale, seq_lens):
    """Relative error per head [Hq] of one call against exact attention of its inputs.

    Unpadded calls use float32 SDPA on the call's own device: its rounding (~1e-6 relative)
    is far below any epsilon, and the float64 reference costs 10x a decode step per layer
    at 8K tokens, most of the demo's time. Padded calls use the float64 reference."""
    if seq_lens is not None:
        return _error(out.detach().cpu(), q.detach().cpu().float(), k.detach().cpu().float(),
                      v.detach().cpu().float(), scale, seq_lens.cpu())[0]
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None], k.float(), v.float(), scale=scale, enable_gqa=True)[:, :, 0]
    return ((out.float() - exact).norm(dim=-1) / exact.norm(dim=-1))[0].double().cpu()


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


def _layer_table(probes: Dict[int, "_Probe"], cfg: VAttentionConfig) -> None:
    heads = probes[next(iter(probes))].errors[0].numel()
    steps = len(probes[next(iter(probes))].errors)
    print(f"per layer, over {steps} decode steps: relative bytes (bf16 cache, selector "
          f"included) and the largest relative error of each head (epsilon {cfg.epsilon}):")
    print(f"{'layer':>5s} {'rel.bytes':>9s} {'density':>7s} {'exact':>5s}  "
          + " ".join(f"{'h' + str(h):>5s}" for h in range(heads)) + "  violations")
    for layer, probe in probes.items():
        errors = torch.stack(probe.errors)                      # [steps, Hq]
        worst = errors.max(dim=0).values
        viol = int((errors > cfg.epsilon).sum())
        print(f"{layer:5d} {float(torch.stack(probe.bytes).mean()):9.3f} "
              f"{float(torch.stack(probe.density).mean()):7.3f} "
              f"{float(torch.stack(probe.exact).double().mean()):5.2f}  "
              + " ".join(f"{float(e):5.3f}" for e in worst) + f"  {viol:4d}/{errors.numel()}")
    print("(exact: share of head-steps whose whole residual was read: the rule's budget reached "
          "it)")


def _guarantee(probes: Dict[int, "_Probe"], cfg: VAttentionConfig) -> None:
    errors = torch.cat([torch.stack(p.errors) for p in probes.values()], dim=1)  # [steps, L*Hq]
    steps, heads = errors.shape
    violations = (errors > cfg.epsilon).sum(dim=0)                               # per head
    total = int(violations.sum())
    allowed_total = binomial_upper(steps * heads, cfg.delta, 1e-3)
    allowed_head = binomial_upper(steps, cfg.delta, 1e-3 / heads)
    worst = int(violations.max())
    print(f"\nguarantee asked: P(||O^ - O|| > {cfg.epsilon} ||O||) <= {cfg.delta} for every head")
    print(f"seen: {total} violations in {steps * heads} head-steps ({total / (steps * heads):.2%}; "
          f"{allowed_total} allowed at {cfg.delta:.0%} with 1e-3 false alarm): "
          f"{'kept' if total <= allowed_total else 'NOT kept'}")
    print(f"worst head: {worst}/{steps} steps ({allowed_head} allowed per head): "
          f"{'kept' if worst <= allowed_head else 'NOT kept'}; median error "
          f"{float(errors.median()):.4f}, max {float(errors.max()):.4f}")


def _bytes_model(probes: Dict[int, "_Probe"]) -> None:
    dense = sparse = 0.0
    for probe in probes.values():
        kv_heads, dim = probe.dims
        layer_dense = 2 * probe.tokens * dim * kv_heads * MODEL_ELEM
        # relative bytes are per KV group: the query heads of one group repeat its value
        group = torch.stack(probe.bytes).mean(dim=0).view(kv_heads, -1)[:, 0]
        dense += layer_dense
        sparse += layer_dense * float(group.mean())
    print(f"\nbytes MODEL of the attention per generated token on an H100 (bf16 cache, "
          f"{len(probes)} layers, bytes / 3.0 TB/s; a MODEL, not a measurement: launches, "
          f"latency and everything outside attention ignored):")
    print(f"  dense      {dense / 1e6:7.1f} MB  {dense / H100_BYTES_PER_S * 1e6:7.1f} us")
    print(f"  vattention {sparse / 1e6:7.1f} MB  {sparse / H100_BYTES_PER_S * 1e6:7.1f} us"
          f"   model speed-up {dense / max(sparse, 1.0):.2f}x")


def smollm2_demo(cfg: VAttentionConfig, n_tokens: int, new_tokens: int, seed: int,
                 device: torch.device, dtype: torch.dtype) -> None:
    from .integrations import transformers as vt
    from .models import smollm2

    began = time.perf_counter()
    print(f"vAttention in SmolLM2-135M-Instruct generation\nconfig: {cfg!r}\n"
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

        probes: Dict[int, _Probe] = {}

        def probe(layer):
            probes[layer] = _Probe(cfg)
            return probes[layer]

        vt.configure(model, probe, seed=seed)
        sparse_tokens, sparse_s = _greedy(model, cache, first, new_tokens, device)
        probes = {layer: p for layer, p in probes.items() if p.errors}
    finally:
        vt.disable(model, "sdpa")

    agree = sum(a == b for a, b in zip(dense_tokens, sparse_tokens))
    diverge = next((i for i, (a, b) in enumerate(zip(dense_tokens, sparse_tokens)) if a != b),
                   None)
    print(f"generated tokens that agree with dense decoding: {agree}/{new_tokens}"
          + ("" if diverge is None else f" (first difference at token {diverge})"))
    print(f"  dense:       {tokenizer.decode(dense_tokens)!r}")
    print(f"  vattention:  {tokenizer.decode(sparse_tokens)!r}\n")

    _layer_table(probes, cfg)
    mean_bytes = sum(float(torch.stack(p.bytes).mean()) for p in probes.values()) / len(probes)
    print(f"mean relative bytes {mean_bytes:.3f} over {len(probes)} layers (context "
          f"{n_tokens}-{n_tokens + new_tokens - 2} tokens)")
    _guarantee(probes, cfg)
    _bytes_model(probes)
    print(f"\nCPU time per generated token (median, measured): dense {1e3 * dense_s:.0f} ms, "
          f"vattention {1e3 * sparse_s:.0f} ms with the exact check of every call"
          + (" (vattention's CPU kernels are for correctness; the speed case is the GPU)"
             if device.type == "cpu" else ""))
    print(f"demo wall time {time.perf_counter() - began:.0f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", "--length", type=int, default=8000, dest="tokens",
                        help="prompt / context length in tokens (SmolLM2's context is 8192, "
                             "new tokens included; 2048 for a short run)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--rule", default=None, choices=("ratio", "paper", "denominator"),
                        help="budget rule (default: VAttentionConfig's)")
    parser.add_argument("--selector", default=None,
                        help="heavy-hitter selector (default: VAttentionConfig's)")
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
    # The recommended setting: only the promise is chosen, every other field is the default.
    overrides = {name: getattr(args, name) for name in ("rule", "selector")
                 if getattr(args, name) is not None}
    cfg = VAttentionConfig(epsilon=args.epsilon, delta=args.delta, **overrides)
    if source == "smollm2":
        smollm2_demo(cfg, args.tokens, args.new_tokens, args.seed, device, dtype)
    else:
        synthetic_demo(cfg, args.tokens, args.seed, device)


if __name__ == "__main__":
    main()
