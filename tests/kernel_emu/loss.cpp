// kernels/loss.cu under emulation, launched as src/cuda/loss.rs does: squared error per
// row (sq_err_partial + rows_finish, split by reduce's `blocks_per_row`) and its gradient,
// cross-entropy forward (ce_fwd + rows_finish for the mean) and backward. Losses are f32
// whatever the input dtype.
#include "harness.h"

#include "loss.cu"

using namespace harness;

namespace {

Report report("loss");
Rng rng(0x1055);

constexpr unsigned kThreads = 256;  // THREADS of src/cuda/loss.rs

// `cuda::reduce::blocks_per_row` (MIN_PER_BLOCK 2048, MAX_PARTIAL_BLOCKS 4096).
size_t blocks_per_row(size_t rows, size_t len) {
    return std::clamp<size_t>(ceil_div(len, 2048), 1, std::max<size_t>(4096 / std::max<size_t>(rows, 1), 1));
}

template <class T>
struct K;
template <>
struct K<float> {
    static constexpr auto sq_err_partial = EMU_KERNEL(sq_err_partial_f32), sq_err_bwd = EMU_KERNEL(sq_err_bwd_f32),
                          ce_fwd = EMU_KERNEL(ce_fwd_f32), ce_bwd = EMU_KERNEL(ce_bwd_f32);
    static constexpr auto ce_fwd_diag = EMU_KERNEL(ce_fwd_diag_f32), ce_bwd_diag = EMU_KERNEL(ce_bwd_diag_f32);
};
template <>
struct K<bf16> {
    static constexpr auto sq_err_partial = EMU_KERNEL(sq_err_partial_bf16), sq_err_bwd = EMU_KERNEL(sq_err_bwd_bf16),
                          ce_fwd = EMU_KERNEL(ce_fwd_bf16), ce_bwd = EMU_KERNEL(ce_bwd_bf16);
    static constexpr auto ce_fwd_diag = EMU_KERNEL(ce_fwd_diag_bf16), ce_bwd_diag = EMU_KERNEL(ce_bwd_diag_bf16);
};

template <class T>
constexpr double out_rtol() {
    return std::is_same_v<T, bf16> ? 1.0 / 128 : 1e-5;
}

// The private `rows_finish` of src/cuda/loss.rs: out[r] = scale·Σ partials[r·per_row ..].
void finish_rows(const DeviceArray<float>& partials, DeviceArray<float>& out, size_t rows, size_t per_row,
                 float scale) {
    emu::launch(grid_rows(rows, kThreads), EMU_KERNEL(rows_finish), partials.ptr(), out.ptr(), (int64_t)per_row,
                scale);
}

// `cuda::loss::sq_err_rows` and `sq_err_backward`: mean of (p − t)² per row, and
// dp = 2·g[row]·(p − t)/len.
template <class T>
void squared_error(size_t rows, size_t len) {
    const size_t n = rows * len, bpr = blocks_per_row(rows, len);
    const auto p = rng.values<T>(n), t = rng.values<T>(n);
    DeviceArray<T> dp(p), dt(t);
    DeviceArray<float> partials(rows * bpr), out(rows);
    emu::launch(grid_rows(rows * bpr, kThreads), K<T>::sq_err_partial, dp.ptr(), dt.ptr(), partials.ptr(),
                (int64_t)len, (int64_t)bpr);
    finish_rows(partials, out, rows, bpr, 1.0f / (float)std::max<size_t>(len, 1));

    std::vector<double> want(rows, 0.0);
    for (size_t r = 0; r < rows; ++r) {
        for (size_t i = 0; i < len; ++i) want[r] += (p[r * len + i] - t[r * len + i]) * (p[r * len + i] - t[r * len + i]);
        want[r] /= (double)len;
    }
    const std::string shape = format("%s rows=%zu len=%zu (%zu blocks per row)", Elem<T>::name, rows, len, bpr);
    report.close("mse " + shape, out.download(), want, 0, 1e-5);

    const auto g = rng.values<float>(rows);
    DeviceArray<float> dg(g);
    DeviceArray<T> grad(n);
    const int64_t len64 = (int64_t)std::max<size_t>(len, 1);
    const float coef = 2.0f / (float)std::max<size_t>(len, 1);
    emu::launch(grid_1d(n, kThreads), K<T>::sq_err_bwd, dp.ptr(), dt.ptr(), dg.ptr(), grad.ptr(), len64, coef,
                (int64_t)n);
    std::vector<double> want_grad(n);
    for (size_t i = 0; i < n; ++i) want_grad[i] = 2.0 * g[i / len] * (p[i] - t[i]) / (double)len;
    report.close("mse backward " + shape, grad.download(), want_grad, 1e-7, out_rtol<T>());
}

// `cuda::loss::cross_entropy` and `cross_entropy_backward` on [rows, classes] logits; with
// `diagonal`, the `_diag` kernels, whose target is the row index (no target array).
template <class T>
void cross_entropy(size_t rows, size_t classes, double scale, bool diagonal = false) {
    auto x = rng.values<T>(rows * classes, scale);
    if (rows > 1) x[classes] = round_to<T>(80.0);  // exp(80) overflows f32 without the max shift
    std::vector<int64_t> targets(rows);
    for (size_t r = 0; r < rows; ++r) targets[r] = diagonal ? (int64_t)r : (int64_t)rng.below(classes);
    DeviceArray<T> dx(x);
    DeviceArray<int64_t> dtargets(rows);
    for (size_t r = 0; r < rows; ++r) dtargets.ptr()[r] = targets[r];
    DeviceArray<float> loss_rows(rows), lse(rows), loss(1);
    if (diagonal)
        emu::launch(grid_rows(rows, kThreads), K<T>::ce_fwd_diag, dx.ptr(), loss_rows.ptr(), lse.ptr(),
                    (int64_t)classes);
    else
        emu::launch(grid_rows(rows, kThreads), K<T>::ce_fwd, dx.ptr(), dtargets.ptr(), loss_rows.ptr(), lse.ptr(),
                    (int64_t)classes);
    finish_rows(loss_rows, loss, 1, rows, 1.0f / (float)rows);

    std::vector<double> want_lse(rows), want_rows(rows);
    double mean = 0;
    for (size_t r = 0; r < rows; ++r) {
        const double* row = &x[r * classes];
        const double m = *std::max_element(row, row + classes);
        double z = 0;
        for (size_t c = 0; c < classes; ++c) z += std::exp(row[c] - m);
        want_lse[r] = m + std::log(z);
        want_rows[r] = want_lse[r] - row[targets[r]];
        mean += want_rows[r] / (double)rows;
    }
    const std::string shape =
        format("%s rows=%zu classes=%zu%s", Elem<T>::name, rows, classes, diagonal ? " diagonal" : "");
    report.close("cross_entropy lse " + shape, lse.download(), want_lse, 1e-5, 1e-6);
    report.close("cross_entropy row losses " + shape, loss_rows.download(), want_rows, 1e-5, 1e-5);
    report.close("cross_entropy mean " + shape, loss.download(), {mean}, 1e-5, 1e-5);

    // The backward reads the forward's lse and an incoming gradient g on the device.
    const double g = round_to<float>(rng.normal());
    DeviceArray<float> dg(std::vector<double>{g});
    DeviceArray<T> grad(rows * classes);
    if (diagonal)
        emu::launch(grid_rows(rows, kThreads), K<T>::ce_bwd_diag, dx.ptr(), lse.ptr(), dg.ptr(), grad.ptr(),
                    (int64_t)classes, 1.0f / (float)rows);
    else
        emu::launch(grid_rows(rows, kThreads), K<T>::ce_bwd, dx.ptr(), dtargets.ptr(), lse.ptr(), dg.ptr(),
                    grad.ptr(), (int64_t)classes, 1.0f / (float)rows);
    std::vector<double> want_grad(rows * classes);
    for (size_t r = 0; r < rows; ++r)
        for (size_t c = 0; c < classes; ++c)
            want_grad[r * classes + c] =
                g * (std::exp(x[r * classes + c] - want_lse[r]) - ((int64_t)c == targets[r] ? 1.0 : 0.0)) / (double)rows;
    report.close("cross_entropy backward " + shape, grad.download(), want_grad, 1e-7, out_rtol<T>());
}

template <class T>
void family() {
    struct Case {
        size_t rows, len;
    };
    std::vector<Case> mse = {{1, 1}, {1, 7}, {3, 300}, {17, 129}, {2, 4097}};
    if (!kTsan) mse.push_back({1, 20000});
    for (const Case& c : mse) squared_error<T>(c.rows, c.len);

    std::vector<Case> ce = {{1, 1}, {1, 2}, {5, 37}, {3, 1000}};
    if (!kTsan) ce.push_back({33, 3001});
    for (const Case& c : ce) cross_entropy<T>(c.rows, c.len, 3.0);
    // CLIP's contrastive targets (0..N on square logits; also fewer rows than classes).
    for (const Case& c : std::vector<Case>{{1, 1}, {7, 7}, {5, 37}, {64, 64}}) cross_entropy<T>(c.rows, c.len, 3.0, true);
}

}  // namespace

int main() {
    emu::watchdog(300);
    family<float>();
    family<bf16>();
    return report.finish();
}
