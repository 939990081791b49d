"""torch.ops.vattention.sparse_attention: against the plain reference on every device and in
every split configuration, the CUDA kernel against the CPU op (long lists, wide groups,
unaligned rows, out-of-range entries), argument checks, opcheck."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import (DTYPES, F64, I32, QKV_CASE_IDS, QKV_CASES, assert_attention_close,
                           assert_close_scaled, assert_eager_and_fake_name, attention_args,
                           cuda_only, gen, make_lists, make_qkv, no_sync, qkv, to_cuda,
                           to_device, with_beyond_count_and_negative_entries)
from tests.sparse_attention.reference import dense_attention_ref, sparse_attention_ref
from vattention import ops

SPLITS = [1, 3, 0]


def attention_on(device, q, k, v, idx, lw, counts, scale, splits):
    out, lse = ops.sparse_attention(*to_device(device, q, k, v, idx, lw, counts), scale, splits)
    assert out.device.type == lse.device.type == torch.device(device).type
    return out.cpu(), lse.cpu()


# --------------------------------------------------------------------------------------
# against the reference, every device
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("per_q_head", [False, True])
def test_sparse_attention_matches_reference(device, dtype, dim, group, per_q_head):
    g = torch.Generator().manual_seed(dim + 10 * group + 1000 * per_q_head + DTYPES.index(dtype))
    batch, kv_heads, length = 2, 2, 37
    q_heads = kv_heads * group
    q, k, v = make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g)
    list_heads = q_heads if per_q_head else kv_heads
    idx, lw, counts = make_lists(batch, list_heads, 29, length, g)
    scale = 1.0 / math.sqrt(dim)
    for weights in (None, lw):
        ref_out, ref_lse = sparse_attention_ref(q, k, v, idx, weights, counts, scale)
        for splits in SPLITS:
            out, lse = attention_on(device, q, k, v, idx, weights, counts, scale, splits)
            assert out.shape == (batch, q_heads, dim) and lse.shape == (batch, q_heads)
            assert_attention_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("length", [1, 2, 7, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention_lengths(device, length, dtype):
    g = torch.Generator().manual_seed(length)
    batch, q_heads, kv_heads, dim = 1, 4, 2, 64
    q, k, v = make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g)
    scale = 1.0 / math.sqrt(dim)
    # Every row listed once: dense attention.
    full = torch.arange(length, dtype=I32)[None, None].expand(batch, kv_heads, -1).contiguous()
    counts = torch.full((batch, kv_heads), length, dtype=I32)
    dense = dense_attention_ref(q, k, v, scale)
    for splits in SPLITS + [7, 64]:
        out, lse = attention_on(device, q, k, v, full, None, counts, scale, splits)
        torch.testing.assert_close(out.to(F64), dense, atol=1e-4, rtol=1e-4)
    # Ragged random lists with weights.
    idx, lw, counts = make_lists(batch, q_heads, min(3 * length, 3000), length, g)
    ref = sparse_attention_ref(q, k, v, idx, lw, counts, scale)
    for splits in SPLITS + [64]:
        assert_attention_close(*attention_on(device, q, k, v, idx, lw, counts, scale, splits),
                               *ref)


def test_sparse_attention_auto_splits_on_a_single_long_head(device):
    """num_splits=0 with one (batch, head) and a long list: choose_num_splits picks several
    splits (enough to fill the threads); the result must not depend on it."""
    g = torch.Generator().manual_seed(31)
    q, k, v = make_qkv(1, 1, 1, 5000, 128, torch.float16, g)
    idx, lw, counts = make_lists(1, 1, 4000, 5000, g)
    counts.fill_(3999)
    ref = sparse_attention_ref(q, k, v, idx, lw, counts, 0.088)
    for splits in (0, 1, 5, 64):
        assert_attention_close(*attention_on(device, q, k, v, idx, lw, counts, 0.088, splits),
                               *ref)


@pytest.mark.parametrize("splits", SPLITS + [8])
def test_sparse_attention_empty_lists(device, splits):
    g = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(2, 4, 2, 10, 64, torch.float32, g)
    for max_count in (0, 5):
        idx = torch.full((2, 2, max_count), -1, dtype=I32)
        counts = torch.tensor([[0, max_count], [0, 0]], dtype=I32)   # all -1 or count 0
        out, lse = attention_on(device, q, k, v, idx, None, counts, 0.125, splits)
        assert torch.isneginf(lse).all()
        assert (out == 0).all()


def test_sparse_attention_all_zero_weights_is_empty(device):
    """log-weight -inf = inclusion weight 0 (Horvitz-Thompson): the partial is empty."""
    g = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(1, 2, 1, 10, 64, torch.float32, g)
    idx = torch.tensor([[[1, 2, 3]]], dtype=I32)
    lw = torch.full((1, 1, 3), -math.inf)
    for splits in SPLITS:
        out, lse = attention_on(device, q, k, v, idx, lw, torch.tensor([[3]], dtype=I32), 0.1,
                                splits)
        assert torch.isneginf(lse).all() and (out == 0).all()


def test_sparse_attention_more_splits_than_entries(device):
    g = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(2, 4, 4, 20, 128, torch.float16, g)
    idx, lw, counts = make_lists(2, 4, 3, 20, g)
    ref = sparse_attention_ref(q, k, v, idx, lw, counts, 0.09)
    for splits in (3, 4, 17):
        assert_attention_close(*attention_on(device, q, k, v, idx, lw, counts, 0.09, splits),
                               *ref)


def test_sparse_attention_strided_views(device):
    """A KV-cache slice (row stride > head_dim, batch/head strides of a bigger buffer) and a
    q whose heads are not adjacent: only head_dim needs to be contiguous."""
    g = torch.Generator().manual_seed(8)
    cache_k = torch.randn(3, 2, 50, 64, generator=g).to(device)
    cache_v = torch.randn(2, 3, 50, 64, generator=g).to(device).transpose(0, 1)
    k, v = cache_k[:2, :, :30], cache_v[:2, :, 5:35]
    q = torch.randn(8, 2, 64, generator=g).to(device).transpose(0, 1)  # [2, 8, 64]
    assert q.stride(2) == 1 and not q.is_contiguous() and not k.is_contiguous()
    idx, lw, counts = make_lists(2, 2, 25, 30, g)
    ref = sparse_attention_ref(q.cpu(), k.cpu(), v.cpu(), idx, lw, counts, 0.125)
    assert_attention_close(*attention_on(device, q, k, v, idx, lw, counts, 0.125, 3), *ref)


def test_sparse_attention_scale_is_used(device):
    g = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(1, 2, 2, 16, 64, torch.float32, g)
    idx, lw, counts = make_lists(1, 2, 12, 16, g)
    for scale in (0.01, 1.0, 2.5):
        assert_attention_close(*attention_on(device, q, k, v, idx, lw, counts, scale, 0),
                               *sparse_attention_ref(q, k, v, idx, lw, counts, scale))


# --------------------------------------------------------------------------------------
# CUDA against the CPU op, no host sync
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


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("per_q_head", [False, True])
def test_sparse_attention_cuda_matches_cpu(dtype, dim, group, per_q_head):
    g = gen(dim + 10 * group + 1000 * per_q_head + DTYPES.index(dtype))
    batch, kv_heads, length = 2, 2, 257
    q_heads = kv_heads * group
    q, k, v = make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g, value_shift=0.3)
    list_heads = q_heads if per_q_head else kv_heads
    idx, lw, counts = make_lists(batch, list_heads, 300, length, g, garbage_beyond=False)
    scale = 1.0 / math.sqrt(dim)
    for weights in (None, lw):
        for splits in (1, 3, 0, 64):
            attention_both(q, k, v, idx, weights, counts, scale, splits)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_attention_cuda_decode_shape(dtype):
    """B=1, 32/8 heads, D=128, N=131072, 10% sorted rows per KV head (the benchmark shape),
    and the same rows given per query head."""
    g = gen(13 + DTYPES.index(dtype))
    length, count = 131072, 13107
    q, k, v = make_qkv(1, 32, 8, length, 128, dtype, g, value_shift=0.3)
    for list_heads in (8, 32):
        idx = torch.stack([torch.randperm(length, generator=g)[:count].sort().values
                           for _ in range(list_heads)]).to(I32)[None]
        counts = torch.full((1, list_heads), count, dtype=I32)
        lw = torch.zeros(1, list_heads, count)
        attention_both(q, k, v, idx, lw, counts, 1 / math.sqrt(128), 0)


@cuda_only
def test_sparse_attention_cuda_wide_groups_and_more_splits_than_rows():
    g = gen(14)
    q, k, v = make_qkv(2, 24, 2, 100, 64, torch.float16, g, value_shift=0.3)  # group 12: 2 head chunks
    idx, lw, counts = make_lists(2, 2, 90, 100, g, garbage_beyond=False)
    attention_both(q, k, v, idx, lw, counts, 0.1, 0)
    attention_both(q, k, v, idx, lw, counts, 0.1, 200)             # splits > entries


@cuda_only
def test_sparse_attention_cuda_strided_and_unaligned_views():
    """A KV-cache slice with a row stride > head_dim, K/V starting at an odd element offset
    (rows not 16-byte aligned: the element-wise copy path) and a non-contiguous q."""
    g = gen(8)
    for dtype in DTYPES:
        cache_k = torch.randn(2, 2, 50, 64 + 3, generator=g).to(dtype)
        cache_v = torch.randn(2, 2, 50, 64 + 1, generator=g).to(dtype)
        k, v = cache_k[:, :, 5:35, 1:65], cache_v[:, :, 10:40, :64]
        q = torch.randn(8, 2, 64, generator=g).to(dtype).transpose(0, 1)
        assert not k.is_contiguous() and q.stride(2) == 1
        idx, lw, counts = make_lists(2, 2, 25, 30, g, garbage_beyond=False)
        attention_both(q, k, v, idx, lw, counts, 0.125, 3)


@cuda_only
def test_sparse_attention_cuda_skips_out_of_range_entries():
    """The CPU op rejects entries >= length; the CUDA op may not look at the data on the host,
    so it skips them (attention_params.h): same as replacing them by -1."""
    g = gen(15)
    q, k, v = make_qkv(1, 4, 2, 40, 64, torch.float32, g, value_shift=0.3)
    idx, lw, counts = make_lists(1, 2, 30, 40, g, pad_frac=0.0, garbage_beyond=False)
    counts.fill_(30)
    bad = idx.clone()
    bad[..., ::4] = 40 + torch.arange(bad[..., ::4].numel()).view(bad[..., ::4].shape).to(I32)
    clean = bad.clone()
    clean[clean >= 40] = -1
    out, lse = ops.sparse_attention(*to_cuda(q, k, v, bad, lw, counts), 0.125, 0)
    ref_out, ref_lse = ops.sparse_attention(q, k, v, clean, lw, counts, 0.125, 0)
    assert_close_scaled(out, ref_out, name="out")
    assert_close_scaled(lse, ref_lse, name="lse")


@cuda_only
def test_sparse_attention_cuda_rejects_unsupported_head_dim():
    g = gen(16)
    q, k, v = to_cuda(*make_qkv(1, 2, 1, 10, 96, torch.float32, g, value_shift=0.3))
    idx = torch.zeros(1, 1, 3, dtype=I32, device="cuda")
    counts = torch.full((1, 1), 3, dtype=I32, device="cuda")
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.sparse_attention(q, k, v, idx, None, counts, 0.1, 0)


# --------------------------------------------------------------------------------------
# bad input (the q/K/V and list checks it shares with pilot_stats, then its own)
# --------------------------------------------------------------------------------------


SPARSE_ONLY_CASES = [
    ("lw_dtype", lambda a: a.update(log_weights=torch.zeros(2, 2, 5, dtype=torch.float64)),
     r"\blog_weights must be float32"),
    ("lw_shape", lambda a: a.update(log_weights=torch.zeros(2, 2, 4)), r"\blog_weights must have indices' shape"),
    ("lw_contig", lambda a: a.update(log_weights=torch.zeros(2, 2, 10)[..., ::2]),
     r"\blog_weights must be contiguous"),
    ("num_splits", lambda a: a.update(num_splits=-1), r"\bnum_splits must be >= 0"),
]


@pytest.mark.parametrize("name,mutate,match", QKV_CASES, ids=QKV_CASE_IDS)
def test_qkv_and_list_checks(name, mutate, match):
    args = attention_args()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.sparse_attention(**args)


@pytest.mark.parametrize("name,mutate,match", SPARSE_ONLY_CASES,
                         ids=[c[0] for c in SPARSE_ONLY_CASES])
def test_sparse_attention_only_checks(name, mutate, match):
    args = attention_args()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.sparse_attention(**args)


def test_index_beyond_count_and_negative_index_are_not_errors():
    ops.sparse_attention(**with_beyond_count_and_negative_entries(attention_args()))


def test_sparse_attention_fake_kernel_names_the_argument_of_a_wrong_rank():
    q, k, v = qkv()
    idx = torch.zeros(2, 2, 5, dtype=I32)
    counts = torch.zeros(2, 2, dtype=I32)
    assert_eager_and_fake_name(
        lambda: ops.sparse_attention(q[0], k, v, idx, None, counts, 1.0, 0), r"\bq\b")


# --------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, dispatch
# --------------------------------------------------------------------------------------


def _opcheck_samples():
    """The short lists of the CPU suite and the longer ones of the CUDA suite, with and
    without weights: each on every device."""
    g = gen(0)
    samples = []
    for length, max_count, value_shift, garbage in ((20, 9, 0.0, True), (200, 150, 0.3, False)):
        for dtype, group, per_q in ((torch.float32, 2, False), (torch.bfloat16, 3, True)):
            q, k, v = make_qkv(2, 2 * group, 2, length, 64, dtype, g, value_shift=value_shift)
            idx, lw, counts = make_lists(2, 2 * group if per_q else 2, max_count, length, g,
                                         garbage_beyond=garbage)
            samples.append((q, k, v, idx, lw, counts, 0.125, 3))
            samples.append((q, k, v, idx, None, counts, 0.125, 0))
    return samples


@pytest.mark.parametrize("case", range(8))
def test_opcheck(device, case):
    sample = _opcheck_samples()[case]
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in sample)
    torch.library.opcheck(torch.ops.vattention.sparse_attention.default, args)
