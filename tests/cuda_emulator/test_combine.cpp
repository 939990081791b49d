// combine under the emulator against combine_cpu: the [splits, items, D] layout with
// more than 32 splits and a head dim not a multiple of 32, and the NaN rule of the
// merge. (Combine of real attention partials, [items, splits, D], runs in
// test_sparse_attention.cpp.) And merge_estimate, the estimate's partials merged and cast.
#include "emu_check.h"

#include "../../csrc/vattention/combine.h"

namespace vattention::emu_check {
namespace {

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
  std::vector<float> ro(items * dim), rl(items), go(items * dim), gl(items);
  CombineParams c =
      combine_layout(po.data(), pl.data(), items, splits, dim, true, ro.data(), rl.data());
  combine_cpu(c, 0, items);
  c.out = go.data();
  c.lse = gl.data();
  check_cuda(combine_cuda(c, nullptr), "combine_cuda");
  int64_t bad = 0;
  for (int64_t i = 0; i < items; ++i) bad += !close(gl[i], rl[i], 1e-5f, 1e-5f);
  for (int64_t i = 0; i < items * dim; ++i) bad += !close(go[i], ro[i], 1e-5f, 1e-5f);
  EXPECT(bad == 0, "combine splits-first: %lld mismatches", (long long)bad);
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
  std::vector<float> ro(items * dim), rl(items), go(items * dim, 777.f), gl(items, 777.f);
  CombineParams c =
      combine_layout(po.data(), pl.data(), items, splits, dim, true, ro.data(), rl.data());
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


// merge_estimate (combine.h) under the emulator against merge_estimate_cpu: reuse on / off,
// the extra partial present / absent, fp32 / fp64 statistics, out dtypes, GQA groups, lists
// with reused == 0 and count 0, NaN in a partial's lse and out, all-empty heads; the sample
// merged (splits 1) or as split partials (splits > 1: empty splits holding NaN out, a NaN
// split lse), which on the CPU must equal merge_estimate of combine_cpu's merge bit for bit.
template <typename Stat>
void check_merge_estimate(bool reuse, bool extra, DType out_dtype, int64_t group,
                          uint32_t seed, int64_t splits = 1) {
  std::mt19937 rng(seed);
  const int64_t batch = 2, list_heads = 3, dim = 40;  // dim not a multiple of 32
  const int64_t lists = batch * list_heads, heads = lists * group;
  auto values = [&](int64_t n, float empty_share) {
    std::vector<float> v(n);
    for (auto& x : v) x = (rng() % 1000) < uint32_t(empty_share * 1000) ? -INFINITY
                                                                         : grid_value(rng);
    return v;
  };
  std::vector<float> det_out = values(heads * dim, 0), det_lse = values(heads, 0.2f);
  std::vector<float> ext_out = values(heads * dim, 0), ext_lse = values(heads, 0.2f);
  std::vector<float> smp_out = values(heads * splits * dim, 0);
  std::vector<float> smp_lse = values(heads * splits, splits > 1 ? 0.4f : 0.2f);
  std::vector<float> max_logit = values(heads, 0);
  std::vector<Stat> moments(heads * 3), vector_moments(heads * 2 * dim);
  std::vector<int64_t> n_residual(heads);
  for (int64_t h = 0; h < heads; ++h) {
    const Stat sum_w = Stat(1 + rng() % 100) / Stat(4);
    moments[h * 3] = sum_w;
    moments[h * 3 + 1] = moments[h * 3 + 2] = sum_w / 2;
    for (int64_t d = 0; d < 2 * dim; ++d) vector_moments[h * 2 * dim + d] = Stat(grid_value(rng));
    n_residual[h] = 1 + rng() % 5000;
  }
  std::vector<int32_t> counts(lists), reused(lists);
  for (int64_t l = 0; l < lists; ++l) {
    counts[l] = int32_t(rng() % 300);
    reused[l] = rng() % 4 == 0 ? 0 : int32_t(2 + rng() % 128);
  }
  counts[1] = 0;
  reused[2] = 0;
  max_logit[2 * group] = std::nanf("");                 // list 2: not reused, never read
  det_lse[0] = std::nanf("");                           // head 0: NaN lse
  det_lse[1] = 1.f;
  det_out[1 * dim + 7] = std::nanf("");                 // head 1: NaN out element
  const int64_t last = heads - 1;                       // last head: every partial empty
  det_lse[last] = ext_lse[last] = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) smp_lse[last * splits + s] = -INFINITY;
  reused[lists - 1] = 0;
  for (int64_t d = 0; d < dim; ++d) det_out[last * dim + d] = std::nanf("");
  if (splits > 1) {
    // Empty splits whose out is NaN (never read), and head 2 * group + 1: a NaN split lse.
    for (int64_t i = 0; i < heads * splits; ++i) {
      if (smp_lse[i] == -INFINITY) {
        for (int64_t d = 0; d < dim; ++d) smp_out[i * dim + d] = std::nanf("");
      }
    }
    smp_lse[(2 * group + 1) * splits + splits - 1] = std::nanf("");
  }

