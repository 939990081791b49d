// CPU sparse attention: the reference the CUDA kernel is checked against, one
// SoftmaxState per (head, split) item (see online_softmax.h for NaN handling).
#include <algorithm>
#include <vector>

#include "kv_rows_cpu.h"
#include "online_softmax.h"
#include "sparse_attention.h"

namespace vattention {
namespace {

template <typename T>
void attend_items(const SparseAttentionParams& p, int64_t item_begin, int64_t item_end) {
  const KVRowsCpu<T> rows{p.qkv};
  const int64_t q_heads = p.qkv.q_heads, dim = p.qkv.head_dim, group = p.qkv.group_size();
  std::vector<float> q, acc(dim);
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t split = item % p.num_splits, t = item / p.num_splits;
    const int64_t b = t / q_heads, h = t % q_heads, kv_head = h / group;
    const int64_t list = p.list.list_of(b, h, q_heads, group);
    const int32_t* indices = p.list.indices + list * p.list.max_count;
    const float* log_weights =
        p.list.log_weights ? p.list.log_weights + list * p.list.max_count : nullptr;
    const int64_t count = std::min<int64_t>(p.list.counts[list], p.list.max_count);
    int64_t begin, end;
    split_range(count, split, p.num_splits, &begin, &end);
    rows.load_query(b, h, &q);

    SoftmaxState state;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = begin; j < end; ++j) {
      // Padding, out-of-range rows and weight-0 entries are not read (like the
      // CUDA kernel), so whatever those rows hold cannot reach the output.
      if (!rows.valid(indices[j])) continue;
      if (log_weights && log_weights[j] == kNegInf) continue;
      const float logit =
          rows.logit(q, b, kv_head, indices[j]) + (log_weights ? log_weights[j] : 0.f);
      float weight;
      const float rescale = state.push(logit, &weight);
      const T* v = rows.value(b, kv_head, indices[j]);
      for (int64_t d = 0; d < dim; ++d) acc[d] = acc[d] * rescale + weight * to_float(v[d]);
    }
    float* out = p.partial_out + item * dim;
    const float inv = state.inverse_sum();  // NaN after a NaN logit, so out is NaN too
    for (int64_t d = 0; d < dim; ++d) out[d] = acc[d] * inv;
    p.partial_lse[item] = state.lse();
  }
}

}  // namespace

void sparse_attention_partial_cpu(const SparseAttentionParams& p, int64_t item_begin,
                                  int64_t item_end) {
  dispatch_dtype(p.qkv.dtype, [&](auto tag) {
    attend_items<decltype(tag)>(p, item_begin, item_end);
  });
}

}  // namespace vattention
