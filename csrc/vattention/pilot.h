// Stage "pilot": sufficient statistics of a pilot sample for the budget rules.
//
// For query head (b, h) over the rows of its list, with s_i = scale * <q, K_i>
// and w_i = exp(s_i - max_logit) (max over the list; duplicates count once per
// draw), it writes
//   max_logit[b, h]
//   moments[b, h, :]        = (sum w_i, sum w_i^2, sum w_i^2 ||V_i||^2)
//   vector_moments[b, h, :] = (sum w_i V_i  [head_dim], sum w_i^2 V_i [head_dim])
// All fp32. An empty list gives max_logit = -inf and zeros. A NaN logit (a NaN
// in q or in a listed K row) makes all of the head's outputs NaN; a NaN in a
// listed V row makes moments[2] and that element of both vector moments NaN.
#pragma once

#include "attention_params.h"
#include "heuristics.h"

namespace vattention {

struct PilotParams {
  QKVParams qkv;
  IndexListParams list;
  float* max_logit;       // [batch, q_heads]
  float* moments;         // [batch, q_heads, 3]
  float* vector_moments;  // [batch, q_heads, 2, head_dim]
  // CUDA split-K only: > 0 (kBlocksPerWorker x SMs) for balanced splits
  // (heuristics.h); 0: every list cut into all num_splits.
  int64_t split_target_blocks;
};

constexpr int kPilotMoments = 3;

// Processes query heads [head_begin, head_end) of the flattened batch * q_heads.
void pilot_stats_cpu(const PilotParams& p, int64_t head_begin, int64_t head_end);

// Op pilot_dispersion: the spread of the ratio rule's terms over the pilot, for the
// effective dimension (Tr Sigma)^2 / Tr(Sigma^2) of the budget's chi-square tail.
// For query head (b, h), with w_i as above (max over the list's valid entries),
// x_i = w_i (V_i - center[b, h]) and c_i = x_i - mean(x) over the list's p valid
// entries, it writes
//   dispersion[b, h, :] = (sum_i ||c_i||^2, sum_ij (c_i . c_j)^2, sum_i ||c_i||^4)
// that is p-1 times Tr S and (p-1)^2 times Tr(S^2) of the terms' sample covariance S,
// and the Gram's diagonal part of the second (which U-statistics leave out: for
// heavy-tailed terms it dominates), computed in draw space (a p x p Gram), never as a
// D x D matrix. fp32 outputs. No valid entry gives zeros; a NaN logit, a NaN in a
// listed V row or in the center makes all three outputs NaN.
struct PilotDispersionParams {
  QKVParams qkv;
  IndexListParams list;
  const float* center;  // [batch, q_heads, head_dim], contiguous
  float* dispersion;    // [batch, q_heads, 2]
};

constexpr int kDispersionOutputs = 3;

void pilot_dispersion_cpu(const PilotDispersionParams& p, int64_t head_begin, int64_t head_end);

}  // namespace vattention

namespace vattention {

// The split grid of pilot_stats on CUDA: heuristics.h's choose_split_grid, except
// that lists of at most kPilotOneSplitRows entries get one split, whose blocks write
// the final outputs themselves (one kernel, no workspace, no merge kernel):
//
//   grid = 1                                   if max_count <= kPilotOneSplitRows
//   grid = choose_split_grid(max_count, sms)   otherwise (split-K + pilot_merge_kernel)
//
// Why 512 (4 x kMinSplitRows). The pilot's list holds pilot_max rows (128 by default,
// which choose_split_grid already gives one split), and it is short whatever the context
// length. A single block streams a 512-row list (256 KiB of K+V in bf16 at head_dim
// 128) in about 5 us at the ~50 GB/s one SM sustains with three 16 KiB tiles in
// flight; four splits of 128 rows take about 1.3 us but need the merge: a second
// launch (2-4 us eager, ~1 us in a CUDA graph), the workspace round trip and its own
// pass over the records. The two are about even at 512 rows and the one split wins
// below, for every batch: with many lists (batch >= 4) the lists alone fill the SMs and
// splitting only adds merge work. Longer lists (a fractional base_rate over a long
// residual) keep split-K, where reading the rows dominates.
constexpr int64_t kPilotOneSplitRows = 4 * kMinSplitRows;

constexpr int64_t pilot_split_grid(int64_t max_count, int64_t workers) {
  return max_count <= kPilotOneSplitRows ? 1 : choose_split_grid(max_count, workers);
}

static_assert(pilot_split_grid(128, 132) == 1 && pilot_split_grid(512, 132) == 1 &&
                  pilot_split_grid(513, 132) == 4 && pilot_split_grid(6000, 132) == 46,
              "pilot.h split grid");

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
// One split per list: every block writes final outputs, no workspace (one kernel).
cudaError_t pilot_stats_cuda(const PilotParams& p, cudaStream_t stream);
// Split-K: each list is cut into num_splits chunks (split_range; with
// p.split_target_blocks into as many as its count needs, heuristics.h); the chunks'
// statistics go to `workspace` (pilot_stats_cuda_workspace_bytes, 0 when
// num_splits == 1) and a second kernel merges them. num_splits == 1 is the one-kernel
// path above (the op passes pilot_split_grid).
size_t pilot_stats_cuda_workspace_bytes(const PilotParams& p, int64_t num_splits);
cudaError_t pilot_stats_cuda(const PilotParams& p, int64_t num_splits, void* workspace,
                             cudaStream_t stream);
// One block per query head. `workspace` holds, per list entry, the head's weight and the
// entry's V row offset (found once in the first pass, so the later passes compute no
// paged address): pilot_dispersion_cuda_workspace_bytes(p) bytes, 8-byte aligned.
size_t pilot_dispersion_cuda_workspace_bytes(const PilotDispersionParams& p);
cudaError_t pilot_dispersion_cuda(const PilotDispersionParams& p, void* workspace,
                                  cudaStream_t stream);
}  // namespace vattention
#endif
