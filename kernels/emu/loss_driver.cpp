// kernels/loss.cu (with sum_finish of kernels/reduce.cu, writing and accumulating) on the CPU under ThreadSanitizer,
// against the masked MSE in double: widths on and off the 8-value packs, rows longer than
// one pass of the block.
#include "check.h"
#include "loss.cu"
#include "reduce.cu"

namespace {

template <typename T>
void mse_case(int rows, int cols, unsigned threads,
              void (*kernel)(const T*, const float*, const float*, T*, float*, int, float)) {
    const size_t n = (size_t)rows * cols;
    const auto pred = check::rounded<T>(check::uniform(n, 2.0f, 41));
    const auto bias = check::uniform(cols, 0.5f, 42), target = check::uniform(n, 2.0f, 43);
    const float grad_scale = 0.25f;
    const float grad_coef = (float)(grad_scale * 2.0 / (double)n);
    double want_loss = 0;
    std::vector<double> want_d(n);
    for (size_t i = 0; i < n; ++i) {
        const double diff = (double)pred[i] + bias[i % cols] - target[i];
        want_loss += diff * diff / (double)n;
        want_d[i] = grad_coef * diff;
    }
    const auto pred_t = check::stored<T>(pred);
    std::vector<T> dpred(n);
    std::vector<float> row_loss(rows), loss(1);
    emu::launch(dim3(rows), dim3(threads), 0, kernel, pred_t.data(), bias.data(), target.data(), dpred.data(),
                row_loss.data(), cols, grad_coef);
    // Written, then added to a step's loss sum that holds an earlier micro-batch's 0.25.
    loss[0] = NAN;
    emu::launch(dim3(1), dim3(32), 0, sum_finish, (const float*)row_loss.data(), rows, (float)(1.0 / (double)n), 0,
                loss.data());
    std::vector<float> loss_sum{0.25f};
    emu::launch(dim3(1), dim3(32), 0, sum_finish, (const float*)row_loss.data(), rows, (float)(1.0 / (double)n), 1,
                loss_sum.data());
    char what[120];
    std::snprintf(what, sizeof what, "masked_mse_%s [%d, %d], %u threads", check::name<T>(), rows, cols, threads);
    check::close(std::string(what) + ": loss", loss, {want_loss}, 1e-5);
    check::close(std::string(what) + ": loss added to a sum", loss_sum, {0.25 + want_loss}, 1e-5);
    check::close(std::string(what) + ": dpred", check::floats(dpred.data(), n), want_d, check::tol<T>());
}

template <typename T>
void all(void (*kernel)(const T*, const float*, const float*, T*, float*, int, float)) {
    mse_case<T>(7, 100, 32, kernel);
    mse_case<T>(5, 768, 64, kernel);
}

}  // namespace

int main() {
    all<float>(masked_mse_f32);
    all<__nv_bfloat16>(masked_mse_bf16);
    return check::finish("loss_driver");
}
