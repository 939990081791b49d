// Launch-shape heuristics of the kernel library, in one place. Host-only,
// torch-free and constexpr, so a test can evaluate them without a device.
//
// Split-K (choose_num_splits). The stages that read a list of K/V rows
// (sparse attention, pilot) cut each list into `splits` contiguous chunks,
// one block (CPU: one work item) per chunk, and merge the chunks' partials
// afterwards. The rule:
//
//   splits = 1                                   if max_count <= kMinSplitRows
//   splits = clamp(min(ceil(kBlocksPerWorker * workers / work_rows),
//                      max_count / kMinSplitRows),
//                  1, kMaxSplits)                otherwise
//
// i.e. enough chunks to give every worker kBlocksPerWorker of them, but never
// chunks shorter than kMinSplitRows rows, and never more than kMaxSplits.
//
//   work_rows  the independent rows of work before splitting: on CUDA the lists
//              (batch * list_heads; a list shared by a KV group is one block
//              for the whole group), on the CPU the (batch, query head) items.
//   max_count  the longest list (entries per list, the row count to split).
//   workers    CUDA: the device's SM count; CPU: the intra-op thread count.
//
// Worked example (CUDA, H100 with 132 SMs): batch 1, 8 KV heads with lists
// shared by each GQA group, 6000 entries per list. work_rows = 8, so filling
// the device wants ceil(2 * 132 / 8) = 33 splits; the length allows
// 6000 / 128 = 46. Result: 33 splits of ceil(6000 / 33) = 182 entries, a grid
// of 8 x 33 = 264 blocks, two per SM. With per-head lists for 32 query heads
// (work_rows = 32) the same list gets ceil(264 / 32) = 9 splits of 667 entries;
// at batch 16 (work_rows = 128) it gets 3; a list of 100 entries always gets 1.
#pragma once

#include <cstdint>

namespace vattention {

// Shortest chunk worth a split of its own. A split costs a fixed amount on top
// of its rows: the query load, the pipeline fill (three tiles requested before
// the first is used), the merge of the block's row groups through shared
// memory, and a partial of head_dim + 1 floats written and read back by the
// merge. At 128 rows the rows (128 K and V rows, 64 KiB in bf16 at head_dim 128)
// outweigh that overhead several times over; shorter chunks would mostly buy
// overhead.
constexpr int64_t kMinSplitRows = 128;

// Blocks aimed at per SM (work items per CPU thread). The gather kernel runs
// 128 threads with about 64 KiB of shared memory (4 stages of 16 KiB of K+V),
// so an SM holds up to three; two per SM keeps each SM streaming rows while
// the other block is in its prologue or final merge, and a list count that does
// not divide the SM count evenly costs at most half a wave. On the CPU, two
// items per thread lets parallel_for even out unequal list lengths.
constexpr int64_t kBlocksPerWorker = 2;

// Most splits of one list. The merge work per head (combine reads every split's
// lse and partial row) and the partial buffers (heads x splits x (head_dim + 1)
// floats) grow with the split count, while the device is already full at
// kBlocksPerWorker blocks per SM; 64 also keeps far below the 65535 grid limit.
constexpr int64_t kMaxSplits = 64;

constexpr int64_t choose_num_splits(int64_t work_rows, int64_t max_count, int64_t workers) {
  if (max_count <= kMinSplitRows) return 1;
  const int64_t rows = work_rows > 1 ? work_rows : 1;
  const int64_t to_fill = (kBlocksPerWorker * workers + rows - 1) / rows;
  const int64_t by_length = max_count / kMinSplitRows;
  const int64_t splits = to_fill < by_length ? to_fill : by_length;
  return splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits);
}

// The worked example above, checked at compile time.
static_assert(choose_num_splits(8, 6000, 132) == 33, "heuristics.h worked example");
static_assert(choose_num_splits(32, 6000, 132) == 9, "heuristics.h worked example");
static_assert(choose_num_splits(128, 6000, 132) == 3, "heuristics.h worked example");
static_assert(choose_num_splits(8, 100, 132) == 1, "heuristics.h worked example");

}  // namespace vattention
