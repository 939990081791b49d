"""Bad input raises a clear error that names the argument: at the Python boundary
(vattention.decode, VAttentionConfig) and in the ops' TORCH_CHECKs (csrc/torch/checks.cpp,
csrc/torch/ops_cpu.cpp)."""
from __future__ import annotations

import math

import pytest
import torch

import vattention
from vattention import VAttentionConfig, ops

I32 = torch.int32


def qkv(batch=2, q_heads=4, kv_heads=2, length=16, dim=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, q_heads, dim, generator=g).to(dtype),
            torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype),
            torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype))


# --------------------------------------------------------------------------------------
# VAttentionConfig
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("epsilon", 0.0), ("epsilon", 1.0), ("epsilon", -0.1), ("epsilon", float("nan")),
    ("epsilon", "0.1"), ("epsilon", None),
    ("delta", 0.0), ("delta", 1.0), ("delta", 2.0), ("delta", float("nan")), ("delta", "x"),
    ("base_rate", 0.0), ("base_rate", 1.5), ("base_rate", -0.5), ("base_rate", float("nan")),
    ("base_rate", None),
    ("sink", -1), ("sink", 1.5), ("sink", -0.25), ("sink", float("nan")), ("sink", "8"),
    ("sink", True), ("sink", None),
    ("local", -3), ("local", 2.0), ("local", [1]),
    ("heavy", -1), ("heavy", 1.01), ("heavy", False),
    ("rule", "Ratio"), ("rule", "oracle"), ("rule", None),
    ("selector", "approx"), ("selector", ""),
    ("share_gqa", 1), ("share_gqa", "yes"),
    ("num_splits", -1), ("num_splits", 1.5), ("num_splits", True),
])
def test_config_rejects_out_of_range_fields(field, value):
    with pytest.raises(ValueError, match=rf"VAttentionConfig\.{field}"):
        VAttentionConfig(**{field: value})


def test_config_replace_validates_too():
    cfg = VAttentionConfig()
    with pytest.raises(ValueError, match="epsilon"):
        cfg.replace(epsilon=1.5)
    with pytest.raises(TypeError):
        cfg.replace(no_such_field=1)


def test_config_accepts_boundaries():
    VAttentionConfig(sink=0, local=0, heavy=0, base_rate=1.0, epsilon=1e-6, delta=0.999)
    VAttentionConfig(sink=1.0, local=0.0, heavy=1.0, rule="paper", num_splits=0)
    assert not VAttentionConfig(rule="denominator").verified


# --------------------------------------------------------------------------------------
# vattention.decode
# --------------------------------------------------------------------------------------


def test_decode_rejects_bad_cfg():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="cfg"):
        vattention.decode(q, k, v, cfg={"epsilon": 0.1})


