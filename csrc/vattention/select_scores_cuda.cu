// CUDA selection scores (select_scores.h, SelectScoresParams): the values of
// select_scores_cpu, reading every K row (or its int4 summary, from_summary) once
// per KV group.
//
// Key sources. Kernel 1 is written once against a key-source policy, so the lse,
// group max and NaN handling below are shared by both selectors:
//   DenseKeys<T, D, Paged>: K rows of q's dtype, 16-byte cp.async chunks;
//   SummaryKeys<D, Paged>:  key_summary.h's rows, D / 2 code bytes (16-byte chunks) and
//                     D / 8 bytes of (zero, step) pairs (16-byte chunks, 8-byte at
//                     D = 64) per token, dequantised in registers: a lane owns 8
//                     consecutive channels (one 32-bit code word, one group's pair),
//                     the layout of GatherConfig<half_t, D>, so q slices and the
//                     reduce-scatter are those of a 16-bit dense row.
// A policy gives the lane layout L (kTpr lanes per row, kEpt elements each,
// dim_of), the tile rows and bytes of a pipeline stage, the per-(b, KV head) row
// pointers, the copies of a tile and the conversion of one row slice to floats.
// Paged K (qkv.paging) or summary (summary.paging, the same table): each copy
// unit finds its position's block and slot (kv_gather_cuda.cuh's paged_row). Paged
// is a template flag, so the contiguous kernels are unchanged (a runtime branch
// cost the summary kernels up to 38 registers at D = 256: 128 -> 166).
//
// Kernel 1, select_logits_kernel: one block per (batch, KV head, split of the
// positions, chunk of <= HB query heads of the group; one chunk unless the group
// is wider than 8). The split's valid K rows stream through a kStages cp.async
// pipeline of 16 KiB tiles (16-byte copies, rows beyond the batch row's length
// are never read). The thread layout is kv_gather_cuda.cuh's: a row is read by
// kTpr lanes, each owning kEpt elements, and each lane dots its slice with all
// HB queries. The partial dots of kSub rows x HB heads are summed over a row's
// lanes by a reduce-scatter (about one shuffle per dot rather than log2(kTpr)),
// gathered in a shared [HB, kRows] logit tile and written out coalesced:
//   share_gqa off: straight into the scores [B, Hq, N] (-inf beyond the length);
//   share_gqa on:  into a workspace of per-head logits [B, Hq, N], and each block
//                  keeps per head a running (max, sum exp) of its split, written
//                  to a partials array [B * Hq, splits, 2].
// Kernel 2, select_combine_kernel (share_gqa): each block merges its group's split
// partials into the heads' lse (one warp per head, 0 where not finite), then
// scores[b, kv, i] = max over the group of (logit - lse), NaN propagating, -inf
// beyond the length. The partials are few (group * N / tile pairs), so every block
// re-reading them is cheaper than a launch of their own (a separate lse kernel
// before, the same arithmetic: the scores are bit-identical).
// NaN: fmaxf drops a NaN operand, so the maxima above never carry one; a NaN
// logit reaches lse through its exp-sum instead (exp(NaN - m) = NaN, made 0 by
// the finiteness test, as in the CPU and torch references) and reaches the score
// through an explicit NaN flag. The NaN and finiteness tests read the bits: they
// must not depend on what --use_fast_math does to float compares.
// The per-head logits make one extra fp32 write + read per (head, position)
// (8 bytes against the 2 * head_dim bytes of a bf16 K row per group; against a
// summary row of 5 * head_dim / 8 bytes they add 45% to its traffic at D = 128 and a
// group of 4, which recomputing the logits in a second pass would not beat: that
// pass would read the summary again).
#include "dispatch.h"
#include "kv_gather_cuda.cuh"
#include "select_scores.h"

