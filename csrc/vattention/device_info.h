// The one cache of per-device facts (SM count, compute capability, opt-in shared
// memory), shared by the CUDA launchers (cuda_utils.cuh) and the torch binding
// (ops_cuda.cpp). Host-only and torch-free: it needs only the CUDA runtime API.
//
// Each device is queried once: the attribute calls are cheap but not free, and a
// decode step launches a dozen kernels. cudaDeviceGetAttribute touches no stream,
// so a first query during CUDA-graph capture is legal too.
//
// Under the CPU emulator (VATT_EMULATE) nothing is cached: the emulator's tests
// change the reported device (no clusters, less shared memory) between cases,
// and a cached answer would silently test the first device's path again.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <mutex>

namespace vattention {

struct DeviceInfo {
  int device = 0;
  int num_sms = 1;
  int major = 0;
  int max_smem_optin = 48 * 1024;
};

// Devices with an ordinal below this are cached; others are queried every time
// (correct, just slower). No machine we target has more.
constexpr int kMaxDevices = 64;

namespace device_info_detail {

inline cudaError_t query(int device, DeviceInfo* out) {
  DeviceInfo d;
  d.device = device;
  cudaError_t err = cudaDeviceGetAttribute(&d.num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  *out = d;
  return cudaSuccess;
}

}  // namespace device_info_detail

// Facts of device `device` (an ordinal, not necessarily the current device).
inline cudaError_t device_info(int device, DeviceInfo* info) {
#if defined(VATT_EMULATE)
  return device_info_detail::query(device, info);
#else
  // Inline-function statics: one cache per process, whichever translation unit asks.
  static DeviceInfo cache[kMaxDevices];
  static std::atomic<bool> ready[kMaxDevices];
  static std::mutex mutex;
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable && ready[device].load(std::memory_order_acquire)) {
    *info = cache[device];
    return cudaSuccess;
  }
  DeviceInfo d;
  const cudaError_t err = device_info_detail::query(device, &d);
  if (err != cudaSuccess) return err;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(mutex);
    cache[device] = d;
    ready[device].store(true, std::memory_order_release);
  }
  *info = d;
  return cudaSuccess;
#endif
}

// Facts of the calling thread's current device (what a kernel launch would use).
inline cudaError_t current_device_info(DeviceInfo* info) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return device_info(device, info);
}

}  // namespace vattention
