// Emulator stand-in for the CUDA runtime header (see ../emu_runtime.h).
#pragma once
#include "../emu_runtime.h"
