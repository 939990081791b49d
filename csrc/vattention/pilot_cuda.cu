// CUDA pilot statistics (stage "pilot"), the same quantities as pilot_stats_cpu.
//
// The gather kernel of kv_gather_cuda.cuh with the pilot fold: one block per
// (list, split, head chunk) reads each K/V row of its split once for all its
// query heads and keeps, per head, running sums relative to its running max m
// (instead of a max-first second pass):
//   s1 = sum w, s2 = sum w^2, s3 = sum w^2 ||V||^2, v1 = sum w V, v2 = sum w^2 V,
// with w = exp(s - m). With one split the block writes the final outputs;
// otherwise its record [m, s1, s2, s3, v1[D], v2[D]] per (head, split) goes to
// the workspace and pilot_merge_kernel merges the splits the same way. A NaN
// logit makes every output of the head NaN; a NaN in V reaches s3 and the
// vector elements it is in.
#include "kv_gather_cuda.cuh"
#include "pilot.h"

namespace vattention {
namespace {

using namespace cuda_detail;

struct PilotFold {
  using Params = PilotParams;
  // 4 heads x (q + v1 + v2) x kEpt = 96 registers of state at kEpt 8; 8 heads would spill.
  static constexpr int kMaxHeadsPerBlock = 4;
  static constexpr int kScalars = kPilotMoments;  // s1, s2, s3
  static constexpr int kVectors = 2;              // v1, v2
  static constexpr bool kRowNorm = true;
  VATT_HD static constexpr int scalar_power(int i) { return i == 0 ? 1 : 2; }
  VATT_HD static constexpr int vector_power(int j) { return j == 0 ? 1 : 2; }
  VATT_HD static constexpr bool scalar_is_norm(int i) { return i == 2; }

  __device__ static const QKVParams& qkv(const Params& p) { return p.qkv; }
  __device__ static IndexListParams list(const Params& p) {
    IndexListParams list = p.list;
    list.log_weights = nullptr;  // the pilot has no weights
    return list;
  }
  __device__ static float logit(float dot, float scale, float) { return dot * scale; }

  template <typename T, int D, int HB>
  __device__ static void finish(const Params& p, const GatherArgs& args, const ListWork<T>& w,
                                const float* records, int tid);

