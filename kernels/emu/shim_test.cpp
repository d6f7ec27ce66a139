// Checks the shim's models of the PTX operations against the PTX ISA's definitions, written
// out here element by element: mma.sync against a scalar matrix product, ldmatrix against
// the documented fragment of each lane, the shuffles, __syncthreads and cp.async's
// deferred completion. Prints each failed check and exits 1 if any failed.
// Build: g++ -std=c++17 -fsanitize=thread -pthread -Ikernels kernels/emu/shim_test.cpp
#include "ptx.cuh"

namespace {

int failures = 0;

void expect(bool ok, const char* what, int lane, int index) {
    if (ok) return;
    std::fprintf(stderr, "shim_test: %s wrong at lane %d, index %d\n", what, lane, index);
    ++failures;
}

// Small integers times 1/4: exact in bf16, and so are their products and sums in f32.
float value(int i, int salt) { return static_cast<float>((i * 7 + salt * 3) % 13 - 6) * 0.25f; }

uint16_t bf16_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

uint32_t pair(float lo, float hi) { return bf16_bits(lo) | static_cast<uint32_t>(bf16_bits(hi)) << 16; }

// The documented register contents of lane l, built from the matrices directly.
struct Fragments {
    uint32_t a[4], b[2];
};
Fragments documented(const float* A /*16×16 row-major*/, const float* B /*16×8 row-major*/, int l) {
    const int g = l / 4, t = l % 4;
    auto a = [&](int r, int c) { return pair(A[r * 16 + c], A[r * 16 + c + 1]); };
    auto b = [&](int k, int n) { return pair(B[k * 8 + n], B[(k + 1) * 8 + n]); };
    return {{a(g, 2 * t), a(g + 8, 2 * t), a(g, 2 * t + 8), a(g + 8, 2 * t + 8)}, {b(2 * t, g), b(2 * t + 8, g)}};
}

// One warp: D = A·B + C from the documented fragments, and the same fragments by ldmatrix
// from A row-major (x4), B k-major (x2.trans) and Bᵀ n-major (x2).
__global__ void mma_and_ldmatrix(const float* A, const float* B, const float* C, float* D, uint32_t* loaded) {
    __shared__ __align__(16) __nv_bfloat16 a_rows[16][24];  // padded rows, as kernels do
    __shared__ __align__(16) __nv_bfloat16 b_rows[16][8];
    __shared__ __align__(16) __nv_bfloat16 bt_rows[8][16];
    const int l = threadIdx.x;
    for (int i = l; i < 256; i += 32) a_rows[i / 16][i % 16] = __float2bfloat16_rn(A[i]);
    for (int i = l; i < 128; i += 32) {
        b_rows[i / 8][i % 8] = __float2bfloat16_rn(B[i]);
        bt_rows[i % 8][i / 8] = __float2bfloat16_rn(B[i]);
    }
    __syncwarp();
    const Fragments f = documented(A, B, l);
    const int g = l / 4, t = l % 4;
    float d[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
    mma_bf16_16816(d, f.a, f.b);
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];

    uint32_t a[4], b[2], bt[2], one[1];
    ldmatrix(a, &a_rows[l % 16][8 * (l / 16)]);
    ldmatrix_trans(b, &b_rows[l % 16][0]);
    ldmatrix(bt, &bt_rows[l % 8][8 * (l / 8 % 2)]);
    ldmatrix(one, &a_rows[l % 8][0]);
    uint32_t* out = loaded + l * 9;
    for (int i = 0; i < 4; ++i) out[i] = a[i];
    out[4] = b[0], out[5] = b[1], out[6] = bt[0], out[7] = bt[1], out[8] = one[0];
}

// Two warps: shuffles within each, then a block-wide sum through shared memory.
__global__ void shuffles_and_barrier(int* out) {
    __shared__ int per_warp[2];
    const int l = threadIdx.x % 32, w = threadIdx.x / 32;
    const int x = 100 * w + l;
    int total = x;
    for (int o = 16; o > 0; o /= 2) total += __shfl_xor_sync(0xffffffffu, total, o);
    const int down = __shfl_down_sync(0xffffffffu, x, 3);
    const int from5 = __shfl_sync(0xffffffffu, x, 5);
    if (l == 0) per_warp[w] = total;
    __syncthreads();
    out[threadIdx.x * 4 + 0] = total;
    out[threadIdx.x * 4 + 1] = down;
    out[threadIdx.x * 4 + 2] = from5;
    out[threadIdx.x * 4 + 3] = per_warp[0] + per_warp[1];
}

// cp.async: the destination keeps its old bytes until the wait covering its group.
__global__ void async_copy(const float* src, float* seen) {
    float* buf = reinterpret_cast<float*>(dynamic_smem());
    const int l = threadIdx.x;
    buf[4 * l] = -1.0f;
    cp_async_16(buf + 4 * l, src + 4 * l, true);
    cp_async_commit();
    cp_async_16(buf + 128 + 4 * l, src, false);
    cp_async_commit();
    seen[3 * l] = buf[4 * l];
    cp_async_wait<1>();
    seen[3 * l + 1] = buf[4 * l];
    cp_async_wait<0>();
    seen[3 * l + 2] = buf[128 + 4 * l];
}

}  // namespace

