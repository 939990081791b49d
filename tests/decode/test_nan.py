"""NaN propagation through the ops that read K/V rows: sparse_attention (every split
configuration), pilot_stats and combine, on every device.

The rule (NaN policy, docs/algorithm.md): as in dense attention, a NaN in q gives NaN in
that head's outputs; a NaN in a K row that a head reads makes its logit NaN, so all of that
head's outputs (out and lse; every pilot statistic) are NaN; a NaN in one element of a V row
that a head reads reaches that element of out (pilot: that element of both vector moments,
and the third moment). Every other head stays finite, and so does every head when the NaN is
in a row that no list names, or that a list names only beyond its count, through -1
padding, or with log-weight -inf (weight 0: not read). An empty partial (lse -inf) is
ignored by combine whatever its out holds.

Op level only; decode-level NaN tests live in test_decode_hardening.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import DTYPES, gen
from vattention import ops

I32 = torch.int32
NAN = float("nan")
PLACES = ["q", "k_row", "v_row", "unlisted_row"]
SPLITS = [1, 3, 0]  # 0: the heuristic's choice (heuristics.h)


def make_case(dtype, per_q_head, place, seed, batch=2, kv_heads=2, group=4, dim=64, count=300,
              length=None):
    """q/k/v and index lists with one NaN at `place`, in batch row `batch - 1`, KV head
    `kv_heads - 1`; returns the inputs and reads[b, h]: whether query head h of batch row b
    reads the poisoned q / row."""
    g = gen(seed)
    q_heads = kv_heads * group
    length = length or count + 50
    q = torch.randn(batch, q_heads, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    list_heads = q_heads if per_q_head else kv_heads
    unlisted = length - 1  # named by no list inside its count
    idx = torch.stack([torch.randperm(length - 1, generator=g)[:count]
                       for _ in range(batch * list_heads)]).view(batch, list_heads, count).to(I32)
    lw = (torch.randn(batch, list_heads, count, generator=g) * 0.5).float()
    counts = torch.full((batch, list_heads), count - 4, dtype=I32)
    # Entries that must not be read, all pointing at the unlisted row: beyond the count
    # (with NaN log-weights), and -1 padding inside the count.
    idx[:, :, count - 4:] = unlisted
    lw[:, :, count - 4:] = NAN
    idx[:, :, 7] = -1
    # Weight 0 (log-weight -inf): the entry is not read either.
    idx[:, :, 8] = unlisted
    lw[:, :, 8] = -math.inf

    b, kv = batch - 1, kv_heads - 1
    nan_dim = int(torch.randint(0, dim, (1,), generator=g))
    reads = torch.zeros(batch, q_heads, dtype=torch.bool)
    if place == "q":
        q[b, q_heads - 1, nan_dim] = NAN
        reads[b, q_heads - 1] = True
    else:
        first_list = kv * group if per_q_head else kv
        row = unlisted if place == "unlisted_row" else int(idx[b, first_list, 0])
        (k if place == "k_row" else v)[b, kv, row, nan_dim] = NAN
        if place != "unlisted_row":
            for h in range(kv * group, (kv + 1) * group):
                lst = h if per_q_head else kv
                live = idx[b, lst, :count - 4]
                live_w = lw[b, lst, :count - 4]
                reads[b, h] = bool(((live == row) & (live_w != -math.inf)).any())
            assert reads.any()
    return (q.to(dtype), k.to(dtype), v.to(dtype), idx, lw, counts), reads, nan_dim


def on(device, *tensors):
    return [t.to(device) for t in tensors]


def check_attention(out, lse, reads, place, nan_dim):
    out, lse = out.cpu(), lse.cpu()
    logit_nan = reads if place in ("q", "k_row") else torch.zeros_like(reads)
    assert torch.equal(lse.isnan(), logit_nan), (lse, reads)
    want = logit_nan[..., None].expand_as(out).clone()
    if place == "v_row":
        want[..., nan_dim] |= reads
    assert torch.equal(out.isnan(), want)
    assert torch.isfinite(out[~want]).all() and torch.isfinite(lse[~logit_nan]).all()


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("per_q_head", [False, True], ids=["gqa_shared", "per_head"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", SPLITS)
def test_sparse_attention_nan(device, place, per_q_head, dtype, splits):
    seed = PLACES.index(place) + 10 * per_q_head + 100 * DTYPES.index(dtype) + 1000 * splits
    (q, k, v, idx, lw, counts), reads, nan_dim = make_case(dtype, per_q_head, place, seed)
    scale = 1.0 / math.sqrt(q.shape[-1])
    for weights in (lw, None):
        if weights is None:  # without weights the weight-0 entry is a real read of `unlisted`
            idx = idx.clone()
            idx[:, :, 8] = -1
        out, lse = ops.sparse_attention(*on(device, q, k, v, idx), None if weights is None else
                                        weights.to(device), counts.to(device), scale, splits)
        check_attention(out, lse, reads, place, nan_dim)


@pytest.mark.parametrize("place", PLACES)
def test_sparse_attention_nan_long_list_auto_splits(device, place):
    """One head and a long list: the automatic split count is several on every device
    (heuristics.h), so the NaN has to survive the split-K merge."""
    (q, k, v, idx, lw, counts), reads, nan_dim = make_case(
        torch.bfloat16, False, place, 77, batch=1, kv_heads=1, group=1, dim=128, count=3000)
    out, lse = ops.sparse_attention(*on(device, q, k, v, idx, lw, counts), 0.1, 0)
    check_attention(out, lse, reads, place, nan_dim)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("per_q_head", [False, True], ids=["gqa_shared", "per_head"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [40, 600])  # 600: several splits on CUDA
def test_pilot_stats_nan(device, place, per_q_head, dtype, count):
    seed = 5 + PLACES.index(place) + 10 * per_q_head + 100 * DTYPES.index(dtype) + count
    (q, k, v, idx, _, counts), reads, nan_dim = make_case(dtype, per_q_head, place, seed,
                                                          count=count)
    idx = idx.clone()
    idx[:, :, 8] = -1  # the pilot has no weights: entry 8 would be a real read
    max_logit, moments, vector_moments = ops.pilot_stats(
        *on(device, q, k, v, idx, counts), 1.0 / math.sqrt(q.shape[-1]))
    max_logit, moments, vector_moments = max_logit.cpu(), moments.cpu(), vector_moments.cpu()
    logit_nan = reads if place in ("q", "k_row") else torch.zeros_like(reads)
    value_nan = reads if place == "v_row" else torch.zeros_like(reads)
    assert torch.equal(max_logit.isnan(), logit_nan)
    want_moments = logit_nan[..., None].repeat(1, 1, 3)
    want_moments[..., 2] |= value_nan
    assert torch.equal(moments.isnan(), want_moments)
    want_vector = logit_nan[..., None, None].repeat(1, 1, 2, q.shape[-1])
    want_vector[..., nan_dim] |= value_nan[..., None]
    assert torch.equal(vector_moments.isnan(), want_vector)
    assert torch.isfinite(moments[~want_moments]).all()
    assert torch.isfinite(vector_moments[~want_vector]).all()


def test_combine_nan(device):
    splits, items, dim = 5, 4, 8
    g = gen(3)
    out = torch.randn(splits, items, dim, generator=g)
    lse = torch.randn(splits, items, generator=g)
    lse[2, 0] = NAN                      # item 0: a NaN lse poisons the item
    lse[4, 1] = -200.0                   # item 1: weight exp(-200 - lse) == 0 in fp32 ...
    out[4, 1, 3] = NAN                   # ... still carries its NaN to element 3
    lse[1, 2] = -math.inf                # item 2: an empty partial full of NaN is ignored
    out[1, 2] = NAN
    lse[:, 3] = -math.inf                # item 3: all empty
    out[:, 3] = NAN
    got_out, got_lse = ops.combine(out.to(device), lse.to(device))
    got_out, got_lse = got_out.cpu(), got_lse.cpu()

    assert got_lse[0].isnan() and got_out[0].isnan().all()
    assert torch.isfinite(got_lse[1]) and torch.equal(got_out[1].isnan(),
                                                      torch.arange(dim) == 3)
    keep = [s for s in range(splits) if s != 1]
    ref_lse = torch.logsumexp(lse[keep, 2], 0)
    ref_out = (torch.exp(lse[keep, 2] - ref_lse)[:, None] * out[keep, 2]).sum(0)
    torch.testing.assert_close(got_lse[2], ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_out[2], ref_out, rtol=1e-5, atol=1e-5)
    assert got_lse[3] == -math.inf and torch.equal(got_out[3], torch.zeros(dim))
