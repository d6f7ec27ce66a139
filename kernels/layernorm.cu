// LayerNorm over the last dimension, eps 1e-6, biased variance (torch.nn.LayerNorm).
// The input is the fp32 residual stream; the output feeds a GEMM, so it is stored as T.
// gamma and beta are the fp32 master weights.
//
// Both directions give a row to a row group of the block: blockDim.x threads, one 8-value
// pack each (common.cuh), so the whole row sits in registers, is read from memory once,
// and the row's sums go through row_sum2. blockDim.x is ceil(D / 8) rounded up to whole
// warps (D <= 2048 for 256 threads); blockDim.y rows are handled side by side.
#include "common.cuh"

#define LN_EPS 1e-6f

// forward: x [N, D] f32, gamma [D], beta [D] -> y [N, D] T, mean [N] f32, rstd [N] f32.
// Grid (1, row steps): the block takes rows blockDim.y at a time, grid-stride.
template <typename T>
__device__ void layernorm_forward(const float* __restrict__ x, const float* __restrict__ gamma,
                                  const float* __restrict__ beta, T* __restrict__ y,
                                  float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                  int rows, int width) {
  const ColumnPack p = column_pack(width);
  const bool vec = packable(width, x, y);
  float g[PACK], b[PACK];
  load_pack(gamma + p.col, p.n, false, g);
  load_pack(beta + p.col, p.n, false, b);
  // Every row group of the block takes the same number of steps: row_sum2 is a barrier.
  for (int first = (int)(blockIdx.y * blockDim.y); first < rows;
       first += (int)(gridDim.y * blockDim.y)) {
    const int row = first + (int)threadIdx.y;
    const bool mine = row < rows && p.n > 0;
    const size_t at = (size_t)row * width + p.col;
    float v[PACK] = {};  // zero past the row's end, and for a row group without a row
    if (mine) load_pack(x + at, p.n, vec, v);
    float sum = 0.0f;
    for (int k = 0; k < PACK; ++k) sum += v[k];
    const float mean = row_sum2(sum, 0.0f).x / (float)width;
    // Two passes over the registers: the centred sum of squares does not cancel like
    // E[x²] - E[x]².
    float sq = 0.0f;
    for (int k = 0; k < PACK; ++k) {
      const float d = v[k] - mean;
      sq += k < p.n ? d * d : 0.0f;
    }
    const float rstd = 1.0f / sqrtf(row_sum2(sq, 0.0f).x / (float)width + LN_EPS);
    if (!mine) continue;
    for (int k = 0; k < PACK; ++k) v[k] = (v[k] - mean) * rstd * g[k] + b[k];
    store_pack(y + at, p.n, vec, v);
    if (threadIdx.x == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

#define EXPORT_LAYERNORM_FORWARD(T, SUFFIX)                                                 \
  extern "C" __global__ void __launch_bounds__(256) layernorm_forward_##SUFFIX(             \
      const float* x, const float* gamma, const float* beta, T* y, float* mean_out,         \
      float* rstd_out, int rows, int width) {                                               \
    layernorm_forward<T>(x, gamma, beta, y, mean_out, rstd_out, rows, width);               \
  }
EXPORT_LAYERNORM_FORWARD(float, f32)
EXPORT_LAYERNORM_FORWARD(bf16, bf16)

// backward, everything in one pass over each chunk of rows_per_chunk rows:
//   x [N, D] f32, dy [N, D] T, gamma [D], mean [N], rstd [N]
//   -> dx [N, D] f32 (+=, so the residual gradient accumulates in place)
//   -> dx_copy [N, D] T = the updated dx in storage type (skipped when null): the operand of
//      the next GEMMs back
//   -> partial [3, chunks, D] f32: per chunk, sum(dy * x̂) (d gamma), sum(dy) (d beta) and
//      the column sums of the updated dx (the gradient of the bias added into this residual
//      stream just before); partials_finish adds the chunks in order.
// dx += rstd * (g - mean(g) - x̂ * mean(g * x̂)) with g = dy * gamma, x̂ = (x - mean) * rstd.
// Grid (1, chunks).
template <typename T>
__device__ void layernorm_backward(const float* __restrict__ x, const T* __restrict__ dy,
                                   const float* __restrict__ gamma,
                                   const float* __restrict__ mean,
                                   const float* __restrict__ rstd, float* __restrict__ dx,
                                   T* __restrict__ dx_copy, float* __restrict__ partial,
                                   int rows, int width, int rows_per_chunk) {
  const ColumnPack p = column_pack(width);
  const RowChunk chunk = row_chunk(rows, rows_per_chunk);
  const bool vec = packable(width, x, dy, dx, dx_copy);
  float gam[PACK];
  load_pack(gamma + p.col, p.n, false, gam);
  float d_gamma[PACK] = {}, d_beta[PACK] = {}, d_sum[PACK] = {};
  for (int first = chunk.begin; first < chunk.end; first += (int)blockDim.y) {
    const int row = first + (int)threadIdx.y;
    const bool mine = row < chunk.end && p.n > 0;
    const size_t at = (size_t)row * width + p.col;
    float xhat[PACK] = {}, d[PACK] = {}, old[PACK] = {};  // as in layernorm_forward
    float mu = 0.0f, r = 0.0f;
    if (mine) {
      load_pack(x + at, p.n, vec, xhat);
      load_pack(dy + at, p.n, vec, d);
      load_pack(dx + at, p.n, vec, old);
      mu = mean[row];
      r = rstd[row];
    }
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (int k = 0; k < PACK; ++k) {
      xhat[k] = (xhat[k] - mu) * r;
      // Past the row's end (k >= n), and without a row, d is 0: these terms add nothing.
      sum_g += d[k] * gam[k];
      sum_gx += d[k] * gam[k] * xhat[k];
    }
    const float2 sums = row_sum2(sum_g, sum_gx);
    if (!mine) continue;
    const float mean_g = sums.x / (float)width, mean_gx = sums.y / (float)width;
    for (int k = 0; k < PACK; ++k) {
      old[k] += r * (d[k] * gam[k] - mean_g - xhat[k] * mean_gx);
      d_gamma[k] += d[k] * xhat[k];
      d_beta[k] += d[k];
      d_sum[k] += old[k];
    }
    store_pack(dx + at, p.n, vec, old);
    if (dx_copy) store_pack(dx_copy + at, p.n, vec, old);
  }
  const size_t plane = (size_t)gridDim.y * width;
  store_chunk_partial(d_gamma, partial, width, p);
  store_chunk_partial(d_beta, partial + plane, width, p);
  store_chunk_partial(d_sum, partial + 2 * plane, width, p);
}

#define EXPORT_LAYERNORM_BACKWARD(T, SUFFIX)                                                \
  extern "C" __global__ void __launch_bounds__(256) layernorm_backward_##SUFFIX(            \
      const float* x, const T* dy, const float* gamma, const float* mean, const float* rstd, \
      float* dx, T* dx_copy, float* partial, int rows, int width, int rows_per_chunk) {     \
    layernorm_backward<T>(x, dy, gamma, mean, rstd, dx, dx_copy, partial, rows, width,      \
                          rows_per_chunk);                                                  \
  }
EXPORT_LAYERNORM_BACKWARD(float, f32)
EXPORT_LAYERNORM_BACKWARD(bf16, bf16)
