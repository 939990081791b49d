"""The CUDA kernels of torch.ops.vattention.* against the same ops on the CPU.

The CPU op is the reference: topk and sample_residual must agree exactly (indices and
counts; sample_residual draws from the same Philox stream through cuRAND), the float ops
within tolerances. Also: CUDA-graph capture and replay, no host synchronisation
(torch.cuda.set_sync_debug_mode("error")), torch.library.opcheck, and what only the CUDA
path has to do (skip out-of-range list entries, reject unsupported head dims, unaligned
K/V rows). Skipped without a GPU.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from vattention import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

I32 = torch.int32
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.device("cuda")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_cuda(*tensors):
    return tuple(None if t is None else t.to(CUDA) for t in tensors)


@contextlib.contextmanager
def no_sync():
    """Any synchronising CUDA call inside the block raises."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def assert_close_scaled(got, ref, rtol=1e-4, name=""):
    """Elementwise |got - ref| <= rtol * (|ref| + max|ref|): relative to the tensor's scale, so
    that sums with cancellation are judged against their terms, not their result."""
    got = got.detach().cpu().double()
    ref = ref.detach().cpu().double()
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), name
    finite = torch.isfinite(ref)
    assert torch.isfinite(got[finite]).all(), name
    if finite.any():
        scale = ref[finite].abs().max().clamp(min=1.0)
        err = (got[finite] - ref[finite]).abs()
        bound = rtol * (ref[finite].abs() + scale)
        worst = float((err / bound).max())
        assert worst <= 1.0, f"{name}: error {worst:.3g} x tolerance"


# --------------------------------------------------------------------------------------
# input builders
# --------------------------------------------------------------------------------------


def make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g):
    q = torch.randn(batch, q_heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    v = (torch.randn(batch, kv_heads, length, dim, generator=g) + 0.3).to(dtype)
    return q, k, v


def make_lists(batch, list_heads, max_count, length, g, pad_frac=0.2, sort=False):
    """Ragged valid lists: rows in [0, length) (duplicates allowed), -1 padding inside the
    count, counts in [0, max_count] with both ends present, -1 beyond the count, and
    log-weights with a few -inf entries."""
    idx = torch.randint(0, max(length, 1), (batch, list_heads, max_count), generator=g, dtype=I32)
    if sort:
        idx = idx.sort(dim=-1).values
    idx[torch.rand(idx.shape, generator=g) < pad_frac] = -1
    counts = torch.randint(0, max_count + 1, (batch, list_heads), generator=g, dtype=I32)
    counts.view(-1)[0] = 0
    counts.view(-1)[-1] = max_count
    beyond = torch.arange(max_count)[None, None, :] >= counts[:, :, None]
    idx[beyond] = -1
    lw = (torch.randn(idx.shape, generator=g) * 0.7).float()
    lw[torch.rand(idx.shape, generator=g) < 0.05] = -math.inf
    return idx, lw, counts


def random_windows(rows, length, g):
    starts = torch.randint(0, length + 1, (rows,), generator=g, dtype=I32)
    ends = starts + torch.randint(0, length + 3, (rows,), generator=g, dtype=I32)
    starts[0], ends[0] = 0, length
    if rows > 1:
        starts[1], ends[1] = 0, length + 50          # end clipped to the row length
    if rows > 2:
        starts[2], ends[2] = length // 3, length // 3  # empty window
    if rows > 3:
        starts[3], ends[3] = length // 4, length - length // 5
    return starts, ends


def topk_both(scores, starts, ends, ks, k_max):
    ref = ops.select_topk(scores, starts, ends, ks, k_max)
    args = to_cuda(scores, starts, ends, ks)
    with no_sync():
        got = ops.select_topk(*args, k_max)
    assert got.device.type == "cuda" and got.dtype == I32 and got.shape == ref.shape
    return got.cpu(), ref


# --------------------------------------------------------------------------------------
# select_topk
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 7, 300, 5000, 40000])
def test_select_topk_matches_cpu(dtype, length):
    g = gen(length + DTYPES.index(dtype))
    rows = 12
    scores = torch.randn(rows, length, generator=g).to(dtype)
    starts, ends = random_windows(rows, length, g)
    k_max = min(length + 3, 700)
    ks = torch.randint(0, k_max + 1, (rows,), generator=g, dtype=I32)
    ks[0] = 0
    ks[1] = k_max
    ks[4 % rows] = -5
    ks[5 % rows] = k_max + 100
    got, ref = topk_both(scores, starts, ends, ks, k_max)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_ties_nan_infinities_and_zeros(dtype):
    g = gen(7)
    rows, length = 16, 3000
    scores = torch.randint(-3, 4, (rows, length), generator=g).to(dtype)  # many ties
    special = torch.rand(rows, length, generator=g)
    scores[special < 0.1] = float("nan")
    scores[(special >= 0.1) & (special < 0.15)] = float("inf")
    scores[(special >= 0.15) & (special < 0.2)] = -float("inf")
    scores[(special >= 0.2) & (special < 0.25)] = -0.0
    scores[(special >= 0.25) & (special < 0.3)] = 0.0
    scores[5] = float("nan")          # only NaN
    scores[6] = 1.0                   # only ties
    starts, ends = random_windows(rows, length, g)
    ks = torch.randint(0, 400, (rows,), generator=g, dtype=I32)
    got, ref = topk_both(scores, starts, ends, ks, 400)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 64, 256, 6553, 13107])
