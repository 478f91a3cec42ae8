// kernels/norm.cu under emulation, launched as src/cuda/norm.rs does: LayerNorm (with and
// without affine parameters), LayerNorm fused with the adaLN modulation (one parameter
// group per batch element) and RMSNorm, forward (output, mean, rstd) and backward (dx and
// the two-stage parameter-gradient reduction, finished by reduce.cu's col_finish), for
// every pairing of f32/bf16 activations with f32/bf16 parameters, at row lengths that take
// the scalar and the 16-byte vector entry points and rows too long for the kernels'
// register caches. With the warp switch (SYNTHOS_CUDA_NORM=warp) the same cases run the
// one-warp-per-row forward and, for 16-byte rows that fit a warp, the warp backward: dx by
// warps and the parameter gradients' column reduction (norm_param_grad), with grids where
// warps stride over rows and row splits that do not divide the rows.
#include "harness.h"

#include "norm.cu"
#include "reduce.cu"  // col_finish: the second stage of the parameter gradients

using namespace harness;

namespace {

Report report("norm");
Rng rng(0x40E3);

// Mirrors of src/cuda/norm.rs.
constexpr size_t kMaxThreads = 256;         // MAX_THREADS
constexpr size_t kFwdCache = 4;             // FWD_CACHE
constexpr size_t kBwdCache = 2;             // BWD_CACHE
constexpr size_t kParamGradBlocks = 512;    // PARAM_GRAD_BLOCKS
constexpr size_t kMaxGrid = size_t(1) << 20;  // MAX_GRID
constexpr size_t kWarpCache = 8;            // WARP_CACHE
constexpr size_t kParamGradTarget = 1024;   // PARAM_GRAD_TARGET_BLOCKS
constexpr size_t kParamGradMinRows = 32;    // PARAM_GRAD_MIN_ROWS

// `vec_width`: 16 bytes of T when d is a multiple of that, else 1.
template <class T>
size_t vec_width(size_t d) {
    const size_t v = 16 / sizeof(T);
    return d % v == 0 ? v : 1;
}

// `param_grad_splits`: (splits, chunk) of the warp backward's parameter gradients.
std::pair<size_t, size_t> param_grad_splits(size_t groups, size_t rpg, size_t nvec) {
    const size_t base = groups * ceil_div(nvec, 32);
    const size_t splits = std::clamp<size_t>(ceil_div(kParamGradTarget, base), 1, ceil_div(rpg, kParamGradMinRows));
    const size_t chunk = ceil_div(rpg, splits);
    return {ceil_div(rpg, chunk), chunk};
}

// `threads_for`: a multiple of 32, at most 256, so that each thread holds at most `cache`
// of the row's vectors where it fits.
unsigned threads_for(size_t nvec, size_t cache) {
    return (unsigned)std::clamp<size_t>(ceil_div(ceil_div(nvec, cache), 32) * 32, 32, kMaxThreads);
}

// Entry points for activations T and parameters P (`fwd_name`, `bwd_name`).
template <class T, class P>
struct K;
template <>
struct K<float, float> {
    static constexpr auto fwd_v1 = EMU_KERNEL(norm_fwd_f32_f32_v1), fwd_vec = EMU_KERNEL(norm_fwd_f32_f32_vec);
    static constexpr auto warp_v1 = EMU_KERNEL(norm_fwd_warp_f32_f32_v1), warp_vec = EMU_KERNEL(norm_fwd_warp_f32_f32_vec);
    static constexpr auto bwd_v1 = EMU_KERNEL(norm_bwd_f32_f32_v1), bwd_vec = EMU_KERNEL(norm_bwd_f32_f32_vec);
    static constexpr auto bwd_dx_warp = EMU_KERNEL(norm_bwd_dx_warp_f32_f32_vec);
    static constexpr auto param_grad = EMU_KERNEL(norm_param_grad_f32_f32_vec);
};
template <>
struct K<float, bf16> {
    static constexpr auto fwd_v1 = EMU_KERNEL(norm_fwd_f32_bf16_v1), fwd_vec = EMU_KERNEL(norm_fwd_f32_bf16_vec);
    static constexpr auto warp_v1 = EMU_KERNEL(norm_fwd_warp_f32_bf16_v1), warp_vec = EMU_KERNEL(norm_fwd_warp_f32_bf16_vec);
    static constexpr auto bwd_v1 = EMU_KERNEL(norm_bwd_f32_bf16_v1), bwd_vec = EMU_KERNEL(norm_bwd_f32_bf16_vec);
    static constexpr auto bwd_dx_warp = EMU_KERNEL(norm_bwd_dx_warp_f32_bf16_vec);
    static constexpr auto param_grad = EMU_KERNEL(norm_param_grad_f32_bf16_vec);
};
template <>
struct K<bf16, float> {
    static constexpr auto fwd_v1 = EMU_KERNEL(norm_fwd_bf16_f32_v1), fwd_vec = EMU_KERNEL(norm_fwd_bf16_f32_vec);
    static constexpr auto warp_v1 = EMU_KERNEL(norm_fwd_warp_bf16_f32_v1), warp_vec = EMU_KERNEL(norm_fwd_warp_bf16_f32_vec);
    static constexpr auto bwd_v1 = EMU_KERNEL(norm_bwd_bf16_f32_v1), bwd_vec = EMU_KERNEL(norm_bwd_bf16_f32_vec);
    static constexpr auto bwd_dx_warp = EMU_KERNEL(norm_bwd_dx_warp_bf16_f32_vec);
    static constexpr auto param_grad = EMU_KERNEL(norm_param_grad_bf16_f32_vec);
};
template <>
struct K<bf16, bf16> {
    static constexpr auto fwd_v1 = EMU_KERNEL(norm_fwd_bf16_bf16_v1), fwd_vec = EMU_KERNEL(norm_fwd_bf16_bf16_vec);
    static constexpr auto warp_v1 = EMU_KERNEL(norm_fwd_warp_bf16_bf16_v1), warp_vec = EMU_KERNEL(norm_fwd_warp_bf16_bf16_vec);
    static constexpr auto bwd_v1 = EMU_KERNEL(norm_bwd_bf16_bf16_v1), bwd_vec = EMU_KERNEL(norm_bwd_bf16_bf16_vec);
    static constexpr auto bwd_dx_warp = EMU_KERNEL(norm_bwd_dx_warp_bf16_bf16_vec);
    static constexpr auto param_grad = EMU_KERNEL(norm_param_grad_bf16_bf16_vec);
};
template <class P>
constexpr auto col_finish_kernel() {
    if constexpr (std::is_same_v<P, float>)
        return EMU_KERNEL(col_finish_f32);
    else
        return EMU_KERNEL(col_finish_bf16);
}

template <class T>
constexpr double rtol_of() {
    return std::is_same_v<T, bf16> ? 1.0 / 128 : 1e-5;
}

// The forward's kernel choice (`cuda::norm::warp_forward`), the launcher's grid cap for
// the warp kernel (MAX_GRID; lowered for a few cases so that the row loop strides), and
// how many forwards took the warp kernel.
bool warp_forward = false;
size_t warp_grid_cap = 1 << 20;
size_t warp_runs = 0;
// Backwards that took the warp kernels, and those whose parameter gradients were split in
// more than one block of rows (of them, with a short last split).
size_t warp_bwd_runs = 0, split_runs = 0, short_split_runs = 0;

// cpu::norm::RowNorm, plus which parameters the op has.
struct Spec {
    const char* op;
    size_t rows, d, rows_per_group;
    float w_offset, eps;
    bool rms, has_w, has_b;
    size_t groups() const { return rows / rows_per_group; }
};

// Forward and backward of one spec, compared with a double reference.
template <class T, class P>
void run(const Spec& s, bool with_dx) {
    const size_t rows = s.rows, d = s.d, groups = s.groups();
    const std::string what =
        format("%s x %s params %s rows=%zu d=%zu groups=%zu", s.op, Elem<T>::name, Elem<P>::name, rows, d, groups);

    // Rows with an offset of their own (|mean| well above the spread).
    std::vector<double> x(rows * d);
    for (size_t r = 0; r < rows; ++r) {
        const double offset = 4 * rng.normal();
        for (size_t c = 0; c < d; ++c) x[r * d + c] = round_to<T>(offset + rng.normal());
    }
    const auto w = rng.values<P>(groups * d, 0.5), b = rng.values<P>(groups * d, 0.5), dy = rng.values<T>(rows * d);
    DeviceArray<T> dx_in(x), ddy(dy);
    DeviceArray<P> dw_in(w), db_in(b);
    const P* w_ptr = s.has_w ? dw_in.ptr() : nullptr;
    const P* b_ptr = s.has_b ? db_in.ptr() : nullptr;

    // ---- forward (`cuda::norm::forward` with keep_stats)
    const size_t vec = vec_width<T>(d);
    DeviceArray<T> y(rows * d);
    DeviceArray<float> mean(rows), rstd(rows);
    // With `warp_forward` (SYNTHOS_CUDA_NORM=warp) rows of at most 32·8 vectors take the
    // one-warp-per-row kernel: blocks of 8 warps, grid capped at `warp_grid_cap` blocks.
    if (warp_forward && d / vec <= 32 * 8) {
        ++warp_runs;
        const emu::LaunchConfig wcfg{dim3((unsigned)std::clamp<size_t>(ceil_div(rows, 8), 1, warp_grid_cap)), dim3(256), 0};
        const auto fwd = vec > 1 ? K<T, P>::warp_vec : K<T, P>::warp_v1;
        emu::launch(wcfg, fwd, dx_in.ptr(), y.ptr(), w_ptr, b_ptr, mean.ptr(), rstd.ptr(), (int64_t)rows, (int)d,
                    (int64_t)s.rows_per_group, s.w_offset, s.eps, (int)s.rms);
    } else {
        const emu::LaunchConfig fcfg{dim3((unsigned)std::min(rows, kMaxGrid)), dim3(threads_for(d / vec, kFwdCache)),
                                     0};
        const auto fwd = vec > 1 ? K<T, P>::fwd_vec : K<T, P>::fwd_v1;
        emu::launch(fcfg, fwd, dx_in.ptr(), y.ptr(), w_ptr, b_ptr, mean.ptr(), rstd.ptr(), (int64_t)rows, (int)d,
                    (int64_t)s.rows_per_group, s.w_offset, s.eps, (int)s.rms);
    }

    std::vector<double> want_y(rows * d), want_mean(rows), want_rstd(rows), y_tol(rows * d);
    std::vector<double> xhat(rows * d), factor(rows * d);
    for (size_t r = 0; r < rows; ++r) {
        const size_t g = r / s.rows_per_group;
        double mu = 0, var = 0;
        if (!s.rms)
            for (size_t c = 0; c < d; ++c) mu += x[r * d + c] / (double)d;
        for (size_t c = 0; c < d; ++c) var += (x[r * d + c] - mu) * (x[r * d + c] - mu) / (double)d;
        const double rs = 1 / std::sqrt(var + (double)s.eps);
        want_mean[r] = mu;
        want_rstd[r] = rs;
        for (size_t c = 0; c < d; ++c) {
            const size_t i = r * d + c, p = g * d + c;
            xhat[i] = (x[i] - mu) * rs;
            factor[i] = s.w_offset + (s.has_w ? w[p] : 0.0);
            const double shift = s.has_b ? b[p] : 0.0;
            want_y[i] = xhat[i] * factor[i] + shift;
            // f32 arithmetic on terms of size |xhat·factor| + |shift|, then rounding to T.
            y_tol[i] = 1e-5 * (std::fabs(xhat[i] * factor[i]) + std::fabs(shift) + 1) + rtol_of<T>() * std::fabs(want_y[i]);
        }
    }
    report.within(what + ": y", y.download(), want_y, y_tol, "1e-5·(|xhat·w| + |b| + 1) + rounding");
    report.close(what + ": mean", mean.download(), want_mean, 1e-5, 1e-5);
    report.close(what + ": rstd", rstd.download(), want_rstd, 0, 1e-4);

    // ---- backward (`cuda::norm::backward`), from the kernel's own statistics
    const bool params = s.has_w || s.has_b;
    const size_t rpg = s.rows_per_group;
    DeviceArray<T> dx(rows * d);
    DeviceArray<P> dw(groups * d), db(groups * d);
    // Partials [groups, splits, d] summed by reduce.rs `col_finish`.
    const auto reduce = [&](const DeviceArray<float>& part, size_t splits, DeviceArray<P>& out) {
        const emu::LaunchConfig fcfg{dim3((unsigned)(groups * ceil_div(d, 32))), dim3(32, 8), 0};
        emu::launch(fcfg, col_finish_kernel<P>(), part.ptr(), out.ptr(), (int64_t)splits, (int64_t)d, 1.0f);
    };
    if (warp_forward && vec > 1 && d / vec <= 32 * kWarpCache) {
        // `backward_warp`: dx by warps (the forward's launch shape, same grid cap), then the
        // parameter-gradient partials over a (tiles, splits, groups) grid of 32×8 blocks.
        ++warp_bwd_runs;
        if (with_dx) {
            const emu::LaunchConfig wcfg{dim3((unsigned)std::clamp<size_t>(ceil_div(rows, 8), 1, warp_grid_cap)),
                                         dim3(256), 0};
            emu::launch(wcfg, K<T, P>::bwd_dx_warp, dx_in.ptr(), ddy.ptr(), w_ptr, mean.ptr(), rstd.ptr(), dx.ptr(),
                        (int64_t)rows, (int)d, (int64_t)rpg, s.w_offset, (int)s.rms);
        }
        if (params) {
            const auto [splits, chunk] = param_grad_splits(groups, rpg, d / vec);
            if (splits > 1) ++split_runs;
            if (splits > 1 && rpg % splits != 0) ++short_split_runs;
            const size_t n_part = groups * splits * d;
            DeviceArray<float> part_w(n_part), part_b(n_part);
            const emu::LaunchConfig pcfg{dim3((unsigned)ceil_div(d / vec, 32), (unsigned)splits, (unsigned)groups),
                                         dim3(32, 8), 0};
            emu::launch(pcfg, K<T, P>::param_grad, dx_in.ptr(), ddy.ptr(), mean.ptr(), rstd.ptr(),
                        s.has_w ? part_w.ptr() : nullptr, s.has_b ? part_b.ptr() : nullptr, (int64_t)rpg, (int)d,
                        (int64_t)splits, (int64_t)chunk);
            if (s.has_w) reduce(part_w, splits, dw);
            if (s.has_b) reduce(part_b, splits, db);
        }
    } else {
        const size_t nblk =
            params ? std::clamp<size_t>(ceil_div(kParamGradBlocks, groups), 1, rpg) : std::min(rpg, kMaxGrid);
        const size_t n_part = groups * nblk * d;
        DeviceArray<float> part_w(n_part), part_b(n_part);
        const emu::LaunchConfig bcfg{dim3((unsigned)nblk, (unsigned)groups), dim3(threads_for(d / vec, kBwdCache)), 0};
        const auto bwd = vec > 1 ? K<T, P>::bwd_vec : K<T, P>::bwd_v1;
        emu::launch(bcfg, bwd, dx_in.ptr(), ddy.ptr(), w_ptr, mean.ptr(), rstd.ptr(), with_dx ? dx.ptr() : nullptr,
                    s.has_w ? part_w.ptr() : nullptr, s.has_b ? part_b.ptr() : nullptr, (int64_t)rpg, (int)d,
                    s.w_offset, (int)s.rms);
        if (s.has_w) reduce(part_w, nblk, dw);
        if (s.has_b) reduce(part_b, nblk, db);
    }

    std::vector<double> want_dx(rows * d), dx_tol(rows * d), want_dw(groups * d, 0.0), want_db(groups * d, 0.0),
        dw_scale(groups * d, 0.0), db_scale(groups * d, 0.0);
    for (size_t r = 0; r < rows; ++r) {
        const size_t g = r / s.rows_per_group;
        double mean_gh = 0, mean_ghx = 0, max_gh = 0;
        for (size_t c = 0; c < d; ++c) {
            const size_t i = r * d + c;
            const double gh = dy[i] * factor[i];
            mean_gh += gh / (double)d;
            mean_ghx += gh * xhat[i] / (double)d;
            max_gh = std::max(max_gh, std::fabs(gh));
            want_dw[g * d + c] += dy[i] * xhat[i];
            want_db[g * d + c] += dy[i];
            dw_scale[g * d + c] += std::fabs(dy[i] * xhat[i]);
            db_scale[g * d + c] += std::fabs(dy[i]);
        }
        if (s.rms) mean_gh = 0;
        for (size_t c = 0; c < d; ++c) {
            const size_t i = r * d + c;
            want_dx[i] = want_rstd[r] * (dy[i] * factor[i] - mean_gh - xhat[i] * mean_ghx);
            dx_tol[i] = 1e-4 * want_rstd[r] * max_gh + rtol_of<T>() * std::fabs(want_dx[i]);
        }
    }
    if (with_dx) report.within(what + ": dx", dx.download(), want_dx, dx_tol, "1e-4·rstd·max|dy·w| + rounding");
    for (size_t i = 0; i < groups * d; ++i) {
        dw_scale[i] = 1e-5 * dw_scale[i] + rtol_of<P>() * std::fabs(want_dw[i]);
        db_scale[i] = 1e-5 * db_scale[i] + rtol_of<P>() * std::fabs(want_db[i]);
    }
    if (s.has_w) report.within(what + ": dw", dw.download(), want_dw, dw_scale, "1e-5·Σ|dy·xhat| + rounding");
    if (s.has_b) report.within(what + ": db", db.download(), want_db, db_scale, "1e-5·Σ|dy| + rounding");
}

// `cuda::norm::forward_rope` (RMSNorm with a weight, then RoPE per head; entry points for
// (f32, f32), (bf16, f32) and (bf16, bf16)), against the double reference of the two ops:
// rows are tokens row % tokens; pair j of each head rotates by the table's (n, j) angle.
template <class T, class P>
void norm_rope(size_t batch, size_t tokens, size_t heads, size_t head_dim, unsigned grid_cap) {
    const size_t rows = batch * tokens, d = heads * head_dim, half = head_dim / 2;
    const float eps = 1e-6f;
    const std::string what = format("rms_norm_rope x %s params %s batch=%zu tokens=%zu heads=%zu head_dim=%zu grid<=%u",
                                    Elem<T>::name, Elem<P>::name, batch, tokens, heads, head_dim, grid_cap);
    std::vector<double> x(rows * d);
    for (size_t r = 0; r < rows; ++r) {
        const double offset = 2 * rng.normal();
        for (size_t c = 0; c < d; ++c) x[r * d + c] = round_to<T>(offset + rng.normal());
    }
    const auto w = rng.values<P>(d, 0.5);
    std::vector<double> cos_t(tokens * half), sin_t(tokens * half);
    for (size_t i = 0; i < tokens * half; ++i) {
        const double theta = rng.uniform(-4, 4);
        cos_t[i] = (float)std::cos(theta);
        sin_t[i] = (float)std::sin(theta);
    }
    DeviceArray<T> dx(x), y(rows * d);
    DeviceArray<P> dw(w);
    DeviceArray<float> dcos(cos_t), dsin(sin_t), mean(rows), rstd(rows);
    const emu::LaunchConfig cfg{dim3((unsigned)std::clamp<size_t>(ceil_div(rows, 8), 1, grid_cap)), dim3(256), 0};
    const auto kernel = [] {
        if constexpr (std::is_same_v<T, float>)
            return EMU_KERNEL(norm_rope_fwd_warp_f32_f32_vec);
        else if constexpr (std::is_same_v<P, float>)
            return EMU_KERNEL(norm_rope_fwd_warp_bf16_f32_vec);
        else
            return EMU_KERNEL(norm_rope_fwd_warp_bf16_bf16_vec);
    }();
    emu::launch(cfg, kernel, dx.ptr(), y.ptr(), dw.ptr(), mean.ptr(), rstd.ptr(), (int64_t)rows, (int)d, eps,
                dcos.ptr(), dsin.ptr(), (int64_t)tokens, (int)head_dim);

    std::vector<double> want(rows * d), tol(rows * d), want_rstd(rows);
    for (size_t r = 0; r < rows; ++r) {
        double ms = 0;
        for (size_t c = 0; c < d; ++c) ms += x[r * d + c] * x[r * d + c] / (double)d;
        const double rs = 1 / std::sqrt(ms + (double)eps);
        want_rstd[r] = rs;
        const size_t n = r % tokens;
        for (size_t c = 0; c < d; c += 2) {
            const double a = x[r * d + c] * rs * w[c], b = x[r * d + c + 1] * rs * w[c + 1];
            const size_t j = (c % head_dim) / 2;
            const double co = cos_t[n * half + j], si = sin_t[n * half + j];
            want[r * d + c] = a * co - b * si;
            want[r * d + c + 1] = a * si + b * co;
            for (size_t e = 0; e < 2; ++e)
                tol[r * d + c + e] = 2e-5 * (std::fabs(a) + std::fabs(b) + 1) + rtol_of<T>() * std::fabs(want[r * d + c + e]);
        }
    }
    report.within(what + ": y", y.download(), want, tol, "2e-5·(|a| + |b| + 1) + rounding");
    report.close(what + ": rstd", rstd.download(), want_rstd, 0, 1e-4);
    report.close(what + ": mean", mean.download(), std::vector<double>(rows, 0.0), 0, 0);
}

template <class T, class P>
void ops(size_t d, size_t rows) {
    // ops::norm: layer_norm with and without affine parameters, layer_norm_modulate on
    // [B, N, D] with [B, D] scale and shift, rms_norm with a weight.
    run<T, P>({"layer_norm", rows, d, rows, 0.f, 1e-5f, false, true, true}, true);
    // Without parameters the launcher takes the activations' dtype for P.
    if constexpr (std::is_same_v<T, P>)
        run<T, P>({"layer_norm (no affine)", rows, d, rows, 1.f, 1e-6f, false, false, false}, true);
    run<T, P>({"layer_norm_modulate", 3 * rows, d, rows, 1.f, 1e-6f, false, true, true}, true);
    run<T, P>({"rms_norm", rows, d, rows, 0.f, 1e-6f, true, true, false}, true);
    // Parameter gradients only (an input that needs no gradient).
    run<T, P>({"rms_norm (no dx)", rows, d, rows, 0.f, 1e-6f, true, true, false}, false);
}

template <class T, class P>
void family() {
    ops<T, P>(37, 5);  // scalar entry points
    ops<T, P>(64, 7);  // vector entry points
    if (!kTsan) {
        ops<T, P>(12, 3);  // vector for f32, scalar for bf16
        ops<T, P>(1, 3);   // a single column: xhat = 0
        run<T, P>({"layer_norm", 3, 1501, 3, 0.f, 1e-5f, false, true, true}, true);  // past the register caches
        run<T, P>({"rms_norm", 2, 5000, 2, 0.f, 1e-6f, true, true, false}, true);
        run<T, P>({"layer_norm_modulate", 600, 40, 300, 1.f, 1e-6f, false, true, true}, true);  // many partial blocks
    }
}

}  // namespace

