// The paged K/V and key-summary layout (attention_params.h, KVPaging) under the
// emulator: every CUDA kernel that reads K/V rows or the summary, or writes the
// summary, run on a contiguous layout and on the same data scattered into a pool of
// shuffled physical blocks through a random block table, must give the same bits
// (the schedule is the same, only addresses differ). Block sizes 16 and 32, ragged
// lengths ending mid-block, GQA, fp32/fp16/bf16, HND / NHD / vLLM-CPU (K and V in
// one block) pools, padded and unaligned slots. Everything a correct kernel never
// reads (rows past a length, table entries past it, spare blocks) is NaN or garbage
// in the pool, so a wrong address changes the output. Some cases add 2^21 to every
// block id and move the pool's base back by as many blocks: offsets past 2^31
// elements that only 64-bit arithmetic reaches. And KVPaging::offset itself on
// block ids and strides whose products exceed 2^31 (arithmetic, no allocation).
#include "emu_check.h"

#include "../../csrc/vattention/key_summary.h"
#include "../../csrc/vattention/kv_gather_cuda.cuh"
#include "../../csrc/vattention/pilot.h"
#include "../../csrc/vattention/select_scores.h"
#include "../../csrc/vattention/sparse_attention.h"

namespace vattention::emu_check {
namespace {

constexpr int64_t kBigShift = int64_t(1) << 21;  // block ids + 2^21: offsets past 2^31

// A block table [batch, stride] (stride > max_blocks: the extra columns are garbage)
// mapping every (b, j) to a distinct physical block of num_blocks (batch * max_blocks
// plus spares nothing maps to), each id plus `shift`.
struct Table {
  int64_t block_size, max_blocks, num_blocks, stride, shift;
  std::vector<int32_t> ids;

  KVPaging paging() const { return KVPaging{ids.data(), stride, block_size}; }
  int64_t physical(int64_t b, int64_t row) const {
    return ids[size_t(b * stride + row / block_size)] - shift;
  }
};

Table make_table(int64_t batch, int64_t max_blocks, int64_t block_size, int64_t spares,
                 int64_t shift, std::mt19937& rng) {
  Table t{block_size, max_blocks, batch * max_blocks + spares, max_blocks + 3, shift, {}};
  std::vector<int32_t> perm(size_t(t.num_blocks));
  for (size_t i = 0; i < perm.size(); ++i) perm[i] = int32_t(i);
  std::shuffle(perm.begin(), perm.end(), rng);
  t.ids.assign(size_t(batch * t.stride), int32_t(0x7fffffff));  // garbage columns
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < max_blocks; ++j) {
      t.ids[size_t(b * t.stride + j)] = int32_t(perm[size_t(b * max_blocks + j)] + shift);
    }
  }
  return t;
}

// Pools: HND [blocks, heads, slots, row], NHD [blocks, slots, heads, row], and vLLM's
// CPU cache, HND with 2 * block_size slots, K in the first half and V in the second.
enum class Layout { kHND, kNHD, kCpuKV };

const char* layout_name(Layout l) {
  return l == Layout::kHND ? "HND" : l == Layout::kNHD ? "NHD" : "cpu-kv";
}

// Strides (elements) of a pool of rows of `width` elements plus `pad`.
struct Geometry {
  int64_t s0, s1, s2, elems;
};

Geometry geometry(Layout layout, int64_t num_blocks, int64_t heads, int64_t slots, int64_t width,
                  int64_t pad) {
  const int64_t row = width + pad;
  Geometry g{};
  if (layout == Layout::kNHD) {
    g.s1 = row;
    g.s2 = heads * row;
    g.s0 = slots * g.s2 + 2 * pad;
  } else {
    g.s2 = row;
    g.s1 = slots * row + pad;
    g.s0 = heads * g.s1 + pad;
  }
  g.elems = num_blocks * g.s0 + 1;
  return g;
}

// A pool of `elem`-byte elements, every element `fill` at first.
struct Pool {
  std::vector<unsigned char> bytes;
  Geometry g;
  int64_t elem;
};

Pool make_pool(const Geometry& g, int64_t elem, const std::vector<unsigned char>& fill) {
  Pool p{std::vector<unsigned char>(size_t(g.elems * elem)), g, elem};
  for (size_t i = 0; i < p.bytes.size(); ++i) p.bytes[i] = fill[i % fill.size()];
  return p;
}

