"""Score-guided sampling of the residual (issue 9): does using the selector's approximate
scores beyond the top-k cut save bytes at equal coverage, or make a cheaper selector safe?

    python benchmarks/study_score_guided.py                          # every capture found
    python benchmarks/study_score_guided.py --captures /work/captures/smollm2_7168.pt --seeds 16
    python benchmarks/study_score_guided.py --check                  # control vs reference.decode

Float64 estimators, vectorised over seeds (each seed an independent decode of one head
group), all with the default shape of `vattention.decode`: ratio rule, sink = local = 128,
GQA-shared lists (budget = max over the group's heads), a pilot that is reused, min_samples
32, the exact fallback when the budget reaches the residual. Designs (`--designs`):

  U      the control: uniform pilot of 128 and uniform final sample (= reference.decode:
         `--check` replays its Philox draws and compares outputs);
  A      stratified: the residual ordered by the selector's (group-combined) score and cut
         into strata (a band just below the top-k cut, ..., the tail); each stratum s has
         its own uniform pilot p_s, Horvitz-Thompson weight n_s / t_s, and variance
         estimate Sigma_s of the terms r_i = w_i (V_i - O^). Tr Var(T^) = sum_s n_s^2
         Tr Sigma_s / t_s; Neyman allocation t_s ~ n_s sqrt(Tr Sigma_s) gives the total
         b = z^2 (sum_s n_s sqrt(Tr Sigma_s))^2 / tau^2 (<= the uniform b by Cauchy-Schwarz,
         up to estimation noise), tau = eps Z^ ||O||_lcb, se of the lcb from the same
         stratified variance. A stratum whose allocation reaches n_s is enumerated exactly.
  IS     importance sampling: proposal p_i = (1 - lam) mean_h softmax_R(a_hi / T) + lam / n_r
         over the residual (a = approximate logits; every p_i >= lam / n_r), draws with
         replacement, weight 1 / (t p_i); the CLT lemma on the terms r_i / p_i:
         b = z^2 Tr Cov_p(r / p) / tau^2, estimated from a pilot drawn from the same p.

and the approximate logits (`--proxies`) come from: oracle (K itself, 2D bytes a token),
int4 (vattention.key_summary), int2 (the same layout with 4 levels: D/4 + 4D/32 bytes) and
sign1 (1-bit signs of K minus its per-channel mean, with one fp16 scale a token: D/8 + 2).

Per capture x design x proxy x (epsilon, delta): violations (mean over heads x seeds, the
worst head's rate, and the coverage tests' binomial criterion at false alarm 1e-3,
Bonferroni over heads), density (distinct rows read / n), relative bytes as decode counts
them (selector bytes + 2 * D * 2 per row load, a row drawn twice loaded twice, over dense's
2 n D 2; bf16 cache) and the same with duplicates loaded once ("dedup"). JSON to
benchmarks/results/score_guided.json and a printed table.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from vattention.budget import z_two_sided  # noqa: E402
from vattention.config import resolve_size  # noqa: E402
from vattention.coverage import binomial_upper  # noqa: E402
from vattention.score_guided import estimate_residual  # noqa: E402
from vattention.key_summary import (build_key_summary, dequantize_torch,  # noqa: E402
                                    summary_bytes_per_token)

F64 = torch.float64
SETTINGS = ((0.05, 0.05), (0.1, 0.1))
SINK = LOCAL = 128
MIN_SAMPLES = 32
FALSE_ALARM = 1e-3
DEFAULT_CAPTURES = ("/work/captures/smollm2_7168.pt", "/work/captures/gemma3_16384.pt",
                    "/work/captures/gemma3_32768.pt")

# kind "strat": strata = [(size, pilot)], size a fraction of n (float), a count (int) or
# "rest"; a pilot of 0 attends the stratum exactly. One "rest" stratum is the control.
DESIGNS: Dict[str, dict] = {
    "U": dict(kind="strat", heavy=0.05, strata=[("rest", 128)]),
    "U-h2": dict(kind="strat", heavy=0.02, strata=[("rest", 128)]),
    "A-b5": dict(kind="strat", heavy=0.05, strata=[(0.05, 64), ("rest", 64)]),
    "A-h2-b8": dict(kind="strat", heavy=0.02, strata=[(0.08, 64), ("rest", 64)]),
    "A3-h2": dict(kind="strat", heavy=0.02, strata=[(0.03, 48), (0.12, 40), ("rest", 40)]),
    "A4-h1": dict(kind="strat", heavy=0.01,
                  strata=[(0.02, 32), (0.06, 32), (0.16, 32), ("rest", 32)]),
    "IS": dict(kind="is", heavy=0.05, lam=0.5, temperature=1.0, pilot=128),
    "IS-h2": dict(kind="is", heavy=0.02, lam=0.5, temperature=1.0, pilot=128),
    "IS-h0": dict(kind="is", heavy=0, lam=0.5, temperature=1.0, pilot=128),
    "IS-h2-T2": dict(kind="is", heavy=0.02, lam=0.5, temperature=2.0, pilot=128),
}
PROXIES = ("oracle", "int4", "int2", "sign1")


# ---------------------------------------------------------------------------------------
# Approximate keys
# ---------------------------------------------------------------------------------------

def _uniform_quant(k: torch.Tensor, levels: int, group: int = 32) -> torch.Tensor:
    """Per group of `group` channels: fp16 zero = min, fp16 step = (max - min) / levels."""
    n_heads, n, dim = k.shape
    x = k.float().reshape(n_heads, n, dim // group, group)
    zero = x.amin(-1, keepdim=True).half().float()
    step = ((x.amax(-1, keepdim=True) - zero) / levels).half().float()
    code = torch.where(step > 0, torch.round((x - zero) / torch.where(step > 0, step, 1.0)),
                       torch.zeros_like(x)).clamp(0, levels)
    return (zero + step * code).reshape(n_heads, n, dim).double()


def proxy_keys(name: str, k: torch.Tensor):
    """(approximate keys float64 [Hkv, n, D], selector bytes per token) from the cache's K."""
    dim = k.shape[-1]
    if name == "oracle":
        return k.double(), 2 * dim
    if name == "int4":
        return dequantize_torch(build_key_summary(k[None].contiguous()))[0].double(), \
            summary_bytes_per_token(dim)
    if name == "int2":
        return _uniform_quant(k, 3), dim // 4 + 4 * dim // 32
    if name == "sign1":
        # The channel mean is one vector per KV head (free); without centring, the outlier
        # channels' constant sign carries no ranking information.
        centre = k.double().mean(1, keepdim=True)
        resid = k.double() - centre
        amp = resid.abs().mean(-1, keepdim=True).half().double()
        return centre + amp * torch.sign(resid), dim // 8 + 2
    raise ValueError(f"unknown proxy {name!r}")


