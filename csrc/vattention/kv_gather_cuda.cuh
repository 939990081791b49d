// Private to the CUDA kernels that read K/V rows named by index lists (sparse
// attention and pilot statistics): the block-to-work mapping, a multistage
// cp.async pipeline that gathers tiles of K and V rows into shared memory, and
// the one gather kernel both stages launch, parametrised by a fold policy.
//
// Paged K/V (attention_params.h). The launcher picks gather_kernel<..., Paged, ...>
// from qkv.paging. A paged block keeps its batch row's block-table entries and the
// head offset; a row's block and slot (one table read and a 32-bit divide) are found
// once per row per tile by a loader lane (TileCopy) and broadcast to the row's copy
// threads. Addresses: 32-bit factors into an exact 64-bit address when the strides
// allow (narrow_row_strides, the Narrow flag), int64 arithmetic otherwise.
//
// Mapping. Grid (x = batch * list_heads lists, y = splits, z = head chunks). A
// block serves one contiguous split of one list for up to HB query heads that
// read that list: all heads of the KV group when list_heads == kv_heads (so each
// K/V row is gathered once for the whole group), one head when list_heads ==
// q_heads. Groups wider than HB are served by several head chunks (blockIdx.z).
// With balanced splits (GatherArgs::target_blocks, the rule in heuristics.h) a
// list uses only the first list_splits(...) of the grid's splits, decided in every
// block from the launch's counts (no host sync); the others exit at once.
//
// Threads. A row of D elements is read by kTpr threads ("a row group"), each
// owning kEpt elements of it; the block's kThreads / kTpr row groups consume the
// rows of a tile round-robin, each group keeping its own running state (an
// independent split inside the block) that is merged at the end through
// shared memory. Where HB heads of state would not fit the register budget of 3
// blocks per SM, pairs of row groups share rows and split the heads (HeadSplit). Thread slot e of lane `l` of a row group holds element
//   d = (e / kVec) * (kTpr * kVec) + l * kVec + e % kVec,
// so that every 16-byte shared-memory access of a warp is bank-conflict free.
//
// Fold policies. What a row group keeps per query head is a set of "moments"
// relative to its running max logit m, with w = exp(s - m) for a row of logit s:
//   scalar i = sum w^P_i * x_i     (x_i = 1 or ||V||^2 of the row; scalar 0 is
//                                   always sum w, the softmax denominator)
//   vector j = sum w^Q_j * V       (this thread's kEpt elements of V)
// with powers P_i, Q_j in {1, 2}. When m grows, sums of power p are rescaled by
// exp(m_old - m_new)^p. The policy names the moments and writes the outputs:
//   attention (sparse_attention_cuda.cu): sum w, sum w V -> out = sum w V / sum w,
//             lse = m + log(sum w);
//   pilot (pilot_cuda.cu): sum w, sum w^2, sum w^2 ||V||^2, sum w V, sum w^2 V.
// A state travels as a record [m, scalars..., vector 0 [D], vector 1 [D], ...]:
// the row groups' records are merged in shared memory, the pilot's per-split
// records in its workspace, both by scan_records / merge_records.
//
// NaN (online_softmax.h). A NaN logit fails `s > m`, gets weight exp(NaN) and
// turns sum w NaN; a merged record with a NaN sum w (or m) is all NaN. A NaN in
// V reaches the vector element (and ||V||^2) it is in. Empty records (sum w == 0)
// are skipped. Every NaN / -inf / empty test compares bits, because
// --use_fast_math lets the compiler assume comparisons see no NaN.
#pragma once

#include <type_traits>

#include "attention_params.h"
#include "cuda_utils.cuh"
#include "dispatch.h"
#include "heuristics.h"
#include "online_softmax.h"
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

// Block and slot of logical row `row` of a paged layout. Rows and block sizes fit
// in 32 bits (the launchers check the length), and a 32-bit divide is several
// times cheaper than KVPaging::offset's 64-bit one; the products with the strides
// stay 64-bit.
struct PagedRow {
  int64_t block, slot;
};

__device__ __forceinline__ PagedRow paged_row(const int32_t* table_row, int64_t block_size,
                                              int64_t row) {
  const uint32_t bs = uint32_t(block_size), r = uint32_t(row);
  const uint32_t i = r / bs;
  return {int64_t(__ldg(table_row + i)), int64_t(r - i * bs)};
}

// qkv.k_offset / qkv.v_offset (in elements) of logical row 0 <= row < 2^31 of
// (batch row b, KV head), through paged_row when paged.
struct RowOffsets {
  int64_t k, v;
};

__device__ __forceinline__ RowOffsets kv_row_offsets(const QKVParams& qkv, int64_t b,
                                                     int64_t head, int64_t row) {
  int64_t outer = b, slot = row;
  if (qkv.paging.paged()) {
    const PagedRow pr = paged_row(
        qkv.paging.block_table + b * qkv.paging.block_table_stride, qkv.paging.block_size, row);
    outer = pr.block;
    slot = pr.slot;
  }
  return {outer * qkv.k_batch_stride + head * qkv.k_head_stride + slot * qkv.k_row_stride,
          outer * qkv.v_batch_stride + head * qkv.v_head_stride + slot * qkv.v_row_stride};
}

// Whether the launchers can address a paged layout with paged_row (host side).
inline bool paging_supported(const KVPaging& paging, int64_t length) {
  return !paging.paged() ||
         (paging.block_size > 0 && paging.block_size <= 0x7fffffff && length <= 0x7fffffff);
}

