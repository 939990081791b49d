"""torch.ops.vattention.select_topk: against the plain reference on every device, the CUDA
kernels against the CPU op on long rows (warp, block and cluster paths), argument checks,
opcheck."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import (DTYPES, I32, assert_eager_and_fake_name, cuda_only, gen, no_sync,
                           random_windows, to_cuda, to_device)
from tests.select.reference import select_topk_ref
from vattention import ops


def _windows(rows, length, g):
    starts = torch.randint(0, length + 2, (rows,), generator=g, dtype=I32)
    ends = starts + torch.randint(-2, length + 3, (rows,), generator=g, dtype=I32)
    starts[0], ends[0] = 0, length               # the whole row
    starts[1 % rows], ends[1 % rows] = 0, length + 50   # end clipped to the row length
    if rows > 2:
        starts[2], ends[2] = min(1, length), min(1, length)  # empty window
    if rows > 3:
        starts[3], ends[3] = length, length + 3      # empty after clipping
    return starts, ends


def _select_topk_on(device, scores, starts, ends, ks, k_max):
    got = ops.select_topk(*to_device(device, scores, starts, ends, ks), k_max)
    assert got.device.type == torch.device(device).type
    return got.cpu()


# --------------------------------------------------------------------------------------
# against the reference, every device
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 2, 7, 5000])
def test_select_topk_matches_reference(device, dtype, length):
    g = torch.Generator().manual_seed(1000 + length)
    rows = 8
    scores = torch.randn(rows, length, generator=g).to(dtype)
    starts, ends = _windows(rows, length, g)
    k_max = min(length + 3, 40)
    ks = torch.randint(0, k_max + 1, (rows,), generator=g, dtype=I32)
    ks[0] = 0                                   # k = 0
    ks[1] = k_max                               # k >= window on short rows
    got = _select_topk_on(device, scores, starts, ends, ks, k_max)
    assert got.dtype == I32 and got.shape == (rows, k_max)
    torch.testing.assert_close(got, select_topk_ref(scores, starts, ends, ks, k_max), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_ties_nan_and_infinities(device, dtype):
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
    got = _select_topk_on(device, scores, starts, ends, ks, 30)
    torch.testing.assert_close(got, select_topk_ref(scores, starts, ends, ks, 30), rtol=0, atol=0)


def test_select_topk_nan_ranks_above_plus_inf(device):
    """select_topk.h: NaN ranks above every number (torch.topk's order), so a NaN score is
    selected first and reaches the output instead of being dropped."""
    scores = torch.tensor([[-float("inf"), float("nan"), float("inf"), float("nan"), -1e30]])
    one = torch.ones(1, dtype=I32)
    got = _select_topk_on(device, scores, torch.zeros(1, dtype=I32), 5 * one, 3 * one, 4)
    # Exactly: the two NaN (1, 3), then +inf (2); not -1e30 (4) nor -inf (0).
    assert got.tolist() == [[1, 2, 3, -1]]


def test_select_topk_signed_zeros_are_a_tie(device):
    """select_topk.h: 'Ties prefer the lower position'. -0.0 == +0.0, so position 0 must win."""
    scores = torch.tensor([[-0.0, 0.0]])
    one = torch.ones(1, dtype=I32)
    got = _select_topk_on(device, scores, torch.zeros(1, dtype=I32), 2 * one, one, 1)
    assert got.tolist() == [[0]], (
        "topk ranks -0.0 below +0.0 (orderable_key in common.h distinguishes signed zeros), "
        "so the tie rule 'lower position wins' is broken for signed zeros")


def test_select_topk_strided_rows_and_k_above_k_max(device):
    g = torch.Generator().manual_seed(3)
    big = torch.randn(5, 100, generator=g).to(device)
    scores = big[:, :60]                          # row stride 100, positions contiguous
    assert scores.stride() == (100, 1)
    starts = torch.tensor([0, 5, 10, 0, 59], dtype=I32)
    ends = torch.tensor([60, 60, 30, 1, 60], dtype=I32)
    ks = torch.tensor([7, 3, 20, 1, 1], dtype=I32)
    got = _select_topk_on(device, scores, starts, ends, ks, 8)
    # Undocumented in select_topk.h: k > k_max keeps the k_max best (row 2 asks 20 of 8 slots).
    torch.testing.assert_close(got, select_topk_ref(scores.cpu().contiguous(), starts, ends, ks, 8),
                               rtol=0, atol=0)


def test_select_topk_k_max_zero_no_rows_and_empty_rows(device):
    scores = torch.randn(3, 10, device=device)
    z = torch.zeros(3, dtype=I32, device=device)
    assert ops.select_topk(scores, z, z + 10, z + 4, 0).shape == (3, 0)
    empty = ops.select_topk(torch.randn(0, 10, device=device), z[:0], z[:0], z[:0], 4)
    assert empty.shape == (0, 4)
    none = ops.select_topk(torch.randn(3, 0, device=device), z, z, z + 2, 2)
    assert (none == -1).all()


# --------------------------------------------------------------------------------------
# CUDA against the CPU op: long rows, every kernel path, no host sync
# --------------------------------------------------------------------------------------


def topk_both(scores, starts, ends, ks, k_max):
    ref = ops.select_topk(scores, starts, ends, ks, k_max)
    args = to_cuda(scores, starts, ends, ks)
    with no_sync():
        got = ops.select_topk(*args, k_max)
    assert got.device.type == "cuda" and got.dtype == I32 and got.shape == ref.shape
    return got.cpu(), ref


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 7, 300, 5000, 40000])
def test_select_topk_cuda_matches_cpu(dtype, length):
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


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_topk_cuda_ties_nan_infinities_and_zeros(dtype):
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


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 64, 256, 6553, 13107])
def test_select_topk_cuda_long_rows_large_and_small_k(dtype, k):
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


@cuda_only
def test_select_topk_cuda_many_strided_rows():
    g = gen(3)
    big = torch.randn(700, 260, generator=g)
    scores = big[:, 5:205]                      # row stride 260, positions contiguous
    rows = scores.shape[0]
    starts, ends = random_windows(rows, 200, g)
    ks = torch.randint(-2, 40, (rows,), generator=g, dtype=I32)
    got, ref = topk_both(scores, starts, ends, ks, 33)
    assert torch.equal(got, ref)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def _select_topk_args():
    return dict(scores=torch.randn(3, 10), starts=torch.zeros(3, dtype=I32),
                ends=torch.full((3,), 10, dtype=I32), ks=torch.full((3,), 2, dtype=I32),
                k_max=4)


@pytest.mark.parametrize("change,match", [
    (dict(scores=torch.randn(30)), r"scores must be \[rows, length\]"),
    (dict(scores=torch.randn(3, 10, 1)), r"scores must be \[rows, length\]"),
    (dict(scores=torch.tensor(1.0)), r"scores must be \[rows, length\]"),
    (dict(scores=torch.randn(3, 10, dtype=torch.float64)), r"scores must be float32"),
    (dict(scores=torch.randint(0, 5, (3, 10))), r"scores must be float32"),
    (dict(scores=torch.randn(10, 3).t()), r"scores must be contiguous"),
    (dict(starts=torch.zeros(3, dtype=torch.int64)), r"starts must be int32"),
    (dict(starts=torch.zeros(4, dtype=I32)), r"starts must have shape \[3\]"),
    (dict(ends=torch.zeros(3, 1, dtype=I32)), r"ends must have shape \[3\]"),
    (dict(ends=torch.zeros(3)), r"ends must be int32"),
    (dict(ks=torch.zeros(6, dtype=I32)[::2]), r"ks must be contiguous"),
    (dict(ks=torch.zeros(2, dtype=I32)), r"ks must have shape \[3\]"),
    (dict(k_max=-1), r"k_max must be >= 0"),
])
def test_select_topk_checks(change, match):
    args = _select_topk_args()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        ops.select_topk(**args)


def test_select_topk_fake_kernel_names_the_argument_of_a_wrong_rank():
    assert_eager_and_fake_name(
        lambda: ops.select_topk(torch.randn(30), torch.zeros(3, dtype=I32),
                                torch.zeros(3, dtype=I32), torch.zeros(3, dtype=I32), 2),
        "scores")


# --------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, dispatch
# --------------------------------------------------------------------------------------


def _opcheck_samples():
    """The short rows of the CPU suite and the longer ones of the CUDA suite: each on every
    device."""
    g = gen(0)
    samples = []
    for length, ends, ks, k_max, dtype in ((30, [30, 20, 5, 40], [4, 2, 1, 3], 5, torch.half),
                                           (300, [300, 200, 5, 400], [4, 2, 1, 30], 30,
                                            torch.bfloat16)):
        scores = torch.randn(4, length, generator=g)
        samples.append((scores, torch.tensor([0, 3, 5, 30], dtype=I32),
                        torch.tensor(ends, dtype=I32), torch.tensor(ks, dtype=I32), k_max))
        samples.append((scores.to(dtype), torch.zeros(4, dtype=I32),
                        torch.full((4,), length, dtype=I32), torch.full((4,), 3, dtype=I32), 3))
    return samples


@pytest.mark.parametrize("case", range(4))
def test_opcheck(device, case):
    sample = _opcheck_samples()[case]
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in sample)
    torch.library.opcheck(torch.ops.vattention.select_topk.default, args)
