// kernels/elementwise.cu under emulation, launched as src/cuda/elementwise.rs does:
// binary ops (same shape and broadcast), scale, add_scalar, casts, broadcast copies,
// activations forward and backward, the gated residual. Odd sizes around the 8-element
// chunks and the 2048-element blocks, 16-byte aligned and misaligned views (the vector
// path must only be taken when every pointer is aligned: UBSan checks the 16-byte
// accesses), poisoned outputs.
#include "harness.h"

#include "elementwise.cu"

using namespace harness;

namespace {

Report report("elementwise");
Rng rng(0xE1E3);

const size_t kSizes[] = {0, 1, 7, 8, 9, 15, 16, 17, 100, 2047, 2048, 2049, 4103};

// Where each argument starts: fresh (16-byte aligned) allocations, or one view shifted by
// an element.
struct Views {
    size_t in0, in1, out;
    const char* name;
};
const Views kViews[] = {{0, 0, 0, "aligned"},
                        {1, 0, 0, "1st input misaligned"},
                        {0, 1, 0, "2nd input misaligned"},
                        {0, 0, 1, "output misaligned"}};

template <class T>
struct Tol;
template <>
struct Tol<float> {
    static constexpr double atol = 1e-6, rtol = 1e-5;
};
template <>
struct Tol<bf16> {
    static constexpr double atol = 1e-5, rtol = 1.0 / 128;  // one bf16 ulp
};

template <class T>
void check(const std::string& what, const std::vector<double>& got, const std::vector<double>& want) {
    report.close(what, got, want, Tol<T>::atol, Tol<T>::rtol);
}

// Entry points by element type.
template <class T>
struct K;
template <>
struct K<float> {
    static constexpr auto add = EMU_KERNEL(add_f32), sub = EMU_KERNEL(sub_f32), mul = EMU_KERNEL(mul_f32);
    static constexpr auto scale = EMU_KERNEL(scale_f32), add_scalar = EMU_KERNEL(add_scalar_f32);
    static constexpr auto bcast_copy = EMU_KERNEL(bcast_copy_f32);
    static constexpr auto gelu_tanh = EMU_KERNEL(gelu_tanh_f32), gelu_exact = EMU_KERNEL(gelu_exact_f32),
                          silu = EMU_KERNEL(silu_f32);
    static constexpr auto gelu_tanh_bwd = EMU_KERNEL(gelu_tanh_bwd_f32),
                          gelu_exact_bwd = EMU_KERNEL(gelu_exact_bwd_f32), silu_bwd = EMU_KERNEL(silu_bwd_f32);
    static constexpr auto quick_gelu = EMU_KERNEL(quick_gelu_f32), quick_gelu_bwd = EMU_KERNEL(quick_gelu_bwd_f32);
    static constexpr auto exp = EMU_KERNEL(exp_f32), exp_bwd = EMU_KERNEL(exp_bwd_f32);
    static constexpr auto gated_residual = EMU_KERNEL(gated_residual_f32);
    static constexpr auto clamp = EMU_KERNEL(clamp_f32), clamp_bwd = EMU_KERNEL(clamp_bwd_f32);
};
template <>
struct K<bf16> {
    static constexpr auto add = EMU_KERNEL(add_bf16), sub = EMU_KERNEL(sub_bf16), mul = EMU_KERNEL(mul_bf16);
    static constexpr auto scale = EMU_KERNEL(scale_bf16), add_scalar = EMU_KERNEL(add_scalar_bf16);
    static constexpr auto bcast_copy = EMU_KERNEL(bcast_copy_bf16);
    static constexpr auto gelu_tanh = EMU_KERNEL(gelu_tanh_bf16), gelu_exact = EMU_KERNEL(gelu_exact_bf16),
                          silu = EMU_KERNEL(silu_bf16);
    static constexpr auto gelu_tanh_bwd = EMU_KERNEL(gelu_tanh_bwd_bf16),
                          gelu_exact_bwd = EMU_KERNEL(gelu_exact_bwd_bf16), silu_bwd = EMU_KERNEL(silu_bwd_bf16);
    static constexpr auto quick_gelu = EMU_KERNEL(quick_gelu_bf16), quick_gelu_bwd = EMU_KERNEL(quick_gelu_bwd_bf16);
    static constexpr auto exp = EMU_KERNEL(exp_bf16), exp_bwd = EMU_KERNEL(exp_bwd_bf16);
    static constexpr auto gated_residual = EMU_KERNEL(gated_residual_bf16);
    static constexpr auto clamp = EMU_KERNEL(clamp_bf16), clamp_bwd = EMU_KERNEL(clamp_bwd_bf16);
};

using Shape = std::vector<size_t>;

size_t numel(const Shape& s) {
    size_t n = 1;
    for (size_t d : s) n *= d;
    return n;
}

std::string str(const Shape& s) {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); ++i) r += (i ? "," : "") + std::to_string(s[i]);
    return r + "]";
}

