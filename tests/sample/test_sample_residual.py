"""torch.ops.vattention.sample_residual: the Philox reference itself, the op against the
reference on every device (same draws on CPU and CUDA), the draws' statistics, the CUDA
kernel against the CPU op on long rows, heavy rows of any stride, argument checks, opcheck.

Entries past a row's count are unspecified (sample.h: the op writes only the first count of
each row), so every comparison reads the first count entries only; opcheck, which compares
whole outputs, runs on inputs whose every row is full (count == max_out)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import (F64, I32, assert_eager_and_fake_name, chi2_upper, cuda_only, gen,
                           no_sync, rng_state, to_cuda, to_device)
from tests.sample import reference as R
from tests.select.reference import select_topk_ref
from vattention import ops

DRAW_SETS = [ops.PILOT_DRAWS, ops.FINAL_DRAWS]


def sample_case(g, rows=48, span=300, heavy_max=24, start_max=50):
    starts = torch.randint(0, start_max, (rows,), generator=g, dtype=I32)
    widths = torch.randint(0, span, (rows,), generator=g, dtype=I32)
    widths[0] = 0                                 # empty window
    ends = starts + widths
    scores = torch.randn(rows, int(ends.max()) + 1, generator=g)
    ks = torch.randint(0, heavy_max + 1, (rows,), generator=g, dtype=I32)
    ks[1] = heavy_max
    ends[1] = starts[1] + min(10, heavy_max)      # heavy eats the whole window -> n_r = 0
    heavy = select_topk_ref(scores, starts, ends, ks, heavy_max)
    n_r = ends - starts - (heavy >= 0).sum(1).to(I32)
    regime = torch.randint(0, 6, (rows,), generator=g)
    b = torch.randint(1, 64, (rows,), generator=g, dtype=I32)
    num_samples = torch.where(regime == 0, torch.zeros_like(b),                  # b = 0
                  torch.where(regime == 1, -b,                                     # b < 0
                  torch.where(regime == 2, n_r + b,                                # b >= n_r
                  torch.where(regime == 3, n_r, b))))                              # b == n_r
    return heavy, starts, ends, num_samples.to(I32)


def sample_on(device, heavy, starts, ends, num_samples, rng, max_out, draw_set):
    got = ops.sample_residual(*to_device(device, heavy, starts, ends, num_samples, rng),
                              max_out, draw_set)
    for t in got:
        assert t.device.type == torch.device(device).type
    return tuple(t.cpu() for t in got)


def check_sample(got, ref):
    idx, lw, counts = got
    ridx, rlw, rcounts = ref
    assert idx.dtype == I32 and lw.dtype == torch.float32 and counts.dtype == I32
    torch.testing.assert_close(counts, rcounts, rtol=0, atol=0)
    valid = torch.arange(idx.shape[1])[None, :] < counts[:, None]   # past the count: unspecified
    torch.testing.assert_close(idx[valid], ridx[valid], rtol=0, atol=0)
    torch.testing.assert_close(lw[valid].to(F64), rlw[valid], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# the reference itself
# --------------------------------------------------------------------------------------


def test_philox_known_answers():
    R.philox_self_test()


def test_scale_to_range_reference_edges():
    assert R.scale_to_range_ref(0, 7) == 0
    assert R.scale_to_range_ref((1 << 64) - 1, 7) == 6
    assert R.scale_to_range_ref(1 << 63, 10) == 5


# --------------------------------------------------------------------------------------
# against the reference, every device
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 3), ((1 << 32) + 5, (1 << 30) - 1),
                                         ((1 << 63) - 1, 77)])
@pytest.mark.parametrize("draw_set", DRAW_SETS)
@pytest.mark.parametrize("max_out", [0, 5, 64])
def test_sample_residual_matches_reference(device, seed, offset, draw_set, max_out):
    g = torch.Generator().manual_seed(seed % 1000 + 17 * draw_set + max_out)
    heavy, starts, ends, num_samples = sample_case(g)
    rng = rng_state(seed, offset)
    got = sample_on(device, heavy, starts, ends, num_samples, rng, max_out, draw_set)
    ref = R.sample_residual_ref(heavy, starts, ends, num_samples, rng, max_out, draw_set)
    check_sample(got, ref)
    # The residual never contains a heavy hitter and stays inside the window.
    idx, _, counts = got
    for r in range(idx.shape[0]):
        drawn = set(idx[r, :counts[r]].tolist())
        assert not drawn & set(R.heavy_prefix(heavy[r].tolist()))
        assert all(starts[r] <= p < ends[r] for p in drawn)


def test_sample_residual_negative_seed_is_its_uint64_bits(device):
    g = torch.Generator().manual_seed(5)
    heavy, starts, ends, num_samples = sample_case(g, rows=8)
    num_samples = torch.full_like(num_samples, 9)
    rng = rng_state(-1, 2)
    got = sample_on(device, heavy, starts, ends, num_samples, rng, 9, ops.FINAL_DRAWS)
    check_sample(got, R.sample_residual_ref(heavy, starts, ends, num_samples, rng, 9,
                                            ops.FINAL_DRAWS))


def test_sample_residual_without_heavy_columns(device):
    starts = torch.tensor([0, 10, 5], dtype=I32)
    ends = torch.tensor([100, 10, 1000], dtype=I32)
    num_samples = torch.tensor([7, 3, 50], dtype=I32)
    heavy = torch.zeros(3, 0, dtype=I32)
    rng = rng_state(99, 1)
    got = sample_on(device, heavy, starts, ends, num_samples, rng, 50, ops.PILOT_DRAWS)
    check_sample(got, R.sample_residual_ref(heavy, starts, ends, num_samples, rng, 50,
                                            ops.PILOT_DRAWS))


def test_sample_residual_no_rows(device):
    z = torch.zeros(0, dtype=I32, device=device)
    idx, lw, counts = ops.sample_residual(torch.zeros(0, 4, dtype=I32, device=device), z, z, z,
                                          torch.tensor([1, 0], device=device), 8,
                                          ops.PILOT_DRAWS)
    assert idx.shape == (0, 8) and counts.shape == (0,)


def test_sample_residual_enumerates_when_budget_covers_residual(device):
    heavy = torch.tensor([[3, 4, 8, -1], [-1, -1, -1, -1]], dtype=I32)
    starts = torch.tensor([2, 0], dtype=I32)
    ends = torch.tensor([12, 4], dtype=I32)
    num_samples = torch.tensor([7, 1000], dtype=I32)       # n_r = 7 and 4
    idx, lw, counts = sample_on(device, heavy, starts, ends, num_samples, rng_state(1), 8,
                                ops.FINAL_DRAWS)
    assert counts.tolist() == [7, 4]
    assert idx[0, :7].tolist() == [2, 5, 6, 7, 9, 10, 11]
    assert idx[1, :4].tolist() == [0, 1, 2, 3]
    assert lw[0, :7].tolist() == [0.0] * 7 and lw[1, :4].tolist() == [0.0] * 4


def test_sample_residual_clamps_to_max_out_with_unbiased_weight(device):
    heavy = torch.tensor([[10, 11, -1], [0, 1, 2]], dtype=I32)
    starts = torch.tensor([0, 0], dtype=I32)
    ends = torch.tensor([52, 60], dtype=I32)                 # n_r = 50 and 57
    num_samples = torch.tensor([100, 30], dtype=I32)         # b >= n_r > max_out; b > max_out
    rng = rng_state(2024, 9)
    got = sample_on(device, heavy, starts, ends, num_samples, rng, 10, ops.FINAL_DRAWS)
    idx, lw, counts = got
    assert counts.tolist() == [10, 10]
    torch.testing.assert_close(lw.to(F64), torch.tensor(
        [[math.log(50 / 10)] * 10, [math.log(57 / 10)] * 10], dtype=F64), rtol=1e-6, atol=1e-6)
    check_sample(got, R.sample_residual_ref(heavy, starts, ends, num_samples, rng, 10,
                                            ops.FINAL_DRAWS))


def test_sample_residual_is_reproducible_and_draw_sets_differ(device):
    g = torch.Generator().manual_seed(11)
    heavy, starts, ends, _ = sample_case(g, rows=16)
    num_samples = torch.full((16,), 40, dtype=I32)
    starts[:], ends[:] = 0, 1000                                  # n_r >> 40 on every row
    heavy = select_topk_ref(torch.randn(16, 1000, generator=g), starts, ends,
                            torch.full((16,), 20, dtype=I32), 20)

    def run(seed, offset, draw_set):
        return sample_on(device, heavy, starts, ends, num_samples, rng_state(seed, offset),
                         40, draw_set)[0]

    base = run(5, 0, ops.FINAL_DRAWS)
    torch.testing.assert_close(base, run(5, 0, ops.FINAL_DRAWS), rtol=0, atol=0)
    for other in (run(6, 0, ops.FINAL_DRAWS), run(5, 1, ops.FINAL_DRAWS),
                  run(5, 0, ops.PILOT_DRAWS), run(5 + (1 << 32), 0, ops.FINAL_DRAWS)):
        assert (other != base).float().mean() > 0.9
    # Rows with the same window and heavy list still get independent draws.
    heavy2 = heavy[:1].expand(16, -1).contiguous()
    idx = sample_on(device, heavy2, starts, ends, num_samples, rng_state(5), 40,
                    ops.FINAL_DRAWS)[0]
    assert (idx[0] != idx[1]).float().mean() > 0.9


def test_sample_residual_is_uniform_over_the_residual(device):
    """Chi-square on 100k draws over n_r = 500: 400 rows (independent Philox subsequences)
    of 250 draws each (b < n_r, so the with-replacement path), fixed seed, p = 1e-4."""
    rows, window, n_heavy, draws = 400, 600, 100, 250
    g = torch.Generator().manual_seed(2)
    heavy = torch.sort(torch.randperm(window, generator=g)[:n_heavy])[0].to(I32)
    heavy = heavy[None].expand(rows, -1).contiguous()
    starts = torch.zeros(rows, dtype=I32)
    ends = torch.full((rows,), window, dtype=I32)
    num_samples = torch.full((rows,), draws, dtype=I32)
    idx, lw, counts = sample_on(device, heavy, starts, ends, num_samples,
                                rng_state(31337, 4), draws, ops.FINAL_DRAWS)
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


def test_sample_residual_consecutive_draws_are_independent(device):
    """Serial test: draws 2j and 2j+1 come from one Philox block; their ranks, binned into
    10 deciles of n_r = 1000, must be independent. 100 rows x 998 draws, 10 x 10 cells."""
    rows, draws, n_r, bins = 100, 998, 1000, 10
    heavy = torch.tensor([[2, 5, -1]], dtype=I32).expand(rows, -1).contiguous()
    starts = torch.zeros(rows, dtype=I32)
    ends = torch.full((rows,), n_r + 2, dtype=I32)
    idx = sample_on(device, heavy, starts, ends, torch.full((rows,), draws, dtype=I32),
                    rng_state(77), draws, ops.PILOT_DRAWS)[0]
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
    read as its valid prefix [5]; it must never sample outside [start, end) or a heavy token.
    CPU only: the CUDA op cannot look at heavy on the host, and its heavy_count (a binary
    search) assumes the documented layout."""
    heavy = torch.tensor([[5, -1, 7, 8]], dtype=I32)
    starts = torch.zeros(1, dtype=I32)
    ends = torch.full((1,), 10, dtype=I32)
    rng = rng_state(3)
    for b in (9, 3):                                          # enumeration, then draws
        num_samples = torch.full((1,), b, dtype=I32)
        try:
            got = ops.sample_residual(heavy, starts, ends, num_samples, rng, 16, ops.FINAL_DRAWS)
        except RuntimeError as e:
            assert "heavy" in str(e)
            continue
        idx, _, counts = got
        assert 5 not in idx[0, :counts[0]].tolist(), "sampled the heavy hitter 5"
        ref = R.sample_residual_ref(heavy, starts, ends, num_samples, rng, 16, ops.FINAL_DRAWS)
        assert counts[0] == ref[2][0], (
            f"b={b}: accepted heavy={heavy.tolist()} but returned {counts[0]} entries "
            f"{idx[0, :counts[0]].tolist()} instead of {ref[2][0]}: heavy_count (sample.h) "
            "counts entries past the -1, which the CPU glue's heavy check never looks at")
        check_sample(got, R.sample_residual_ref(heavy, starts, ends, num_samples, rng, 16,
                                                ops.FINAL_DRAWS))


