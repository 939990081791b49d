// Online softmax over (logit, value) pairs and the merge of partial results.
// A partial result is (lse, out) with out = sum_i exp(s_i - lse) v_i, i.e. an
// already normalised output; lse = -inf marks an empty partial. Split-K
// partials, the deterministic-set partial and the sampled-residual partial are
// all merged by the same two functions, on the CPU and on the GPU.
#pragma once

#include "common.h"

namespace vattention {

// Running state of one split: max logit, sum of exp(s - max), and the caller
// keeps the accumulator sum exp(s - max) v in its own storage.
struct SoftmaxState {
  float max_logit = kNegInf;
  float sum_exp = 0.f;

  // Folds in one logit; returns the factor by which the caller must rescale its
  // accumulator and writes the weight of the new value to *weight.
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

  VATT_HD float lse() const {
    return sum_exp > 0.f ? max_logit + logf(sum_exp) : kNegInf;
  }
};

// Weights that merge partials with log-sum-exps lse[0..n) into one: the merged
// lse, and w_s = exp(lse_s - merged) so that out = sum_s w_s out_s.
VATT_HD float merged_lse(const float* lse, int n, int64_t stride) {
  float m = kNegInf;
  for (int s = 0; s < n; ++s) m = fmaxf(m, lse[s * stride]);
  if (m == kNegInf) return kNegInf;
  float total = 0.f;
  for (int s = 0; s < n; ++s) total += expf(lse[s * stride] - m);
  return m + logf(total);
}

VATT_HD float merge_weight(float partial_lse, float merged) {
  return merged == kNegInf ? 0.f : expf(partial_lse - merged);
}

}  // namespace vattention
