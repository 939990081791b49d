"""Op plan_lists (csrc/vattention/plan.h) against the torch computations of decode's fixed
path that it replaces (resolve_sizes and decode's clamps, _per_list, pilot_wanted,
_fixed_indices, det_counts): random and edge lengths (0, 1, tiny, large, ragged, near a
fraction's rounding boundary), int and fraction sizes, list_heads 1 / 4 / 8, lengths None,
int32 lengths; the dense fallback (dense_below: a threshold below, across and above the fixed
width, every row dense), against its own torch version; the argument checks and opcheck."""
from __future__ import annotations

import pytest
import torch

from vattention import ops
from vattention.config import resolve_size, resolve_sizes
from tests.helpers import gen

I32, I64 = torch.int32, torch.int64


def _per_list(rows, list_heads):
    return rows[:, None].expand(-1, list_heads).reshape(-1).to(I32)


def _fixed_indices(sink, local, window_end, sink_max, local_max):
    device = sink.device
    sink_pos = torch.arange(sink_max, device=device)
    sink_idx = torch.where(sink_pos[None, :] < sink[:, None], sink_pos[None, :], -1)
    local_pos = torch.arange(local_max, device=device)
    local_idx = torch.where(local_pos[None, :] < local[:, None],
                            window_end[:, None] + local_pos[None, :], -1)
    return torch.cat([sink_idx, local_idx], dim=1).to(I32)


def _dense_indices(lengths, width, fixed, heavy_max):
    """A dense row's list: 0 .. n - 1 in the fixed columns, then past the heavy columns."""
    cols = torch.arange(width, device=lengths.device)
    rows = torch.where(cols < fixed, cols, cols - heavy_max)
    heavy_cols = (cols >= fixed) & (cols < fixed + heavy_max)
    return torch.where(heavy_cols[None, :] | (rows[None, :] >= lengths[:, None]), -1,
                       rows[None, :]).to(I32)


def reference(lengths, length, list_heads, sizes, dense_below=0):
    """decode.py's fixed path before select_topk, as it computes these in torch; with
    dense_below, its fallback as plan.h states it."""
    sink_s, local_s, heavy_s, base_rate = sizes
    batch = lengths.shape[0]
    sink = resolve_sizes(sink_s, lengths)
    local = torch.minimum(resolve_sizes(local_s, lengths), lengths - sink)
    dense = (lengths <= dense_below) & (dense_below > 0)
    local = torch.where(dense, lengths - sink, local)
    window_start, window_end = sink, lengths - local
    heavy = torch.minimum(resolve_sizes(heavy_s, lengths), window_end - window_start)
    sink_max, local_max = resolve_size(sink_s, length), resolve_size(local_s, length)
    heavy_max = resolve_size(heavy_s, length)
    heavy_lists = heavy[:, None].expand(-1, list_heads)
    n_residual = ((window_end - window_start)[:, None] - heavy_lists).reshape(-1)
    pilot_wanted = torch.where(n_residual > 0,
                               resolve_sizes(base_rate, n_residual).clamp(min=2),
                               torch.zeros_like(n_residual))
    fixed_idx = _fixed_indices(sink, local, window_end, sink_max, local_max)
    heavy_idx = torch.full((batch * list_heads, heavy_max), -1, dtype=I32,
                           device=lengths.device)
    det_idx = torch.cat([fixed_idx[:, None, :].expand(-1, list_heads, -1),
                         heavy_idx.view(batch, list_heads, heavy_max)], dim=2).contiguous()
    det_counts = torch.full((batch, list_heads), det_idx.shape[2], dtype=I32,
                            device=lengths.device)
    fixed = sink_max + local_max
    extra = max(min(length, dense_below) - fixed, 0) if dense_below > 0 else 0
    if dense_below > 0:
        width = fixed + heavy_max + extra
        det_idx = torch.cat([det_idx, torch.full((batch, list_heads, extra), -1, dtype=I32,
                                                 device=lengths.device)], dim=2)
        dense_idx = _dense_indices(lengths, width, fixed, heavy_max)
        det_idx = torch.where(dense[:, None, None], dense_idx[:, None, :], det_idx)
        dense_counts = torch.where(lengths <= fixed, lengths, lengths + heavy_max)
        det_counts = torch.where(dense[:, None], dense_counts[:, None].to(I32), det_counts)
    return ({"lengths": lengths, "sink": sink, "local": local, "window_end": window_end,
             "heavy": heavy, "starts_rows": _per_list(window_start, list_heads),
             "ends_rows": _per_list(window_end, list_heads),
             "heavy_rows": _per_list(heavy, list_heads),
             "pilot_wanted": pilot_wanted.to(I32), "n_residual": n_residual,
             "det_idx": det_idx, "det_counts": det_counts},
            (sink_max, local_max, heavy_max))


