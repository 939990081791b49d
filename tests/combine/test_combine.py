"""torch.ops.vattention.combine: against the plain reference on every device, the CUDA
kernel against the CPU op, argument checks, opcheck."""
from __future__ import annotations

import math

import pytest
import torch

from tests.combine.reference import combine_ref
from tests.helpers import (F64, I32, assert_attention_close, assert_close_scaled,
                           assert_eager_and_fake_name, cuda_only, gen, make_qkv, no_sync,
                           to_cuda, to_device)
from tests.sparse_attention.reference import sparse_attention_ref
from vattention import ops


def combine_on(device, po, pl):
    out, lse = ops.combine(*to_device(device, po, pl))
    assert out.device.type == lse.device.type == torch.device(device).type
    return out.cpu(), lse.cpu()


# --------------------------------------------------------------------------------------
# against the reference, every device
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_combine_matches_reference(device, splits):
    g = torch.Generator().manual_seed(splits)
    po = torch.randn(splits, 3, 4, 64, generator=g)
    pl = torch.randn(splits, 3, 4, generator=g) * 3
    pl[torch.rand(pl.shape, generator=g) < 0.3] = -math.inf
    pl[:, 0, 0] = -math.inf                                   # one all-empty item
    out, lse = combine_on(device, po, pl)
    ref_out, ref_lse = combine_ref(po, pl)
    assert out.shape == (3, 4, 64) and lse.shape == (3, 4)
    torch.testing.assert_close(lse.to(F64), ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.to(F64), ref_out, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[0, 0]) and (out[0, 0] == 0).all()


def test_combine_all_empty_and_empty_partials_ignored(device):
    po = torch.full((3, 2, 8), float("nan"))                  # whatever an empty partial holds
    pl = torch.full((3, 2), -math.inf)
    out, lse = combine_on(device, po, pl)
    assert torch.isneginf(lse).all() and (out == 0).all()
    po[1, 0] = torch.arange(8.0)
    pl[1, 0] = 0.5
    out, lse = combine_on(device, po, pl)
    assert lse[0].item() == 0.5 and out[0].tolist() == list(range(8))
    assert torch.isneginf(lse[1]) and (out[1] == 0).all()


def test_combine_without_item_dims(device):
    po = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pl = torch.tensor([0.0, math.log(3.0)])
    out, lse = combine_on(device, po, pl)
    assert out.shape == (2,) and lse.shape == ()
    torch.testing.assert_close(out, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(lse, torch.tensor(math.log(4.0)))


def test_combine_of_disjoint_lists_is_attention_over_their_union(device):
    g = torch.Generator().manual_seed(12)
    q, k, v = make_qkv(2, 6, 3, 40, 64, torch.bfloat16, g)
    idx = torch.randint(0, 40, (2, 3, 30), generator=g, dtype=I32)
    lw = torch.randn(2, 3, 30, generator=g)
    counts = torch.full((2, 3), 30, dtype=I32)
    qd, kd, vd = to_device(device, q, k, v)
    a = ops.sparse_attention(qd, kd, vd, *to_device(device, idx[..., :11].contiguous(),
                                                    lw[..., :11].contiguous(),
                                                    torch.full_like(counts, 11)), 0.125, 1)
    b = ops.sparse_attention(qd, kd, vd, *to_device(device, idx[..., 11:].contiguous(),
                                                    lw[..., 11:].contiguous(),
                                                    torch.full_like(counts, 19)), 0.125, 2)
    out, lse = combine_on(device, torch.stack([a[0], b[0]]), torch.stack([a[1], b[1]]))
    assert_attention_close(out, lse, *sparse_attention_ref(q, k, v, idx, lw, counts, 0.125))


# --------------------------------------------------------------------------------------
# CUDA against the CPU op, no host sync
# --------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("splits", [1, 2, 5, 40])
@pytest.mark.parametrize("dim", [64, 40, 300])
def test_combine_cuda_matches_cpu(splits, dim):
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
# bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("po,pl,match", [
    (torch.randn(4), torch.randn(1), r"partial_out must be \[splits, \.\.\., head_dim\]"),
    (torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3), r"must be float32"),
    (torch.randn(2, 3, 4), torch.randn(2, 3).half(), r"must be float32"),
    (torch.randn(2, 3, 4), torch.randn(2, 4), r"partial_lse must be partial_out's shape"),
    (torch.randn(2, 3, 4), torch.randn(2, 3, 4), r"partial_lse must be partial_out's shape"),
    (torch.randn(2, 6, 4)[:, ::2], torch.randn(2, 3), r"must be contiguous"),
    (torch.randn(0, 3, 4), torch.randn(0, 3), r"at least one partial"),
])
def test_combine_checks(po, pl, match):
    with pytest.raises(RuntimeError, match=match):
        ops.combine(po, pl)


def test_combine_fake_kernel_names_the_argument_of_a_wrong_rank():
    assert_eager_and_fake_name(lambda: ops.combine(torch.randn(4), torch.randn(1)),
                               "partial_out")


# --------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, dispatch
# --------------------------------------------------------------------------------------


def _opcheck_samples():
    """[splits, items..., head_dim] with an empty partial, and a single item without item
    dims (the CPU and the CUDA suites' samples, merged: they had the same shapes)."""
    g = gen(0)
    po = torch.randn(3, 2, 4, 16, generator=g)
    pl = torch.randn(3, 2, 4, generator=g)
    pl[0, 0] = -math.inf
    return [(po, pl), (po[:, 0, 0].contiguous(), pl[:, 0, 0].contiguous())]


@pytest.mark.parametrize("case", range(2))
def test_opcheck(device, case):
    args = tuple(a.to(device) for a in _opcheck_samples()[case])
    torch.library.opcheck(torch.ops.vattention.combine.default, args)
