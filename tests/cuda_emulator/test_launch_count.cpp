// The CUDA kernels one default decode step launches, measured: every kernel goes
// through cuda_utils.cuh's launch_kernel, which counts launches in the emulator build
// (g_emulated_launches). The step is decode.py's fixed path at its default config
// (int4 selector, share_gqa with gqa_heavy "max", sink = local = 128, heavy = 0.05,
// base_rate = 128 with reuse_pilot, ratio rule, normal tail, automatic splits), op by
// op, each op calling the CUDA entry points its binding in csrc/torch/ops_cuda.cpp
// calls, with the split counts that binding chooses, at the serving shape B = 1,
// 32 query / 8 KV heads, D = 128, bf16, N = 8192 and 32768 (the static capacities
// that size every grid). The rows hold only `kValid` valid tokens so that the
// emulator runs the step in seconds: a kernel's launch count depends on the
// capacities and the device, never on the lengths (blocks past a list's count exit).
// Prints the per-op table and fails when any op's count differs from the one
// expected below: a new launch must be accounted for here.
#include "emu_check.h"

#include "../../csrc/vattention/combine.h"
#include "../../csrc/vattention/cuda_utils.cuh"
#include "../../csrc/vattention/heuristics.h"
#include "../../csrc/vattention/key_summary.h"
#include "../../csrc/vattention/pilot.h"
#include "../../csrc/vattention/plan.h"
#include "../../csrc/vattention/budget.h"
#include "../../csrc/vattention/sample.h"
#include "../../csrc/vattention/select_scores.h"
#include "../../csrc/vattention/select_topk.h"
#include "../../csrc/vattention/sparse_attention.h"
#include "emu_runtime.h"

#include <memory>

