// Private helpers of the CUDA kernels (torch-free): element conversion, 16-byte
// vector loads, warp reductions, cp.async, kernel launches and the per-kernel
// shared-memory opt-in cache (device facts: device_info.h).
//
// VATT_EMULATE: the kernels are also compiled as plain C++ against the CPU
// emulator in tests/cuda_emulator (one fiber per CUDA thread), so that they can be checked
// against the CPU kernels on machines without a GPU. Everything that differs
// between the two builds is in this header (and device_info.h, which does not
// cache under the emulator).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

#include "common.h"
#include "device_info.h"

namespace vattention {
namespace cuda_detail {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------
// Element conversion (exact: half and bfloat16 widen to float without rounding,
// so the CUDA kernels see bit-identical inputs to the CPU kernels).
// ---------------------------------------------------------------------------

__device__ __forceinline__ float load_float(const float* p) { return __ldg(p); }
__device__ __forceinline__ float half_bits_to_float(uint32_t bits16) {
#if defined(VATT_EMULATE)
  return to_float(half_t{static_cast<uint16_t>(bits16)});
#else
  float f;
  const unsigned short h = static_cast<unsigned short>(bits16);
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

__device__ __forceinline__ float load_float(const half_t* p) {
  return half_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ float load_float(const bfloat16_t* p) {
  const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
  return __uint_as_float(uint32_t(bits) << 16);
}

// Converts the 16 bytes in `w` (4 words) into 16 / sizeof(T) floats.
template <typename T>
struct Vec16;

template <>
struct Vec16<float> {
  static constexpr int kElems = 4;
  __device__ __forceinline__ static void to_float(const uint4& w, float* out) {
    out[0] = __uint_as_float(w.x);
    out[1] = __uint_as_float(w.y);
    out[2] = __uint_as_float(w.z);
    out[3] = __uint_as_float(w.w);
  }
};

template <>
struct Vec16<bfloat16_t> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void to_float(const uint4& w, float* out) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

template <>
struct Vec16<half_t> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void to_float(const uint4& w, float* out) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = half_bits_to_float(words[i] & 0xffffu);
      out[2 * i + 1] = half_bits_to_float(words[i] >> 16);
    }
  }
};

// ---------------------------------------------------------------------------
// Warp reductions.
// ---------------------------------------------------------------------------

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane of
// the group gets the total.
template <int kWidth>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset, kWidth);
  }
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// ---------------------------------------------------------------------------
// cp.async (sm_80+): 16-byte global -> shared copies, zero-filled when src_bytes == 0.
// ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)),
               "l"(gmem_src), "r"(src_bytes));
#else
  uint4 v = make_uint4(0, 0, 0, 0);
  if (valid) v = *reinterpret_cast<const uint4*>(gmem_src);
  *reinterpret_cast<uint4*>(smem_dst) = v;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// ---------------------------------------------------------------------------
// Dynamic shared memory of the block (all shared state of the kernels lives
// there, so the emulator can give each block its own).
// ---------------------------------------------------------------------------

#if defined(VATT_EMULATE)
__device__ __forceinline__ unsigned char* dynamic_smem() { return ::emu::dynamic_smem(); }
#else
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char vatt_dynamic_smem[];
  return vatt_dynamic_smem;
}
#endif

// ---------------------------------------------------------------------------
// Host side. The per-device facts (DeviceInfo, device_info, current_device_info,
// kMaxDevices) live in device_info.h, shared with the torch binding; they are
// named here too so that cuda_detail:: spellings keep working.
// ---------------------------------------------------------------------------

using vattention::current_device_info;
using vattention::device_info;
using vattention::DeviceInfo;
using vattention::kMaxDevices;

// Raises the dynamic shared-memory limit of `kernel` on the current device when
// `bytes` exceeds what was set before. `cache` holds kMaxDevices entries, one per
// device, owned by the caller (one array per kernel). cudaFuncSetAttribute does
// not touch a stream, so this is also legal while a CUDA graph is captured.
inline cudaError_t ensure_dynamic_smem(const void* kernel, int bytes, int device,
                                       std::atomic<int>* cache) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  if (device >= 0 && device < kMaxDevices &&
      cache[device].load(std::memory_order_acquire) >= bytes) {
    return cudaSuccess;
  }
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && device >= 0 && device < kMaxDevices) {
    int seen = cache[device].load(std::memory_order_relaxed);
    while (seen < bytes &&
           !cache[device].compare_exchange_weak(seen, bytes, std::memory_order_acq_rel)) {
    }
  }
  return err;
}

#if defined(VATT_EMULATE)
// Successful launches so far (emulator builds only): every kernel goes through
// launch_kernel, so tests/cuda_emulator/test_launch_count.cpp measures an entry
// point's kernels by reading this before and after the call.
inline std::atomic<int64_t> g_emulated_launches{0};
#endif

// Launches kernel<<<grid, block, smem, stream>>>(args...), optionally as
// clusters of `cluster` blocks along x, and returns the launch error.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, int cluster, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  if (cluster > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = unsigned(cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  if (err == cudaSuccess) err = cudaGetLastError();
#if defined(VATT_EMULATE)
  if (err == cudaSuccess) g_emulated_launches.fetch_add(1, std::memory_order_relaxed);
#endif
  return err;
}

inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace cuda_detail
}  // namespace vattention
