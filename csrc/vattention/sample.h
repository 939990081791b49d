// Stage "sample": uniform indices from each row's residual.
//
// Row r's residual is the window [start[r], end[r]) minus its heavy hitters
// heavy[r, 0..h) (ascending, valid entries first, -1 padding after), so
// n_r = end - start - h. With b = num_samples[r]:
//   * n_r == 0 or b <= 0: nothing (count 0);
//   * b >= n_r and n_r <= max_out: every residual position, log-weight 0 (exact);
//   * otherwise d = min(b, max_out) draws with replacement, each uniform over the
//     residual, log-weight log(n_r / d). Clamping to max_out lowers the sample
//     size but keeps the estimator unbiased.
// Draw j of row r is Philox(seed, call_offset, row r, draw_set) word pair j, see
// philox.h; the CPU and CUDA versions return identical indices.
#pragma once

#include "common.h"

namespace vattention {

// The two independent draw sets of a decode step (the Philox subsequence's high word):
// the pilot must not share draws with the final sample, or the budget would depend
// on the very draws it sizes.
enum DrawSet : uint32_t { kPilotDraws = 0, kFinalDraws = 1 };

struct SampleParams {
  const int32_t* heavy;      // [rows, heavy_stride], may be null when heavy_stride == 0
  int64_t heavy_stride;
  const int32_t* starts;     // [rows]
  const int32_t* ends;       // [rows]
  const int32_t* num_samples;// [rows]
  const int64_t* rng;        // [2]: seed, call offset (read where the kernel runs)
  int32_t* indices;          // [rows, max_out]
  float* log_weights;        // [rows, max_out]
  int32_t* counts;           // [rows]
  int64_t rows;
  int64_t max_out;
  uint32_t draw_set;         // kPilotDraws or kFinalDraws
};

// Number of heavy entries of a row: the valid prefix of its -1 padded list.
VATT_HD int32_t heavy_count(const int32_t* heavy, int64_t stride) {
  int32_t lo = 0, hi = int32_t(stride);
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

void sample_residual_cpu(const SampleParams& p, int64_t row_begin, int64_t row_end);

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
cudaError_t sample_residual_cuda(const SampleParams& p, cudaStream_t stream);
}  // namespace vattention
#endif