namespace vattention::emu_check {
namespace {

constexpr int64_t kBatch = 1, kQHeads = 32, kKVHeads = 8, kDim = 128;
constexpr int64_t kValid = 1500;  // valid tokens per row (the capacity is N)

int64_t launches() { return cuda_detail::g_emulated_launches.load(); }

struct OpCount {
  const char* op;       // the torch op decode dispatches
  const char* entries;  // the CUDA entry points its binding calls
  int64_t kernels;
};

// config.FRACTION_SLACK: fractions are slackened once on the host (config._slackened).
constexpr double kFractionSlack = 1.0 / double(int64_t(1) << 40);

// config.resolve_size of a fraction.
int64_t resolve_fraction(double fraction, int64_t n) {
  const double slackened = fraction * (1.0 - kFractionSlack);
  return std::min<int64_t>(std::max<int64_t>(int64_t(std::ceil(slackened * double(n))), 0), n);
}

std::vector<OpCount> default_step(int64_t n) {
  std::mt19937 rng(8000 + uint32_t(n));
  const int64_t sms = emu::device_props().num_sms;
  const int64_t lists = kBatch * kKVHeads, heads = kBatch * kQHeads, group = kQHeads / kKVHeads;
  const int64_t sink_max = 128, local_max = 128, fixed = sink_max + local_max;
  const double heavy_fraction = 0.05 * (1.0 - kFractionSlack);
  const int64_t heavy_max = resolve_fraction(0.05, n), pilot_max = 128, sample_max = n;
  std::vector<OpCount> table;
  auto run = [&](const char* op, const char* entries, auto&& body) {
    const int64_t before = launches();
    body();
    table.push_back({op, entries, launches() - before});
  };

  QKV t = make_qkv(DType::kBFloat16, kBatch, kQHeads, kKVHeads, n, kDim, 0, 0, rng);
  QKVParams qkv = t.params;
  // The int4 summary beside K (built once per cache, not per step).
  std::vector<uint8_t> codes(static_cast<size_t>(kBatch * kKVHeads * n * kDim / 2));
  for (auto& c : codes) c = uint8_t(rng());
  std::vector<uint16_t> zs(static_cast<size_t>(kBatch * kKVHeads * n * (kDim / kSummaryGroup) * 2));
  for (size_t i = 0; i < zs.size(); ++i) zs[i] = to_half_bits(i % 2 ? 1.f / 64 : -0.25f);
  const std::vector<int64_t> seq_lens(static_cast<size_t>(kBatch), kValid);
  const std::vector<int64_t> rng_state = {1234, 0};

  // plan_lists.
  std::vector<int64_t> lengths(kBatch), sink(kBatch), local(kBatch), window_end(kBatch),
      heavy(kBatch), n_residual(lists);
  std::vector<int32_t> starts(lists), ends(lists), heavy_rows(lists), pilot_wanted(lists),
      det_counts(lists);
  PlanListsParams plan{};
  plan.lengths64 = seq_lens.data();
  plan.length = n;
  plan.batch = kBatch;
  plan.list_heads = kKVHeads;
  const double sizes[kPlanSizes] = {128, 128, heavy_fraction, 128};
  for (int i = 0; i < kPlanSizes; ++i) {
    plan.sizes[i] = sizes[i];
    plan.fractions[i] = i == kPlanHeavy;
  }
  plan.sink_max = sink_max;
  plan.local_max = local_max;
  plan.heavy_max = heavy_max;
  std::vector<int32_t> det_idx(static_cast<size_t>(lists * plan.width()));
  const int64_t width = plan.width();
  plan.lengths_out = lengths.data();
  plan.sink = sink.data();
  plan.local = local.data();
  plan.window_end = window_end.data();
  plan.heavy = heavy.data();
  plan.starts_rows = starts.data();
  plan.ends_rows = ends.data();
  plan.heavy_rows = heavy_rows.data();
  plan.pilot_wanted = pilot_wanted.data();
  plan.n_residual = n_residual.data();
  plan.det_counts = det_counts.data();
  plan.det_idx = det_idx.data();
  run("plan_lists", "plan_lists_cuda", [&] { check_cuda(plan_lists_cuda(plan, nullptr), "plan"); });

  // select_scores_summary (share_gqa): run_select_scores.
  std::vector<float> scores(static_cast<size_t>(lists * n));
  SelectScoresParams sp{};
  sp.qkv = qkv;
  sp.qkv.k = nullptr;
  sp.qkv.v = nullptr;
  sp.from_summary = true;
  sp.summary.codes = codes.data();
  sp.summary.params = reinterpret_cast<half_t*>(zs.data());
  sp.summary.codes_batch_stride = kKVHeads * n * kDim / 2;
  sp.summary.codes_head_stride = n * kDim / 2;
  sp.summary.codes_row_stride = kDim / 2;
  sp.summary.params_batch_stride = kKVHeads * n * (kDim / kSummaryGroup) * 2;
  sp.summary.params_head_stride = n * (kDim / kSummaryGroup) * 2;
  sp.summary.params_row_stride = (kDim / kSummaryGroup) * 2;
  sp.lengths = lengths.data();
  sp.lengths_int64 = true;
  sp.share_gqa = true;
  sp.scores = scores.data();
  run("select_scores_summary", "select_scores_cuda", [&] {
    std::vector<unsigned char> ws(select_scores_cuda_workspace_bytes(sp));
    check_cuda(select_scores_cuda(sp, ws.empty() ? nullptr : ws.data(), nullptr), "scores");
  });

  // select_topk_into: the heavy columns of det_idx.
  SelectTopkParams tp{};
  tp.scores = scores.data();
  tp.score_row_stride = n;
  tp.starts = starts.data();
  tp.ends = ends.data();
  tp.ks = heavy_rows.data();
  tp.indices = det_idx.data() + fixed;
  tp.index_row_stride = width;
  tp.rows = lists;
  tp.length = n;
  tp.k_max = heavy_max;
  tp.dtype = DType::kFloat32;
  run("select_topk_into", "select_topk_cuda", [&] {
    std::vector<unsigned char> ws(select_topk_cuda_workspace_bytes(tp));
    check_cuda(select_topk_cuda(tp, ws.empty() ? nullptr : ws.data(), nullptr), "topk");
  });

  // sparse_attention: sparse_attention_split_partials + launch_combine.
  auto split_partials = [&](const int32_t* idx, const float* log_w, const int32_t* counts,
                            int64_t max_count, std::vector<float>* po, std::vector<float>* pl) {
    SparseAttentionParams a{};
    a.qkv = qkv;
    a.list.indices = idx;
    a.list.log_weights = log_w;
    a.list.counts = counts;
    a.list.list_heads = kKVHeads;
    a.list.max_count = max_count;
    a.num_splits = choose_split_grid(max_count, sms);
    a.split_target_blocks = kBlocksPerWorker * sms;
    po->assign(static_cast<size_t>(heads * a.num_splits * kDim), 0.f);
    pl->assign(static_cast<size_t>(heads * a.num_splits), 0.f);
    a.partial_out = po->data();
    a.partial_lse = pl->data();
    check_cuda(sparse_attention_partial_cuda(a, nullptr), "sparse_attention_partial");
    return a.num_splits;
  };
  std::vector<float> det_po, det_pl, det_out(static_cast<size_t>(heads * kDim)), det_lse(static_cast<size_t>(heads));
  run("sparse_attention (deterministic)", "sparse_attention_partial_cuda + combine_cuda", [&] {
    const int64_t splits = split_partials(det_idx.data(), nullptr, det_counts.data(), width,
                                          &det_po, &det_pl);
    const CombineParams c = combine_layout(det_po.data(), det_pl.data(), heads, splits, kDim,
                                           false, det_out.data(), det_lse.data());
    check_cuda(combine_cuda(c, nullptr), "combine");
  });

  // sample_residual (pilot draws, then the final sample): the heavy columns in place.
  auto sample = [&](const int32_t* wanted, int64_t max_out, uint32_t draw_set,
                    std::vector<int32_t>* idx, std::vector<float>* log_w,
                    std::vector<int32_t>* counts) {
    idx->assign(static_cast<size_t>(lists * max_out), -1);
    log_w->assign(static_cast<size_t>(lists * max_out), 0.f);
    counts->assign(static_cast<size_t>(lists), 0);
    SampleParams s{};
    s.heavy = det_idx.data() + fixed;
    s.heavy_stride = width;
    s.heavy_width = heavy_max;
    s.starts = starts.data();
    s.ends = ends.data();
    s.num_samples = wanted;
    s.rng = rng_state.data();
    s.indices = idx->data();
    s.log_weights = log_w->data();
    s.counts = counts->data();
    s.rows = lists;
    s.max_out = max_out;
    s.draw_set = draw_set;
    check_cuda(sample_residual_cuda(s, nullptr), "sample_residual");
  };
  std::vector<int32_t> pilot_idx, pilot_counts, sample_idx, sample_counts;
  std::vector<float> pilot_w, sample_w;
  run("sample_residual (pilot)", "sample_residual_cuda", [&] {
    sample(pilot_wanted.data(), pilot_max, kPilotDraws, &pilot_idx, &pilot_w, &pilot_counts);
  });

  // pilot_stats.
  std::vector<float> max_logit(static_cast<size_t>(heads)), moments(static_cast<size_t>(heads * kPilotMoments)),
      vector_moments(static_cast<size_t>(heads * 2 * kDim));
  run("pilot_stats", "pilot_stats_cuda", [&] {
    PilotParams pp{};
    pp.qkv = qkv;
    pp.list.indices = pilot_idx.data();
    pp.list.counts = pilot_counts.data();
    pp.list.list_heads = kKVHeads;
    pp.list.max_count = pilot_max;
    pp.max_logit = max_logit.data();
    pp.moments = moments.data();
    pp.vector_moments = vector_moments.data();
    const int64_t splits = pilot_split_grid(pp.list.max_count, sms);
    pp.split_target_blocks = kBlocksPerWorker * sms;
    std::vector<float> ws(pilot_stats_cuda_workspace_bytes(pp, splits) / sizeof(float) + 1);
    check_cuda(pilot_stats_cuda(pp, splits, ws.data(), nullptr), "pilot_stats");
  });

  // plan_budget (ratio rule, normal tail, delta = 0.05).
  std::vector<double> required(static_cast<size_t>(heads));
  std::vector<int64_t> n_residual_heads(static_cast<size_t>(heads));
  std::vector<int32_t> final_wanted(static_cast<size_t>(lists)), reused(static_cast<size_t>(lists));
  std::unique_ptr<bool[]> exact(new bool[size_t(lists)]);
  run("plan_budget", "plan_budget_cuda", [&] {
    BudgetParams b{};
    b.det_out = det_out.data();
    b.det_lse = det_lse.data();
    b.pilot_max_logit = max_logit.data();
    b.moments = moments.data();
    b.vector_moments = vector_moments.data();
    b.pilot_counts = pilot_counts.data();
    b.n_residual = n_residual.data();
    b.lists = lists;
    b.group = group;
    b.head_dim = kDim;
    b.rule = BudgetRule::kRatio;
    b.epsilon = 0.05;
    b.z = 1.959963984540054;
    b.tail_dim_shrink = 0.25;  // budget.TAIL_DIM_SHRINK (the normal tail ignores it)
    b.min_samples = 32;
    b.reuse_pilot = true;
    b.required = required.data();
    b.n_residual_heads = n_residual_heads.data();
    b.final_wanted = final_wanted.data();
    b.reused = reused.data();
    b.exact = exact.get();
    check_cuda(plan_budget_cuda(b, nullptr), "plan_budget");
  });

  run("sample_residual (final)", "sample_residual_cuda", [&] {
    sample(final_wanted.data(), sample_max, kFinalDraws, &sample_idx, &sample_w, &sample_counts);
  });

  std::vector<float> s_po, s_pl;
  int64_t sample_splits = 0;
  run("sparse_attention_partials (sample)", "sparse_attention_partial_cuda", [&] {
    sample_splits = split_partials(sample_idx.data(), sample_w.data(), sample_counts.data(),
                                   sample_max, &s_po, &s_pl);
  });

  std::vector<uint16_t> out(static_cast<size_t>(heads * kDim));
  std::vector<float> out_lse(static_cast<size_t>(heads));
  run("merge_estimate", "merge_estimate_cuda", [&] {
    MergeEstimateParams m{};
    m.det_out = det_out.data();
    m.det_lse = det_lse.data();
    m.sample_out = s_po.data();
    m.sample_lse = s_pl.data();
    m.sample_splits = sample_splits;
    m.pilot_max_logit = max_logit.data();
    m.moments = moments.data();
    m.vector_moments = vector_moments.data();
    m.stats_double = false;
    m.n_residual_heads = n_residual_heads.data();
    m.sample_counts = sample_counts.data();
    m.reused = reused.data();
    m.lists = lists;
    m.group = group;
    m.head_dim = kDim;
    m.out_dtype = DType::kBFloat16;
    m.out = out.data();
    m.lse = out_lse.data();
    check_cuda(merge_estimate_cuda(m, nullptr), "merge_estimate");
  });

  // The step ran for real (a kernel that returned early would leave what the count
  // alone would not notice): each list got its heavy hitters and its pilot, and every
  // head a finite lse.
  int64_t bad = 0;
  for (int64_t l = 0; l < lists; ++l) {
    const int32_t* h = det_idx.data() + l * width + fixed;
    bad += heavy_rows[l] <= 0 || h[0] < 0 || h[heavy_rows[l] - 1] < 0;
    bad += pilot_counts[l] != pilot_wanted[l] || pilot_wanted[l] != int32_t(pilot_max);
  }
  for (float x : out_lse) bad += !std::isfinite(x);
  EXPECT(bad == 0, "launch count N=%lld: %lld lists or heads not processed", (long long)n,
         (long long)bad);
  return table;
}

}  // namespace

void test_launch_count() {
  // Kernels per op of the default step as the code stands; a change that adds or
  // removes a launch must update this table (and benchmarks/launch_count.py's note).
  const std::vector<std::pair<const char*, int64_t>> expected = {
      {"plan_lists", 1},
      {"select_scores_summary", 2},
      {"select_topk_into", 1},
      {"sparse_attention (deterministic)", 2},
      {"sample_residual (pilot)", 1},
      {"pilot_stats", 1},
      {"plan_budget", 1},
      {"sample_residual (final)", 1},
      {"sparse_attention_partials (sample)", 1},
      {"merge_estimate", 1},
  };
  int64_t expected_total = 0;
  for (const auto& e : expected) expected_total += e.second;
  for (int64_t n : {int64_t(8192), int64_t(32768)}) {
    const std::vector<OpCount> table = default_step(n);
    int64_t total = 0;
    std::printf("CUDA kernels per default decode step (emulator-measured), B=%lld Hq=%lld "
                "Hkv=%lld D=%lld N=%lld bf16:\n", (long long)kBatch, (long long)kQHeads,
                (long long)kKVHeads, (long long)kDim, (long long)n);
    for (size_t i = 0; i < table.size(); ++i) {
      const OpCount& c = table[i];
      std::printf("  %-36s %2lld  (%s)\n", c.op, (long long)c.kernels, c.entries);
      total += c.kernels;
      const bool known = i < expected.size() && std::string(expected[i].first) == c.op;
      EXPECT(known && expected[i].second == c.kernels,
             "launch count N=%lld: %s launched %lld kernels, expected %lld", (long long)n, c.op,
             (long long)c.kernels, known ? (long long)expected[i].second : -1LL);
    }
    std::printf("  %-36s %2lld\n", "total", (long long)total);
    EXPECT(table.size() == expected.size() && total == expected_total,
           "launch count N=%lld: %lld kernels in %zu ops, expected %lld in %zu", (long long)n,
           (long long)total, table.size(), (long long)expected_total, expected.size());
  }
}

}  // namespace vattention::emu_check
