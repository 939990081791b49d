"""vattention.decode on a paged KV cache (block_table): the same step as on the contiguous
cache it pages, with the same seed (heavy sets, budgets, samples, stats and relative bytes
equal, outputs to fp rounding), for every path and selector; the paged int4 summary; the
cache layouts a server hands over; bad input; capture (torch.compile, CUDA graphs)."""
import math

import pytest
import torch

import vattention
from tests.helpers import cuda_only, gen, no_sync
from vattention import VAttentionConfig
from vattention.key_summary import (KeySummary, build_key_summary, empty_key_summary,
                                    update_key_summary)
from vattention.paged import paged_to_contiguous, to_paged

BATCH, Q_HEADS, KV_HEADS, DIM = 3, 8, 2, 64
LENGTH = 640                                  # a multiple of both block sizes: the same N
SEQ_LENS = [LENGTH, 603, 1]                   # ragged; row 2 has no residual at all
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}

CONFIGS = {
    "oracle-shared": VAttentionConfig(selector="oracle"),
    "oracle-per-head": VAttentionConfig(selector="oracle", share_gqa=False, reuse_pilot=False),
    "int4-default": VAttentionConfig(),
    "int4-per-head": VAttentionConfig(share_gqa=False),
    "union": VAttentionConfig(selector="oracle", gqa_heavy="union", heavy=0.05),
    "adaptive": VAttentionConfig(adaptive_heavy=True),
    "adaptive-chi2": VAttentionConfig(adaptive_heavy=True, tail="chi2", share_gqa=False),
    "chi2": VAttentionConfig(tail="chi2"),
    "exact-fallback": VAttentionConfig(selector="oracle", epsilon=0.01, delta=0.01),
}


def _inputs(dtype, device, seed):
    """q, k, v with NaN in every row at or beyond seq_lens: a step that read one would say so."""
    g = gen(seed)
    q = torch.randn(BATCH, Q_HEADS, DIM, generator=g) * 1.5
    k = torch.randn(BATCH, KV_HEADS, LENGTH, DIM, generator=g)
    v = torch.randn(BATCH, KV_HEADS, LENGTH, DIM, generator=g) + 0.5
    beyond = (torch.arange(LENGTH)[None, :] >= torch.tensor(SEQ_LENS)[:, None])[:, None, :, None]
    k, v = k.masked_fill(beyond, math.nan), v.masked_fill(beyond, math.nan)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _page(k, v, block_size, seed, extra_blocks=5):
    """Pools of shuffled blocks (unused blocks NaN) and their one table."""
    k_pool, table = to_paged(k, block_size, generator=gen(seed), extra_blocks=extra_blocks,
                             fill=math.nan)
    v_pool, v_table = to_paged(v, block_size, generator=gen(seed), extra_blocks=extra_blocks,
                               fill=math.nan)
    assert torch.equal(table, v_table)
    return k_pool, v_pool, table