namespace vattention {
namespace {

using namespace cuda_detail;

// Rows per pipeline stage: 16 KiB of K, 8..128 rows (host and device agree on it).
constexpr int64_t score_tile_rows(int64_t row_bytes) {
  return 16384 / row_bytes < 8 ? 8 : (16384 / row_bytes > 128 ? 128 : 16384 / row_bytes);
}

// Summary rows per stage: 128 (5 and 10 KiB at D = 64, 128), 64 at D = 256 (10 KiB;
// 128 rows there unroll into 168 registers at HB = 8). The row groups need a
// power-of-two share of the tile, which 16 KiB / (5 D / 8) bytes would not give.
constexpr int64_t summary_tile_rows(int64_t dim) { return dim >= 256 ? 64 : 128; }

__device__ __forceinline__ void cp_async_8(void* smem_dst, const void* gmem_src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int src_bytes = valid ? 8 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_u32(smem_dst)),
               "l"(gmem_src), "r"(src_bytes));
#else
  uint2 v = make_uint2(0, 0);
  if (valid) v = *reinterpret_cast<const uint2*>(gmem_src);
  *reinterpret_cast<uint2*>(smem_dst) = v;
#endif
}

// Copies one `Bytes`-byte unit (16 or 8) of a row into shared memory: cp.async when
// aligned, else `Raw`-sized element copies; zero-filled without a read when !valid.
template <int Bytes, typename Raw>
__device__ __forceinline__ void copy_unit(unsigned char* to, const unsigned char* src, bool valid,
                                          bool aligned) {
  if (aligned) {
    if constexpr (Bytes == 16) {
      cp_async_16(to, src, valid);
    } else {
      static_assert(Bytes == 8, "16- or 8-byte units");
      cp_async_8(to, src, valid);
    }
  } else {
    constexpr int kN = Bytes / int(sizeof(Raw));
    Raw* d = reinterpret_cast<Raw*>(to);
    const Raw* s = reinterpret_cast<const Raw*>(src);
#pragma unroll
    for (int e = 0; e < kN; ++e) d[e] = valid ? s[e] : Raw(0);
  }
}

// K rows of q's dtype T.
template <typename T, int D, bool Paged>
struct DenseKeys {
  using L = GatherConfig<T, D>;
  static constexpr int kRows = int(score_tile_rows(L::kRowBytes));
  static constexpr int kTileBytes = kRows * L::kRowBytes;
  static constexpr int kCopies = kRows * L::kChunksPerRow;  // 16-byte units per tile

  struct Rows {
    const T* k;                  // + batch (contiguous only) and KV-head offsets
    int64_t row_stride;
    const int32_t* block_row;    // paged only: the batch row's block table
    int64_t block_stride, block_size;
  };

  __device__ __forceinline__ static Rows rows(const SelectScoresParams& p, int64_t b, int64_t kv) {
    const QKVParams& qkv = p.qkv;
    const KVPaging& pg = qkv.paging;
    const T* k = static_cast<const T*>(qkv.k) + kv * qkv.k_head_stride;
    if constexpr (Paged) {
      return {k, qkv.k_row_stride, pg.block_table + b * pg.block_table_stride, qkv.k_batch_stride,
              pg.block_size};
    }
    return {k + b * qkv.k_batch_stride, qkv.k_row_stride, nullptr, 0, 0};
  }

  // Copy unit c (< kCopies) of tile rows [row0, row0 + kRows); rows >= valid_end zero-filled.
  __device__ __forceinline__ static void issue(unsigned char* dst, const Rows& w, int c,
                                               int64_t row0, int64_t valid_end, bool aligned) {
    const int r = c / L::kChunksPerRow;
    const int chunk = c - r * L::kChunksPerRow;
    const int64_t j = row0 + r;
    const bool valid = j < valid_end;
    const unsigned char* src = reinterpret_cast<const unsigned char*>(w.k);
    if (valid) {
      int64_t off;
      if constexpr (Paged) {
        const PagedRow pr = paged_row(w.block_row, w.block_size, j);
        off = pr.block * w.block_stride + pr.slot * w.row_stride;
      } else {
        off = j * w.row_stride;
      }
      src = reinterpret_cast<const unsigned char*>(w.k + off) + chunk * 16;
    }
    using Raw = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;
    copy_unit<16, Raw>(dst + r * L::kRowBytes + chunk * 16, src, valid, aligned);
  }

  __device__ __forceinline__ static void load(const unsigned char* tile, int r, int lane,
                                              float (&kf)[L::kEpt]) {
    load_row_slice<T, D>(tile + r * L::kRowBytes, lane, kf);
  }
};