@pytest.mark.parametrize("case,error,match", [
    ("q_rank", ValueError, r"\bq must be"),
    ("q_not_tensor", ValueError, r"\bq must be"),
    ("k_rank", ValueError, r"\bk must be"),
    ("v_rank", ValueError, r"\bv must be"),
    ("v_shape", ValueError, r"\bv must have k's shape"),
    ("dtype_mismatch", TypeError, r"q, k and v must share a dtype"),
    ("float64", TypeError, r"\bq must be float32"),
    ("int_q", TypeError, r"\bq must be float32"),
    ("device_mismatch", ValueError, r"one device"),
    ("batch_mismatch", ValueError, r"batch"),
    ("head_dim_mismatch", ValueError, r"head_dim"),
    ("gqa", ValueError, r"q_heads \(6\) must be a multiple of kv_heads \(4\)"),
    ("zero_kv_heads", ValueError, r"kv_heads"),
])
def test_decode_rejects_bad_qkv(case, error, match):
    q, k, v = qkv()
    if case == "q_rank":
        q = q[0]
    elif case == "q_not_tensor":
        q = q.tolist()
    elif case == "k_rank":
        k = k[0]
    elif case == "v_rank":
        v = v[:, 0]
    elif case == "v_shape":
        v = v[:, :, :8]
    elif case == "dtype_mismatch":
        k = k.half()
    elif case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "int_q":
        q, k, v = q.int(), k.int(), v.int()
    elif case == "device_mismatch":
        k, v = k.to("meta"), v.to("meta")
    elif case == "batch_mismatch":
        q = torch.cat([q, q])
    elif case == "head_dim_mismatch":
        q = torch.cat([q, q], dim=-1)
    elif case == "gqa":
        q = torch.randn(2, 6, 8)
        k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    elif case == "zero_kv_heads":
        k, v = k[:, :0], v[:, :0]
    with pytest.raises(error, match=match):
        vattention.decode(q, k, v, seed=0)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_decode_rejects_bad_scale(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale"):
        vattention.decode(q, k, v, scale=scale, seed=0)


@pytest.mark.parametrize("seq_lens", [
    torch.tensor([16, 17]),            # > length
    torch.tensor([-1, 3]),             # < 0
    torch.tensor([16]),                # wrong shape
    torch.tensor([[16, 16]]),          # wrong rank
    torch.tensor([16.0, 3.0]),         # wrong dtype
    torch.tensor([True, True]),        # wrong dtype
    [16, 17],                          # a list, out of range
    [3],                               # a list, wrong length
])
def test_decode_rejects_bad_seq_lens(seq_lens):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="seq_lens"):
        vattention.decode(q, k, v, seq_lens=seq_lens, seed=0)


def test_decode_rejects_seq_lens_on_another_device():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="seq_lens must be on"):
        vattention.decode(q, k, v, seq_lens=torch.tensor([3, 4], device="meta"), seed=0)


@pytest.mark.parametrize("seed,match", [
    (-1, r"\bseed must be"),
    (2 ** 63, r"\bseed must be"),
    (1.5, r"\bseed must be"),
    (True, r"\bseed must be"),
    ("7", r"\bseed must be"),
    ((1, 2, 3), r"\bseed must be"),
    ((-5, 0), r"\bseed must be"),
    ((5, -1), r"seed offset"),
    ((5, 2 ** 30), r"seed offset"),
    ((5, 1.0), r"seed offset"),
    ((5, False), r"seed offset"),
    (torch.tensor([1, 2], dtype=torch.int32), r"seed as a tensor"),
    (torch.tensor([1, 2, 3]), r"seed as a tensor"),
    (torch.tensor([[1, 2]]), r"seed as a tensor"),
    (torch.tensor([1, 2], device="meta"), r"seed tensor must be on"),
])
def test_decode_rejects_bad_seed(seed, match):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        vattention.decode(q, k, v, seed=seed)


def test_decode_seed_tensor_with_offset_out_of_range_is_caught_by_the_sampler():
    q, k, v = qkv(length=400)
    cfg = VAttentionConfig(sink=2, local=2, heavy=2, base_rate=0.01)
    with pytest.raises(RuntimeError, match="rng offset"):
        vattention.decode(q, k, v, cfg, seed=torch.tensor([1, 2 ** 30]))


def test_decode_accepts_good_seeds():
    q, k, v = qkv()
    for seed in (None, 0, 2 ** 63 - 1, (3, 2 ** 30 - 1), torch.tensor([4, 5])):
        assert vattention.decode(q, k, v, seed=seed).shape == q.shape


# --------------------------------------------------------------------------------------
# select_topk
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


# --------------------------------------------------------------------------------------
# sample_residual
# --------------------------------------------------------------------------------------


def _sample_args():
    return dict(heavy=torch.tensor([[2, 5, -1], [0, 9, 10]], dtype=I32),
                starts=torch.tensor([0, 0], dtype=I32), ends=torch.tensor([20, 11], dtype=I32),
                num_samples=torch.tensor([4, 4], dtype=I32),
                rng=torch.tensor([1, 0]), max_out=8, draw_set=1)


