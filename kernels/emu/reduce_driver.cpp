// kernels/reduce.cu's partials_finish on the CPU under ThreadSanitizer, against sums in
// double: one to three outputs, one chunk (the add after a cuBLASLt BGRADB), more chunks
// than it has lanes, and a width that is not a multiple of its 32 columns per block.
#include "check.h"
#include "reduce.cu"

namespace {

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

}  // namespace

int main() {
    finish_case(1, 12, 45);
    finish_case(1, 1, 45);
    finish_case(3, 5, 70);
    finish_case(2, 17, 32);
    return check::finish("reduce_driver");
}
