// Stage "budget": the sample budget of every index list from the exact deterministic
// part and the pilot's statistics, the (epsilon, delta) maths of docs/algorithm.md in
// one kernel (op plan_budget; op residual_center gives the chi-square tail its center O^
// before pilot_dispersion runs). python/vattention/budget.py holds the same maths as
// vectorised float64 torch (estimate, pilot_spread, required_samples,
// effective_dimension, chi2_factor): the reference this kernel is tested against,
// operation for operation, and what the adaptive heavy-size path still runs.
//
// Per query head (b, h) of list l (l = head / group, group = q_heads / list_heads), in
// float64, with p = max(pilot_count[l], 1), n_r = n_residual[l] and the pilot moments
// m = moments[head], V1 = vector_moments[head, 0], V2 = vector_moments[head, 1]:
//
//   shift  = max(det_lse, pilot_max_logit), 0 where not finite
//   z_det  = exp(det_lse - shift),  s = exp(pilot_max_logit - shift)
//   Z^     = z_det + n_r (m0 / p) s
//   N^     = z_det det_out + n_r s V1 / p,      O^ = N^ / max(Z^, DBL_MIN)
//   spread (ddof 1, bessel = p / max(p - 1, 1) when pilot_count > 1 else 0,
//           g = s^2 bessel, each clamped at 0):
//     var_w       = (m1 / p - (m0 / p)^2) g
//     trace_wv    = (m2 / p - |V1 / p|^2) g
//     trace_ratio = (m2 / p - 2 O^.(V2 / p) + |O^|^2 m1 / p - |V1 / p - O^ m0 / p|^2) g
//   clt(T, tau) = (z n_r)^2 T / tau^2 (z^2 -> q_h for the chi-square tail); where tau is
//     not positive: inf if the numerator is positive, else 0; NaN if either is NaN
//   rule ratio:       se = z n_r sqrt(trace_ratio / p) / max(Z^, DBL_MIN)
//                     b = clt(trace_ratio, eps Z^ (|O^| - se))
//   rule paper:       b = max(clt(trace_wv, eps/4 |N^|), clt(var_w, eps/4 Z^))
//   rule denominator: b = clt(var_w, eps Z^)
//   chi-square tail (ratio only): from dispersion (A, B, C) (pilot.h),
//     h = max(shrink (A^2 - C) / (B - C), 1) where B > C, else 1; NaN if any is NaN;
//     q_h = table[clamp(floor(h), 1, T) - 1] (T = table length, h = inf reads the last)
//   a NaN in pilot_max_logit, moments or vector_moments makes b NaN (whatever the rule
//     reads: the NaN row must reach the output, so the list is attended exactly).
//
// and z is the rule's normal quantile, computed on the host (budget.py: z_two_sided(delta)
// for ratio, z_two_sided(delta / 2) for paper, z_one_sided(delta) for denominator).
// Then, as decode's fixed path needs them:
//
//   required[head] = b
//   exactly        = pilot_count >= n_r or b is NaN
//   wanted[head]   = min(ceil(exactly ? n_r : max(b, min_samples)), n_r)
//   wanted_l       = max over the list's heads of wanted
//   exact[l]       = wanted_l >= n_r    (the sampler enumerates the residual, weight 1)
//   reused[l]      = reuse_pilot and not exact[l] ? pilot_count : 0
//   final_wanted[l]= exact[l] or not reuse_pilot ? wanted_l : max(wanted_l - reused[l], 0)
//   n_residual_heads[head] = n_r   (the per-head view the combine and the stats read)
//
// Every product and sum is evaluated in the order budget.py writes it, so the two agree
// to rounding: the D-sums are sequential here and vectorised in torch, the exp may differ
// by an ulp, and nvcc contracts products and sums into FMAs. ~1e-16 relative, more where
// the spread cancels (a difference of moments), so tests compare at 1e-12 of the
// tensor's scale. The CPU kernel and the CUDA source under the emulator agree bit for bit.
#pragma once

#include <limits>

