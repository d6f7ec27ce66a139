// kernels/window_gather.cu on the CPU under ThreadSanitizer, against the CPU op: driven by
// tests/kernel_emulation.rs, which writes a batch of 8-bit images and what the CPU's
// window_gather (src/cpu/ops/window_gather.rs) makes of it.
//
// Usage: window_gather_driver DIR. DIR/case.txt holds
//   seqs windows_per_image image patch window norm_pix visible_rows masked_rows threads
// and DIR/{images.bin (u8), origin.bin (u32), slots.bin (i32), patches.bin, targets.bin
// (f32, the CPU op's)}. The normalised pixels must match bit for bit (the same IEEE
// operations on both sides): the patches in f32, and rounded once in bf16; so must raw
// targets; norm-pix targets sum in another order, so they match within 1e-5.
#include "check.h"
#include "driver_files.h"
#include "window_gather.cu"

namespace {

struct Case {
    int seqs, windows_per_image, image, patch, window, norm_pix, visible_rows, masked_rows;
    unsigned threads;
};

template <typename T>
void run(const std::string& dir, const Case& c, void (*kernel)(const unsigned char*, const unsigned*, const int*, T*,
                                                               float*, int, int, int, int, int)) {
    const int dim = 3 * c.patch * c.patch, area = c.window * c.window;
    const auto images = read<unsigned char>(
        dir + "/images.bin", (size_t)c.seqs / c.windows_per_image * 3 * c.image * c.image);
    const auto origin = read<unsigned>(dir + "/origin.bin", (size_t)c.seqs * 2);
    const auto slots = read<int>(dir + "/slots.bin", (size_t)c.seqs * area);
    const auto want_patches = read<float>(dir + "/patches.bin", (size_t)c.visible_rows * dim);
    const auto want_targets = read<float>(dir + "/targets.bin", (size_t)c.masked_rows * dim);
    std::vector<T> patches((size_t)c.visible_rows * dim);
    std::vector<float> targets((size_t)c.masked_rows * dim, NAN);
    emu::launch(dim3(c.seqs * area), dim3(c.threads), 0, kernel, images.data(), origin.data(), slots.data(),
                patches.data(), targets.data(), c.windows_per_image, c.image, c.patch, c.window, c.norm_pix);
    char what[120];
    std::snprintf(what, sizeof what, "window_gather_bytes_%s p%d K%d norm_pix %d", check::name<T>(), c.patch,
                  c.window, c.norm_pix);
    check::exact(std::string(what) + ": patches", check::floats(patches.data(), patches.size()),
                 check::rounded<T>(want_patches));
    if (c.norm_pix)
        check::close(std::string(what) + ": targets", targets, check::widen(want_targets), 1e-5);
    else
        check::exact(std::string(what) + ": targets", targets, want_targets);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: window_gather_driver DIR\n");
        return 2;
    }
    const std::string dir = argv[1];
    Case c{};
    std::ifstream f(dir + "/case.txt");
    if (!(f >> c.seqs >> c.windows_per_image >> c.image >> c.patch >> c.window >> c.norm_pix >> c.visible_rows >>
          c.masked_rows >> c.threads)) {
        std::fprintf(stderr, "%s/case.txt: expected 9 numbers\n", dir.c_str());
        return 2;
    }
    run<float>(dir, c, window_gather_bytes_f32);
    run<__nv_bfloat16>(dir, c, window_gather_bytes_bf16);
    return check::finish("window_gather_driver");
}
