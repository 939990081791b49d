// CUDA residual sampler (stage "sample"), reproducing sample_residual_cpu exactly.
//
// Work: the rows are cut into ranges of kSampleThreads rows; each block of a range
// first builds the range's headers (sample.h's sample_row: heavy count, residual,
// count, log-weight), one thread per row, into shared memory, with an exclusive
// scan of the rows' draw pairs. The range's pairs, flattened, are then shared by
// the range's blocks (grid-stride), each thread finding its row by a binary search
// over the scan. So the heavy-count search runs once per row and block instead of
// once per draw, a long (exact) row is spread over every block of its range like
// the short ones, and only the first `count` entries of a row are written
// (sample.h): the grid is sized from the device, not from max_out.
//
// Pair j of a row covers draws 2j and 2j+1, which use the two 64-bit halves of
// Philox block j of the row's stream. The block comes from cuRAND's Philox4_32_10
// generator: curand_init(seed, DrawSequence::subsequence(), 4 * DrawSequence::block(j))
// sets counter = {block lo, block hi, subsequence lo, subsequence hi} and key = seed
// with an empty output buffer (offset % 4 == 0), so the next curand4() returns
// exactly philox4x32_10(counter, key), i.e. the words that philox.h's philox_draw
// uses on the CPU. Ranks map to positions with residual_position() from sample.h
// (binary search over the heavy list). The per-row budget and the seed are read on
// the device; nothing is synchronised.
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

constexpr int kSampleThreads = 256;  // threads per block, and rows per range
constexpr int kSampleWarps = kSampleThreads / 32;
// Blocks per SM aimed at: 2048 threads, a full SM.
constexpr int64_t kSampleBlocksPerSm = 8;

// The shared header of a range: pair scan, rows, log-weights, warp totals.
struct SampleShared {
  int64_t prefix[kSampleThreads + 1];  // pairs of the range's rows before row i
  SampleRow rows[kSampleThreads];
  float log_weight[kSampleThreads];
  int64_t warp_total[kSampleWarps];
};

__global__ void __launch_bounds__(kSampleThreads)
sample_residual_kernel(const SampleParams p, const int64_t ranges) {
  SampleShared& s = *reinterpret_cast<SampleShared*>(dynamic_smem());
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const uint64_t seed = uint64_t(p.rng[0]);
  const uint32_t call_offset = uint32_t(p.rng[1]);
  for (int64_t range = blockIdx.y; range < ranges; range += gridDim.y) {
    const int64_t row0 = range * kSampleThreads;
    const int n = int(min(int64_t(kSampleThreads), p.rows - row0));
    int64_t pairs = 0;
    if (tid < n) {
      const SampleRow row = sample_row(p, row0 + tid);
      s.rows[tid] = row;
      pairs = (row.count + 1) / 2;
      // log(n_r / d) as the CPU computes it (IEEE division; the log in double so that
      // --use_fast_math's approximate logf does not apply).
      if (!row.exact && row.count > 0) {
        s.log_weight[tid] = float(log(double(__fdiv_rn(float(row.residual), float(row.count)))));
      }
      if (blockIdx.x == 0) p.counts[row0 + tid] = int32_t(row.count);
    }
    // Inclusive scan of the pairs: in each warp, then over the warp totals.
    int64_t x = pairs;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int64_t y = __shfl_up_sync(kFullMask, x, offset);
      if (lane >= offset) x += y;
    }
    if (lane == 31) s.warp_total[warp] = x;
    __syncthreads();
    for (int w = 0; w < warp; ++w) x += s.warp_total[w];
    s.prefix[tid + 1] = x;
    if (tid == 0) s.prefix[0] = 0;
    __syncthreads();

    const int64_t total = s.prefix[n];
    const int64_t step = int64_t(gridDim.x) * kSampleThreads;
    for (int64_t f = int64_t(blockIdx.x) * kSampleThreads + tid; f < total; f += step) {
      // The row of flat pair f: the last i with prefix[i] <= f (it has pairs > 0).
      int lo = 0, hi = n - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (s.prefix[mid] <= f) lo = mid; else hi = mid - 1;
      }
      const SampleRow row = s.rows[lo];
      const int64_t r = row0 + lo;
      const uint32_t pair = uint32_t(f - s.prefix[lo]);
      int32_t* indices = p.indices + r * p.max_out;
      float* log_weights = p.log_weights + r * p.max_out;
      const int64_t j0 = 2 * int64_t(pair);
      const bool second = j0 + 1 < row.count;
      if (row.exact) {
        // Enumeration: the j-th residual position in window order, weight 1.
        indices[j0] = residual_position(row.heavy, row.h, row.start, j0);
        log_weights[j0] = 0.f;
        if (second) {
          indices[j0 + 1] = residual_position(row.heavy, row.h, row.start, j0 + 1);
          log_weights[j0 + 1] = 0.f;
        }
        continue;
      }
      const float log_weight = s.log_weight[lo];
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
      const uint64_t rank0 = scale_to_range(draw_word_pair(block, 0), uint32_t(row.residual));
      indices[j0] = residual_position(row.heavy, row.h, row.start, int64_t(rank0));
      log_weights[j0] = log_weight;
      if (second) {
        const uint64_t rank1 = scale_to_range(draw_word_pair(block, 1), uint32_t(row.residual));
        indices[j0 + 1] = residual_position(row.heavy, row.h, row.start, int64_t(rank1));
        log_weights[j0 + 1] = log_weight;
      }
    }
    __syncthreads();  // the next range overwrites the header
  }
}

}  // namespace

cudaError_t sample_residual_cuda(const SampleParams& p, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  DeviceInfo info;
  const cudaError_t err = current_device_info(&info);
  if (err != cudaSuccess) return err;
  const int64_t ranges = ceil_div(p.rows, int64_t(kSampleThreads));
  // Blocks per range: enough for every pair a range could hold (max_out bounds the
  // counts), at most a device's worth over all ranges; at least one, which writes the
  // range's counts.
  const int64_t most_pairs = std::min<int64_t>(p.rows, kSampleThreads) * ceil_div(p.max_out, 2);
  const int64_t device_blocks = kSampleBlocksPerSm * std::max(info.num_sms, 1);
  int64_t per_range = std::min<int64_t>(ceil_div(most_pairs, int64_t(kSampleThreads)),
                                        ceil_div(device_blocks, ranges));
  per_range = std::max<int64_t>(std::min<int64_t>(per_range, 65535), 1);
  const dim3 grid(unsigned(per_range), unsigned(std::min<int64_t>(ranges, 65535)));
  return launch_kernel(sample_residual_kernel, grid, dim3(kSampleThreads), sizeof(SampleShared),
                       stream, 1, p, ranges);
}

}  // namespace vattention
