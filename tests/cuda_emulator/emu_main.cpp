// Runs the CUDA kernels of csrc/vattention/*_cuda.cu under the CPU emulator
// (emu_runtime.h) and compares them with the CPU kernels: exact equality for
// select_topk and sample_residual, tolerances for pilot statistics, sparse-attention
// partials and combine, and the NaN rule of online_softmax.h (a NaN in q or in a
// K/V row a head reads reaches that head's outputs through every split count and
// merge, NaN where the CPU kernels have NaN), the int4 key summary byte for byte and
// the scores read from it within a bound on fp32 summation error. One file of checks
// per stage (test_<stage>.cpp), sharing emu_check.h. Built by CMake as
// `vattention_emu_test` (ctest names emu_kernels, emu_kernels_random_schedule);
// needs no GPU.
//
//   vattention_emu_test [--quick]     (EMU_SCHEDULE=lifo or random: other thread orders)
//   vattention_emu_test --launch-count  (only the default decode step's kernels per op)
#include <cstdio>
#include <string>

#include "emu_check.h"

int main(int argc, char** argv) {
  using namespace vattention::emu_check;
  bool launch_count_only = false;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--quick") g_quick = true;
    if (std::string(argv[i]) == "--launch-count") launch_count_only = true;
  }
  if (launch_count_only) {  // the per-op kernel table only (benchmarks/launch_count.py)
    test_launch_count();
    std::printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
    return g_failures == 0 ? 0 : 1;
  }
  // Decode order: a broken early stage is reported first.
  test_plan();
  test_key_summary();
  test_select_scores();
  test_select_topk();
  test_pilot();
  test_budget();
  test_sample();
  test_sparse_attention();
  test_combine();
  test_paged();
  test_launch_count();
  std::printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
  return g_failures == 0 ? 0 : 1;
}
