#include <algorithm>
#include <utility>
#include <vector>

#include "dispatch.h"
#include "select_topk.h"

namespace vattention {
namespace {

template <typename T>
void select_topk_rows(const SelectTopkParams& p, int64_t row_begin, int64_t row_end) {
  std::vector<std::pair<uint32_t, int32_t>> candidates;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* row = static_cast<const T*>(p.scores) + r * p.score_row_stride;
    int32_t* out = p.row_indices(r);
    const SelectTopkRow window = select_topk_row(p, r);
    const int64_t k = window.k;

    candidates.clear();
    for (int64_t i = window.start; i < window.end; ++i) {
      candidates.emplace_back(orderable_key(to_float(row[i])), int32_t(i));
    }
    // Higher key first (NaN highest, orderable_key); on equal keys the lower position wins.
    auto better = [](const std::pair<uint32_t, int32_t>& a, const std::pair<uint32_t, int32_t>& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    };
    if (k < window.available) {
      std::nth_element(candidates.begin(), candidates.begin() + k, candidates.end(), better);
    }
    std::vector<int32_t> chosen;
    chosen.reserve(k);
    for (int64_t j = 0; j < k; ++j) chosen.push_back(candidates[j].second);
    std::sort(chosen.begin(), chosen.end());
    for (int64_t j = 0; j < p.k_max; ++j) out[j] = j < k ? chosen[j] : -1;
  }
}

}  // namespace

void select_topk_cpu(const SelectTopkParams& p, int64_t row_begin, int64_t row_end) {
  dispatch_dtype(p.dtype, [&](auto tag) { select_topk_rows<decltype(tag)>(p, row_begin, row_end); });
}

}  // namespace vattention
