// sparse_attention_partial under the emulator against the CPU kernel (partials within
// fp32 tolerance over head dims, groups, per-query lists, splits, weights and
// unaligned rows; list garbage beyond a count and bad indices never read), the
// merge of those partials by combine_cpu and combine_cuda, and the NaN rule through
// every split count and that merge.
#include "emu_check.h"

#include <sys/mman.h>

#include <algorithm>

#include "../../csrc/vattention/combine.h"
#include "../../csrc/vattention/heuristics.h"
#include "../../csrc/vattention/kv_gather_cuda.cuh"
#include "../../csrc/vattention/sparse_attention.h"

namespace vattention::emu_check {
namespace {

void test_attention_case(DType dtype, int64_t dim, int64_t group, bool per_q, int64_t max_count,
                         int64_t splits, bool weights, int64_t row_pad, int64_t base_offset,
                         uint32_t seed, int64_t length = 47, int64_t batch = 2) {
  std::mt19937 rng(seed);
  const int64_t kv_heads = 2, q_heads = kv_heads * group;
  QKV t = make_qkv(dtype, batch, q_heads, kv_heads, length, dim, row_pad, base_offset, rng);
  Lists l = make_lists(batch, per_q ? q_heads : kv_heads, max_count, length, rng);
  SparseAttentionParams p{};
  p.qkv = t.params;
  p.list = l.params;
  if (!weights) p.list.log_weights = nullptr;
  p.num_splits = splits;
  const int64_t items = batch * q_heads * splits;
  std::vector<float> ro(items * dim), go(items * dim, 777.f), rl(items), gl(items, 777.f);
  p.partial_out = ro.data();
  p.partial_lse = rl.data();
  sparse_attention_partial_cpu(p, 0, items);
  p.partial_out = go.data();
  p.partial_lse = gl.data();
  check_cuda(sparse_attention_partial_cuda(p, nullptr), "sparse_attention_partial_cuda");
  int64_t bad = 0;
  for (int64_t i = 0; i < items; ++i) bad += !close(gl[i], rl[i], 2e-5f, 2e-5f);
  for (int64_t i = 0; i < items * dim; ++i) bad += !close(go[i], ro[i], 2e-5f, 2e-5f);
  EXPECT(bad == 0, "attention %s D=%lld group=%lld per_q=%d max_count=%lld splits=%lld w=%d "
         "pad=%lld offset=%lld: %lld mismatches", dtype_name(dtype), (long long)dim,
         (long long)group, int(per_q), (long long)max_count, (long long)splits, int(weights),
         (long long)row_pad, (long long)base_offset, (long long)bad);

  // combine of those partials, [items, splits, D] layout
  const int64_t heads = batch * q_heads;
  std::vector<float> co(heads * dim), cl(heads), gco(heads * dim, 777.f), gcl(heads, 777.f);
  CombineParams c =
      combine_layout(ro.data(), rl.data(), heads, splits, dim, false, co.data(), cl.data());
  combine_cpu(c, 0, heads);
  c.out = gco.data();
  c.lse = gcl.data();
  check_cuda(combine_cuda(c, nullptr), "combine_cuda");
  bad = 0;
  for (int64_t i = 0; i < heads; ++i) bad += !close(gcl[i], cl[i], 1e-5f, 1e-5f);
  for (int64_t i = 0; i < heads * dim; ++i) bad += !close(gco[i], co[i], 1e-5f, 1e-5f);
  EXPECT(bad == 0, "combine after attention %s D=%lld splits=%lld: %lld mismatches",
         dtype_name(dtype), (long long)dim, (long long)splits, (long long)bad);
}

void test_attention_nan_case(DType dtype, int64_t dim, int64_t group, bool per_q, int64_t splits,
                             NanAt at, uint32_t seed) {
  NanCase c = make_nan_case(dtype, dim, group, per_q, 45, at, seed);
  SparseAttentionParams p{};
  p.qkv = c.t.params;
  p.list = c.l.params;
  p.num_splits = splits;
  const int64_t heads = c.batch * c.q_heads, items = heads * splits;
  std::vector<float> ro(items * dim), go(items * dim, 777.f), rl(items), gl(items, 777.f);
  p.partial_out = ro.data();
  p.partial_lse = rl.data();
  sparse_attention_partial_cpu(p, 0, items);
  p.partial_out = go.data();
  p.partial_lse = gl.data();
  check_cuda(sparse_attention_partial_cuda(p, nullptr), "sparse_attention_partial_cuda");
  int64_t bad = 0;
  for (int64_t i = 0; i < items; ++i) bad += !same(gl[i], rl[i], 2e-5f, 2e-5f);
  for (int64_t i = 0; i < items * dim; ++i) bad += !same(go[i], ro[i], 2e-5f, 2e-5f);

  // Merge the splits (CPU and emulated combine) and check the rule on the result.
  std::vector<float> co(heads * dim), cl(heads), gco(heads * dim, 777.f), gcl(heads, 777.f);
  CombineParams cp =
      combine_layout(ro.data(), rl.data(), heads, splits, dim, false, co.data(), cl.data());
  combine_cpu(cp, 0, heads);
  cp.partial_out = go.data();
  cp.partial_lse = gl.data();
  cp.out = gco.data();
  cp.lse = gcl.data();
  check_cuda(combine_cuda(cp, nullptr), "combine_cuda");
  int64_t wrong = 0;
  for (int64_t h = 0; h < heads; ++h) {
    bad += !same(gcl[h], cl[h], 1e-5f, 1e-5f);
    for (int64_t d = 0; d < dim; ++d) bad += !same(gco[h * dim + d], co[h * dim + d], 1e-5f, 1e-5f);
    for (const std::vector<float>* o : {&co, &gco}) {
      const float lse = o == &co ? cl[h] : gcl[h];
      const float* out = o->data() + h * dim;
      const bool logit_nan = c.reads[h] && at != NanAt::kValueRow;
      wrong += std::isnan(lse) != logit_nan;
      for (int64_t d = 0; d < dim; ++d) {
        const bool want_nan = logit_nan || (c.reads[h] && d == c.nan_dim);
        wrong += std::isnan(out[d]) != want_nan;
      }
    }
  }
  EXPECT(bad == 0 && wrong == 0, "attention NaN in %s %s D=%lld group=%lld per_q=%d splits=%lld: "
         "%lld cpu/cuda mismatches, %lld outputs against the NaN rule", nan_at_name(at),
         dtype_name(dtype), (long long)dim, (long long)group, int(per_q), (long long)splits,
         (long long)bad, (long long)wrong);
}

// Balanced splits (heuristics.h). Row length - 1 of every K/V head is NaN and only
// the entries beyond a list's count name it (with a NaN log-weight): a block that
// read past its list's count would make that head's output NaN. The lists are
// rewritten with `counts` (each list's entries valid rows < length - 1).
Lists ragged_lists(QKV& t, int64_t list_heads, int64_t max_count,
                   const std::vector<int32_t>& counts, std::mt19937& rng) {
  const QKVParams& q = t.params;
  Lists l = make_lists(q.batch, list_heads, max_count, q.length, rng);
  const float nan = std::nanf("");
  for (int64_t i = 0; i < q.batch * list_heads; ++i) {
    l.counts[i] = counts[size_t(i) % counts.size()];
    for (int64_t j = 0; j < max_count; ++j) {
      const size_t at = size_t(i * max_count + j);
      const bool listed = j < l.counts[i];
      l.indices[at] = listed ? int32_t(rng() % uint64_t(q.length - 1)) : int32_t(q.length - 1);
      l.log_weights[at] = listed ? float(int(rng() % 200) - 100) / 100.f : nan;
    }
  }
  for (int64_t b = 0; b < q.batch; ++b) {
    for (int64_t h = 0; h < q.kv_heads; ++h) {
      const int64_t row = b * q.k_batch_stride + h * q.k_head_stride +
                          (q.length - 1) * q.k_row_stride;
      for (int64_t d = 0; d < q.head_dim; ++d) {
        t.k.set(size_t(row + d), nan);
        t.v.set(size_t(row + d), nan);
      }
    }
  }
  return l;
}

// The launch's expected split count of each list under balanced splits.
std::vector<int64_t> expected_splits(const Lists& l, int64_t max_count, int64_t grid,
                                     int64_t target_blocks) {
  int64_t total = 0;
  for (int32_t c : l.counts) total += std::min<int64_t>(std::max<int32_t>(c, 0), max_count);
  const int64_t rows = balanced_split_rows(total, target_blocks);
  std::vector<int64_t> used;
  for (int32_t c : l.counts) {
    used.push_back(list_splits(std::min<int64_t>(std::max<int32_t>(c, 0), max_count), rows, grid));
  }
  return used;
}

// The CUDA kernel with balanced splits against the CPU kernel with one split
// (the exact per-head result): the merge (combine_cpu) of the CUDA partials within
// the partials' tolerance; the splits past a list's split count hold lse -inf and
// an untouched out row; none reads a row past its list's count.
void test_balanced_case(DType dtype, int64_t dim, int64_t group, bool per_q, int64_t max_count,
                        const std::vector<int32_t>& counts, int64_t workers, int64_t batch,
                        int64_t want_most, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t kv_heads = 2, q_heads = kv_heads * group, length = max_count + 40;
  QKV t = make_qkv(dtype, batch, q_heads, kv_heads, length, dim, 0, 0, rng);
  const int64_t list_heads = per_q ? q_heads : kv_heads;
  Lists l = ragged_lists(t, list_heads, max_count, counts, rng);
  const int64_t heads = batch * q_heads;
  const int64_t grid = choose_split_grid(max_count, workers);
  const int64_t target = kBlocksPerWorker * workers;
  SparseAttentionParams p{};
  p.qkv = t.params;
  p.list = l.params;
  p.num_splits = 1;
  std::vector<float> ro(heads * dim), rl(heads);
  p.partial_out = ro.data();
  p.partial_lse = rl.data();
  sparse_attention_partial_cpu(p, 0, heads);

  p.num_splits = grid;
  p.split_target_blocks = target;
  const int64_t items = heads * grid;
  std::vector<float> go(items * dim, 777.f), gl(items, 777.f);
  p.partial_out = go.data();
  p.partial_lse = gl.data();
  check_cuda(sparse_attention_partial_cuda(p, nullptr), "sparse_attention_partial_cuda");

  const std::vector<int64_t> used = expected_splits(l, max_count, grid, target);
  int64_t surplus_bad = 0, surplus = 0;
  for (int64_t t_head = 0; t_head < heads; ++t_head) {
    const int64_t b = t_head / q_heads, h = t_head % q_heads;
    const int64_t list = l.params.list_of(b, h, q_heads, group);
    for (int64_t s = used[list]; s < grid; ++s) {
      const int64_t item = t_head * grid + s;
      ++surplus;
      surplus_bad += !std::isinf(gl[item]) || gl[item] > 0;
      for (int64_t d = 0; d < dim; ++d) surplus_bad += go[item * dim + d] != 777.f;
    }
  }
  std::vector<float> co(heads * dim), cl(heads);
  CombineParams c =
      combine_layout(go.data(), gl.data(), heads, grid, dim, false, co.data(), cl.data());
  combine_cpu(c, 0, heads);
  int64_t bad = 0;
  for (int64_t i = 0; i < heads; ++i) bad += !close(cl[i], rl[i], 2e-5f, 2e-5f);
  for (int64_t i = 0; i < heads * dim; ++i) bad += !close(co[i], ro[i], 2e-5f, 2e-5f);
  const int64_t most = *std::max_element(used.begin(), used.end());
  // want_most: the most splits a list gets (the long list's), from the rule alone.
  EXPECT(bad == 0 && surplus_bad == 0 && most == want_most,
         "balanced attention %s D=%lld group=%lld per_q=%d max_count=%lld grid=%lld "
         "target=%lld most=%lld: %lld mismatches, %lld wrong entries in %lld surplus splits",
         dtype_name(dtype), (long long)dim, (long long)group, int(per_q), (long long)max_count,
         (long long)grid, (long long)target, (long long)most, (long long)bad,
         (long long)surplus_bad, (long long)surplus);
}

}  // namespace

// The gather's row addressing (kv_gather_cuda.cuh, narrow_row_strides): 32-bit factors
// into one exact 64-bit multiply-add while every stride a row or block index multiplies
// fits in 31 bits in bytes, int64 arithmetic once one does not, whatever the extent.
void test_row_addressing_choice() {
  QKVParams q{};
  q.dtype = DType::kFloat16;
  q.length = int64_t(1) << 24;
  q.k_row_stride = q.v_row_stride = 1024;  // length * row_stride = 2^34 elements: narrow
  q.k_batch_stride = q.v_batch_stride = int64_t(1) << 40;  // contiguous: not multiplied
  const bool big_extent = cuda_detail::narrow_row_strides(q);
  q.k_row_stride = (int64_t(1) << 30) - 1;  // 2^31 - 2 bytes
  const bool edge = cuda_detail::narrow_row_strides(q);
  q.k_row_stride = int64_t(1) << 30;  // 2^31 bytes
  const bool row_wide = !cuda_detail::narrow_row_strides(q);
  q.dtype = DType::kFloat32;
  q.k_row_stride = (int64_t(1) << 29) - 1;
  const bool f32_edge = cuda_detail::narrow_row_strides(q);
  q.k_row_stride = int64_t(1) << 29;
  const bool f32_wide = !cuda_detail::narrow_row_strides(q);
  const int32_t table[1] = {0};
  q.k_row_stride = 64;
  q.paging = KVPaging{table, 1, 16};
  const bool paged_block_wide = !cuda_detail::narrow_row_strides(q);  // block stride 2^40
  q.k_batch_stride = q.v_batch_stride = 16 * 64;
  const bool paged_narrow = cuda_detail::narrow_row_strides(q);
  const cuda_detail::RowStrides st = cuda_detail::narrow_strides(q);
  EXPECT(big_extent && edge && row_wide && f32_edge && f32_wide && paged_block_wide &&
             paged_narrow && st.k_row == 256 && st.v_row == 4096 && st.k_block == 4096,
         "narrow_row_strides: extent %d edge %d row %d f32 %d/%d paged %d/%d strides %d %d %d",
         int(big_extent), int(edge), int(row_wide), int(f32_edge), int(f32_wide),
         int(paged_block_wide), int(paged_narrow), st.k_row, st.v_row, st.k_block);
}

// The 64-bit path run: K/V whose row (contiguous) or block (paged) stride is 2^31
// bytes, in a sparse mapping (only the rows written are backed), against the CPU.
void test_attention_wide_rows(bool paged, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t dim = 64, group = 4, rows = 5, block_size = 2, blocks = 3;
  const int64_t big = int64_t(1) << 29;  // floats: 2^31 bytes
  const int64_t spans = paged ? blocks : rows;
  const size_t bytes = size_t(spans * big + 2 * dim) * sizeof(float);
  void* map = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (map == MAP_FAILED) {
    std::printf("  (skipped: no %zu-byte sparse mapping for the 64-bit gather case)\n", bytes);
    return;
  }
  float* k = static_cast<float*>(map);
  float* v = k + dim;  // V rows beside K's, same strides
  std::vector<int32_t> table = {2, 0, 1};
  const int64_t length = paged ? blocks * block_size : rows;
  auto put_row = [&](int64_t off) {
    for (int64_t d = 0; d < dim; ++d) {
      k[off + d] = grid_value(rng);
      v[off + d] = grid_value(rng);
    }
  };
  if (paged) {
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t s = 0; s < block_size; ++s) put_row(b * big + s * 2 * dim);
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) put_row(r * big);
  }
  std::vector<float> q(size_t(group * dim));
  for (float& x : q) x = grid_value(rng);
  SparseAttentionParams p{};
  QKVParams& a = p.qkv;
  a.q = q.data();
  a.k = k;
  a.v = v;
  a.q_batch_stride = group * dim;
  a.q_head_stride = dim;
  a.k_batch_stride = a.v_batch_stride = paged ? big : spans * big;
  a.k_head_stride = a.v_head_stride = 0;
  a.k_row_stride = a.v_row_stride = paged ? 2 * dim : big;
  if (paged) a.paging = KVPaging{table.data(), blocks, block_size};
  a.batch = 1;
  a.q_heads = group;
  a.kv_heads = 1;
  a.length = length;
  a.head_dim = dim;
  a.dtype = DType::kFloat32;
  a.scale = 1.f / std::sqrt(float(dim));
  Lists l = make_lists(1, 1, 23, length, rng);
  p.list = l.params;
  p.num_splits = 2;
  const int64_t items = group * p.num_splits;
  std::vector<float> ro(items * dim), go(items * dim, 777.f), rl(items), gl(items, 777.f);
  p.partial_out = ro.data();
  p.partial_lse = rl.data();
  sparse_attention_partial_cpu(p, 0, items);
  p.partial_out = go.data();
  p.partial_lse = gl.data();
  check_cuda(sparse_attention_partial_cuda(p, nullptr), "sparse_attention_partial_cuda");
  int64_t bad = 0;
  for (int64_t i = 0; i < items; ++i) bad += !close(gl[i], rl[i], 2e-5f, 2e-5f);
  for (int64_t i = 0; i < items * dim; ++i) bad += !close(go[i], ro[i], 2e-5f, 2e-5f);
  EXPECT(!cuda_detail::narrow_row_strides(a) && bad == 0,
         "attention 64-bit rows paged=%d: narrow %d, %lld mismatches", int(paged),
         int(cuda_detail::narrow_row_strides(a)), (long long)bad);
  munmap(map, bytes);
}

