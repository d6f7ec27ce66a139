// Casts that no other kernel fuses: the master weights into their storage copy, and the
// residual gradient into a GEMM operand. Streaming: each thread moves 8-value packs
// (common.cuh).
#include "common.cuh"

// src [n] f32 -> dst [n] T, round to nearest even: the master weights into their storage
// copy, and the first block's residual gradient into a GEMM operand (the later ones come
// from the LayerNorm backward). One pack per thread, grid-stride over packs; the last pack
// may be short.
template <typename T>
__device__ void cast_from_f32(const float* __restrict__ src, T* __restrict__ dst, long long n) {
  const bool vec = packable(PACK, src, dst);
  FOR_EACH_PACK(at, n) {
    float v[PACK];
    load_pack(src + at, pack_count(n, at), vec, v);
    store_pack(dst + at, pack_count(n, at), vec, v);
  }
}

#define EXPORT_CAST_FROM_F32(T, SUFFIX)                                                     \
  extern "C" __global__ void __launch_bounds__(256)                                         \
      cast_from_f32_##SUFFIX(const float* src, T* dst, long long n) {                       \
    cast_from_f32<T>(src, dst, n);                                                          \
  }
EXPORT_CAST_FROM_F32(float, f32)
EXPORT_CAST_FROM_F32(bf16, bf16)
