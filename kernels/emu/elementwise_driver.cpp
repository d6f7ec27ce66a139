// kernels/elementwise.cu on the CPU (kernels/emu/cuda_emu.h) under
// ThreadSanitizer, against straightforward C++: widths that are and are not multiples of 8,
// buffers that start off the 16-byte grid (the scalar path), several blocks across a row,
// and fewer row blocks than rows (the grid stride).
#include "check.h"
#include "elementwise.cu"

namespace {

using check::floats;

struct Shape {
    int rows, cols;
    int offset;       // elements the buffers start past an aligned address
    unsigned row_blocks;  // gridDim.y; 0: one per block of rows
};

template <typename T>
void bias_adds(const Shape& s, void (*add_bias)(T*, const float*, int, int),
               void (*residual)(const float*, const T*, const float*, float*, int, int)) {
    const size_t n = (size_t)s.rows * s.cols;
    const auto y0 = check::rounded<T>(check::uniform(n, 2.0f, 1));
    const auto bias = check::uniform(s.cols, 1.0f, 2);
    const auto x = check::uniform(n, 2.0f, 3);
    std::vector<T> y(n + s.offset);
    std::vector<float> x_in(n + s.offset), x_out(n + s.offset);
    for (size_t i = 0; i < n; ++i) y[s.offset + i] = check::store<T>(y0[i]), x_in[s.offset + i] = x[i];
    std::vector<double> want_res(n), want_bias(n);
    for (int r = 0; r < s.rows; ++r)
        for (int c = 0; c < s.cols; ++c) {
            const size_t i = (size_t)r * s.cols + c;
            want_res[i] = (double)x[i] + ((double)y0[i] + bias[c]);
            want_bias[i] = check::load(check::store<T>(y0[i] + bias[c]));
        }
    const check::Tile t = check::tile(s.cols);
    const dim3 grid(t.across, s.row_blocks ? s.row_blocks : (s.rows + t.ry - 1) / t.ry), block(t.bx, t.ry);
    char what[160];
    std::snprintf(what, sizeof what, "[%d, %d] offset %d, grid (%u, %u), block (%u, %u)", s.rows, s.cols, s.offset,
                  grid.x, grid.y, block.x, block.y);
    emu::launch(grid, block, 0, residual, (const float*)x_in.data() + s.offset, (const T*)y.data() + s.offset,
                bias.data(), x_out.data() + s.offset, s.rows, s.cols);
    check::close(std::string("residual_add_bias_") + check::name<T>() + " " + what, floats(x_out.data() + s.offset, n),
                 want_res, 1e-6);
    emu::launch(grid, block, 0, add_bias, y.data() + s.offset, bias.data(), s.rows, s.cols);
    check::close(std::string("add_bias_") + check::name<T>() + " " + what, floats(y.data() + s.offset, n), want_bias,
                 1e-6);
}

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

template <typename T>
void all(void (*add_bias)(T*, const float*, int, int),
         void (*residual)(const float*, const T*, const float*, float*, int, int),
         void (*cast_kernel)(const float*, T*, long long)) {
    for (const Shape& s : {Shape{37, 100, 0, 0}, Shape{19, 96, 0, 0}, Shape{19, 96, 1, 0}, Shape{13, 40, 0, 2},
                           Shape{3, 2056, 0, 0}})
        bias_adds<T>(s, add_bias, residual);
    for (int offset : {0, 1}) cast<T>(1001, offset, 2, cast_kernel);
    cast<T>(5, 0, 1, cast_kernel);
}

}  // namespace

int main() {
    all<float>(add_bias_f32, residual_add_bias_f32, cast_from_f32_f32);
    all<__nv_bfloat16>(add_bias_bf16, residual_add_bias_bf16, cast_from_f32_bf16);
    return check::finish("elementwise_driver");
}
