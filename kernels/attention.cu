// Fused windowed multi-head attention with BEiT's relative position bias (docs/DESIGN.md
// §1.2), in two implementations chosen by the launcher (src/cuda/attention.rs):
// - attention_fast.cuh: bf16, T ≤ 64 (K ≤ 7, vit_base's case): several items per CTA,
//   cp.async prefetch, mma.sync with S and P in registers, one-pass backward.
// - this file's general kernels: any K ≤ 14, f32 (the tight-parity reference) or bf16,
//   one thread block per (sequence, head).
// Both write the bias-table gradient as per-CTA partials that attention_dtable_finish adds
// in a fixed order, so the table gradient is bit-reproducible (no float atomics).
//
// general forward:  qkv [S, T, 3D] E, table [(2K-1)²+3, h] f32 -> out [S, T, D] E, lse [S, h, T] f32
// general backward: qkv, table, out, dout [S, T, D] E, lse -> dqkv [S, T, 3D] E (overwritten),
//                   partials [h, S, (2K-1)²+3] f32 (overwritten)
//
// T = 1 + K² tokens, D = h·d. Head `i` owns columns i*d..(i+1)*d of each of q, k, v, out.
// E is float (scalar FMA path) or bf16 (tensor cores through mma.sync m16n8k16 with fp32
// accumulation). All softmax math is fp32.
//
// One thread block per (sequence, head): a head's window sequence (T ≤ 197, d ≤ 128) fits
// in shared memory on its own, and S·h blocks fill every SM.
//
// Tokens are padded to Tp = 16·ceil(T/16) so every matrix is whole 16×16 tiles. Padded
// rows are zero in shared memory, padded keys get probability zero, padded query rows are
// never written back. Each warp owns 16-row tiles (query tiles, or key tiles in the
// backward's second phase); everything a warp writes and another warp reads is separated
// by __syncthreads, everything one lane writes and another lane of the same warp reads by
// __syncwarp.

#include "attention_fast.cuh"

