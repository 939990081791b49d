// A small CPU emulator of the CUDA execution model, enough to run the kernels of
// csrc/vattention/*_cuda.cu as plain C++ (compiled with -DVATT_EMULATE and
// tests/cuda_emulator/include first on the include path) on a machine without a GPU.
//
// Every CUDA thread is a cooperative fiber (ucontext) with its own stack; the
// fibers of one cluster of blocks run round-robin on one OS thread and switch
// only at barriers: __syncthreads, warp collectives (__shfl_*_sync,
// __ballot_sync) and cluster.sync(). Each block gets its own dynamic shared
// memory buffer, so distributed shared memory (map_shared_rank) works. A
// barrier that can never complete (divergent __syncthreads, a lane missing from
// a shuffle) is reported as a deadlock instead of hanging. Device memory is host
// memory. Not emulated: asynchronous copies (cp.async falls back to plain
// copies), memory ordering between threads, timing.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

typedef struct CUstream_st* cudaStream_t;
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct { unsigned x, y, z; } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

namespace emu {

struct Fiber;
unsigned char* dynamic_smem();
void syncthreads();
void cluster_sync();
unsigned cluster_rank();
unsigned cluster_size();
unsigned char* cluster_smem(unsigned rank);
// All lanes of the warp publish `value`; returns the 32 published values.
const uint64_t* warp_exchange(uint64_t value);

// Device properties the emulated runtime reports (tests may change them).
struct DeviceProps {
  int num_sms = 132;
  int major = 9;
  int max_smem_optin = 227 * 1024;
};
DeviceProps& device_props();

// Runs grid x block fibers of `body` (clusters of cluster_x blocks along x).
cudaError_t run(dim3 grid, dim3 block, size_t smem, unsigned cluster_x,
                const std::function<void()>& body);

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 64 bits");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace emu

// The built-in variables: globals that the scheduler sets before it resumes a
// fiber (all fibers run on one OS thread).
extern dim3 threadIdx;
extern dim3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

inline void __syncthreads() { emu::syncthreads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int offset, int width = 32) {
  const unsigned lane = threadIdx.x & 31u;
  const uint64_t* all = emu::warp_exchange(emu::to_bits(v));
  unsigned src = lane ^ unsigned(offset);
  if ((src / unsigned(width)) != (lane / unsigned(width))) src = lane;
  return emu::from_bits<T>(all[src]);
}

template <typename T>
inline T __shfl_up_sync(unsigned /*mask*/, T v, unsigned delta, int width = 32) {
  const unsigned lane = threadIdx.x & 31u;
  const uint64_t* all = emu::warp_exchange(emu::to_bits(v));
  const unsigned seg = lane % unsigned(width);
  const unsigned src = seg >= delta ? lane - delta : lane;
  return emu::from_bits<T>(all[src]);
}

template <typename T>
inline T __shfl_sync(unsigned /*mask*/, T v, int src_lane, int width = 32) {
  const unsigned lane = threadIdx.x & 31u;
  const uint64_t* all = emu::warp_exchange(emu::to_bits(v));
  const unsigned base = lane - lane % unsigned(width);
  return emu::from_bits<T>(all[base + unsigned(src_lane) % unsigned(width)]);
}

inline unsigned __ballot_sync(unsigned /*mask*/, int predicate) {
  const uint64_t* all = emu::warp_exchange(predicate ? 1u : 0u);
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= unsigned(all[i] & 1u) << i;
  return bits;
}

// The lanes whose value equals this lane's.
inline unsigned __match_any_sync(unsigned /*mask*/, unsigned value) {
  const uint64_t* all = emu::warp_exchange(value);
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= unsigned(all[i] == value) << i;
  return bits;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __uint_as_float(unsigned u) { return emu::from_bits<float>(u); }
inline unsigned __float_as_uint(float f) { return unsigned(emu::to_bits(f)); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline size_t __cvta_generic_to_shared(const void*) { return 0; }

// Device-code min/max as the CUDA headers provide them (same-type overloads).
using std::max;
using std::min;

// ---------------------------------------------------------------------------
// Runtime API subset.
// ---------------------------------------------------------------------------

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulator)";
    default: return "emulated error";
  }
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::device_props().num_sms; break;
    case cudaDevAttrComputeCapabilityMajor: *value = emu::device_props().major; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::device_props().max_smem_optin; break;
  }
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int value) {
  return value <= emu::device_props().max_smem_optin ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaGetLastError();
void emu_set_last_error(cudaError_t e);

template <typename... ExpTypes, typename... ActTypes>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(ExpTypes...),
                               ActTypes&&... args) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      cluster = cfg->attrs[i].val.clusterDim.x;
      if (cfg->attrs[i].val.clusterDim.y != 1 || cfg->attrs[i].val.clusterDim.z != 1) {
        return cudaErrorInvalidValue;
      }
    }
  }
  // Arguments are copied once, like kernel parameters, and converted to the
  // kernel's parameter types.
  std::tuple<typename std::decay<ExpTypes>::type...> params(std::forward<ActTypes>(args)...);
  const cudaError_t err = emu::run(cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cluster,
                                   [&]() { std::apply(kernel, params); });
  emu_set_last_error(err);
  return err;
}
