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

KVPaging kv_paging(const c10::optional<at::Tensor>& block_table, int64_t batch,
                   int64_t block_size, const at::Tensor& like) {
  KVPaging paging{};
  if (!block_table.has_value()) return paging;
  const at::Tensor& t = *block_table;
  TORCH_CHECK(t.scalar_type() == at::kInt, "vattention: block_table must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == batch,
              "vattention: block_table must be [batch, max_blocks] with batch ", batch, ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == like.device(), "vattention: block_table must be on ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1,
              "vattention: block_table must be contiguous along max_blocks");
  TORCH_CHECK(block_size > 0, "vattention: a paged cache (block_table given) needs a block size "
              "(dim 2 of the pool) > 0, got ", block_size);
  paging.block_table = t.numel() > 0 ? t.data_ptr<int32_t>() : nullptr;
  paging.block_table_stride = t.stride(0);
  paging.block_size = block_size;
  return paging;
}

int64_t paged_length(const at::Tensor& block_table, int64_t block_size) {
  const int64_t n = block_table.size(1) * block_size;
  TORCH_CHECK(n < (int64_t(1) << 31) - 1, "vattention: block_table.size(1) * block_size (", n,
              ") must be < 2^31 - 1");
  return n;
}

namespace {

// A per-head or per-list tensor of the fused ops (plan_budget, merge_estimate, ...): its
// dtype, exact shape, device and contiguity, each error naming the argument.
void check_plain_input(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                       at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == dtype, "vattention: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "vattention: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == like.device(), "vattention: ", name, " must be on ", like.device(),
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "vattention: ", name, " must be contiguous");
}


// The q/K part of QKVParams: q [B, Hq, D], k [B, Hkv, N, D] (or a paged pool with
// block_table), Hq % Hkv == 0, one dtype and device, contiguous head_dim. Shared by the ops
// that read V too and select_scores.
QKVParams qk_params(const at::Tensor& q, const at::Tensor& k, double scale,
                    const c10::optional<at::Tensor>& block_table) {
  TORCH_CHECK(q.dim() == 3, "vattention: q must be [batch, q_heads, head_dim], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4,
              block_table.has_value()
                  ? "vattention: k must be [num_blocks, kv_heads, block_size, head_dim], got "
                  : "vattention: k must be [batch, kv_heads, length, head_dim], got ",
              k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "vattention: q and k must share a dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "vattention: q and k must be on one device, got ",
              q.device(), " and ", k.device());
  TORCH_CHECK(block_table.has_value() || k.size(0) == q.size(0), "vattention: k has batch ",
              k.size(0), " but q has ", q.size(0));
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
  p.paging = kv_paging(block_table, q.size(0), k.size(2), q);
  p.length = block_table.has_value() ? paged_length(*block_table, k.size(2)) : k.size(2);
  p.head_dim = q.size(2);
  p.dtype = element_type(q, "q");
  p.scale = float(scale);
  return p;
}

}  // namespace