def _check(device, lengths, length, list_heads, sizes, pass_lengths=True, dense_below=0):
    lengths = lengths.to(device)
    ref, bounds = reference(lengths, length, list_heads, sizes, dense_below)
    q = torch.zeros(lengths.shape[0], 8, 4, device=device)
    got = ops.plan_lists(q, lengths if pass_lengths else None, length, list_heads, sizes,
                         *bounds, dense_below)
    assert len(got) == len(ops.PLAN_OUTPUTS)
    for name, value in zip(ops.PLAN_OUTPUTS, got):
        want = ref[name]
        assert value.device == want.device, name
        assert value.dtype == want.dtype, (name, value.dtype, want.dtype)
        assert torch.equal(value, want), (name, sizes, lengths.tolist(), value, want)


SIZES = [
    (128, 128, 256, 128),            # the default's counts
    (4, 16, 32, 2),
    (0, 0, 0, 2),                    # nothing fixed, no heavy: all residual
    (0.01, 0.05, 0.1, 0.05),         # fractions
    (0.0, 1.0, 0.5, 1.0),            # extreme fractions
    (3, 0.1, 0.03, 16),              # mixed
    (0.3, 0.3, 0.3, 0.3),            # sink + local + heavy > n
    (1000, 7, 1, 0.5),
]


@pytest.mark.parametrize("sizes", SIZES, ids=[str(s) for s in SIZES])
@pytest.mark.parametrize("list_heads", [1, 4, 8])
def test_plan_lists_matches_decode(device, sizes, list_heads):
    g = gen(11)
    length = 4099
    edge = torch.tensor([0, 1, 2, 3, 5, 17, 255, 256, 257, 1000, length - 1, length], dtype=I64)
    ragged = torch.randint(0, length + 1, (9,), generator=g, dtype=I64)
    _check(device, torch.cat([edge, ragged]), length, list_heads, sizes)


@pytest.mark.parametrize("sizes", SIZES[:5], ids=[str(s) for s in SIZES[:5]])
def test_plan_lists_large_and_none(device, sizes):
    """lengths None (every row the full length), a large length, int32 lengths."""
    length = 131072
    lengths = torch.full((3,), length, dtype=I64)
    _check(device, lengths, length, 4, sizes, pass_lengths=False)
    g = gen(12)
    ragged = torch.randint(0, length + 1, (6,), generator=g, dtype=I64)
    _check(device, ragged, length, 8, sizes)
    ref, bounds = reference(ragged.to(device), length, 2, sizes)
    q = torch.zeros(6, 2, 4, device=device)
    got = ops.plan_lists(q, ragged.to(device, I32), length, 2, sizes, *bounds)
    for name, value in zip(ops.PLAN_OUTPUTS, got):
        assert torch.equal(value, ref[name]), name


@pytest.mark.parametrize("sizes", SIZES, ids=[str(s) for s in SIZES])
@pytest.mark.parametrize("dense_below", [1, 100, 2000, 4099, 10 ** 6])
def test_plan_lists_dense_below(device, sizes, dense_below):
    g = gen(13)
    length = 4099
    edge = torch.tensor([0, 1, 2, 99, 100, 101, 255, 256, 257, 1999, 2000, 2001, length],
                        dtype=I64)
    ragged = torch.randint(0, length + 1, (9,), generator=g, dtype=I64)
    lengths = torch.cat([edge, ragged])
    for list_heads in (1, 4):
        _check(device, lengths, length, list_heads, sizes, dense_below=dense_below)
    _check(device, torch.full((2,), length, dtype=I64), length, 2, sizes, pass_lengths=False,
           dense_below=dense_below)


def test_plan_lists_dense_rows_attend_everything(device):
    """What decode relies on, stated directly: a dense row's valid entries within its count
    are exactly 0 .. n - 1 and its window is empty; a row above the threshold has the
    dense_below = 0 entries, count and sizes, and nothing in the extra columns."""
    length, sizes = 3000, (16, 32, 0.05, 16)
    lengths = torch.tensor([0, 1, 47, 48, 49, 1000, 1001, 2999, 3000], dtype=I64)
    bounds = [resolve_size(s, length) for s in sizes[:3]]
    q = torch.zeros(lengths.shape[0], 2, 4, device=device)
    off = ops.plan_lists(q, lengths.to(device), length, 2, sizes, *bounds)
    on = ops.plan_lists(q, lengths.to(device), length, 2, sizes, *bounds, 1000)
    names = ops.PLAN_OUTPUTS
    det_idx, det_counts = on[names.index("det_idx")].cpu(), on[names.index("det_counts")].cpu()
    assert det_idx.shape[2] == sum(bounds) + 1000 - bounds[0] - bounds[1]
    for b, n in enumerate(lengths.tolist()):
        for lst in range(2):
            row = det_idx[b, lst]
            listed = row[:det_counts[b, lst]]
            if n <= 1000:
                assert listed[listed >= 0].tolist() == list(range(n))
                assert (row[det_counts[b, lst]:] == -1).all()
            else:
                width = sum(bounds)
                assert det_counts[b, lst] == width
                assert torch.equal(row[:width], off[names.index("det_idx")][b, lst].cpu())
                assert (row[width:] == -1).all()
    dense = lengths <= 1000
    for name in ("sink", "local", "window_end", "heavy", "n_residual", "pilot_wanted",
                 "starts_rows", "ends_rows", "heavy_rows"):
        a, b = on[names.index(name)].cpu(), off[names.index(name)].cpu()
        per_row = a.shape[0] == lengths.shape[0]
        keep = ~dense if per_row else ~dense.repeat_interleave(2)
        assert torch.equal(a[keep], b[keep]), name
    sink, local = on[1].cpu(), on[2].cpu()
    assert torch.equal((sink + local)[dense], lengths[dense])
    for name in ("heavy", "n_residual", "pilot_wanted", "heavy_rows"):
        value = on[names.index(name)].cpu()
        rows = dense if value.shape[0] == lengths.shape[0] else dense.repeat_interleave(2)
        assert (value[rows] == 0).all(), name


