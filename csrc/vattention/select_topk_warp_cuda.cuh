// Private to select_topk_cuda.cu: the warp-level pieces of the small-k top-k path, in
// the spirit of FAISS's WarpSelect.
//
// Candidates are 64-bit composites (key << 32) | ~position: the integer order of
// composites is (key descending, position ascending) when compared as "larger is
// better", i.e. exactly select_topk_cpu's order (ties -> lower position, NaN highest via
// orderable_key). 0 is the empty slot: it is below every real candidate, since a
// real position p < 2^31 has ~p >= 2^31 (and orderable_key never returns 0).
//
// A warp-wide array of 32 * N values is held in registers, lane-major: element
// i = lane * N + r is x[r] of lane `lane`. Bitonic networks over such arrays use
// register swaps for partner distances j < N and __shfl_xor_sync for j >= N.
// All loops unroll at compile time (register arrays are never indexed at run time).
#pragma once

#include "cuda_utils.cuh"

namespace vattention {
namespace cuda_detail {

// Largest k_max served by the warp-select path (queue length 256); larger k_max
// takes the radix-select path.
constexpr int kWarpSelectMaxK = 256;

namespace warp_select {

using Pair = unsigned long long;

__device__ __forceinline__ Pair make_pair(uint32_t key, int64_t pos) {
  return (Pair(key) << 32) | Pair(~uint32_t(pos));
}
__device__ __forceinline__ uint32_t pair_position(Pair v) { return ~uint32_t(v); }

template <typename V>
__device__ __forceinline__ V vmin(V a, V b) { return a < b ? a : b; }
template <typename V>
__device__ __forceinline__ V vmax(V a, V b) { return a < b ? b : a; }

// One compare-exchange step of a bitonic network: stage size 2^kLogK, partner
// distance 2^kLogJ. Blocks with (i & K) == 0 are ordered ascending when kAsc
// (descending otherwise), the others the opposite way.
template <int kLogK, int kLogJ, bool kAsc, int N, typename V>
__device__ __forceinline__ void bitonic_step(V (&x)[N], int lane) {
  constexpr int K = 1 << kLogK, J = 1 << kLogJ;
  if (J >= N) {
#pragma unroll
    for (int r = 0; r < N; ++r) {
      const V other = __shfl_xor_sync(kFullMask, x[r], J / N);
      const int i = lane * N + r;
      const bool up = ((i & K) == 0) == kAsc;
      const bool lower = (i & J) == 0;
      x[r] = (lower == up) ? vmin(x[r], other) : vmax(x[r], other);
    }
  } else {
#pragma unroll
    for (int r = 0; r < N; ++r) {
      if ((r & J) == 0) {
        const int i = lane * N + r;
        const bool up = ((i & K) == 0) == kAsc;
        const V a = x[r], b = x[r | J];
        const V lo = vmin(a, b), hi = vmax(a, b);
        x[r] = up ? lo : hi;
        x[r | J] = up ? hi : lo;
      }
    }
  }
}

// Steps kLogJ, kLogJ - 1, ..., 0 of stage kLogK.
template <int kLogK, int kLogJ, bool kAsc, int N, typename V>
struct BitonicStage {
  __device__ __forceinline__ static void run(V (&x)[N], int lane) {
    bitonic_step<kLogK, kLogJ, kAsc>(x, lane);
    BitonicStage<kLogK, kLogJ - 1, kAsc, N, V>::run(x, lane);
  }
};
template <int kLogK, bool kAsc, int N, typename V>
struct BitonicStage<kLogK, -1, kAsc, N, V> {
  __device__ __forceinline__ static void run(V (&)[N], int) {}
};

// Stages kLogK .. kLogEnd of a bitonic sort.
template <int kLogK, int kLogEnd, bool kAsc, int N, typename V>
struct BitonicSort {
  __device__ __forceinline__ static void run(V (&x)[N], int lane) {
    BitonicStage<kLogK, kLogK - 1, kAsc, N, V>::run(x, lane);
    BitonicSort<kLogK + 1, kLogEnd, kAsc, N, V>::run(x, lane);
  }
};
template <int kLogEnd, bool kAsc, int N, typename V>
struct BitonicSort<kLogEnd + 1, kLogEnd, kAsc, N, V> {
  __device__ __forceinline__ static void run(V (&)[N], int) {}
};

template <int N>
struct Log2 {
  static constexpr int value = 1 + Log2<N / 2>::value;
};
template <>
struct Log2<1> {
  static constexpr int value = 0;
};

// Sorts the warp's 32 * N values (ascending when kAsc).
template <bool kAsc, int N, typename V>
__device__ __forceinline__ void warp_sort(V (&x)[N], int lane) {
  constexpr int kLog = Log2<32 * N>::value;
  BitonicSort<1, kLog, kAsc, N, V>::run(x, lane);
}

// Sorts the warp's 32 * N values when they form a bitonic sequence.
template <bool kAsc, int N, typename V>
__device__ __forceinline__ void warp_bitonic_merge(V (&x)[N], int lane) {
  constexpr int kLog = Log2<32 * N>::value;
  BitonicStage<kLog, kLog - 1, kAsc, N, V>::run(x, lane);
}

// Merges the unsorted warp-wide array b into the warp queue a (descending, 32 * N
// composites), keeping the 32 * N best. b is clobbered.
template <int N>
__device__ __forceinline__ void merge_into_queue(Pair (&a)[N], Pair (&b)[N], int lane) {
  warp_sort</*kAsc=*/true>(b, lane);
  // a descending, b ascending: the elementwise max is a bitonic sequence that
  // holds the 32 * N largest of both (the first half-cleaner of a bitonic merge).
#pragma unroll
  for (int r = 0; r < N; ++r) a[r] = vmax(a[r], b[r]);
  warp_bitonic_merge</*kAsc=*/false>(a, lane);
}

// Element `idx` (< 32 * N) of a warp-wide array, on every lane.
template <int N, typename V>
__device__ __forceinline__ V warp_element(const V (&x)[N], int idx) {
  const int rsel = idx % N;
  V v = x[0];
#pragma unroll
  for (int r = 1; r < N; ++r) {
    if (r == rsel) v = x[r];
  }
  return __shfl_sync(kFullMask, v, idx / N);
}

// A warp's queue of the best 32 * R candidates it has seen (descending, in
// registers) plus a per-lane buffer of kSlots pending candidates that beat the
// queue's k-th best when they arrived. Pending candidates are merged kR lanes-
// worth at a time, only when some lane might otherwise overflow.
template <int R, int kSlots>
struct WarpQueue {
  static_assert(kSlots % R == 0 || R % kSlots == 0, "slots and queue registers must nest");
  Pair queue[R];
  Pair pending[kSlots];
  int count;       // pending candidates of this lane (pending[0 .. count))
  Pair threshold;  // the queue's k-th best: a candidate must beat it
  int k;           // 1 <= k <= 32 * R

