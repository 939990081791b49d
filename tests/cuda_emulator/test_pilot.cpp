// pilot_stats under the emulator against pilot_stats_cpu (max logit, moments and
// vector moments within fp32 summation tolerance, with and without split-K), and
// the NaN rule: a NaN the pilot reads reaches every statistic it feeds.
#include "emu_check.h"

#include "../../csrc/vattention/heuristics.h"
#include "../../csrc/vattention/pilot.h"

namespace vattention::emu_check {
namespace {

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

// Balanced splits (heuristics.h): the grid of choose_split_grid with each list using
// only the splits its count needs, against pilot_stats_cpu. Row length - 1 of every
// K/V head is NaN and only entries beyond a list's count name it, so a block that
// read past its count would make the head's statistics NaN; the counts are cycled
// over the lists.
// op_grid: the grid pilot_stats_cuda_op launches (pilot.h's pilot_split_grid: one
// split, one kernel, for lists of at most kPilotOneSplitRows) instead of
// choose_split_grid's.
void test_pilot_balanced_case(DType dtype, int64_t dim, int64_t group, bool per_q,
                              int64_t max_count, const std::vector<int32_t>& counts,
                              int64_t workers, int64_t batch, uint32_t seed,
                              bool op_grid = false) {
  std::mt19937 rng(seed);
  const int64_t kv_heads = 2, q_heads = kv_heads * group, length = max_count + 40;
  QKV t = make_qkv(dtype, batch, q_heads, kv_heads, length, dim, 0, 0, rng);
  const int64_t list_heads = per_q ? q_heads : kv_heads;
  Lists l = make_lists(batch, list_heads, max_count, length, rng);
  const float nan = std::nanf("");
  for (int64_t i = 0; i < batch * list_heads; ++i) {
    l.counts[i] = counts[size_t(i) % counts.size()];
    for (int64_t j = 0; j < max_count; ++j) {
      l.indices[size_t(i * max_count + j)] =
          j < l.counts[i] ? int32_t(rng() % uint64_t(length - 1)) : int32_t(length - 1);
    }
  }
  const QKVParams& a = t.params;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t row =
          b * a.k_batch_stride + h * a.k_head_stride + (length - 1) * a.k_row_stride;
      for (int64_t d = 0; d < dim; ++d) {
        t.k.set(size_t(row + d), nan);
        t.v.set(size_t(row + d), nan);
      }
    }
  }
  PilotParams p{};
  p.qkv = t.params;
  p.list = l.params;
  p.list.log_weights = nullptr;
  const int64_t heads = batch * q_heads;
  std::vector<float> rm(heads), gm(heads, 777.f), rmo(heads * 3), gmo(heads * 3, 777.f),
      rv(heads * 2 * dim), gv(heads * 2 * dim, 777.f);
  p.max_logit = rm.data();
  p.moments = rmo.data();
  p.vector_moments = rv.data();
  pilot_stats_cpu(p, 0, heads);
  p.max_logit = gm.data();
  p.moments = gmo.data();
  p.vector_moments = gv.data();
  const int64_t grid =
      op_grid ? pilot_split_grid(max_count, workers) : choose_split_grid(max_count, workers);
  p.split_target_blocks = kBlocksPerWorker * workers;
  if (op_grid) {
    // One kernel exactly up to the bound: no workspace, so no merge kernel.
    EXPECT((grid == 1) == (max_count <= kPilotOneSplitRows) &&
               (pilot_stats_cuda_workspace_bytes(p, grid) == 0) == (grid == 1),
           "pilot_split_grid(%lld, %lld) = %lld", (long long)max_count, (long long)workers,
           (long long)grid);
  }
  std::vector<unsigned char> ws(pilot_stats_cuda_workspace_bytes(p, grid));
  check_cuda(pilot_stats_cuda(p, grid, ws.empty() ? nullptr : ws.data(), nullptr),
             "pilot_stats_cuda");
  int64_t bad = 0;
  for (int64_t i = 0; i < heads; ++i) bad += !close(gm[i], rm[i], 1e-5f, 1e-5f);
  for (int64_t i = 0; i < heads * 3; ++i) bad += !close(gmo[i], rmo[i], 1e-4f, 1e-4f);
  for (int64_t i = 0; i < heads * 2 * dim; ++i) bad += !close(gv[i], rv[i], 1e-4f, 1e-4f);
  EXPECT(bad == 0, "balanced pilot %s D=%lld group=%lld per_q=%d max_count=%lld grid=%lld: "
         "%lld mismatches", dtype_name(dtype), (long long)dim, (long long)group, int(per_q),
         (long long)max_count, (long long)grid, (long long)bad);
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

// Centers near the data's scale, so that the terms' spread is not only their mean.
std::vector<float> make_center(int64_t heads, int64_t dim, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 0.3f);
  std::vector<float> center(size_t(heads * dim));
  for (float& c : center) c = normal(rng);
  return center;
}

