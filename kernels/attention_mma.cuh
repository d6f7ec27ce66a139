// Operands of mma.sync m16n8k16 (bf16 in, f32 accumulate) loaded from bf16 matrices in
// shared memory with ldmatrix, for the attention kernels. Fragment layouts: kernels/ptx.cuh.
// Every matrix is stored row by row with a row stride `ld` (elements) whose rows start on
// 16-byte boundaries; "row0"/"col0"/"k0"/"n0" are multiples of 8 within it.
#pragma once

#include "common.cuh"
#include "ptx.cuh"

namespace attn {

// A (16×16) = M[row0..+16, col0..+16] of a row-major M.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* m, int ld, int row0, int col0, int lane) {
    ldmatrix(a, m + (row0 + lane % 16) * ld + col0 + 8 * (lane / 16));
}

// A (16×16) = Mᵀ[row0..+16, k0..+16] where M is stored with one row per k (A(r, k) = M[k][r]).
__device__ __forceinline__ void load_a_transposed(uint32_t (&a)[4], const bf16* m, int ld, int row0, int k0,
                                                  int lane) {
    ldmatrix_trans(a, m + (k0 + lane % 8 + 8 * (lane / 16)) * ld + row0 + 8 * (lane / 8 % 2));
}

// B of the two n-tiles n0..n0+7 and n0+8..n0+15, k0..k0+15, where M is stored with one row
// per n (B(k, n) = M[n][k], e.g. K in Q·Kᵀ).
__device__ __forceinline__ void load_b_pair_by_n(uint32_t (&b0)[2], uint32_t (&b1)[2], const bf16* m, int ld,
                                                 int n0, int k0, int lane) {
    uint32_t r[4];
    ldmatrix(r, m + (n0 + lane % 8 + 8 * (lane / 16)) * ld + k0 + 8 * (lane / 8 % 2));
    b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// As load_b_pair_by_n, where M is stored with one row per k (B(k, n) = M[k][n], e.g. V in P·V).
__device__ __forceinline__ void load_b_pair_by_k(uint32_t (&b0)[2], uint32_t (&b1)[2], const bf16* m, int ld,
                                                 int k0, int n0, int lane) {
    uint32_t r[4];
    ldmatrix_trans(r, m + (k0 + lane % 8 + 8 * (lane / 8 % 2)) * ld + n0 + 8 * (lane / 16));
    b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// The accumulators of n-tiles 2kk and 2kk+1 (a 16×16 block of D) as the A operand of the
// next product, k running over those 16 columns: the C/D layout of a column pair is the
// A layout of the same pair, so no data moves between lanes.
template <int N>
__device__ __forceinline__ void accumulators_as_a(uint32_t (&a)[4], const float (&acc)[N][4], int kk) {
    a[0] = pack_bf16x2(acc[2 * kk][0], acc[2 * kk][1]);
    a[1] = pack_bf16x2(acc[2 * kk][2], acc[2 * kk][3]);
    a[2] = pack_bf16x2(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[3] = pack_bf16x2(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

__device__ __forceinline__ void copy4(uint32_t (&dst)[4], const uint32_t (&src)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) dst[j] = src[j];
}

// The 4 lanes of a quad (lane / 4) hold one accumulator row between them.
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Row of the bias table for query token i and key token j; token 0 is cls, token t ≥ 1 is
// window position t-1, numbered row-major (docs/DESIGN.md §1.2).
__device__ __forceinline__ int rel_index(int i, int j, int window) {
    const int span = 2 * window - 1;
    const int patch_rows = span * span;
    if (i == 0) return j == 0 ? patch_rows + 2 : patch_rows;
    if (j == 0) return patch_rows + 1;
    const int yi = (i - 1) / window, xi = (i - 1) % window;
    const int yj = (j - 1) / window, xj = (j - 1) % window;
    return (yi - yj + window - 1) * span + (xi - xj + window - 1);
}

}  // namespace attn
