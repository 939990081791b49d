// CPU backend of torch.ops.vattention: argument checks, the host-side
// validation that is free on the CPU, and a parallel_for over the kernels.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../vattention/heuristics.h"
#include "checks.h"

namespace vattention::binding {
namespace {

constexpr int64_t kGrain = 1;

// The physical block of logical row `row` of batch row b must lie in the pool: a bad id
// would read outside it. Checked only for rows an op reads (a table's unused tail may hold
// anything, as vLLM's does); on CUDA the ids are trusted (checks.h, kv_paging).
void check_block_id(const KVPaging& paging, int64_t num_blocks, int64_t b, int64_t row) {
  const int64_t slot = row / paging.block_size;
  const int32_t block = paging.block_table[b * paging.block_table_stride + slot];
  TORCH_CHECK(block >= 0 && block < num_blocks, "vattention: block_table[", b, ", ", slot,
              "] = ", block, " is not a block of the pool [0, ", num_blocks, ")");
}

// Rows [begin, end) of batch row b, one check per block they touch.
void check_block_ids(const KVPaging& paging, int64_t num_blocks, int64_t b, int64_t begin,
                     int64_t end) {
  if (!paging.paged() || begin >= end) return;
  for (int64_t slot = begin / paging.block_size; slot * paging.block_size < end; ++slot) {
    check_block_id(paging, num_blocks, b, slot * paging.block_size);
  }
}

// CPU data can be inspected for free, so list entries are validated here (and, paged, the
// blocks of the rows they read); the CUDA kernels skip out-of-range entries instead of
// synchronising to report them.
void check_index_list(const IndexListParams& list, int64_t rows_in_list, int64_t length,
                      const KVPaging& paging = KVPaging{}, int64_t num_blocks = 0) {
  const int64_t lists = rows_in_list;
  for (int64_t l = 0; l < lists; ++l) {
    const int32_t count = list.counts[l];
    TORCH_CHECK(count >= 0 && count <= list.max_count, "vattention: counts must lie in [0, ",
                list.max_count, "], got ", count);
    const int32_t* idx = list.indices + l * list.max_count;
    for (int32_t j = 0; j < count; ++j) {
      TORCH_CHECK(idx[j] < length, "vattention: indices must be < length (", length, "), got ",
                  idx[j]);
      if (paging.paged() && idx[j] >= 0) {
        check_block_id(paging, num_blocks, l / list.list_heads, idx[j]);
      }
    }
  }
}

void select_topk_into_cpu_op(const at::Tensor& scores, const at::Tensor& starts,
                             const at::Tensor& ends, const at::Tensor& ks, const at::Tensor& out) {
  check_select_topk_out(out, scores);
  check_select_topk_args(scores, starts, ends, ks, out.size(1));
  const SelectTopkParams p = select_topk_params(scores, starts, ends, ks, out.size(1), out);
  at::parallel_for(0, p.rows, kGrain, [&](int64_t begin, int64_t end) { select_topk_cpu(p, begin, end); });
}

at::Tensor select_topk_cpu_op(const at::Tensor& scores, const at::Tensor& starts, const at::Tensor& ends,
                       const at::Tensor& ks, int64_t k_max) {
  check_select_topk_args(scores, starts, ends, ks, k_max);
  at::Tensor indices = at::empty({scores.size(0), k_max}, starts.options());
  select_topk_into_cpu_op(scores, starts, ends, ks, indices);
  return indices;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_residual_cpu_op(
    const at::Tensor& heavy, const at::Tensor& starts, const at::Tensor& ends,
    const at::Tensor& num_samples, const at::Tensor& rng, int64_t max_out, int64_t draw_set) {
  at::Tensor indices, log_weights, counts;
  const SampleParams p = sample_params(heavy, starts, ends, num_samples, rng, max_out, draw_set,
                                       &indices, &log_weights, &counts);
  TORCH_CHECK(p.rng[1] >= 0 && p.rng[1] < (int64_t(1) << 30),
              "vattention: rng offset must lie in [0, 2^30), got ", p.rng[1]);
  for (int64_t r = 0; r < p.rows; ++r) {
    TORCH_CHECK(p.starts[r] >= 0 && p.starts[r] <= p.ends[r],
                "vattention: need 0 <= starts <= ends, got starts=", p.starts[r],
                " ends=", p.ends[r], " in row ", r);
    int32_t previous = p.starts[r] - 1;
    bool padding = false;
    for (int64_t j = 0; j < p.heavy_width; ++j) {
      const int32_t h = p.heavy[r * p.heavy_stride + j];
      if (h < 0) {
        padding = true;
        continue;
      }
      TORCH_CHECK(!padding, "vattention: heavy's -1 padding must come after its entries, row ", r);
      TORCH_CHECK(h > previous && h < p.ends[r],
                  "vattention: heavy must be ascending positions inside [starts, ends), row ", r);
      previous = h;
    }
  }
  at::parallel_for(0, p.rows, kGrain,
                   [&](int64_t begin, int64_t end) { sample_residual_cpu(p, begin, end); });
  return {indices, log_weights, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pilot_stats_cpu_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
    const at::Tensor& counts, double scale, const c10::optional<at::Tensor>& block_table) {
  PilotParams p{};
  p.qkv = qkv_params(q, k, v, scale, block_table);
  p.list = index_list_params(p.qkv, q, indices, counts, c10::nullopt);
  check_index_list(p.list, p.qkv.batch * p.list.list_heads, p.qkv.length, p.qkv.paging,
                   k.size(0));
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor max_logit = at::empty({p.qkv.batch, p.qkv.q_heads}, f32);
  at::Tensor moments = at::empty({p.qkv.batch, p.qkv.q_heads, kPilotMoments}, f32);
  at::Tensor vector_moments = at::empty({p.qkv.batch, p.qkv.q_heads, 2, p.qkv.head_dim}, f32);
  p.max_logit = max_logit.data_ptr<float>();
  p.moments = moments.data_ptr<float>();
  p.vector_moments = vector_moments.data_ptr<float>();
  at::parallel_for(0, p.qkv.batch * p.qkv.q_heads, kGrain,
                   [&](int64_t begin, int64_t end) { pilot_stats_cpu(p, begin, end); });
  return {max_logit, moments, vector_moments};
}

at::Tensor pilot_dispersion_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& indices, const at::Tensor& counts,
                                  double scale, const at::Tensor& center,
                                  const c10::optional<at::Tensor>& block_table) {
  PilotDispersionParams p =
      pilot_dispersion_params(q, k, v, indices, counts, scale, center, block_table);
  check_index_list(p.list, p.qkv.batch * p.list.list_heads, p.qkv.length, p.qkv.paging,
                   k.size(0));
  at::Tensor dispersion = at::empty({p.qkv.batch, p.qkv.q_heads, kDispersionOutputs},
                                    q.options().dtype(at::kFloat));
  p.dispersion = dispersion.data_ptr<float>();
  at::parallel_for(0, p.qkv.batch * p.qkv.q_heads, kGrain,
                   [&](int64_t begin, int64_t end) { pilot_dispersion_cpu(p, begin, end); });
  return dispersion;
}

std::tuple<at::Tensor, at::Tensor> combine_into(const at::Tensor& partial_out,
                                                const at::Tensor& partial_lse, int64_t items,
                                                int64_t splits, int64_t dim, bool splits_first,
                                                at::Tensor out, at::Tensor lse) {
  const CombineParams c =
      combine_params(partial_out, partial_lse, items, splits, dim, splits_first, out, lse);
  at::parallel_for(0, items, 16, [&](int64_t begin, int64_t end) { combine_cpu(c, begin, end); });
  return {out, lse};
}

// The split partials of sparse_attention (partial_out [B * Hq, S, D], partial_lse
// [B * Hq, S]), shared by sparse_attention and sparse_attention_partials.
SparseAttentionParams sparse_attention_split_partials(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
    const c10::optional<at::Tensor>& log_weights, const at::Tensor& counts, double scale,
    int64_t num_splits, const c10::optional<at::Tensor>& block_table, at::Tensor* partial_out,
    at::Tensor* partial_lse) {
  SparseAttentionParams p{};
  p.qkv = qkv_params(q, k, v, scale, block_table);
  p.list = index_list_params(p.qkv, q, indices, counts, log_weights);
  check_index_list(p.list, p.qkv.batch * p.list.list_heads, p.qkv.length, p.qkv.paging,
                   k.size(0));
  TORCH_CHECK(num_splits >= 0, "vattention: num_splits must be >= 0 (0 = automatic), got ",
              num_splits);
  const int64_t heads = p.qkv.batch * p.qkv.q_heads;
  p.num_splits = num_splits > 0 ? num_splits
                                : choose_num_splits(heads, p.list.max_count, at::get_num_threads());
  const auto f32 = q.options().dtype(at::kFloat);
  *partial_out = at::empty({heads, p.num_splits, p.qkv.head_dim}, f32);
  *partial_lse = at::empty({heads, p.num_splits}, f32);
  p.partial_out = partial_out->data_ptr<float>();
  p.partial_lse = partial_lse->data_ptr<float>();
  at::parallel_for(0, heads * p.num_splits, kGrain, [&](int64_t begin, int64_t end) {
    sparse_attention_partial_cpu(p, begin, end);
  });
  return p;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cpu_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
    const c10::optional<at::Tensor>& log_weights, const at::Tensor& counts, double scale,
    int64_t num_splits, const c10::optional<at::Tensor>& block_table) {
  at::Tensor partial_out, partial_lse;
  const SparseAttentionParams p =
      sparse_attention_split_partials(q, k, v, indices, log_weights, counts, scale, num_splits,
                                      block_table, &partial_out, &partial_lse);
  const auto f32 = q.options().dtype(at::kFloat);
  return combine_into(partial_out, partial_lse, p.qkv.batch * p.qkv.q_heads, p.num_splits,
                      p.qkv.head_dim, false,
                      at::empty({p.qkv.batch, p.qkv.q_heads, p.qkv.head_dim}, f32),
                      at::empty({p.qkv.batch, p.qkv.q_heads}, f32));
}

// (partial_out [B, Hq, S, D], partial_lse [B, Hq, S]): sparse_attention before its combine.
std::tuple<at::Tensor, at::Tensor> sparse_attention_partials_cpu_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
    const c10::optional<at::Tensor>& log_weights, const at::Tensor& counts, double scale,
    int64_t num_splits, const c10::optional<at::Tensor>& block_table) {
  at::Tensor partial_out, partial_lse;
  const SparseAttentionParams p =
      sparse_attention_split_partials(q, k, v, indices, log_weights, counts, scale, num_splits,
                                      block_table, &partial_out, &partial_lse);
  return {partial_out.view({p.qkv.batch, p.qkv.q_heads, p.num_splits, p.qkv.head_dim}),
          partial_lse.view({p.qkv.batch, p.qkv.q_heads, p.num_splits})};
}

std::tuple<at::Tensor, at::Tensor> combine_cpu_op(const at::Tensor& partial_out,
                                                  const at::Tensor& partial_lse) {
  check_partials(partial_out, partial_lse);
  const int64_t splits = partial_out.size(0), dim = partial_out.size(-1);
  const int64_t items = splits > 0 ? partial_lse.numel() / splits : 0;
  TORCH_CHECK(splits > 0, "vattention: combine needs at least one partial");
  const auto item_shape = partial_out.sizes().slice(1);
  return combine_into(partial_out, partial_lse, items, splits, dim, true,
                      at::empty(item_shape, partial_out.options()),
                      at::empty(partial_lse.sizes().slice(1), partial_lse.options()));
}

// Both scoring ops (keys from K or from the summary) run the same kernel on filled params.
at::Tensor run_select_scores(SelectScoresParams p, const at::Tensor& q) {
  const int64_t heads = p.share_gqa ? p.qkv.kv_heads : p.qkv.q_heads;
  at::Tensor scores =
      at::empty({p.qkv.batch, heads, p.qkv.length}, q.options().dtype(at::kFloat));
  p.scores = scores.data_ptr<float>();
  at::parallel_for(0, p.qkv.batch * p.qkv.kv_heads, kGrain,
                   [&](int64_t begin, int64_t end) { select_scores_cpu(p, begin, end); });
  return scores;
}

// Paged scoring reads rows [0, lengths[b]) of every batch row through the table.
void check_scored_blocks(const SelectScoresParams& p, const KVPaging& paging,
                         int64_t num_blocks) {
  for (int64_t b = 0; paging.paged() && b < p.qkv.batch; ++b) {
    check_block_ids(paging, num_blocks, b, 0, p.length_of(b));
  }
}

at::Tensor select_scores_cpu_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lengths,
                               double scale, bool share_gqa,
                               const c10::optional<at::Tensor>& block_table) {
  const SelectScoresParams p = select_scores_params(q, k, lengths, scale, share_gqa, block_table);
  check_scored_blocks(p, p.qkv.paging, k.size(0));
  return run_select_scores(p, q);
}

void summarize_keys_cpu_op(const at::Tensor& k, const at::Tensor& codes, const at::Tensor& params,
                           const at::Tensor& row_begin,
                           const c10::optional<at::Tensor>& block_table) {
  const SummarizeKeysParams p = summarize_keys_params(k, codes, params, row_begin, block_table);
  for (int64_t b = 0; b < p.qkv.batch; ++b) {
    TORCH_CHECK(p.row_begin[b] >= 0, "vattention: row_begin must be >= 0, got ", p.row_begin[b],
                " in row ", b);
    // Positions beyond the summary are skipped by the kernel, so their blocks are not read.
    check_block_ids(p.summary.paging, codes.size(0), b, p.row_begin[b],
                    std::min(p.row_begin[b] + p.rows, p.summary_length));
  }
  at::parallel_for(0, p.qkv.batch * p.qkv.kv_heads, kGrain,
                   [&](int64_t begin, int64_t end) { summarize_keys_cpu(p, begin, end); });
}

at::Tensor select_scores_summary_cpu_op(const at::Tensor& q, const at::Tensor& codes,
                                        const at::Tensor& params, const at::Tensor& lengths,
                                        double scale, bool share_gqa,
                                        const c10::optional<at::Tensor>& block_table) {
  const SelectScoresParams p =
      select_scores_summary_params(q, codes, params, lengths, scale, share_gqa, block_table);
  check_scored_blocks(p, p.summary.paging, codes.size(0));
  return run_select_scores(p, q);
}

}  // namespace