QKVParams qkv_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                     const c10::optional<at::Tensor>& block_table) {
  TORCH_CHECK(q.dim() == 3, "vattention: q must be [batch, q_heads, head_dim], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4,
              block_table.has_value()
                  ? "vattention: k must be [num_blocks, kv_heads, block_size, head_dim], got "
                  : "vattention: k must be [batch, kv_heads, length, head_dim], got ",
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
  QKVParams p = qk_params(q, k, scale, block_table);
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
                                              const at::Tensor& center,
                                              const c10::optional<at::Tensor>& block_table) {
  PilotDispersionParams p{};
  p.qkv = qkv_params(q, k, v, scale, block_table);
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

void check_select_topk_out(const at::Tensor& out, const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 2, "vattention: scores must be [rows, length], got ",
              scores.sizes());
  TORCH_CHECK(out.scalar_type() == at::kInt, "vattention: out must be int32, got ",
              out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == scores.size(0),
              "vattention: out must be [rows, k_max] with rows = scores.size(0) = ",
              scores.size(0), ", got ", out.sizes());
  TORCH_CHECK(out.device() == scores.device(), "vattention: out must be on ", scores.device(),
              ", got ", out.device());
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1,
              "vattention: out must be contiguous along its last dim, got strides ", out.strides());
  TORCH_CHECK(out.size(0) <= 1 || out.stride(0) >= out.size(1),
              "vattention: out's rows must not overlap (row stride >= k_max = ", out.size(1),
              "), got strides ", out.strides());
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
  p.index_row_stride = indices.size(0) > 1 ? indices.stride(0) : k_max;
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
  // Any row stride (decode passes the heavy columns of its deterministic list), the
  // entries of a row contiguous.
  TORCH_CHECK(heavy.size(1) <= 1 || heavy.stride(1) == 1,
              "vattention: heavy's last dim must be contiguous, got strides ", heavy.strides());
  TORCH_CHECK(heavy.size(0) <= 1 || heavy.stride(0) >= heavy.size(1),
              "vattention: heavy's rows must not overlap (stride(0) >= size(1)), got strides ",
              heavy.strides(), " for shape ", heavy.sizes());
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
  p.heavy_width = heavy.size(1);
  p.heavy_stride = heavy.size(0) > 1 ? heavy.stride(0) : heavy.size(1);
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
  return combine_layout(partial_out.data_ptr<float>(), partial_lse.data_ptr<float>(), items,
                        splits, dim, splits_first, out.data_ptr<float>(), lse.data_ptr<float>());
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
                                        const at::Tensor& lengths, double scale, bool share_gqa,
                                        const c10::optional<at::Tensor>& block_table) {
  SelectScoresParams p{};
  p.qkv = qk_params(q, k, scale, block_table);
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
                                    const at::Tensor& like, bool paged) {
  TORCH_CHECK(dim > 0 && dim % kSummaryGroup == 0,
              "vattention: the key summary needs a head_dim that is a multiple of ",
              kSummaryGroup, ", got ", dim);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "vattention: codes must be uint8, got ",
              codes.scalar_type());
  if (paged) {
    TORCH_CHECK(codes.dim() == 4 && codes.size(1) == kv_heads && codes.size(3) == dim / 2,
                "vattention: a paged codes must be [num_blocks, kv_heads, block_size, "
                "head_dim / 2] = [num_blocks, ", kv_heads, ", block_size, ", dim / 2, "], got ",
                codes.sizes());
    batch = codes.size(0);  // the pool's blocks stand where batch rows would
  }
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
                                          const at::Tensor& params, const at::Tensor& row_begin,
                                          const c10::optional<at::Tensor>& block_table) {
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
  const bool paged = block_table.has_value();
  p.summary = key_summary_params(codes, params, k.size(0), k.size(1), k.size(3), k, paged);
  p.summary.paging = kv_paging(block_table, k.size(0), codes.size(2), k);
  TORCH_CHECK(row_begin.scalar_type() == at::kLong, "vattention: row_begin must be int64, got ",
              row_begin.scalar_type());
  TORCH_CHECK(row_begin.dim() == 1 && row_begin.size(0) == k.size(0),
              "vattention: row_begin must have shape [", k.size(0), "], got ", row_begin.sizes());
  TORCH_CHECK(row_begin.device() == k.device(), "vattention: row_begin must be on ", k.device(),
              ", got ", row_begin.device());
  TORCH_CHECK(row_begin.is_contiguous(), "vattention: row_begin must be contiguous");
  p.row_begin = row_begin.data_ptr<int64_t>();
  p.rows = k.size(2);
  p.summary_length = paged ? paged_length(*block_table, codes.size(2)) : codes.size(2);
  return p;
}

SelectScoresParams select_scores_summary_params(const at::Tensor& q, const at::Tensor& codes,
                                                const at::Tensor& params,
                                                const at::Tensor& lengths, double scale,
                                                bool share_gqa,
                                                const c10::optional<at::Tensor>& block_table) {
  TORCH_CHECK(q.dim() == 3, "vattention: q must be [batch, q_heads, head_dim], got ", q.sizes());
  TORCH_CHECK(q.stride(2) == 1, "vattention: the head_dim of q must be contiguous");
  TORCH_CHECK(codes.dim() == 4, "vattention: codes must be [batch, kv_heads, length, head_dim / 2], got ",
              codes.sizes());
  const int64_t kv_heads = codes.size(1);
  TORCH_CHECK(kv_heads > 0 && q.size(1) > 0 && q.size(1) % kv_heads == 0, "vattention: q_heads (",
              q.size(1), ") must be a positive multiple of kv_heads (", kv_heads, ")");
  SelectScoresParams p{};
  const bool paged = block_table.has_value();
  p.summary = key_summary_params(codes, params, q.size(0), kv_heads, q.size(2), q, paged);
  // K's table pages the summary; qkv carries it too (qkv.k stays null, K is not read).
  p.summary.paging = kv_paging(block_table, q.size(0), codes.size(2), q);
  p.qkv.paging = p.summary.paging;
  p.from_summary = true;
  p.qkv.q = q.data_ptr();
  p.qkv.k = nullptr;
  p.qkv.q_batch_stride = q.stride(0);
  p.qkv.q_head_stride = q.stride(1);
  p.qkv.batch = q.size(0);
  p.qkv.q_heads = q.size(1);
  p.qkv.kv_heads = kv_heads;
  p.qkv.length = paged ? paged_length(*block_table, codes.size(2)) : codes.size(2);
  p.qkv.head_dim = q.size(2);
  p.qkv.dtype = element_type(q, "q");
  p.qkv.scale = float(scale);
  set_lengths(&p, q, lengths);
  p.share_gqa = share_gqa;
  p.num_splits = 0;
  return p;
}

}  // namespace vattention::binding

