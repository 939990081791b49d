#include <algorithm>

#include "philox.h"
#include "sample.h"

namespace vattention {

void sample_residual_cpu(const SampleParams& p, int64_t row_begin, int64_t row_end) {
  const uint64_t seed = uint64_t(p.rng[0]);
  const uint32_t call_offset = uint32_t(p.rng[1]);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int32_t* heavy = p.heavy + r * p.heavy_stride;
    const int32_t h = p.heavy_stride > 0 ? heavy_count(heavy, p.heavy_stride) : 0;
    const int32_t start = p.starts[r];
    const int64_t residual = std::max<int64_t>(int64_t(p.ends[r]) - start - h, 0);
    const int64_t wanted = std::max<int32_t>(p.num_samples[r], 0);
    int32_t* indices = p.indices + r * p.max_out;
    float* log_weights = p.log_weights + r * p.max_out;

    int64_t count = 0;
    if (residual > 0 && wanted > 0) {
      if (wanted >= residual && residual <= p.max_out) {
        // Exact: walk the window, skipping the heavy hitters.
        int32_t next_heavy = 0;
        for (int64_t pos = start; count < residual; ++pos) {
          if (next_heavy < h && heavy[next_heavy] == pos) {
            ++next_heavy;
            continue;
          }
          indices[count] = int32_t(pos);
          log_weights[count] = 0.f;
          ++count;
        }
      } else {
        count = std::min<int64_t>(wanted, p.max_out);
        const float log_weight = logf(float(residual) / float(count));
        const DrawSequence seq{seed, call_offset, uint32_t(r), p.draw_set};
        for (int64_t j = 0; j < count; ++j) {
          const uint64_t rank = scale_to_range(philox_draw(seq, uint32_t(j)), uint32_t(residual));
          indices[j] = residual_position(heavy, h, start, int64_t(rank));
          log_weights[j] = log_weight;
        }
      }
    }
    p.counts[r] = int32_t(count);
    for (int64_t j = count; j < p.max_out; ++j) {
      indices[j] = -1;
      log_weights[j] = kNegInf;
    }
  }
}

}  // namespace vattention
