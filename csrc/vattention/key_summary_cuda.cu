// CUDA build / update of the int4 key summary (key_summary.h): the bytes of
// summarize_keys_cpu, bit for bit.
//
// One kernel, for any head dim that is a multiple of 32 (the shuffles never leave a
// 32-channel group, so D is a runtime value). A token row (b, KV head, r) of D
// channels is summarised by D / 8 lanes, each owning 8 consecutive channels (one
// 16-byte load of a 16-bit row, two of an fp32 one); the 4 lanes of a group, 4
// consecutive lanes of a warp, reduce its min and max with two shuffles, the group's first lane writes (z, s) and every lane writes its 4
// code bytes. Rows are spread over a grid-stride loop in 64-bit offsets; rows whose
// position falls outside the summary are read by nobody. row_begin stays on the
// device (no host sync), so an update can be captured in a CUDA graph. A paged
// summary (summary.paging) puts position pos of batch row b in block
// block_table[b][pos / block_size], slot pos % block_size (kv_gather_cuda.cuh's
// paged_row); k is always the contiguous new rows.
//
// Bit exactness with the CPU kernel, under --use_fast_math:
// - the CPU keeps the first of equal values (v < lo ? v : lo), which matters only
//   for -0.0 against +0.0; the reduction keeps the lower-channel operand of a tie,
//   and compares orderable keys (integer order = IEEE order, subnormals included:
//   a float compare would be flushed to zero by -ftz);
// - NaN is tracked as a flag (fminf / fmaxf would drop it), and a NaN group gets
//   the CPU's quiet NaN for both min and max;
// - the subtractions and divisions are PTX sub.rn.f32 / div.rn.f32 without .ftz
//   (asm, so neither -ftz nor -prec-div=false can touch them), rounding to integer
//   is cvt.rni, and fp16 rounding is common.h's integer to_half_rn;
// - hi - z of two equal infinities is an invalid operation: the GPU returns its
//   canonical NaN (sign clear), x86 its default NaN (sign set), which to_half_rn
//   keeps; the CPU build's bytes are the reference, so that case is written
//   explicitly with the sign set.
#include "dispatch.h"
#include "cuda_utils.cuh"
#include "key_summary.h"
#include "kv_gather_cuda.cuh"