namespace {

using attn::rel_index;

constexpr int TILE = 16;
constexpr int WARP_SIZE = 32;
// The launcher never uses more warps than this (src/cuda/attention.rs, MAX_WARPS).
constexpr int MAX_THREADS = 8 * WARP_SIZE;
// Shared-memory pieces start on 128-byte boundaries (ldmatrix rows need 16).
constexpr unsigned int SMEM_ALIGN = 128;
// Rows of a shared f32 tile strip are padded by 4 floats, rows of E matrices by 16 bytes:
// consecutive rows then start on different banks, and 16-byte vector access still works.
constexpr int F32_PAD = 4;

template <typename E>
constexpr int ROW_PAD = 16 / static_cast<int>(sizeof(E));

__device__ __forceinline__ int round_up(int x, int m) { return (x + m - 1) / m * m; }

__device__ __forceinline__ float warp_max(float x) {
    for (int o = WARP_SIZE / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Hands out pieces of the dynamic shared memory in a fixed order, each rounded up to
// SMEM_ALIGN bytes. The launcher's byte count follows the same order and rounding; the
// kernel traps if the launch gave it less.
struct SmemCursor {
    unsigned int used = 0;

    template <typename T>
    __device__ T* take(int count) {
        T* p = reinterpret_cast<T*>(dynamic_smem() + used);
        used += piece<T>(count);
        return p;
    }

    // One piece per warp; returns the calling warp's.
    template <typename T>
    __device__ T* take_per_warp(int count, int warps, int warp) {
        T* p = reinterpret_cast<T*>(dynamic_smem() + used + warp * piece<T>(count));
        used += warps * piece<T>(count);
        return p;
    }

    template <typename T>
    __device__ static unsigned int piece(int count) {
        return (count * sizeof(T) + SMEM_ALIGN - 1) / SMEM_ALIGN * SMEM_ALIGN;
    }

    __device__ void require_launched_size() const {
        if (used > dynamic_smem_size()) __trap();
    }
};

// Copies rows [0, rows) of a `cols`-wide matrix from global (row stride src_ld) to shared
// (row stride dst_ld), reading only rows below `valid` and zero-filling the rest, in
// 16-byte pieces spread over threads [tid, tid + nthreads).
template <typename E>
__device__ void copy_rows(E* dst, int dst_ld, const E* src, size_t src_ld, int valid, int rows,
                          int cols, int tid, int nthreads) {
    constexpr int V = 16 / sizeof(E);
    const int pieces_per_row = cols / V;
    for (int p = tid; p < rows * pieces_per_row; p += nthreads) {
        const int r = p / pieces_per_row, c = (p % pieces_per_row) * V;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < valid) v = __ldg(reinterpret_cast<const uint4*>(src + r * src_ld + c));
        *reinterpret_cast<uint4*>(dst + r * dst_ld + c) = v;
    }
}

// Writes scale × a 16×16 f32 shared tile (row stride ld) to global rows row0..row0+16 of
// dst (row stride dst_ld), skipping rows at or past `valid`. Lane pairs cover a row, each
// lane 8 consecutive values in 16-byte pieces.
template <typename E>
__device__ void store_tile(E* dst, size_t dst_ld, const float* tile, int ld, int row0, int valid,
                           float scale, int lane) {
    const int r = lane / 2, c0 = (lane % 2) * 8;
    if (row0 + r >= valid) return;
    union {
        E e[8];
        uint4 v[8 * sizeof(E) / 16];
    } vals;
#pragma unroll
    for (int c = 0; c < 8; ++c) vals.e[c] = from_float<E>(tile[r * ld + c0 + c] * scale);
    uint4* out = reinterpret_cast<uint4*>(dst + (row0 + r) * dst_ld + c0);
#pragma unroll
    for (int k = 0; k < static_cast<int>(8 * sizeof(E) / 16); ++k) out[k] = vals.v[k];
}

// Operand layouts of a 16×16 tile with leading dimension ld: element (r, c) lives at
// at(r, c, ld). ColMajor reads the transpose of a row-major matrix. load_a / load_b give
// the tile as mma.sync's A operand or as the B operands of its two 8-column halves.
struct RowMajor {
    __device__ static int at(int r, int c, int ld) { return r * ld + c; }
    __device__ static void load_a(uint32_t (&a)[4], const bf16* m, int ld, int lane) {
        attn::load_a(a, m, ld, 0, 0, lane);
    }
    __device__ static void load_b(uint32_t (&b0)[2], uint32_t (&b1)[2], const bf16* m, int ld, int lane) {
        attn::load_b_pair_by_k(b0, b1, m, ld, 0, 0, lane);
    }
};
struct ColMajor {
    __device__ static int at(int r, int c, int ld) { return c * ld + r; }
    __device__ static void load_a(uint32_t (&a)[4], const bf16* m, int ld, int lane) {
        attn::load_a_transposed(a, m, ld, 0, 0, lane);
    }
    __device__ static void load_b(uint32_t (&b0)[2], uint32_t (&b1)[2], const bf16* m, int ld, int lane) {
        attn::load_b_pair_by_n(b0, b1, m, ld, 0, 0, lane);
    }
};

// One warp's 16×16 accumulator and the 16×16×16 step acc += A·B, in fp32.
template <typename E>
struct Mma;

// Scalar FMAs: lane owns row lane%16, columns 8·(lane/16) .. +8. Sums run over k in order.
template <>
struct Mma<float> {
    struct Acc {
        float v[8];
    };
    __device__ static void zero(Acc& acc) {
#pragma unroll
        for (int c = 0; c < 8; ++c) acc.v[c] = 0.0f;
    }
    template <typename LA, typename LB>
    __device__ static void step(Acc& acc, const float* a, int lda, const float* b, int ldb) {
        const int lane = threadIdx.x % WARP_SIZE;
        const int r = lane % TILE, c0 = (lane / TILE) * 8;
#pragma unroll
        for (int k = 0; k < TILE; ++k) {
            const float x = a[LA::at(r, k, lda)];
#pragma unroll
            for (int c = 0; c < 8; ++c) acc.v[c] = fmaf(x, b[LB::at(k, c0 + c, ldb)], acc.v[c]);
        }
    }
    __device__ static void store(const Acc& acc, float* dst, int ld) {
        const int lane = threadIdx.x % WARP_SIZE;
        const int r = lane % TILE, c0 = (lane / TILE) * 8;
#pragma unroll
        for (int c = 0; c < 8; ++c) dst[r * ld + c0 + c] = acc.v[c];
    }
};

// Two mma.sync m16n8k16 per step, one per 8-column half of the tile (layout in ptx.cuh).
template <>
struct Mma<bf16> {
    struct Acc {
        float v[2][4];
    };
    __device__ static void zero(Acc& acc) {
#pragma unroll
        for (int i = 0; i < 8; ++i) acc.v[i / 4][i % 4] = 0.0f;
    }
    template <typename LA, typename LB>
    __device__ static void step(Acc& acc, const bf16* a, int lda, const bf16* b, int ldb) {
        const int lane = threadIdx.x % WARP_SIZE;
        uint32_t fa[4], b0[2], b1[2];
        LA::load_a(fa, a, lda, lane);
        LB::load_b(b0, b1, b, ldb, lane);
        mma_bf16_16816(acc.v[0], fa, b0);
        mma_bf16_16816(acc.v[1], fa, b1);
    }
    __device__ static void store(const Acc& acc, float* dst, int ld) {
        const int lane = threadIdx.x % WARP_SIZE, g = lane / 4, t = lane % 4;
#pragma unroll
        for (int i = 0; i < 8; ++i)
            dst[(g + 8 * (i % 4 / 2)) * ld + 8 * (i / 4) + 2 * t + i % 2] = acc.v[i / 4][i % 4];
    }
};

// The sizes one (sequence, head) is worked in: T tokens padded to whole 16-row tiles, and
// the bias table's (2K-1)² + 3 rows.
struct HeadSizes {
    int tokens, padded, tiles, table_rows;
};

__device__ HeadSizes head_sizes(int window) {
    const int tokens = window * window + 1, padded = round_up(tokens, TILE);
    return {tokens, padded, padded / TILE, (2 * window - 1) * (2 * window - 1) + 3};
}

// Where one (sequence, head) lives in the global tensors.
struct HeadView {
    int tokens, width;  // T, D
    size_t qkv_ld, out_ld;
    size_t q, k, v;  // offsets of row 0 of this head's q, k, v columns in qkv / dqkv
    size_t o;        // offset of row 0 of this head's columns in out / dout
    size_t lse;      // offset of this head's T values in lse

    __device__ HeadView(int window, int heads, int head_dim) {
        const int seq = blockIdx.x, head = blockIdx.y;
        tokens = window * window + 1;
        width = heads * head_dim;
        qkv_ld = 3 * static_cast<size_t>(width);
        out_ld = width;
        q = static_cast<size_t>(seq) * tokens * qkv_ld + static_cast<size_t>(head) * head_dim;
        k = q + width;
        v = q + 2 * static_cast<size_t>(width);
        o = static_cast<size_t>(seq) * tokens * out_ld + static_cast<size_t>(head) * head_dim;
        lse = (static_cast<size_t>(seq) * heads + head) * tokens;
    }
};

// This thread's warp, and the block's warp count.
struct WarpPlace {
    int warps, warp, lane;
};

__device__ WarpPlace warp_place() {
    return {static_cast<int>(blockDim.x / WARP_SIZE), static_cast<int>(threadIdx.x / WARP_SIZE),
            static_cast<int>(threadIdx.x % WARP_SIZE)};
}

// One head's whole T rows (from `src`, row stride `ld`) into a shared matrix of `padded`
// rows, zeros past T; by the whole block.
template <typename E, int HEAD_DIM>
__device__ void copy_whole(E* dst, const E* src, size_t ld, int tokens, int padded) {
    copy_rows(dst, HEAD_DIM + ROW_PAD<E>, src, ld, tokens, padded, HEAD_DIM, threadIdx.x, blockDim.x);
}

// One head's 16 rows from row0 on into a warp's shared tile, zeros past T; by one warp.
template <typename E, int HEAD_DIM>
__device__ void copy_tile(E* dst, const E* src, size_t ld, int row0, int tokens, int lane) {
    copy_rows(dst, HEAD_DIM + ROW_PAD<E>, src + row0 * ld, ld, tokens - row0, TILE, HEAD_DIM, lane, WARP_SIZE);
}

// Copies this head's column of the bias table into shared memory.
__device__ void load_bias(float* bias, const float* table, int rows, int heads) {
    for (int r = threadIdx.x; r < rows; r += blockDim.x) bias[r] = table[r * heads + blockIdx.y];
}

// This head's K and V, all T rows (zeros to the padded count), and its bias column into
// shared memory; by the whole block.
template <typename E, int HEAD_DIM>
__device__ void load_keys_values_bias(E* keys, E* values, float* bias, const E* qkv, const float* table,
                                      const HeadView& g, int table_rows, int heads) {
    const int padded = round_up(g.tokens, TILE);
    copy_whole<E, HEAD_DIM>(keys, qkv + g.k, g.qkv_ld, g.tokens, padded);
    copy_whole<E, HEAD_DIM>(values, qkv + g.v, g.qkv_ld, g.tokens, padded);
    load_bias(bias, table, table_rows, heads);
}

// Turns the raw q·k scores of query rows row0..row0+16 (a warp's strip, ld_s) into
// probabilities in `probs` (ld_p), zero for padded keys and padded query rows, and writes
// each valid row's log-sum-exp. Every lane only touches its own columns j ≡ lane (mod 32)
// of `scores`, so the in-place passes need no synchronisation.
template <typename E>
__device__ void softmax_rows(float* scores, int ld_s, E* probs, int ld_p, int row0, int tokens,
                             int padded, int window, const float* bias, float scale, float* lse,
                             int lane) {
    for (int r = 0; r < TILE; ++r) {
        const int i = row0 + r;
        float* s = scores + r * ld_s;
        E* p = probs + r * ld_p;
        if (i >= tokens) {
            for (int j = lane; j < padded; j += WARP_SIZE) p[j] = from_float<E>(0.0f);
            continue;
        }
        float row_max = -INFINITY;
        for (int j = lane; j < tokens; j += WARP_SIZE) {
            s[j] = s[j] * scale + bias[rel_index(i, j, window)];
            row_max = fmaxf(row_max, s[j]);
        }
        row_max = warp_max(row_max);
        float sum = 0.0f;
        for (int j = lane; j < tokens; j += WARP_SIZE) {
            s[j] = expf(s[j] - row_max);
            sum += s[j];
        }
        sum = warp_sum(sum);
        const float inv = 1.0f / sum;
        for (int j = lane; j < padded; j += WARP_SIZE) p[j] = from_float<E>(j < tokens ? s[j] * inv : 0.0f);
        if (lane == 0) lse[i] = row_max + logf(sum);
    }
}

template <typename E, int HEAD_DIM>
__device__ void attention_forward(const E* __restrict__ qkv, const float* __restrict__ table,
                                  E* __restrict__ out, float* __restrict__ lse, int window, int heads) {
    using M = Mma<E>;
    constexpr int LD = HEAD_DIM + ROW_PAD<E>;
    const HeadView g(window, heads, HEAD_DIM);
    const auto [tokens, padded, tiles, table_rows] = head_sizes(window);
    const auto [warps, warp, lane] = warp_place();
    const int ld_s = padded + F32_PAD, ld_p = padded + ROW_PAD<E>;

    SmemCursor smem;
    E* keys = smem.take<E>(padded * LD);
    E* values = smem.take<E>(padded * LD);
    float* bias = smem.take<float>(table_rows);
    E* q_tile = smem.take_per_warp<E>(TILE * LD, warps, warp);
    float* scores = smem.take_per_warp<float>(TILE * ld_s, warps, warp);
    E* probs = smem.take_per_warp<E>(TILE * ld_p, warps, warp);
    smem.require_launched_size();

    load_keys_values_bias<E, HEAD_DIM>(keys, values, bias, qkv, table, g, table_rows, heads);
    __syncthreads();

    const float scale = 1.0f / sqrtf(static_cast<float>(HEAD_DIM));
    for (int qt = warp; qt < tiles; qt += warps) {
        const int row0 = qt * TILE;
        copy_tile<E, HEAD_DIM>(q_tile, qkv + g.q, g.qkv_ld, row0, tokens, lane);
        __syncwarp();
        for (int kt = 0; kt < tiles; ++kt) {
            typename M::Acc acc;
            M::zero(acc);
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM; kk += TILE)
                M::template step<RowMajor, ColMajor>(acc, q_tile + kk, LD, keys + kt * TILE * LD + kk, LD);
            M::store(acc, scores + kt * TILE, ld_s);
        }
        __syncwarp();
        softmax_rows(scores, ld_s, probs, ld_p, row0, tokens, padded, window, bias, scale, lse + g.lse, lane);
        __syncwarp();
        // out rows = P·V, one 16-column tile at a time, staged through the free score strip.
#pragma unroll
        for (int ct = 0; ct < HEAD_DIM; ct += TILE) {
            typename M::Acc acc;
            M::zero(acc);
            for (int kt = 0; kt < tiles; ++kt)
                M::template step<RowMajor, RowMajor>(acc, probs + kt * TILE, ld_p, values + kt * TILE * LD + ct, LD);
            M::store(acc, scores, ld_s);
            __syncwarp();
            store_tile(out + g.o + ct, g.out_ld, scores, ld_s, row0, tokens, 1.0f, lane);
            __syncwarp();
        }
    }
}

// For the 16×16 tile of query rows row0.. and keys key0..: from the raw scores and dP =
// dO·Vᵀ, P = exp(logit − lse) and dS = P ⊙ (dP − delta), both zero outside the T×T square;
// dS also replaces dP in f32. Lane owns column lane%16, rows lane/16 + 2k, so element
// lane + 32k: conflict-free shared access, and no other lane touches its elements.
template <typename E>
__device__ void softmax_grad_tile(const float* s_tile, float* dp_tile, E* p_tile, E* ds_tile, int row0,
                                  int key0, int tokens, int window, const float* bias, const float* lse,
                                  const float* delta, float scale, int lane) {
    const int j = key0 + lane % TILE;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int r = lane / TILE + 2 * k, e = r * TILE + lane % TILE, i = row0 + r;
        float p = 0.0f, ds = 0.0f;
        if (i < tokens && j < tokens) {
            const int idx = rel_index(i, j, window);
            p = expf(s_tile[e] * scale + bias[idx] - lse[i]);
            ds = p * (dp_tile[e] - delta[i]);
        }
        p_tile[e] = from_float<E>(p);
        ds_tile[e] = from_float<E>(ds);
        dp_tile[e] = ds;
    }
}

