// Runs kernels/attention.cu on the CPU through the shim: forward, backward and the table
// gradient's finish, with the launch configurations the Rust launcher chose. Driven by
// tests/kernel_emulation.rs, which writes the inputs and compares the outputs with the CPU
// attention op. Build with -rdynamic: kernels are found by name with dlsym.
//
// Usage: attention_driver DIR. DIR/launch.txt holds
//   seqs window heads head_dim elem(f32|bf16)
//   forward  NAME grid.x grid.y block.x smem_bytes
//   backward NAME grid.x grid.y block.x smem_bytes
//   finish   NAME grid.x block.x producers
// and DIR/{qkv,table,dout,dtable}.bin the inputs (elem or f32, little-endian). Writes
// DIR/{out,lse,dqkv,dtable_out}.bin. Outputs start as NaN so anything unwritten shows.
#include "driver_files.h"
#include "attention.cu"

namespace {

struct Launch {
    std::string name;
    unsigned gx = 1, gy = 1, block = 1, smem = 0;
};

template <typename E>
void run(const std::string& dir, int seqs, int window, int heads, int head_dim, const Launch& fwd,
         const Launch& bwd, const Launch& finish, int producers) {
    const size_t tokens = window * window + 1, width = heads * head_dim;
    const int rows = (2 * window - 1) * (2 * window - 1) + 3;
    const auto qkv = read<E>(dir + "/qkv.bin", seqs * tokens * 3 * width);
    const auto table = read<float>(dir + "/table.bin", rows * heads);
    const auto dout = read<E>(dir + "/dout.bin", seqs * tokens * width);
    auto dtable = read<float>(dir + "/dtable.bin", rows * heads);
    E nan_e;
    std::memset(&nan_e, 0xff, sizeof nan_e);
    std::vector<E> out(seqs * tokens * width, nan_e), dqkv(qkv.size(), nan_e);
    std::vector<float> lse(seqs * heads * tokens, NAN), partials(static_cast<size_t>(heads) * producers * rows, NAN);

    const bool fast = fwd.name.rfind("attention_fast_", 0) == 0;
    if (fast) {
        using Forward = void(const E*, const float*, E*, float*, int, int, int);
        emu::launch(dim3(fwd.gx, fwd.gy), dim3(fwd.block), fwd.smem, kernel<Forward>(fwd.name), qkv.data(),
                    table.data(), out.data(), lse.data(), seqs, window, heads);
    } else {
        using Forward = void(const E*, const float*, E*, float*, int, int);
        emu::launch(dim3(fwd.gx, fwd.gy), dim3(fwd.block), fwd.smem, kernel<Forward>(fwd.name), qkv.data(),
                    table.data(), out.data(), lse.data(), window, heads);
    }
    if (bwd.name.rfind("attention_fast_", 0) == 0) {
        using Backward = void(const E*, const float*, const E*, const E*, const float*, E*, float*, int, int, int);
        emu::launch(dim3(bwd.gx, bwd.gy), dim3(bwd.block), bwd.smem, kernel<Backward>(bwd.name), qkv.data(),
                    table.data(), static_cast<const E*>(out.data()), dout.data(), static_cast<const float*>(lse.data()),
                    dqkv.data(), partials.data(), seqs, window, heads);
    } else {
        using Backward = void(const E*, const float*, const E*, const E*, const float*, E*, float*, int, int);
        emu::launch(dim3(bwd.gx, bwd.gy), dim3(bwd.block), bwd.smem, kernel<Backward>(bwd.name), qkv.data(),
                    table.data(), static_cast<const E*>(out.data()), dout.data(), static_cast<const float*>(lse.data()),
                    dqkv.data(), partials.data(), window, heads);
    }
    using Finish = void(const float*, float*, int, int, int);
    emu::launch(dim3(finish.gx), dim3(finish.block), 0, kernel<Finish>(finish.name),
                static_cast<const float*>(partials.data()), dtable.data(), producers, rows, heads);

    write(dir + "/out.bin", out);
    write(dir + "/lse.bin", lse);
    write(dir + "/dqkv.bin", dqkv);
    write(dir + "/dtable_out.bin", dtable);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) die("usage: attention_driver DIR");
    const std::string dir = argv[1];
    std::ifstream f(dir + "/launch.txt");
    int seqs, window, heads, head_dim, producers;
    std::string elem, word;
    Launch fwd, bwd, finish;
    f >> seqs >> window >> heads >> head_dim >> elem;
    f >> word >> fwd.name >> fwd.gx >> fwd.gy >> fwd.block >> fwd.smem;
    f >> word >> bwd.name >> bwd.gx >> bwd.gy >> bwd.block >> bwd.smem;
    f >> word >> finish.name >> finish.gx >> finish.block >> producers;
    if (!f) die(dir + "/launch.txt: unreadable");
    if (elem == "bf16")
        run<bf16>(dir, seqs, window, heads, head_dim, fwd, bwd, finish, producers);
    else if (elem == "f32")
        run<float>(dir, seqs, window, heads, head_dim, fwd, bwd, finish, producers);
    else
        die("element type " + elem);
    return 0;
}
