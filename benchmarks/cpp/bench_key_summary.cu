// Benchmark of the int4 key summary (key_summary.h) against the oracle selector it
// replaces: summarize_keys over a whole prefill and for one appended token, and
// select_scores (share_gqa) reading K itself or the summary. Two decode shapes:
// Llama-3-8B-like (32 query / 8 KV heads, D = 128) and Gemma-3-270M's global layers
// (4 / 1, D = 256). Reports times, the bytes each kernel must read and write, their
// rate, and a device-to-device cudaMemcpy bandwidth from the same run. The summary's
// bytes are checked against summarize_keys_cpu and its scores against
// select_scores_cpu (1e-5 of the logit scale) unless --no-check.
//
//   bench_key_summary [--batch 1] [--length 131072] [--dtype bf16|f16|f32] [--iters 30]
//       [--tiny] [--no-check] [--json out.json]
// --tiny: small problems and 2 iterations (for compute-sanitizer runs).
#include <cmath>
#include <random>

#include "bench_common.h"
#include "vattention/key_summary.h"
#include "vattention/select_scores.h"

using namespace vattention;

namespace {

struct Device {
  void* ptr = nullptr;
  explicit Device(size_t bytes) { BENCH_CHECK(cudaMalloc(&ptr, std::max<size_t>(bytes, 16))); }
  ~Device() { cudaFree(ptr); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
};

uint16_t to_bits16(float f, DType dtype) {
  return dtype == DType::kBFloat16 ? uint16_t(float_to_bits(f) >> 16) : to_half_rn(f).bits;
}

struct Shape {
  const char* name;
  int64_t q_heads, kv_heads, dim;
};

}  // namespace

int main(int argc, char** argv) {
  const bench::Args args{argc, argv};
  const bool tiny = args.has("--tiny");
  const bool check = !args.has("--no-check");
  const int64_t batch = args.get_int("--batch", 1);
  const int64_t length = tiny ? 1000 : args.get_int("--length", 131072);
  const int iters = tiny ? 2 : int(args.get_int("--iters", 30));
  const std::string dname = args.get("--dtype", "bf16");
  const DType dtype = dname == "f32" ? DType::kFloat32 : dname == "f16" ? DType::kFloat16
                                                                         : DType::kBFloat16;
  const int64_t elem = dtype == DType::kFloat32 ? 4 : 2;
  const Shape shapes[] = {{"llama3-8b", 32, 8, 128}, {"gemma3-270m-global", 4, 1, 256}};

  bench::Json top;
  top.field("device", bench::device_name());
  top.field("dtype", dname);
  top.field("batch", (long long)batch);
  top.field("length", (long long)length);
  const double copy_gbps = bench::copy_bandwidth_gbps(size_t(256) << 20, tiny ? 2 : 20);
  top.field("memcpy_gbps", copy_gbps);
  std::printf("device-to-device memcpy: %.0f GB/s (read + write)\n", copy_gbps);
  std::vector<bench::Json> cases;
  int failures = 0;

  for (const Shape& sh : shapes) {
    const int64_t hq = sh.q_heads, hkv = sh.kv_heads, dim = sh.dim, n = length;
    const int64_t k_elems = batch * hkv * n * dim, q_elems = batch * hq * dim;
    const int64_t code_bytes = batch * hkv * n * dim / 2;
    const int64_t param_halves = batch * hkv * n * (dim / kSummaryGroup) * 2;
    std::mt19937 rng(1234);
    std::normal_distribution<float> normal;
    std::vector<unsigned char> k_host(size_t(k_elems * elem)), q_host(size_t(q_elems * elem));
    auto fill = [&](std::vector<unsigned char>& v, int64_t count) {
      for (int64_t i = 0; i < count; ++i) {
        const float f = normal(rng);
        if (dtype == DType::kFloat32) {
          std::memcpy(&v[size_t(i * 4)], &f, 4);
        } else {
          const uint16_t b = to_bits16(f, dtype);
          std::memcpy(&v[size_t(i * 2)], &b, 2);
        }
      }
    };
    fill(k_host, k_elems);
    fill(q_host, q_elems);
    Device k{k_host.size()}, q{q_host.size()}, codes{size_t(code_bytes)},
        params{size_t(param_halves * 2)}, scores{size_t(batch * hkv * n * 4)},
        begin{size_t(batch * 8)}, lens{size_t(batch * 8)};
    BENCH_CHECK(cudaMemcpy(k.ptr, k_host.data(), k_host.size(), cudaMemcpyHostToDevice));
    BENCH_CHECK(cudaMemcpy(q.ptr, q_host.data(), q_host.size(), cudaMemcpyHostToDevice));
    const std::vector<int64_t> zeros(size_t(batch), 0), last(size_t(batch), n - 1),
        lengths(size_t(batch), n);
    BENCH_CHECK(cudaMemcpy(lens.ptr, lengths.data(), size_t(batch * 8), cudaMemcpyHostToDevice));

    KeySummaryParams s{};
    s.codes = static_cast<uint8_t*>(codes.ptr);
    s.params = static_cast<half_t*>(params.ptr);
    s.codes_row_stride = dim / 2;
    s.codes_head_stride = n * dim / 2;
    s.codes_batch_stride = hkv * n * dim / 2;
    s.params_row_stride = 2 * (dim / kSummaryGroup);
    s.params_head_stride = n * s.params_row_stride;
    s.params_batch_stride = hkv * s.params_head_stride;

    QKVParams qkv{};
    qkv.q = q.ptr;
    qkv.k = k.ptr;
    qkv.q_batch_stride = hq * dim;
    qkv.q_head_stride = dim;
    qkv.k_batch_stride = hkv * n * dim;
    qkv.k_head_stride = n * dim;
    qkv.k_row_stride = dim;
    qkv.batch = batch;
    qkv.q_heads = hq;
    qkv.kv_heads = hkv;
    qkv.length = n;
    qkv.head_dim = dim;
    qkv.dtype = dtype;
    qkv.scale = 1.f / std::sqrt(float(dim));

    // summarize_keys: prefill (every row) and decode (the last row only).
    SummarizeKeysParams build{};
    build.qkv = qkv;
    build.summary = s;
    build.row_begin = static_cast<const int64_t*>(begin.ptr);
    build.rows = n;
    build.summary_length = n;
    BENCH_CHECK(cudaMemcpy(begin.ptr, zeros.data(), size_t(batch * 8), cudaMemcpyHostToDevice));
    const double prefill_ms =
        bench::time_ms([&] { BENCH_CHECK(summarize_keys_cuda(build, nullptr)); }, iters);
    SummarizeKeysParams append = build;
    append.qkv.k = static_cast<const unsigned char*>(k.ptr) + (n - 1) * dim * elem;
    append.rows = 1;
    Device begin_last{size_t(batch * 8)};
    BENCH_CHECK(cudaMemcpy(begin_last.ptr, last.data(), size_t(batch * 8), cudaMemcpyHostToDevice));
    append.row_begin = static_cast<const int64_t*>(begin_last.ptr);
    const double append_ms =
        bench::time_ms_batched([&] { BENCH_CHECK(summarize_keys_cuda(append, nullptr)); }, iters * 10);

    // select_scores, share_gqa, from K and from the summary.
    SelectScoresParams dense{};
    dense.qkv = qkv;
    dense.lengths = lens.ptr;
    dense.lengths_int64 = true;
    dense.share_gqa = true;
    dense.scores = static_cast<float*>(scores.ptr);
    SelectScoresParams summary = dense;
    summary.qkv.k = nullptr;
    summary.summary = s;
    summary.from_summary = true;
    Device ws{std::max(select_scores_cuda_workspace_bytes(dense),
                       select_scores_cuda_workspace_bytes(summary))};
    const double dense_ms =
        bench::time_ms([&] { BENCH_CHECK(select_scores_cuda(dense, ws.ptr, nullptr)); }, iters);
    const double summary_ms =
        bench::time_ms([&] { BENCH_CHECK(select_scores_cuda(summary, ws.ptr, nullptr)); }, iters);
    BENCH_CHECK(cudaDeviceSynchronize());

    const double k_bytes = double(k_elems * elem), sum_bytes = double(code_bytes + param_halves * 2);
    // Scores: the key source plus the per-head logits written and read back (share_gqa).
    const double logit_bytes = double(batch * hq * n) * 8 + double(batch * hkv * n) * 4;
    bench::Json c;
    c.field("shape", sh.name);
    c.field("q_heads", (long long)hq);
    c.field("kv_heads", (long long)hkv);
    c.field("dim", (long long)dim);
    c.field("summarize_prefill_ms", prefill_ms);
    c.field("summarize_prefill_gbps", (k_bytes + sum_bytes) / (prefill_ms * 1e-3) / 1e9);
    c.field("summarize_append_us", append_ms * 1e3);
    c.field("select_scores_k_ms", dense_ms);
    c.field("select_scores_k_gbps", (k_bytes + logit_bytes) / (dense_ms * 1e-3) / 1e9);
    c.field("select_scores_summary_ms", summary_ms);
    c.field("select_scores_summary_gbps", (sum_bytes + logit_bytes) / (summary_ms * 1e-3) / 1e9);
    c.field("summary_over_k_bytes", sum_bytes / k_bytes);
    std::printf("%s B=%lld N=%lld %s: summarize prefill %.3f ms (%.0f GB/s), append %.2f us; "
                "select_scores from K %.3f ms, from the summary %.3f ms (%.2fx, bytes %.3f of K)\n",
                sh.name, (long long)batch, (long long)n, dname.c_str(), prefill_ms,
                (k_bytes + sum_bytes) / (prefill_ms * 1e-3) / 1e9, append_ms * 1e3, dense_ms,
                summary_ms, dense_ms / summary_ms, sum_bytes / k_bytes);

    if (check) {
      // The summary of every row (the prefill's; the append rewrote the last row alike).
      std::vector<uint8_t> codes_dev(static_cast<size_t>(code_bytes)), codes_cpu(codes_dev.size());
      std::vector<half_t> params_dev(static_cast<size_t>(param_halves)), params_cpu(params_dev.size());
      BENCH_CHECK(cudaMemcpy(codes_dev.data(), codes.ptr, codes_dev.size(), cudaMemcpyDeviceToHost));
      BENCH_CHECK(cudaMemcpy(params_dev.data(), params.ptr, params_dev.size() * 2,
                             cudaMemcpyDeviceToHost));
      SummarizeKeysParams host = build;
      host.qkv.k = k_host.data();
      host.row_begin = zeros.data();
      host.summary.codes = codes_cpu.data();
      host.summary.params = params_cpu.data();
      summarize_keys_cpu(host, 0, batch * hkv);
      int64_t bad = 0;
      for (size_t i = 0; i < codes_cpu.size(); ++i) bad += codes_cpu[i] != codes_dev[i];
      for (size_t i = 0; i < params_cpu.size(); ++i) bad += params_cpu[i].bits != params_dev[i].bits;
      std::printf("  check summary bytes: %lld mismatches\n", (long long)bad);
      failures += bad != 0;
      c.field("summary_mismatches", (long long)bad);

      std::vector<float> got(static_cast<size_t>(batch * hkv * n)), want(got.size());
      BENCH_CHECK(cudaMemcpy(got.data(), scores.ptr, got.size() * 4, cudaMemcpyDeviceToHost));
      SelectScoresParams cpu = summary;
      cpu.qkv.q = q_host.data();
      cpu.summary = host.summary;
      cpu.lengths = lengths.data();
      cpu.scores = want.data();
      select_scores_cpu(cpu, 0, batch * hkv);
      float worst = 0.f;
      for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(got[i] - want[i]));
      std::printf("  check summary scores: max |cuda - cpu| = %.3g\n", worst);
      const bool ok = worst <= 1e-4f;  // logits of O(10): fp32 summation order only
      failures += !ok;
      c.field("scores_max_abs_diff", double(worst));
    }
    cases.push_back(c);
  }
  const std::string json = args.get("--json", "");
  if (!json.empty()) bench::write_json(json, top, cases);
  return failures == 0 ? 0 : 1;
}