// Adds a 16×16 f32 dS tile (query rows row0.., keys key0..) into the warp's table gradient,
// one query row at a time in a fixed order. For a query i ≥ 1, distinct keys have distinct
// table rows, so the 16 lanes of a row never add to the same entry; the cls query's keys
// all share one row, which lane 0 adds alone.
__device__ void add_table_gradient(float* dbias, const float* ds_tile, int row0, int key0, int tokens,
                                   int window, int lane) {
    for (int r = 0; r < TILE && row0 + r < tokens; ++r) {
        const int i = row0 + r;
        if (i == 0) {
            if (lane == 0)
                for (int j = 0; j < TILE && key0 + j < tokens; ++j) dbias[rel_index(0, key0 + j, window)] += ds_tile[j];
        } else if (lane < TILE && key0 + lane < tokens) {
            dbias[rel_index(i, key0 + lane, window)] += ds_tile[r * TILE + lane];
        }
        __syncwarp();
    }
}

// Two phases, each holding two whole T×d matrices in shared memory and streaming 16-row
// tiles against them, so no T×T matrix is ever stored (T = 197 fits):
//   1. K, V whole; each warp takes query tiles: dQ = dS·K/√d, and the table gradient from
//      dS into the warp's own table-sized array.
//   2. Q, dO whole; each warp takes key tiles: dV = Pᵀ·dO, dK = dSᵀ·Q/√d.
// P and dS are recomputed from lse in each phase; accumulators stay in registers. The
// block's table gradient (the warps' arrays added in warp order) is its partial.
template <typename E, int HEAD_DIM>
__device__ void attention_backward(const E* __restrict__ qkv, const float* __restrict__ table,
                                   const E* __restrict__ out, const E* __restrict__ dout,
                                   const float* __restrict__ lse, E* __restrict__ dqkv,
                                   float* __restrict__ partials, int window, int heads) {
    using M = Mma<E>;
    constexpr int LD = HEAD_DIM + ROW_PAD<E>;
    constexpr int COL_TILES = HEAD_DIM / TILE;
    const HeadView g(window, heads, HEAD_DIM);
    const auto [tokens, padded, tiles, table_rows] = head_sizes(window);
    const auto [warps, warp, lane] = warp_place();

    SmemCursor smem;
    E* whole_a = smem.take<E>(padded * LD);  // phase 1: K, phase 2: Q
    E* whole_b = smem.take<E>(padded * LD);  // phase 1: V, phase 2: dO
    float* bias = smem.take<float>(table_rows);
    const int dbias_stride = SmemCursor::piece<float>(table_rows) / sizeof(float);
    float* dbias_all = smem.take<float>(warps * dbias_stride);  // one table per warp
    float* dbias = dbias_all + warp * dbias_stride;
    float* lse_s = smem.take<float>(padded);
    float* delta = smem.take<float>(padded);  // rowsum(dO ⊙ O)
    E* tile_a = smem.take_per_warp<E>(TILE * LD, warps, warp);  // phase 1: Q rows, phase 2: K rows
    E* tile_b = smem.take_per_warp<E>(TILE * LD, warps, warp);  // phase 1: dO rows, phase 2: V rows
    float* s_tile = smem.take_per_warp<float>(TILE * TILE, warps, warp);
    float* dp_tile = smem.take_per_warp<float>(TILE * TILE, warps, warp);
    E* p_tile = smem.take_per_warp<E>(TILE * TILE, warps, warp);
    E* ds_tile = smem.take_per_warp<E>(TILE * TILE, warps, warp);
    smem.require_launched_size();

    load_keys_values_bias<E, HEAD_DIM>(whole_a, whole_b, bias, qkv, table, g, table_rows, heads);
    for (int r = lane; r < table_rows; r += WARP_SIZE) dbias[r] = 0.0f;
    for (int i = threadIdx.x; i < padded; i += blockDim.x) lse_s[i] = i < tokens ? lse[g.lse + i] : 0.0f;
    for (int i = warp; i < padded; i += warps) {
        float acc = 0.0f;
        if (i < tokens)
            for (int c = lane; c < HEAD_DIM; c += WARP_SIZE)
                acc += to_float(dout[g.o + i * g.out_ld + c]) * to_float(out[g.o + i * g.out_ld + c]);
        acc = warp_sum(acc);
        if (lane == 0) delta[i] = acc;
    }
    __syncthreads();

    const float scale = 1.0f / sqrtf(static_cast<float>(HEAD_DIM));

    // Phase 1: dQ and dtable, one query tile per warp at a time.
    for (int qt = warp; qt < tiles; qt += warps) {
        const int row0 = qt * TILE;
        copy_tile<E, HEAD_DIM>(tile_a, qkv + g.q, g.qkv_ld, row0, tokens, lane);
        copy_tile<E, HEAD_DIM>(tile_b, dout + g.o, g.out_ld, row0, tokens, lane);
        __syncwarp();
        typename M::Acc dq[COL_TILES];
#pragma unroll
        for (int ct = 0; ct < COL_TILES; ++ct) M::zero(dq[ct]);
        for (int kt = 0; kt < tiles; ++kt) {
            const int key0 = kt * TILE;
            typename M::Acc s, dp;
            M::zero(s);
            M::zero(dp);
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM; kk += TILE) {
                M::template step<RowMajor, ColMajor>(s, tile_a + kk, LD, whole_a + key0 * LD + kk, LD);
                M::template step<RowMajor, ColMajor>(dp, tile_b + kk, LD, whole_b + key0 * LD + kk, LD);
            }
            M::store(s, s_tile, TILE);
            M::store(dp, dp_tile, TILE);
            __syncwarp();
            softmax_grad_tile(s_tile, dp_tile, p_tile, ds_tile, row0, key0, tokens, window, bias, lse_s, delta,
                              scale, lane);
            __syncwarp();
            add_table_gradient(dbias, dp_tile, row0, key0, tokens, window, lane);
#pragma unroll
            for (int ct = 0; ct < COL_TILES; ++ct)
                M::template step<RowMajor, RowMajor>(dq[ct], ds_tile, TILE, whole_a + key0 * LD + ct * TILE, LD);
        }
#pragma unroll
        for (int ct = 0; ct < COL_TILES; ++ct) {
            M::store(dq[ct], s_tile, TILE);
            __syncwarp();
            store_tile(dqkv + g.q + ct * TILE, g.qkv_ld, s_tile, TILE, row0, tokens, scale, lane);
            __syncwarp();
        }
    }
    __syncthreads();

    copy_whole<E, HEAD_DIM>(whole_a, qkv + g.q, g.qkv_ld, tokens, padded);
    copy_whole<E, HEAD_DIM>(whole_b, dout + g.o, g.out_ld, tokens, padded);
    __syncthreads();

    // Phase 2: dK and dV, one key tile per warp at a time.
    for (int kt = warp; kt < tiles; kt += warps) {
        const int key0 = kt * TILE;
        copy_tile<E, HEAD_DIM>(tile_a, qkv + g.k, g.qkv_ld, key0, tokens, lane);
        copy_tile<E, HEAD_DIM>(tile_b, qkv + g.v, g.qkv_ld, key0, tokens, lane);
        __syncwarp();
        typename M::Acc dk[COL_TILES], dv[COL_TILES];
#pragma unroll
        for (int ct = 0; ct < COL_TILES; ++ct) {
            M::zero(dk[ct]);
            M::zero(dv[ct]);
        }
        for (int qt = 0; qt < tiles; ++qt) {
            const int row0 = qt * TILE;
            typename M::Acc s, dp;
            M::zero(s);
            M::zero(dp);
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM; kk += TILE) {
                M::template step<RowMajor, ColMajor>(s, whole_a + row0 * LD + kk, LD, tile_a + kk, LD);
                M::template step<RowMajor, ColMajor>(dp, whole_b + row0 * LD + kk, LD, tile_b + kk, LD);
            }
            M::store(s, s_tile, TILE);
            M::store(dp, dp_tile, TILE);
            __syncwarp();
            softmax_grad_tile(s_tile, dp_tile, p_tile, ds_tile, row0, key0, tokens, window, bias, lse_s, delta,
                              scale, lane);
            __syncwarp();
#pragma unroll
            for (int ct = 0; ct < COL_TILES; ++ct) {
                M::template step<ColMajor, RowMajor>(dv[ct], p_tile, TILE, whole_b + row0 * LD + ct * TILE, LD);
                M::template step<ColMajor, RowMajor>(dk[ct], ds_tile, TILE, whole_a + row0 * LD + ct * TILE, LD);
            }
        }
