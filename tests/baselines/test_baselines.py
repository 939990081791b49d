"""Matched-density baselines (vattention.baselines) against the float64 reference."""
import math

import pytest
import torch

import vattention
from vattention import baselines, reference
from vattention.config import VAttentionConfig
from vattention.coverage import synthetic_heads


def _inputs(batch=2, q_heads=6, kv_heads=2, length=300, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    return q, k, v


def _estimate64(q, k, v, sel, seq_lens=None, scale=None):
    """sum_i w_i exp(s_i) V_i / sum_i w_i exp(s_i) over the selection, in float64."""
    batch, q_heads, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    lists = sel.read.shape[1]
    scale = 1 / math.sqrt(dim) if scale is None else scale
    out = torch.zeros(batch, q_heads, dim, dtype=torch.float64)
    z = torch.zeros(batch, q_heads, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            kv = h // group
            lst = kv if lists == kv_heads else h
            logw = sel.log_weights[b, lst].double()
            s = scale * (k[b, kv].double() @ q[b, h].double()) + logw
            p = torch.exp(s - s.max())
            out[b, h] = (p[:, None] * v[b, kv].double()).sum(0) / p.sum()
            z[b, h] = torch.exp(s).sum()
    return out, z


@pytest.mark.parametrize("share_gqa", [True, False])
def test_select_topk_matches_reference_without_sample(share_gqa):
    q, k, v = _inputs()
    seq_lens = torch.tensor([300, 211])
    sink, local, count = 7, 13, 60
    out, sel = baselines.topk_attention(q, k, v, count, sink=sink, local=local, seq_lens=seq_lens,
                                        share_gqa=share_gqa, return_selection=True)
    lists = k.shape[1] if share_gqa else q.shape[1]
    # The reference's own heavy set, attended alone: the sample of 0 tokens is empty (the
    # rule only sizes the overridden budget: "denominator" keeps it finite).
    cfg = VAttentionConfig(sink=sink, local=local, heavy=count - sink - local, share_gqa=share_gqa,
                           rule="denominator", selector="oracle")
    expected, traces = reference.decode(q, k, v, cfg, seq_lens=seq_lens, return_trace=True,
                                        budget_override=[[0] * lists] * 2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for b in range(2):
        for lst in range(lists):
            read = sel.read[b, lst].nonzero().flatten().tolist()
            assert read == traces[b][lst].deterministic
            assert len(read) == count
    assert not sel.sampled.any()


@pytest.mark.parametrize("share_gqa", [True, False])
def test_topk_ranks_by_rank_k_and_attends_the_exact_keys(share_gqa):
    # A top-k charged for a cheap selector (bench_bytes: the int4 summary) ranks by those
    # keys; what it then attends must still be the exact K rows it chose.
    q, k, v = _inputs()
    seq_lens = torch.tensor([300, 211])
    args = dict(sink=7, local=13, seq_lens=seq_lens, share_gqa=share_gqa, return_selection=True)
    out, sel = baselines.topk_attention(q, k, v, 60, **args)
    same, same_sel = baselines.topk_attention(q, k, v, 60, rank_k=k.clone(), **args)
    assert torch.equal(same_sel.read, sel.read) and torch.equal(same, out)
    flipped, flipped_sel = baselines.topk_attention(q, k, v, 60, rank_k=-k, **args)
    assert not torch.equal(flipped_sel.read, sel.read)
    assert (flipped_sel.read.sum(-1) == 60).all()
    assert not flipped_sel.read[1, :, 211:].any()       # never past a row's length
    expected, _ = _estimate64(q, k, v, flipped_sel, seq_lens=seq_lens)
    torch.testing.assert_close(flipped.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank_k"):
        baselines.topk_attention(q, k, v, 60, rank_k=k[:, :, :10])


@pytest.mark.parametrize("fn", [baselines.topk_attention, baselines.uniform_attention])
def test_full_count_is_dense(fn):
    q, k, v = _inputs(length=200)
    seq_lens = torch.tensor([200, 150])
    out = fn(q, k, v, 10_000, sink=16, local=16, seq_lens=seq_lens)
    torch.testing.assert_close(out.double(), reference.dense(q, k, v, seq_lens=seq_lens),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(fn(q, k, v, 1.0, sink=0, local=0), fn(q, k, v, 200, sink=0, local=0))


@pytest.mark.parametrize("share_gqa", [True, False])
def test_uniform_sample_and_weights(share_gqa):
    q, k, v = _inputs(length=400)
    seq_lens = torch.tensor([400, 333])
    sink, local, count = 10, 20, 70
    out, sel = baselines.uniform_attention(q, k, v, count, sink=sink, local=local,
                                           seq_lens=seq_lens, share_gqa=share_gqa, seed=(3, 9),
                                           return_selection=True)
    expected, _ = _estimate64(q, k, v, sel)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for b, n in enumerate(seq_lens.tolist()):
        n_r = n - sink - local
        b_count = count - sink - local
        for lst in range(sel.read.shape[1]):
            sampled = sel.sampled[b, lst].nonzero().flatten()
            assert len(sampled) == b_count
            assert int(sampled.min()) >= sink and int(sampled.max()) < n - local
            torch.testing.assert_close(sel.log_weights[b, lst, sampled],
                                       torch.full((b_count,), math.log(n_r / b_count)))
            fixed = list(range(sink)) + list(range(n - local, n))
            assert sel.read[b, lst].nonzero().flatten().tolist() == sorted(
                fixed + sampled.tolist())
            assert (sel.log_weights[b, lst, fixed] == 0).all()
            assert not sel.read[b, lst, n:].any()


def test_uniform_is_unbiased():
    # Horvitz-Thompson: E[Z^] = Z and E[N^] = N over the sample.
    q, k, v = _inputs(batch=1, q_heads=2, kv_heads=1, length=500, dim=8, seed=1)
    trials = 3000
    qq = q.expand(trials, -1, -1)
    kk, vv = k.expand(trials, -1, -1, -1), v.expand(trials, -1, -1, -1)
    _, sel = baselines.uniform_attention(qq, kk, vv, 60, sink=4, local=4, seed=0,
                                         return_selection=True)
    scale = 1 / math.sqrt(8)
    s = scale * torch.einsum("hd,nd->hn", q[0].double(), k[0, 0].double())      # [H, n]
    weights = torch.exp(sel.log_weights[:, 0].double())                         # [T, n]
    z_hat = weights @ torch.exp(s).T                                            # [T, H]
    n_hat = torch.einsum("tn,hn,nd->thd", weights, torch.exp(s), v[0, 0].double())
    z = torch.exp(s).sum(-1)
    n = torch.exp(s) @ v[0, 0].double()
    se_z = z_hat.std(0) / math.sqrt(trials)
    assert ((z_hat.mean(0) - z).abs() < 4 * se_z).all()
    se_n = n_hat.std(0) / math.sqrt(trials)
    assert ((n_hat.mean(0) - n).abs() < 4 * se_n + 1e-9).all()


def test_uniform_seeds():
    q, k, v = _inputs()
    a = baselines.uniform_attention(q, k, v, 50, sink=4, local=4, seed=5)
    assert torch.equal(a, baselines.uniform_attention(q, k, v, 50, sink=4, local=4, seed=5))
    assert not torch.equal(a, baselines.uniform_attention(q, k, v, 50, sink=4, local=4, seed=6))
    assert not torch.equal(a, baselines.uniform_attention(q, k, v, 50, sink=4, local=4,
                                                          seed=(5, 1)))
    torch.manual_seed(0)
    b = baselines.uniform_attention(q, k, v, 50, sink=4, local=4)
    torch.manual_seed(0)
    assert torch.equal(b, baselines.uniform_attention(q, k, v, 50, sink=4, local=4))
    with pytest.raises(ValueError, match="seed"):
        baselines.uniform_attention(q, k, v, 50, seed=-1)


def test_matched_counts_give_vattention_density():
    q, k, v = synthetic_heads("peaked", 3, 2000, 64, torch.Generator().manual_seed(2))
    q = q.repeat_interleave(2, dim=1) * torch.tensor([1.0, 0.5]).repeat(3)[None, :, None]  # GQA 2
    cfg = VAttentionConfig(sink=32, local=32, heavy=0.05)
    seq_lens = torch.tensor([1800])
    _, stats = vattention.decode(q, k, v, cfg, seq_lens=seq_lens, seed=1, return_stats=True)
    counts = baselines.matched_counts(stats, seq_lens=seq_lens)
    assert counts.shape == (1, 6)
    for method in (baselines.TopK, baselines.UniformSample):
        out, got = method(counts, sink=32, local=32).decode(q, k, v, seq_lens=seq_lens, seed=(1, 0),
                                                            return_stats=True)
        assert out.shape == q.shape
        torch.testing.assert_close(got["density"], stats["density"])
    sampled = baselines.UniformSample(counts, sink=32, local=32).decode(
        q, k, v, seq_lens=seq_lens, seed=0, return_stats=True)[1]["budget"]
    assert torch.equal(sampled, counts - 64)   # everything beyond sink and local is sampled
    with pytest.raises(ValueError, match="seq_lens or length"):
        baselines.matched_counts(stats)


def test_select_topk_beats_uniform_on_peaked_heads():
    q, k, v = synthetic_heads("peaked", 4, 4000, 64, torch.Generator().manual_seed(0))
    exact = reference.dense(q, k, v)
    errors = {}
    for name, fn in (("topk", baselines.topk_attention), ("uniform", baselines.uniform_attention)):
        out = fn(q, k, v, 0.1, sink=64, local=64, share_gqa=False, **(
            {"seed": 0} if name == "uniform" else {}))
        errors[name] = ((out.double() - exact).norm(dim=-1) / exact.norm(dim=-1)).mean()
    assert errors["topk"] < errors["uniform"]


def test_bad_inputs():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="must be"):
        baselines.topk_attention(q[0], k, v, 10)
    with pytest.raises(ValueError, match="multiple of kv_heads|does not match"):
        baselines.topk_attention(q[:, :5], k, v, 10)
    with pytest.raises(ValueError, match="sizes"):
        baselines.topk_attention(q, k, v, 10, sink=-1)
    with pytest.raises(ValueError, match="seq_lens"):
        baselines.topk_attention(q, k, v, 10, seq_lens=torch.tensor([3]))
