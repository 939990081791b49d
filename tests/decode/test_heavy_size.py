"""Adaptive heavy size (VAttentionConfig.heavy_candidates): decode against the float64
reference, the candidate maths of vattention.heavy_size on hand-made inputs, the stats, and
capture (torch.compile fullgraph)."""
import math

import pytest
import torch

import vattention
from tests.decode.test_decode import TOLERANCE, random_qkv
from tests.helpers import cuda_only, no_sync, peaked_inputs
from vattention import VAttentionConfig, heavy_size, ops, reference

CANDIDATES = (0.01, 0.02, 0.05, 0.1)


def _lists(stats, group, share, key):
    value = stats[key].cpu()
    return value[:, ::group] if share else value


@pytest.mark.parametrize("reuse_pilot", [True, False])
@pytest.mark.parametrize("rule,tail", [("ratio", "normal"), ("ratio", "chi2"),
                                       ("paper", "normal"), ("denominator", "normal")])
@pytest.mark.parametrize("group,share", [(4, True), (4, False), (1, False)])
def test_matches_reference(device, group, share, rule, tail, reuse_pilot):
    q, k, v = random_qkv(3, 2 * group, 2, 1900, 64, torch.float32, device, seed=5 + group)
    lengths = [1900, 700, 1]
    cfg = VAttentionConfig(sink=8, local=16, heavy_candidates=CANDIDATES, base_rate=64,
                           epsilon=0.2, delta=0.2, rule=rule, share_gqa=share,
                           reuse_pilot=reuse_pilot, tail=tail)
    out, stats = vattention.decode(q, k, v, cfg, seq_lens=torch.tensor(lengths), seed=11,
                                   return_stats=True)
    expected, traces = reference.decode(q.cpu(), k.cpu(), v.cpu(), cfg, seq_lens=lengths,
                                        seed=11, return_trace=True)
    error = (out.double().cpu() - expected).abs().max() / expected.abs().max()
    assert error < TOLERANCE[torch.float32], float(error)
    heavy = stats["heavy_indices"].cpu()
    budgets = _lists(stats, group, share, "budget")
    sizes, required = set(), stats["required"].cpu()
    for b, row_traces in enumerate(traces):
        for lst, trace in enumerate(row_traces):
            assert [int(i) for i in heavy[b, lst] if i >= 0] == trace.heavy
            assert int(budgets[b, lst]) == len(trace.sample)
            sizes.add(len(trace.heavy))
            for h, value in trace.required.items():
                if math.isfinite(value) and value > 1 and len(trace.sample) < len(trace.residual):
                    assert required[b, h].item() == pytest.approx(value, rel=1e-3, abs=1e-3)
    # The lists chose different sizes: the test exercises the choice, not one candidate.
    assert len(sizes) >= 3, sizes


def test_one_candidate_is_the_fixed_heavy_size(device):
    q, k, v = random_qkv(2, 8, 2, 1500, 64, torch.float32, device, seed=3)
    fixed = VAttentionConfig(sink=8, local=16, heavy=0.05, base_rate=64, epsilon=0.1, delta=0.1)
    adaptive = fixed.replace(heavy_candidates=(0.05,))
    out_f, stats_f = vattention.decode(q, k, v, fixed, seed=4, return_stats=True)
    out_a, stats_a = vattention.decode(q, k, v, adaptive, seed=4, return_stats=True)
    torch.testing.assert_close(out_a, out_f, atol=1e-5, rtol=1e-5)
    for key in ("budget", "pilot", "exact", "n_residual", "deterministic", "heavy_indices",
                "density", "relative_bytes"):
        assert torch.equal(stats_a[key], stats_f[key]), key


