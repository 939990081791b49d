"""The int4 key summary (csrc/vattention/key_summary.h): summarize_keys against the plain
torch reference byte for byte, select_scores_summary against the torch composition on the
dequantised keys, argument errors, opcheck, decode with selector "int4" against the float64
reference, and stats["relative_bytes"] against a hand count."""
from __future__ import annotations

import math

import pytest
import torch

import vattention
from tests.helpers import DTYPES
from vattention import VAttentionConfig, _C, ops, reference
from vattention.key_summary import (KeySummary, build_key_summary, dequantize_torch,
                                    empty_key_summary, summarize_keys_torch,
                                    summary_bytes_per_token, update_key_summary)
from vattention.select import select_scores, select_scores_torch

I64 = torch.int64


def special_keys(batch, heads, length, dim, dtype, seed):
    """Random keys over several magnitudes, with the groups the rounding must get right: a
    constant group (step 0), a NaN row, an inf, a tiny range (subnormal fp16 step) and a huge
    one (fp16 overflow of the zero)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, heads, length, dim, generator=g)
    k = k * torch.exp2(torch.randint(-6, 7, (batch, heads, length, 1), generator=g).float())
    k[0, 0, 1, :32] = 0.75                               # constant group: step 0, codes 0
    k[0, 0, 2] = torch.randn(dim, generator=g) * 1e-6     # steps below fp16's normal range
    k[0, -1, 3, 5] = float("nan")                         # a NaN: that group's z and s
    k[-1, 0, 4, 7] = float("inf")
    if dtype != torch.float16:
        k[-1, -1, 5, 9] = -1e6                            # beyond fp16: the zero becomes -inf
    k[-1, 0, 6, 32 % dim:] = -2.0                        # constant from channel 32 on
    return k.to(dtype)


def assert_same_summary(got: KeySummary, want: KeySummary):
    assert got.codes.dtype == torch.uint8 and got.params.dtype == torch.float16
    assert torch.equal(got.codes.cpu(), want.codes.cpu())
    a, b = got.params.cpu(), want.params.cpu()
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    assert torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])


@pytest.mark.parametrize("dim", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_summarize_keys_matches_torch_bit_exact(device, dtype, dim):
    k = special_keys(2, 3, 37, dim, dtype, seed=dim + DTYPES.index(dtype))
    got = build_key_summary(k.to(device))
    want = summarize_keys_torch(k)
    assert_same_summary(got, want)
    # The cases above are really there.
    assert (want.params[0, 0, 1, 0, 1] == 0).item() and (want.codes[0, 0, 1, :16] == 0).all()
    assert torch.isnan(want.params[0, -1, 3, 0]).all()
    assert (want.params[0, 0, 2, :, 1].abs() < 2.0 ** -14).all()
    assert (want.codes > 15).any()  # both nibbles in use
    # Dequantised keys are within half a step of the keys (finite groups).
    k32 = k.float().reshape(2, 3, 37, dim // 32, 32)
    err = (dequantize_torch(want).reshape_as(k32) - k32).abs()
    step = want.params[..., 1].float()[..., None]
    finite = torch.isfinite(k32).all(-1, keepdim=True) & (want.params.isfinite().all(-1))[..., None]
    finite &= step > 2.0 ** -14
    assert bool((err[finite.expand_as(err)] <= (0.5 * step * 1.001 + 1e-30).expand_as(err)[
        finite.expand_as(err)]).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_writes_only_the_rows_inside_the_summary(device, dtype):
    batch, heads, length, dim = 4, 2, 40, 64
    k = special_keys(batch, heads, length, dim, dtype, seed=3)
    k_new = special_keys(batch, heads, 7, dim, dtype, seed=4)
    row_begin = torch.tensor([35, 38, 0, 40], dtype=I64)   # last rows, beyond, first, all beyond
    summary = build_key_summary(k.to(device))
    update_key_summary(summary, k_new.to(device), row_begin.to(device))
    want = summarize_keys_torch(k)
    fresh = summarize_keys_torch(k_new)
    for b, begin in enumerate(row_begin.tolist()):
        for r in range(7):
            if begin + r < length:
                want.codes[b, :, begin + r] = fresh.codes[b, :, r]
                want.params[b, :, begin + r] = fresh.params[b, :, r]
    assert_same_summary(summary, want)
    # The torch fallback writes the same bytes.
    fallback = summarize_keys_torch(k)
    from vattention.key_summary import _update_torch
    _update_torch(fallback, k_new, row_begin)
    assert_same_summary(fallback, want)


def test_summarize_strided_cache_and_int_row_begin(device):
    # A view into a larger cache (row and head strides not those of a compact tensor).
    cache = torch.randn(2, 3, 50, 2, 64)[..., 1, :].to(device)
    summary = empty_key_summary(2, 3, 60, 64, device=device)
    summary.codes.zero_()
    summary.params.zero_()
    update_key_summary(summary, cache, 10)
    want = summarize_keys_torch(cache.cpu())
    assert_same_summary(KeySummary(summary.codes[:, :, 10:], summary.params[:, :, 10:]), want)
    assert not summary.codes[:, :, :10].any() and not summary.params[:, :, :10].any()


def scores_inputs(batch, q_heads, kv_heads, length, dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, q_heads, dim, generator=g) * 1.5).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    lengths = torch.randint(0, length + 1, (batch,), generator=g)
    lengths[0], lengths[-1] = length, 0
    return q.to(device), k.to(device), lengths.to(device)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dim", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_scores_summary_matches_torch_composition(device, dtype, dim, group, share):
    device = torch.device(device)
    q, k, lengths = scores_inputs(3, 2 * group, 2, 150, dim, dtype, device, seed=dim + group)
    summary = build_key_summary(k)
    # The python entry point: the op where it takes the inputs (CUDA: head dims
    # _C.cuda_head_dims), else the torch composition.
    got = select_scores(q, k, lengths, 0.2, share, selector="int4", key_summary=summary)
    if device.type == "cpu" or dim in _C.cuda_head_dims:
        op = ops.select_scores_summary(q, summary.codes, summary.params, lengths, 0.2, share)
        assert torch.equal(op, got)
    ref = select_scores_torch(q.cpu().float(), dequantize_torch(summary).cpu(), lengths.cpu(),
                              0.2, share)
    assert got.shape == ref.shape and got.dtype == torch.float32
    got = got.cpu()
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-5)
    # Without a summary, one is built from k.
    built = select_scores(q, k, lengths, 0.2, share, selector="int4")
    assert torch.equal(built.cpu(), got)
    # The summary's scores are not the oracle's (the test could not pass by reading K).
    oracle = select_scores(q, k, lengths, 0.2, share).cpu()
    finite = torch.isfinite(oracle)
    assert (oracle[finite] - got[finite]).abs().max() > 1e-3


@pytest.mark.parametrize("share", [False, True])
def test_select_scores_summary_nan_row_scores_nan(device, share):
    q, k, lengths = scores_inputs(2, 4, 2, 30, 64, torch.float32, device, seed=9)
    k[0, 1, 7, 40] = float("nan")
    summary = build_key_summary(k)
    got = ops.select_scores_summary(q, summary.codes, summary.params, lengths, 0.2, share).cpu()
    heads = slice(1, 2) if share else slice(2, 4)
    assert torch.isnan(got[0, heads, 7]).all()
    assert torch.isnan(got).sum() == (1 if share else 2)
    # The fallback composition agrees on where the NaN is.
    ref = select_scores_torch(q.cpu().float(), dequantize_torch(summary).cpu(), lengths.cpu(),
                              0.2, share)
    assert torch.equal(torch.isnan(ref), torch.isnan(got))


def test_select_scores_fallback_for_unsupported_inputs():
    # float64 q: no kernel; the torch composition on the dequantised keys answers.
    q, k, lengths = scores_inputs(2, 4, 2, 30, 64, torch.float32, "cpu", seed=2)
    summary = build_key_summary(k)
    got = select_scores(q.double(), k.double(), lengths, 0.2, True, "int4", summary)
    ref = ops.select_scores_summary(q, summary.codes, summary.params, lengths, 0.2, True)
    torch.testing.assert_close(got.float(), ref, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="selector must be one of"):
        select_scores(q, k, lengths, 0.2, True, "int5")


# --------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------


def summarize_args():
    k = torch.randn(2, 3, 5, 64)
    return dict(k=k, codes=torch.zeros(2, 3, 8, 32, dtype=torch.uint8),
                params=torch.zeros(2, 3, 8, 2, 2, dtype=torch.float16),
                row_begin=torch.zeros(2, dtype=I64))


SUMMARIZE_CASES = [
    ("k_rank", lambda a: a.update(k=a["k"][0]), r"\bk must be \[batch, kv_heads, rows, head_dim\]"),
    ("k_dtype", lambda a: a.update(k=a["k"].double()), r"\bk must be float32, float16 or bfloat16"),
    ("k_stride", lambda a: a.update(k=torch.randn(2, 3, 64, 5).transpose(2, 3)),
     r"head_dim of k must be contiguous"),
    ("head_dim", lambda a: a.update(k=torch.randn(2, 3, 5, 48)), r"multiple of 32, got 48"),
    ("codes_dtype", lambda a: a.update(codes=a["codes"].to(torch.int8)), r"\bcodes must be uint8"),
    ("codes_shape", lambda a: a.update(codes=torch.zeros(2, 3, 8, 64, dtype=torch.uint8)),
     r"\bcodes must be \[batch, kv_heads, length, head_dim / 2\] = \[2, 3, N, 32\]"),
    ("codes_heads", lambda a: a.update(codes=torch.zeros(2, 2, 8, 32, dtype=torch.uint8)),
     r"\bcodes must be \[batch"),
    ("codes_stride", lambda a: a.update(codes=torch.zeros(2, 3, 8, 64, dtype=torch.uint8)[..., ::2]),
     r"\bcodes must be contiguous"),
    ("params_dtype", lambda a: a.update(params=a["params"].float()), r"\bparams must be float16"),
    ("params_shape", lambda a: a.update(params=torch.zeros(2, 3, 7, 2, 2, dtype=torch.float16)),
     r"\bparams must be \[batch, kv_heads, length, head_dim / 32, 2\] = \[2, 3, 8, 2, 2\]"),
    ("params_stride", lambda a: a.update(
        params=torch.zeros(2, 3, 8, 2, 4, dtype=torch.float16)[..., ::2]),
     r"\bparams must be contiguous per token"),
    ("row_begin_dtype", lambda a: a.update(row_begin=torch.zeros(2, dtype=torch.int32)),
     r"\brow_begin must be int64"),
    ("row_begin_shape", lambda a: a.update(row_begin=torch.zeros(3, dtype=I64)),
     r"\brow_begin must have shape \[2\]"),
    ("row_begin_negative", lambda a: a["row_begin"].__setitem__(1, -1),
     r"\brow_begin must be >= 0, got -1"),
]


@pytest.mark.parametrize("case,mutate,match", SUMMARIZE_CASES, ids=[c[0] for c in SUMMARIZE_CASES])
def test_summarize_keys_rejects_bad_arguments(case, mutate, match):
    args = summarize_args()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.summarize_keys(**args)


def scores_args():
    q, k, lengths = scores_inputs(2, 4, 2, 8, 64, torch.float32, "cpu", seed=1)
    s = build_key_summary(k)
    return dict(q=q, codes=s.codes, params=s.params, lengths=lengths, scale=0.1, share_gqa=True)


SCORES_CASES = [
    ("q_rank", lambda a: a.update(q=a["q"][0]), r"\bq must be \[batch, q_heads, head_dim\]"),
    ("q_dtype", lambda a: a.update(q=a["q"].double()), r"\bq must be float32, float16 or bfloat16"),
    ("gqa", lambda a: a.update(q=torch.randn(2, 3, 64)),
     r"q_heads \(3\) must be a positive multiple of kv_heads \(2\)"),
    ("head_dim", lambda a: a.update(q=torch.randn(2, 4, 48)), r"multiple of 32, got 48"),
    ("head_dim_mismatch", lambda a: a.update(q=torch.randn(2, 4, 128)), r"\bcodes must be \[batch"),
    ("batch", lambda a: a.update(q=torch.randn(3, 4, 64)), r"\bcodes must be \[batch"),
    ("codes_rank", lambda a: a.update(codes=a["codes"][0]), r"\bcodes must be \[batch"),
    ("params_length", lambda a: a.update(params=a["params"][:, :, :7]), r"\bparams must be \[batch"),
    ("lengths_dtype", lambda a: a.update(lengths=a["lengths"].float()), r"\blengths must be int64 or int32"),
    ("lengths_shape", lambda a: a.update(lengths=torch.zeros(3, dtype=I64)), r"\blengths must have shape \[2\]"),
]


@pytest.mark.parametrize("case,mutate,match", SCORES_CASES, ids=[c[0] for c in SCORES_CASES])
def test_select_scores_summary_rejects_bad_arguments(case, mutate, match):
    args = scores_args()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.select_scores_summary(**args)


def test_python_entry_points_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"multiple of 32, got 40"):
        build_key_summary(torch.randn(1, 2, 5, 40))
    with pytest.raises(ValueError, match=r"\bk must be a floating-point tensor"):
        build_key_summary(torch.zeros(1, 2, 5, 64, dtype=torch.int32))
    summary = build_key_summary(torch.randn(2, 2, 5, 64))
    with pytest.raises(ValueError, match=r"\brow_begin must be an int64 tensor \[2\]"):
        update_key_summary(summary, torch.randn(2, 2, 1, 64), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\brow_begin must be an int >= 0"):
        update_key_summary(summary, torch.randn(2, 2, 1, 64), -1)
    with pytest.raises(ValueError, match=r"\bsummary.codes must have shape"):
        update_key_summary(summary, torch.randn(2, 3, 1, 64), 0)
    with pytest.raises(ValueError, match=r"selector must be one of \('oracle', 'int4', "
                                         r"'int3_channel'\)"):
        VAttentionConfig(selector="int5")
    q, k, v = torch.randn(2, 4, 64), torch.randn(2, 2, 5, 64), torch.randn(2, 2, 5, 64)
    cfg = VAttentionConfig(selector="int4", heavy=2, sink=1, local=1)
    with pytest.raises(ValueError, match=r"\bkey_summary.codes must have shape \(2, 2, 5, 32\)"):
        vattention.decode(q, k, v, cfg, key_summary=build_key_summary(torch.randn(2, 2, 6, 64)))
    with pytest.raises(TypeError, match=r"\bkey_summary must be a"):
        vattention.decode(q, k, v, cfg, key_summary=(summary.codes, summary.params))


@pytest.mark.parametrize("case", range(3))
def test_opcheck(device, case):
    dtype, group, share = ((torch.float32, 2, True), (torch.bfloat16, 3, False),
                           (torch.float16, 1, True))[case]
    q, k, lengths = scores_inputs(3, 2 * group, 2, 20, 64, dtype, device, seed=case)
    summary = build_key_summary(k)
    torch.library.opcheck(torch.ops.vattention.select_scores_summary.default,
                          (q, summary.codes, summary.params, lengths, 0.125, share))
    fresh = empty_key_summary(3, 2, 24, 64, device=device)
    fresh.codes.zero_()
    fresh.params.zero_()
    torch.library.opcheck(torch.ops.vattention.summarize_keys.default,
                          (k, fresh.codes, fresh.params,
                           torch.tensor([0, 4, 10], dtype=I64, device=device)))


# --------------------------------------------------------------------------------------
# decode with selector "int4"
# --------------------------------------------------------------------------------------


def decode_inputs(batch, q_heads, kv_heads, length, dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, dim, generator=g) * 1.5
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g) + 0.5
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


@pytest.mark.parametrize("share", [True, False])
def test_decode_int4_matches_reference(device, share):
    q, k, v = decode_inputs(2, 8, 2, 2000, 64, torch.float32, device, seed=13)
    lengths = [2000, 1300]
    cfg = VAttentionConfig(sink=4, local=8, heavy=0.05, epsilon=0.2, delta=0.2,
                           selector="int4", share_gqa=share)
    out, stats = vattention.decode(q, k, v, cfg, seq_lens=torch.tensor(lengths), seed=3,
                                   return_stats=True)
    summary = build_key_summary(k)
    again = vattention.decode(q, k, v, cfg, seq_lens=torch.tensor(lengths), seed=3,
                              key_summary=summary)
    assert torch.equal(again, out)
    # Unaided, the reference picks the same heavy sets from its own float64 scores of the
    # dequantised keys, and they are not the oracle's.
    expected, traces = reference.decode(q.cpu(), k.cpu(), v.cpu(), cfg, seq_lens=lengths,
                                        seed=3, return_trace=True)
    _, oracle_traces = reference.decode(q.cpu(), k.cpu(), v.cpu(), cfg.replace(selector="oracle"),
                                        seq_lens=lengths, seed=3, return_trace=True)
    heavy = stats["heavy_indices"].cpu()
    differs = 0
    for b, row in enumerate(traces):
        for lst, trace in enumerate(row):
            fast = sorted(int(i) for i in heavy[b, lst] if i >= 0)
            assert fast == trace.heavy, (b, lst)
            differs += trace.heavy != oracle_traces[b][lst].heavy
    assert differs > 0
    # Same heavy set and pilot: the same budget and estimate (up to float32).
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# relative bytes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("selector", ["oracle", "int4", "int3_channel"])
def test_relative_bytes_is_a_hand_count(device, selector, share):
    batch, q_heads, kv_heads, length, dim = 2, 4, 2, 400, 64
    group = q_heads // kv_heads
    q, k, v = decode_inputs(batch, q_heads, kv_heads, length, dim, torch.float16, device, seed=2)
    lengths = [400, 150]
    cfg = VAttentionConfig(sink=3, local=5, heavy=10, base_rate=0.1, epsilon=0.3, delta=0.3,
                           selector=selector, share_gqa=share)
    _, stats = vattention.decode(q, k, v, cfg, seq_lens=torch.tensor(lengths), seed=1,
                                 return_stats=True)
    got = stats["relative_bytes"].cpu()
    assert got.shape == (batch, q_heads) and got.dtype == torch.float32
    pilot, budget = stats["pilot"].cpu(), stats["budget"].cpu()
    exact = stats["exact"].cpu()
    assert not exact.all()  # a sampled step, or the count proves little
    row_bytes = 2 * dim * 2                                   # K and V of one fp16 row
    def selector_bytes(n):
        if selector == "oracle":
            return n * dim * 2
        if selector == "int4":
            return n * (dim // 2 + 4 * (dim // 32))
        # 3-bit codes per token, an fp16 zero and step per channel of each 64-token block.
        return n * 3 * dim // 8 + math.ceil(n / 64) * dim * 4
    for b, n in enumerate(lengths):
        for kv in range(kv_heads):
            heads = range(kv * group, (kv + 1) * group)
            # Every list: sink + local + heavy rows attended, then its pilot and its sample
            # (with reuse_pilot, the default, stats["budget"] counts the pilot's draws too
            # unless exact, and the final sample drew the rest; the pilot's rows load once).
            final = [int(budget[b, h]) - (int(pilot[b, h]) if cfg.reuse_pilot
                                          and not bool(exact[b, h]) else 0) for h in heads]
            per_list = [3 + 5 + 10 + int(pilot[b, h]) + f for h, f in zip(heads, final)]
            rows = per_list[0] if share else sum(per_list)
            want = (selector_bytes(n) + rows * row_bytes) / (n * row_bytes)
            for h in heads:
                assert got[b, h].item() == pytest.approx(want, rel=1e-6), (b, h)
    # The int4 summary costs 20 / 128 of a row where the oracle reads half of it.
    assert summary_bytes_per_token(dim) == 40


def test_relative_bytes_without_a_selector_and_for_empty_rows():
    q, k, v = decode_inputs(2, 2, 1, 100, 32, torch.float32, "cpu", seed=4)
    cfg = VAttentionConfig(sink=10, local=10, heavy=0, base_rate=1.0)
    _, stats = vattention.decode(q, k, v, cfg, seq_lens=torch.tensor([100, 0]), seed=0,
                                 return_stats=True)
    # heavy 0: no scoring; base_rate 1: the pilot enumerates the residual of 80 rows, and
    # the sample reads it again.
    got = stats["relative_bytes"]
    assert got[0].tolist() == pytest.approx([(20 + 80 + 80) / 100] * 2)
    assert got[1].tolist() == [0.0, 0.0]


def test_compile_fullgraph_build_update_and_decode():
    # Build, update (a mutating op) and an int4 decode step trace into one graph.
    torch._dynamo.reset()
    q, k, v = decode_inputs(2, 4, 2, 300, 64, torch.float32, "cpu", seed=8)
    k_new = torch.randn(2, 2, 1, 64)
    cfg = VAttentionConfig(sink=4, local=8, heavy=0.05, base_rate=0.1, selector="int4")

    def step(q, k, v, k_new, row_begin):
        summary = build_key_summary(k)
        update_key_summary(summary, k_new, row_begin)
        return vattention.decode(q, k, v, cfg, seed=1234, key_summary=summary), summary.codes

    row_begin = torch.tensor([299, 100], dtype=I64)
    expected = step(q, k, v, k_new, row_begin)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, k_new, row_begin)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


# --------------------------------------------------------------------------------------
# int3_channel: 3-bit codes, a zero and a step per channel and block of 64 tokens
# --------------------------------------------------------------------------------------


def channel_reference(k, lengths=None):
    """Per (batch, head, block, channel), straight from the docstring: the dequantised keys
    [B, H, N, D] and the codes [B, H, N, D] (uint8 0..7), float32 arithmetic, fp16 params."""
    batch, heads, length, dim = k.shape
    x = k.float()
    keys = torch.zeros(batch, heads, length, dim)
    codes = torch.zeros(batch, heads, length, dim, dtype=torch.uint8)
    for b in range(batch):
        n = length if lengths is None else int(lengths[b])
        for start in range(0, n, 64):
            rows = x[b, :, start:min(start + 64, n)]                      # [H, r, D]
            zero = rows.amin(dim=1, keepdim=True).half().float()
            step = ((rows.amax(dim=1, keepdim=True) - zero) / 7).half().float()
            level = torch.where(step == 0, torch.zeros_like(rows), torch.round((rows - zero) / step))
            level = torch.nan_to_num(level, nan=0.0).clamp(0, 7)
            codes[b, :, start:start + rows.shape[1]] = level.to(torch.uint8)
            keys[b, :, start:start + rows.shape[1]] = zero + step * level
    return keys, codes


def unpack_channel_codes(packed, dim):
    out = torch.zeros(*packed.shape[:-1], dim, dtype=torch.uint8)
    for d in range(dim):
        low = (packed[..., d // 4] >> (2 * (d % 4))) & 3
        high = (packed[..., dim // 4 + d // 8] >> (d % 8)) & 1
        out[..., d] = low | (high << 2)
    return out


def channel_keys(batch, heads, length, dim, dtype, seed):
    # Outlier channels: per-channel offsets and ranges over several magnitudes.
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, heads, length, dim, generator=g)
    k = k * torch.exp2(torch.randint(-4, 5, (1, heads, 1, dim), generator=g).float())
    k = k + 8 * torch.randn(1, heads, 1, dim, generator=g)
    k[0, 0, :, 3] = 0.5                                   # a constant channel: step 0
    return k.to(dtype)


@pytest.mark.parametrize("dim", [8, 64, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int3_channel_summary_matches_plain_reference(dtype, dim):
    k = channel_keys(2, 3, 150, dim, dtype, seed=dim)
    lengths = torch.tensor([150, 70])
    summary = build_key_summary(k, "int3_channel", lengths)
    assert summary.format == "int3_channel" and summary.head_dim == dim
    assert summary.codes.shape == (2, 3, 150, 3 * dim // 8)
    assert summary.params.shape == (2, 3, 3, dim, 2) and summary.params.dtype == torch.float16
    keys, codes = channel_reference(k, lengths)
    got_codes = unpack_channel_codes(summary.codes, dim)
    assert torch.equal(got_codes[0], codes[0]) and torch.equal(got_codes[1, :, :70], codes[1, :, :70])
    assert not got_codes[1, :, 70:].any()                 # beyond the length: codes 0
    deq = dequantize_torch(summary)
    assert torch.equal(deq[0], keys[0]) and torch.equal(deq[1, :, :70], keys[1, :, :70])
    assert set(codes.unique().tolist()) == set(range(8))  # both planes, every level in use
    assert (summary.params[0, 0, :, 3, 1] == 0).all()     # the constant channel
    # Row 70 of batch row 1 lies beyond its length: it does not move that block's range.
    bumped = k.clone()
    bumped[1, :, 70:] = 1e4
    again = build_key_summary(bumped, "int3_channel", lengths)
    assert torch.equal(again.params[1, :, :2], summary.params[1, :, :2])
    # Bytes: 3 D / 8 codes and D / 16 of block parameters per token (0.109 of bf16 K+V).
    assert summary.bytes_per_token == 3 * dim / 8 + dim / 16
    assert summary_bytes_per_token(dim, "int3_channel") / (4 * dim) == pytest.approx(0.109375)


def test_int3_channel_update_is_a_rebuild_of_the_cache():
    # Decode appends a token at a time (and some rows a chunk at once); after each append
    # the summary is byte-equal to a rebuild of the cache's rows so far.
    batch, heads, dim, total = 3, 2, 64, 200
    cache = channel_keys(batch, heads, total, dim, torch.float32, seed=5)
    summary = empty_key_summary(batch, heads, 230, dim, format="int3_channel")
    update_key_summary(summary, cache[:, :, :100], 0, k_cache=cache[:, :, :100])
    ends = torch.tensor([100, 100, 100], dtype=I64)
    for step in range(40):
        grow = torch.tensor([1, 3, 0], dtype=I64) if step % 2 else torch.tensor([1, 1, 1])
        width = int(grow.max())
        # k_new: each row's new keys at its own position (a fixed-size cache).
        k_new = torch.stack([cache[b, :, int(ends[b]):int(ends[b]) + width] for b in range(batch)])
        update_key_summary(summary, k_new, ends.clone(), k_cache=cache)
        ends = ends + width
        for b in range(batch):
            n = int(ends[b])
            fresh = build_key_summary(cache[b:b + 1, :, :n], "int3_channel")
            assert torch.equal(summary.codes[b:b + 1, :, :n], fresh.codes), (step, b)
            assert torch.equal(summary.params[b:b + 1, :, :fresh.params.shape[2]], fresh.params)
    # Rows beyond the summary's length are skipped.
    update_key_summary(summary, cache[:, :, :5], 228, k_cache=torch.cat([cache, cache], 2))
    with pytest.raises(ValueError, match="k_cache"):
        update_key_summary(summary, cache[:, :, :1], 10)
    with pytest.raises(ValueError, match="format"):
        build_key_summary(cache, "int2")


@pytest.mark.parametrize("share", [False, True])
def test_int3_channel_scores_are_those_of_its_keys(share):
    q, k, lengths = scores_inputs(3, 4, 2, 300, 64, torch.float32, "cpu", seed=21)
    k = k + 4 * torch.randn(1, 2, 1, 64)
    summary = build_key_summary(k, "int3_channel", lengths)
    got = select_scores(q, k, lengths, 0.2, share, selector="int3_channel", key_summary=summary)
    keys, _ = channel_reference(k, lengths)
    want = select_scores_torch(q, keys, lengths, 0.2, share)
    assert torch.equal(got, want)
    # Without a summary it builds the same one from k's valid rows.
    assert torch.equal(select_scores(q, k, lengths, 0.2, share, selector="int3_channel"), got)
    with pytest.raises(ValueError, match="int4"):
        select_scores(q, k, lengths, 0.2, share, selector="int3_channel",
                      key_summary=build_key_summary(k))


def test_int3_channel_nan_block_is_selected_first():
    # A NaN key makes its block's channel NaN: the block scores NaN, select_topk takes it
    # first, and the NaN row reaches the output.
    q, k, v = decode_inputs(1, 2, 1, 600, 64, torch.float32, "cpu", seed=6)
    k[0, 0, 300, 10] = float("nan")
    cfg = VAttentionConfig(sink=4, local=8, heavy=70, selector="int3_channel")
    out, stats = vattention.decode(q, k, v, cfg, seed=0, return_stats=True)
    heavy = set(stats["heavy_indices"][0, 0].tolist())
    assert set(range(256, 320)) <= heavy
    assert torch.isnan(out).all()


def test_decode_int3_channel_with_and_without_a_summary():
    q, k, v = decode_inputs(2, 4, 2, 1500, 64, torch.float32, "cpu", seed=17)
    lengths = torch.tensor([1500, 900])
    cfg = VAttentionConfig(sink=4, local=8, heavy=0.05, epsilon=0.2, delta=0.2,
                           selector="int3_channel")
    out, stats = vattention.decode(q, k, v, cfg, seq_lens=lengths, seed=3, return_stats=True)
    summary = build_key_summary(k, "int3_channel", lengths)
    again = vattention.decode(q, k, v, cfg, seq_lens=lengths, seed=3, key_summary=summary)
    assert torch.equal(again, out)
    # Its heavy sets are the top-k of its own scores among the window.
    scores = select_scores_torch(q, dequantize_torch(summary), lengths, 1 / 8, True)
    heavy = stats["heavy_indices"]
    for b, n in enumerate(lengths.tolist()):
        count = int(0.05 * n)
        for kv in range(2):
            window = scores[b, kv, 4:n - 8]
            want = set((window.topk(count).indices + 4).tolist())
            assert set(heavy[b, kv][heavy[b, kv] >= 0].tolist()) == want
    with pytest.raises(ValueError, match="int3_channel"):
        vattention.decode(q, k, v, cfg, seq_lens=lengths, key_summary=build_key_summary(k))
