// Deterministic reductions: the fixed-order finish of the column partials other kernels
// leave (bias, LayerNorm parameter gradients), and sums of squares (the global gradient
// norm). Each is two passes, partial sums in a fixed layout then a fixed-order finish, so a
// run repeats bit for bit and never needs float atomics.
#include "common.cuh"
#include "step_state.cuh"

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

// sum(x) over x [n] f32 in one block, in a fixed order, returned to every thread.
__device__ __forceinline__ float block_total(const float* x, int n) {
  float sum = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += x[i];
  return block_sum(sum);
}

// Final pass of any sum: x [n] f32 -> out[0] = scale * sum(x), or out[0] += it when
// `accumulate` (a step's loss sum over its micro-batches). One block.
extern "C" __global__ void sum_finish(const float* x, int n, float scale, int accumulate,
                                      float* out) {
  const float total = block_total(x, n);
  if (threadIdx.x == 0) out[0] = (accumulate ? out[0] : 0.0f) + scale * total;
}

// Final pass of a step's gradient norm, and its divergence guard. One block.
// partial [n] f32 (sum_squares_partial of the gradients), loss_sum [1] f32 (the
// micro-batches' mean losses added up, averaged over the ranks), hyper [HYPER_LEN]
//   -> state [STATE_LEN]: the mean loss, the norm, the clip scale min(clip / norm, 1), and
// the divergence flag, raised when the loss or the norm is not finite and never lowered,
// so AdamW skips this step and every step queued after it.
extern "C" __global__ void step_finish(const float* partial, int n, const float* loss_sum,
                                       const float* hyper, float* state) {
  const float total = block_total(partial, n);
  if (threadIdx.x != 0) return;
  const float loss = __fdiv_rn(loss_sum[0], hyper[HYPER_MICRO_BATCHES]);
  const float norm = __fsqrt_rn(total);
  const bool diverged =
      state[STATE_DIVERGED] != 0.0f || !(isfinite(loss) && isfinite(norm));
  state[STATE_LOSS] = loss;
  state[STATE_NORM] = norm;
  state[STATE_DIVERGED] = diverged ? 1.0f : 0.0f;
  state[STATE_CLIP_SCALE] = fminf(__fdiv_rn(hyper[HYPER_CLIP], norm), 1.0f);
}