def test_select_topk_long_rows_large_and_small_k(dtype, k):
    """Rows of 131072 with k up to 10%: the multi-block (cluster) path."""
    g = gen(k)
    rows, length = 32 if k == 6553 else 6, 131072
    scores = torch.randn(rows, length, generator=g).to(dtype)
    scores[:, ::97] = 3.0                                     # ties at the top
    starts = torch.zeros(rows, dtype=I32)
    ends = torch.full((rows,), length, dtype=I32)
    starts[1], ends[1] = 1000, 120000                         # a window
    ks = torch.full((rows,), k, dtype=I32)
    ks[2] = k // 2
    got, ref = topk_both(scores, starts, ends, ks, k)
    assert torch.equal(got, ref)


def test_select_topk_many_rows_strided_and_edge_shapes():
    g = gen(3)
    big = torch.randn(700, 260, generator=g)
    scores = big[:, 5:205]                      # row stride 260, positions contiguous
    rows = scores.shape[0]
    starts, ends = random_windows(rows, 200, g)
    ks = torch.randint(-2, 40, (rows,), generator=g, dtype=I32)
    got, ref = topk_both(scores, starts, ends, ks, 33)
    assert torch.equal(got, ref)
    z = torch.zeros(3, dtype=I32, device=CUDA)
    assert ops.select_topk(torch.randn(3, 10, device=CUDA), z, z + 10, z + 4, 0).shape == (3, 0)
    empty = ops.select_topk(torch.randn(0, 10, device=CUDA), z[:0], z[:0], z[:0], 4)
    assert empty.shape == (0, 4)
    none = ops.select_topk(torch.randn(3, 0, device=CUDA), z, z, z + 2, 2)
    assert (none == -1).all()


# --------------------------------------------------------------------------------------
# sample_residual
# --------------------------------------------------------------------------------------


def sample_case(g, rows=48, span=300, heavy_max=24, start_max=50):
    starts = torch.randint(0, start_max, (rows,), generator=g, dtype=I32)
    widths = torch.randint(0, span, (rows,), generator=g, dtype=I32)
    widths[0] = 0
    ends = starts + widths
    scores = torch.randn(rows, int(ends.max()) + 1, generator=g)
    ks = torch.randint(0, heavy_max + 1, (rows,), generator=g, dtype=I32)
    ks[1] = heavy_max
    ends[1] = starts[1] + min(10, heavy_max)                  # n_r = 0
    heavy = ops.select_topk(scores, starts, ends, ks, heavy_max)
    n_r = ends - starts - (heavy >= 0).sum(1).to(I32)
    regime = torch.randint(0, 6, (rows,), generator=g)
    b = torch.randint(1, 64, (rows,), generator=g, dtype=I32)
    num_samples = torch.where(regime == 0, torch.zeros_like(b),
                  torch.where(regime == 1, -b,
                  torch.where(regime == 2, n_r + b,
                  torch.where(regime == 3, n_r, b))))
    return heavy, starts, ends, num_samples.to(I32)


