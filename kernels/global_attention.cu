// Multi-head self-attention over whole sequences without a bias, MAE's encoder and decoder
// (docs/DESIGN.md §6, op 14), FlashAttention-2 style: any T, memory O(S·h·T) between the
// passes (the lse), probabilities recomputed in the backward.
//
// forward:     qkv [S, T, 3D] E -> out [S, T, D] E, lse [S, h, T] f32
// delta:       out, dout [S, T, D] E -> delta [S, h, T] f32, rowsum(dout ⊙ out) per head
// backward_dq: qkv, dout, lse, delta -> the dq columns of dqkv [S, T, 3D] E (overwritten)
// backward_dkdv: qkv, dout, lse, delta -> the dk and dv columns of dqkv (overwritten)
//
// Head `i` owns columns i*d..(i+1)*d of each of q, k, v, out. Grid (S·⌈T/64⌉, h): a CTA
// owns 64 rows of one (sequence, head) — query rows in the forward and dq, key rows in
// dkdv — and streams the other side's rows in tiles of 64 through two shared-memory stages
// with cp.async, the next tile landing while this one computes. Rows past T are zero-filled
// and masked: padded keys get probability 0 (score −inf, or lse +inf for a padded query in
// dkdv), padded rows are never stored.
//
// bf16 (E = bf16): 4 warps, warp w owns rows 16w..16w+15 of the CTA's 64; S = Q·Kᵀ and dP
// stay in mma.sync accumulators, P and dS are re-packed in registers as A operands
// (attention_fast.cuh's helpers). The online softmax of the forward keeps per row a
// running max m and sum l in log2 units. dkdv computes the transposed products Sᵀ = K·Qᵀ
// and dPᵀ = V·dOᵀ so that Pᵀ and dSᵀ are A operands of dV = Pᵀ·dO and dK = dSᵀ·Q without
// a trip through shared memory. dq is a second pass over the K/V tiles (recomputing S and
// dP), so no row of dQ is ever summed by two CTAs: no atomics, bit-reproducible.
// f32 (the reference mode): the same tiling and streaming, one thread per row and scalar
// FMA, the row's vectors in registers.
#include "attention_fast.cuh"

