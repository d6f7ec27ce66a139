// kernels/reduce.cu's column sums on the CPU under ThreadSanitizer, against sums in double:
// widths on and off the 8-value packs, several blocks across a row, row counts that the
// chunks do not divide; partials_finish with one to three outputs, more chunks than it has
// lanes and a width that is not a multiple of its 32 columns per block.
#include "check.h"
#include "reduce.cu"

namespace {

template <typename T>
void column_sum_case(int rows, int cols, int chunks, void (*kernel)(const T*, float*, int, int, int)) {
    const size_t n = (size_t)rows * cols;
    const auto x = check::rounded<T>(check::uniform(n, 1.0f, 31));
    const auto start = check::uniform(cols, 1.0f, 32);
    std::vector<double> want(start.begin(), start.end());
    for (size_t i = 0; i < n; ++i) want[i % cols] += x[i];
    const auto x_t = check::stored<T>(x);
    const check::Tile t = check::tile(cols);
    const int per = check::rows_per_chunk(rows, chunks);
    const unsigned used = (rows + per - 1) / per;
    std::vector<float> partial((size_t)used * cols, NAN);
    emu::launch(dim3(t.across, used), dim3(t.bx, t.ry), 0, kernel, x_t.data(), partial.data(), rows, cols, per);
    const auto out = check::add_chunks(start, partial, 0, used, cols);
    char what[160];
    std::snprintf(what, sizeof what, "column_sum_%s [%d, %d], block (%u, %u), %u chunks of %d rows (accumulated)",
                  check::name<T>(), rows, cols, t.bx, t.ry, used, per);
    check::close(what, out, want, 1e-5);
}

// partial [outputs, chunks, cols] -> out_k += the sum over chunks of plane k.
void finish_case(int outputs, int chunks, int cols) {
    const auto partial = check::uniform((size_t)outputs * chunks * cols, 1.0f, 33);
    const auto start = check::uniform((size_t)outputs * cols, 1.0f, 34);
    std::vector<double> want(start.begin(), start.end());
    for (int o = 0; o < outputs; ++o)
        for (int k = 0; k < chunks; ++k)
            for (int c = 0; c < cols; ++c) want[(size_t)o * cols + c] += partial[((size_t)o * chunks + k) * cols + c];
    // Each output in its own buffer, with a guard value after it.
    std::vector<std::vector<float>> out(3);
    for (int o = 0; o < outputs; ++o) {
        out[o].assign(start.begin() + (size_t)o * cols, start.begin() + (size_t)(o + 1) * cols);
        out[o].push_back(-7.0f);
    }
    float* at[3];
    for (int o = 0; o < 3; ++o) at[o] = o < outputs ? out[o].data() : out[0].data();
    emu::launch(dim3((cols + 31) / 32, outputs), dim3(32, FINISH_LANES), 0, partials_finish, partial.data(), at[0],
                at[1], at[2], chunks, cols);
    std::vector<float> got, guards;
    for (int o = 0; o < outputs; ++o) {
        guards.push_back(out[o].back());
        got.insert(got.end(), out[o].begin(), out[o].end() - 1);
    }
    char what[120];
    std::snprintf(what, sizeof what, "partials_finish %d outputs, %d chunks, %d columns", outputs, chunks, cols);
    check::close(std::string(what) + " (accumulated)", got, want, 1e-5);
    check::exact(std::string(what) + ": the values after each output", guards, std::vector<float>(outputs, -7.0f));
}

template <typename T>
void all(void (*kernel)(const T*, float*, int, int, int)) {
    column_sum_case<T>(101, 45, 12, kernel);
    column_sum_case<T>(40, 96, 3, kernel);
    column_sum_case<T>(7, 2056, 2, kernel);
}

}  // namespace

int main() {
    all<float>(column_sum_f32);
    all<__nv_bfloat16>(column_sum_bf16);
    finish_case(1, 12, 45);
    finish_case(3, 5, 70);
    finish_case(2, 17, 32);
    return check::finish("reduce_driver");
}
