// Stage "plan": everything decode's fixed path derives from the valid lengths before
// select_topk, in one kernel (op plan_lists), instead of a few dozen tiny ATen ops a step.
//
// Per batch row b with n = lengths[b] (or `length` for every row when lengths is null),
// resolve(size, n) being config.resolve_sizes:
//   fraction: min(max(ceil(size * n), 0), n)   (size already slackened on the host)
//   count:    min(max(n, 0), max(size, 0))
//   sink = resolve(sink, n), local = min(resolve(local, n), n - sink)
//   window_end = n - local, heavy = min(resolve(heavy, n), window_end - sink)
// and per list l of row b (list_heads lists a row, row-major [B * list_heads]):
//   starts_rows = sink, ends_rows = window_end, heavy_rows = heavy,
//   n_residual = window_end - sink - heavy,
//   pilot_wanted = n_residual > 0 ? max(resolve(base_rate, n_residual), 2) : 0,
//   det_idx[b, l, :] = [0, 1, .., sink - 1, -1 ..  (sink_max columns)
//                       window_end, .., window_end + local - 1, -1 .. (local_max)
//                       -1 x heavy_max]           (select_topk's heavy list goes there)
//   det_counts[b, l] = sink_max + local_max + heavy_max.
// A row with 0 < dense_below and n <= dense_below (the dense fallback, decided here on the
// device) attends exactly to all its rows instead: sink = resolve(sink, n),
// local = n - sink, window_end = sink, heavy = n_residual = pilot_wanted = 0, and its
// det_idx holds 0, 1, .., n - 1 ascending, the heavy columns skipped:
//   det_idx[b, l, :] = [0 .. F - 1 (-1 from n on),  -1 x heavy_max,  F .. n - 1, -1 ..]
//   det_counts[b, l] = n <= F ? n : n + heavy_max              (F = sink_max + local_max)
// The last part is dense_max = max(min(length, dense_below) - F, 0) extra columns at the
// END of the list, so a row above the threshold keeps its columns, its count and so its
// attention bit for bit (its kernel reads none of the extra columns). The heavy columns
// stay where select_topk's list goes: that writes only -1 there for a dense row (heavy 0).
// The fraction counts are the ceil of one binary64 multiplication, like the host's
// resolve_size and torch's resolve_sizes (config._slackened): bit for bit the same counts,
// which matters because the host count at the buffer's length sizes every buffer.
#pragma once

#include "common.h"

namespace vattention {

enum PlanSize : int { kPlanSink = 0, kPlanLocal = 1, kPlanHeavy = 2, kPlanBaseRate = 3 };
constexpr int kPlanSizes = 4;

struct PlanListsParams {
  // Valid lengths [batch]: one of the two, or neither (every row `length`).
  const int64_t* lengths64;
  const int32_t* lengths32;
  int64_t length;
  int64_t batch;
  int64_t list_heads;
  double sizes[kPlanSizes];     // a count (fraction false) or a slackened fraction
  bool fractions[kPlanSizes];
  int64_t sink_max, local_max, heavy_max;
  int64_t dense_below;          // 0: off
  int64_t dense_max;            // the dense rows' extra columns (see above)
  // Outputs. Per batch row [batch]:
  int64_t* lengths_out;
  int64_t* sink;
  int64_t* local;
  int64_t* window_end;
  int64_t* heavy;
  // Per list [batch * list_heads]:
  int32_t* starts_rows;
  int32_t* ends_rows;
  int32_t* heavy_rows;
  int32_t* pilot_wanted;
  int64_t* n_residual;
  int32_t* det_counts;
  int32_t* det_idx;             // [batch * list_heads, width()]

