// CUDA list planning (op plan_lists): plan.h's rules in one launch on the current stream,
// no workspace, nothing read back. A block per list: every thread derives its row's
// scalars (a few integer ops, cheaper than sharing them), writes det_idx columns
// c = thread, thread + block, ...; thread 0 writes the list's scalars, and in the row's
// first list the row's.
#include "cuda_utils.cuh"
#include "plan.h"

namespace vattention {
namespace {

using namespace cuda_detail;

constexpr int kPlanThreads = 128;

__global__ void __launch_bounds__(kPlanThreads) plan_lists_kernel(const PlanListsParams p) {
  const int64_t lists = p.batch * p.list_heads;
  const int64_t width = p.width();
  for (int64_t list = blockIdx.x; list < lists; list += gridDim.x) {
    const int64_t b = list / p.list_heads;
    const PlanRow r = plan_row(p, b);
    if (threadIdx.x == 0) {
      write_plan_list(p, list, r);
      if (list % p.list_heads == 0) write_plan_row(p, b, r);
    }
    int32_t* idx = p.det_idx + list * width;
    for (int64_t c = threadIdx.x; c < width; c += kPlanThreads) idx[c] = det_entry(p, r, c);
  }
}

}  // namespace

cudaError_t plan_lists_cuda(const PlanListsParams& p, cudaStream_t stream) {
  const int64_t lists = p.batch * p.list_heads;
  if (lists <= 0) return cudaSuccess;
  const int64_t blocks = lists < (int64_t(1) << 20) ? lists : (int64_t(1) << 20);
  return launch_kernel(plan_lists_kernel, dim3(unsigned(blocks)), dim3(kPlanThreads), 0, stream,
                       1, p);
}

}  // namespace vattention
