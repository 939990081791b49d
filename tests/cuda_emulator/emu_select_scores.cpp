// The CUDA kernels of select_scores_cuda.cu compiled as C++ for the CPU emulator.
#include "../../csrc/vattention/select_scores_cuda.cu"
