// Helpers shared by every kernel: storage-type conversions and deterministic reductions.
//
// Kernels are templates over the storage type T (float or __nv_bfloat16) of activations and
// GEMM operands; arithmetic is always fp32. Each template is exported twice, as `<name>_f32`
// and `<name>_bf16`, through an `EXPORT_*` macro next to it, so the host loads both from
// one module.
#pragma once

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<bf16>(bf16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the whole block, returned to every thread. blockDim.x must be a multiple of 32.
// Every thread adds the warp totals in the same order, so the result is deterministic and
// identical across threads. Safe to call repeatedly in one kernel.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_totals[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers are done with warp_totals
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += warp_totals[w];
  return total;
}
