#include "checks.h"

#include <ATen/ops/empty.h>

namespace vattention::binding {

vattention::DType element_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return vattention::DType::kFloat32;
    case at::kHalf: return vattention::DType::kFloat16;
    case at::kBFloat16: return vattention::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "vattention: ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

void check_int32_vector(const at::Tensor& t, const char* name, int64_t rows, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "vattention: ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, "vattention: ", name, " must have shape [",
              rows, "], got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "vattention: ", name, " must be on ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "vattention: ", name, " must be contiguous");
}

namespace {

// The q/K part of QKVParams: q [B, Hq, D], k [B, Hkv, N, D], Hq % Hkv == 0, one dtype and
// device, contiguous head_dim. Shared by the ops that read V too and select_scores.
QKVParams qk_params(const at::Tensor& q, const at::Tensor& k, double scale) {
  TORCH_CHECK(q.dim() == 3, "vattention: q must be [batch, q_heads, head_dim], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "vattention: k must be [batch, kv_heads, length, head_dim], got ",
              k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "vattention: q and k must share a dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "vattention: q and k must be on one device, got ",
              q.device(), " and ", k.device());
  TORCH_CHECK(k.size(0) == q.size(0), "vattention: k has batch ", k.size(0), " but q has ",
              q.size(0));
  TORCH_CHECK(k.size(3) == q.size(2), "vattention: k has head_dim ", k.size(3), " but q has ",
              q.size(2));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "vattention: q_heads (", q.size(1),
              ") must be a multiple of kv_heads (", k.size(1), ")");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1,
              "vattention: the head_dim of q and k must be contiguous");
  QKVParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_batch_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.k_row_stride = k.stride(2);
  p.batch = q.size(0);
  p.q_heads = q.size(1);
  p.kv_heads = k.size(1);
  p.length = k.size(2);
  p.head_dim = q.size(2);
  p.dtype = element_type(q, "q");
  p.scale = float(scale);
  return p;
}

}  // namespace

QKVParams qkv_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 3, "vattention: q must be [batch, q_heads, head_dim], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "vattention: k must be [batch, kv_heads, length, head_dim], got ",
              k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "vattention: v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "vattention: q, k and v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "vattention: q, k and v must be on one device, got ", q.device(), ", ", k.device(),
              ", ", v.device());
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "vattention: the head_dim of q, k and v must be contiguous");
  QKVParams p = qk_params(q, k, scale);
  p.v = v.data_ptr();
  p.v_batch_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.v_row_stride = v.stride(2);
  return p;
}

IndexListParams index_list_params(const QKVParams& qkv, const at::Tensor& q,
                                  const at::Tensor& indices, const at::Tensor& counts,
                                  const c10::optional<at::Tensor>& log_weights) {
  TORCH_CHECK(indices.dim() == 3 && indices.size(0) == qkv.batch &&
                  (indices.size(1) == qkv.kv_heads || indices.size(1) == qkv.q_heads),
              "vattention: indices must be [batch, kv_heads or q_heads, max_count] = [", qkv.batch,
              ", ", qkv.kv_heads, " or ", qkv.q_heads, ", L], got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt, "vattention: indices must be int32, got ",
              indices.scalar_type());
  TORCH_CHECK(indices.device() == q.device(), "vattention: indices must be on ", q.device(),
              ", got ", indices.device());
  TORCH_CHECK(indices.is_contiguous(), "vattention: indices must be contiguous");
  TORCH_CHECK(counts.scalar_type() == at::kInt, "vattention: counts must be int32, got ",
              counts.scalar_type());
  TORCH_CHECK(counts.dim() == 2 && counts.size(0) == indices.size(0) &&
                  counts.size(1) == indices.size(1),
              "vattention: counts must be [", indices.size(0), ", ", indices.size(1), "], got ",
              counts.sizes());
  TORCH_CHECK(counts.device() == q.device(), "vattention: counts must be on ", q.device(),
              ", got ", counts.device());
  TORCH_CHECK(counts.is_contiguous(), "vattention: counts must be contiguous");
  IndexListParams p{};
  if (log_weights.has_value()) {
    const at::Tensor& w = *log_weights;
    TORCH_CHECK(w.scalar_type() == at::kFloat, "vattention: log_weights must be float32, got ",
                w.scalar_type());
    TORCH_CHECK(w.sizes() == indices.sizes(), "vattention: log_weights must have indices' shape ",
                indices.sizes(), ", got ", w.sizes());
    TORCH_CHECK(w.device() == q.device(), "vattention: log_weights must be on ", q.device(),
                ", got ", w.device());
    TORCH_CHECK(w.is_contiguous(), "vattention: log_weights must be contiguous");
    p.log_weights = w.data_ptr<float>();
  }
  p.indices = indices.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.list_heads = indices.size(1);
  p.max_count = indices.size(2);
  return p;
}

