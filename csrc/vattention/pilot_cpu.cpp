// CPU pilot statistics, in double: the reference the CUDA kernel is checked against.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kv_rows_cpu.h"
#include "pilot.h"

namespace vattention {
namespace {

template <typename T>
void pilot_heads(const PilotParams& p, int64_t head_begin, int64_t head_end) {
  const KVRowsCpu<T> rows{p.qkv};
  const int64_t q_heads = p.qkv.q_heads, dim = p.qkv.head_dim, group = p.qkv.group_size();
  std::vector<float> q, logits, value(dim);
  std::vector<int32_t> used;
  for (int64_t t = head_begin; t < head_end; ++t) {
    const int64_t b = t / q_heads, h = t % q_heads, kv_head = h / group;
    const int64_t list = p.list.list_of(b, h, q_heads, group);
    const int32_t* indices = p.list.indices + list * p.list.max_count;
    const int64_t count = std::min<int64_t>(p.list.counts[list], p.list.max_count);
    rows.load_query(b, h, &q);

    logits.clear();
    used.clear();
    float max_logit = kNegInf;
    bool nan_logit = false;
    for (int64_t j = 0; j < count; ++j) {
      if (!rows.valid(indices[j])) continue;
      used.push_back(indices[j]);
      logits.push_back(rows.logit(q, b, kv_head, indices[j]));
      nan_logit |= std::isnan(logits.back());
      max_logit = std::max(max_logit, logits.back());
    }
    // std::max skips a NaN; instead a NaN logit (from q or a K row) makes the
    // max, and through w = exp(s - max) every statistic, NaN. A NaN in a V row
    // reaches the third moment and that element of the vector moments only.
    if (nan_logit) max_logit = std::numeric_limits<float>::quiet_NaN();

    double sum_w = 0, sum_w2 = 0, sum_w2_norm = 0;
    std::vector<double> sum_wv(dim, 0.0), sum_w2v(dim, 0.0);
    if (max_logit != kNegInf) {
      for (size_t j = 0; j < used.size(); ++j) {
        const double w = std::exp(double(logits[j]) - max_logit);
        const T* v = rows.value(b, kv_head, used[j]);
        double norm2 = 0;
        for (int64_t d = 0; d < dim; ++d) {
          value[d] = to_float(v[d]);
          norm2 += double(value[d]) * value[d];
          sum_wv[d] += w * value[d];
          sum_w2v[d] += w * w * value[d];
        }
        sum_w += w;
        sum_w2 += w * w;
        sum_w2_norm += w * w * norm2;
      }
    }
    p.max_logit[t] = max_logit;
    float* moments = p.moments + t * kPilotMoments;
    moments[0] = float(sum_w);
    moments[1] = float(sum_w2);
    moments[2] = float(sum_w2_norm);
    float* vector_moments = p.vector_moments + t * 2 * dim;
    for (int64_t d = 0; d < dim; ++d) {
      vector_moments[d] = float(sum_wv[d]);
      vector_moments[dim + d] = float(sum_w2v[d]);
    }
  }
}

}  // namespace

void pilot_stats_cpu(const PilotParams& p, int64_t head_begin, int64_t head_end) {
  dispatch_dtype(p.qkv.dtype, [&](auto tag) {
    pilot_heads<decltype(tag)>(p, head_begin, head_end);
  });
}

}  // namespace vattention