// `Bcast::new` of src/cuda/mod.rs: a and b right-aligned against `out`, stride 0 along
// their size-1 dimensions; output dimensions of size 1 dropped and neighbours both inputs
// walk as one merged.
Bcast bcast_new(const Shape& out, const Shape& a, const Shape& b) {
    std::vector<int64_t> sa(out.size(), 0), sb(out.size(), 0);
    auto strides = [&](const Shape& s, std::vector<int64_t>& st) {
        int64_t acc = 1;
        for (size_t k = s.size(); k-- > 0;) {
            const size_t d = out.size() - s.size() + k;
            st[d] = s[k] == 1 ? 0 : acc;
            acc *= (int64_t)s[k];
        }
    };
    strides(a, sa);
    strides(b, sb);
    Bcast bc{};
    for (size_t d = 0; d < out.size(); ++d) {
        if (out[d] == 1) continue;
        const int64_t size = (int64_t)out[d];
        const int r = bc.rank - 1;
        if (r >= 0 && bc.sa[r] == sa[d] * size && bc.sb[r] == sb[d] * size) {
            bc.shape[r] *= size;
            bc.sa[r] = sa[d];
            bc.sb[r] = sb[d];
        } else {
            bc.shape[bc.rank] = size;
            bc.sa[bc.rank] = sa[d];
            bc.sb[bc.rank] = sb[d];
            ++bc.rank;
        }
    }
    return bc;
}

// Index into `in` (right-aligned against `out`) of output element i, by coordinates.
size_t broadcast_index(const Shape& out, const Shape& in, size_t i) {
    std::vector<size_t> coord(out.size());
    for (size_t d = out.size(); d-- > 0;) {
        coord[d] = i % out[d];
        i /= out[d];
    }
    size_t idx = 0;
    for (size_t k = 0; k < in.size(); ++k) {
        const size_t d = out.size() - in.size() + k;
        idx = idx * in[k] + (in[k] == 1 ? 0 : coord[d]);
    }
    return idx;
}

template <class T, class Kern>
void binary_same(const char* name, Kern k, double (*f)(double, double)) {
    for (size_t n : kSizes)
        for (const Views& v : kViews) {
            const auto a = rng.values<T>(n), b = rng.values<T>(n);
            DeviceArray<T> da(a, v.in0), db(b, v.in1), out(n, v.out);
            const Bcast bc = bcast_new({n}, {n}, {n});
            emu::launch(grid_chunks(n), k, da.ptr(), db.ptr(), out.ptr(), bc, (int64_t)n, 1);
            std::vector<double> want(n);
            for (size_t i = 0; i < n; ++i) want[i] = f(a[i], b[i]);
            check<T>(format("%s_%s n=%zu %s", name, Elem<T>::name, n, v.name), out.download(), want);
        }
}

