// Layout of q, K, V and of per-(batch, list) index lists shared by the stages
// that read K/V rows: scoring, pilot statistics and sparse attention.
//
// q is [batch, q_heads, head_dim]. K and V come in one of two layouts, told apart
// by KVPaging::block_table (the KV cache layout, stated once here):
//   contiguous: [batch, kv_heads, length, head_dim] (any strides);
//   paged:      a pool of physical blocks [num_blocks, kv_heads, block_size, head_dim]
//               (any strides: vLLM's CPU cache [num_blocks, Hkv, 2 * block_size, D]
//               holds K then V inside a block, its CUDA cache and FlashInfer's NHD
//               are [num_blocks, block_size, Hkv, D], HND is the shape above), and
//               logical row `row` of batch row b lives in physical block
//               block_table[b * block_table_stride + row / block_size] at slot
//               row % block_size. length is then max_blocks * block_size.
// In both, head_dim is contiguous and the three strides are those of dims 0, 1, 2
// (batch or block, head, row or slot). An index list belongs either to a KV head (shared
// by its query heads: list_heads == kv_heads) or to one query head
// (list_heads == q_heads). Entries < 0 within a list's count are padding and
// are skipped.
#pragma once

#include "common.h"

namespace vattention {

// Where a row lives. Offsets are 64-bit: a pool of blocks easily exceeds 2^31 elements.
struct KVPaging {
  const int32_t* block_table;   // [batch, max_blocks] int32, or null: contiguous layout
  int64_t block_table_stride;   // elements between batch rows of the table
  int64_t block_size;           // tokens per block (paged only)

  VATT_HD bool paged() const { return block_table != nullptr; }
  // Offset, in units of the strides, of row `row` of (batch row b, head) given the
  // strides of dims 0, 1 and 2.
  VATT_HD int64_t offset(int64_t b, int64_t head, int64_t row, int64_t stride0, int64_t stride1,
                         int64_t stride2) const {
    if (block_table == nullptr) return b * stride0 + head * stride1 + row * stride2;
    const int64_t block = block_table[b * block_table_stride + row / block_size];
    return block * stride0 + head * stride1 + (row % block_size) * stride2;
  }
};

struct QKVParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_head_stride;
  // Strides of dims 0, 1, 2 of K and V: batch (or block), head, row (or slot).
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  KVPaging paging;            // shared by K and V; block_table null for contiguous
  int64_t batch, q_heads, kv_heads, length, head_dim;
  DType dtype;
  float scale;

  VATT_HD int64_t group_size() const { return q_heads / kv_heads; }
  VATT_HD int64_t k_offset(int64_t b, int64_t head, int64_t row) const {
    return paging.offset(b, head, row, k_batch_stride, k_head_stride, k_row_stride);
  }
  VATT_HD int64_t v_offset(int64_t b, int64_t head, int64_t row) const {
    return paging.offset(b, head, row, v_batch_stride, v_head_stride, v_row_stride);
  }
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
