// CUDA oracle selection scores (select_scores.h, SelectScoresParams): the values of
// select_scores_cpu, reading every K row once per KV group.
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
// Kernel 2, select_lse_kernel (share_gqa): one warp per (batch, query head)
// merges the split partials into lse, 0 where it is not finite.
// Kernel 3, select_combine_kernel (share_gqa): scores[b, kv, i] =
// max over the group of (logit - lse), NaN propagating, -inf beyond the length.
// NaN: fmaxf drops a NaN operand, so the maxima above never carry one; a NaN
// logit reaches lse through its exp-sum instead (exp(NaN - m) = NaN, made 0 by
// the finiteness test, as in the CPU and torch references) and reaches the score
// through an explicit NaN flag. The NaN and finiteness tests read the bits: they
// must not depend on what --use_fast_math does to float compares.
// The per-head logits make one extra fp32 write + read per (head, position)
// (8 bytes against the 2 * head_dim bytes of a bf16 K row per group).
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

template <typename T, int D>
struct ScoreConfig {
  using L = GatherConfig<T, D>;  // lanes per row, elements per lane, dim_of
  static constexpr int kThreads = L::kThreads;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kTpr = L::kTpr;
  static constexpr int kEpt = L::kEpt;
  static constexpr int kGroups = L::kGroups;
  static constexpr int kRowBytes = L::kRowBytes;
  static constexpr int kChunksPerRow = L::kChunksPerRow;
  static constexpr int kRows = int(score_tile_rows(kRowBytes));
  static constexpr int kRowsPerGroup = kRows / kGroups;
  static constexpr int kStages = 4;
  static constexpr int kTileBytes = kRows * kRowBytes;
  static constexpr int kPipeBytes = kStages * kTileBytes;

