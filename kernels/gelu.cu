// fc1's bias fused with the exact-erf GELU, gelu(x) = x * Φ(x) = 0.5 x (1 + erf(x / √2)).
// cuBLASLt's GELU epilogue is the tanh approximation, so this stays a kernel of ours.
#include "common.cuh"

#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

// forward: pre [N, C] T (fc1 output without bias; overwritten with output + bias, which the
// backward reads), bias [C] f32 -> act [N, C] T. Grid-stride over N*C.
template <typename T>
__device__ void bias_gelu_forward(T* pre, const float* bias, T* act, long long n, int cols) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    // Round to storage first, so forward and backward see the same x.
    const T stored = from_float<T>(to_float(pre[i]) + bias[i % cols]);
    pre[i] = stored;
    const float x = to_float(stored);
    act[i] = from_float<T>(0.5f * x * (1.0f + erff(x * INV_SQRT2)));
  }
}

#define EXPORT_BIAS_GELU_FORWARD(T, SUFFIX)                                                  \
  extern "C" __global__ void bias_gelu_forward_##SUFFIX(T* pre, const float* bias, T* act,   \
                                                        long long n, int cols) {             \
    bias_gelu_forward<T>(pre, bias, act, n, cols);                                           \
  }
EXPORT_BIAS_GELU_FORWARD(float, f32)
EXPORT_BIAS_GELU_FORWARD(bf16, bf16)

// backward: pre [N, C] T (with bias), grad [N, C] T: d act in, d pre out (in place).
// gelu'(x) = Φ(x) + x φ(x). The fc1 bias gradient is the column sum of d pre.
template <typename T>
__device__ void gelu_backward(const T* pre, T* grad, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float x = to_float(pre[i]);
    const float cdf = 0.5f * (1.0f + erff(x * INV_SQRT2));
    const float pdf = INV_SQRT_2PI * expf(-0.5f * x * x);
    grad[i] = from_float<T>(to_float(grad[i]) * (cdf + x * pdf));
  }
}

#define EXPORT_GELU_BACKWARD(T, SUFFIX)                                                      \
  extern "C" __global__ void gelu_backward_##SUFFIX(const T* pre, T* grad, long long n) {    \
    gelu_backward<T>(pre, grad, n);                                                          \
  }
EXPORT_GELU_BACKWARD(float, f32)
EXPORT_GELU_BACKWARD(bf16, bf16)