def sample_both(heavy, starts, ends, num_samples, rng, max_out, stream):
    ref = ops.sample_residual(heavy, starts, ends, num_samples, rng, max_out, stream)
    args = to_cuda(heavy, starts, ends, num_samples, rng)
    with no_sync():
        got = ops.sample_residual(*args, max_out, stream)
    for t in got:
        assert t.device.type == "cuda"
    got = tuple(t.cpu() for t in got)
    idx, lw, counts = got
    ridx, rlw, rcounts = ref
    assert idx.dtype == I32 and lw.dtype == torch.float32 and counts.dtype == I32
    assert torch.equal(counts, rcounts)
    assert torch.equal(idx, ridx)                           # incl. -1 padding
    valid = torch.arange(idx.shape[1])[None, :] < counts[:, None]
    torch.testing.assert_close(lw[valid], rlw[valid], rtol=3e-7, atol=3e-7)
    assert torch.isneginf(lw[~valid]).all() and torch.isneginf(rlw[~valid]).all()
    return got


@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 3), ((1 << 32) + 5, (1 << 30) - 1),
                                         ((1 << 63) - 1, 77), (-1, 5)])
@pytest.mark.parametrize("stream", [0, 1])
@pytest.mark.parametrize("max_out", [0, 1, 5, 64, 333])
def test_sample_residual_matches_cpu(seed, offset, stream, max_out):
    g = gen(abs(seed) % 1000 + offset % 1000 + 10 * max_out + stream)
    heavy, starts, ends, num_samples = sample_case(g)
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    sample_both(heavy, starts, ends, num_samples, rng, max_out, stream)


def test_sample_residual_without_heavy_columns_and_no_rows():
    g = gen(5)
    starts = torch.randint(0, 10, (20,), generator=g, dtype=I32)
    ends = starts + torch.randint(0, 100, (20,), generator=g, dtype=I32)
    num_samples = torch.randint(-3, 120, (20,), generator=g, dtype=I32)
    heavy = torch.zeros(20, 0, dtype=I32)
    sample_both(heavy, starts, ends, num_samples, torch.tensor([9, 1]), 50, 1)
    z = torch.zeros(0, dtype=I32, device=CUDA)
    idx, lw, counts = ops.sample_residual(torch.zeros(0, 4, dtype=I32, device=CUDA), z, z, z,
                                          torch.tensor([1, 0], device=CUDA), 8, 0)
    assert idx.shape == (0, 8) and counts.shape == (0,)


def test_sample_residual_long_rows():
    """Windows of 131072 with a 5% heavy set and budgets of a few thousand draws."""
    g = gen(11)
    rows, length, heavy_max = 16, 131072, 6553
    scores = torch.randn(rows, length, generator=g)
    starts = torch.zeros(rows, dtype=I32)
    ends = torch.full((rows,), length, dtype=I32)
    starts[1], ends[1] = 128, length - 128
    heavy = ops.select_topk(scores, starts, ends, torch.full((rows,), heavy_max, dtype=I32), heavy_max)
    num_samples = torch.randint(1, 9000, (rows,), generator=g, dtype=I32)
    num_samples[2] = 2 * length                              # more than n_r, above max_out
    for max_out in (8192, 200000):                           # clamped / enumerated
        sample_both(heavy, starts, ends, num_samples, torch.tensor([77, 2]), max_out, 1)


def test_sample_residual_uses_the_device_rng_state():
    """The seed is read on the device: changing the rng tensor's contents (not the tensor)
    changes the draws, as a captured graph would see."""
    g = gen(6)
    heavy, starts, ends, num_samples = to_cuda(*sample_case(g))
    num_samples = torch.full_like(num_samples, 20)
    rng = torch.tensor([1, 0], dtype=torch.int64, device=CUDA)
    a = ops.sample_residual(heavy, starts, ends, num_samples, rng, 20, 1)[0].clone()
    rng[1] = 1
    b = ops.sample_residual(heavy, starts, ends, num_samples, rng, 20, 1)[0]
    assert not torch.equal(a, b)


# --------------------------------------------------------------------------------------
# pilot_stats
# --------------------------------------------------------------------------------------


def pilot_both(q, k, v, idx, counts, scale):
    ref = ops.pilot_stats(q, k, v, idx, counts, scale)
    args = to_cuda(q, k, v, idx, counts)
    with no_sync():
        got = ops.pilot_stats(*args, scale)
    names = ("max_logit", "moments", "vector_moments")
    for a, b, name in zip(got, ref, names):
        assert a.device.type == "cuda" and a.dtype == torch.float32 and a.shape == b.shape
        assert_close_scaled(a, b, rtol=2e-4 if name != "max_logit" else 1e-5, name=name)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("per_q_head", [False, True])