// What a kernel gets for a pool: its start (plus `first_slot` slots) moved back by
// the table's shift blocks, so that id + shift lands on the physical block.
void* kernel_base(Pool& p, const Table& t, int64_t first_slot) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p.bytes.data()) +
                       uintptr_t(first_slot * p.g.s2 * p.elem);
  return reinterpret_cast<void*>(at - uintptr_t(t.shift) * uintptr_t(p.g.s0 * p.elem));
}

// Copies rows [0, lens[b]) of a contiguous tensor (base, strides s0 / s1 / s2 in
// elements, rows of `width` elements) into the pool, at slot offset first_slot.
void scatter(const unsigned char* base, int64_t s0, int64_t s1, int64_t s2, int64_t width,
             int64_t heads, const std::vector<int64_t>& lens, const Table& t, int64_t first_slot,
             Pool& pool) {
  const int64_t e = pool.elem;
  for (int64_t b = 0; b < int64_t(lens.size()); ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t r = 0; r < lens[size_t(b)]; ++r) {
        const int64_t to = t.physical(b, r) * pool.g.s0 + h * pool.g.s1 +
                           (r % t.block_size + first_slot) * pool.g.s2;
        std::memcpy(&pool.bytes[size_t(to * e)], base + (b * s0 + h * s1 + r * s2) * e,
                    size_t(width * e));
      }
    }
  }
}

std::vector<unsigned char> nan_bytes(DType d) {
  if (d == DType::kFloat32) return {0x00, 0x00, 0xc0, 0x7f};
  if (d == DType::kFloat16) return {0x00, 0x7e};
  return {0xc0, 0x7f};
}

// A paged copy of t's K and V: rows [0, lens[b]) of batch row b; the rest NaN.
struct PagedKV {
  Pool k, v;  // v unused for kCpuKV (both in k)
  QKVParams params;
};

PagedKV make_paged_kv(const QKV& t, const Table& table, Layout layout, int64_t pad,
                      const std::vector<int64_t>& lens) {
  const QKVParams& c = t.params;
  const int64_t e = int64_t(t.k.elem());
  const bool one = layout == Layout::kCpuKV;
  const Geometry g = geometry(layout, table.num_blocks, c.kv_heads,
                              one ? 2 * table.block_size : table.block_size, c.head_dim, pad);
  PagedKV p{make_pool(g, e, nan_bytes(c.dtype)), make_pool(one ? Geometry{0, 0, 0, 0} : g, e,
                                                            nan_bytes(c.dtype)), c};
  Pool& vpool = one ? p.k : p.v;
  const int64_t v_slot = one ? table.block_size : 0;
  scatter(static_cast<const unsigned char*>(c.k), c.k_batch_stride, c.k_head_stride,
          c.k_row_stride, c.head_dim, c.kv_heads, lens, table, 0, p.k);
  scatter(static_cast<const unsigned char*>(c.v), c.v_batch_stride, c.v_head_stride,
          c.v_row_stride, c.head_dim, c.kv_heads, lens, table, v_slot, vpool);
  QKVParams& q = p.params;
  q.k = kernel_base(p.k, table, 0);
  q.v = kernel_base(vpool, table, v_slot);
  q.k_batch_stride = q.v_batch_stride = g.s0;
  q.k_head_stride = q.v_head_stride = g.s1;
  q.k_row_stride = q.v_row_stride = g.s2;
  q.paging = table.paging();
  return p;
}

