#include "combine.h"
#include "online_softmax.h"

namespace vattention {

void combine_cpu(const CombineParams& p, int64_t item_begin, int64_t item_end) {
  for (int64_t m = item_begin; m < item_end; ++m) {
    const float* lse = p.partial_lse + m * p.item_stride_lse;
    const float merged = merged_lse(lse, int(p.num_splits), p.split_stride_lse);
    float* out = p.out + m * p.head_dim;
    p.lse[m] = merged;
    if (is_nan_bits(merged)) {  // a NaN partial: the whole merge is NaN
      for (int64_t d = 0; d < p.head_dim; ++d) out[d] = quiet_nan();
      continue;
    }
    for (int64_t d = 0; d < p.head_dim; ++d) out[d] = 0.f;
    for (int64_t s = 0; s < p.num_splits; ++s) {
      const float ls = lse[s * p.split_stride_lse];
      // Only empty partials are skipped: a weight that underflows to 0 still
      // multiplies the partial, so a NaN in it is not dropped.
      if (is_neg_inf_bits(ls)) continue;
      const float w = merge_weight(ls, merged);
      const float* partial = p.partial_out + m * p.item_stride_out + s * p.split_stride_out;
      for (int64_t d = 0; d < p.head_dim; ++d) out[d] += w * partial[d];
    }
  }
}

}  // namespace vattention

namespace vattention {

void merge_estimate_cpu(const MergeEstimateParams& p, int64_t head_begin, int64_t head_end) {
  for (int64_t head = head_begin; head < head_end; ++head) {
    if (p.stats_double) {
      merge_estimate_head<double>(p, head, 0, 1, true);
    } else {
      merge_estimate_head<float>(p, head, 0, 1, true);
    }
  }
}

}  // namespace vattention
