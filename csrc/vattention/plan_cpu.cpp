// CPU list planning: plan.h's rules, one batch row (and its lists) at a time.
#include "plan.h"

namespace vattention {

void plan_lists_cpu(const PlanListsParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t width = p.width();
  for (int64_t b = row_begin; b < row_end; ++b) {
    const PlanRow r = plan_row(p, b);
    write_plan_row(p, b, r);
    for (int64_t l = 0; l < p.list_heads; ++l) {
      const int64_t list = b * p.list_heads + l;
      write_plan_list(p, list, r);
      int32_t* idx = p.det_idx + list * width;
      for (int64_t c = 0; c < width; ++c) idx[c] = det_entry(p, r, c);
    }
  }
}

}  // namespace vattention
