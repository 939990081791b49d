// Runs the CUDA kernels of csrc/vattention/*_cuda.cu under the CPU emulator
// (emu_runtime.h) and compares them with the CPU kernels: exact equality for
// select_topk and sample_residual, tolerances for pilot statistics, sparse-attention
// partials and combine, and the NaN rule of online_softmax.h (a NaN in q or in a
// K/V row a head reads reaches that head's outputs through every split count and
// merge, NaN where the CPU kernels have NaN), the int4 key summary byte for byte and
// the scores read from it within a bound on fp32 summation error. Built by CMake as
// `vattention_emu_test` (ctest name emu_kernels); needs no GPU.
//
//   vattention_emu_test [--quick]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/vattention/combine.h"
#include "../../csrc/vattention/key_summary.h"
#include "../../csrc/vattention/pilot.h"
#include "../../csrc/vattention/sample.h"
#include "../../csrc/vattention/select_scores.h"
#include "../../csrc/vattention/select_topk.h"
#include "../../csrc/vattention/sparse_attention.h"

using namespace vattention;

namespace {

int g_failures = 0;
int g_checks = 0;
bool g_quick = false;

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

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "FAIL %s returned %s\n", what, cudaGetErrorString(e));
    ++g_failures;
  }
}

// Values exactly representable in fp32, fp16 and bf16: k / 64, |k| <= 255.
uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}
uint16_t to_half_bits(float f) {
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

float grid_value(std::mt19937& rng, int range = 255) {
  std::uniform_int_distribution<int> d(-range, range);
  return float(d(rng)) / 64.f;
}

const char* dtype_name(DType d) {
  return d == DType::kFloat32 ? "f32" : d == DType::kFloat16 ? "f16" : "bf16";
}

// ---------------------------------------------------------------------------
// select_topk
// ---------------------------------------------------------------------------

void test_select_topk_case(DType dtype, int64_t rows, int64_t length, int64_t k_max, int value_range,
                    bool specials, uint32_t seed, const char* label) {
  std::mt19937 rng(seed);
  Buffer scores{dtype, {}};
  const int64_t stride = length + 3;  // strided rows
  scores.resize(size_t(rows * stride));
  const float nan = std::nanf(""), inf = INFINITY;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < stride; ++i) {
      float v = grid_value(rng, value_range);
      if (specials) {
        const int c = int(rng() % 40);
        if (c == 0) v = nan;
        if (c == 1) v = inf;
        if (c == 2) v = -inf;
        if (c == 3) v = 0.f;
        if (c == 4) v = -0.f;
      }
      scores.set(size_t(r * stride + i), v);
    }
  }
  std::vector<int32_t> starts(rows), ends(rows), ks(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int kind = int(r % 6);
    if (kind == 0) {
      starts[r] = 0;
      ends[r] = int32_t(length);
    } else if (kind == 1) {
      starts[r] = 0;
      ends[r] = int32_t(length + 50);  // clipped
    } else if (kind == 2) {
      starts[r] = int32_t(rng() % (length + 1));
      ends[r] = starts[r] + int32_t(rng() % (length + 1));
    } else if (kind == 3) {
      starts[r] = int32_t(length);
      ends[r] = int32_t(length + 3);  // empty after clipping
    } else {
      starts[r] = int32_t(rng() % (length / 2 + 1));
      ends[r] = int32_t(length - rng() % (length / 2 + 1));
    }
    const int kk = int(rng() % 5);
    ks[r] = kk == 0 ? 0 : kk == 1 ? int32_t(k_max) : kk == 2 ? int32_t(k_max + 7)
                                                    : int32_t(rng() % (k_max + 1));
    if (r % 7 == 6) ks[r] = -3;
  }
  SelectTopkParams p{};
  p.scores = scores.data();
  p.score_row_stride = stride;
  p.starts = starts.data();
  p.ends = ends.data();
  p.ks = ks.data();
  p.rows = rows;
  p.length = length;
  p.k_max = k_max;
  p.dtype = dtype;
  std::vector<int32_t> ref(size_t(rows * k_max), 12345), got(size_t(rows * k_max), 12345);
  p.indices = ref.data();
  select_topk_cpu(p, 0, rows);
  p.indices = got.data();
  check_cuda(select_topk_cuda(p, nullptr, nullptr), "select_topk_cuda");
  int64_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) bad += ref[i] != got[i];
  EXPECT(bad == 0, "select_topk %s %s rows=%lld length=%lld k_max=%lld: %lld mismatches", label,
         dtype_name(dtype), (long long)rows, (long long)length, (long long)k_max, (long long)bad);
  if (bad) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < k_max; ++j) {
        if (ref[r * k_max + j] != got[r * k_max + j]) {
          std::fprintf(stderr, "  row %lld (start %d end %d k %d) slot %lld: cpu %d cuda %d\n",
                       (long long)r, starts[r], ends[r], ks[r], (long long)j, ref[r * k_max + j],
                       got[r * k_max + j]);
          break;
        }
      }
    }
  }
}

// Small k (k_max <= 256): the warp-select path. Every queue length (32, 64, 128,
// 256), cluster sizes 1..8 and the one-block fallback; per row a window kind, a
// k kind and a fill (ties, NaN, infinities, +-0, monotone runs that defeat the
// queue's threshold, all-NaN rows).
void run_topk_compare(SelectTopkParams p, const char* label, const std::vector<int32_t>& starts,
                      const std::vector<int32_t>& ends, const std::vector<int32_t>& ks) {
  std::vector<int32_t> ref(size_t(p.rows * p.k_max), 12345), got(size_t(p.rows * p.k_max), 12345);
  p.indices = ref.data();
  select_topk_cpu(p, 0, p.rows);
  p.indices = got.data();
  EXPECT(select_topk_cuda_workspace_bytes(p) == 0, "select_topk %s: unexpected workspace", label);
  check_cuda(select_topk_cuda(p, nullptr, nullptr), "select_topk_cuda");
  int64_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) bad += ref[i] != got[i];
  EXPECT(bad == 0, "select_topk %s %s rows=%lld length=%lld k_max=%lld: %lld mismatches", label,
         dtype_name(p.dtype), (long long)p.rows, (long long)p.length, (long long)p.k_max,
         (long long)bad);
  if (bad == 0) return;
  int shown = 0;
  for (int64_t r = 0; r < p.rows && shown < 4; ++r) {
    for (int64_t j = 0; j < p.k_max; ++j) {
      if (ref[r * p.k_max + j] != got[r * p.k_max + j]) {
        std::fprintf(stderr, "  row %lld (start %d end %d k %d) slot %lld: cpu %d cuda %d\n",
                     (long long)r, starts[r], ends[r], ks[r], (long long)j, ref[r * p.k_max + j],
                     got[r * p.k_max + j]);
        ++shown;
        break;
      }
    }
  }
}

