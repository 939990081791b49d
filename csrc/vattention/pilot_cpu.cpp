// CPU pilot statistics, in double: the reference the CUDA kernel is checked against.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kv_rows_cpu.h"
#include "pilot.h"

namespace vattention {
namespace {

// The logits of a list's valid entries (their positions in `used`) and their max. std::max
// skips a NaN; instead a NaN logit (from q or a K row) makes the max, and through
// w = exp(s - max) every statistic, NaN. A NaN in a V row reaches only what reads V.
template <typename T>
float list_logits(const KVRowsCpu<T>& rows, const std::vector<float>& q, int64_t b,
                  int64_t kv_head, const int32_t* indices, int64_t count,
                  std::vector<int32_t>* used, std::vector<float>* logits) {
  used->clear();
  logits->clear();
  float max_logit = kNegInf;
  bool nan_logit = false;
  for (int64_t j = 0; j < count; ++j) {
    if (!rows.valid(indices[j])) continue;
    used->push_back(indices[j]);
    logits->push_back(rows.logit(q, b, kv_head, indices[j]));
    nan_logit |= std::isnan(logits->back());
    max_logit = std::max(max_logit, logits->back());
  }
  return nan_logit ? std::numeric_limits<float>::quiet_NaN() : max_logit;
}

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
    // A NaN in a V row reaches the third moment and that element of the vector moments only.
    const float max_logit = list_logits(rows, q, b, kv_head, indices, count, &used, &logits);

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

template <typename T>
void dispersion_heads(const PilotDispersionParams& p, int64_t head_begin, int64_t head_end) {
  const KVRowsCpu<T> rows{p.qkv};
  const int64_t q_heads = p.qkv.q_heads, dim = p.qkv.head_dim, group = p.qkv.group_size();
  std::vector<float> q, logits;
  std::vector<int32_t> used;
  std::vector<double> c, mean(dim);
  for (int64_t t = head_begin; t < head_end; ++t) {
    const int64_t b = t / q_heads, h = t % q_heads, kv_head = h / group;
    const int64_t list = p.list.list_of(b, h, q_heads, group);
    const int32_t* indices = p.list.indices + list * p.list.max_count;
    const int64_t count = std::min<int64_t>(p.list.counts[list], p.list.max_count);
    const float* center = p.center + t * dim;
    rows.load_query(b, h, &q);
    const float max_logit = list_logits(rows, q, b, kv_head, indices, count, &used, &logits);
    const int64_t n = int64_t(used.size());
    double trace = 0, frobenius = 0, fourth = 0;
    if (n > 0) {
      c.assign(size_t(n * dim), 0.0);
      std::fill(mean.begin(), mean.end(), 0.0);
      for (int64_t i = 0; i < n; ++i) {
        const double w = std::exp(double(logits[i]) - max_logit);
        const T* v = rows.value(b, kv_head, used[i]);
        for (int64_t d = 0; d < dim; ++d) {
          c[i * dim + d] = w * (double(to_float(v[d])) - center[d]);
          mean[d] += c[i * dim + d];
        }
      }
      for (int64_t d = 0; d < dim; ++d) mean[d] /= double(n);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t d = 0; d < dim; ++d) c[i * dim + d] -= mean[d];
      }
      // Tr(S^2) in draw space: sum over the p x p Gram's entries squared.
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = i; j < n; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < dim; ++d) dot += c[i * dim + d] * c[j * dim + d];
          if (i == j) {
            trace += dot;
            frobenius += dot * dot;
            fourth += dot * dot;
          } else {
            frobenius += 2.0 * dot * dot;
          }
        }
      }
    }
    p.dispersion[t * kDispersionOutputs] = float(trace);
    p.dispersion[t * kDispersionOutputs + 1] = float(frobenius);
    p.dispersion[t * kDispersionOutputs + 2] = float(fourth);
  }
}

}  // namespace

void pilot_dispersion_cpu(const PilotDispersionParams& p, int64_t head_begin, int64_t head_end) {
  dispatch_dtype(p.qkv.dtype, [&](auto tag) {
    dispersion_heads<decltype(tag)>(p, head_begin, head_end);
  });
}

void pilot_stats_cpu(const PilotParams& p, int64_t head_begin, int64_t head_end) {
  dispatch_dtype(p.qkv.dtype, [&](auto tag) {
    pilot_heads<decltype(tag)>(p, head_begin, head_end);
  });
}

}  // namespace vattention