// emu_check's lists with every valid entry of batch row b moved into [0, lens[b])
// (entry 0 on the last row, the end of a partial block); the bad entries (< 0,
// >= length, beyond the count) stay.
Lists make_ragged_lists(int64_t batch, int64_t list_heads, int64_t max_count, int64_t length,
                        const std::vector<int64_t>& lens, std::mt19937& rng) {
  Lists l = make_lists(batch, list_heads, max_count, length, rng);
  for (int64_t i = 0; i < batch * list_heads; ++i) {
    const int64_t len = lens[size_t(i / list_heads)];
    for (int64_t j = 0; j < l.counts[size_t(i)]; ++j) {
      int32_t& x = l.indices[size_t(i * max_count + j)];
      if (x < 0 || x >= length) continue;
      x = len == 0 ? -1 : (j == 0 ? int32_t(len - 1) : int32_t(x % len));
    }
  }
  return l;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

int64_t count_nan(const std::vector<float>& a) {
  int64_t n = 0;
  for (float x : a) n += std::isnan(x);
  return n;
}

// One K/V case: shapes, ragged lengths, table and pool.
struct KVCase {
  DType dtype;
  int64_t dim, group, block_size;
  Layout layout;
  int64_t pad;     // 0: aligned rows (cp.async); 1: odd slot stride (element-wise copies)
  bool big;        // block ids + 2^21
  uint32_t seed;
};

struct KVData {
  int64_t batch, kv_heads, q_heads, length;
  std::vector<int64_t> lens;
  QKV t;
  Table table;
  PagedKV paged;
};

KVData make_kv_data(const KVCase& c, std::mt19937& rng) {
  KVData d{};
  d.batch = 4;
  d.kv_heads = 2;
  d.q_heads = d.kv_heads * c.group;
  const int64_t max_blocks = 5;
  d.length = max_blocks * c.block_size;
  // Full but for 3 rows, ending 5 rows into its third block, one row, empty.
  d.lens = {d.length - 3, 2 * c.block_size + 5, 1, 0};
  d.t = make_qkv(c.dtype, d.batch, d.q_heads, d.kv_heads, d.length, c.dim, 0, 0, rng);
  d.table = make_table(d.batch, max_blocks, c.block_size, 3, c.big ? kBigShift : 0, rng);
  d.paged = make_paged_kv(d.t, d.table, c.layout, c.pad, d.lens);
  return d;
}

void describe(char* buf, size_t n, const KVCase& c) {
  std::snprintf(buf, n, "%s D=%lld group=%lld bs=%lld %s pad=%lld big=%d", dtype_name(c.dtype),
                (long long)c.dim, (long long)c.group, (long long)c.block_size,
                layout_name(c.layout), (long long)c.pad, int(c.big));
}

void test_sparse_attention_paged(const KVCase& c, bool per_q, int64_t splits) {
  std::mt19937 rng(c.seed);
  KVData d = make_kv_data(c, rng);
  Lists l = make_ragged_lists(d.batch, per_q ? d.q_heads : d.kv_heads, 40, d.length, d.lens, rng);
  SparseAttentionParams p{};
  p.list = l.params;
  p.num_splits = splits;
  const int64_t items = d.batch * d.q_heads * splits;
  std::vector<float> co(size_t(items * c.dim), 777.f), cl(size_t(items), 777.f), po = co, pl = cl;
  p.qkv = d.t.params;
  p.partial_out = co.data();
  p.partial_lse = cl.data();
  check_cuda(sparse_attention_partial_cuda(p, nullptr), "sparse_attention_partial_cuda");
  p.qkv = d.paged.params;
  p.partial_out = po.data();
  p.partial_lse = pl.data();
  check_cuda(sparse_attention_partial_cuda(p, nullptr), "sparse_attention_partial_cuda (paged)");
  int64_t finite = 0;
  for (float x : cl) finite += std::isfinite(x);
  char what[160];
  describe(what, sizeof what, c);
  EXPECT(finite > 0 && count_nan(co) == 0, "paged attention %s: a degenerate contiguous case",
         what);
  EXPECT(same_bits(co, po) && same_bits(cl, pl),
         "paged attention %s per_q=%d splits=%lld: partials differ from the contiguous layout "
         "(%lld NaN)", what, int(per_q), (long long)splits, (long long)count_nan(po));
}

void test_pilot_paged(const KVCase& c, bool per_q, int64_t splits) {
  std::mt19937 rng(c.seed);
  KVData d = make_kv_data(c, rng);
  Lists l = make_ragged_lists(d.batch, per_q ? d.q_heads : d.kv_heads, 30, d.length, d.lens, rng);
  const int64_t heads = d.batch * d.q_heads;
  char what[160];
  describe(what, sizeof what, c);

  PilotParams p{};
  p.list = l.params;
  p.list.log_weights = nullptr;
  std::vector<float> out[2][3];
  for (int paged = 0; paged < 2; ++paged) {
    p.qkv = paged ? d.paged.params : d.t.params;
    out[paged][0].assign(size_t(heads), 777.f);
    out[paged][1].assign(size_t(heads * 3), 777.f);
    out[paged][2].assign(size_t(heads * 2 * c.dim), 777.f);
    p.max_logit = out[paged][0].data();
    p.moments = out[paged][1].data();
    p.vector_moments = out[paged][2].data();
    std::vector<unsigned char> ws(pilot_stats_cuda_workspace_bytes(p, splits));
    check_cuda(pilot_stats_cuda(p, splits, ws.empty() ? nullptr : ws.data(), nullptr),
               "pilot_stats_cuda");
  }
  EXPECT(count_nan(out[0][1]) == 0, "paged pilot %s: NaN in the contiguous case", what);
  EXPECT(same_bits(out[0][0], out[1][0]) && same_bits(out[0][1], out[1][1]) &&
             same_bits(out[0][2], out[1][2]),
         "paged pilot_stats %s per_q=%d splits=%lld: differs from the contiguous layout", what,
         int(per_q), (long long)splits);

  PilotDispersionParams dp{};
  dp.list = p.list;
  std::normal_distribution<float> normal(0.f, 0.3f);
  std::vector<float> center(size_t(heads * c.dim));
  for (float& x : center) x = normal(rng);
  dp.center = center.data();
  std::vector<float> disp[2];
  for (int paged = 0; paged < 2; ++paged) {
    dp.qkv = paged ? d.paged.params : d.t.params;
    disp[paged].assign(size_t(heads * kDispersionOutputs), 777.f);
    dp.dispersion = disp[paged].data();
    std::vector<unsigned char> ws(pilot_dispersion_cuda_workspace_bytes(dp));
    check_cuda(pilot_dispersion_cuda(dp, ws.empty() ? nullptr : ws.data(), nullptr),
               "pilot_dispersion_cuda");
  }
  EXPECT(count_nan(disp[0]) == 0, "paged dispersion %s: NaN in the contiguous case", what);
  EXPECT(same_bits(disp[0], disp[1]),
         "paged pilot_dispersion %s per_q=%d: differs from the contiguous layout", what,
         int(per_q));
}

void test_select_scores_paged(const KVCase& c, bool share, int64_t splits) {
  std::mt19937 rng(c.seed);
  KVData d = make_kv_data(c, rng);
  SelectScoresParams p{};
  p.lengths = d.lens.data();
  p.lengths_int64 = true;
  p.share_gqa = share;
  p.num_splits = splits;
  const size_t total = size_t(d.batch * (share ? d.kv_heads : d.q_heads) * d.length);
  std::vector<float> out[2];
  for (int paged = 0; paged < 2; ++paged) {
    p.qkv = paged ? d.paged.params : d.t.params;
    p.qkv.v = nullptr;
    out[paged].assign(total, 555.f);
    p.scores = out[paged].data();
    std::vector<unsigned char> ws(select_scores_cuda_workspace_bytes(p), 0xff);
    check_cuda(select_scores_cuda(p, ws.empty() ? nullptr : ws.data(), nullptr),
               "select_scores_cuda");
  }
  char what[160];
  describe(what, sizeof what, c);
  EXPECT(count_nan(out[0]) == 0, "paged select_scores %s: NaN in the contiguous case", what);
  EXPECT(same_bits(out[0], out[1]),
         "paged select_scores %s share=%d splits=%lld: differs from the contiguous layout (%lld "
         "NaN)", what, int(share), (long long)splits, (long long)count_nan(out[1]));
}

// ---------------------------------------------------------------------------
// The key summary: codes [.., D / 2] bytes and params [.., D / 32, 2] fp16.
// ---------------------------------------------------------------------------

struct Summary {
  std::vector<unsigned char> codes;
  std::vector<unsigned char> params;  // fp16 bits
  KeySummaryParams s{};
};

// Contiguous [B, Hkv, N, ...] with padded rows, every byte `fill`.
Summary make_contiguous_summary(int64_t batch, int64_t kv_heads, int64_t n, int64_t dim,
                                unsigned char fill) {
  Summary sm;
  const int64_t code_row = dim / 2 + 16, param_row = 2 * (dim / kSummaryGroup) + 8;
  sm.codes.assign(size_t(batch * kv_heads * n * code_row), fill);
  sm.params.assign(size_t(batch * kv_heads * n * param_row * 2), fill);
  sm.s.codes = sm.codes.data();
  sm.s.params = reinterpret_cast<half_t*>(sm.params.data());
  sm.s.codes_row_stride = code_row;
  sm.s.codes_head_stride = n * code_row;
  sm.s.codes_batch_stride = kv_heads * n * code_row;
  sm.s.params_row_stride = param_row;
  sm.s.params_head_stride = n * param_row;
  sm.s.params_batch_stride = kv_heads * n * param_row;
  return sm;
}

struct PagedSummary {
  Pool codes, params;
  KeySummaryParams s{};
};

// A paged summary pool (HND or NHD; pad 0: 16-byte aligned rows, 1: odd strides, so
// that every copy and store takes its element-wise path) holding positions
// [0, lens[b]) of `from` (when given), every other byte `fill`.
PagedSummary make_paged_summary(const Summary* from, const Table& t, int64_t kv_heads,
                                int64_t dim, Layout layout, int64_t pad,
                                const std::vector<int64_t>& lens,
                                const std::vector<unsigned char>& code_fill,
                                const std::vector<unsigned char>& param_fill) {
  const int64_t code_w = dim / 2, param_w = 2 * (dim / kSummaryGroup);
  PagedSummary ps{make_pool(geometry(layout, t.num_blocks, kv_heads, t.block_size, code_w,
                                     pad ? 1 : 16),
                            1, code_fill),
                  make_pool(geometry(layout, t.num_blocks, kv_heads, t.block_size, param_w,
                                     pad ? 1 : 8),
                            2, param_fill),
                  {}};
  if (from != nullptr) {
    const KeySummaryParams& f = from->s;
    scatter(f.codes, f.codes_batch_stride, f.codes_head_stride, f.codes_row_stride, code_w,
            kv_heads, lens, t, 0, ps.codes);
    scatter(reinterpret_cast<const unsigned char*>(f.params), f.params_batch_stride,
            f.params_head_stride, f.params_row_stride, param_w, kv_heads, lens, t, 0, ps.params);
  }
  ps.s.codes = static_cast<uint8_t*>(kernel_base(ps.codes, t, 0));
  ps.s.params = static_cast<half_t*>(kernel_base(ps.params, t, 0));
  ps.s.codes_batch_stride = ps.codes.g.s0;
  ps.s.codes_head_stride = ps.codes.g.s1;
  ps.s.codes_row_stride = ps.codes.g.s2;
  ps.s.params_batch_stride = ps.params.g.s0;
  ps.s.params_head_stride = ps.params.g.s1;
  ps.s.params_row_stride = ps.params.g.s2;
  ps.s.paging = t.paging();
  return ps;
}

// K of the case (its dtype) summarised contiguously into positions [0, N) by the
// emulated kernel: the summary both scoring layouts read.
Summary summarize_contiguous(const KVData& d, int64_t dim) {
  Summary sm = make_contiguous_summary(d.batch, d.kv_heads, d.length, dim, 0);
  SummarizeKeysParams sp{};
  sp.qkv = d.t.params;
  std::vector<int64_t> zeros(size_t(d.batch), 0);
  sp.row_begin = zeros.data();
  sp.rows = d.length;
  sp.summary_length = d.length;
  sp.summary = sm.s;
  check_cuda(summarize_keys_cuda(sp, nullptr), "summarize_keys_cuda");
  return sm;
}

// Scores from a contiguous summary and from its paged copy (rows past each length,
// spare blocks and unmapped slots are 0x5a codes and NaN params).
void test_summary_scores_paged(const KVCase& c, bool share, int64_t splits) {
  std::mt19937 rng(c.seed);
  KVData d = make_kv_data(c, rng);
  const Summary sm = summarize_contiguous(d, c.dim);
  const Layout layout = c.layout == Layout::kNHD ? Layout::kNHD : Layout::kHND;
  PagedSummary ps = make_paged_summary(&sm, d.table, d.kv_heads, c.dim, layout, c.pad, d.lens,
                                       {0x5a}, {0xff});
  SelectScoresParams p{};
  p.qkv = d.t.params;
  p.qkv.k = p.qkv.v = nullptr;
  p.from_summary = true;
  p.lengths = d.lens.data();
  p.lengths_int64 = true;
  p.share_gqa = share;
  p.num_splits = splits;
  const size_t total = size_t(d.batch * (share ? d.kv_heads : d.q_heads) * d.length);
  std::vector<float> out[2];
  for (int paged = 0; paged < 2; ++paged) {
    p.summary = paged ? ps.s : sm.s;
    out[paged].assign(total, 555.f);
    p.scores = out[paged].data();
    std::vector<unsigned char> ws(select_scores_cuda_workspace_bytes(p), 0xff);
    check_cuda(select_scores_cuda(p, ws.empty() ? nullptr : ws.data(), nullptr),
               "select_scores_cuda (summary)");
  }
  char what[160];
  describe(what, sizeof what, c);
  EXPECT(count_nan(out[0]) == 0, "paged summary scores %s: NaN in the contiguous case", what);
  EXPECT(same_bits(out[0], out[1]),
         "paged summary scores %s share=%d splits=%lld: differ from the contiguous layout (%lld "
         "NaN)", what, int(share), (long long)splits, (long long)count_nan(out[1]));
}

// summarize_keys of `rows` new rows at row_begin[b] into a contiguous summary and into
// a paged one (both 0xa5 at first): the pool must equal the contiguous result
// scattered into a 0xa5 pool, spare blocks and unwritten slots included.
void test_summarize_paged(DType dtype, int64_t dim, int64_t block_size, Layout layout,
                          int64_t pad, bool big, int64_t rows, std::vector<int64_t> row_begin,
                          uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t batch = int64_t(row_begin.size()), kv_heads = 2, max_blocks = 4;
  const int64_t n = max_blocks * block_size;
  QKV k = make_qkv(dtype, batch, kv_heads, kv_heads, std::max<int64_t>(rows, 1), dim, pad ? 1 : 8,
                   pad, rng);
  const Table t = make_table(batch, max_blocks, block_size, 2, big ? kBigShift : 0, rng);
  SummarizeKeysParams sp{};
  sp.qkv = k.params;
  sp.row_begin = row_begin.data();
  sp.rows = rows;
  sp.summary_length = n;
  Summary sm = make_contiguous_summary(batch, kv_heads, n, dim, 0xa5);
  sp.summary = sm.s;
  check_cuda(summarize_keys_cuda(sp, nullptr), "summarize_keys_cuda");
  PagedSummary got = make_paged_summary(nullptr, t, kv_heads, dim, layout, pad, {}, {0xa5}, {0xa5});
  sp.summary = got.s;
  check_cuda(summarize_keys_cuda(sp, nullptr), "summarize_keys_cuda (paged)");
  const std::vector<int64_t> all(size_t(batch), n);
  PagedSummary want =
      make_paged_summary(&sm, t, kv_heads, dim, layout, pad, all, {0xa5}, {0xa5});
  int64_t written = 0;
  for (unsigned char x : sm.codes) written += x != 0xa5;
  EXPECT(written > 0 || rows == 0, "paged summarize: the case writes nothing");
  EXPECT(got.codes.bytes == want.codes.bytes && got.params.bytes == want.params.bytes,
         "paged summarize_keys %s D=%lld bs=%lld %s pad=%lld big=%d rows=%lld: the pool differs "
         "from the contiguous summary scattered", dtype_name(dtype), (long long)dim,
         (long long)block_size, layout_name(layout), (long long)pad, int(big), (long long)rows);
}

// KVPaging::offset (and the kernels' 32-bit block / slot split, kv_row_offsets) where
// block id x stride and the sum pass 2^31 and 2^32, against 128-bit arithmetic.
void test_offsets_64bit() {
  const int32_t table[] = {7, 2000000000, 0, 1 << 30, 123456789, 5};
  const int64_t strides[][3] = {
      {int64_t(1) << 31, 1 << 20, 576}, {3000000007LL, 70001, 4096}, {4096, 1, 1 << 16}};
  for (const int64_t block_size : {16, 32, 7}) {
    const KVPaging pg{table, 3, block_size};
    for (const auto& s : strides) {
      for (int64_t b = 0; b < 2; ++b) {
        for (const int64_t row : {int64_t(0), block_size - 1, block_size, 3 * block_size - 1}) {
          const int64_t head = 13;
          const __int128 block = table[b * 3 + row / block_size];
          const __int128 want = block * s[0] + __int128(head) * s[1] +
                                __int128(row % block_size) * s[2];
          const int64_t got = pg.offset(b, head, row, s[0], s[1], s[2]);
          EXPECT(__int128(got) == want, "KVPaging::offset bs=%lld b=%lld row=%lld: %lld",
                 (long long)block_size, (long long)b, (long long)row, (long long)got);
          QKVParams q{};
          q.paging = pg;
          q.k_batch_stride = s[0];
          q.k_head_stride = s[1];
          q.k_row_stride = s[2];
          q.v_batch_stride = s[2];
          q.v_head_stride = s[0];
          q.v_row_stride = s[1];
          const cuda_detail::RowOffsets off = cuda_detail::kv_row_offsets(q, b, head, row);
          EXPECT(off.k == q.k_offset(b, head, row) && off.v == q.v_offset(b, head, row),
                 "kv_row_offsets bs=%lld b=%lld row=%lld: %lld %lld", (long long)block_size,
                 (long long)b, (long long)row, (long long)off.k, (long long)off.v);
        }
      }
    }
  }
  // Contiguous: batch x batch stride alone past 2^32.
  const KVPaging flat{nullptr, 0, 0};
  const int64_t got = flat.offset(3, 5, 100000, int64_t(1) << 31, 3 << 20, 1 << 12);
  EXPECT(got == 3 * (int64_t(1) << 31) + 5 * (int64_t(3) << 20) + 100000 * (int64_t(1) << 12),
         "KVPaging::offset contiguous: %lld", (long long)got);
  // A block size the kernels cannot split in 32 bits is refused, not truncated.
  const int32_t ids[] = {0};
  EXPECT(!cuda_detail::paging_supported(KVPaging{ids, 1, int64_t(1) << 32}, 16) &&
             !cuda_detail::paging_supported(KVPaging{ids, 1, 0}, 16) &&
             !cuda_detail::paging_supported(KVPaging{ids, 1, 16}, int64_t(1) << 31) &&
             cuda_detail::paging_supported(KVPaging{ids, 1, 16}, 1 << 20),
         "paging_supported");
}

}  // namespace

