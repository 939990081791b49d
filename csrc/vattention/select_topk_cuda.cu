// CUDA top-k (stage "select"), reproducing select_topk_cpu exactly. Two paths:
//
// Small k (k_max <= kWarpSelectMaxK = 256): warp select, in the spirit of FAISS's
// WarpSelect (select_topk_warp_cuda.cuh). Candidates are 64-bit composites
// (key << 32 | ~position), so one integer order is (key desc, position asc).
// Each warp streams its share of the row and keeps, in registers, a sorted queue
// of its best Q = 32 * R candidates (Q = 32, 64, 128 or 256: the next power of two
// >= k_max) plus a few pending candidates per lane that beat the queue's k-th
// best; pending candidates are merged in with a warp-wide bitonic sort + merge
// (shuffles) whenever a lane could overflow. The warps' queues are then merged
// pairwise through shared memory, and on sm_90 the queues of up to 8 blocks of a
// cluster (each owning a contiguous chunk of the row) through distributed shared
// memory. Finally one warp sorts the k winners by position (bitonic sort) and
// writes them ascending, padded with -1.
//
// Large k: a radix select per row on the 32-bit orderable key, then an ordered
// compaction. One thread-block cluster (up to 8 blocks, sm_90) serves a row: each
// block owns a contiguous chunk of the row's window and caches its keys in shared
// memory, so the scores are read from global memory once. Three radix passes (11, 11 and
// 10 bits, most significant first) find the k-th largest key T and how many keys
// equal to T must be taken (`need_eq`: the lowest positions win). Per-block
// histograms are summed through distributed shared memory. Finally each block
// counts its keys > T and == T, learns the counts of the blocks before it (again
// via distributed shared memory) and writes its selected positions in ascending
// order with a block-wide ballot scan: a selected position p lands at
//   (#keys > T before p) + min(#keys == T before p, need_eq).
// Rows longer than the clusters' shared memory re-read the keys from global
// memory in each pass (kCached = false).
//
// Without clusters (pre-sm_90 devices, kernels whose loaded code was compiled
// for an architecture below sm_90, or a cluster launch the device refuses) a
// single block serves a row on either path. The ranking itself is orderable_key's
// (common.h): NaN first, integer compares only, so the GPU's order is the CPU's.
#include <cooperative_groups.h>

#include <algorithm>

#include "cuda_utils.cuh"
#include "dispatch.h"
#include "select_topk.h"
#include "select_topk_warp_cuda.cuh"

namespace vattention {
namespace {

using namespace cuda_detail;

constexpr int kSelectTopkThreads = 512;
constexpr int kSelectTopkWarps = kSelectTopkThreads / 32;
constexpr int kMaxCluster = 8;
constexpr int kBins = 2048;  // widest digit: 11 bits
constexpr int kBinsPerThread = kBins / kSelectTopkThreads;
constexpr int kLoadUnroll = 8;
constexpr int64_t kMinChunk = 4096;             // do not split rows finer than this
constexpr int64_t kMaxCachedBytes = 160 * 1024;  // key cache per block

// Shared state of a block; the key cache follows it in dynamic shared memory.
struct SelectTopkShared {
  uint32_t hist[2][kBins];
  uint32_t scan[kSelectTopkWarps];
  uint32_t warp_gt[kSelectTopkWarps];
  uint32_t warp_eq[kSelectTopkWarps];
  uint32_t block_gt;  // this block's count of keys > T (read by later ranks)
  uint32_t block_eq;  // ... and of keys == T
  uint32_t base_gt;   // counts of the earlier ranks
  uint32_t base_eq;
  uint32_t digit;
  uint32_t k_rem;
};

constexpr int kSharedBytes = int((sizeof(SelectTopkShared) + 15) / 16 * 16);

// Whether this compilation pass has the cluster barrier and the DSMEM mapping
// (sm_90+ code, or the emulator). The host launches clusters only for kernels
// whose loaded code has them (clusters_usable), and sm_90 is kClusterArch there.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(VATT_EMULATE)
#define VATT_SELECT_TOPK_CLUSTERS 1
#else
#define VATT_SELECT_TOPK_CLUSTERS 0
#endif
constexpr int kClusterArch = 90;

// The blocks of a cluster, or a lone block. Rank = blockIdx.x (cluster dims (C,1,1)).
struct Cluster {
  int size;
  int rank;