@pytest.mark.parametrize("change,match", [
    (dict(heavy=torch.tensor([2, 5, -1], dtype=I32)), r"heavy must be \[rows, heavy_max\]"),
    (dict(heavy=torch.zeros(2, 3, dtype=torch.int64)), r"heavy must be int32"),
    (dict(heavy=torch.full((3, 2), -1, dtype=I32).t()), r"heavy must be contiguous"),
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


# --------------------------------------------------------------------------------------
# pilot_stats / sparse_attention (shared q/k/v and index-list checks)
# --------------------------------------------------------------------------------------


def _attn_args():
    q, k, v = qkv()
    return dict(q=q, k=k, v=v, indices=torch.zeros(2, 2, 5, dtype=I32),
                log_weights=torch.zeros(2, 2, 5), counts=torch.full((2, 2), 5, dtype=I32),
                scale=0.3, num_splits=0)


def _call(op, args):
    if op == "pilot_stats":
        args = {n: args[n] for n in ("q", "k", "v", "indices", "counts", "scale")}
        return ops.pilot_stats(**args)
    return ops.sparse_attention(**args)


QKV_CASES = [
    ("q_rank", lambda a: a.update(q=a["q"][0]), r"\bq must be \[batch, q_heads, head_dim\]"),
    ("k_rank", lambda a: a.update(k=a["k"][0]), r"\bk must be \[batch, kv_heads, length, head_dim\]"),
    ("v_shape", lambda a: a.update(v=a["v"][:, :, :4]), r"\bv must have k's shape"),
    ("dtype", lambda a: a.update(k=a["k"].half()), r"q, k and v must share a dtype"),
    ("float64", lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()),
     r"\bq must be float32, float16 or bfloat16"),
    ("batch", lambda a: a.update(q=torch.cat([a["q"], a["q"]])), r"\bk has batch 2 but q has 4"),
    ("head_dim", lambda a: a.update(q=torch.cat([a["q"], a["q"]], -1)),
     r"\bk has head_dim 8 but q has 16"),
    ("gqa", lambda a: a.update(q=torch.randn(2, 3, 8)), r"q_heads \(3\) must be a multiple of kv_heads \(2\)"),
    ("zero_kv", lambda a: a.update(k=a["k"][:, :0], v=a["v"][:, :0]), r"kv_heads"),
    ("head_dim_stride", lambda a: a.update(k=torch.randn(2, 2, 8, 16).transpose(2, 3)),
     r"head_dim of q, k and v must be contiguous"),
    ("indices_rank", lambda a: a.update(indices=torch.zeros(2, 5, dtype=I32)), r"\bindices must be \[batch"),
    ("indices_heads", lambda a: a.update(indices=torch.zeros(2, 3, 5, dtype=I32),
                                         counts=torch.zeros(2, 3, dtype=I32)),
     r"\bindices must be \[batch, kv_heads or q_heads"),
    ("indices_batch", lambda a: a.update(indices=torch.zeros(1, 2, 5, dtype=I32)), r"\bindices must be \[batch"),
    ("indices_dtype", lambda a: a.update(indices=torch.zeros(2, 2, 5, dtype=torch.int64)),
     r"\bindices must be int32"),
    ("indices_contig", lambda a: a.update(indices=torch.zeros(2, 2, 10, dtype=I32)[..., ::2]),
     r"\bindices must be contiguous"),
    ("counts_dtype", lambda a: a.update(counts=torch.zeros(2, 2, dtype=torch.int64)),
     r"\bcounts must be int32"),
    ("counts_shape", lambda a: a.update(counts=torch.zeros(2, 4, dtype=I32)), r"\bcounts must be \[2, 2\]"),
    ("counts_rank", lambda a: a.update(counts=torch.zeros(4, dtype=I32)), r"\bcounts must be \[2, 2\]"),
    ("counts_contig", lambda a: a.update(counts=torch.zeros(2, 4, dtype=I32)[:, ::2]),
     r"\bcounts must be contiguous"),
    ("counts_too_big", lambda a: a["counts"].__setitem__((1, 1), 6), r"\bcounts must lie in \[0, 5\], got 6"),
    ("counts_negative", lambda a: a["counts"].__setitem__((0, 1), -1), r"\bcounts must lie in \[0, 5\], got -1"),
    ("index_too_big", lambda a: a["indices"].__setitem__((1, 0, 4), 16),
     r"\bindices must be < length \(16\), got 16"),
]

SPARSE_ONLY_CASES = [
    ("lw_dtype", lambda a: a.update(log_weights=torch.zeros(2, 2, 5, dtype=torch.float64)),
     r"\blog_weights must be float32"),
    ("lw_shape", lambda a: a.update(log_weights=torch.zeros(2, 2, 4)), r"\blog_weights must have indices' shape"),
    ("lw_contig", lambda a: a.update(log_weights=torch.zeros(2, 2, 10)[..., ::2]),
     r"\blog_weights must be contiguous"),
    ("num_splits", lambda a: a.update(num_splits=-1), r"\bnum_splits must be >= 0"),
]


@pytest.mark.parametrize("op", ["pilot_stats", "sparse_attention"])
@pytest.mark.parametrize("name,mutate,match", QKV_CASES, ids=[c[0] for c in QKV_CASES])
def test_qkv_and_list_checks(op, name, mutate, match):
    args = _attn_args()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        _call(op, args)


@pytest.mark.parametrize("name,mutate,match", SPARSE_ONLY_CASES,
                         ids=[c[0] for c in SPARSE_ONLY_CASES])
def test_sparse_attention_only_checks(name, mutate, match):
    args = _attn_args()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        _call("sparse_attention", args)


def test_index_beyond_count_and_negative_index_are_not_errors():
    args = _attn_args()
    args["counts"][1, 1] = 3
    args["indices"][1, 1, 3:] = 99       # beyond the count: never read
    args["indices"][0, 0, 2] = -7        # negative within the count: padding
    for op in ("pilot_stats", "sparse_attention"):
        _call(op, dict(args))


# --------------------------------------------------------------------------------------
# combine
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


# --------------------------------------------------------------------------------------
# fake kernels (what torch.compile sees): a wrong rank should name the argument too
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["select_topk", "pilot_stats", "sparse_attention", "combine",
                                "sample_residual"])
