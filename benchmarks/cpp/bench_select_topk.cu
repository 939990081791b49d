// Benchmark of the CUDA top-k (vattention::select_topk_cuda) against nothing but the
// bytes it must read: time and GB/s of scores read, for rows x length scores with
// a large k (5% of 131072 = 6553: the radix-select path) and a small k (the
// warp-select path, k_max <= kWarpSelectMaxK = 256). To compare the two paths at
// one k, the *_radix cases ask for the same k with k_max = kWarpSelectMaxK + 1,
// which takes the radix path (the extra output slots are -1): small_k vs
// small_k_radix and cutoff_k (k = 256) vs cutoff_k_radix. Each case is also checked
// against select_topk_cpu (exact equality) unless --no-check.
//
//   bench_select_topk [--rows 32] [--length 131072] [--k 6553] [--small-k 64]
//              [--dtype f32|f16|bf16] [--iters 50] [--tiny] [--no-check] [--json out.json]
// --tiny: a few small rows and iterations (for compute-sanitizer runs).
#include <cmath>
#include <random>

#include "bench_common.h"
#include "vattention/select_topk.h"
#include "vattention/select_topk_warp_cuda.cuh"  // kWarpSelectMaxK: the dispatch cutoff

using namespace vattention;

namespace {

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (finite inputs)
  return uint16_t(u >> 16);
}

uint16_t to_half(float f) {
  // Finite, normal-range inputs (|f| in [2^-14, 65504]) or zero; round to nearest even.
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs < 0x38800000u) return uint16_t(sign);  // below the half normal range: flush to zero
  uint32_t mant = abs & 0x7fffffu;
  uint32_t exp = (abs >> 23) - 127 + 15;
  uint32_t h = (exp << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

struct Case {
  const char* name;
  int64_t k;      // every row's k
  int64_t k_max;  // output width; decides the path
};

}  // namespace