#include "common.h"

namespace vattention {

enum class BudgetRule : int32_t { kRatio = 0, kPaper = 1, kDenominator = 2 };

constexpr int kBudgetMoments = 3;     // moments[head, :] (pilot.h's kPilotMoments)
constexpr int kBudgetDispersion = 3;  // dispersion[head, :] (pilot.h's kDispersionOutputs)

struct BudgetParams {
  // Per query head, [batch * q_heads] flattened, contiguous, fp32.
  const float* det_out;          // [heads, head_dim]
  const float* det_lse;          // [heads]
  const float* pilot_max_logit;  // [heads]
  const float* moments;          // [heads, 3]
  const float* vector_moments;   // [heads, 2, head_dim]
  const float* dispersion;       // [heads, 3], or null: the normal tail
  const double* chi2_table;      // [chi2_dims] when dispersion is set
  int64_t chi2_dims;
  // Per list, [batch * list_heads].
  const int32_t* pilot_counts;
  const int64_t* n_residual;
  int64_t lists;
  int64_t group;                 // query heads per list (heads = lists * group)
  int64_t head_dim;
  BudgetRule rule;
  double epsilon;
  double z;                      // the rule's normal quantile (see above)
  double tail_dim_shrink;        // budget.TAIL_DIM_SHRINK
  double min_samples;
  bool reuse_pilot;
  // Outputs.
  double* required;              // [heads]
  int64_t* n_residual_heads;     // [heads]
  int32_t* final_wanted;         // [lists]
  int32_t* reused;               // [lists]
  bool* exact;                   // [lists]
};

namespace budget_detail {

VATT_HD bool is_nan(double x) { return x != x; }
VATT_HD double nan_value() { return std::numeric_limits<double>::quiet_NaN(); }
VATT_HD double inf_value() { return std::numeric_limits<double>::infinity(); }
// torch.clamp(x, min=lo) and torch.maximum / torch.minimum: a NaN stays NaN.
VATT_HD double clamp_min(double x, double lo) { return x < lo ? lo : x; }
VATT_HD double nan_max(double a, double b) {
  return is_nan(a) || is_nan(b) ? nan_value() : (a < b ? b : a);
}
VATT_HD double nan_min(double a, double b) {
  return is_nan(a) || is_nan(b) ? nan_value() : (b < a ? b : a);
}

// _clt_samples: (z n_r)^2 trace / tau^2, or z2 n_r^2 trace / tau^2 with the chi-square
// factor (use_z2).
VATT_HD double clt_samples(double z, double n_r, double trace, double tau, bool use_z2,
                           double z2) {
  const double zn = z * n_r;
  const double numerator = use_z2 ? z2 * (n_r * n_r) * trace : zn * zn * trace;
  if (is_nan(numerator) || is_nan(tau)) return nan_value();
  if (tau > 0) return numerator / (tau * tau);
  return numerator > 0 ? inf_value() : 0.0;
}

// budget.effective_dimension then chi2_factor, for one head.
VATT_HD double chi2_factor(const BudgetParams& p, int64_t head) {
  const double trace = double(p.dispersion[head * kBudgetDispersion + 0]);
  const double frobenius = double(p.dispersion[head * kBudgetDispersion + 1]);
  const double fourth = double(p.dispersion[head * kBudgetDispersion + 2]);
  if (is_nan(trace) || is_nan(frobenius) || is_nan(fourth)) return nan_value();
  const double pairs = frobenius - fourth;
  const double numerator = trace * trace - fourth;
  double h = pairs > 0 ? p.tail_dim_shrink * numerator / pairs : 1.0;
  h = clamp_min(h, 1.0);
  if (is_nan(h)) return nan_value();  // inf / inf: torch's NaN check comes after, same
  const double dims = double(p.chi2_dims);
  if (h > dims) h = dims;             // also +inf (nan_to_num's posinf)
  const int64_t index = int64_t(::floor(h)) - 1;
  return p.chi2_table[index];
}

}  // namespace budget_detail

// The scalars of estimate() for one head: Z^ and what N^ and O^ are made of.
struct HeadEstimate {
  double z_det, scale, p_draws, n_r, mean_w, z_hat, z_safe, n_scale;
};

VATT_HD HeadEstimate head_estimate(const BudgetParams& p, int64_t head, int32_t pilot_count,
                                   int64_t n_residual) {
  using namespace budget_detail;
  HeadEstimate e;
  const double lse = double(p.det_lse[head]);
  const double pilot_max = double(p.pilot_max_logit[head]);
  double shift = nan_max(lse, pilot_max);
  if (!(shift - shift == 0.0)) shift = 0.0;  // not finite (NaN or inf)
  e.z_det = ::exp(lse - shift);
  e.scale = ::exp(pilot_max - shift);
  e.p_draws = clamp_min(double(pilot_count), 1.0);
  e.n_r = double(n_residual);
  e.mean_w = double(p.moments[head * kBudgetMoments]) / e.p_draws;
  e.z_hat = e.z_det + e.n_r * e.mean_w * e.scale;
  e.z_safe = clamp_min(e.z_hat, std::numeric_limits<double>::min());
  e.n_scale = e.n_r * e.scale;
  return e;
}

// N^[d] from det_out[d] and the pilot's sum w V [d]; O^[d] = N^[d] / e.z_safe.
VATT_HD double n_hat_at(const HeadEstimate& e, float det_out, float wv) {
  return e.z_det * double(det_out) + e.n_scale * (double(wv) / e.p_draws);
}

// Op residual_center: O^ of query head `head` as float32, the center pilot_dispersion
// needs for the chi-square tail (budget.estimate(...).o_hat).
VATT_HD void head_center(const BudgetParams& p, int64_t head, int32_t pilot_count,
                         int64_t n_residual, float* center) {
  const HeadEstimate e = head_estimate(p, head, pilot_count, n_residual);
  const float* v1 = p.vector_moments + head * 2 * p.head_dim;
  const float* out = p.det_out + head * p.head_dim;
  for (int64_t d = 0; d < p.head_dim; ++d) {
    center[head * p.head_dim + d] = float(n_hat_at(e, out[d], v1[d]) / e.z_safe);
  }
}

// The budget b of query head `head` (flattened), given its list's pilot count and n_r.
VATT_HD double head_required(const BudgetParams& p, int64_t head, int32_t pilot_count,
                             int64_t n_residual) {
  using namespace budget_detail;
  const int64_t dim = p.head_dim;
  const HeadEstimate e = head_estimate(p, head, pilot_count, n_residual);
  const double p_draws = e.p_draws, n_r = e.n_r, mean_w = e.mean_w, z_hat = e.z_hat;
  const double z_safe = e.z_safe, scale = e.scale;
  const float* m = p.moments + head * kBudgetMoments;
  const float* v1 = p.vector_moments + head * 2 * dim;
  const float* v2 = v1 + dim;
  const float* out = p.det_out + head * dim;
  bool nan = is_nan(double(p.pilot_max_logit[head]));
  for (int i = 0; i < kBudgetMoments; ++i) nan |= is_nan(double(m[i]));

  const double mean_w2 = double(m[1]) / p_draws;
  const double mean_w2_norm2 = double(m[2]) / p_draws;
  // One pass over D: N^, O^ and the five sums the spread and the norms need.
  double sum_wv2 = 0.0, sum_o_w2v = 0.0, sum_o2 = 0.0, sum_centred2 = 0.0, sum_n2 = 0.0;
  for (int64_t d = 0; d < dim; ++d) {
    nan |= is_nan(double(v1[d])) || is_nan(double(v2[d]));
    const double mean_wv = double(v1[d]) / p_draws;
    const double mean_w2v = double(v2[d]) / p_draws;
    const double n_hat = n_hat_at(e, out[d], v1[d]);
    const double o_hat = n_hat / z_safe;
    const double centred = mean_wv - o_hat * mean_w;
    sum_wv2 += mean_wv * mean_wv;
    sum_o_w2v += o_hat * mean_w2v;
    sum_o2 += o_hat * o_hat;
    sum_centred2 += centred * centred;
    sum_n2 += n_hat * n_hat;
  }
  if (nan) return nan_value();

  const double bessel = pilot_count > 1 ? p_draws / clamp_min(p_draws - 1.0, 1.0) : 0.0;
  const double scale2 = scale * scale * bessel;
  const double var_w = clamp_min((mean_w2 - mean_w * mean_w) * scale2, 0.0);
  const double trace_wv = clamp_min((mean_w2_norm2 - sum_wv2) * scale2, 0.0);
  const double trace_ratio = clamp_min(
      (mean_w2_norm2 - 2.0 * sum_o_w2v + sum_o2 * mean_w2 - sum_centred2) * scale2, 0.0);

  const double z = p.z;
  switch (p.rule) {
    case BudgetRule::kDenominator:
      return clt_samples(z, n_r, var_w, p.epsilon * z_hat, false, 0.0);
    case BudgetRule::kPaper: {
      const double quarter = p.epsilon / 4.0;
      return nan_max(clt_samples(z, n_r, trace_wv, quarter * ::sqrt(sum_n2), false, 0.0),
                     clt_samples(z, n_r, var_w, quarter * z_hat, false, 0.0));
    }
    case BudgetRule::kRatio:
    default: {
      const double standard_error = z * n_r * ::sqrt(trace_ratio / p_draws) / z_safe;
      const double o_lower = ::sqrt(sum_o2) - standard_error;
      const bool chi2 = p.dispersion != nullptr;
      const double z2 = chi2 ? chi2_factor(p, head) : 0.0;
      return clt_samples(z, n_r, trace_ratio, p.epsilon * z_hat * o_lower, chi2, z2);
    }
  }
}

// The tokens head `head` asks for, before the per-list max (writes required and
// n_residual_heads).
VATT_HD double head_wanted(const BudgetParams& p, int64_t head, int32_t pilot_count,
                           int64_t n_residual) {
  using namespace budget_detail;
  const double required = head_required(p, head, pilot_count, n_residual);
  p.required[head] = required;
  p.n_residual_heads[head] = n_residual;
  const double n_r = double(n_residual);
  const bool exactly = double(pilot_count) >= n_r || is_nan(required);
  const double wanted = exactly ? n_r : clamp_min(required, p.min_samples);
  return nan_min(::ceil(wanted), n_r);
}

// The list outputs from the max of its heads' head_wanted.
VATT_HD void finish_list(const BudgetParams& p, int64_t list, double wanted) {
  const int32_t pilot_count = p.pilot_counts[list];
  const double n_r = double(p.n_residual[list]);
  const bool exact = wanted >= n_r;
  int32_t reused = 0;
  double final_wanted = wanted;
  if (p.reuse_pilot && !exact) {
    reused = pilot_count;
    final_wanted = budget_detail::clamp_min(wanted - double(reused), 0.0);
  }
  p.exact[list] = exact;
  p.reused[list] = reused;
  p.final_wanted[list] = int32_t(final_wanted);
}

// Lists [list_begin, list_end).
void plan_budget_cpu(const BudgetParams& p, int64_t list_begin, int64_t list_end);
// residual_center of the heads of lists [list_begin, list_end) into center [heads, head_dim]
// (reads det_out, det_lse, pilot_max_logit, moments[.., 0], vector_moments[.., 0, :],
// pilot_counts, n_residual, lists, group and head_dim of p).
void residual_center_cpu(const BudgetParams& p, float* center, int64_t list_begin,
                         int64_t list_end);

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
// One launch, a thread per query head (a list's heads in one block), no workspace.
cudaError_t plan_budget_cuda(const BudgetParams& p, cudaStream_t stream);
// A thread per query head.
cudaError_t residual_center_cuda(const BudgetParams& p, float* center, cudaStream_t stream);
}  // namespace vattention
#endif
