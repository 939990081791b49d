"""torch.ops.vattention.* against the plain-PyTorch references of op_references.py."""
from __future__ import annotations

import math
import os
import sys
from statistics import NormalDist

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import op_references as R  # noqa: E402

import vattention  # noqa: E402
from vattention import ops  # noqa: E402

I32 = torch.int32
F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPLITS = [1, 3, 0]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g):
    q = torch.randn(batch, q_heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    return q, k, v


def make_lists(batch, list_heads, max_count, length, g, pad_frac=0.2):
    """Ragged index lists: random rows (duplicates allowed), -1 padding inside the count,
    counts 0..max_count (both ends forced), out-of-range garbage beyond the count (must not
    be read), and log-weights with a few -inf (weight-zero) entries."""
    idx = torch.randint(0, max(length, 1), (batch, list_heads, max_count), generator=g,
                        dtype=I32)
    if length == 0:
        idx.fill_(-1)
    idx[torch.rand(idx.shape, generator=g) < pad_frac] = -1
    counts = torch.randint(0, max_count + 1, (batch, list_heads), generator=g, dtype=I32)
    counts.view(-1)[0] = 0
    counts.view(-1)[-1] = max_count
    beyond = torch.arange(max_count)[None, None, :] >= counts[:, :, None]
    idx[beyond] = length + 1000           # garbage beyond the count
    lw = (torch.randn(idx.shape, generator=g) * 0.7).float()
    lw[torch.rand(idx.shape, generator=g) < 0.05] = -math.inf
    lw[beyond] = float("nan")             # garbage beyond the count
    return idx, lw, counts


def assert_attention_close(out, lse, ref_out, ref_lse, atol=1e-4, rtol=1e-4):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(lse.to(F64), ref_lse, atol=atol, rtol=rtol)
    torch.testing.assert_close(out.to(F64), ref_out, atol=atol, rtol=rtol)


def chi2_upper(df: int, p: float) -> float:
    """Upper p-quantile of chi-square(df) (Wilson-Hilferty; accurate for df >= 30)."""
    z = NormalDist().inv_cdf(1.0 - p)
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def rng_state(seed, offset=0):
    return torch.tensor([seed, offset], dtype=torch.int64)


# --------------------------------------------------------------------------------------
# the references themselves
# --------------------------------------------------------------------------------------


def test_philox_known_answers():
    R.philox_self_test()


def test_scale_to_range_reference_edges():
    assert R.scale_to_range_ref(0, 7) == 0
    assert R.scale_to_range_ref((1 << 64) - 1, 7) == 6
    assert R.scale_to_range_ref(1 << 63, 10) == 5


# --------------------------------------------------------------------------------------
# select_topk
# --------------------------------------------------------------------------------------


def _random_windows(rows, length, g):
    starts = torch.randint(0, length + 2, (rows,), generator=g, dtype=I32)
    ends = starts + torch.randint(-2, length + 3, (rows,), generator=g, dtype=I32)
    starts[0], ends[0] = 0, length               # the whole row
    starts[1 % rows], ends[1 % rows] = 0, length + 50   # end clipped to the row length
    if rows > 2:
        starts[2], ends[2] = min(1, length), min(1, length)  # empty window
    if rows > 3:
        starts[3], ends[3] = length, length + 3      # empty after clipping
    return starts, ends


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 2, 7, 5000])
def test_select_topk_matches_reference(dtype, length):
    g = torch.Generator().manual_seed(1000 + length)
    rows = 8
    scores = torch.randn(rows, length, generator=g).to(dtype)
    starts, ends = _random_windows(rows, length, g)
    k_max = min(length + 3, 40)
    ks = torch.randint(0, k_max + 1, (rows,), generator=g, dtype=I32)
    ks[0] = 0                                   # k = 0
    ks[1] = k_max                               # k >= window on short rows
    got = ops.select_topk(scores, starts, ends, ks, k_max)
    assert got.dtype == I32 and got.shape == (rows, k_max)
    torch.testing.assert_close(got, R.select_topk_ref(scores, starts, ends, ks, k_max), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_ties_nan_and_infinities(dtype):
    g = torch.Generator().manual_seed(7)
    rows, length = 12, 64
    scores = torch.randint(-3, 4, (rows, length), generator=g).to(dtype)  # many ties
    special = torch.rand(rows, length, generator=g)
    scores[special < 0.1] = float("nan")
    scores[(special >= 0.1) & (special < 0.15)] = float("inf")
    scores[(special >= 0.15) & (special < 0.2)] = -float("inf")
    scores[5] = float("nan")                     # a row of NaN only
    scores[6, :] = 1.0                           # a row of ties only
    starts = torch.randint(0, 20, (rows,), generator=g, dtype=I32)
    ends = starts + torch.randint(0, 50, (rows,), generator=g, dtype=I32)
    ks = torch.randint(0, 30, (rows,), generator=g, dtype=I32)
    got = ops.select_topk(scores, starts, ends, ks, 30)
    torch.testing.assert_close(got, R.select_topk_ref(scores, starts, ends, ks, 30), rtol=0, atol=0)


def test_select_topk_nan_ranks_below_minus_inf():
    scores = torch.tensor([[float("nan"), -float("inf"), float("nan"), -1e30]])
    one = torch.ones(1, dtype=I32)
    got = ops.select_topk(scores, torch.zeros(1, dtype=I32), 4 * one, 3 * one, 4)
    # Exactly: the numbers first (-1e30 at 3, -inf at 1), then the lower NaN (0).
    assert got.tolist() == [[0, 1, 3, -1]]


def test_select_topk_signed_zeros_are_a_tie():
    """select_topk.h: 'Ties prefer the lower position'. -0.0 == +0.0, so position 0 must win."""
    scores = torch.tensor([[-0.0, 0.0]])
    one = torch.ones(1, dtype=I32)
    got = ops.select_topk(scores, torch.zeros(1, dtype=I32), 2 * one, one, 1)
    assert got.tolist() == [[0]], (
        "topk ranks -0.0 below +0.0 (orderable_key in common.h distinguishes signed zeros), "
        "so the tie rule 'lower position wins' is broken for signed zeros")


def test_select_topk_strided_rows_and_k_above_k_max():
    g = torch.Generator().manual_seed(3)
    big = torch.randn(5, 100, generator=g)
    scores = big[:, :60]                          # row stride 100, positions contiguous
    starts = torch.tensor([0, 5, 10, 0, 59], dtype=I32)
    ends = torch.tensor([60, 60, 30, 1, 60], dtype=I32)
    ks = torch.tensor([7, 3, 20, 1, 1], dtype=I32)
    got = ops.select_topk(scores, starts, ends, ks, 8)
    # Undocumented in select_topk.h: k > k_max keeps the k_max best (row 2 asks 20 of 8 slots).
    torch.testing.assert_close(got, R.select_topk_ref(scores.contiguous(), starts, ends, ks, 8),
                               rtol=0, atol=0)


def test_select_topk_k_max_zero_and_no_rows():
    scores = torch.randn(3, 10)
    z = torch.zeros(3, dtype=I32)
    assert ops.select_topk(scores, z, z + 10, z + 4, 0).shape == (3, 0)
    empty = ops.select_topk(torch.randn(0, 10), torch.zeros(0, dtype=I32), torch.zeros(0, dtype=I32),
                     torch.zeros(0, dtype=I32), 4)
    assert empty.shape == (0, 4)


# --------------------------------------------------------------------------------------
# sample_residual
# --------------------------------------------------------------------------------------


def _sample_case(g, rows=48, span=300, heavy_max=24):
    starts = torch.randint(0, 50, (rows,), generator=g, dtype=I32)
    widths = torch.randint(0, span, (rows,), generator=g, dtype=I32)
    widths[0] = 0                                 # empty window
    ends = starts + widths
    scores = torch.randn(rows, int(ends.max()) + 1, generator=g)
    ks = torch.randint(0, heavy_max + 1, (rows,), generator=g, dtype=I32)
    ks[1] = heavy_max
    ends[1] = starts[1] + 10                      # heavy eats the whole window -> n_r = 0
    heavy = R.select_topk_ref(scores, starts, ends, ks, heavy_max)
    n_r = ends - starts - (heavy >= 0).sum(1).to(I32)
    regime = torch.randint(0, 6, (rows,), generator=g)
    b = torch.randint(1, 64, (rows,), generator=g, dtype=I32)
    num_samples = torch.where(regime == 0, torch.zeros_like(b),                  # b = 0
                  torch.where(regime == 1, -b,                                     # b < 0
                  torch.where(regime == 2, n_r + b,                                # b >= n_r
                  torch.where(regime == 3, n_r, b))))                              # b == n_r
    return heavy, starts, ends, num_samples.to(I32)


def _check_sample(got, ref):
    idx, lw, counts = got
    ridx, rlw, rcounts = ref
    assert idx.dtype == I32 and lw.dtype == torch.float32 and counts.dtype == I32
    torch.testing.assert_close(counts, rcounts, rtol=0, atol=0)
    torch.testing.assert_close(idx, ridx, rtol=0, atol=0)   # incl. -1 padding after count
    valid = torch.arange(idx.shape[1])[None, :] < counts[:, None]
    torch.testing.assert_close(lw[valid].to(F64), rlw[valid], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 3), ((1 << 32) + 5, (1 << 30) - 1),
                                         ((1 << 63) - 1, 77)])
