// kernels/reduce.cu under emulation, launched as src/cuda/reduce.rs does: sum_to onto
// broadcast shapes, the two-pass row sums (row_partial + row_finish, split by
// `blocks_per_row`) and the column sums over a middle dimension (32x8 blocks), split or
// not, with scalar or 16-byte vector reads, of one tensor or of the product of two (the
// gate gradient).
#include "harness.h"

#include "reduce.cu"

using namespace harness;

namespace {

Report report("reduce");
Rng rng(0x5EDCE);

using Shape = std::vector<size_t>;

// Mirrors of src/cuda/reduce.rs.
constexpr unsigned kRowThreads = 256;      // ROW_THREADS
constexpr size_t kMinPerBlock = 2048;      // MIN_PER_BLOCK
constexpr size_t kMaxPartialBlocks = 4096;  // MAX_PARTIAL_BLOCKS
constexpr size_t kColTargetBlocks = 1024;   // COL_TARGET_BLOCKS
constexpr size_t kColMinRows = 64;          // COL_MIN_ROWS

size_t blocks_per_row(size_t rows, size_t len, size_t per_block = kMinPerBlock) {
    return std::clamp<size_t>(ceil_div(len, per_block), 1, std::max<size_t>(kMaxPartialBlocks / std::max<size_t>(rows, 1), 1));
}

// `col_splits_for`: (splits, chunk) of the split column sums with `cols` columns per block.
std::pair<size_t, size_t> col_splits(size_t outer, size_t len, size_t inner, size_t cols = 32) {
    const size_t base = std::max<size_t>(outer * ceil_div(inner, cols), 1);
    const size_t splits = std::clamp<size_t>(ceil_div(kColTargetBlocks, base), 1, std::max<size_t>(ceil_div(len, kColMinRows), 1));
    const size_t chunk = std::max<size_t>(ceil_div(len, splits), 1);
    return {std::max<size_t>(ceil_div(len, chunk), 1), chunk};
}

template <class T>
struct K;
template <>
struct K<float> {
    static constexpr auto sum_to = EMU_KERNEL(sum_to_f32), row_partial = EMU_KERNEL(row_partial_f32),
                          row_finish = EMU_KERNEL(row_finish_f32), col_sum = EMU_KERNEL(col_sum_f32),
                          col_partial = EMU_KERNEL(col_partial_f32), col_finish = EMU_KERNEL(col_finish_f32),
                          col_partial_vec = EMU_KERNEL(col_partial_vec_f32),
                          col_partial_mul = EMU_KERNEL(col_partial_mul_f32),
                          col_partial_vec_mul = EMU_KERNEL(col_partial_vec_mul_f32),
                          row_partial_vec = EMU_KERNEL(row_partial_vec_f32);
};
template <>
struct K<bf16> {
    static constexpr auto sum_to = EMU_KERNEL(sum_to_bf16), row_partial = EMU_KERNEL(row_partial_bf16),
                          row_finish = EMU_KERNEL(row_finish_bf16), col_sum = EMU_KERNEL(col_sum_bf16),
                          col_partial = EMU_KERNEL(col_partial_bf16), col_finish = EMU_KERNEL(col_finish_bf16),
                          col_partial_vec = EMU_KERNEL(col_partial_vec_bf16),
                          col_partial_mul = EMU_KERNEL(col_partial_mul_bf16),
                          col_partial_vec_mul = EMU_KERNEL(col_partial_vec_mul_bf16),
                          row_partial_vec = EMU_KERNEL(row_partial_vec_bf16);
};

// Sums of terms whose magnitudes add up to sum_abs: f32 accumulation stays well within
// 1e-6·sum_abs at these sizes; then the result is rounded to T.
template <class T>
void check_sums(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                const std::vector<double>& sum_abs) {
    const double rtol = std::is_same_v<T, bf16> ? 1.0 / 128 : 1e-6;
    std::vector<double> tol(want.size());
    for (size_t i = 0; i < want.size(); ++i) tol[i] = 1e-6 * sum_abs[i] + rtol * std::fabs(want[i]);
    report.within(what, got, want, tol, "1e-6·Σ|x| + rounding");
}

// `cuda::reduce::sum_to`: `x` (shape `in`) summed onto `out` (same rank, each dim 1 or kept).
template <class T>
void sum_to(const Shape& in, const Shape& out) {
    ReduceDesc d{};
    d.rank = (int32_t)in.size();
    int64_t stride = 1;
    for (size_t k = in.size(); k-- > 0;) {
        const bool reduced = out[k] == 1 && in[k] != 1;
        d.keep_shape[k] = reduced ? 1 : (int64_t)in[k];
        d.keep_stride[k] = reduced ? 0 : stride;
        d.red_shape[k] = reduced ? (int64_t)in[k] : 1;
        d.red_stride[k] = reduced ? stride : 0;
        stride *= (int64_t)in[k];
    }
    size_t n_in = 1, n_out = 1;
    for (size_t k = 0; k < in.size(); ++k) n_in *= in[k], n_out *= out[k];
    const int64_t n_red = (int64_t)(n_in / std::max<size_t>(n_out, 1));
    const auto x = rng.values<T>(n_in);
    DeviceArray<T> dx(x), dout(n_out);
    emu::launch(grid_1d(n_out, 256), K<T>::sum_to, dx.ptr(), dout.ptr(), d, (int64_t)n_out, n_red);

    std::vector<double> want(n_out, 0.0), sum_abs(n_out, 0.0);
    for (size_t i = 0; i < n_in; ++i) {
        size_t rem = i, o = 0, mult = 1;
        for (size_t k = in.size(); k-- > 0;) {
            const size_t c = rem % in[k];
            rem /= in[k];
            o += (out[k] == 1 ? 0 : c) * mult;
            mult *= out[k];
        }
        want[o] += x[i];
        sum_abs[o] += std::fabs(x[i]);
    }
    std::string what = format("sum_to_%s [", Elem<T>::name);
    for (size_t k = 0; k < in.size(); ++k) what += format("%s%zu", k ? "," : "", in[k]);
    what += "] -> [";
    for (size_t k = 0; k < out.size(); ++k) what += format("%s%zu", k ? "," : "", out[k]);
    check_sums<T>(what + "]", dout.download(), want, sum_abs);
}

// `cuda::reduce::row_sum`: x as [rows, len], out[r] = scale·Σ x[r, :].
template <class T>
void row_sum(size_t rows, size_t len, float scale) {
    const size_t bpr = blocks_per_row(rows, len);
    const auto x = rng.values<T>(rows * len);
    DeviceArray<T> dx(x), out(rows);
    DeviceArray<float> partials(rows * bpr);
    emu::launch(grid_rows(rows * bpr, kRowThreads), K<T>::row_partial, dx.ptr(), partials.ptr(), (int64_t)len,
                (int64_t)bpr);
    emu::launch(grid_rows(rows, kRowThreads), K<T>::row_finish, partials.ptr(), out.ptr(), (int64_t)bpr, scale);

    std::vector<double> want(rows, 0.0), sum_abs(rows, 0.0);
    for (size_t r = 0; r < rows; ++r) {
        for (size_t i = 0; i < len; ++i) {
            want[r] += x[r * len + i];
            sum_abs[r] += std::fabs(x[r * len + i]);
        }
        want[r] *= scale;
        sum_abs[r] *= std::fabs(scale);
    }
    check_sums<T>(format("row_sum_%s rows=%zu len=%zu (%zu blocks per row) scale=%g", Elem<T>::name, rows, len, bpr,
                         scale),
                  out.download(), want, sum_abs);

    // With 16-byte reads (`SYNTHOS_CUDA_COLSUM=vec`: one row, or rows of whole words).
    // `blocks_per_row_vec`: four times the elements per block.
    if (rows == 1 || len % (16 / sizeof(T)) == 0) {
        const size_t vbpr = blocks_per_row(rows, len, 4 * kMinPerBlock);
        DeviceArray<T> vout(rows);
        DeviceArray<float> vpartials(rows * vbpr);
        emu::launch(grid_rows(rows * vbpr, kRowThreads), K<T>::row_partial_vec, dx.ptr(), vpartials.ptr(),
                    (int64_t)len, (int64_t)vbpr);
        emu::launch(grid_rows(rows, kRowThreads), K<T>::row_finish, vpartials.ptr(), vout.ptr(), (int64_t)vbpr,
                    scale);
        check_sums<T>(format("row_sum vec %s rows=%zu len=%zu (%zu blocks per row) scale=%g", Elem<T>::name, rows,
                             len, vbpr, scale),
                      vout.download(), want, sum_abs);
    }
}

// Reference column sums of x as [outer, len, inner]: (scale·Σ_r x[o, r, i], Σ_r |scale·x|).
std::pair<std::vector<double>, std::vector<double>> col_ref(const std::vector<double>& x, size_t outer, size_t len,
                                                            size_t inner, float scale) {
    std::vector<double> want(outer * inner, 0.0), sum_abs(outer * inner, 0.0);
    for (size_t o = 0; o < outer; ++o)
        for (size_t r = 0; r < len; ++r)
            for (size_t i = 0; i < inner; ++i) {
                want[o * inner + i] += scale * x[(o * len + r) * inner + i];
                sum_abs[o * inner + i] += std::fabs(scale * x[(o * len + r) * inner + i]);
            }
    return {want, sum_abs};
}

// `cuda::reduce::col_sum`: x as [outer, len, inner], out[o, i] = scale·Σ_r x[o, r, i].
template <class T>
void col_sum(size_t outer, size_t len, size_t inner, float scale) {
    const size_t blocks = outer * ceil_div(inner, 32);
    const auto x = rng.values<T>(outer * len * inner);
    DeviceArray<T> dx(x), out(outer * inner);
    const emu::LaunchConfig cfg{dim3((unsigned)blocks), dim3(32, 8), 0};
    emu::launch(cfg, K<T>::col_sum, dx.ptr(), out.ptr(), (int64_t)len, (int64_t)inner, scale);

    const auto [want, sum_abs] = col_ref(x, outer, len, inner, scale);
    check_sums<T>(format("col_sum_%s [%zu, %zu, %zu] scale=%g", Elem<T>::name, outer, len, inner, scale),
                  out.download(), want, sum_abs);
}

// `cuda::reduce::col_sum_split`: as col_sum, rows split over blocks (col_partial into
// fp32 partials, then col_finish).
template <class T>
void col_sum_split(size_t outer, size_t len, size_t inner, float scale) {
    const auto [splits, chunk] = col_splits(outer, len, inner);
    const auto x = rng.values<T>(outer * len * inner);
    DeviceArray<T> dx(x), out(outer * inner);
    DeviceArray<float> partials(outer * splits * inner);
    const size_t tiles = ceil_div(inner, 32);
    emu::launch(emu::LaunchConfig{dim3((unsigned)(outer * splits * tiles)), dim3(32, 8), 0}, K<T>::col_partial, dx.ptr(),
                partials.ptr(), (int64_t)len, (int64_t)inner, (int64_t)splits, (int64_t)chunk);
    emu::launch(emu::LaunchConfig{dim3((unsigned)(outer * tiles)), dim3(32, 8), 0}, K<T>::col_finish, partials.ptr(),
                out.ptr(), (int64_t)splits, (int64_t)inner, scale);

    const auto [want, sum_abs] = col_ref(x, outer, len, inner, scale);
    check_sums<T>(format("col_sum_split_%s [%zu, %zu, %zu] (%zu splits of %zu rows) scale=%g", Elem<T>::name, outer,
                         len, inner, splits, chunk, scale),
                  out.download(), want, sum_abs);
}

// `cuda::reduce::col_sum_split` with `SYNTHOS_CUDA_COLSUM=vec` (inner a multiple of the
// vector width): col_partial_vec over the split of 32·VW-column blocks, then col_finish,
// against the reference; and with col_partial's own split, partials equal to
// col_partial's bit for bit (the same order of additions per column).
template <class T>
void col_sum_split_vec(size_t outer, size_t len, size_t inner, float scale) {
    constexpr size_t kWidth = 16 / sizeof(T), kCols = 32 * kWidth;
    const auto x = rng.values<T>(outer * len * inner);
    DeviceArray<T> dx(x), out(outer * inner);
    const std::string shape = format("[%zu, %zu, %zu]", outer, len, inner);
    {
        const auto [splits, chunk] = col_splits(outer, len, inner);
        DeviceArray<float> scalar(outer * splits * inner), vec(outer * splits * inner);
        emu::launch(emu::LaunchConfig{dim3((unsigned)(outer * splits * ceil_div(inner, 32))), dim3(32, 8), 0},
                    K<T>::col_partial, dx.ptr(), scalar.ptr(), (int64_t)len, (int64_t)inner, (int64_t)splits,
                    (int64_t)chunk);
        emu::launch(emu::LaunchConfig{dim3((unsigned)(outer * splits * ceil_div(inner, kCols))), dim3(32, 8), 0},
                    K<T>::col_partial_vec, dx.ptr(), vec.ptr(), (int64_t)len, (int64_t)inner, (int64_t)splits,
                    (int64_t)chunk);
        report.close(format("col_partial_vec_%s %s (%zu splits of %zu rows) = col_partial", Elem<T>::name,
                            shape.c_str(), splits, chunk),
                     vec.download(), scalar.download(), 0, 0);
    }
    const auto [splits, chunk] = col_splits(outer, len, inner, kCols);
    DeviceArray<float> partials(outer * splits * inner);
    emu::launch(emu::LaunchConfig{dim3((unsigned)(outer * splits * ceil_div(inner, kCols))), dim3(32, 8), 0},
                K<T>::col_partial_vec, dx.ptr(), partials.ptr(), (int64_t)len, (int64_t)inner, (int64_t)splits,
                (int64_t)chunk);
    emu::launch(emu::LaunchConfig{dim3((unsigned)(outer * ceil_div(inner, 32))), dim3(32, 8), 0}, K<T>::col_finish,
                partials.ptr(), out.ptr(), (int64_t)splits, (int64_t)inner, scale);
    const auto [want, sum_abs] = col_ref(x, outer, len, inner, scale);
    check_sums<T>(format("col_sum_split vec %s %s (%zu splits of %zu rows) scale=%g", Elem<T>::name, shape.c_str(),
                         splits, chunk, scale),
                  out.download(), want, sum_abs);
}

// `cuda::reduce::col_sum_split_product` (the gate gradient Σ_r g·y): col_partial_mul, or
// col_partial_vec_mul with `vec` (inner a multiple of the vector width), over the split of
// their blocks, then col_finish, against the sums of the exact products; with `vec`, also
// its partials over col_partial_mul's split equal col_partial_mul's bit for bit.
template <class T>
void col_sum_split_mul(size_t outer, size_t len, size_t inner, float scale, bool vec) {
    constexpr size_t kWidth = 16 / sizeof(T);
    const size_t cols = vec ? 32 * kWidth : 32;
    const auto x = rng.values<T>(outer * len * inner), y = rng.values<T>(outer * len * inner);
    std::vector<double> xy(x.size());
    for (size_t k = 0; k < x.size(); ++k) xy[k] = x[k] * y[k];
    DeviceArray<T> dx(x), dy(y), out(outer * inner);
    const auto kernel = vec ? K<T>::col_partial_vec_mul : K<T>::col_partial_mul;
    const std::string shape = format("[%zu, %zu, %zu]", outer, len, inner);
    if (vec) {
        const auto [splits, chunk] = col_splits(outer, len, inner);
        DeviceArray<float> scalar(outer * splits * inner), vector(outer * splits * inner);
        emu::launch(emu::LaunchConfig{dim3((unsigned)(outer * splits * ceil_div(inner, 32))), dim3(32, 8), 0},
                    K<T>::col_partial_mul, dx.ptr(), dy.ptr(), scalar.ptr(), (int64_t)len, (int64_t)inner,
                    (int64_t)splits, (int64_t)chunk);
        emu::launch(emu::LaunchConfig{dim3((unsigned)(outer * splits * ceil_div(inner, cols))), dim3(32, 8), 0},
                    kernel, dx.ptr(), dy.ptr(), vector.ptr(), (int64_t)len, (int64_t)inner, (int64_t)splits,
                    (int64_t)chunk);
        report.close(format("col_partial_vec_mul_%s %s (%zu splits of %zu rows) = col_partial_mul", Elem<T>::name,
                            shape.c_str(), splits, chunk),
                     vector.download(), scalar.download(), 0, 0);
    }
    const auto [splits, chunk] = col_splits(outer, len, inner, cols);
    DeviceArray<float> partials(outer * splits * inner);
    emu::launch(emu::LaunchConfig{dim3((unsigned)(outer * splits * ceil_div(inner, cols))), dim3(32, 8), 0}, kernel,
                dx.ptr(), dy.ptr(), partials.ptr(), (int64_t)len, (int64_t)inner, (int64_t)splits, (int64_t)chunk);
    emu::launch(emu::LaunchConfig{dim3((unsigned)(outer * ceil_div(inner, 32))), dim3(32, 8), 0}, K<T>::col_finish,
                partials.ptr(), out.ptr(), (int64_t)splits, (int64_t)inner, scale);
    const auto [want, sum_abs] = col_ref(xy, outer, len, inner, scale);
    check_sums<T>(format("col_sum_split of x·y%s %s %s (%zu splits of %zu rows) scale=%g", vec ? " vec" : "",
                         Elem<T>::name, shape.c_str(), splits, chunk, scale),
                  out.download(), want, sum_abs);
}

template <class T>
void family() {
    sum_to<T>({3, 5, 7}, {3, 1, 7});
    sum_to<T>({3, 5, 7}, {1, 5, 1});
    sum_to<T>({3, 5, 7}, {1, 1, 1});
    sum_to<T>({3, 5, 7}, {3, 5, 7});
    sum_to<T>({2, 3, 1, 4, 5, 2}, {1, 3, 1, 1, 5, 1});
    sum_to<T>({300, 9}, {1, 9});

    struct RowCase {
        size_t rows, len;
    };
    std::vector<RowCase> rows = {{1, 1}, {1, 37}, {3, 2049}, {2, 5001}, {37, 129}, {5, 4096}, {3, 24}, {4, 8}};
    if (!kTsan) {
        rows.push_back({1, 70001});     // 35 blocks, each thread striding over its chunk
        rows.push_back({2049, 3});      // blocks_per_row clamped by MAX_PARTIAL_BLOCKS
        rows.push_back({1, 1000003});   // words four at a time over 489 blocks, and a tail
        rows.push_back({3, 400008});    // rows of whole words, several blocks each
    }
    for (const RowCase& c : rows) row_sum<T>(c.rows, c.len, c.rows == 1 ? 1.f : 1.f / (float)c.len);

    struct ColCase {
        size_t outer, len, inner;
    };
    std::vector<ColCase> cols = {{1, 1, 2}, {2, 37, 45}, {1, 9, 64}};
    if (!kTsan) {
        cols.push_back({3, 300, 2});
        cols.push_back({2, 1000, 33});
        cols.push_back({4, 8, 1000});
    }
    for (const ColCase& c : cols) col_sum<T>(c.outer, c.len, c.inner, c.len % 2 ? 1.f : 0.5f);

    // Split column sums: a ragged last split, one split, columns not a multiple of 32.
    std::vector<ColCase> splits = {{1, 130, 3}, {2, 65, 33}, {1, 1, 5}};
    if (!kTsan) {
        splits.push_back({1, 4097, 45});  // many splits, last one short
        splits.push_back({3, 777, 70});
    }
    for (const ColCase& c : splits) col_sum_split<T>(c.outer, c.len, c.inner, c.len % 2 ? 1.f : 0.25f);

    // Vector column sums: one word, a ragged last tile (264 = 256 + 8 columns), ragged
    // last splits (rows not a multiple of the chunk, nor of 4 rows per thread row).
    std::vector<ColCase> vec = {{1, 130, 8}, {2, 97, 264}, {1, 7, 16}};
    if (!kTsan) {
        vec.push_back({1, 4099, 264});
        vec.push_back({3, 301, 520});
    }
    for (const ColCase& c : vec) col_sum_split_vec<T>(c.outer, c.len, c.inner, c.len % 2 ? 1.f : 0.25f);

    // Column sums of products (the gate gradient), scalar and vector: one split and
    // several, ragged last tiles and splits.
    for (const ColCase& c : splits) col_sum_split_mul<T>(c.outer, c.len, c.inner, 1.f, false);
    for (const ColCase& c : vec) {
        col_sum_split_mul<T>(c.outer, c.len, c.inner, c.len % 2 ? 1.f : 0.25f, false);
        col_sum_split_mul<T>(c.outer, c.len, c.inner, c.len % 2 ? 1.f : 0.25f, true);
    }
}

}  // namespace

int main() {
    emu::watchdog(300);
    family<float>();
    family<bf16>();
    return report.finish();
}
