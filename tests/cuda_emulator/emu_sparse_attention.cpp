// The CUDA kernels of sparse_attention_cuda.cu compiled as C++ for the CPU emulator.
#include "../../csrc/vattention/sparse_attention_cuda.cu"