def test_sample_residual_reads_heavy_rows_of_any_stride(device):
    """heavy as decode passes it: the heavy columns of a wider list (a view, row stride >
    width). The columns after the view's width hold ascending positions inside the window,
    which a heavy count searching the stride instead of the width would take for heavy
    hitters; the draws must equal those of the contiguous copy."""
    g = torch.Generator().manual_seed(8)
    heavy, starts, ends, num_samples = sample_case(g, rows=40)
    rows, width = heavy.shape
    wide = torch.full((rows, 3 + width + 5), -1, dtype=I32)
    wide[:, :3] = 7                                           # the sink / local columns
    wide[:, 3:3 + width] = heavy
    wide[:, 3 + width:] = (ends[:, None] - 5 + torch.arange(5, dtype=I32)).clamp(min=0)
    view = wide[:, 3:3 + width]
    assert not view.is_contiguous() and view.stride() == (wide.shape[1], 1)
    rng = rng_state(4, 2)
    for max_out in (64, 400):
        got = sample_on(device, view, starts, ends, num_samples, rng, max_out, ops.FINAL_DRAWS)
        check_sample(got, R.sample_residual_ref(heavy, starts, ends, num_samples, rng, max_out,
                                                ops.FINAL_DRAWS))
        idx, lw, counts = sample_on(device, heavy, starts, ends, num_samples, rng, max_out,
                                    ops.FINAL_DRAWS)
        valid = torch.arange(max_out)[None, :] < counts[:, None]
        assert torch.equal(got[2], counts)
        assert torch.equal(got[0][valid], idx[valid]) and torch.equal(got[1][valid], lw[valid])