// What a block works on. Contiguous: k / v include the batch and KV-head offsets;
// paged: the KV-head offset, and block_row is the batch row's block-table row.
template <typename T>
struct ListWork {
  const T* k;
  const T* v;
  const int32_t* block_row;   // paged only
  const int32_t* indices;     // the list's entries
  const float* log_weights;   // or null
  int64_t b;
  int64_t h0;                 // first query head served
  int heads;                  // heads served (<= HB)
  int64_t begin, end;         // entries [begin, end) of the list
  bool surplus;               // a split past the list's own split count: no rows
};

// Entries of list `list_row`, its count clamped to [0, max_count].
__device__ __forceinline__ int64_t list_count(const IndexListParams& list, int64_t list_row) {
  return min(max(int64_t(list.counts[list_row]), int64_t(0)), list.max_count);
}

// The sum of the launch's list counts, the same in every block (balanced splits,
// heuristics.h). `scratch` holds a few int64 of shared memory, free again on return.
template <int kThreads>
__device__ __forceinline__ int64_t launch_total_count(const IndexListParams& list,
                                                      int64_t lists, int64_t* scratch) {
  static_assert(kThreads % 32 == 0, "whole warps");
  int64_t sum = 0;
  for (int64_t i = threadIdx.x; i < lists; i += kThreads) sum += list_count(list, i);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = sum;
  __syncthreads();
  int64_t total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  __syncthreads();  // scratch is the pipeline's memory
  return total;
}

// split_rows > 0: balanced splits (heuristics.h), the list cut evenly into its own
// list_splits(count, split_rows, num_splits) chunks; split_rows == 0: into
// num_splits chunks, whatever its count.
template <typename T, bool Paged>
__device__ __forceinline__ ListWork<T> block_work(const QKVParams& qkv, const IndexListParams& list,
                                                  int heads_per_block, int64_t num_splits,
                                                  int64_t split_rows) {
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
  if constexpr (Paged) {
    w.k = static_cast<const T*>(qkv.k) + kv_head * qkv.k_head_stride;
    w.v = static_cast<const T*>(qkv.v) + kv_head * qkv.v_head_stride;
    w.block_row = qkv.paging.block_table + w.b * qkv.paging.block_table_stride;
  } else {
    w.k = static_cast<const T*>(qkv.k) + w.b * qkv.k_batch_stride + kv_head * qkv.k_head_stride;
    w.v = static_cast<const T*>(qkv.v) + w.b * qkv.v_batch_stride + kv_head * qkv.v_head_stride;
    w.block_row = nullptr;
  }
  w.indices = list.indices + list_row * list.max_count;
  w.log_weights = list.log_weights ? list.log_weights + list_row * list.max_count : nullptr;
  const int64_t count = list_count(list, list_row);
  const int64_t splits = split_rows > 0 ? list_splits(count, split_rows, num_splits) : num_splits;
  w.surplus = int64_t(blockIdx.y) >= splits;
  split_range(count, w.surplus ? 0 : int64_t(blockIdx.y), splits, &w.begin, &w.end);
  if (w.surplus) w.end = w.begin;
  return w;
}

// Row addressing (chosen on the host, narrow_row_strides). A row's address is
// base + index * row_stride (paged: base + block * block_stride + slot * row_stride).
// The factors are 32-bit (indices, slots and block-table entries are int32); when
// every stride they multiply fits in 31 bits *in bytes*, each product is one 32 x 32 ->
// 64-bit multiply-add (mad.wide.s32) into the lane's 64-bit base pointer: an exact
// 64-bit address whatever the pool's extent, at the cost of 32-bit arithmetic. A
// stride of 2^31 bytes or more takes the 64-bit path (int64 products). Either way the
// offsets that can exceed 2^31 (index * stride, the pool extent) stay 64-bit.
inline bool narrow_row_strides(const QKVParams& qkv) {
  const int64_t elem = qkv.dtype == DType::kFloat32 ? 4 : 2;
  auto fits = [&](int64_t stride) { return stride >= 0 && stride <= 0x7fffffff / elem; };
  const bool rows = fits(qkv.k_row_stride) && fits(qkv.v_row_stride);
  return qkv.paging.paged() ? rows && fits(qkv.k_batch_stride) && fits(qkv.v_batch_stride)
                            : rows;
}

// Byte strides the narrow path multiplies by (GatherArgs, uniform: constant bank).
struct RowStrides {
  int32_t k_row, v_row;      // dim 2 (row or slot)
  int32_t k_block, v_block;  // dim 0 of a paged pool
};

inline RowStrides narrow_strides(const QKVParams& qkv) {
  const int32_t elem = qkv.dtype == DType::kFloat32 ? 4 : 2;
  if (!narrow_row_strides(qkv)) return {0, 0, 0, 0};
  return {int32_t(qkv.k_row_stride) * elem, int32_t(qkv.v_row_stride) * elem,
          qkv.paging.paged() ? int32_t(qkv.k_batch_stride) * elem : 0,
          qkv.paging.paged() ? int32_t(qkv.v_batch_stride) * elem : 0};
}

// base + a * stride (bytes) with 32-bit factors and an exact 64-bit result.
__device__ __forceinline__ const unsigned char* wide_mad(const unsigned char* base, int32_t a,
                                                         int32_t stride) {
  return base + int64_t(a) * int64_t(stride);
}

