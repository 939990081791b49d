// CUDA combine (stage "combine"): merges partial (out, lse) results with the
// rule of online_softmax.h, like combine_cpu. One warp per item: the lanes reduce
// the max and the sum of exp over the partials, then each lane owns head_dim
// entries d = lane, lane + 32, ... and sums the weighted partials. Empty
// partials (lse -inf) are skipped, so whatever they hold is ignored; a NaN lse
// makes the item's lse and out NaN (online_softmax.h).
#include "combine.h"
#include "cuda_utils.cuh"
#include "online_softmax.h"

namespace vattention {
namespace {

using namespace cuda_detail;

constexpr int kCombineThreads = 128;
constexpr int kItemsPerBlock = kCombineThreads / 32;

__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const CombineParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kItemsPerBlock;
  for (int64_t m = int64_t(blockIdx.x) * kItemsPerBlock + (threadIdx.x >> 5); m < p.items;
       m += warps) {
    const float* lse = p.partial_lse + m * p.item_stride_lse;
    float mx = kNegInf;
    bool nan = false;
    for (int64_t s = lane; s < p.num_splits; s += 32) {
      const float ls = lse[s * p.split_stride_lse];
      nan |= is_nan_bits(ls);
      mx = fmaxf(mx, ls);  // fmaxf drops a NaN: the ballot below keeps it
    }
    mx = warp_max(mx);
    nan = __ballot_sync(kFullMask, nan) != 0u;
    float merged = kNegInf;
    if (nan) {
      merged = quiet_nan();
    } else if (!is_neg_inf_bits(mx)) {
      float total = 0.f;
      for (int64_t s = lane; s < p.num_splits; s += 32) {
        total += __expf(lse[s * p.split_stride_lse] - mx);
      }
      merged = mx + __logf(warp_sum(total));
    }
    float* out = p.out + m * p.head_dim;
    const float* partial = p.partial_out + m * p.item_stride_out;
    for (int64_t d = lane; d < p.head_dim; d += 32) {
      float acc = nan ? quiet_nan() : 0.f;
      if (!nan && !is_neg_inf_bits(merged)) {
        for (int64_t s = 0; s < p.num_splits; ++s) {
          const float ls = lse[s * p.split_stride_lse];
          if (is_neg_inf_bits(ls)) continue;  // empty partial: its out is never read
          acc = fmaf(__expf(ls - merged), partial[s * p.split_stride_out + d], acc);
        }
      }
      out[d] = acc;
    }
    if (lane == 0) p.lse[m] = merged;
  }
}

// merge_estimate (combine.h): a warp per query head; every lane derives the head's
// partial lse's (a handful of scalars) and owns the out entries d = lane, lane + 32, ...
template <typename Stat>
__global__ void __launch_bounds__(kCombineThreads) merge_estimate_kernel(
    const MergeEstimateParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t heads = p.lists * p.group;
  const int64_t warps = int64_t(gridDim.x) * kItemsPerBlock;
  for (int64_t head = int64_t(blockIdx.x) * kItemsPerBlock + (threadIdx.x >> 5); head < heads;
       head += warps) {
    merge_estimate_head<Stat>(p, head, lane, 32, lane == 0);
  }
}

}  // namespace

cudaError_t merge_estimate_cuda(const MergeEstimateParams& p, cudaStream_t stream) {
  const int64_t heads = p.lists * p.group;
  if (heads <= 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(heads, kItemsPerBlock), int64_t(1) << 20);
  if (p.stats_double) {
    return launch_kernel(merge_estimate_kernel<double>, dim3(unsigned(blocks)),
                         dim3(kCombineThreads), 0, stream, 1, p);
  }
  return launch_kernel(merge_estimate_kernel<float>, dim3(unsigned(blocks)),
                       dim3(kCombineThreads), 0, stream, 1, p);
}

cudaError_t combine_cuda(const CombineParams& p, cudaStream_t stream) {
  if (p.items <= 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(p.items, kItemsPerBlock), int64_t(1) << 20);
  return launch_kernel(combine_kernel, dim3(unsigned(blocks)), dim3(kCombineThreads), 0, stream, 1,
                       p);
}

}  // namespace vattention
