// The op schemas of torch.ops.vattention, in one place. Backends register in
// ops_cpu.cpp and ops_cuda.cpp; fake (meta) kernels live in python/vattention/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "../vattention/dispatch.h"

// Importing vattention._C loads this library and so registers the ops. The
// module also exposes `cuda_head_dims`, the tuple of head dims the CUDA kernels
// are built for (kCudaHeadDims), so python checks against the same list.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
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
  m.def(
      "sample_residual(Tensor heavy, Tensor starts, Tensor ends, Tensor num_samples, "
      "Tensor rng, int max_out, int draw_set) -> (Tensor, Tensor, Tensor)");
  m.def(
      "pilot_stats(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor counts, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "pilot_dispersion(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor counts, "
      "float scale, Tensor center) -> Tensor");
  m.def(
      "sparse_attention(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor? log_weights, "
      "Tensor counts, float scale, int num_splits) -> (Tensor, Tensor)");
  m.def("combine(Tensor partial_out, Tensor partial_lse) -> (Tensor, Tensor)");
  m.def(
      "select_scores(Tensor q, Tensor k, Tensor lengths, float scale, bool share_gqa) -> Tensor");
  // The key summary (key_summary.h): written in place, so that decode updates the
  // rows it appends without reallocating the cache-side summary.
  m.def(
      "summarize_keys(Tensor k, Tensor(a!) codes, Tensor(b!) params, Tensor row_begin) -> ()");
  m.def(
      "select_scores_summary(Tensor q, Tensor codes, Tensor params, Tensor lengths, float scale, "
      "bool share_gqa) -> Tensor");
}
