// kernels/softmax.cu under emulation, launched as src/cuda/conv.rs does (`softmax`,
// `softmax_backward`: one block of 256 threads per row): rows shorter than a warp, shorter
// and longer than the block, several passes per thread, rows with a large common offset
// (the max subtraction), rows with -inf entries (masked scores) and a single element,
// poisoned outputs. The kernels have no vector path, so there are no misaligned views to
// test.
#include "harness.h"

#include "softmax.cu"

using namespace harness;

namespace {

Report report("softmax");
Rng rng(0x50F7);

// Mirrors of src/cuda/conv.rs.
constexpr unsigned kThreads = 256;            // THREADS
constexpr size_t kMaxBlocks = size_t(1) << 20;  // MAX_BLOCKS

// The launcher's grid cap. The real one binds only past a million rows, so a few cases
// run with it lowered to two blocks: the grid the launcher makes for that many rows, in
// miniature, so that the kernels' grid-stride loop over rows runs too (and the barrier
// that guards the shared scratch between rows matters).
size_t max_blocks = kMaxBlocks;

// `softmax_launch`: one block per row, grid capped.
emu::LaunchConfig softmax_launch(size_t rows) {
    return {dim3((unsigned)std::clamp<size_t>(rows, 1, max_blocks)), dim3(kThreads), 0};
}

template <class T>
struct K;
template <>
struct K<float> {
    static constexpr auto fwd = EMU_KERNEL(softmax_f32), bwd = EMU_KERNEL(softmax_bwd_f32);
};
template <>
struct K<bf16> {
    static constexpr auto fwd = EMU_KERNEL(softmax_bf16), bwd = EMU_KERNEL(softmax_bwd_bf16);
};

template <class T>
constexpr double rtol_of() {
    return std::is_same_v<T, bf16> ? 1.0 / 256 : 1e-6;
}

template <class T>
void run(size_t rows, size_t n, bool masked) {
    const std::string what = format("softmax %s rows=%zu n=%zu%s grid cap %zu", Elem<T>::name, rows, n,
                                    masked ? " masked" : "", max_blocks);
    std::vector<double> x(rows * n);
    for (size_t r = 0; r < rows; ++r) {
        const double offset = r % 2 ? 60 * rng.normal() : 0.0;  // exp(x) alone would overflow
        for (size_t j = 0; j < n; ++j) x[r * n + j] = round_to<T>(offset + 3 * rng.normal());
        // Masked entries, never the whole row.
        if (masked)
            for (size_t j = 1; j < n; j += 3) x[r * n + j] = -INFINITY;
    }
    const auto g = rng.values<T>(rows * n);
    DeviceArray<T> dx_in(x), dg(g), y(rows * n), dx(rows * n);
    const int64_t r64 = (int64_t)rows, n64 = (int64_t)n;
    emu::launch(softmax_launch(rows), K<T>::fwd, (const T*)dx_in.ptr(), y.ptr(), r64, n64);

    std::vector<double> want(rows * n), tol(rows * n);
    for (size_t r = 0; r < rows; ++r) {
        double m = -INFINITY, s = 0;
        for (size_t j = 0; j < n; ++j) m = std::max(m, x[r * n + j]);
        for (size_t j = 0; j < n; ++j) s += std::exp(x[r * n + j] - m);
        for (size_t j = 0; j < n; ++j) {
            const size_t i = r * n + j;
            want[i] = std::exp(x[i] - m) / s;
            // expf and the f32 sum over n terms, then rounding to T.
            tol[i] = 1e-30 + (1e-5 + rtol_of<T>()) * want[i];
        }
    }
    const auto got_y = y.download();
    report.within(what + ": y", got_y, want, tol, "(1e-5 + rounding)·y");

    // Backward from the kernel's own output, as the op's backward does.
    emu::launch(softmax_launch(rows), K<T>::bwd, (const T*)y.ptr(), (const T*)dg.ptr(), dx.ptr(), r64, n64);
    std::vector<double> want_dx(rows * n), dx_tol(rows * n);
    for (size_t r = 0; r < rows; ++r) {
        double dot = 0, dot_abs = 0;
        for (size_t j = 0; j < n; ++j) {
            dot += got_y[r * n + j] * g[r * n + j];
            dot_abs += std::fabs(got_y[r * n + j] * g[r * n + j]);
        }
        for (size_t j = 0; j < n; ++j) {
            const size_t i = r * n + j;
            want_dx[i] = got_y[i] * (g[i] - dot);
            dx_tol[i] = 1e-6 * got_y[i] * (std::fabs(g[i]) + dot_abs) + rtol_of<T>() * std::fabs(want_dx[i]);
        }
    }
    report.within(what + ": dx", dx.download(), want_dx, dx_tol, "1e-6·y·(|g| + Σ|g·y|) + rounding");
}

template <class T>
void family() {
    run<T>(3, 1, false);     // a single element: y = 1, dx = 0
    run<T>(5, 37, false);    // shorter than the block: idle threads carry -inf / 0
    run<T>(4, 300, true);    // just past the block
    max_blocks = 2;          // blocks take several rows
    run<T>(5, 37, false);
    run<T>(4, 300, true);
    max_blocks = kMaxBlocks;
    if (kTsan) return;
    run<T>(3, 7, true);
    run<T>(7, 256, false);   // exactly the block
    run<T>(2, 2053, false);  // several passes per thread
    run<T>(3, 1001, true);
}

}  // namespace

int main() {
    emu::watchdog(300);
    family<float>();
    family<bf16>();
    return report.finish();
}
