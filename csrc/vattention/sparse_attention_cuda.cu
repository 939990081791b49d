// CUDA sparse attention (stage "sparse attention"): split-K flash decoding over
// gathered K/V rows, writing the same partials as sparse_attention_partial_cpu.
//
// The gather kernel of kv_gather_cuda.cuh with the attention fold: per query
// head, sum w and sum w V over the split's rows (SoftmaxState semantics;
// log-weights are added to the logits; entries < 0 or >= length are skipped, as
// are entries with log-weight -inf). Each block writes its split's partial
// (out = sum w V / sum w, lse = m + log sum w), or (0, -inf) for an empty split
// and NaN for a split that folded a NaN logit. With balanced splits
// (split_target_blocks > 0, heuristics.h) the splits past a list's own split
// count write only lse = -inf (their out rows are left as they are: combine
// skips a partial of lse -inf without reading its out). K/V contiguous or paged
// (qkv.paging): the gather kernel reads rows either way.
#include "kv_gather_cuda.cuh"
#include "sparse_attention.h"

namespace vattention {
namespace {

using namespace cuda_detail;

struct AttentionFold {
  using Params = SparseAttentionParams;
  // 8 heads x (q + acc) x kEpt = 128 registers of state at kEpt 8, served by pairs of
  // row groups of 4 heads each (HeadSplit): at most 128 registers (ptxas, sm_90), no
  // spills, 3 blocks per SM.
  static constexpr int kMaxHeadsPerBlock = 8;
  static constexpr int kScalars = 1;  // sum w
  static constexpr int kVectors = 1;  // sum w V
  static constexpr bool kRowNorm = false;
  VATT_HD static constexpr int scalar_power(int) { return 1; }
  VATT_HD static constexpr int vector_power(int) { return 1; }
  VATT_HD static constexpr bool scalar_is_norm(int) { return false; }

  __device__ static const QKVParams& qkv(const Params& p) { return p.qkv; }
  __device__ static IndexListParams list(const Params& p) { return p.list; }
  __device__ static float logit(float dot, float scale, float bias) { return dot * scale + bias; }

  // One thread per (head, dim) of the block: merges the row groups' records
  // into the split's partial.
  template <typename T, int D, int HB>
  __device__ static void finish(const Params& p, const GatherArgs& args, const ListWork<T>& w,
                                const float* records, int tid) {
    using C = GatherConfig<T, D>;
    using R = RecordLayout<AttentionFold, D>;
    constexpr int kSets = HeadSplit<AttentionFold, T, D, HB>::kRowSets;
    constexpr int64_t kStride = int64_t(HB) * R::kFloats;  // one head's records, set to set
    for (int o = tid; o < w.heads * D; o += C::kThreads) {
      const int g = o / D, d = o - g * D;
      const float* rec = records + g * R::kFloats;
      const RecordScan scan = scan_records(rec, kSets, kStride);
      float out = 0.f, lse = kNegInf;
      if (scan.nan) {
        out = lse = quiet_nan();
      } else if (scan.any) {
        float sums[2];  // sum w, sum w V[d]
        merge_records<2>(rec, kSets, kStride, scan.max_logit, {R::kScalar0, R::kVector0 + d},
                         {1, 1}, sums);
        out = sums[1] / sums[0];
        lse = scan.max_logit + __logf(sums[0]);
      }
      const int64_t item = (w.b * p.qkv.q_heads + w.h0 + g) * args.num_splits + blockIdx.y;
      p.partial_out[item * D + d] = out;
      if (d == 0) p.partial_lse[item] = lse;
    }
  }

  // A surplus split: lse -inf and no out row, which combine never reads.
  template <typename T, int D>
  __device__ static void finish_empty(const Params& p, const GatherArgs& args,
                                      const ListWork<T>& w, int tid) {
    for (int g = tid; g < w.heads; g += GatherConfig<T, D>::kThreads) {
      p.partial_lse[(w.b * p.qkv.q_heads + w.h0 + g) * args.num_splits + blockIdx.y] = kNegInf;
    }
  }
};

}  // namespace

cudaError_t sparse_attention_partial_cuda(const SparseAttentionParams& p, cudaStream_t stream) {
  if (p.qkv.batch <= 0 || p.qkv.q_heads <= 0 || p.num_splits <= 0) return cudaSuccess;
  if (p.num_splits > 65535 || p.qkv.batch * p.list.list_heads > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  GatherArgs args{};
  args.num_splits = p.num_splits;
  args.target_blocks = p.split_target_blocks;
  return launch_gather<AttentionFold>(p, args, stream);
}

}  // namespace vattention
