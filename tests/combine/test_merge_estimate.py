"""Op merge_estimate (csrc/vattention/combine.h) against decode's `with stage("combine")`
block that it replaces (copied below as the reference): reuse on / off, lists with
reused == 0, exact lists (enumerated residual, weight 1), the extra exact partial present /
absent, float32 and float64 pilot statistics, NaN in a partial, all-empty partials, GQA
groups 1 / 4, out dtypes float32 / float16 / bfloat16; the sample given as split partials
(sparse_attention_partials' [B, Hq, S, D] / [B, Hq, S]) against the same merge of their
combine; the argument checks and opcheck."""
from __future__ import annotations

import math

import pytest
import torch

from vattention import ops
from tests.helpers import gen

F32, I32, I64 = torch.float32, torch.int32, torch.int64


def _per_head(values, batch, list_heads, q_heads):
    values = values.reshape(batch, list_heads)
    if list_heads == q_heads:
        return values
    return values.repeat_interleave(q_heads // list_heads, dim=1)


def reference(partials, sample_out, sample_lse, sample_counts, reused, pilot_stats,
              n_residual_heads, out_dtype):
    """decode._sample_and_combine's combine block, as it was before the op."""
    batch, q_heads, _ = sample_out.shape
    list_heads = sample_counts.numel() // batch
    partials = list(partials)
    if reused is None:
        partials.append((sample_out, sample_lse))
    else:
        max_logit, moments, vector_moments = pilot_stats
        draws = reused + sample_counts
        log_draws = _per_head(torch.log(draws.clamp(min=1).to(torch.float32)), batch,
                              list_heads, q_heads)
        log_n_r = torch.log(n_residual_heads.to(torch.float32))
        sum_w = moments[..., 0]
        no_pilot = _per_head(reused == 0, batch, list_heads, q_heads)
        pilot_lse = torch.where(no_pilot, torch.full_like(max_logit, -math.inf),
                                max_logit + torch.log(sum_w).to(torch.float32) + log_n_r
                                - log_draws)
        pilot_out = (vector_moments[..., 0, :] / sum_w.clamp(
            min=torch.finfo(sum_w.dtype).tiny)[..., None]).to(torch.float32)
        log_final = _per_head(torch.log(sample_counts.to(torch.float32)), batch,
                              list_heads, q_heads)
        partials += [(pilot_out, pilot_lse), (sample_out, sample_lse + log_final - log_draws)]
    out, lse = ops.combine(torch.stack([o for o, _ in partials]),
                           torch.stack([lse for _, lse in partials]))
    return out.to(out_dtype), lse


def make_inputs(batch, q_heads, list_heads, dim, seed, stats_dtype=F32, device="cpu"):
    g = gen(seed)
    lists = batch * list_heads

    def part():
        out = torch.randn(batch, q_heads, dim, generator=g)
        lse = torch.randn(batch, q_heads, generator=g) * 3
        lse = torch.where(torch.rand(batch, q_heads, generator=g) < 0.15, -math.inf, lse)
        return out, lse

    det, extra, sample = part(), part(), part()
    sample_counts = torch.randint(0, 300, (lists,), generator=g, dtype=I32)
    reused = torch.randint(2, 130, (lists,), generator=g, dtype=I32)
    reused = torch.where(torch.rand(lists, generator=g) < 0.25, 0, reused).to(I32)
    max_logit = torch.randn(batch, q_heads, generator=g) * 2
    count = torch.randint(1, 200, (batch, q_heads), generator=g).to(stats_dtype)
    sum_w = count * torch.rand(batch, q_heads, generator=g, dtype=stats_dtype).clamp(min=0.01)
    moments = torch.stack([sum_w, sum_w * 0.5, sum_w * 0.7], dim=-1)
    vector_moments = torch.randn(batch, q_heads, 2, dim, generator=g, dtype=stats_dtype)
    vector_moments = vector_moments * sum_w[..., None, None]
    n_residual = torch.randint(1, 5000, (batch, q_heads), generator=g, dtype=I64)
    tensors = dict(det=det, extra=extra, sample=sample, sample_counts=sample_counts,
                   reused=reused, max_logit=max_logit, moments=moments,
                   vector_moments=vector_moments, n_residual=n_residual)
    return {k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device))
            for k, v in tensors.items()}


