// Lets a kernel source compile as plain C++ and run on the CPU, one std::thread per CUDA
// thread, so ThreadSanitizer sees its shared-memory races and the CPU reference checks its
// indexing and fragment layouts (docs/DESIGN.md §7). A test tool, not a backend: it is as
// slow as it is simple, and says nothing about speed.
//
// What it models:
// - threadIdx/blockIdx/blockDim/gridDim, per thread.
// - __shared__ variables are `static`: every thread of a block sees the same object, and
//   blocks run one after another, so each block reuses the storage (as a GPU would reuse
//   an SM's). Dynamic shared memory is an arena per launch, filled with 0xff bytes (NaN
//   as float and as bf16) before every block so a read of a never-written byte shows up,
//   and followed by guard bytes checked after every block.
// - __syncthreads: a barrier over the block's threads; __syncwarp and the shuffles: a
//   barrier over the warp's 32 lanes. Full warps and full masks only (all we use). A
//   thread that returns drops out of its block's barrier, as on the GPU.
// - Warp-collective tensor-core operations (ldmatrix, mma.sync) and cp.async, called
//   through the wrappers of kernels/ptx.cuh, with the fragment layouts of the PTX ISA.
// Anything the shim cannot model (partial masks, misaligned ldmatrix rows, a collective
// with lanes missing, a barrier nobody completes) stops the program with a message.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

// ---- bf16, bit-exact with cuda_bf16.h's conversions ----

struct __nv_bfloat16 {
    uint16_t bits;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;  // x in the low 16 bits, as on the GPU
};

inline float __bfloat162float(__nv_bfloat16 v) {
    const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest, ties to even; every NaN becomes the canonical 0x7fff.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return {0x7fff};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(u >> 16)};
}

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return {b}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// ---- math: the fast intrinsics are the accurate functions here ----

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

namespace emu {

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "emu: block (%u,%u,%u) thread (%u,%u,%u): %s\n", blockIdx.x, blockIdx.y,
                 blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z, what);
    std::fflush(stderr);
    std::abort();
}

// A reusable barrier for `expected` threads; a thread that leaves for good drops out. Built
// on a mutex so ThreadSanitizer sees every wait as ordering the memory accesses around it.
class Barrier {
public:
    explicit Barrier(int expected) : expected_(expected) {}

    void wait(const char* what) {
        std::unique_lock<std::mutex> lock(mutex_);
        const uint64_t generation = generation_;
        if (++arrived_ == expected_) {
            release();
            return;
        }
        // A kernel that deadlocks (a barrier inside a branch not every thread takes) would
        // otherwise hang the test; ThreadSanitizer makes a fair wait a few seconds at most.
        if (!done_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; }))
            fail(what);
    }

    void leave() {
        std::lock_guard<std::mutex> lock(mutex_);
        --expected_;
        if (arrived_ > 0 && arrived_ == expected_) release();
    }

private:
    void release() {
        arrived_ = 0;
        ++generation_;
        done_.notify_all();
    }

    std::mutex mutex_;
    std::condition_variable done_;
    int expected_;
    int arrived_ = 0;
    uint64_t generation_ = 0;
};

constexpr int WARP = 32;

// What the lanes of a warp hand each other in a collective operation: each lane writes its
// own slot, all wait, each reads what it needs, all wait again before the slots are reused.
struct Warp {
    Barrier barrier{WARP};
    int lanes = 0;  // threads of the block in this warp
    uint64_t value[WARP];
    const void* address[WARP];
    uint32_t a[WARP][4], b[WARP][2];

    void sync(const char* what) {
        if (lanes != WARP) fail("a warp-collective operation in a warp with fewer than 32 lanes");
        barrier.wait(what);
    }
};

struct Block {
    explicit Block(int threads) : barrier(threads) {
        for (int w = 0; w * WARP < threads; ++w) {
            warps.emplace_back(new Warp);
            warps.back()->lanes = std::min(WARP, threads - w * WARP);
        }
    }
    Barrier barrier;
    std::vector<std::unique_ptr<Warp>> warps;
    unsigned char* smem = nullptr;
    unsigned smem_bytes = 0;
};

inline thread_local Block* this_block = nullptr;
inline thread_local int this_tid = 0;

inline int lane() { return this_tid % WARP; }
inline Warp& warp() { return *this_block->warps[this_tid / WARP]; }

inline void check_full_mask(unsigned mask) {
    if (mask != 0xffffffffu) fail("a warp operation with a partial mask (the shim models full warps only)");
}

template <typename T>
inline T shuffle_from(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    Warp& w = warp();
    std::memcpy(&w.value[lane()], &v, sizeof(T));
    w.sync("__shfl_*_sync: not every lane of the warp arrived");
    T out;
    std::memcpy(&out, &w.value[src], sizeof(T));
    w.sync("__shfl_*_sync: not every lane of the warp left");
    return out;
}

// ---- tensor cores (PTX ISA, "Warp-level matrix load instruction: ldmatrix" and "Matrix
// Fragments for mma.m16n8k16 with floating point type") ----

// ldmatrix.sync.aligned.m8n8.x{N}[.trans].shared.b16: lanes 8m..8m+7 give the 16-byte rows
// of matrix m; lane l receives in r[m] the pair of 16-bit elements (row l/4, columns
// 2(l%4), 2(l%4)+1) of matrix m, or of its transpose with `trans`.
template <int N>
inline void ldmatrix(uint32_t (&r)[N], const void* row, bool trans) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
    Warp& w = warp();
    w.address[lane()] = row;
    w.sync("ldmatrix: not every lane of the warp arrived");
    const int l = lane();
    auto element = [&](int m, int row_in_matrix, int col) {
        uint16_t e;
        std::memcpy(&e, static_cast<const unsigned char*>(w.address[8 * m + row_in_matrix]) + 2 * col, 2);
        return static_cast<uint32_t>(e);
    };
    for (int m = 0; m < N; ++m) {
        const int major = l / 4, minor = 2 * (l % 4);
        r[m] = trans ? element(m, minor, major) | element(m, minor + 1, major) << 16
                     : element(m, major, minor) | element(m, major, minor + 1) << 16;
    }
    w.sync("ldmatrix: not every lane of the warp left");
}