def _assert_same_step(contiguous, paged, dtype):
    out, stats = contiguous
    paged_out, paged_stats = paged
    assert not torch.isnan(out).any()
    torch.testing.assert_close(paged_out.float(), out.float(), rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype])
    assert stats.keys() == paged_stats.keys()
    for name, value in stats.items():
        # Same rows read in the same order: the statistics agree to the bit, relative_bytes
        # included (the pool's element size and dims are the cache's). On CUDA the budget's
        # float inputs may differ in the last bit if the paged gather's address arithmetic
        # changes an FMA contraction; the counts they round to must not.
        if value.is_cuda and name in ("required", "error_bound"):
            torch.testing.assert_close(paged_stats[name], value, rtol=1e-6, atol=0,
                                       equal_nan=True)
        else:
            assert torch.equal(paged_stats[name], value), name


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_paged_matches_contiguous(device, name, block_size):
    cfg = CONFIGS[name]
    dtype = torch.float32
    q, k, v = _inputs(dtype, device, seed=block_size)
    k_pool, v_pool, table = _page(k, v, block_size, seed=block_size + 1)
    seq_lens = torch.tensor(SEQ_LENS, device=device)
    contiguous = vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=7, return_stats=True)
    paged = vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, seed=7,
                              return_stats=True, block_table=table)
    _assert_same_step(contiguous, paged, dtype)
    # Without stats, the same output (no stats-only work changes it).
    alone = vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, seed=7,
                              block_table=table)
    torch.testing.assert_close(alone, paged[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_table_entries_past_each_length_are_never_read(device, dtype):
    """A server's table holds anything past a request's last block (vLLM: stale ids, -1 or
    0): no stage reads those entries, in 16-bit caches too."""
    block_size = 32
    q, k, v = _inputs(dtype, device, seed=8)
    k_pool, v_pool, table = _page(k, v, block_size, seed=9)
    garbage = table.clone()
    for b, n in enumerate(SEQ_LENS):
        garbage[b, -(-n // block_size):] = -1 if b % 2 else 10 ** 6
    assert (garbage != table).any()
    seq_lens = torch.tensor(SEQ_LENS, device=device)
    for cfg in (VAttentionConfig(), VAttentionConfig(selector="oracle", adaptive_heavy=True)):
        contiguous = vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=2,
                                       return_stats=True)
        paged = vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, seed=2,
                                  return_stats=True, block_table=garbage)
        _assert_same_step(contiguous, paged, dtype)


@pytest.mark.parametrize("layout", ["nhd", "vllm_cpu"])
def test_server_cache_layouts(device, layout):
    """The pools a server holds, passed as views: an NHD cache [num_blocks, block_size, Hkv,
    D] as cache.permute(0, 2, 1, 3), and vLLM's CPU cache [num_blocks, Hkv, 2 * block_size, D]
    (K then V inside a block) as its two halves. No row is copied."""
    dtype, block_size = torch.bfloat16, 16
    q, k, v = _inputs(dtype, device, seed=3)
    k_pool, v_pool, table = _page(k, v, block_size, seed=4)
    if layout == "nhd":
        k_view = k_pool.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        v_view = v_pool.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    else:
        cache = torch.cat([k_pool, v_pool], dim=2)
        k_view, v_view = cache[:, :, :block_size], cache[:, :, block_size:]
    assert not k_view.is_contiguous()
    cfg = VAttentionConfig()
    seq_lens = torch.tensor(SEQ_LENS, device=device)
    contiguous = vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=5, return_stats=True)
    paged = vattention.decode(q, k_view, v_view, cfg, seq_lens=seq_lens, seed=5,
                              return_stats=True, block_table=table)
    _assert_same_step(contiguous, paged, dtype)


def _assert_same_bytes(paged, summary, table):
    """The paged summary read through the table is the contiguous one, byte for byte (NaN
    rows beyond seq_lens included: compared as bits)."""
    for name in ("codes", "params"):
        gathered = paged_to_contiguous(getattr(paged, name), table)
        expected = getattr(summary, name)
        if expected.dtype == torch.float16:
            gathered, expected = gathered.view(torch.int16), expected.view(torch.int16)
        assert torch.equal(gathered, expected), name


def test_paged_int4_summary_built_once_and_updated(device):
    """A server's summary: built over the pool once, updated in place through the table as a
    token is appended, and scored through the table: the same bytes as the contiguous
    summary, and the same step."""
    block_size = 32
    q, k, v = _inputs(torch.float32, device, seed=11)
    k_pool, v_pool, table = _page(k, v, block_size, seed=12)
    summary = build_key_summary(k, lengths=torch.tensor(SEQ_LENS, device=device))
    paged = build_key_summary(k_pool, block_table=table)
    assert paged.paged and not summary.paged
    assert paged.bytes_per_token == summary.bytes_per_token
    assert paged.codes.shape[:3] == k_pool.shape[:3]
    _assert_same_bytes(paged, summary, table)

    # Append one token to every row (row 0 is full: its position N is skipped).
    g = gen(13)
    k_new = torch.randn(BATCH, KV_HEADS, 1, DIM, generator=g).to(device)
    v_new = torch.randn(BATCH, KV_HEADS, 1, DIM, generator=g).to(device)
    row_begin = torch.tensor(SEQ_LENS, device=device)
    update_key_summary(summary, k_new, row_begin)
    update_key_summary(paged, k_new, row_begin, block_table=table)
    _assert_same_bytes(paged, summary, table)
    grown = [min(n + 1, LENGTH) for n in SEQ_LENS]
    for b, n in enumerate(SEQ_LENS):
        if n < LENGTH:
            k[b, :, n], v[b, :, n] = k_new[b, :, 0], v_new[b, :, 0]
            block, slot = table[b, n // block_size].item(), n % block_size
            k_pool[block, :, slot], v_pool[block, :, slot] = k_new[b, :, 0], v_new[b, :, 0]

    cfg = VAttentionConfig(selector="int4")
    seq_lens = torch.tensor(grown, device=device)
    contiguous = vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=3, return_stats=True,
                                   key_summary=summary)
    stepped = vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, seed=3,
                                return_stats=True, key_summary=paged, block_table=table)
    _assert_same_step(contiguous, stepped, torch.float32)
    # The summary decides the heavy set: a summary built from scratch gives the same step.
    rebuilt = vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, seed=3,
                                return_stats=True, block_table=table)
    _assert_same_step(contiguous, rebuilt, torch.float32)