  __device__ __forceinline__ void init(int k_) {
    k = k_;
    count = 0;
    threshold = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) queue[r] = 0;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) pending[s] = 0;
  }

  // Offers one candidate (0 = nothing); at most kSlots - count may be offered
  // between flushes.
  __device__ __forceinline__ void offer(Pair v) {
    if (v > threshold) {
#pragma unroll
      for (int s = kSlots - 1; s > 0; --s) pending[s] = pending[s - 1];
      pending[0] = v;
      ++count;
    }
  }

  // Merges every lane's pending candidates into the queue (warp-collective).
  __device__ __forceinline__ void flush(int lane) {
#pragma unroll 1
    while (__ballot_sync(kFullMask, count > 0) != 0u) {
      Pair b[R];
#pragma unroll
      for (int r = 0; r < R; ++r) b[r] = r < kSlots ? pending[r] : Pair(0);
      merge_into_queue(queue, b, lane);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) pending[s] = s + R < kSlots ? pending[s + R] : Pair(0);
      count = count > R ? count - R : 0;
    }
    threshold = warp_element(queue, k - 1);
  }

  // Flushes when some lane could overflow with `upcoming` more offers.
  __device__ __forceinline__ void maybe_flush(int upcoming, int lane) {
    if (__ballot_sync(kFullMask, count > kSlots - upcoming) != 0u) flush(lane);
  }
};

// Warp-wide lists in shared memory, kQ = 32 * R composites per slot, stored
// register-major (element lane * R + r at r * 32 + lane) so that the accesses
// below are free of bank conflicts.
template <int R>
__device__ __forceinline__ void store_list(Pair* slot, const Pair (&x)[R], int lane) {
#pragma unroll
  for (int r = 0; r < R; ++r) slot[r * 32 + lane] = x[r];
}
template <int R>
__device__ __forceinline__ void load_list(const Pair* slot, Pair (&x)[R], int lane) {
#pragma unroll
  for (int r = 0; r < R; ++r) x[r] = slot[r * 32 + lane];
}
// A descending list, read back ascending.
template <int R>
__device__ __forceinline__ void load_list_reversed(const Pair* slot, Pair (&x)[R], int lane) {
#pragma unroll
  for (int r = 0; r < R; ++r) x[r] = slot[(R - 1 - r) * 32 + (31 - lane)];
}

// Merges the descending queues of warps 0 .. active-1 of the block into warp 0's
// (pairwise tree through shared memory, log2(active) rounds). Block-collective:
// every thread of the block must call it. slots: one list per warp; slot 0 is
// never written (the caller may use it).
template <int R>
__device__ __forceinline__ void block_merge(Pair (&queue)[R], Pair* slots, int active, int warp,
                                            int lane) {
  constexpr int kQ = 32 * R;
  __syncthreads();  // the slots' readers of a previous call are done
  for (int s = 1; s < active; s *= 2) {
    if (warp < active && warp % (2 * s) == s) store_list(slots + warp * kQ, queue, lane);
    __syncthreads();
    if (warp % (2 * s) == 0 && warp + s < active) {
      Pair b[R];
      load_list_reversed(slots + (warp + s) * kQ, b, lane);
#pragma unroll
      for (int r = 0; r < R; ++r) queue[r] = vmax(queue[r], b[r]);
      warp_bitonic_merge</*kAsc=*/false>(queue, lane);
    }
  }
}

}  // namespace warp_select
}  // namespace cuda_detail
}  // namespace vattention
