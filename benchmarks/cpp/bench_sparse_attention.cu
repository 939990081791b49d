// Benchmark of the CUDA sparse attention (split-K partials + combine) on the
// decode shape of docs/algorithm.md section 10: B=1, 32 query / 8 KV heads, D=128,
// bf16, N=131072, a sorted random 10% of the rows per KV head (one list per KV
// head, shared by its 4 query heads). Reports the time and the bandwidth
// achieved on the bytes that must be read (the gathered K and V rows), next to
// a device-to-device cudaMemcpy bandwidth (read + write bytes / time) measured in
// the same run. A second case gives every query head its own list. Outputs are
// checked against the CPU kernels unless --no-check.
//
//   bench_sparse_attention [--batch 1] [--q-heads 32] [--kv-heads 8] [--dim 128]
//       [--length 131072] [--density 0.1] [--dtype bf16|f16|f32] [--iters 50]
//       [--splits 0] [--tiny] [--no-check] [--json out.json]
// --tiny: a small problem and 2 iterations (for compute-sanitizer runs).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "bench_common.h"
#include "vattention/combine.h"
#include "vattention/heuristics.h"
#include "vattention/sparse_attention.h"

using namespace vattention;

namespace {

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

uint16_t to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs < 0x38800000u) return uint16_t(sign);
  const uint32_t mant = abs & 0x7fffffu;
  const uint32_t exp = (abs >> 23) - 127 + 15;
  uint32_t h = (exp << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

struct Device {
  void* ptr = nullptr;
  explicit Device(size_t bytes) { BENCH_CHECK(cudaMalloc(&ptr, std::max<size_t>(bytes, 16))); }
  ~Device() { cudaFree(ptr); }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr); }
};

}  // namespace

