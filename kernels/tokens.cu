// Token assembly (docs/DESIGN.md §1.2) and the masked-token gather for the head, each with its
// backward. The residual stream is fp32 in both precisions.
//
// pos_slot[s*K² + i] is the visible row of window position i (>= 0) or -(1 + masked row).
#include "common.cuh"

// forward: emb [S*V, D] T, patch_bias [D], cls [D], mask_token [D] -> x [S, 1+K², D] f32
// Token 0 is cls; token 1+i is the embedded patch (plus its bias) or the mask token.
// One block per token row.
template <typename T>
__device__ void assemble_tokens_forward(const T* emb, const float* patch_bias, const float* cls,
                                        const float* mask_token, const int* pos_slot, float* x,
                                        int seq_len, int width) {
  const int row = blockIdx.x;
  const int s = row / seq_len;
  const int t = row % seq_len;
  float* out = x + (size_t)row * width;
  if (t == 0) {
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[c] = cls[c];
    return;
  }
  const int slot = pos_slot[s * (seq_len - 1) + t - 1];
  if (slot < 0) {
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[c] = mask_token[c];
    return;
  }
  const T* in = emb + (size_t)slot * width;
  for (int c = threadIdx.x; c < width; c += blockDim.x) out[c] = to_float(in[c]) + patch_bias[c];
}

#define EXPORT_ASSEMBLE_TOKENS_FORWARD(T, SUFFIX)                                           \
  extern "C" __global__ void assemble_tokens_forward_##SUFFIX(                              \
      const T* emb, const float* patch_bias, const float* cls, const float* mask_token,     \
      const int* pos_slot, float* x, int seq_len, int width) {                              \
    assemble_tokens_forward<T>(emb, patch_bias, cls, mask_token, pos_slot, x, seq_len,      \
                               width);                                                      \
  }
EXPORT_ASSEMBLE_TOKENS_FORWARD(float, f32)
EXPORT_ASSEMBLE_TOKENS_FORWARD(bf16, bf16)

// backward: dx [S, 1+K², D] f32 -> demb [S*V, D] T (written), and per chunk of sequences the
// partial sums partial [3, chunks, D] f32: d cls, d mask_token, d patch_bias (the sum over
// visible tokens). A second pass (partials_finish) adds the chunks in a fixed order.
// Grid (ceil(D / blockDim.x), chunks): one thread per column and chunk.
template <typename T>
__device__ void assemble_tokens_backward(const float* dx, const int* pos_slot, T* demb,
                                         float* partial, int seqs, int seq_len, int width,
                                         int seqs_per_chunk) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= width) return;
  const int chunk = blockIdx.y;
  const int chunks = gridDim.y;
  const int s_end = min(seqs, (chunk + 1) * seqs_per_chunk);
  float d_cls = 0.0f, d_mask = 0.0f, d_bias = 0.0f;
  for (int s = chunk * seqs_per_chunk; s < s_end; ++s) {
    const float* seq = dx + (size_t)s * seq_len * width + c;
    d_cls += seq[0];
    for (int t = 1; t < seq_len; ++t) {
      const float g = seq[(size_t)t * width];
      const int slot = pos_slot[s * (seq_len - 1) + t - 1];
      if (slot >= 0) {
        demb[(size_t)slot * width + c] = from_float<T>(g);
        d_bias += g;
      } else {
        d_mask += g;
      }
    }
  }
  partial[(size_t)(0 * chunks + chunk) * width + c] = d_cls;
  partial[(size_t)(1 * chunks + chunk) * width + c] = d_mask;
  partial[(size_t)(2 * chunks + chunk) * width + c] = d_bias;
}

#define EXPORT_ASSEMBLE_TOKENS_BACKWARD(T, SUFFIX)                                          \
  extern "C" __global__ void assemble_tokens_backward_##SUFFIX(                             \
      const float* dx, const int* pos_slot, T* demb, float* partial, int seqs, int seq_len, \
      int width, int seqs_per_chunk) {                                                      \
    assemble_tokens_backward<T>(dx, pos_slot, demb, partial, seqs, seq_len, width,          \
                                seqs_per_chunk);                                            \
  }
EXPORT_ASSEMBLE_TOKENS_BACKWARD(float, f32)
EXPORT_ASSEMBLE_TOKENS_BACKWARD(bf16, bf16)