template <class T, class Kern>
void binary_broadcast(const char* name, Kern k, double (*f)(double, double)) {
    const Shape cases[][3] = {
        {{3, 4, 5}, {3, 1, 5}, {3, 4, 5}},
        {{2, 3, 4}, {4}, {2, 3, 1}},
        {{7, 1, 9}, {7, 1, 9}, {1}},
        {{2, 1, 3, 2, 1, 5}, {2, 1, 3, 1, 1, 5}, {1, 1, 3, 2, 1, 1}},
        {{33, 17}, {33, 1}, {17}},
        // Rows of a multiple of 8: offsets once per chunk, 16-byte loads of contiguous rows.
        {{4, 16}, {4, 16}, {16}},                // a bias row
        {{3, 5, 24}, {3, 5, 24}, {3, 5, 1}},     // one value per row (merged to [15, 24])
        {{2, 8, 8}, {1, 8, 8}, {2, 8, 8}},       // [B, N, D] + [1, N, D] (merged to [2, 64])
        {{3, 1, 40}, {1, 1, 40}, {3, 1, 1}},     // both broadcast, a size-1 middle dimension
        {{1, 1, 1}, {1}, {1, 1, 1}},             // a single element (rank 0 once simplified)
    };
    for (const auto& c : cases)
        for (const Views& v : kViews) {
            const Shape &out_s = c[0], &a_s = c[1], &b_s = c[2];
            const size_t n = numel(out_s);
            const auto a = rng.values<T>(numel(a_s)), b = rng.values<T>(numel(b_s));
            DeviceArray<T> da(a, v.in0), db(b, v.in1), out(n, v.out);
            emu::launch(grid_chunks(n), k, da.ptr(), db.ptr(), out.ptr(), bcast_new(out_s, a_s, b_s), (int64_t)n, 0);
            std::vector<double> want(n);
            for (size_t i = 0; i < n; ++i)
                want[i] = f(a[broadcast_index(out_s, a_s, i)], b[broadcast_index(out_s, b_s, i)]);
            check<T>(format("%s_%s %s = %s op %s, %s", name, Elem<T>::name, str(out_s).c_str(), str(a_s).c_str(),
                            str(b_s).c_str(), v.name),
                     out.download(), want);
        }
}

template <class T>
void broadcast_copy() {
    const Shape cases[][2] = {{{3, 4, 5}, {3, 1, 5}},  {{17}, {1}},        {{2, 3, 5}, {5}},
                              {{2, 1, 3, 2, 1, 5}, {3, 1, 1, 1}}, {{5, 16}, {16}}, {{4, 3, 8}, {4, 3, 1}},
                              {{2, 24, 8}, {1, 24, 8}}};
    for (const auto& c : cases)
        for (const Views& v : kViews) {
            if (v.in1 != 0) continue;  // one input only
            const Shape &out_s = c[0], &x_s = c[1];
            const size_t n = numel(out_s);
            const auto x = rng.values<T>(numel(x_s));
            DeviceArray<T> dx(x, v.in0), out(n, v.out);
            emu::launch(grid_chunks(n), K<T>::bcast_copy, dx.ptr(), out.ptr(), bcast_new(out_s, x_s, out_s),
                        (int64_t)n);
            std::vector<double> want(n);
            for (size_t i = 0; i < n; ++i) want[i] = x[broadcast_index(out_s, x_s, i)];
            check<T>(format("bcast_copy_%s %s -> %s, %s", Elem<T>::name, str(x_s).c_str(), str(out_s).c_str(), v.name),
                     out.download(), want);
        }
}

// Kernels of signature (x, out, [extra,] n) over every size and view.
// `exact`: the result must equal the reference bit for bit (casts).
template <class TI, class TO, class Launch>
void unary(const std::string& name, Launch launch, const std::function<double(double)>& f, double scale = 1.0,
           bool exact = false) {
    for (size_t n : kSizes)
        for (const Views& v : kViews) {
            if (v.in1 != 0) continue;  // one input only
            auto x = rng.values<TI>(n, scale);
            // Saturation and overflow of exp: x = ±30, ±100.
            const double extremes[] = {-100, -30, 30, 100};
            for (size_t i = 0; i < 4 && i < n; ++i) x[i] = extremes[i];
            DeviceArray<TI> dx(x, v.in0);
            DeviceArray<TO> out(n, v.out);
            launch(dx.ptr(), out.ptr(), n);
            std::vector<double> want(n);
            for (size_t i = 0; i < n; ++i) want[i] = f(x[i]);
            const std::string what = format("%s n=%zu %s", name.c_str(), n, v.name);
            if (exact)
                report.close(what, out.download(), want, 0, 0);
            else
                check<TO>(what, out.download(), want);
        }
}