def test_pilot_stats_matches_cpu(dtype, dim, group, per_q_head):
    g = gen(dim + 10 * group + 1000 * per_q_head + DTYPES.index(dtype))
    batch, kv_heads, length = 2, 2, 300
    q_heads = kv_heads * group
    q, k, v = make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g)
    list_heads = q_heads if per_q_head else kv_heads
    for max_count in (17, 700):                               # one split / split-K
        idx, _, counts = make_lists(batch, list_heads, max_count, length, g)
        pilot_both(q, k, v, idx, counts, 1.0 / math.sqrt(dim))


def test_pilot_stats_long_lists_and_empty():
    g = gen(12)
    q, k, v = make_qkv(1, 32, 8, 131072, 128, torch.bfloat16, g)
    idx, _, counts = make_lists(1, 8, 6553, 131072, g, pad_frac=0.01)
    pilot_both(q, k, v, idx, counts, 1 / math.sqrt(128))
    q, k, v = make_qkv(2, 4, 2, 9, 64, torch.float32, g)
    got = ops.pilot_stats(*to_cuda(q, k, v), torch.zeros(2, 2, 0, dtype=I32, device=CUDA),
                          torch.zeros(2, 2, dtype=I32, device=CUDA), 0.125)
    assert torch.isneginf(got[0]).all() and (got[1] == 0).all() and (got[2] == 0).all()


# --------------------------------------------------------------------------------------
# sparse_attention
# --------------------------------------------------------------------------------------


