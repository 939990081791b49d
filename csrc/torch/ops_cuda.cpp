// CUDA backend of torch.ops.vattention: the argument checks of checks.h, outputs
// and workspaces from the caching allocator, launches on the current stream.
//
// Unlike ops_cpu.cpp nothing here reads device data: no host synchronisation,
// so every op can be captured in a CUDA graph. Out-of-range list entries are
// skipped by the kernels instead of being reported (see attention_params.h).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../vattention/device_info.h"
#include "../vattention/dispatch.h"
#include "../vattention/heuristics.h"
#include "checks.h"

namespace vattention::binding {
namespace {

// Streaming multiprocessors of a device (device_info.h caches them per device).
int64_t sm_count(c10::DeviceIndex device) {
  DeviceInfo info;
  C10_CUDA_CHECK(device_info(device, &info));
  return info.num_sms;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "vattention: ", name, " must be a CUDA tensor, got ", t.device());
}

void check_head_dim(int64_t dim) {
  if (is_cuda_head_dim(dim)) return;
  std::string supported;
  for (int i = 0; i < kNumCudaHeadDims; ++i) {
    supported += (i == 0 ? "" : (i + 1 == kNumCudaHeadDims ? " or " : ", "));
    supported += std::to_string(kCudaHeadDims[i]);
  }
  TORCH_CHECK(false, "vattention: the CUDA kernels support head_dim ", supported, ", got ", dim);
}

void select_topk_into_cuda_op(const at::Tensor& scores, const at::Tensor& starts,
                              const at::Tensor& ends, const at::Tensor& ks, const at::Tensor& out) {
  check_cuda(scores, "scores");
  const c10::cuda::CUDAGuard guard(scores.device());
  check_select_topk_out(out, scores);
  check_select_topk_args(scores, starts, ends, ks, out.size(1));
  const SelectTopkParams p = select_topk_params(scores, starts, ends, ks, out.size(1), out);
  if (p.rows == 0 || p.k_max == 0) return;
  const size_t ws_bytes = select_topk_cuda_workspace_bytes(p);
  at::Tensor workspace;
  if (ws_bytes > 0) {
    workspace = at::empty({int64_t(ws_bytes)}, scores.options().dtype(at::kByte));
  }
  C10_CUDA_CHECK(select_topk_cuda(p, ws_bytes > 0 ? workspace.data_ptr() : nullptr,
                           at::cuda::getCurrentCUDAStream()));
}

at::Tensor select_topk_cuda_op(const at::Tensor& scores, const at::Tensor& starts, const at::Tensor& ends,
                        const at::Tensor& ks, int64_t k_max) {
  check_cuda(scores, "scores");
  check_select_topk_args(scores, starts, ends, ks, k_max);
  at::Tensor indices = at::empty({scores.size(0), k_max}, starts.options());
  select_topk_into_cuda_op(scores, starts, ends, ks, indices);
  return indices;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_residual_cuda_op(
    const at::Tensor& heavy, const at::Tensor& starts, const at::Tensor& ends,
    const at::Tensor& num_samples, const at::Tensor& rng, int64_t max_out, int64_t draw_set) {
  check_cuda(heavy, "heavy");
  const c10::cuda::CUDAGuard guard(heavy.device());
  at::Tensor indices, log_weights, counts;
  // rng stays on the device: the kernel reads the seed and the call offset there.
  const SampleParams p = sample_params(heavy, starts, ends, num_samples, rng, max_out, draw_set,
                                       &indices, &log_weights, &counts);
  if (p.rows > 0) {
    C10_CUDA_CHECK(sample_residual_cuda(p, at::cuda::getCurrentCUDAStream()));
  }
  return {indices, log_weights, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pilot_stats_cuda_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
    const at::Tensor& counts, double scale, const c10::optional<at::Tensor>& block_table) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  PilotParams p{};
  p.qkv = qkv_params(q, k, v, scale, block_table);
  p.list = index_list_params(p.qkv, q, indices, counts, c10::nullopt);
  check_head_dim(p.qkv.head_dim);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor max_logit = at::empty({p.qkv.batch, p.qkv.q_heads}, f32);
  at::Tensor moments = at::empty({p.qkv.batch, p.qkv.q_heads, kPilotMoments}, f32);
  at::Tensor vector_moments = at::empty({p.qkv.batch, p.qkv.q_heads, 2, p.qkv.head_dim}, f32);
  p.max_logit = max_logit.data_ptr<float>();
  p.moments = moments.data_ptr<float>();
  p.vector_moments = vector_moments.data_ptr<float>();
  if (p.qkv.batch * p.qkv.q_heads == 0) return {max_logit, moments, vector_moments};
  // One kernel for short lists (pilot.h's pilot_split_grid: the default pilot); longer
  // ones get balanced splits (heuristics.h), each list using the splits its own count
  // needs, decided on the device, and a merge kernel.
  const int64_t sms = sm_count(q.device().index());
  const int64_t splits = pilot_split_grid(p.list.max_count, sms);
  p.split_target_blocks = kBlocksPerWorker * sms;
  const size_t ws_bytes = pilot_stats_cuda_workspace_bytes(p, splits);
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({int64_t(ws_bytes / sizeof(float))}, f32);
  C10_CUDA_CHECK(pilot_stats_cuda(p, splits, ws_bytes > 0 ? workspace.data_ptr() : nullptr,
                                  at::cuda::getCurrentCUDAStream()));
  return {max_logit, moments, vector_moments};
}

at::Tensor pilot_dispersion_cuda_op(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& indices,
                                   const at::Tensor& counts, double scale,
                                   const at::Tensor& center,
                                   const c10::optional<at::Tensor>& block_table) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  PilotDispersionParams p =
      pilot_dispersion_params(q, k, v, indices, counts, scale, center, block_table);
  check_head_dim(p.qkv.head_dim);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dispersion = at::empty({p.qkv.batch, p.qkv.q_heads, kDispersionOutputs}, f32);
  p.dispersion = dispersion.data_ptr<float>();
  if (p.qkv.batch * p.qkv.q_heads == 0) return dispersion;
  const size_t ws_bytes = pilot_dispersion_cuda_workspace_bytes(p);
  at::Tensor workspace = at::empty({std::max<int64_t>(int64_t(ws_bytes / sizeof(float)), 1)}, f32);
  C10_CUDA_CHECK(pilot_dispersion_cuda(p, workspace.data_ptr(), at::cuda::getCurrentCUDAStream()));
  return dispersion;
}

void launch_combine(const at::Tensor& partial_out, const at::Tensor& partial_lse, int64_t items,
                    int64_t splits, int64_t dim, bool splits_first, const at::Tensor& out,
                    const at::Tensor& lse) {
  const CombineParams c =
      combine_params(partial_out, partial_lse, items, splits, dim, splits_first, out, lse);
  if (items > 0) C10_CUDA_CHECK(combine_cuda(c, at::cuda::getCurrentCUDAStream()));
}

// The split partials of sparse_attention (partial_out [B * Hq, S, D], partial_lse
// [B * Hq, S]), one kernel; shared by sparse_attention and sparse_attention_partials. The
// caller holds a device guard for q.
SparseAttentionParams sparse_attention_split_partials(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
    const c10::optional<at::Tensor>& log_weights, const at::Tensor& counts, double scale,
    int64_t num_splits, const c10::optional<at::Tensor>& block_table, at::Tensor* partial_out,
    at::Tensor* partial_lse) {
  SparseAttentionParams p{};
  p.qkv = qkv_params(q, k, v, scale, block_table);
  p.list = index_list_params(p.qkv, q, indices, counts, log_weights);
  check_head_dim(p.qkv.head_dim);
  TORCH_CHECK(num_splits >= 0, "vattention: num_splits must be >= 0 (0 = automatic), got ",
              num_splits);
  TORCH_CHECK(num_splits <= 65535, "vattention: num_splits must be <= 65535 on CUDA, got ",
              num_splits);
  const int64_t heads = p.qkv.batch * p.qkv.q_heads;
  // Automatic: balanced splits (heuristics.h), a grid sized from the capacity
  // whose blocks past a list's own split count exit at once. An explicit
  // num_splits cuts every list into that many chunks.
  if (num_splits > 0) {
    p.num_splits = num_splits;
  } else {
    const int64_t sms = sm_count(q.device().index());
    p.num_splits = choose_split_grid(p.list.max_count, sms);
    p.split_target_blocks = kBlocksPerWorker * sms;
  }
  const auto f32 = q.options().dtype(at::kFloat);
  *partial_out = at::empty({heads, p.num_splits, p.qkv.head_dim}, f32);
  *partial_lse = at::empty({heads, p.num_splits}, f32);
  if (heads == 0) return p;
  p.partial_out = partial_out->data_ptr<float>();
  p.partial_lse = partial_lse->data_ptr<float>();
  C10_CUDA_CHECK(sparse_attention_partial_cuda(p, at::cuda::getCurrentCUDAStream()));
  return p;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cuda_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
    const c10::optional<at::Tensor>& log_weights, const at::Tensor& counts, double scale,
    int64_t num_splits, const c10::optional<at::Tensor>& block_table) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor partial_out, partial_lse;
  const SparseAttentionParams p =
      sparse_attention_split_partials(q, k, v, indices, log_weights, counts, scale, num_splits,
                                      block_table, &partial_out, &partial_lse);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({p.qkv.batch, p.qkv.q_heads, p.qkv.head_dim}, f32);
  at::Tensor lse = at::empty({p.qkv.batch, p.qkv.q_heads}, f32);
  launch_combine(partial_out, partial_lse, p.qkv.batch * p.qkv.q_heads, p.num_splits,
                 p.qkv.head_dim, false, out, lse);
  return {out, lse};
}

