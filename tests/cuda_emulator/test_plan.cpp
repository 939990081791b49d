// plan_lists under the emulator against plan_lists_cpu, output for output and bit for
// bit: counts and fractions, int32 / int64 / no lengths, list_heads 1 to 32, widths above
// the block's thread count and a width of zero; the dense fallback (dense_below) below,
// across and above the fixed width, every row dense, and its rows' lists checked against
// the rule itself ([0, n) ascending past the heavy columns, the count just covering it).
#include "emu_check.h"

#include "../../csrc/vattention/plan.h"

namespace vattention::emu_check {
namespace {

struct PlanBuffers {
  std::vector<int64_t> lengths_out, sink, local, window_end, heavy, n_residual;
  std::vector<int32_t> starts, ends, heavy_rows, pilot, det_counts, det_idx;
  PlanBuffers(const PlanListsParams& p, int32_t fill) {
    const int64_t lists = p.batch * p.list_heads;
    for (auto* v : {&lengths_out, &sink, &local, &window_end, &heavy}) v->assign(p.batch, fill);
    n_residual.assign(lists, fill);
    for (auto* v : {&starts, &ends, &heavy_rows, &pilot, &det_counts}) v->assign(lists, fill);
    det_idx.assign(lists * p.width(), fill);
  }
  void set(PlanListsParams* p) {
    p->lengths_out = lengths_out.data();
    p->sink = sink.data();
    p->local = local.data();
    p->window_end = window_end.data();
    p->heavy = heavy.data();
    p->n_residual = n_residual.data();
    p->starts_rows = starts.data();
    p->ends_rows = ends.data();
    p->heavy_rows = heavy_rows.data();
    p->pilot_wanted = pilot.data();
    p->det_counts = det_counts.data();
    p->det_idx = det_idx.data();
  }
  bool operator==(const PlanBuffers& o) const {
    return lengths_out == o.lengths_out && sink == o.sink && local == o.local &&
           window_end == o.window_end && heavy == o.heavy && n_residual == o.n_residual &&
           starts == o.starts && ends == o.ends && heavy_rows == o.heavy_rows &&
           pilot == o.pilot && det_counts == o.det_counts && det_idx == o.det_idx;
  }
};

void check_plan(const char* name, const double (&sizes)[kPlanSizes],
                const bool (&fractions)[kPlanSizes], int64_t batch, int64_t list_heads,
                int64_t length, int lengths_kind, uint32_t seed, int64_t dense_below = 0) {
  std::mt19937 rng(seed);
  std::vector<int64_t> l64(batch);
  std::vector<int32_t> l32(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = b < 3 ? b : int64_t(rng() % uint32_t(length + 1));  // 0, 1, 2, ragged
    l64[b] = n;
    l32[b] = int32_t(n);
  }
  PlanListsParams p{};
  p.lengths64 = lengths_kind == 0 ? l64.data() : nullptr;
  p.lengths32 = lengths_kind == 1 ? l32.data() : nullptr;
  p.length = length;
  p.batch = batch;
  p.list_heads = list_heads;
  for (int i = 0; i < kPlanSizes; ++i) {
    p.sizes[i] = sizes[i];
    p.fractions[i] = fractions[i];
  }
  // The bounds decode derives from the full length (sizes are monotone in it).
  p.sink_max = plan_detail::resolve(sizes[kPlanSink], fractions[kPlanSink], length);
  p.local_max = plan_detail::resolve(sizes[kPlanLocal], fractions[kPlanLocal], length);
  p.heavy_max = plan_detail::resolve(sizes[kPlanHeavy], fractions[kPlanHeavy], length);
  p.dense_below = dense_below;
  p.dense_max = plan_dense_max(length, dense_below, p.sink_max, p.local_max);
  PlanBuffers ref(p, 0x5a5a5a5a), got(p, 0x7b7b7b7b);
  ref.set(&p);
  plan_lists_cpu(p, 0, batch);
  got.set(&p);
  check_cuda(plan_lists_cuda(p, nullptr), "plan_lists_cuda");
  EXPECT(ref == got, "plan_lists %s (batch %lld, list_heads %lld, lengths %d): CUDA != CPU",
         name, (long long)batch, (long long)list_heads, lengths_kind);
  // A spot check of the rules themselves on row 1 (n = 1) where it applies.
  if (lengths_kind != 2 && batch > 1) {
    EXPECT(ref.sink[1] + ref.local[1] <= 1 && ref.window_end[1] == 1 - ref.local[1],
           "plan_lists %s: row of length 1 has sink %lld, local %lld", name,
           (long long)ref.sink[1], (long long)ref.local[1]);
  }
  // Every list against the fallback's rule: a dense row lists exactly 0 .. n - 1 in order
  // within its count (nothing valid past it), with an empty window; a sparse row's count
  // and columns are the dense_below = 0 ones (no entry in the extra columns).
  const int64_t width = p.width(), fixed = p.fixed_width();
  for (int64_t list = 0; list < batch * list_heads; ++list) {
    const int64_t b = list / list_heads;
    const int64_t n = lengths_kind == 2 ? length : l64[b];
    const int32_t* idx = ref.det_idx.data() + list * width;
    const int64_t count = ref.det_counts[list];
    const bool dense = dense_below > 0 && n <= dense_below;
    bool ok = count <= width;
    if (dense) {
      int64_t next = 0;
      for (int64_t c = 0; c < width && ok; ++c) {
        if (idx[c] < 0) continue;
        ok = c < count && idx[c] == next++;
      }
      ok = ok && next == n && count == (n <= fixed ? n : n + p.heavy_max) &&
           ref.heavy_rows[list] == 0 && ref.n_residual[list] == 0 && ref.pilot[list] == 0 &&
           ref.starts[list] == ref.ends[list] && ref.sink[b] + ref.local[b] == n;
    } else {
      ok = count == p.sparse_width();
      for (int64_t c = p.sparse_width(); c < width && ok; ++c) ok = idx[c] == -1;
    }
    EXPECT(ok, "plan_lists %s (dense_below %lld): list %lld (length %lld, %s) breaks the "
           "dense fallback's rule", name, (long long)dense_below, (long long)list,
           (long long)n, dense ? "dense" : "sparse");
    if (!ok) break;
  }
}

}  // namespace

void test_plan() {
  const double counts[kPlanSizes] = {128, 128, 256, 128};
  const bool all_counts[kPlanSizes] = {false, false, false, false};
  const double fracs[kPlanSizes] = {0.01 * (1.0 - 1e-12), 0.05, 0.1, 0.05};
  const bool all_fracs[kPlanSizes] = {true, true, true, true};
  const double mixed[kPlanSizes] = {3, 0.1, 0.03, 16};
  const bool mixed_fracs[kPlanSizes] = {false, true, true, false};
  const double none[kPlanSizes] = {0, 0, 0, 2};
  for (int kind = 0; kind < 3; ++kind) {
    check_plan("counts", counts, all_counts, 7, 8, 4099, kind, 1);
    check_plan("fractions", fracs, all_fracs, 9, 1, 131072, kind, 2);
    check_plan("mixed", mixed, mixed_fracs, 5, 4, 777, kind, 3);
    check_plan("nothing fixed", none, all_counts, 4, 2, 300, kind, 4);
  }
  if (!g_quick) check_plan("counts, many lists", counts, all_counts, 64, 32, 9000, 0, 5);
  // The dense fallback: a threshold above the fixed width (extra columns), below it (none),
  // at the full length (every row dense), with per-head-sized lists and fractions.
  for (int kind = 0; kind < 3; ++kind) {
    check_plan("counts, dense_below 2000", counts, all_counts, 9, 8, 4099, kind, 6, 2000);
    check_plan("counts, dense_below 100", counts, all_counts, 7, 2, 4099, kind, 7, 100);
    check_plan("fractions, every row dense", fracs, all_fracs, 6, 4, 3000, kind, 8, 3000);
    check_plan("mixed, dense_below 300", mixed, mixed_fracs, 8, 1, 777, kind, 9, 300);
  }
}

}  // namespace vattention::emu_check
