"""Stage "select" and special values: NaN scores are selected first, subnormals are numbers.

select_topk.h: NaN ranks above every number (+inf included), ties (NaN among NaN too)
to the lower position; -0.0 ties with +0.0 and a subnormal is ordered like any other
number, bit-exactly on every device (the GPU build uses --use_fast_math, whose float
compares would flush subnormals to zero). select_scores.h: a NaN logit reaches the
token's score in both share_gqa modes, so the token is selected and its NaN reaches the
attention output instead of being dropped.

Every case runs on the CPU and on CUDA (skipped without a GPU). k_max <= 256 takes the
CUDA warp-select path and k_max > 256 the radix path; rows of 20000 scores are long
enough for the multi-block (cluster) launches on sm_90.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from tests.helpers import DEVICES, DTYPES, I32
from vattention import ops

K_MAXES = [8, 300]  # CUDA: warp select, radix select


def from_bits(bits) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


NAN = float("nan")
NEG_NAN = from_bits([0xFFC00000]).item()      # sign bit set
PAYLOAD_NAN = from_bits([0x7F800001]).item()  # signalling NaN with a payload
INF = float("inf")


def topk(scores: torch.Tensor, device, ks, k_max, starts=None, ends=None) -> torch.Tensor:
    rows, length = scores.shape
    starts = torch.zeros(rows, dtype=I32) if starts is None else torch.as_tensor(starts, dtype=I32)
    ends = torch.full((rows,), length, dtype=I32) if ends is None else torch.as_tensor(ends, dtype=I32)
    ks = torch.as_tensor(ks, dtype=I32)
    got = ops.select_topk(scores.to(device), starts.to(device), ends.to(device), ks.to(device), k_max)
    return got.cpu()


def chosen(out_row: torch.Tensor) -> list:
    return [i for i in out_row.tolist() if i >= 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_max", K_MAXES)
def test_nan_ranks_above_every_number(device, dtype, k_max):
    row = [1.0, NAN, INF, NEG_NAN, 5.0, PAYLOAD_NAN, -INF, 0.0]
    scores = torch.tensor([row] * 6).to(dtype)
    got = topk(scores, device, ks=[1, 2, 3, 4, 5, 8], k_max=k_max)
    # NaN at 1, 3, 5 (lower position first), then +inf (2), 5.0 (4), 1.0 (0), 0.0 (7), -inf (6).
    assert [chosen(r) for r in got] == [
        [1], [1, 3], [1, 3, 5], [1, 2, 3, 5], [1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert (got[:, 8:] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_max", K_MAXES)
def test_nan_ranks_above_plus_and_minus_inf(device, k_max):
    scores = torch.tensor([[-INF, NAN, INF, NAN, -1e30]])
    got = topk(scores, device, ks=[2], k_max=k_max)
    assert chosen(got[0]) == [1, 3]                       # both NaN, not +inf
    got = topk(scores, device, ks=[3], k_max=k_max, starts=[2], ends=[5])
    assert chosen(got[0]) == [2, 3, 4]                    # the window holds 3 positions
    got = topk(scores, device, ks=[1], k_max=k_max, starts=[2], ends=[5])
    assert chosen(got[0]) == [3]                          # the NaN in the window beats +inf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_max", K_MAXES)
def test_all_nan_rows_take_the_lowest_positions_of_the_window(device, k_max):
    scores = torch.full((2, 50), NAN)
    got = topk(scores, device, ks=[4, 5], k_max=k_max, starts=[0, 17], ends=[50, 40])
    assert chosen(got[0]) == [0, 1, 2, 3]
    assert chosen(got[1]) == [17, 18, 19, 20, 21]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_max", K_MAXES)
def test_nan_in_long_rows_is_selected_first(device, dtype, k_max):
    """20000 scores per row: on sm_90 several blocks (a cluster) share each row."""
    g = torch.Generator().manual_seed(11)
    rows, length = 3, 20000
    scores = (torch.randn(rows, length, generator=g) * 4).to(dtype)
    nan_at = [[19999], [5, 4096, 12345, 19000], list(range(0, length, 1000))]
    for r, positions in enumerate(nan_at):
        scores[r, positions] = NAN
    scores[0, 7] = INF
    take = min(20, k_max)  # of row 2's 20 NaN, the lowest positions win
    got = topk(scores, device, ks=[2, 4, take], k_max=k_max)
    assert chosen(got[0]) == [7, 19999]
    assert chosen(got[1]) == nan_at[1]
    assert chosen(got[2]) == nan_at[2][:take]


def tiny_values(dtype):
    """(smallest positive subnormal, a larger subnormal) of the dtype, as fp32 values."""
    if dtype == torch.float16:
        return 2.0 ** -24, 2.0 ** -20
    if dtype == torch.bfloat16:
        return 2.0 ** -133, 2.0 ** -128
    return 2.0 ** -149, 2.0 ** -140


@contextlib.contextmanager
def cpu_flushes_subnormals():
    """The calling thread's FTZ/DAZ mode: float compares then see subnormals as zero, as
    the GPU's do under --use_fast_math. One intra-op thread, so the op runs on this one."""
    threads = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES + ["cpu-flushing-subnormals"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_max", K_MAXES)
def test_subnormals_are_ordered_not_tied_with_zero(device, dtype, k_max):
    tiny, small = tiny_values(dtype)
    scores = torch.tensor([[0.0, -tiny, tiny, -0.0, small, -small]] * 5).to(dtype)
    assert (scores[0, 1:3] != 0).all()  # representable in the dtype
    flushing = device == "cpu-flushing-subnormals"
    with cpu_flushes_subnormals() if flushing else contextlib.nullcontext():
        got = topk(scores, "cpu" if flushing else device, ks=[1, 2, 3, 4, 5], k_max=k_max)
    # small (4) > tiny (2) > 0.0 (0) == -0.0 (3) > -tiny (1) > -small (5). Flushing the
    # subnormals to zero would tie all six and give [0], [0, 1], [0, 1, 2], ...
    assert [chosen(r) for r in got] == [[4], [2, 4], [0, 2, 4], [0, 2, 3, 4], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_max", K_MAXES)
def test_signed_zeros_tie(device, k_max):
    scores = torch.tensor([[-0.0, 0.0, -1.0], [0.0, -0.0, -1.0]])
    got = topk(scores, device, ks=[1, 1], k_max=k_max)
    assert [chosen(r) for r in got] == [[0], [0]]


# --------------------------------------------------------------------------------------
# select_scores -> select_topk: a NaN logit gets its token selected.
# --------------------------------------------------------------------------------------


def scoring_inputs(device, dtype, seed=5):
    g = torch.Generator().manual_seed(seed)
    batch, q_heads, kv_heads, length, dim = 2, 8, 2, 300, 64
    q = torch.randn(batch, q_heads, dim, generator=g).to(device, dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(device, dtype)
    lengths = torch.tensor([300, 200], device=device)
    return q, k, lengths


def select(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """select_topk over each score row's valid prefix."""
    batch, heads, length = scores.shape
    rows = scores.reshape(batch * heads, length)
    ends = lengths.to(I32).repeat_interleave(heads)
    starts = torch.zeros_like(ends)
    ks = torch.full_like(ends, k)
    return ops.select_topk(rows, starts, ends, ks, k).reshape(batch, heads, k).cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("share", [False, True])
def test_nan_key_row_is_selected_for_its_group(device, dtype, share):
    q, k, lengths = scoring_inputs(device, dtype)
    clean = ops.select_scores(q, k, lengths, 0.125, share).cpu()
    k[0, 1, 137, 5] = NAN  # every head of KV group (0, 1) gets a NaN logit at 137
    k[1, 0, 250, 0] = NAN  # beyond batch 1's length (200): never read
    scores = ops.select_scores(q, k, lengths, 0.125, share).cpu()
    group = 4
    # The score rows that read K row (0, 1, 137): the group's one row, or its 4 heads' rows.
    nan_rows = slice(1, 2) if share else slice(group, 2 * group)
    assert torch.isnan(scores[0, nan_rows, 137]).all()
    assert torch.isnan(scores).sum() == scores[0, nan_rows].shape[0]  # nowhere else
    got = select(scores, lengths, k=3)
    assert (got[0, nan_rows] == 137).any(dim=-1).all()
    assert not (select(clean, lengths, k=3)[0, nan_rows] == 137).any()  # only thanks to the NaN
    # The rows that did not read it are unchanged.
    assert torch.equal(scores[1], clean[1]) and torch.equal(got[1], select(clean, lengths, 3)[1])
    assert torch.equal(scores[0, : nan_rows.start], clean[0, : nan_rows.start])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("share", [False, True])
def test_nan_query_head_makes_its_rows_nan(device, share):
    q, k, lengths = scoring_inputs(device, torch.float32, seed=6)
    q[1, 2, 9] = NAN  # head 2 (KV group 0) of batch 1
    scores = ops.select_scores(q, k, lengths, 0.125, share).cpu()
    row = scores[1, 0] if share else scores[1, 2]
    # With share_gqa the group's score is a max over its heads' log-probabilities, NaN
    # whenever one of them is: the whole valid prefix of group 0.
    assert torch.isnan(row[:200]).all() and torch.isneginf(row[200:]).all()
    assert torch.isnan(scores).sum() == 200
    got = select(scores, lengths, k=4)
    assert (got[1, 0] if share else got[1, 2]).tolist() == [0, 1, 2, 3]
