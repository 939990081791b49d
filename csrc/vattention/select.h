// Stage "select": top-k over rows of scores, restricted to a per-row window.
//
// Row r selects the min(k[r], end[r] - start[r]) highest scores among positions
// [start[r], end[r]) (end clipped to the row length). Ties prefer the lower
// position; NaN ranks below every number. The chosen positions are written in
// ascending position order and the rest of the row is padded with -1, which is
// the order the residual sampler needs for its rank-to-position search.
#pragma once

#include "common.h"

namespace vattention {

struct TopkParams {
  const void* scores;       // [rows, length], element type = dtype
  int64_t score_row_stride; // elements; positions are contiguous
  const int32_t* starts;    // [rows]
  const int32_t* ends;      // [rows]
  const int32_t* ks;        // [rows]
  int32_t* indices;         // [rows, k_max], contiguous
  int64_t rows;
  int64_t length;
  int64_t k_max;
  DType dtype;
};

// Processes rows [row_begin, row_end) so the caller can spread rows over threads.
void topk_cpu(const TopkParams& p, int64_t row_begin, int64_t row_end);

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
// Needs the scratch from topk_cuda_workspace_bytes (may be 0).
size_t topk_cuda_workspace_bytes(const TopkParams& p);
cudaError_t topk_cuda(const TopkParams& p, void* workspace, cudaStream_t stream);
}  // namespace vattention
#endif
