// The CUDA kernels of select_cuda.cu compiled as C++ for the CPU emulator.
#include "../../csrc/vattention/select_cuda.cu"
