// Bias adds, residual adds and casts that cuBLAS cannot fuse for us. Streaming kernels:
// each thread moves 8-value packs (common.cuh) down the rows of a 2-D grid, holding its
// bias pack in registers, so no value's column is found by division.
#include "common.cuh"

// forward: y [N, C] T (in place) += bias [C] f32. The qkv GEMM's bias; its backward is the
// column sum of the output gradient. Grid (packs of C, rows).
template <typename T>
__device__ void add_bias(T* y, const float* bias, int rows, int cols) {
  const ColumnPack p = column_pack(cols);
  if (p.n <= 0) return;
  const bool vec = packable(cols, y);
  float b[PACK];
  load_pack(bias + p.col, p.n, false, b);
  FOR_EACH_ROW(row, rows) {
    T* at = y + (size_t)row * cols + p.col;
    float v[PACK];
    load_pack(at, p.n, vec, v);
    for (int k = 0; k < PACK; ++k) v[k] += b[k];
    store_pack(at, p.n, vec, v);
  }
}

#define EXPORT_ADD_BIAS(T, SUFFIX)                                                          \
  extern "C" __global__ void __launch_bounds__(256)                                         \
      add_bias_##SUFFIX(T* y, const float* bias, int rows, int cols) {                      \
    add_bias<T>(y, bias, rows, cols);                                                       \
  }
EXPORT_ADD_BIAS(float, f32)
EXPORT_ADD_BIAS(bf16, bf16)

// forward: x_in [N, D] f32, y [N, D] T (a branch's GEMM output), bias [D] f32
//   -> x_out [N, D] f32 = x_in + (y + bias). Grid (packs of D, rows).
// Backward: d x_in = d x_out (the residual), d y = d x_out, d bias = column sum of d x_out.
template <typename T>
__device__ void residual_add_bias(const float* __restrict__ x_in, const T* __restrict__ y,
                                  const float* __restrict__ bias, float* __restrict__ x_out,
                                  int rows, int cols) {
  const ColumnPack p = column_pack(cols);
  if (p.n <= 0) return;
  const bool vec = packable(cols, x_in, y, x_out);
  float b[PACK];
  load_pack(bias + p.col, p.n, false, b);
  FOR_EACH_ROW(row, rows) {
    const size_t at = (size_t)row * cols + p.col;
    float x[PACK], v[PACK];
    load_pack(x_in + at, p.n, vec, x);
    load_pack(y + at, p.n, vec, v);
    for (int k = 0; k < PACK; ++k) x[k] += v[k] + b[k];
    store_pack(x_out + at, p.n, vec, x);
  }
}

#define EXPORT_RESIDUAL_ADD_BIAS(T, SUFFIX)                                                 \
  extern "C" __global__ void __launch_bounds__(256)                                         \
      residual_add_bias_##SUFFIX(const float* x_in, const T* y, const float* bias,          \
                                 float* x_out, int rows, int cols) {                        \
    residual_add_bias<T>(x_in, y, bias, x_out, rows, cols);                                 \
  }
EXPORT_RESIDUAL_ADD_BIAS(float, f32)
EXPORT_RESIDUAL_ADD_BIAS(bf16, bf16)

// src [n] f32 -> dst [n] T, round to nearest even: the master weights into their storage
// copy, and the first block's residual gradient into a GEMM operand (the later ones come
// from the LayerNorm backward). One pack per thread, grid-stride over packs; the last pack
// may be short.
template <typename T>
__device__ void cast_from_f32(const float* __restrict__ src, T* __restrict__ dst, long long n) {
  const bool vec = packable(PACK, src, dst);
  FOR_EACH_PACK(at, n) {
    float v[PACK];
    load_pack(src + at, pack_count(n, at), vec, v);
    store_pack(dst + at, pack_count(n, at), vec, v);
  }
}

#define EXPORT_CAST_FROM_F32(T, SUFFIX)                                                     \
  extern "C" __global__ void __launch_bounds__(256)                                         \
      cast_from_f32_##SUFFIX(const float* src, T* dst, long long n) {                       \
    cast_from_f32<T>(src, dst, n);                                                          \
  }
EXPORT_CAST_FROM_F32(float, f32)
EXPORT_CAST_FROM_F32(bf16, bf16)
