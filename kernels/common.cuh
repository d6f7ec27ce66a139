// Helpers shared by every kernel: storage-type conversions, 16-byte packs of columns, the
// 2-D grid over (column packs, rows), and deterministic reductions.
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
template <> __device__ __forceinline__ float to_float<unsigned char>(unsigned char v) { return v; }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the whole block, returned to every thread. blockDim.x a multiple of 32 and
// blockDim.y = 1. Every thread adds the warp totals in the same order, so the result is
// deterministic and identical across threads. Safe to call repeatedly in one kernel.
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

// ---- packs: the unit of memory access of the streaming kernels ----
//
// A thread moves PACK consecutive values of a row: one 16-byte access for bf16, two for
// f32, one 8-byte access for u8. 2-byte scalar accesses keep too little in flight to cover
// HBM latency (Little's law: ~36 KB per SM at 4.8 TB/s), 16-byte ones four to eight times
// more per thread. A pack is accessed as a vector only when the kernel found every row
// start 16-byte aligned (`packable`); otherwise, and for the last pack of a row that does
// not hold PACK values, it falls back to scalar accesses of the `n` values that exist.

#define PACK 8

// Whether every row of `cols` values of each buffer starts 16-byte aligned, so that packs
// may be accessed as vectors. The same for the whole grid: a uniform branch.
template <typename... P>
__device__ __forceinline__ bool packable(int cols, const P*... rows) {
  return cols % PACK == 0 && ((reinterpret_cast<size_t>(rows) % 16 == 0) && ...);
}

__device__ __forceinline__ void unpack_bf16x2(unsigned w, float* out) {
  out[0] = __bfloat162float(__ushort_as_bfloat16((unsigned short)(w & 0xffffu)));
  out[1] = __bfloat162float(__ushort_as_bfloat16((unsigned short)(w >> 16)));
}