// (partial_out [B, Hq, S, D], partial_lse [B, Hq, S]): sparse_attention before its combine,
// one kernel.
std::tuple<at::Tensor, at::Tensor> sparse_attention_partials_cuda_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
    const c10::optional<at::Tensor>& log_weights, const at::Tensor& counts, double scale,
    int64_t num_splits, const c10::optional<at::Tensor>& block_table) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor partial_out, partial_lse;
  const SparseAttentionParams p =
      sparse_attention_split_partials(q, k, v, indices, log_weights, counts, scale, num_splits,
                                      block_table, &partial_out, &partial_lse);
  return {partial_out.view({p.qkv.batch, p.qkv.q_heads, p.num_splits, p.qkv.head_dim}),
          partial_lse.view({p.qkv.batch, p.qkv.q_heads, p.num_splits})};
}

std::tuple<at::Tensor, at::Tensor> combine_cuda_op(const at::Tensor& partial_out,
                                                   const at::Tensor& partial_lse) {
  check_cuda(partial_out, "partial_out");
  const c10::cuda::CUDAGuard guard(partial_out.device());
  check_partials(partial_out, partial_lse);
  const int64_t splits = partial_out.size(0), dim = partial_out.size(-1);
  TORCH_CHECK(splits > 0, "vattention: combine needs at least one partial");
  const int64_t items = partial_lse.numel() / splits;
  at::Tensor out = at::empty(partial_out.sizes().slice(1), partial_out.options());
  at::Tensor lse = at::empty(partial_lse.sizes().slice(1), partial_lse.options());
  launch_combine(partial_out, partial_lse, items, splits, dim, true, out, lse);
  return {out, lse};
}