PilotDispersionParams pilot_dispersion_params(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& indices,
                                              const at::Tensor& counts, double scale,
                                              const at::Tensor& center) {
  PilotDispersionParams p{};
  p.qkv = qkv_params(q, k, v, scale);
  p.list = index_list_params(p.qkv, q, indices, counts, c10::nullopt);
  TORCH_CHECK(center.scalar_type() == at::kFloat, "vattention: center must be float32, got ",
              center.scalar_type());
  TORCH_CHECK(center.device() == q.device(), "vattention: center must be on q's device ",
              q.device(), ", got ", center.device());
  TORCH_CHECK(center.dim() == 3 && center.size(0) == p.qkv.batch &&
                  center.size(1) == p.qkv.q_heads && center.size(2) == p.qkv.head_dim,
              "vattention: center must be [batch, q_heads, head_dim] = [", p.qkv.batch, ", ",
              p.qkv.q_heads, ", ", p.qkv.head_dim, "], got ", center.sizes());
  TORCH_CHECK(center.is_contiguous(), "vattention: center must be contiguous");
  p.center = center.data_ptr<float>();
  return p;
}

void check_select_topk_args(const at::Tensor& scores, const at::Tensor& starts, const at::Tensor& ends,
                     const at::Tensor& ks, int64_t k_max) {
  TORCH_CHECK(scores.dim() == 2, "vattention: scores must be [rows, length], got ",
              scores.sizes());
  TORCH_CHECK(scores.size(1) == 0 || scores.stride(1) == 1,
              "vattention: scores must be contiguous along length");
  TORCH_CHECK(k_max >= 0, "vattention: k_max must be >= 0, got ", k_max);
  TORCH_CHECK(scores.size(1) < (int64_t(1) << 31), "vattention: scores length must be < 2^31");
  const int64_t rows = scores.size(0);
  check_int32_vector(starts, "starts", rows, scores);
  check_int32_vector(ends, "ends", rows, scores);
  check_int32_vector(ks, "ks", rows, scores);
  element_type(scores, "scores");
}

SelectTopkParams select_topk_params(const at::Tensor& scores, const at::Tensor& starts,
                       const at::Tensor& ends, const at::Tensor& ks, int64_t k_max,
                       const at::Tensor& indices) {
  SelectTopkParams p{};
  p.scores = scores.data_ptr();
  p.score_row_stride = scores.stride(0);
  p.starts = starts.data_ptr<int32_t>();
  p.ends = ends.data_ptr<int32_t>();
  p.ks = ks.data_ptr<int32_t>();
  p.indices = indices.data_ptr<int32_t>();
  p.rows = scores.size(0);
  p.length = scores.size(1);
  p.k_max = k_max;
  p.dtype = element_type(scores, "scores");
  return p;
}