void test_sparse_attention() {
  test_row_addressing_choice();
  test_attention_wide_rows(false, 31000);
  test_attention_wide_rows(true, 31001);
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  // The seeds are those the cases had when they ran in one loop with the pilot's
  // (attention even, pilot odd), so each keeps the data it was checked on.
  uint32_t seed = 1000;
  for (DType d : dtypes) {
    for (int64_t dim : {64, 128, 256}) {
      for (int64_t group : {1, 4, 7}) {
        for (bool per_q : {false, true}) {
          if (g_quick && (dim == 256 || per_q) && group != 4) continue;
          test_attention_case(d, dim, group, per_q, 29, 3, true, 0, 0, seed);
          seed += 2;
        }
      }
    }
  }
  // Splits: automatic-like counts, more splits than entries, weights off.
  test_attention_case(DType::kBFloat16, 128, 4, false, 200, 1, true, 0, 0, seed++);
  test_attention_case(DType::kBFloat16, 128, 4, false, 200, 7, false, 0, 0, seed++);
  test_attention_case(DType::kFloat16, 64, 2, false, 5, 17, true, 0, 0, seed++);
  test_attention_case(DType::kFloat32, 64, 12, false, 90, 2, true, 0, 0, seed++);  // 2 chunks
  // Unaligned rows (odd row stride, odd base offset): element-wise copies.
  test_attention_case(DType::kBFloat16, 128, 4, false, 60, 2, true, 1, 0, seed++);
  test_attention_case(DType::kFloat16, 64, 1, true, 60, 2, true, 0, 3, seed++);
  test_attention_case(DType::kFloat32, 256, 7, false, 40, 3, true, 1, 1, seed++);
  // Longer lists over a longer context (benchmark-like, scaled down).
  test_attention_case(DType::kBFloat16, 128, 4, false, 1300, 9, true, 0, 0, seed++, 4096, 1);

  // Balanced splits (heuristics.h), the counts cycled over the lists: one list far
  // longer than the rest (it gets many splits, the others one or two), counts
  // 0 / 1 / capacity, many lists, every list at capacity, every list empty.
  {
    uint32_t bseed = 20000;
    // 4 lists, grid 15, 128 rows a split: the long list 15 splits, the rest 1.
    // (The long lists' split counts are the rule's, so a change of rule shows.)
    test_balanced_case(DType::kBFloat16, 64, 4, false, 2000, {2000, 30, 0, 1}, 16, 2, 15,
                       bseed++);
    test_balanced_case(DType::kFloat32, 128, 4, true, 2000, {1, 2000, 0, 7, 130, 5, 0, 1, 260, 9},
                       16, 2, 14, bseed++);
    // 32 lists, grid 5: 1..5 splits by count; then few workers (1 split each).
    test_balanced_case(DType::kFloat16, 64, 4, true, 700,
                       {700, 0, 1, 129, 300, 650, 128, 2, 513, 64, 257}, 64, 4, 5, bseed++);
    test_balanced_case(DType::kFloat32, 64, 4, true, 700, {700, 0, 1, 350, 120}, 3, 4, 1,
                       bseed++);
    test_balanced_case(DType::kBFloat16, 128, 8, false, 900, {900}, 8, 2, 4, bseed++);  // uniform
    test_balanced_case(DType::kFloat32, 64, 1, false, 600, {0}, 16, 2, 1, bseed++);     // all empty
  }

  // NaN propagation (emu_check.h); seeds even, interleaved with the pilot's.
  const NanAt places[] = {NanAt::kQuery, NanAt::kKeyRow, NanAt::kValueRow, NanAt::kUnlistedRow};
  seed = 9000;
  for (DType d : dtypes) {
    for (NanAt at : places) {
      for (bool per_q : {false, true}) {
        // One split, several, and more splits than one row group can fill.
        for (int64_t splits : {int64_t(1), int64_t(3), int64_t(11)}) {
          if (g_quick && d != DType::kFloat32 && splits == 11) continue;
          test_attention_nan_case(d, 64, 4, per_q, splits, at, seed);
          seed += 2;
        }
      }
    }
  }
  // Wider rows and groups (8 heads per block).
  test_attention_nan_case(DType::kBFloat16, 128, 8, false, 2, NanAt::kKeyRow, seed);
  seed += 2;
  test_attention_nan_case(DType::kFloat16, 256, 1, false, 4, NanAt::kValueRow, seed);
}

}  // namespace vattention::emu_check