  MergeEstimateParams p{};
  p.det_out = det_out.data();
  p.det_lse = det_lse.data();
  p.extra_out = extra ? ext_out.data() : nullptr;
  p.extra_lse = extra ? ext_lse.data() : nullptr;
  p.sample_out = smp_out.data();
  p.sample_lse = smp_lse.data();
  p.sample_splits = splits;
  p.pilot_max_logit = max_logit.data();
  p.moments = moments.data();
  p.vector_moments = vector_moments.data();
  p.stats_double = sizeof(Stat) == 8;
  p.n_residual_heads = n_residual.data();
  p.sample_counts = counts.data();
  p.reused = reuse ? reused.data() : nullptr;
  p.lists = lists;
  p.group = group;
  p.head_dim = dim;
  p.out_dtype = out_dtype;
  const size_t elem = out_dtype == DType::kFloat32 ? 4 : 2;
  std::vector<uint8_t> ref_out(heads * dim * elem, 0x11), got_out(heads * dim * elem, 0x77);
  std::vector<float> ref_lse(heads, 5.f), got_lse(heads, 7.f);
  p.out = ref_out.data();
  p.lse = ref_lse.data();
  merge_estimate_cpu(p, 0, heads);
  p.out = got_out.data();
  p.lse = got_lse.data();
  check_cuda(merge_estimate_cuda(p, nullptr), "merge_estimate_cuda");
  auto read = [&](const std::vector<uint8_t>& v, int64_t i) {
    if (out_dtype == DType::kFloat32) {
      float f;
      std::memcpy(&f, v.data() + 4 * i, 4);
      return f;
    }
    uint16_t bits;
    std::memcpy(&bits, v.data() + 2 * i, 2);
    return out_dtype == DType::kFloat16 ? to_float(half_t{bits}) : to_float(bfloat16_t{bits});
  };
  int64_t bad = 0;
  for (int64_t h = 0; h < heads; ++h) bad += !same(got_lse[h], ref_lse[h], 1e-5f, 1e-5f);
  for (int64_t i = 0; i < heads * dim; ++i) {
    bad += !same(read(got_out, i), read(ref_out, i), 1e-5f, 1e-5f);
  }
  // The NaN rule, in the CPU kernel (the CUDA one equals it).
  bad += !std::isnan(ref_lse[0]) || !std::isnan(read(ref_out, 3));
  bad += std::isnan(ref_lse[1]) || !std::isnan(read(ref_out, dim + 7)) ||
         std::isnan(read(ref_out, dim + 6));
  bad += ref_lse[last] != -INFINITY || read(ref_out, last * dim) != 0.f;
  for (int64_t h = 2 * group; h < 3 * group; ++h) {
    if (splits > 1 && h == 2 * group + 1) {
      bad += !std::isnan(ref_lse[h]) || !std::isnan(read(ref_out, h * dim));
    } else {
      bad += std::isnan(ref_lse[h]);
    }
  }
  if (splits > 1) {
    // The same merge with the splits merged by combine_cpu first: bit for bit.
    std::vector<float> merged_out(heads * dim), merged_lse(heads);
    const CombineParams c = combine_layout(smp_out.data(), smp_lse.data(), heads, splits, dim,
                                           false, merged_out.data(), merged_lse.data());
    combine_cpu(c, 0, heads);
    std::vector<uint8_t> two_out(heads * dim * elem, 0x33);
    std::vector<float> two_lse(heads, 9.f);
    p.sample_out = merged_out.data();
    p.sample_lse = merged_lse.data();
    p.sample_splits = 1;
    p.out = two_out.data();
    p.lse = two_lse.data();
    merge_estimate_cpu(p, 0, heads);
    bad += std::memcmp(two_out.data(), ref_out.data(), two_out.size()) != 0;
    bad += std::memcmp(two_lse.data(), ref_lse.data(), heads * sizeof(float)) != 0;
  }
  EXPECT(bad == 0,
         "merge_estimate (reuse %d, extra %d, %s, group %lld, stats %s, splits %lld): %lld wrong",
         int(reuse), int(extra), dtype_name(out_dtype), (long long)group,
         sizeof(Stat) == 8 ? "fp64" : "fp32", (long long)splits, (long long)bad);
}

void test_merge_estimate() {
  uint32_t seed = 20;
  for (bool reuse : {true, false}) {
    for (bool extra : {true, false}) {
      for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
        for (int64_t group : {1, 4}) {
          check_merge_estimate<float>(reuse, extra, dtype, group, ++seed);
        }
      }
      check_merge_estimate<double>(reuse, extra, DType::kFloat32, 4, ++seed);
      for (int64_t splits : {1, 2, 7, 40}) {
        check_merge_estimate<float>(reuse, extra, DType::kBFloat16, 4, ++seed, splits);
      }
      check_merge_estimate<double>(reuse, extra, DType::kFloat32, 1, ++seed, 5);
    }
  }
}

}  // namespace

void test_combine() {
  test_combine_splits_first();
  test_combine_nan();
  test_merge_estimate();
}

}  // namespace vattention::emu_check