def test_paged_summary_update_in_plain_torch_matches_the_op():
    """The plain-torch fallback (k_new of a dtype the op lacks) writes the op's bytes, at the
    same slots, and skips positions at or beyond max_blocks * block_size."""
    block_size, max_blocks, batch = 16, 3, 2
    g = gen(21)
    table = torch.randperm(8, generator=g)[:batch * max_blocks].view(batch, max_blocks).to(
        torch.int32)
    k_new = torch.randn(batch, KV_HEADS, 5, DIM, generator=g)       # float32 values
    row_begin = torch.tensor([14, 45])        # row 0 crosses a block edge, row 1 runs past N
    by_op = empty_key_summary(8, KV_HEADS, block_size, DIM, paged=True)
    by_op.codes.zero_(), by_op.params.zero_()
    by_torch = KeySummary(by_op.codes.clone(), by_op.params.clone(), paged=True)
    update_key_summary(by_op, k_new, row_begin, block_table=table)
    update_key_summary(by_torch, k_new.double(), row_begin, block_table=table)
    assert torch.equal(by_op.codes, by_torch.codes)
    assert torch.equal(by_op.params, by_torch.params)
    written = paged_to_contiguous(by_op.codes, table)
    assert written[0, :, 14:19].any() and written[1, :, 45:48].any()
    untouched = torch.ones(batch, max_blocks * block_size, dtype=torch.bool)
    untouched[0, 14:19] = False
    untouched[1, 45:] = False
    assert not written.transpose(1, 2)[untouched].any()


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def _bad_input_case():
    q, k, v = _inputs(torch.float32, "cpu", seed=0)
    k_pool, v_pool, table = _page(k, v, 16, seed=1)
    return q, k, v, k_pool, v_pool, table, torch.tensor(SEQ_LENS)


def test_bad_block_table_and_seq_lens():
    q, _, _, k_pool, v_pool, table, seq_lens = _bad_input_case()
    cfg = VAttentionConfig(selector="oracle")
    with pytest.raises(ValueError, match="seq_lens is required with block_table"):
        vattention.decode(q, k_pool, v_pool, cfg, block_table=table)
    with pytest.raises(TypeError, match="block_table must be int32"):
        vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, block_table=table.long())
    with pytest.raises(ValueError, match=r"block_table must be an int32 tensor \[batch, "):
        vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, block_table=table[0])
    with pytest.raises(ValueError, match="block_table has batch 2 but q has 3"):
        vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, block_table=table[:2])
    strided = torch.empty(table.shape[1], table.shape[0], dtype=torch.int32).t()
    strided.copy_(table)
    with pytest.raises(ValueError, match="block_table's last dim must be contiguous"):
        vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, block_table=strided)
    with pytest.raises(ValueError, match=r"lie in \[0, 640\] \(max_blocks \* block_size\)"):
        vattention.decode(q, k_pool, v_pool, cfg, seq_lens=[641, 1, 1], block_table=table)
    with pytest.raises(ValueError, match="k must be .*a paged cache's pool"):
        vattention.decode(q, k_pool[0], v_pool[0], cfg, seq_lens=seq_lens, block_table=table)
    with pytest.raises(ValueError, match="int3_channel' does not support a paged cache"):
        vattention.decode(q, k_pool, v_pool, VAttentionConfig(selector="int3_channel"),
                          seq_lens=seq_lens, block_table=table)


def test_summary_must_match_the_cache_layout():
    q, k, v, k_pool, v_pool, table, seq_lens = _bad_input_case()
    cfg = VAttentionConfig(selector="int4")
    contiguous, paged = build_key_summary(k), build_key_summary(k_pool, block_table=table)
    with pytest.raises(ValueError, match="key_summary is not paged but the cache is"):
        vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, block_table=table,
                          key_summary=contiguous)
    with pytest.raises(ValueError, match="key_summary is paged"):
        vattention.decode(q, k, v, cfg, seq_lens=seq_lens, key_summary=paged)
    other_pool = build_key_summary(k_pool[:-1], block_table=table)
    with pytest.raises(ValueError, match=r"key_summary.codes must have shape .* for k's pool"):
        vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, block_table=table,
                          key_summary=other_pool)
    with pytest.raises(ValueError, match="summary is not paged"):
        update_key_summary(contiguous, k[:, :, :1], 0, block_table=table)
    with pytest.raises(ValueError, match="summary is paged"):
        update_key_summary(paged, k[:, :, :1], 0)
    with pytest.raises(ValueError, match="block_table has batch 2 but k_new has 3"):
        update_key_summary(paged, k[:, :, :1], 0, block_table=table[:2])
    with pytest.raises(ValueError, match="only an 'int4' summary can be paged"):
        build_key_summary(k_pool, "int3_channel", block_table=table)
    with pytest.raises(ValueError, match="only an 'int4' summary can be paged"):
        empty_key_summary(4, KV_HEADS, 16, DIM, format="int3_channel", paged=True)


