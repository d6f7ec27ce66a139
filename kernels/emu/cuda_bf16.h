// Stands in for CUDA's <cuda_bf16.h> when a kernel is compiled as C++ for the CPU: the
// shim defines the bf16 type and its conversions.
#pragma once

#include "cuda_emu.h"
