// Stage "combine": merges partial attention results (out, lse) with the
// online-softmax rule of online_softmax.h. Used for split-K partials and for
// the deterministic + sampled-residual halves of a vAttention estimate.
#pragma once

#include <limits>

#include "common.h"
#include "online_softmax.h"

namespace vattention {

struct CombineParams {
  const float* partial_out;  // partial s of item m at m * item_stride_out + s * split_stride_out
  const float* partial_lse;  // at m * item_stride_lse + s * split_stride_lse
  int64_t item_stride_out, split_stride_out;
  int64_t item_stride_lse, split_stride_lse;
  float* out;                // [items, head_dim]
  float* lse;                // [items]
  int64_t items;
  int64_t num_splits;
  int64_t head_dim;
};

// The two layouts the partials come in: sparse_attention's [items, splits, head_dim] /
// [items, splits], or with splits_first (op combine) [splits, items, head_dim] /
// [splits, items]; out [items, head_dim], lse [items].
inline CombineParams combine_layout(const float* partial_out, const float* partial_lse,
                                    int64_t items, int64_t splits, int64_t head_dim,
                                    bool splits_first, float* out, float* lse) {
  CombineParams c{};
  c.partial_out = partial_out;
  c.partial_lse = partial_lse;
  c.item_stride_out = splits_first ? head_dim : splits * head_dim;
  c.split_stride_out = splits_first ? items * head_dim : head_dim;
  c.item_stride_lse = splits_first ? 1 : splits;
  c.split_stride_lse = splits_first ? items : 1;
  c.out = out;
  c.lse = lse;
  c.items = items;
  c.num_splits = splits;
  c.head_dim = head_dim;
  return c;
}

void combine_cpu(const CombineParams& p, int64_t item_begin, int64_t item_end);

// Op merge_estimate: the last step of a decode, the estimate's partials merged and cast.
// Per query head (b, h) of list l = h / group (group = q_heads / list_heads), up to four
// partials (out, lse), in this order:
//   the deterministic part (det_out, det_lse); the extra exact part (extra_*, if given);
//   with reuse (reused given), draws = reused[l] + sample_counts[l], d = max(draws, 1):
//     the reused pilot from its statistics, sum_w = moments[head, 0]:
//       out = vector_moments[head, 0, :] / max(sum_w, tiny),
//       lse = max_logit + log(sum_w) + log(n_residual_heads) - log(d), -inf where
//             reused[l] == 0 (then nothing of it is read into the output)
//     the sample: lse = sample_lse + log(sample_counts[l]) - log(d);
//   without reuse the sample as it is;
// where the sample is given as sample_splits >= 1 split partials (sparse_attention's,
// unmerged: sample_out [heads, S, head_dim], sample_lse [heads, S]), merged first exactly
// as combine does (the same rule, order and arithmetic, so the result equals
// merge_estimate of combine's output bit for bit on the CPU); a split of lse -inf is
// skipped whatever its out holds; S = 1 is the merged sample itself;
// merged by online_softmax.h's rule (a NaN lse makes the head's lse and out NaN, a NaN
// in a non-empty partial's out reaches that element, an empty partial is ignored
// whatever its out holds), then out cast to out_dtype. The statistics may be fp32 (the
// fixed path's pilot_stats) or fp64 (the adaptive path's band merge): sum_w's log and
// the pilot's out are computed in their type and rounded to fp32, as decode did.
struct MergeEstimateParams {
  // Per query head, [batch * q_heads] flattened, contiguous, fp32.
  const float* det_out;          // [heads, head_dim]
  const float* det_lse;          // [heads]
  const float* extra_out;        // or null
  const float* extra_lse;
  const float* sample_out;        // [heads, sample_splits, head_dim]
  const float* sample_lse;        // [heads, sample_splits]
  int64_t sample_splits = 1;      // >= 1
  const float* pilot_max_logit;  // [heads]
  const void* moments;           // [heads, 3], fp32 or fp64 (stats_double)
  const void* vector_moments;    // [heads, 2, head_dim], same type
  bool stats_double;
  const int64_t* n_residual_heads;  // [heads]
  // Per list, [batch * list_heads].
  const int32_t* sample_counts;
  const int32_t* reused;         // null: no pilot reuse
  int64_t lists;
  int64_t group;
  int64_t head_dim;
  DType out_dtype;
  void* out;                     // [heads, head_dim] in out_dtype
  float* lse;                    // [heads]
};

constexpr int kMergeMaxPartials = 4;

namespace merge_detail {

VATT_HD float log_f(float x) { return ::logf(x); }
VATT_HD double log_f(double x) { return ::log(x); }
template <typename T>
VATT_HD T tiny() { return std::numeric_limits<T>::min(); }
VATT_HD bool is_nan(float x) { return is_nan_bits(x); }
VATT_HD bool is_nan(double x) { return x != x; }

VATT_HD void store(void* out, DType dtype, int64_t i, float x) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(out)[i] = x;
  } else if (dtype == DType::kFloat16) {
    static_cast<half_t*>(out)[i] = to_half_rn(x);
  } else {
    // Round to nearest even, NaN as torch writes it (0x7fc0).
    const uint32_t u = float_to_bits(x);
    const uint16_t bits = (u & 0x7fffffffu) > 0x7f800000u
                              ? uint16_t(0x7fc0u)
                              : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    static_cast<bfloat16_t*>(out)[i] = bfloat16_t{bits};
  }
}

}  // namespace merge_detail