  // Code without cluster support, launched as clusters all the same, would have
  // each block select from its own chunk only and write a wrong top-k: trap, so
  // that the launch fails instead.
  __device__ __forceinline__ static Cluster of_block(int cluster_size) {
#if !VATT_SELECT_TOPK_CLUSTERS
    if (cluster_size > 1) __trap();
#endif
    return Cluster{cluster_size, int(blockIdx.x)};
  }

  __device__ __forceinline__ void sync() const {
#if VATT_SELECT_TOPK_CLUSTERS
    if (size > 1) {
      cooperative_groups::this_cluster().sync();
      return;
    }
#endif
    __syncthreads();
  }

  template <typename P>
  __device__ __forceinline__ P* map(P* p, int other) const {
#if VATT_SELECT_TOPK_CLUSTERS
    if (size > 1 && other != rank) return cooperative_groups::this_cluster().map_shared_rank(p, other);
#endif
    return p;
  }
};

// The architecture of the code of `kernel` loaded for the current device:
// min(PTX version, binary version), e.g. 90 for sm_90 SASS but 80 for compute_80
// PTX JIT-compiled on an H100 (whose __CUDA_ARCH__ was 800: no cluster code).
inline cudaError_t kernel_code_arch(const void* kernel, int* arch) {
#if defined(VATT_EMULATE)
  (void)kernel;
  *arch = kClusterArch;  // the emulator build always compiles the cluster code in
  return cudaSuccess;
#else
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  *arch = std::min(attr.ptxVersion, attr.binaryVersion);
  return cudaSuccess;
#endif
}

// *usable = `kernel` may be launched as clusters on dev: the device has them and
// the kernel's loaded code does too. The compute capability alone is not enough
// (see kernel_code_arch). `cache` holds kMaxDevices entries, one per device, owned
// by the caller (one array per kernel): 0 unknown, 1 no, 2 yes. A host-only query,
// so also legal while a CUDA graph is captured.
inline cudaError_t clusters_usable(const void* kernel, const DeviceInfo& dev, std::atomic<int>* cache,
                                   bool* usable) {
  *usable = false;
  if (dev.major < 9) return cudaSuccess;
  const bool cached = dev.device >= 0 && dev.device < kMaxDevices;
  const int known = cached ? cache[dev.device].load(std::memory_order_acquire) : 0;
  if (known != 0) {
    *usable = known == 2;
    return cudaSuccess;
  }
  int arch = 0;
  const cudaError_t err = kernel_code_arch(kernel, &arch);
  if (err != cudaSuccess) return err;
  *usable = arch >= kClusterArch;
  if (cached) cache[dev.device].store(*usable ? 2 : 1, std::memory_order_release);
  return cudaSuccess;
}

template <typename T>
__device__ __forceinline__ uint32_t key_at(const T* row, int64_t pos) {
  return orderable_key(load_float(row + pos));
}

template <typename T, bool kCached>
struct KeySource {
  const T* row;
  int64_t lo;
  const uint32_t* cache;
  __device__ __forceinline__ uint32_t operator()(int64_t i) const {
    if (kCached) return cache[i];
    return key_at(row, lo + i);
  }
};

// hist[bin] += 1 for every lane of the warp with `valid`, one shared-memory atomic per
// distinct bin. Real log-probability scores put most of a row into a handful of top-digit
// bins (random scores spread them out and hide it), and 32 lanes adding to one bin
// serialise 32 atomics. Every lane of the warp must call it (a warp-uniform loop).
__device__ __forceinline__ void warp_histogram_add(uint32_t* hist, uint32_t bin, bool valid) {
  const unsigned active = __ballot_sync(kFullMask, valid);
  if (active == 0) return;
  const unsigned peers = __match_any_sync(kFullMask, valid ? bin : 0xffffffffu) & active;
  if (valid && int(threadIdx.x & 31) == __ffs(int(peers)) - 1) {
    atomicAdd(&hist[bin], unsigned(__popc(peers)));
  }
}

// Exclusive prefix sum over the block (kSelectTopkThreads threads).
__device__ __forceinline__ uint32_t block_exclusive_sum(uint32_t x, uint32_t* warp_totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t inclusive = x;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const uint32_t y = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += y;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  uint32_t base = 0;
  for (int w = 0; w < warp; ++w) base += warp_totals[w];
  __syncthreads();  // warp_totals may be reused right after
  return base + inclusive - x;
}

// Sums the per-block histograms of buffer `buf` over the cluster, finds the bin
// holding the k_rem-th largest key (bins of `nbins`, highest first) and returns
// the digit; *k_rem becomes the rank inside that bin.
__device__ __forceinline__ uint32_t pick_digit(SelectTopkShared& sh, const Cluster& cl, int buf,
                                               int nbins, uint32_t* k_rem) {
  cl.sync();  // every block's histogram is complete
  const int tid = threadIdx.x;
  uint32_t tot[kBinsPerThread];
  uint32_t sum = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    const int rb = tid * kBinsPerThread + j;  // reversed bin: 0 = highest
    uint32_t t = 0;
    if (rb < nbins) {
      const int bin = nbins - 1 - rb;
      for (int other = 0; other < cl.size; ++other) t += cl.map(&sh.hist[buf][0], other)[bin];
    }
    tot[j] = t;
    sum += t;
  }
  uint32_t before = block_exclusive_sum(sum, sh.scan);
  const uint32_t want = *k_rem;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    const int rb = tid * kBinsPerThread + j;
    if (tot[j] > 0 && before < want && before + tot[j] >= want) {
      sh.digit = uint32_t(nbins - 1 - rb);
      sh.k_rem = want - before;
    }
    before += tot[j];
  }
  __syncthreads();
  *k_rem = sh.k_rem;
  return sh.digit;
}

