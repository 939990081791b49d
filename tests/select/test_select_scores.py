"""torch.ops.vattention.select_scores against the plain-torch select_scores_torch.

The op computes fp32 dot products of the dtype's exact values, so the tight reference is
select_scores_torch on q and k widened to float32 (same values up to summation order);
against the native-dtype torch composition, which rounds the logits to q's dtype before
the softmax, only a dtype-sized tolerance holds. CUDA cases are skipped without a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import DTYPES, cuda_only
from vattention import ops
from vattention.select import select_scores, select_scores_torch

# |op - torch in q's dtype|: the torch composition rounds q.K to the dtype first.
NATIVE_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 8e-2}


def make_inputs(batch, q_heads, kv_heads, length, dim, dtype, device, seed, lengths=None,
                lengths_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, q_heads, dim, generator=g) * 1.5).to(device, dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(device, dtype)
    if lengths is None:
        lengths = torch.randint(0, length + 1, (batch,), generator=g)
        lengths[0] = length
        if batch > 1:
            lengths[1] = 0
        if batch > 2:
            lengths[2] = min(1, length)
    lengths = torch.as_tensor(lengths).to(device=device, dtype=lengths_dtype)
    return q, k, lengths


def assert_scores_close(got, ref, atol, rtol=1e-5):
    assert got.dtype == torch.float32 and got.shape == ref.shape
    got, ref = got.cpu(), ref.cpu()
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, equal_nan=True)


def reference(q, k, lengths, scale, share):
    """select_scores_torch on the exactly widened inputs, on the CPU."""
    return select_scores_torch(q.cpu().float(), k.cpu().float(), lengths.cpu(), scale, share)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_reference(device, dtype, dim, group, share):
    kv_heads, length = 2, 300
    seed = 100 * dim + 10 * group + int(share) + DTYPES.index(dtype) * 7
    q, k, lengths = make_inputs(4, kv_heads * group, kv_heads, length, dim, dtype, device, seed,
                                lengths_dtype=torch.int64 if seed % 2 else torch.int32)
    scale = 1.0 / math.sqrt(dim)
    got = ops.select_scores(q, k, lengths, scale, share)
    assert got.device == q.device
    assert got.shape == (4, kv_heads if share else kv_heads * group, length)
    assert_scores_close(got, reference(q, k, lengths, scale, share), atol=2e-5)
    assert_scores_close(got, select_scores_torch(q, k, lengths, scale, share).float(),
                        atol=NATIVE_ATOL[dtype], rtol=NATIVE_ATOL[dtype])


@pytest.mark.parametrize("share", [False, True])
def test_lengths_int32_and_int64_agree_and_edges(device, share):
    q, k, _ = make_inputs(5, 8, 2, 40, 64, torch.float32, device, seed=3)
    # 0, 1, the full length, beyond it (all valid) and negative (all masked).
    lengths = [0, 1, 40, 57, -4]
    got64 = ops.select_scores(q, k, torch.tensor(lengths, device=device), 0.2, share)
    got32 = ops.select_scores(q, k, torch.tensor(lengths, dtype=torch.int32, device=device), 0.2,
                              share)
    torch.testing.assert_close(got64, got32, rtol=0, atol=0)
    ref = reference(q, k, torch.tensor(lengths), 0.2, share)
    assert_scores_close(got64, ref, atol=1e-5)
    assert torch.isneginf(got64[0]).all() and torch.isneginf(got64[4]).all()
    assert torch.isfinite(got64[1, :, :1]).all() and torch.isneginf(got64[1, :, 1:]).all()
    assert torch.isfinite(got64[3]).all()


@pytest.mark.parametrize("share", [False, True])
def test_empty_shapes(device, share):
    q, k, lengths = make_inputs(2, 4, 2, 0, 64, torch.bfloat16, device, seed=4, lengths=[0, 0])
    assert ops.select_scores(q, k, lengths, 0.125, share).shape == (2, 2 if share else 4, 0)
    q, k, lengths = make_inputs(0, 4, 2, 10, 64, torch.float16, device, seed=5, lengths=[])
    assert ops.select_scores(q, k, lengths, 0.125, share).shape == (0, 2 if share else 4, 10)


@pytest.mark.parametrize("share", [False, True])
def test_strided_views(device, share):
    """q heads with padding between them; k a view of a [B, N, Hkv, D] cache."""
    g = torch.Generator().manual_seed(6)
    batch, q_heads, kv_heads, length, dim = 3, 8, 2, 130, 128
    q = torch.randn(batch, q_heads, dim + 16, generator=g).to(device, torch.bfloat16)
    q = q[..., 5:5 + dim]
    cache = torch.randn(batch, length + 3, kv_heads, dim, generator=g).to(device, torch.bfloat16)
    k = cache[:, 2:2 + length].transpose(1, 2)
    assert not k.is_contiguous() and not q.is_contiguous()
    lengths = torch.tensor([130, 64, 3], device=device)
    got = ops.select_scores(q, k, lengths, 0.09, share)
    assert_scores_close(got, reference(q, k, lengths, 0.09, share), atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("share", [False, True])
def test_nan_and_infinite_logits_follow_the_torch_reference(device, dtype, share):
    """A NaN or +-inf logit makes its head's logsumexp non-finite: torch uses 0 instead,
    and a NaN propagates through the max over the group."""
    q, k, lengths = make_inputs(3, 8, 2, 50, 64, dtype, device, seed=7, lengths=[50, 50, 20])
    q[:, :, 0] = 1.0
    k[0, 0, 7, 3] = float("nan")          # NaN logits at position 7 of group (0, 0)
    k[1, 1, 11, 0] = float("inf")         # +inf logits (q[..., 0] = 1) at position 11
    k[2, 0, 30, 0] = float("nan")         # beyond the length: never read
    got = ops.select_scores(q, k, lengths, 0.125, share)
    ref = reference(q, k, lengths, 0.125, share)
    assert_scores_close(got, ref, atol=2e-5)
    assert torch.isnan(got[0, 0, 7]).all()
    assert not torch.isnan(got[2]).any()


def test_oracle_scores_runs_the_op_and_keeps_the_torch_fallback(monkeypatch):
    q, k, lengths = make_inputs(2, 4, 2, 30, 64, torch.float32, "cpu", seed=8)
    calls = []
    real = ops.select_scores

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "select_scores", spy)
    for share in (False, True):
        torch.testing.assert_close(select_scores(q, k, lengths, 0.125, share),
                                   real(q, k, lengths, 0.125, share), rtol=0, atol=0)
    assert len(calls) == 2
    # A head_dim that is not contiguous is not the op's layout: the torch path serves it.
    k_strided = torch.randn(2, 2, 30, 128)[..., ::2]
    got = select_scores(q, k_strided, lengths, 0.125, True)
    assert len(calls) == 2
    torch.testing.assert_close(got, select_scores_torch(q, k_strided, lengths, 0.125, True))


def test_argument_errors():
    q, k, lengths = make_inputs(2, 4, 2, 10, 64, torch.float32, "cpu", seed=9)
    with pytest.raises(RuntimeError, match="lengths must be int64 or int32"):
        ops.select_scores(q, k, lengths.float(), 0.1, True)
    with pytest.raises(RuntimeError, match="lengths must have shape"):
        ops.select_scores(q, k, lengths[:1], 0.1, True)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.select_scores(q, k.half(), lengths, 0.1, True)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        ops.select_scores(q[:, :3], k, lengths, 0.1, False)
    with pytest.raises(RuntimeError, match="head_dim"):
        ops.select_scores(q[..., :32], k, lengths, 0.1, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.select_scores(q, torch.randn(2, 2, 10, 128)[..., ::2], lengths, 0.1, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.select_scores(q.double(), k.double(), lengths, 0.1, False)


def _opcheck_samples(device):
    samples = []
    for dtype, group, share, ldt in ((torch.float32, 2, True, torch.int64),
                                     (torch.bfloat16, 3, False, torch.int32),
                                     (torch.float16, 4, True, torch.int32)):
        q, k, lengths = make_inputs(3, 2 * group, 2, 20, 64, dtype, device, seed=group,
                                    lengths_dtype=ldt)
        samples.append((q, k, lengths, 0.125, share))
    return samples


@pytest.mark.parametrize("case", range(3))
def test_opcheck(device, case):
    torch.library.opcheck(torch.ops.vattention.select_scores.default,
                          _opcheck_samples(device)[case])


def test_compile_fullgraph():
    torch._dynamo.reset()
    q, k, lengths = make_inputs(2, 8, 2, 64, 64, torch.float32, "cpu", seed=10)

    def scores(q, k, lengths):
        return select_scores(q, k, lengths, 0.125, True) + 1.0

    expected = scores(q, k, lengths)
    got = torch.compile(scores, fullgraph=True, backend="aot_eager")(q, k, lengths)
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------------------
# CUDA only
# --------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_op_long_context_and_wide_groups(dtype, share):
    """Many tiles and splits per list, a group wider than one block (12 heads), ragged rows."""
    for batch, q_heads, kv_heads, length, dim in ((2, 8, 2, 20000, 128), (3, 12, 1, 3000, 64),
                                                  (1, 6, 2, 5000, 256)):
        q, k, lengths = make_inputs(batch, q_heads, kv_heads, length, dim, dtype, "cpu",
                                    seed=length + dim)
        cpu = ops.select_scores(q, k, lengths, 0.1, share)
        got = ops.select_scores(q.cuda(), k.cuda(), lengths.cuda(), 0.1, share)
        assert_scores_close(got, cpu, atol=5e-5, rtol=1e-5)


@cuda_only
@pytest.mark.parametrize("share", [False, True])
def test_cuda_unaligned_rows(share):
    """K rows that are not 16-byte aligned (odd storage offset and row stride)."""
    g = torch.Generator().manual_seed(11)
    batch, kv_heads, length, dim = 2, 2, 333, 128
    flat = torch.randn(batch * kv_heads * length * (dim + 1) + 1, generator=g).half()
    k = flat[1:].view(batch, kv_heads, length, dim + 1)[..., :dim]
    q = torch.randn(batch, 8, dim, generator=g).half()
    lengths = torch.tensor([333, 100])
    cpu = ops.select_scores(q, k, lengths, 0.1, share)
    got = ops.select_scores(q.cuda(), k.cuda(), lengths.cuda(), 0.1, share)
    assert_scores_close(got, cpu, atol=5e-5)


@cuda_only
@pytest.mark.parametrize("share", [False, True])
def test_cuda_runs_without_host_sync_and_replays_in_a_graph(share):
    q, k, lengths = make_inputs(2, 8, 2, 4000, 128, torch.bfloat16, "cuda", seed=12)
    cpu = ops.select_scores(q.cpu(), k.cpu(), lengths.cpu(), 0.1, share)
    assert_scores_close(ops.select_scores(q, k, lengths, 0.1, share), cpu, atol=5e-5)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")   # any synchronising call raises
    try:
        ops.select_scores(q, k, lengths, 0.1, share)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.select_scores(q, k, lengths, 0.1, share)   # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.select_scores(q, k, lengths, 0.1, share)
    # New inputs in the captured buffers: the replay sees them.
    fresh_q, fresh_k, _ = make_inputs(2, 8, 2, 4000, 128, torch.bfloat16, "cuda", seed=13)
    q.copy_(fresh_q)
    k.copy_(fresh_k)
    lengths.copy_(torch.tensor([4000, 17]))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ops.select_scores(q, k, lengths, 0.1, share), rtol=0, atol=0)
    assert torch.isneginf(out[1, :, 17:]).all()


@cuda_only
def test_cuda_rejects_unsupported_head_dim_and_oracle_falls_back():
    q, k, lengths = make_inputs(2, 4, 2, 30, 96, torch.float16, "cuda", seed=14)
    with pytest.raises(RuntimeError, match="head_dim 64, 128 or 256"):
        ops.select_scores(q, k, lengths, 0.1, True)
    got = select_scores(q, k, lengths, 0.1, True)
    torch.testing.assert_close(got, select_scores_torch(q, k, lengths, 0.1, True))