  // A surplus split (num_splits > 1): its workspace record gets m = -inf and
  // sum w = 0, the empty record the merge skips after reading those two floats.
  template <typename T, int D>
  __device__ static void finish_empty(const Params& p, const GatherArgs& args,
                                      const ListWork<T>& w, int tid);
};

using PilotRecord = RecordEntries<PilotFold>;

// Entry x of a record to the outputs of head t: m -> max_logit, the scalars ->
// moments, the vectors -> vector_moments (same order as the record).
__device__ __forceinline__ void write_output(const PilotParams& p, int64_t t, int x, float v) {
  const int64_t dim = p.qkv.head_dim;
  if (x == 0) {
    p.max_logit[t] = v;
  } else if (x < PilotRecord::kVector0) {
    p.moments[t * kPilotMoments + x - PilotRecord::kScalar0] = v;
  } else {
    p.vector_moments[t * 2 * dim + x - PilotRecord::kVector0] = v;
  }
}

// One thread per (head, record entry): merges the row groups' records, then
// writes the outputs (one split) or the split's record to the workspace.
template <typename T, int D, int HB>
__device__ void PilotFold::finish(const Params& p, const GatherArgs& args, const ListWork<T>& w,
                                  const float* records, int tid) {
  using C = GatherConfig<T, D>;
  using R = RecordLayout<PilotFold, D>;
  constexpr int kSets = HeadSplit<PilotFold, T, D, HB>::kRowSets;
  constexpr int64_t kStride = int64_t(HB) * R::kFloats;
  for (int o = tid; o < w.heads * R::kFloats; o += C::kThreads) {
    const int g = o / R::kFloats, x = o - g * R::kFloats;
    const float* rec = records + g * R::kFloats;
    const RecordScan scan = scan_records(rec, kSets, kStride);
    const float v = merged_entry<PilotFold, D>(rec, kSets, kStride, scan, x);
    const int64_t t = w.b * p.qkv.q_heads + w.h0 + g;
    if (args.num_splits == 1) {
      write_output(p, t, x, v);
    } else {
      args.workspace[(t * args.num_splits + blockIdx.y) * R::kFloats + x] = v;
    }
  }
}

template <typename T, int D>
__device__ void PilotFold::finish_empty(const Params& p, const GatherArgs& args,
                                        const ListWork<T>& w, int tid) {
  using R = RecordLayout<PilotFold, D>;
  for (int g = tid; g < w.heads; g += GatherConfig<T, D>::kThreads) {
    float* rec = args.workspace +
                 ((w.b * p.qkv.q_heads + w.h0 + g) * args.num_splits + blockIdx.y) * R::kFloats;
    rec[0] = kNegInf;
    rec[R::kScalar0] = 0.f;
  }
}

// Merges the per-split records of each (batch, query head): one block per head.
template <int D>
__global__ void __launch_bounds__(128)
pilot_merge_kernel(const PilotParams p, const int64_t num_splits, const float* workspace) {
  using R = RecordLayout<PilotFold, D>;
  const int64_t heads = p.qkv.batch * p.qkv.q_heads;
  for (int64_t t = blockIdx.x; t < heads; t += gridDim.x) {
    const float* base = workspace + t * num_splits * R::kFloats;
    const RecordScan scan = scan_records(base, num_splits, R::kFloats);
    for (int x = threadIdx.x; x < R::kFloats; x += blockDim.x) {
      write_output(p, t, x, merged_entry<PilotFold, D>(base, num_splits, R::kFloats, scan, x));
    }
  }
}

// pilot_dispersion: one block per query head, in three passes over its list (the
// list is a pilot: a few hundred rows at most, read from L2 after the first pass).
//  1. a warp per entry: logits into the head's workspace and the entry's V row
//     offset beside them (kv_row_offsets: contiguous or paged, found once per entry
//     rather than per element in the passes below), then the block's max m;
//  2. the workspace becomes w = exp(s - m); a thread per dimension: mean(x), with
//     x_i = w_i (V_i - center);
//  3. the p x p Gram of c_i = x_i - mean(x), a tile of kDispersionTile rows in shared
//     memory at a time against every row (a warp per row, a lane per D / 32 dims), so
//     nothing D x D exists: sum_i c_i . c_i, sum_ij (c_i . c_j)^2, sum_i (c_i . c_i)^2.
// Invalid entries (index < 0 or >= length) are skipped in every pass: as zero rows
// of the tile they add nothing.
constexpr int kDispersionThreads = 128;
constexpr int kDispersionWarps = kDispersionThreads / 32;
constexpr int kDispersionTile = 16;

template <int D>
struct DispersionSmem {
  float q[D];
  float center[D];
  float mean[D];
  float tile[kDispersionTile][D];
  float reduce[kDispersionWarps][3];
};

__device__ __forceinline__ bool entry_valid(int32_t index, int64_t length) {
  return index >= 0 && index < length;
}

// The workspace: per (head, entry) the V row offset (elements), then the weight.
struct DispersionWorkspace {
  int64_t* v_offsets;  // [heads, max_count]
  float* weights;      // [heads, max_count]
};

DispersionWorkspace dispersion_workspace(const PilotDispersionParams& p, void* workspace) {
  const int64_t entries = p.qkv.batch * p.qkv.q_heads * p.list.max_count;
  int64_t* offsets = static_cast<int64_t*>(workspace);
  return {offsets, reinterpret_cast<float*>(offsets + entries)};
}

template <typename T, int D>
__global__ void __launch_bounds__(kDispersionThreads)
pilot_dispersion_kernel(const PilotDispersionParams p, const DispersionWorkspace ws) {
  constexpr int kPerLane = D / 32;
  DispersionSmem<D>& sm = *reinterpret_cast<DispersionSmem<D>*>(dynamic_smem());
  const QKVParams& a = p.qkv;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t heads = a.batch * a.q_heads, group = a.group_size();
  for (int64_t t = blockIdx.x; t < heads; t += gridDim.x) {
    const int64_t b = t / a.q_heads, h = t % a.q_heads, kv = h / group;
    const int64_t list = p.list.list_of(b, h, a.q_heads, group);
    const int32_t* indices = p.list.indices + list * p.list.max_count;
    const int64_t count = min(int64_t(p.list.counts[list]), p.list.max_count);
    float* w = ws.weights + t * p.list.max_count;
    int64_t* v_offset = ws.v_offsets + t * p.list.max_count;
    const T* q = static_cast<const T*>(a.q) + b * a.q_batch_stride + h * a.q_head_stride;
    for (int d = tid; d < D; d += kDispersionThreads) {
      sm.q[d] = load_float(q + d);
      sm.center[d] = p.center[t * D + d];
    }
    __syncthreads();

    // Pass 1. fmaxf drops a NaN, so NaN logits are tracked apart and make m NaN.
    float max_logit = kNegInf;
    bool nan_logit = false;
    for (int64_t j = warp; j < count; j += kDispersionWarps) {
      const int32_t index = indices[j];
      if (!entry_valid(index, a.length)) continue;
      const RowOffsets off = kv_row_offsets(a, b, kv, index);
      const T* k = static_cast<const T*>(a.k) + off.k;
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) dot += sm.q[lane + 32 * e] * load_float(k + lane + 32 * e);
      const float s = warp_sum(dot) * a.scale;
      if (lane == 0) {
        w[j] = s;
        v_offset[j] = off.v;
      }
      max_logit = fmaxf(max_logit, s);
      nan_logit |= s != s;
    }
    if (lane == 0) {
      sm.reduce[warp][0] = max_logit;
      sm.reduce[warp][1] = nan_logit ? 1.f : 0.f;
    }
    __syncthreads();
    float m = kNegInf;
    bool any_nan = false;
    for (int i = 0; i < kDispersionWarps; ++i) {
      m = fmaxf(m, sm.reduce[i][0]);
      any_nan |= sm.reduce[i][1] != 0.f;
    }
    if (any_nan) m = __uint_as_float(0x7fc00000u);
    for (int64_t j = tid; j < count; j += kDispersionThreads) {
      if (entry_valid(indices[j], a.length)) w[j] = expf(w[j] - m);
    }
    __syncthreads();

    // Pass 2.
    int64_t n = 0;
    for (int64_t j = 0; j < count; ++j) n += entry_valid(indices[j], a.length);
    for (int d = tid; d < D; d += kDispersionThreads) {
      float sum = 0.f;
      for (int64_t j = 0; j < count; ++j) {
        const int32_t index = indices[j];
        if (!entry_valid(index, a.length)) continue;
        const T* v = static_cast<const T*>(a.v) + v_offset[j];
        sum += w[j] * (load_float(v + d) - sm.center[d]);
      }
      sm.mean[d] = n > 0 ? sum / float(n) : 0.f;
    }
    __syncthreads();

    // Pass 3.
    float trace = 0.f, frobenius = 0.f, fourth = 0.f;
    for (int64_t i0 = 0; i0 < count; i0 += kDispersionTile) {
      for (int o = tid; o < kDispersionTile * D; o += kDispersionThreads) {
        const int r = o / D, d = o - r * D;
        const int64_t i = i0 + r;
        float c = 0.f;
        if (i < count && entry_valid(indices[i], a.length)) {
          const T* v = static_cast<const T*>(a.v) + v_offset[i];
          c = w[i] * (load_float(v + d) - sm.center[d]) - sm.mean[d];
        }
        sm.tile[r][d] = c;
      }
      __syncthreads();
      const int rows = int(min(int64_t(kDispersionTile), count - i0));
      for (int64_t j = warp; j < count; j += kDispersionWarps) {
        const int32_t index = indices[j];
        if (!entry_valid(index, a.length)) continue;
        const T* v = static_cast<const T*>(a.v) + v_offset[j];
        float c[kPerLane];
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) {
          const int d = lane + 32 * e;
          c[e] = w[j] * (load_float(v + d) - sm.center[d]) - sm.mean[d];
        }
        for (int r = 0; r < rows; ++r) {
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < kPerLane; ++e) dot += sm.tile[r][lane + 32 * e] * c[e];
          dot = warp_sum(dot);
          frobenius += dot * dot;
          if (i0 + r == j) {
            trace += dot;
            fourth += dot * dot;
          }
        }
      }
      __syncthreads();
    }
    if (lane == 0) {
      sm.reduce[warp][0] = trace;
      sm.reduce[warp][1] = frobenius;
      sm.reduce[warp][2] = fourth;
    }
    __syncthreads();
    if (tid < kDispersionOutputs) {
      float total = 0.f;
      for (int i = 0; i < kDispersionWarps; ++i) total += sm.reduce[i][tid];
      p.dispersion[t * kDispersionOutputs + tid] = total;
    }
    __syncthreads();
  }
}

}  // namespace

