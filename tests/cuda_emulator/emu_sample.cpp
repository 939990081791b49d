// The CUDA kernels of sample_cuda.cu compiled as C++ for the CPU emulator.
#include "../../csrc/vattention/sample_cuda.cu"
