// Masked MSE (docs/DESIGN.md §1.3) with its gradient fused; the head bias is added here.
//
// pred [Nm, P] T (head GEMM output without bias), bias [P] f32, target [Nm, P] f32
//   -> dpred [Nm, P] T = grad_coef * (pred + bias - target)
//   -> row_loss [Nm] f32 = sum over the row of (pred + bias - target)²
// grad_coef = grad_scale * 2 / (Nm * P); the loss is sum(row_loss) / (Nm * P), summed by
// sum_finish in fp32. One block per row; blockDim.x a multiple of 32; each thread takes
// 8-value packs of the row (common.cuh).
#include "common.cuh"

template <typename T>
__device__ void masked_mse(const T* __restrict__ pred, const float* __restrict__ bias,
                           const float* __restrict__ target, T* __restrict__ dpred,
                           float* __restrict__ row_loss, int cols, float grad_coef) {
  const size_t base = (size_t)blockIdx.x * cols;
  const bool vec = packable(cols, pred, target, dpred);
  float sum = 0.0f;
  for (int col = (int)threadIdx.x * PACK; col < cols; col += (int)blockDim.x * PACK) {
    const int n = min(PACK, cols - col);
    float p[PACK], b[PACK], t[PACK];
    load_pack(pred + base + col, n, vec, p);
    load_pack(bias + col, n, false, b);
    load_pack(target + base + col, n, vec, t);
    for (int k = 0; k < PACK; ++k) {
      // Past the row's end (k >= n) every term is 0.
      p[k] = p[k] + b[k] - t[k];  // (pred + bias) - target, as the CPU op
      sum += p[k] * p[k];
      p[k] *= grad_coef;
    }
    store_pack(dpred + base + col, n, vec, p);
  }
  const float total = block_sum(sum);
  if (threadIdx.x == 0) row_loss[blockIdx.x] = total;
}

#define EXPORT_MASKED_MSE(T, SUFFIX)                                                        \
  extern "C" __global__ void masked_mse_##SUFFIX(const T* pred, const float* bias,          \
                                                 const float* target, T* dpred,             \
                                                 float* row_loss, int cols,                 \
                                                 float grad_coef) {                         \
    masked_mse<T>(pred, bias, target, dpred, row_loss, cols, grad_coef);                    \
  }
EXPORT_MASKED_MSE(float, f32)
EXPORT_MASKED_MSE(bf16, bf16)
