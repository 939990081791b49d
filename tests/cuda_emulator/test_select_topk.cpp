// select_topk under the emulator against select_topk_cpu, index for index: the
// radix path (any k: clusters, no clusters, without the shared-memory key cache) and
// the warp-select path for k_max <= 256, over ties, NaN, infinities and +-0.
#include "emu_check.h"

#include "../../csrc/vattention/select_topk.h"
#include "emu_runtime.h"

namespace vattention::emu_check {
namespace {

// out_pad > 0: output rows out_pad entries apart beyond k_max (select_topk_into's
// column slice of a wider list); the gaps must keep their sentinel.
void test_select_topk_case(DType dtype, int64_t rows, int64_t length, int64_t k_max, int value_range,
                    bool specials, uint32_t seed, const char* label, int64_t out_pad = 0) {
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
  const int64_t ostride = k_max + out_pad;
  p.index_row_stride = ostride;
  std::vector<int32_t> ref(size_t(rows * ostride), 12345), got(size_t(rows * ostride), 12345);
  p.indices = ref.data();
  select_topk_cpu(p, 0, rows);
  p.indices = got.data();
  check_cuda(select_topk_cuda(p, nullptr, nullptr), "select_topk_cuda");
  int64_t bad = 0, gap_writes = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    bad += ref[i] != got[i];
    if (int64_t(i) % ostride >= k_max) gap_writes += (ref[i] != 12345) + (got[i] != 12345);
  }
  EXPECT(bad == 0 && gap_writes == 0, "select_topk %s %s rows=%lld length=%lld k_max=%lld "
         "out_pad=%lld: %lld mismatches, %lld writes between rows", label, dtype_name(dtype),
         (long long)rows, (long long)length, (long long)k_max, (long long)out_pad,
         (long long)bad, (long long)gap_writes);
  if (bad) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < k_max; ++j) {
        if (ref[r * ostride + j] != got[r * ostride + j]) {
          std::fprintf(stderr, "  row %lld (start %d end %d k %d) slot %lld: cpu %d cuda %d\n",
                       (long long)r, starts[r], ends[r], ks[r], (long long)j,
                       ref[r * ostride + j], got[r * ostride + j]);
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
  p.index_row_stride = p.k_max;
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

}  // namespace

void test_select_topk() {
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (DType d : dtypes) {
    test_select_topk_case(d, 8, 1, 4, 255, false, 1, "tiny");
    test_select_topk_case(d, 8, 7, 10, 255, true, 2, "specials");
    test_select_topk_case(d, 12, 64, 30, 3, true, 3, "ties");
    test_select_topk_case(d, 6, 5000, 300, 255, false, 4, "mid");
    // Output rows a wider list's stride apart (decode's heavy columns), both paths.
    test_select_topk_case(d, 7, 700, 10, 255, true, 10, "strided-out-warp", 37);
    test_select_topk_case(d, 5, 3000, 300, 255, true, 11, "strided-out-radix", 5);
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

}  // namespace vattention::emu_check
