// Fused window attention for short sequences in bf16: T = 1 + K² ≤ 64 tokens (K ≤ 7, the
// vit_base case K = 7, T = 50, d = 64 among them), tensor cores through mma.sync.
//
// forward:  qkv [S, T, 3D] bf16, table [(2K-1)²+3, h] f32 -> out [S, T, D] bf16, lse [S, h, T] f32
// backward: qkv, out, dout [S, T, D] bf16, lse, table -> dqkv [S, T, 3D] bf16 (overwritten),
//           partials [h, gridDim.x, (2K-1)²+3] f32 (this CTA's share of dtable, overwritten)
//
// Why it is shaped this way (vit_base on an H200: 12 288 (sequence, head) items of 50×64,
// ~10× off the memory roof with one item per CTA and synchronous loads):
// - Grid (C, h). A CTA serves one head and walks the sequences blockIdx.x, +C, +2C, …, so
//   its bias tile is expanded once, into registers, pre-multiplied by log2(e), −inf for
//   padded keys. While one item computes, the next item's matrices stream into the other
//   of two shared-memory stages with cp.async (16-byte pieces, zero-filled past T).
// - Tokens are padded to Tp = 16·TILES; warp w owns query rows 16w..16w+15 (TILES warps).
//   S = Q·Kᵀ stays in mma accumulators, becomes P in place (exp2, the scale folded into
//   log2(e)/√d), and is re-packed as the A operand of P·V; row max and sum take two quad
//   shuffles. Outputs go back through the warp's own rows of the stage for 16-byte stores.
// - The backward is one pass: P from the saved lse, dP = dO·Vᵀ, dS = P ⊙ (dP − delta) stay
//   in registers; dQ = dS·K from those; P and dS are staged once in shared memory for
//   dV = Pᵀ·dO and dK = dSᵀ·Q, where warp w owns key rows 16w... delta = rowsum(dO ⊙ O)
//   comes from 16-byte reads of the staged O and dO.
// - The table gradient is deterministic: each thread sums its fixed (query, key) cells of
//   dS over the CTA's items in registers, the CTA folds the T×T sums into table rows in a
//   fixed order, and attention_dtable_finish adds the CTAs' partials in order. No atomics.
// K, T and the sequence count are run-time values: they are used only when the bias is
// expanded (once per CTA), in loop bounds and in address arithmetic without division.
#pragma once

#include "attention_mma.cuh"