size_t pilot_dispersion_cuda_workspace_bytes(const PilotDispersionParams& p) {
  return size_t(p.qkv.batch * p.qkv.q_heads * p.list.max_count) *
         (sizeof(int64_t) + sizeof(float));
}

cudaError_t pilot_dispersion_cuda(const PilotDispersionParams& p, void* workspace,
                                  cudaStream_t stream) {
  const int64_t heads = p.qkv.batch * p.qkv.q_heads;
  if (heads <= 0) return cudaSuccess;
  if (p.list.max_count > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  if (!paging_supported(p.qkv.paging, p.qkv.length)) return cudaErrorInvalidValue;
  const int64_t blocks = std::min<int64_t>(heads, 65535);
  return dispatch_dtype(p.qkv.dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_head_dim(p.qkv.head_dim, cudaErrorInvalidValue, [&](auto dim_tag) {
      constexpr int D = decltype(dim_tag)::value;
      return launch_kernel(pilot_dispersion_kernel<T, D>, dim3(unsigned(blocks)),
                           dim3(kDispersionThreads), sizeof(DispersionSmem<D>), stream, 1, p,
                           dispersion_workspace(p, workspace));
    });
  });
}

size_t pilot_stats_cuda_workspace_bytes(const PilotParams& p, int64_t num_splits) {
  if (num_splits <= 1) return 0;
  const int64_t record_floats = PilotRecord::kVector0 + PilotFold::kVectors * p.qkv.head_dim;
  return size_t(p.qkv.batch * p.qkv.q_heads * num_splits * record_floats) * sizeof(float);
}

