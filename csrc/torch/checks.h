// Argument checks and tensor -> params conversion shared by the CPU and CUDA
// bindings. Every check names the argument, so a bad call reads like a
// Python-level error rather than a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../vattention/attention_params.h"
#include "../vattention/combine.h"
#include "../vattention/key_summary.h"
#include "../vattention/pilot.h"
#include "../vattention/sample.h"
#include "../vattention/select_scores.h"
#include "../vattention/select_topk.h"
#include "../vattention/sparse_attention.h"

namespace vattention::binding {

vattention::DType element_type(const at::Tensor& t, const char* name);

void check_int32_vector(const at::Tensor& t, const char* name, int64_t rows, const at::Tensor& like);

// The paged layout of attention_params.h from an optional block_table: int32
// [batch, max_blocks] on like's device, last dim contiguous (any row stride), for a pool
// of `block_size` tokens per block; a null table (contiguous layout) without one.
// Block ids are not read here (on CUDA that would need a sync): they must lie in
// [0, num_blocks) wherever a row is read; the CPU ops check that with check_block_ids.
KVPaging kv_paging(const c10::optional<at::Tensor>& block_table, int64_t batch,
                   int64_t block_size, const at::Tensor& like);

// Logical length of a paged cache: max_blocks * block_size (< 2^31, indices are int32).
int64_t paged_length(const at::Tensor& block_table, int64_t block_size);

// q [B, Hq, D], k/v [B, Hkv, N, D] with Hq % Hkv == 0 and a common dtype/device; with
// block_table [B, max_blocks], k/v are pools [num_blocks, Hkv, block_size, D] and
// N = max_blocks * block_size.
QKVParams qkv_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                     const c10::optional<at::Tensor>& block_table = c10::nullopt);

// indices [B, Hl, L] int32 with Hl in {Hkv, Hq}, counts [B, Hl], log_weights like indices.
IndexListParams index_list_params(const QKVParams& qkv, const at::Tensor& q,
                                  const at::Tensor& indices, const at::Tensor& counts,
                                  const c10::optional<at::Tensor>& log_weights);

// pilot_dispersion: q, k, v and the pilot list as for pilot_stats, center [B, Hq, D]
// float32 contiguous on q's device. The caller sets dispersion.
PilotDispersionParams pilot_dispersion_params(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& indices,
                                              const at::Tensor& counts, double scale,
                                              const at::Tensor& center,
                                              const c10::optional<at::Tensor>& block_table =
                                                  c10::nullopt);

void check_select_topk_args(const at::Tensor& scores, const at::Tensor& starts, const at::Tensor& ends,
                     const at::Tensor& ks, int64_t k_max);

// select_topk_into's output: int32 [rows, k_max] on scores' device, last dim contiguous,
// rows apart by >= k_max (a column slice of a wider list); checked before the args.
void check_select_topk_out(const at::Tensor& out, const at::Tensor& scores);

// Expects check_select_topk_args to have passed; indices is the [rows, k_max] int32
// output (check_select_topk_out's layout; its row stride is passed on).
SelectTopkParams select_topk_params(const at::Tensor& scores, const at::Tensor& starts,
                       const at::Tensor& ends, const at::Tensor& ks, int64_t k_max,
                       const at::Tensor& indices);

SampleParams sample_params(const at::Tensor& heavy, const at::Tensor& starts,
                           const at::Tensor& ends, const at::Tensor& num_samples,
                           const at::Tensor& rng, int64_t max_out, int64_t draw_set,
                           at::Tensor* indices, at::Tensor* log_weights, at::Tensor* counts);

void check_partials(const at::Tensor& partial_out, const at::Tensor& partial_lse);

// Partials laid out [items, splits, dim] (splits_first = false, as sparse_attention
// writes them) or [splits, items, dim] (splits_first = true, the combine op's input),
// merged into out [items, dim] and lse [items].
CombineParams combine_params(const at::Tensor& partial_out, const at::Tensor& partial_lse,
                             int64_t items, int64_t splits, int64_t dim, bool splits_first,
                             const at::Tensor& out, const at::Tensor& lse);


// q [B, Hq, D], k [B, Hkv, N, D] (common dtype and device, head_dim contiguous,
// Hq % Hkv == 0), lengths [B] int32 or int64 on q's device. The caller sets scores.
SelectScoresParams select_scores_params(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& lengths, double scale, bool share_gqa,
                                        const c10::optional<at::Tensor>& block_table =
                                            c10::nullopt);

// codes [B, Hkv, N, D / 2] uint8 and params [B, Hkv, N, D / 32, 2] fp16 (key_summary.h)
// for head dim `dim` (a multiple of 32), on `like`'s device, contiguous per token (the
// batch, head and row strides are free). Shared by both summary ops. paged: dim 0 is
// num_blocks (any, the same for codes and params) instead of batch; paging is left null.
KeySummaryParams key_summary_params(const at::Tensor& codes, const at::Tensor& params,
                                    int64_t batch, int64_t kv_heads, int64_t dim,
                                    const at::Tensor& like, bool paged = false);

// k [B, Hkv, rows, D] (head_dim contiguous), the summary of k's batch, heads and dim, and
// row_begin [B] int64 on k's device. With block_table [B, max_blocks] only the summary is
// paged (pools [num_blocks, Hkv, block_size, ...]); k stays contiguous new rows.
SummarizeKeysParams summarize_keys_params(const at::Tensor& k, const at::Tensor& codes,
                                          const at::Tensor& params, const at::Tensor& row_begin,
                                          const c10::optional<at::Tensor>& block_table =
                                              c10::nullopt);