// key_summary.h's rows; a stage holds [kRows code rows][kRows param rows].
template <int D, bool Paged>
struct SummaryKeys {
  using L = GatherConfig<half_t, D>;
  static_assert(L::kEpt == 8 && L::kTpr * 8 == D, "a lane owns 8 consecutive channels");
  static constexpr int kCodeBytes = D / 2;                              // per row
  static constexpr int kParamBytes = 4 * (D / kSummaryGroup);           // per row
  static constexpr int kParamUnit = kParamBytes < 16 ? 8 : 16;          // copy unit
  static constexpr int kCodeUnits = kCodeBytes / 16;
  static constexpr int kParamUnits = kParamBytes / kParamUnit;
  static constexpr int kRows = int(summary_tile_rows(D));
  static constexpr int kTileBytes = kRows * (kCodeBytes + kParamBytes);
  static constexpr int kCopies = kRows * (kCodeUnits + kParamUnits);
  static_assert(kParamBytes % kParamUnit == 0 && kCodeBytes % 16 == 0, "whole copy units");

  struct Rows {
    const uint8_t* codes;        // + batch (contiguous only) and KV-head offsets
    const half_t* params;
    int64_t codes_row_stride, params_row_stride;
    const int32_t* block_row;    // paged only: the batch row's block table
    int64_t codes_block_stride, params_block_stride, block_size;

    // Offsets of position j's code row (bytes) and (zero, step) row (elements).
    __device__ __forceinline__ int64_t code_offset(int64_t j) const {
      if constexpr (Paged) {
        const PagedRow pr = paged_row(block_row, block_size, j);
        return pr.block * codes_block_stride + pr.slot * codes_row_stride;
      } else {
        return j * codes_row_stride;
      }
    }
    __device__ __forceinline__ int64_t param_offset(int64_t j) const {
      if constexpr (Paged) {
        const PagedRow pr = paged_row(block_row, block_size, j);
        return pr.block * params_block_stride + pr.slot * params_row_stride;
      } else {
        return j * params_row_stride;
      }
    }
  };

  __device__ __forceinline__ static Rows rows(const SelectScoresParams& p, int64_t b, int64_t kv) {
    const KeySummaryParams& s = p.summary;
    const KVPaging& pg = s.paging;
    Rows w{s.codes + kv * s.codes_head_stride, s.params + kv * s.params_head_stride,
           s.codes_row_stride, s.params_row_stride, nullptr, 0, 0, 0};
    if constexpr (Paged) {
      w.block_row = pg.block_table + b * pg.block_table_stride;
      w.codes_block_stride = s.codes_batch_stride;
      w.params_block_stride = s.params_batch_stride;
      w.block_size = pg.block_size;
    } else {
      w.codes += b * s.codes_batch_stride;
      w.params += b * s.params_batch_stride;
    }
    return w;
  }

  // Units [0, kRows * kCodeUnits) are code chunks, the rest (z, s) chunks.
  __device__ __forceinline__ static void issue(unsigned char* dst, const Rows& w, int c,
                                               int64_t row0, int64_t valid_end, bool aligned) {
    if (c < kRows * kCodeUnits) {
      const int r = c / kCodeUnits;
      const int chunk = c - r * kCodeUnits;
      const int64_t j = row0 + r;
      const bool valid = j < valid_end;
      const unsigned char* src = w.codes;
      if (valid) src = w.codes + w.code_offset(j) + chunk * 16;
      copy_unit<16, uint8_t>(dst + r * kCodeBytes + chunk * 16, src, valid, aligned);
    } else {
      const int u = c - kRows * kCodeUnits;
      const int r = u / kParamUnits;
      const int chunk = u - r * kParamUnits;
      const int64_t j = row0 + r;
      const bool valid = j < valid_end;
      const unsigned char* src = reinterpret_cast<const unsigned char*>(w.params);
      if (valid) {
        src = reinterpret_cast<const unsigned char*>(w.params + w.param_offset(j)) +
              chunk * kParamUnit;
      }
      copy_unit<kParamUnit, uint16_t>(dst + kRows * kCodeBytes + r * kParamBytes + chunk * kParamUnit,
                                      src, valid, aligned);
    }
  }