SampleParams sample_params(const at::Tensor& heavy, const at::Tensor& starts,
                           const at::Tensor& ends, const at::Tensor& num_samples,
                           const at::Tensor& rng, int64_t max_out, int64_t draw_set,
                           at::Tensor* indices, at::Tensor* log_weights, at::Tensor* counts) {
  TORCH_CHECK(heavy.dim() == 2, "vattention: heavy must be [rows, heavy_max], got ",
              heavy.sizes());
  TORCH_CHECK(heavy.scalar_type() == at::kInt, "vattention: heavy must be int32, got ",
              heavy.scalar_type());
  TORCH_CHECK(heavy.is_contiguous(), "vattention: heavy must be contiguous");
  const int64_t rows = heavy.size(0);
  check_int32_vector(starts, "starts", rows, heavy);
  check_int32_vector(ends, "ends", rows, heavy);
  check_int32_vector(num_samples, "num_samples", rows, heavy);
  TORCH_CHECK(rng.scalar_type() == at::kLong && rng.dim() == 1 && rng.size(0) == 2,
              "vattention: rng must be an int64 tensor [seed, offset], got ", rng.scalar_type(),
              " ", rng.sizes());
  TORCH_CHECK(rng.device() == heavy.device(), "vattention: rng must be on ", heavy.device(),
              ", got ", rng.device());
  TORCH_CHECK(rng.is_contiguous(), "vattention: rng must be contiguous");
  TORCH_CHECK(max_out >= 0, "vattention: max_out must be >= 0, got ", max_out);
  TORCH_CHECK(draw_set == kPilotDraws || draw_set == kFinalDraws, "vattention: draw_set must be 0 (pilot) or 1 (final sample), got ",
              draw_set);
  TORCH_CHECK(rows < (int64_t(1) << 32), "vattention: too many rows for the sampler");
  *indices = at::empty({rows, max_out}, heavy.options());
  *log_weights = at::empty({rows, max_out}, heavy.options().dtype(at::kFloat));
  *counts = at::empty({rows}, heavy.options());
  SampleParams p{};
  p.heavy = heavy.size(1) > 0 ? heavy.data_ptr<int32_t>() : nullptr;
  p.heavy_stride = heavy.size(1);
  p.starts = starts.data_ptr<int32_t>();
  p.ends = ends.data_ptr<int32_t>();
  p.num_samples = num_samples.data_ptr<int32_t>();
  p.rng = rng.data_ptr<int64_t>();
  p.indices = indices->data_ptr<int32_t>();
  p.log_weights = log_weights->data_ptr<float>();
  p.counts = counts->data_ptr<int32_t>();
  p.rows = rows;
  p.max_out = max_out;
  p.draw_set = uint32_t(draw_set);
  return p;
}

void check_partials(const at::Tensor& partial_out, const at::Tensor& partial_lse) {
  TORCH_CHECK(partial_out.dim() >= 2, "vattention: partial_out must be [splits, ..., head_dim], got ",
              partial_out.sizes());
  TORCH_CHECK(partial_out.scalar_type() == at::kFloat && partial_lse.scalar_type() == at::kFloat,
              "vattention: partial_out and partial_lse must be float32, got ",
              partial_out.scalar_type(), " and ", partial_lse.scalar_type());
  TORCH_CHECK(partial_lse.sizes() == partial_out.sizes().slice(0, partial_out.dim() - 1),
              "vattention: partial_lse must be partial_out's shape without head_dim ",
              partial_out.sizes().slice(0, partial_out.dim() - 1), ", got ", partial_lse.sizes());
  TORCH_CHECK(partial_out.device() == partial_lse.device(),
              "vattention: partial_out and partial_lse must be on one device");
  TORCH_CHECK(partial_out.is_contiguous() && partial_lse.is_contiguous(),
              "vattention: partial_out and partial_lse must be contiguous");
}

