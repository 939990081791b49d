// CUDA residual sampler (stage "sample"), reproducing sample_residual_cpu exactly.
//
// One thread per (row, draw pair): pair j covers draws 2j and 2j+1, which use the
// two 64-bit halves of Philox block j of the row's stream. The block comes from
// cuRAND's Philox4_32_10 generator: curand_init(seed, DrawSequence::subsequence(),
// 4 * DrawSequence::block(j)) sets counter = {block lo, block hi, subsequence lo,
// subsequence hi} and key = seed with an empty output buffer (offset % 4 == 0),
// so the next curand4() returns exactly philox4x32_10(counter, key), i.e. the
// words that philox.h's philox_draw uses on the CPU. Ranks map to positions with
// residual_position() from sample.h (binary search over the heavy list). The
// per-row budget and the seed are read on the device; nothing is synchronised.
#if __has_include(<curand_kernel.h>) && !defined(VATTENTION_NO_CURAND)
#include <curand_kernel.h>
#define VATTENTION_SAMPLER_CURAND 1
#else
// Without the cuRAND headers (a toolkit without them and no CUDA torch wheel), the
// same block is computed by philox.h's philox4x32_10, which is the identical function.
#define VATTENTION_SAMPLER_CURAND 0
#endif

#include "cuda_utils.cuh"
#include "philox.h"
#include "sample.h"

namespace vattention {
namespace {

using namespace cuda_detail;

constexpr int kSampleThreads = 256;

__global__ void __launch_bounds__(kSampleThreads)
sample_residual_kernel(const SampleParams p, const int64_t pairs_per_row) {
  const int64_t total = p.rows * pairs_per_row;
  const uint64_t seed = uint64_t(p.rng[0]);
  const uint32_t call_offset = uint32_t(p.rng[1]);
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < total;
       item += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = item / pairs_per_row;
    const uint32_t pair = uint32_t(item - r * pairs_per_row);
    const int32_t* heavy = p.heavy_stride > 0 ? p.heavy + r * p.heavy_stride : nullptr;
    const int32_t h = p.heavy_stride > 0 ? heavy_count(heavy, p.heavy_stride) : 0;
    const int32_t start = p.starts[r];
    const int64_t residual = max(int64_t(p.ends[r]) - start - h, int64_t(0));
    const int64_t wanted = max(p.num_samples[r], 0);

    int64_t count = 0;
    bool exact = false;
    if (residual > 0 && wanted > 0) {
      exact = wanted >= residual && residual <= p.max_out;
      count = exact ? residual : min(wanted, p.max_out);
    }
    if (pair == 0) p.counts[r] = int32_t(count);

    int32_t* indices = p.indices + r * p.max_out;
    float* log_weights = p.log_weights + r * p.max_out;
    const int64_t j0 = 2 * int64_t(pair);
    if (j0 >= p.max_out) continue;
    const bool second = j0 + 1 < p.max_out;

    if (j0 >= count) {
      indices[j0] = -1;
      log_weights[j0] = kNegInf;
      if (second) {
        indices[j0 + 1] = -1;
        log_weights[j0 + 1] = kNegInf;
      }
      continue;
    }
    if (exact) {
      // Enumeration: the j-th residual position in window order, weight 1.
      indices[j0] = residual_position(heavy, h, start, j0);
      log_weights[j0] = 0.f;
      if (second) {
        const bool used = j0 + 1 < count;
        indices[j0 + 1] = used ? residual_position(heavy, h, start, j0 + 1) : -1;
        log_weights[j0 + 1] = used ? 0.f : kNegInf;
      }
      continue;
    }
    // Sampled draws: log(n_r / d) as the CPU computes it (IEEE division; the log in
    // double so that --use_fast_math's approximate logf does not apply).
    const float ratio = __fdiv_rn(float(residual), float(count));
    const float log_weight = float(log(double(ratio)));
    const DrawSequence seq{seed, call_offset, uint32_t(r), p.draw_set};
#if VATTENTION_SAMPLER_CURAND
    curandStatePhilox4_32_10_t state;
    curand_init(seed, seq.subsequence(), 4ull * seq.block(pair), &state);
    const uint4 words = curand4(&state);
    const PhiloxWords block{words.x, words.y, words.z, words.w};
#else
    const uint64_t blk = seq.block(pair), sub = seq.subsequence();
    const PhiloxWords block = philox4x32_10(
        PhiloxWords{uint32_t(blk), uint32_t(blk >> 32), uint32_t(sub), uint32_t(sub >> 32)},
        uint32_t(seed), uint32_t(seed >> 32));
#endif
    const uint64_t rank0 = scale_to_range(draw_word_pair(block, 0), uint32_t(residual));
    indices[j0] = residual_position(heavy, h, start, int64_t(rank0));
    log_weights[j0] = log_weight;
    if (second) {
      if (j0 + 1 < count) {
        const uint64_t rank1 = scale_to_range(draw_word_pair(block, 1), uint32_t(residual));
        indices[j0 + 1] = residual_position(heavy, h, start, int64_t(rank1));
        log_weights[j0 + 1] = log_weight;
      } else {
        indices[j0 + 1] = -1;
        log_weights[j0 + 1] = kNegInf;
      }
    }
  }
}

}  // namespace

cudaError_t sample_residual_cuda(const SampleParams& p, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  // At least one thread per row, so that counts are written even when max_out == 0.
  const int64_t pairs_per_row = std::max<int64_t>(ceil_div(p.max_out, 2), 1);
  const int64_t total = p.rows * pairs_per_row;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kSampleThreads), int64_t(1) << 20);
  return launch_kernel(sample_residual_kernel, dim3(unsigned(blocks)), dim3(kSampleThreads), 0,
                       stream, 1, p, pairs_per_row);
}

}  // namespace vattention
