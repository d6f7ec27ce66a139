// LayerNorm over the last dimension, eps 1e-6, biased variance (torch.nn.LayerNorm).
// The input is the fp32 residual stream; the output feeds a GEMM, so it is stored as T.
// gamma and beta are the fp32 master weights.
#include "common.cuh"

// forward: x [N, D] f32, gamma [D], beta [D] -> y [N, D] T, mean [N] f32, rstd [N] f32
// One warp per row; blockDim.x a multiple of 32.
template <typename T>
__device__ void layernorm_forward(const float* x, const float* gamma, const float* beta, T* y,
                                  float* mean_out, float* rstd_out, int rows, int width) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave together
  const float* xr = x + (size_t)row * width;
  float sum = 0.0f;
  for (int c = lane; c < width; c += 32) sum += xr[c];
  const float mean = warp_sum(sum) / (float)width;
  // Two passes: the centred sum of squares does not cancel like E[x²] - E[x]².
  float sq = 0.0f;
  for (int c = lane; c < width; c += 32) {
    const float d = xr[c] - mean;
    sq += d * d;
  }
  const float rstd = 1.0f / sqrtf(warp_sum(sq) / (float)width + 1e-6f);
  T* yr = y + (size_t)row * width;
  for (int c = lane; c < width; c += 32) {
    yr[c] = from_float<T>((xr[c] - mean) * rstd * gamma[c] + beta[c]);
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

#define EXPORT_LAYERNORM_FORWARD(T, SUFFIX)                                                 \
  extern "C" __global__ void layernorm_forward_##SUFFIX(const float* x, const float* gamma, \
                                                        const float* beta, T* y,            \
                                                        float* mean_out, float* rstd_out,   \
                                                        int rows, int width) {              \
    layernorm_forward<T>(x, gamma, beta, y, mean_out, rstd_out, rows, width);               \
  }
EXPORT_LAYERNORM_FORWARD(float, f32)
EXPORT_LAYERNORM_FORWARD(bf16, bf16)

// backward, input gradient: x [N, D] f32, dy [N, D] T, gamma [D], mean [N], rstd [N]
//   -> dx [N, D] f32 (+=, so the residual gradient accumulates in place)
// dx = rstd * (g - mean(g) - x̂ * mean(g * x̂)) with g = dy * gamma, x̂ = (x - mean) * rstd.
// One warp per row.
template <typename T>
__device__ void layernorm_backward(const float* x, const T* dy, const float* gamma,
                                   const float* mean, const float* rstd, float* dx, int rows,
                                   int width) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const float* xr = x + (size_t)row * width;
  const T* dyr = dy + (size_t)row * width;
  const float mu = mean[row];
  const float r = rstd[row];
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int c = lane; c < width; c += 32) {
    const float g = to_float(dyr[c]) * gamma[c];
    sum_g += g;
    sum_gx += g * (xr[c] - mu) * r;
  }
  const float mean_g = warp_sum(sum_g) / (float)width;
  const float mean_gx = warp_sum(sum_gx) / (float)width;
  float* dxr = dx + (size_t)row * width;
  for (int c = lane; c < width; c += 32) {
    const float g = to_float(dyr[c]) * gamma[c];
    const float xhat = (xr[c] - mu) * r;
    dxr[c] += r * (g - mean_g - xhat * mean_gx);
  }
}

#define EXPORT_LAYERNORM_BACKWARD(T, SUFFIX)                                                \
  extern "C" __global__ void layernorm_backward_##SUFFIX(                                   \
      const float* x, const T* dy, const float* gamma, const float* mean, const float* rstd, \
      float* dx, int rows, int width) {                                                     \
    layernorm_backward<T>(x, dy, gamma, mean, rstd, dx, rows, width);                       \
  }
EXPORT_LAYERNORM_BACKWARD(float, f32)
EXPORT_LAYERNORM_BACKWARD(bf16, bf16)

// backward, parameter gradients, first pass: x [N, D] f32, dy [N, D] T, mean, rstd
//   -> partial [2, chunks, D] f32: per chunk of rows, sum(dy * x̂) (dgamma) then sum(dy) (dbeta).
// partials_finish adds the chunks in a fixed order, so the result is deterministic.
// Grid (ceil(D / blockDim.x), chunks): one thread per column and chunk; reads coalesce
// along the row.
template <typename T>
__device__ void layernorm_param_grad(const float* x, const T* dy, const float* mean,
                                     const float* rstd, float* partial, int rows, int width,
                                     int rows_per_chunk) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= width) return;
  const int chunk = blockIdx.y;
  const int row_end = min(rows, (chunk + 1) * rows_per_chunk);
  float d_gamma = 0.0f, d_beta = 0.0f;
  for (int row = chunk * rows_per_chunk; row < row_end; ++row) {
    const size_t at = (size_t)row * width + c;
    const float g = to_float(dy[at]);
    d_gamma += g * (x[at] - mean[row]) * rstd[row];
    d_beta += g;
  }
  partial[(size_t)chunk * width + c] = d_gamma;
  partial[((size_t)gridDim.y + chunk) * width + c] = d_beta;
}

#define EXPORT_LAYERNORM_PARAM_GRAD(T, SUFFIX)                                              \
  extern "C" __global__ void layernorm_param_grad_##SUFFIX(                                 \
      const float* x, const T* dy, const float* mean, const float* rstd, float* partial,    \
      int rows, int width, int rows_per_chunk) {                                            \
    layernorm_param_grad<T>(x, dy, mean, rstd, partial, rows, width, rows_per_chunk);       \
  }
EXPORT_LAYERNORM_PARAM_GRAD(float, f32)
EXPORT_LAYERNORM_PARAM_GRAD(bf16, bf16)