  // K~_d = z_g + s_g * code_d for this lane's channels 8 * lane + e (group lane / 4).
  // An infinite step meets code 0 in the group's minimum: inf * 0 = NaN, as on the CPU.
  __device__ __forceinline__ static void load(const unsigned char* tile, int r, int lane,
                                              float (&kf)[L::kEpt]) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(tile + r * kCodeBytes + lane * 4);
    const uint32_t pair = *reinterpret_cast<const uint32_t*>(tile + kRows * kCodeBytes +
                                                             r * kParamBytes + (lane / 4) * 4);
    const float zero = half_bits_to_float(pair & 0xffffu);
    const float step = half_bits_to_float(pair >> 16);
#pragma unroll
    for (int e = 0; e < 8; ++e) kf[e] = fmaf(step, float((word >> (4 * e)) & 0xfu), zero);
  }
};

template <class KS>
struct ScoreConfig {
  using L = typename KS::L;  // lanes per row, elements per lane, dim_of
  static constexpr int kThreads = L::kThreads;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kTpr = L::kTpr;
  static constexpr int kEpt = L::kEpt;
  static constexpr int kGroups = L::kGroups;
  static constexpr int kRows = KS::kRows;
  static constexpr int kRowsPerGroup = kRows / kGroups;
  static constexpr int kStages = 4;
  static constexpr int kTileBytes = KS::kTileBytes;
  static constexpr int kPipeBytes = kStages * kTileBytes;

  static_assert(kRows % kGroups == 0, "tile rows split evenly over row groups");
  static_assert(KS::kCopies % kThreads == 0, "whole copy rounds");
  static_assert((kRowsPerGroup & (kRowsPerGroup - 1)) == 0, "power-of-two rows per group");
  static_assert(kTileBytes % 16 == 0, "16-byte aligned stages");
};

__device__ __forceinline__ bool is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

__device__ __forceinline__ bool is_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// Sums v[0 .. N) over aligned groups of 2 * O lanes (O a power of two; call with
// O = lanes / 2). With N >= lanes, lane l of a group ends with the totals of the
// values l * (N / lanes) + j in v[j], j < N / lanes; with N < lanes, with the
// total of value l / (lanes / N) in v[0] (shared by lanes / N lanes).
template <int N, int O>
struct ReduceScatter {
  __device__ __forceinline__ static void run(float* v, int lane) {
    if constexpr (O >= 1) {
      if constexpr (N >= 2) {
        constexpr int kHalf = N / 2;
        const bool upper = (lane & O) != 0;
#pragma unroll
        for (int j = 0; j < kHalf; ++j) {
          const float send = upper ? v[j] : v[j + kHalf];
          const float keep = upper ? v[j + kHalf] : v[j];
          v[j] = keep + __shfl_xor_sync(kFullMask, send, O);
        }
        ReduceScatter<kHalf, O / 2>::run(v, lane);
      } else {
        v[0] += __shfl_xor_sync(kFullMask, v[0], O);
        ReduceScatter<1, O / 2>::run(v, lane);
      }
    }
  }
};

// Issues the copies of rows [row0, row0 + kRows) of a key source into a pipeline
// stage; rows at or beyond valid_end are zero-filled without being read.
template <class KS>
__device__ __forceinline__ void issue_rows(unsigned char* dst, const typename KS::Rows& w,
                                           int64_t row0, int64_t valid_end, bool aligned) {
  using C = ScoreConfig<KS>;
#pragma unroll
  for (int it = 0; it < KS::kCopies / C::kThreads; ++it) {
    KS::issue(dst, w, int(threadIdx.x) + it * C::kThreads, row0, valid_end, aligned);
  }
}