namespace gattn {

using attn::ItemRows;
using attn::LN2;
using attn::LOG2E;

constexpr int BLOCK = 64;  // rows a CTA owns, and rows of a streamed tile

// The bf16 kernels' tile shape: 4 warps of 16 rows, matrices of 64 × (d + 8).
template <int HEAD_DIM>
using Mma = attn::FastShape<BLOCK / 16, HEAD_DIM>;

// Threads per CTA: a warp per 16 rows (bf16), a thread per row (f32).
template <typename E>
__host__ __device__ constexpr int threads() {
    return sizeof(E) == 2 ? BLOCK * 2 : BLOCK;
}

// Row stride of a staged E matrix: 16 bytes of pad, so ldmatrix rows fall on different banks.
template <typename E, int HEAD_DIM>
__host__ __device__ constexpr int row_ld() {
    return HEAD_DIM + 16 / static_cast<int>(sizeof(E));
}

template <typename E, int HEAD_DIM>
__host__ __device__ constexpr int matrix_elems() {
    return BLOCK * row_ld<E, HEAD_DIM>();
}

// Starts copying rows [0, 64) of a matrix (row r at src + r·ld) into `slot`, rows at or past
// `rows` zero-filled, in 16-byte pieces spread over the CTA's threads.
template <typename E, int HEAD_DIM>
__device__ __forceinline__ void fetch_rows(E* slot, const E* src, size_t ld, int rows) {
    constexpr int PER_ROW = HEAD_DIM * static_cast<int>(sizeof(E)) / 16, PER = 16 / static_cast<int>(sizeof(E));
    static_assert(BLOCK * PER_ROW % threads<E>() == 0, "every thread copies the same number of pieces");
#pragma unroll
    for (int n = 0; n < BLOCK * PER_ROW / threads<E>(); ++n) {
        const int p = n * threads<E>() + threadIdx.x, r = p / PER_ROW, c = p % PER_ROW * PER;
        const bool valid = r < rows;
        cp_async_16(slot + r * row_ld<E, HEAD_DIM>() + c, src + (valid ? r : 0) * ld + c, valid);
    }
}

// One CTA's (sequence, head) and its 64 own rows: blockIdx.x = sequence · ⌈T/64⌉ + row
// block, blockIdx.y = head.
struct Item {
    ItemRows at;
    int row0, tokens, width;
    size_t qkv_ld;
    template <int HEAD_DIM>
    __device__ static Item of(int tokens, int heads) {
        const int blocks = (tokens + BLOCK - 1) / BLOCK;
        return Item{ItemRows(blockIdx.x / blocks, blockIdx.y, tokens, heads, HEAD_DIM),
                    static_cast<int>(blockIdx.x % blocks) * BLOCK, tokens, heads * HEAD_DIM,
                    3 * static_cast<size_t>(heads) * HEAD_DIM};
    }
    __device__ int tiles() const { return (tokens + BLOCK - 1) / BLOCK; }
};

// Runs `compute(tile, stage)` for tiles 0, 1, … of `tiles`, where `fetch(tile, stage)`
// starts the copies of a tile into a stage: tile t+1 is in flight while t computes. The
// CTA's own rows (copied before the call) land with tile 0.
template <class Fetch, class Compute>
__device__ __forceinline__ void stream_tiles(int tiles, Fetch fetch, Compute compute) {
    fetch(0, 0);
    cp_async_commit();
    for (int t = 0; t < tiles; ++t) {
        cp_async_wait<0>();
        // Tile t has landed for every thread, and every thread is done with tile t-1,
        // whose stage the copies of tile t+1 now overwrite.
        __syncthreads();
        if (t + 1 < tiles) {
            fetch(t + 1, (t + 1) % 2);
            cp_async_commit();
        }
        compute(t, t % 2);
    }
}

// Score of (row, key) pairs in log2 units, −inf for keys past T.
__device__ __forceinline__ float masked(float s, float scale, int key, int tokens) {
    return key < tokens ? s * scale : -INFINITY;
}

// lse·log2(e) of `row`, +inf past T (its probabilities become exp2(−inf) = 0).
__device__ __forceinline__ float row_lse2(const float* lse, int row, int tokens) {
    return row < tokens ? lse[row] * LOG2E : INFINITY;
}

// Starts copying key tile t's K and V rows into stage `stage` of `stages` [2][k, v].
template <typename E, int HEAD_DIM>
__device__ __forceinline__ void fetch_key_tile(E* stages, int stage, const E* qkv, const Item& it, int t) {
    constexpr int MATRIX = matrix_elems<E, HEAD_DIM>();
    const E* k = qkv + it.at.qkv + it.width + static_cast<size_t>(t) * BLOCK * it.qkv_ld;
    E* slot = stages + 2 * stage * MATRIX;
    fetch_rows<E, HEAD_DIM>(slot, k, it.qkv_ld, it.tokens - t * BLOCK);
    fetch_rows<E, HEAD_DIM>(slot + MATRIX, k + it.width, it.qkv_ld, it.tokens - t * BLOCK);
}

// Starts copying query tile t's Q and dO rows into stage `stage` of `stages` [2][q, do],
// and stores its lse·log2(e) and delta into `rows` [2][lse2, delta][64] (plain stores,
// read after the next barrier).
template <typename E, int HEAD_DIM>
__device__ __forceinline__ void fetch_query_tile(E* stages, float* rows, int stage, const E* qkv, const E* dout,
                                                 const float* lse, const float* delta, const Item& it, int t) {
    constexpr int MATRIX = matrix_elems<E, HEAD_DIM>();
    const size_t row0 = static_cast<size_t>(t) * BLOCK;
    E* slot = stages + 2 * stage * MATRIX;
    fetch_rows<E, HEAD_DIM>(slot, qkv + it.at.qkv + row0 * it.qkv_ld, it.qkv_ld, it.tokens - t * BLOCK);
    fetch_rows<E, HEAD_DIM>(slot + MATRIX, dout + it.at.o + row0 * it.width, it.width, it.tokens - t * BLOCK);
    float* r = rows + 2 * stage * BLOCK;
    for (int i = threadIdx.x; i < BLOCK; i += blockDim.x) {
        const int row = t * BLOCK + i;
        r[i] = row_lse2(lse + it.at.lse, row, it.tokens);
        r[BLOCK + i] = row < it.tokens ? delta[it.at.lse + row] : 0.0f;
    }
}

// ---- bf16: tensor cores ----

template <int HEAD_DIM>
__device__ void forward_bf16(const bf16* __restrict__ qkv, bf16* __restrict__ out, float* __restrict__ lse,
                             int tokens, int heads) {
    using S = Mma<HEAD_DIM>;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const Item it = Item::of<HEAD_DIM>(tokens, heads);
    bf16* q = reinterpret_cast<bf16*>(dynamic_smem());  // [q | 2 × (k, v)] of 64 × LD
    bf16* stages = q + S::MATRIX;
    if (dynamic_smem_size() < 5 * S::MATRIX * sizeof(bf16)) __trap();
    const float logit_scale = LOG2E / sqrtf(static_cast<float>(HEAD_DIM));

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, o[S::DIM_TILES][4] = {};
    fetch_rows<bf16, HEAD_DIM>(q, qkv + it.at.qkv + it.row0 * it.qkv_ld, it.qkv_ld, tokens - it.row0);
    auto fetch = [&](int t, int stage) { fetch_key_tile<bf16, HEAD_DIM>(stages, stage, qkv, it, t); };
    stream_tiles(it.tiles(), fetch, [&](int t, int stage) {
        const bf16 *k = stages + 2 * stage * S::MATRIX, *v = k + S::MATRIX;
        float s[S::KEY_TILES][4] = {};
        attn::rows_times_all_rows<S, HEAD_DIM>(s, q, k, warp, lane);
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < S::KEY_TILES; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                s[nt][i] = masked(s[nt][i], logit_scale, t * BLOCK + 8 * nt + 2 * (lane % 4) + i % 2, tokens);
                tile_max[i / 2] = fmaxf(tile_max[i / 2], s[nt][i]);
            }
        // Every tile holds a key below T, so the new max is finite and exp2(−inf) = 0 drops
        // the empty start.
        float rescale[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float next = fmaxf(m[h], attn::quad_max(tile_max[h]));
            rescale[h] = exp2f(m[h] - next);
            m[h] = next;
            l[h] *= rescale[h];
        }
#pragma unroll
        for (int nt = 0; nt < S::KEY_TILES; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                s[nt][i] = exp2f(s[nt][i] - m[i / 2]);
                l[i / 2] += s[nt][i];
            }
#pragma unroll
        for (int nt = 0; nt < S::DIM_TILES; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) o[nt][i] *= rescale[i / 2];
        uint32_t p[S::TP / 16][4];
#pragma unroll
        for (int kk = 0; kk < S::TP / 16; ++kk) attn::accumulators_as_a(p[kk], s, kk);
        attn::times_matrix<S, HEAD_DIM>(o, [&](uint32_t(&a)[4], int kk) { attn::copy4(a, p[kk]); }, v, lane);
    });
    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        // Each lane summed its own columns; the quad's four partial sums make the row's.
        l[h] = attn::quad_sum(l[h]);
        inv[h] = 1.0f / l[h];
        const int row = it.row0 + 16 * warp + lane / 4 + 8 * h;
        if (lane % 4 == 0 && row < tokens) lse[it.at.lse + row] = (m[h] + log2f(l[h])) * LN2;
    }
    // Only this warp reads its Q rows: they stage its output rows.
    attn::store_rows<S>(out + it.at.o + it.row0 * static_cast<size_t>(it.width), it.width, o, inv, q,
                        tokens - it.row0, warp, lane);
}

