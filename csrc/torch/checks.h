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

// q [B, Hq, D], k/v [B, Hkv, N, D] with Hq % Hkv == 0 and a common dtype/device.
QKVParams qkv_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

// indices [B, Hl, L] int32 with Hl in {Hkv, Hq}, counts [B, Hl], log_weights like indices.
IndexListParams index_list_params(const QKVParams& qkv, const at::Tensor& q,
                                  const at::Tensor& indices, const at::Tensor& counts,
                                  const c10::optional<at::Tensor>& log_weights);

// pilot_dispersion: q, k, v and the pilot list as for pilot_stats, center [B, Hq, D]
// float32 contiguous on q's device. The caller sets dispersion.
PilotDispersionParams pilot_dispersion_params(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& indices,
                                              const at::Tensor& counts, double scale,
                                              const at::Tensor& center);

void check_select_topk_args(const at::Tensor& scores, const at::Tensor& starts, const at::Tensor& ends,
                     const at::Tensor& ks, int64_t k_max);

// Expects check_select_topk_args to have passed; indices is the [rows, k_max] int32 output.
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
                                        const at::Tensor& lengths, double scale, bool share_gqa);

// codes [B, Hkv, N, D / 2] uint8 and params [B, Hkv, N, D / 32, 2] fp16 (key_summary.h)
// for head dim `dim` (a multiple of 32), on `like`'s device, contiguous per token (the
// batch, head and row strides are free). Shared by both summary ops.
KeySummaryParams key_summary_params(const at::Tensor& codes, const at::Tensor& params,
                                    int64_t batch, int64_t kv_heads, int64_t dim,
                                    const at::Tensor& like);

// k [B, Hkv, rows, D] (head_dim contiguous), the summary of k's batch, heads and dim, and
// row_begin [B] int64 on k's device.
SummarizeKeysParams summarize_keys_params(const at::Tensor& k, const at::Tensor& codes,
                                          const at::Tensor& params, const at::Tensor& row_begin);

// q [B, Hq, D] with Hq % Hkv == 0, the summary [B, Hkv, N, ...] for D, lengths as for
// select_scores. The caller sets scores.
SelectScoresParams select_scores_summary_params(const at::Tensor& q, const at::Tensor& codes,
                                                const at::Tensor& params,
                                                const at::Tensor& lengths, double scale,
                                                bool share_gqa);

}  // namespace vattention::binding