void test_select_topk_small_k_case(DType dtype, int64_t rows, int64_t length, int64_t k_max,
                            uint32_t seed, const char* label) {
  std::mt19937 rng(seed);
  Buffer scores{dtype, {}};
  const int64_t stride = length + 5;  // strided rows
  scores.resize(size_t(rows * stride));
  const float nan = std::nanf(""), inf = INFINITY;
  std::vector<int32_t> starts(rows), ends(rows), ks(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int window = int(rng() % 7);
    int64_t s = 0, e = length;
    if (window == 1) e = length + 9;  // clipped
    if (window == 2) {
      s = int64_t(rng() % (length + 1));
      e = s + int64_t(rng() % (length + 1));
    }
    if (window == 3) {  // a window of about k
      s = int64_t(rng() % (length + 1));
      e = s + k_max - 1 + int64_t(rng() % 3);
    }
    if (window == 4) s = e = int64_t(rng() % (length + 1));  // empty
    if (window == 5) {
      s = int64_t(rng() % (length / 3 + 1));
      e = length - int64_t(rng() % (length / 3 + 1));
    }
    if (window == 6) s = -4;  // negative start: clamped to 0
    starts[r] = int32_t(s);
    ends[r] = int32_t(e);
    const int kk = int(rng() % 6);
    ks[r] = kk == 0   ? int32_t(k_max)
            : kk == 1 ? int32_t(k_max + 3)                          // > k_max
            : kk == 2 ? int32_t(std::max<int64_t>(e - s, 0) + 2)    // > window
            : kk == 3 ? int32_t(1 + rng() % k_max)
            : kk == 4 ? int32_t(rng() % 2 == 0 ? 0 : -2)
                      : int32_t(k_max);

    const int fill = int((r + seed) % 10);
    const int64_t s0 = std::max<int64_t>(s, 0);
    for (int64_t i = 0; i < stride; ++i) {
      float v = 0.f;
      switch (fill) {
        case 0: v = grid_value(rng); break;                          // distinct-ish
        case 1: v = grid_value(rng, 2); break;                       // heavy ties
        case 2: v = 1.5f; break;                                     // all equal
        case 3: v = float((i % 509) - 254) / 64.f; break;            // ascending runs
        case 4: v = float(254 - (i % 509)) / 64.f; break;            // descending runs
        case 5: v = nan; break;                                      // all NaN
        case 6:  // rising with noise and rare spikes: a stream of queue candidates
          v = float(i) / 64.f + grid_value(rng, 64) +
              (rng() % 64 == 0 ? 4096.f + float(rng() % 4096) : 0.f);
          break;
        case 7:  // the best scores all in the part of each 1024-score tile that warp 0
                 // streams (white box: one warp's queue and threshold decide the row)
          v = (i - s0) % 1024 >= 0 && (i - s0) % 1024 < 128 ? 100.f + float(rng() % 60000) / 64.f
                                                             : grid_value(rng);
          break;
        default: {  // specials
          const int c = int(rng() % 12);
          v = c == 0 ? nan : c == 1 ? inf : c == 2 ? -inf : c == 3 ? 0.f : c == 4 ? -0.f
                                                                              : grid_value(rng, 8);
        }
      }
      scores.set(size_t(r * stride + i), v);
    }
  }
  SelectTopkParams p{};
  p.scores = scores.data();
  p.score_row_stride = stride;
  p.starts = starts.data();
  p.ends = ends.data();
  p.ks = ks.data();
  p.rows = rows;
  p.length = length;
  p.k_max = k_max;
  p.dtype = dtype;
  run_topk_compare(p, label, starts, ends, ks);
}

// Directed rows for the warp queue (white box: 256-thread blocks streaming tiles
// of 1024 scores, warp 0 taking positions [0, 128) of each tile as 4 runs of 32,
// 8 pending slots per lane, a flush once a lane holds more than 4). Row 0: after
// the first flush (tiles 0 and 1 fill warp 0 with 1000 - j), a score between the
// queue's (k-1)-th and k-th best arrives: it must be taken (the threshold is the
// k-th best, not better). Row 1: a lane holds 1 then 5 pending candidates, the
// first being the row's best; it must survive the next tile's 4 candidates.
void test_select_topk_small_k_directed(int64_t k) {
  const int64_t length = 6000, rows = 2;
  Buffer scores{DType::kFloat32, {}};
  scores.resize(size_t(rows * length));
  std::mt19937 rng{uint32_t(k)};
  for (int64_t i = 0; i < rows * length; ++i) scores.set(size_t(i), -100.f + grid_value(rng));
  for (int64_t t = 0; t < 2; ++t) {
    for (int64_t j = 0; j < 128; ++j) {
      const int64_t pos = t * 1024 + j, rank = t * 128 + j;
      scores.set(size_t(pos), 1000.f - float(rank));
      scores.set(size_t(length + pos), 500.f + 0.25f * float(rank));
    }
  }
  scores.set(2048, 1000.f - float(k - 1) + 0.5f);
  scores.set(size_t(length + 2048), 5000.f);
  for (int64_t t = 3; t < 5; ++t) {
    for (int64_t u = 0; u < 4; ++u) {
      scores.set(size_t(length + t * 1024 + u * 32), 600.f + float(t * 4 + u));
    }
  }
  std::vector<int32_t> starts(rows, 0), ends(rows, int32_t(length)), ks(rows, int32_t(k));
  SelectTopkParams p{};
  p.scores = scores.data();
  p.score_row_stride = length;
  p.starts = starts.data();
  p.ends = ends.data();
  p.ks = ks.data();
  p.rows = rows;
  p.length = length;
  p.k_max = k;
  p.dtype = DType::kFloat32;
  emu::device_props().major = 8;  // no clusters: one block per row
  run_topk_compare(p, "small-k-directed", starts, ends, ks);
  emu::device_props().major = 9;
}

void test_select_topk_small_k() {
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const int64_t kmaxes[] = {1, 7, 32, 100, 256};
  uint32_t seed = 500;
  for (int64_t k : kmaxes) test_select_topk_small_k_directed(k);
  // Short rows (one block per row): every k against lengths around the queue sizes.
  for (DType d : dtypes) {
    for (int64_t k : kmaxes) {
      for (int64_t length : {int64_t(1), int64_t(5), int64_t(33), int64_t(300), int64_t(1100)}) {
        if (g_quick && d != DType::kFloat32 && length == 1100 && k != 256) continue;
        test_select_topk_small_k_case(d, 9, length, k, seed++, "small-k");
      }
    }
  }
  // k_max 64: the 64-entry queue.
  test_select_topk_small_k_case(DType::kBFloat16, 9, 3000, 64, seed++, "small-k-64");
  // Long rows: clusters of 2, 3, 5 and 8 blocks.
  test_select_topk_small_k_case(DType::kFloat32, 4, 4097, 100, seed++, "small-k-cluster2");
  test_select_topk_small_k_case(DType::kFloat16, 3, 9000, 7, seed++, "small-k-cluster3");
  test_select_topk_small_k_case(DType::kBFloat16, 3, 20000, 256, seed++, "small-k-cluster5");
  for (DType d : dtypes) {
    for (int64_t k : kmaxes) {
      if (g_quick && !(k == 7 && d == DType::kFloat32) && !(k == 256 && d == DType::kBFloat16)) {
        continue;
      }
      test_select_topk_small_k_case(d, 2, 131072, k, seed++, "small-k-cluster8");
    }
  }
  // One block per row (pre-sm_90: no clusters), long rows.
  emu::device_props().major = 8;
  test_select_topk_small_k_case(DType::kFloat32, 2, 30000, 32, seed++, "small-k-no-cluster");
  if (!g_quick) test_select_topk_small_k_case(DType::kFloat16, 2, 131072, 100, seed++, "small-k-no-cluster");
  emu::device_props().major = 9;
  // Many rows: one block per row, rows interleaved over the grid.
  if (!g_quick) test_select_topk_small_k_case(DType::kFloat32, 400, 300, 16, seed++, "small-k-many-rows");
}

void test_topk() {
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (DType d : dtypes) {
    test_select_topk_case(d, 8, 1, 4, 255, false, 1, "tiny");
    test_select_topk_case(d, 8, 7, 10, 255, true, 2, "specials");
    test_select_topk_case(d, 12, 64, 30, 3, true, 3, "ties");
    test_select_topk_case(d, 6, 5000, 300, 255, false, 4, "mid");
  }
  // Cluster of 8 over long rows, large and small k.
  test_select_topk_case(DType::kFloat32, 2, 40000, 2000, 255, false, 5, "cluster-large-k");
  test_select_topk_case(DType::kBFloat16, 2, 40000, 16, 4, true, 6, "cluster-small-k-ties");
  // Without clusters (pre-sm_90), and without the shared-memory key cache.
  emu::device_props().major = 8;
  test_select_topk_case(DType::kFloat32, 4, 9000, 700, 255, true, 7, "no-cluster");
  emu::device_props().major = 9;
  const int saved = emu::device_props().max_smem_optin;
  emu::device_props().max_smem_optin = 40 * 1024;
  test_select_topk_case(DType::kFloat16, 2, 30000, 900, 255, true, 8, "uncached");
  emu::device_props().max_smem_optin = saved;
  // Many rows: one block per row.
  if (!g_quick) test_select_topk_case(DType::kFloat32, 300, 700, 40, 255, true, 9, "many-rows");
  test_select_topk_small_k();
}

