// Row access shared by the CPU stages that read q, K and V.
#pragma once

#include <vector>

#include "attention_params.h"
#include "dispatch.h"

namespace vattention {

template <typename T>
struct KVRowsCpu {
  const QKVParams& p;

  // Logical row `row` of batch row b, contiguous or paged (attention_params.h).
  const T* key(int64_t b, int64_t kv_head, int64_t row) const {
    return static_cast<const T*>(p.k) + p.k_offset(b, kv_head, row);
  }
  const T* value(int64_t b, int64_t kv_head, int64_t row) const {
    return static_cast<const T*>(p.v) + p.v_offset(b, kv_head, row);
  }
  void load_query(int64_t b, int64_t h, std::vector<float>* out) const {
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    out->resize(p.head_dim);
    for (int64_t d = 0; d < p.head_dim; ++d) (*out)[d] = to_float(q[d]);
  }
  float logit(const std::vector<float>& q, int64_t b, int64_t kv_head, int64_t row) const {
    const T* k = key(b, kv_head, row);
    float dot = 0.f;
    for (int64_t d = 0; d < p.head_dim; ++d) dot += q[d] * to_float(k[d]);
    return dot * p.scale;
  }
  bool valid(int32_t row) const { return row >= 0 && row < p.length; }
};

}  // namespace vattention
