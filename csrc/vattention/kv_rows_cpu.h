// Row access shared by the CPU stages that read q, K and V.
#pragma once

#include <vector>

#include "attention_params.h"
#include "dispatch.h"

namespace vattention {

template <typename T>
struct KVRowsCpu {
  const QKVParams& p;

  const T* key(int64_t b, int64_t kv_head, int64_t row) const {
    return static_cast<const T*>(p.k) + b * p.k_batch_stride + kv_head * p.k_head_stride +
           row * p.k_row_stride;
  }
  const T* value(int64_t b, int64_t kv_head, int64_t row) const {
    return static_cast<const T*>(p.v) + b * p.v_batch_stride + kv_head * p.v_head_stride +
           row * p.v_row_stride;
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