// The partials of query head `head`: their lse into lse[0..n) and where their out lives.
// The pilot's out is computed on the fly (merge_estimate_out), so its slot points nowhere;
// with sample_splits > 1 the sample's out is merged from its splits on the fly too
// (sample_split_lse is then the merged lse, before the reweighting).
struct MergePartials {
  int n;
  int pilot;                     // slot of the pilot partial, -1 if none
  int sample;                    // slot of the sample partial
  float sample_split_lse;
  float lse[kMergeMaxPartials];
  const float* out[kMergeMaxPartials];
};

// Element d of the merge of the sample's S > 1 splits (lse `split_lse`, out rows of
// head_dim at `out`), whose merged lse is `merged` (not NaN, not -inf): combine_cpu's
// sum, in its order.
VATT_HD float merged_split_value(const float* split_lse, const float* out, int64_t splits,
                                 int64_t dim, float merged, int64_t d) {
  float acc = 0.f;
  for (int64_t s = 0; s < splits; ++s) {
    const float ls = split_lse[s];
    if (is_neg_inf_bits(ls)) continue;  // empty split: its out is never read
    acc += merge_weight(ls, merged) * out[s * dim + d];
  }
  return acc;
}

template <typename Stat>
VATT_HD MergePartials merge_partials(const MergeEstimateParams& p, int64_t head) {
  using namespace merge_detail;
  const int64_t dim = p.head_dim;
  MergePartials m;
  m.n = 0;
  m.pilot = -1;
  m.lse[m.n] = p.det_lse[head];
  m.out[m.n++] = p.det_out + head * dim;
  if (p.extra_out != nullptr) {
    m.lse[m.n] = p.extra_lse[head];
    m.out[m.n++] = p.extra_out + head * dim;
  }
  const int64_t list = head / p.group;
  const int32_t count = p.sample_counts[list];
  const int64_t splits = p.sample_splits;
  float sample_lse = splits == 1 ? p.sample_lse[head]
                                 : merged_lse(p.sample_lse + head * splits, int(splits), 1);
  m.sample_split_lse = sample_lse;
  if (p.reused != nullptr) {
    const int32_t reused = p.reused[list];
    const int32_t draws = reused + count;
    const float log_draws = log_f(float(draws < 1 ? 1 : draws));
    const Stat sum_w = static_cast<const Stat*>(p.moments)[head * 3];
    float pilot_lse = kNegInf;
    if (reused != 0) {
      const float log_n_r = log_f(float(p.n_residual_heads[head]));
      pilot_lse = p.pilot_max_logit[head] + float(log_f(sum_w)) + log_n_r - log_draws;
    }
    m.pilot = m.n;
    m.lse[m.n] = pilot_lse;
    m.out[m.n++] = nullptr;
    sample_lse = sample_lse + log_f(float(count)) - log_draws;
  }
  m.sample = m.n;
  m.lse[m.n] = sample_lse;
  m.out[m.n++] = p.sample_out + head * splits * dim;
  return m;
}

// Head `head`'s out entries d = d_begin, d_begin + d_step, ... (and its lse when
// write_lse), from merge_partials.
template <typename Stat>
VATT_HD void merge_estimate_head(const MergeEstimateParams& p, int64_t head, int64_t d_begin,
                                 int64_t d_step, bool write_lse) {
  using namespace merge_detail;
  const MergePartials m = merge_partials<Stat>(p, head);
  const float merged = merged_lse(m.lse, m.n, 1);
  if (write_lse) p.lse[head] = merged;
  const int64_t dim = p.head_dim;
  const bool nan = is_nan_bits(merged);
  float weight[kMergeMaxPartials];
  for (int s = 0; s < m.n; ++s) weight[s] = nan ? 0.f : merge_weight(m.lse[s], merged);
  const Stat* v1 = static_cast<const Stat*>(p.vector_moments) + head * 2 * dim;
  Stat sum_w = 0;
  if (m.pilot >= 0) {
    sum_w = static_cast<const Stat*>(p.moments)[head * 3];
    if (!is_nan(sum_w) && sum_w < tiny<Stat>()) sum_w = tiny<Stat>();  // torch.clamp keeps NaN
  }
  for (int64_t d = d_begin; d < dim; d += d_step) {
    float acc = 0.f;
    if (nan) {
      acc = quiet_nan();
    } else {
      for (int s = 0; s < m.n; ++s) {
        if (is_neg_inf_bits(m.lse[s])) continue;  // empty partial: its out is never read
        float value;
        if (s == m.pilot) {
          value = float(v1[d] / sum_w);
        } else if (s == m.sample && p.sample_splits > 1) {
          // Not NaN (the merge would be NaN) and not -inf (skipped above): the sample's
          // split lse is finite or +inf, as combine's merged lse would be.
          value = merged_split_value(p.sample_lse + head * p.sample_splits, m.out[s],
                                     p.sample_splits, dim, m.sample_split_lse, d);
        } else {
          value = m.out[s][d];
        }
        acc += weight[s] * value;
      }
    }
    store(p.out, p.out_dtype, head * dim + d, acc);
  }
}

void merge_estimate_cpu(const MergeEstimateParams& p, int64_t head_begin, int64_t head_end);

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
cudaError_t combine_cuda(const CombineParams& p, cudaStream_t stream);
// One launch, a warp per query head (lanes over head_dim).
cudaError_t merge_estimate_cuda(const MergeEstimateParams& p, cudaStream_t stream);
}  // namespace vattention
#endif
