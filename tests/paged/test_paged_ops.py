"""The ops that read K/V rows or the key summary on a paged cache (block_table): the same
answer as on the contiguous cache holding the same rows, for shuffled tables with unused
blocks, block sizes 16 and 32, ragged lengths ending mid-block, GQA, every dtype and the HND,
NHD and vLLM-CPU pool layouts; vattention.paged; opcheck; bad block tables.

The contiguous reference is the same op on paged_to_contiguous(pool, table): same logical
length, same rows, so on the CPU the two agree bit for bit. Unused blocks and the slots past
a row's length are NaN and the table's entries past a row's last block are garbage: neither
may reach an output.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import DTYPES, I32, assert_eager_and_fake_name, gen
from vattention import ops
from vattention.paged import paged_to_contiguous, to_paged
from vattention.select import select_scores, select_scores_torch

BLOCK_SIZES = [16, 32]
GROUPS = [1, 4]
LAYOUTS = ["hnd", "nhd", "vllm_cpu"]
DIM = 64
KV_HEADS = 2
LENGTHS = [70, 33, 5]          # ragged, all ending mid-block for both block sizes
SCALE = 0.125
GARBAGE = -7                   # table entries past a row's last block


def _exact(device):
    # The CPU kernels do the same arithmetic on the same rows; elsewhere allow the
    # reduction order to depend on the address (fp32 accumulators).
    return dict(rtol=0, atol=0) if device.type == "cpu" else dict(rtol=1e-5, atol=1e-5)


def _pools(kp: torch.Tensor, vp: torch.Tensor, layout: str):
    """The K and V pools [num_blocks, Hkv, bs, D] (HND) laid out as `layout`, as views."""
    if layout == "hnd":                 # one buffer, K heads then V heads
        both = torch.cat([kp, vp], dim=1).contiguous()
        return both[:, :KV_HEADS], both[:, KV_HEADS:]
    if layout == "nhd":                 # [num_blocks, bs, Hkv, D] storage (vLLM CUDA, FlashInfer)
        return (kp.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3),
                vp.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3))
    # vLLM's CPU cache [num_blocks, Hkv, 2 * bs, D]: K then V inside a block.
    bs = kp.shape[2]
    both = torch.cat([kp, vp], dim=2).contiguous()
    return both[:, :, :bs], both[:, :, bs:]


def _scatter(x: torch.Tensor, block_table: torch.Tensor, num_blocks: int, bs: int,
             fill) -> torch.Tensor:
    """x [B, H, N, ...] into a pool of num_blocks blocks of bs slots at block_table's ids
    (all valid): to_paged with a given table."""
    batch, max_blocks = block_table.shape
    rest = tuple(x.shape[3:])
    pool = torch.full((num_blocks, x.shape[1], bs) + rest, fill, dtype=x.dtype, device=x.device)
    padded = x.new_full((batch, x.shape[1], max_blocks * bs) + rest, fill)
    padded[:, :, : x.shape[2]] = x
    blocks = padded.view((batch, x.shape[1], max_blocks, bs) + rest).movedim(2, 1)
    pool[block_table.reshape(-1).long()] = blocks.reshape(
        (batch * max_blocks, x.shape[1], bs) + rest)
    return pool


def _with_garbage_tail(block_table: torch.Tensor, lengths, block_size: int) -> torch.Tensor:
    """The table with every entry past a row's last used block set to an invalid id."""
    table = block_table.clone()
    for b, n in enumerate(lengths):
        table[b, -(-n // block_size):] = GARBAGE
    return table


def paged_case(group, dtype, block_size, layout, device, seed):
    """q, the contiguous k/v (padded to the table's length), the paged k/v pools, the clean
    table, the garbage-tailed table and lengths."""
    g = gen(seed)
    batch, n = len(LENGTHS), max(LENGTHS)
    q = torch.randn(batch, KV_HEADS * group, DIM, generator=g).to(dtype)
    k = torch.randn(batch, KV_HEADS, n, DIM, generator=g).to(dtype)
    v = (torch.randn(batch, KV_HEADS, n, DIM, generator=g) + 0.3).to(dtype)
    kp, table = to_paged(k, block_size, generator=g, extra_blocks=3, fill=math.nan)
    vp = _scatter(v, table, kp.shape[0], block_size, math.nan)
    kp, vp = _pools(kp, vp, layout)
    q, kp, vp, table = (t.to(device) for t in (q, kp, vp, table))
    k_ref, v_ref = paged_to_contiguous(kp, table), paged_to_contiguous(vp, table)
    garbage = _with_garbage_tail(table, LENGTHS, block_size)
    lengths = torch.tensor(LENGTHS, device=device)
    return q, k_ref, v_ref, kp, vp, table, garbage, lengths


def row_lists(list_heads, max_count, device, seed):
    """Index lists whose valid entries are rows < the batch row's length (so a garbage
    table tail is never read), with -1 padding and out-of-range garbage past the count."""
    g = gen(seed)
    batch = len(LENGTHS)
    idx = torch.empty(batch, list_heads, max_count, dtype=I32)
    for b, n in enumerate(LENGTHS):
        idx[b] = torch.randint(0, n, (list_heads, max_count), generator=g, dtype=I32)
    idx[torch.rand(idx.shape, generator=g) < 0.2] = -1
    counts = torch.randint(0, max_count + 1, (batch, list_heads), generator=g, dtype=I32)
    counts.view(-1)[0], counts.view(-1)[-1] = 0, max_count
    beyond = torch.arange(max_count)[None, None, :] >= counts[:, :, None]
    idx[beyond] = 10 ** 6
    lw = torch.randn(idx.shape, generator=g) * 0.7
    lw[torch.rand(idx.shape, generator=g) < 0.05] = -math.inf
    lw[beyond] = math.nan
    return idx.to(device), lw.to(device), counts.to(device)


CASES = [(group, dtype, bs, layout) for group in GROUPS for dtype in DTYPES
         for bs in BLOCK_SIZES for layout in LAYOUTS]
CASE_IDS = [f"g{g}-{str(d).replace('torch.', '')}-bs{bs}-{lay}" for g, d, bs, lay in CASES]


# --------------------------------------------------------------------------------------
# vattention.paged
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_to_paged_round_trip_and_shuffled_blocks(device, block_size):
    g = gen(1)
    x = torch.randn(3, 2, 70, 8, generator=g).to(device)
    pool, table = to_paged(x, block_size, generator=g, extra_blocks=4)
    max_blocks = -(-70 // block_size)
    assert pool.shape == (3 * max_blocks + 4, 2, block_size, 8) and pool.device == x.device
    assert table.shape == (3, max_blocks) and table.dtype == torch.int32
    ids = table.flatten().cpu()
    assert ids.unique().numel() == ids.numel() and int(ids.max()) < pool.shape[0]
    assert not torch.equal(ids, torch.arange(ids.numel(), dtype=I32))   # shuffled
    back = paged_to_contiguous(pool, table)
    assert back.shape == (3, 2, max_blocks * block_size, 8)
    assert torch.equal(back[:, :, :70], x)
    assert torch.equal(back[:, :, 70:], torch.zeros_like(back[:, :, 70:]))
    # The same generator state draws the same table.
    assert torch.equal(to_paged(x, block_size, generator=gen(5))[1],
                       to_paged(x, block_size, generator=gen(5))[1])


def test_paged_to_contiguous_reads_an_nhd_view_and_zeroes_invalid_ids():
    g = gen(2)
    x = torch.randn(2, 3, 40, 4, generator=g)
    pool, table = to_paged(x, 16, generator=g, extra_blocks=1)
    nhd = pool.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert torch.equal(paged_to_contiguous(nhd, table), paged_to_contiguous(pool, table))
    bad = table.clone()
    bad[1, 2] = -1
    bad[0, 2] = pool.shape[0]
    out = paged_to_contiguous(pool, bad)
    assert torch.equal(out[:, :, 32:], torch.zeros_like(out[:, :, 32:]))
    assert torch.equal(out[:, :, :32], x[:, :, :32])


def test_paged_helpers_reject_bad_arguments():
    x = torch.randn(2, 2, 8, 4)
    with pytest.raises(ValueError, match="block_size"):
        to_paged(x, 0)
    with pytest.raises(ValueError, match="extra_blocks"):
        to_paged(x, 4, extra_blocks=-1)
    with pytest.raises(ValueError, match="block_table must be an int32"):
        paged_to_contiguous(x, torch.zeros(2, 2, dtype=torch.int64))


# --------------------------------------------------------------------------------------
# every op: paged == contiguous on the same rows
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("group,dtype,block_size,layout", CASES, ids=CASE_IDS)
def test_select_scores_paged(device, group, dtype, block_size, layout, share):
    q, k_ref, _, kp, _, table, garbage, lengths = paged_case(group, dtype, block_size, layout,
                                                             device, seed=10)
    ref = ops.select_scores(q, k_ref, lengths, SCALE, share)
    got = ops.select_scores(q, kp, lengths, SCALE, share, block_table=garbage)
    assert got.shape == (3, KV_HEADS if share else KV_HEADS * group, table.shape[1] * block_size)
    torch.testing.assert_close(got, ref, **_exact(device))
    assert not torch.isnan(got).any()
    # And the same scores as on the original, unpadded contiguous cache.
    n = max(LENGTHS)
    torch.testing.assert_close(got[..., :n], ops.select_scores(q, k_ref[:, :, :n].contiguous(),
                                                               lengths, SCALE, share),
                               **_exact(device))
    assert torch.isneginf(got[..., n:]).all()


def _summary_case(group, block_size, layout, device, seed):
    q, k_ref, _, kp, _, table, garbage, lengths = paged_case(group, torch.float16, block_size,
                                                             layout, device, seed)
    batch, n = k_ref.shape[0], k_ref.shape[2]
    codes = torch.empty(batch, KV_HEADS, n, DIM // 2, dtype=torch.uint8, device=device)
    params = torch.empty(batch, KV_HEADS, n, DIM // 32, 2, dtype=torch.float16, device=device)
    ops.summarize_keys(k_ref.nan_to_num(), codes, params,
                       torch.zeros(batch, dtype=torch.int64, device=device))
    num_blocks = kp.shape[0]
    codes_pool = _scatter(codes, table, num_blocks, block_size, 0xAB)
    params_pool = _scatter(params, table, num_blocks, block_size, math.nan)
    return q, codes, params, codes_pool, params_pool, table, garbage, lengths


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", ["hnd", "nhd"])
def test_select_scores_summary_paged(device, group, block_size, layout, share):
    q, codes, params, codes_pool, params_pool, table, garbage, lengths = _summary_case(
        group, block_size, layout, device, seed=11)
    if layout == "nhd":
        codes_pool = codes_pool.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        params_pool = params_pool.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    for dtype in DTYPES:
        qd = q.to(dtype)
        ref = ops.select_scores_summary(qd, codes, params, lengths, SCALE, share)
        got = ops.select_scores_summary(qd, codes_pool, params_pool, lengths, SCALE, share,
                                        block_table=garbage)
        torch.testing.assert_close(got, ref, **_exact(device))
        assert not torch.isnan(got).any()


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_summarize_keys_paged_writes_the_slots_of_the_table(device, group, block_size, dtype):
    g = gen(12)
    batch, max_blocks, rows = 3, 5, 21
    n = max_blocks * block_size
    num_blocks = batch * max_blocks + 2
    table = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].view(batch, max_blocks)
    table = table.to(I32).to(device)
    k_new = torch.randn(batch, KV_HEADS, rows, DIM, generator=g).to(dtype).to(device)
    # Ragged starts: inside the first block, crossing a block boundary, and running past
    # the table's end (those positions are skipped).
    row_begin = torch.tensor([3, block_size - 4, n - 7], dtype=torch.int64, device=device)
    codes = torch.full((batch, KV_HEADS, n, DIM // 2), 0xAB, dtype=torch.uint8, device=device)
    params = torch.full((batch, KV_HEADS, n, DIM // 32, 2), -3.0, dtype=torch.float16,
                        device=device)
    codes_pool = _scatter(codes, table, num_blocks, block_size, 0xAB)
    params_pool = _scatter(params, table, num_blocks, block_size, -3.0)
    ops.summarize_keys(k_new, codes, params, row_begin)
    # Entries past the blocks a row writes may hold anything.
    written_end = torch.clamp(row_begin + rows, max=n).tolist()
    garbage = table.clone()
    for b, end in enumerate(written_end):
        garbage[b, -(-end // block_size):] = GARBAGE
    for view in ("hnd", "nhd"):
        cp, pp = codes_pool.clone(), params_pool.clone()
        if view == "nhd":
            cp = cp.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
            pp = pp.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
        ops.summarize_keys(k_new, cp, pp, row_begin, block_table=garbage)
        # The unused blocks keep their bytes; every used block holds the contiguous result.
        assert torch.equal(cp, _scatter(codes, table, num_blocks, block_size, 0xAB)), view
        assert torch.equal(pp, _scatter(params, table, num_blocks, block_size, -3.0)), view


@pytest.mark.parametrize("per_q", [False, True])
@pytest.mark.parametrize("group,dtype,block_size,layout", CASES, ids=CASE_IDS)
def test_pilot_stats_paged(device, group, dtype, block_size, layout, per_q):
    q, k_ref, v_ref, kp, vp, table, garbage, _ = paged_case(group, dtype, block_size, layout,
                                                            device, seed=13)
    idx, _, counts = row_lists(KV_HEADS * group if per_q else KV_HEADS, 24, device,
                               seed=14)
    ref = ops.pilot_stats(q, k_ref, v_ref, idx, counts, SCALE)
    got = ops.pilot_stats(q, kp, vp, idx, counts, SCALE, block_table=garbage)
    for name, a, b in zip(("max_logit", "moments", "vector_moments"), got, ref):
        torch.testing.assert_close(a, b, **_exact(device), equal_nan=False, msg=name)
    center = (ref[2][:, :, 0] / ref[1][:, :, :1].clamp(min=1e-30)).nan_to_num().contiguous()
    ref_d = ops.pilot_dispersion(q, k_ref, v_ref, idx, counts, SCALE, center)
    got_d = ops.pilot_dispersion(q, kp, vp, idx, counts, SCALE, center, block_table=garbage)
    torch.testing.assert_close(got_d, ref_d, **_exact(device))
    assert not torch.isnan(got_d).any()


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("group,dtype,block_size,layout", CASES, ids=CASE_IDS)
def test_sparse_attention_paged(device, group, dtype, block_size, layout, weights):
    q, k_ref, v_ref, kp, vp, table, garbage, _ = paged_case(group, dtype, block_size, layout,
                                                            device, seed=15)
    idx, lw, counts = row_lists(KV_HEADS, 40, device, seed=16)
    lw = lw if weights else None
    for splits in (1, 3):
        ref = ops.sparse_attention(q, k_ref, v_ref, idx, lw, counts, SCALE, splits)
        got = ops.sparse_attention(q, kp, vp, idx, lw, counts, SCALE, splits,
                                   block_table=garbage)
        torch.testing.assert_close(got[0], ref[0], **_exact(device))
        torch.testing.assert_close(got[1], ref[1], **_exact(device))
        assert not torch.isnan(got[0]).any()


def test_a_nan_row_read_through_the_table_reaches_the_output():
    q, k_ref, v_ref, kp, vp, table, garbage, _ = paged_case(1, torch.float32, 16, "hnd",
                                                            torch.device("cpu"), seed=17)
    idx = torch.tensor([[[3, 20]] * KV_HEADS] * 3, dtype=I32)
    counts = torch.full((3, KV_HEADS), 2, dtype=I32)
    counts[2] = 1                      # row 2 has length 5: only row 3 is read
    vp = vp.clone()
    vp[table[0, 1], 0, 20 - 16] = math.nan  # logical row 20 of batch row 0, head 0
    out, _ = ops.sparse_attention(q, kp, vp, idx, None, counts, SCALE, 1, block_table=garbage)
    assert torch.isnan(out[0, 0]).all() and not torch.isnan(out[0, 1:]).any()
    assert not torch.isnan(out[1:]).any()


def test_select_py_passes_the_table_through():
    q, k_ref, _, kp, _, table, garbage, lengths = paged_case(4, torch.float32, 16, "nhd",
                                                             torch.device("cpu"), seed=18)
    for share in (False, True):
        want = ops.select_scores(q, k_ref, lengths, SCALE, share)
        torch.testing.assert_close(select_scores(q, kp, lengths, SCALE, share,
                                                 block_table=garbage), want, rtol=0, atol=0)
        # The torch reference gathers the pool first (garbage ids give zero rows, which
        # lie past the lengths and are masked).
        torch.testing.assert_close(select_scores_torch(q, kp.nan_to_num(), lengths, SCALE, share,
                                                       block_table=garbage),
                                   want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# opcheck: schema, fake kernel (logical length from the table), dispatch
# --------------------------------------------------------------------------------------


def _opcheck_samples(device):
    q, k_ref, v_ref, kp, vp, table, garbage, lengths = paged_case(2, torch.float16, 16, "nhd",
                                                                  device, seed=19)
    idx, lw, counts = row_lists(KV_HEADS, 12, device, seed=20)
    batch = q.shape[0]
    codes = torch.zeros(kp.shape[0], KV_HEADS, 16, DIM // 2, dtype=torch.uint8, device=device)
    params = torch.zeros(kp.shape[0], KV_HEADS, 16, DIM // 32, 2, dtype=torch.float16,
                         device=device)
    k_new = torch.randn(batch, KV_HEADS, 3, DIM, generator=gen(21)).half().to(device)
    row_begin = torch.tensor(LENGTHS, dtype=torch.int64, device=device) - 3
    center = torch.zeros(q.shape, dtype=torch.float32, device=device)
    V = torch.ops.vattention
    return {
        "select_scores": (V.select_scores.default, (q, kp, lengths, SCALE, True, garbage)),
        "select_scores_summary": (V.select_scores_summary.default,
                                  (q, codes, params, lengths, SCALE, False, garbage)),
        "summarize_keys": (V.summarize_keys.default, (k_new, codes, params, row_begin, table)),
        "pilot_stats": (V.pilot_stats.default, (q, kp, vp, idx, counts, SCALE, garbage)),
        "pilot_dispersion": (V.pilot_dispersion.default,
                             (q, kp, vp, idx, counts, SCALE, center, garbage)),
        "sparse_attention": (V.sparse_attention.default,
                             (q, kp, vp, idx, lw, counts, SCALE, 2, garbage)),
    }


OPS = ["select_scores", "select_scores_summary", "summarize_keys", "pilot_stats",
       "pilot_dispersion", "sparse_attention"]


@pytest.mark.parametrize("op", OPS)
def test_opcheck_paged(device, op):
    fn, args = _opcheck_samples(device)[op]
    torch.library.opcheck(fn, args)


def test_fake_kernels_give_the_logical_length():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, _, _, kp, vp, table, _, lengths = paged_case(1, torch.float32, 32, "hnd",
                                                    torch.device("cpu"), seed=22)
    codes = torch.zeros(kp.shape[0], KV_HEADS, 32, DIM // 2, dtype=torch.uint8)
    params = torch.zeros(kp.shape[0], KV_HEADS, 32, DIM // 32, 2, dtype=torch.float16)
    n = table.shape[1] * 32
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert ops.select_scores(q, kp, lengths, SCALE, False, block_table=table).shape == (
            3, KV_HEADS, n)
        assert ops.select_scores_summary(q, codes, params, lengths, SCALE, True,
                                         block_table=table).shape == (3, KV_HEADS, n)


# --------------------------------------------------------------------------------------
# bad block tables
# --------------------------------------------------------------------------------------


def _bad_table_calls(q, kp, vp, table, lengths, idx, counts, codes, params, k_new, row_begin):
    center = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    return {
        "select_scores": lambda t: ops.select_scores(q, kp, lengths, SCALE, True, block_table=t),
        "select_scores_summary": lambda t: ops.select_scores_summary(
            q, codes, params, lengths, SCALE, True, block_table=t),
        "summarize_keys": lambda t: ops.summarize_keys(k_new, codes, params, row_begin,
                                                       block_table=t),
        "pilot_stats": lambda t: ops.pilot_stats(q, kp, vp, idx, counts, SCALE, block_table=t),
        "pilot_dispersion": lambda t: ops.pilot_dispersion(q, kp, vp, idx, counts, SCALE,
                                                           center, block_table=t),
        "sparse_attention": lambda t: ops.sparse_attention(q, kp, vp, idx, None, counts, SCALE,
                                                           block_table=t),
    }


def _bad_table_setup(device):
    q, _, _, kp, vp, table, _, lengths = paged_case(1, torch.float32, 16, "hnd", device,
                                                    seed=23)
    idx, _, counts = row_lists(KV_HEADS, 8, device, seed=24)
    codes = torch.zeros(kp.shape[0], KV_HEADS, 16, DIM // 2, dtype=torch.uint8, device=device)
    params = torch.zeros(kp.shape[0], KV_HEADS, 16, DIM // 32, 2, dtype=torch.float16,
                         device=device)
    k_new = torch.randn(3, KV_HEADS, 2, DIM, generator=gen(25)).to(device)
    row_begin = torch.tensor([0, 16, 40], dtype=torch.int64, device=device)
    return (q, kp, vp, table, lengths, idx, counts, codes, params, k_new, row_begin)


BAD_TABLES = [
    ("dtype", lambda t: t.long(), r"block_table must be int32"),
    ("rank", lambda t: t.flatten(), r"block_table must be \[batch, max_blocks\]"),
    ("batch", lambda t: t[:2], r"block_table must be \[batch, max_blocks\] with batch 3"),
    ("stride", lambda t: t.repeat_interleave(2, dim=1)[:, ::2],
     r"block_table must be contiguous along max_blocks"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case,mutate,match", BAD_TABLES, ids=[c[0] for c in BAD_TABLES])
def test_bad_block_table_is_named(device, op, case, mutate, match):
    setup = _bad_table_setup(device)
    call = _bad_table_calls(*setup)[op]
    table = setup[3]
    with pytest.raises(RuntimeError, match=match):
        call(mutate(table))


@pytest.mark.parametrize("op", OPS)
def test_block_id_outside_the_pool_is_an_error_on_cpu(op):
    setup = _bad_table_setup(torch.device("cpu"))
    kp, table, idx, counts = setup[1], setup[3], setup[5], setup[6]
    calls = _bad_table_calls(*setup)
    # A block every op reads: batch row 0's first block (scored, listed, or written).
    idx[0, :, 0] = 1
    counts[0] = counts[0].clamp(min=1)
    for bad_id in (kp.shape[0], -1):
        bad = table.clone()
        bad[0, 0] = bad_id
        with pytest.raises(RuntimeError, match=rf"block_table\[0, 0\] = {bad_id} is not a block "
                                               rf"of the pool \[0, {kp.shape[0]}\)"):
            calls[op](bad)
    calls[op](table)                   # the valid table runs


def test_eager_and_fake_name_block_table():
    setup = _bad_table_setup(torch.device("cpu"))
    q, kp, vp, table, lengths, idx, counts = setup[:7]
    assert_eager_and_fake_name(
        lambda: ops.sparse_attention(q, kp, vp, idx, None, counts, SCALE,
                                     block_table=table.long()), "block_table must be int32")
    assert_eager_and_fake_name(
        lambda: ops.select_scores(q, kp, lengths, SCALE, True, block_table=table[:1]),
        "block_table")


def test_block_table_on_another_device_is_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to put the table elsewhere")
    setup = _bad_table_setup(torch.device("cpu"))
    call = _bad_table_calls(*setup)["select_scores"]
    with pytest.raises(RuntimeError, match="block_table must be on cpu"):
        call(setup[3].cuda())


# --------------------------------------------------------------------------------------
# 64-bit strides
# --------------------------------------------------------------------------------------


def test_pool_strides_beyond_int32_are_accepted(device):
    """A pool whose block and head strides exceed 2^31 elements (a view whose dims 0 and 1
    have size 1, so it stays valid memory): the binding keeps the 64-bit strides and the
    op reads the right rows. Offsets past 2^31 elements would need a pool of > 2^31
    elements, too large for a unit test: that arithmetic (KVPaging::offset, 64-bit) is for a
    C++-level test of the params, not for this one."""
    g = gen(26)
    block_size, dim = 16, DIM
    base = torch.randn(block_size * dim, generator=g).to(device)
    huge = 2 ** 33
    kp = base.as_strided((1, 1, block_size, dim), (huge, huge + 7, dim, 1))
    assert kp.stride(0) > 2 ** 31
    q = torch.randn(2, 2, dim, generator=g).to(device)
    table = torch.zeros(2, 3, dtype=I32, device=device)          # every block is block 0
    lengths = torch.tensor([40, 9], device=device)
    got = ops.select_scores(q, kp, lengths, SCALE, False, block_table=table)
    k_ref = base.view(block_size, dim).repeat(3, 1).expand(2, 1, 3 * block_size, dim)
    ref = ops.select_scores(q, k_ref.contiguous(), lengths, SCALE, False)
    torch.testing.assert_close(got, ref, **_exact(torch.device(device)))
