// Private to the CUDA kernels that read K/V rows named by index lists (sparse
// attention and pilot statistics): the block-to-work mapping and a multistage
// cp.async pipeline that gathers tiles of K and V rows into shared memory.
//
// Mapping. Grid (x = batch * list_heads lists, y = splits, z = head chunks). A
// block serves one contiguous split of one list for up to HB query heads that
// read that list: all heads of the KV group when list_heads == kv_heads (so each
// K/V row is gathered once for the whole group), one head when list_heads ==
// q_heads. Groups wider than HB are served by several head chunks (blockIdx.z).
//
// Threads. A row of D elements is read by kTpr threads ("a row group"), each
// owning kEpt elements of it; the block's kThreads / kTpr row groups consume the
// rows of a tile round-robin, each group keeping its own online-softmax state
// (an independent split inside the block) that is merged at the end through
// shared memory. Thread slot e of lane `l` of a row group holds element
//   d = (e / kVec) * (kTpr * kVec) + l * kVec + e % kVec,
// so that every 16-byte shared-memory access of a warp is bank-conflict free.
#pragma once

#include <type_traits>

#include "attention_params.h"
#include "cuda_utils.cuh"
#include "sparse_attention.h"

namespace vattention {
namespace cuda_detail {

template <typename T, int D>
struct GatherConfig {
  static constexpr int kThreads = 128;
  static constexpr int kVec = 16 / int(sizeof(T));                 // elements per 16 bytes
  static constexpr int kEpt = (D / 32 > kVec) ? D / 32 : kVec;     // elements per thread
  static constexpr int kTpr = D / kEpt;                            // threads per row
  static constexpr int kGroups = kThreads / kTpr;                  // row groups per block
  static constexpr int kRowBytes = D * int(sizeof(T));
  static constexpr int kChunksPerRow = kRowBytes / 16;
  static constexpr int kRowsWanted = 16384 / (2 * kRowBytes);      // 16 KiB of K+V per stage
  static constexpr int kRows = kRowsWanted < 8 ? 8 : (kRowsWanted > 64 ? 64 : kRowsWanted);
  static constexpr int kRowsPerGroup = kRows / kGroups;
  static constexpr int kStages = 4;
  static constexpr int kTileBytes = kRows * kRowBytes;             // K (or V) part of a stage
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kSmemBytes = kPipeBytes + kStages * kRows * int(sizeof(float));

  static_assert(kTpr >= 1 && kTpr <= 32 && (kTpr & (kTpr - 1)) == 0, "row group must fit a warp");
  static_assert(kEpt % kVec == 0, "a thread owns whole 16-byte vectors");
  static_assert(kRows % kGroups == 0, "tile rows split evenly over row groups");
  static_assert(D % 32 == 0, "head_dim must be a multiple of 32");