template <int HEAD_DIM>
__device__ void backward_dq_bf16(const bf16* __restrict__ qkv, const bf16* __restrict__ dout,
                                 const float* __restrict__ lse, const float* __restrict__ delta,
                                 bf16* __restrict__ dqkv, int tokens, int heads) {
    using S = Mma<HEAD_DIM>;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const Item it = Item::of<HEAD_DIM>(tokens, heads);
    bf16* q = reinterpret_cast<bf16*>(dynamic_smem());  // [q | do | 2 × (k, v)] of 64 × LD
    bf16 *d_o = q + S::MATRIX, *stages = d_o + S::MATRIX;
    if (dynamic_smem_size() < 6 * S::MATRIX * sizeof(bf16)) __trap();
    const float scale = 1.0f / sqrtf(static_cast<float>(HEAD_DIM)), logit_scale = scale * LOG2E;

    float lse2[2], row_delta[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = it.row0 + 16 * warp + lane / 4 + 8 * h;
        lse2[h] = row_lse2(lse + it.at.lse, row, tokens);
        row_delta[h] = row < tokens ? delta[it.at.lse + row] : 0.0f;
    }
    fetch_rows<bf16, HEAD_DIM>(q, qkv + it.at.qkv + it.row0 * it.qkv_ld, it.qkv_ld, tokens - it.row0);
    fetch_rows<bf16, HEAD_DIM>(d_o, dout + it.at.o + it.row0 * static_cast<size_t>(it.width), it.width,
                               tokens - it.row0);
    auto fetch = [&](int t, int stage) { fetch_key_tile<bf16, HEAD_DIM>(stages, stage, qkv, it, t); };
    float dq[S::DIM_TILES][4] = {};
    stream_tiles(it.tiles(), fetch, [&](int t, int stage) {
        const bf16 *k = stages + 2 * stage * S::MATRIX, *v = k + S::MATRIX;
        float s[S::KEY_TILES][4] = {}, ds[S::KEY_TILES][4] = {};
        attn::rows_times_all_rows<S, HEAD_DIM>(s, q, k, warp, lane);
        attn::rows_times_all_rows<S, HEAD_DIM>(ds, d_o, v, warp, lane);
#pragma unroll
        for (int nt = 0; nt < S::KEY_TILES; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int key = t * BLOCK + 8 * nt + 2 * (lane % 4) + i % 2;
                const float p = exp2f(masked(s[nt][i], logit_scale, key, tokens) - lse2[i / 2]);
                ds[nt][i] = p * (ds[nt][i] - row_delta[i / 2]);
            }
        uint32_t ds_a[S::TP / 16][4];
#pragma unroll
        for (int kk = 0; kk < S::TP / 16; ++kk) attn::accumulators_as_a(ds_a[kk], ds, kk);
        attn::times_matrix<S, HEAD_DIM>(dq, [&](uint32_t(&a)[4], int kk) { attn::copy4(a, ds_a[kk]); }, k, lane);
    });
    const float scaled[2] = {scale, scale};
    attn::store_rows<S>(dqkv + it.at.qkv + it.row0 * it.qkv_ld, it.qkv_ld, dq, scaled, q, tokens - it.row0, warp,
                        lane);
}