@pytest.mark.parametrize("stream", [0, 1])
@pytest.mark.parametrize("max_out", [0, 5, 64])
def test_sample_residual_matches_reference(seed, offset, stream, max_out):
    g = torch.Generator().manual_seed(seed % 1000 + 17 * stream + max_out)
    heavy, starts, ends, num_samples = _sample_case(g)
    rng = rng_state(seed, offset)
    got = ops.sample_residual(heavy, starts, ends, num_samples, rng, max_out, stream)
    ref = R.sample_residual_ref(heavy, starts, ends, num_samples, rng, max_out, stream)
    _check_sample(got, ref)
    # The residual never contains a heavy hitter and stays inside the window.
    idx, _, counts = got
    for r in range(idx.shape[0]):
        drawn = set(idx[r, :counts[r]].tolist())
        assert not drawn & set(R.heavy_prefix(heavy[r].tolist()))
        assert all(starts[r] <= p < ends[r] for p in drawn)


def test_sample_residual_negative_seed_is_its_uint64_bits():
    g = torch.Generator().manual_seed(5)
    heavy, starts, ends, num_samples = _sample_case(g, rows=8)
    num_samples = torch.full_like(num_samples, 9)
    rng = rng_state(-1, 2)
    got = ops.sample_residual(heavy, starts, ends, num_samples, rng, 9, 1)
    _check_sample(got, R.sample_residual_ref(heavy, starts, ends, num_samples, rng, 9, 1))