  __device__ __forceinline__ static int dim_of(int lane_in_row, int e) {
    return (e / kVec) * (kTpr * kVec) + lane_in_row * kVec + (e % kVec);
  }
};

// What a block works on. Pointers already include the batch and KV-head offsets.
template <typename T>
struct ListWork {
  const T* k;
  const T* v;
  const int32_t* indices;     // the list's entries
  const float* log_weights;   // or null
  int64_t b;
  int64_t h0;                 // first query head served
  int heads;                  // heads served (<= HB)
  int64_t begin, end;         // entries [begin, end) of the list
};

template <typename T>
__device__ __forceinline__ ListWork<T> block_work(const QKVParams& qkv, const IndexListParams& list,
                                                  int heads_per_block, int64_t num_splits) {
  ListWork<T> w;
  const int64_t list_row = blockIdx.x;
  const int64_t group = qkv.group_size();
  w.b = list_row / list.list_heads;
  const int64_t lh = list_row - w.b * list.list_heads;
  int64_t kv_head;
  if (list.list_heads == qkv.q_heads) {
    w.h0 = lh;
    w.heads = 1;
    kv_head = lh / group;
  } else {
    w.h0 = lh * group + int64_t(blockIdx.z) * heads_per_block;
    w.heads = int(min(int64_t(heads_per_block), group - int64_t(blockIdx.z) * heads_per_block));
    kv_head = lh;
  }
  w.k = static_cast<const T*>(qkv.k) + w.b * qkv.k_batch_stride + kv_head * qkv.k_head_stride;
  w.v = static_cast<const T*>(qkv.v) + w.b * qkv.v_batch_stride + kv_head * qkv.v_head_stride;
  w.indices = list.indices + list_row * list.max_count;
  w.log_weights = list.log_weights ? list.log_weights + list_row * list.max_count : nullptr;
  const int64_t count = min(max(int64_t(list.counts[list_row]), int64_t(0)), list.max_count);
  split_range(count, blockIdx.y, num_splits, &w.begin, &w.end);
  return w;
}

// Issues the copies of tile rows [row0, row0 + kRows) of the work's list into
// pipeline stage `stage`. Entries past the split's end or out of [0, length) are
// zero-filled and get bias -inf; valid rows get bias = their log-weight (0 when
// the list has none).
template <typename T, int D>
__device__ __forceinline__ void issue_tile(unsigned char* pipe, float* bias, int stage,
                                           const ListWork<T>& w, int64_t row0,
                                           int64_t k_row_stride, int64_t v_row_stride,
                                           int64_t length, bool aligned) {
  using C = GatherConfig<T, D>;
  unsigned char* k_dst = pipe + stage * C::kStageBytes;
  unsigned char* v_dst = k_dst + C::kTileBytes;
  static_assert((C::kRows * C::kChunksPerRow) % C::kThreads == 0, "whole copy rounds");
#pragma unroll
  for (int it = 0; it < C::kRows * C::kChunksPerRow / C::kThreads; ++it) {
    const int c = int(threadIdx.x) + it * C::kThreads;
    const int r = c / C::kChunksPerRow;
    const int chunk = c - r * C::kChunksPerRow;
    const int64_t j = row0 + r;
    int32_t row = -1;
    if (j < w.end) row = __ldg(w.indices + j);
    const bool valid = row >= 0 && int64_t(row) < length;
    const int offset = r * C::kRowBytes + chunk * 16;
    const unsigned char* k_src = reinterpret_cast<const unsigned char*>(w.k);
    const unsigned char* v_src = reinterpret_cast<const unsigned char*>(w.v);
    if (valid) {
      k_src = reinterpret_cast<const unsigned char*>(w.k + int64_t(row) * k_row_stride) + chunk * 16;
      v_src = reinterpret_cast<const unsigned char*>(w.v + int64_t(row) * v_row_stride) + chunk * 16;
    }
    if (aligned) {
      cp_async_16(k_dst + offset, k_src, valid);
      cp_async_16(v_dst + offset, v_src, valid);
    } else {
      // Rows not 16-byte aligned (odd strides or offsets): element-wise copies.
      using Raw = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;
      constexpr int kN = 16 / int(sizeof(T));
      Raw* kd = reinterpret_cast<Raw*>(k_dst + offset);
      Raw* vd = reinterpret_cast<Raw*>(v_dst + offset);
      const Raw* ks = reinterpret_cast<const Raw*>(k_src);
      const Raw* vs = reinterpret_cast<const Raw*>(v_src);
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        kd[e] = valid ? ks[e] : Raw(0);
        vd[e] = valid ? vs[e] : Raw(0);
      }
    }
    if (chunk == 0) {
      bias[stage * C::kRows + r] =
          valid ? (w.log_weights ? __ldg(w.log_weights + j) : 0.f) : kNegInf;
    }
  }
}

// Loads this thread's slice of a K or V row (in shared memory) as floats.
template <typename T, int D>
__device__ __forceinline__ void load_row_slice(const unsigned char* row, int lane_in_row,
                                               float* out) {
  using C = GatherConfig<T, D>;
#pragma unroll
  for (int vtx = 0; vtx < C::kEpt / C::kVec; ++vtx) {
    const int chunk = vtx * C::kTpr + lane_in_row;
    const uint4 words = *reinterpret_cast<const uint4*>(row + chunk * 16);
    Vec16<T>::to_float(words, out + vtx * C::kVec);
  }
}

// Loads query head h's slice (any alignment; read once per block).
template <typename T, int D>
__device__ __forceinline__ void load_query_slice(const QKVParams& qkv, int64_t b, int64_t h,
                                                 int lane_in_row, float* out) {
  using C = GatherConfig<T, D>;
  const T* q = static_cast<const T*>(qkv.q) + b * qkv.q_batch_stride + h * qkv.q_head_stride;
#pragma unroll
  for (int e = 0; e < C::kEpt; ++e) out[e] = load_float(q + C::dim_of(lane_in_row, e));
}

// Whether every K/V row address is 16-byte aligned (host side, from pointers and strides).
inline bool rows_are_aligned(const QKVParams& qkv) {
  const int64_t elem = qkv.dtype == DType::kFloat32 ? 4 : 2;
  auto ok_ptr = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
  auto ok_stride = [&](int64_t stride, int64_t extent) {
    return extent <= 1 || ((stride * elem) & 15) == 0;
  };
  return ok_ptr(qkv.k) && ok_ptr(qkv.v) && ok_stride(qkv.k_batch_stride, qkv.batch) &&
         ok_stride(qkv.v_batch_stride, qkv.batch) && ok_stride(qkv.k_head_stride, qkv.kv_heads) &&
         ok_stride(qkv.v_head_stride, qkv.kv_heads) && ok_stride(qkv.k_row_stride, qkv.length) &&
         ok_stride(qkv.v_row_stride, qkv.length);
}

}  // namespace cuda_detail
}  // namespace vattention