struct GatherArgs {
  int64_t num_splits;     // the grid's splits (blockIdx.y)
  // Balanced splits (heuristics.h) when > 0: kBlocksPerWorker x SMs, the working
  // blocks aimed at; 0: every list uses all num_splits.
  int64_t target_blocks;
  float* workspace;  // the policy's (pilot: per-split records); may be null
  RowStrides strides;  // narrow_strides: byte strides of the narrow row addressing
  bool aligned;      // rows_are_aligned: cp.async, else element-wise copies
};

// Which tile rows the copy threads of a warp serve. Copy c = threadIdx.x + it * kThreads
// (iteration `it` of issue_tile) is chunk c % kChunksPerRow of tile row c / kChunksPerRow,
// so a thread keeps its chunk in every iteration and a warp covers kRowsPerWarpIter rows
// per iteration (one, shared with the next warp, when a row is wider than a warp).
// Loader lane i of a warp (i < kLoaders) resolves row `loader_row(warp, i)` of each
// tile: its index, log-weight, validity and (paged) block and slot, once per row per
// tile instead of in each of the row's kChunksPerRow copy threads, and broadcasts them
// to the row's lanes (loader_lane) with one shuffle per iteration.
template <typename T, int D>
struct TileCopy {
  using C = GatherConfig<T, D>;
  static constexpr int kIters = C::kRows * C::kChunksPerRow / C::kThreads;
  static constexpr int kRowsPerWarpIter = C::kChunksPerRow >= 32 ? 1 : 32 / C::kChunksPerRow;
  static constexpr int kLoaders = kIters * kRowsPerWarpIter;
  static_assert((C::kRows * C::kChunksPerRow) % C::kThreads == 0, "whole copy rounds");
  static_assert(C::kThreads % C::kChunksPerRow == 0, "a thread keeps its chunk");
  static_assert(kLoaders <= 32, "one loader lane per row of a warp");

  __device__ __forceinline__ static int loader_row(int warp, int i) {
    const int it = i / kRowsPerWarpIter, sub = i - it * kRowsPerWarpIter;
    return (warp * 32 + it * C::kThreads) / C::kChunksPerRow + sub;
  }
  // Whether the warp holds chunk 0 of its rows (the one that writes the row's bias).
  __device__ __forceinline__ static bool holds_chunk0(int warp) {
    return (warp * 32) % C::kChunksPerRow == 0;
  }
  __device__ __forceinline__ static int loader_lane(int it, int lane) {
    return it * kRowsPerWarpIter + lane / C::kChunksPerRow;
  }
};

