// plan_budget under the emulator against plan_budget_cpu: every output bit for bit (NaN
// where NaN), for each rule and tail, GQA groups below and above the block size, reuse on
// and off, and the edge cases the fixed decode path meets: an empty residual, a pilot
// that enumerated its residual, NaN / empty pilot statistics, a non-positive tau
// (infinite budget) and a dispersion without pairs. Plus the rules' own invariants
// (the per-list max, the exact fallback, reuse), which hold for both kernels; and
// residual_center (O^, the chi-square tail's center) bit for bit.
#include "emu_check.h"

#include "../../csrc/vattention/budget.h"

namespace vattention::emu_check {
namespace {

struct BudgetCase {
  std::vector<float> det_out, det_lse, max_logit, moments, vector_moments, dispersion;
  std::vector<double> table;
  std::vector<int32_t> pilot_counts;
  std::vector<int64_t> n_residual;
  BudgetParams p{};
};

// Moments of a real pilot (weights exp(s - max), values on a grid), so that the spread is
// consistent; then one edge case per list, chosen by list index.
BudgetCase make_case(int64_t lists, int64_t group, int64_t dim, BudgetRule rule, bool chi2,
                     bool reuse, uint32_t seed) {
  std::mt19937 rng(seed);
  BudgetCase c;
  const int64_t heads = lists * group;
  c.det_out.resize(size_t(heads * dim));
  c.det_lse.resize(size_t(heads));
  c.max_logit.resize(size_t(heads));
  c.moments.assign(size_t(heads * 3), 0.f);
  c.vector_moments.assign(size_t(heads * 2 * dim), 0.f);
  c.dispersion.resize(size_t(heads * 3));
  c.pilot_counts.resize(size_t(lists));
  c.n_residual.resize(size_t(lists));
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  for (int64_t l = 0; l < lists; ++l) {
    c.n_residual[l] = 50 + int64_t(rng() % 5000);
    c.pilot_counts[l] = int32_t(2 + rng() % 64);
    const int kind = int(l % 9);
    if (kind == 1) c.n_residual[l] = 0, c.pilot_counts[l] = 0;   // empty residual
    if (kind == 2) c.pilot_counts[l] = int32_t(c.n_residual[l] = 40);  // enumerated
    if (kind == 3) c.pilot_counts[l] = 1;                          // no variance
  }
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t l = h / group;
    const int kind = int(l % 9);
    for (int64_t d = 0; d < dim; ++d) c.det_out[h * dim + d] = grid_value(rng);
    c.det_lse[h] = 4.f * unit(rng) - 1.f;
    float mx = -INFINITY;
    std::vector<float> s(size_t(c.pilot_counts[l]));
    for (auto& x : s) mx = std::max(mx, x = 6.f * unit(rng));
    c.max_logit[h] = s.empty() ? -INFINITY : mx;
    for (float x : s) {
      const float w = std::exp(x - mx);
      float norm2 = 0.f;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = grid_value(rng) + (h % 3 == 0 ? 2.f : 0.f);
        norm2 += v * v;
        c.vector_moments[(h * 2 + 0) * dim + d] += w * v;
        c.vector_moments[(h * 2 + 1) * dim + d] += w * w * v;
      }
      c.moments[h * 3 + 0] += w;
      c.moments[h * 3 + 1] += w * w;
      c.moments[h * 3 + 2] += w * w * norm2;
    }
    const float a = 10.f * unit(rng), fourth = a * a * unit(rng) * 0.3f;
    c.dispersion[h * 3 + 0] = a;
    c.dispersion[h * 3 + 1] = fourth + a * a * unit(rng);
    c.dispersion[h * 3 + 2] = fourth;
    const int64_t j = h % group;
    if (kind == 4 && j == group - 1) c.moments[h * 3 + 2] = std::nanf("");       // NaN value
    if (kind == 5 && j == 0) c.vector_moments[(h * 2 + 1) * dim + dim - 1] = std::nanf("");
    if (kind == 6) c.det_lse[h] = -INFINITY;                    // empty deterministic set
    if (kind == 7 && j == 0) {                                  // |O| ~ 0: tau <= 0
      for (int64_t d = 0; d < dim; ++d) c.det_out[h * dim + d] = 0.f;
      for (int64_t d = 0; d < 2 * dim; ++d) c.vector_moments[h * 2 * dim + d] *= 1e-30f;
    }
    if (kind == 8) {                                            // dispersion: B == C, or NaN
      c.dispersion[h * 3 + 1] = c.dispersion[h * 3 + 2];
      if (j == 0) c.dispersion[h * 3 + 0] = std::nanf("");
    }
    if (kind == 0 && j == 0 && l % 2 == 1) c.max_logit[h] = std::nanf("");
  }
  c.table.resize(16);
  for (size_t i = 0; i < c.table.size(); ++i) c.table[i] = 6.0 / double(i + 1) + 1.0;
  BudgetParams& p = c.p;
  p.det_out = c.det_out.data();
  p.det_lse = c.det_lse.data();
  p.pilot_max_logit = c.max_logit.data();
  p.moments = c.moments.data();
  p.vector_moments = c.vector_moments.data();
  p.dispersion = chi2 ? c.dispersion.data() : nullptr;
  p.chi2_table = chi2 ? c.table.data() : nullptr;
  p.chi2_dims = chi2 ? int64_t(c.table.size()) : 0;
  p.pilot_counts = c.pilot_counts.data();
  p.n_residual = c.n_residual.data();
  p.lists = lists;
  p.group = group;
  p.head_dim = dim;
  p.rule = rule;
  p.epsilon = 0.07;
  p.z = 1.959963984540054;
  p.tail_dim_shrink = 0.25;
  p.min_samples = 32.0;
  p.reuse_pilot = reuse;
  return c;
}

