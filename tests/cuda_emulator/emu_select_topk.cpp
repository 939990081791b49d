// The CUDA kernels of select_topk_cuda.cu compiled as C++ for the CPU emulator.
#include "../../csrc/vattention/select_topk_cuda.cu"