def run_both(x, with_extra, reuse, out_dtype):
    partials = [x["det"]] + ([x["extra"]] if with_extra else [])
    reused = x["reused"] if reuse else None
    ref = reference(partials, *x["sample"], x["sample_counts"], reused,
                    (x["max_logit"], x["moments"], x["vector_moments"]), x["n_residual"],
                    out_dtype)
    got = ops.merge_estimate(*x["det"], x["extra"] if with_extra else None, *x["sample"],
                             x["sample_counts"], reused, x["max_logit"], x["moments"],
                             x["vector_moments"], x["n_residual"], out_dtype)
    return got, ref


def assert_same(got, ref, out_dtype):
    (out, lse), (ref_out, ref_lse) = got, ref
    assert out.dtype == out_dtype and lse.dtype == F32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5, equal_nan=True)
    if out_dtype == F32:
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, equal_nan=True)
    else:
        # The same fp32 value rounded once: at most one ulp of the narrow type apart
        # where the fp32 values straddle a rounding boundary.
        tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
        torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol,
                                   equal_nan=True)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("with_extra", [True, False])
def test_merge_estimate_matches_decode(device, out_dtype, group, reuse, with_extra):
    x = make_inputs(3, 8, 8 // group, 40, seed=group * 10 + reuse, device=device)
    got, ref = run_both(x, with_extra, reuse, out_dtype)
    assert_same(got, ref, out_dtype)
    # Every configuration mixes partials: the merge is not just the deterministic part.
    assert not torch.allclose(got[0].float(), x["det"][0].to(out_dtype).float(), atol=1e-2)


@pytest.mark.parametrize("reuse", [True, False])
def test_merge_estimate_float64_stats(device, reuse):
    """The adaptive path's band-merged statistics are float64."""
    x = make_inputs(2, 8, 2, 24, seed=5, stats_dtype=torch.float64, device=device)
    got, ref = run_both(x, True, reuse, torch.float32)
    assert_same(got, ref, torch.float32)


def test_merge_estimate_exact_and_unused_lists(device):
    """Exact lists (the sampler enumerated the residual: reused 0, weight 1 per draw), lists
    whose sample is empty (count 0) and lists with reused == 0 whose pilot statistics hold
    NaN (never read: the pilot partial is empty there)."""
    x = make_inputs(2, 8, 4, 33, seed=7, device=device)
    reused = x["reused"].clone()
    reused[0] = 0
    reused[1] = 0
    x["sample_counts"][1] = 0
    x["sample_counts"][2] = 0          # a list whose sample is empty, its pilot reused
    x["max_logit"][0, :4] = math.nan   # lists 0 and 1 (heads 0-3): reused == 0
    x["vector_moments"][0, 2, 0, 3] = math.nan
    x["reused"] = reused
    got, ref = run_both(x, False, True, torch.float32)
    assert_same(got, ref, torch.float32)
    assert not torch.isnan(got[0][0, :4]).any() and not torch.isnan(got[1][0, :4]).any()


def test_merge_estimate_nan_and_empty(device):
    """A NaN lse poisons its head, a NaN in a non-empty partial's out reaches its element
    (also the reused pilot's), an empty partial's NaN out is ignored, all-empty gives
    lse -inf and out 0."""
    x = make_inputs(1, 4, 4, 8, seed=9, device=device)
    x["reused"][:] = torch.tensor([3, 3, 3, 3], dtype=I32)
    x["sample_counts"][:] = 5
    det_out, det_lse = x["det"]
    sample_out, sample_lse = x["sample"]
    det_lse[0, :] = 0.5
    sample_lse[0, :] = 0.25
    det_lse[0, 0] = math.nan                                  # head 0: NaN lse
    det_out[0, 1, 2] = math.nan                               # head 1: NaN in out[2]
    x["vector_moments"][0, 2, 0, 5] = math.nan                # head 2: NaN in the pilot
    x["reused"][3] = 0                                        # head 3: every partial empty
    det_lse[0, 3] = -math.inf
    sample_lse[0, 3] = -math.inf
    det_out[0, 3] = math.nan
    sample_out[0, 3] = math.nan
    got, ref = run_both(x, False, True, torch.float32)
    assert_same(got, ref, torch.float32)
    out, lse = got
    assert torch.isnan(lse[0, 0]) and torch.isnan(out[0, 0]).all()
    assert torch.isnan(out[0, 1]).tolist() == [d == 2 for d in range(8)]
    assert torch.isnan(out[0, 2]).tolist() == [d == 5 for d in range(8)]
    assert lse[0, 3] == -math.inf and (out[0, 3] == 0).all()


def split_sample(x, splits, seed, device):
    """x with its sample replaced by `splits` split partials: out [B, Hq, S, D] and lse
    [B, Hq, S], a share of empty splits (lse -inf) whose out is NaN (never read)."""
    g = gen(seed)
    batch, q_heads, dim = x["det"][0].shape
    out = torch.randn(batch, q_heads, splits, dim, generator=g)
    lse = torch.randn(batch, q_heads, splits, generator=g) * 3
    empty = torch.rand(batch, q_heads, splits, generator=g) < 0.3
    lse = torch.where(empty, -math.inf, lse)
    out = torch.where(empty[..., None], math.nan, out)
    lse[0, 0] = -math.inf                       # a head whose sample is all empty
    return out.to(device), lse.to(device)


def merge_with_sample(x, sample, with_extra, reuse, out_dtype):
    return ops.merge_estimate(*x["det"], x["extra"] if with_extra else None, *sample,
                              x["sample_counts"], x["reused"] if reuse else None,
                              x["max_logit"], x["moments"], x["vector_moments"],
                              x["n_residual"], out_dtype)


@pytest.mark.parametrize("splits", [1, 2, 5, 33])
@pytest.mark.parametrize("reuse,with_extra,out_dtype", [(True, True, torch.float32),
                                                        (False, False, torch.bfloat16),
                                                        (True, False, torch.float16)])
def test_merge_estimate_of_split_partials_is_the_merge_of_their_combine(
        device, splits, reuse, with_extra, out_dtype):
    """The sample's splits merged inside merge_estimate (one kernel) give what the merge of
    combine's output gives: bit for bit on the CPU (the same rule, order and arithmetic),
    within rounding on CUDA (combine's warp reduction sums in another order)."""
    x = make_inputs(3, 8, 2, 40, seed=splits + 7 * reuse, device=device)
    out, lse = split_sample(x, splits, splits, device)
    got = merge_with_sample(x, (out, lse), with_extra, reuse, out_dtype)
    merged = ops.combine(out.movedim(2, 0).contiguous(), lse.movedim(2, 0).contiguous())
    ref = merge_with_sample(x, merged, with_extra, reuse, out_dtype)
    assert got[0].shape == (3, 8, 40) and got[1].shape == (3, 8)
    if device.type == "cpu":
        assert torch.equal(got[1].isnan(), ref[1].isnan())
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0, equal_nan=True)
    else:
        assert_same(got, ref, out_dtype)
    assert not torch.isnan(got[0]).any()        # the empty splits' NaN out is never read
    # S = 1: the [B, Hq, 1, D] view is the merged sample itself.
    if splits == 1:
        plain = merge_with_sample(x, (out[:, :, 0], lse[:, :, 0]), with_extra, reuse, out_dtype)
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])


