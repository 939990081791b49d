"""A small run of every CUDA op of torch.ops.vattention, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python scripts/sanitizer_case.py
    compute-sanitizer --tool racecheck python scripts/sanitizer_case.py

Covers each kernel path once at small sizes: select_scores (shared and per-head, ragged
lengths), the int4 key summary (summarize_keys: prefill and a ragged update, aligned and
strided rows; select_scores_summary shared and per-head, D = 64 and 256), top-k with thread-block clusters (long rows) and without (many short rows,
windows, ties), the residual sampler (drawn and enumerated), pilot statistics with one
split and with split-K (workspace + merge), sparse attention with shared (KV-head) and
per-query-head lists, unaligned K/V rows, combine, and one whole decode step. Results are
compared with the CPU ops so that a failing run is visible without the sanitizer too.
Exits non-zero on a mismatch.
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import vattention  # noqa: E402
from vattention import ops  # noqa: E402
from vattention.key_summary import build_key_summary  # noqa: E402

I32 = torch.int32
CUDA = torch.device("cuda")
failures = []


def check(name, ok):
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
        failures.append(name)


def close(a, b, tol=1e-4):
    a, b = a.cpu().double(), b.cpu().double()
    if not torch.equal(torch.isneginf(a), torch.isneginf(b)):
        return False
    f = torch.isfinite(b)
    scale = b[f].abs().max().clamp(min=1.0) if f.any() else 1.0
    return bool(((a[f] - b[f]).abs() <= tol * (b[f].abs() + scale)).all())


def unnan(t):
    return torch.where(t.isnan(), torch.zeros_like(t), t)


def cuda(*ts):
    return tuple(None if t is None else t.to(CUDA) for t in ts)


def main():
    g = torch.Generator().manual_seed(0)

    # select_scores: one row per KV group (shared) or per query head, ragged lengths.
    q = torch.randn(2, 8, 128, generator=g).to(torch.bfloat16)
    k = torch.randn(2, 2, 3000, 128, generator=g).to(torch.bfloat16)
    lengths = torch.tensor([3000, 1234])
    for share in (True, False):
        ref = ops.select_scores(q, k, lengths, 0.09, share)
        got = ops.select_scores(*cuda(q, k, lengths), 0.09, share)
        check(f"select_scores share_gqa={share}", close(got, ref, 1e-3))

    # The int4 key summary: a prefill, then a ragged update (its last row past the end)
    # from k rows that are not 16-byte aligned; both against the CPU bytes. Then scores.
    I64 = torch.int64
    for dtype, dim in ((torch.bfloat16, 128), (torch.float32, 64), (torch.float16, 256)):
        k = torch.randn(2, 2, 700, dim, generator=g).to(dtype)
        k[1, 0, 5, 3] = float("nan")
        ref = build_key_summary(k)
        got = build_key_summary(k.to(CUDA))
        same = torch.equal(got.codes.cpu(), ref.codes) and torch.equal(
            got.params.cpu().isnan(), ref.params.isnan()) and torch.equal(
            got.params.cpu().nan_to_num(7.0), ref.params.nan_to_num(7.0))
        check(f"summarize_keys prefill {dtype} D={dim}", same)
        base = torch.randn(2, 2, 3, dim + 8, generator=g).to(dtype)
        k_new = base[..., 1:dim + 1]  # rows not 16-byte aligned: element-wise loads
        row_begin = torch.tensor([10, 698], dtype=I64)
        ops.summarize_keys(k_new, ref.codes, ref.params, row_begin)
        ops.summarize_keys(k_new.to(CUDA), got.codes, got.params, row_begin.to(CUDA))
        same = torch.equal(got.codes.cpu(), ref.codes) and torch.equal(
            got.params.cpu().nan_to_num(7.0), ref.params.nan_to_num(7.0))
        check(f"summarize_keys update {dtype} D={dim}", same)
        q = torch.randn(2, 8, dim, generator=g).to(dtype)
        lengths = torch.tensor([700, 333])
        for share in (True, False):
            want = ops.select_scores_summary(q, ref.codes, ref.params, lengths, 0.09, share)
            have = ops.select_scores_summary(q.to(CUDA), got.codes, got.params, lengths.to(CUDA),
                                             0.09, share)
            nan_ok = torch.equal(have.cpu().isnan(), want.isnan())
            check(f"select_scores_summary {dtype} D={dim} share_gqa={share}",
                  nan_ok and close(unnan(have), unnan(want), 1e-3))
    # A summary view whose rows are not 16-byte aligned (element-wise copies and stores).
    k = torch.randn(1, 2, 50, 64, generator=g)
    # Padded rows: 33 code bytes and 3 (z, s) pairs per token, of which 32 and 2 are used.
    codes_full = torch.zeros(1, 2, 51, 33, dtype=torch.uint8)
    params_full = torch.zeros(1, 2, 51, 3, 2, dtype=torch.float16)
    codes, params = codes_full[:, :, 1:, :32], params_full[:, :, 1:, :2]
    codes_d, params_d = codes_full.to(CUDA)[:, :, 1:, :32], params_full.to(CUDA)[:, :, 1:, :2]
    ops.summarize_keys(k, codes, params, torch.zeros(1, dtype=I64))
    ops.summarize_keys(k.to(CUDA), codes_d, params_d, torch.zeros(1, dtype=I64, device=CUDA))
    check("summarize_keys strided summary",
          torch.equal(codes_d.cpu(), codes) and torch.equal(params_d.cpu(), params))
    q = torch.randn(1, 4, 64, generator=g)
    want = ops.select_scores_summary(q, codes, params, torch.tensor([50]), 0.1, True)
    have = ops.select_scores_summary(q.to(CUDA), codes_d, params_d, torch.tensor([50], device=CUDA),
                                     0.1, True)
    check("select_scores_summary strided summary", close(have, want, 1e-3))

    # select_topk: 2 long rows (cluster path), then 40 short rows with windows and ties.
    scores = torch.randn(2, 20000, generator=g)
    starts = torch.tensor([0, 100], dtype=I32)
    ends = torch.tensor([20000, 19000], dtype=I32)
    ks = torch.tensor([1000, 17], dtype=I32)
    ref = ops.select_topk(scores, starts, ends, ks, 1000)
    check("select_topk cluster", torch.equal(ops.select_topk(*cuda(scores, starts, ends, ks), 1000).cpu(), ref))
    short = torch.randint(-2, 3, (40, 300), generator=g).to(torch.bfloat16)
    starts = torch.randint(0, 100, (40,), generator=g, dtype=I32)
    ends = starts + torch.randint(0, 250, (40,), generator=g, dtype=I32)
    ks = torch.randint(0, 40, (40,), generator=g, dtype=I32)
    ref = ops.select_topk(short, starts, ends, ks, 32)
    check("select_topk rows", torch.equal(ops.select_topk(*cuda(short, starts, ends, ks), 32).cpu(), ref))

    # sample_residual: heavy from select_topk, drawn and enumerated rows.
    rows, length = 8, 400
    scores = torch.randn(rows, length, generator=g)
    starts = torch.zeros(rows, dtype=I32)
    ends = torch.full((rows,), length, dtype=I32)
    heavy = ops.select_topk(scores, starts, ends, torch.full((rows,), 20, dtype=I32), 20)
    num_samples = torch.tensor([0, 5, 50, 379, 380, 1000, -1, 64], dtype=I32)
    rng = torch.tensor([123, 4], dtype=torch.int64)
    for max_out in (64, 400):
        ref = ops.sample_residual(heavy, starts, ends, num_samples, rng, max_out, 1)
        got = ops.sample_residual(*cuda(heavy, starts, ends, num_samples, rng), max_out, 1)
        # Only each row's first count entries are written (sample.h).
        slots = torch.arange(max_out)
        within = lambda t, n: torch.where(slots < n[:, None], t, -1)
        check(f"sample_residual max_out={max_out}",
              torch.equal(got[2].cpu(), ref[2]) and
              torch.equal(within(got[0].cpu(), ref[2]), within(ref[0], ref[2])))

    # pilot_stats and sparse_attention: bf16 D=128 GQA 4 shared lists; f32 D=64 per-head lists.
    for dtype, dim, q_heads, kv_heads, per_q in ((torch.bfloat16, 128, 8, 2, False),
                                                  (torch.float32, 64, 4, 2, True),
                                                  (torch.float16, 256, 14, 2, False)):
        q = torch.randn(2, q_heads, dim, generator=g).to(dtype)
        k = torch.randn(2, kv_heads, 700, dim, generator=g).to(dtype)
        v = torch.randn(2, kv_heads, 700, dim, generator=g).to(dtype)
        list_heads = q_heads if per_q else kv_heads
        idx = torch.randint(0, 700, (2, list_heads, 600), generator=g, dtype=I32)
        idx[:, :, ::7] = -1
        counts = torch.randint(0, 601, (2, list_heads), generator=g, dtype=I32)
        lw = torch.randn(2, list_heads, 600, generator=g)
        tag = f"{dtype} D={dim} per_q={per_q}"
        ref = ops.pilot_stats(q, k, v, idx, counts, 0.1)
        got = ops.pilot_stats(*cuda(q, k, v, idx, counts), 0.1)
        check(f"pilot_stats {tag}", all(close(a, b, 2e-4) for a, b in zip(got, ref)))
        for splits in (1, 0):
            ref = ops.sparse_attention(q, k, v, idx, lw, counts, 0.1, splits)
            got = ops.sparse_attention(*cuda(q, k, v, idx, lw, counts), 0.1, splits)
            check(f"sparse_attention {tag} splits={splits}",
                  all(close(a, b) for a, b in zip(got, ref)))

    # Unaligned K/V rows (odd element offset): the element-wise copy path.
    base_k = torch.randn(1, 2, 100, 129, generator=g).to(torch.bfloat16)
    base_v = torch.randn(1, 2, 100, 129, generator=g).to(torch.bfloat16)
    k, v = base_k[..., 1:], base_v[..., 1:]
    q = torch.randn(1, 4, 128, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, 100, (1, 2, 50), generator=g, dtype=I32)
    counts = torch.full((1, 2), 50, dtype=I32)
    ref = ops.sparse_attention(q, k, v, idx, None, counts, 0.1, 2)
    got = ops.sparse_attention(*cuda(q, k, v, idx, None, counts), 0.1, 2)
    check("sparse_attention unaligned rows", all(close(a, b) for a, b in zip(got, ref)))

    # combine
    po = torch.randn(5, 3, 64, generator=g)
    pl = torch.randn(5, 3, generator=g)
    pl[1:3, 0] = -math.inf
    ref = ops.combine(po, pl)
    got = ops.combine(*cuda(po, pl))
    check("combine", all(close(a, b, 1e-5) for a, b in zip(got, ref)))

    # One decode step end to end (its glue kernels too), ragged lengths, a device seed.
    q = torch.randn(2, 8, 128, generator=g).to(torch.bfloat16)
    k = torch.randn(2, 2, 5000, 128, generator=g).to(torch.bfloat16)
    v = torch.randn(2, 2, 5000, 128, generator=g).to(torch.bfloat16)
    cfg = vattention.VAttentionConfig(sink=16, local=16, heavy=0.03, base_rate=0.05,
                                      epsilon=0.1, delta=0.1)
    out = vattention.decode(*cuda(q, k, v), cfg, seq_lens=torch.tensor([5000, 2100]).cuda(),
                            seed=torch.tensor([5, 0], device=CUDA))
    check("decode finite", bool(torch.isfinite(out.float()).all()))

    torch.cuda.synchronize()
    if failures:
        print(f"{len(failures)} mismatches: {failures}")
        return 1
    print("sanitizer case: all ops match the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