def attention_both(q, k, v, idx, lw, counts, scale, splits, rtol=1e-4):
    ref_out, ref_lse = ops.sparse_attention(q, k, v, idx, lw, counts, scale, splits)
    args = to_cuda(q, k, v, idx, lw, counts)
    with no_sync():
        out, lse = ops.sparse_attention(*args, scale, splits)
    assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == ref_out.shape
    assert lse.shape == ref_lse.shape
    assert_close_scaled(lse, ref_lse, rtol=rtol, name="lse")
    assert_close_scaled(out, ref_out, rtol=rtol, name="out")
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("per_q_head", [False, True])
def test_sparse_attention_matches_cpu(dtype, dim, group, per_q_head):
    g = gen(dim + 10 * group + 1000 * per_q_head + DTYPES.index(dtype))
    batch, kv_heads, length = 2, 2, 257
    q_heads = kv_heads * group
    q, k, v = make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g)
    list_heads = q_heads if per_q_head else kv_heads
    idx, lw, counts = make_lists(batch, list_heads, 300, length, g)
    scale = 1.0 / math.sqrt(dim)
    for weights in (None, lw):
        for splits in (1, 3, 0, 64):
            attention_both(q, k, v, idx, weights, counts, scale, splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_attention_decode_shape(dtype):
    """B=1, 32/8 heads, D=128, N=131072, 10% sorted rows per KV head (the benchmark shape),
    and the same rows given per query head."""
    g = gen(13 + DTYPES.index(dtype))
    length, count = 131072, 13107
    q, k, v = make_qkv(1, 32, 8, length, 128, dtype, g)
    for list_heads in (8, 32):
        idx = torch.stack([torch.randperm(length, generator=g)[:count].sort().values
                           for _ in range(list_heads)]).to(I32)[None]
        counts = torch.full((1, list_heads), count, dtype=I32)
        lw = torch.zeros(1, list_heads, count)
        attention_both(q, k, v, idx, lw, counts, 1 / math.sqrt(128), 0)


def test_sparse_attention_wide_groups_and_more_splits_than_rows():
    g = gen(14)
    q, k, v = make_qkv(2, 24, 2, 100, 64, torch.float16, g)        # group 12: 2 head chunks
    idx, lw, counts = make_lists(2, 2, 90, 100, g)
    attention_both(q, k, v, idx, lw, counts, 0.1, 0)
    attention_both(q, k, v, idx, lw, counts, 0.1, 200)             # splits > entries


def test_sparse_attention_strided_and_unaligned_views():
    """A KV-cache slice with a row stride > head_dim, K/V starting at an odd element offset
    (rows not 16-byte aligned: the element-wise copy path) and a non-contiguous q."""
    g = gen(8)
    for dtype in DTYPES:
        cache_k = torch.randn(2, 2, 50, 64 + 3, generator=g).to(dtype)
        cache_v = torch.randn(2, 2, 50, 64 + 1, generator=g).to(dtype)
        k, v = cache_k[:, :, 5:35, 1:65], cache_v[:, :, 10:40, :64]
        q = torch.randn(8, 2, 64, generator=g).to(dtype).transpose(0, 1)
        assert not k.is_contiguous() and q.stride(2) == 1
        idx, lw, counts = make_lists(2, 2, 25, 30, g)
        attention_both(q, k, v, idx, lw, counts, 0.125, 3)
        pilot_both(q, k, v, idx, counts, 0.125)


def test_sparse_attention_skips_out_of_range_entries_on_cuda():
    """The CPU op rejects entries >= length; the CUDA op may not look at the data on the host,
    so it skips them (attention_params.h): same as replacing them by -1."""
    g = gen(15)
    q, k, v = make_qkv(1, 4, 2, 40, 64, torch.float32, g)
    idx, lw, counts = make_lists(1, 2, 30, 40, g, pad_frac=0.0)
    counts.fill_(30)
    bad = idx.clone()
    bad[..., ::4] = 40 + torch.arange(bad[..., ::4].numel()).view(bad[..., ::4].shape).to(I32)
    clean = bad.clone()
    clean[clean >= 40] = -1
    out, lse = ops.sparse_attention(*to_cuda(q, k, v, bad, lw, counts), 0.125, 0)
    ref_out, ref_lse = ops.sparse_attention(q, k, v, clean, lw, counts, 0.125, 0)
    assert_close_scaled(out, ref_out, name="out")
    assert_close_scaled(lse, ref_lse, name="lse")
    got = ops.pilot_stats(*to_cuda(q, k, v, bad, counts), 0.125)
    ref = ops.pilot_stats(q, k, v, clean, counts, 0.125)
    for a, b in zip(got, ref):
        assert_close_scaled(a, b, rtol=2e-4)


def test_sparse_attention_rejects_unsupported_head_dim():
    g = gen(16)
    q, k, v = to_cuda(*make_qkv(1, 2, 1, 10, 96, torch.float32, g))
    idx = torch.zeros(1, 1, 3, dtype=I32, device=CUDA)
    counts = torch.full((1, 1), 3, dtype=I32, device=CUDA)
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.sparse_attention(q, k, v, idx, None, counts, 0.1, 0)
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.pilot_stats(q, k, v, idx, counts, 0.1)


# --------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 2, 5, 40])
@pytest.mark.parametrize("dim", [64, 40, 300])
def test_combine_matches_cpu(splits, dim):
    g = gen(splits * 1000 + dim)
    po = torch.randn(splits, 3, 4, dim, generator=g)
    pl = torch.randn(splits, 3, 4, generator=g) * 3
    pl[torch.rand(pl.shape, generator=g) < 0.3] = -math.inf
    pl[:, 0, 0] = -math.inf
    po[torch.isneginf(pl)] = float("nan")      # an empty partial's values are ignored
    ref = ops.combine(po, pl)
    args = to_cuda(po, pl)
    with no_sync():
        got = ops.combine(*args)
    assert_close_scaled(got[0], ref[0], rtol=1e-5)
    assert_close_scaled(got[1], ref[1], rtol=1e-5)
    vec = ops.combine(*to_cuda(po[:, 1, 1].contiguous(), pl[:, 1, 1].contiguous()))
    assert vec[0].shape == (dim,) and vec[1].shape == ()
    assert_close_scaled(vec[0], ref[0][1, 1], rtol=1e-5)


# --------------------------------------------------------------------------------------
# CUDA graphs, no host synchronisation, opcheck
# --------------------------------------------------------------------------------------


def _pipeline(q, k, v, scores, starts, ends, ks, rng, heavy_max=24, sample_max=64):
    batch, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    heavy = ops.select_topk(scores, starts, ends, ks, heavy_max)
    counts = (heavy >= 0).sum(-1).to(I32).view(batch, kv_heads)
    det = ops.sparse_attention(q, k, v, heavy.view(batch, kv_heads, heavy_max), None, counts,
                               0.125, 0)
    pidx, _, pn = ops.sample_residual(heavy, starts, ends, torch.full_like(ks, 16), rng, 16, 0)
    stats = ops.pilot_stats(q, k, v, pidx.view(batch, kv_heads, 16), pn.view(batch, kv_heads),
                            0.125)
    budget = torch.clamp(stats[1][..., 0].view(batch, kv_heads, -1).amax(-1).ceil(), 1,
                         sample_max).to(I32).view(-1)
    idx, lw, n = ops.sample_residual(heavy, starts, ends, budget, rng, sample_max, 1)
    smp = ops.sparse_attention(q, k, v, idx.view(batch, kv_heads, sample_max),
                               lw.view(batch, kv_heads, sample_max), n.view(batch, kv_heads),
                               0.125, 0)
    out, lse = ops.combine(torch.stack([det[0], smp[0]]), torch.stack([det[1], smp[1]]))
    return out, lse, stats[1], idx


def _pipeline_inputs(seed, length=3000):
    g = gen(seed)
    q, k, v = make_qkv(2, 8, 2, length, 128, torch.bfloat16, g)
    scores = torch.randn(4, length, generator=g)
    starts = torch.full((4,), 4, dtype=I32)
    ends = torch.full((4,), length - 8, dtype=I32)
    ks = torch.full((4,), 24, dtype=I32)
    rng = torch.tensor([seed, 1], dtype=torch.int64)
    return to_cuda(q, k, v, scores, starts, ends, ks, rng)


def test_pipeline_runs_without_host_synchronisation():
    args = _pipeline_inputs(1)
    _pipeline(*args)
    with no_sync():
        _pipeline(*args)


def test_cuda_graph_capture_and_replay_with_new_inputs():
    static = _pipeline_inputs(2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):          # warm-up (also sets the kernels' shared-memory limits)
            _pipeline(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _pipeline(*static)
    for seed in (3, 4):
        fresh = _pipeline_inputs(seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        expected = _pipeline(*fresh)
        torch.cuda.synchronize()
        for a, b in zip(captured, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Replays saw the new inputs: the last replay differs from a run on the first inputs.
    first = _pipeline(*_pipeline_inputs(2))
    assert not torch.equal(first[3], captured[3])


def _opcheck_samples():
    g = gen(0)
    samples = []
    scores = torch.randn(4, 300, generator=g)
    starts = torch.tensor([0, 3, 5, 30], dtype=I32)
    ends = torch.tensor([300, 200, 5, 400], dtype=I32)
    samples.append((torch.ops.vattention.select_topk.default,
                    to_cuda(scores, starts, ends, torch.tensor([4, 2, 1, 30], dtype=I32)) + (30,)))
    samples.append((torch.ops.vattention.select_topk.default,
                    to_cuda(scores.bfloat16(), torch.zeros(4, dtype=I32),
                            torch.full((4,), 300, dtype=I32), torch.full((4,), 3, dtype=I32)) + (3,)))
    heavy = ops.select_topk(scores, torch.zeros(4, dtype=I32), torch.full((4,), 300, dtype=I32),
                     torch.full((4,), 5, dtype=I32), 5)
    for stream, ns in ((0, [3, 400, 0, 10]), (1, [25, 25, 2, 40])):
        samples.append((torch.ops.vattention.sample_residual.default,
                        to_cuda(heavy, torch.zeros(4, dtype=I32), torch.full((4,), 300, dtype=I32),
                                torch.tensor(ns, dtype=I32), torch.tensor([7, 1]))
                        + (30, stream)))
    for dtype, group, per_q in ((torch.float32, 2, False), (torch.bfloat16, 3, True)):
        q, k, v = make_qkv(2, 2 * group, 2, 200, 64, dtype, g)
        idx, lw, counts = make_lists(2, 2 * group if per_q else 2, 150, 200, g)
        samples.append((torch.ops.vattention.pilot_stats.default,
                        to_cuda(q, k, v, idx, counts) + (0.125,)))
        samples.append((torch.ops.vattention.sparse_attention.default,
                        to_cuda(q, k, v, idx, lw, counts) + (0.125, 3)))
        samples.append((torch.ops.vattention.sparse_attention.default,
                        to_cuda(q, k, v, idx, None, counts) + (0.125, 0)))
    po = torch.randn(3, 2, 4, 16, generator=g)
    pl = torch.randn(3, 2, 4, generator=g)
    pl[0, 0] = -math.inf
    samples.append((torch.ops.vattention.combine.default, to_cuda(po, pl)))
    return samples


OPCHECK_CASES = 11


@pytest.mark.parametrize("case", range(OPCHECK_CASES))
def test_opcheck_cuda(case):
    samples = _opcheck_samples()
    assert len(samples) == OPCHECK_CASES
    op, args = samples[case]
    torch.library.opcheck(op, args)
