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
  constexpr int64_t kStride = int64_t(HB) * R::kFloats;
  for (int o = tid; o < w.heads * R::kFloats; o += C::kThreads) {
    const int g = o / R::kFloats, x = o - g * R::kFloats;
    const float* rec = records + g * R::kFloats;
    const RecordScan scan = scan_records(rec, C::kGroups, kStride);
    const float v = merged_entry<PilotFold, D>(rec, C::kGroups, kStride, scan, x);
    const int64_t t = w.b * p.qkv.q_heads + w.h0 + g;
    if (args.num_splits == 1) {
      write_output(p, t, x, v);
    } else {
      args.workspace[(t * args.num_splits + blockIdx.y) * R::kFloats + x] = v;
    }
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

}  // namespace

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