void run_dispersion(PilotDispersionParams p, std::vector<float>* cpu, std::vector<float>* gpu) {
  const int64_t heads = p.qkv.batch * p.qkv.q_heads;
  cpu->assign(size_t(heads * kDispersionOutputs), 0.f);
  gpu->assign(size_t(heads * kDispersionOutputs), 777.f);
  p.dispersion = cpu->data();
  pilot_dispersion_cpu(p, 0, heads);
  p.dispersion = gpu->data();
  std::vector<unsigned char> ws(pilot_dispersion_cuda_workspace_bytes(p));
  check_cuda(pilot_dispersion_cuda(p, ws.empty() ? nullptr : ws.data(), nullptr),
             "pilot_dispersion_cuda");
}

void test_dispersion_case(DType dtype, int64_t dim, int64_t group, bool per_q, int64_t max_count,
                          int64_t row_pad, int64_t base_offset, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t batch = 2, kv_heads = 2, q_heads = kv_heads * group, length = 53;
  QKV t = make_qkv(dtype, batch, q_heads, kv_heads, length, dim, row_pad, base_offset, rng);
  Lists l = make_lists(batch, per_q ? q_heads : kv_heads, max_count, length, rng);
  std::vector<float> center = make_center(batch * q_heads, dim, rng);
  PilotDispersionParams p{};
  p.qkv = t.params;
  p.list = l.params;
  p.list.log_weights = nullptr;
  p.center = center.data();
  std::vector<float> cpu, gpu;
  run_dispersion(p, &cpu, &gpu);
  int64_t bad = 0;
  for (size_t i = 0; i < cpu.size(); ++i) bad += !close(gpu[i], cpu[i], 1e-3f, 1e-3f);
  EXPECT(bad == 0, "pilot_dispersion %s D=%lld group=%lld per_q=%d max_count=%lld pad=%lld "
         "offset=%lld: %lld mismatches", dtype_name(dtype), (long long)dim, (long long)group,
         int(per_q), (long long)max_count, (long long)row_pad, (long long)base_offset,
         (long long)bad);
}

void test_dispersion_nan_case(DType dtype, int64_t dim, int64_t group, bool per_q, NanAt at,
                              uint32_t seed) {
  NanCase c = make_nan_case(dtype, dim, group, per_q, 37, at, seed);
  std::mt19937 rng(seed + 1);
  std::vector<float> center = make_center(c.batch * c.q_heads, dim, rng);
  PilotDispersionParams p{};
  p.qkv = c.t.params;
  p.list = c.l.params;
  p.list.log_weights = nullptr;
  p.center = center.data();
  std::vector<float> cpu, gpu;
  run_dispersion(p, &cpu, &gpu);
  int64_t bad = 0, wrong = 0;
  for (size_t i = 0; i < cpu.size(); ++i) bad += !same(gpu[i], cpu[i], 1e-3f, 1e-3f);
  for (int pass = 0; pass < 2; ++pass) {
    const std::vector<float>& out = pass ? gpu : cpu;
    for (int64_t h = 0; h < c.batch * c.q_heads; ++h) {
      for (int x = 0; x < kDispersionOutputs; ++x) {
        wrong += std::isnan(out[size_t(h * kDispersionOutputs + x)]) != bool(c.reads[h]);
      }
    }
  }
  EXPECT(bad == 0 && wrong == 0, "pilot_dispersion NaN in %s %s D=%lld group=%lld per_q=%d: "
         "%lld cpu/cuda mismatches, %lld outputs against the NaN rule", nan_at_name(at),
         dtype_name(dtype), (long long)dim, (long long)group, int(per_q), (long long)bad,
         (long long)wrong);
}

}  // namespace