template <int HEAD_DIM>
__device__ void backward_dkdv_bf16(const bf16* __restrict__ qkv, const bf16* __restrict__ dout,
                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                   bf16* __restrict__ dqkv, int tokens, int heads) {
    using S = Mma<HEAD_DIM>;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const Item it = Item::of<HEAD_DIM>(tokens, heads);
    // [k | v | 2 × (q, do)] of 64 × LD, then 2 × (lse·log2 e, delta) of 64 floats.
    bf16* k = reinterpret_cast<bf16*>(dynamic_smem());
    bf16 *v = k + S::MATRIX, *stages = v + S::MATRIX;
    float* rows = reinterpret_cast<float*>(stages + 4 * S::MATRIX);
    if (dynamic_smem_size() < 6 * S::MATRIX * sizeof(bf16) + 4 * BLOCK * sizeof(float)) __trap();
    const float scale = 1.0f / sqrtf(static_cast<float>(HEAD_DIM)), logit_scale = scale * LOG2E;

    const bf16* own = qkv + it.at.qkv + it.width + it.row0 * it.qkv_ld;
    fetch_rows<bf16, HEAD_DIM>(k, own, it.qkv_ld, tokens - it.row0);
    fetch_rows<bf16, HEAD_DIM>(v, own + it.width, it.qkv_ld, tokens - it.row0);
    auto fetch = [&](int t, int stage) { fetch_query_tile<bf16, HEAD_DIM>(stages, rows, stage, qkv, dout, lse, delta, it, t); };
    float dk[S::DIM_TILES][4] = {}, dv[S::DIM_TILES][4] = {};
    stream_tiles(it.tiles(), fetch, [&](int, int stage) {
        const bf16 *q = stages + 2 * stage * S::MATRIX, *d_o = q + S::MATRIX;
        const float *lse2 = rows + 2 * stage * BLOCK, *col_delta = lse2 + BLOCK;
        // Transposed: rows are this warp's keys, columns the tile's queries.
        float p[S::KEY_TILES][4] = {}, ds[S::KEY_TILES][4] = {};
        attn::rows_times_all_rows<S, HEAD_DIM>(p, k, q, warp, lane);
        attn::rows_times_all_rows<S, HEAD_DIM>(ds, v, d_o, warp, lane);
#pragma unroll
        for (int nt = 0; nt < S::KEY_TILES; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                // Keys past T are never stored: no mask needed.
                const int col = 8 * nt + 2 * (lane % 4) + i % 2;
                p[nt][i] = exp2f(p[nt][i] * logit_scale - lse2[col]);
                ds[nt][i] = p[nt][i] * (ds[nt][i] - col_delta[col]);
            }
        uint32_t p_a[S::TP / 16][4], ds_a[S::TP / 16][4];
#pragma unroll
        for (int kk = 0; kk < S::TP / 16; ++kk) {
            attn::accumulators_as_a(p_a[kk], p, kk);
            attn::accumulators_as_a(ds_a[kk], ds, kk);
        }
        attn::times_matrix<S, HEAD_DIM>(dv, [&](uint32_t(&a)[4], int kk) { attn::copy4(a, p_a[kk]); }, d_o, lane);
        attn::times_matrix<S, HEAD_DIM>(dk, [&](uint32_t(&a)[4], int kk) { attn::copy4(a, ds_a[kk]); }, q, lane);
    });
    // Only this warp reads its K and V rows: they stage its dK and dV rows.
    const float scaled[2] = {scale, scale}, unscaled[2] = {1.0f, 1.0f};
    bf16* dk_rows = dqkv + it.at.qkv + it.width + it.row0 * it.qkv_ld;
    attn::store_rows<S>(dk_rows, it.qkv_ld, dk, scaled, k, tokens - it.row0, warp, lane);
    attn::store_rows<S>(dk_rows + it.width, it.qkv_ld, dv, unscaled, v, tokens - it.row0, warp, lane);
}

