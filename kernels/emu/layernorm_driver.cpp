// kernels/layernorm.cu on the CPU under ThreadSanitizer, against LayerNorm in double:
// widths on and off the 8-value packs and of one to eight rows per block, row counts that
// are not a multiple of the rows per block or of the chunks, and a forward grid smaller
// than the rows (the grid stride).
#include "check.h"
#include "layernorm.cu"

namespace {

template <typename T>
using Forward = void (*)(const float*, const float*, const float*, T*, float*, float*, int, int);
template <typename T>
using Backward = void (*)(const float*, const T*, const float*, const float*, const float*, float*, T*, float*, int,
                          int, int);

template <typename T>
void layernorm_case(int rows, int width, int chunks, unsigned row_blocks, bool without_copy, Forward<T> forward,
                    Backward<T> backward) {
    const size_t n = (size_t)rows * width;
    auto x = check::uniform(n, 3.0f, 21);
    for (float& v : x) v += 1.5f;
    const auto gamma = check::uniform(width, 2.0f, 22), beta = check::uniform(width, 1.0f, 23);
    const auto dy = check::rounded<T>(check::uniform(n, 1.0f, 24));
    const auto dx0 = check::uniform(n, 1.0f, 25);
    const auto grads0 = check::uniform(3 * (size_t)width, 1.0f, 26);  // d gamma, d beta, d bias

    std::vector<double> want_y(n), want_mean(rows), want_rstd(rows), want_dx(n);
    std::vector<double> want_grads(grads0.begin(), grads0.end());
    for (int r = 0; r < rows; ++r) {
        const float* xr = x.data() + (size_t)r * width;
        double mean = 0, var = 0;
        for (int c = 0; c < width; ++c) mean += xr[c];
        mean /= width;
        for (int c = 0; c < width; ++c) var += (xr[c] - mean) * (xr[c] - mean);
        const double rstd = 1.0 / std::sqrt(var / width + 1e-6);
        want_mean[r] = mean, want_rstd[r] = rstd;
        double mean_g = 0, mean_gx = 0;
        for (int c = 0; c < width; ++c) {
            const size_t i = (size_t)r * width + c;
            const double xhat = (xr[c] - mean) * rstd, g = (double)dy[i] * gamma[c];
            want_y[i] = xhat * gamma[c] + beta[c];
            mean_g += g / width, mean_gx += g * xhat / width;
        }
        for (int c = 0; c < width; ++c) {
            const size_t i = (size_t)r * width + c;
            const double xhat = (xr[c] - mean) * rstd, g = (double)dy[i] * gamma[c];
            want_dx[i] = dx0[i] + rstd * (g - mean_g - xhat * mean_gx);
            want_grads[c] += dy[i] * xhat;
            want_grads[width + c] += dy[i];
            want_grads[2 * width + c] += want_dx[i];
        }
    }

    const check::Tile t = check::tile(width);
    const int per = check::rows_per_chunk(rows, chunks);
    const unsigned used = (rows + per - 1) / per;
    char what[160];
    std::snprintf(what, sizeof what, "_%s [%d, %d], block (%u, %u), %u row blocks, %u chunks of %d rows",
                  check::name<T>(), rows, width, t.bx, t.ry, row_blocks, used, per);
    std::vector<T> y(n);
    std::vector<float> mean(rows), rstd(rows);
    emu::launch(dim3(1, row_blocks), dim3(t.bx, t.ry), 0, forward, (const float*)x.data(), gamma.data(), beta.data(),
                y.data(), mean.data(), rstd.data(), rows, width);
    const std::string fwd = std::string("layernorm_forward") + what;
    check::close(fwd + ": y", check::floats(y.data(), n), want_y, check::tol<T>());
    check::close(fwd + ": mean", mean, want_mean, 1e-5);
    check::close(fwd + ": rstd", rstd, want_rstd, 1e-5);

    // The backward reads the forward's statistics, as in the model.
    auto dx = dx0;
    const auto dy_t = check::stored<T>(dy);
    std::vector<T> copy(n);
    std::vector<float> partial(3 * (size_t)used * width, NAN);
    emu::launch(dim3(1, used), dim3(t.bx, t.ry), 0, backward, (const float*)x.data(), (const T*)dy_t.data(),
                gamma.data(), (const float*)mean.data(), (const float*)rstd.data(), dx.data(), copy.data(),
                partial.data(), rows, width, per);
    const std::string bwd = std::string("layernorm_backward") + what;
    check::close(bwd + ": dx (accumulated)", dx, want_dx, 2e-5);
    check::exact(bwd + ": dx in storage type", check::floats(copy.data(), n), check::rounded<T>(dx));
    const char* names[3] = {": d gamma (accumulated)", ": d beta (accumulated)", ": column sums of dx (accumulated)"};
    for (int k = 0; k < 3; ++k) {
        const std::vector<float> start(grads0.begin() + k * width, grads0.begin() + (k + 1) * width);
        const std::vector<double> want(want_grads.begin() + k * width, want_grads.begin() + (k + 1) * width);
        check::close(bwd + names[k], check::add_chunks(start, partial, k, used, width), want, 2e-5);
    }

    if (!without_copy) return;
    // Without a storage copy (a null pointer) dx is the same.
    dx = dx0;
    emu::launch(dim3(1, used), dim3(t.bx, t.ry), 0, backward, (const float*)x.data(), (const T*)dy_t.data(),
                gamma.data(), (const float*)mean.data(), (const float*)rstd.data(), dx.data(), (T*)nullptr,
                partial.data(), rows, width, per);
    check::close(bwd + ": dx without a copy", dx, want_dx, 2e-5);
}

template <typename T>
void all(Forward<T> forward, Backward<T> backward) {
    layernorm_case<T>(21, 100, 4, 3, true, forward, backward);  // 13 packs: one warp per row, 8 rows
    layernorm_case<T>(19, 72, 3, 1, false, forward, backward);
    layernorm_case<T>(11, 264, 3, 2, false, forward, backward);  // 33 packs: two warps per row, 4 rows
    layernorm_case<T>(3, 2048, 2, 3, false, forward, backward);  // the widest row: 256 threads
}

}  // namespace

int main() {
    all<float>(layernorm_forward_f32, layernorm_backward_f32);
    all<__nv_bfloat16>(layernorm_forward_bf16, layernorm_backward_bf16);
    return check::finish("layernorm_driver");
}
