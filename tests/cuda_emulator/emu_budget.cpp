// The CUDA kernel of budget_cuda.cu compiled as C++ for the CPU emulator.
#include "../../csrc/vattention/budget_cuda.cu"
