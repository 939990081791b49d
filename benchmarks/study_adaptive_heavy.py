"""Study (float64, plain torch): an adaptive heavy-set size per list, on captured attention.

    python benchmarks/study_adaptive_heavy.py --captures /work/captures/gemma3_32768.pt

Issue 9's "adaptive heavy size": the best heavy size differs by model, context and
(epsilon, delta) (bench_levers.py's h* levers), so pick it per list. The candidates are
nested top-m sets T_1 c T_2 c ... of the selector's ranking (shared over the GQA group as
decode ranks it: max over heads of the log-probability). The pilot is drawn uniformly from
the window minus the smallest set, so its draws outside T_j are a uniform sample of the
residual R_j = W minus T_j, for every j at once. Per candidate:
    budget(m_j) = ratio rule on the pilot draws in R_j (n_r = |R_j|; Z^, O^ from the exact
                  part over T_1 and all pilot draws), max over the group's heads;
    cost(m_j)   = m_j + residual rows read (the pilot, then max(b - p_j, 0) more draws; or
                  all of R_j when the budget reaches it).
The list takes the cheapest m_j, attends T_j exactly and estimates R_j from the pilot draws
in R_j plus the remainder of the budget (pilot reuse), every draw weighing n_r / draws.
The choice and the reused draws depend on the same pilot: the coverage measured here says
whether that matters. "fixed" is the same code with one candidate (today's decode, up to
unique-row counting), the cross-check against bench_levers.py.

Prints per source and (epsilon, delta): violation rate (mean, worst head), density,
relative bytes at fp32 with the int4 selector (summary 0.078 of dense), for each policy.
"""
import argparse
import math
from pathlib import Path
from statistics import NormalDist

import torch

from vattention.config import resolve_size
from vattention.key_summary import dequantize_torch, summarize_keys_torch, \
    summary_bytes_per_token


