// Compile-time dispatch of the kernel library, in one place: element type, head
// dim and heads per block. Each value listed here is a full set of kernel
// instantiations (build time and binary size), so the lists hold only what the
// project runs: fp32/fp16/bf16, head dims 64/128/256, 1/4/8 query heads per block.
//
// Torch-free and host-only: the CPU kernels use dispatch_dtype, the CUDA
// launchers all three. ops_cuda.cpp checks head dims against kCudaHeadDims and
// python reads the same list as vattention._C.cuda_head_dims.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.h"

namespace vattention {

// The head dims the CUDA kernels are instantiated for (the CPU kernels take any).
constexpr int kCudaHeadDims[] = {64, 128, 256};
constexpr int kNumCudaHeadDims = sizeof(kCudaHeadDims) / sizeof(kCudaHeadDims[0]);

constexpr bool is_cuda_head_dim(int64_t dim) {
  for (int i = 0; i < kNumCudaHeadDims; ++i) {
    if (kCudaHeadDims[i] == dim) return true;
  }
  return false;
}

template <int D>
using HeadDim = std::integral_constant<int, D>;

// Calls fn(T{}) with T the storage type of dtype (float, half_t or bfloat16_t).
template <typename Fn>
decltype(auto) dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16: return fn(half_t{});
    case DType::kBFloat16: return fn(bfloat16_t{});
    case DType::kFloat32: break;
  }
  return fn(float{});
}

// Calls fn(HeadDim<D>{}) for a dim of kCudaHeadDims; returns `unsupported` otherwise.
template <typename R, typename Fn>
R dispatch_head_dim(int64_t dim, R unsupported, Fn&& fn) {
  static_assert(kNumCudaHeadDims == 3, "keep the cases below in step with kCudaHeadDims");
  switch (dim) {
    case 64: return fn(HeadDim<64>{});
    case 128: return fn(HeadDim<128>{});
    case 256: return fn(HeadDim<256>{});
    default: return unsupported;
  }
}

// Query heads one gather block serves (HB). A list shared by a GQA group is
// read once for every head of the group, so HB should cover the group: 1 for
// per-head lists (or no GQA), 4 for groups of up to 4 (Llama-3 8B/70B, Gemma),
// otherwise 8 with wider groups spread over ceil(group / 8) head chunks. More
// than 8 heads per block would spill the per-head accumulators out of registers.
constexpr int heads_per_block(int64_t group, bool per_head_lists) {
  return (per_head_lists || group <= 1) ? 1 : (group <= 4 ? 4 : 8);
}

template <int HB>
using HeadsPerBlock = std::integral_constant<int, HB>;

// Calls fn(HeadsPerBlock<HB>{}) for HB in {1, 4, 8}; returns `unsupported` otherwise.
template <typename R, typename Fn>
R dispatch_heads_per_block(int hb, R unsupported, Fn&& fn) {
  switch (hb) {
    case 1: return fn(HeadsPerBlock<1>{});
    case 4: return fn(HeadsPerBlock<4>{});
    case 8: return fn(HeadsPerBlock<8>{});
    default: return unsupported;
  }
}

}  // namespace vattention