// Issues the copies of tile rows [row0, row0 + kRows) of the work's list into
// pipeline stage `stage`. Entries past the split's end or out of [0, length) are
// zero-filled and get bias -inf; valid rows get bias = their log-weight (0 when
// the list has none). k_lane / v_lane: w.k / w.v (bytes) plus this thread's chunk.
template <typename T, int D, bool Paged, bool Narrow>
__device__ __forceinline__ void issue_tile(unsigned char* pipe, float* bias, int stage,
                                           const ListWork<T>& w, int64_t row0,
                                           const QKVParams& qkv, const GatherArgs& args,
                                           const unsigned char* k_lane,
                                           const unsigned char* v_lane) {
  using C = GatherConfig<T, D>;
  using TC = TileCopy<T, D>;
  unsigned char* k_dst = pipe + stage * C::kStageBytes;
  unsigned char* v_dst = k_dst + C::kTileBytes;
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int chunk = int(threadIdx.x) % C::kChunksPerRow;

  // The loader lanes: a = the index (contiguous) or the block (paged), -1 when the
  // entry is skipped; b = the slot (paged).
  int32_t a = -1, b = 0;
  if (lane < TC::kLoaders) {
    const int r = TC::loader_row(warp, lane);
    const int64_t j = row0 + r;
    int32_t row = -1;
    if (j < w.end) row = __ldg(w.indices + j);
    const bool valid = row >= 0 && int64_t(row) < qkv.length;
    if (valid) {
      if constexpr (Paged) {
        const uint32_t bs = uint32_t(qkv.paging.block_size), ur = uint32_t(row);
        const uint32_t i = ur / bs;
        a = __ldg(w.block_row + i);
        b = int32_t(ur - i * bs);
      } else {
        a = row;
      }
    }
    if (TC::holds_chunk0(warp)) {
      bias[stage * C::kRows + r] =
          valid ? (w.log_weights ? __ldg(w.log_weights + j) : 0.f) : kNegInf;
    }
  }

#pragma unroll
  for (int it = 0; it < TC::kIters; ++it) {
    const int src = TC::loader_lane(it, lane);
    const int32_t ra = __shfl_sync(kFullMask, a, src);
    int32_t rb = 0;
    if constexpr (Paged) rb = __shfl_sync(kFullMask, b, src);
    const int r = (int(threadIdx.x) + it * C::kThreads) / C::kChunksPerRow;
    // Paged: a block-table entry is >= 0 for every row the launcher addresses.
    const bool valid = ra >= 0;
    const int offset = r * C::kRowBytes + chunk * 16;
    const unsigned char* k_src = k_lane;
    const unsigned char* v_src = v_lane;
    if (valid) {
      if constexpr (Narrow) {
        if constexpr (Paged) {
          k_src = wide_mad(wide_mad(k_lane, ra, args.strides.k_block), rb, args.strides.k_row);
          v_src = wide_mad(wide_mad(v_lane, ra, args.strides.v_block), rb, args.strides.v_row);
        } else {
          k_src = wide_mad(k_lane, ra, args.strides.k_row);
          v_src = wide_mad(v_lane, ra, args.strides.v_row);
        }
      } else {
        int64_t k_off, v_off;
        if constexpr (Paged) {
          k_off = int64_t(ra) * qkv.k_batch_stride + int64_t(rb) * qkv.k_row_stride;
          v_off = int64_t(ra) * qkv.v_batch_stride + int64_t(rb) * qkv.v_row_stride;
        } else {
          k_off = int64_t(ra) * qkv.k_row_stride;
          v_off = int64_t(ra) * qkv.v_row_stride;
        }
        k_src = k_lane + k_off * int64_t(sizeof(T));
        v_src = v_lane + v_off * int64_t(sizeof(T));
      }
    }
    if (args.aligned) {
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

// Whether every K/V row address is 16-byte aligned (host side, from pointers and
// strides). Paged: dim 0 counts blocks (any number of them), dim 2 slots.
inline bool rows_are_aligned(const QKVParams& qkv) {
  const int64_t elem = qkv.dtype == DType::kFloat32 ? 4 : 2;
  auto ok_ptr = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
  auto ok_stride = [&](int64_t stride, int64_t extent) {
    return extent <= 1 || ((stride * elem) & 15) == 0;
  };
  const bool paged = qkv.paging.paged();
  const int64_t outer = paged ? 2 : qkv.batch;
  const int64_t rows = paged ? qkv.paging.block_size : qkv.length;
  return ok_ptr(qkv.k) && ok_ptr(qkv.v) && ok_stride(qkv.k_batch_stride, outer) &&
         ok_stride(qkv.v_batch_stride, outer) && ok_stride(qkv.k_head_stride, qkv.kv_heads) &&
         ok_stride(qkv.v_head_stride, qkv.kv_heads) && ok_stride(qkv.k_row_stride, rows) &&
         ok_stride(qkv.v_row_stride, rows);
}

// ---------------------------------------------------------------------------
// Records: merging running states.
// ---------------------------------------------------------------------------

// A fold policy F provides (see the fold policies in the header comment):
//   using Params;                                   the stage's params struct
//   static constexpr int kMaxHeadsPerBlock;         register budget: HB <= this
//   static constexpr int kScalars, kVectors;        moment counts (kScalars >= 1)
//   static constexpr bool kRowNorm;                 whether some x_i is ||V||^2
//   VATT_HD static constexpr int scalar_power(int i), vector_power(int j);
//   VATT_HD static constexpr bool scalar_is_norm(int i);
//   __device__ static const QKVParams& qkv(const Params&);
//   __device__ static IndexListParams list(const Params&);
//   __device__ static float logit(float dot, float scale, float bias);
//   template <typename T, int D, int HB> __device__ static void finish(
//       const Params&, const GatherArgs&, const ListWork<T>&, const float* records, int tid);
//     (writes the outputs from the block's records, HeadSplit::kRowSets per head; see gather_kernel)
//   template <typename T, int D> __device__ static void finish_empty(
//       const Params&, const GatherArgs&, const ListWork<T>&, int tid);
//     (a surplus split, blockIdx.y > 0 past the list's splits: marks its partial
//     empty for the merge and nothing else; never called with one split)

template <class F>
struct RecordEntries {
  static constexpr int kScalar0 = 1;                  // entry of scalar 0 (m is entry 0)
  static constexpr int kVector0 = 1 + F::kScalars;    // entry of vector 0, element 0
};

template <class F, int D>
struct RecordLayout : RecordEntries<F> {
  using RecordEntries<F>::kScalar0;
  using RecordEntries<F>::kVector0;
  static constexpr int kFloats = kVector0 + F::kVectors * D;

  // The power with which entry x rescales (entry 0, m, is not a sum).
  VATT_HD static constexpr int power(int x) {
    return x < kVector0 ? F::scalar_power(x - kScalar0) : F::vector_power((x - kVector0) / D);
  }
};

// What a merge of records must know before summing: the max over the non-empty
// records, whether any is non-empty, and whether any carries a NaN logit.
struct RecordScan {
  float max_logit;
  bool any;
  bool nan;
};

// Records rec, rec + stride, ..., n of them.
__device__ __forceinline__ RecordScan scan_records(const float* rec, int64_t n, int64_t stride) {
  RecordScan r{kNegInf, false, false};
  for (int64_t k = 0; k < n; ++k) {
    const float m = rec[k * stride];
    const float sum_w = rec[k * stride + 1];
    if (is_zero_bits(sum_w)) continue;  // empty: nothing folded in
    r.any = true;
    if (is_nan_bits(sum_w) || is_nan_bits(m)) r.nan = true;
    r.max_logit = fmaxf(r.max_logit, m);
  }
  return r;
}

// out[i] = sum over non-empty records k of rec_k[entry[i]] * exp(m_k - max_logit)^power[i],
// for a scan with any && !nan. The K entries share each record's exp.
template <int K>
__device__ __forceinline__ void merge_records(const float* rec, int64_t n, int64_t stride,
                                              float max_logit, const int (&entry)[K],
                                              const int (&power)[K], float (&out)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) out[i] = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    const float* r = rec + k * stride;
    if (is_zero_bits(r[1])) continue;
    const float a = __expf(r[0] - max_logit);
    const float a2 = a * a;
#pragma unroll
    for (int i = 0; i < K; ++i) out[i] = fmaf(r[entry[i]], power[i] == 2 ? a2 : a, out[i]);
  }
}

// Entry x of the merge of n records: NaN for a NaN merge, the empty record
// (m = -inf, sums 0) when all are empty.
template <class F, int D>
__device__ __forceinline__ float merged_entry(const float* rec, int64_t n, int64_t stride,
                                              const RecordScan& scan, int x) {
  if (scan.nan) return quiet_nan();
  if (!scan.any) return x == 0 ? kNegInf : 0.f;
  if (x == 0) return scan.max_logit;
  float v[1];
  merge_records<1>(rec, n, stride, scan.max_logit, {x}, {RecordLayout<F, D>::power(x)}, v);
  return v[0];
}

// ---------------------------------------------------------------------------
// The gather kernel.
// ---------------------------------------------------------------------------

// Heads per thread. A row group keeps, per head it serves, q and the policy's
// vectors in registers: (1 + kVectors) x kEpt floats a head. At 8 heads of kEpt 8
// (attention, 16-bit types or fp32 at head_dim 256) that is 128 registers of state,
// and the kernel took 221-245 registers: 2 blocks per SM. There the block's row groups
// are paired (kSplit = 2): the two groups of a pair read the same tile rows and serve
// half of the heads each, so each thread holds kHeads = HB / 2 heads (the state of
// HB = 4, under 170 registers: 3 blocks of 128 threads per SM) and each row set reads
// twice the rows. The K/V rows are still gathered once per block; what doubles is a
// row's shared-memory slice loads and unpacking per thread (the pair sits in one warp
// when kTpr <= 16 and reads the same addresses, a broadcast), against the registers
// kept. Records: one per (row set, head).
template <class F, typename T, int D, int HB>
struct HeadSplit {
  using C = GatherConfig<T, D>;
  static constexpr int kStateFloats = HB * (1 + F::kVectors) * C::kEpt;
  static constexpr int kSplit = (HB % 2 == 0 && kStateFloats > 96) ? 2 : 1;
  static constexpr int kHeads = HB / kSplit;
  static constexpr int kRowSets = C::kGroups / kSplit;
  static constexpr int kRowsPerSet = C::kRows / kRowSets;
  // Lane-per-head softmax scalars (reduce_scatter): m and scalars for one head a lane.
  // Kept only where it shortened the tile loop's SASS (sm_90, instructions between the
  // loop's branch and its target): the attention fold in fp32 without a head split,
  // 14-29% fewer (HB 4 / 8, head_dim 64-256). With 16-bit types (kEpt 8), a head split
  // or the pilot's two vectors and squared weights the loop grew by 8-35%, so those
  // keep the per-lane scalars of fold_row.
  static constexpr bool kOwnerLanes = kHeads > 1 && kHeads <= C::kTpr && sizeof(T) == 4 &&
                                      kSplit == 1 && F::kVectors == 1;
  static constexpr int kStateHeads = kOwnerLanes ? 1 : kHeads;
  static constexpr int kLanesPerHead = kOwnerLanes ? C::kTpr / kHeads : C::kTpr;
  static_assert(C::kGroups % kSplit == 0 && C::kRows % kRowSets == 0, "row sets tile rows");
};

// Folds one row of logit s (not -inf) into a head's moments (see the header).
template <class F, int kEpt>
__device__ __forceinline__ void fold_row(float& m, float (&scalar)[F::kScalars],
                                         float (&vec)[F::kVectors][kEpt], float s, float norm2,
                                         const float (&vf)[kEpt]) {
  if (s > m) {  // a new max (never for a NaN s: it goes below, weight NaN)
    const float a = is_neg_inf_bits(m) ? 0.f : __expf(m - s);
    const float a2 = a * a;
    m = s;
#pragma unroll
    for (int i = 0; i < F::kScalars; ++i) {
      scalar[i] = fmaf(scalar[i], F::scalar_power(i) == 2 ? a2 : a,
                       F::scalar_is_norm(i) ? norm2 : 1.f);
    }
#pragma unroll
    for (int j = 0; j < F::kVectors; ++j) {
      const float aj = F::vector_power(j) == 2 ? a2 : a;
#pragma unroll
      for (int e = 0; e < kEpt; ++e) vec[j][e] = fmaf(vec[j][e], aj, vf[e]);
    }
  } else {
    const float wt = __expf(s - m);
    const float wt2 = wt * wt;
#pragma unroll
    for (int i = 0; i < F::kScalars; ++i) {
      scalar[i] = fmaf(F::scalar_power(i) == 2 ? wt2 : wt, F::scalar_is_norm(i) ? norm2 : 1.f,
                       scalar[i]);
    }
#pragma unroll
    for (int j = 0; j < F::kVectors; ++j) {
      const float wj = F::vector_power(j) == 2 ? wt2 : wt;
#pragma unroll
      for (int e = 0; e < kEpt; ++e) vec[j][e] = fmaf(wj, vf[e], vec[j][e]);
    }
  }
}

// One lane per head for the softmax scalars (kHeads > 1). After the row's partial
// dots, a reduce-scatter over the row group's kTpr lanes leaves lane l with the
// total of head owner_head(l) = l / (kTpr / kHeads) (log2 kHeads halving steps, then
// plain butterflies): fewer shuffles than kHeads full reductions. Each lane then keeps
// m and the scalars of its own head only (fold_scalars, the scalar half of fold_row)
// and the row group shares each head's factor with one shuffle (fold_vectors). The
// factor's code: +inf = skip the row for this head (weight 0 or a head past w.heads);
// sign bit set = a new max, |code| the rescale a; otherwise the row's weight w. A NaN
// logit gives a NaN code, which makes the vectors NaN on either path.
template <int kHeads, int kTpr>
__device__ __forceinline__ float reduce_scatter(float (&p)[kHeads], int lane) {
#pragma unroll
  for (int n = kHeads, o = kTpr / 2; n > 1; n /= 2, o /= 2) {
    const bool upper = (lane & o) != 0;
#pragma unroll
    for (int k = 0; k < n / 2; ++k) {
      const float send = upper ? p[k] : p[k + n / 2];
      const float keep = upper ? p[k + n / 2] : p[k];
      p[k] = keep + __shfl_xor_sync(kFullMask, send, o, kTpr);
    }
  }
  float x = p[0];
#pragma unroll
  for (int o = kTpr / kHeads / 2; o > 0; o /= 2) x += __shfl_xor_sync(kFullMask, x, o, kTpr);
  return x;
}

constexpr uint32_t kSkipCode = 0x7f800000u;  // +inf

template <class F>
__device__ __forceinline__ float fold_scalars(float& m, float (&scalar)[F::kScalars], float s,
                                              float norm2) {
  if (is_neg_inf_bits(s)) return __uint_as_float(kSkipCode);
  if (s > m) {  // a new max (never for a NaN s: it goes below, weight NaN)
    const float a = is_neg_inf_bits(m) ? 0.f : __expf(m - s);
    const float a2 = a * a;
    m = s;
#pragma unroll
    for (int i = 0; i < F::kScalars; ++i) {
      scalar[i] = fmaf(scalar[i], F::scalar_power(i) == 2 ? a2 : a,
                       F::scalar_is_norm(i) ? norm2 : 1.f);
    }
    return __uint_as_float(__float_as_uint(a) | 0x80000000u);
  }
  const float wt = __expf(s - m);
  const float wt2 = wt * wt;
#pragma unroll
  for (int i = 0; i < F::kScalars; ++i) {
    scalar[i] = fmaf(F::scalar_power(i) == 2 ? wt2 : wt, F::scalar_is_norm(i) ? norm2 : 1.f,
                     scalar[i]);
  }
  return wt;
}

template <class F, int kEpt>
__device__ __forceinline__ void fold_vectors(float (&vec)[F::kVectors][kEpt], float code,
                                             const float (&vf)[kEpt]) {
  const uint32_t bits = __float_as_uint(code);
  if (bits == kSkipCode) return;
  if (bits >> 31) {
    const float a = __uint_as_float(bits & 0x7fffffffu);
    const float a2 = a * a;
#pragma unroll
    for (int j = 0; j < F::kVectors; ++j) {
      const float aj = F::vector_power(j) == 2 ? a2 : a;
#pragma unroll
      for (int e = 0; e < kEpt; ++e) vec[j][e] = fmaf(vec[j][e], aj, vf[e]);
    }
  } else {
    const float wt2 = code * code;
#pragma unroll
    for (int j = 0; j < F::kVectors; ++j) {
      const float wj = F::vector_power(j) == 2 ? wt2 : code;
#pragma unroll
      for (int e = 0; e < kEpt; ++e) vec[j][e] = fmaf(wj, vf[e], vec[j][e]);
    }
  }
}

// One block: split blockIdx.y of list blockIdx.x for head chunk blockIdx.z.
// Streams the split's K/V rows through a kStages-deep cp.async pipeline; per
// row group, computes the logits of its heads (all HB, or half of them with
// HeadSplit) from one read of each K row and folds the V row into each head's
// moments; then merges the row sets' records in shared memory and hands them to
// F::finish.
template <class F, typename T, int D, int HB, bool Paged, bool Narrow>
__global__ void __launch_bounds__(GatherConfig<T, D>::kThreads)
gather_kernel(const typename F::Params p, const GatherArgs args) {
  using C = GatherConfig<T, D>;
  using R = RecordLayout<F, D>;
  using L = HeadSplit<F, T, D, HB>;
  static_assert(HB <= F::kMaxHeadsPerBlock, "more heads than the policy's registers allow");
  unsigned char* pipe = dynamic_smem();
  float* bias = reinterpret_cast<float*>(pipe + C::kPipeBytes);

  const QKVParams& qkv = F::qkv(p);
  const IndexListParams list = F::list(p);
  int64_t split_rows = 0;
  if (args.target_blocks > 0 && args.num_splits > 1) {
    const int64_t total = launch_total_count<C::kThreads>(
        list, qkv.batch * list.list_heads, reinterpret_cast<int64_t*>(pipe));
    split_rows = balanced_split_rows(total, args.target_blocks);
  }
  const ListWork<T> w = block_work<T, Paged>(qkv, list, HB, args.num_splits, split_rows);
  const int tid = threadIdx.x;
  if (w.surplus) {  // uniform in the block, before any barrier of the pipeline
    F::template finish_empty<T, D>(p, args, w, tid);
    return;
  }
  const int grp = tid / C::kTpr;
  const int lane = tid % C::kTpr;
  const int hs = grp % L::kSplit;        // which kHeads of the block's heads
  const int row_set = grp / L::kSplit;   // which rows of a tile
  const int g0 = hs * L::kHeads;
  const float scale = qkv.scale;

  float q[L::kHeads][C::kEpt];
#pragma unroll
  for (int g = 0; g < L::kHeads; ++g) {
    if (g0 + g < w.heads) {
      load_query_slice<T, D>(qkv, w.b, w.h0 + g0 + g, lane, q[g]);
    } else {
#pragma unroll
      for (int e = 0; e < C::kEpt; ++e) q[g][e] = 0.f;
    }
  }
  // m and the scalars: of every head served, or (kOwnerLanes) of this lane's head.
  const int own = L::kOwnerLanes ? lane / L::kLanesPerHead : 0;
  const bool own_valid = g0 + own < w.heads;
  float m[L::kStateHeads];
  float scalar[L::kStateHeads][F::kScalars];
  float vec[L::kHeads][F::kVectors][C::kEpt];
#pragma unroll
  for (int g = 0; g < L::kStateHeads; ++g) {
    m[g] = kNegInf;
#pragma unroll
    for (int i = 0; i < F::kScalars; ++i) scalar[g][i] = 0.f;
  }
#pragma unroll
  for (int g = 0; g < L::kHeads; ++g) {
#pragma unroll
    for (int j = 0; j < F::kVectors; ++j) {
#pragma unroll
      for (int e = 0; e < C::kEpt; ++e) vec[g][j][e] = 0.f;
    }
  }

  const int64_t tiles = ceil_div(w.end - w.begin, C::kRows);
  const int copy_chunk = tid % C::kChunksPerRow;  // the same in every copy round
  const unsigned char* k_lane = reinterpret_cast<const unsigned char*>(w.k) + copy_chunk * 16;
  const unsigned char* v_lane = reinterpret_cast<const unsigned char*>(w.v) + copy_chunk * 16;
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < tiles) {
      issue_tile<T, D, Paged, Narrow>(pipe, bias, s, w, w.begin + int64_t(s) * C::kRows, qkv,
                                      args, k_lane, v_lane);
    }
    cp_async_commit();
  }

  for (int64_t t = 0; t < tiles; ++t) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();  // tile t landed for every thread; stage (t - 1) % kStages is free
    {
      const int64_t next = t + C::kStages - 1;
      if (next < tiles) {
        issue_tile<T, D, Paged, Narrow>(pipe, bias, int(next % C::kStages), w,
                                        w.begin + next * C::kRows, qkv, args, k_lane, v_lane);
      }
      cp_async_commit();
    }
    const int stage = int(t % C::kStages);
    const unsigned char* k_tile = pipe + stage * C::kStageBytes;
    const unsigned char* v_tile = k_tile + C::kTileBytes;