// Kernels of signature (x, g, dx, n): dx = g·f'(x), f' by central differences in double.
template <class T, class Kern>
void activation_backward(const char* name, Kern k, double (*f)(double), double max_x = 100) {
    for (size_t n : kSizes)
        for (const Views& v : kViews) {
            auto x = rng.values<T>(n, 3.0);
            const double extremes[] = {-100, -30, 30, max_x};
            for (size_t i = 0; i < 4 && i < n; ++i) x[i] = extremes[i];
            const auto g = rng.values<T>(n);
            DeviceArray<T> dx(x, v.in0), dg(g, v.in1), out(n, v.out);
            emu::launch(grid_chunks(n), k, dx.ptr(), dg.ptr(), out.ptr(), (int64_t)n);
            std::vector<double> want(n);
            for (size_t i = 0; i < n; ++i) {
                const double h = 1e-5 * std::max(1.0, std::fabs(x[i]));
                want[i] = g[i] * (f(x[i] + h) - f(x[i] - h)) / (2 * h);
            }
            // Where tanh saturates, the f32 formula of the derivative loses ~1e-6 absolutely
            // (1 − t² of a rounded t): harmless, and the same on the GPU.
            report.close(format("%s_bwd_%s n=%zu %s", name, Elem<T>::name, n, v.name), out.download(), want,
                         std::max(Tol<T>::atol, 1e-5), Tol<T>::rtol);
        }
}

double gelu_tanh_ref(double x) { return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x))); }
double gelu_exact_ref(double x) { return 0.5 * x * std::erfc(-x / std::sqrt(2.0)); }
double silu_ref(double x) { return x / (1 + std::exp(-x)); }
double quick_gelu_ref(double x) { return x / (1 + std::exp(-1.702 * x)); }
// exp overflows to +inf above ln(FLT_MAX) ≈ 88.7, in f32 and bf16 alike.
double exp_ref(double x) { return x > 88.72 ? INFINITY : std::exp(x); }

// x + gate·y with the gate broadcast over x = [B, N, D] as [B,1,D], [1,1,D], [B,N,D] or
// [B,1,1]; (period, inner) as ops::elementwise::gate_layout derives them.
template <class T>
void gated_residual() {
    // D a multiple of 8 takes the one-index-per-chunk gate path (when the gate is
    // 16-byte aligned: the gate takes each view's offset too), other D the per-element one.
    const Shape xs[] = {{1, 1, 9}, {2, 3, 7}, {3, 5, 64}, {2, 9, 130}, {2, 5, 24}, {1, 3, 1536}};
    for (const Shape& x_s : xs) {
        const size_t B = x_s[0], N = x_s[1], D = x_s[2], n = B * N * D;
        struct Gate {
            Shape shape;
            size_t period, inner;
        };
        const Gate gates[] = {{{B, 1, D}, N * D, D}, {{1, 1, D}, n, D}, {{B, N, D}, n, n}, {{B, 1, 1}, N * D, 1}};
        for (const Gate& gt : gates)
            for (const Views& v : kViews) {
                const auto x = rng.values<T>(n), y = rng.values<T>(n), g = rng.values<T>(numel(gt.shape));
                DeviceArray<T> dx(x, v.in0), dy(y, v.in1), dg(g, v.in1), out(n, v.out);
                emu::launch(grid_chunks(n), K<T>::gated_residual, dx.ptr(), dg.ptr(), dy.ptr(), out.ptr(),
                                   (int64_t)gt.period, (int64_t)gt.inner, (int64_t)n);
                std::vector<double> want(n);
                for (size_t i = 0; i < n; ++i) want[i] = x[i] + g[broadcast_index(x_s, gt.shape, i)] * y[i];
                check<T>(format("gated_residual_%s x %s gate %s %s", Elem<T>::name, str(x_s).c_str(),
                                str(gt.shape).c_str(), v.name),
                         out.download(), want);
            }
    }
}