// The parts of a row's output that need no selection: the -1 padding after its k
// entries and, when k covers the whole window, the window itself in order. The
// cluster's threads write every `stride`-th entry from `first`. True when the row
// is complete.
__device__ __forceinline__ bool write_unselected(const SelectTopkRow& row, int32_t* out, int64_t k_max,
                                                 int64_t first, int64_t stride) {
  for (int64_t j = row.k + first; j < k_max; j += stride) out[j] = -1;
  if (row.k == 0) return true;
  if (row.k < row.available) return false;
  for (int64_t j = first; j < row.k; j += stride) out[j] = int32_t(row.start + j);
  return true;
}

template <typename T, bool kCached>
__global__ void __launch_bounds__(kSelectTopkThreads)
select_topk_kernel(const SelectTopkParams p, const int cluster_size) {
  unsigned char* smem = dynamic_smem();
  SelectTopkShared& sh = *reinterpret_cast<SelectTopkShared*>(smem);
  uint32_t* select_topk_key_cache = reinterpret_cast<uint32_t*>(smem + kSharedBytes);
  const Cluster cl = Cluster::of_block(cluster_size);
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t cluster_threads = int64_t(cl.size) * kSelectTopkThreads;

  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    const T* row = static_cast<const T*>(p.scores) + r * p.score_row_stride;
    int32_t* out = p.row_indices(r);
    const SelectTopkRow window = select_topk_row(p, r);
    const int64_t start = window.start, end = window.end, avail = window.available;
    const int64_t k = window.k;
    const int64_t first = int64_t(cl.rank) * kSelectTopkThreads + tid;
    if (write_unselected(window, out, p.k_max, first, cluster_threads)) continue;

    const int64_t chunk = ceil_div(avail, cl.size);
    const int64_t lo = start + int64_t(cl.rank) * chunk;
    const int64_t n = max(min(end - lo, chunk), int64_t(0));
    const KeySource<T, kCached> key{row, lo, select_topk_key_cache};

    // Pass 0 (bits 31..21), fused with loading the keys into the cache.
    for (int b = tid; b < kBins; b += kSelectTopkThreads) sh.hist[0][b] = 0;
    __syncthreads();
    for (int64_t base = 0; base < n; base += int64_t(kLoadUnroll) * kSelectTopkThreads) {
      uint32_t keys[kLoadUnroll];
#pragma unroll
      for (int u = 0; u < kLoadUnroll; ++u) {
        const int64_t i = base + int64_t(u) * kSelectTopkThreads + tid;
        keys[u] = i < n ? key_at(row, lo + i) : 0u;
      }
#pragma unroll
      for (int u = 0; u < kLoadUnroll; ++u) {
        const int64_t i = base + int64_t(u) * kSelectTopkThreads + tid;
        if (kCached && i < n) select_topk_key_cache[i] = keys[u];
        warp_histogram_add(sh.hist[0], keys[u] >> 21, i < n);
      }
    }
    uint32_t k_rem = uint32_t(k);
    uint32_t prefix = pick_digit(sh, cl, 0, 2048, &k_rem) << 21;
    uint32_t mask = 0xffe00000u;

    // Passes 1 (bits 20..10) and 2 (bits 9..0) over the keys matching the prefix.
#pragma unroll 1
    for (int pass = 1; pass < 3; ++pass) {
      const int buf = pass & 1;
      const int shift = pass == 1 ? 10 : 0;
      const int nbins = pass == 1 ? 2048 : 1024;
      for (int b = tid; b < kBins; b += kSelectTopkThreads) sh.hist[buf][b] = 0;
      __syncthreads();
      for (int64_t base = 0; base < n; base += kSelectTopkThreads) {
        const int64_t i = base + tid;
        const uint32_t x = i < n ? key(i) : 0u;
        warp_histogram_add(sh.hist[buf], (x >> shift) & uint32_t(nbins - 1),
                           i < n && (x & mask) == prefix);
      }
      prefix |= pick_digit(sh, cl, buf, nbins, &k_rem) << shift;
      mask |= uint32_t(nbins - 1) << shift;
    }
    const uint32_t kth = prefix;       // the k-th largest key
    const uint32_t need_eq = k_rem;    // how many keys == kth are taken

    // This block's counts, then the counts of the blocks before it.
    uint32_t gt = 0, eq = 0;
    for (int64_t i = tid; i < n; i += kSelectTopkThreads) {
      const uint32_t x = key(i);
      gt += x > kth;
      eq += x == kth;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      gt += __shfl_xor_sync(kFullMask, gt, offset);
      eq += __shfl_xor_sync(kFullMask, eq, offset);
    }
    if (lane == 0) {
      sh.warp_gt[warp] = gt;
      sh.warp_eq[warp] = eq;
    }
    __syncthreads();
    if (tid == 0) {
      uint32_t tg = 0, te = 0;
      for (int w = 0; w < kSelectTopkWarps; ++w) {
        tg += sh.warp_gt[w];
        te += sh.warp_eq[w];
      }
      sh.block_gt = tg;
      sh.block_eq = te;
    }
    cl.sync();
    if (tid == 0) {
      uint32_t bg = 0, be = 0;
      for (int other = 0; other < cl.rank; ++other) {
        bg += *cl.map(&sh.block_gt, other);
        be += *cl.map(&sh.block_eq, other);
      }
      sh.base_gt = bg;
      sh.base_eq = be;
    }
    cl.sync();  // remote reads done: nobody may reuse or release its counts before this
    uint32_t run_gt = sh.base_gt, run_eq = sh.base_eq;

    // Ordered compaction, one block-wide tile at a time.
    const uint32_t lanes_below = (1u << lane) - 1u;
    for (int64_t base = 0; base < n; base += kSelectTopkThreads) {
      const int64_t i = base + tid;
      const bool valid = i < n;
      const uint32_t x = valid ? key(i) : 0u;
      const bool is_gt = valid && x > kth;
      const bool is_eq = valid && x == kth;
      const uint32_t ballot_gt = __ballot_sync(kFullMask, is_gt);
      const uint32_t ballot_eq = __ballot_sync(kFullMask, is_eq);
      if (lane == 0) {
        sh.warp_gt[warp] = __popc(ballot_gt);
        sh.warp_eq[warp] = __popc(ballot_eq);
      }
      __syncthreads();
      uint32_t before_gt = 0, before_eq = 0, tile_gt = 0, tile_eq = 0;
#pragma unroll
      for (int w = 0; w < kSelectTopkWarps; ++w) {
        const uint32_t a = sh.warp_gt[w], e = sh.warp_eq[w];
        if (w < warp) {
          before_gt += a;
          before_eq += e;
        }
        tile_gt += a;
        tile_eq += e;
      }
      if (is_gt || is_eq) {
        const uint32_t gt_rank = run_gt + before_gt + __popc(ballot_gt & lanes_below);
        const uint32_t eq_rank = run_eq + before_eq + __popc(ballot_eq & lanes_below);
        if (is_gt || eq_rank < need_eq) {
          out[int64_t(gt_rank) + min(eq_rank, need_eq)] = int32_t(lo + i);
        }
      }
      run_gt += tile_gt;
      run_eq += tile_eq;
      __syncthreads();
    }
  }
}

