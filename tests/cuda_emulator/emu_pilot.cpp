// The CUDA kernels of pilot_cuda.cu compiled as C++ for the CPU emulator.
#include "../../csrc/vattention/pilot_cuda.cu"
