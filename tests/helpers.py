"""What the stage tests share: devices and marks, input builders, comparisons, and how the
ops read their index lists (attention_params.h), used by the pilot and attention references.

Import it as `from tests.helpers import ...` (tests/ is a package, so that same-named files
in different stage folders do not collide); conftest.py keeps only fixtures and hooks.
"""
from __future__ import annotations

import contextlib
import math
from statistics import NormalDist
from typing import List, Optional

import pytest
import torch

Tensor = torch.Tensor
I32 = torch.int32
F64 = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_CUDA = torch.cuda.is_available()
CUDA = torch.device("cuda")

# --------------------------------------------------------------------------------------
# devices and marks
# --------------------------------------------------------------------------------------

# The `cuda` marker lets `pytest -m cuda` run every CUDA case; without a GPU they skip
# rather than vanish, so the skip count shows what a CPU-only run did not check.
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]


def cuda_only(test):
    """A property only the CUDA path has (graphs, no host sync, CPU-vs-CUDA equality, ...)."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def _model_available() -> bool:
    from vattention.models import smollm2

    return smollm2.is_available()


MODEL_AVAILABLE = _model_available()
requires_model = pytest.mark.skipif(not MODEL_AVAILABLE,
                                    reason="SmolLM2 `models` extra not installed")

# --------------------------------------------------------------------------------------
# input builders
# --------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rng_state(seed, offset=0):
    """The int64 [seed, offset] tensor that sample_residual reads."""
    return torch.tensor([seed, offset], dtype=torch.int64)


def to_device(device, *tensors):
    return tuple(None if t is None else t.to(device) for t in tensors)


def to_cuda(*tensors):
    return to_device(CUDA, *tensors)


def make_qkv(batch, q_heads, kv_heads, length, dim, dtype, g, value_shift=0.0):
    q = torch.randn(batch, q_heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    v = (torch.randn(batch, kv_heads, length, dim, generator=g) + value_shift).to(dtype)
    return q, k, v


def make_lists(batch, list_heads, max_count, length, g, pad_frac=0.2, sort=False,
               garbage_beyond=True):
    """Ragged index lists: random rows (duplicates allowed), -1 padding inside the count,
    counts 0..max_count (both ends forced), and log-weights with a few -inf (weight-zero)
    entries. Beyond the count: out-of-range rows and NaN weights that must not be read
    (garbage_beyond), or -1 rows and ordinary weights (the inputs of the CUDA-vs-CPU
    tests)."""
    idx = torch.randint(0, max(length, 1), (batch, list_heads, max_count), generator=g,
                        dtype=I32)
    if length == 0:
        idx.fill_(-1)
    if sort:
        idx = idx.sort(dim=-1).values
    idx[torch.rand(idx.shape, generator=g) < pad_frac] = -1
    counts = torch.randint(0, max_count + 1, (batch, list_heads), generator=g, dtype=I32)
    counts.view(-1)[0] = 0
    counts.view(-1)[-1] = max_count
    beyond = torch.arange(max_count)[None, None, :] >= counts[:, :, None]
    idx[beyond] = length + 1000 if garbage_beyond else -1
    lw = (torch.randn(idx.shape, generator=g) * 0.7).float()
    lw[torch.rand(idx.shape, generator=g) < 0.05] = -math.inf
    if garbage_beyond:
        lw[beyond] = float("nan")
    return idx, lw, counts


def random_windows(rows, length, g):
    """[start, end) windows of the CUDA tests: the whole row, an end beyond the row, an
    empty window and an interior one; the rest random."""
    starts = torch.randint(0, length + 1, (rows,), generator=g, dtype=I32)
    ends = starts + torch.randint(0, length + 3, (rows,), generator=g, dtype=I32)
    starts[0], ends[0] = 0, length
    if rows > 1:
        starts[1], ends[1] = 0, length + 50          # end clipped to the row length
    if rows > 2:
        starts[2], ends[2] = length // 3, length // 3  # empty window
    if rows > 3:
        starts[3], ends[3] = length // 4, length - length // 5
    return starts, ends


def peaked_inputs(batch, heads, length, dtype, seed):
    """Decode inputs [batch, heads, ...] of the "peaked" family: peaked logits keep the top-k
    boundary far from ties, so CPU and GPU select alike."""
    from vattention.coverage import synthetic_heads

    q, k, v = synthetic_heads("peaked", heads, length, 64, torch.Generator().manual_seed(seed))
    q, k, v = (t.expand(batch, *t.shape[1:]).contiguous() for t in (q, k, v))
    return q.to(dtype), k.to(dtype), v.to(dtype)


# --------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_sync():
    """Any synchronising CUDA call inside the block raises."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def assert_close_scaled(got, ref, rtol=1e-4, name=""):
    """Elementwise |got - ref| <= rtol * (|ref| + max|ref|): relative to the tensor's scale, so
    that sums with cancellation are judged against their terms, not their result."""
    got = got.detach().cpu().double()
    ref = ref.detach().cpu().double()
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), name
    finite = torch.isfinite(ref)
    assert torch.isfinite(got[finite]).all(), name
    if finite.any():
        scale = ref[finite].abs().max().clamp(min=1.0)
        err = (got[finite] - ref[finite]).abs()
        bound = rtol * (ref[finite].abs() + scale)
        worst = float((err / bound).max())
        assert worst <= 1.0, f"{name}: error {worst:.3g} x tolerance"