template <typename T, bool kCached>
cudaError_t launch_select_topk(const SelectTopkParams& p, int cluster, int cache_bytes, const DeviceInfo& dev,
                        cudaStream_t stream) {
  static std::atomic<int> smem_set[kMaxDevices];
  auto kernel = select_topk_kernel<T, kCached>;
  const int smem = kSharedBytes + cache_bytes;
  cudaError_t err = ensure_dynamic_smem(reinterpret_cast<const void*>(kernel), smem, dev.device,
                                        smem_set);
  if (err != cudaSuccess) return err;
  const dim3 grid{unsigned(cluster), unsigned(std::min<int64_t>(p.rows, 65535)), 1u};
  return launch_kernel(kernel, grid, dim3(kSelectTopkThreads), size_t(smem), stream, cluster, p, cluster);
}

// Both kernels of the radix path (cached keys or not) come from one compilation
// pass, so one answer serves both.
template <typename T>
cudaError_t radix_clusters_usable(const DeviceInfo& dev, bool* usable) {
  static std::atomic<int> cache[kMaxDevices];
  return clusters_usable(reinterpret_cast<const void*>(select_topk_kernel<T, true>), dev, cache, usable);
}

template <typename T>
cudaError_t select_topk_dispatch(const SelectTopkParams& p, cudaStream_t stream) {
  DeviceInfo dev;
  cudaError_t err = current_device_info(&dev);
  if (err != cudaSuccess) return err;
  bool use_clusters = false;
  if ((err = radix_clusters_usable<T>(dev, &use_clusters)) != cudaSuccess) return err;
  // Cluster size: enough blocks to fill the GPU twice over (to_fill), no chunk under
  // kMinChunk keys (by_length), and then at least enough blocks that a chunk's keys fit
  // the shared-memory cache (to_cache): an uncached row re-reads its scores from HBM in
  // every radix pass. Example, H100 (132 SMs, ~160 KiB of cache per block), 128 rows of
  // 131072 scores (batch 16, shared GQA lists): to_fill = 3 gives 175 KiB chunks that miss
  // the cache, to_cache = 4 gives 128 KiB chunks that fit, so the cluster is 4.
  const int64_t cache_limit =
      std::min<int64_t>(kMaxCachedBytes, int64_t(dev.max_smem_optin) - kSharedBytes - 1024);
  int cluster = 1;
  if (use_clusters) {
    const int64_t to_fill = ceil_div(2 * int64_t(dev.num_sms), p.rows);
    const int64_t by_length = ceil_div(p.length, kMinChunk);
    const int64_t to_cache =
        cache_limit > 0 ? ceil_div(p.length * int64_t(sizeof(uint32_t)), cache_limit) : 1;
    int64_t size = std::min<int64_t>(to_fill, by_length);
    if (to_cache <= kMaxCluster) size = std::max<int64_t>(size, to_cache);
    cluster = int(std::max<int64_t>(1, std::min<int64_t>(size, kMaxCluster)));
  }
  for (;;) {
    const int64_t cache_bytes = ceil_div(p.length, cluster) * int64_t(sizeof(uint32_t));
    const int64_t limit = cache_limit;
    err = cache_bytes <= limit ? launch_select_topk<T, true>(p, cluster, int(cache_bytes), dev, stream)
                               : launch_select_topk<T, false>(p, cluster, 0, dev, stream);
    if (err == cudaSuccess || cluster == 1) return err;
    // A cluster launch that the device cannot schedule: fall back to one block per row.
    (void)cudaGetLastError();
    cluster = 1;
  }
}

