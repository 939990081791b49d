// Layout of q, K, V and of per-(batch, list) index lists shared by the stages
// that read K/V rows: pilot statistics and sparse attention.
//
// q is [batch, q_heads, head_dim]; K and V are [batch, kv_heads, length, head_dim]
// with contiguous head_dim. An index list belongs either to a KV head (shared
// by its query heads: list_heads == kv_heads) or to one query head
// (list_heads == q_heads). Entries < 0 within a list's count are padding and
// are skipped.
#pragma once

#include "common.h"

namespace vattention {

struct QKVParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_head_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t batch, q_heads, kv_heads, length, head_dim;
  DType dtype;
  float scale;

  VATT_HD int64_t group_size() const { return q_heads / kv_heads; }
};

struct IndexListParams {
  const int32_t* indices;      // [batch, list_heads, max_count], contiguous
  const float* log_weights;    // same layout, or null for weight 1
  const int32_t* counts;       // [batch, list_heads], contiguous
  int64_t list_heads;
  int64_t max_count;

  // The list read by query head h of batch row b.
  VATT_HD int64_t list_of(int64_t b, int64_t h, int64_t q_heads, int64_t group) const {
    return b * list_heads + (list_heads == q_heads ? h : h / group);
  }
};

}  // namespace vattention