namespace attn {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

template <int TILES, int HEAD_DIM>
struct FastShape {
    static_assert(TILES >= 1 && TILES <= 4 && HEAD_DIM % 16 == 0, "Tp = 16·TILES ≤ 64, d a multiple of 16");
    static constexpr int TP = 16 * TILES;         // padded tokens
    static constexpr int THREADS = 32 * TILES;    // a warp per 16 query rows
    static constexpr int LD = HEAD_DIM + 8;       // row stride of a staged matrix: 16 bytes of pad
    static constexpr int MATRIX = TP * LD;        // elements of one staged matrix
    static constexpr int KEY_TILES = TP / 8;      // n-tiles of S
    static constexpr int DIM_TILES = HEAD_DIM / 8;  // n-tiles of an output row block
    static constexpr int PIECES = HEAD_DIM / 8;   // 16-byte pieces of a row
    static constexpr int PLD = TP + 8;            // row stride of the staged P and dS
};

// Where one (sequence, head) item starts in each tensor.
struct ItemRows {
    size_t qkv, o, lse;
    __device__ ItemRows(int seq, int head, int tokens, int heads, int head_dim) {
        const size_t row0 = static_cast<size_t>(seq) * tokens;
        qkv = row0 * 3 * heads * head_dim + static_cast<size_t>(head) * head_dim;
        o = row0 * heads * head_dim + static_cast<size_t>(head) * head_dim;
        lse = (static_cast<size_t>(seq) * heads + head) * tokens;
    }
};

// Starts copying rows [0, Tp) of one item's matrix into a stage slot (rows past `tokens`
// zero-filled): row r is at src + r·ld.
template <class S>
__device__ __forceinline__ void prefetch(bf16* slot, const bf16* src, size_t ld, int tokens) {
    static_assert(S::TP * S::PIECES % S::THREADS == 0, "every thread copies the same number of pieces");
#pragma unroll
    for (int n = 0; n < S::TP * S::PIECES / S::THREADS; ++n) {
        const int p = n * S::THREADS + threadIdx.x, r = p / S::PIECES, c = p % S::PIECES * 8;
        const bool valid = r < tokens;
        cp_async_16(slot + r * S::LD + c, src + (valid ? r : 0) * ld + c, valid);
    }
}

// This thread's cells of the head's bias tile, times log2(e): row = query 16·warp + g
// (+8 for i ≥ 2), column = key 8·nt + 2t + i%2. Padded keys get −inf (probability 0);
// padded queries 0, so their rows stay finite (they are never stored).
template <class S>
__device__ __forceinline__ void expand_bias(float (&bias)[S::KEY_TILES][4], const float* table, int window,
                                            int tokens, int heads, int head, int warp, int lane) {
#pragma unroll
    for (int nt = 0; nt < S::KEY_TILES; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = 16 * warp + lane / 4 + 8 * (i / 2), col = 8 * nt + 2 * (lane % 4) + i % 2;
            bias[nt][i] = col >= tokens ? -INFINITY
                          : row >= tokens ? 0.0f
                                          : table[rel_index(row, col, window) * heads + head] * LOG2E;
        }
}

// acc[nt] += A·B over k = 0..HEAD_DIM for the warp's 16 rows of `a` and all Tp rows of
// `b` as n (S = Q·Kᵀ, dP = dO·Vᵀ).
template <class S, int HEAD_DIM>
__device__ __forceinline__ void rows_times_all_rows(float (&acc)[S::KEY_TILES][4], const bf16* a, const bf16* b,
                                                    int warp, int lane) {
#pragma unroll
    for (int k0 = 0; k0 < HEAD_DIM; k0 += 16) {
        uint32_t fa[4];
        load_a(fa, a, S::LD, 16 * warp, k0, lane);
#pragma unroll
        for (int n0 = 0; n0 < S::TP; n0 += 16) {
            uint32_t b0[2], b1[2];
            load_b_pair_by_n(b0, b1, b, S::LD, n0, k0, lane);
            mma_bf16_16816(acc[n0 / 8], fa, b0);
            mma_bf16_16816(acc[n0 / 8 + 1], fa, b1);
        }
    }
}

// acc += A·M where A (16 × Tp) comes from `a_of(kk)` for each 16-column block kk and M
// (Tp × HEAD_DIM) is a staged matrix with one row per k (O = P·V, dQ = dS·K, dV = Pᵀ·dO,
// dK = dSᵀ·Q).
template <class S, int HEAD_DIM, class AOf>
__device__ __forceinline__ void times_matrix(float (&acc)[S::DIM_TILES][4], AOf a_of, const bf16* m, int lane) {
#pragma unroll
    for (int kk = 0; kk < S::TP / 16; ++kk) {
        uint32_t fa[4];
        a_of(fa, kk);
#pragma unroll
        for (int n0 = 0; n0 < HEAD_DIM; n0 += 16) {
            uint32_t b0[2], b1[2];
            load_b_pair_by_k(b0, b1, m, S::LD, 16 * kk, n0, lane);
            mma_bf16_16816(acc[n0 / 8], fa, b0);
            mma_bf16_16816(acc[n0 / 8 + 1], fa, b1);
        }
    }
}

// Writes scale·acc (the warp's 16 rows × HEAD_DIM) into rows 16·warp.. of `staging` (a
// stage matrix only this warp touches now), then copies the rows below `tokens` to global
// `dst` (row stride ld) in 16-byte pieces.
template <class S>
__device__ __forceinline__ void store_rows(bf16* dst, size_t ld, const float (&acc)[S::DIM_TILES][4],
                                           const float (&row_scale)[2], bf16* staging, int tokens, int warp,
                                           int lane) {
    bf16* rows = staging + 16 * warp * S::LD;
#pragma unroll
    for (int nt = 0; nt < S::DIM_TILES; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            *reinterpret_cast<uint32_t*>(rows + (lane / 4 + 8 * h) * S::LD + 8 * nt + 2 * (lane % 4)) =
                pack_bf16x2(acc[nt][2 * h] * row_scale[h], acc[nt][2 * h + 1] * row_scale[h]);
    __syncwarp();
#pragma unroll
    for (int n = 0; n < S::PIECES / 2; ++n) {
        const int p = 32 * n + lane, r = p / S::PIECES, c = p % S::PIECES * 8, token = 16 * warp + r;
        if (token < tokens)
            *reinterpret_cast<uint4*>(dst + token * ld + c) = *reinterpret_cast<const uint4*>(rows + r * S::LD + c);
    }
}

template <int TILES, int HEAD_DIM>
__device__ void fast_forward(const bf16* __restrict__ qkv, const float* __restrict__ table, bf16* __restrict__ out,
                             float* __restrict__ lse, int seqs, int window, int heads) {
    using S = FastShape<TILES, HEAD_DIM>;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, head = blockIdx.y;
    const int tokens = window * window + 1, width = heads * HEAD_DIM;
    const size_t qkv_ld = 3 * static_cast<size_t>(width);
    bf16* stages = reinterpret_cast<bf16*>(dynamic_smem());  // [2][q, k, v][Tp][LD]
    if (dynamic_smem_size() < 2 * 3 * S::MATRIX * sizeof(bf16)) __trap();

    float bias[S::KEY_TILES][4];
    expand_bias<S>(bias, table, window, tokens, heads, head, warp, lane);
    const float logit_scale = LOG2E / sqrtf(static_cast<float>(HEAD_DIM));

    auto fetch = [&](int seq, bf16* stage) {
        const bf16* q = qkv + ItemRows(seq, head, tokens, heads, HEAD_DIM).qkv;
#pragma unroll
        for (int m = 0; m < 3; ++m) prefetch<S>(stage + m * S::MATRIX, q + m * width, qkv_ld, tokens);
        cp_async_commit();
    };
    if (blockIdx.x < seqs) fetch(blockIdx.x, stages);
    for (int seq = blockIdx.x, it = 0; seq < seqs; seq += gridDim.x, ++it) {
        bf16* stage = stages + it % 2 * 3 * S::MATRIX;
        cp_async_wait<0>();
        // Every thread's copies of this item have landed, and every warp is done with the
        // other stage, which the next item's copies now overwrite.
        __syncthreads();
        if (seq + gridDim.x < seqs) fetch(seq + gridDim.x, stages + (it + 1) % 2 * 3 * S::MATRIX);
        bf16 *q = stage, *k = stage + S::MATRIX, *v = stage + 2 * S::MATRIX;
        const ItemRows at(seq, head, tokens, heads, HEAD_DIM);

        float s[S::KEY_TILES][4] = {};
        rows_times_all_rows<S, HEAD_DIM>(s, q, k, warp, lane);
        float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < S::KEY_TILES; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                s[nt][i] = fmaf(s[nt][i], logit_scale, bias[nt][i]);
                row_max[i / 2] = fmaxf(row_max[i / 2], s[nt][i]);
            }
        float row_sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int h = 0; h < 2; ++h) row_max[h] = quad_max(row_max[h]);
#pragma unroll
        for (int nt = 0; nt < S::KEY_TILES; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                s[nt][i] = exp2f(s[nt][i] - row_max[i / 2]);
                row_sum[i / 2] += s[nt][i];
            }
        float inv_sum[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            row_sum[h] = quad_sum(row_sum[h]);
            inv_sum[h] = __fdividef(1.0f, row_sum[h]);  // row_sum ≥ 1 (its max term is 1): no slow path
            const int token = 16 * warp + lane / 4 + 8 * h;
            if (lane % 4 == 0 && token < tokens)
                lse[at.lse + token] = (row_max[h] + log2f(row_sum[h])) * LN2;
        }

        uint32_t p[S::TP / 16][4];  // P as bf16 A operands: half the registers of s
#pragma unroll
        for (int kk = 0; kk < S::TP / 16; ++kk) accumulators_as_a(p[kk], s, kk);
        float o[S::DIM_TILES][4] = {};
        times_matrix<S, HEAD_DIM>(o, [&](uint32_t(&a)[4], int kk) { copy4(a, p[kk]); }, v, lane);
        // Only this warp ever reads its query rows, so they stage its output.
        store_rows<S>(out + at.o, width, o, inv_sum, q, tokens, warp, lane);
    }
}

