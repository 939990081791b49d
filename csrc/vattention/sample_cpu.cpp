#include <algorithm>

#include "philox.h"
#include "sample.h"

namespace vattention {

void sample_residual_cpu(const SampleParams& p, int64_t row_begin, int64_t row_end) {
  const uint64_t seed = uint64_t(p.rng[0]);
  const uint32_t call_offset = uint32_t(p.rng[1]);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const SampleRow row = sample_row(p, r);
    int32_t* indices = p.indices + r * p.max_out;
    float* log_weights = p.log_weights + r * p.max_out;
    if (row.exact) {
      // Exact: walk the window, skipping the heavy hitters.
      int32_t next_heavy = 0;
      int64_t written = 0;
      for (int64_t pos = row.start; written < row.count; ++pos) {
        if (next_heavy < row.h && row.heavy[next_heavy] == pos) {
          ++next_heavy;
          continue;
        }
        indices[written] = int32_t(pos);
        log_weights[written] = 0.f;
        ++written;
      }
    } else if (row.count > 0) {
      const float log_weight = logf(float(row.residual) / float(row.count));
      const DrawSequence seq{seed, call_offset, uint32_t(r), p.draw_set};
      for (int64_t j = 0; j < row.count; ++j) {
        const uint64_t rank =
            scale_to_range(philox_draw(seq, uint32_t(j)), uint32_t(row.residual));
        indices[j] = residual_position(row.heavy, row.h, row.start, int64_t(rank));
        log_weights[j] = log_weight;
      }
    }
    // Nothing past the count: sample.h.
    p.counts[r] = int32_t(row.count);
  }
}

}  // namespace vattention
