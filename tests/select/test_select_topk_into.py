"""torch.ops.vattention.select_topk_into: select_topk's entries written into a caller's int32
[rows, k_max] view (decode's fixed path writes the heavy columns of the deterministic list,
a row stride of the list's width apart): equal to select_topk on strided views, nothing
outside the view written, argument checks, opcheck."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import DTYPES, I32, assert_eager_and_fake_name, gen, to_device
from vattention import ops

SENTINEL = 12345


def _case(rows, length, k_max, dtype, seed):
    g = gen(seed)
    scores = torch.randint(-8, 8, (rows, length), generator=g).to(dtype)   # ties
    scores[0, :3] = float("nan")
    starts = torch.randint(0, length // 2 + 1, (rows,), generator=g, dtype=I32)
    ends = starts + torch.randint(-2, length + 3, (rows,), generator=g, dtype=I32)
    ks = torch.randint(-1, k_max + 4, (rows,), generator=g, dtype=I32)
    ks[0] = k_max
    return scores, starts, ends, ks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,length,k_max,lead,trail", [
    (6, 50, 5, 3, 4),         # heavy columns between a fixed part and the row's end
    (5, 3000, 300, 17, 0),    # the radix path on CUDA (k_max > 256), columns at the end
    (1, 40, 7, 2, 9),         # one row (its stride is free)
    (4, 20, 20, 0, 0),        # a plain contiguous output
])
def test_select_topk_into_equals_select_topk_on_a_strided_view(device, dtype, rows, length,
                                                                 k_max, lead, trail):
    scores, starts, ends, ks = to_device(device, *_case(rows, length, k_max, dtype, rows))
    wide = torch.full((rows, lead + k_max + trail), SENTINEL, dtype=I32, device=device)
    out = wide[:, lead:lead + k_max]
    ops.select_topk_into(scores, starts, ends, ks, out)
    ref = ops.select_topk(scores, starts, ends, ks, k_max)
    assert torch.equal(out.cpu(), ref.cpu())
    # Nothing outside the view: the fixed part and the tail keep their entries.
    assert (wide[:, :lead] == SENTINEL).all() and (wide[:, lead + k_max:] == SENTINEL).all()


def test_select_topk_into_a_view_of_a_3d_list(device):
    """decode's layout: det_idx [B, lists, W] viewed as [B * lists, W], heavy columns from F."""
    batch, lists, fixed, k_max, length = 2, 3, 6, 9, 64
    scores, starts, ends, ks = to_device(device, *_case(batch * lists, length, k_max,
                                                        torch.float32, 7))
    det = torch.full((batch, lists, fixed + k_max), -7, dtype=I32, device=device)
    heavy = det.view(batch * lists, -1)[:, fixed:]
    ops.select_topk_into(scores, starts, ends, ks, heavy)
    assert torch.equal(det[:, :, fixed:].reshape(batch * lists, k_max).cpu(),
                       ops.select_topk(scores, starts, ends, ks, k_max).cpu())
    assert (det[:, :, :fixed] == -7).all()


def test_select_topk_into_k_max_zero_and_no_rows(device):
    scores = torch.randn(3, 10, device=device)
    args = (torch.zeros(3, dtype=I32, device=device), torch.full((3,), 10, dtype=I32,
                                                                  device=device),
            torch.full((3,), 2, dtype=I32, device=device))
    ops.select_topk_into(scores, *args, torch.empty(3, 0, dtype=I32, device=device))
    empty = torch.empty(0, 10, device=device)
    none = torch.empty(0, dtype=I32, device=device)
    ops.select_topk_into(empty, none, none, none, torch.empty(0, 4, dtype=I32, device=device))


def _args():
    return dict(scores=torch.randn(3, 10), starts=torch.zeros(3, dtype=I32),
                ends=torch.full((3,), 10, dtype=I32), ks=torch.full((3,), 2, dtype=I32),
                out=torch.empty(3, 4, dtype=I32))


@pytest.mark.parametrize("change,match", [
    (dict(out=torch.empty(3, 4, dtype=torch.int64)), r"out must be int32"),
    (dict(out=torch.empty(12, dtype=I32)), r"out must be \[rows, k_max\]"),
    (dict(out=torch.empty(2, 4, dtype=I32)), r"out must be \[rows, k_max\] with rows = "),
    (dict(out=torch.empty(4, 3, dtype=I32).t()), r"out must be contiguous along its last dim"),
    (dict(out=torch.empty(8, dtype=I32).as_strided((3, 4), (2, 1))),
     r"out's rows must not overlap"),
    (dict(scores=torch.randn(30)), r"scores must be \[rows, length\]"),
    (dict(ks=torch.zeros(2, dtype=I32)), r"ks must have shape \[3\]"),
])
def test_select_topk_into_checks(change, match):
    args = _args()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        ops.select_topk_into(**args)


def test_select_topk_into_fake_kernel_names_the_argument_of_a_wrong_rank():
    assert_eager_and_fake_name(
        lambda: ops.select_topk_into(torch.randn(3, 10), torch.zeros(3, dtype=I32),
                                     torch.zeros(3, dtype=I32), torch.zeros(3, dtype=I32),
                                     torch.empty(12, dtype=I32)),
        "out")


@pytest.mark.parametrize("case", range(2))
def test_opcheck(device, case):
    rows, length, k_max, lead = ((4, 30, 5, 2), (4, 300, 30, 0))[case]
    scores, starts, ends, ks = _case(rows, length, k_max, torch.bfloat16, case)
    wide = torch.full((rows, lead + k_max + 3), -1, dtype=I32)
    args = (*to_device(device, scores, starts, ends, ks),
            wide.to(device)[:, lead:lead + k_max])
    torch.library.opcheck(torch.ops.vattention.select_topk_into.default, args)