int main(int argc, char** argv) {
  const bench::Args args{argc, argv};
  const bool tiny = args.has("--tiny");
  const int64_t batch = args.get_int("--batch", 1);
  const int64_t q_heads = args.get_int("--q-heads", tiny ? 8 : 32);
  const int64_t kv_heads = args.get_int("--kv-heads", tiny ? 2 : 8);
  const int64_t dim = args.get_int("--dim", 128);
  const int64_t length = args.get_int("--length", tiny ? 4096 : 131072);
  const double density = args.get_double("--density", 0.1);
  const int iters = int(args.get_int("--iters", tiny ? 2 : 50));
  const int64_t splits_arg = args.get_int("--splits", 0);
  const bool check = !args.has("--no-check");
  const std::string dtype_name = args.get("--dtype", "bf16");
  const DType dtype = dtype_name == "f32" ? DType::kFloat32
                      : dtype_name == "f16" ? DType::kFloat16 : DType::kBFloat16;
  const size_t elem = dtype == DType::kFloat32 ? 4 : 2;
  const int64_t count = std::max<int64_t>(1, int64_t(std::llround(density * double(length))));

  // q, K, V: random normal values in the chosen dtype.
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto fill = [&](std::vector<unsigned char>& buf, int64_t n) {
    buf.resize(size_t(n) * elem);
    for (int64_t i = 0; i < n; ++i) {
      const float x = normal(rng);
      if (dtype == DType::kFloat32) {
        std::memcpy(&buf[size_t(i) * 4], &x, 4);
      } else {
        const uint16_t b = dtype == DType::kBFloat16 ? to_bf16(x) : to_half(x);
        std::memcpy(&buf[size_t(i) * 2], &b, 2);
      }
    }
  };
  std::vector<unsigned char> hq, hk, hv;
  const int64_t kv_elems = batch * kv_heads * length * dim;
  fill(hq, batch * q_heads * dim);
  fill(hk, kv_elems);
  fill(hv, kv_elems);
  Device dq(hq.size()), dk(hk.size()), dv(hv.size());
  BENCH_CHECK(cudaMemcpy(dq.ptr, hq.data(), hq.size(), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(dk.ptr, hk.data(), hk.size(), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(dv.ptr, hv.data(), hv.size(), cudaMemcpyHostToDevice));

  QKVParams qkv{};
  qkv.q = dq.ptr;
  qkv.k = dk.ptr;
  qkv.v = dv.ptr;
  qkv.q_batch_stride = q_heads * dim;
  qkv.q_head_stride = dim;
  qkv.k_batch_stride = qkv.v_batch_stride = kv_heads * length * dim;
  qkv.k_head_stride = qkv.v_head_stride = length * dim;
  qkv.k_row_stride = qkv.v_row_stride = dim;
  qkv.batch = batch;
  qkv.q_heads = q_heads;
  qkv.kv_heads = kv_heads;
  qkv.length = length;
  qkv.head_dim = dim;
  qkv.dtype = dtype;
  qkv.scale = 1.f / std::sqrt(float(dim));

  bench::Json top;
  top.field("benchmark", "sparse_attention");
  top.field("device", bench::device_name());
  top.field("batch", (long long)batch);
  top.field("q_heads", (long long)q_heads);
  top.field("kv_heads", (long long)kv_heads);
  top.field("head_dim", (long long)dim);
  top.field("length", (long long)length);
  top.field("rows_per_list", (long long)count);
  top.field("dtype", dtype_name);
  const size_t copy_bytes = tiny ? (size_t(16) << 20) : (size_t(512) << 20);
  const double copy_gbps = bench::copy_bandwidth_gbps(copy_bytes, tiny ? 2 : 20);
  top.field("copy_gbps_read_plus_write", copy_gbps);
  std::printf("device-to-device cudaMemcpy of %zu MiB: %.1f GB/s (read + write bytes / time)\n",
              copy_bytes >> 20, copy_gbps);
  std::vector<bench::Json> cases;
  bool all_ok = true;

  for (int per_q = 0; per_q < 2; ++per_q) {
    const int64_t list_heads = per_q ? q_heads : kv_heads;
    const int64_t lists = batch * list_heads;
    // Sorted random subsets of the rows, one per list.
    std::vector<int32_t> indices(size_t(lists * count));
    std::vector<int32_t> perm(length);
    for (int64_t l = 0; l < lists; ++l) {
      std::iota(perm.begin(), perm.end(), 0);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t j = i + int64_t(rng() % uint64_t(length - i));
        std::swap(perm[i], perm[j]);
      }
      std::sort(perm.begin(), perm.begin() + count);
      std::copy(perm.begin(), perm.begin() + count, indices.begin() + l * count);
    }
    std::vector<int32_t> counts(lists, int32_t(count));
    Device d_idx(indices.size() * 4), d_counts(counts.size() * 4);
    BENCH_CHECK(cudaMemcpy(d_idx.ptr, indices.data(), indices.size() * 4, cudaMemcpyHostToDevice));
    BENCH_CHECK(cudaMemcpy(d_counts.ptr, counts.data(), counts.size() * 4, cudaMemcpyHostToDevice));

    SparseAttentionParams p{};
    p.qkv = qkv;
    p.list.indices = d_idx.as<int32_t>();
    p.list.log_weights = nullptr;
    p.list.counts = d_counts.as<int32_t>();
    p.list.list_heads = list_heads;
    p.list.max_count = count;
    // Automatic: the balanced split-K of the ops (heuristics.h): a grid for the capacity,
    // each list using the splits its own count needs. --splits N cuts every list into N.
    if (splits_arg > 0) {
      p.num_splits = splits_arg;
    } else {
      p.num_splits = choose_split_grid(count, bench::sm_count());
      p.split_target_blocks = kBlocksPerWorker * bench::sm_count();
    }
    const int64_t heads = batch * q_heads;
    Device d_pout(size_t(heads * p.num_splits * dim) * 4), d_plse(size_t(heads * p.num_splits) * 4);
    Device d_out(size_t(heads * dim) * 4), d_lse(size_t(heads) * 4);
    p.partial_out = d_pout.as<float>();
    p.partial_lse = d_plse.as<float>();
    const CombineParams c = combine_layout(p.partial_out, p.partial_lse, heads, p.num_splits,
                                           dim, false, d_out.as<float>(), d_lse.as<float>());

    auto partial = [&] { BENCH_CHECK(sparse_attention_partial_cuda(p, nullptr)); };
    auto both = [&] {
      BENCH_CHECK(sparse_attention_partial_cuda(p, nullptr));
      BENCH_CHECK(combine_cuda(c, nullptr));
    };
    const double ms_partial = bench::time_ms(partial, iters);
    const double ms_total = bench::time_ms(both, iters);
    const double ms_total_b2b = bench::time_ms_batched(both, iters);
    // Bytes that must be read: each listed K and V row once per list.
    const double bytes = double(lists) * double(count) * 2.0 * double(dim) * double(elem);
    const double gbps_partial = bytes / (ms_partial * 1e-3) / 1e9;
    const double gbps_total = bytes / (ms_total * 1e-3) / 1e9;

    std::string status = "skipped";
    if (check) {
      std::vector<float> got(size_t(heads * dim)), got_lse(heads);
      BENCH_CHECK(cudaMemcpy(got.data(), d_out.ptr, got.size() * 4, cudaMemcpyDeviceToHost));
      BENCH_CHECK(cudaMemcpy(got_lse.data(), d_lse.ptr, got_lse.size() * 4, cudaMemcpyDeviceToHost));
      SparseAttentionParams h = p;
      h.qkv.q = hq.data();
      h.qkv.k = hk.data();
      h.qkv.v = hv.data();
      h.list.indices = indices.data();
      h.list.counts = counts.data();
      std::vector<float> po(size_t(heads * p.num_splits * dim)), pl(size_t(heads * p.num_splits));
      h.partial_out = po.data();
      h.partial_lse = pl.data();
      sparse_attention_partial_cpu(h, 0, heads * p.num_splits);
      CombineParams hc = c;
      std::vector<float> ref(size_t(heads * dim)), ref_lse(heads);
      hc.partial_out = po.data();
      hc.partial_lse = pl.data();
      hc.out = ref.data();
      hc.lse = ref_lse.data();
      combine_cpu(hc, 0, heads);
      double worst = 0.0;
      for (size_t i = 0; i < ref.size(); ++i) {
        worst = std::max(worst, double(std::fabs(got[i] - ref[i])) / (1e-3 + std::fabs(ref[i])));
      }
      for (int64_t i = 0; i < heads; ++i) {
        worst = std::max(worst, double(std::fabs(got_lse[i] - ref_lse[i])) / (1e-3 + std::fabs(ref_lse[i])));
      }
      const bool ok = worst < 1e-3;
      status = ok ? "pass" : "FAIL";
      all_ok = all_ok && ok;
      std::printf("  check against the CPU kernels: worst relative error %.3g (%s)\n", worst,
                  status.c_str());
    }
    const char* name = per_q ? "list_per_q_head" : "list_per_kv_head";
    std::printf("sparse_attention %s: B=%lld Hq=%lld Hkv=%lld D=%lld N=%lld rows/list=%lld %s "
                "splits=%lld\n  partials %.4f ms = %.1f GB/s (%.0f%% of copy); with combine %.4f ms "
                "= %.1f GB/s (%.0f%% of copy); back-to-back %.4f ms; %.1f MB gathered\n",
                name, (long long)batch, (long long)q_heads, (long long)kv_heads, (long long)dim,
                (long long)length, (long long)count, dtype_name.c_str(), (long long)p.num_splits,
                ms_partial, gbps_partial, 100.0 * gbps_partial / copy_gbps, ms_total, gbps_total,
                100.0 * gbps_total / copy_gbps, ms_total_b2b, bytes / 1e6);
    bench::Json j;
    j.field("name", name);
    j.field("list_heads", (long long)list_heads);
    j.field("num_splits", (long long)p.num_splits);
    j.field("bytes_gathered", bytes);
    j.field("ms_partial", ms_partial);
    j.field("ms_with_combine", ms_total);
    j.field("ms_with_combine_back_to_back", ms_total_b2b);
    j.field("gbps_partial", gbps_partial);
    j.field("gbps_with_combine", gbps_total);
    j.field("fraction_of_copy_partial", gbps_partial / copy_gbps);
    j.field("fraction_of_copy_with_combine", gbps_total / copy_gbps);
    j.field("check", status);
    cases.push_back(j);
  }
  const std::string json = args.get("--json", "");
  if (!json.empty()) bench::write_json(json, top, cases);
  return all_ok ? 0 : 1;
}
