// The CUDA kernels of sample_cuda.cu compiled as C++ for the CPU emulator.
#include "../vattention/sample_cuda.cu"
