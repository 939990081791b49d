// The op schemas of torch.ops.vattention, in one place. Backends register in
// ops_cpu.cpp and ops_cuda.cpp; fake (meta) kernels live in python/vattention/ops.py.
#include <Python.h>
#include <torch/library.h>

// Importing vattention._C loads this library and so registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
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
      "sparse_attention(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor? log_weights, "
      "Tensor counts, float scale, int num_splits) -> (Tensor, Tensor)");
  m.def("combine(Tensor partial_out, Tensor partial_lse) -> (Tensor, Tensor)");
  m.def(
      "select_scores(Tensor q, Tensor k, Tensor lengths, float scale, bool share_gqa) -> Tensor");
}