#pragma unroll
        for (int ct = 0; ct < COL_TILES; ++ct) {
            M::store(dk[ct], s_tile, TILE);
            M::store(dv[ct], dp_tile, TILE);
            __syncwarp();
            store_tile(dqkv + g.k + ct * TILE, g.qkv_ld, s_tile, TILE, key0, tokens, scale, lane);
            store_tile(dqkv + g.v + ct * TILE, g.qkv_ld, dp_tile, TILE, key0, tokens, 1.0f, lane);
            __syncwarp();
        }
    }
    __syncthreads();

    // The warps' table gradients, finished before the __syncthreads after phase 1, added in
    // warp order.
    float* mine = partials + (static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x) * table_rows;
    for (int r = threadIdx.x; r < table_rows; r += blockDim.x) {
        float sum = 0.0f;
        for (int w = 0; w < warps; ++w) sum += dbias_all[w * dbias_stride + r];
        mine[r] = sum;
    }
}

}  // namespace

// Entry points of the general kernels, one per element type and head dim:
// attention_{forward,backward}_{f32,bf16}_d{d}. Grid (S, h), block 32·warps threads,
// dynamic shared memory from the launcher.
#define ATTENTION_KERNELS(E, NAME, HEAD_DIM)                                                               \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS) attention_forward_##NAME##_d##HEAD_DIM(        \
        const E* qkv, const float* table, E* out, float* lse, int window, int heads) {                       \
        attention_forward<E, HEAD_DIM>(qkv, table, out, lse, window, heads);                               \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS) attention_backward_##NAME##_d##HEAD_DIM(       \
        const E* qkv, const float* table, const E* out, const E* dout, const float* lse, E* dqkv,            \
        float* partials, int window, int heads) {                                                          \
        attention_backward<E, HEAD_DIM>(qkv, table, out, dout, lse, dqkv, partials, window, heads);        \
    }

