// The CUDA kernels of sparse_attention_cuda.cu compiled as C++ for the CPU emulator.
#include "../vattention/sparse_attention_cuda.cu"