// ---------------------------------------------------------------------------
// sample_residual
// ---------------------------------------------------------------------------

void test_sample_case(int64_t rows, int64_t heavy_max, int64_t max_out, uint64_t seed,
                      int64_t offset, uint32_t draw_set, uint32_t case_seed) {
  std::mt19937 rng(case_seed);
  std::vector<int32_t> starts(rows), ends(rows), num_samples(rows);
  std::vector<int32_t> heavy(size_t(rows * heavy_max), -1);
  for (int64_t r = 0; r < rows; ++r) {
    starts[r] = int32_t(rng() % 50);
    const int32_t width = r == 0 ? 0 : int32_t(rng() % 300);
    ends[r] = starts[r] + width;
    // heavy: an ascending random subset of the window.
    std::vector<int32_t> pos;
    for (int32_t x = starts[r]; x < ends[r]; ++x) pos.push_back(x);
    std::shuffle(pos.begin(), pos.end(), rng);
    int64_t h = std::min<int64_t>(int64_t(rng() % (heavy_max + 1)), int64_t(pos.size()));
    if (r == 1) h = std::min<int64_t>(heavy_max, int64_t(pos.size()));
    std::sort(pos.begin(), pos.begin() + h);
    for (int64_t j = 0; j < h; ++j) heavy[r * heavy_max + j] = pos[j];
    const int32_t n_r = ends[r] - starts[r] - int32_t(h);
    const int regime = int(rng() % 6);
    const int32_t b = 1 + int32_t(rng() % 63);
    num_samples[r] = regime == 0 ? 0 : regime == 1 ? -b : regime == 2 ? n_r + b
                     : regime == 3 ? n_r : b;
  }
  int64_t rng_state[2] = {int64_t(seed), offset};
  SampleParams p{};
  p.heavy = heavy_max > 0 ? heavy.data() : nullptr;
  p.heavy_stride = heavy_max;
  p.starts = starts.data();
  p.ends = ends.data();
  p.num_samples = num_samples.data();
  p.rng = rng_state;
  p.rows = rows;
  p.max_out = max_out;
  p.draw_set = draw_set;
  std::vector<int32_t> ri(size_t(rows * max_out)), gi(size_t(rows * max_out)), rc(rows), gc(rows);
  std::vector<float> rw(size_t(rows * max_out)), gw(size_t(rows * max_out));
  p.indices = ri.data();
  p.log_weights = rw.data();
  p.counts = rc.data();
  sample_residual_cpu(p, 0, rows);
  p.indices = gi.data();
  p.log_weights = gw.data();
  p.counts = gc.data();
  check_cuda(sample_residual_cuda(p, nullptr), "sample_residual_cuda");
  int64_t bad_idx = 0, bad_cnt = 0, bad_w = 0;
  for (int64_t r = 0; r < rows; ++r) bad_cnt += rc[r] != gc[r];
  for (size_t i = 0; i < ri.size(); ++i) {
    bad_idx += ri[i] != gi[i];
    const bool both_inf = std::isinf(rw[i]) && std::isinf(gw[i]) && (rw[i] < 0) == (gw[i] < 0);
    if (!both_inf && std::fabs(rw[i] - gw[i]) > 2e-7f * std::max(1.f, std::fabs(rw[i]))) ++bad_w;
  }
  EXPECT(bad_cnt == 0 && bad_idx == 0 && bad_w == 0,
         "sample rows=%lld heavy=%lld max_out=%lld seed=%llu off=%lld draw_set=%u: counts %lld "
         "indices %lld weights %lld mismatches",
         (long long)rows, (long long)heavy_max, (long long)max_out, (unsigned long long)seed,
         (long long)offset, draw_set, (long long)bad_cnt, (long long)bad_idx, (long long)bad_w);
}

void test_sample() {
  const uint64_t seeds[] = {0ull, 12345ull, (1ull << 32) + 5, (1ull << 63) - 1};
  const int64_t offsets[] = {0, 3, (1 << 30) - 1, 77};
  uint32_t cs = 100;
  for (int s = 0; s < 4; ++s) {
    for (uint32_t draw_set = 0; draw_set < 2; ++draw_set) {
      for (int64_t max_out : {int64_t(0), int64_t(5), int64_t(64)}) {
        test_sample_case(48, 24, max_out, seeds[s], offsets[s], draw_set, cs++);
      }
    }
  }
  test_sample_case(20, 0, 33, 9, 1, 1, cs++);  // no heavy columns
}

// ---------------------------------------------------------------------------
// pilot_stats and sparse_attention
// ---------------------------------------------------------------------------

struct QKV {
  Buffer q, k, v;
  QKVParams params;
};