def test_sample_residual_without_heavy_columns():
    starts = torch.tensor([0, 10, 5], dtype=I32)
    ends = torch.tensor([100, 10, 1000], dtype=I32)
    num_samples = torch.tensor([7, 3, 50], dtype=I32)
    heavy = torch.zeros(3, 0, dtype=I32)
    rng = rng_state(99, 1)
    got = ops.sample_residual(heavy, starts, ends, num_samples, rng, 50, 0)
    _check_sample(got, R.sample_residual_ref(heavy, starts, ends, num_samples, rng, 50, 0))


def test_sample_residual_enumerates_when_budget_covers_residual():
    heavy = torch.tensor([[3, 4, 8, -1], [-1, -1, -1, -1]], dtype=I32)
    starts = torch.tensor([2, 0], dtype=I32)
    ends = torch.tensor([12, 4], dtype=I32)
    num_samples = torch.tensor([7, 1000], dtype=I32)       # n_r = 7 and 4
    idx, lw, counts = ops.sample_residual(heavy, starts, ends, num_samples, rng_state(1), 8, 1)
    assert counts.tolist() == [7, 4]
    assert idx[0].tolist() == [2, 5, 6, 7, 9, 10, 11, -1]
    assert idx[1].tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
    assert lw[0, :7].tolist() == [0.0] * 7 and lw[1, :4].tolist() == [0.0] * 4


def test_sample_residual_clamps_to_max_out_with_unbiased_weight():
    heavy = torch.tensor([[10, 11, -1], [0, 1, 2]], dtype=I32)
    starts = torch.tensor([0, 0], dtype=I32)
    ends = torch.tensor([52, 60], dtype=I32)                 # n_r = 50 and 57
    num_samples = torch.tensor([100, 30], dtype=I32)         # b >= n_r > max_out; b > max_out
    rng = rng_state(2024, 9)
    got = ops.sample_residual(heavy, starts, ends, num_samples, rng, 10, 1)
    idx, lw, counts = got
    assert counts.tolist() == [10, 10]
    torch.testing.assert_close(lw.to(F64), torch.tensor(
        [[math.log(50 / 10)] * 10, [math.log(57 / 10)] * 10], dtype=F64), rtol=1e-6, atol=1e-6)
    _check_sample(got, R.sample_residual_ref(heavy, starts, ends, num_samples, rng, 10, 1))


