// What the kernel drivers of kernels/emu/ share: inputs, storage rounding, the launch shapes
// of src/cuda/launch.rs, and comparisons that report every tensor before failing.
// Each driver prints one line per compared tensor and exits 1 when any was off.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu_extra.h"

namespace check {

inline int failures = 0;

inline std::vector<float> uniform(size_t n, float scale, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-scale, scale);
    std::vector<float> v(n);
    for (float& x : v) x = u(rng);
    return v;
}

template <typename T> T store(float v);
template <> inline float store<float>(float v) { return v; }
template <> inline __nv_bfloat16 store<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

inline float load(float v) { return v; }
inline float load(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> std::vector<T> stored(const std::vector<float>& v) {
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = store<T>(v[i]);
    return out;
}

// v rounded to T and back.
template <typename T> std::vector<float> rounded(const std::vector<float>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = load(store<T>(v[i]));
    return out;
}

template <typename T> std::vector<float> floats(const T* p, size_t n) {
    std::vector<float> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = load(p[i]);
    return out;
}

template <typename T> const char* name();
template <> inline const char* name<float>() { return "f32"; }
template <> inline const char* name<__nv_bfloat16>() { return "bf16"; }

// docs/DESIGN.md §5: outputs stored as bf16 within 1e-2 of the reference, f32 ones 2e-5.
template <typename T> double tol() { return sizeof(T) == 4 ? 2e-5 : 1e-2; }

// max|got - want| / max|want| <= tol, printed either way.
inline void close(const std::string& what, const std::vector<float>& got, const std::vector<double>& want,
                  double tol) {
    double err = 0.0, scale = 0.0;
    bool finite = got.size() == want.size();
    for (size_t i = 0; finite && i < got.size(); ++i) {
        finite = std::isfinite(got[i]);
        err = std::max(err, std::fabs(got[i] - want[i]));
        scale = std::max(scale, std::fabs(want[i]));
    }
    const double rel = scale > 0 ? err / scale : err;
    const bool ok = finite && rel <= tol;
    std::printf("%-4s %-60s max err %.3e (tol %.0e)\n", ok ? "ok" : "FAIL", what.c_str(), rel, tol);
    if (!ok) ++failures;
}

inline void exact(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
    size_t bad = got.size() == want.size() ? 0 : 1;
    for (size_t i = 0; !bad && i < got.size(); ++i) bad = got[i] != want[i] ? i + 1 : 0;
    std::printf("%-4s %-60s %s\n", bad ? "FAIL" : "ok", what.c_str(), bad ? "differs" : "bit-exact");
    if (bad) ++failures;
}

inline std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// start + the sum over chunks of plane `plane` of partial [planes, chunks, cols]: what
// partials_finish adds (kernels/emu/reduce_driver.cpp checks partials_finish itself).
inline std::vector<float> add_chunks(const std::vector<float>& start, const std::vector<float>& partial, int plane,
                                     int chunks, int cols) {
    std::vector<float> out(start);
    for (int k = 0; k < chunks; ++k)
        for (int c = 0; c < cols; ++c) out[c] += partial[((size_t)plane * chunks + k) * cols + c];
    return out;
}

inline int finish(const char* driver) {
    if (failures) std::fprintf(stderr, "%s: %d checks failed\n", driver, failures);
    return failures ? 1 : 0;
}

// The 2-D block over the 8-value packs of a row, as src/cuda/launch.rs picks it
// (`pack_tile`): blocks across the row, threads per row (whole warps), rows per block.
struct Tile {
    unsigned across, bx, ry;
};
inline Tile tile(int cols) {
    const unsigned packs = (cols + 7) / 8;
    const unsigned across = (packs + 255) / 256;
    const unsigned bx = ((packs + across - 1) / across + 31) / 32 * 32;
    return {across, bx, std::max(1u, 256 / bx)};
}

// Rows per chunk for `chunks` chunks at most, as launch.rs's `chunking`.
inline int rows_per_chunk(int rows, int chunks) { return std::max(1, (rows + chunks - 1) / chunks); }

}  // namespace check
