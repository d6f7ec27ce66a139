// What the streaming kernels use beyond kernels/emu/cuda_emu.h: CUDA's explicitly rounded
// float intrinsics, and the device's unqualified isfinite. Compiled for x86-64 without FMA, each C++ operation below is one IEEE
// operation rounded to nearest even, which is what the intrinsics promise.
#pragma once

#include "cuda_emu.h"

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
using std::isfinite;