// forward: x [S, 1+K², D] f32, mask_index [S, M] u32 -> xm [S*M, D] f32, the masked tokens
// in the order of the loss targets. One block per masked row.
extern "C" __global__ void gather_masked_tokens(const float* x, const unsigned* mask_index,
                                                float* xm, int masked, int seq_len,
                                                int width) {
  const int r = blockIdx.x;
  const int s = r / masked;
  const int token = 1 + (int)mask_index[r];
  const float* in = x + ((size_t)s * seq_len + token) * width;
  float* out = xm + (size_t)r * width;
  for (int c = threadIdx.x; c < width; c += blockDim.x) out[c] = in[c];
}

// backward: dxm [S*M, D] f32 -> dx [S, 1+K², D] f32 (+=). Masked rows are distinct, so no two
// blocks touch the same row.
extern "C" __global__ void scatter_masked_tokens(const float* dxm, const unsigned* mask_index,
                                                 float* dx, int masked, int seq_len,
                                                 int width) {
  const int r = blockIdx.x;
  const int s = r / masked;
  const int token = 1 + (int)mask_index[r];
  const float* in = dxm + (size_t)r * width;
  float* out = dx + ((size_t)s * seq_len + token) * width;
  for (int c = threadIdx.x; c < width; c += blockDim.x) out[c] += in[c];
}

// MAE's token placement (docs/DESIGN.md §7.2), the encoder's input and the decoder's: row r of
// x [R, D] f32 is source row slot[r] of src [R_src, D] T plus bias, or the row `fill` where
// slot[r] < 0, and then plus the position row pos[pos_row[r]] of pos [*, D] f32.
// Encoder: src the embedded kept patches, fill cls. Decoder: src decoder_embed's output (cls
// row included), fill mask_token. One block per row.
template <typename T>
__device__ void place_tokens_forward(const T* src, const float* bias, const float* fill, const float* pos,
                                     const int* slot, const int* pos_row, float* x, int width) {
  const int row = blockIdx.x;
  const int from = slot[row];
  const float* p = pos + (size_t)pos_row[row] * width;
  float* out = x + (size_t)row * width;
  if (from < 0) {
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[c] = fill[c] + p[c];
    return;
  }
  const T* in = src + (size_t)from * width;
  for (int c = threadIdx.x; c < width; c += blockDim.x) out[c] = (to_float(in[c]) + bias[c]) + p[c];
}

#define EXPORT_PLACE_TOKENS_FORWARD(T, SUFFIX)                                                     \
  extern "C" __global__ void place_tokens_forward_##SUFFIX(const T* src, const float* bias,       \
                                                           const float* fill, const float* pos,  \
                                                           const int* slot, const int* pos_row,  \
                                                           float* x, int width) {                \
    place_tokens_forward<T>(src, bias, fill, pos, slot, pos_row, x, width);                       \
  }
EXPORT_PLACE_TOKENS_FORWARD(float, f32)
EXPORT_PLACE_TOKENS_FORWARD(bf16, bf16)

// backward: dx [R, D] f32 -> dsrc [R_src, D] T (written: every source row is some row's slot,
// exactly once), and per chunk of rows the partial sums partial [2, chunks, D] f32: d fill (rows
// with slot < 0), d bias (the others). The positions are fixed: no gradient. A second pass
// (partials_finish) adds the chunks in a fixed order. Grid (ceil(D / blockDim.x), chunks): one
// thread per column and chunk.
template <typename T>
__device__ void place_tokens_backward(const float* dx, const int* slot, T* dsrc, float* partial, int rows,
                                      int width, int rows_per_chunk) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= width) return;
  const int chunk = blockIdx.y;
  const int chunks = gridDim.y;
  const int r_end = min(rows, (chunk + 1) * rows_per_chunk);
  float d_fill = 0.0f, d_bias = 0.0f;
  for (int r = chunk * rows_per_chunk; r < r_end; ++r) {
    const float g = dx[(size_t)r * width + c];
    const int from = slot[r];
    if (from < 0) {
      d_fill += g;
    } else {
      dsrc[(size_t)from * width + c] = from_float<T>(g);
      d_bias += g;
    }
  }
  partial[(size_t)(0 * chunks + chunk) * width + c] = d_fill;
  partial[(size_t)(1 * chunks + chunk) * width + c] = d_bias;
}

#define EXPORT_PLACE_TOKENS_BACKWARD(T, SUFFIX)                                                    \
  extern "C" __global__ void place_tokens_backward_##SUFFIX(const float* dx, const int* slot,     \
                                                            T* dsrc, float* partial, int rows,    \
                                                            int width, int rows_per_chunk) {      \
    place_tokens_backward<T>(dx, slot, dsrc, partial, rows, width, rows_per_chunk);               \
  }
EXPORT_PLACE_TOKENS_BACKWARD(float, f32)
EXPORT_PLACE_TOKENS_BACKWARD(bf16, bf16)