// ---- f32: scalar FMA, one thread per row ----

// dst[0..d) = the row at src.
template <int HEAD_DIM>
__device__ __forceinline__ void load_row(float (&dst)[HEAD_DIM], const float* src) {
#pragma unroll
    for (int c = 0; c < HEAD_DIM; ++c) dst[c] = src[c];
}

template <int HEAD_DIM>
__device__ __forceinline__ void store_row(float* dst, const float (&src)[HEAD_DIM], float scale) {
#pragma unroll
    for (int c = 0; c < HEAD_DIM; ++c) dst[c] = src[c] * scale;
}

template <int HEAD_DIM>
__device__ __forceinline__ float dot(const float (&a)[HEAD_DIM], const float* b) {
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < HEAD_DIM; ++c) sum = fmaf(a[c], b[c], sum);
    return sum;
}

// acc += w·row.
template <int HEAD_DIM>
__device__ __forceinline__ void add_scaled(float (&acc)[HEAD_DIM], float w, const float* row) {
#pragma unroll
    for (int c = 0; c < HEAD_DIM; ++c) acc[c] = fmaf(w, row[c], acc[c]);
}

// This thread's row of the CTA's 64, clamped to T - 1: a thread past T computes on a real
// row and stores nothing, so the block stays whole for its barriers.
__device__ __forceinline__ int own_row(const Item& it) { return min(it.row0 + static_cast<int>(threadIdx.x), it.tokens - 1); }

// Rows of tile t that exist.
__device__ __forceinline__ int tile_rows(const Item& it, int t) { return min(BLOCK, it.tokens - t * BLOCK); }

template <int HEAD_DIM>
__device__ void forward_f32(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse,
                            int tokens, int heads) {
    constexpr int LD = row_ld<float, HEAD_DIM>(), MATRIX = matrix_elems<float, HEAD_DIM>();
    const Item it = Item::of<HEAD_DIM>(tokens, heads);
    float* stages = reinterpret_cast<float*>(dynamic_smem());  // 2 × (k, v) of 64 × LD
    if (dynamic_smem_size() < 4 * MATRIX * sizeof(float)) __trap();
    const float logit_scale = LOG2E / sqrtf(static_cast<float>(HEAD_DIM));
    const int row = own_row(it);

    float q[HEAD_DIM], o[HEAD_DIM] = {};
    load_row(q, qkv + it.at.qkv + row * it.qkv_ld);
    float m = -INFINITY, l = 0.0f;
    auto fetch = [&](int t, int stage) { fetch_key_tile<float, HEAD_DIM>(stages, stage, qkv, it, t); };
    stream_tiles(it.tiles(), fetch, [&](int t, int stage) {
        const float *k = stages + 2 * stage * MATRIX, *v = k + MATRIX;
        for (int j = 0; j < tile_rows(it, t); ++j) {
            // Online softmax one key at a time: m starts at −inf, rescale(−inf) = 0.
            const float s = dot(q, k + j * LD) * logit_scale, next = fmaxf(m, s);
            const float rescale = exp2f(m - next), p = exp2f(s - next);
            l = fmaf(l, rescale, p);
#pragma unroll
            for (int c = 0; c < HEAD_DIM; ++c) o[c] = fmaf(p, v[j * LD + c], o[c] * rescale);
            m = next;
        }
    });
    if (it.row0 + static_cast<int>(threadIdx.x) < tokens) {
        store_row(out + it.at.o + row * static_cast<size_t>(it.width), o, 1.0f / l);
        lse[it.at.lse + row] = (m + log2f(l)) * LN2;
    }
}