struct Outputs {
  std::vector<double> required;
  std::vector<int64_t> n_heads;
  std::vector<int32_t> final_wanted, reused;
  std::vector<unsigned char> exact;  // bool storage
  void bind(BudgetParams* p, int64_t lists, int64_t heads) {
    required.assign(size_t(heads), -777.0);
    n_heads.assign(size_t(heads), -777);
    final_wanted.assign(size_t(lists), -777);
    reused.assign(size_t(lists), -777);
    exact.assign(size_t(lists), 7);
    p->required = required.data();
    p->n_residual_heads = n_heads.data();
    p->final_wanted = final_wanted.data();
    p->reused = reused.data();
    p->exact = reinterpret_cast<bool*>(exact.data());
  }
};

bool same_bits(double a, double b) {
  return std::isnan(a) ? std::isnan(b) : std::memcmp(&a, &b, sizeof(a)) == 0;
}

void test_budget_case(int64_t lists, int64_t group, int64_t dim, BudgetRule rule, bool chi2,
                      bool reuse, uint32_t seed) {
  BudgetCase c = make_case(lists, group, dim, rule, chi2, reuse, seed);
  const int64_t heads = lists * group;
  Outputs cpu, gpu;
  cpu.bind(&c.p, lists, heads);
  plan_budget_cpu(c.p, 0, lists);
  gpu.bind(&c.p, lists, heads);
  check_cuda(plan_budget_cuda(c.p, nullptr), "plan_budget_cuda");
  int64_t bad = 0, wrong = 0;
  for (int64_t h = 0; h < heads; ++h) {
    bad += !same_bits(gpu.required[h], cpu.required[h]) || gpu.n_heads[h] != cpu.n_heads[h];
  }
  for (int64_t l = 0; l < lists; ++l) {
    bad += gpu.final_wanted[l] != cpu.final_wanted[l] || gpu.reused[l] != cpu.reused[l] ||
           gpu.exact[l] != cpu.exact[l];
  }
  // The rules both kernels must follow.
  for (int64_t l = 0; l < lists; ++l) {
    const int64_t n_r = c.n_residual[l];
    const int32_t pilot = c.pilot_counts[l];
    bool any_nan = false;
    double wanted = 0.0;
    for (int64_t h = l * group; h < (l + 1) * group; ++h) {
      wrong += cpu.n_heads[h] != n_r;
      const double r = cpu.required[h];
      any_nan |= std::isnan(r);
      const double w = (pilot >= n_r || std::isnan(r)) ? double(n_r)
                                                      : std::min(std::ceil(std::max(r, 32.0)),
                                                                 double(n_r));
      wanted = std::max(wanted, w);
    }
    const bool exact = wanted >= double(n_r);
    wrong += bool(cpu.exact[l]) != exact;
    wrong += any_nan && !exact;                      // a NaN pilot is attended exactly
    wrong += (l % 9 == 1 || l % 9 == 2) && !exact;   // empty / enumerated residual
    const int32_t reused = reuse && !exact ? pilot : 0;
    wrong += cpu.reused[l] != reused;
    wrong += cpu.final_wanted[l] !=
             int32_t(exact || !reuse ? wanted : std::max(wanted - reused, 0.0));
    if (l % 9 == 4 || l % 9 == 5 || (l % 9 == 0 && l % 2 == 1)) {
      wrong += !std::isnan(cpu.required[l * group + (l % 9 == 4 ? group - 1 : 0)]);
    }
    if (l % 9 == 7 && rule == BudgetRule::kRatio && !chi2) {
      wrong += !std::isinf(cpu.required[l * group]);  // |O^| under its error: infinite
    }
  }
  EXPECT(bad == 0 && wrong == 0,
         "budget lists=%lld group=%lld D=%lld rule=%d chi2=%d reuse=%d: %lld CPU/CUDA "
         "mismatches, %lld rule violations", (long long)lists, (long long)group,
         (long long)dim, int(rule), int(chi2), int(reuse), (long long)bad, (long long)wrong);
}

