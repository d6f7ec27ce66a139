// Masked MSE (docs/DESIGN.md §1.3) with its gradient fused; the head bias is added here.
//
// pred [Nm, P] T (head GEMM output without bias), bias [P] f32, target [Nm, P] f32
//   -> dpred [Nm, P] T = grad_coef * (pred + bias - target)
//   -> row_loss [Nm] f32 = sum over the row of (pred + bias - target)²
// grad_coef = grad_scale * 2 / (Nm * P); the loss is sum(row_loss) / (Nm * P), summed by
// sum_finish in fp32. One block per row; blockDim.x a multiple of 32.
#include "common.cuh"

template <typename T>
__device__ void masked_mse(const T* pred, const float* bias, const float* target, T* dpred,
                           float* row_loss, int cols, float grad_coef) {
  const size_t base = (size_t)blockIdx.x * cols;
  float sum = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const float diff = to_float(pred[base + c]) + bias[c] - target[base + c];
    sum += diff * diff;
    dpred[base + c] = from_float<T>(grad_coef * diff);
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