CombineParams combine_params(const at::Tensor& partial_out, const at::Tensor& partial_lse,
                             int64_t items, int64_t splits, int64_t dim, bool splits_first,
                             const at::Tensor& out, const at::Tensor& lse) {
  CombineParams c{};
  c.partial_out = partial_out.data_ptr<float>();
  c.partial_lse = partial_lse.data_ptr<float>();
  c.item_stride_out = splits_first ? dim : splits * dim;
  c.split_stride_out = splits_first ? items * dim : dim;
  c.item_stride_lse = splits_first ? 1 : splits;
  c.split_stride_lse = splits_first ? items : 1;
  c.out = out.data_ptr<float>();
  c.lse = lse.data_ptr<float>();
  c.items = items;
  c.num_splits = splits;
  c.head_dim = dim;
  return c;
}


namespace {

void set_lengths(SelectScoresParams* p, const at::Tensor& q, const at::Tensor& lengths) {
  TORCH_CHECK(lengths.scalar_type() == at::kLong || lengths.scalar_type() == at::kInt,
              "vattention: lengths must be int64 or int32, got ", lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0),
              "vattention: lengths must have shape [", q.size(0), "], got ", lengths.sizes());
  TORCH_CHECK(lengths.device() == q.device(), "vattention: lengths must be on ", q.device(),
              ", got ", lengths.device());
  TORCH_CHECK(lengths.is_contiguous(), "vattention: lengths must be contiguous");
  p->lengths = lengths.data_ptr();
  p->lengths_int64 = lengths.scalar_type() == at::kLong;
}

}  // namespace

SelectScoresParams select_scores_params(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& lengths, double scale, bool share_gqa) {
  SelectScoresParams p{};
  p.qkv = qk_params(q, k, scale);
  TORCH_CHECK(q.size(1) > 0, "vattention: q_heads (0) must be a positive multiple of kv_heads (",
              k.size(1), ")");
  set_lengths(&p, q, lengths);
  p.share_gqa = share_gqa;
  p.num_splits = 0;
  p.from_summary = false;
  return p;
}

KeySummaryParams key_summary_params(const at::Tensor& codes, const at::Tensor& params,
                                    int64_t batch, int64_t kv_heads, int64_t dim,
                                    const at::Tensor& like) {
  TORCH_CHECK(dim > 0 && dim % kSummaryGroup == 0,
              "vattention: the key summary needs a head_dim that is a multiple of ",
              kSummaryGroup, ", got ", dim);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "vattention: codes must be uint8, got ",
              codes.scalar_type());
  TORCH_CHECK(codes.dim() == 4 && codes.size(0) == batch && codes.size(1) == kv_heads &&
                  codes.size(3) == dim / 2,
              "vattention: codes must be [batch, kv_heads, length, head_dim / 2] = [", batch, ", ",
              kv_heads, ", N, ", dim / 2, "], got ", codes.sizes());
  TORCH_CHECK(params.scalar_type() == at::kHalf, "vattention: params must be float16, got ",
              params.scalar_type());
  TORCH_CHECK(params.dim() == 5 && params.size(0) == batch && params.size(1) == kv_heads &&
                  params.size(2) == codes.size(2) && params.size(3) == dim / kSummaryGroup &&
                  params.size(4) == 2,
              "vattention: params must be [batch, kv_heads, length, head_dim / 32, 2] = [", batch,
              ", ", kv_heads, ", ", codes.size(2), ", ", dim / kSummaryGroup, ", 2], got ",
              params.sizes());
  TORCH_CHECK(codes.device() == like.device(), "vattention: codes must be on ", like.device(),
              ", got ", codes.device());
  TORCH_CHECK(params.device() == like.device(), "vattention: params must be on ", like.device(),
              ", got ", params.device());
  TORCH_CHECK(codes.stride(3) == 1, "vattention: codes must be contiguous along head_dim / 2");
  TORCH_CHECK(params.stride(4) == 1 && params.stride(3) == 2,
              "vattention: params must be contiguous per token");
  KeySummaryParams s{};
  s.codes = codes.data_ptr<uint8_t>();
  s.params = reinterpret_cast<half_t*>(params.data_ptr<at::Half>());
  s.codes_batch_stride = codes.stride(0);
  s.codes_head_stride = codes.stride(1);
  s.codes_row_stride = codes.stride(2);
  s.params_batch_stride = params.stride(0);
  s.params_head_stride = params.stride(1);
  s.params_row_stride = params.stride(2);
  return s;
}

