// Stage "sample": uniform indices from each row's residual.
//
// Row r's residual is the window [start[r], end[r]) minus its heavy hitters
// heavy[r, 0..h) (ascending, valid entries first, -1 padding after, h the valid
// prefix of the row's heavy_width entries), so n_r = end - start - h. With
// b = num_samples[r]:
//   * n_r == 0 or b <= 0: nothing (count 0);
//   * b >= n_r and n_r <= max_out: every residual position, log-weight 0 (exact);
//   * otherwise d = min(b, max_out) draws with replacement, each uniform over the
//     residual, log-weight log(n_r / d). Clamping to max_out lowers the sample
//     size but keeps the estimator unbiased.
// Draw j of row r is Philox(seed, call_offset, row r, draw_set) word pair j, see
// philox.h; the CPU and CUDA versions return identical indices.
//
// Only the first counts[r] entries of row r of indices / log_weights are written;
// the entries past the count are unspecified (whatever the buffer held). Every
// consumer reads a list up to its count (sparse attention, the pilot, decode's
// stats), so writing -1 / -inf there would cost rows x max_out x 8 bytes (max_out
// = N for the final sample) that nothing reads.
#pragma once

#include "common.h"

namespace vattention {

// The two independent draw sets of a decode step (the Philox subsequence's high word):
// the pilot must not share draws with the final sample, or the budget would depend
// on the very draws it sizes.
enum DrawSet : uint32_t { kPilotDraws = 0, kFinalDraws = 1 };

struct SampleParams {
  // Row r's heavy_width entries at heavy + r * heavy_stride (heavy_stride >=
  // heavy_width: a row may be a slice of a wider list); null when heavy_width == 0.
  const int32_t* heavy;
  int64_t heavy_stride;
  int64_t heavy_width;
  const int32_t* starts;     // [rows]
  const int32_t* ends;       // [rows]
  const int32_t* num_samples;// [rows]
  const int64_t* rng;        // [2]: seed, call offset (read where the kernel runs)
  int32_t* indices;          // [rows, max_out], the first counts[r] of row r written
  float* log_weights;        // [rows, max_out], likewise
  int32_t* counts;           // [rows]
  int64_t rows;
  int64_t max_out;
  uint32_t draw_set;         // kPilotDraws or kFinalDraws
};

// Number of heavy entries of a row: the valid prefix of its `width` entries (-1 padded).
VATT_HD int32_t heavy_count(const int32_t* heavy, int64_t width) {
  int32_t lo = 0, hi = int32_t(width);
  while (lo < hi) {
    const int32_t mid = (lo + hi) / 2;
    if (heavy[mid] >= 0) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Position of the rank-th residual token: the smallest j with
// heavy[j] - start - j > rank (non-heavy tokens before heavy[j]) gives
// start + rank + j.
VATT_HD int32_t residual_position(const int32_t* heavy, int32_t h, int32_t start, int64_t rank) {
  int32_t lo = 0, hi = h;
  while (lo < hi) {
    const int32_t mid = (lo + hi) / 2;
    if (int64_t(heavy[mid]) - start - mid > rank) hi = mid; else lo = mid + 1;
  }
  return int32_t(start + rank + lo);
}

// A row's header: everything its draws share.
struct SampleRow {
  const int32_t* heavy;  // the row's heavy list (null without heavy columns)
  int32_t h;             // heavy count
  int32_t start;
  int64_t residual;      // n_r
  int64_t count;         // entries written
  bool exact;            // enumeration (log-weight 0) rather than draws
};

VATT_HD SampleRow sample_row(const SampleParams& p, int64_t r) {
  SampleRow row;
  row.heavy = p.heavy_width > 0 ? p.heavy + r * p.heavy_stride : nullptr;
  row.h = p.heavy_width > 0 ? heavy_count(row.heavy, p.heavy_width) : 0;
  row.start = p.starts[r];
  const int64_t residual = int64_t(p.ends[r]) - row.start - row.h;
  row.residual = residual > 0 ? residual : 0;
  const int64_t wanted = p.num_samples[r] > 0 ? p.num_samples[r] : 0;
  row.exact = false;
  row.count = 0;
  if (row.residual > 0 && wanted > 0) {
    row.exact = wanted >= row.residual && row.residual <= p.max_out;
    row.count = row.exact ? row.residual : (wanted < p.max_out ? wanted : p.max_out);
  }
  return row;
}

void sample_residual_cpu(const SampleParams& p, int64_t row_begin, int64_t row_end);

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
cudaError_t sample_residual_cuda(const SampleParams& p, cudaStream_t stream);
}  // namespace vattention
#endif
