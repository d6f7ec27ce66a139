// Deterministic reductions: the fixed-order finish of the column partials other kernels
// leave (bias, LayerNorm parameter gradients), and sums of squares (the global gradient
// norm). Each is two passes, partial sums in a fixed layout then a fixed-order finish, so a
// run repeats bit for bit and never needs float atomics.
#include "common.cuh"

// Chunks summed side by side per column in partials_finish.
#define FINISH_LANES 8

// Second pass of a column sum: partial [outputs, chunks, C] f32 -> out_k [C] f32 (+=,
// gradients accumulate) for output k = blockIdx.y (out0, out1, out2; outputs <= 3). Grid (ceil(C / 32), outputs),
// block (32, FINISH_LANES): lane y sums chunks y, y + 8, ...; the eight sums of a column are
// then added in lane order, so the order is fixed by the chunk count alone.
extern "C" __global__ void __launch_bounds__(32 * FINISH_LANES)
    partials_finish(const float* partial, float* out0, float* out1, float* out2, int chunks,
                    int cols) {
  __shared__ float lane_sums[FINISH_LANES][32];
  const int c = (int)(blockIdx.x * 32 + threadIdx.x);
  const float* mine = partial + (size_t)blockIdx.y * chunks * cols + c;
  float sum = 0.0f;
  if (c < cols) {
    for (int k = (int)threadIdx.y; k < chunks; k += FINISH_LANES) sum += mine[(size_t)k * cols];
  }
  lane_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  float total = 0.0f;
  for (int y = 0; y < FINISH_LANES; ++y) total += lane_sums[y][threadIdx.x];
  float* out = blockIdx.y == 0 ? out0 : blockIdx.y == 1 ? out1 : out2;
  out[c] += total;
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