// Both scoring ops (keys from K or from the summary) run the same kernel on filled params.
at::Tensor run_select_scores(SelectScoresParams p, const at::Tensor& q) {
  check_head_dim(p.qkv.head_dim);
  const int64_t heads = p.share_gqa ? p.qkv.kv_heads : p.qkv.q_heads;
  at::Tensor scores =
      at::empty({p.qkv.batch, heads, p.qkv.length}, q.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;
  p.scores = scores.data_ptr<float>();
  const size_t ws_bytes = select_scores_cuda_workspace_bytes(p);
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({int64_t(ws_bytes)}, q.options().dtype(at::kByte));
  C10_CUDA_CHECK(select_scores_cuda(p, ws_bytes > 0 ? workspace.data_ptr() : nullptr,
                                    at::cuda::getCurrentCUDAStream()));
  return scores;
}

// Paged (block_table given): the table's ids are not read here (no sync); they must be
// valid blocks of the pool for every row read, as in vLLM / FlashInfer.
at::Tensor select_scores_cuda_op(const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& lengths, double scale, bool share_gqa,
                                const c10::optional<at::Tensor>& block_table) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  return run_select_scores(select_scores_params(q, k, lengths, scale, share_gqa, block_table), q);
}

// Writes the summary rows in place; row_begin stays on the device (positions outside
// the summary, a negative start included, are skipped by the kernel, not reported).
// Any head dim that is a multiple of 32 (checked by summarize_keys_params): the kernel
// is not instantiated per head dim.
void summarize_keys_cuda_op(const at::Tensor& k, const at::Tensor& codes, const at::Tensor& params,
                            const at::Tensor& row_begin,
                            const c10::optional<at::Tensor>& block_table) {
  check_cuda(k, "k");
  const c10::cuda::CUDAGuard guard(k.device());
  const SummarizeKeysParams p = summarize_keys_params(k, codes, params, row_begin, block_table);
  C10_CUDA_CHECK(summarize_keys_cuda(p, at::cuda::getCurrentCUDAStream()));
}