def test_merge_estimate_split_partials_nan(device):
    """A NaN split lse poisons its head; a NaN in a non-empty split's out reaches that
    element only."""
    x = make_inputs(1, 4, 4, 8, seed=11, device=device)
    x["sample_counts"][:] = 5
    out = torch.randn(1, 4, 3, 8, generator=gen(2)).to(device)
    lse = torch.zeros(1, 4, 3, device=device)
    lse[0, 0, 2] = math.nan
    out[0, 1, 1, 6] = math.nan
    got_out, got_lse = merge_with_sample(x, (out, lse), False, True, torch.float32)
    assert torch.isnan(got_lse[0, 0]) and torch.isnan(got_out[0, 0]).all()
    assert not torch.isnan(got_lse[0, 1:]).any()
    assert torch.isnan(got_out[0, 1]).tolist() == [d == 6 for d in range(8)]
    assert not torch.isnan(got_out[0, 2:]).any()


def test_merge_estimate_errors():
    x = make_inputs(2, 4, 2, 8, seed=3)
    det_out, det_lse = x["det"]
    sample_out, sample_lse = x["sample"]
    op = torch.ops.vattention.merge_estimate

    def call(**over):
        args = dict(det_out=det_out, det_lse=det_lse, extra_out=None, extra_lse=None,
                    sample_out=sample_out, sample_lse=sample_lse,
                    sample_counts=x["sample_counts"], reused=x["reused"],
                    pilot_max_logit=x["max_logit"], moments=x["moments"],
                    vector_moments=x["vector_moments"], n_residual_heads=x["n_residual"],
                    out_dtype=torch.float32)
        args.update(over)
        return op(*args.values())

    call()
    with pytest.raises(RuntimeError, match="extra_out and extra_lse go together"):
        call(extra_out=det_out)
    with pytest.raises(RuntimeError, match="sample_lse must have shape"):
        call(sample_lse=sample_lse[:, :2])
    with pytest.raises(RuntimeError, match="sample_counts must hold"):
        call(sample_counts=x["sample_counts"][:3])
    with pytest.raises(RuntimeError, match="reused must be Int"):
        call(reused=x["reused"].long())
    with pytest.raises(RuntimeError, match="vector_moments must be Double"):
        call(moments=x["moments"].double())
    with pytest.raises(RuntimeError, match="n_residual_heads must be Long"):
        call(n_residual_heads=x["n_residual"].int())
    with pytest.raises(RuntimeError, match="out_dtype must be"):
        call(out_dtype=torch.float64)
    with pytest.raises(RuntimeError, match="det_out must be"):
        call(det_out=det_out[0])
    split_out, split_lse = sample_out[:, :, None].expand(-1, -1, 3, -1).contiguous(), \
        sample_lse[:, :, None].expand(-1, -1, 3).contiguous()
    call(sample_out=split_out, sample_lse=split_lse)
    with pytest.raises(RuntimeError, match=r"sample_lse must have shape \[2, 4, 3\]"):
        call(sample_out=split_out)
    with pytest.raises(RuntimeError, match=r"sample_out must be \[batch, q_heads, head_dim\] or"):
        call(sample_out=split_out[None])
    with pytest.raises(RuntimeError, match="sample_out needs at least one split"):
        call(sample_out=split_out[:, :, :0], sample_lse=split_lse[:, :, :0])


@pytest.mark.parametrize("reuse", [True, False])
def test_merge_estimate_opcheck(device, reuse):
    x = make_inputs(2, 4, 2, 8, seed=4, device=device)
    args = (*x["det"], *x["extra"], *x["sample"], x["sample_counts"],
            x["reused"] if reuse else None, x["max_logit"], x["moments"],
            x["vector_moments"], x["n_residual"], torch.bfloat16)
    torch.library.opcheck(torch.ops.vattention.merge_estimate.default, args)
    # The sample as split partials.
    out, lse = split_sample(x, 3, 1, device)
    args = (*x["det"], *x["extra"], out, lse, x["sample_counts"],
            x["reused"] if reuse else None, x["max_logit"], x["moments"],
            x["vector_moments"], x["n_residual"], torch.float32)
    torch.library.opcheck(torch.ops.vattention.merge_estimate.default, args)
