// Deterministic reductions: column sums (bias gradients) and sums of squares (the global
// gradient norm). Each is two passes, partial sums in a fixed layout then a fixed-order
// finish, so a run repeats bit for bit and never needs float atomics.
#include "common.cuh"

// First pass of a column sum: x [N, C] T -> partial [chunks, C] f32, the sum of each chunk
// of rows_per_chunk rows. Grid (ceil(C / blockDim.x), chunks), one thread per column and
// chunk.
template <typename T>
__device__ void column_sum(const T* x, float* partial, int rows, int cols, int rows_per_chunk) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const int chunk = blockIdx.y;
  const int row_end = min(rows, (chunk + 1) * rows_per_chunk);
  float sum = 0.0f;
  for (int row = chunk * rows_per_chunk; row < row_end; ++row) {
    sum += to_float(x[(size_t)row * cols + c]);
  }
  partial[(size_t)chunk * cols + c] = sum;
}

#define EXPORT_COLUMN_SUM(T, SUFFIX)                                                        \
  extern "C" __global__ void column_sum_##SUFFIX(const T* x, float* partial, int rows,      \
                                                 int cols, int rows_per_chunk) {            \
    column_sum<T>(x, partial, rows, cols, rows_per_chunk);                                  \
  }
EXPORT_COLUMN_SUM(float, f32)
EXPORT_COLUMN_SUM(bf16, bf16)

// Second pass: partial [chunks, C] f32 -> out [C] f32 (+=, gradients accumulate).
extern "C" __global__ void partials_finish(const float* partial, float* out, int chunks,
                                           int cols) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float sum = 0.0f;
  for (int k = 0; k < chunks; ++k) sum += partial[(size_t)k * cols + c];
  out[c] += sum;
}

// First pass of a sum of squares: x [n] f32 -> partial [gridDim.x] f32. Grid-stride, so the
// grid size (not n) fixes the summation order.
extern "C" __global__ void sum_squares_partial(const float* x, long long n, float* partial) {
  float sum = 0.0f;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    sum += x[i] * x[i];
  }
  const float total = block_sum(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// Final pass of any sum: x [n] f32 -> out[0] = scale * sum(x). One block.
extern "C" __global__ void sum_finish(const float* x, int n, float scale, float* out) {
  float sum = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += x[i];
  const float total = block_sum(sum);
  if (threadIdx.x == 0) out[0] = scale * total;
}
