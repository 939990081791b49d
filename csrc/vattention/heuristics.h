// Launch-shape heuristics of the kernel library, in one place. Host-only,
// torch-free and constexpr, so a test can evaluate them without a device.
//
// Split-K (choose_num_splits). The stages that read a list of K/V rows
// (sparse attention, pilot) cut each list into `splits` contiguous chunks,
// one block (CPU: one work item) per chunk, and merge the chunks' partials
// afterwards. The CPU kernels use this rule as it stands; the CUDA ones size
// their grid with it and balance the lists on the device (choose_split_grid
// below). The rule:
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

// Balanced split-K on CUDA (choose_split_grid, balanced_split_rows, list_splits).
// choose_num_splits cuts every list of a launch into the same number of chunks of
// its own count, so the longest list sets the tail: at batch 16 (128 lists) it
// gives 3 splits, and a list that falls back to exact attention (118000 rows of a
// 128K context) is read by 3 blocks of 39334 rows while the other lists' blocks
// (1000 rows each) are long done, about 350 us of idle GPU on an H100. On CUDA the
// split count of each list is therefore decided on the device from the counts,
// with no host sync:
//
//   grid  = choose_split_grid(max_count, sms)
//         = choose_num_splits(1, max_count, sms)  the splits a list as long as
//           the capacity would get if it were alone (a grid of lists x grid blocks)
//   total = sum of the launch's counts             (every block reads the counts)
//   rows  = balanced_split_rows(total, kBlocksPerWorker * sms)
//         = max(kMinSplitRows, ceil(total / (kBlocksPerWorker * sms)))
//   list_splits(count, rows, grid) = clamp(ceil(count / rows), 1, grid)
//
// and a list of `count` entries is cut evenly into its own list_splits chunks
// (split_range). The blocks past them exit at once after writing an empty
// partial (lse = -inf; the pilot: a record with sum w = 0), which every merge
// already skips: combine reads their lse and never their out. The grid suffices:
// the longest list c <= max_count needs at most c / rows <= kBlocksPerWorker *
// sms splits (rows >= total / (kBlocksPerWorker * sms) >= c / (...)), and at
// least c / kMinSplitRows of them.
//
// Worked example (H100, 132 SMs, 8 KV heads with lists shared by each group):
//   batch 16, N = 128K: 128 lists, capacity 131072, one exact list of 118000
//   entries and 127 of 3000. grid = min(264, 1024, kMaxSplits) = 64;
//   total = 499000, rows = ceil(499000 / 264) = 1891; the exact list gets 63
//   splits of <= 1874 rows, each other list 2 of 1500: 317 working blocks of
//   <= 1874 rows (1.2 blocks per SM slot) instead of a tail of 39334 rows.
//   batch 1: 8 lists of 6000 (capacity 6000): grid = min(264, 46) = 46, total =
//   48000, rows = 182, 33 splits per list: the grid of choose_num_splits (264
//   working blocks), 13 blocks per list exiting at once.
// Partials: heads x grid x (head_dim + 1) floats, bounded by kMaxSplits: at
// B = 16, N = 128K (32 query heads, head_dim 128) 16 x 32 x 64 x 129 x 4 bytes =
// 16.9 MB written at most (only the working blocks write out rows) against 8.6 GB
// of K/V at exact attention, 0.9 GB at 10% of the rows.
constexpr int64_t choose_split_grid(int64_t max_count, int64_t workers) {
  return choose_num_splits(1, max_count, workers);
}

constexpr int64_t balanced_split_rows(int64_t total_count, int64_t target_blocks) {
  const int64_t blocks = target_blocks > 1 ? target_blocks : 1;
  const int64_t rows = (total_count + blocks - 1) / blocks;
  return rows > kMinSplitRows ? rows : kMinSplitRows;
}

constexpr int64_t list_splits(int64_t count, int64_t split_rows, int64_t grid) {
  const int64_t n = (count + split_rows - 1) / split_rows;
  return n < 1 ? 1 : (n > grid ? grid : n);
}

// The balanced example above, checked at compile time.
static_assert(choose_split_grid(131072, 132) == 64, "heuristics.h balanced example");
static_assert(balanced_split_rows(118000 + 127 * 3000, 2 * 132) == 1891,
              "heuristics.h balanced example");
static_assert(list_splits(118000, 1891, 64) == 63, "heuristics.h balanced example");
static_assert(list_splits(3000, 1891, 64) == 2, "heuristics.h balanced example");
static_assert(choose_split_grid(6000, 132) == 46, "heuristics.h balanced example");
static_assert(balanced_split_rows(8 * 6000, 2 * 132) == 182, "heuristics.h balanced example");
static_assert(list_splits(6000, 182, 46) == 33, "heuristics.h balanced example");
static_assert(list_splits(0, 182, 46) == 1 && list_splits(100, 128, 1) == 1,
              "heuristics.h balanced example");

}  // namespace vattention