# ---------------------------------------------------------------------------------------
# One KV group: exact weights, dense output, the selection
# ---------------------------------------------------------------------------------------

@dataclass
class Group:
    w: torch.Tensor          # [G, n] exp(s - max_h s), float64
    v: torch.Tensor          # [n, D]
    dense: torch.Tensor      # [G, D]
    approx: Dict[str, torch.Tensor]   # proxy -> approximate logits [G, n]
    n: int


def make_group(q, k, v, scale, approx_keys: Dict[str, torch.Tensor]) -> Group:
    s = scale * (q @ k.T)
    w = torch.exp(s - s.amax(1, keepdim=True))
    dense = (w @ v) / w.sum(1, keepdim=True)
    approx = {name: scale * (q @ ka.T) for name, ka in approx_keys.items()}
    return Group(w, v, dense, approx, k.shape[0])


@dataclass
class Selection:
    det: torch.Tensor        # positions attended exactly (sink, local, heavy)
    residual: torch.Tensor   # residual positions, by selector score, best first
    scores: torch.Tensor     # [G, n_r] approximate logits of the residual, in that order


def select(group: Group, proxy: str, heavy) -> Selection:
    """reference.decode's selection: top-k of the group-combined log-probabilities in the
    window [sink, n - local), ties to the lower position."""
    n = group.n
    sink = resolve_size(SINK, n)
    local = min(resolve_size(LOCAL, n), n - sink)
    start, end = sink, n - local
    heavy_k = min(resolve_size(heavy, n), end - start)
    a = group.approx[proxy]
    combined = (a - torch.logsumexp(a, 1, keepdim=True)).amax(0)
    window = combined[start:end]
    order = torch.sort(window, descending=True, stable=True).indices + start
    heavy_pos = order[:heavy_k]
    residual = order[heavy_k:]
    det = torch.cat([torch.arange(sink), torch.arange(end, n), heavy_pos.sort().values])
    return Selection(det, residual, a[:, residual])