// KS: the key source; T: q's dtype (also K's for DenseKeys).
template <class KS, typename T, int HB>
__global__ void __launch_bounds__(ScoreConfig<KS>::kThreads)
select_logits_kernel(const SelectScoresParams p, float* logits, float* partials,
                     const int64_t splits, const int64_t rows_per_split, const bool aligned) {
  using C = ScoreConfig<KS>;
  using L = typename KS::L;
  constexpr int kSub = C::kRowsPerGroup < (HB >= 16 ? 1 : 16 / HB) ? C::kRowsPerGroup
                                                                   : (HB >= 16 ? 1 : 16 / HB);
  constexpr int kV = HB * kSub;  // partial dots per lane per sub-batch, index g * kSub + rr
  constexpr int kHeadsPerWarp = (HB + C::kWarps - 1) / C::kWarps;
  static_assert((kV & (kV - 1)) == 0, "power-of-two values for the reduce-scatter");

  unsigned char* pipe = dynamic_smem();
  float* tile_logits = reinterpret_cast<float*>(pipe + C::kPipeBytes);  // [HB][kRows]

  const QKVParams& qkv = p.qkv;
  const int64_t group = qkv.group_size();
  const int64_t n = qkv.length;
  const int64_t list = int64_t(blockIdx.x) / splits;
  const int64_t split = int64_t(blockIdx.x) - list * splits;
  const int64_t b = list / qkv.kv_heads;
  const int64_t kv = list - b * qkv.kv_heads;
  const int64_t h0 = kv * group + int64_t(blockIdx.y) * HB;
  const int heads = int(min(int64_t(HB), group - int64_t(blockIdx.y) * HB));
  const int64_t begin = min(split * rows_per_split, n);
  const int64_t end = min(begin + rows_per_split, n);
  const int64_t valid_end = max(begin, min(end, p.length_of(b)));
  const typename KS::Rows k = KS::rows(p, b, kv);
  float* head_logits = logits + (b * qkv.q_heads + h0) * n;  // head g at + g * n

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane32 = tid % 32;
  const int grp = tid / C::kTpr, lane = tid % C::kTpr;
  const float scale = qkv.scale;

  float q[HB][C::kEpt];
#pragma unroll
  for (int g = 0; g < HB; ++g) {
    if (g < heads) {
      const T* qh = static_cast<const T*>(qkv.q) + b * qkv.q_batch_stride + (h0 + g) * qkv.q_head_stride;
#pragma unroll
      for (int e = 0; e < C::kEpt; ++e) q[g][e] = load_float(qh + L::dim_of(lane, e));
    } else {
#pragma unroll
      for (int e = 0; e < C::kEpt; ++e) q[g][e] = 0.f;
    }
  }
  float run_m[kHeadsPerWarp], run_s[kHeadsPerWarp];
#pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) {
    run_m[i] = kNegInf;
    run_s[i] = 0.f;
  }

  const int64_t tiles = ceil_div(valid_end - begin, C::kRows);
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < tiles) {
      issue_rows<KS>(pipe + s * C::kTileBytes, k, begin + int64_t(s) * C::kRows, valid_end,
                     aligned);
    }
    cp_async_commit();
  }

  for (int64_t t = 0; t < tiles; ++t) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();
    {
      const int64_t next = t + C::kStages - 1;
      if (next < tiles) {
        issue_rows<KS>(pipe + int(next % C::kStages) * C::kTileBytes, k, begin + next * C::kRows,
                       valid_end, aligned);
      }
      cp_async_commit();
    }
    const unsigned char* tile = pipe + int(t % C::kStages) * C::kTileBytes;
    const int64_t row0 = begin + t * C::kRows;

    // Logits of the tile's rows (row j * kGroups + grp of the tile for row group grp).
#pragma unroll
    for (int sb = 0; sb < C::kRowsPerGroup / kSub; ++sb) {
      float acc[kV];
#pragma unroll
      for (int rr = 0; rr < kSub; ++rr) {
        const int r = (sb * kSub + rr) * C::kGroups + grp;
        float kf[C::kEpt];
        KS::load(tile, r, lane, kf);
#pragma unroll
        for (int g = 0; g < HB; ++g) {
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < C::kEpt; ++e) dot = fmaf(q[g][e], kf[e], dot);
          acc[g * kSub + rr] = dot;
        }
      }
      ReduceScatter<kV, C::kTpr / 2>::run(acc, lane);
      if constexpr (kV >= C::kTpr) {
#pragma unroll
        for (int j = 0; j < kV / C::kTpr; ++j) {
          const int idx = lane * (kV / C::kTpr) + j;
          const int r = (sb * kSub + idx % kSub) * C::kGroups + grp;
          tile_logits[(idx / kSub) * C::kRows + r] = acc[j] * scale;
        }
      } else {
        constexpr int kShare = C::kTpr / kV;  // lanes holding the same total
        if (lane % kShare == 0) {
          const int idx = lane / kShare;
          const int r = (sb * kSub + idx % kSub) * C::kGroups + grp;
          tile_logits[(idx / kSub) * C::kRows + r] = acc[0] * scale;
        }
      }
    }
    __syncthreads();

    // Coalesced writes of the tile; with share_gqa, the running softmax partials.