// clamp and its backward (`cuda::elementwise::clamp`: one element per thread, grid-stride),
// with values exactly on the bounds (the gradient passes there), on the launcher's grid
// and on a 3-block grid (each thread then walks several elements).
template <class T>
void clamp(size_t n, float lo, float hi) {
    for (unsigned blocks : {(unsigned)std::max<size_t>(ceil_div(n, 256), 1), 3u}) {
        const std::string what = format("clamp %s n=%zu [%g, %g] %u blocks", Elem<T>::name, n, (double)lo, (double)hi, blocks);
        auto xv = rng.values<T>(n, 1.5);
        for (size_t i = 0; i < n; i += 5) xv[i] = (i / 5) % 2 ? lo : hi;
        const auto gv = rng.values<T>(n);
        DeviceArray<T> x(xv), g(gv), y(n), dx(n);
        const emu::LaunchConfig cfg{dim3(blocks), dim3(256), 0};
        emu::launch(cfg, K<T>::clamp, (const T*)x.ptr(), y.ptr(), lo, hi, (int64_t)n);
        emu::launch(cfg, K<T>::clamp_bwd, (const T*)x.ptr(), (const T*)g.ptr(), dx.ptr(), lo, hi, (int64_t)n);
        std::vector<double> want(n), want_dx(n);
        for (size_t i = 0; i < n; ++i) {
            want[i] = std::min(std::max(xv[i], (double)lo), (double)hi);
            want_dx[i] = xv[i] >= lo && xv[i] <= hi ? gv[i] : 0.0;
        }
        report.close(what + ": y", y.download(), want, 0, 0);
        report.close(what + ": dx", dx.download(), want_dx, 0, 0);
    }
}

template <class T>
void family() {
    binary_same<T>("add", K<T>::add, [](double a, double b) { return a + b; });
    binary_same<T>("sub", K<T>::sub, [](double a, double b) { return a - b; });
    binary_same<T>("mul", K<T>::mul, [](double a, double b) { return a * b; });
    binary_broadcast<T>("add", K<T>::add, [](double a, double b) { return a + b; });
    binary_broadcast<T>("sub", K<T>::sub, [](double a, double b) { return a - b; });
    binary_broadcast<T>("mul", K<T>::mul, [](double a, double b) { return a * b; });
    broadcast_copy<T>();

    const std::string t = Elem<T>::name;
    unary<T, T>(
        "scale_" + t,
        [](T* x, T* o, size_t n) { emu::launch(grid_chunks(n), K<T>::scale, x, o, -1.5f, (int64_t)n); },
        [](double x) { return -1.5 * x; });
    unary<T, T>(
        "add_scalar_" + t,
        [](T* x, T* o, size_t n) {
            emu::launch(grid_chunks(n), K<T>::add_scalar, x, o, 0.375f, (int64_t)n);
        },
        [](double x) { return x + 0.375; });
    const struct {
        const char* name;
        decltype(K<T>::silu) fwd;
        decltype(K<T>::silu_bwd) bwd;
        double (*f)(double);
    } acts[] = {{"gelu_tanh", K<T>::gelu_tanh, K<T>::gelu_tanh_bwd, gelu_tanh_ref},
                {"gelu_exact", K<T>::gelu_exact, K<T>::gelu_exact_bwd, gelu_exact_ref},
                {"silu", K<T>::silu, K<T>::silu_bwd, silu_ref},
                {"quick_gelu", K<T>::quick_gelu, K<T>::quick_gelu_bwd, quick_gelu_ref},
                {"exp", K<T>::exp, K<T>::exp_bwd, exp_ref}};
    for (const auto& act : acts) {
        const auto fwd = act.fwd;
        unary<T, T>(
            act.name + ("_" + t),
            [fwd](T* x, T* o, size_t n) { emu::launch(grid_chunks(n), fwd, x, o, (int64_t)n); }, act.f,
            3.0);
        // exp's derivative at 100 is inf − inf by differences: test its largest point at 80.
        activation_backward<T>(act.name, act.bwd, act.f, act.f == exp_ref ? 80.0 : 100.0);
    }
    gated_residual<T>();
    clamp<T>(1, -0.75f, 1.25f);
    clamp<T>(1001, -0.75f, 1.25f);
    clamp<T>(37, 0.5f, 0.5f);
}

}  // namespace

int main() {
    emu::watchdog(300);
    family<float>();
    family<bf16>();
    // Casts round to nearest even (f32 -> bf16) or are exact (bf16 -> f32).
    unary<float, bf16>(
        "cast_f32_bf16",
        [](float* x, bf16* o, size_t n) {
            emu::launch(grid_chunks(n), EMU_KERNEL(cast_f32_bf16), x, o, (int64_t)n);
        },
        [](double x) { return round_to<bf16>(x); }, 1.0, true);
    unary<bf16, float>(
        "cast_bf16_f32",
        [](bf16* x, float* o, size_t n) {
            emu::launch(grid_chunks(n), EMU_KERNEL(cast_bf16_f32), x, o, (int64_t)n);
        },
        [](double x) { return x; }, 1.0, true);
    return report.finish();
}
