"""Ops plan_budget and residual_center (csrc/vattention/budget.h) against the float64 torch
maths of vattention.budget that the fixed decode path ran before them (estimate,
required_samples, effective_dimension / chi2_factor, then the NaN-pilot and enumerated-pilot
exact fallbacks, min_samples, the max over a list's heads and the pilot reuse): every rule and
tail, GQA groups, reuse on and off, random and edge inputs (empty residual, a pilot that
enumerated its residual, NaN pilot statistics, empty parts, zero and negative tau), the
argument checks, opcheck, and the launch count of a decode step's budget stage."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import vattention
from vattention import budget, ops
from tests.helpers import assert_close_scaled, gen

F64, I32, I64 = torch.float64, torch.int32, torch.int64
RULES = ("ratio", "paper", "denominator")


def _per_head(values, batch, list_heads, q_heads):
    values = values.reshape(batch, list_heads)
    return values.repeat_interleave(q_heads // list_heads, dim=1)


def reference_plan(det_out, det_lse, pilot_max, moments, vector_moments, pilot_counts,
                   n_residual, rule, epsilon, delta, min_samples, reuse_pilot, dispersion=None):
    """The fixed path's budget block as decode wrote it in torch before the op."""
    batch, q_heads, _ = det_out.shape
    list_heads = pilot_counts.numel() // batch
    n_residual_heads = _per_head(n_residual, batch, list_heads, q_heads)
    pilot_heads = _per_head(pilot_counts, batch, list_heads, q_heads)
    estimate = budget.estimate(det_out, det_lse, pilot_max, moments, vector_moments,
                               pilot_heads, n_residual_heads)
    effective_dim = None if dispersion is None else budget.effective_dimension(dispersion)
    required = budget.required_samples(rule, estimate, n_residual_heads, pilot_heads, epsilon,
                                       delta, effective_dim=effective_dim)
    pilot_nan = (torch.isnan(pilot_max) | torch.isnan(moments).any(-1)
                 | torch.isnan(vector_moments).flatten(-2).any(-1))
    required = torch.where(pilot_nan, torch.full_like(required, math.nan), required)
    n_residual_f = n_residual_heads.to(F64)
    attend_exactly = (pilot_heads.to(F64) >= n_residual_f) | torch.isnan(required)
    wanted = torch.where(attend_exactly, n_residual_f, required.clamp(min=float(min_samples)))
    wanted = torch.minimum(torch.ceil(wanted), n_residual_f)
    wanted_lists = wanted.view(batch, list_heads, -1).amax(dim=2).reshape(-1)
    exact_lists = wanted_lists >= n_residual.to(F64)
    reused = torch.zeros_like(pilot_counts)
    final_wanted = wanted_lists
    if reuse_pilot:
        reused = torch.where(exact_lists, torch.zeros_like(pilot_counts), pilot_counts)
        final_wanted = torch.where(exact_lists, wanted_lists,
                                   (wanted_lists - reused.to(F64)).clamp(min=0.0))
    return (final_wanted.to(I32), reused, exact_lists, required, n_residual_heads,
            estimate.o_hat)


