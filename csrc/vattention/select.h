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

// Row r's window, clipped to [0, length), and how many positions it selects.
struct TopkRow {
  int64_t start, end, available, k;
};

VATT_HD TopkRow topk_row(const TopkParams& p, int64_t r) {
  TopkRow row;
  row.start = p.starts[r] > 0 ? p.starts[r] : 0;
  row.end = p.ends[r] < p.length ? p.ends[r] : p.length;
  row.available = row.end > row.start ? row.end - row.start : 0;
  const int64_t wanted = p.ks[r] > 0 ? p.ks[r] : 0;
  row.k = wanted < row.available ? wanted : row.available;
  if (row.k > p.k_max) row.k = p.k_max;
  return row;
}

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

// ---------------------------------------------------------------------------
// Oracle selection scores (python/vattention/select.py, oracle_scores).
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
// ---------------------------------------------------------------------------

#include "attention_params.h"

namespace vattention {

struct SelectScoresParams {
  QKVParams qkv;          // q and k (v, its strides: unused), shapes, dtype, scale
  const void* lengths;    // [batch] valid lengths, int64 or int32 (see lengths_int64)
  bool lengths_int64;
  bool share_gqa;
  float* scores;          // [batch, share_gqa ? kv_heads : q_heads, length], contiguous
  int64_t num_splits;     // CUDA: position splits per (batch, KV head); 0 = from the device

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
