// sample_residual under the emulator against sample_residual_cpu: the same Philox
// draws (both draw sets, large seeds and offsets, no heavy columns), counts and the
// first count indices exactly, log-weights within fp32 rounding. Both kernels must
// leave every entry past a row's count as it was (sample.h: no padding writes), and
// read heavy rows of any stride (the columns between a row's width and its stride hold
// valid-looking positions, which heavy_count must not count). Row counts above the
// kernel's 256-row range and long exact rows exercise the range / grid-stride split.
#include "emu_check.h"

#include "../../csrc/vattention/sample.h"

namespace vattention::emu_check {
namespace {

constexpr int32_t kUntouched = 0x7eadbeef;

void test_sample_case(int64_t rows, int64_t heavy_max, int64_t max_out, uint64_t seed,
                      int64_t offset, uint32_t draw_set, uint32_t case_seed,
                      int64_t stride_pad = 0, int32_t span = 300) {
  std::mt19937 rng(case_seed);
  const int64_t stride = heavy_max + stride_pad;
  std::vector<int32_t> starts(rows), ends(rows), num_samples(rows);
  std::vector<int32_t> heavy(size_t(rows * stride), -1);
  for (int64_t r = 0; r < rows; ++r) {
    starts[r] = int32_t(rng() % 50);
    const int32_t width = r == 0 ? 0 : int32_t(rng() % span);
    ends[r] = starts[r] + width;
    // heavy: an ascending random subset of the window.
    std::vector<int32_t> pos;
    for (int32_t x = starts[r]; x < ends[r]; ++x) pos.push_back(x);
    std::shuffle(pos.begin(), pos.end(), rng);
    int64_t h = std::min<int64_t>(int64_t(rng() % (heavy_max + 1)), int64_t(pos.size()));
    if (r == 1) h = std::min<int64_t>(heavy_max, int64_t(pos.size()));
    std::sort(pos.begin(), pos.begin() + h);
    for (int64_t j = 0; j < h; ++j) heavy[r * stride + j] = pos[j];
    // Past the row's width: positions that would pass for heavy entries.
    for (int64_t j = heavy_max; j < stride; ++j) heavy[r * stride + j] = ends[r] + int32_t(j);
    const int32_t n_r = ends[r] - starts[r] - int32_t(h);
    const int regime = int(rng() % 6);
    const int32_t b = 1 + int32_t(rng() % 63);
    num_samples[r] = regime == 0 ? 0 : regime == 1 ? -b : regime == 2 ? n_r + b
                     : regime == 3 ? n_r : b;
  }
  int64_t rng_state[2] = {int64_t(seed), offset};
  SampleParams p{};
  p.heavy = heavy_max > 0 ? heavy.data() : nullptr;
  p.heavy_stride = stride;
  p.heavy_width = heavy_max;
  p.starts = starts.data();
  p.ends = ends.data();
  p.num_samples = num_samples.data();
  p.rng = rng_state;
  p.rows = rows;
  p.max_out = max_out;
  p.draw_set = draw_set;
  const size_t n = size_t(rows * max_out);
  const float untouched_w = bits_to_float(uint32_t(kUntouched));
  std::vector<int32_t> ri(n, kUntouched), gi(n, kUntouched), rc(rows), gc(rows, -7);
  std::vector<float> rw(n, untouched_w), gw(n, untouched_w);
  p.indices = ri.data();
  p.log_weights = rw.data();
  p.counts = rc.data();
  sample_residual_cpu(p, 0, rows);
  p.indices = gi.data();
  p.log_weights = gw.data();
  p.counts = gc.data();
  check_cuda(sample_residual_cuda(p, nullptr), "sample_residual_cuda");
  int64_t bad_idx = 0, bad_cnt = 0, bad_w = 0, written_past = 0, drawn = 0;
  for (int64_t r = 0; r < rows; ++r) {
    bad_cnt += rc[r] != gc[r] || rc[r] < 0 || rc[r] > max_out;
    for (int64_t j = 0; j < max_out; ++j) {
      const size_t i = size_t(r * max_out + j);
      if (j >= rc[r]) {
        written_past += ri[i] != kUntouched || gi[i] != kUntouched ||
                        float_to_bits(rw[i]) != uint32_t(kUntouched) ||
                        float_to_bits(gw[i]) != uint32_t(kUntouched);
        continue;
      }
      ++drawn;
      bad_idx += ri[i] != gi[i] || ri[i] < starts[r] || ri[i] >= ends[r];
      if (std::fabs(rw[i] - gw[i]) > 2e-7f * std::max(1.f, std::fabs(rw[i]))) ++bad_w;
    }
  }
  EXPECT(bad_cnt == 0 && bad_idx == 0 && bad_w == 0 && written_past == 0,
         "sample rows=%lld heavy=%lld stride=%lld max_out=%lld seed=%llu off=%lld "
         "draw_set=%u: counts %lld indices %lld weights %lld mismatches, %lld entries past "
         "the count written (%lld drawn)",
         (long long)rows, (long long)heavy_max, (long long)stride, (long long)max_out,
         (unsigned long long)seed, (long long)offset, draw_set, (long long)bad_cnt,
         (long long)bad_idx, (long long)bad_w, (long long)written_past, (long long)drawn);
}

}  // namespace

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
  test_sample_case(20, 0, 33, 9, 1, 1, cs++);       // no heavy columns
  test_sample_case(20, 0, 33, 9, 1, 1, cs++, 5);    // none, over a wider row
  test_sample_case(48, 24, 64, 5, 2, 1, cs++, 13);  // strided heavy rows
  test_sample_case(600, 16, 40, 11, 4, 0, cs++, 3); // three row ranges
  // Long rows (enumerated up to 1500 entries) spread over every block of the range.
  test_sample_case(40, 64, 1600, 21, 6, 1, cs++, 0, 1600);
}

}  // namespace vattention::emu_check
