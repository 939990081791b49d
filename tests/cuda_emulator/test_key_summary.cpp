// The int4 key summary (key_summary.h) under the emulator: summarize_keys byte for
// byte against summarize_keys_cpu, and select_scores from the summary against the
// CPU kernels within a bound on fp32 summation error.
#include "emu_check.h"

#include "../../csrc/vattention/key_summary.h"
#include "../../csrc/vattention/select_scores.h"

namespace vattention::emu_check {
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
  KeySummaryParams s{};
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
      // Not `(seed & 1) != 0, ..., seed++`: argument order is unspecified. An even seed
      // is the aligned layout, as GCC's order made it.
      test_summarize_case(d, dim, 3, 2, 5, 40, {0, 37, -2}, seed % 2 == 0, true, seed);
      ++seed;
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

void test_key_summary() {
  test_summarize_keys();
  test_summary_scores();
}

}  // namespace vattention::emu_check