inline float bf16_half(uint32_t pair, int half) {
    return __bfloat162float({static_cast<uint16_t>(half ? pair >> 16 : pair & 0xffffu)});
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, d. With g = lane/4 and
// t = lane%4: a[0] holds A(g, 2t..2t+1), a[1] A(g+8, 2t..), a[2] A(g, 2t+8..), a[3]
// A(g+8, 2t+8..); b[0] holds B(2t..2t+1, g), b[1] B(2t+8.., g); d[i] is D(g + 8(i/2),
// 2t + i%2). Products of bf16 are exact in f32; the sum runs over k in order.
inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    Warp& w = warp();
    const int l = lane();
    std::memcpy(w.a[l], a, sizeof a);
    std::memcpy(w.b[l], b, sizeof b);
    w.sync("mma.sync: not every lane of the warp arrived");
    auto A = [&](int row, int k) { return bf16_half(w.a[(row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2); };
    auto B = [&](int k, int col) { return bf16_half(w.b[col * 4 + (k % 8) / 2][k / 8], k % 2); };
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float acc = d[i];
        for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        d[i] = acc;
    }
    w.sync("mma.sync: not every lane of the warp left");
}

// ---- cp.async: each copy is carried out when the issuing thread waits for its group, not
// when issued, so reading the destination before cp_async_wait sees stale bytes and a
// missing barrier after the wait is a race, as on the GPU ----

struct PendingCopy {
    void* dst;
    const void* src;
    bool fill;  // false: the 16 bytes are zeroed instead
};
inline thread_local std::vector<PendingCopy> open_group;
inline thread_local std::vector<std::vector<PendingCopy>> committed_groups;

inline void cp_async_16(void* dst, const void* src, bool fill) {
    if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (fill && reinterpret_cast<uintptr_t>(src) % 16 != 0))
        fail("cp.async of 16 bytes with an address that is not 16-byte aligned");
    open_group.push_back({dst, src, fill});
}

inline void cp_async_commit() {
    committed_groups.push_back(std::move(open_group));
    open_group.clear();
}

inline void cp_async_wait(int newest_pending) {
    while (static_cast<int>(committed_groups.size()) > newest_pending) {
        for (const PendingCopy& c : committed_groups.front()) {
            if (c.fill)
                std::memcpy(c.dst, c.src, 16);
            else
                std::memset(c.dst, 0, 16);
        }
        committed_groups.erase(committed_groups.begin());
    }
}

// ---- launching ----

constexpr unsigned SMEM_GUARD = 256;
constexpr unsigned char GUARD_BYTE = 0xa5;

template <typename Kernel>
inline void run_thread(Block& block, int tid, dim3 grid, dim3 dims, uint3 block_index, Kernel&& body) {
    this_block = &block;
    this_tid = tid;
    gridDim = grid;
    blockDim = dims;
    blockIdx = block_index;
    threadIdx = {tid % dims.x, tid / dims.x % dims.y, tid / (dims.x * dims.y)};
    body();
    if (!open_group.empty() || !committed_groups.empty()) fail("cp.async copies never waited for");
    block.barrier.leave();
    block.warps[tid / WARP]->barrier.leave();
}

// Runs kernel<<<grid, block, smem_bytes>>>(args...) to completion: blocks one after the
// other, the threads of a block concurrently.
template <typename... Params, typename... Args>
inline void launch(dim3 grid, dim3 block, unsigned smem_bytes, void (*kernel)(Params...), Args... args) {
    const int threads = static_cast<int>(block.x * block.y * block.z);
    // Dynamic shared memory starts 128-byte aligned, as the kernels' pieces assume.
    std::vector<unsigned char> storage(smem_bytes + SMEM_GUARD + 128);
    unsigned char* arena = storage.data() + (128 - reinterpret_cast<uintptr_t>(storage.data()) % 128) % 128;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                std::memset(arena, 0xff, smem_bytes);
                std::memset(arena + smem_bytes, GUARD_BYTE, SMEM_GUARD);
                Block b(threads);
                b.smem = arena;
                b.smem_bytes = smem_bytes;
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (int tid = 0; tid < threads; ++tid)
                    pool.emplace_back([&, tid] { run_thread(b, tid, grid, block, {x, y, z}, [&] { kernel(args...); }); });
                for (std::thread& t : pool) t.join();
                for (unsigned i = 0; i < SMEM_GUARD; ++i)
                    if (arena[smem_bytes + i] != GUARD_BYTE) {
                        blockIdx = {x, y, z};
                        fail("a write past the end of the dynamic shared memory");
                    }
            }
}

}  // namespace emu

inline void __syncthreads() { emu::this_block->barrier.wait("__syncthreads: not every thread of the block arrived"); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu::check_full_mask(mask);
    emu::warp().sync("__syncwarp: not every lane of the warp arrived");
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
    emu::check_full_mask(mask);
    return emu::shuffle_from(v, src_lane & (emu::WARP - 1));
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    emu::check_full_mask(mask);
    return emu::shuffle_from(v, emu::lane() ^ lane_mask);
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    emu::check_full_mask(mask);
    const int src = emu::lane() + static_cast<int>(delta);
    return emu::shuffle_from(v, src < emu::WARP ? src : emu::lane());
}

[[noreturn]] inline void __trap() { emu::fail("__trap()"); }
