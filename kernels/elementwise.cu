// Bias adds, residual adds and casts that cuBLAS cannot fuse for us. All grid-stride.
#include "common.cuh"

#define GRID_STRIDE(i, n)                                                               \
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n);         \
       i += (long long)gridDim.x * blockDim.x)

// forward: y [N, C] T (in place) += bias [C] f32. The qkv GEMM's bias; its backward is the
// column sum of the output gradient.
template <typename T>
__device__ void add_bias(T* y, const float* bias, long long n, int cols) {
  GRID_STRIDE(i, n) { y[i] = from_float<T>(to_float(y[i]) + bias[i % cols]); }
}

#define EXPORT_ADD_BIAS(T, SUFFIX)                                                          \
  extern "C" __global__ void add_bias_##SUFFIX(T* y, const float* bias, long long n,        \
                                               int cols) {                                  \
    add_bias<T>(y, bias, n, cols);                                                          \
  }
EXPORT_ADD_BIAS(float, f32)
EXPORT_ADD_BIAS(bf16, bf16)

// forward: x_in [N, D] f32, y [N, D] T (a branch's GEMM output), bias [D] f32
//   -> x_out [N, D] f32 = x_in + y + bias.
// Backward: d x_in = d x_out (the residual), d y = d x_out, d bias = column sum of d x_out.
template <typename T>
__device__ void residual_add_bias(const float* x_in, const T* y, const float* bias,
                                  float* x_out, long long n, int cols) {
  GRID_STRIDE(i, n) { x_out[i] = x_in[i] + (to_float(y[i]) + bias[i % cols]); }
}

#define EXPORT_RESIDUAL_ADD_BIAS(T, SUFFIX)                                                 \
  extern "C" __global__ void residual_add_bias_##SUFFIX(const float* x_in, const T* y,      \
                                                        const float* bias, float* x_out,    \
                                                        long long n, int cols) {            \
    residual_add_bias<T>(x_in, y, bias, x_out, n, cols);                                    \
  }
EXPORT_RESIDUAL_ADD_BIAS(float, f32)
EXPORT_RESIDUAL_ADD_BIAS(bf16, bf16)

// src [n] f32 -> dst [n] T, round to nearest even: the residual gradient into a GEMM
// operand, and the master weights into their storage copy.
template <typename T>
__device__ void cast_from_f32(const float* src, T* dst, long long n) {
  GRID_STRIDE(i, n) { dst[i] = from_float<T>(src[i]); }
}

#define EXPORT_CAST_FROM_F32(T, SUFFIX)                                                     \
  extern "C" __global__ void cast_from_f32_##SUFFIX(const float* src, T* dst, long long n) { \
    cast_from_f32<T>(src, dst, n);                                                          \
  }
EXPORT_CAST_FROM_F32(float, f32)
EXPORT_CAST_FROM_F32(bf16, bf16)
