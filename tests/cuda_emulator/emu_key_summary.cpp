// The CUDA kernel of key_summary_cuda.cu compiled as C++ for the CPU emulator.
#include "../../csrc/vattention/key_summary_cuda.cu"
