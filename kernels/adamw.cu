// Fused AdamW over the flat fp32 master buffer (docs/DESIGN.md §1.4), writing the storage-type
// copy of every weight that the GEMMs read in the same pass.
//
// params [n] f32 (in place), grads [n] f32, m [n] f32, v [n] f32 (in place),
// decay_mask [n] u8 (1 where weight decay applies) -> shadow [n] T
//
// The arithmetic mirrors optim::adamw_update operation by operation, with explicitly
// rounded intrinsics so that no multiply-add is fused: the GPU then reproduces the CPU
// update to the last bit given the same inputs.
#include "common.cuh"

template <typename T>
__device__ void adamw(float* params, const float* grads, float* m, float* v,
                      const unsigned char* decay_mask, T* shadow, long long n, float beta1,
                      float one_minus_beta1, float beta2, float one_minus_beta2, float eps,
                      float decay_keep, float grad_scale, float step_size,
                      float inv_sqrt_bc2) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float g = __fmul_rn(grads[i], grad_scale);
    const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(one_minus_beta1, g));
    const float vi =
        __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
    m[i] = mi;
    v[i] = vi;
    const float p = decay_mask[i] ? __fmul_rn(params[i], decay_keep) : params[i];
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_sqrt_bc2), eps);
    const float updated = __fsub_rn(p, __fdiv_rn(__fmul_rn(step_size, mi), denom));
    params[i] = updated;
    shadow[i] = from_float<T>(updated);
  }
}

#define EXPORT_ADAMW(T, SUFFIX)                                                              \
  extern "C" __global__ void adamw_##SUFFIX(                                                 \
      float* params, const float* grads, float* m, float* v, const unsigned char* decay_mask, \
      T* shadow, long long n, float beta1, float one_minus_beta1, float beta2,               \
      float one_minus_beta2, float eps, float decay_keep, float grad_scale, float step_size,  \
      float inv_sqrt_bc2) {                                                                  \
    adamw<T>(params, grads, m, v, decay_mask, shadow, n, beta1, one_minus_beta1, beta2,      \
             one_minus_beta2, eps, decay_keep, grad_scale, step_size, inv_sqrt_bc2);         \
  }
EXPORT_ADAMW(float, f32)
EXPORT_ADAMW(bf16, bf16)
