// CPU budget planning: the maths of budget.h, one list (and its query heads) at a time.
#include "budget.h"

namespace vattention {

void plan_budget_cpu(const BudgetParams& p, int64_t list_begin, int64_t list_end) {
  for (int64_t l = list_begin; l < list_end; ++l) {
    double wanted = 0.0;
    for (int64_t j = 0; j < p.group; ++j) {
      const double w = head_wanted(p, l * p.group + j, p.pilot_counts[l], p.n_residual[l]);
      wanted = j == 0 || w > wanted ? w : wanted;  // never NaN: head_wanted's min with n_r
    }
    finish_list(p, l, wanted);
  }
}

void residual_center_cpu(const BudgetParams& p, float* center, int64_t list_begin,
                         int64_t list_end) {
  for (int64_t l = list_begin; l < list_end; ++l) {
    for (int64_t j = 0; j < p.group; ++j) {
      head_center(p, l * p.group + j, p.pilot_counts[l], p.n_residual[l], center);
    }
  }
}

}  // namespace vattention
