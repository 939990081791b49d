// Stage "sparse attention": one decode query per (batch, query head) attends to
// the K/V rows named by its index list, each row i carrying a log-weight
// (log of its inclusion weight, added to the logit). Split-K: the list is cut
// into num_splits contiguous chunks (CUDA with split_target_blocks: into as
// many of them as its count needs, heuristics.h); each chunk keeps an fp32 online softmax
// and writes a partial (out, lse); the "combine" stage merges the partials.
// NaN: a NaN logit makes its split's partial (out and lse) NaN, a NaN in a V
// element that element of out (online_softmax.h). Entries < 0 or >= length and
// entries with log-weight -inf are not read.
#pragma once

#include "attention_params.h"

namespace vattention {

struct SparseAttentionParams {
  QKVParams qkv;
  IndexListParams list;
  int64_t num_splits;
  // CUDA only: > 0 (kBlocksPerWorker x SMs) for balanced splits (heuristics.h),
  // each list using only the splits its count needs; 0: every list num_splits.
  int64_t split_target_blocks;
  float* partial_out;  // [batch, q_heads, num_splits, head_dim]
  float* partial_lse;  // [batch, q_heads, num_splits]
};

// Chunk of a list of `count` entries handled by split s of n.
VATT_HD void split_range(int64_t count, int64_t s, int64_t n, int64_t* begin, int64_t* end) {
  const int64_t chunk = ceil_div(count, n);
  *begin = s * chunk < count ? s * chunk : count;
  *end = (s + 1) * chunk < count ? (s + 1) * chunk : count;
}

// Writes the partials of work items [item_begin, item_end) of the flattened
// batch * q_heads * num_splits.
void sparse_attention_partial_cpu(const SparseAttentionParams& p, int64_t item_begin,
                                  int64_t item_end);

// The split count of a launch: choose_num_splits in heuristics.h.

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
cudaError_t sparse_attention_partial_cuda(const SparseAttentionParams& p, cudaStream_t stream);
}  // namespace vattention
#endif
