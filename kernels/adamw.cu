// Fused AdamW over the flat fp32 master buffer (docs/DESIGN.md §1.4), writing the storage-type
// copy of every weight that the GEMMs read in the same pass.
//
// params [n] f32 (in place), grads [n] f32, m [n] f32, v [n] f32 (in place),
// decay_mask [n] u8 (1 where weight decay applies) -> shadow [n] T
//
// The arithmetic mirrors optim::adamw_update operation by operation, with explicitly
// rounded intrinsics so that no multiply-add is fused: the GPU then reproduces the CPU
// update to the last bit given the same inputs. Each thread moves 8-value packs (16-byte
// accesses, common.cuh), grid-stride; the last pack may be short.
#include "common.cuh"

template <typename T>
__device__ void adamw(float* __restrict__ params, const float* __restrict__ grads,
                      float* __restrict__ m, float* __restrict__ v,
                      const unsigned char* __restrict__ decay_mask, T* __restrict__ shadow,
                      long long n, float beta1, float one_minus_beta1, float beta2,
                      float one_minus_beta2, float eps, float decay_keep, float grad_scale,
                      float step_size, float inv_sqrt_bc2) {
  // The mask's packs are 8 bytes, so 16-byte alignment of its start is more than needed.
  const bool vec = packable(PACK, params, grads, m, v, decay_mask, shadow);
  FOR_EACH_PACK(at, n) {
    const int count = pack_count(n, at);
    float p[PACK], g[PACK], mi[PACK], vi[PACK], decay[PACK];
    load_pack(params + at, count, vec, p);
    load_pack(grads + at, count, vec, g);
    load_pack(m + at, count, vec, mi);
    load_pack(v + at, count, vec, vi);
    load_pack(decay_mask + at, count, vec, decay);
    for (int k = 0; k < PACK; ++k) {
      const float gk = __fmul_rn(g[k], grad_scale);
      mi[k] = __fadd_rn(__fmul_rn(beta1, mi[k]), __fmul_rn(one_minus_beta1, gk));
      vi[k] = __fadd_rn(__fmul_rn(beta2, vi[k]), __fmul_rn(__fmul_rn(one_minus_beta2, gk), gk));
      const float kept = decay[k] != 0.0f ? __fmul_rn(p[k], decay_keep) : p[k];
      const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi[k]), inv_sqrt_bc2), eps);
      p[k] = __fsub_rn(kept, __fdiv_rn(__fmul_rn(step_size, mi[k]), denom));
    }
    store_pack(m + at, count, vec, mi);
    store_pack(v + at, count, vec, vi);
    store_pack(params + at, count, vec, p);
    store_pack(shadow + at, count, vec, p);
  }
}

#define EXPORT_ADAMW(T, SUFFIX)                                                              \
  extern "C" __global__ void __launch_bounds__(256) adamw_##SUFFIX(                          \
      float* params, const float* grads, float* m, float* v, const unsigned char* decay_mask, \
      T* shadow, long long n, float beta1, float one_minus_beta1, float beta2,               \
      float one_minus_beta2, float eps, float decay_keep, float grad_scale, float step_size,  \
      float inv_sqrt_bc2) {                                                                  \
    adamw<T>(params, grads, m, v, decay_mask, shadow, n, beta1, one_minus_beta1, beta2,      \
             one_minus_beta2, eps, decay_keep, grad_scale, step_size, inv_sqrt_bc2);         \
  }
EXPORT_ADAMW(float, f32)
EXPORT_ADAMW(bf16, bf16)
