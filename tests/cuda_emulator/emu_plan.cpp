// The CUDA kernel of plan_cuda.cu compiled as C++ for the CPU emulator.
#include "../../csrc/vattention/plan_cuda.cu"