void test_pilot() {
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  // The seeds are those the cases had when they ran in one loop with sparse
  // attention's (attention even, pilot odd, then 8 attention cases), so each keeps
  // the data it was checked on.
  uint32_t seed = 1001;
  for (DType d : dtypes) {
    for (int64_t dim : {64, 128, 256}) {
      for (int64_t group : {1, 4, 7}) {
        for (bool per_q : {false, true}) {
          if (g_quick && (dim == 256 || per_q) && group != 4) continue;
          test_pilot_case(d, dim, group, per_q, 17, 1, 0, 0, seed);
          seed += 2;
        }
      }
    }
  }
  seed += 7;
  // Split-K through the workspace.
  test_pilot_case(DType::kBFloat16, 128, 4, false, 300, 5, 0, 0, seed++);
  test_pilot_case(DType::kFloat32, 64, 7, false, 150, 3, 0, 0, seed++);
  test_pilot_case(DType::kFloat16, 256, 1, true, 100, 4, 1, 1, seed++);
  test_pilot_case(DType::kBFloat16, 64, 4, false, 0, 1, 0, 0, seed++);  // max_count 0
  // Balanced splits: one list far longer than the rest, counts 0 / 1 / capacity, many
  // lists, all at capacity, all empty.
  {
    uint32_t bseed = 21001;
    test_pilot_balanced_case(DType::kBFloat16, 64, 4, false, 1500, {1500, 30, 0, 1}, 16, 2,
                             bseed++);
    test_pilot_balanced_case(DType::kFloat32, 128, 4, true, 700,
                             {700, 0, 1, 129, 300, 650, 128, 2, 513, 64, 257}, 64, 3, bseed++);
    test_pilot_balanced_case(DType::kFloat16, 64, 7, false, 400, {400}, 8, 2, bseed++);
    test_pilot_balanced_case(DType::kFloat32, 64, 1, true, 300, {0}, 16, 2, bseed++);
    // The op's grid at the one-kernel bound (pilot.h): 512 entries in one split per
    // list, 513 in split-K (4 splits of the 132-SM grid) and the merge kernel.
    test_pilot_balanced_case(DType::kBFloat16, 128, 4, false, kPilotOneSplitRows,
                             {int32_t(kPilotOneSplitRows), 3, 0, 511}, 132, 1, bseed++, true);
    test_pilot_balanced_case(DType::kFloat16, 64, 7, true, kPilotOneSplitRows + 1,
                             {int32_t(kPilotOneSplitRows) + 1, 1, 0, 200}, 132, 1, bseed++,
                             true);
  }

  // NaN propagation (emu_check.h); seeds odd, interleaved with sparse attention's.
  const NanAt places[] = {NanAt::kQuery, NanAt::kKeyRow, NanAt::kValueRow, NanAt::kUnlistedRow};
  seed = 9001;
  for (DType d : dtypes) {
    for (NanAt at : places) {
      for (bool per_q : {false, true}) {
        // One split, several, and more splits than one row group can fill.
        for (int64_t splits : {int64_t(1), int64_t(3), int64_t(11)}) {
          if (g_quick && d != DType::kFloat32 && splits == 11) continue;
          test_pilot_nan_case(d, 64, 4, per_q, splits, at, seed);
          seed += 2;
        }
      }
    }
  }
  // Wider rows and groups (two head chunks).
  test_pilot_nan_case(DType::kBFloat16, 128, 8, false, 2, NanAt::kValueRow, seed);
  seed += 2;
  test_pilot_nan_case(DType::kFloat32, 256, 1, true, 1, NanAt::kKeyRow, seed);

  // pilot_dispersion (one block per head): every dtype and head dim, both list kinds,
  // lists longer than one tile, padded rows, and the NaN rule.
  seed = 12001;
  for (DType d : dtypes) {
    for (int64_t dim : {64, 128, 256}) {
      for (bool per_q : {false, true}) {
        if (g_quick && dim == 256 && per_q) continue;
        test_dispersion_case(d, dim, 4, per_q, 40, 0, 0, seed++);
      }
    }
  }
  test_dispersion_case(DType::kFloat32, 64, 7, false, 150, 1, 1, seed++);
  test_dispersion_case(DType::kBFloat16, 128, 1, true, 3, 0, 0, seed++);
  test_dispersion_case(DType::kFloat16, 64, 4, false, 0, 0, 0, seed++);  // max_count 0
  for (DType d : dtypes) {
    for (NanAt at : places) {
      test_dispersion_nan_case(d, 64, 4, false, at, seed++);
      if (!g_quick) test_dispersion_nan_case(d, 128, 1, true, at, seed++);
    }
  }
}

}  // namespace vattention::emu_check
