// kernels/elementwise.cu on the CPU (kernels/emu/cuda_emu.h) under ThreadSanitizer,
// against straightforward C++: lengths that are and are not multiples of 8, buffers that
// start off the 16-byte grid (the scalar path), and fewer blocks than packs (the grid
// stride). AdamW is step_driver.cpp's.
#include "check.h"
#include "elementwise.cu"

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

template <typename T>
void all(void (*cast_kernel)(const float*, T*, long long)) {
    for (int offset : {0, 1}) cast<T>(1001, offset, 2, cast_kernel);
    cast<T>(5, 0, 1, cast_kernel);
}

}  // namespace

int main() {
    all<float>(cast_from_f32_f32);
    all<__nv_bfloat16>(cast_from_f32_bf16);
    return check::finish("elementwise_driver");
}
