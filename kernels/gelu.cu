// The exact-erf GELU, gelu(x) = x * Φ(x) = 0.5 x (1 + erf(x / √2)), after fc1 (whose bias
// the GEMM's epilogue adds). cuBLASLt's GELU epilogue is the tanh approximation, so this
// stays a kernel of ours. Both directions stream 8-value packs (common.cuh) over a 2-D grid
// of (column packs, rows).
#include "common.cuh"

#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

// forward: pre [N, C] T (fc1 output with bias, as stored, which the backward reads too)
//   -> act [N, C] T. Grid (packs of C, rows).
template <typename T>
__device__ void gelu_forward(const T* __restrict__ pre, T* __restrict__ act, int rows,
                             int cols) {
  const ColumnPack p = column_pack(cols);
  if (p.n <= 0) return;
  const bool vec = packable(cols, pre, act);
  FOR_EACH_ROW(row, rows) {
    const size_t at = (size_t)row * cols + p.col;
    float x[PACK], y[PACK];
    load_pack(pre + at, p.n, vec, x);
    for (int k = 0; k < PACK; ++k) y[k] = 0.5f * x[k] * (1.0f + erff(x[k] * INV_SQRT2));
    store_pack(act + at, p.n, vec, y);
  }
}

#define EXPORT_GELU_FORWARD(T, SUFFIX)                                                       \
  extern "C" __global__ void __launch_bounds__(256)                                          \
      gelu_forward_##SUFFIX(const T* pre, T* act, int rows, int cols) {                      \
    gelu_forward<T>(pre, act, rows, cols);                                                   \
  }
EXPORT_GELU_FORWARD(float, f32)
EXPORT_GELU_FORWARD(bf16, bf16)

// backward: pre [N, C] T (with bias), grad [N, C] T: d act in, d pre out (in place), and the
// fc1 bias gradient's first pass: partial [chunks, C] f32, the column sums of the stored
// d pre over each chunk of rows_per_chunk rows (partials_finish adds the chunks in order).
// gelu'(x) = Φ(x) + x φ(x). Grid (packs of C, chunks), block (packs, row groups).
template <typename T>
__device__ void gelu_backward(const T* __restrict__ pre, T* __restrict__ grad,
                              float* __restrict__ partial, int rows, int cols,
                              int rows_per_chunk) {
  const ColumnPack p = column_pack(cols);
  const RowChunk chunk = row_chunk(rows, rows_per_chunk);
  const bool vec = packable(cols, pre, grad);
  float sum[PACK] = {};
  if (p.n > 0) {
    for (int row = chunk.begin + (int)threadIdx.y; row < chunk.end; row += (int)blockDim.y) {
      const size_t at = (size_t)row * cols + p.col;
      float x[PACK], g[PACK];
      load_pack(pre + at, p.n, vec, x);
      load_pack(grad + at, p.n, vec, g);
      for (int k = 0; k < PACK; ++k) {
        const float cdf = 0.5f * (1.0f + erff(x[k] * INV_SQRT2));
        const float pdf = INV_SQRT_2PI * expf(-0.5f * x[k] * x[k]);
        // The bias gradient sums what the fc1 GEMMs read: d pre as stored.
        g[k] = to_float(from_float<T>(g[k] * (cdf + x[k] * pdf)));
        sum[k] += g[k];
      }
      store_pack(grad + at, p.n, vec, g);
    }
  }
  store_chunk_partial(sum, partial, cols, p);
}

#define EXPORT_GELU_BACKWARD(T, SUFFIX)                                                      \
  extern "C" __global__ void __launch_bounds__(256)                                          \
      gelu_backward_##SUFFIX(const T* pre, T* grad, float* partial, int rows, int cols,      \
                             int rows_per_chunk) {                                           \
    gelu_backward<T>(pre, grad, partial, rows, cols, rows_per_chunk);                        \
  }
EXPORT_GELU_BACKWARD(float, f32)
EXPORT_GELU_BACKWARD(bf16, bf16)