int main() {
    emu::watchdog(300);
    family<float, float>();
    family<float, bf16>();
    family<bf16, float>();
    family<bf16, bf16>();
    // The warp norms (forward and backward) on the same cases and every dtype pair, then
    // with a grid of 2 blocks (16 warps) over 40 to 666 rows, so that warps stride over
    // several rows each, and with row splits of the parameter gradients that leave a short
    // last split (333 rows in 11 splits of 31; 97 in 4 of 25) over one to three column tiles.
    warp_forward = true;
    family<float, float>();
    family<bf16, bf16>();
    family<bf16, float>();
    family<float, bf16>();
    warp_grid_cap = 2;
    run<bf16, float>({"layer_norm_modulate", 40, 64, 20, 1.f, 1e-6f, false, true, true}, true);
    run<float, float>({"rms_norm", 600, 37, 600, 0.f, 1e-6f, true, true, false}, true);
    run<float, float>({"rms_norm", 600, 40, 600, 0.f, 1e-6f, true, true, false}, true);
    run<bf16, bf16>({"layer_norm_modulate", 666, 64, 333, 1.f, 1e-6f, false, true, true}, true);
    run<float, bf16>({"layer_norm_modulate", 666, 64, 333, 1.f, 1e-6f, false, true, true}, true);
    run<float, float>({"rms_norm", 97, 264, 97, 0.f, 1e-6f, true, true, false}, true);
    run<bf16, float>({"layer_norm", 97, 264, 97, 0.f, 1e-5f, false, true, true}, true);
    run<bf16, bf16>({"layer_norm (no affine)", 150, 264, 150, 1.f, 1e-6f, false, false, false}, true);
    run<float, float>({"layer_norm_modulate (no dx)", 666, 264, 222, 1.f, 1e-6f, false, true, true}, false);
    report.expect(warp_runs >= 30, format("the warp forward ran %zu times", warp_runs));
    report.expect(warp_bwd_runs >= (kTsan ? 26u : 39u), format("the warp backward ran %zu times", warp_bwd_runs));
    report.expect(short_split_runs >= 4,
                  format("%zu warp backwards split the rows (%zu with a short last split)", split_runs,
                         short_split_runs));
    // RMSNorm + RoPE: Wan's heads of 128 and odd token counts, several heads per lane's
    // vectors (head_dim 8 and 16), and a grid of 2 blocks so that warps stride over rows.
    norm_rope<float, float>(2, 5, 3, 16, 1u << 20);
    norm_rope<bf16, float>(1, 7, 2, 128, 1u << 20);
    norm_rope<bf16, bf16>(3, 3, 4, 8, 1u << 20);
    norm_rope<bf16, bf16>(2, 21, 2, 64, 2);
    norm_rope<float, float>(1, 40, 1, 4, 2);
    return report.finish();
}
