// kernels/elementwise.cu and kernels/adamw.cu on the CPU (kernels/emu/cuda_emu.h) under
// ThreadSanitizer, against straightforward C++: lengths that are and are not multiples of
// 8, buffers that start off the 16-byte grid (the scalar path), and fewer blocks than
// packs (the grid stride).
#include "check.h"
#include "elementwise.cu"
#include "adamw.cu"

namespace {

using check::floats;

template <typename T>
void cast(long long n, int offset, unsigned blocks, void (*kernel)(const float*, T*, long long)) {
    const auto src = check::uniform(n + offset, 3.0f, 4);
    std::vector<T> dst(n + offset + 1, check::store<T>(7.0f));
    emu::launch(dim3(blocks), dim3(32), 0, kernel, src.data() + offset, dst.data() + offset, n);
    std::vector<float> want(src.begin() + offset, src.end());
    want = check::rounded<T>(want);
    want.push_back(7.0f);  // the value after the end stays
    char what[120];
    std::snprintf(what, sizeof what, "cast_from_f32_%s n %lld offset %d, %u blocks of 32", check::name<T>(), n, offset,
                  blocks);
    check::exact(what, floats(dst.data() + offset, n + 1), want);
}

// optim::adamw_update transcribed, every operation rounded as the CPU rounds it.
template <typename T>
void adamw_case(long long n, int offset, unsigned blocks,
                void (*kernel)(float*, const float*, float*, float*, const unsigned char*, T*, long long, float,
                               float, float, float, float, float, float, float, float)) {
    auto p = check::uniform(n + offset, 1.0f, 5), g = check::uniform(n + offset, 0.1f, 6),
         m = check::uniform(n + offset, 0.01f, 7), v = check::uniform(n + offset, 1e-3f, 8);
    for (float& x : v) x = std::fabs(x);
    std::vector<unsigned char> mask(n + offset);
    for (long long i = 0; i < n + offset; ++i) mask[i] = i % 3 == 0;
    const float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, lr = 3e-3f, wd = 0.05f, scale = 0.5f;
    const int t = 7;
    const float step_size = (float)(lr / (1.0 - std::pow(0.9f, t)));
    const float inv_sqrt_bc2 = (float)(1.0 / std::sqrt(1.0 - std::pow(0.95f, t)));
    std::vector<float> wp(p), wm(m), wv(v);
    for (long long i = offset; i < n + offset; ++i) {
        const float gi = g[i] * scale;
        wm[i] = beta1 * wm[i] + (1.0f - beta1) * gi;
        wv[i] = beta2 * wv[i] + (1.0f - beta2) * gi * gi;
        const float kept = wp[i] * (1.0f - lr * wd * (float)mask[i]);
        wp[i] = kept - step_size * wm[i] / ((std::sqrt(wv[i]) * inv_sqrt_bc2) + eps);
    }
    std::vector<T> shadow(n + offset);
    emu::launch(dim3(blocks), dim3(32), 0, kernel, p.data() + offset, (const float*)g.data() + offset,
                m.data() + offset, v.data() + offset, (const unsigned char*)mask.data() + offset,
                shadow.data() + offset, n, beta1, 1.0f - beta1, beta2, 1.0f - beta2, eps, 1.0f - lr * wd, scale,
                step_size, inv_sqrt_bc2);
    char what[120];
    std::snprintf(what, sizeof what, "adamw_%s n %lld offset %d, %u blocks of 32", check::name<T>(), n, offset, blocks);
    auto tail = [&](const std::vector<float>& x) { return std::vector<float>(x.begin() + offset, x.end()); };
    check::exact(std::string(what) + ": params", tail(p), tail(wp));
    check::exact(std::string(what) + ": m", tail(m), tail(wm));
    check::exact(std::string(what) + ": v", tail(v), tail(wv));
    check::exact(std::string(what) + ": shadow", floats(shadow.data() + offset, n), check::rounded<T>(tail(wp)));
}

template <typename T>
void all(void (*cast_kernel)(const float*, T*, long long),
         void (*adamw_kernel)(float*, const float*, float*, float*, const unsigned char*, T*, long long, float, float,
                              float, float, float, float, float, float, float)) {
    for (int offset : {0, 1}) {
        cast<T>(1001, offset, 2, cast_kernel);
        adamw_case<T>(1001, offset, 2, adamw_kernel);
    }
    cast<T>(5, 0, 1, cast_kernel);
}

}  // namespace

int main() {
    all<float>(cast_from_f32_f32, adamw_f32);
    all<__nv_bfloat16>(cast_from_f32_bf16, adamw_bf16);
    return check::finish("elementwise_driver");
}