def test_sample_residual_is_reproducible_and_streams_differ():
    g = torch.Generator().manual_seed(11)
    heavy, starts, ends, _ = _sample_case(g, rows=16)
    num_samples = torch.full((16,), 40, dtype=I32)
    starts[:], ends[:] = 0, 1000                                  # n_r >> 40 on every row
    heavy = R.select_topk_ref(torch.randn(16, 1000, generator=g), starts, ends,
                       torch.full((16,), 20, dtype=I32), 20)

    def run(seed, offset, stream):
        return ops.sample_residual(heavy, starts, ends, num_samples, rng_state(seed, offset),
                                   40, stream)[0]

    base = run(5, 0, 1)
    torch.testing.assert_close(base, run(5, 0, 1), rtol=0, atol=0)
    for other in (run(6, 0, 1), run(5, 1, 1), run(5, 0, 0), run(5 + (1 << 32), 0, 1)):
        assert (other != base).float().mean() > 0.9
    # Rows with the same window and heavy list still get independent draws.
    heavy2 = heavy[:1].expand(16, -1).contiguous()
    idx = ops.sample_residual(heavy2, starts, ends, num_samples, rng_state(5), 40, 1)[0]
    assert (idx[0] != idx[1]).float().mean() > 0.9


def test_sample_residual_is_uniform_over_the_residual():
    """Chi-square on 100k draws over n_r = 500: 400 rows (independent Philox subsequences)
    of 250 draws each (b < n_r, so the with-replacement path), fixed seed, p = 1e-4."""
    rows, window, n_heavy, draws = 400, 600, 100, 250
    g = torch.Generator().manual_seed(2)
    heavy = torch.sort(torch.randperm(window, generator=g)[:n_heavy])[0].to(I32)
    heavy = heavy[None].expand(rows, -1).contiguous()
    starts = torch.zeros(rows, dtype=I32)
    ends = torch.full((rows,), window, dtype=I32)
    num_samples = torch.full((rows,), draws, dtype=I32)
    idx, lw, counts = ops.sample_residual(heavy, starts, ends, num_samples,
                                          rng_state(31337, 4), draws, 1)
    assert counts.tolist() == [draws] * rows
    torch.testing.assert_close(lw, torch.full_like(lw, math.log(500 / draws)))
    flat = idx.reshape(-1).long()
    hist = torch.bincount(flat, minlength=window).to(F64)
    assert hist[heavy[0].long()].sum() == 0, "a heavy hitter was sampled"
    residual = torch.tensor(R.residual_positions(heavy[0].tolist(), 0, window))
    assert hist.sum() == hist[residual].sum() == rows * draws
    observed = hist[residual]
    expected = rows * draws / len(residual)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    df = len(residual) - 1
    assert chi2 < chi2_upper(df, 1e-4), (chi2, chi2_upper(df, 1e-4))
    assert chi2 > df - 6 * math.sqrt(2 * df), "too uniform to be random"