def test_stats_count_every_row_read(device):
    # Without reuse every kernel's rows are: fixed + T_0, T_chosen minus T_0, the pilot, the
    # sample (all valid entries, duplicates counted): relative_bytes is that over 2 n.
    q, k, v = random_qkv(1, 4, 4, 2000, 64, torch.float32, device, seed=9)
    cfg = VAttentionConfig(sink=16, local=16, heavy_candidates=(16, 64, 256), base_rate=64,
                           epsilon=0.1, delta=0.1, reuse_pilot=False, share_gqa=False,
                           selector="oracle")
    out, stats = vattention.decode(q, k, v, cfg, seed=2, return_stats=True)
    rows = stats["deterministic"] + stats["pilot"] + stats["budget"]
    selector = 0.5                                     # the oracle reads K once per group
    torch.testing.assert_close(stats["relative_bytes"].double(),
                               selector + rows.double() / 2000, rtol=1e-6, atol=0)
    heavy = (stats["heavy_indices"] >= 0).sum(-1)
    assert torch.equal(stats["deterministic"], 32 + heavy)
    assert torch.equal(stats["n_residual"], 2000 - 32 - heavy)
    assert (stats["density"] <= rows.float() / 2000 + 1e-6).all()


def test_plan_takes_the_cheapest_candidate_and_the_smallest_on_a_tie():
    # 3 candidates, 1 batch row, 2 lists of 1 head: m = 10, 50, 100; n_r = 1000 - m.
    heavy = torch.tensor([10, 50, 100])[:, None, None].expand(-1, 1, 2)
    n_r = 1000 - heavy
    p = torch.tensor([60, 55, 50])[:, None, None].expand(-1, 1, 2)
    # list 0: budgets 500 / 100 / 80 -> costs 10+440, 50+45, 100+30: candidate 1.
    # list 1: 40 / 40 / nan -> costs 10+0, 50+0, 100+900: candidate 0 (min_samples 32 < p).
    required = torch.tensor([[500.0, 40.0], [100.0, 40.0], [80.0, math.nan]],
                            dtype=torch.float64)[:, None, :]
    wanted, exact, choice = heavy_size.plan(required, p, n_r, heavy, 32, True, 1)
    assert choice.tolist() == [1, 0]
    assert exact.tolist() == [[False, False], [False, False], [False, True]]
    assert wanted[:, 0].tolist() == [500, 100, 80]
    # Without reuse the pilot's draws are not subtracted: list 0 costs 510, 150, 180.
    _, _, choice = heavy_size.plan(required, p, n_r, heavy, 32, False, 1)
    assert choice.tolist() == [1, 0]
    # Fewer than two draws in R_c: no variance, so R_c exactly whatever the budget says.
    few = p.clone()
    few[2] = 1
    _, exact, _ = heavy_size.plan(required.nan_to_num(1.0), few, n_r, heavy, 32, True, 1)
    assert exact[2].tolist() == [True, True]
    # Shared lists: the budget is the max over the list's heads.
    shared = torch.tensor([[[100.0, 300.0]], [[200.0, 200.0]]], dtype=torch.float64)
    wanted, _, choice = heavy_size.plan(shared, p[:2, :, :2], n_r[:2, :, :2], heavy[:2, :, :1],
                                        32, True, 2)
    assert wanted.tolist() == [[300.0], [200.0]]
    assert choice.tolist() == [1]                 # 10 + 240 > 50 + 145


def test_bands_merge_to_the_statistics_of_their_union():
    q, k, v = random_qkv(1, 2, 2, 300, 32, torch.float32, "cpu", seed=1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 300, (1, 2, 40), generator=g, dtype=torch.int32)
    band = torch.randint(1, 4, (1, 2, 40), generator=g)
    counts = torch.full((1, 2), 40, dtype=torch.int32)
    bands = [ops.pilot_stats(q, k, v, torch.where(band == b, idx, -1), counts, 0.3)
             for b in (1, 2, 3)]
    max_logit, moments, vector = heavy_size.merge_bands(bands)
    for c in range(3):
        union = torch.where(band > c, idx, -1)
        m, mom, vec = ops.pilot_stats(q, k, v, union, counts, 0.3)
        if c == 2 and not (band == 3).any():
            continue
        shift = torch.exp(max_logit[c] - m.double())
        torch.testing.assert_close(mom[..., 0].double(), moments[c][..., 0] * shift, rtol=1e-5,
                                   atol=0)
        torch.testing.assert_close(vec.double(), vector[c] * torch.stack(
            [shift, shift ** 2], -1)[..., None], rtol=1e-4, atol=1e-6)