// ---------------------------------------------------------------------------
// Small k: warp select (see the top of the file and select_topk_warp_cuda.cuh).
// ---------------------------------------------------------------------------

constexpr int kSelectTopkWarpThreads = 256;
constexpr int kSelectTopkWarpWarps = kSelectTopkWarpThreads / 32;  // >= kMaxCluster (cluster merge)
constexpr int kSelectTopkWarpLoad = 4;   // scores per lane per tile, loaded together
constexpr int kSelectTopkWarpSlots = 8;  // pending candidates per lane
static_assert(kSelectTopkWarpWarps >= kMaxCluster, "the cluster merge uses one warp per block");
static_assert(kSelectTopkWarpLoad <= kSelectTopkWarpSlots, "a tile must fit in the pending slots");

template <typename T>
__device__ __forceinline__ void load_key_tile(const void* scores, int64_t row_offset, int64_t lo,
                                              int64_t n, int64_t i0,
                                              uint32_t (&keys)[kSelectTopkWarpLoad]) {
  const T* row = static_cast<const T*>(scores) + row_offset;
#pragma unroll
  for (int u = 0; u < kSelectTopkWarpLoad; ++u) {
    const int64_t i = i0 + int64_t(u) * 32;
    keys[u] = i < n ? key_at(row, lo + i) : 0u;
  }
}

