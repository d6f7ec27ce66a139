// kernels/gelu.cu on the CPU under ThreadSanitizer, against the exact-erf GELU in double:
// widths on and off the 8-value packs, several blocks across a row, fewer row blocks than
// rows (the forward's grid stride), chunks that do not divide the rows.
#include "check.h"
#include "gelu.cu"

namespace {


template <typename T>
void gelu_case(int rows, int cols, int chunks, unsigned row_blocks, void (*forward)(const T*, T*, int, int),
               void (*backward)(const T*, T*, float*, int, int, int)) {
    const size_t n = (size_t)rows * cols;
    const auto pre0 = check::rounded<T>(check::uniform(n, 4.0f, 11));
    const auto dact = check::rounded<T>(check::uniform(n, 1.0f, 13));
    const auto start = check::uniform(cols, 1.0f, 14);
    auto pre = check::stored<T>(pre0);
    std::vector<T> act(n);
    std::vector<double> want_act(n), want_d(n);
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) {
            const size_t i = (size_t)r * cols + c;
            const double x = pre0[i];
            const double cdf = 0.5 * (1.0 + std::erf(x / std::sqrt(2.0)));
            want_act[i] = x * cdf;
            want_d[i] = dact[i] * (cdf + x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI));
        }
    const check::Tile t = check::tile(cols);
    const int per = check::rows_per_chunk(rows, chunks);
    const unsigned used = (rows + per - 1) / per;
    const dim3 grid(t.across, row_blocks ? row_blocks : (rows + t.ry - 1) / t.ry);
    char what[160];
    std::snprintf(what, sizeof what, "_%s [%d, %d], block (%u, %u), %u chunks of %d rows, %u row blocks",
                  check::name<T>(), rows, cols, t.bx, t.ry, used, per, grid.y);
    emu::launch(grid, dim3(t.bx, t.ry), 0, forward, (const T*)pre.data(),
                act.data(), rows, cols);
    check::close(std::string("gelu_forward") + what, check::floats(act.data(), n), want_act, check::tol<T>());

    auto grad = check::stored<T>(dact);
    std::vector<float> partial((size_t)used * cols, NAN);
    emu::launch(dim3(t.across, used), dim3(t.bx, t.ry), 0, backward, (const T*)pre.data(), grad.data(),
                partial.data(), rows, cols, per);
    const auto bias_grad = check::add_chunks(start, partial, 0, used, cols);
    const auto got = check::floats(grad.data(), n);
    check::close(std::string("gelu_backward") + what + ": d pre", got, want_d, check::tol<T>());
    std::vector<double> want_bias(start.begin(), start.end());
    for (size_t i = 0; i < n; ++i) want_bias[i % cols] += got[i];
    check::close(std::string("gelu_backward") + what + ": bias gradient", bias_grad, want_bias, 1e-5);
}

template <typename T>
void all(void (*forward)(const T*, T*, int, int), void (*backward)(const T*, T*, float*, int, int, int)) {
    gelu_case<T>(21, 100, 4, 0, forward, backward);
    gelu_case<T>(21, 96, 5, 0, forward, backward);
    gelu_case<T>(21, 96, 5, 2, forward, backward);
    gelu_case<T>(5, 2056, 2, 0, forward, backward);
}

}  // namespace

int main() {
    all<float>(gelu_forward_f32, gelu_backward_f32);
    all<__nv_bfloat16>(gelu_forward_bf16, gelu_backward_bf16);
    return check::finish("gelu_driver");
}