cudaError_t pilot_stats_cuda(const PilotParams& p, int64_t num_splits, void* workspace,
                             cudaStream_t stream) {
  const int64_t heads = p.qkv.batch * p.qkv.q_heads;
  if (heads <= 0) return cudaSuccess;
  if (num_splits < 1 || num_splits > 65535 || p.qkv.batch * p.list.list_heads > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (num_splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  GatherArgs args{};
  args.num_splits = num_splits;
  args.target_blocks = p.split_target_blocks;
  args.workspace = static_cast<float*>(workspace);
  cudaError_t err = launch_gather<PilotFold>(p, args, stream);
  if (err != cudaSuccess || num_splits == 1) return err;
  const int64_t blocks = std::min<int64_t>(heads, 65535);
  return dispatch_head_dim(p.qkv.head_dim, cudaErrorInvalidValue, [&](auto dim_tag) {
    return launch_kernel(pilot_merge_kernel<decltype(dim_tag)::value>, dim3(unsigned(blocks)),
                         dim3(128), 0, stream, 1, p, num_splits,
                         static_cast<const float*>(workspace));
  });
}

cudaError_t pilot_stats_cuda(const PilotParams& p, cudaStream_t stream) {
  return pilot_stats_cuda(p, 1, nullptr, stream);
}

}  // namespace vattention