template <int HEAD_DIM>
__device__ void backward_dq_f32(const float* __restrict__ qkv, const float* __restrict__ dout,
                                const float* __restrict__ lse, const float* __restrict__ delta,
                                float* __restrict__ dqkv, int tokens, int heads) {
    constexpr int LD = row_ld<float, HEAD_DIM>(), MATRIX = matrix_elems<float, HEAD_DIM>();
    const Item it = Item::of<HEAD_DIM>(tokens, heads);
    float* stages = reinterpret_cast<float*>(dynamic_smem());  // 2 × (k, v) of 64 × LD
    if (dynamic_smem_size() < 4 * MATRIX * sizeof(float)) __trap();
    const float scale = 1.0f / sqrtf(static_cast<float>(HEAD_DIM)), logit_scale = scale * LOG2E;
    const int row = own_row(it);

    float q[HEAD_DIM], d_o[HEAD_DIM], dq[HEAD_DIM] = {};
    load_row(q, qkv + it.at.qkv + row * it.qkv_ld);
    load_row(d_o, dout + it.at.o + row * static_cast<size_t>(it.width));
    const float lse2 = lse[it.at.lse + row] * LOG2E, row_delta = delta[it.at.lse + row];
    auto fetch = [&](int t, int stage) { fetch_key_tile<float, HEAD_DIM>(stages, stage, qkv, it, t); };
    stream_tiles(it.tiles(), fetch, [&](int t, int stage) {
        const float *k = stages + 2 * stage * MATRIX, *v = k + MATRIX;
        for (int j = 0; j < tile_rows(it, t); ++j) {
            const float p = exp2f(dot(q, k + j * LD) * logit_scale - lse2);
            add_scaled(dq, p * (dot(d_o, v + j * LD) - row_delta), k + j * LD);
        }
    });
    if (it.row0 + static_cast<int>(threadIdx.x) < tokens) store_row(dqkv + it.at.qkv + row * it.qkv_ld, dq, scale);
}

template <int HEAD_DIM>
__device__ void backward_dkdv_f32(const float* __restrict__ qkv, const float* __restrict__ dout,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  float* __restrict__ dqkv, int tokens, int heads) {
    constexpr int LD = row_ld<float, HEAD_DIM>(), MATRIX = matrix_elems<float, HEAD_DIM>();
    const Item it = Item::of<HEAD_DIM>(tokens, heads);
    // 2 × (q, do) of 64 × LD, then 2 × (lse·log2 e, delta) of 64 floats.
    float* stages = reinterpret_cast<float*>(dynamic_smem());
    float* rows = stages + 4 * MATRIX;
    if (dynamic_smem_size() < (4 * MATRIX + 4 * BLOCK) * sizeof(float)) __trap();
    const float scale = 1.0f / sqrtf(static_cast<float>(HEAD_DIM)), logit_scale = scale * LOG2E;
    const int row = own_row(it);

    float k[HEAD_DIM], v[HEAD_DIM], dk[HEAD_DIM] = {}, dv[HEAD_DIM] = {};
    load_row(k, qkv + it.at.qkv + it.width + row * it.qkv_ld);
    load_row(v, qkv + it.at.qkv + 2 * it.width + row * it.qkv_ld);
    auto fetch = [&](int t, int stage) {
        fetch_query_tile<float, HEAD_DIM>(stages, rows, stage, qkv, dout, lse, delta, it, t);
    };
    stream_tiles(it.tiles(), fetch, [&](int t, int stage) {
        const float *q = stages + 2 * stage * MATRIX, *d_o = q + MATRIX;
        const float *lse2 = rows + 2 * stage * BLOCK, *col_delta = lse2 + BLOCK;
        for (int i = 0; i < tile_rows(it, t); ++i) {
            const float p = exp2f(dot(k, q + i * LD) * logit_scale - lse2[i]);
            add_scaled(dv, p, d_o + i * LD);
            add_scaled(dk, p * (dot(v, d_o + i * LD) - col_delta[i]), q + i * LD);
        }
    });
    if (it.row0 + static_cast<int>(threadIdx.x) < tokens) {
        store_row(dqkv + it.at.qkv + it.width + row * it.qkv_ld, dk, scale);
        store_row(dqkv + it.at.qkv + 2 * it.width + row * it.qkv_ld, dv, 1.0f);
    }
}