int main(int argc, char** argv) {
  const bench::Args args{argc, argv};
  const bool tiny = args.has("--tiny");
  const int64_t rows = args.get_int("--rows", tiny ? 4 : 32);
  const int64_t length = args.get_int("--length", tiny ? 5000 : 131072);
  const int64_t k_large = args.get_int("--k", tiny ? 300 : 6553);
  const int64_t k_small = args.get_int("--small-k", tiny ? 16 : 64);
  const int iters = int(args.get_int("--iters", tiny ? 2 : 50));
  const bool check = !args.has("--no-check");
  const std::string dtype_name = args.get("--dtype", "f32");
  const DType dtype = dtype_name == "bf16" ? DType::kBFloat16
                      : dtype_name == "f16" ? DType::kFloat16 : DType::kFloat32;
  const size_t elem = dtype == DType::kFloat32 ? 4 : 2;

  // Scores like logits: normal with a few large outliers, stored in the chosen dtype.
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<unsigned char> host(size_t(rows * length) * elem);
  for (int64_t i = 0; i < rows * length; ++i) {
    float x = normal(rng);
    if (rng() % 1000 == 0) x *= 8.f;
    if (dtype == DType::kFloat32) {
      std::memcpy(&host[size_t(i) * 4], &x, 4);
    } else {
      const uint16_t b = dtype == DType::kBFloat16 ? to_bf16(x) : to_half(x);
      std::memcpy(&host[size_t(i) * 2], &b, 2);
    }
  }
  std::vector<int32_t> starts(rows, 0), ends(rows, int32_t(length));

  void* d_scores = nullptr;
  int32_t *d_starts = nullptr, *d_ends = nullptr, *d_ks = nullptr, *d_out = nullptr;
  constexpr int64_t kCutoff = cuda_detail::kWarpSelectMaxK;
  const int64_t k_max = std::max({k_large, k_small, kCutoff + 1});
  BENCH_CHECK(cudaMalloc(&d_scores, host.size()));
  BENCH_CHECK(cudaMalloc(&d_starts, rows * sizeof(int32_t)));
  BENCH_CHECK(cudaMalloc(&d_ends, rows * sizeof(int32_t)));
  BENCH_CHECK(cudaMalloc(&d_ks, rows * sizeof(int32_t)));
  BENCH_CHECK(cudaMalloc(&d_out, rows * k_max * sizeof(int32_t)));
  BENCH_CHECK(cudaMemcpy(d_scores, host.data(), host.size(), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(d_starts, starts.data(), rows * sizeof(int32_t), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(d_ends, ends.data(), rows * sizeof(int32_t), cudaMemcpyHostToDevice));

  bench::Json top;
  top.field("benchmark", "select_topk");
  top.field("device", bench::device_name());
  top.field("rows", (long long)rows);
  top.field("length", (long long)length);
  top.field("dtype", dtype_name);
  top.field("iters", iters);
  std::vector<bench::Json> cases;
  bool all_ok = true;

  std::vector<Case> list = {{"large_k", k_large, k_large}, {"small_k", k_small, k_small}};
  if (k_small <= kCutoff) list.push_back({"small_k_radix", k_small, kCutoff + 1});
  list.push_back({"cutoff_k", kCutoff, kCutoff});
  list.push_back({"cutoff_k_radix", kCutoff, kCutoff + 1});
  for (const Case& c : list) {
    const char* path = c.k_max <= kCutoff ? "warp" : "radix";
    std::vector<int32_t> ks(rows, int32_t(c.k));
    BENCH_CHECK(cudaMemcpy(d_ks, ks.data(), rows * sizeof(int32_t), cudaMemcpyHostToDevice));
    SelectTopkParams p{};
    p.scores = d_scores;
    p.score_row_stride = length;
    p.starts = d_starts;
    p.ends = d_ends;
    p.ks = d_ks;
    p.indices = d_out;
    p.rows = rows;
    p.length = length;
    p.k_max = c.k_max;
    p.index_row_stride = c.k_max;
    p.dtype = dtype;
    auto run = [&] { BENCH_CHECK(select_topk_cuda(p, nullptr, nullptr)); };
    const double ms = bench::time_ms(run, iters);
    const double ms_batched = bench::time_ms_batched(run, iters);
    const double bytes = double(rows) * double(length) * double(elem);
    const double gbps = bytes / (ms * 1e-3) / 1e9;
    std::string status = "skipped";
    if (check) {
      std::vector<int32_t> got(size_t(rows * c.k_max)), ref(size_t(rows * c.k_max));
      BENCH_CHECK(cudaMemcpy(got.data(), d_out, got.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
      SelectTopkParams h = p;
      h.scores = host.data();
      h.starts = starts.data();
      h.ends = ends.data();
      h.ks = ks.data();
      h.indices = ref.data();
      select_topk_cpu(h, 0, rows);
      status = got == ref ? "pass" : "FAIL";
      all_ok = all_ok && got == ref;
    }
    std::printf("select_topk %-14s rows=%lld length=%lld k=%lld k_max=%lld (%s) %s: %.4f ms (median), "
                "%.4f ms (back-to-back), %.1f GB/s of scores, check %s\n",
                c.name, (long long)rows, (long long)length, (long long)c.k, (long long)c.k_max, path,
                dtype_name.c_str(), ms, ms_batched, gbps, status.c_str());
    bench::Json j;
    j.field("name", c.name);
    j.field("k", (long long)c.k);
    j.field("k_max", (long long)c.k_max);
    j.field("path", path);
    j.field("ms", ms);
    j.field("ms_back_to_back", ms_batched);
    j.field("gbps", gbps);
    j.field("bytes", bytes);
    j.field("check", status);
    cases.push_back(j);
  }
  const std::string json = args.get("--json", "");
  if (!json.empty()) bench::write_json(json, top, cases);
  BENCH_CHECK(cudaFree(d_scores));
  BENCH_CHECK(cudaFree(d_starts));
  BENCH_CHECK(cudaFree(d_ends));
  BENCH_CHECK(cudaFree(d_ks));
  BENCH_CHECK(cudaFree(d_out));
  return all_ok ? 0 : 1;
}
