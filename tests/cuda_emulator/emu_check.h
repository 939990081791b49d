// Shared by the emulator test files (test_<stage>.cpp, run by emu_main.cpp): the
// check counters and EXPECT, fp16/bf16 encodings, buffers of one dtype, the q/k/v and
// index-list generators, the comparisons (close, same: NaN where NaN) and the NaN
// cases that sparse attention and the pilot share. Each stage's file defines one
// test_<stage>() declared at the end.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "../../csrc/vattention/attention_params.h"
#include "../../csrc/vattention/common.h"

namespace vattention::emu_check {

// One counter for the whole run, whichever file's checks bump it.
inline int g_failures = 0;
inline int g_checks = 0;
inline bool g_quick = false;

#define EXPECT(cond, ...)                                   \
  do {                                                      \
    ++g_checks;                                             \
    if (!(cond)) {                                          \
      ++g_failures;                                         \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                    \
      std::fprintf(stderr, "\n");                           \
    }                                                       \
  } while (0)

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "FAIL %s returned %s\n", what, cudaGetErrorString(e));
    ++g_failures;
  }
}

// Values exactly representable in fp32, fp16 and bf16: k / 64, |k| <= 255.
inline uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}
inline uint16_t to_half_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const int exp = int((u >> 23) & 0xff);
  if (exp == 0xff) return uint16_t(sign | 0x7c00u | ((u & 0x7fffffu) ? 0x200u : 0u));
  if ((u & 0x7fffffffu) == 0) return sign;
  const int e = exp - 127 + 15;
  if (e <= 0 || e >= 31) {
    std::fprintf(stderr, "value not representable as a normal half\n");
    std::abort();
  }
  return uint16_t(sign | (e << 10) | ((u & 0x7fffffu) >> 13));
}

// A tensor of one element type held as raw bytes.
struct Buffer {
  DType dtype;
  std::vector<unsigned char> bytes;
  size_t elem() const { return dtype == DType::kFloat32 ? 4 : 2; }
  void resize(size_t n) { bytes.assign(n * elem(), 0); }
  void set(size_t i, float f) {
    if (dtype == DType::kFloat32) {
      std::memcpy(&bytes[i * 4], &f, 4);
    } else {
      const uint16_t b = dtype == DType::kBFloat16 ? to_bf16_bits(f) : to_half_bits(f);
      std::memcpy(&bytes[i * 2], &b, 2);
    }
  }
  void* data() { return bytes.data(); }
};

inline float grid_value(std::mt19937& rng, int range = 255) {
  std::uniform_int_distribution<int> d(-range, range);
  return float(d(rng)) / 64.f;
}

inline const char* dtype_name(DType d) {
  return d == DType::kFloat32 ? "f32" : d == DType::kFloat16 ? "f16" : "bf16";
}

// q/k/v and index lists for the pilot, sparse attention, select_scores and the key
// summary.
struct QKV {
  Buffer q, k, v;
  QKVParams params{};
};

// q [B, Hq, D] (head stride D + pad), k/v [B, Hkv, N, D] with row stride D + row_pad.
inline QKV make_qkv(DType dtype, int64_t batch, int64_t q_heads, int64_t kv_heads,
                    int64_t length, int64_t dim, int64_t row_pad, int64_t base_offset,
                    std::mt19937& rng) {
  QKV t{{dtype, {}}, {dtype, {}}, {dtype, {}}, {}};
  const int64_t q_head_stride = dim + 8;
  const int64_t row_stride = dim + row_pad;
  const int64_t head_stride = length * row_stride + 16;
  const int64_t batch_stride = kv_heads * head_stride;
  t.q.resize(size_t(batch * q_heads * q_head_stride));
  t.k.resize(size_t(base_offset + batch * batch_stride));
  t.v.resize(size_t(base_offset + batch * batch_stride));
  for (size_t i = 0; i < t.q.bytes.size() / t.q.elem(); ++i) t.q.set(i, grid_value(rng));
  for (size_t i = 0; i < t.k.bytes.size() / t.k.elem(); ++i) t.k.set(i, grid_value(rng));
  for (size_t i = 0; i < t.v.bytes.size() / t.v.elem(); ++i) t.v.set(i, grid_value(rng));
  QKVParams& p = t.params;
  p.q = t.q.data();
  p.k = t.k.bytes.data() + base_offset * t.k.elem();
  p.v = t.v.bytes.data() + base_offset * t.v.elem();
  p.q_batch_stride = q_heads * q_head_stride;
  p.q_head_stride = q_head_stride;
  p.k_batch_stride = p.v_batch_stride = batch_stride;
  p.k_head_stride = p.v_head_stride = head_stride;
  p.k_row_stride = p.v_row_stride = row_stride;
  p.batch = batch;
  p.q_heads = q_heads;
  p.kv_heads = kv_heads;
  p.length = length;
  p.head_dim = dim;
  p.dtype = dtype;
  p.scale = 1.f / std::sqrt(float(dim));
  return t;
}

struct Lists {
  std::vector<int32_t> indices, counts;
  std::vector<float> log_weights;
  IndexListParams params;
};