# --------------------------------------------------------------------------------------
# CUDA against the CPU op (same Philox stream through cuRAND), no host sync
# --------------------------------------------------------------------------------------


def sample_both(heavy, starts, ends, num_samples, rng, max_out, draw_set):
    ref = ops.sample_residual(heavy, starts, ends, num_samples, rng, max_out, draw_set)
    args = to_cuda(heavy, starts, ends, num_samples, rng)
    with no_sync():
        got = ops.sample_residual(*args, max_out, draw_set)
    for t in got:
        assert t.device.type == "cuda"
    got = tuple(t.cpu() for t in got)
    idx, lw, counts = got
    ridx, rlw, rcounts = ref
    assert idx.dtype == I32 and lw.dtype == torch.float32 and counts.dtype == I32
    assert torch.equal(counts, rcounts)
    valid = torch.arange(idx.shape[1])[None, :] < counts[:, None]   # past the count: unspecified
    assert torch.equal(idx[valid], ridx[valid])
    torch.testing.assert_close(lw[valid], rlw[valid], rtol=3e-7, atol=3e-7)
    return got


@cuda_only
@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 3), ((1 << 32) + 5, (1 << 30) - 1),
                                         ((1 << 63) - 1, 77), (-1, 5)])
@pytest.mark.parametrize("draw_set", DRAW_SETS)
@pytest.mark.parametrize("max_out", [0, 1, 5, 64, 333])
def test_sample_residual_cuda_matches_cpu(seed, offset, draw_set, max_out):
    g = gen(abs(seed) % 1000 + offset % 1000 + 10 * max_out + draw_set)
    heavy, starts, ends, num_samples = sample_case(g)
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    sample_both(heavy, starts, ends, num_samples, rng, max_out, draw_set)


