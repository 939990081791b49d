// Stage "pilot": sufficient statistics of a pilot sample for the budget rules.
//
// For query head (b, h) over the rows of its list, with s_i = scale * <q, K_i>
// and w_i = exp(s_i - max_logit) (max over the list; duplicates count once per
// draw), it writes
//   max_logit[b, h]
//   moments[b, h, :]        = (sum w_i, sum w_i^2, sum w_i^2 ||V_i||^2)
//   vector_moments[b, h, :] = (sum w_i V_i  [head_dim], sum w_i^2 V_i [head_dim])
// All fp32. An empty list gives max_logit = -inf and zeros. A NaN logit (a NaN
// in q or in a listed K row) makes all of the head's outputs NaN; a NaN in a
// listed V row makes moments[2] and that element of both vector moments NaN.
#pragma once

#include "attention_params.h"

namespace vattention {

struct PilotParams {
  QKVParams qkv;
  IndexListParams list;
  float* max_logit;       // [batch, q_heads]
  float* moments;         // [batch, q_heads, 3]
  float* vector_moments;  // [batch, q_heads, 2, head_dim]
};

constexpr int kPilotMoments = 3;

// Processes query heads [head_begin, head_end) of the flattened batch * q_heads.
void pilot_stats_cpu(const PilotParams& p, int64_t head_begin, int64_t head_end);

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
// One split per list: every block writes final outputs, no workspace.
cudaError_t pilot_stats_cuda(const PilotParams& p, cudaStream_t stream);
// Split-K: each list is cut into num_splits chunks (split_range); the chunks'
// statistics go to `workspace` (pilot_stats_cuda_workspace_bytes, 0 when
// num_splits == 1) and a second kernel merges them.
size_t pilot_stats_cuda_workspace_bytes(const PilotParams& p, int64_t num_splits);
cudaError_t pilot_stats_cuda(const PilotParams& p, int64_t num_splits, void* workspace,
                             cudaStream_t stream);
}  // namespace vattention
#endif
