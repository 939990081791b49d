// CPU selection scores (select_scores.h, SelectScoresParams): one (batch, KV head)
// pair at a time, each K row (or its dequantised summary) converted once and dotted
// with every query head of the group.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kv_rows_cpu.h"
#include "select_scores.h"

namespace vattention {
namespace {

// logsumexp of a row of logits as select_scores.h defines it: 0 where it is not finite
// (no entries, all -inf, a +inf, or a NaN among them).
float usable_lse(const float* x, int64_t n) {
  float m = kNegInf;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) {
      nan = true;
    } else {
      m = std::max(m, x[i]);
    }
  }
  if (nan || !std::isfinite(m)) return 0.f;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(x[i]) - double(m));
  const float lse = float(double(m) + std::log(sum));
  return std::isfinite(lse) ? lse : 0.f;
}

// K~_d = z_g + s_g * code_d of one token (key_summary.h); logical row i, paged or not.
void dequantize_key(const KeySummaryParams& s, int64_t b, int64_t kv, int64_t i, int64_t dim,
                    float* key) {
  const uint8_t* codes = s.codes + s.paging.offset(b, kv, i, s.codes_batch_stride,
                                                   s.codes_head_stride, s.codes_row_stride);
  const half_t* params = s.params + s.paging.offset(b, kv, i, s.params_batch_stride,
                                                    s.params_head_stride, s.params_row_stride);
  for (int64_t g = 0; g < dim / kSummaryGroup; ++g) {
    const float zero = to_float(params[2 * g]), step = to_float(params[2 * g + 1]);
    const uint8_t* c = codes + g * (kSummaryGroup / 2);
    float* out = key + g * kSummaryGroup;
    for (int j = 0; j < kSummaryGroup / 2; ++j) {
      out[2 * j] = zero + step * float(c[j] & 0xfu);
      out[2 * j + 1] = zero + step * float(c[j] >> 4);
    }
  }
}

template <typename T>
void select_scores_lists(const SelectScoresParams& p, int64_t list_begin, int64_t list_end) {
  const QKVParams& qkv = p.qkv;
  const KVRowsCpu<T> rows{qkv};
  const int64_t group = qkv.group_size(), dim = qkv.head_dim, n = qkv.length;
  std::vector<float> q(static_cast<size_t>(group * dim)), query;
  std::vector<float> key(static_cast<size_t>(dim));
  std::vector<float> logits;  // [group, len] (share_gqa only)
  std::vector<float> lse(static_cast<size_t>(group));
  for (int64_t list = list_begin; list < list_end; ++list) {
    const int64_t b = list / qkv.kv_heads, kv = list - b * qkv.kv_heads;
    const int64_t len = p.length_of(b);
    for (int64_t g = 0; g < group; ++g) {
      rows.load_query(b, kv * group + g, &query);
      std::copy(query.begin(), query.end(), q.begin() + g * dim);
    }
    // Logits of head g at position i go to dst(g) + i.
    float* direct = p.scores + (b * qkv.q_heads + kv * group) * n;  // share_gqa = false
    if (p.share_gqa) logits.assign(size_t(group * len), 0.f);
    auto dst = [&](int64_t g) { return p.share_gqa ? logits.data() + g * len : direct + g * n; };
    for (int64_t i = 0; i < len; ++i) {
      if (p.from_summary) {
        dequantize_key(p.summary, b, kv, i, dim, key.data());
      } else {
        const T* k = rows.key(b, kv, i);
        for (int64_t d = 0; d < dim; ++d) key[d] = to_float(k[d]);
      }
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = q.data() + g * dim;
        float dot = 0.f;
        for (int64_t d = 0; d < dim; ++d) dot += qg[d] * key[d];
        dst(g)[i] = dot * qkv.scale;
      }
    }
    if (!p.share_gqa) {
      for (int64_t g = 0; g < group; ++g) {
        std::fill(direct + g * n + len, direct + (g + 1) * n, kNegInf);
      }
      continue;
    }
    for (int64_t g = 0; g < group; ++g) lse[g] = usable_lse(logits.data() + g * len, len);
    float* out = p.scores + (b * qkv.kv_heads + kv) * n;
    for (int64_t i = 0; i < len; ++i) {
      float best = kNegInf;
      bool nan = false;
      for (int64_t g = 0; g < group; ++g) {
        const float x = logits[g * len + i] - lse[g];
        nan = nan || std::isnan(x);
        best = std::max(best, x);
      }
      out[i] = nan ? std::numeric_limits<float>::quiet_NaN() : best;
    }
    std::fill(out + len, out + n, kNegInf);
  }
}

}  // namespace

void select_scores_cpu(const SelectScoresParams& p, int64_t list_begin, int64_t list_end) {
  dispatch_dtype(p.qkv.dtype, [&](auto tag) {
    select_scores_lists<decltype(tag)>(p, list_begin, list_end);
  });
}

}  // namespace vattention