def test_fake_kernels_name_the_argument_of_a_wrong_rank(op):
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = qkv()
    idx = torch.zeros(2, 2, 5, dtype=I32)
    counts = torch.zeros(2, 2, dtype=I32)
    calls = {
        "select_topk": (lambda: ops.select_topk(torch.randn(30), torch.zeros(3, dtype=I32),
                                  torch.zeros(3, dtype=I32), torch.zeros(3, dtype=I32), 2),
                 "scores"),
        "pilot_stats": (lambda: ops.pilot_stats(q[0], k, v, idx, counts, 1.0), r"\bq\b"),
        "sparse_attention": (lambda: ops.sparse_attention(q[0], k, v, idx, None, counts, 1.0, 0),
                             r"\bq\b"),
        "combine": (lambda: ops.combine(torch.randn(4), torch.randn(1)), "partial_out"),
        "sample_residual": (lambda: ops.sample_residual(
            torch.zeros(3, dtype=I32), torch.zeros(3, dtype=I32), torch.zeros(3, dtype=I32),
            torch.zeros(3, dtype=I32), torch.tensor([1, 0]), 4, 0), "heavy"),
    }
    fn, match = calls[op]
    with pytest.raises(RuntimeError, match=match):   # the eager kernel: a clear message
        fn()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(Exception, match=match):
            fn()
