// CUDA budget planning (ops plan_budget and residual_center): the maths of budget.h, one
// launch each on the current stream, no workspace, nothing read back. plan_budget: a
// thread per query head, the heads of one list in one block (a list's threads take its
// heads j, j + tpl, ... when the group exceeds the block); their wanted counts meet in
// shared memory and the list's first thread writes the list's outputs. Each head's
// D-sums run sequentially in one thread, as in plan_budget_cpu, so the two agree bit for
// bit where the compilers round alike.
#include "budget.h"
#include "cuda_utils.cuh"

namespace vattention {
namespace {

using namespace cuda_detail;

constexpr int kBudgetThreads = 128;

__global__ void __launch_bounds__(kBudgetThreads) plan_budget_kernel(const BudgetParams p,
                                                                     int64_t lists_per_block,
                                                                     int64_t threads_per_list) {
  double* wanted_shared = reinterpret_cast<double*>(dynamic_smem());  // [kBudgetThreads]
  const int64_t local = int64_t(threadIdx.x) / threads_per_list;
  const int64_t j = int64_t(threadIdx.x) % threads_per_list;
  const int64_t list = int64_t(blockIdx.x) * lists_per_block + local;
  const bool active = local < lists_per_block && list < p.lists;
  double wanted = 0.0;
  if (active) {
    const int32_t pilot_count = p.pilot_counts[list];
    const int64_t n_residual = p.n_residual[list];
    for (int64_t h = j; h < p.group; h += threads_per_list) {
      const double w = head_wanted(p, list * p.group + h, pilot_count, n_residual);
      wanted = h == j || w > wanted ? w : wanted;
    }
  }
  wanted_shared[threadIdx.x] = wanted;
  __syncthreads();
  if (active && j == 0) {
    const int64_t first = local * threads_per_list;
    const int64_t used = p.group < threads_per_list ? p.group : threads_per_list;
    for (int64_t t = 1; t < used; ++t) {
      const double w = wanted_shared[first + t];
      wanted = w > wanted ? w : wanted;
    }
    finish_list(p, list, wanted);
  }
}

__global__ void __launch_bounds__(kBudgetThreads) residual_center_kernel(const BudgetParams p,
                                                                         float* center) {
  const int64_t head = int64_t(blockIdx.x) * kBudgetThreads + threadIdx.x;
  if (head >= p.lists * p.group) return;
  const int64_t list = head / p.group;
  head_center(p, head, p.pilot_counts[list], p.n_residual[list], center);
}

}  // namespace

cudaError_t residual_center_cuda(const BudgetParams& p, float* center, cudaStream_t stream) {
  const int64_t heads = p.lists * p.group;
  if (heads <= 0 || p.head_dim <= 0) return cudaSuccess;
  return launch_kernel(residual_center_kernel, dim3(unsigned(ceil_div(heads, kBudgetThreads))),
                       dim3(kBudgetThreads), 0, stream, 1, p, center);
}

cudaError_t plan_budget_cuda(const BudgetParams& p, cudaStream_t stream) {
  if (p.lists <= 0 || p.group <= 0) return cudaSuccess;
  const int64_t threads_per_list = p.group < kBudgetThreads ? p.group : kBudgetThreads;
  const int64_t lists_per_block = kBudgetThreads / threads_per_list;
  const int64_t blocks = ceil_div(p.lists, lists_per_block);
  return launch_kernel(plan_budget_kernel, dim3(unsigned(blocks)), dim3(kBudgetThreads),
                       kBudgetThreads * sizeof(double), stream, 1, p, lists_per_block,
                       threads_per_list);
}

}  // namespace vattention