// One row per cluster of blocks (or per block), rows strided over gridDim.y. The
// element type is a run-time switch: only the queue length R is a template
// parameter, which keeps this path at four kernels. (The explicit minimum of 2
// blocks per SM caps registers at 128; without it ptxas spilled at R = 1, 2.)
template <int R>
__global__ void __launch_bounds__(kSelectTopkWarpThreads, 2)
select_topk_warp_kernel(const SelectTopkParams p, const int cluster_size) {
  using namespace warp_select;
  Pair* slots = reinterpret_cast<Pair*>(dynamic_smem());  // [kSelectTopkWarpWarps][32 * R]
  const Cluster cl = Cluster::of_block(cluster_size);
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t cluster_threads = int64_t(cl.size) * kSelectTopkWarpThreads;

  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    int32_t* out = p.row_indices(r);
    const SelectTopkRow window = select_topk_row(p, r);
    const int64_t start = window.start, end = window.end, avail = window.available;
    const int64_t k = window.k;  // <= 32 * R
    const int64_t first = int64_t(cl.rank) * kSelectTopkWarpThreads + tid;
    if (write_unselected(window, out, p.k_max, first, cluster_threads)) continue;

    const int64_t chunk = ceil_div(avail, cl.size);
    const int64_t lo = start + int64_t(cl.rank) * chunk;
    const int64_t n = max(min(end - lo, chunk), int64_t(0));
    const int64_t row_offset = r * p.score_row_stride;

    // Stream this block's chunk: tiles of kSelectTopkWarpThreads * kSelectTopkWarpLoad scores,
    // each warp taking kSelectTopkWarpLoad coalesced runs of 32. The next tile's loads
    // are issued before the current tile is offered to the queue.
    WarpQueue<R, kSelectTopkWarpSlots> queue;
    queue.init(int(k));
    constexpr int64_t kTile = int64_t(kSelectTopkWarpThreads) * kSelectTopkWarpLoad;
    const int64_t lane_first = int64_t(warp) * (32 * kSelectTopkWarpLoad) + lane;
    auto load_tile = [&](int64_t i0, uint32_t(&keys)[kSelectTopkWarpLoad]) {
      switch (p.dtype) {
        case DType::kFloat32: load_key_tile<float>(p.scores, row_offset, lo, n, i0, keys); break;
        case DType::kFloat16: load_key_tile<half_t>(p.scores, row_offset, lo, n, i0, keys); break;
        default: load_key_tile<bfloat16_t>(p.scores, row_offset, lo, n, i0, keys); break;
      }
    };
    uint32_t keys[kSelectTopkWarpLoad];
    load_tile(lane_first, keys);
    for (int64_t base = 0; base < n; base += kTile) {
      const int64_t i0 = base + lane_first;
      uint32_t next[kSelectTopkWarpLoad];
      load_tile(i0 + kTile, next);
#pragma unroll
      for (int u = 0; u < kSelectTopkWarpLoad; ++u) {
        const int64_t i = i0 + int64_t(u) * 32;
        queue.offer(i < n ? make_pair(keys[u], lo + i) : Pair(0));
      }
      queue.maybe_flush(kSelectTopkWarpLoad, lane);
#pragma unroll
      for (int u = 0; u < kSelectTopkWarpLoad; ++u) keys[u] = next[u];
    }
    queue.flush(lane);

    // The block's best 32 * R, in warp 0.
    block_merge(queue.queue, slots, kSelectTopkWarpWarps, warp, lane);
    if (cl.size > 1) {
      // Warp w of rank 0 fetches the list of rank w; rank 0 then merges them.
      if (warp == 0) store_list(slots, queue.queue, lane);
      cl.sync();
      if (cl.rank == 0 && warp > 0 && warp < cl.size) {
        load_list(cl.map(slots, warp), queue.queue, lane);
      }
      cl.sync();  // remote reads done: the other ranks may move on
      if (cl.rank == 0) block_merge(queue.queue, slots, cl.size, warp, lane);
    }

    // The k best, by ascending position.
    if (cl.rank == 0 && warp == 0) {
      uint32_t pos[R];
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int i = lane * R + j;
        pos[j] = i < k ? pair_position(queue.queue[j]) : 0xffffffffu;
      }
      warp_sort</*kAsc=*/true>(pos, lane);
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int i = lane * R + j;
        if (i < k) out[i] = int32_t(pos[j]);
      }
    }
  }
}

