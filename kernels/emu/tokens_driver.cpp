// MAE's token placement of kernels/tokens.cu on the CPU under ThreadSanitizer, against the
// definition in double: the encoder's input (cls, then the kept patches at their positions)
// and the decoder's (the encoded rows back at their patches, mask tokens between), on slot
// maps made from random masks as src/cuda/mae_slots.rs makes them; widths below, at and
// above one pass of the block, chunks that do not divide the rows.
#include <algorithm>

#include "check.h"
#include "tokens.cu"

namespace {

template <typename T>
using Forward = void (*)(const T*, const float*, const float*, const float*, const int*, const int*, float*, int);
template <typename T>
using Backward = void (*)(const float*, const int*, T*, float*, int, int, int);

// One placement: rows of x, its source rows, the slot and position-row maps.
struct Placement {
    const char* name;
    int src_rows;
    std::vector<int> slot, pos_row;
};

// `images` images of n patches, `kept` of them kept (a random subset, ascending).
std::pair<Placement, Placement> placements(int images, int n, int kept, unsigned seed) {
    std::mt19937 rng(seed);
    Placement enc{"encoder", images * kept, {}, {}}, dec{"decoder", images * (1 + kept), {}, {}};
    for (int b = 0; b < images; ++b) {
        std::vector<int> order(n);
        for (int i = 0; i < n; ++i) order[i] = i;
        std::shuffle(order.begin(), order.end(), rng);
        std::vector<int> keep(order.begin(), order.begin() + kept);
        std::sort(keep.begin(), keep.end());
        enc.slot.push_back(-1), enc.pos_row.push_back(0);
        for (int j = 0; j < kept; ++j) enc.slot.push_back(b * kept + j), enc.pos_row.push_back(1 + keep[j]);
        dec.slot.push_back(b * (1 + kept)), dec.pos_row.push_back(0);
        for (int i = 0, j = 0; i < n; ++i) {
            const bool is_kept = j < kept && keep[j] == i;
            dec.slot.push_back(is_kept ? b * (1 + kept) + 1 + j++ : -1);
            dec.pos_row.push_back(1 + i);
        }
    }
    return {enc, dec};
}

template <typename T>
void place_case(const Placement& pl, int n, int width, unsigned threads, int chunks, Forward<T> forward,
                Backward<T> backward) {
    const int rows = (int)pl.slot.size();
    const auto src = check::rounded<T>(check::uniform((size_t)pl.src_rows * width, 2.0f, 51));
    const auto bias = check::uniform(width, 0.5f, 52), fill = check::uniform(width, 1.0f, 53);
    const auto pos = check::uniform((size_t)(1 + n) * width, 1.0f, 54);
    const auto dx = check::uniform((size_t)rows * width, 1.0f, 55);
    std::vector<double> want_x((size_t)rows * width), want_fill(width), want_bias(width);
    std::vector<float> want_dsrc((size_t)pl.src_rows * width, NAN);
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < width; ++c) {
            const size_t i = (size_t)r * width + c;
            const int from = pl.slot[r];
            const double p = pos[(size_t)pl.pos_row[r] * width + c];
            want_x[i] = (from < 0 ? (double)fill[c] : (double)src[(size_t)from * width + c] + bias[c]) + p;
            if (from < 0) {
                want_fill[c] += dx[i];
            } else {
                want_bias[c] += dx[i];
                want_dsrc[(size_t)from * width + c] = check::load(check::store<T>(dx[i]));
            }
        }
    char what[160];
    std::snprintf(what, sizeof what, "_%s %s [%d, %d], %u threads, %d chunks", check::name<T>(), pl.name, rows, width,
                  threads, chunks);

    const auto src_t = check::stored<T>(src);
    std::vector<float> x((size_t)rows * width, NAN);
    emu::launch(dim3(rows), dim3(threads), 0, forward, src_t.data(), bias.data(), fill.data(), pos.data(),
                pl.slot.data(), pl.pos_row.data(), x.data(), width);
    check::close(std::string("place_tokens_forward") + what + ": x", x, want_x, 1e-6);

    const int per = check::rows_per_chunk(rows, chunks);
    const unsigned used = (rows + per - 1) / per;
    std::vector<T> dsrc((size_t)pl.src_rows * width, check::store<T>(NAN));
    std::vector<float> partial(2 * (size_t)used * width, NAN);
    emu::launch(dim3((width + threads - 1) / threads, used), dim3(threads), 0, backward, dx.data(), pl.slot.data(),
                dsrc.data(), partial.data(), rows, width, per);
    const std::string bwd = std::string("place_tokens_backward") + what;
    check::exact(bwd + ": dsrc", check::floats(dsrc.data(), dsrc.size()), want_dsrc);
    const std::vector<float> zero(width, 0.0f);
    check::close(bwd + ": d fill", check::add_chunks(zero, partial, 0, used, width), want_fill, 2e-5);
    check::close(bwd + ": d bias", check::add_chunks(zero, partial, 1, used, width), want_bias, 2e-5);
}

template <typename T>
void all(Forward<T> forward, Backward<T> backward) {
    // tiny's MAE: a 8x8 grid, 16 kept; widths 64 (encoder) and 32 (decoder).
    const auto [enc, dec] = placements(3, 64, 16, 7);
    place_case<T>(enc, 64, 64, 128, 4, forward, backward);
    place_case<T>(dec, 64, 32, 128, 5, forward, backward);
    // A row wider than a block's pass, several blocks across in the backward, ragged chunks.
    const auto [enc2, dec2] = placements(2, 49, 12, 8);
    place_case<T>(enc2, 49, 200, 64, 3, forward, backward);
    place_case<T>(dec2, 49, 136, 64, 7, forward, backward);
}

}  // namespace

int main() {
    all<float>(place_tokens_forward_f32, place_tokens_backward_f32);
    all<__nv_bfloat16>(place_tokens_forward_bf16, place_tokens_backward_bf16);
    return check::finish("tokens_driver");
}