namespace vattention {
namespace {

using namespace cuda_detail;

constexpr int kLaneChannels = 8;                                   // channels per lane
constexpr int kGroupLanes = kSummaryGroup / kLaneChannels;         // lanes per group (4)
constexpr int kThreads = 256;

static_assert(kGroupLanes == 4, "two shuffle steps per group");

__device__ __forceinline__ float ieee_sub(float a, float b) {
#if defined(VATT_EMULATE)
  return a - b;
#else
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#endif
}

__device__ __forceinline__ float ieee_div(float a, float b) {
#if defined(VATT_EMULATE)
  return a / b;
#else
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#endif
}

__device__ __forceinline__ float round_even(float x) {
#if defined(VATT_EMULATE)
  return std::nearbyint(x);
#else
  float r;
  asm("cvt.rni.f32.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

__device__ __forceinline__ bool nan_bits(float x) {
  return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u;
}

// b replaces a only when strictly smaller (a holds the lower channels): a tie
// (+0 / -0) keeps a, as the CPU's sequential scan does. Non-NaN operands.
__device__ __forceinline__ float first_min(float a, float b) {
  return orderable_key(b) < orderable_key(a) ? b : a;
}
__device__ __forceinline__ float first_max(float a, float b) {
  return orderable_key(b) > orderable_key(a) ? b : a;
}

// This lane's 8 channels of a k row as floats.
template <typename T>
__device__ __forceinline__ void load_channels(const T* row, bool aligned, float (&x)[kLaneChannels]) {
  if (aligned) {
    constexpr int kVec = 16 / int(sizeof(T));
#pragma unroll
    for (int v = 0; v < kLaneChannels / kVec; ++v) {
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(row) + v);
      Vec16<T>::to_float(w, x + v * kVec);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kLaneChannels; ++e) x[e] = load_float(row + e);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
summarize_keys_kernel(const SummarizeKeysParams p, const bool k_aligned, const bool out_aligned) {
  const QKVParams& qkv = p.qkv;
  const int64_t kRowLanes = qkv.head_dim / kLaneChannels;  // a multiple of 4: whole groups
  const KeySummaryParams& s = p.summary;
  const int64_t total = qkv.batch * qkv.kv_heads * p.rows * kRowLanes;
  const int lane32 = int(threadIdx.x) % 32;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  // The loop bound is tested on the warp's first lane: every lane takes part in
  // the shuffles, those past the end with dummy values and no stores.
  for (int64_t warp_base = int64_t(blockIdx.x) * kThreads + (threadIdx.x - lane32);
       warp_base < total; warp_base += stride) {
    const int64_t id = warp_base + lane32;
    const int64_t item = id / kRowLanes;
    const int lane = int(id - item * kRowLanes);
    const int64_t r = item % p.rows;
    const int64_t list = item / p.rows;
    const int64_t b = list / qkv.kv_heads;
    const int64_t h = list - b * qkv.kv_heads;
    bool active = id < total;
    int64_t pos = 0;
    if (active) {
      pos = __ldg(p.row_begin + b) + r;
      active = pos >= 0 && pos < p.summary_length;
    }
    float x[kLaneChannels];
    if (active) {
      const T* row = static_cast<const T*>(qkv.k) + b * qkv.k_batch_stride +
                     h * qkv.k_head_stride + r * qkv.k_row_stride + lane * kLaneChannels;
      load_channels<T>(row, k_aligned, x);
    } else {
#pragma unroll
      for (int e = 0; e < kLaneChannels; ++e) x[e] = 0.f;
    }
    bool nan = false;
    float lo = x[0], hi = x[0];
#pragma unroll
    for (int e = 0; e < kLaneChannels; ++e) {
      nan = nan || nan_bits(x[e]);
      if (e > 0) {
        lo = first_min(lo, x[e]);
        hi = first_max(hi, x[e]);
      }
    }
    // Groups of 4 lanes in channel order: the partner of lane l at offset o holds
    // the lower channels when l & o is set.
#pragma unroll
    for (int o = 1; o < kGroupLanes; o *= 2) {
      const float other_lo = __shfl_xor_sync(kFullMask, lo, o);
      const float other_hi = __shfl_xor_sync(kFullMask, hi, o);
      const bool other_nan = __shfl_xor_sync(kFullMask, int(nan), o) != 0;
      const bool partner_lower = (lane32 & o) != 0;
      lo = partner_lower ? first_min(other_lo, lo) : first_min(lo, other_lo);
      hi = partner_lower ? first_max(other_hi, hi) : first_max(hi, other_hi);
      nan = nan || other_nan;
    }
    if (!active) continue;  // after the shuffles; no barrier below

    half_t z, st;
    if (nan) {
      z = st = to_half_rn(bits_to_float(0x7fc00000u));  // the CPU's quiet_NaN()
    } else {
      z = to_half_rn(lo);
      const float diff = ieee_sub(hi, to_float(z));
      st = nan_bits(diff) ? half_t{0xfe00u}  // inf - inf: x86's default NaN, sign set
                          : to_half_rn(ieee_div(diff, float(kSummaryLevels)));
    }
    const float zf = to_float(z), sf = to_float(st);
    uint32_t word = 0;  // channel e in bits [4e, 4e + 4)
    if ((st.bits & 0x7fffu) != 0) {  // sf != 0 (either zero)
#pragma unroll
      for (int e = 0; e < kLaneChannels; ++e) {
        const float level = round_even(ieee_div(ieee_sub(x[e], zf), sf));
        uint32_t code = 0;
        // NaN (a NaN group, or inf / inf) gives code 0: z or s already carries it.
        if (!nan_bits(level) && level > 0.f) {
          code = level >= float(kSummaryLevels) ? uint32_t(kSummaryLevels) : uint32_t(level);
        }
        word |= code << (4 * e);
      }
    }
    int64_t outer = b, slot = pos;
    if (s.paging.paged()) {
      const PagedRow pr =
          paged_row(s.paging.block_table + b * s.paging.block_table_stride, s.paging.block_size, pos);
      outer = pr.block;
      slot = pr.slot;
    }
    uint8_t* codes = s.codes + outer * s.codes_batch_stride + h * s.codes_head_stride +
                     slot * s.codes_row_stride + lane * (kLaneChannels / 2);
    half_t* params = s.params + outer * s.params_batch_stride + h * s.params_head_stride +
                     slot * s.params_row_stride + 2 * (lane / kGroupLanes);
    if (out_aligned) {
      *reinterpret_cast<uint32_t*>(codes) = word;
      if (lane % kGroupLanes == 0) {
        *reinterpret_cast<uint32_t*>(params) = uint32_t(z.bits) | (uint32_t(st.bits) << 16);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kLaneChannels / 2; ++j) codes[j] = uint8_t(word >> (8 * j));
      if (lane % kGroupLanes == 0) {
        params[0] = z;
        params[1] = st;
      }
    }
  }
}

bool aligned_to(const void* ptr, int64_t unit) {
  return (reinterpret_cast<uintptr_t>(ptr) % uintptr_t(unit)) == 0;
}

// stride (in bytes) keeps `unit` alignment, or the dimension has one entry.
bool stride_ok(int64_t stride_bytes, int64_t extent, int64_t unit) {
  return extent <= 1 || stride_bytes % unit == 0;
}

}  // namespace

cudaError_t summarize_keys_cuda(const SummarizeKeysParams& p, cudaStream_t stream) {
  const QKVParams& qkv = p.qkv;
  const int64_t items = qkv.batch * qkv.kv_heads * p.rows;
  if (items <= 0 || p.summary_length <= 0) return cudaSuccess;
  if (qkv.head_dim <= 0 || qkv.head_dim % kSummaryGroup != 0) return cudaErrorInvalidValue;
  const KeySummaryParams& s = p.summary;
  if (!paging_supported(s.paging, p.summary_length)) return cudaErrorInvalidValue;
  const int64_t elem = qkv.dtype == DType::kFloat32 ? 4 : 2;
  // Paged: dim 0 of the summary counts blocks (any number of them), dim 2 slots.
  const int64_t outer = s.paging.paged() ? 2 : qkv.batch;
  const int64_t slots = s.paging.paged() ? s.paging.block_size : p.summary_length;
  // 16-byte loads of each lane's 8 channels; 4-byte code and (z, s) stores.
  const bool k_aligned = aligned_to(qkv.k, 16) && stride_ok(qkv.k_batch_stride * elem, qkv.batch, 16) &&
                         stride_ok(qkv.k_head_stride * elem, qkv.kv_heads, 16) &&
                         stride_ok(qkv.k_row_stride * elem, p.rows, 16);
  const bool out_aligned =
      aligned_to(s.codes, 4) && aligned_to(s.params, 4) &&
      stride_ok(s.codes_batch_stride, outer, 4) && stride_ok(s.codes_head_stride, qkv.kv_heads, 4) &&
      stride_ok(s.codes_row_stride, slots, 4) && stride_ok(s.params_batch_stride * 2, outer, 4) &&
      stride_ok(s.params_head_stride * 2, qkv.kv_heads, 4) &&
      stride_ok(s.params_row_stride * 2, slots, 4);
  DeviceInfo info;
  cudaError_t err = current_device_info(&info);
  if (err != cudaSuccess) return err;
  const int64_t lanes = items * (qkv.head_dim / kLaneChannels);
  const int64_t blocks =
      std::clamp<int64_t>(ceil_div(lanes, kThreads), 1, 16 * int64_t(std::max(info.num_sms, 1)));
  return dispatch_dtype(qkv.dtype, [&](auto tag) {
    return launch_kernel(summarize_keys_kernel<decltype(tag)>, dim3(unsigned(blocks)),
                         dim3(kThreads), 0, stream, 1, p, k_aligned, out_aligned);
  });
}

}  // namespace vattention