TORCH_LIBRARY_IMPL(vattention, CPU, m) {
  m.impl("select_topk", &select_topk_cpu_op);
  m.impl("select_topk_into", &select_topk_into_cpu_op);
  m.impl("sample_residual", &sample_residual_cpu_op);
  m.impl("pilot_stats", &pilot_stats_cpu_op);
  m.impl("pilot_dispersion", &pilot_dispersion_cpu_op);
  m.impl("sparse_attention", &sparse_attention_cpu_op);
  m.impl("sparse_attention_partials", &sparse_attention_partials_cpu_op);
  m.impl("combine", &combine_cpu_op);
  m.impl("select_scores", &select_scores_cpu_op);
  m.impl("summarize_keys", &summarize_keys_cpu_op);
  m.impl("select_scores_summary", &select_scores_summary_cpu_op);
}

}  // namespace vattention::binding

// ---------------------------------------------------------------------------
// plan_budget (stage "budget", budget.h).
// ---------------------------------------------------------------------------
namespace vattention::binding {
namespace {

// Outputs of plan_budget, allocated like det_out, and set into p.
struct BudgetOutputs {
  at::Tensor final_wanted, reused, exact, required, n_residual_heads;
  BudgetOutputs(BudgetParams* p, const at::Tensor& det_out) {
    const int64_t batch = det_out.size(0), q_heads = det_out.size(1);
    final_wanted = at::empty({p->lists}, det_out.options().dtype(at::kInt));
    reused = at::empty({p->lists}, det_out.options().dtype(at::kInt));
    exact = at::empty({p->lists}, det_out.options().dtype(at::kBool));
    required = at::empty({batch, q_heads}, det_out.options().dtype(at::kDouble));
    n_residual_heads = at::empty({batch, q_heads}, det_out.options().dtype(at::kLong));
    p->final_wanted = final_wanted.data_ptr<int32_t>();
    p->reused = reused.data_ptr<int32_t>();
    p->exact = exact.data_ptr<bool>();
    p->required = required.data_ptr<double>();
    p->n_residual_heads = n_residual_heads.data_ptr<int64_t>();
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {final_wanted, reused, exact, required, n_residual_heads};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_budget_cpu_op(
    const at::Tensor& det_out, const at::Tensor& det_lse, const at::Tensor& pilot_max_logit,
    const at::Tensor& moments, const at::Tensor& vector_moments, const at::Tensor& pilot_counts,
    const at::Tensor& n_residual, const c10::optional<at::Tensor>& dispersion,
    const c10::optional<at::Tensor>& chi2_table, c10::string_view rule, double epsilon,
    double z, double tail_dim_shrink, int64_t min_samples, bool reuse_pilot) {
  BudgetParams p = plan_budget_params(det_out, det_lse, pilot_max_logit, moments,
                                      vector_moments, pilot_counts, n_residual, dispersion,
                                      chi2_table, std::string(rule), epsilon, z, tail_dim_shrink,
                                      min_samples, reuse_pilot);
  for (int64_t l = 0; l < p.lists; ++l) {
    TORCH_CHECK(p.pilot_counts[l] >= 0, "vattention: pilot_counts must be >= 0, got ",
                p.pilot_counts[l], " in list ", l);
    TORCH_CHECK(p.n_residual[l] >= 0 && p.n_residual[l] < (int64_t(1) << 31),
                "vattention: n_residual must lie in [0, 2^31), got ", p.n_residual[l],
                " in list ", l);
  }
  BudgetOutputs outputs(&p, det_out);
  at::parallel_for(0, p.lists, 16, [&](int64_t begin, int64_t end) {
    plan_budget_cpu(p, begin, end);
  });
  return outputs.tuple();
}

at::Tensor residual_center_cpu_op(const at::Tensor& det_out, const at::Tensor& det_lse,
                                  const at::Tensor& pilot_max_logit, const at::Tensor& moments,
                                  const at::Tensor& vector_moments,
                                  const at::Tensor& pilot_counts, const at::Tensor& n_residual) {
  const BudgetParams p = budget_estimate_params(det_out, det_lse, pilot_max_logit, moments,
                                                vector_moments, pilot_counts, n_residual);
  at::Tensor center = at::empty(det_out.sizes(), det_out.options());
  float* out = center.data_ptr<float>();
  at::parallel_for(0, p.lists, 16, [&](int64_t begin, int64_t end) {
    residual_center_cpu(p, out, begin, end);
  });
  return center;
}

}  // namespace

TORCH_LIBRARY_IMPL(vattention, CPU, m) {
  m.impl("plan_budget", &plan_budget_cpu_op);
  m.impl("residual_center", &residual_center_cpu_op);
}

}  // namespace vattention::binding

// ---------------------------------------------------------------------------
// plan_lists (stage "plan", plan.h) and merge_estimate (stage "combine", combine.h).
// ---------------------------------------------------------------------------
namespace vattention::binding {
namespace {

PlanListsOutputs plan_lists_cpu_op(const at::Tensor& q, const c10::optional<at::Tensor>& lengths,
                                   int64_t length, int64_t list_heads,
                                   at::ArrayRef<double> sizes, const c10::List<bool>& fractions,
                                   int64_t sink_max, int64_t local_max, int64_t heavy_max,
                                   int64_t dense_below) {
  PlanListsParams p;
  PlanListsOutputs out = plan_lists_params(&p, q, lengths, length, list_heads, sizes, fractions,
                                           sink_max, local_max, heavy_max, dense_below);
  // Host data: a length out of range, or a row whose sink / local / heavy exceed the
  // buffer's bounds (which would drop tokens silently), is reported. (A dense row's local
  // may pass local_max: its rows fill the extra columns, which a length in range fits.)
  for (int64_t b = 0; b < p.batch; ++b) {
    const PlanRow r = plan_row(p, b);
    TORCH_CHECK(r.length >= 0 && r.length <= length, "vattention: lengths must lie in [0, ",
                length, "], got ", r.length, " in row ", b);
    TORCH_CHECK(r.sink <= sink_max && (r.dense || r.local <= local_max) &&
                    r.heavy <= heavy_max,
                "vattention: row ", b, " (length ", r.length, ") has sink ", r.sink, ", local ",
                r.local, ", heavy ", r.heavy, " above sink_max ", sink_max, ", local_max ",
                local_max, ", heavy_max ", heavy_max);
  }
  at::parallel_for(0, p.batch, 16, [&](int64_t begin, int64_t end) {
    plan_lists_cpu(p, begin, end);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> merge_estimate_cpu_op(
    const at::Tensor& det_out, const at::Tensor& det_lse,
    const c10::optional<at::Tensor>& extra_out, const c10::optional<at::Tensor>& extra_lse,
    const at::Tensor& sample_out, const at::Tensor& sample_lse, const at::Tensor& sample_counts,
    const c10::optional<at::Tensor>& reused, const at::Tensor& pilot_max_logit,
    const at::Tensor& moments, const at::Tensor& vector_moments,
    const at::Tensor& n_residual_heads, at::ScalarType out_dtype) {
  MergeEstimateParams p;
  auto out = merge_estimate_params(&p, det_out, det_lse, extra_out, extra_lse, sample_out,
                                   sample_lse, sample_counts, reused, pilot_max_logit, moments,
                                   vector_moments, n_residual_heads, out_dtype);
  at::parallel_for(0, p.lists * p.group, 16, [&](int64_t begin, int64_t end) {
    merge_estimate_cpu(p, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vattention, CPU, m) {
  m.impl("plan_lists", &plan_lists_cpu_op);
  m.impl("merge_estimate", &merge_estimate_cpu_op);
}

}  // namespace vattention::binding
