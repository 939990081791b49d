// Stage "combine": merges partial attention results (out, lse) with the
// online-softmax rule of online_softmax.h. Used for split-K partials and for
// the deterministic + sampled-residual halves of a vAttention estimate.
#pragma once

#include "common.h"

namespace vattention {

struct CombineParams {
  const float* partial_out;  // partial s of item m at m * item_stride_out + s * split_stride_out
  const float* partial_lse;  // at m * item_stride_lse + s * split_stride_lse
  int64_t item_stride_out, split_stride_out;
  int64_t item_stride_lse, split_stride_lse;
  float* out;                // [items, head_dim]
  float* lse;                // [items]
  int64_t items;
  int64_t num_splits;
  int64_t head_dim;
};

void combine_cpu(const CombineParams& p, int64_t item_begin, int64_t item_end);

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
cudaError_t combine_cuda(const CombineParams& p, cudaStream_t stream);
}  // namespace vattention
#endif