def assert_attention_close(out, lse, ref_out, ref_lse, atol=1e-4, rtol=1e-4):
    """An attention (out, lse) in float32 against a float64 reference."""
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(lse.to(F64), ref_lse, atol=atol, rtol=rtol)
    torch.testing.assert_close(out.to(F64), ref_out, atol=atol, rtol=rtol)


def chi2_upper(df: int, p: float) -> float:
    """Upper p-quantile of chi-square(df) (Wilson-Hilferty; accurate for df >= 30)."""
    z = NormalDist().inv_cdf(1.0 - p)
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def assert_eager_and_fake_name(fn, match):
    """A wrong rank names the argument both in the eager kernel and in the fake kernel that
    torch.compile sees."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with pytest.raises(RuntimeError, match=match):   # the eager kernel: a clear message
        fn()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(Exception, match=match):
            fn()


# --------------------------------------------------------------------------------------
# q/K/V and index-list arguments shared by pilot_stats and sparse_attention
# --------------------------------------------------------------------------------------


def qkv(batch=2, q_heads=4, kv_heads=2, length=16, dim=8, dtype=torch.float32):
    """Small fixed q/k/v for the argument checks."""
    g = gen(0)
    return (torch.randn(batch, q_heads, dim, generator=g).to(dtype),
            torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype),
            torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype))


def attention_args():
    q, k, v = qkv()
    return dict(q=q, k=k, v=v, indices=torch.zeros(2, 2, 5, dtype=I32),
                log_weights=torch.zeros(2, 2, 5), counts=torch.full((2, 2), 5, dtype=I32),
                scale=0.3, num_splits=0)


# The one q/K/V and list check (csrc/torch/checks.cpp) serves both ops: each op's stage
# file runs all of these cases against its op.
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
QKV_CASE_IDS = [c[0] for c in QKV_CASES]


def with_beyond_count_and_negative_entries(args):
    """Entries beyond the count (never read) and a negative one inside it (padding): not
    errors."""
    args["counts"][1, 1] = 3
    args["indices"][1, 1, 3:] = 99
    args["indices"][0, 0, 2] = -7
    return args


# --------------------------------------------------------------------------------------
# how an op reads its index lists (attention_params.h): the pilot and attention references
# --------------------------------------------------------------------------------------


def list_entries(indices: Tensor, counts: Tensor, log_weights: Optional[Tensor], b: int,
                 lst: int):
    """(positions, log-weights) of list (b, lst): its first `count` entries, skipping < 0."""
    count = int(counts[b, lst])
    pos, lw = [], []
    for j in range(count):
        i = int(indices[b, lst, j])
        if i < 0:
            continue
        pos.append(i)
        lw.append(0.0 if log_weights is None else float(log_weights[b, lst, j]))
    return pos, lw


def list_of(h: int, q_heads: int, list_heads: int) -> int:
    """The list a query head reads: its own, or its KV head's when lists are shared."""
    return h if list_heads == q_heads else h // (q_heads // list_heads)


def logits(q: Tensor, k: Tensor, b: int, h: int, pos: List[int], scale: float) -> Tensor:
    """scale * q.k in float64 for query head h over the rows pos of its KV head."""
    q_heads, kv_heads = q.shape[1], k.shape[1]
    kvh = h // (q_heads // kv_heads)
    rows = k[b, kvh, pos].to(F64)
    return scale * (rows @ q[b, h].to(F64))