// delta [S, h, T] = Σ_c dout ⊙ out over each head's d columns, one thread per (row, head),
// in column order.
template <typename E>
__device__ void delta_rows(const E* __restrict__ out, const E* __restrict__ dout, float* __restrict__ delta,
                           int rows, int tokens, int heads, int head_dim) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * heads) return;
    const int row = i / heads, head = i % heads;
    const size_t at = static_cast<size_t>(row) * heads * head_dim + static_cast<size_t>(head) * head_dim;
    float sum = 0.0f;
    for (int c = 0; c < head_dim; c += PACK) {
        float a[PACK], b[PACK];
        load_vector(out + at + c, a);
        load_vector(dout + at + c, b);
#pragma unroll
        for (int e = 0; e < PACK; ++e) sum = fmaf(a[e], b[e], sum);
    }
    delta[(static_cast<size_t>(row / tokens) * heads + head) * tokens + row % tokens] = sum;
}

}  // namespace gattn

// Entry points: global_attention_{forward,backward_dq,backward_dkdv}_{f32,bf16}_d{d}, grid
// (S·⌈T/64⌉, h), block 128 (bf16) or 64 (f32) threads, dynamic shared memory from the
// launcher (src/cuda/global_attention.rs); global_attention_delta_{f32,bf16}, one thread
// per (row, head).
#define GLOBAL_ATTENTION(E, NAME, HEAD_DIM)                                                                       \
    extern "C" __global__ void __launch_bounds__(gattn::threads<E>())                                          \
        global_attention_forward_##NAME##_d##HEAD_DIM(const E* qkv, E* out, float* lse, int tokens, int heads) { \
        gattn::forward_##NAME<HEAD_DIM>(qkv, out, lse, tokens, heads);                                          \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(gattn::threads<E>()) global_attention_backward_dq_##NAME##_d##HEAD_DIM( \
        const E* qkv, const E* dout, const float* lse, const float* delta, E* dqkv, int tokens, int heads) {     \
        gattn::backward_dq_##NAME<HEAD_DIM>(qkv, dout, lse, delta, dqkv, tokens, heads);                        \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(gattn::threads<E>())                                          \
        global_attention_backward_dkdv_##NAME##_d##HEAD_DIM(const E* qkv, const E* dout, const float* lse,     \
                                                           const float* delta, E* dqkv, int tokens, int heads) { \
        gattn::backward_dkdv_##NAME<HEAD_DIM>(qkv, dout, lse, delta, dqkv, tokens, heads);                      \
    }

GLOBAL_ATTENTION(float, f32, 32)
GLOBAL_ATTENTION(float, f32, 64)
GLOBAL_ATTENTION(float, f32, 80)
GLOBAL_ATTENTION(float, f32, 128)
GLOBAL_ATTENTION(bf16, bf16, 32)
GLOBAL_ATTENTION(bf16, bf16, 64)
GLOBAL_ATTENTION(bf16, bf16, 80)
GLOBAL_ATTENTION(bf16, bf16, 128)

#define GLOBAL_ATTENTION_DELTA(E, NAME)                                                                       \
    extern "C" __global__ void global_attention_delta_##NAME(const E* out, const E* dout, float* delta, int rows, \
                                                             int tokens, int heads, int head_dim) {         \
        gattn::delta_rows<E>(out, dout, delta, rows, tokens, heads, head_dim);                              \
    }
GLOBAL_ATTENTION_DELTA(float, f32)
GLOBAL_ATTENTION_DELTA(bf16, bf16)
