// Online softmax over (logit, value) pairs and the merge of partial results.
// A partial result is (lse, out) with out = sum_i exp(s_i - lse) v_i, i.e. an
// already normalised output; lse = -inf marks an empty partial. Split-K
// partials, the deterministic-set partial and the sampled-residual partial are
// all merged by the same two functions, on the CPU and on the GPU.
//
// NaN: a NaN must reach the output, as in dense attention. A NaN logit makes
// the state's sum (and so lse and every element of out) NaN; a NaN in one value
// element makes that element of out NaN. A merge with a NaN lse gives NaN lse
// and out; an empty partial (lse = -inf) is ignored whatever its out holds.
//
// The tests below look at the bits: nvcc's --use_fast_math may treat a
// comparison as if no operand were NaN, so `x != x` or `x == -inf` could be
// folded the wrong way in device code.
#pragma once

#include "common.h"

namespace vattention {

VATT_HD bool is_nan_bits(float x) { return (float_to_bits(x) & 0x7fffffffu) > 0x7f800000u; }
VATT_HD bool is_neg_inf_bits(float x) { return float_to_bits(x) == 0xff800000u; }
// +0 only: the sums that mark an empty state start at +0 and only grow.
VATT_HD bool is_zero_bits(float x) { return float_to_bits(x) == 0u; }
VATT_HD float quiet_nan() { return bits_to_float(0x7fc00000u); }

// Running state of one split: max logit, sum of exp(s - max), and the caller
// keeps the accumulator sum exp(s - max) v in its own storage.
struct SoftmaxState {
  float max_logit = kNegInf;
  float sum_exp = 0.f;

  // Folds in one logit; returns the factor by which the caller must rescale its
  // accumulator and writes the weight of the new value to *weight. A -inf logit
  // is skipped (weight 0). A NaN logit fails `logit > max_logit` and gets weight
  // exp(NaN) = NaN, so sum_exp and the accumulator become NaN and stay NaN
  // (NaN * rescale is NaN, even for rescale 0).
  VATT_HD float push(float logit, float* weight) {
    if (logit == kNegInf) {
      *weight = 0.f;
      return 1.f;
    }
    if (logit > max_logit) {
      const float rescale = (max_logit == kNegInf) ? 0.f : expf(max_logit - logit);
      max_logit = logit;
      sum_exp = sum_exp * rescale + 1.f;
      *weight = 1.f;
      return rescale;
    }
    *weight = expf(logit - max_logit);
    sum_exp += *weight;
    return 1.f;
  }

  // Nothing folded in: sum_exp is exactly 0 (one push makes it >= 1 or NaN).
  VATT_HD bool empty() const { return sum_exp == 0.f; }

  // -inf when empty, NaN after a NaN logit.
  VATT_HD float lse() const { return empty() ? kNegInf : max_logit + logf(sum_exp); }

  // The factor that normalises the accumulator: 0 when empty, NaN after a NaN logit.
  VATT_HD float inverse_sum() const { return empty() ? 0.f : 1.f / sum_exp; }
};

// Weights that merge partials with log-sum-exps lse[0..n) into one: the merged
// lse, and w_s = exp(lse_s - merged) so that out = sum_s w_s out_s. Any NaN
// lse makes the merge NaN (fmaxf alone would drop it).
VATT_HD float merged_lse(const float* lse, int n, int64_t stride) {
  float m = kNegInf;
  for (int s = 0; s < n; ++s) {
    const float x = lse[s * stride];
    if (is_nan_bits(x)) return quiet_nan();
    m = fmaxf(m, x);
  }
  if (m == kNegInf) return kNegInf;
  float total = 0.f;
  for (int s = 0; s < n; ++s) total += expf(lse[s * stride] - m);
  return m + logf(total);
}

// 0 for an empty partial (so its out is never read); NaN when the merge is NaN.
VATT_HD float merge_weight(float partial_lse, float merged) {
  return is_neg_inf_bits(partial_lse) ? 0.f : expf(partial_lse - merged);
}

}  // namespace vattention
