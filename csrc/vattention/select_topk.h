// Stage "select": top-k over rows of scores, restricted to a per-row window.
//
// Row r selects the min(k[r], end[r] - start[r]) highest scores among positions
// [start[r], end[r]) (end clipped to the row length). The order is torch.topk's:
// NaN ranks above every number (+inf included), so a token with a NaN score is
// selected first and its NaN reaches the attention output instead of being
// dropped; -0.0 ties with +0.0 and a subnormal ranks above zero (bit-exact, also
// under --use_fast_math); ties, NaN among NaN included, prefer the lower position.
// The chosen positions are written in ascending position order and the rest of
// the row is padded with -1, which is the order the residual sampler needs for its
// rank-to-position search.
#pragma once

#include "common.h"

namespace vattention {

struct SelectTopkParams {
  const void* scores;       // [rows, length], element type = dtype
  int64_t score_row_stride; // elements; positions are contiguous
  const int32_t* starts;    // [rows]
  const int32_t* ends;      // [rows]
  const int32_t* ks;        // [rows]
  int32_t* indices;         // [rows, k_max], row r at indices + r * index_row_stride
  int64_t index_row_stride; // elements, >= k_max (k_max for a contiguous output); the
                            // deterministic list's heavy columns in decode's fixed path
  int64_t rows;
  int64_t length;
  int64_t k_max;
  DType dtype;

  VATT_HD int32_t* row_indices(int64_t r) const { return indices + r * index_row_stride; }
};

// Row r's window, clipped to [0, length), and how many positions it selects.
struct SelectTopkRow {
  int64_t start, end, available, k;
};

VATT_HD SelectTopkRow select_topk_row(const SelectTopkParams& p, int64_t r) {
  SelectTopkRow row;
  row.start = p.starts[r] > 0 ? p.starts[r] : 0;
  row.end = p.ends[r] < p.length ? p.ends[r] : p.length;
  row.available = row.end > row.start ? row.end - row.start : 0;
  const int64_t wanted = p.ks[r] > 0 ? p.ks[r] : 0;
  row.k = wanted < row.available ? wanted : row.available;
  if (row.k > p.k_max) row.k = p.k_max;
  return row;
}

// Processes rows [row_begin, row_end) so the caller can spread rows over threads.
void select_topk_cpu(const SelectTopkParams& p, int64_t row_begin, int64_t row_end);

}  // namespace vattention

#if defined(VATTENTION_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace vattention {
// Needs the scratch from select_topk_cuda_workspace_bytes (may be 0).
size_t select_topk_cuda_workspace_bytes(const SelectTopkParams& p);
cudaError_t select_topk_cuda(const SelectTopkParams& p, void* workspace, cudaStream_t stream);
}  // namespace vattention
#endif