// Σ grid[i·ld + j] over the token pairs (i, j) whose bias-table row is r, in a fixed order.
__device__ __forceinline__ float table_row_sum(const float* grid, int ld, int r, int window) {
    const int span = 2 * window - 1, patch_rows = span * span, tokens = window * window + 1;
    float sum = 0.0f;
    if (r == patch_rows) {
        for (int j = 1; j < tokens; ++j) sum += grid[j];
    } else if (r == patch_rows + 1) {
        for (int i = 1; i < tokens; ++i) sum += grid[i * ld];
    } else if (r == patch_rows + 2) {
        sum = grid[0];
    } else {
        const int dy = r / span - (window - 1), dx = r % span - (window - 1);
        for (int yi = max(0, dy); yi < min(window, window + dy); ++yi)
            for (int xi = max(0, dx); xi < min(window, window + dx); ++xi)
                sum += grid[(1 + yi * window + xi) * ld + 1 + (yi - dy) * window + (xi - dx)];
    }
    return sum;
}

template <int TILES, int HEAD_DIM>
__device__ void fast_backward(const bf16* __restrict__ qkv, const float* __restrict__ table,
                              const bf16* __restrict__ out, const bf16* __restrict__ dout,
                              const float* __restrict__ lse, bf16* __restrict__ dqkv,
                              float* __restrict__ partials, int seqs, int window, int heads) {
    using S = FastShape<TILES, HEAD_DIM>;
    constexpr int STAGE = 5 * S::MATRIX;  // q, k, v, o, do
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, head = blockIdx.y;
    const int tokens = window * window + 1, width = heads * HEAD_DIM;
    const size_t qkv_ld = 3 * static_cast<size_t>(width);
    bf16* stages = reinterpret_cast<bf16*>(dynamic_smem());  // [2][STAGE]
    bf16* p_staged = stages + 2 * STAGE;                     // [Tp][PLD], rows = queries
    bf16* ds_staged = p_staged + S::TP * S::PLD;
    if (dynamic_smem_size() < (2 * STAGE + 2 * S::TP * S::PLD) * sizeof(bf16)) __trap();

    float bias[S::KEY_TILES][4];
    expand_bias<S>(bias, table, window, tokens, heads, head, warp, lane);
    float dbias[S::KEY_TILES][4] = {};
    const float scale = 1.0f / sqrtf(static_cast<float>(HEAD_DIM)), logit_scale = scale * LOG2E;

    // The lse of this thread's two rows, times log2(e); +inf for padded rows makes P = 0.
    auto row_lse = [&](int seq, float (&out2)[2]) {
        const size_t at = ItemRows(seq, head, tokens, heads, HEAD_DIM).lse;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int token = 16 * warp + lane / 4 + 8 * h;
            out2[h] = token < tokens ? lse[at + token] * LOG2E : INFINITY;
        }
    };
    auto fetch = [&](int seq, bf16* stage) {
        const ItemRows at(seq, head, tokens, heads, HEAD_DIM);
#pragma unroll
        for (int m = 0; m < 3; ++m) prefetch<S>(stage + m * S::MATRIX, qkv + at.qkv + m * width, qkv_ld, tokens);
        prefetch<S>(stage + 3 * S::MATRIX, out + at.o, width, tokens);
        prefetch<S>(stage + 4 * S::MATRIX, dout + at.o, width, tokens);
        cp_async_commit();
    };
    float lse2[2], next_lse2[2] = {0.0f, 0.0f};
    if (blockIdx.x < seqs) {
        fetch(blockIdx.x, stages);
        row_lse(blockIdx.x, next_lse2);
    }
    for (int seq = blockIdx.x, it = 0; seq < seqs; seq += gridDim.x, ++it) {
        bf16* stage = stages + it % 2 * STAGE;
        lse2[0] = next_lse2[0], lse2[1] = next_lse2[1];
        cp_async_wait<0>();
        // This item's copies have landed everywhere; the previous item is finished by all
        // warps (its stage, P and dS are free).
        __syncthreads();
        if (seq + gridDim.x < seqs) {
            fetch(seq + gridDim.x, stages + (it + 1) % 2 * STAGE);
            row_lse(seq + gridDim.x, next_lse2);
        }
        bf16 *q = stage, *k = q + S::MATRIX, *v = k + S::MATRIX, *o = v + S::MATRIX, *d_o = o + S::MATRIX;

        // delta of row 16·warp + lane/2 from this lane's half of the row, 8 elements a read.
        float dot = 0.0f;
#pragma unroll
        for (int c = lane % 2 * S::PIECES / 2; c < (lane % 2 + 1) * S::PIECES / 2; ++c) {
            const int at = (16 * warp + lane / 2) * S::LD + 8 * c;
            const uint4 ov = *reinterpret_cast<const uint4*>(o + at), dv = *reinterpret_cast<const uint4*>(d_o + at);
            const bf16* oe = reinterpret_cast<const bf16*>(&ov);
            const bf16* de = reinterpret_cast<const bf16*>(&dv);
#pragma unroll
            for (int e = 0; e < 8; ++e) dot = fmaf(to_float(oe[e]), to_float(de[e]), dot);
        }
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        const float delta[2] = {__shfl_sync(0xffffffffu, dot, 2 * (lane / 4)),
                                __shfl_sync(0xffffffffu, dot, 2 * (lane / 4) + 16)};

        float p[S::KEY_TILES][4] = {}, ds[S::KEY_TILES][4] = {};
        rows_times_all_rows<S, HEAD_DIM>(p, q, k, warp, lane);
        rows_times_all_rows<S, HEAD_DIM>(ds, d_o, v, warp, lane);
#pragma unroll
        for (int nt = 0; nt < S::KEY_TILES; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                p[nt][i] = exp2f(fmaf(p[nt][i], logit_scale, bias[nt][i]) - lse2[i / 2]);
                ds[nt][i] = p[nt][i] * (ds[nt][i] - delta[i / 2]);
                dbias[nt][i] += ds[nt][i];
            }
        // dS as bf16 A operands; the same pairs are its staged rows, as are P's.
        uint32_t ds_a[S::TP / 16][4];
#pragma unroll
        for (int kk = 0; kk < S::TP / 16; ++kk) {
            uint32_t p_a[4];
            accumulators_as_a(p_a, p, kk);
            accumulators_as_a(ds_a[kk], ds, kk);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                // a[j] holds row g + 8(j%2), columns 16kk + 8(j/2) + 2t..+1 (ptx.cuh).
                const int at = (16 * warp + lane / 4 + 8 * (j % 2)) * S::PLD + 16 * kk + 8 * (j / 2) + 2 * (lane % 4);
                *reinterpret_cast<uint32_t*>(p_staged + at) = p_a[j];
                *reinterpret_cast<uint32_t*>(ds_staged + at) = ds_a[kk][j];
            }
        }

        float dq[S::DIM_TILES][4] = {};
        times_matrix<S, HEAD_DIM>(dq, [&](uint32_t(&a)[4], int kk) { copy4(a, ds_a[kk]); }, k, lane);
        // Every warp's P and dS rows are staged, and every warp is done with K and V: each
        // stages its outputs in its own rows of them (Q and dO are still being read).
        __syncthreads();
        const ItemRows at(seq, head, tokens, heads, HEAD_DIM);
        const float scaled[2] = {scale, scale}, unscaled[2] = {1.0f, 1.0f};
        store_rows<S>(dqkv + at.qkv, qkv_ld, dq, scaled, k, tokens, warp, lane);
        float dv[S::DIM_TILES][4] = {};
        times_matrix<S, HEAD_DIM>(
            dv, [&](uint32_t(&a)[4], int kk) { load_a_transposed(a, p_staged, S::PLD, 16 * warp, 16 * kk, lane); },
            d_o, lane);
        store_rows<S>(dqkv + at.qkv + 2 * width, qkv_ld, dv, unscaled, v, tokens, warp, lane);
        float dk[S::DIM_TILES][4] = {};
        times_matrix<S, HEAD_DIM>(
            dk, [&](uint32_t(&a)[4], int kk) { load_a_transposed(a, ds_staged, S::PLD, 16 * warp, 16 * kk, lane); },
            q, lane);
        // The warp's K rows are free again once its dQ rows have been copied out.
        __syncwarp();
        store_rows<S>(dqkv + at.qkv + width, qkv_ld, dk, scaled, k, tokens, warp, lane);
    }

    // Fold the CTA's T×T sums of dS into table rows: through shared memory (every stage is
    // free once all warps are past their last stores), then a fixed order per row.
    __syncthreads();
    float* grid = reinterpret_cast<float*>(stages);
    constexpr int GLD = S::TP + 1;
#pragma unroll
    for (int nt = 0; nt < S::KEY_TILES; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
            grid[(16 * warp + lane / 4 + 8 * (i / 2)) * GLD + 8 * nt + 2 * (lane % 4) + i % 2] = dbias[nt][i];
    __syncthreads();
    const int rows = (2 * window - 1) * (2 * window - 1) + 3;
    float* mine = partials + (static_cast<size_t>(head) * gridDim.x + blockIdx.x) * rows;
    for (int r = threadIdx.x; r < rows; r += S::THREADS) mine[r] = table_row_sum(grid, GLD, r, window);
}

}  // namespace attn