#pragma unroll
    for (int rr = 0; rr < L::kRowsPerSet; ++rr) {
      const int r = row_set + rr * L::kRowSets;
      const float row_bias = bias[stage * C::kRows + r];
      float kf[C::kEpt], vf[C::kEpt];
      load_row_slice<T, D>(k_tile + r * C::kRowBytes, lane, kf);
      float norm2 = 0.f;
      if constexpr (F::kRowNorm) {
        load_row_slice<T, D>(v_tile + r * C::kRowBytes, lane, vf);
#pragma unroll
        for (int e = 0; e < C::kEpt; ++e) norm2 = fmaf(vf[e], vf[e], norm2);
      }
      float dot[L::kHeads];
#pragma unroll
      for (int g = 0; g < L::kHeads; ++g) {
        float acc_dot = 0.f;
#pragma unroll
        for (int e = 0; e < C::kEpt; ++e) acc_dot = fmaf(q[g][e], kf[e], acc_dot);
        dot[g] = acc_dot;
      }
      // The shuffles take the whole warp, so every row group reduces before any skips.
      if constexpr (F::kRowNorm) norm2 = group_sum<C::kTpr>(norm2);
      if constexpr (L::kOwnerLanes) {
        const float own_dot = reduce_scatter<L::kHeads, C::kTpr>(dot, lane);
        // A skipped entry (padding, out of range, beyond the split, log-weight -inf) is
        // skipped for every head, whatever its K row holds.
        const bool skip = is_neg_inf_bits(row_bias) || !own_valid;
        const float code = skip ? __uint_as_float(kSkipCode)
                                : fold_scalars<F>(m[0], scalar[0],
                                                  F::logit(own_dot, scale, row_bias), norm2);
        // Every lane shuffles, before the skip below (other row groups share the warp).
        float codes[L::kHeads];
#pragma unroll
        for (int g = 0; g < L::kHeads; ++g) {
          codes[g] = __shfl_sync(kFullMask, code, g * L::kLanesPerHead, C::kTpr);
        }
        // Uniform in the row group: its V row is not used.
        if (is_neg_inf_bits(row_bias)) continue;
        if constexpr (!F::kRowNorm) load_row_slice<T, D>(v_tile + r * C::kRowBytes, lane, vf);
#pragma unroll
        for (int g = 0; g < L::kHeads; ++g) fold_vectors<F, C::kEpt>(vec[g], codes[g], vf);
      } else {
#pragma unroll
        for (int g = 0; g < L::kHeads; ++g) dot[g] = group_sum<C::kTpr>(dot[g]);
        if (is_neg_inf_bits(row_bias)) continue;
        if constexpr (!F::kRowNorm) load_row_slice<T, D>(v_tile + r * C::kRowBytes, lane, vf);
#pragma unroll
        for (int g = 0; g < L::kHeads; ++g) {
          if (g0 + g >= w.heads) continue;
          const float s = F::logit(dot[g], scale, row_bias);
          if (is_neg_inf_bits(s)) continue;  // weight 0 (e.g. an infinite K entry)
          fold_row<F, C::kEpt>(m[g], scalar[g], vec[g], s, norm2, vf);
        }
      }
    }
  }

  // The row sets' records, [kRowSets][HB][R::kFloats], in the pipeline buffers.
  cp_async_wait<0>();
  __syncthreads();
  float* records = reinterpret_cast<float*>(pipe);
  static_assert(L::kRowSets * HB * R::kFloats * sizeof(float) <= C::kPipeBytes, "merge scratch");