at::Tensor select_scores_summary_cuda_op(const at::Tensor& q, const at::Tensor& codes,
                                         const at::Tensor& params, const at::Tensor& lengths,
                                         double scale, bool share_gqa,
                                         const c10::optional<at::Tensor>& block_table) {
  check_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  return run_select_scores(
      select_scores_summary_params(q, codes, params, lengths, scale, share_gqa, block_table), q);
}

}  // namespace

TORCH_LIBRARY_IMPL(vattention, CUDA, m) {
  m.impl("select_topk", &select_topk_cuda_op);
  m.impl("select_topk_into", &select_topk_into_cuda_op);
  m.impl("sample_residual", &sample_residual_cuda_op);
  m.impl("pilot_stats", &pilot_stats_cuda_op);
  m.impl("pilot_dispersion", &pilot_dispersion_cuda_op);
  m.impl("sparse_attention", &sparse_attention_cuda_op);
  m.impl("sparse_attention_partials", &sparse_attention_partials_cuda_op);
  m.impl("combine", &combine_cuda_op);
  m.impl("select_scores", &select_scores_cuda_op);
  m.impl("summarize_keys", &summarize_keys_cuda_op);
  m.impl("select_scores_summary", &select_scores_summary_cuda_op);
}

}  // namespace vattention::binding

