// Shared helpers of the C++ benchmarks: error checks, argument parsing, event
// timing and a minimal JSON writer. CUDA runtime only (no torch).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "vattention/device_info.h"

#define BENCH_CHECK(expr)                                                              \
  do {                                                                                 \
    const cudaError_t bench_err_ = (expr);                                             \
    if (bench_err_ != cudaSuccess) {                                                   \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr,        \
                   cudaGetErrorString(bench_err_));                                    \
      std::exit(2);                                                                    \
    }                                                                                  \
  } while (0)

namespace bench {

struct Args {
  int argc;
  char** argv;
  bool has(const char* name) const {
    for (int i = 1; i < argc; ++i) {
      if (std::strcmp(argv[i], name) == 0) return true;
    }
    return false;
  }
  std::string get(const char* name, const std::string& fallback) const {
    for (int i = 1; i + 1 < argc; ++i) {
      if (std::strcmp(argv[i], name) == 0) return argv[i + 1];
    }
    return fallback;
  }
  long long get_int(const char* name, long long fallback) const {
    const std::string s = get(name, "");
    return s.empty() ? fallback : std::atoll(s.c_str());
  }
  double get_double(const char* name, double fallback) const {
    const std::string s = get(name, "");
    return s.empty() ? fallback : std::atof(s.c_str());
  }
};

// Median time in ms of `iters` runs of fn (each timed with events), after warmup.
template <typename Fn>
double time_ms(Fn&& fn, int iters, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) fn();
  BENCH_CHECK(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int i = 0; i < iters; ++i) {
    BENCH_CHECK(cudaEventRecord(start));
    fn();
    BENCH_CHECK(cudaEventRecord(stop));
    BENCH_CHECK(cudaEventSynchronize(stop));
    float ms = 0.f;
    BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  BENCH_CHECK(cudaEventDestroy(start));
  BENCH_CHECK(cudaEventDestroy(stop));
  std::vector<float> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  return sorted.empty() ? 0.0 : double(sorted[sorted.size() / 2]);
}

// Mean time in ms per call of `iters` back-to-back calls (launch overheads overlap).
template <typename Fn>
double time_ms_batched(Fn&& fn, int iters, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) fn();
  BENCH_CHECK(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  BENCH_CHECK(cudaEventRecord(start));
  for (int i = 0; i < iters; ++i) fn();
  BENCH_CHECK(cudaEventRecord(stop));
  BENCH_CHECK(cudaEventSynchronize(stop));
  float ms = 0.f;
  BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
  BENCH_CHECK(cudaEventDestroy(start));
  BENCH_CHECK(cudaEventDestroy(stop));
  return double(ms) / iters;
}

// Device-to-device cudaMemcpy of `bytes`: returns (read + write bytes) / time in GB/s.
inline double copy_bandwidth_gbps(size_t bytes, int iters) {
  void* a = nullptr;
  void* b = nullptr;
  BENCH_CHECK(cudaMalloc(&a, bytes));
  BENCH_CHECK(cudaMalloc(&b, bytes));
  BENCH_CHECK(cudaMemset(a, 1, bytes));
  const double ms = time_ms_batched([&] { BENCH_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); },
                                    iters);
  BENCH_CHECK(cudaFree(a));
  BENCH_CHECK(cudaFree(b));
  return 2.0 * double(bytes) / (ms * 1e-3) / 1e9;
}

inline std::string device_name() {
  int device = 0;
  BENCH_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

// The SM count the kernels' launchers see (the library's device_info.h cache).
inline int sm_count() {
  vattention::DeviceInfo info;
  BENCH_CHECK(vattention::current_device_info(&info));
  return info.num_sms;
}

// A flat JSON object writer: {"key": value, ..., "cases": [{...}, ...]}.
class Json {
 public:
  void field(const std::string& k, const std::string& v) { add(k, "\"" + escape(v) + "\""); }
  void field(const std::string& k, const char* v) { field(k, std::string(v)); }
  void field(const std::string& k, double v) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.6g", v);
    add(k, buf);
  }
  void field(const std::string& k, long long v) { add(k, std::to_string(v)); }
  void field(const std::string& k, int v) { add(k, std::to_string(v)); }
  void field(const std::string& k, bool v) { add(k, v ? "true" : "false"); }
  void raw(const std::string& k, const std::string& json) { add(k, json); }
  std::string str() const { return "{" + body_ + "}"; }

 private:
  static std::string escape(const std::string& s) {
    std::string o;
    for (char c : s) {
      if (c == '"' || c == '\\') o += '\\';
      o += c;
    }
    return o;
  }
  void add(const std::string& k, const std::string& v) {
    if (!body_.empty()) body_ += ", ";
    body_ += "\"" + escape(k) + "\": " + v;
  }
  std::string body_;
};

inline void write_json(const std::string& path, const Json& top, const std::vector<Json>& cases) {
  std::string s = top.str();
  s.pop_back();
  s += std::string(s.size() > 1 ? ", " : "") + "\"cases\": [";
  for (size_t i = 0; i < cases.size(); ++i) s += (i ? ", " : "") + cases[i].str();
  s += "]}\n";
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fputs(s.c_str(), f);
  std::fclose(f);
}

}  // namespace bench
