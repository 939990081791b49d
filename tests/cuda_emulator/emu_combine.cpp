// The CUDA kernels of combine_cuda.cu compiled as C++ for the CPU emulator.
#include "../../csrc/vattention/combine_cuda.cu"