template <int R>
cudaError_t launch_select_topk_warp(const SelectTopkParams& p, const DeviceInfo& dev, cudaStream_t stream) {
  auto kernel = select_topk_warp_kernel<R>;
  const int smem = kSelectTopkWarpWarps * 32 * R * int(sizeof(warp_select::Pair));  // <= 16 KiB
  static std::atomic<int> clusters_known[kMaxDevices];
  bool use_clusters = false;
  cudaError_t err = clusters_usable(reinterpret_cast<const void*>(kernel), dev, clusters_known,
                                    &use_clusters);
  if (err != cudaSuccess) return err;
  int cluster = 1;
  if (use_clusters) {
    const int64_t to_fill = ceil_div(4 * int64_t(dev.num_sms), p.rows);
    const int64_t by_length = ceil_div(p.length, kMinChunk);
    cluster = int(std::max<int64_t>(1, std::min<int64_t>({to_fill, by_length, kMaxCluster})));
  }
  for (;;) {
    const dim3 grid{unsigned(cluster), unsigned(std::min<int64_t>(p.rows, 65535)), 1u};
    err = launch_kernel(kernel, grid, dim3(kSelectTopkWarpThreads), size_t(smem), stream, cluster, p,
                        cluster);
    if (err == cudaSuccess || cluster == 1) return err;
    // A cluster launch that the device cannot schedule: fall back to one block per row.
    (void)cudaGetLastError();
    cluster = 1;
  }
}

cudaError_t select_topk_warp_dispatch(const SelectTopkParams& p, cudaStream_t stream) {
  DeviceInfo dev;
  const cudaError_t err = current_device_info(&dev);
  if (err != cudaSuccess) return err;
  if (p.k_max <= 32) return launch_select_topk_warp<1>(p, dev, stream);
  if (p.k_max <= 64) return launch_select_topk_warp<2>(p, dev, stream);
  if (p.k_max <= 128) return launch_select_topk_warp<4>(p, dev, stream);
  return launch_select_topk_warp<8>(p, dev, stream);
}

}  // namespace

// Both paths work in shared memory only (a row that needs several blocks uses a
// cluster, not a second pass through global memory).
size_t select_topk_cuda_workspace_bytes(const SelectTopkParams&) { return 0; }

cudaError_t select_topk_cuda(const SelectTopkParams& p, void* /*workspace*/, cudaStream_t stream) {
  if (p.rows <= 0 || p.k_max <= 0) return cudaSuccess;
  if (p.k_max <= kWarpSelectMaxK) return select_topk_warp_dispatch(p, stream);
  return dispatch_dtype(p.dtype, [&](auto tag) { return select_topk_dispatch<decltype(tag)>(p, stream); });
}

}  // namespace vattention