def make_inputs(batch, q_heads, list_heads, dim, seed, edge=True, value_shift=0.0):
    """Pilot statistics of real draws (weights exp(s - max) of a pilot of p uniform rows,
    values around a per-head offset), so the spread is consistent; with edge, one edge case
    per list by list index (see EDGE)."""
    g = gen(seed)
    group = q_heads // list_heads
    lists = batch * list_heads
    n_residual = torch.randint(40, 4000, (lists,), generator=g, dtype=I64)
    pilot_counts = torch.randint(2, 48, (lists,), generator=g, dtype=I32)
    heads = batch * q_heads
    det_out = torch.randn(heads, dim, generator=g)
    det_lse = torch.rand(heads, generator=g) * 4 - 1
    pilot_max = torch.empty(heads)
    moments = torch.zeros(heads, 3)
    vector_moments = torch.zeros(heads, 2, dim)
    if edge:
        kinds = torch.arange(lists) % len(EDGE)
        n_residual[kinds == EDGE.index("empty")] = 0
        pilot_counts[kinds == EDGE.index("empty")] = 0
        n_residual[kinds == EDGE.index("enumerated")] = 30
        pilot_counts[kinds == EDGE.index("enumerated")] = 30
        pilot_counts[kinds == EDGE.index("one_draw")] = 1
    for h in range(heads):
        p = int(pilot_counts[h // group])
        s = torch.rand(p, generator=g) * 6
        values = (torch.randn(p, dim, generator=g) * 0.5 + (1.5 if h % 3 == 0 else 0.2)
                  + value_shift)
        pilot_max[h] = s.max() if p else -math.inf
        w = torch.exp(s - s.max()) if p else s
        moments[h, 0], moments[h, 1] = w.sum(), (w * w).sum()
        moments[h, 2] = (w * w * (values * values).sum(-1)).sum()
        vector_moments[h, 0] = (w[:, None] * values).sum(0)
        vector_moments[h, 1] = (w[:, None] ** 2 * values).sum(0)
    a = torch.rand(heads, generator=g) * 10
    fourth = a * a * torch.rand(heads, generator=g) * 0.3
    pairs = a * a * torch.rand(heads, generator=g) * 0.05   # h = 0.25 (A^2 - C) / pairs: 1 .. 100s
    dispersion = torch.stack([a, fourth + pairs, fourth], -1)
    if edge:
        for l in range(lists):
            kind = EDGE[l % len(EDGE)]
            first, last = l * group, (l + 1) * group - 1
            if kind == "nan_logit":
                pilot_max[last] = math.nan
            elif kind == "nan_moment":
                moments[first, 2] = math.nan
            elif kind == "nan_vector":
                vector_moments[last, 1, dim - 1] = math.nan
            elif kind == "empty_det":
                det_lse[first:last + 1] = -math.inf
            elif kind == "no_pilot_weight":
                pilot_max[first:last + 1] = -math.inf
                moments[first:last + 1] = 0
                vector_moments[first:last + 1] = 0
            elif kind == "tiny_output":      # |O^| below its error: tau < 0, inf budget
                det_out[first] = 0
                vector_moments[first] *= 1e-30
            elif kind == "no_pairs":         # dispersion B == C, and a NaN one
                dispersion[first:last + 1, 1] = dispersion[first:last + 1, 2]
                dispersion[last, 0] = math.nan
            elif kind == "inf_logit":        # an overflowed logit: inf scale, inf / inf
                pilot_max[first] = math.inf
            elif kind == "huge_det":         # Z^ and N^ overflow to inf
                det_lse[first] = 3e38
                moments[last] = 3e38
            elif kind == "huge_dim":         # h far above the table: its last entry
                dispersion[first:last + 1, 2] = 1.0
                dispersion[first:last + 1, 1] = 1.0 + 2.0 ** -20
    shape = (batch, q_heads)
    return (det_out.view(*shape, dim), det_lse.view(shape), pilot_max.view(shape),
            moments.view(*shape, 3), vector_moments.view(*shape, 2, dim), pilot_counts,
            n_residual, dispersion.view(*shape, 3))


EDGE = ("plain", "empty", "enumerated", "one_draw", "nan_logit", "nan_moment", "nan_vector",
        "empty_det", "no_pilot_weight", "tiny_output", "no_pairs", "huge_dim", "inf_logit",
        "huge_det")


def _run_both(device, inputs, rule, chi2, reuse, epsilon=0.07, delta=0.05, min_samples=32):
    det_out, det_lse, pilot_max, moments, vector_moments, counts, n_res, dispersion = inputs
    disp = dispersion if chi2 else None
    ref = reference_plan(det_out, det_lse, pilot_max, moments, vector_moments, counts, n_res,
                         rule, epsilon, delta, min_samples, reuse, disp)
    args = [t.to(device) for t in inputs]
    got = budget.plan_fixed_budget(*args[:7], rule, epsilon, delta, min_samples, reuse,
                                   args[7] if chi2 else None)
    return ref, got


def _assert_plan_equal(ref, got):
    final_wanted, reused, exact, required, n_heads, _ = ref
    required_got = got.required.cpu()
    assert got.final_wanted.dtype == I32 and got.reused.dtype == I32
    assert got.exact.dtype == torch.bool and got.required.dtype == F64
    assert got.n_residual_heads.dtype == I64
    assert torch.equal(torch.isnan(required_got), torch.isnan(required))
    assert torch.equal(torch.isinf(required_got), torch.isinf(required))
    # 1e-12 of the tensor's scale: the spread is a difference of moments (cancellation),
    # whose D-sums run in another order in torch.
    assert_close_scaled(required_got, required, rtol=1e-12, name="required")
    assert torch.equal(got.n_residual_heads.cpu(), n_heads)
    assert torch.equal(got.exact.cpu(), exact)
    assert torch.equal(got.reused.cpu(), reused)
    assert torch.equal(got.final_wanted.cpu(), final_wanted)


CASES = [(rule, chi2) for rule in RULES for chi2 in (False, True) if rule == "ratio" or not chi2]


@pytest.mark.parametrize("rule,chi2", CASES)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("reuse", [False, True])
def test_plan_budget_matches_torch_maths(device, rule, chi2, group, reuse):
    inputs = make_inputs(batch=4, q_heads=4 * group, list_heads=4, dim=24,
                         seed=10 * group + 2 * int(chi2) + int(reuse))
    ref, got = _run_both(device, inputs, rule, chi2, reuse)
    _assert_plan_equal(ref, got)
    exact = got.exact.cpu()
    kinds = [EDGE[l % len(EDGE)] for l in range(exact.numel())]
    # Not vacuous: the edge lists take the fallbacks, the plain ones sample.
    for l, kind in enumerate(kinds):
        if kind in ("empty", "enumerated", "nan_logit", "nan_moment", "nan_vector"):
            assert exact[l], (l, kind)
    assert not exact.all()
    if rule == "ratio" and not chi2:
        first = kinds.index("tiny_output") * group
        assert torch.isinf(got.required.view(-1)[first]).item()


@pytest.mark.parametrize("rule,epsilon", [("ratio", 0.1), ("paper", 0.3), ("denominator", 0.1)])
def test_plan_budget_random_without_edges(device, rule, epsilon):
    """Plain lists at an (epsilon, delta) where the budgets land between min_samples and n_r,
    where a ceil off by one would show."""
    inputs = make_inputs(batch=4, q_heads=8, list_heads=2, dim=64, seed=3, edge=False,
                         value_shift=1.0)
    for reuse in (False, True):
        ref, got = _run_both(device, inputs, rule, False, reuse, epsilon=epsilon, delta=0.2,
                             min_samples=4)
        _assert_plan_equal(ref, got)
        wanted = got.final_wanted.cpu()
        if not reuse:
            assert ((wanted > 4) & (wanted < inputs[6])).sum() >= 4, wanted


def test_plan_budget_gqa_takes_the_max_over_heads(device):
    """One head's NaN (or larger budget) decides its whole list: the per-list max."""
    inputs = list(make_inputs(batch=1, q_heads=8, list_heads=2, dim=16, seed=5, edge=False,
                              value_shift=1.0))
    inputs[2][0, 3] = math.nan           # list 0's last head
    ref, got = _run_both(device, inputs, "ratio", False, True, epsilon=0.1)
    _assert_plan_equal(ref, got)
    assert got.exact.cpu().tolist() == [True, False]
    assert got.reused.cpu()[0] == 0 and got.reused.cpu()[1] == inputs[5][1]
    per_head = torch.minimum(torch.ceil(got.required.cpu()[0, 4:].clamp(min=32)),
                             inputs[6][1].to(F64))
    assert per_head.max() > per_head.min()
    assert got.final_wanted.cpu()[1] == int(per_head.max()) - int(inputs[5][1])


def test_residual_center_matches_estimate(device):
    inputs = make_inputs(batch=2, q_heads=8, list_heads=2, dim=40, seed=9)
    ref = reference_plan(*inputs[:7], "ratio", 0.1, 0.1, 32, True)
    got = ops.residual_center(*[t.to(device) for t in inputs[:7]]).cpu()
    assert got.dtype == torch.float32 and got.shape == ref[-1].shape
    want = ref[-1].to(torch.float32)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    # float64 maths rounded once to float32: equal up to that last rounding.
    torch.testing.assert_close(got[finite], want[finite], rtol=2.0 ** -23, atol=0)


def test_rule_z_is_required_samples_z():
    assert budget.rule_z("ratio", 0.05) == budget.z_two_sided(0.05)
    assert budget.rule_z("paper", 0.05) == budget.z_two_sided(0.025)
    assert budget.rule_z("denominator", 0.05) == budget.z_one_sided(0.05)
    with pytest.raises(ValueError, match="rule"):
        budget.rule_z("oracle", 0.05)


def _good_args():
    inputs = make_inputs(batch=2, q_heads=4, list_heads=2, dim=8, seed=1)
    return list(inputs[:7]) + [None, None, "ratio", 0.1, 1.96, 0.25, 32, True], inputs[7]


@pytest.mark.parametrize("index,value,match", [
    (0, torch.zeros(2, 4, 8, dtype=F64), "det_out must be"),
    (1, torch.zeros(2, 3), "det_lse must have shape"),
    (3, torch.zeros(2, 4, 2), "moments must have shape"),
    (4, torch.zeros(2, 4, 1, 8), "vector_moments must have shape"),
    (5, torch.zeros(4, dtype=I64), "pilot_counts must be"),
    (5, torch.zeros(3, dtype=I32), "pilot_counts must hold"),
    (6, torch.zeros(4, dtype=I32), "n_residual must be"),
    (6, torch.full((4,), -1, dtype=I64), "n_residual must lie"),
    (9, "oracle", "rule must be"),
    (10, 0.0, "epsilon"),
    (11, math.inf, "z must be a finite"),
    (13, -1, "min_samples"),
])
def test_plan_budget_rejects_bad_arguments(index, value, match):
    args, _ = _good_args()
    args[index] = value
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vattention.plan_budget(*args)


def test_plan_budget_chi2_argument_checks():
    args, dispersion = _good_args()
    table = budget._chi2_table(0.1, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="dispersion and chi2_table go together"):
        torch.ops.vattention.plan_budget(*args[:7], dispersion, None, *args[9:])
    with pytest.raises(RuntimeError, match="ratio rule only"):
        torch.ops.vattention.plan_budget(*args[:7], dispersion, table, "paper", *args[10:])
    with pytest.raises(RuntimeError, match="chi2_table must be"):
        torch.ops.vattention.plan_budget(*args[:7], dispersion, table.float(), *args[9:])
    with pytest.raises(RuntimeError, match="dispersion must have shape"):
        torch.ops.vattention.plan_budget(*args[:7], dispersion[:, :, :2].contiguous(), table,
                                         *args[9:])


@pytest.mark.parametrize("chi2", [False, True])
def test_opcheck(device, chi2):
    args, dispersion = _good_args()
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    if chi2:
        args[7] = dispersion.to(device)
        args[8] = budget._chi2_table(0.1, device)
    torch.library.opcheck(torch.ops.vattention.plan_budget.default, tuple(args))
    torch.library.opcheck(torch.ops.vattention.residual_center.default, tuple(args[:7]))


@pytest.mark.parametrize("tail,ops_in_budget", [("normal", 1), ("chi2", 3)])
def test_decode_budget_stage_launches(tail, ops_in_budget):
    """The fixed path's budget stage dispatches one op (three with the chi-square tail:
    residual_center, pilot_dispersion, plan_budget) where it dispatched about a hundred."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "launch_count.py"
    spec = importlib.util.spec_from_file_location("launch_count", path)
    launch_count = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_count)

    g = gen(4)
    q = torch.randn(1, 8, 32, generator=g)
    k = torch.randn(1, 2, 1024, 32, generator=g)
    v = torch.randn(1, 2, 1024, 32, generator=g)
    cfg = vattention.VAttentionConfig(tail=tail)
    counter = launch_count.count_stages(
        lambda timer: vattention.decode(q, k, v, cfg, seed=3, stage_timer=timer))
    assert counter.stages["budget"] == ops_in_budget, counter.stages
