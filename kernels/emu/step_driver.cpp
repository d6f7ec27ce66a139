// The device side of one optimiser step on the CPU under ThreadSanitizer: step_finish of
// kernels/reduce.cu (the gradient norm from sum_squares_partial's partials, the mean loss,
// the clip scale and the divergence flag) and AdamW of kernels/adamw.cu, which reads its
// constants and the clip scale from device memory and leaves everything untouched once the
// flag is raised. References in plain C++; the AdamW update bit for bit as
// optim::adamw_update rounds it.
#include "check.h"
#include "adamw.cu"
#include "reduce.cu"

namespace {

using check::floats;

// What the host writes before a step (src/cuda/step.rs), for step t.
std::vector<float> hyper(float micro_batches, float clip, int t) {
    const float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, lr = 3e-3f, wd = 0.05f;
    std::vector<float> h(HYPER_LEN);
    h[HYPER_MICRO_BATCHES] = micro_batches;
    h[HYPER_CLIP] = clip;
    h[HYPER_BETA1] = beta1;
    h[HYPER_ONE_MINUS_BETA1] = 1.0f - beta1;
    h[HYPER_BETA2] = beta2;
    h[HYPER_ONE_MINUS_BETA2] = 1.0f - beta2;
    h[HYPER_EPS] = eps;
    h[HYPER_DECAY_KEEP] = 1.0f - lr * wd;
    h[HYPER_STEP_SIZE] = (float)(lr / (1.0 - std::pow(0.9f, t)));
    h[HYPER_INV_SQRT_BC2] = (float)(1.0 / std::sqrt(1.0 - std::pow(0.95f, t)));
    return h;
}

// The first pass's partials of sum(g^2) over `blocks` blocks of `threads`, then step_finish.
std::vector<float> finish_step(const std::vector<float>& g, unsigned blocks, float loss_sum,
                               const std::vector<float>& h, std::vector<float> state) {
    std::vector<float> partial(blocks, NAN);
    emu::launch(dim3(blocks), dim3(64), 0, sum_squares_partial, g.data(), (long long)g.size(), partial.data());
    std::vector<float> loss{loss_sum};
    emu::launch(dim3(1), dim3(64), 0, step_finish, (const float*)partial.data(), (int)blocks,
                (const float*)loss.data(), h.data(), state.data());
    return state;
}

void finish_case(const char* what, std::vector<float> g, float loss_sum, float clip, float raised_before,
                 bool want_diverged) {
    const auto h = hyper(3.0f, clip, 4);
    const auto state = finish_step(g, 5, loss_sum, h, {NAN, NAN, raised_before, NAN});
    double sq = 0.0;
    for (float v : g) sq += (double)v * v;
    const double norm = std::sqrt(sq), loss = (double)loss_sum / 3.0;
    const std::string w = std::string("step_finish ") + what;
    check::exact(w + ": divergence flag", {state[STATE_DIVERGED]}, {want_diverged ? 1.0f : 0.0f});
    // The values where the sum of squares fits a float (the kernel sums in fp32).
    if (std::isfinite((float)sq) && std::isfinite(loss)) {
        check::close(w + ": mean loss", {state[STATE_LOSS]}, {loss}, 1e-7);
        check::close(w + ": gradient norm", {state[STATE_NORM]}, {norm}, 1e-6);
        check::close(w + ": clip scale", {state[STATE_CLIP_SCALE]}, {std::min((double)clip / norm, 1.0)}, 1e-6);
    }
}

// optim::adamw_update transcribed, every operation rounded as the CPU rounds it.
template <typename T>
void adamw_case(long long n, int offset, unsigned blocks,
                void (*kernel)(float*, const float*, float*, float*, const unsigned char*, T*, long long,
                               const float*, const float*)) {
    auto p = check::uniform(n + offset, 1.0f, 5), g = check::uniform(n + offset, 0.1f, 6),
         m = check::uniform(n + offset, 0.01f, 7), v = check::uniform(n + offset, 1e-3f, 8);
    for (float& x : v) x = std::fabs(x);
    std::vector<unsigned char> mask(n + offset);
    for (long long i = 0; i < n + offset; ++i) mask[i] = i % 3 == 0;
    const float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, lr = 3e-3f, wd = 0.05f, scale = 0.5f;
    const int t = 7;
    const auto h = hyper(1.0f, INFINITY, t);
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
    auto tail = [&](const std::vector<float>& x) { return std::vector<float>(x.begin() + offset, x.end()); };
    char what[120];
    std::snprintf(what, sizeof what, "adamw_%s n %lld offset %d, %u blocks of 32", check::name<T>(), n, offset, blocks);
    // A raised flag first: nothing may move, not even the weight copy.
    const std::vector<T> before(n + offset, check::store<T>(-7.0f));
    std::vector<T> shadow(before);
    const std::vector<float> p0(p), m0(m), v0(v);
    for (float raised : {1.0f, 0.0f}) {
        const std::vector<float> state{0.0f, 0.0f, raised, scale};
        emu::launch(dim3(blocks), dim3(32), 0, kernel, p.data() + offset, (const float*)g.data() + offset,
                    m.data() + offset, v.data() + offset, (const unsigned char*)mask.data() + offset,
                    shadow.data() + offset, n, h.data(), state.data());
        const bool skip = raised != 0.0f;
        const std::string w = std::string(what) + (skip ? " diverged" : "");
        check::exact(w + ": params", tail(p), tail(skip ? p0 : wp));
        check::exact(w + ": m", tail(m), tail(skip ? m0 : wm));
        check::exact(w + ": v", tail(v), tail(skip ? v0 : wv));
        check::exact(w + ": shadow", floats(shadow.data() + offset, n),
                     skip ? floats(before.data() + offset, n) : check::rounded<T>(tail(wp)));
    }
}

// A NaN gradient through the whole device step: the norm is NaN, the flag rises, AdamW
// leaves parameters and moments alone.
void nan_gradient_skips_the_update() {
    const long long n = 300;
    auto g = check::uniform(n, 0.1f, 11);
    g[123] = NAN;
    const auto p0 = check::uniform(n, 1.0f, 12), m0 = check::uniform(n, 0.01f, 13);
    std::vector<float> p(p0), m(m0), v(n, 1e-4f);
    std::vector<unsigned char> mask(n, 1);
    std::vector<float> shadow(n, -7.0f);
    const auto h = hyper(2.0f, 1.0f, 3);
    const auto state = finish_step(g, 3, 1.5f, h, {0.0f, 0.0f, 0.0f, 0.0f});
    emu::launch(dim3(2), dim3(32), 0, adamw_f32, p.data(), (const float*)g.data(), m.data(), v.data(),
                (const unsigned char*)mask.data(), shadow.data(), n, h.data(), state.data());
    check::exact("NaN gradient: divergence flag", {state[STATE_DIVERGED]}, {1.0f});
    check::exact("NaN gradient: params untouched", p, p0);
    check::exact("NaN gradient: m untouched", m, m0);
    check::exact("NaN gradient: v untouched", v, std::vector<float>(n, 1e-4f));
    check::exact("NaN gradient: weight copy untouched", shadow, std::vector<float>(n, -7.0f));
}

}  // namespace

int main() {
    const auto g = check::uniform(1000, 0.1f, 9);
    finish_case("norm above the clip", g, 2.4f, 1.0f, 0.0f, false);
    finish_case("norm under the clip", g, 2.4f, 100.0f, 0.0f, false);
    finish_case("no clip", g, 2.4f, INFINITY, 0.0f, false);
    finish_case("NaN loss", g, NAN, 1.0f, 0.0f, true);
    finish_case("infinite loss", g, INFINITY, 1.0f, 0.0f, true);
    auto big = g;
    big[7] = 3e38f;  // its square overflows: an infinite norm
    finish_case("infinite norm", big, 2.4f, 1.0f, 0.0f, true);
    finish_case("finite step after a diverged one", g, 2.4f, 1.0f, 1.0f, true);
    for (int offset : {0, 1}) {
        adamw_case<float>(1001, offset, 2, adamw_f32);
        adamw_case<__nv_bfloat16>(1001, offset, 2, adamw_bf16);
    }
    nan_gradient_skips_the_update();
    return check::finish("step_driver");
}
