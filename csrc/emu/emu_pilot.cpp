// The CUDA kernels of pilot_cuda.cu compiled as C++ for the CPU emulator.
#include "../vattention/pilot_cuda.cu"
