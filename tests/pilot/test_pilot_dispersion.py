"""torch.ops.vattention.pilot_dispersion: against the plain (D x D) reference on every device,
fp32/fp16/bf16, GQA-shared and per-head ragged lists; the CUDA kernel against the CPU op; the
NaN rule; argument checks; opcheck."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import (DTYPES, F64, I32, assert_close_scaled, assert_eager_and_fake_name,
                           cuda_only, gen, make_lists, make_qkv, no_sync, qkv, to_cuda,
                           to_device)
from tests.pilot.reference import pilot_dispersion_ref
from vattention import ops


def make_center(batch, q_heads, dim, g):
    return (0.3 * torch.randn(batch, q_heads, dim, generator=g)).float()


def dispersion_on(device, q, k, v, idx, counts, scale, center):
    got = ops.pilot_dispersion(*to_device(device, q, k, v, idx, counts), scale,
                               center.to(device))
    assert got.device.type == torch.device(device).type and got.dtype == torch.float32
    return got.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("per_q_head", [False, True])
def test_pilot_dispersion_matches_reference(device, dtype, dim, group, per_q_head):
    g = torch.Generator().manual_seed(dim + 10 * group + 1000 * per_q_head + DTYPES.index(dtype))
    batch, kv_heads, length = 2, 2, 41
    q_heads = kv_heads * group
    q, k, v = make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g, value_shift=0.3)
    list_heads = q_heads if per_q_head else kv_heads
    idx, _, counts = make_lists(batch, list_heads, 23, length, g)
    center = make_center(batch, q_heads, dim, g)
    scale = 1.0 / math.sqrt(dim)
    got = dispersion_on(device, q, k, v, idx, counts, scale, center)
    ref = pilot_dispersion_ref(q, k, v, idx, counts, scale, center)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.to(F64), ref, rtol=1e-4, atol=1e-5)
    # The diagonal part <= the whole <= (Tr S)^2 (eigenvalues are >= 0).
    assert (got[..., 2] <= got[..., 1] * (1 + 1e-4) + 1e-6).all()
    assert (got[..., 1] <= got[..., 0] ** 2 * (1 + 1e-4) + 1e-6).all()
    empty = (counts == 0).repeat_interleave(q_heads // list_heads, dim=1)
    assert empty.any() and (got[empty] == 0).all()


def test_pilot_dispersion_is_the_centred_terms_spread(device):
    """Shifting the center by c moves every x_i by -w_i c: the spread changes unless all w
    are equal; with one key row (equal logits) the center drops out."""
    g = gen(3)
    q, k, v = make_qkv(1, 2, 1, 30, 64, torch.float32, g, value_shift=0.3)
    k[:] = k[:, :, :1]                                         # every logit equal: w = 1
    idx = torch.arange(30, dtype=I32).view(1, 1, 30)
    counts = torch.tensor([[30]], dtype=I32)
    a = dispersion_on(device, q, k, v, idx, counts, 0.125, make_center(1, 2, 64, g))
    b = dispersion_on(device, q, k, v, idx, counts, 0.125, make_center(1, 2, 64, g))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # ... and then it is the sample covariance of V itself (times p - 1).
    vv = v[0, 0].double()
    cov = (vv - vv.mean(0)).T @ (vv - vv.mean(0))
    fourth = (((vv - vv.mean(0)) ** 2).sum(1) ** 2).sum()
    torch.testing.assert_close(a[0, 0].double(),
                               torch.stack([cov.trace(), (cov ** 2).sum(), fourth]),
                               rtol=1e-4, atol=1e-4)


def test_pilot_dispersion_duplicates_count_once_per_draw(device):
    g = gen(4)
    q, k, v = make_qkv(1, 2, 1, 9, 64, torch.float32, g, value_shift=0.3)
    center = make_center(1, 2, 64, g)
    once = torch.tensor([[[3, 6, 3, 6]]], dtype=I32)
    padded = torch.tensor([[[3, -1, 6, 3, -1, 6]]], dtype=I32)
    a = dispersion_on(device, q, k, v, once, torch.tensor([[4]], dtype=I32), 0.125, center)
    b = dispersion_on(device, q, k, v, padded, torch.tensor([[6]], dtype=I32), 0.125, center)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["q", "key", "value", "center", "unlisted"])
def test_pilot_dispersion_nan_reaches_both_outputs(device, where):
    g = gen(5)
    q, k, v = make_qkv(2, 4, 2, 20, 64, torch.float32, g, value_shift=0.3)
    idx = torch.arange(10, dtype=I32).view(1, 1, 10).repeat(2, 2, 1)
    counts = torch.full((2, 2), 10, dtype=I32)
    center = make_center(2, 4, 64, g)
    poisoned = torch.zeros(2, 4, dtype=torch.bool)
    if where == "q":
        q[1, 2, 5] = math.nan
        poisoned[1, 2] = True
    elif where == "key":
        k[1, 0, 4, 7] = math.nan
        poisoned[1, :2] = True
    elif where == "value":
        v[1, 1, 4, 7] = math.nan
        poisoned[1, 2:] = True
    elif where == "center":
        center[0, 3, 0] = math.nan
        poisoned[0, 3] = True
    else:
        v[0, 0, 15, 3] = math.nan                               # row 15 is in no list
    got = dispersion_on(device, q, k, v, idx, counts, 0.125, center)
    assert torch.equal(torch.isnan(got), poisoned[..., None].expand(-1, -1, 3))


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("per_q_head", [False, True])
def test_pilot_dispersion_cuda_matches_cpu(dtype, dim, per_q_head):
    g = gen(dim + 1000 * per_q_head + DTYPES.index(dtype))
    q, k, v = make_qkv(2, 8, 2, 300, dim, dtype, g, value_shift=0.3)
    center = make_center(2, 8, dim, g)
    for max_count in (17, 128, 700):
        idx, _, counts = make_lists(2, 8 if per_q_head else 2, max_count, 300, g,
                                    garbage_beyond=False)
        ref = ops.pilot_dispersion(q, k, v, idx, counts, 0.125, center)
        args = to_cuda(q, k, v, idx, counts)
        with no_sync():
            got = ops.pilot_dispersion(*args, 0.125, center.cuda())
        assert_close_scaled(got, ref, rtol=1e-3, name="dispersion")


def test_pilot_dispersion_checks_center():
    q, k, v = qkv()
    idx = torch.zeros(2, 2, 5, dtype=I32)
    counts = torch.zeros(2, 2, dtype=I32)
    center = torch.zeros(2, 4, 8)
    for bad, match in ((center.double(), "center must be float32"),
                       (center[:, :3], r"center must be \[batch, q_heads, head_dim\]"),
                       (center.transpose(0, 1).contiguous().transpose(0, 1),
                        "center must be contiguous")):
        with pytest.raises(RuntimeError, match=match):
            ops.pilot_dispersion(q, k, v, idx, counts, 1.0, bad)
    assert_eager_and_fake_name(
        lambda: ops.pilot_dispersion(q[0], k, v, idx, counts, 1.0, center), r"\bq\b")


@pytest.mark.parametrize("case", range(3))
def test_opcheck(device, case):
    g = gen(case)
    dtype, group, per_q, max_count = ((torch.float32, 2, False, 9), (torch.bfloat16, 3, True, 150),
                                      (torch.float16, 1, True, 40))[case]
    q, k, v = make_qkv(2, 2 * group, 2, 200, 64, dtype, g, value_shift=0.3)
    idx, _, counts = make_lists(2, 2 * group if per_q else 2, max_count, 200, g,
                                garbage_beyond=device == "cpu")
    center = make_center(2, 2 * group, 64, g)
    args = tuple(a.to(device) for a in (q, k, v, idx, counts)) + (0.125, center.to(device))
    torch.library.opcheck(torch.ops.vattention.pilot_dispersion.default, args)
