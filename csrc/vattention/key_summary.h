// Stage "select", cheap selector: a 4-bit copy of K kept beside the KV cache (the
// "key summary"), built at prefill, updated as decode appends tokens, and scored
// instead of K by the "int4" selector. Measured on real attention (docs/algorithm.md),
// 4 bits with a scale and a zero per group of 32 channels is the cheapest summary
// tried whose top-k keeps the oracle's mass (recall 0.98-0.995), so the uniform
// pilot still sees the residual it must estimate and coverage holds.
//
// Layout, per (batch b, KV head h, token i), head dim D (a multiple of 32):
//   codes  [B, Hkv, N, D / 2] uint8: channel 2j in the low nibble of byte j,
//          channel 2j + 1 in the high nibble;
//   params [B, Hkv, N, D / 32, 2] fp16: (zero z_g, step s_g) of channel group g.
// A token costs D / 2 + 4 * D / 32 bytes (80 at D = 128): 0.156 of the K and V
// rows of a 16-bit cache, where the oracle selector reads K itself (0.5).
//
// Quantisation of group g with values x_d (converted to fp32 exactly):
//   z_g = fp16_rn(min_d x_d)
//   s_g = fp16_rn((max_d x_d - float(z_g)) / 15)                  (IEEE division)
//   code_d = 0 if s_g == 0, else clamp(rint((x_d - z_g) / s_g), 0, 15)
// and the dequantised key is K~_d = z_g + s_g * code_d. Every operation is a
// correctly rounded IEEE op (the CUDA kernels use __fdiv_rn / __fsub_rn and no
// fast-math shortcut), so the CPU and CUDA builds write identical bytes.
// A NaN in x makes z_g or s_g NaN (min / max propagate NaN), so the token's
// summary score is NaN and select_topk ranks it first: the NaN row then enters
// the deterministic set and reaches the output, as with the oracle.
//
// Scores: exactly select_scores.h's definition with K replaced by K~ (logits
// s_h(i) = scale * <q_h, K~_i>, -inf beyond the row's length; with share_gqa the
// max over the group of s_h(i) - lse_h). Dot products accumulate in fp32 (the
// order may differ between CPU and CUDA: compare with a tolerance).
#pragma once

#include "attention_params.h"

namespace vattention {

constexpr int kSummaryGroup = 32;   // channels per (zero, step) pair
constexpr int kSummaryLevels = 15;  // codes 0..15

// Bytes of one token's summary for head dim `dim`.
constexpr int64_t summary_bytes_per_token(int64_t dim) {
  return dim / 2 + 2 * 2 * (dim / kSummaryGroup);
}

struct KeySummaryParams {
  uint8_t* codes;           // [B, Hkv, N, D / 2]; const for scoring
  half_t* params;           // [B, Hkv, N, D / 32, 2]
  int64_t codes_batch_stride, codes_head_stride, codes_row_stride;     // bytes
  int64_t params_batch_stride, params_head_stride, params_row_stride;  // half_t elements
  // Paged summary (attention_params.h): dims 0 / 2 are then block / slot, and the
  // table maps a batch row's logical rows to blocks, as for K. Scoring pages the
  // summary with K's table; summarize_keys pages only the summary (k is contiguous).
  KVPaging paging;
};

// Build / update: summarise rows [row_begin[b], row_begin[b] + rows) of k into
// the summary's rows of the same positions (prefill: row_begin = 0, rows = N;
// decode: the appended tokens). Positions >= the summary's length are skipped.
struct SummarizeKeysParams {
  QKVParams qkv;            // k (and its strides, dtype); q and v unused
  KeySummaryParams summary;
  const int64_t* row_begin; // [batch] first position written, on k's device
  int64_t rows;             // rows of k read per batch row: k's rows [0, rows) go to
                            // positions row_begin[b] + [0, rows)
  int64_t summary_length;   // N of the summary
};

void summarize_keys_cpu(const SummarizeKeysParams& p, int64_t list_begin, int64_t list_end);

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
cudaError_t summarize_keys_cuda(const SummarizeKeysParams& p, cudaStream_t stream);
}  // namespace vattention
#endif