int main() {
    float A[256], B[128], C[128], D[128];
    for (int i = 0; i < 256; ++i) A[i] = value(i, 1);
    for (int i = 0; i < 128; ++i) B[i] = value(i, 2), C[i] = value(i, 3);
    uint32_t loaded[32 * 9];
    emu::launch(dim3(1), dim3(32), 0, mma_and_ldmatrix, A, B, C, D, loaded);
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 8; ++c) {
            float want = C[r * 8 + c];
            for (int k = 0; k < 16; ++k) want += A[r * 16 + k] * B[k * 8 + c];
            expect(D[r * 8 + c] == want, "mma.sync D", -1, r * 8 + c);
        }
    for (int l = 0; l < 32; ++l) {
        const Fragments f = documented(A, B, l);
        for (int i = 0; i < 4; ++i) expect(loaded[l * 9 + i] == f.a[i], "ldmatrix.x4 A fragment", l, i);
        for (int i = 0; i < 2; ++i) expect(loaded[l * 9 + 4 + i] == f.b[i], "ldmatrix.x2.trans B fragment", l, i);
        for (int i = 0; i < 2; ++i) expect(loaded[l * 9 + 6 + i] == f.b[i], "ldmatrix.x2 B fragment", l, i);
        expect(loaded[l * 9 + 8] == f.a[0], "ldmatrix.x1", l, 0);
    }

    int shuffled[64 * 4];
    emu::launch(dim3(1), dim3(64), 0, shuffles_and_barrier, shuffled);
    for (int tid = 0; tid < 64; ++tid) {
        const int l = tid % 32, w = tid / 32, x = 100 * w + l;
        const int warp_total = 32 * 100 * w + 31 * 32 / 2;
        expect(shuffled[tid * 4] == warp_total, "__shfl_xor_sync sum", l, w);
        expect(shuffled[tid * 4 + 1] == (l + 3 < 32 ? x + 3 : x), "__shfl_down_sync", l, w);
        expect(shuffled[tid * 4 + 2] == 100 * w + 5, "__shfl_sync", l, w);
        expect(shuffled[tid * 4 + 3] == 31 * 32 + 3200, "__syncthreads", l, w);
    }

    alignas(16) float src[128];
    for (int i = 0; i < 128; ++i) src[i] = static_cast<float>(i);
    float seen[32 * 3];
    emu::launch(dim3(1), dim3(32), 256 * sizeof(float), async_copy, static_cast<const float*>(src), seen);
    for (int l = 0; l < 32; ++l) {
        expect(seen[3 * l] == -1.0f, "cp.async visible before its wait", l, 0);
        expect(seen[3 * l + 1] == static_cast<float>(4 * l), "cp.async after cp_async_wait<1>", l, 1);
        expect(seen[3 * l + 2] == 0.0f, "cp.async zero fill", l, 2);
    }

    if (failures) {
        std::fprintf(stderr, "shim_test: %d checks failed\n", failures);
        return 1;
    }
    std::printf("shim_test: mma.sync, ldmatrix x1/x2/x4/.trans, shuffles, __syncthreads, cp.async: all checks passed\n");
    return 0;
}