void test_paged() {
  test_offsets_64bit();
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const Layout layouts[] = {Layout::kHND, Layout::kNHD, Layout::kCpuKV};
  uint32_t seed = 15000;
  // Every dtype x block size; layouts, pads, groups and the 2^21 shift rotate.
  int turn = 0;
  for (DType d : dtypes) {
    for (int64_t bs : {16, 32}) {
      const Layout layout = layouts[turn % 3];
      const int64_t pad = (turn % 4 == 3) ? 1 : 0;
      const bool big = turn % 2 == 1;
      const int64_t group = turn % 3 == 0 ? 1 : (turn % 3 == 1 ? 4 : 7);
      const int64_t dim = turn % 2 == 0 ? 64 : 128;
      ++turn;
      const KVCase c{d, dim, group, bs, layout, pad, big, seed++};
      test_sparse_attention_paged(c, false, 3);
      test_pilot_paged(c, false, turn % 2 ? 1 : 3);
      test_select_scores_paged(c, turn % 2 == 0, 0);
      test_summary_scores_paged(c, turn % 2 == 1, 1);
      if (!g_quick) {
        test_sparse_attention_paged(c, true, 1);
        test_pilot_paged(c, true, 2);
        test_select_scores_paged(c, turn % 2 == 1, 2);
        test_summary_scores_paged(c, turn % 2 == 0, 0);
      }
    }
  }
  // Wider rows, per-query lists, more splits, the unaligned (element-wise) paths.
  test_sparse_attention_paged({DType::kBFloat16, 256, 8, 16, Layout::kNHD, 1, true, seed++}, true,
                              2);
  test_sparse_attention_paged({DType::kFloat16, 128, 4, 32, Layout::kCpuKV, 1, false, seed++},
                              false, 5);
  test_pilot_paged({DType::kBFloat16, 128, 4, 16, Layout::kHND, 1, true, seed++}, true, 4);
  test_select_scores_paged({DType::kFloat16, 128, 12, 16, Layout::kNHD, 1, true, seed++}, true, 3);
  test_summary_scores_paged({DType::kBFloat16, 64, 4, 32, Layout::kNHD, 1, true, seed++}, false,
                            2);
  test_summary_scores_paged({DType::kFloat32, 256, 8, 16, Layout::kHND, 0, false, seed++}, true, 0);

  // summarize_keys: prefill, ragged decode updates (one ending past the summary, one
  // starting before it), a single token, both layouts, aligned and not.
  for (DType d : dtypes) {
    test_summarize_paged(d, 64, 16, Layout::kHND, 0, false, 64, {0, 0}, seed++);
    test_summarize_paged(d, 128, 32, Layout::kNHD, 1, true, 5, {0, 37, 125, -2}, seed++);
  }
  test_summarize_paged(DType::kBFloat16, 256, 16, Layout::kNHD, 0, true, 1, {63, 16, 31}, seed++);
  test_summarize_paged(DType::kFloat16, 128, 16, Layout::kHND, 1, false, 20, {3, 44}, seed++);
}

}  // namespace vattention::emu_check