  static_assert(kRows % kGroups == 0, "tile rows split evenly over row groups");
  static_assert((kRows * kChunksPerRow) % kThreads == 0, "whole copy rounds");
  static_assert((kRowsPerGroup & (kRowsPerGroup - 1)) == 0, "power-of-two rows per group");
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

// Issues the copies of rows [row0, row0 + kRows) of k into a pipeline stage;
// rows at or beyond valid_end are zero-filled without being read.
template <typename T, int D>
__device__ __forceinline__ void issue_rows(unsigned char* dst, const T* k, int64_t row0,
                                           int64_t valid_end, int64_t row_stride, bool aligned) {
  using C = ScoreConfig<T, D>;
#pragma unroll
  for (int it = 0; it < C::kRows * C::kChunksPerRow / C::kThreads; ++it) {
    const int c = int(threadIdx.x) + it * C::kThreads;
    const int r = c / C::kChunksPerRow;
    const int chunk = c - r * C::kChunksPerRow;
    const int64_t j = row0 + r;
    const bool valid = j < valid_end;
    const unsigned char* src = reinterpret_cast<const unsigned char*>(k);
    if (valid) src = reinterpret_cast<const unsigned char*>(k + j * row_stride) + chunk * 16;
    unsigned char* to = dst + r * C::kRowBytes + chunk * 16;
    if (aligned) {
      cp_async_16(to, src, valid);
    } else {
      using Raw = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;
      constexpr int kN = 16 / int(sizeof(T));
      Raw* d = reinterpret_cast<Raw*>(to);
      const Raw* s = reinterpret_cast<const Raw*>(src);
#pragma unroll
      for (int e = 0; e < kN; ++e) d[e] = valid ? s[e] : Raw(0);
    }
  }
}

template <typename T, int D, int HB>
__global__ void __launch_bounds__(ScoreConfig<T, D>::kThreads)
select_logits_kernel(const SelectScoresParams p, float* logits, float* partials,
                     const int64_t splits, const int64_t rows_per_split, const bool aligned) {
  using C = ScoreConfig<T, D>;
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
  const T* k = static_cast<const T*>(qkv.k) + b * qkv.k_batch_stride + kv * qkv.k_head_stride;
  float* head_logits = logits + (b * qkv.q_heads + h0) * n;  // head g at + g * n

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane32 = tid % 32;
  const int grp = tid / C::kTpr, lane = tid % C::kTpr;
  const float scale = qkv.scale;

  float q[HB][C::kEpt];
#pragma unroll
  for (int g = 0; g < HB; ++g) {
    if (g < heads) {
      load_query_slice<T, D>(qkv, b, h0 + g, lane, q[g]);
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
      issue_rows<T, D>(pipe + s * C::kTileBytes, k, begin + int64_t(s) * C::kRows, valid_end,
                       qkv.k_row_stride, aligned);
    }
    cp_async_commit();
  }

  for (int64_t t = 0; t < tiles; ++t) {
    cp_async_wait<C::kStages - 2>();
    __syncthreads();
    {
      const int64_t next = t + C::kStages - 1;
      if (next < tiles) {
        issue_rows<T, D>(pipe + int(next % C::kStages) * C::kTileBytes, k,
                         begin + next * C::kRows, valid_end, qkv.k_row_stride, aligned);
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
        load_row_slice<T, D>(tile + r * C::kRowBytes, lane, kf);
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

// lse[row] = logsumexp of the row's logits from its split partials, 0 where not finite.
__global__ void __launch_bounds__(128)
select_lse_kernel(const float* partials, float* lse, const int64_t rows, const int64_t splits) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t row = int64_t(blockIdx.x) * 4 + warp; row < rows; row += int64_t(gridDim.x) * 4) {
    const float* part = partials + row * splits * 2;
    float m = kNegInf;
    for (int64_t s = lane; s < splits; s += 32) m = fmaxf(m, part[2 * s]);
    m = warp_max(m);
    float sum = 0.f;
    for (int64_t s = lane; s < splits; s += 32) {
      const float ms = part[2 * s], ss = part[2 * s + 1];
      sum += ms == m ? ss : ss * __expf(ms - m);
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      const float value = m + __logf(sum);
      lse[row] = is_finite(value) ? value : 0.f;
    }
  }
}

// scores[b, kv, i] = max over the group of (logit - lse), NaN propagating; -inf beyond length.
__global__ void __launch_bounds__(256)
select_combine_kernel(const SelectScoresParams p, const float* logits, const float* lse) {
  const QKVParams& qkv = p.qkv;
  const int64_t lists = qkv.batch * qkv.kv_heads, n = qkv.length, group = qkv.group_size();
  for (int64_t list = blockIdx.y; list < lists; list += gridDim.y) {
    const int64_t b = list / qkv.kv_heads;
    const int64_t kv = list - b * qkv.kv_heads;
    const int64_t len = p.length_of(b);
    const int64_t h0 = b * qkv.q_heads + kv * group;
    const float* src = logits + h0 * n;
    float* out = p.scores + list * n;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x) {
      float value = kNegInf;
      if (i < len) {
        bool nan = false;
        for (int64_t g = 0; g < group; ++g) {
          const float x = __ldg(src + g * n + i) - __ldg(lse + h0 + g);
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
  const int64_t tile_rows = score_tile_rows(qkv.head_dim * elem);
  const int64_t tiles = std::max<int64_t>(ceil_div(qkv.length, tile_rows), 1);
  const int64_t blocks = std::max<int64_t>(qkv.batch * qkv.kv_heads * plan.chunks, 1);
  const int64_t wanted = p.num_splits > 0 ? p.num_splits
                                           : ceil_div(8 * int64_t(std::max(num_sms, 1)), blocks);
  const int64_t tiles_per_split = ceil_div(tiles, std::clamp<int64_t>(wanted, 1, tiles));
  plan.splits = ceil_div(tiles, tiles_per_split);
  plan.rows_per_split = tiles_per_split * tile_rows;
  return plan;
}

bool k_rows_aligned(const QKVParams& qkv) {
  const int64_t elem = qkv.dtype == DType::kFloat32 ? 4 : 2;
  auto ok_stride = [&](int64_t stride, int64_t extent) {
    return extent <= 1 || ((stride * elem) & 15) == 0;
  };
  return (reinterpret_cast<uintptr_t>(qkv.k) & 15u) == 0 &&
         ok_stride(qkv.k_batch_stride, qkv.batch) && ok_stride(qkv.k_head_stride, qkv.kv_heads) &&
         ok_stride(qkv.k_row_stride, qkv.length);
}

template <typename T, int D, int HB>
cudaError_t launch_logits(const SelectScoresParams& p, const Plan& plan, float* logits,
                          float* partials, cudaStream_t stream) {
  using C = ScoreConfig<T, D>;
  static std::atomic<int> smem_set[kMaxDevices];
  auto kernel = select_logits_kernel<T, D, HB>;
  constexpr int kSmem = C::kPipeBytes + HB * C::kRows * int(sizeof(float));
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), kSmem, device, smem_set);
  if (err != cudaSuccess) return err;
  const dim3 grid{unsigned(p.qkv.batch * p.qkv.kv_heads * plan.splits), unsigned(plan.chunks), 1};
  return launch_kernel(kernel, grid, dim3(C::kThreads), size_t(kSmem), stream, 1, p, logits,
                       partials, plan.splits, plan.rows_per_split, k_rows_aligned(p.qkv));
}

// Workspace of share_gqa: logits [B * Hq * N], partials [B * Hq * splits * 2], lse [B * Hq].
struct Workspace {
  int64_t logits, partials, lse;  // float offsets
  int64_t floats;
};

Workspace workspace_layout(const SelectScoresParams& p, const Plan& plan) {
  const int64_t heads = p.qkv.batch * p.qkv.q_heads;
  Workspace w{};
  w.logits = 0;
  w.partials = heads * p.qkv.length;
  w.lse = w.partials + heads * plan.splits * 2;
  w.floats = w.lse + heads;
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
  DeviceInfo info;
  cudaError_t err = current_device_info(&info);
  if (err != cudaSuccess) return err;
  const Plan plan = make_plan(p, info.num_sms);
  if (plan.chunks > 65535 || qkv.batch * qkv.kv_heads * plan.splits > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  float* ws = static_cast<float*>(workspace);
  const Workspace layout = workspace_layout(p, plan);
  float* logits = p.share_gqa ? ws + layout.logits : p.scores;
  float* partials = p.share_gqa ? ws + layout.partials : nullptr;
  err = dispatch_dtype(qkv.dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_head_dim(qkv.head_dim, cudaErrorInvalidValue, [&](auto dim) {
      return dispatch_heads_per_block(plan.hb, cudaErrorInvalidValue, [&](auto hb) {
        return launch_logits<T, decltype(dim)::value, decltype(hb)::value>(p, plan, logits, partials,
                                                                           stream);
      });
    });
  });
  if (err != cudaSuccess || !p.share_gqa) return err;

  const int64_t heads = qkv.batch * qkv.q_heads;
  const int64_t lse_blocks = std::min<int64_t>(ceil_div(heads, 4), 65535);
  err = launch_kernel(select_lse_kernel, dim3(unsigned(lse_blocks)), dim3(128), 0, stream, 1,
                      static_cast<const float*>(partials), ws + layout.lse, heads, plan.splits);
  if (err != cudaSuccess) return err;

  const int64_t lists = qkv.batch * qkv.kv_heads;
  const int64_t grid_y = std::min<int64_t>(lists, 65535);
  const int64_t grid_x = std::clamp<int64_t>(
      std::min<int64_t>(ceil_div(qkv.length, 256), ceil_div(16 * int64_t(info.num_sms), grid_y)),
      1, 65535);
  return launch_kernel(select_combine_kernel, dim3(unsigned(grid_x), unsigned(grid_y)), dim3(256),
                       0, stream, 1, p, static_cast<const float*>(ws + layout.logits),
                       static_cast<const float*>(ws + layout.lse));
}

}  // namespace vattention