def test_plan_lists_fraction_rounding(device):
    """Every length up to 3000 against the host's resolve_size: the device count is the
    ceil of one binary64 product, never one above the host's (the static bound)."""
    length = 3000
    lengths = torch.arange(length + 1, dtype=I64)
    for sizes in [(0.01, 0.07, 0.1, 0.05), (0.37, 0.0033, 0.123456789, 0.9)]:
        _check(device, lengths, length, 1, sizes)
        q = torch.zeros(length + 1, 1, 4, device=device)
        bounds = [resolve_size(s, length) for s in sizes[:3]]
        got = ops.plan_lists(q, lengths.to(device), length, 1, sizes, *bounds)
        host_sink = torch.tensor([resolve_size(sizes[0], n) for n in range(length + 1)])
        assert torch.equal(got[1].cpu(), host_sink)


def test_plan_lists_empty_batch(device):
    q = torch.zeros(0, 4, 8, device=device)
    got = ops.plan_lists(q, torch.zeros(0, dtype=I64, device=device), 16, 2, (1, 2, 3, 2),
                         1, 2, 3)
    assert [tuple(t.shape) for t in got] == [(0,)] * 10 + [(0, 2, 6), (0, 2)]


def test_plan_lists_errors():
    q = torch.zeros(2, 4, 8)
    lengths = torch.tensor([5, 9])
    op = torch.ops.vattention.plan_lists
    good = dict(sizes=[1.0, 2.0, 3.0, 2.0], fractions=[False] * 4)
    with pytest.raises(RuntimeError, match="lengths must lie in"):
        op(q, torch.tensor([5, 17]), 16, 2, good["sizes"], good["fractions"], 1, 2, 3)
    with pytest.raises(RuntimeError, match="above sink_max"):
        op(q, lengths, 16, 2, good["sizes"], good["fractions"], 0, 2, 3)
    with pytest.raises(RuntimeError, match="lengths must have shape"):
        op(q, torch.tensor([5]), 16, 2, good["sizes"], good["fractions"], 1, 2, 3)
    with pytest.raises(RuntimeError, match="lengths must be int64 or int32"):
        op(q, lengths.float(), 16, 2, good["sizes"], good["fractions"], 1, 2, 3)
    with pytest.raises(RuntimeError, match="list_heads must be >= 1"):
        op(q, lengths, 16, 0, good["sizes"], good["fractions"], 1, 2, 3)
    with pytest.raises(RuntimeError, match="4 entries"):
        op(q, lengths, 16, 2, [1.0, 2.0], [False, False], 1, 2, 3)
    with pytest.raises(RuntimeError, match=r"sizes\[2\] \(heavy\) as a count"):
        op(q, lengths, 16, 2, [1.0, 2.0, 2.5, 2.0], good["fractions"], 1, 2, 3)
    with pytest.raises(RuntimeError, match=r"sizes\[0\] \(sink\) as a fraction"):
        op(q, lengths, 16, 2, [1.5, 2.0, 2.0, 2.0], [True, False, False, False], 1, 2, 3)
    with pytest.raises(RuntimeError, match="q must be"):
        op(q[0], lengths, 16, 2, good["sizes"], good["fractions"], 1, 2, 3)
    with pytest.raises(RuntimeError, match="dense_below must be >= 0"):
        op(q, lengths, 16, 2, good["sizes"], good["fractions"], 1, 2, 3, -1)


def test_plan_lists_opcheck(device):
    q = torch.zeros(3, 4, 8, device=device)
    lengths = torch.tensor([0, 7, 40], device=device)
    for sizes, fractions in [([2.0, 3.0, 4.0, 2.0], [False] * 4),
                             ([0.1, 0.2, 0.3, 0.5], [True] * 4)]:
        bounds = (4, 8, 12)
        torch.library.opcheck(torch.ops.vattention.plan_lists.default,
                              (q, lengths, 40, 2, sizes, fractions, *bounds))
        torch.library.opcheck(torch.ops.vattention.plan_lists.default,
                              (q, None, 40, 4, sizes, fractions, *bounds))
        for dense_below in (7, 30, 40):
            torch.library.opcheck(torch.ops.vattention.plan_lists.default,
                                  (q, lengths, 40, 2, sizes, fractions, *bounds, dense_below))
