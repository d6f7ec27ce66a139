// Runs kernels/global_attention.cu on the CPU through the shim: the forward, then the
// backward's delta, dq and dkdv kernels, with the launches the Rust launcher planned
// (lomar::cuda::global_attention::plan). Driven by tests/kernel_emulation.rs, which writes
// the inputs and compares the outputs with the CPU op. Build with -rdynamic: kernels are
// found by name with dlsym.
//
// Usage: global_attention_driver DIR. DIR/launch.txt holds
//   seqs tokens heads head_dim elem(f32|bf16)
// then four lines `NAME grid.x grid.y grid.z block.x smem_bytes`: forward, delta, dq, dkdv;
// DIR/{qkv,dout}.bin the inputs (elem, little-endian). Writes DIR/{out,lse,dqkv}.bin.
// Outputs and the delta scratch start as NaN so anything unwritten shows.
#include "driver_files.h"
#include "global_attention.cu"

namespace {

struct Launch {
    std::string name;
    unsigned gx = 1, gy = 1, gz = 1, block = 1, smem = 0;
};

template <typename Fn, typename... Args>
void launch(const Launch& l, Args... args) {
    emu::launch(dim3(l.gx, l.gy, l.gz), dim3(l.block), l.smem, kernel<Fn>(l.name), args...);
}

template <typename E>
void run(const std::string& dir, int seqs, int tokens, int heads, int head_dim, const Launch (&l)[4]) {
    const size_t rows = static_cast<size_t>(seqs) * tokens, width = heads * head_dim;
    const auto qkv = read<E>(dir + "/qkv.bin", rows * 3 * width);
    const auto dout = read<E>(dir + "/dout.bin", rows * width);
    E nan_e;
    std::memset(&nan_e, 0xff, sizeof nan_e);
    std::vector<E> out(rows * width, nan_e), dqkv(qkv.size(), nan_e);
    std::vector<float> lse(rows * heads, NAN), delta(rows * heads, NAN);

    using Forward = void(const E*, E*, float*, int, int);
    using Delta = void(const E*, const E*, float*, int, int, int, int);
    using Backward = void(const E*, const E*, const float*, const float*, E*, int, int);
    launch<Forward>(l[0], qkv.data(), out.data(), lse.data(), tokens, heads);
    launch<Delta>(l[1], static_cast<const E*>(out.data()), dout.data(), delta.data(), static_cast<int>(rows), tokens,
                  heads, head_dim);
    for (int pass = 2; pass < 4; ++pass)
        launch<Backward>(l[pass], qkv.data(), dout.data(), static_cast<const float*>(lse.data()),
                         static_cast<const float*>(delta.data()), dqkv.data(), tokens, heads);

    write(dir + "/out.bin", out);
    write(dir + "/lse.bin", lse);
    write(dir + "/dqkv.bin", dqkv);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) die("usage: global_attention_driver DIR");
    const std::string dir = argv[1];
    std::ifstream f(dir + "/launch.txt");
    int seqs, tokens, heads, head_dim;
    std::string elem;
    Launch l[4];
    f >> seqs >> tokens >> heads >> head_dim >> elem;
    for (Launch& x : l) f >> x.name >> x.gx >> x.gy >> x.gz >> x.block >> x.smem;
    if (!f) die(dir + "/launch.txt: unreadable");
    if (elem == "bf16")
        run<bf16>(dir, seqs, tokens, heads, head_dim, l);
    else if (elem == "f32")
        run<float>(dir, seqs, tokens, heads, head_dim, l);
    else
        die("element type " + elem);
    return 0;
}