// ---------------------------------------------------------------------------
// plan_budget (stage "budget", budget.h).
// ---------------------------------------------------------------------------
namespace vattention::binding {
BudgetParams budget_estimate_params(const at::Tensor& det_out, const at::Tensor& det_lse,
                                    const at::Tensor& pilot_max_logit, const at::Tensor& moments,
                                    const at::Tensor& vector_moments,
                                    const at::Tensor& pilot_counts, const at::Tensor& n_residual) {
  TORCH_CHECK(det_out.dim() == 3, "vattention: det_out must be [batch, q_heads, head_dim], got ",
              det_out.sizes());
  const int64_t batch = det_out.size(0), q_heads = det_out.size(1), dim = det_out.size(2);
  check_plain_input(det_out, "det_out", det_out.sizes(), at::kFloat, det_out);
  check_plain_input(det_lse, "det_lse", {batch, q_heads}, at::kFloat, det_out);
  check_plain_input(pilot_max_logit, "pilot_max_logit", {batch, q_heads}, at::kFloat, det_out);
  check_plain_input(moments, "moments", {batch, q_heads, kBudgetMoments}, at::kFloat, det_out);
  check_plain_input(vector_moments, "vector_moments", {batch, q_heads, 2, dim}, at::kFloat,
                     det_out);
  TORCH_CHECK(pilot_counts.dim() == 1, "vattention: pilot_counts must be [batch * list_heads], "
              "got ", pilot_counts.sizes());
  const int64_t lists = pilot_counts.size(0);
  const int64_t list_heads = batch > 0 ? lists / batch : 0;
  TORCH_CHECK(batch > 0 ? (lists % batch == 0 && list_heads > 0 && q_heads % list_heads == 0)
                        : lists == 0,
              "vattention: pilot_counts must hold batch * list_heads entries with q_heads (",
              q_heads, ") a multiple of list_heads, got ", lists, " for batch ", batch);
  check_plain_input(pilot_counts, "pilot_counts", {lists}, at::kInt, det_out);
  check_plain_input(n_residual, "n_residual", {lists}, at::kLong, det_out);
  BudgetParams p{};
  p.det_out = det_out.data_ptr<float>();
  p.det_lse = det_lse.data_ptr<float>();
  p.pilot_max_logit = pilot_max_logit.data_ptr<float>();
  p.moments = moments.data_ptr<float>();
  p.vector_moments = vector_moments.data_ptr<float>();
  p.pilot_counts = pilot_counts.data_ptr<int32_t>();
  p.n_residual = n_residual.data_ptr<int64_t>();
  p.lists = lists;
  p.group = list_heads > 0 ? q_heads / list_heads : 1;
  p.head_dim = dim;
  return p;
}

BudgetParams plan_budget_params(const at::Tensor& det_out, const at::Tensor& det_lse,
                                const at::Tensor& pilot_max_logit, const at::Tensor& moments,
                                const at::Tensor& vector_moments, const at::Tensor& pilot_counts,
                                const at::Tensor& n_residual,
                                const c10::optional<at::Tensor>& dispersion,
                                const c10::optional<at::Tensor>& chi2_table,
                                const std::string& rule, double epsilon, double z,
                                double tail_dim_shrink, int64_t min_samples, bool reuse_pilot) {
  BudgetParams p = budget_estimate_params(det_out, det_lse, pilot_max_logit, moments,
                                          vector_moments, pilot_counts, n_residual);
  const int64_t batch = det_out.size(0), q_heads = det_out.size(1);
  if (rule == "ratio") {
    p.rule = BudgetRule::kRatio;
  } else if (rule == "paper") {
    p.rule = BudgetRule::kPaper;
  } else if (rule == "denominator") {
    p.rule = BudgetRule::kDenominator;
  } else {
    TORCH_CHECK(false, "vattention: rule must be ratio, paper or denominator, got '", rule, "'");
  }
  TORCH_CHECK(dispersion.has_value() == chi2_table.has_value(),
              "vattention: dispersion and chi2_table go together (the chi-square tail), got ",
              dispersion.has_value() ? "dispersion only" : "chi2_table only");
  if (dispersion.has_value()) {
    TORCH_CHECK(p.rule == BudgetRule::kRatio,
                "vattention: the chi-square tail (dispersion) applies to the ratio rule only, "
                "not ", rule);
    check_plain_input(*dispersion, "dispersion", {batch, q_heads, kBudgetDispersion}, at::kFloat,
                       det_out);
    const at::Tensor& table = *chi2_table;
    TORCH_CHECK(table.dim() == 1 && table.size(0) > 0,
                "vattention: chi2_table must be a non-empty [dims] tensor, got ", table.sizes());
    check_plain_input(table, "chi2_table", table.sizes(), at::kDouble, det_out);
    p.dispersion = dispersion->data_ptr<float>();
    p.chi2_table = table.data_ptr<double>();
    p.chi2_dims = table.size(0);
  }
  TORCH_CHECK(std::isfinite(epsilon) && epsilon > 0, "vattention: epsilon must be a positive "
              "finite float, got ", epsilon);
  // z is Phi^-1(1 - delta) for the denominator rule: 0 at delta = 0.5, negative above.
  TORCH_CHECK(std::isfinite(z), "vattention: z must be a finite float, got ", z);
  TORCH_CHECK(std::isfinite(tail_dim_shrink) && tail_dim_shrink > 0,
              "vattention: tail_dim_shrink must be a positive finite float, got ", tail_dim_shrink);
  TORCH_CHECK(min_samples >= 0, "vattention: min_samples must be >= 0, got ", min_samples);
  p.epsilon = epsilon;
  p.z = z;
  p.tail_dim_shrink = tail_dim_shrink;
  p.min_samples = double(min_samples);
  p.reuse_pilot = reuse_pilot;
  return p;
}

}  // namespace vattention::binding

