// combine under the emulator against combine_cpu: the [splits, items, D] layout with
// more than 32 splits and a head dim not a multiple of 32, and the NaN rule of the
// merge. (Combine of real attention partials, [items, splits, D], runs in
// test_sparse_attention.cpp.)
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
  CombineParams c{};
  c.partial_out = po.data();
  c.partial_lse = pl.data();
  c.item_stride_out = dim;
  c.split_stride_out = items * dim;
  c.item_stride_lse = 1;
  c.split_stride_lse = items;
  c.items = items;
  c.num_splits = splits;
  c.head_dim = dim;
  std::vector<float> ro(items * dim), rl(items), go(items * dim), gl(items);
  c.out = ro.data();
  c.lse = rl.data();
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
  CombineParams c{};
  c.partial_out = po.data();
  c.partial_lse = pl.data();
  c.item_stride_out = dim;
  c.split_stride_out = items * dim;
  c.item_stride_lse = 1;
  c.split_stride_lse = items;
  c.items = items;
  c.num_splits = splits;
  c.head_dim = dim;
  std::vector<float> ro(items * dim), rl(items), go(items * dim, 777.f), gl(items, 777.f);
  c.out = ro.data();
  c.lse = rl.data();
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

}  // namespace

void test_combine() {
  test_combine_splits_first();
  test_combine_nan();
}

}  // namespace vattention::emu_check