def policy_candidates(name, n):
    """Heavy sizes tried by a policy for a row of n tokens."""
    if name == "fixed":
        return [resolve_size(0.05, n)]
    if name == "fixed10":
        return [resolve_size(0.10, n)]
    if name == "adaptive4":        # m_max / 8 ... m_max, m_max = 10% of n
        top = resolve_size(0.10, n)
        return [top // 8, top // 4, top // 2, top]
    if name == "adaptive_counts":  # 128 ... 4096 tokens
        return [128, 256, 512, 1024, 2048, 4096]
    raise ValueError(name)


def run_list(logits, values, ranking, sink, local, candidates, eps, delta, pilot, min_samples,
             generator):
    """One trial of one shared list. logits [H, n], values [n, D] (float64), ranking: window
    positions by decreasing score. Returns (outputs [H, D], rows read, chosen m)."""
    heads, n = logits.shape
    window = ranking.numel()
    candidates = sorted({min(m, window) for m in candidates})
    z = NormalDist().inv_cdf(1 - delta / 2)
    rank_of = torch.full((n,), -1, dtype=torch.int64)
    rank_of[ranking] = torch.arange(window)
    m1 = candidates[0]
    residual1 = ranking[m1:]
    n_r1 = residual1.numel()
    fixed = torch.cat([torch.arange(sink), torch.arange(n - local, n)])
    shift = logits.max(dim=1, keepdim=True).values
    w_all = torch.exp(logits - shift)                                   # [H, n]
    if n_r1 == 0:
        det = torch.cat([fixed, ranking])
        w = w_all[:, det]
        return (w @ values[det]) / w.sum(1, keepdim=True), det.numel(), m1
    draws = residual1[torch.randint(0, n_r1, (pilot,), generator=generator)]
    det1 = torch.cat([fixed, ranking[:m1]])
    z_f = w_all[:, det1].sum(1)
    n_f = w_all[:, det1] @ values[det1]
    wp = w_all[:, draws]                                                # [H, p]
    z_hat = z_f + n_r1 * wp.mean(1)
    o_hat = (n_f + n_r1 * (wp @ values[draws]) / pilot) / z_hat[:, None]
    o_norm = o_hat.norm(dim=1)
    best = None
    for m in candidates:
        inside = rank_of[draws] >= m                                    # draws in R_m
        p_m, n_r = int(inside.sum()), window - m
        if n_r == 0:
            wanted, exact = 0, True
        elif p_m < 2:
            wanted, exact = n_r, True
        else:
            terms = wp[:, inside, None] * (values[draws[inside]][None] - o_hat[:, None])
            trace = ((terms - terms.mean(1, keepdim=True)) ** 2).sum((1, 2)) / (p_m - 1)
            o_lower = o_norm - z * n_r * torch.sqrt(trace / p_m) / z_hat
            b = torch.where(o_lower > 0, (z * n_r) ** 2 * trace / (eps * z_hat * o_lower).clamp(
                min=1e-300) ** 2, torch.full_like(trace, math.inf))
            need = float(b.max())
            wanted = n_r if not math.isfinite(need) else min(
                math.ceil(max(need, min_samples)), n_r)
            exact = wanted >= n_r
        extra = n_r if exact else max(wanted - p_m, 0)
        cost = m + extra
        if best is None or cost < best[0]:
            best = (cost, m, exact, wanted, inside)
    _, m, exact, wanted, inside = best
    det = torch.cat([fixed, ranking[:m]])
    residual = ranking[m:]
    n_r = residual.numel()
    w_det = w_all[:, det]
    num, den = w_det @ values[det], w_det.sum(1)
    pilot_rows = torch.unique(draws)
    if exact:
        rows = torch.unique(torch.cat([det, residual, pilot_rows])).numel()
        w_r = w_all[:, residual]
        num, den = num + w_r @ values[residual], den + w_r.sum(1)
    else:
        reused = draws[inside]
        extra = max(wanted - reused.numel(), 0)
        fresh = residual[torch.randint(0, n_r, (extra,), generator=generator)]
        sample = torch.cat([reused, fresh])
        weight = n_r / sample.numel()
        w_s = w_all[:, sample]
        num, den = num + weight * (w_s @ values[sample]), den + weight * w_s.sum(1)
        rows = det.numel() + torch.unique(torch.cat([pilot_rows, fresh])).numel()
    return num / den[:, None], rows, m


def study(records, policies, settings, trials, edge, pilot, min_samples):
    results = {}
    for eps, delta in settings:
        for policy in policies:
            errors, densities, bytes_, chosen = [], [], [], []
            for r, item in enumerate(records):
                q, k, v = item["q"].double(), item["k"].double(), item["v"].double()
                scale = item["scale"]
                kv_heads, n, dim = k.shape
                group = q.shape[0] // kv_heads
                select_keys = dequantize_torch(summarize_keys_torch(item["k"][None]))[0].double()
                selector_rel = summary_bytes_per_token(dim) / (2 * dim * item["k"].element_size())
                sink, local = min(edge, n), min(edge, n - min(edge, n))
                for kv in range(kv_heads):
                    heads = slice(kv * group, (kv + 1) * group)
                    logits = scale * q[heads] @ k[kv].T                      # [g, n]
                    sel = scale * q[heads] @ select_keys[kv].T
                    scores = (sel - torch.logsumexp(sel, 1, keepdim=True)).amax(0)
                    window = torch.arange(sink, n - local)
                    order = torch.argsort(-scores[window], stable=True)
                    ranking = window[order]
                    probs = torch.softmax(logits, 1)
                    exact = probs @ v[kv]
                    g = torch.Generator().manual_seed(1000 * r + kv)
                    list_err = []
                    for _ in range(trials):
                        out, rows, m = run_list(logits, v[kv], ranking, sink, local,
                                                policy_candidates(policy, n), eps, delta,
                                                pilot, min_samples, g)
                        list_err.append((out - exact).norm(dim=1) / exact.norm(dim=1))
                        densities.append(rows / n)
                        bytes_.append(selector_rel + rows / n)
                        chosen.append(m / n)
                    errors.append(torch.stack(list_err, 1))                  # [g, trials]
            errors = torch.cat(errors)
            violations = (errors > eps).sum(1)
            results[(eps, delta, policy)] = {
                "violation_rate": float(violations.sum()) / errors.numel(),
                "worst_head_rate": float(violations.max()) / trials,
                "density": sum(densities) / len(densities),
                "relative_bytes": sum(bytes_) / len(bytes_),
                "heavy_fraction": sum(chosen) / len(chosen),
            }
            row = results[(eps, delta, policy)]
            print(f"{eps:5.2f} {delta:5.2f} {policy:16s} viol {row['violation_rate']:.4f} "
                  f"worst {row['worst_head_rate']:.3f} density {row['density']:.3f} "
                  f"bytes {row['relative_bytes']:.3f} heavy {row['heavy_fraction']:.3f}",
                  flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captures", required=True)
    parser.add_argument("--policies", default="fixed,fixed10,adaptive4,adaptive_counts")
    parser.add_argument("--settings", default="0.05:0.05,0.1:0.1")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--edge", type=int, default=128, help="sink = local tokens")
    parser.add_argument("--pilot", type=int, default=128)
    parser.add_argument("--min-samples", type=int, default=32)
    parser.add_argument("--records", type=int, default=0, help="first N records only (0: all)")
    args = parser.parse_args(argv)
    settings = [tuple(float(x) for x in s.split(":")) for s in args.settings.split(",")]
    for path in args.captures.split(","):
        records = torch.load(path, weights_only=False)
        if args.records:
            records = records[:args.records]
        print(f"== {Path(path).stem}: {len(records)} records")
        study(records, args.policies.split(","), settings, args.trials, args.edge, args.pilot,
              args.min_samples)


if __name__ == "__main__":
    main()
