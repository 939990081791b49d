// CPU build / update of the int4 key summary (key_summary.h): one (batch, KV head)
// pair at a time, every row of k that lands inside the summary.
#include <cmath>

#include "dispatch.h"
#include "key_summary.h"

namespace vattention {
namespace {

// One channel group of one token, exactly as key_summary.h writes it. std::fmin/fmax
// would drop a NaN, so NaN is tracked by hand: it must reach the summary's score.
template <typename T>
void summarize_group(const T* x, uint8_t* codes, half_t* params) {
  float lo = to_float(x[0]), hi = lo;
  bool nan = std::isnan(lo);
  for (int d = 1; d < kSummaryGroup; ++d) {
    const float v = to_float(x[d]);
    nan = nan || std::isnan(v);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  if (nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
  const half_t z = to_half_rn(lo);
  const float zf = to_float(z);
  const half_t s = to_half_rn((hi - zf) / float(kSummaryLevels));
  const float sf = to_float(s);
  params[0] = z;
  params[1] = s;
  for (int d = 0; d < kSummaryGroup; d += 2) {
    uint8_t pair = 0;
    for (int j = 0; j < 2; ++j) {
      uint32_t code = 0;
      if (sf != 0.f) {
        const float level = std::nearbyint((to_float(x[d + j]) - zf) / sf);
        // NaN (a NaN group, or inf / inf) gives code 0: z or s already carries it.
        if (level > 0.f) code = level >= float(kSummaryLevels) ? kSummaryLevels : uint32_t(level);
      }
      pair |= uint8_t(code << (4 * j));
    }
    codes[d / 2] = pair;
  }
}

template <typename T>
void summarize_lists(const SummarizeKeysParams& p, int64_t list_begin, int64_t list_end) {
  const QKVParams& qkv = p.qkv;
  const int64_t groups = qkv.head_dim / kSummaryGroup;
  const KeySummaryParams& s = p.summary;
  for (int64_t list = list_begin; list < list_end; ++list) {
    const int64_t b = list / qkv.kv_heads, h = list - b * qkv.kv_heads;
    const int64_t begin = p.row_begin[b];
    for (int64_t r = 0; r < p.rows; ++r) {
      const int64_t pos = begin + r;
      if (pos < 0 || pos >= p.summary_length) continue;
      // k holds only the new rows (never paged); the summary's position may be.
      const T* x = static_cast<const T*>(qkv.k) + qkv.k_offset(b, h, r);
      uint8_t* codes = s.codes + s.paging.offset(b, h, pos, s.codes_batch_stride,
                                                 s.codes_head_stride, s.codes_row_stride);
      half_t* params = s.params + s.paging.offset(b, h, pos, s.params_batch_stride,
                                                  s.params_head_stride, s.params_row_stride);
      for (int64_t g = 0; g < groups; ++g) {
        summarize_group(x + g * kSummaryGroup, codes + g * (kSummaryGroup / 2), params + 2 * g);
      }
    }
  }
}

}  // namespace

void summarize_keys_cpu(const SummarizeKeysParams& p, int64_t list_begin, int64_t list_end) {
  dispatch_dtype(p.qkv.dtype, [&](auto tag) {
    summarize_lists<decltype(tag)>(p, list_begin, list_end);
  });
}

}  // namespace vattention