// residual_center: O^ of every head, bit for bit, NaN where NaN.
void test_center_case(int64_t lists, int64_t group, int64_t dim, uint32_t seed) {
  BudgetCase c = make_case(lists, group, dim, BudgetRule::kRatio, false, true, seed);
  const int64_t n = lists * group * dim;
  std::vector<float> cpu(size_t(n), -777.f), gpu(size_t(n), -777.f);
  residual_center_cpu(c.p, cpu.data(), 0, lists);
  check_cuda(residual_center_cuda(c.p, gpu.data(), nullptr), "residual_center_cuda");
  int64_t bad = 0, nans = 0;
  for (int64_t i = 0; i < n; ++i) {
    bad += std::isnan(cpu[i]) ? !std::isnan(gpu[i]) : std::memcmp(&cpu[i], &gpu[i], 4) != 0;
    bad += cpu[i] == -777.f;
    nans += std::isnan(cpu[i]);
  }
  EXPECT(bad == 0, "residual_center lists=%lld group=%lld D=%lld: %lld mismatches (%lld NaN)",
         (long long)lists, (long long)group, (long long)dim, (long long)bad, (long long)nans);
}

}  // namespace

void test_budget() {
  test_center_case(37, 4, 128, 7);
  test_center_case(3, 200, 40, 8);
  const BudgetRule rules[] = {BudgetRule::kRatio, BudgetRule::kPaper, BudgetRule::kDenominator};
  uint32_t seed = 100;
  for (BudgetRule rule : rules) {
    for (int64_t group : {1, 4, 200}) {
      for (bool reuse : {false, true}) {
        for (bool chi2 : {false, true}) {
          if (chi2 && rule != BudgetRule::kRatio) continue;
          if (g_quick && group == 200 && !reuse) continue;
          const int64_t lists = group == 200 ? 19 : 37;
          test_budget_case(lists, group, group == 4 ? 128 : 40, rule, chi2, reuse, seed++);
        }
      }
    }
  }
}

}  // namespace vattention::emu_check
