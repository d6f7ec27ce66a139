// The PTX-level operations our kernels use beyond plain CUDA C++: dynamic shared memory,
// ldmatrix, mma.sync (bf16 in, f32 accumulate) and cp.async. On the GPU each is one inline
// PTX instruction; compiled as C++ for the CPU (kernels/emu/cuda_emu.h) each is the shim's
// model of that instruction, so the kernels' fragment bookkeeping is tested without a GPU.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"), with g = lane/4 and t = lane%4, two bf16 per 32-bit register, lower column first:
//   A 16×16 row-major: a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..), a[2] = A(g, 2t+8..),
//                      a[3] = A(g+8, 2t+8..)
//   B 16×8:            b[0] = B(2t..2t+1, g), b[1] = B(2t+8..2t+9, g)
//   C/D 16×8 f32:      d[0], d[1] = D(g, 2t), D(g, 2t+1); d[2], d[3] = D(g+8, 2t), D(g+8, 2t+1)
// ldmatrix: lanes 8m..8m+7 give the row addresses of 8×8 matrix m; lane l receives in r[m]
// row l/4, columns 2(l%4)..+1 of matrix m (of its transpose with .trans).
#pragma once

#ifndef __CUDACC__
#include "emu/cuda_emu.h"
#endif

#include <cstdint>

// The block's dynamic shared memory, 128-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef __CUDACC__
    extern __shared__ __align__(128) unsigned char dynamic_smem_bytes[];
    return dynamic_smem_bytes;
#else
    return emu::this_block->smem;
#endif
}

// Bytes of dynamic shared memory the launch gave the block.
__device__ __forceinline__ unsigned dynamic_smem_size() {
#ifdef __CUDACC__
    unsigned bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
#else
    return emu::this_block->smem_bytes;
#endif
}

// Two floats as a bf16 pair, `lo` in the low half: the register form of an A or B element pair.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16;
}

// ldmatrix.sync.aligned.m8n8.x{N}.shared.b16; `row` is this lane's 16-byte-aligned row.
template <int N>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row) {
#ifdef __CUDACC__
    const uint32_t at = static_cast<uint32_t>(__cvta_generic_to_shared(row));
    if constexpr (N == 1)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(at) : "memory");
    else if constexpr (N == 2)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1]) : "r"(at) : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at) : "memory");
#else
    emu::ldmatrix(r, row, false);
#endif
}

// ldmatrix.sync.aligned.m8n8.x{N}.trans.shared.b16: as ldmatrix, of the transposed matrices.
template <int N>
__device__ __forceinline__ void ldmatrix_trans(uint32_t (&r)[N], const void* row) {
#ifdef __CUDACC__
    const uint32_t at = static_cast<uint32_t>(__cvta_generic_to_shared(row));
    if constexpr (N == 1)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(at) : "memory");
    else if constexpr (N == 2)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1]) : "r"(at) : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at) : "memory");
#else
    emu::ldmatrix(r, row, true);
#endif
}

// d += A·B for one 16×16 bf16 A, one 16×8 bf16 B, f32 d (layouts above).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef __CUDACC__
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    emu::mma_bf16_16816(d, a, b);
#endif
}

// Starts copying 16 bytes from global `src` to shared `dst` (both 16-byte aligned), or
// zeroing them when !fill (then `src` is not read). Visible to this thread after the
// cp_async_wait that covers its group, to others after a barrier following that.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
#ifdef __CUDACC__
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(
                     static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
                 "l"(__cvta_generic_to_global(src)), "r"(fill ? 16 : 0)
                 : "memory");
#else
    emu::cp_async_16(dst, src, fill);
#endif
}

// Closes the group of copies started since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef __CUDACC__
    asm volatile("cp.async.commit_group;" ::: "memory");
#else
    emu::cp_async_commit();
#endif
}

// Waits until at most `PENDING` of this thread's committed groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#ifdef __CUDACC__
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
#else
    emu::cp_async_wait(PENDING);
#endif
}
