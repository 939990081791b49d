"""torch.ops.vattention.pilot_stats: against the plain reference on every device, the CUDA
kernel against the CPU op (split-K, long lists, unaligned rows), argument checks, opcheck."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import (DTYPES, F64, I32, QKV_CASE_IDS, QKV_CASES, assert_close_scaled,
                           assert_eager_and_fake_name, attention_args, cuda_only, gen,
                           make_lists, make_qkv, no_sync, qkv, to_cuda, to_device,
                           with_beyond_count_and_negative_entries)
from tests.pilot.reference import pilot_stats_ref
from vattention import ops


def pilot_on(device, q, k, v, idx, counts, scale):
    got = ops.pilot_stats(*to_device(device, q, k, v, idx, counts), scale)
    for t in got:
        assert t.device.type == torch.device(device).type
    return tuple(t.cpu() for t in got)


def assert_pilot_close(got, ref):
    max_logit, moments, vector_moments = got
    rmax, rmom, rvec = ref
    for t in got:
        assert t.dtype == torch.float32
        assert not torch.isnan(t).any()
    torch.testing.assert_close(max_logit.to(F64), rmax, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments.to(F64), rmom, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vector_moments.to(F64), rvec, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# against the reference, every device
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("per_q_head", [False, True])
def test_pilot_stats_matches_reference(device, dtype, dim, group, per_q_head):
    g = torch.Generator().manual_seed(dim + 10 * group + 1000 * per_q_head + DTYPES.index(dtype))
    batch, kv_heads, length = 2, 2, 41
    q_heads = kv_heads * group
    q, k, v = make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g)
    list_heads = q_heads if per_q_head else kv_heads
    idx, _, counts = make_lists(batch, list_heads, 17, length, g)
    scale = 1.0 / math.sqrt(dim)
    got = pilot_on(device, q, k, v, idx, counts, scale)
    assert_pilot_close(got, pilot_stats_ref(q, k, v, idx, counts, scale))
    # An empty list: -inf and zeros.
    empty = (counts == 0).repeat_interleave(q_heads // list_heads, dim=1)
    assert empty.any()
    assert torch.isneginf(got[0][empty]).all()
    assert (got[1][empty] == 0).all() and (got[2][empty] == 0).all()


def test_pilot_stats_duplicates_count_once_per_draw(device):
    g = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(1, 2, 1, 9, 64, torch.float32, g)
    one = pilot_on(device, q, k, v, torch.tensor([[[3, 6]]], dtype=I32),
                   torch.tensor([[2]], dtype=I32), 0.125)
    twice = pilot_on(device, q, k, v, torch.tensor([[[3, 6, -1, 6, 3]]], dtype=I32),
                     torch.tensor([[5]], dtype=I32), 0.125)
    torch.testing.assert_close(twice[0], one[0])
    torch.testing.assert_close(twice[1], 2 * one[1])
    torch.testing.assert_close(twice[2], 2 * one[2])


def test_pilot_stats_zero_max_count(device):
    g = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(2, 4, 2, 9, 64, torch.float32, g)
    got = pilot_on(device, q, k, v, torch.zeros(2, 2, 0, dtype=I32),
                   torch.zeros(2, 2, dtype=I32), 0.125)
    assert torch.isneginf(got[0]).all() and (got[1] == 0).all() and (got[2] == 0).all()


def test_pilot_stats_strided_views(device):
    """A KV-cache slice (row stride > head_dim, batch/head strides of a bigger buffer) and a
    q whose heads are not adjacent: only head_dim needs to be contiguous."""
    g = torch.Generator().manual_seed(8)
    cache_k = torch.randn(3, 2, 50, 64, generator=g).to(device)
    cache_v = torch.randn(2, 3, 50, 64, generator=g).to(device).transpose(0, 1)
    k, v = cache_k[:2, :, :30], cache_v[:2, :, 5:35]
    q = torch.randn(8, 2, 64, generator=g).to(device).transpose(0, 1)  # [2, 8, 64]
    assert q.stride(2) == 1 and not q.is_contiguous() and not k.is_contiguous()
    idx, _, counts = make_lists(2, 2, 25, 30, g)
    ref = pilot_stats_ref(q.cpu(), k.cpu(), v.cpu(), idx, counts, 0.125)
    assert_pilot_close(pilot_on(device, q, k, v, idx, counts, 0.125), ref)


# --------------------------------------------------------------------------------------
# CUDA against the CPU op, no host sync
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


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("per_q_head", [False, True])
def test_pilot_stats_cuda_matches_cpu(dtype, dim, group, per_q_head):
    g = gen(dim + 10 * group + 1000 * per_q_head + DTYPES.index(dtype))
    batch, kv_heads, length = 2, 2, 300
    q_heads = kv_heads * group
    q, k, v = make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g, value_shift=0.3)
    list_heads = q_heads if per_q_head else kv_heads
    for max_count in (17, 700):                               # one split / split-K
        idx, _, counts = make_lists(batch, list_heads, max_count, length, g,
                                    garbage_beyond=False)
        pilot_both(q, k, v, idx, counts, 1.0 / math.sqrt(dim))


@cuda_only
def test_pilot_stats_cuda_long_lists():
    g = gen(12)
    q, k, v = make_qkv(1, 32, 8, 131072, 128, torch.bfloat16, g, value_shift=0.3)
    idx, _, counts = make_lists(1, 8, 6553, 131072, g, pad_frac=0.01, garbage_beyond=False)
    pilot_both(q, k, v, idx, counts, 1 / math.sqrt(128))


@cuda_only
def test_pilot_stats_cuda_strided_and_unaligned_views():
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
        pilot_both(q, k, v, idx, counts, 0.125)


@cuda_only
def test_pilot_stats_cuda_skips_out_of_range_entries():
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
    got = ops.pilot_stats(*to_cuda(q, k, v, bad, counts), 0.125)
    ref = ops.pilot_stats(q, k, v, clean, counts, 0.125)
    for a, b in zip(got, ref):
        assert_close_scaled(a, b, rtol=2e-4)


@cuda_only
def test_pilot_stats_cuda_rejects_unsupported_head_dim():
    g = gen(16)
    q, k, v = to_cuda(*make_qkv(1, 2, 1, 10, 96, torch.float32, g, value_shift=0.3))
    idx = torch.zeros(1, 1, 3, dtype=I32, device="cuda")
    counts = torch.full((1, 1), 3, dtype=I32, device="cuda")
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.pilot_stats(q, k, v, idx, counts, 0.1)


# --------------------------------------------------------------------------------------
# bad input (the q/K/V and list checks it shares with sparse_attention)
# --------------------------------------------------------------------------------------


def _pilot(args):
    return ops.pilot_stats(**{n: args[n] for n in ("q", "k", "v", "indices", "counts", "scale")})


@pytest.mark.parametrize("name,mutate,match", QKV_CASES, ids=QKV_CASE_IDS)
def test_qkv_and_list_checks(name, mutate, match):
    args = attention_args()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        _pilot(args)


def test_index_beyond_count_and_negative_index_are_not_errors():
    _pilot(with_beyond_count_and_negative_entries(attention_args()))


def test_pilot_stats_fake_kernel_names_the_argument_of_a_wrong_rank():
    q, k, v = qkv()
    idx = torch.zeros(2, 2, 5, dtype=I32)
    counts = torch.zeros(2, 2, dtype=I32)
    assert_eager_and_fake_name(lambda: ops.pilot_stats(q[0], k, v, idx, counts, 1.0), r"\bq\b")


# --------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, dispatch
# --------------------------------------------------------------------------------------


def _opcheck_samples():
    """The short lists of the CPU suite and the longer ones of the CUDA suite: each on every
    device."""
    g = gen(0)
    samples = []
    for length, max_count, value_shift, garbage in ((20, 9, 0.0, True), (200, 150, 0.3, False)):
        for dtype, group, per_q in ((torch.float32, 2, False), (torch.bfloat16, 3, True)):
            q, k, v = make_qkv(2, 2 * group, 2, length, 64, dtype, g, value_shift=value_shift)
            idx, _, counts = make_lists(2, 2 * group if per_q else 2, max_count, length, g,
                                        garbage_beyond=garbage)
            samples.append((q, k, v, idx, counts, 0.125))
    return samples


@pytest.mark.parametrize("case", range(4))
def test_opcheck(device, case):
    sample = _opcheck_samples()[case]
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in sample)
    torch.library.opcheck(torch.ops.vattention.pilot_stats.default, args)