#pragma unroll
  for (int g = 0; g < L::kHeads; ++g) {
    if (g0 + g >= w.heads) continue;
    float* rec = records + (row_set * HB + g0 + g) * R::kFloats;
#pragma unroll
    for (int j = 0; j < F::kVectors; ++j) {
#pragma unroll
      for (int e = 0; e < C::kEpt; ++e) {
        rec[R::kVector0 + j * D + C::dim_of(lane, e)] = vec[g][j][e];
      }
    }
    if constexpr (!L::kOwnerLanes) {
      if (lane == 0) {
        rec[0] = m[g];
#pragma unroll
        for (int i = 0; i < F::kScalars; ++i) rec[R::kScalar0 + i] = scalar[g][i];
      }
    }
  }
  if constexpr (L::kOwnerLanes) {
    if (own_valid && lane % L::kLanesPerHead == 0) {
      float* rec = records + (row_set * HB + g0 + own) * R::kFloats;
      rec[0] = m[0];
#pragma unroll
      for (int i = 0; i < F::kScalars; ++i) rec[R::kScalar0 + i] = scalar[0][i];
    }
  }
  __syncthreads();
  F::template finish<T, D, HB>(p, args, w, records, tid);
}

template <class F, typename T, int D, int HB, bool Paged, bool Narrow>
cudaError_t launch_gather_kernel(const typename F::Params& p, const GatherArgs& args,
                                 int64_t lists, int64_t chunks, cudaStream_t stream) {
  using C = GatherConfig<T, D>;
  static std::atomic<int> smem_set[kMaxDevices];
  auto kernel = gather_kernel<F, T, D, HB, Paged, Narrow>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), C::kSmemBytes, device, smem_set);
  if (err != cudaSuccess) return err;
  const dim3 grid{unsigned(lists), unsigned(args.num_splits), unsigned(chunks)};
  return launch_kernel(kernel, grid, dim3(C::kThreads), size_t(C::kSmemBytes), stream, 1, p, args);
}

