"""Study: how cheap can the key summary get before the selector loses the oracle's mass?

    python benchmarks/study_summaries.py                     # every capture found
    python benchmarks/study_summaries.py --captures /work/captures/smollm2_7168.pt

For each candidate summary of K, prints its bytes per token relative to a bf16 cache's K
and V rows (2 * D * 2 bytes) and the selector's **mass recall** on captured real attention:
per query head, the exact softmax mass of the tokens the candidate's top-k keeps, over the
mass of the oracle's top-k (both among the tokens outside sink and local, as decode picks
heavy hitters). Scores are select_scores.h's GQA-shared scores: per-head log-probabilities
(logits minus the head's logsumexp), max over the group. Recall is reported at k = 5% of n
(heavy 5%) and at a fixed k = 512 tokens: mean, 10th percentile and min over heads.

Plain torch, float32 scores (exact reference in float64); nothing here is a kernel.
Candidates (bits b, group g channels, fp16 zero and step per group unless said):
  int{b}/g{g}          per-token groups of g channels (int4/g32 is today's "int4")
  c-int{b}/g{g}        keys centred per (KV head, channel) first: mu = mean over the
                       prefill's keys, q.mu is the same for every token so the ranking of
                       q.(k - mu) is that of q.k; mu costs D fp16 per KV head (~0 per token)
  cs-int{b}/g{g}       centred and divided by a per-channel scale (the channel's std),
                       folded into q at scoring
  kivi-int{b}/t{t}     KIVI-style per-channel quantisation over blocks of t tokens
                       (zero/step per channel and block; needs a full-precision tail while
                       a block fills, not counted)
  csh-int{b}/g{g}      centred, scaled, then rotated by an orthonormal Hadamard matrix
                       (q rotated alike at scoring) so no channel dominates a group
  static-int{b} src     per channel, one zero/step for the whole window from the prefill's
                       range, later tokens clamped: b * D / 8 bytes per token, no per-token
                       parameters (see quant_static)
  sign+int4@s          two stages: 1-bit signs of centred keys scored with q * sigma,
                       shortlist the top s of tokens, int4/g32 scores on the shortlist
  mu-half              as c-*, but mu from the first half of the tokens only (a mu frozen
                       at prefill while decode appends the rest)
"""
from __future__ import annotations

import argparse
import math
import pathlib

import torch

DEFAULT_CAPTURES = ("/work/captures/smollm2_7168.pt", "/work/captures/gemma3_16384.pt",
                    "/work/captures/gemma3_32768.pt")
SINK = LOCAL = 128


def fp16(x):
    return x.to(torch.float16).float()