# --------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------


def test_compile_fullgraph_paged_decode(monkeypatch):
    """As test_capture.test_compile_fullgraph_decode_with_seq_lens, on a paged cache."""
    from statistics import NormalDist

    from vattention import budget
    table_z = {d: NormalDist().inv_cdf(1 - d / 2) for d in (0.05,)}
    monkeypatch.setattr(budget, "z_two_sided", lambda delta: table_z[delta])
    torch._dynamo.reset()
    q, k, v = _inputs(torch.float32, "cpu", seed=24)
    k_pool, v_pool, table = _page(k, v, 32, seed=25)
    seq_lens = torch.tensor(SEQ_LENS)
    cfg = VAttentionConfig(sink=4, local=8, heavy=0.05, base_rate=0.1)

    def step(q, k, v, seq_lens, table):
        return vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=77, block_table=table)

    expected = vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=77)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k_pool, v_pool,
                                                                   seq_lens, table)
    torch.testing.assert_close(got, expected)


def _cuda_paged_step(seed):
    q, k, v = _inputs(torch.bfloat16, "cuda", seed=seed)
    k_pool, v_pool, table = _page(k, v, 16, seed=seed + 1)
    return q, k, v, k_pool, v_pool, table


@cuda_only
def test_compile_fullgraph_paged_decode_on_cuda():
    q, k, v, k_pool, v_pool, table = _cuda_paged_step(60)
    seq_lens = torch.tensor(SEQ_LENS, device="cuda")
    seed = torch.tensor([9, 0], dtype=torch.int64, device="cuda")
    cfg = VAttentionConfig()
    compiled = torch.compile(lambda q, k, v, table: vattention.decode(
        q, k, v, cfg, seq_lens=seq_lens, seed=seed, block_table=table), fullgraph=True)
    torch.testing.assert_close(compiled(q, k_pool, v_pool, table),
                               vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=seed))


@cuda_only
def test_paged_decode_never_syncs():
    q, _, _, k_pool, v_pool, table = _cuda_paged_step(30)
    seq_lens = torch.tensor(SEQ_LENS, device="cuda")
    seed = torch.tensor([3, 0], dtype=torch.int64, device="cuda")
    summary = build_key_summary(k_pool, block_table=table)
    cfg = VAttentionConfig()
    vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, seed=seed, block_table=table,
                      key_summary=summary)       # warm up allocator and caches
    k_new = torch.randn(BATCH, KV_HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
    with no_sync():
        update_key_summary(summary, k_new, seq_lens.clamp(max=LENGTH - 1), block_table=table)
        vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, seed=seed,
                          block_table=table, key_summary=summary)
        vattention.decode(q, k_pool, v_pool, VAttentionConfig(adaptive_heavy=True),
                          seq_lens=seq_lens, seed=None, return_stats=True, block_table=table,
                          key_summary=summary)


@cuda_only
def test_paged_cuda_graph_replays_new_tables_and_lengths():
    """Captured once with fixed shapes; replayed with a new pool content, table, lengths and
    seed, it gives the eager step of those inputs."""
    q, _, _, k_pool, v_pool, table = _cuda_paged_step(40)
    cfg = VAttentionConfig(selector="oracle")
    seq_lens = torch.tensor(SEQ_LENS, device="cuda")
    seed = torch.tensor([7, 0], dtype=torch.int64, device="cuda")
    static = [q, k_pool, v_pool, table, seq_lens]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, seed=seed,
                              block_table=table)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = vattention.decode(q, k_pool, v_pool, cfg, seq_lens=seq_lens, seed=seed,
                                     block_table=table)
    for trial in range(2):
        fresh_q, k, v, fresh_k, fresh_v, fresh_table = _cuda_paged_step(50 + trial)
        fresh_lens = torch.tensor([LENGTH - 100 * trial, 300 + trial, 1], device="cuda")
        for dst, src in zip(static, (fresh_q, fresh_k, fresh_v, fresh_table, fresh_lens)):
            dst.copy_(src)
        seed.copy_(torch.tensor([100 + trial, 0]))
        graph.replay()
        expected = vattention.decode(fresh_q, k, v, cfg, seq_lens=fresh_lens,
                                     seed=torch.tensor([100 + trial, 0], device="cuda"))
        torch.cuda.synchronize()
        torch.testing.assert_close(captured.float(), expected.float(), atol=1e-2, rtol=1e-2)