// ---------------------------------------------------------------------------
// plan_lists (stage "plan", plan.h) and merge_estimate (stage "combine", combine.h).
// ---------------------------------------------------------------------------
namespace vattention::binding {
PlanListsOutputs plan_lists_params(PlanListsParams* p, const at::Tensor& q,
                                   const c10::optional<at::Tensor>& lengths, int64_t length,
                                   int64_t list_heads, at::ArrayRef<double> sizes,
                                   const c10::List<bool>& fractions, int64_t sink_max,
                                   int64_t local_max, int64_t heavy_max, int64_t dense_below) {
  TORCH_CHECK(q.dim() == 3, "vattention: q must be [batch, q_heads, head_dim], got ", q.sizes());
  const int64_t batch = q.size(0);
  *p = PlanListsParams{};
  if (lengths.has_value()) {
    const at::Tensor& t = *lengths;
    TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt,
                "vattention: lengths must be int64 or int32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, "vattention: lengths must have shape [",
                batch, "], got ", t.sizes());
    TORCH_CHECK(t.device() == q.device(), "vattention: lengths must be on ", q.device(),
                ", got ", t.device());
    TORCH_CHECK(t.is_contiguous(), "vattention: lengths must be contiguous");
    if (t.scalar_type() == at::kLong) {
      p->lengths64 = t.data_ptr<int64_t>();
    } else {
      p->lengths32 = t.data_ptr<int32_t>();
    }
  }
  TORCH_CHECK(length >= 0 && length < (int64_t(1) << 31),
              "vattention: length must lie in [0, 2^31), got ", length);
  TORCH_CHECK(list_heads >= 1, "vattention: list_heads must be >= 1, got ", list_heads);
  TORCH_CHECK(sizes.size() == size_t(kPlanSizes) && fractions.size() == size_t(kPlanSizes),
              "vattention: sizes and fractions must hold 4 entries (sink, local, heavy, "
              "base_rate), got ", sizes.size(), " and ", fractions.size());
  static const char* names[kPlanSizes] = {"sink", "local", "heavy", "base_rate"};
  for (int i = 0; i < kPlanSizes; ++i) {
    const double s = sizes[i];
    const bool fraction = fractions.get(i);
    if (fraction) {
      TORCH_CHECK(s >= 0.0 && s <= 1.0, "vattention: sizes[", i, "] (", names[i],
                  ") as a fraction must lie in [0, 1], got ", s);
    } else {
      TORCH_CHECK(s >= 0.0 && s < 9.0e15 && s == std::floor(s), "vattention: sizes[", i, "] (",
                  names[i], ") as a count must be an integer >= 0, got ", s);
    }
    p->sizes[i] = s;
    p->fractions[i] = fraction;
  }
  TORCH_CHECK(dense_below >= 0, "vattention: dense_below must be >= 0 (0: off), got ",
              dense_below);
  TORCH_CHECK(sink_max >= 0 && local_max >= 0 && heavy_max >= 0 &&
                  sink_max + local_max + heavy_max < (int64_t(1) << 31),
              "vattention: sink_max, local_max and heavy_max must be >= 0 with a sum below "
              "2^31, got ", sink_max, ", ", local_max, ", ", heavy_max);
  const int64_t dense_max = plan_dense_max(length, dense_below, sink_max, local_max);
  TORCH_CHECK(sink_max + local_max + heavy_max + dense_max < (int64_t(1) << 31),
              "vattention: the deterministic list's width (sink_max + local_max + heavy_max "
              "+ the dense rows' ", dense_max, " extra columns) must be below 2^31");
  p->dense_below = dense_below;
  p->dense_max = dense_max;
  p->length = length;
  p->batch = batch;
  p->list_heads = list_heads;
  p->sink_max = sink_max;
  p->local_max = local_max;
  p->heavy_max = heavy_max;
  const int64_t lists = batch * list_heads;
  const auto i64 = q.options().dtype(at::kLong);
  const auto i32 = q.options().dtype(at::kInt);
  PlanListsOutputs out{at::empty({batch}, i64),
                       at::empty({batch}, i64),
                       at::empty({batch}, i64),
                       at::empty({batch}, i64),
                       at::empty({batch}, i64),
                       at::empty({lists}, i32),
                       at::empty({lists}, i32),
                       at::empty({lists}, i32),
                       at::empty({lists}, i32),
                       at::empty({lists}, i64),
                       at::empty({batch, list_heads, p->width()}, i32),
                       at::empty({batch, list_heads}, i32)};
  p->lengths_out = std::get<0>(out).data_ptr<int64_t>();
  p->sink = std::get<1>(out).data_ptr<int64_t>();
  p->local = std::get<2>(out).data_ptr<int64_t>();
  p->window_end = std::get<3>(out).data_ptr<int64_t>();
  p->heavy = std::get<4>(out).data_ptr<int64_t>();
  p->starts_rows = std::get<5>(out).data_ptr<int32_t>();
  p->ends_rows = std::get<6>(out).data_ptr<int32_t>();
  p->heavy_rows = std::get<7>(out).data_ptr<int32_t>();
  p->pilot_wanted = std::get<8>(out).data_ptr<int32_t>();
  p->n_residual = std::get<9>(out).data_ptr<int64_t>();
  p->det_idx = std::get<10>(out).data_ptr<int32_t>();
  p->det_counts = std::get<11>(out).data_ptr<int32_t>();
  return out;
}

std::tuple<at::Tensor, at::Tensor> merge_estimate_params(
    MergeEstimateParams* p, const at::Tensor& det_out, const at::Tensor& det_lse,
    const c10::optional<at::Tensor>& extra_out, const c10::optional<at::Tensor>& extra_lse,
    const at::Tensor& sample_out, const at::Tensor& sample_lse, const at::Tensor& sample_counts,
    const c10::optional<at::Tensor>& reused, const at::Tensor& pilot_max_logit,
    const at::Tensor& moments, const at::Tensor& vector_moments,
    const at::Tensor& n_residual_heads, at::ScalarType out_dtype) {
  TORCH_CHECK(det_out.dim() == 3, "vattention: det_out must be [batch, q_heads, head_dim], got ",
              det_out.sizes());
  const int64_t batch = det_out.size(0), q_heads = det_out.size(1), dim = det_out.size(2);
  check_plain_input(det_out, "det_out", det_out.sizes(), at::kFloat, det_out);
  check_plain_input(det_lse, "det_lse", {batch, q_heads}, at::kFloat, det_out);
  TORCH_CHECK(extra_out.has_value() == extra_lse.has_value(),
              "vattention: extra_out and extra_lse go together, got ",
              extra_out.has_value() ? "extra_out only" : "extra_lse only");
  *p = MergeEstimateParams{};
  if (extra_out.has_value()) {
    check_plain_input(*extra_out, "extra_out", det_out.sizes(), at::kFloat, det_out);
    check_plain_input(*extra_lse, "extra_lse", {batch, q_heads}, at::kFloat, det_out);
    p->extra_out = extra_out->data_ptr<float>();
    p->extra_lse = extra_lse->data_ptr<float>();
  }
  // The sample: merged [B, Hq, D] / [B, Hq], or split partials [B, Hq, S, D] / [B, Hq, S].
  TORCH_CHECK(sample_out.dim() == 3 || sample_out.dim() == 4,
              "vattention: sample_out must be [batch, q_heads, head_dim] or [batch, q_heads, "
              "splits, head_dim], got ", sample_out.sizes());
  const bool split_sample = sample_out.dim() == 4;
  const int64_t sample_splits = split_sample ? sample_out.size(2) : 1;
  TORCH_CHECK(sample_splits >= 1, "vattention: sample_out needs at least one split, got ",
              sample_out.sizes());
  if (split_sample) {
    check_plain_input(sample_out, "sample_out", {batch, q_heads, sample_splits, dim}, at::kFloat,
                      det_out);
    check_plain_input(sample_lse, "sample_lse", {batch, q_heads, sample_splits}, at::kFloat,
                      det_out);
  } else {
    check_plain_input(sample_out, "sample_out", det_out.sizes(), at::kFloat, det_out);
    check_plain_input(sample_lse, "sample_lse", {batch, q_heads}, at::kFloat, det_out);
  }
  TORCH_CHECK(sample_counts.dim() == 1, "vattention: sample_counts must be [batch * list_heads], "
              "got ", sample_counts.sizes());
  const int64_t lists = sample_counts.size(0);
  const int64_t list_heads = batch > 0 ? lists / batch : 0;
  TORCH_CHECK(batch > 0 ? (lists % batch == 0 && list_heads > 0 && q_heads % list_heads == 0)
                        : lists == 0,
              "vattention: sample_counts must hold batch * list_heads entries with q_heads (",
              q_heads, ") a multiple of list_heads, got ", lists, " for batch ", batch);
  check_plain_input(sample_counts, "sample_counts", {lists}, at::kInt, det_out);
  if (reused.has_value()) {
    check_plain_input(*reused, "reused", {lists}, at::kInt, det_out);
    p->reused = reused->data_ptr<int32_t>();
  }
  check_plain_input(pilot_max_logit, "pilot_max_logit", {batch, q_heads}, at::kFloat, det_out);
  TORCH_CHECK(moments.scalar_type() == at::kFloat || moments.scalar_type() == at::kDouble,
              "vattention: moments must be float32 or float64, got ", moments.scalar_type());
  check_plain_input(moments, "moments", {batch, q_heads, 3}, moments.scalar_type(), det_out);
  check_plain_input(vector_moments, "vector_moments", {batch, q_heads, 2, dim},
                    moments.scalar_type(), det_out);
  check_plain_input(n_residual_heads, "n_residual_heads", {batch, q_heads}, at::kLong, det_out);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "vattention: out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  p->det_out = det_out.data_ptr<float>();
  p->det_lse = det_lse.data_ptr<float>();
  p->sample_out = sample_out.data_ptr<float>();
  p->sample_lse = sample_lse.data_ptr<float>();
  p->sample_splits = sample_splits;
  p->sample_counts = sample_counts.data_ptr<int32_t>();
  p->pilot_max_logit = pilot_max_logit.data_ptr<float>();
  p->moments = moments.data_ptr();
  p->vector_moments = vector_moments.data_ptr();
  p->stats_double = moments.scalar_type() == at::kDouble;
  p->n_residual_heads = n_residual_heads.data_ptr<int64_t>();
  p->lists = lists;
  p->group = list_heads > 0 ? q_heads / list_heads : 1;
  p->head_dim = dim;
  at::Tensor out = at::empty(det_out.sizes(), det_out.options().dtype(out_dtype));
  at::Tensor lse = at::empty({batch, q_heads}, det_out.options());
  p->out_dtype = out_dtype == at::kFloat  ? DType::kFloat32
                 : out_dtype == at::kHalf ? DType::kFloat16
                                          : DType::kBFloat16;
  p->out = out.data_ptr();
  p->lse = lse.data_ptr<float>();
  return {out, lse};
}

}  // namespace vattention::binding