// Launches gather_kernel<F> for p's dtype, head dim, heads per block (dispatch.h;
// HB capped at F::kMaxHeadsPerBlock, wider groups get more head chunks) and K/V
// layout. args.aligned is filled in here.
template <class F>
cudaError_t launch_gather(const typename F::Params& p, GatherArgs args, cudaStream_t stream) {
  const QKVParams& qkv = F::qkv(p);
  const IndexListParams list = F::list(p);
  const int64_t group = qkv.group_size();
  const bool per_head = list.list_heads == qkv.q_heads;
  const int hb = std::min(heads_per_block(group, per_head), F::kMaxHeadsPerBlock);
  const int64_t lists = qkv.batch * list.list_heads;
  const int64_t chunks = per_head ? 1 : ceil_div(group, hb);
  if (!paging_supported(qkv.paging, qkv.length)) return cudaErrorInvalidValue;
  args.aligned = rows_are_aligned(qkv);
  args.strides = narrow_strides(qkv);
  const bool paged = qkv.paging.paged(), narrow = narrow_row_strides(qkv);
  return dispatch_dtype(qkv.dtype, [&](auto dtype_tag) -> cudaError_t {
    using T = decltype(dtype_tag);
    return dispatch_head_dim(qkv.head_dim, cudaErrorInvalidValue, [&](auto dim_tag) -> cudaError_t {
      constexpr int D = decltype(dim_tag)::value;
      return dispatch_heads_per_block(hb, cudaErrorInvalidValue, [&](auto hb_tag) -> cudaError_t {
        constexpr int HB = decltype(hb_tag)::value;
        if constexpr (HB > F::kMaxHeadsPerBlock) {
          return cudaErrorInvalidValue;  // not instantiated: would spill
        } else {
          if (paged) {
            return narrow ? launch_gather_kernel<F, T, D, HB, true, true>(p, args, lists, chunks,
                                                                         stream)
                          : launch_gather_kernel<F, T, D, HB, true, false>(p, args, lists, chunks,
                                                                          stream);
          }
          return narrow ? launch_gather_kernel<F, T, D, HB, false, true>(p, args, lists, chunks,
                                                                        stream)
                        : launch_gather_kernel<F, T, D, HB, false, false>(p, args, lists, chunks,
                                                                         stream);
        }
      });
    });
  });
}

}  // namespace cuda_detail
}  // namespace vattention