#pragma unroll
    for (int i = 0; i < kHeadsPerWarp; ++i) {
      const int g = warp + i * C::kWarps;
      if (g >= heads) continue;  // uniform over the warp
      const float* src = tile_logits + g * C::kRows;
      float* dst = head_logits + int64_t(g) * n + row0;
      const int rows = int(min(int64_t(C::kRows), valid_end - row0));
      float tile_max = kNegInf;
      for (int x = lane32; x < rows; x += 32) {
        const float v = src[x];
        dst[x] = v;
        tile_max = fmaxf(tile_max, v);
      }
      if (!p.share_gqa) continue;
      const float m_new = fmaxf(run_m[i], warp_max(tile_max));
      float sum = 0.f;
      for (int x = lane32; x < rows; x += 32) {
        const float v = src[x];
        if (v != kNegInf) sum += __expf(v - m_new);  // NaN stays NaN
      }
      sum = warp_sum(sum);
      run_s[i] = (run_m[i] == m_new ? run_s[i] : run_s[i] * __expf(run_m[i] - m_new)) + sum;
      run_m[i] = m_new;
    }
  }
  cp_async_wait<0>();

  if (p.share_gqa) {
    if (lane32 == 0) {
#pragma unroll
      for (int i = 0; i < kHeadsPerWarp; ++i) {
        const int g = warp + i * C::kWarps;
        if (g >= heads) continue;
        float* rec = partials + ((b * qkv.q_heads + h0 + g) * splits + split) * 2;
        rec[0] = run_m[i];
        rec[1] = run_s[i];
      }
    }
  } else {
    const int64_t masked = end - valid_end;  // positions beyond the length: -inf
    for (int g = 0; g < heads; ++g) {
      float* dst = head_logits + int64_t(g) * n + valid_end;
      for (int64_t x = tid; x < masked; x += C::kThreads) dst[x] = kNegInf;
    }
  }
}

// logsumexp of one head's logits from its split partials (one warp; every lane gets
// it), 0 where it is not finite.
__device__ __forceinline__ float split_lse(const float* part, const int64_t splits, const int lane) {
  float m = kNegInf;
  for (int64_t s = lane; s < splits; s += 32) m = fmaxf(m, part[2 * s]);
  m = warp_max(m);
  float sum = 0.f;
  for (int64_t s = lane; s < splits; s += 32) {
    const float ms = part[2 * s], ss = part[2 * s + 1];
    sum += ms == m ? ss : ss * __expf(ms - m);
  }
  sum = warp_sum(sum);
  const float value = m + __logf(sum);
  return is_finite(value) ? value : 0.f;
}

// scores[b, kv, i] = max over the group of (logit - lse), NaN propagating; -inf beyond
// length. Each block first merges its group's split partials into the heads' lse in
// shared memory (dynamic, group floats): group * splits (max, sum) pairs, a few KiB,
// re-read by every block of the list instead of a launch of their own.
__global__ void __launch_bounds__(256)
select_combine_kernel(const SelectScoresParams p, const float* logits, const float* partials,
                      const int64_t splits) {
  const QKVParams& qkv = p.qkv;
  const int64_t lists = qkv.batch * qkv.kv_heads, n = qkv.length, group = qkv.group_size();
  float* lse = reinterpret_cast<float*>(dynamic_smem());  // [group]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t list = blockIdx.y; list < lists; list += gridDim.y) {
    const int64_t b = list / qkv.kv_heads;
    const int64_t kv = list - b * qkv.kv_heads;
    const int64_t len = p.length_of(b);
    const int64_t h0 = b * qkv.q_heads + kv * group;
    __syncthreads();  // the previous list's lse is read by every thread
    for (int64_t g = warp; g < group; g += blockDim.x / 32) {
      const float value = split_lse(partials + (h0 + g) * splits * 2, splits, lane);
      if (lane == 0) lse[g] = value;
    }
    __syncthreads();
    const float* src = logits + h0 * n;
    float* out = p.scores + list * n;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x) {
      float value = kNegInf;
      if (i < len) {
        bool nan = false;
        for (int64_t g = 0; g < group; ++g) {
          const float x = __ldg(src + g * n + i) - lse[g];
          nan = nan || is_nan(x);
          value = fmaxf(value, x);
        }
        if (nan) value = __uint_as_float(0x7fc00000u);
      }
      out[i] = value;
    }
  }
}

