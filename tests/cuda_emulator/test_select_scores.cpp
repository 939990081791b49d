// select_scores (the oracle selection scores) under the emulator against
// select_scores_cpu: head dims, groups, shared-GQA scores, splits over tiles, head
// chunks, unaligned K rows, lengths out of range (clamped) and NaN / infinite logits.
#include "emu_check.h"

#include "../../csrc/vattention/select_scores.h"

namespace vattention::emu_check {
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

}  // namespace

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

}  // namespace vattention::emu_check