def test_sample_residual_consecutive_draws_are_independent():
    """Serial test: draws 2j and 2j+1 come from one Philox block; their ranks, binned into
    10 deciles of n_r = 1000, must be independent. 100 rows x 998 draws, 10 x 10 cells."""
    rows, draws, n_r, bins = 100, 998, 1000, 10
    heavy = torch.tensor([[2, 5, -1]], dtype=I32).expand(rows, -1).contiguous()
    starts = torch.zeros(rows, dtype=I32)
    ends = torch.full((rows,), n_r + 2, dtype=I32)
    idx = ops.sample_residual(heavy, starts, ends, torch.full((rows,), draws, dtype=I32),
                              rng_state(77), draws, 0)[0]
    residual = R.residual_positions([2, 5], 0, n_r + 2)
    rank = torch.full((n_r + 2,), -1, dtype=torch.long)
    rank[torch.tensor(residual)] = torch.arange(n_r)
    ranks = rank[idx.long()]
    assert (ranks >= 0).all()
    pairs = (ranks * bins // n_r).reshape(rows, -1, 2)
    cell = (pairs[..., 0] * bins + pairs[..., 1]).reshape(-1)
    hist = torch.bincount(cell, minlength=bins * bins).to(F64)
    expected = cell.numel() / (bins * bins)
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < chi2_upper(bins * bins - 1, 1e-4), chi2


def test_sample_residual_rejects_or_honours_heavy_with_padding_in_the_middle():
    """sample.h: heavy is 'valid entries first, -1 padding after' and its count is 'the valid
    prefix'. A list [5, -1, 7, 8] must either be rejected (the CPU glue validates heavy) or be
    read as its valid prefix [5]; it must never sample outside [start, end) or a heavy token."""
    heavy = torch.tensor([[5, -1, 7, 8]], dtype=I32)
    starts = torch.zeros(1, dtype=I32)
    ends = torch.full((1,), 10, dtype=I32)
    rng = rng_state(3)
    for b in (9, 3):                                          # enumeration, then draws
        num_samples = torch.full((1,), b, dtype=I32)
        try:
            got = ops.sample_residual(heavy, starts, ends, num_samples, rng, 16, 1)
        except RuntimeError as e:
            assert "heavy" in str(e)
            continue
        idx, _, counts = got
        assert 5 not in idx[0, :counts[0]].tolist(), "sampled the heavy hitter 5"
        ref = R.sample_residual_ref(heavy, starts, ends, num_samples, rng, 16, 1)
        assert counts[0] == ref[2][0], (
            f"b={b}: accepted heavy={heavy.tolist()} but returned {counts[0]} entries "
            f"{idx[0, :counts[0]].tolist()} instead of {ref[2][0]}: heavy_count (sample.h) "
            "counts entries past the -1, which the CPU glue's heavy check never looks at")
        _check_sample(got, R.sample_residual_ref(heavy, starts, ends, num_samples, rng, 16, 1))


# --------------------------------------------------------------------------------------
# pilot_stats
# --------------------------------------------------------------------------------------


def assert_pilot_close(got, ref):
    max_logit, moments, vector_moments = got
    rmax, rmom, rvec = ref
    for t in got:
        assert t.dtype == torch.float32
        assert not torch.isnan(t).any()
    torch.testing.assert_close(max_logit.to(F64), rmax, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments.to(F64), rmom, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vector_moments.to(F64), rvec, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("per_q_head", [False, True])
def test_pilot_stats_matches_reference(dtype, dim, group, per_q_head):
    g = torch.Generator().manual_seed(dim + 10 * group + 1000 * per_q_head + DTYPES.index(dtype))
    batch, kv_heads, length = 2, 2, 41
    q_heads = kv_heads * group
    q, k, v = make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g)
    list_heads = q_heads if per_q_head else kv_heads
    idx, _, counts = make_lists(batch, list_heads, 17, length, g)
    scale = 1.0 / math.sqrt(dim)
    got = ops.pilot_stats(q, k, v, idx, counts, scale)
    assert_pilot_close(got, R.pilot_stats_ref(q, k, v, idx, counts, scale))
    # An empty list: -inf and zeros.
    empty = (counts == 0).repeat_interleave(q_heads // list_heads, dim=1)
    assert empty.any()
    assert torch.isneginf(got[0][empty]).all()
    assert (got[1][empty] == 0).all() and (got[2][empty] == 0).all()


def test_pilot_stats_duplicates_count_once_per_draw():
    g = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(1, 2, 1, 9, 64, torch.float32, g)
    one = ops.pilot_stats(q, k, v, torch.tensor([[[3, 6]]], dtype=I32),
                          torch.tensor([[2]], dtype=I32), 0.125)
    twice = ops.pilot_stats(q, k, v, torch.tensor([[[3, 6, -1, 6, 3]]], dtype=I32),
                            torch.tensor([[5]], dtype=I32), 0.125)
    torch.testing.assert_close(twice[0], one[0])
    torch.testing.assert_close(twice[1], 2 * one[1])
    torch.testing.assert_close(twice[2], 2 * one[2])


def test_pilot_stats_zero_max_count():
    g = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(2, 4, 2, 9, 64, torch.float32, g)
    got = ops.pilot_stats(q, k, v, torch.zeros(2, 2, 0, dtype=I32),
                          torch.zeros(2, 2, dtype=I32), 0.125)
    assert torch.isneginf(got[0]).all() and (got[1] == 0).all() and (got[2] == 0).all()


# --------------------------------------------------------------------------------------
# sparse_attention
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("per_q_head", [False, True])
def test_sparse_attention_matches_reference(dtype, dim, group, per_q_head):
    g = torch.Generator().manual_seed(dim + 10 * group + 1000 * per_q_head + DTYPES.index(dtype))
    batch, kv_heads, length = 2, 2, 37
    q_heads = kv_heads * group
    q, k, v = make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g)
    list_heads = q_heads if per_q_head else kv_heads
    idx, lw, counts = make_lists(batch, list_heads, 29, length, g)
    scale = 1.0 / math.sqrt(dim)
    for weights in (None, lw):
        ref_out, ref_lse = R.sparse_attention_ref(q, k, v, idx, weights, counts, scale)
        for splits in SPLITS:
            out, lse = ops.sparse_attention(q, k, v, idx, weights, counts, scale, splits)
            assert out.shape == (batch, q_heads, dim) and lse.shape == (batch, q_heads)
            assert_attention_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("length", [1, 2, 7, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention_lengths(length, dtype):
    g = torch.Generator().manual_seed(length)
    batch, q_heads, kv_heads, dim = 1, 4, 2, 64
    q, k, v = make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g)
    scale = 1.0 / math.sqrt(dim)
    # Every row listed once: dense attention.
    full = torch.arange(length, dtype=I32)[None, None].expand(batch, kv_heads, -1).contiguous()
    counts = torch.full((batch, kv_heads), length, dtype=I32)
    dense = R.dense_attention_ref(q, k, v, scale)
    for splits in SPLITS + [7, 64]:
        out, lse = ops.sparse_attention(q, k, v, full, None, counts, scale, splits)
        torch.testing.assert_close(out.to(F64), dense, atol=1e-4, rtol=1e-4)
    # Ragged random lists with weights.
    idx, lw, counts = make_lists(batch, q_heads, min(3 * length, 3000), length, g)
    ref = R.sparse_attention_ref(q, k, v, idx, lw, counts, scale)
    for splits in SPLITS + [64]:
        assert_attention_close(*ops.sparse_attention(q, k, v, idx, lw, counts, scale, splits),
                               *ref)


def test_sparse_attention_auto_splits_on_a_single_long_head():
    """num_splits=0 with one (batch, head) and a long list: choose_num_splits picks several
    splits (enough to fill the threads); the result must not depend on it."""
    g = torch.Generator().manual_seed(31)
    q, k, v = make_qkv(1, 1, 1, 5000, 128, torch.float16, g)
    idx, lw, counts = make_lists(1, 1, 4000, 5000, g)
    counts.fill_(3999)
    ref = R.sparse_attention_ref(q, k, v, idx, lw, counts, 0.088)
    for splits in (0, 1, 5, 64):
        assert_attention_close(*ops.sparse_attention(q, k, v, idx, lw, counts, 0.088, splits),
                               *ref)


@pytest.mark.parametrize("splits", SPLITS + [8])
def test_sparse_attention_empty_lists(splits):
    g = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(2, 4, 2, 10, 64, torch.float32, g)
    for max_count in (0, 5):
        idx = torch.full((2, 2, max_count), -1, dtype=I32)
        counts = torch.tensor([[0, max_count], [0, 0]], dtype=I32)   # all -1 or count 0
        out, lse = ops.sparse_attention(q, k, v, idx, None, counts, 0.125, splits)
        assert torch.isneginf(lse).all()
        assert (out == 0).all()


def test_sparse_attention_all_zero_weights_is_empty():
    """log-weight -inf = inclusion weight 0 (Horvitz-Thompson): the partial is empty."""
    g = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(1, 2, 1, 10, 64, torch.float32, g)
    idx = torch.tensor([[[1, 2, 3]]], dtype=I32)
    lw = torch.full((1, 1, 3), -math.inf)
    for splits in SPLITS:
        out, lse = ops.sparse_attention(q, k, v, idx, lw, torch.tensor([[3]], dtype=I32), 0.1,
                                        splits)
        assert torch.isneginf(lse).all() and (out == 0).all()


def test_sparse_attention_more_splits_than_entries():
    g = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(2, 4, 4, 20, 128, torch.float16, g)
    idx, lw, counts = make_lists(2, 4, 3, 20, g)
    ref = R.sparse_attention_ref(q, k, v, idx, lw, counts, 0.09)
    for splits in (3, 4, 17):
        assert_attention_close(*ops.sparse_attention(q, k, v, idx, lw, counts, 0.09, splits),
                               *ref)


def test_sparse_attention_strided_views():
    """A KV-cache slice (row stride > head_dim, batch/head strides of a bigger buffer) and a
    q whose heads are not adjacent: only head_dim needs to be contiguous."""
    g = torch.Generator().manual_seed(8)
    cache_k = torch.randn(3, 2, 50, 64, generator=g)
    cache_v = torch.randn(2, 3, 50, 64, generator=g).transpose(0, 1)
    k, v = cache_k[:2, :, :30], cache_v[:2, :, 5:35]
    q = torch.randn(8, 2, 64, generator=g).transpose(0, 1)             # [2, 8, 64]
    assert q.stride(2) == 1 and not q.is_contiguous() and not k.is_contiguous()
    idx, lw, counts = make_lists(2, 2, 25, 30, g)
    ref = R.sparse_attention_ref(q, k, v, idx, lw, counts, 0.125)
    assert_attention_close(*ops.sparse_attention(q, k, v, idx, lw, counts, 0.125, 3), *ref)
    ref_p = R.pilot_stats_ref(q, k, v, idx, counts, 0.125)
    assert_pilot_close(ops.pilot_stats(q, k, v, idx, counts, 0.125), ref_p)


def test_sparse_attention_scale_is_used():
    g = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(1, 2, 2, 16, 64, torch.float32, g)
    idx, lw, counts = make_lists(1, 2, 12, 16, g)
    for scale in (0.01, 1.0, 2.5):
        assert_attention_close(*ops.sparse_attention(q, k, v, idx, lw, counts, scale, 0),
                               *R.sparse_attention_ref(q, k, v, idx, lw, counts, scale))


# --------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_combine_matches_reference(splits):
    g = torch.Generator().manual_seed(splits)
    po = torch.randn(splits, 3, 4, 64, generator=g)
    pl = torch.randn(splits, 3, 4, generator=g) * 3
    pl[torch.rand(pl.shape, generator=g) < 0.3] = -math.inf
    pl[:, 0, 0] = -math.inf                                   # one all-empty item
    out, lse = ops.combine(po, pl)
    ref_out, ref_lse = R.combine_ref(po, pl)
    assert out.shape == (3, 4, 64) and lse.shape == (3, 4)
    torch.testing.assert_close(lse.to(F64), ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.to(F64), ref_out, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[0, 0]) and (out[0, 0] == 0).all()


def test_combine_all_empty_and_empty_partials_ignored():
    po = torch.full((3, 2, 8), float("nan"))                  # whatever an empty partial holds
    pl = torch.full((3, 2), -math.inf)
    out, lse = ops.combine(po, pl)
    assert torch.isneginf(lse).all() and (out == 0).all()
    po[1, 0] = torch.arange(8.0)
    pl[1, 0] = 0.5
    out, lse = ops.combine(po, pl)
    assert lse[0].item() == 0.5 and out[0].tolist() == list(range(8))
    assert torch.isneginf(lse[1]) and (out[1] == 0).all()


def test_combine_without_item_dims():
    po = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pl = torch.tensor([0.0, math.log(3.0)])
    out, lse = ops.combine(po, pl)
    assert out.shape == (2,) and lse.shape == ()
    torch.testing.assert_close(out, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(lse, torch.tensor(math.log(4.0)))


def test_combine_of_disjoint_lists_is_attention_over_their_union():
    g = torch.Generator().manual_seed(12)
    q, k, v = make_qkv(2, 6, 3, 40, 64, torch.bfloat16, g)
    idx = torch.randint(0, 40, (2, 3, 30), generator=g, dtype=I32)
    lw = torch.randn(2, 3, 30, generator=g)
    counts = torch.full((2, 3), 30, dtype=I32)
    a = ops.sparse_attention(q, k, v, idx[..., :11].contiguous(), lw[..., :11].contiguous(),
                             torch.full_like(counts, 11), 0.125, 1)
    b = ops.sparse_attention(q, k, v, idx[..., 11:].contiguous(), lw[..., 11:].contiguous(),
                             torch.full_like(counts, 19), 0.125, 2)
    out, lse = ops.combine(torch.stack([a[0], b[0]]), torch.stack([a[1], b[1]]))
    assert_attention_close(out, lse, *R.sparse_attention_ref(q, k, v, idx, lw, counts, 0.125))


# --------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, dispatch
# --------------------------------------------------------------------------------------


def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    samples = []
    scores = torch.randn(4, 30, generator=g)
    samples.append((torch.ops.vattention.select_topk.default,
                    (scores, torch.tensor([0, 3, 5, 30], dtype=I32),
                     torch.tensor([30, 20, 5, 40], dtype=I32),
                     torch.tensor([4, 2, 1, 3], dtype=I32), 5)))
    samples.append((torch.ops.vattention.select_topk.default,
                    (scores.half(), torch.zeros(4, dtype=I32), torch.full((4,), 30, dtype=I32),
                     torch.full((4,), 3, dtype=I32), 3)))
    heavy = R.select_topk_ref(scores, torch.zeros(4, dtype=I32), torch.full((4,), 30, dtype=I32),
                       torch.full((4,), 5, dtype=I32), 5)
    for stream, ns in ((0, [3, 100, 0, 10]), (1, [25, 25, 2, 40])):
        samples.append((torch.ops.vattention.sample_residual.default,
                        (heavy, torch.zeros(4, dtype=I32), torch.full((4,), 30, dtype=I32),
                         torch.tensor(ns, dtype=I32), rng_state(7, 1), 30, stream)))
    for dtype, group, per_q in ((torch.float32, 2, False), (torch.bfloat16, 3, True)):
        q, k, v = make_qkv(2, 2 * group, 2, 20, 64, dtype, g)
        idx, lw, counts = make_lists(2, 2 * group if per_q else 2, 9, 20, g)
        samples.append((torch.ops.vattention.pilot_stats.default, (q, k, v, idx, counts, 0.125)))
        samples.append((torch.ops.vattention.sparse_attention.default,
                        (q, k, v, idx, lw, counts, 0.125, 3)))
        samples.append((torch.ops.vattention.sparse_attention.default,
                        (q, k, v, idx, None, counts, 0.125, 0)))
    po = torch.randn(3, 2, 4, 16, generator=g)
    pl = torch.randn(3, 2, 4, generator=g)
    pl[0, 0] = -math.inf
    samples.append((torch.ops.vattention.combine.default, (po, pl)))
    samples.append((torch.ops.vattention.combine.default, (po[:, 0, 0].contiguous(),
                                                           pl[:, 0, 0].contiguous())))
    return samples


@pytest.mark.parametrize("case", range(len(_opcheck_samples())))
def test_opcheck(case):
    op, args = _opcheck_samples()[case]
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------


def _pipeline(q, k, v, scores, starts, ends, ks, rng):
    batch, q_heads, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    heavy = ops.select_topk(scores, starts, ends, ks, 6)
    counts = (heavy >= 0).sum(-1).to(torch.int32).view(batch, kv_heads)
    det = ops.sparse_attention(q, k, v, heavy.view(batch, kv_heads, 6), None, counts, 0.125, 0)
    idx, lw, n = ops.sample_residual(heavy, starts, ends, torch.full_like(ks, 8), rng, 8, 1)
    stats = ops.pilot_stats(q, k, v, idx.view(batch, kv_heads, 8), n.view(batch, kv_heads),
                            0.125)
    smp = ops.sparse_attention(q, k, v, idx.view(batch, kv_heads, 8),
                               lw.view(batch, kv_heads, 8), n.view(batch, kv_heads), 0.125, 0)
    out, lse = ops.combine(torch.stack([det[0], smp[0]]), torch.stack([det[1], smp[1]]))
    return out, lse, stats[1]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_of_several_ops(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(21)
    q, k, v = make_qkv(2, 4, 2, 40, 64, torch.float32, g)
    scores = torch.randn(4, 40, generator=g)
    starts = torch.full((4,), 2, dtype=I32)
    ends = torch.full((4,), 36, dtype=I32)
    ks = torch.full((4,), 6, dtype=I32)
    args = (q, k, v, scores, starts, ends, ks, rng_state(3, 1))
    expected = _pipeline(*args)
    got = torch.compile(_pipeline, fullgraph=True, backend=backend)(*args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_decode_with_int_seed():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(22)
    q, k, v = make_qkv(2, 4, 2, 300, 64, torch.float32, g)
    cfg = vattention.VAttentionConfig(sink=4, local=8, heavy=0.05, base_rate=0.1)

    def step(q, k, v):
        return vattention.decode(q, k, v, cfg, seed=1234)

    expected = step(q, k, v)
    torch.testing.assert_close(step(q, k, v), expected, rtol=0, atol=0)   # reproducible
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(got, expected)


def test_compile_fullgraph_decode_with_seq_lens(monkeypatch):
    """ALGORITHM.md section 4: the whole decode step can be traced by torch.compile, also with
    ragged seq_lens. The budget's z-scores are replaced by constants here so that this test
    isolates the seq_lens path from the NormalDist problem of the test above."""
    from statistics import NormalDist

    from vattention import budget
    table = {d: NormalDist().inv_cdf(1 - d / 2) for d in (0.05,)}
    monkeypatch.setattr(budget, "z_two_sided", lambda delta: table[delta])
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(24)
    q, k, v = make_qkv(2, 4, 2, 300, 64, torch.float32, g)
    seq_lens = torch.tensor([300, 123])
    cfg = vattention.VAttentionConfig(sink=4, local=8, heavy=0.05, base_rate=0.1)

    def step(q, k, v, seq_lens):
        return vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=77)

    expected = step(q, k, v, seq_lens)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, seq_lens)
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------------------
# decode end to end (cheap sanity, exact configurations)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("share_gqa", [True, False])
def test_decode_is_exact_when_the_residual_is_enumerated(share_gqa):
    g = torch.Generator().manual_seed(23)
    q, k, v = make_qkv(3, 8, 2, 200, 64, torch.float32, g)
    seq_lens = torch.tensor([200, 57, 1])
    cfg = vattention.VAttentionConfig(sink=3, local=5, heavy=10, base_rate=1.0,
                                      share_gqa=share_gqa)
    out = vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=5)
    dense = R.dense_attention_ref(q, k, v, 1 / 8, seq_lens.tolist())
    torch.testing.assert_close(out.to(F64), dense, atol=1e-4, rtol=1e-4)
