// Stage "select", scoring step: the oracle selector's scores that select_topk ranks
// (python/vattention/select.py, select_scores).
//
// For batch row b with valid length len_b = clamp(lengths[b], 0, length) and
// query head h of KV head kv = h / group, the logits are
//   s_h(i) = scale * <q[b, h], K[b, kv, i]>   for i < len_b, -inf beyond.
// share_gqa = false: scores [batch, q_heads, length] = s_h(i) (fp32).
// share_gqa = true:  scores [batch, kv_heads, length] =
//   max over the group's heads h of (s_h(i) - lse_h), lse_h = logsumexp_i s_h(i),
// with lse_h replaced by 0 where it is not finite (an empty row, or NaN / inf
// logits), and NaN propagating through the max, as in the torch reference.
// Each K row is read once per KV group. Only q's and K's head_dim must be contiguous.
//
// from_summary (the "int4" selector, key_summary.h): the same scores with K replaced by
// the dequantised summary K~ = z_g + s_g * code; qkv.k is null and K is never read, only
// the summary's D / 2 + 4 D / 32 bytes per token. The oracle path is unchanged.
#pragma once

#include "attention_params.h"
#include "key_summary.h"

namespace vattention {

struct SelectScoresParams {
  QKVParams qkv;          // q and k (v, its strides: unused), shapes, dtype, scale
  const void* lengths;    // [batch] valid lengths, int64 or int32 (see lengths_int64)
  bool lengths_int64;
  bool share_gqa;
  float* scores;          // [batch, share_gqa ? kv_heads : q_heads, length], contiguous
  int64_t num_splits;     // CUDA: position splits per (batch, KV head); 0 = from the device
  KeySummaryParams summary;  // read instead of qkv.k when from_summary
  bool from_summary;

  VATT_HD int64_t length_of(int64_t b) const {
    const int64_t n = lengths_int64 ? static_cast<const int64_t*>(lengths)[b]
                                    : int64_t(static_cast<const int32_t*>(lengths)[b]);
    return n < 0 ? 0 : (n > qkv.length ? qkv.length : n);
  }
};

// Processes the (batch, KV head) pairs [list_begin, list_end) of the flattened
// batch * kv_heads (every head of a pair's group, both modes).
void select_scores_cpu(const SelectScoresParams& p, int64_t list_begin, int64_t list_end);

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
// head_dim 64, 128 or 256. share_gqa needs the scratch from
// select_scores_cuda_workspace_bytes (per-head logits and softmax partials; 0
// without share_gqa); the split count behind it comes from the current device.
size_t select_scores_cuda_workspace_bytes(const SelectScoresParams& p);
cudaError_t select_scores_cuda(const SelectScoresParams& p, void* workspace, cudaStream_t stream);
}  // namespace vattention
#endif