def quant_groups(x, bits, group):
    """Per-token asymmetric quantisation of x [H, N, D] in channel groups (the kernel's
    rounding: fp16 zero = min, fp16 step = (max - zero) / levels, rint, clamp)."""
    h, n, d = x.shape
    levels = 2 ** bits - 1
    g = x.reshape(h, n, d // group, group)
    zero = fp16(g.amin(-1, keepdim=True))
    step = fp16((g.amax(-1, keepdim=True) - zero) / levels)
    code = torch.where(step == 0, torch.zeros_like(g), torch.round((g - zero) / step))
    code = code.clamp(0, levels)
    return (zero + step * code).reshape(h, n, d)


def quant_channels(x, bits, block):
    """KIVI-style: per channel, zero and step over blocks of `block` tokens."""
    h, n, d = x.shape
    levels = 2 ** bits - 1
    pad = (-n) % block
    xp = torch.cat([x, x[:, -1:].expand(h, pad, d)], 1) if pad else x
    g = xp.reshape(h, -1, block, d)
    zero = fp16(g.amin(2, keepdim=True))
    step = fp16((g.amax(2, keepdim=True) - zero) / levels)
    code = torch.where(step == 0, torch.zeros_like(g), torch.round((g - zero) / step))
    return (zero + step * code.clamp(0, levels)).reshape(h, -1, d)[:, :n]


def quant_static(x, bits, src):
    """Per channel, one zero and step for the whole window, from the prefill's range
    (tokens outside the sink, which decode keeps anyway); later tokens are clamped.
    src "all": min/max of every such token; "half": of the first half only (the range
    frozen at a prefill of n / 2, the rest appended by decode); "q999": the half's
    0.1% / 99.9% quantiles (outliers clipped)."""
    levels = 2 ** bits - 1
    n = x.shape[1]
    ref = x[:, SINK:] if src == "all" else x[:, SINK: n // 2]
    if src == "q999":
        lo = ref.quantile(0.001, dim=1, keepdim=True)
        hi = ref.quantile(0.999, dim=1, keepdim=True)
    else:
        lo, hi = ref.amin(1, keepdim=True), ref.amax(1, keepdim=True)
    zero = fp16(lo)
    step = fp16((hi - zero) / levels)
    code = torch.where(step == 0, torch.zeros_like(x), torch.round((x - zero) / step))
    return zero + step * code.clamp(0, levels)


def shared_scores(q, k, scale):
    """select_scores.h with share_gqa: [Hkv, N] max over the group of log p_h(i)."""
    hq, hkv = q.shape[0], k.shape[0]
    group = hq // hkv
    logits = torch.einsum("kgd,knd->kgn", q.reshape(hkv, group, -1), k) * scale
    return (logits - torch.logsumexp(logits, -1, keepdim=True)).amax(1)


def recall(probs, scores, ref_scores, count, group):
    """Per query head: probs[h, top-count of scores] / probs[h, top-count of ref_scores]."""
    lo, hi = SINK, probs.shape[1] - LOCAL
    out = []
    sel = scores[:, lo:hi].topk(count, -1).indices + lo
    ref = ref_scores[:, lo:hi].topk(count, -1).indices + lo
    for h in range(probs.shape[0]):
        kv = h // group
        out.append(float(probs[h, sel[kv]].sum() / probs[h, ref[kv]].sum()))
    return out


def candidates(dim):
    """(name, bytes per token per KV head, builder(k, q) -> scores function)."""
    out = []
    params = lambda g: 4 * dim // g                      # fp16 zero + step per group
    for bits in (4, 3, 2):
        for group in (32, 64, 128):
            if group > dim:
                continue
            out.append((f"int{bits}/g{group}", bits * dim / 8 + params(group),
                        ("plain", bits, group)))
    for bits in (4, 3, 2, 1):
        for group in (32, 64, 128):
            if group > dim:
                continue
            out.append((f"c-int{bits}/g{group}", bits * dim / 8 + params(group),
                        ("centred", bits, group)))
            out.append((f"cs-int{bits}/g{group}", bits * dim / 8 + params(group),
                        ("centred-scaled", bits, group)))
            if bits in (3, 2):
                out.append((f"csh-int{bits}/g{group}", bits * dim / 8 + params(group),
                            ("centred-scaled-hadamard", bits, group)))
    for bits in (2, 3):
        out.append((f"c-int{bits}/g32 mu-half", bits * dim / 8 + params(32),
                    ("centred-half", bits, 32)))
    for bits in (2, 4):
        for block in (32, 128):
            out.append((f"kivi-int{bits}/t{block}", bits * dim / 8 + 4 * dim / block,
                        ("kivi", bits, block)))
    for bits in (3, 2):
        for block in (64, 128):
            out.append((f"kivi-int{bits}/t{block}", bits * dim / 8 + 4 * dim / block,
                        ("kivi", bits, block)))
    out.append(("kivi-int3/t32", 3 * dim / 8 + 4 * dim / 32, ("kivi", 3, 32)))
    out.append(("kivi-int4/t64", 4 * dim / 8 + 4 * dim / 64, ("kivi", 4, 64)))
    for bits in (4, 3, 2):
        for src in ("all", "half", "q999"):
            out.append((f"static-int{bits} {src}", bits * dim / 8, ("static", bits, src)))
    for share in (0.1, 0.15, 0.2, 0.25):
        out.append((f"sign+int4@{share:.2f}", dim / 8 + share * (dim / 2 + params(32)),
                    ("two-stage", share, 0)))
    return out


def hadamard(dim):
    """Orthonormal Sylvester Hadamard matrix (dim a power of 2): spreads outlier channels."""
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(dim)


def summary_keys(kind, k, a, b):
    if kind == "plain":
        return quant_groups(k, a, b)
    mu = k.mean(1, keepdim=True)
    if kind == "centred-half":
        mu = k[:, : k.shape[1] // 2].mean(1, keepdim=True)
    mu = fp16(mu)
    if kind in ("centred", "centred-half"):
        return quant_groups(k - mu, a, b)
    if kind == "centred-scaled":
        sigma = fp16((k - mu).std(1, keepdim=True).clamp_min(1e-6))
        return quant_groups((k - mu) / sigma, a, b) * sigma
    if kind == "centred-scaled-hadamard":
        sigma = fp16((k - mu).std(1, keepdim=True).clamp_min(1e-6))
        h = hadamard(k.shape[-1])
        return (quant_groups(((k - mu) / sigma) @ h, a, b) @ h.T) * sigma
    if kind == "static":
        return quant_static(k, a, b)
    if kind == "kivi":
        return quant_channels(k, a, b)
    raise ValueError(kind)


def two_stage_scores(q, k, scale, share, int4_scores):
    mu = fp16(k.mean(1, keepdim=True))
    c = k - mu
    sigma = c.abs().mean(1, keepdim=True)               # E|c|: the sign code's best scale
    signs = torch.sign(c) * sigma
    first = shared_scores(q, signs, scale)
    n = k.shape[1]
    lo, hi = SINK, n - LOCAL
    keep = max(1, int(share * n))
    idx = first[:, lo:hi].topk(min(keep, hi - lo), -1).indices + lo
    out = torch.full_like(first, float("-inf"))
    out.scatter_(1, idx, int4_scores.gather(1, idx))
    return out


def study(path, dtype, only=None):
    records = torch.load(path, weights_only=False)
    name = pathlib.Path(path).stem
    n = records[0]["k"].shape[1]
    dim = records[0]["k"].shape[2]
    counts = {"5%": max(1, int(0.05 * n)), "512": 512}
    rows = {}
    for rec in records:
        q = rec["q"].to(dtype).double()
        k = rec["k"].to(dtype).double()
        hq, hkv = q.shape[0], k.shape[0]
        group = hq // hkv
        scale = rec["scale"]
        logits = torch.einsum("kgd,knd->kgn", q.reshape(hkv, group, dim), k) * scale
        probs = torch.softmax(logits.reshape(hq, -1), -1)
        ref = shared_scores(q, k, scale)
        qf, kf = q.float(), k.float()
        int4 = shared_scores(qf, quant_groups(kf, 4, 32), scale)
        for cname, nbytes, (kind, a, b) in candidates(dim):
            if only and cname != "int4/g32" and not any(o in cname for o in only):
                continue
            if kind == "two-stage":
                scores = two_stage_scores(qf, kf, scale, a, int4)
            else:
                scores = shared_scores(qf, summary_keys(kind, kf, a, b), scale)
            row = rows.setdefault(cname, {"bytes": nbytes / (4 * dim)})
            for label, count in counts.items():
                row.setdefault(label, []).extend(recall(probs, scores.double(), ref, count, group))
    print(f"\n## {name}: n = {n}, D = {dim}, {len(records)} records, "
          f"{len(rows['int4/g32']['5%'])} query heads, k = {counts['5%']} (5%) and 512")
    print(f"{'candidate':24s} {'bytes':>6s} | {'5%: mean':>8s} {'p10':>6s} {'min':>6s} | "
          f"{'512: mean':>9s} {'p10':>6s} {'min':>6s}")
    for cname, row in sorted(rows.items(), key=lambda kv: -kv[1]["bytes"]):
        cells = []
        for label in counts:
            r = torch.tensor(row[label])
            cells.append(f"{r.mean():8.4f} {r.quantile(0.1):6.3f} {r.min():6.3f}")
        print(f"{cname:24s} {row['bytes']:6.3f} | {cells[0]} | {cells[1]:>23s}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captures", default=",".join(DEFAULT_CAPTURES),
                        help="comma-separated capture files (missing ones are skipped)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the cache dtype the captured fp32 keys are cast to first")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings: study only candidates naming one "
                             "(int4/g32, the baseline, always)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for path in args.captures.split(","):
        if not pathlib.Path(path).exists():
            print(f"(skipping {path}: not there)")
            continue
        study(path, getattr(torch, args.dtype), [o for o in args.only.split(",") if o])


if __name__ == "__main__":
    main()
