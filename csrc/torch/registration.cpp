// The op schemas of torch.ops.vattention, in one place. Backends register in
// ops_cpu.cpp and ops_cuda.cpp; fake (meta) kernels live in python/vattention/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "../vattention/dispatch.h"
#include "../vattention/heuristics.h"
#include "../vattention/plan.h"

namespace {

// _C.split_count(work_rows, max_count, workers, balanced): the split count an automatic
// (num_splits = 0) sparse_attention launch uses, heuristics.h's rule itself, so that the
// fake kernel of sparse_attention_partials gives the real op's S: choose_split_grid on
// CUDA (balanced), choose_num_splits on the CPU.
PyObject* split_count(PyObject*, PyObject* args) {
  long long work_rows = 0, max_count = 0, workers = 0;
  int balanced = 0;
  if (!PyArg_ParseTuple(args, "LLLp", &work_rows, &max_count, &workers, &balanced)) {
    return nullptr;
  }
  return PyLong_FromLongLong(
      balanced ? vattention::choose_split_grid(max_count, workers)
               : vattention::choose_num_splits(work_rows, max_count, workers));
}

// _C.plan_dense_max(length, dense_below, sink_max, local_max): plan.h's extra det_idx
// columns of the dense rows, for plan_lists' fake kernel.
PyObject* plan_dense_max(PyObject*, PyObject* args) {
  long long length = 0, dense_below = 0, sink_max = 0, local_max = 0;
  if (!PyArg_ParseTuple(args, "LLLL", &length, &dense_below, &sink_max, &local_max)) {
    return nullptr;
  }
  return PyLong_FromLongLong(vattention::plan_dense_max(length, dense_below, sink_max, local_max));
}

PyMethodDef kMethods[] = {
    {"split_count", split_count, METH_VARARGS,
     "split_count(work_rows, max_count, workers, balanced) -> int: heuristics.h's split rule"},
    {"plan_dense_max", plan_dense_max, METH_VARARGS,
     "plan_dense_max(length, dense_below, sink_max, local_max) -> int: plan.h's dense columns"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing vattention._C loads this library and so registers the ops. The
// module also exposes `cuda_head_dims`, the tuple of head dims the CUDA kernels
// are built for (kCudaHeadDims), so python checks against the same list, and
// `split_count` and `plan_dense_max` (above): the host rules fake kernels
// need, from the C++ headers rather than a Python copy.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, kMethods};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyObject* dims = PyTuple_New(vattention::kNumCudaHeadDims);
  if (dims == nullptr) {
    Py_DECREF(m);
    return nullptr;
  }
  for (int i = 0; i < vattention::kNumCudaHeadDims; ++i) {
    PyObject* d = PyLong_FromLong(vattention::kCudaHeadDims[i]);
    if (d == nullptr) {
      Py_DECREF(dims);
      Py_DECREF(m);
      return nullptr;
    }
    PyTuple_SET_ITEM(dims, i, d);  // steals d
  }
  if (PyModule_AddObject(m, "cuda_head_dims", dims) < 0) {  // steals dims on success only
    Py_DECREF(dims);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

TORCH_LIBRARY(vattention, m) {
  m.def("select_topk(Tensor scores, Tensor starts, Tensor ends, Tensor ks, int k_max) -> Tensor");
  m.def("select_topk_into(Tensor scores, Tensor starts, Tensor ends, Tensor ks, Tensor(a!) out) -> ()");
  m.def(
      "sample_residual(Tensor heavy, Tensor starts, Tensor ends, Tensor num_samples, "
      "Tensor rng, int max_out, int draw_set) -> (Tensor, Tensor, Tensor)");
  m.def(
      "pilot_stats(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor counts, float scale, "
      "Tensor? block_table=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "pilot_dispersion(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor counts, "
      "float scale, Tensor center, Tensor? block_table=None) -> Tensor");
  m.def(
      "sparse_attention(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor? log_weights, "
      "Tensor counts, float scale, int num_splits, Tensor? block_table=None) -> (Tensor, Tensor)");
  // sparse_attention's split partials, unmerged: (partial_out f32 [B, Hq, S, D],
  // partial_lse f32 [B, Hq, S]), S from sparse_attention's split rule; a partial of lse
  // -inf has unspecified out.
  m.def(
      "sparse_attention_partials(Tensor q, Tensor k, Tensor v, Tensor indices, "
      "Tensor? log_weights, Tensor counts, float scale, int num_splits, "
      "Tensor? block_table=None) -> (Tensor, Tensor)");
  m.def("combine(Tensor partial_out, Tensor partial_lse) -> (Tensor, Tensor)");
  m.def(
      "select_scores(Tensor q, Tensor k, Tensor lengths, float scale, bool share_gqa, "
      "Tensor? block_table=None) -> Tensor");
  // The key summary (key_summary.h): written in place, so that decode updates the
  // rows it appends without reallocating the cache-side summary.
  m.def(
      "summarize_keys(Tensor k, Tensor(a!) codes, Tensor(b!) params, Tensor row_begin, "
      "Tensor? block_table=None) -> ()");
  m.def(
      "select_scores_summary(Tensor q, Tensor codes, Tensor params, Tensor lengths, float scale, "
      "bool share_gqa, Tensor? block_table=None) -> Tensor");
}

// Stage "budget" (budget.h): every list's sample budget from the deterministic part and
// the pilot statistics, in one op. Returns (final_wanted int32 [lists], reused int32
// [lists], exact bool [lists], required float64 [B, Hq], n_residual_heads int64 [B, Hq]);
// residual_center gives the chi-square tail its center O^ before the dispersion.
TORCH_LIBRARY_FRAGMENT(vattention, m) {
  m.def(
      "plan_budget(Tensor det_out, Tensor det_lse, Tensor pilot_max_logit, Tensor moments, "
      "Tensor vector_moments, Tensor pilot_counts, Tensor n_residual, Tensor? dispersion, "
      "Tensor? chi2_table, str rule, float epsilon, float z, float tail_dim_shrink, "
      "int min_samples, bool reuse_pilot) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // O^ float32 [B, Hq, D], the center of pilot_dispersion for the chi-square tail.
  m.def(
      "residual_center(Tensor det_out, Tensor det_lse, Tensor pilot_max_logit, Tensor moments, "
      "Tensor vector_moments, Tensor pilot_counts, Tensor n_residual) -> Tensor");
}

// Stage "plan" (plan.h): every per-row and per-list size decode's fixed path derives from
// the lengths, and the fixed part of the deterministic index list, in one op. Returns
// (lengths, sink, local, window_end, heavy: int64 [B]; starts_rows, ends_rows, heavy_rows,
// pilot_wanted: int32 [B * list_heads]; n_residual int64 [B * list_heads]; det_idx int32
// [B, list_heads, sink_max + local_max + heavy_max]; det_counts int32 [B, list_heads]).
// Stage "combine" (combine.h): merge_estimate merges the estimate's partials (the
// deterministic part, an optional extra exact part, the reused pilot from its statistics
// and the sample) and casts: (out [B, Hq, D] in out_dtype, lse float32 [B, Hq]).
TORCH_LIBRARY_FRAGMENT(vattention, m) {
  m.def(
      "plan_lists(Tensor q, Tensor? lengths, int length, int list_heads, float[] sizes, "
      "bool[] fractions, int sink_max, int local_max, int heavy_max, int dense_below=0) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
  m.def(
      "merge_estimate(Tensor det_out, Tensor det_lse, Tensor? extra_out, Tensor? extra_lse, "
      "Tensor sample_out, Tensor sample_lse, Tensor sample_counts, Tensor? reused, "
      "Tensor pilot_max_logit, Tensor moments, Tensor vector_moments, Tensor n_residual_heads, "
      "ScalarType out_dtype) -> (Tensor, Tensor)");
}
