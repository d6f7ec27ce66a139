// Fused AdamW over the flat fp32 master buffer (docs/DESIGN.md §1.4), writing the storage-type
// copy of every weight that the GEMMs read in the same pass.
//
// params [n] f32 (in place), grads [n] f32, m [n] f32, v [n] f32 (in place),
// decay_mask [n] u8 (1 where weight decay applies), hyper [HYPER_LEN] f32, state
// [STATE_LEN] f32 (kernels/step_state.cuh) -> shadow [n] T
//
// The step's constants and the clip scale are read from device memory, not passed as
// arguments, so a captured step replays with the values the host wrote before it. When
// the step's divergence flag is raised (a non-finite loss or gradient norm) every thread
// returns at once: parameters, moments and the weight copy stay as they were.
//
// The arithmetic mirrors optim::adamw_update operation by operation, with explicitly
// rounded intrinsics so that no multiply-add is fused: the GPU then reproduces the CPU
// update to the last bit given the same inputs. Each thread moves 8-value packs (16-byte
// accesses, common.cuh), grid-stride; the last pack may be short.
#include "common.cuh"
#include "step_state.cuh"

template <typename T>
__device__ void adamw(float* __restrict__ params, const float* __restrict__ grads,
                      float* __restrict__ m, float* __restrict__ v,
                      const unsigned char* __restrict__ decay_mask, T* __restrict__ shadow,
                      long long n, const float* __restrict__ hyper,
                      const float* __restrict__ state) {
  if (state[STATE_DIVERGED] != 0.0f) return;
  const float beta1 = hyper[HYPER_BETA1], one_minus_beta1 = hyper[HYPER_ONE_MINUS_BETA1];
  const float beta2 = hyper[HYPER_BETA2], one_minus_beta2 = hyper[HYPER_ONE_MINUS_BETA2];
  const float eps = hyper[HYPER_EPS], decay_keep = hyper[HYPER_DECAY_KEEP];
  const float step_size = hyper[HYPER_STEP_SIZE], inv_sqrt_bc2 = hyper[HYPER_INV_SQRT_BC2];
  const float grad_scale = state[STATE_CLIP_SCALE];
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
      T* shadow, long long n, const float* hyper, const float* state) {                      \
    adamw<T>(params, grads, m, v, decay_mask, shadow, n, hyper, state);                     \
  }
EXPORT_ADAMW(float, f32)
EXPORT_ADAMW(bf16, bf16)