SummarizeKeysParams summarize_keys_params(const at::Tensor& k, const at::Tensor& codes,
                                          const at::Tensor& params, const at::Tensor& row_begin) {
  TORCH_CHECK(k.dim() == 4, "vattention: k must be [batch, kv_heads, rows, head_dim], got ",
              k.sizes());
  TORCH_CHECK(k.size(3) == 0 || k.stride(3) == 1, "vattention: the head_dim of k must be contiguous");
  SummarizeKeysParams p{};
  p.qkv.k = k.data_ptr();
  p.qkv.dtype = element_type(k, "k");
  p.qkv.k_batch_stride = k.stride(0);
  p.qkv.k_head_stride = k.stride(1);
  p.qkv.k_row_stride = k.stride(2);
  p.qkv.batch = k.size(0);
  p.qkv.kv_heads = k.size(1);
  p.qkv.q_heads = k.size(1);
  p.qkv.length = k.size(2);
  p.qkv.head_dim = k.size(3);
  p.summary = key_summary_params(codes, params, k.size(0), k.size(1), k.size(3), k);
  TORCH_CHECK(row_begin.scalar_type() == at::kLong, "vattention: row_begin must be int64, got ",
              row_begin.scalar_type());
  TORCH_CHECK(row_begin.dim() == 1 && row_begin.size(0) == k.size(0),
              "vattention: row_begin must have shape [", k.size(0), "], got ", row_begin.sizes());
  TORCH_CHECK(row_begin.device() == k.device(), "vattention: row_begin must be on ", k.device(),
              ", got ", row_begin.device());
  TORCH_CHECK(row_begin.is_contiguous(), "vattention: row_begin must be contiguous");
  p.row_begin = row_begin.data_ptr<int64_t>();
  p.rows = k.size(2);
  p.summary_length = codes.size(2);
  return p;
}

SelectScoresParams select_scores_summary_params(const at::Tensor& q, const at::Tensor& codes,
                                                const at::Tensor& params,
                                                const at::Tensor& lengths, double scale,
                                                bool share_gqa) {
  TORCH_CHECK(q.dim() == 3, "vattention: q must be [batch, q_heads, head_dim], got ", q.sizes());
  TORCH_CHECK(q.stride(2) == 1, "vattention: the head_dim of q must be contiguous");
  TORCH_CHECK(codes.dim() == 4, "vattention: codes must be [batch, kv_heads, length, head_dim / 2], got ",
              codes.sizes());
  const int64_t kv_heads = codes.size(1);
  TORCH_CHECK(kv_heads > 0 && q.size(1) > 0 && q.size(1) % kv_heads == 0, "vattention: q_heads (",
              q.size(1), ") must be a positive multiple of kv_heads (", kv_heads, ")");
  SelectScoresParams p{};
  p.summary = key_summary_params(codes, params, q.size(0), kv_heads, q.size(2), q);
  p.from_summary = true;
  p.qkv.q = q.data_ptr();
  p.qkv.k = nullptr;
  p.qkv.q_batch_stride = q.stride(0);
  p.qkv.q_head_stride = q.stride(1);
  p.qkv.batch = q.size(0);
  p.qkv.q_heads = q.size(1);
  p.qkv.kv_heads = kv_heads;
  p.qkv.length = codes.size(2);
  p.qkv.head_dim = q.size(2);
  p.qkv.dtype = element_type(q, "q");
  p.qkv.scale = float(scale);
  set_lengths(&p, q, lengths);
  p.share_gqa = share_gqa;
  p.num_splits = 0;
  return p;
}

}  // namespace vattention::binding