struct Plan {
  int hb;
  int64_t chunks, splits, rows_per_split;
};

Plan make_plan(const SelectScoresParams& p, int num_sms) {
  const QKVParams& qkv = p.qkv;
  Plan plan{};
  const int64_t group = qkv.group_size();
  plan.hb = heads_per_block(group, /*per_head_lists=*/false);
  plan.chunks = ceil_div(group, plan.hb);
  const int64_t elem = qkv.dtype == DType::kFloat32 ? 4 : 2;
  const int64_t tile_rows =
      p.from_summary ? summary_tile_rows(qkv.head_dim) : score_tile_rows(qkv.head_dim * elem);
  const int64_t tiles = std::max<int64_t>(ceil_div(qkv.length, tile_rows), 1);
  const int64_t blocks = std::max<int64_t>(qkv.batch * qkv.kv_heads * plan.chunks, 1);
  const int64_t wanted = p.num_splits > 0 ? p.num_splits
                                           : ceil_div(8 * int64_t(std::max(num_sms, 1)), blocks);
  const int64_t tiles_per_split = ceil_div(tiles, std::clamp<int64_t>(wanted, 1, tiles));
  plan.splits = ceil_div(tiles, tiles_per_split);
  plan.rows_per_split = tiles_per_split * tile_rows;
  return plan;
}

// Whether every row of the key source can be copied in cp.async units: 16 bytes for
// K rows and summary codes, 16 (8 at D = 64) for the summary's (zero, step) rows.
// Paged: dim 0 counts blocks (any number of them), dim 2 slots.
bool rows_aligned(const SelectScoresParams& p) {
  const QKVParams& qkv = p.qkv;
  const KVPaging& pg = p.from_summary ? p.summary.paging : qkv.paging;
  const int64_t outer = pg.paged() ? 2 : qkv.batch;
  const int64_t rows = pg.paged() ? pg.block_size : qkv.length;
  auto ok = [](const void* ptr, int64_t unit) {
    return (reinterpret_cast<uintptr_t>(ptr) % uintptr_t(unit)) == 0;
  };
  auto ok_stride = [](int64_t stride_bytes, int64_t extent, int64_t unit) {
    return extent <= 1 || stride_bytes % unit == 0;
  };
  if (p.from_summary) {
    const KeySummaryParams& s = p.summary;
    const int64_t unit = 4 * (qkv.head_dim / kSummaryGroup) < 16 ? 8 : 16;
    return ok(s.codes, 16) && ok_stride(s.codes_batch_stride, outer, 16) &&
           ok_stride(s.codes_head_stride, qkv.kv_heads, 16) &&
           ok_stride(s.codes_row_stride, rows, 16) && ok(s.params, unit) &&
           ok_stride(s.params_batch_stride * 2, outer, unit) &&
           ok_stride(s.params_head_stride * 2, qkv.kv_heads, unit) &&
           ok_stride(s.params_row_stride * 2, rows, unit);
  }
  const int64_t elem = qkv.dtype == DType::kFloat32 ? 4 : 2;
  return ok(qkv.k, 16) && ok_stride(qkv.k_batch_stride * elem, outer, 16) &&
         ok_stride(qkv.k_head_stride * elem, qkv.kv_heads, 16) &&
         ok_stride(qkv.k_row_stride * elem, rows, 16);
}

template <class KS, typename T, int HB>
cudaError_t launch_logits(const SelectScoresParams& p, const Plan& plan, float* logits,
                          float* partials, cudaStream_t stream) {
  using C = ScoreConfig<KS>;
  static std::atomic<int> smem_set[kMaxDevices];
  auto kernel = select_logits_kernel<KS, T, HB>;
  constexpr int kSmem = C::kPipeBytes + HB * C::kRows * int(sizeof(float));
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), kSmem, device, smem_set);
  if (err != cudaSuccess) return err;
  const dim3 grid{unsigned(p.qkv.batch * p.qkv.kv_heads * plan.splits), unsigned(plan.chunks), 1};
  return launch_kernel(kernel, grid, dim3(C::kThreads), size_t(kSmem), stream, 1, p, logits,
                       partials, plan.splits, plan.rows_per_split, rows_aligned(p));
}