# ---------------------------------------------------------------------------------------
# Draws (torch generator; the check replays reference.decode's Philox stream)
# ---------------------------------------------------------------------------------------

class TorchDraws:
    def __init__(self, seeds: int, generator: torch.Generator):
        self.seeds, self.gen = seeds, generator

    def uniform(self, key, count: int, n: int) -> torch.Tensor:
        return torch.randint(n, (self.seeds, count), generator=self.gen)


class PhiloxDraws:
    """reference.uniform_ranks for seeds 0..S-1, offset 0, batch row 0, list `row`."""

    def __init__(self, seeds: int, row: int):
        self.seeds, self.row = seeds, row

    def uniform(self, key, count: int, n: int) -> torch.Tensor:
        from vattention.reference import uniform_ranks
        draw_set = 0 if key[0] == "pilot" else 1
        return torch.tensor([uniform_ranks(s, 0, self.row, draw_set, count, n)
                             for s in range(self.seeds)], dtype=torch.int64).view(self.seeds, count)


def _clt(z: float, numerator_sqrt: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(z * numerator_sqrt / tau)^2; inf where tau <= 0 < numerator, 0 where both are 0."""
    num = (z * numerator_sqrt) ** 2
    safe = torch.where(tau > 0, tau, torch.ones_like(tau))
    out = torch.where(tau > 0, num / safe ** 2,
                      torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num)))
    return torch.where(torch.isnan(num) | torch.isnan(tau), torch.full_like(num, math.nan), out)


def _trace_cov(terms: torch.Tensor) -> torch.Tensor:
    """terms [S, G, p, D] -> trace of the sample covariance over p (ddof 1), [S, G]."""
    p = terms.shape[2]
    return ((terms - terms.mean(2, keepdim=True)) ** 2).sum((2, 3)) / (p - 1)


def _sums(counts_w: torch.Tensor, w: torch.Tensor, v: torch.Tensor):
    """counts_w [S, m] (draw multiplicity x HT weight) over positions whose exact weights are
    w [G, m] and values v [m, D] -> (sum_w [S, G], sum_wv [S, G, D])."""
    cw = counts_w[:, None, :] * w[None]
    return cw.sum(-1), cw @ v


# ---------------------------------------------------------------------------------------
# Estimators. Each returns the residual's sums (Z_r [S, G], N_r [S, G, D]), the row loads
# (a duplicate draw loads again) and the distinct residual rows read, per seed.
# ---------------------------------------------------------------------------------------

def _strata(sel: Selection, n: int, spec):
    bounds, at = [], 0
    n_r = sel.residual.numel()
    for size, pilot in spec:
        m = n_r - at if size == "rest" else min(resolve_size(size, n), n_r - at)
        bounds.append((at, at + m, pilot))
        at += m
    if at < n_r:   # no "rest": the last stratum takes the remainder
        lo, _, pilot = bounds[-1]
        bounds[-1] = (lo, n_r, pilot)
    return [(lo, hi, pilot) for lo, hi, pilot in bounds if hi > lo]


def stratified(group: Group, sel: Selection, spec, eps: float, delta: float, draws,
               z_f, n_f):
    z = z_two_sided(delta)
    w, v = group.w, group.v
    seeds = draws.seeds
    strata = _strata(sel, group.n, spec)
    # Membership is what matters; ascending positions replay reference.decode's ranks.
    pos = [sel.residual[lo:hi].sort().values for lo, hi, _ in strata]
    sizes = [hi - lo for lo, hi, _ in strata]
    pilots = [p for _, _, p in strata]
    # Pilot per stratum (a pilot of 0, or one that would cover the stratum, enumerates it).
    z_hat, n_hat = z_f.expand(seeds, -1).clone(), n_f.expand(seeds, -1, -1).clone()
    pilot_idx: List[Optional[torch.Tensor]] = []
    pilot_terms = []
    for s, (ps, n_s, p_s) in enumerate(zip(pos, sizes, pilots)):
        if p_s == 0 or p_s >= n_s:
            zs, ns = _sums(torch.ones(1, n_s, dtype=F64), w[:, ps], v[ps])
            z_hat += zs
            n_hat += ns
            pilot_idx.append(None)
            pilot_terms.append(None)
            continue
        idx = draws.uniform(("pilot", s), p_s, n_s)                # [S, p]
        rows = ps[idx]
        wp = w[:, rows].permute(1, 0, 2)                           # [S, G, p]
        vp = v[rows]                                               # [S, p, D]
        z_hat += n_s * wp.mean(-1)
        n_hat += n_s * torch.einsum("sgp,spd->sgd", wp, vp) / p_s
        pilot_idx.append(idx)
        pilot_terms.append((wp, vp))
    o_hat = n_hat / z_hat[..., None]
    sampled = [s for s in range(len(strata)) if pilot_idx[s] is not None]
    sigma = {}
    pilot_var = torch.zeros_like(z_hat)
    for s in sampled:
        wp, vp = pilot_terms[s]
        terms = wp[..., None] * (vp[:, None] - o_hat[:, :, None])  # [S, G, p, D]
        sigma[s] = _trace_cov(terms).clamp(min=0).sqrt()
        pilot_var += sizes[s] ** 2 * sigma[s] ** 2 / pilots[s]
    se = z * pilot_var.sqrt() / z_hat
    tau = eps * z_hat * (o_hat.norm(dim=-1) - se)
    total_sigma = sum((sizes[s] * sigma[s] for s in sampled), torch.zeros_like(z_hat))
    budget = _clt(z, total_sigma, tau)                             # [S, G]
    z_r = torch.zeros_like(z_hat)
    n_r_sum = torch.zeros_like(n_hat)
    loads = torch.zeros(seeds, dtype=torch.int64)
    distinct = torch.zeros(seeds, dtype=torch.int64)
    for s in range(len(strata)):
        ps, n_s, p_s = pos[s], sizes[s], pilots[s]
        if pilot_idx[s] is None:
            zs, ns = _sums(torch.ones(1, n_s, dtype=F64), w[:, ps], v[ps])
            z_r += zs
            n_r_sum += ns
            loads += n_s
            distinct += n_s
            continue
        share = torch.where(total_sigma > 0, sizes[s] * sigma[s] / total_sigma.clamp(min=1e-300),
                            torch.zeros_like(total_sigma))
        if len(sampled) == 1:
            share = torch.ones_like(share)
            per_head = torch.where(torch.isnan(budget), budget, budget.clamp(min=MIN_SAMPLES))
        else:
            per_head = budget * share
        per_head = torch.where(torch.isnan(per_head), torch.full_like(per_head, n_s),
                               torch.ceil(per_head.clamp(max=n_s)))
        wanted = per_head.amax(1)                                  # [S]: shared list
        exact = wanted >= n_s
        total = torch.where(exact, torch.zeros_like(wanted), wanted.clamp(min=p_s))
        extra = (total - p_s).clamp(min=0).long()
        counts = torch.zeros(seeds, n_s, dtype=F64)
        counts.scatter_add_(1, pilot_idx[s], torch.ones(seeds, p_s, dtype=F64))
        d_max = int(extra.max())
        if d_max > 0:
            idx = draws.uniform(("final", s), d_max, n_s)
            keep = (torch.arange(d_max)[None] < extra[:, None]).to(F64)
            counts.scatter_add_(1, idx, keep)
        weight = torch.where(exact[:, None], torch.ones_like(counts),
                             counts * n_s / total.clamp(min=1)[:, None])
        zs, ns = _sums(weight, w[:, ps], v[ps])
        z_r += zs
        n_r_sum += ns
        loads += torch.where(exact, p_s + n_s, p_s + extra)
        distinct += torch.where(exact, n_s, (counts > 0).sum(1))
    return z_r, n_r_sum, loads, distinct


def importance(group: Group, sel: Selection, cfg: dict, eps: float, delta: float, draws,
               z_f, n_f):
    """Design IS: vattention.score_guided.estimate_residual (its docstring has the maths)."""
    res = sel.residual
    out = estimate_residual(group.w[:, res], group.v[res], sel.scores, z_f, n_f, eps, delta,
                            draws.seeds, cfg["pilot"], cfg["lam"], cfg["temperature"],
                            MIN_SAMPLES, draws.gen)
    return out.z, out.n, out.loads, out.distinct


def run_design(group: Group, sel: Selection, design: dict, eps: float, delta: float, draws):
    """-> (outputs [S, G, D], loads [S], distinct rows read [S]) of one head group."""
    det = sel.det
    z_f = group.w[:, det].sum(1)
    n_f = group.w[:, det] @ group.v[det]
    est = stratified if design["kind"] == "strat" else importance
    arg = design["strata"] if design["kind"] == "strat" else design
    z_r, n_r, loads, distinct = est(group, sel, arg, eps, delta, draws, z_f, n_f)
    out = (n_f + n_r) / (z_f + z_r)[..., None]
    return out, loads + det.numel(), distinct + det.numel()


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------

def load_groups(path: str, proxies: Sequence[str], dtype: torch.dtype):
    """Every KV group of every record of a capture, cast through the cache dtype."""
    groups = []
    selector_bytes = {}
    dim = None
    for rec in torch.load(path, weights_only=False):
        q = rec["q"].to(dtype).double()
        k = rec["k"].to(dtype)
        v = rec["v"].to(dtype).double()
        kv_heads, n, dim = k.shape
        g = q.shape[0] // kv_heads
        approx = {}
        for name in proxies:
            keys, bpt = proxy_keys(name, k)
            approx[name] = keys
            selector_bytes[name] = bpt
        kd = k.double()
        for h in range(kv_heads):
            groups.append(make_group(q[h * g:(h + 1) * g], kd[h], v[h], rec["scale"],
                                     {name: a[h] for name, a in approx.items()}))
    return groups, selector_bytes, dim


def measure(groups, selector_bytes: int, dim: int, proxy: str, design: dict, eps: float,
            delta: float, seeds: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    viol, errors, loads_rel, distinct_rel = [], [], [], []
    for group in groups:
        sel = select(group, proxy, design["heavy"])
        out, loads, distinct = run_design(group, sel, design, eps, delta, TorchDraws(seeds, gen))
        err = (out - group.dense[None]).norm(dim=-1) / group.dense.norm(dim=-1)[None]
        viol.append((err > eps).sum(0))           # [G]
        errors.append(err.mean(0))
        loads_rel.append(loads.double().mean() / group.n)
        distinct_rel.append(distinct.double().mean() / group.n)
    viol = torch.cat(viol)
    heads = viol.numel()
    sel_rel = selector_bytes / (4 * dim)
    total_allowed = binomial_upper(heads * seeds, delta, FALSE_ALARM)
    head_allowed = binomial_upper(seeds, delta, FALSE_ALARM / heads)
    loads_rel = torch.stack(loads_rel)
    distinct_rel = torch.stack(distinct_rel)
    return {
        "heads": heads, "seeds": seeds,
        "violation_rate": float(viol.sum()) / (heads * seeds),
        "worst_head_rate": float(viol.max()) / seeds,
        "bad_heads": int((viol > head_allowed).sum()),
        "passes": bool(int(viol.sum()) <= total_allowed and int(viol.max()) <= head_allowed),
        "mean_error": float(torch.cat(errors).mean()),
        "density": float(distinct_rel.mean()),
        "loads_per_n": float(loads_rel.mean()),
        "selector_bytes": sel_rel,
        "relative_bytes": sel_rel + float(loads_rel.mean()),
        "relative_bytes_dedup": sel_rel + float(distinct_rel.mean()),
    }


def check(path: str, seeds: int = 3) -> None:
    """The control U replays reference.decode's Philox draws on the first record: same
    outputs (to float64 rounding) and the same row loads, oracle and int4 selectors."""
    records = torch.load(path, weights_only=False)
    for rec in (records[0], records[len(records) // 2], records[-1]):
        _check_record(rec, seeds)


def _check_record(rec, seeds: int) -> None:
    from vattention import VAttentionConfig
    from vattention import reference

    q, k, v = rec["q"].to(torch.bfloat16), rec["k"].to(torch.bfloat16), rec["v"].to(torch.bfloat16)
    kv_heads, g = k.shape[0], q.shape[0] // k.shape[0]
    for proxy in ("oracle", "int4"):
        sampled = 0
        keys, _ = proxy_keys(proxy, k)
        for eps, delta in SETTINGS:
            cfg = VAttentionConfig(epsilon=eps, delta=delta, selector=proxy)
            refs = [reference.decode(q[None], k[None], v[None], cfg, scale=rec["scale"], seed=s,
                                     return_trace=True) for s in range(seeds)]
            worst = 0.0
            for h in range(kv_heads):
                group = make_group(q[h * g:(h + 1) * g].double(), k[h].double(), v[h].double(),
                                   rec["scale"], {proxy: keys[h]})
                sel = select(group, proxy, DESIGNS["U"]["heavy"])
                out, loads, _ = run_design(group, sel, DESIGNS["U"], eps, delta,
                                           PhiloxDraws(seeds, h))
                for s, (ref_out, trace) in enumerate(refs):
                    tr = trace[0][h]
                    assert sorted(sel.det.tolist()) == tr.deterministic, "deterministic sets differ"
                    exact = len(tr.sample) == len(tr.residual) and tr.sample_weight == 1.0
                    sampled += not exact
                    ref_loads = len(tr.deterministic) + len(tr.pilot) + (
                        len(tr.sample) if exact else len(tr.sample) - len(tr.pilot))
                    assert int(loads[s]) == ref_loads, (int(loads[s]), ref_loads)
                    diff = (out[s] - ref_out[0, h * g:(h + 1) * g]).abs().max()
                    worst = max(worst, float(diff))
            assert worst < 1e-9, worst
            print(f"check layer {rec.get('layer')} {proxy} ({eps},{delta}): control == "
                  f"reference.decode (max |diff| {worst:.1e}, {seeds} seeds x {kv_heads} groups,"
                  f" {sampled} sampled, the rest exact)")
            sampled = 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captures", default=",".join(DEFAULT_CAPTURES),
                        help="comma-separated capture files (missing ones are skipped)")
    parser.add_argument("--designs", default=",".join(DESIGNS),
                        help=f"comma-separated, from {', '.join(DESIGNS)}")
    parser.add_argument("--proxies", default=",".join(PROXIES))
    parser.add_argument("--seeds", type=int, default=32, help="seeds per head (>= 16)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true",
                        help="only compare the control with reference.decode (first capture)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "score_guided.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = [p for p in args.captures.split(",") if pathlib.Path(p).exists()]
    if not paths:
        sys.exit(f"no capture found among {args.captures}")
    if args.check:
        check(paths[0])
        return None
    designs = args.designs.split(",")
    proxies = args.proxies.split(",")
    for name in designs:
        if name not in DESIGNS:
            sys.exit(f"--designs: unknown design {name!r}")
    dtype = getattr(torch, args.dtype)
    rows = []
    for path in paths:
        t0 = time.time()
        groups, sel_bytes, dim = load_groups(path, proxies, dtype)
        name = pathlib.Path(path).stem
        print(f"{name}: {len(groups)} groups, n = {groups[0].n}, D = {dim} "
              f"[{time.time() - t0:.0f}s]", flush=True)
        for eps, delta in SETTINGS:
            for proxy in proxies:
                for design in designs:
                    t0 = time.time()
                    row = measure(groups, sel_bytes[proxy], dim, proxy, DESIGNS[design], eps,
                                  delta, args.seeds, seed=zlib.crc32(f"{name}/{design}".encode()))
                    row.update(capture=name, tokens=groups[0].n, design=design, proxy=proxy,
                               epsilon=eps, delta=delta, config=DESIGNS[design],
                               seconds=time.time() - t0)
                    rows.append(row)
                    print(f"  ({eps},{delta}) {proxy:6s} {design:9s} viol {row['violation_rate']:.4f} "
                          f"worst {row['worst_head_rate']:.3f} bad {row['bad_heads']:2d} "
                          f"dens {row['density']:.3f} relB {row['relative_bytes']:.3f} "
                          f"(dedup {row['relative_bytes_dedup']:.3f}) [{row['seconds']:.1f}s]",
                          flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dtype": args.dtype, "seeds": args.seeds, "sink": SINK,
                               "local": LOCAL, "rows": rows}, indent=1))
    print("\n| capture | (eps, delta) | proxy | design | violations | worst head | bad heads | "
          "passes | density | relative bytes | dedup | vs U |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((b for b in rows if b["capture"] == r["capture"] and b["proxy"] == r["proxy"]
                     and b["epsilon"] == r["epsilon"] and b["design"] == "U"), None)
        vs = f"{r['relative_bytes'] / base['relative_bytes']:.2f}x" if base else "-"
        print(f"| {r['capture']} | ({r['epsilon']}, {r['delta']}) | {r['proxy']} | {r['design']} | "
              f"{r['violation_rate']:.2%} | {r['worst_head_rate']:.2f} | {r['bad_heads']} | "
              f"{'yes' if r['passes'] else 'NO'} | {r['density']:.3f} | {r['relative_bytes']:.3f} | "
              f"{r['relative_bytes_dedup']:.3f} | {vs} |")
    print(f"(seeds per head: {args.seeds}; relative bytes at {args.dtype}: selector + 2 D x 2 "
          "bytes per row load over dense's 2 n D x 2; dedup: a row drawn twice loaded once)")
    return rows


if __name__ == "__main__":
    main()