  VATT_HD int64_t fixed_width() const { return sink_max + local_max; }
  VATT_HD int64_t sparse_width() const { return sink_max + local_max + heavy_max; }
  VATT_HD int64_t width() const { return sink_max + local_max + heavy_max + dense_max; }
};

// The extra columns the dense rows need past the fixed and heavy ones (a host int: the
// bound at the buffer's length, every dense row being at most min(length, dense_below)).
inline int64_t plan_dense_max(int64_t length, int64_t dense_below, int64_t sink_max,
                              int64_t local_max) {
  if (dense_below <= 0) return 0;
  const int64_t most = length < dense_below ? length : dense_below;
  return most > sink_max + local_max ? most - sink_max - local_max : 0;
}

namespace plan_detail {

// A lone multiplication (no addition that could be contracted into an FMA), rounded to
// nearest as in Python and torch.
VATT_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

VATT_HD int64_t resolve(double size, bool fraction, int64_t n) {
  if (fraction) {
    int64_t c = int64_t(::ceil(mul_rn(double(n), size)));
    c = c < 0 ? 0 : c;
    return c < n ? c : n;
  }
  const int64_t cap = size > 0 ? int64_t(size) : 0;
  const int64_t m = n < 0 ? 0 : n;
  return m < cap ? m : cap;
}

}  // namespace plan_detail

struct PlanRow {
  int64_t length, sink, local, window_end, heavy, n_residual;
  int32_t pilot_wanted;
  bool dense;
};

VATT_HD PlanRow plan_row(const PlanListsParams& p, int64_t b) {
  using plan_detail::resolve;
  PlanRow r;
  r.length = p.lengths64 ? p.lengths64[b] : (p.lengths32 ? int64_t(p.lengths32[b]) : p.length);
  const int64_t n = r.length;
  r.dense = p.dense_below > 0 && n <= p.dense_below;
  r.sink = resolve(p.sizes[kPlanSink], p.fractions[kPlanSink], n);
  const int64_t local = r.dense ? n : resolve(p.sizes[kPlanLocal], p.fractions[kPlanLocal], n);
  r.local = local < n - r.sink ? local : n - r.sink;
  r.window_end = n - r.local;
  // (A dense row's window is empty: heavy, residual and pilot come out 0.)
  const int64_t heavy = resolve(p.sizes[kPlanHeavy], p.fractions[kPlanHeavy], n);
  const int64_t window = r.window_end - r.sink;
  r.heavy = heavy < window ? heavy : window;
  r.n_residual = window - r.heavy;
  int64_t pilot = 0;
  if (r.n_residual > 0) {
    pilot = resolve(p.sizes[kPlanBaseRate], p.fractions[kPlanBaseRate], r.n_residual);
    pilot = pilot < 2 ? 2 : pilot;
  }
  r.pilot_wanted = int32_t(pilot);
  return r;
}

// Entry `col` of a list's det_idx row.
VATT_HD int32_t det_entry(const PlanListsParams& p, const PlanRow& r, int64_t col) {
  if (r.dense) {
    const int64_t fixed = p.fixed_width();
    if (col >= fixed && col < p.sparse_width()) return -1;
    const int64_t row = col < fixed ? col : col - p.heavy_max;
    return row < r.length ? int32_t(row) : -1;
  }
  if (col >= p.sparse_width()) return -1;
  if (col < p.sink_max) return col < r.sink ? int32_t(col) : -1;
  const int64_t j = col - p.sink_max;
  if (j < p.local_max) return j < r.local ? int32_t(r.window_end + j) : -1;
  return -1;
}

// The per-row outputs of row b (written once, by its first list).
VATT_HD void write_plan_row(const PlanListsParams& p, int64_t b, const PlanRow& r) {
  p.lengths_out[b] = r.length;
  p.sink[b] = r.sink;
  p.local[b] = r.local;
  p.window_end[b] = r.window_end;
  p.heavy[b] = r.heavy;
}

// The scalar outputs of list `list` (its det_idx row is written column by column).
VATT_HD void write_plan_list(const PlanListsParams& p, int64_t list, const PlanRow& r) {
  p.starts_rows[list] = int32_t(r.sink);
  p.ends_rows[list] = int32_t(r.window_end);
  p.heavy_rows[list] = int32_t(r.heavy);
  p.pilot_wanted[list] = r.pilot_wanted;
  p.n_residual[list] = r.n_residual;
  int64_t count = p.sparse_width();
  if (r.dense) count = r.length <= p.fixed_width() ? r.length : r.length + p.heavy_max;
  p.det_counts[list] = int32_t(count);
}

// Batch rows [row_begin, row_end).
void plan_lists_cpu(const PlanListsParams& p, int64_t row_begin, int64_t row_end);

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
// One launch on `stream`: a block per list, its threads over the det_idx columns.
cudaError_t plan_lists_cuda(const PlanListsParams& p, cudaStream_t stream);
}  // namespace vattention
#endif