// q [B, Hq, D] with Hq % Hkv == 0, the summary [B, Hkv, N, ...] for D, lengths as for
// select_scores. The caller sets scores. With block_table the summary is paged as K
// would be (pools [num_blocks, Hkv, block_size, ...]).
SelectScoresParams select_scores_summary_params(const at::Tensor& q, const at::Tensor& codes,
                                                const at::Tensor& params,
                                                const at::Tensor& lengths, double scale,
                                                bool share_gqa,
                                                const c10::optional<at::Tensor>& block_table =
                                                    c10::nullopt);

}  // namespace vattention::binding

// ---------------------------------------------------------------------------
// plan_budget (stage "budget", budget.h).
// ---------------------------------------------------------------------------
#include <string>

#include "../vattention/budget.h"

namespace vattention::binding {

// residual_center (and the estimate part of plan_budget): det_out [B, Hq, D],
// det_lse / pilot_max_logit [B, Hq], moments [B, Hq, 3], vector_moments [B, Hq, 2, D]
// (float32, contiguous, on det_out's device); pilot_counts int32 / n_residual int64
// [B * lists] with Hq % lists == 0.
BudgetParams budget_estimate_params(const at::Tensor& det_out, const at::Tensor& det_lse,
                                    const at::Tensor& pilot_max_logit, const at::Tensor& moments,
                                    const at::Tensor& vector_moments,
                                    const at::Tensor& pilot_counts, const at::Tensor& n_residual);

// plan_budget: as above, and
// det_out [B, Hq, D], det_lse / pilot_max_logit [B, Hq], moments [B, Hq, 3],
// vector_moments [B, Hq, 2, D], dispersion [B, Hq, 3] (all float32, contiguous, on
// det_out's device); pilot_counts int32 / n_residual int64 [B * lists] with
// Hq % lists == 0; chi2_table float64 [T] exactly when dispersion is given; rule one of
// ratio, paper, denominator (the chi-square tail: ratio only). The caller sets the
// outputs.
BudgetParams plan_budget_params(const at::Tensor& det_out, const at::Tensor& det_lse,
                                const at::Tensor& pilot_max_logit, const at::Tensor& moments,
                                const at::Tensor& vector_moments, const at::Tensor& pilot_counts,
                                const at::Tensor& n_residual,
                                const c10::optional<at::Tensor>& dispersion,
                                const c10::optional<at::Tensor>& chi2_table,
                                const std::string& rule, double epsilon, double z,
                                double tail_dim_shrink, int64_t min_samples, bool reuse_pilot);

}  // namespace vattention::binding

// ---------------------------------------------------------------------------
// plan_lists (stage "plan", plan.h) and merge_estimate (stage "combine", combine.h).
// ---------------------------------------------------------------------------
#include <ATen/core/List.h>

#include <tuple>

#include "../vattention/plan.h"

namespace vattention::binding {

// The twelve outputs of plan_lists, in schema order (plan.h).
using PlanListsOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// q [B, Hq, D] (batch and device only); lengths int64 / int32 [B] on q's device or none;
// length >= 0; list_heads >= 1; sizes / fractions: 4 entries (sink, local, heavy,
// base_rate), a count an integral >= 0 (fraction false) or a fraction in [0, 1]; the
// maxima >= 0; dense_below >= 0 (0: no dense fallback). Allocates the outputs on q's
// device and sets them in *p.
PlanListsOutputs plan_lists_params(PlanListsParams* p, const at::Tensor& q,
                                   const c10::optional<at::Tensor>& lengths, int64_t length,
                                   int64_t list_heads, at::ArrayRef<double> sizes,
                                   const c10::List<bool>& fractions, int64_t sink_max,
                                   int64_t local_max, int64_t heavy_max, int64_t dense_below);

// det_out / extra_out [B, Hq, D] and their lse [B, Hq] (float32); extra both or neither;
// sample_out / sample_lse [B, Hq, D] / [B, Hq], or the sample's S >= 1 split partials
// [B, Hq, S, D] / [B, Hq, S] (sparse_attention_partials'); pilot_max_logit [B, Hq] float32; moments [B, Hq, 3] and
// vector_moments [B, Hq, 2, D] (both float32 or both float64); n_residual_heads int64
// [B, Hq]; sample_counts / reused int32 [B * lists] with Hq % lists == 0; all contiguous
// on det_out's device; out_dtype float32, float16 or bfloat16. Allocates (out, lse) and
// sets them in *p.
std::tuple<at::Tensor, at::Tensor> merge_estimate_params(
    MergeEstimateParams* p, const at::Tensor& det_out, const at::Tensor& det_lse,
    const c10::optional<at::Tensor>& extra_out, const c10::optional<at::Tensor>& extra_lse,
    const at::Tensor& sample_out, const at::Tensor& sample_lse, const at::Tensor& sample_counts,
    const c10::optional<at::Tensor>& reused, const at::Tensor& pilot_max_logit,
    const at::Tensor& moments, const at::Tensor& vector_moments,
    const at::Tensor& n_residual_heads, at::ScalarType out_dtype);

}  // namespace vattention::binding