def test_members_and_depth():
    heavy = [torch.tensor([[3, 9, -1, -1]], dtype=torch.int32),
             torch.tensor([[3, 5, 9, 20]], dtype=torch.int32)]
    pilot = torch.tensor([[5, 7, 20, -1, 5]], dtype=torch.int32)
    assert heavy_size.members(pilot, heavy[1], 30).tolist() == [[True, False, True, False, True]]
    depth = heavy_size.pilot_depth(pilot, pilot >= 0, heavy, 30)
    assert depth.tolist() == [[1, 2, 1, -1, 1]]


def test_config_checks_the_candidates():
    assert VAttentionConfig(heavy_candidates=[0.01, 0.1]).heavy_candidates == (0.01, 0.1)
    for bad, match in (((0.1, 0.05), "strictly increasing"), ((16, 0.1), "all int counts"),
                       ((0.1, 1.5), "fraction"), (0.1, "tuple of sizes"), ((-3,), ">= 0")):
        with pytest.raises(ValueError, match=match):
            VAttentionConfig(heavy_candidates=bad)
    with pytest.raises(ValueError, match="gqa_heavy='max'"):
        VAttentionConfig(heavy_candidates=(0.1,), gqa_heavy="union")


def test_adaptive_compiles_fullgraph():
    torch._dynamo.reset()
    q, k, v = random_qkv(2, 4, 1, 600, 64, torch.float32, "cpu", seed=5)
    cfg = VAttentionConfig(sink=4, local=8, heavy_candidates=(8, 32, 64), base_rate=32)

    def step(q, k, v):
        return vattention.decode(q, k, v, cfg, seed=77)

    expected = step(q, k, v)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(got, expected)


def test_nan_reaches_the_heads_that_read_it(device):
    # A NaN in the V row ranked just beyond the smallest candidate: the chosen set holds it
    # (then the extra exact pass reads it), the pilot draws it (budget NaN: R_0 exactly), or
    # no kernel reads it. decode and the reference agree on which heads see it.
    q, k, v = (t.to(device) for t in peaked_inputs(2, 4, 1200, torch.float32, 21))
    cfg = VAttentionConfig(sink=8, local=8, heavy_candidates=(4, 16, 64), base_rate=32,
                           epsilon=0.1, delta=0.1, share_gqa=False)
    scores = torch.einsum("bhd,bhnd->bhn", q, k).cpu()
    window = scores[..., 8:1192]
    order = window.argsort(dim=-1, descending=True)
    v = v.clone()
    for b in range(2):
        for h in range(4):
            v[b, h, 8 + int(order[b, h, 4 + (b * 4 + h) % 12]), 0] = math.nan
    out, stats = vattention.decode(q, k, v, cfg, seed=3, return_stats=True)
    expected = reference.decode(q.cpu(), k.cpu(), v.cpu(), cfg, seed=3)
    nan = torch.isnan(out.cpu()).any(-1)
    assert torch.equal(nan, torch.isnan(expected).any(-1))
    assert nan.any() and not nan.all()
    assert torch.isfinite(out.cpu()[~nan]).all()


@cuda_only
def test_cuda_adaptive_never_syncs_and_replays_in_a_graph():
    cfg = VAttentionConfig(sink=16, local=16, heavy_candidates=(0.01, 0.03, 0.1),
                           base_rate=64, epsilon=0.1, delta=0.1)
    static = [t.cuda() for t in peaked_inputs(2, 4, 4096, torch.float32, 3)]
    seq_lens = torch.tensor([4096, 3000])
    seed = torch.tensor([5, 0], dtype=torch.int64, device="cuda")

    def step():
        return vattention.decode(*static, cfg, seq_lens=seq_lens, seed=seed, return_stats=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    with no_sync():
        step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, captured_stats = step()
    for dst, src in zip(static, peaked_inputs(2, 4, 4096, torch.float32, 11)):
        dst.copy_(src)
    graph.replay()
    expected, stats = step()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected, atol=1e-4, rtol=0)
    assert torch.equal(captured_stats["heavy_indices"], stats["heavy_indices"])