@cuda_only
def test_sample_residual_cuda_without_heavy_columns():
    g = gen(5)
    starts = torch.randint(0, 10, (20,), generator=g, dtype=I32)
    ends = starts + torch.randint(0, 100, (20,), generator=g, dtype=I32)
    num_samples = torch.randint(-3, 120, (20,), generator=g, dtype=I32)
    heavy = torch.zeros(20, 0, dtype=I32)
    sample_both(heavy, starts, ends, num_samples, torch.tensor([9, 1]), 50, ops.FINAL_DRAWS)


@cuda_only
def test_sample_residual_cuda_long_rows():
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
        sample_both(heavy, starts, ends, num_samples, torch.tensor([77, 2]), max_out,
                    ops.FINAL_DRAWS)


@cuda_only
def test_sample_residual_cuda_uses_the_device_rng_state():
    """The seed is read on the device: changing the rng tensor's contents (not the tensor)
    changes the draws, as a captured graph would see."""
    g = gen(6)
    heavy, starts, ends, num_samples = to_cuda(*sample_case(g))
    num_samples = torch.full_like(num_samples, 20)
    rng = torch.tensor([1, 0], dtype=torch.int64, device="cuda")
    a = ops.sample_residual(heavy, starts, ends, num_samples, rng, 20, ops.FINAL_DRAWS)[0].clone()
    rng[1] = 1
    b = ops.sample_residual(heavy, starts, ends, num_samples, rng, 20, ops.FINAL_DRAWS)[0]
    assert not torch.equal(a, b)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def _sample_args():
    return dict(heavy=torch.tensor([[2, 5, -1], [0, 9, 10]], dtype=I32),
                starts=torch.tensor([0, 0], dtype=I32), ends=torch.tensor([20, 11], dtype=I32),
                num_samples=torch.tensor([4, 4], dtype=I32),
                rng=torch.tensor([1, 0]), max_out=8, draw_set=ops.FINAL_DRAWS)


