// Shared definitions of the torch-free kernel library: element types, the
// host/device qualifier and small helpers used by every pipeline stage.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define VATT_HD __host__ __device__ __forceinline__
#else
#define VATT_HD inline
#endif

namespace vattention {

// Element type of q/k/v (and of top-k scores). The glue maps torch dtypes here.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Storage-only 16-bit types, bit-compatible with at::Half / at::BFloat16 and
// with CUDA's __half / __nv_bfloat16, so kernels see raw memory either way.
struct half_t { uint16_t bits; };
struct bfloat16_t { uint16_t bits; };

VATT_HD float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

VATT_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

VATT_HD float to_float(float x) { return x; }

VATT_HD float to_float(bfloat16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }

VATT_HD float to_float(half_t x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_float(sign);
  // Subnormal half: renormalise into a float exponent.
  int e = -1;
  do {
    ++e;
    mantissa <<= 1;
  } while ((mantissa & 0x400u) == 0);
  return bits_to_float(sign | (uint32_t(112 - e) << 23) | ((mantissa & 0x3ffu) << 13));
}

// float -> fp16, round to nearest even, bit exact on host and device: the key
// summary's CPU and CUDA builds must write identical bytes, and integer ops on the
// bits are immune to --use_fast_math and to the host's rounding mode. NaN keeps its
// sign and becomes the quiet NaN 0x7e00 (as torch's conversion writes it); overflow
// gives inf; results below the normal range round to a subnormal or to zero.
VATT_HD half_t to_half_rn(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u)};      // NaN
  if (mag >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};     // >= 65520: inf
  if (mag >= 0x38800000u) {                                            // normal half
    const uint32_t base = mag - 0x38000000u;                           // rebias 127 -> 15
    return half_t{uint16_t(sign | ((base + 0xfffu + ((base >> 13) & 1u)) >> 13))};
  }
  if (mag <= 0x33000000u) return half_t{sign};                         // <= 2^-25: zero
  // Subnormal half: value / 2^-24 = m * 2^(e - 126), m with its implicit bit.
  const uint32_t m = (mag & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - (mag >> 23);                           // 14..24
  const uint32_t rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
  uint32_t h = m >> shift;
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;              // 0x400: min normal
  return half_t{uint16_t(sign | h)};
}

// Maps a float to an unsigned key whose integer order is the float order, with
// every NaN (either sign, any payload) above every number and equal to every other
// NaN, as torch.topk ranks them: a token with a NaN score is selected first, so
// the NaN reaches the output instead of being dropped. -0.0 and +0.0 get the same
// key (a tie, not an order). Only integer operations on the bits: a float compare
// would flush subnormals to zero under --use_fast_math on the GPU (x == 0.f is
// true for a subnormal there) and the GPU would then tie scores the CPU orders.
// Numbers map into [0x007fffff (-inf), 0xff800000 (+inf)], NaN to 0xffffffff;
// key 0 is never produced, so kernels may use it for "no candidate".
VATT_HD uint32_t orderable_key(float x) {
  uint32_t u = float_to_bits(x);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return 0xffffffffu;  // NaN
  if (magnitude == 0u) u = 0u;                       // -0.0 -> +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

VATT_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace vattention