ATTENTION_KERNELS(float, f32, 32)
ATTENTION_KERNELS(float, f32, 64)
ATTENTION_KERNELS(float, f32, 80)
ATTENTION_KERNELS(float, f32, 128)
ATTENTION_KERNELS(bf16, bf16, 32)
ATTENTION_KERNELS(bf16, bf16, 64)
ATTENTION_KERNELS(bf16, bf16, 80)
ATTENTION_KERNELS(bf16, bf16, 128)

// Entry points of the fast kernels (attention_fast.cuh), bf16 only:
// attention_fast_{forward,backward}_t{TILES}_d{d} for Tp = 16·TILES padded tokens.
// Grid (C, h) with C ≤ S, block 32·TILES threads, dynamic shared memory from the launcher.
#define FAST_FORWARD(TILES, HEAD_DIM)                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * TILES) attention_fast_forward_t##TILES##_d##HEAD_DIM(  \
        const bf16* qkv, const float* table, bf16* out, float* lse, int seqs, int window, int heads) {       \
        attn::fast_forward<TILES, HEAD_DIM>(qkv, table, out, lse, seqs, window, heads);                    \
    }
#define FAST_BACKWARD(TILES, HEAD_DIM)                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * TILES) attention_fast_backward_t##TILES##_d##HEAD_DIM( \
        const bf16* qkv, const float* table, const bf16* out, const bf16* dout, const float* lse,            \
        bf16* dqkv, float* partials, int seqs, int window, int heads) {                                    \
        attn::fast_backward<TILES, HEAD_DIM>(qkv, table, out, dout, lse, dqkv, partials, seqs, window,     \
                                             heads);                                                       \
    }
// Every window up to K = 7 runs padded to Tp = 64 tokens (TILES = 4): vit_base's T = 50 is
// the case that matters, and one tile count keeps the build short. The backward holds dQ,
// dK and dV of its rows in registers at once: up to d = 80 (its d = 128 would spill, so
// that case takes the general kernel).
FAST_FORWARD(4, 32)
FAST_FORWARD(4, 64)
FAST_FORWARD(4, 80)
FAST_FORWARD(4, 128)
FAST_BACKWARD(4, 32)
FAST_BACKWARD(4, 64)
FAST_BACKWARD(4, 80)

// dtable [(2K-1)²+3, h] += Σ_p partials [h, producers, rows], p in increasing order: the
// fixed-order finish of either backward's table gradient. One thread per (head, row).
extern "C" __global__ void attention_dtable_finish(const float* partials, float* dtable, int producers, int rows,
                                                   int heads) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * heads) return;
    const int head = i / rows, r = i % rows;
    const float* column = partials + static_cast<size_t>(head) * producers * rows + r;
    float sum = 0.0f;
    for (int p = 0; p < producers; ++p) sum += column[static_cast<size_t>(p) * rows];
    dtable[r * heads + head] += sum;
}