@pytest.mark.parametrize("change,match", [
    (dict(heavy=torch.tensor([2, 5, -1], dtype=I32)), r"heavy must be \[rows, heavy_max\]"),
    (dict(heavy=torch.zeros(2, 3, dtype=torch.int64)), r"heavy must be int32"),
    (dict(heavy=torch.full((3, 2), -1, dtype=I32).t()), r"heavy's last dim must be contiguous"),
    (dict(heavy=torch.full((6,), -1, dtype=I32).as_strided((2, 3), (2, 1))),
     r"heavy's rows must not overlap"),
    (dict(starts=torch.zeros(3, dtype=I32)), r"starts must have shape \[2\]"),
    (dict(starts=torch.zeros(2, dtype=torch.int64)), r"starts must be int32"),
    (dict(ends=torch.zeros(2)), r"ends must be int32"),
    (dict(num_samples=torch.zeros(2, dtype=torch.int64)), r"num_samples must be int32"),
    (dict(num_samples=torch.zeros(1, dtype=I32)), r"num_samples must have shape \[2\]"),
    (dict(rng=torch.tensor([1, 0], dtype=I32)), r"rng must be an int64 tensor"),
    (dict(rng=torch.tensor([1, 0, 0])), r"rng must be an int64 tensor"),
    (dict(rng=torch.tensor([[1, 0]])), r"rng must be an int64 tensor"),
    (dict(rng=torch.tensor([1, 0, 0, 0])[::2]), r"rng must be contiguous"),
    (dict(rng=torch.tensor([1, 2 ** 30])), r"rng offset must lie in \[0, 2\^30\)"),
    (dict(rng=torch.tensor([1, -1])), r"rng offset must lie in \[0, 2\^30\)"),
    (dict(max_out=-1), r"max_out must be >= 0"),
    (dict(draw_set=2), r"draw_set must be 0 \(pilot\) or 1 \(final sample\)"),
    (dict(draw_set=-1), r"draw_set must be 0"),
    (dict(starts=torch.tensor([0, 12], dtype=I32)), r"starts <= ends.*row 1"),
    (dict(starts=torch.tensor([-1, 0], dtype=I32)), r"0 <= starts.*row 0"),
    (dict(heavy=torch.tensor([[5, 2, -1], [0, 9, 10]], dtype=I32)), r"heavy must be ascending.*row 0"),
    (dict(heavy=torch.tensor([[2, 2, -1], [0, 9, 10]], dtype=I32)), r"heavy must be ascending.*row 0"),
    (dict(heavy=torch.tensor([[2, 5, -1], [0, 9, 11]], dtype=I32)), r"heavy must be ascending.*row 1"),
    (dict(heavy=torch.tensor([[2, 5, -1], [0, 9, 10]], dtype=I32),
          starts=torch.tensor([3, 0], dtype=I32)), r"heavy must be ascending.*row 0"),
])
def test_sample_residual_checks(change, match):
    args = _sample_args()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        ops.sample_residual(**args)


def test_sample_residual_good_args_pass():
    ops.sample_residual(**_sample_args())


def test_sample_residual_fake_kernel_names_the_argument_of_a_wrong_rank():
    assert_eager_and_fake_name(
        lambda: ops.sample_residual(
            torch.zeros(3, dtype=I32), torch.zeros(3, dtype=I32), torch.zeros(3, dtype=I32),
            torch.zeros(3, dtype=I32), torch.tensor([1, 0]), 4, ops.PILOT_DRAWS),
        "heavy")


# --------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, dispatch
# --------------------------------------------------------------------------------------


def _opcheck_samples():
    """Rows whose every entry is written (count == max_out = 25), since opcheck compares
    whole outputs and the entries past a count are unspecified: a window of 30 with 5 heavy
    hitters (n_r = 25) enumerated (b = n_r, b > n_r), and a window of 300 (n_r = 295) with
    b = max_out draws and b > max_out clamped to max_out; both draw sets, on every device."""
    g = gen(0)
    samples = []
    for length, budgets in ((30, ([25, 100, 25, 40], [26, 25, 1000, 25])),
                            (300, ([25, 400, 26, 1000], [25, 30, 295, 296]))):
        scores = torch.randn(4, length, generator=g)
        ends = torch.full((4,), length, dtype=I32)
        heavy = select_topk_ref(scores, torch.zeros(4, dtype=I32), ends,
                                torch.full((4,), 5, dtype=I32), 5)
        for draw_set, ns in zip(DRAW_SETS, budgets):
            samples.append((heavy, torch.zeros(4, dtype=I32), ends, torch.tensor(ns, dtype=I32),
                            rng_state(7, 1), 25, draw_set))
    return samples


@pytest.mark.parametrize("case", range(4))
def test_opcheck(device, case):
    sample = _opcheck_samples()[case]
    assert (ops.sample_residual(*sample)[2] == 25).all()       # every row full
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in sample)
    torch.library.opcheck(torch.ops.vattention.sample_residual.default, args)