inline Lists make_lists(int64_t batch, int64_t list_heads, int64_t max_count, int64_t length,
                        std::mt19937& rng) {
  Lists l;
  l.indices.assign(size_t(batch * list_heads * max_count), 0);
  l.log_weights.assign(l.indices.size(), 0.f);
  l.counts.assign(size_t(batch * list_heads), 0);
  for (int64_t i = 0; i < batch * list_heads; ++i) {
    int32_t c = int32_t(rng() % (max_count + 1));
    if (i == 0) c = 0;
    if (i == batch * list_heads - 1) c = int32_t(max_count);
    l.counts[i] = c;
    for (int64_t j = 0; j < max_count; ++j) {
      const size_t at = size_t(i * max_count + j);
      if (j >= c) {  // garbage beyond the count: must not be read
        l.indices[at] = int32_t(length + 1000);
        l.log_weights[at] = std::nanf("");
        continue;
      }
      const int kind = int(rng() % 20);
      l.indices[at] = kind == 0 ? -1 : kind == 1 ? int32_t(length + 3) : int32_t(rng() % length);
      l.log_weights[at] = kind == 2 ? -INFINITY : float(int(rng() % 200) - 100) / 100.f;
    }
  }
  l.params.indices = l.indices.data();
  l.params.log_weights = l.log_weights.data();
  l.params.counts = l.counts.data();
  l.params.list_heads = list_heads;
  l.params.max_count = max_count;
  return l;
}

inline bool close(float a, float b, float atol, float rtol) {
  if (std::isinf(a) || std::isinf(b)) return a == b;
  if (std::isnan(a) || std::isnan(b)) return false;
  return std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

// ---------------------------------------------------------------------------
// NaN propagation (online_softmax.h): a NaN in q, in a K row or in a V row that a
// head reads reaches that head's outputs, through every split count and the
// merges; a NaN in a row no list names changes nothing. The emulated kernels
// must agree with the CPU kernels element for element (NaN where NaN) and both
// with that rule. The cases are in test_sparse_attention.cpp, test_pilot.cpp and
// (the merge alone) test_combine.cpp.
// ---------------------------------------------------------------------------

// NaN in the same places, else within tolerance.
inline bool same(float a, float b, float atol, float rtol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return close(a, b, atol, rtol);
}

enum class NanAt { kQuery, kKeyRow, kValueRow, kUnlistedRow };

inline const char* nan_at_name(NanAt at) {
  return at == NanAt::kQuery ? "q" : at == NanAt::kKeyRow ? "k-row" : at == NanAt::kValueRow
                                                                      ? "v-row" : "unlisted-row";
}

struct NanCase {
  QKV t;
  Lists l;
  int64_t batch, q_heads, kv_heads, dim, length;
  std::vector<bool> reads;  // per (b, query head): whether it reads the poisoned row / q
  int64_t nan_dim;          // the poisoned element of the row (or of q)
};

// Lists of distinct valid rows (row length - 1 is never listed), finite weights;
// one NaN placed per `at`, in batch 1 (batch 0 stays clean throughout).
inline NanCase make_nan_case(DType dtype, int64_t dim, int64_t group, bool per_q,
                             int64_t count, NanAt at, uint32_t seed) {
  std::mt19937 rng(seed);
  NanCase c;
  c.batch = 2;
  c.kv_heads = 2;
  c.q_heads = c.kv_heads * group;
  c.dim = dim;
  c.length = count + 40;
  c.t = make_qkv(dtype, c.batch, c.q_heads, c.kv_heads, c.length, dim, 0, 0, rng);
  const int64_t list_heads = per_q ? c.q_heads : c.kv_heads;
  c.l = make_lists(c.batch, list_heads, count, c.length, rng);
  std::vector<int32_t> rows(size_t(c.length - 1));
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = int32_t(i);
  for (int64_t i = 0; i < c.batch * list_heads; ++i) {
    std::shuffle(rows.begin(), rows.end(), rng);
    c.l.counts[i] = int32_t(count);
    for (int64_t j = 0; j < count; ++j) {
      c.l.indices[i * count + j] = rows[j];
      c.l.log_weights[i * count + j] = float(int(rng() % 200) - 100) / 100.f;
    }
  }
  const QKVParams& q = c.t.params;
  const int64_t b = 1, kv_head = 1, group_size = group;
  c.nan_dim = int64_t(rng() % uint64_t(dim));
  c.reads.assign(size_t(c.batch * c.q_heads), false);
  const float nan = std::nanf("");
  if (at == NanAt::kQuery) {
    const int64_t h = c.q_heads - 1;
    c.t.q.set(size_t(b * q.q_batch_stride + h * q.q_head_stride + c.nan_dim), nan);
    c.reads[b * c.q_heads + h] = true;
    return c;
  }
  // The poisoned row: the first entry of list (b, first list of kv_head 1), or
  // the never-listed last row.
  const int64_t list0 = b * list_heads + (per_q ? kv_head * group_size : kv_head);
  const int32_t row =
      at == NanAt::kUnlistedRow ? int32_t(c.length - 1) : c.l.indices[list0 * count];
  const size_t at_elem = size_t(b * q.k_batch_stride + kv_head * q.k_head_stride +
                                int64_t(row) * q.k_row_stride + c.nan_dim);
  (at == NanAt::kKeyRow ? c.t.k : c.t.v).set(at_elem, nan);
  if (at == NanAt::kUnlistedRow) return c;
  for (int64_t h = kv_head * group_size; h < (kv_head + 1) * group_size; ++h) {
    const int64_t list = b * list_heads + (per_q ? h : kv_head);
    for (int64_t j = 0; j < count; ++j) {
      if (c.l.indices[list * count + j] == row) c.reads[b * c.q_heads + h] = true;
    }
  }
  return c;
}

// One per stage, in test_<stage>.cpp; emu_main.cpp runs them in decode order.
void test_plan();
void test_key_summary();
void test_select_scores();
void test_select_topk();
void test_pilot();
void test_budget();
void test_sample();
void test_sparse_attention();
void test_combine();
void test_paged();
void test_launch_count();  // not a stage: the default decode step's kernels

}  // namespace vattention::emu_check