__device__ __forceinline__ unsigned pack_bf16x2_rn(float lo, float hi) {
  return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
         (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16;
}

// The aligned PACK values at p as floats.
template <typename T> __device__ __forceinline__ void load_vector(const T* p, float (&v)[PACK]);
template <> __device__ __forceinline__ void load_vector<float>(const float* p, float (&v)[PACK]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <> __device__ __forceinline__ void load_vector<bf16>(const bf16* p, float (&v)[PACK]) {
  const uint4 w = *reinterpret_cast<const uint4*>(p);
  unpack_bf16x2(w.x, v), unpack_bf16x2(w.y, v + 2), unpack_bf16x2(w.z, v + 4), unpack_bf16x2(w.w, v + 6);
}
template <>
__device__ __forceinline__ void load_vector<unsigned char>(const unsigned char* p, float (&v)[PACK]) {
  const uint2 w = *reinterpret_cast<const uint2*>(p);
  for (int k = 0; k < 4; ++k) v[k] = (float)((w.x >> (8 * k)) & 0xffu);
  for (int k = 0; k < 4; ++k) v[4 + k] = (float)((w.y >> (8 * k)) & 0xffu);
}

// Stores PACK floats as T at the aligned p, rounding to nearest even.
template <typename T> __device__ __forceinline__ void store_vector(T* p, const float (&v)[PACK]);
template <> __device__ __forceinline__ void store_vector<float>(float* p, const float (&v)[PACK]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <> __device__ __forceinline__ void store_vector<bf16>(bf16* p, const float (&v)[PACK]) {
  *reinterpret_cast<uint4*>(p) = make_uint4(pack_bf16x2_rn(v[0], v[1]), pack_bf16x2_rn(v[2], v[3]),
                                            pack_bf16x2_rn(v[4], v[5]), pack_bf16x2_rn(v[6], v[7]));
}

// The n (<= PACK) values at p as floats, zeros after them; one vector access when `vec`.
template <typename T>
__device__ __forceinline__ void load_pack(const T* p, int n, bool vec, float (&v)[PACK]) {
  if (vec && n == PACK) {
    load_vector(p, v);
    return;
  }
  for (int k = 0; k < PACK; ++k) v[k] = k < n ? to_float(p[k]) : 0.0f;
}

// Stores the first n (<= PACK) values of v at p as T; one vector access when `vec`.
template <typename T>
__device__ __forceinline__ void store_pack(T* p, int n, bool vec, const float (&v)[PACK]) {
  if (vec && n == PACK) {
    store_vector(p, v);
    return;
  }
  for (int k = 0; k < PACK; ++k)
    if (k < n) p[k] = from_float<T>(v[k]);
}

// ---- the 2-D grid of the row-wise kernels ----
//
// Block (bx, ry): threadIdx.x picks a pack of the row (bx a multiple of 32, so a warp never
// spans two rows), threadIdx.y one of ry rows handled side by side. Grid (gx, gy):
// blockIdx.x picks the block's bx packs of the row, blockIdx.y the rows (a grid stride, or a
// chunk of rows for a reduction). The column of every value is known from the thread's
// coordinates, so no kernel divides a flat index by the width.

// The columns [col, col + n) of this thread; n <= 0 for a thread past the end of the row.
struct ColumnPack {
  int col;
  int n;
};

__device__ __forceinline__ ColumnPack column_pack(int cols) {
  const int col = (int)(blockIdx.x * blockDim.x + threadIdx.x) * PACK;
  return {col, min(PACK, cols - col)};
}

// Rows of this thread in a grid-stride launch over rows: threadIdx.y + blockDim.y *
// blockIdx.y, stepping by blockDim.y * gridDim.y.
#define FOR_EACH_ROW(row, rows)                                                            \
  for (int row = (int)(blockIdx.y * blockDim.y + threadIdx.y); row < (rows);              \
       row += (int)(gridDim.y * blockDim.y))

// The first index of each of this thread's packs in a flat 1-D grid-stride launch over n
// values; the pack at `at` holds min(PACK, n - at) of them.
#define FOR_EACH_PACK(at, n)                                                               \
  for (long long at = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * PACK; at < (n); \
       at += (long long)gridDim.x * blockDim.x * PACK)

// Values in the pack starting at `at` of a flat buffer of n.
__device__ __forceinline__ int pack_count(long long n, long long at) {
  return n - at < PACK ? (int)(n - at) : PACK;
}

// Rows [begin, end) of chunk blockIdx.y, rows_per_chunk rows each (the last may be short).
struct RowChunk {
  int begin;
  int end;
};

__device__ __forceinline__ RowChunk row_chunk(int rows, int rows_per_chunk) {
  const int begin = (int)blockIdx.y * rows_per_chunk;
  return {begin, min(rows, begin + rows_per_chunk)};
}

// Sums acc over the block's ry row groups in the order threadIdx.y = 0, 1, ... and adds
// nothing else: a fixed order, so the chunk's partial sums repeat bit for bit. Thread
// (x, 0) gets the total of its pack; the others get garbage. Every thread of the block
// must call it; blockDim.x * blockDim.y <= 256 whenever blockDim.y > 1.
__device__ __forceinline__ void sum_row_groups(float (&acc)[PACK]) {
  if (blockDim.y == 1) return;
  __shared__ float staged[256 * PACK];
  float* mine = staged + (threadIdx.y * blockDim.x + threadIdx.x) * PACK;
  __syncthreads();  // a previous call's readers are done with `staged`
  for (int k = 0; k < PACK; ++k) mine[k] = acc[k];
  __syncthreads();
  if (threadIdx.y != 0) return;
  for (unsigned y = 1; y < blockDim.y; ++y) {
    const float* other = staged + (y * blockDim.x + threadIdx.x) * PACK;
    for (int k = 0; k < PACK; ++k) acc[k] += other[k];
  }
}

// Writes the chunk's column partial sums: partial [chunks, cols] row blockIdx.y at the
// thread's pack. Every thread of the block must call it.
__device__ __forceinline__ void store_chunk_partial(float (&acc)[PACK], float* partial, int cols,
                                                    ColumnPack p) {
  sum_row_groups(acc);
  if (threadIdx.y == 0 && p.n > 0) {
    store_pack(partial + (size_t)blockIdx.y * cols + p.col, p.n, packable(cols, partial), acc);
  }
}

// Sums a and b over the threads of this thread's row group (the blockDim.x threads with its
// threadIdx.y), each total to every one of them. The warp totals are added in warp order,
// so the sums are deterministic and identical across the row. Every thread of the block
// must call it; at most 32 warps.
__device__ __forceinline__ float2 row_sum2(float a, float b) {
  __shared__ float2 warp_totals[32];
  const int warps_per_row = (int)(blockDim.x >> 5);
  const int first = (int)threadIdx.y * warps_per_row;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // the previous call's readers are done with warp_totals
  if ((threadIdx.x & 31) == 0) warp_totals[first + (threadIdx.x >> 5)] = make_float2(a, b);
  __syncthreads();
  float2 total = make_float2(0.0f, 0.0f);
  for (int w = first; w < first + warps_per_row; ++w) {
    total.x += warp_totals[w].x;
    total.y += warp_totals[w].y;
  }
  return total;
}