// ---------------------------------------------------------------------------
// plan_budget (stage "budget", budget.h): one launch, nothing read back.
// ---------------------------------------------------------------------------
namespace vattention::binding {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_budget_cuda_op(
    const at::Tensor& det_out, const at::Tensor& det_lse, const at::Tensor& pilot_max_logit,
    const at::Tensor& moments, const at::Tensor& vector_moments, const at::Tensor& pilot_counts,
    const at::Tensor& n_residual, const c10::optional<at::Tensor>& dispersion,
    const c10::optional<at::Tensor>& chi2_table, c10::string_view rule, double epsilon,
    double z, double tail_dim_shrink, int64_t min_samples, bool reuse_pilot) {
  TORCH_CHECK(det_out.is_cuda(), "vattention: det_out must be a CUDA tensor, got ",
              det_out.device());
  const c10::cuda::CUDAGuard guard(det_out.device());
  BudgetParams p = plan_budget_params(det_out, det_lse, pilot_max_logit, moments,
                                      vector_moments, pilot_counts, n_residual, dispersion,
                                      chi2_table, std::string(rule), epsilon, z, tail_dim_shrink,
                                      min_samples, reuse_pilot);
  const int64_t batch = det_out.size(0), q_heads = det_out.size(1);
  at::Tensor final_wanted = at::empty({p.lists}, det_out.options().dtype(at::kInt));
  at::Tensor reused = at::empty({p.lists}, det_out.options().dtype(at::kInt));
  at::Tensor exact = at::empty({p.lists}, det_out.options().dtype(at::kBool));
  at::Tensor required = at::empty({batch, q_heads}, det_out.options().dtype(at::kDouble));
  at::Tensor n_residual_heads = at::empty({batch, q_heads}, det_out.options().dtype(at::kLong));
  p.final_wanted = final_wanted.data_ptr<int32_t>();
  p.reused = reused.data_ptr<int32_t>();
  p.exact = exact.data_ptr<bool>();
  p.required = required.data_ptr<double>();
  p.n_residual_heads = n_residual_heads.data_ptr<int64_t>();
  C10_CUDA_CHECK(plan_budget_cuda(p, at::cuda::getCurrentCUDAStream()));
  return {final_wanted, reused, exact, required, n_residual_heads};
}

at::Tensor residual_center_cuda_op(const at::Tensor& det_out, const at::Tensor& det_lse,
                                   const at::Tensor& pilot_max_logit, const at::Tensor& moments,
                                   const at::Tensor& vector_moments,
                                   const at::Tensor& pilot_counts, const at::Tensor& n_residual) {
  TORCH_CHECK(det_out.is_cuda(), "vattention: det_out must be a CUDA tensor, got ",
              det_out.device());
  const c10::cuda::CUDAGuard guard(det_out.device());
  const BudgetParams p = budget_estimate_params(det_out, det_lse, pilot_max_logit, moments,
                                                vector_moments, pilot_counts, n_residual);
  at::Tensor center = at::empty(det_out.sizes(), det_out.options());
  C10_CUDA_CHECK(
      residual_center_cuda(p, center.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
  return center;
}

}  // namespace

TORCH_LIBRARY_IMPL(vattention, CUDA, m) {
  m.impl("plan_budget", &plan_budget_cuda_op);
  m.impl("residual_center", &residual_center_cuda_op);
}

}  // namespace vattention::binding

// ---------------------------------------------------------------------------
// plan_lists (stage "plan", plan.h) and merge_estimate (stage "combine", combine.h):
// one launch each, nothing read back.
// ---------------------------------------------------------------------------
namespace vattention::binding {
namespace {

PlanListsOutputs plan_lists_cuda_op(const at::Tensor& q, const c10::optional<at::Tensor>& lengths,
                                    int64_t length, int64_t list_heads,
                                    at::ArrayRef<double> sizes, const c10::List<bool>& fractions,
                                    int64_t sink_max, int64_t local_max, int64_t heavy_max,
                                    int64_t dense_below) {
  TORCH_CHECK(q.is_cuda(), "vattention: q must be a CUDA tensor, got ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  PlanListsParams p;
  PlanListsOutputs out = plan_lists_params(&p, q, lengths, length, list_heads, sizes, fractions,
                                           sink_max, local_max, heavy_max, dense_below);
  C10_CUDA_CHECK(plan_lists_cuda(p, at::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> merge_estimate_cuda_op(
    const at::Tensor& det_out, const at::Tensor& det_lse,
    const c10::optional<at::Tensor>& extra_out, const c10::optional<at::Tensor>& extra_lse,
    const at::Tensor& sample_out, const at::Tensor& sample_lse, const at::Tensor& sample_counts,
    const c10::optional<at::Tensor>& reused, const at::Tensor& pilot_max_logit,
    const at::Tensor& moments, const at::Tensor& vector_moments,
    const at::Tensor& n_residual_heads, at::ScalarType out_dtype) {
  TORCH_CHECK(det_out.is_cuda(), "vattention: det_out must be a CUDA tensor, got ",
              det_out.device());
  const c10::cuda::CUDAGuard guard(det_out.device());
  MergeEstimateParams p;
  auto out = merge_estimate_params(&p, det_out, det_lse, extra_out, extra_lse, sample_out,
                                   sample_lse, sample_counts, reused, pilot_max_logit, moments,
                                   vector_moments, n_residual_heads, out_dtype);
  C10_CUDA_CHECK(merge_estimate_cuda(p, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vattention, CUDA, m) {
  m.impl("plan_lists", &plan_lists_cuda_op);
  m.impl("merge_estimate", &merge_estimate_cuda_op);
}

}  // namespace vattention::binding