// Workspace of share_gqa: logits [B * Hq * N], partials [B * Hq * splits * 2].
struct Workspace {
  int64_t logits, partials;  // float offsets
  int64_t floats;
};

Workspace workspace_layout(const SelectScoresParams& p, const Plan& plan) {
  const int64_t heads = p.qkv.batch * p.qkv.q_heads;
  Workspace w{};
  w.logits = 0;
  w.partials = heads * p.qkv.length;
  w.floats = w.partials + heads * plan.splits * 2;
  return w;
}

}  // namespace

size_t select_scores_cuda_workspace_bytes(const SelectScoresParams& p) {
  if (!p.share_gqa || p.qkv.batch * p.qkv.q_heads * p.qkv.length == 0) return 0;
  DeviceInfo info;
  if (current_device_info(&info) != cudaSuccess) return 0;
  return size_t(workspace_layout(p, make_plan(p, info.num_sms)).floats) * sizeof(float);
}

cudaError_t select_scores_cuda(const SelectScoresParams& p, void* workspace, cudaStream_t stream) {
  const QKVParams& qkv = p.qkv;
  if (qkv.batch * qkv.q_heads * qkv.length == 0) return cudaSuccess;
  if (qkv.kv_heads <= 0 || qkv.q_heads % qkv.kv_heads != 0) return cudaErrorInvalidValue;
  if (p.share_gqa && workspace == nullptr) return cudaErrorInvalidValue;
  if (!paging_supported(p.from_summary ? p.summary.paging : qkv.paging, qkv.length)) {
    return cudaErrorInvalidValue;
  }
  DeviceInfo info;
  cudaError_t err = current_device_info(&info);
  if (err != cudaSuccess) return err;
  const Plan plan = make_plan(p, info.num_sms);
  // The combine kernel keeps the group's lse in (unopted-in) shared memory.
  const int64_t lse_bytes = qkv.group_size() * int64_t(sizeof(float));
  if (plan.chunks > 65535 || qkv.batch * qkv.kv_heads * plan.splits > 0x7fffffff ||
      (p.share_gqa && lse_bytes > 48 * 1024)) {
    return cudaErrorInvalidValue;
  }
  float* ws = static_cast<float*>(workspace);
  const Workspace layout = workspace_layout(p, plan);
  float* logits = p.share_gqa ? ws + layout.logits : p.scores;
  float* partials = p.share_gqa ? ws + layout.partials : nullptr;
  err = dispatch_dtype(qkv.dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_head_dim(qkv.head_dim, cudaErrorInvalidValue, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      return dispatch_heads_per_block(plan.hb, cudaErrorInvalidValue, [&](auto hb) {
        constexpr int HB = decltype(hb)::value;
        if (p.from_summary) {
          return p.summary.paging.paged()
                     ? launch_logits<SummaryKeys<D, true>, T, HB>(p, plan, logits, partials, stream)
                     : launch_logits<SummaryKeys<D, false>, T, HB>(p, plan, logits, partials,
                                                                   stream);
        }
        return p.qkv.paging.paged()
                   ? launch_logits<DenseKeys<T, D, true>, T, HB>(p, plan, logits, partials, stream)
                   : launch_logits<DenseKeys<T, D, false>, T, HB>(p, plan, logits, partials, stream);
      });
    });
  });
  if (err != cudaSuccess || !p.share_gqa) return err;

  const int64_t lists = qkv.batch * qkv.kv_heads;
  const int64_t grid_y = std::min<int64_t>(lists, 65535);
  const int64_t grid_x = std::clamp<int64_t>(
      std::min<int64_t>(ceil_div(qkv.length, 256), ceil_div(16 * int64_t(info.num_sms), grid_y)),
      1, 65535);
  return launch_kernel(select_combine_kernel, dim3(unsigned(grid_x), unsigned(grid_y)), dim3(256),
                       size_t(lse_bytes), stream, 1, p,
                       static_cast<const float*>(ws + layout.logits),
                       static_cast<const float*>(partials), plan.splits);
}

}  // namespace vattention