// q [B, Hq, D] (head stride D + pad), k/v [B, Hkv, N, D] with row stride D + row_pad.
QKV make_qkv(DType dtype, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t length,
             int64_t dim, int64_t row_pad, int64_t base_offset, std::mt19937& rng) {
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

Lists make_lists(int64_t batch, int64_t list_heads, int64_t max_count, int64_t length,
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

bool close(float a, float b, float atol, float rtol) {
  if (std::isinf(a) || std::isinf(b)) return a == b;
  if (std::isnan(a) || std::isnan(b)) return false;
  return std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

void test_pilot_case(DType dtype, int64_t dim, int64_t group, bool per_q, int64_t max_count,
                     int64_t splits, int64_t row_pad, int64_t base_offset, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t batch = 2, kv_heads = 2, q_heads = kv_heads * group, length = 53;
  QKV t = make_qkv(dtype, batch, q_heads, kv_heads, length, dim, row_pad, base_offset, rng);
  Lists l = make_lists(batch, per_q ? q_heads : kv_heads, max_count, length, rng);
  PilotParams p{};
  p.qkv = t.params;
  p.list = l.params;
  p.list.log_weights = nullptr;
  const int64_t heads = batch * q_heads;
  std::vector<float> rm(heads), gm(heads), rmo(heads * 3), gmo(heads * 3), rv(heads * 2 * dim),
      gv(heads * 2 * dim, 777.f);
  p.max_logit = rm.data();
  p.moments = rmo.data();
  p.vector_moments = rv.data();
  pilot_stats_cpu(p, 0, heads);
  p.max_logit = gm.data();
  p.moments = gmo.data();
  p.vector_moments = gv.data();
  std::vector<unsigned char> ws(pilot_stats_cuda_workspace_bytes(p, splits));
  check_cuda(pilot_stats_cuda(p, splits, ws.empty() ? nullptr : ws.data(), nullptr),
             "pilot_stats_cuda");
  int64_t bad = 0;
  for (int64_t i = 0; i < heads; ++i) bad += !close(gm[i], rm[i], 1e-5f, 1e-5f);
  for (int64_t i = 0; i < heads * 3; ++i) bad += !close(gmo[i], rmo[i], 1e-4f, 1e-4f);
  for (int64_t i = 0; i < heads * 2 * dim; ++i) bad += !close(gv[i], rv[i], 1e-4f, 1e-4f);
  EXPECT(bad == 0, "pilot %s D=%lld group=%lld per_q=%d max_count=%lld splits=%lld pad=%lld "
         "offset=%lld: %lld mismatches", dtype_name(dtype), (long long)dim, (long long)group,
         int(per_q), (long long)max_count, (long long)splits, (long long)row_pad,
         (long long)base_offset, (long long)bad);
}

void test_attention_case(DType dtype, int64_t dim, int64_t group, bool per_q, int64_t max_count,
                         int64_t splits, bool weights, int64_t row_pad, int64_t base_offset,
                         uint32_t seed, int64_t length = 47, int64_t batch = 2) {
  std::mt19937 rng(seed);
  const int64_t kv_heads = 2, q_heads = kv_heads * group;
  QKV t = make_qkv(dtype, batch, q_heads, kv_heads, length, dim, row_pad, base_offset, rng);
  Lists l = make_lists(batch, per_q ? q_heads : kv_heads, max_count, length, rng);
  SparseAttentionParams p{};
  p.qkv = t.params;
  p.list = l.params;
  if (!weights) p.list.log_weights = nullptr;
  p.num_splits = splits;
  const int64_t items = batch * q_heads * splits;
  std::vector<float> ro(items * dim), go(items * dim, 777.f), rl(items), gl(items, 777.f);
  p.partial_out = ro.data();
  p.partial_lse = rl.data();
  sparse_attention_partial_cpu(p, 0, items);
  p.partial_out = go.data();
  p.partial_lse = gl.data();
  check_cuda(sparse_attention_partial_cuda(p, nullptr), "sparse_attention_partial_cuda");
  int64_t bad = 0;
  for (int64_t i = 0; i < items; ++i) bad += !close(gl[i], rl[i], 2e-5f, 2e-5f);
  for (int64_t i = 0; i < items * dim; ++i) bad += !close(go[i], ro[i], 2e-5f, 2e-5f);
  EXPECT(bad == 0, "attention %s D=%lld group=%lld per_q=%d max_count=%lld splits=%lld w=%d "
         "pad=%lld offset=%lld: %lld mismatches", dtype_name(dtype), (long long)dim,
         (long long)group, int(per_q), (long long)max_count, (long long)splits, int(weights),
         (long long)row_pad, (long long)base_offset, (long long)bad);

  // combine of those partials, [items, splits, D] layout
  const int64_t heads = batch * q_heads;
  CombineParams c{};
  c.partial_out = ro.data();
  c.partial_lse = rl.data();
  c.item_stride_out = splits * dim;
  c.split_stride_out = dim;
  c.item_stride_lse = splits;
  c.split_stride_lse = 1;
  c.items = heads;
  c.num_splits = splits;
  c.head_dim = dim;
  std::vector<float> co(heads * dim), cl(heads), gco(heads * dim, 777.f), gcl(heads, 777.f);
  c.out = co.data();
  c.lse = cl.data();
  combine_cpu(c, 0, heads);
  c.out = gco.data();
  c.lse = gcl.data();
  check_cuda(combine_cuda(c, nullptr), "combine_cuda");
  bad = 0;
  for (int64_t i = 0; i < heads; ++i) bad += !close(gcl[i], cl[i], 1e-5f, 1e-5f);
  for (int64_t i = 0; i < heads * dim; ++i) bad += !close(gco[i], co[i], 1e-5f, 1e-5f);
  EXPECT(bad == 0, "combine after attention %s D=%lld splits=%lld: %lld mismatches",
         dtype_name(dtype), (long long)dim, (long long)splits, (long long)bad);
}

void test_combine_splits_first() {
  std::mt19937 rng(5);
  const int64_t splits = 37, items = 6, dim = 40;  // splits > 32, dim not a multiple of 32
  std::vector<float> po(splits * items * dim), pl(splits * items);
  for (auto& x : po) x = grid_value(rng);
  for (size_t i = 0; i < pl.size(); ++i) pl[i] = (rng() % 3 == 0) ? -INFINITY : grid_value(rng);
  for (int64_t s = 0; s < splits; ++s) pl[s * items + 0] = -INFINITY;  // an all-empty item
  for (int64_t s = 0; s < splits; ++s) {
    if (pl[s * items + 1] == -INFINITY) {
      for (int64_t d = 0; d < dim; ++d) po[(s * items + 1) * dim + d] = std::nanf("");
    }
  }
  CombineParams c{};
  c.partial_out = po.data();
  c.partial_lse = pl.data();
  c.item_stride_out = dim;
  c.split_stride_out = items * dim;
  c.item_stride_lse = 1;
  c.split_stride_lse = items;
  c.items = items;
  c.num_splits = splits;
  c.head_dim = dim;
  std::vector<float> ro(items * dim), rl(items), go(items * dim), gl(items);
  c.out = ro.data();
  c.lse = rl.data();
  combine_cpu(c, 0, items);
  c.out = go.data();
  c.lse = gl.data();
  check_cuda(combine_cuda(c, nullptr), "combine_cuda");
  int64_t bad = 0;
  for (int64_t i = 0; i < items; ++i) bad += !close(gl[i], rl[i], 1e-5f, 1e-5f);
  for (int64_t i = 0; i < items * dim; ++i) bad += !close(go[i], ro[i], 1e-5f, 1e-5f);
  EXPECT(bad == 0, "combine splits-first: %lld mismatches", (long long)bad);
}

// ---------------------------------------------------------------------------
// NaN propagation (online_softmax.h): a NaN in q, in a K row or in a V row that a
// head reads reaches that head's outputs, through every split count and the
// merges; a NaN in a row no list names changes nothing. The emulated kernels
// must agree with the CPU kernels element for element (NaN where NaN) and both
// with that rule.
// ---------------------------------------------------------------------------

// NaN in the same places, else within tolerance.
bool same(float a, float b, float atol, float rtol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return close(a, b, atol, rtol);
}

enum class NanAt { kQuery, kKeyRow, kValueRow, kUnlistedRow };

const char* nan_at_name(NanAt at) {
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
NanCase make_nan_case(DType dtype, int64_t dim, int64_t group, bool per_q, int64_t count,
                      NanAt at, uint32_t seed) {
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

void test_attention_nan_case(DType dtype, int64_t dim, int64_t group, bool per_q, int64_t splits,
                             NanAt at, uint32_t seed) {
  NanCase c = make_nan_case(dtype, dim, group, per_q, 45, at, seed);
  SparseAttentionParams p{};
  p.qkv = c.t.params;
  p.list = c.l.params;
  p.num_splits = splits;
  const int64_t heads = c.batch * c.q_heads, items = heads * splits;
  std::vector<float> ro(items * dim), go(items * dim, 777.f), rl(items), gl(items, 777.f);
  p.partial_out = ro.data();
  p.partial_lse = rl.data();
  sparse_attention_partial_cpu(p, 0, items);
  p.partial_out = go.data();
  p.partial_lse = gl.data();
  check_cuda(sparse_attention_partial_cuda(p, nullptr), "sparse_attention_partial_cuda");
  int64_t bad = 0;
  for (int64_t i = 0; i < items; ++i) bad += !same(gl[i], rl[i], 2e-5f, 2e-5f);
  for (int64_t i = 0; i < items * dim; ++i) bad += !same(go[i], ro[i], 2e-5f, 2e-5f);

  // Merge the splits (CPU and emulated combine) and check the rule on the result.
  CombineParams cp{};
  cp.item_stride_out = splits * dim;
  cp.split_stride_out = dim;
  cp.item_stride_lse = splits;
  cp.split_stride_lse = 1;
  cp.items = heads;
  cp.num_splits = splits;
  cp.head_dim = dim;
  std::vector<float> co(heads * dim), cl(heads), gco(heads * dim, 777.f), gcl(heads, 777.f);
  cp.partial_out = ro.data();
  cp.partial_lse = rl.data();
  cp.out = co.data();
  cp.lse = cl.data();
  combine_cpu(cp, 0, heads);
  cp.partial_out = go.data();
  cp.partial_lse = gl.data();
  cp.out = gco.data();
  cp.lse = gcl.data();
  check_cuda(combine_cuda(cp, nullptr), "combine_cuda");
  int64_t wrong = 0;
  for (int64_t h = 0; h < heads; ++h) {
    bad += !same(gcl[h], cl[h], 1e-5f, 1e-5f);
    for (int64_t d = 0; d < dim; ++d) bad += !same(gco[h * dim + d], co[h * dim + d], 1e-5f, 1e-5f);
    for (const std::vector<float>* o : {&co, &gco}) {
      const float lse = o == &co ? cl[h] : gcl[h];
      const float* out = o->data() + h * dim;
      const bool logit_nan = c.reads[h] && at != NanAt::kValueRow;
      wrong += std::isnan(lse) != logit_nan;
      for (int64_t d = 0; d < dim; ++d) {
        const bool want_nan = logit_nan || (c.reads[h] && d == c.nan_dim);
        wrong += std::isnan(out[d]) != want_nan;
      }
    }
  }
  EXPECT(bad == 0 && wrong == 0, "attention NaN in %s %s D=%lld group=%lld per_q=%d splits=%lld: "
         "%lld cpu/cuda mismatches, %lld outputs against the NaN rule", nan_at_name(at),
         dtype_name(dtype), (long long)dim, (long long)group, int(per_q), (long long)splits,
         (long long)bad, (long long)wrong);
}

void test_pilot_nan_case(DType dtype, int64_t dim, int64_t group, bool per_q, int64_t splits,
                         NanAt at, uint32_t seed) {
  NanCase c = make_nan_case(dtype, dim, group, per_q, 37, at, seed);
  PilotParams p{};
  p.qkv = c.t.params;
  p.list = c.l.params;
  p.list.log_weights = nullptr;
  const int64_t heads = c.batch * c.q_heads;
  std::vector<float> rm(heads), gm(heads, 777.f), rmo(heads * 3), gmo(heads * 3, 777.f),
      rv(heads * 2 * dim), gv(heads * 2 * dim, 777.f);
  p.max_logit = rm.data();
  p.moments = rmo.data();
  p.vector_moments = rv.data();
  pilot_stats_cpu(p, 0, heads);
  p.max_logit = gm.data();
  p.moments = gmo.data();
  p.vector_moments = gv.data();
  std::vector<unsigned char> ws(pilot_stats_cuda_workspace_bytes(p, splits));
  check_cuda(pilot_stats_cuda(p, splits, ws.empty() ? nullptr : ws.data(), nullptr),
             "pilot_stats_cuda");
  int64_t bad = 0, wrong = 0;
  for (int64_t i = 0; i < heads; ++i) bad += !same(gm[i], rm[i], 1e-5f, 1e-5f);
  for (int64_t i = 0; i < heads * 3; ++i) bad += !same(gmo[i], rmo[i], 1e-4f, 1e-4f);
  for (int64_t i = 0; i < heads * 2 * dim; ++i) bad += !same(gv[i], rv[i], 1e-4f, 1e-4f);
  for (int pass = 0; pass < 2; ++pass) {
    const float* ml = pass ? gm.data() : rm.data();
    const float* mo = pass ? gmo.data() : rmo.data();
    const float* vm = pass ? gv.data() : rv.data();
    for (int64_t h = 0; h < heads; ++h) {
      const bool logit_nan = c.reads[h] && at != NanAt::kValueRow;
      const bool value_nan = c.reads[h] && at == NanAt::kValueRow;
      wrong += std::isnan(ml[h]) != logit_nan;
      for (int i = 0; i < 3; ++i) {
        wrong += std::isnan(mo[h * 3 + i]) != (logit_nan || (value_nan && i == 2));
      }
      for (int64_t x = 0; x < 2 * dim; ++x) {
        const bool want = logit_nan || (value_nan && x % dim == c.nan_dim);
        wrong += std::isnan(vm[h * 2 * dim + x]) != want;
      }
    }
  }
  EXPECT(bad == 0 && wrong == 0, "pilot NaN in %s %s D=%lld group=%lld per_q=%d splits=%lld: "
         "%lld cpu/cuda mismatches, %lld outputs against the NaN rule", nan_at_name(at),
         dtype_name(dtype), (long long)dim, (long long)group, int(per_q), (long long)splits,
         (long long)bad, (long long)wrong);
}

// combine: a NaN lse poisons its item (lse and out), a NaN in a partial's out
// reaches that element even when the partial's weight underflows to 0, and an
// empty partial (lse -inf) is ignored whatever its out holds.
void test_combine_nan() {
  const int64_t splits = 35, items = 4, dim = 36;
  std::vector<float> po(splits * items * dim, 0.25f), pl(splits * items, 0.f);
  const float nan = std::nanf("");
  for (int64_t s = 0; s < splits; ++s) pl[s * items + 0] = float(s % 5);
  pl[7 * items + 0] = nan;                        // item 0: a NaN lse
  pl[33 * items + 1] = -200.f;                    // item 1: weight exp(-200) == 0 in fp32 ...
  po[(33 * items + 1) * dim + 5] = nan;           // ... times a NaN still gives NaN
  for (int64_t s = 0; s < splits; s += 2) {       // item 2: empty partials full of NaN
    pl[s * items + 2] = -INFINITY;
    for (int64_t d = 0; d < dim; ++d) po[(s * items + 2) * dim + d] = nan;
  }
  for (int64_t s = 0; s < splits; ++s) pl[s * items + 3] = -INFINITY;  // item 3: all empty
  CombineParams c{};
  c.partial_out = po.data();
  c.partial_lse = pl.data();
  c.item_stride_out = dim;
  c.split_stride_out = items * dim;
  c.item_stride_lse = 1;
  c.split_stride_lse = items;
  c.items = items;
  c.num_splits = splits;
  c.head_dim = dim;
  std::vector<float> ro(items * dim), rl(items), go(items * dim, 777.f), gl(items, 777.f);
  c.out = ro.data();
  c.lse = rl.data();
  combine_cpu(c, 0, items);
  c.out = go.data();
  c.lse = gl.data();
  check_cuda(combine_cuda(c, nullptr), "combine_cuda");
  int64_t wrong = 0;
  for (int pass = 0; pass < 2; ++pass) {
    const float* out = pass ? go.data() : ro.data();
    const float* lse = pass ? gl.data() : rl.data();
    wrong += !std::isnan(lse[0]) + std::isnan(lse[1]) + std::isnan(lse[2]);
    wrong += lse[3] != -INFINITY;
    for (int64_t d = 0; d < dim; ++d) {
      wrong += !std::isnan(out[0 * dim + d]);
      wrong += std::isnan(out[1 * dim + d]) != (d == 5);
      wrong += !close(out[2 * dim + d], 0.25f, 1e-6f, 1e-5f);
      wrong += out[3 * dim + d] != 0.f;
    }
  }
  EXPECT(wrong == 0, "combine NaN rule: %lld wrong outputs", (long long)wrong);
}

void test_nan() {
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const NanAt places[] = {NanAt::kQuery, NanAt::kKeyRow, NanAt::kValueRow, NanAt::kUnlistedRow};
  uint32_t seed = 9000;
  for (DType d : dtypes) {
    for (NanAt at : places) {
      for (bool per_q : {false, true}) {
        // One split, several, and more splits than one row group can fill.
        for (int64_t splits : {int64_t(1), int64_t(3), int64_t(11)}) {
          if (g_quick && d != DType::kFloat32 && splits == 11) continue;
          test_attention_nan_case(d, 64, 4, per_q, splits, at, seed++);
          test_pilot_nan_case(d, 64, 4, per_q, splits, at, seed++);
        }
      }
    }
  }
  // Wider rows and groups (8 heads per block, two head chunks for the pilot).
  test_attention_nan_case(DType::kBFloat16, 128, 8, false, 2, NanAt::kKeyRow, seed++);
  test_pilot_nan_case(DType::kBFloat16, 128, 8, false, 2, NanAt::kValueRow, seed++);
  test_attention_nan_case(DType::kFloat16, 256, 1, false, 4, NanAt::kValueRow, seed++);
  test_pilot_nan_case(DType::kFloat32, 256, 1, true, 1, NanAt::kKeyRow, seed++);
  test_combine_nan();
}

void test_attention_and_pilot() {
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  uint32_t seed = 1000;
  for (DType d : dtypes) {
    for (int64_t dim : {64, 128, 256}) {
      for (int64_t group : {1, 4, 7}) {
        for (bool per_q : {false, true}) {
          if (g_quick && (dim == 256 || per_q) && group != 4) continue;
          test_attention_case(d, dim, group, per_q, 29, 3, true, 0, 0, seed++);
          test_pilot_case(d, dim, group, per_q, 17, 1, 0, 0, seed++);
        }
      }
    }
  }
  // Splits: automatic-like counts, more splits than entries, weights off.
  test_attention_case(DType::kBFloat16, 128, 4, false, 200, 1, true, 0, 0, seed++);
  test_attention_case(DType::kBFloat16, 128, 4, false, 200, 7, false, 0, 0, seed++);
  test_attention_case(DType::kFloat16, 64, 2, false, 5, 17, true, 0, 0, seed++);
  test_attention_case(DType::kFloat32, 64, 12, false, 90, 2, true, 0, 0, seed++);  // 2 chunks
  // Unaligned rows (odd row stride, odd base offset): element-wise copies.
  test_attention_case(DType::kBFloat16, 128, 4, false, 60, 2, true, 1, 0, seed++);
  test_attention_case(DType::kFloat16, 64, 1, true, 60, 2, true, 0, 3, seed++);
  test_attention_case(DType::kFloat32, 256, 7, false, 40, 3, true, 1, 1, seed++);
  // Longer lists over a longer context (benchmark-like, scaled down).
  test_attention_case(DType::kBFloat16, 128, 4, false, 1300, 9, true, 0, 0, seed++, 4096, 1);
  // Pilot with split-K through the workspace.
  test_pilot_case(DType::kBFloat16, 128, 4, false, 300, 5, 0, 0, seed++);
  test_pilot_case(DType::kFloat32, 64, 7, false, 150, 3, 0, 0, seed++);
  test_pilot_case(DType::kFloat16, 256, 1, true, 100, 4, 1, 1, seed++);
  test_pilot_case(DType::kBFloat16, 64, 4, false, 0, 1, 0, 0, seed++);  // max_count 0
  test_combine_splits_first();
}

}  // namespace

// ---------------------------------------------------------------------------
// select_scores (oracle selection scores)
// ---------------------------------------------------------------------------

namespace {

// lens[b] < 0 or > length are clamped by the kernels; specials puts a NaN and an
// infinity into K (inside the valid range when the lengths allow).
void test_select_scores_case(DType dtype, int64_t dim, int64_t group, bool share, int64_t batch,
                             int64_t kv_heads, int64_t length, const std::vector<int64_t>& lens,
                             bool lengths_int64, int64_t row_pad, int64_t base_offset,
                             int64_t num_splits, bool specials, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t q_heads = kv_heads * group;
  QKV t = make_qkv(dtype, batch, q_heads, kv_heads, length, dim, row_pad, base_offset, rng);
  if (specials) {
    const QKVParams& q = t.params;
    const int64_t base = base_offset;  // element offset of p.k inside the buffer
    if (length > 3) t.k.set(size_t(base + 3 * q.k_row_stride + 1), std::nanf(""));
    if (batch > 1 && length > 5) {
      t.k.set(size_t(base + q.k_batch_stride + 5 * q.k_row_stride), INFINITY);
    }
  }
  std::vector<int64_t> len64(lens.begin(), lens.end());
  std::vector<int32_t> len32(lens.begin(), lens.end());
  SelectScoresParams p{};
  p.qkv = t.params;
  p.qkv.v = nullptr;
  p.lengths = lengths_int64 ? static_cast<const void*>(len64.data())
                            : static_cast<const void*>(len32.data());
  p.lengths_int64 = lengths_int64;
  p.share_gqa = share;
  const int64_t out_heads = share ? kv_heads : q_heads;
  const size_t total = size_t(batch * out_heads * length);
  std::vector<float> ref(total, 777.f), got(total, 555.f);
  p.scores = ref.data();
  select_scores_cpu(p, 0, batch * kv_heads);
  p.num_splits = num_splits;
  std::vector<unsigned char> ws(select_scores_cuda_workspace_bytes(p), 0xff);  // NaN garbage
  p.scores = got.data();
  check_cuda(select_scores_cuda(p, ws.empty() ? nullptr : ws.data(), nullptr),
             "select_scores_cuda");
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < total; ++i) {
    const bool same = (std::isnan(ref[i]) && std::isnan(got[i])) ||
                      close(got[i], ref[i], 1e-5f, 1e-5f);
    if (!same) {
      ++bad;
      if (first < 0) first = int64_t(i);
    }
  }
  EXPECT(bad == 0, "select_scores %s D=%lld group=%lld share=%d B=%lld Hkv=%lld N=%lld i64=%d "
         "pad=%lld offset=%lld splits=%lld specials=%d: %lld mismatches (first at %lld: "
         "cpu %g cuda %g)", dtype_name(dtype), (long long)dim, (long long)group, int(share),
         (long long)batch, (long long)kv_heads, (long long)length, int(lengths_int64),
         (long long)row_pad, (long long)base_offset, (long long)num_splits, int(specials),
         (long long)bad, (long long)first, first >= 0 ? ref[first] : 0.f,
         first >= 0 ? got[first] : 0.f);
}

void test_select_scores() {
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  uint32_t seed = 5000;
  const int64_t length = 150;
  const std::vector<int64_t> ragged = {150, 0, 1, 77};
  for (DType d : dtypes) {
    for (int64_t dim : {64, 128, 256}) {
      for (int64_t group : {1, 4, 7}) {
        for (bool share : {false, true}) {
          if (g_quick && dim == 256 && group != 4) continue;
          // Automatic splits (one tile each here) and a single split of several tiles.
          test_select_scores_case(d, dim, group, share, 4, 2, length, ragged, (seed & 1) != 0, 0,
                                  0, (seed & 2) ? 0 : 1, false, seed);
          ++seed;
        }
      }
    }
  }
  for (bool share : {false, true}) {
    // Many tiles per split (online max / sum across tiles), uneven splits, automatic.
    for (int64_t splits : {int64_t(1), int64_t(3), int64_t(0)}) {
      test_select_scores_case(DType::kBFloat16, 128, 4, share, 2, 2, 1000, {1000, 613}, true, 0,
                              0, splits, false, seed++);
    }
    test_select_scores_case(DType::kFloat32, 64, 2, share, 1, 3, 2100, {2100}, false, 0, 0, 2,
                            false, seed++);
    // Groups wider than a block (two head chunks), and 3 (a partly idle chunk).
    test_select_scores_case(DType::kFloat16, 128, 12, share, 2, 1, 300, {300, 129}, true, 0, 0, 2,
                            false, seed++);
    test_select_scores_case(DType::kBFloat16, 64, 3, share, 2, 2, 90, {90, 64}, false, 0, 0, 0,
                            false, seed++);
    // Unaligned K rows (odd row stride, odd base offset): element-wise copies.
    test_select_scores_case(DType::kBFloat16, 128, 4, share, 2, 2, 200, {200, 33}, true, 1, 3, 1,
                            false, seed++);
    test_select_scores_case(DType::kFloat32, 256, 1, share, 2, 2, 70, {70, 69}, false, 1, 1, 0,
                            false, seed++);
    // Lengths out of range (clamped), all rows empty, and a length-0 context.
    test_select_scores_case(DType::kFloat16, 64, 4, share, 3, 1, 50, {-3, 51, 0}, true, 0, 0, 0,
                            false, seed++);
    test_select_scores_case(DType::kFloat32, 128, 4, share, 2, 2, 40, {0, 0}, false, 0, 0, 1,
                            false, seed++);
    test_select_scores_case(DType::kFloat32, 128, 4, share, 2, 2, 0, {0, 0}, true, 0, 0, 0,
                            false, seed++);
    // NaN and infinite logits (lse not finite -> 0, NaN through the max).
    for (DType d : dtypes) {
      test_select_scores_case(d, 64, 4, share, 2, 2, 120, {120, 100}, true, 0, 0, 2, true,
                              seed++);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// int4 key summary (key_summary.h): summarize_keys byte for byte, and
// select_scores from the summary against the CPU kernels.
// ---------------------------------------------------------------------------

namespace {

// Raw bits of f in dtype (fp16: round to nearest even; bf16: truncated, any bf16).
void put_value(std::vector<unsigned char>& bytes, DType dtype, size_t i, float f) {
  if (dtype == DType::kFloat32) {
    std::memcpy(&bytes[i * 4], &f, 4);
    return;
  }
  const uint16_t b = dtype == DType::kBFloat16 ? uint16_t(float_to_bits(f) >> 16) : to_half_rn(f).bits;
  std::memcpy(&bytes[i * 2], &b, 2);
}

// A channel group's contents, chosen per (row, group): what the bytes must survive.
float summary_value(std::mt19937& rng, int kind, int d, DType dtype) {
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  const float nan = std::nanf(""), inf = INFINITY;
  switch (kind) {
    case 0: return u(rng);                                      // plain
    case 1: return 1.25f;                                       // constant: step 0
    case 2: return d % 3 == 0 ? -0.f : (d % 3 == 1 ? 0.f : -0.f);  // signed zeros only
    case 3: return d == 7 ? nan : u(rng);                       // a NaN
    case 4: return d % 2 ? 0.f : -0.f + float(d % 5) * 0.f;     // +0 first vs -0
    case 5: return float(d % 16) / 8.f - 1.f;                   // exact levels and midpoints
    case 6: return d == 3 ? inf : u(rng);                       // +inf
    case 7: return d == 30 ? -inf : u(rng);                     // -inf
    case 8: return inf;                                         // all +inf: inf - inf
    case 9:                                                     // subnormal / tiny
      return dtype == DType::kFloat16 ? float(int(rng() % 9) - 4) * 5.96046448e-8f
                                      : float(int(rng() % 9) - 4) * 1e-39f;
    case 10:                                                    // beyond fp16's range
      return dtype == DType::kFloat16 ? 60000.f + float(d) : 70000.f + 1000.f * float(d % 4);
    case 11: return 1e-3f * u(rng) + 100.f;                     // narrow range, large offset
    default: return (d == 0 ? 0.f : -0.f) + 1e-4f * float(int(rng() % 3));  // +0 first
  }
}

struct SummaryBuffers {
  std::vector<unsigned char> codes;
  std::vector<half_t> params;
  KeySummaryParams s;
};

// codes [B, Hkv, N, D/2] and params [B, Hkv, N, D/32, 2] with padded rows (odd when
// !aligned, so every copy and store takes its element-wise path), filled with `fill`.
SummaryBuffers make_summary(int64_t batch, int64_t kv_heads, int64_t n, int64_t dim, bool aligned,
                            uint8_t fill) {
  SummaryBuffers sb;
  const int64_t code_row = dim / 2 + (aligned ? 16 : 1);
  const int64_t param_row = 2 * (dim / kSummaryGroup) + (aligned ? 8 : 1);
  const int64_t code_head = n * code_row + (aligned ? 32 : 3);
  const int64_t param_head = n * param_row + (aligned ? 8 : 1);
  sb.codes.assign(size_t(1 + batch * kv_heads * code_head), fill);
  sb.params.assign(size_t(1 + batch * kv_heads * param_head), half_t{uint16_t(fill * 257u)});
  sb.s.codes = sb.codes.data() + (aligned ? 0 : 1);
  sb.s.params = sb.params.data() + (aligned ? 0 : 1);
  sb.s.codes_row_stride = code_row;
  sb.s.codes_head_stride = code_head;
  sb.s.codes_batch_stride = kv_heads * code_head;
  sb.s.params_row_stride = param_row;
  sb.s.params_head_stride = param_head;
  sb.s.params_batch_stride = kv_heads * param_head;
  return sb;
}

// k [B, Hkv, rows, D] (row stride D + pad) of group kinds, summarised into positions
// row_begin[b] + r of a summary of n tokens on the CPU and under the emulator.
void test_summarize_case(DType dtype, int64_t dim, int64_t batch, int64_t kv_heads, int64_t rows,
                         int64_t n, const std::vector<int64_t>& row_begin, bool aligned,
                         bool specials, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t elem = dtype == DType::kFloat32 ? 4 : 2;
  const int64_t row_stride = dim + (aligned ? 8 : 1);
  const int64_t head_stride = rows * row_stride + (aligned ? 8 : 3);
  const int64_t offset = aligned ? 0 : 1;
  std::vector<unsigned char> k(size_t((offset + batch * kv_heads * head_stride) * elem), 0);
  const int64_t groups = dim / kSummaryGroup;
  for (int64_t bh = 0; bh < batch * kv_heads; ++bh) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const int kind = specials ? int(rng() % 13) : 0;
        for (int64_t d = 0; d < kSummaryGroup; ++d) {
          const size_t at = size_t(offset + bh * head_stride + r * row_stride + g * kSummaryGroup + d);
          put_value(k, dtype, at, summary_value(rng, kind, int(d), dtype));
        }
      }
    }
  }
  SummarizeKeysParams p{};
  p.qkv.k = k.data() + offset * elem;
  p.qkv.k_batch_stride = kv_heads * head_stride;
  p.qkv.k_head_stride = head_stride;
  p.qkv.k_row_stride = row_stride;
  p.qkv.batch = batch;
  p.qkv.kv_heads = kv_heads;
  p.qkv.q_heads = kv_heads;
  p.qkv.length = rows;
  p.qkv.head_dim = dim;
  p.qkv.dtype = dtype;
  p.row_begin = row_begin.data();
  p.rows = rows;
  p.summary_length = n;
  SummaryBuffers ref = make_summary(batch, kv_heads, n, dim, aligned, 0xa5);
  SummaryBuffers got = make_summary(batch, kv_heads, n, dim, aligned, 0xa5);
  p.summary = ref.s;
  summarize_keys_cpu(p, 0, batch * kv_heads);
  p.summary = got.s;
  check_cuda(summarize_keys_cuda(p, nullptr), "summarize_keys_cuda");
  int64_t bad_codes = 0, bad_params = 0, first = -1;
  for (size_t i = 0; i < ref.codes.size(); ++i) bad_codes += ref.codes[i] != got.codes[i];
  for (size_t i = 0; i < ref.params.size(); ++i) {
    if (ref.params[i].bits != got.params[i].bits) {
      ++bad_params;
      if (first < 0) first = int64_t(i);
    }
  }
  int64_t written = 0;  // a case that writes nothing would pass on any kernel
  for (size_t i = 0; i < ref.codes.size(); ++i) written += ref.codes[i] != 0xa5;
  EXPECT(written > 0 || n == 0 || rows == 0, "summarize %s D=%lld: the case writes nothing",
         dtype_name(dtype), (long long)dim);
  EXPECT(bad_codes == 0 && bad_params == 0,
         "summarize_keys %s D=%lld B=%lld Hkv=%lld rows=%lld N=%lld aligned=%d specials=%d: "
         "%lld code bytes, %lld params differ (first param %lld: cpu %04x cuda %04x)",
         dtype_name(dtype), (long long)dim, (long long)batch, (long long)kv_heads, (long long)rows,
         (long long)n, int(aligned), int(specials), (long long)bad_codes, (long long)bad_params,
         (long long)first, first >= 0 ? ref.params[first].bits : 0,
         first >= 0 ? got.params[first].bits : 0);
}

void test_summarize_keys() {
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  uint32_t seed = 7000;
  for (DType d : dtypes) {
    for (int64_t dim : {64, 128, 256}) {
      // Prefill (row_begin 0, all rows), ragged decode-style updates (rows beyond the
      // summary's length skipped, a negative start), both layouts, with and without
      // the special groups.
      test_summarize_case(d, dim, 2, 2, 37, 37, {0, 0}, true, true, seed++);
      test_summarize_case(d, dim, 3, 2, 5, 40, {0, 37, -2}, (seed & 1) != 0, true, seed++);
      if (!g_quick || dim == 128) {
        test_summarize_case(d, dim, 2, 3, 20, 21, {1, 19}, false, false, seed++);
      }
    }
  }
  // Head dims the scoring kernels are not instantiated for (the build kernel takes any
  // multiple of 32): 32 (4 lanes a row) and 160 (20 lanes: rows straddle warps).
  for (int64_t dim : {32, 160}) {
    test_summarize_case(DType::kBFloat16, dim, 2, 2, 30, 31, {0, 2}, true, true, seed++);
    test_summarize_case(DType::kFloat32, dim, 2, 1, 9, 31, {25, 0}, false, true, seed++);
  }
  // Many rows over a capped grid (grid-stride loop), a single decode token, no rows.
  test_summarize_case(DType::kBFloat16, 128, 2, 8, 700, 700, {0, 0}, true, true, seed++);
  test_summarize_case(DType::kFloat16, 64, 4, 1, 1, 9, {8, 3, 9, 0}, true, true, seed++);
  test_summarize_case(DType::kFloat32, 256, 1, 2, 0, 9, {0}, true, true, seed++);
}

// Scores from a summary built by summarize_keys_cpu (so its codes are realistic),
// with NaN and infinite groups when specials. The kernels' fp32 sums differ in
// order from the CPU's: the bound is 1e-5 * (1 + max_i scale * sum_d |q_d K~_d|).
void test_summary_scores_case(DType dtype, int64_t dim, int64_t group, bool share, int64_t batch,
                              int64_t kv_heads, int64_t length, const std::vector<int64_t>& lens,
                              bool aligned, int64_t num_splits, bool specials, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t q_heads = kv_heads * group;
  // Keys in the summary's dtype-independent form: fp32 k, summarised once.
  QKV t = make_qkv(DType::kFloat32, batch, q_heads, kv_heads, length, dim, 0, 0, rng);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  for (size_t i = 0; i < t.k.bytes.size() / 4; ++i) t.k.set(i, u(rng));
  if (specials && length > 6) {
    const QKVParams& q = t.params;
    t.k.set(size_t(2 * q.k_row_stride + 5), std::nanf(""));
    t.k.set(size_t(q.k_head_stride + 6 * q.k_row_stride + 40 % dim), INFINITY);
  }
  SummaryBuffers sb = make_summary(batch, kv_heads, length, dim, aligned, 0);
  SummarizeKeysParams sp{};
  sp.qkv = t.params;
  std::vector<int64_t> zeros(size_t(batch), 0);
  sp.row_begin = zeros.data();
  sp.rows = length;
  sp.summary_length = length;
  sp.summary = sb.s;
  summarize_keys_cpu(sp, 0, batch * kv_heads);

  // q in the requested dtype, K never read.
  QKV qt = make_qkv(dtype, batch, q_heads, kv_heads, 1, dim, 0, 0, rng);
  SelectScoresParams p{};
  p.qkv = qt.params;
  p.qkv.k = nullptr;
  p.qkv.v = nullptr;
  p.qkv.k_batch_stride = p.qkv.k_head_stride = p.qkv.k_row_stride = 0;
  p.qkv.length = length;
  p.summary = sb.s;
  p.from_summary = true;
  std::vector<int64_t> len64(lens.begin(), lens.end());
  p.lengths = len64.data();
  p.lengths_int64 = true;
  p.share_gqa = share;
  const int64_t out_heads = share ? kv_heads : q_heads;
  const size_t total = size_t(batch * out_heads * length);
  std::vector<float> ref(total, 777.f), got(total, 555.f);
  p.scores = ref.data();
  select_scores_cpu(p, 0, batch * kv_heads);
  p.num_splits = num_splits;
  std::vector<unsigned char> ws(select_scores_cuda_workspace_bytes(p), 0xff);  // NaN garbage
  p.scores = got.data();
  check_cuda(select_scores_cuda(p, ws.empty() ? nullptr : ws.data(), nullptr),
             "select_scores_cuda (summary)");

  // The error bound from the dequantised keys.
  double bound = 0;
  std::vector<float> key(static_cast<size_t>(dim));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t kv = 0; kv < kv_heads; ++kv) {
      for (int64_t i = 0; i < length; ++i) {
        const uint8_t* c = sb.s.codes + b * sb.s.codes_batch_stride + kv * sb.s.codes_head_stride +
                           i * sb.s.codes_row_stride;
        const half_t* pr = sb.s.params + b * sb.s.params_batch_stride +
                           kv * sb.s.params_head_stride + i * sb.s.params_row_stride;
        for (int64_t d = 0; d < dim; ++d) {
          const int64_t g = d / kSummaryGroup;
          key[d] = to_float(pr[2 * g]) + to_float(pr[2 * g + 1]) * float((c[d / 2] >> (4 * (d & 1))) & 15);
        }
        for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
          double acc = 0;
          for (int64_t d = 0; d < dim; ++d) {
            const size_t at = size_t(b * p.qkv.q_batch_stride + h * p.qkv.q_head_stride + d);
            float qv;
            if (dtype == DType::kFloat32) {
              std::memcpy(&qv, &qt.q.bytes[at * 4], 4);
            } else {
              uint16_t bits;
              std::memcpy(&bits, &qt.q.bytes[at * 2], 2);
              qv = dtype == DType::kFloat16 ? to_float(half_t{bits}) : to_float(bfloat16_t{bits});
            }
            acc += std::fabs(double(qv) * double(key[d]));
          }
          if (std::isfinite(acc)) bound = std::max(bound, acc * p.qkv.scale);
        }
      }
    }
  }
  const float atol = float(1e-5 * (1 + bound));
  int64_t bad = 0, first = -1, nans = 0;
  for (size_t i = 0; i < total; ++i) {
    nans += std::isnan(ref[i]);
    if (!same(got[i], ref[i], atol, 1e-5f)) {
      ++bad;
      if (first < 0) first = int64_t(i);
    }
  }
  EXPECT(!specials || nans > 0 || lens[0] <= 2, "summary scores: the NaN group gave no NaN score");
  EXPECT(bad == 0, "select_scores summary q=%s D=%lld group=%lld share=%d B=%lld Hkv=%lld N=%lld "
         "aligned=%d splits=%lld specials=%d: %lld mismatches (first at %lld: cpu %g cuda %g, "
         "atol %g)", dtype_name(dtype), (long long)dim, (long long)group, int(share),
         (long long)batch, (long long)kv_heads, (long long)length, int(aligned),
         (long long)num_splits, int(specials), (long long)bad, (long long)first,
         first >= 0 ? ref[first] : 0.f, first >= 0 ? got[first] : 0.f, atol);
}

void test_summary_scores() {
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  uint32_t seed = 8000;
  const std::vector<int64_t> ragged = {300, 0, 1, 177};
  for (DType d : dtypes) {
    for (int64_t dim : {64, 128, 256}) {
      for (int64_t group : {1, 4, 8}) {
        for (bool share : {false, true}) {
          if (g_quick && d != DType::kBFloat16 && (dim == 256 || group == 8)) continue;
          test_summary_scores_case(d, dim, group, share, 4, 2, 300, ragged, (seed % 3) != 0,
                                   (seed & 2) ? 0 : 1, (seed % 4) == 1, seed);
          ++seed;
        }
      }
    }
  }
  for (bool share : {false, true}) {
    // Many tiles per split, uneven splits; two head chunks; lengths out of range;
    // NaN and infinite groups at each head dim.
    for (int64_t splits : {int64_t(1), int64_t(3), int64_t(0)}) {
      test_summary_scores_case(DType::kBFloat16, 128, 4, share, 2, 2, 1000, {1000, 613}, true,
                               splits, false, seed++);
    }
    test_summary_scores_case(DType::kFloat16, 128, 12, share, 2, 1, 300, {300, 129}, true, 2, false,
                             seed++);
    test_summary_scores_case(DType::kFloat32, 64, 4, share, 3, 1, 50, {-3, 51, 0}, false, 0, false,
                             seed++);
    for (int64_t dim : {64, 128, 256}) {
      test_summary_scores_case(DType::kBFloat16, dim, 4, share, 2, 2, 130, {130, 100}, dim != 128,
                               2, true, seed++);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--quick") g_quick = true;
  }
  test_topk();
  test_sample();
  test_attention_and_pilot();
  test_nan();
  test_select_scores();
  test_summarize_keys();
  test_summary_scores();
  std::printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
  return g_failures == 0 ? 0 : 1;
}
