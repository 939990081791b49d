"""Issue 8's launch budget: one default decode step dispatches at most 12 operations (non-view
ATen ops plus vattention ops, counted as benchmarks/launch_count.py counts them; on CUDA
each is at least one kernel launch). The CPU count is the one CI and every reader without a
GPU can see, and the CPU path runs the same fused ops as the CUDA path."""
import pytest
import torch

import vattention
from benchmarks.launch_count import count_stages
from vattention.key_summary import build_key_summary

MAX_LAUNCHES = 12


def _step_counter(cfg, seed, batch=2, q_heads=8, kv_heads=2, length=2048, dim=64, seq_lens=None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, q_heads, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=g) for _ in range(2))
    summary = build_key_summary(k) if cfg.selector == "int4" else None

    def step(timer=None):
        return vattention.decode(q, k, v, cfg, seed=seed, key_summary=summary,
                                 seq_lens=seq_lens, stage_timer=timer)

    step()
    return count_stages(step)


@pytest.mark.parametrize("seed", [torch.tensor([3, 0]), 3, None], ids=["tensor", "int", "none"])
@pytest.mark.parametrize("cfg", [vattention.VAttentionConfig(),
                                 vattention.VAttentionConfig(epsilon=0.1, delta=0.1,
                                                             selector="oracle"),
                                 vattention.VAttentionConfig(share_gqa=False)],
                         ids=["default", "oracle", "per-head-lists"])
def test_a_decode_step_dispatches_at_most_twelve_ops(cfg, seed):
    counter = _step_counter(cfg, seed)
    assert counter.total <= MAX_LAUNCHES, (counter.total, dict(counter.stage_ops))
    # Every stage of the pipeline ran (the count is not low because a stage was skipped).
    for stage in ("select_scores", "select_topk", "attend", "pilot", "budget", "sample",
                  "combine"):
        assert counter.stages[stage] >= 1, stage


def test_ragged_lengths_cost_no_extra_launch():
    counter = _step_counter(vattention.VAttentionConfig(), torch.tensor([3, 0]),
                            seq_lens=torch.tensor([2048, 700]))
    assert counter.total <= MAX_LAUNCHES, (counter.total, dict(counter.stage_ops))


@pytest.mark.parametrize("cfg", [vattention.VAttentionConfig(),
                                 vattention.VAttentionConfig(share_gqa=False)],
                         ids=["default", "per-head-lists"])
def test_the_heavy_list_is_written_in_place_not_copied(cfg):
    """select_topk_into writes the heavy columns of the deterministic list itself: the step
    dispatches no copy (gqa_heavy="union" still merges and copies)."""
    counter = _step_counter(cfg, torch.tensor([3, 0]))
    assert counter.ops["aten::copy_"] == 0, dict(counter.stage_ops)
    assert counter.stage_ops["select_topk"] == {"vattention::select_topk_into": 1}
