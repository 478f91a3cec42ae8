// kernels/conv.cu under emulation, launched as src/cuda/conv.rs does:
// - the convolution's band loop, forward and backward (`forward_t`, `backward_t`): im2col
//   (and im2col_rows, equal to it bit for bit),
//   col2im, rows_copy[_bias], rows_bias_add and accumulate_f32_from_*, with the cuBLASLt
//   products computed on the host (in double, rounded to the element type, as cuBLASLt
//   stores them) at the same offsets and leading dimensions, so that the kernels see
//   exactly the launcher's buffers. The results are checked against a direct convolution
//   (and its gradients) in double: kernels 1×1, 3×3, 5×3, strides 1/2/3, asymmetric
//   padding, channel counts that are not multiples of 8, several bands per image with a
//   short last band, bands whose output starts 256-byte aligned (in-place GEMM +
//   rows_bias_add) and not (scratch + rows_copy), the in-place 1×1 path, a band that sees
//   only padding (col2im skipped);
// - nearest 2× upsampling and its backward;
// - the by-rows forms of im2col, col2im, the band copies, the bias adds and the upsampling
//   and its backward (SYNTHOS_CUDA_IM2COL=rows), each equal to its element kernel bit for
//   bit (col2im_rows accumulating dx over the bands on its own, checked against the
//   reference too, and again on every band from a dx that is not zero, with -0 where it
//   must not write);
// - the channel RMS norm forward and backward (32×8 blocks, per-block dγ partials, more
//   pixel groups than CRN_MAX_BLOCKS), with pixels whose norm is clamped at eps;
// - a few of these again with the grid caps lowered, so that every grid-stride loop runs.
// None of these kernels has a vector path, so there are no misaligned views to test; the
// launchers pass whole allocations and element offsets.
#include "harness.h"

#include "conv.cu"

#include <memory>
#include <numeric>

using namespace harness;

namespace {

Report report("conv");
Rng rng(0xC0117);

// Mirrors of src/cuda/conv.rs.
constexpr unsigned kThreads = 256;            // THREADS
constexpr size_t kMaxBlocks = size_t(1) << 20;  // MAX_BLOCKS
constexpr size_t kGemmAlign = 256;            // GEMM_ALIGN
constexpr size_t kCrnPix = 32, kCrnRows = 8;  // CRN_PIX, CRN_ROWS
constexpr size_t kCrnMaxBlocks = 4096;        // CRN_MAX_BLOCKS
constexpr size_t kIm2colRowsPairs = 8;        // IM2COL_ROWS_PAIRS

// The launchers' grid caps. The real ones bind only at sizes too large to emulate, so a
// few cases run with them lowered to a handful of blocks: the grids the launchers make
// for huge inputs, in miniature, so that the kernels' grid-stride loops run too.
size_t max_blocks = kMaxBlocks, crn_max_blocks = kCrnMaxBlocks;
// The row kernels' cap on grid rows (65535 in `row_pass`), lowered with the others.
size_t max_rows = 65535;

// `grid`: 1-D, 256 threads, capped at MAX_BLOCKS.
emu::LaunchConfig grid(size_t n) {
    return {dim3((unsigned)std::clamp<size_t>(ceil_div(n, kThreads), 1, max_blocks)), dim3(kThreads), 0};
}

// `aligned`: element `off` of a 256-byte-aligned allocation is aligned for cuBLASLt.
template <class T>
bool aligned(size_t off) {
    return off * sizeof(T) % kGemmAlign == 0;
}

template <class T>
struct K;
template <>
struct K<float> {
    static constexpr auto im2col = EMU_KERNEL(im2col_f32), col2im = EMU_KERNEL(col2im_f32);
    static constexpr auto im2col_rows = EMU_KERNEL(im2col_rows_f32), col2im_rows = EMU_KERNEL(col2im_rows_f32);
    static constexpr auto rows_copy = EMU_KERNEL(rows_copy_f32), rows_copy_bias = EMU_KERNEL(rows_copy_bias_f32);
    static constexpr auto rows_bias_add = EMU_KERNEL(rows_bias_add_f32);
    static constexpr auto rows_copy_by_rows = EMU_KERNEL(rows_copy_by_rows_f32),
                          rows_copy_bias_by_rows = EMU_KERNEL(rows_copy_bias_by_rows_f32),
                          rows_bias_add_by_rows = EMU_KERNEL(rows_bias_add_by_rows_f32),
                          upsample_by_rows = EMU_KERNEL(upsample2x_by_rows_f32);
    static constexpr auto accumulate = EMU_KERNEL(accumulate_f32_from_f32);
    static constexpr auto upsample = EMU_KERNEL(upsample2x_f32), upsample_bwd = EMU_KERNEL(upsample2x_bwd_f32);
    static constexpr auto upsample_bwd_by_rows = EMU_KERNEL(upsample2x_bwd_by_rows_f32);
    static constexpr auto crn = EMU_KERNEL(channel_rms_norm_f32), crn_bwd = EMU_KERNEL(channel_rms_norm_bwd_f32);
};
template <>
struct K<bf16> {
    static constexpr auto im2col = EMU_KERNEL(im2col_bf16), col2im = EMU_KERNEL(col2im_bf16);
    static constexpr auto im2col_rows = EMU_KERNEL(im2col_rows_bf16), col2im_rows = EMU_KERNEL(col2im_rows_bf16);
    static constexpr auto rows_copy = EMU_KERNEL(rows_copy_bf16), rows_copy_bias = EMU_KERNEL(rows_copy_bias_bf16);
    static constexpr auto rows_bias_add = EMU_KERNEL(rows_bias_add_bf16);
    static constexpr auto rows_copy_by_rows = EMU_KERNEL(rows_copy_by_rows_bf16),
                          rows_copy_bias_by_rows = EMU_KERNEL(rows_copy_bias_by_rows_bf16),
                          rows_bias_add_by_rows = EMU_KERNEL(rows_bias_add_by_rows_bf16),
                          upsample_by_rows = EMU_KERNEL(upsample2x_by_rows_bf16);
    static constexpr auto accumulate = EMU_KERNEL(accumulate_f32_from_bf16);
    static constexpr auto upsample = EMU_KERNEL(upsample2x_bf16), upsample_bwd = EMU_KERNEL(upsample2x_bwd_bf16);
    static constexpr auto upsample_bwd_by_rows = EMU_KERNEL(upsample2x_bwd_by_rows_bf16);
    static constexpr auto crn = EMU_KERNEL(channel_rms_norm_bf16), crn_bwd = EMU_KERNEL(channel_rms_norm_bwd_bf16);
};

// One rounding to T (relative), or f32 arithmetic for f32.
template <class T>
constexpr double rtol_of() {
    return std::is_same_v<T, bf16> ? 1.0 / 256 : 1e-6;
}

// ---- Convolution ----------------------------------------------------------------------

// cpu::conv::ConvGeom, with the padding below and to the right that sets h_out, w_out.
struct Geom {
    size_t batch, c_in, h, w, c_out, kh, kw, stride, pad_top, pad_left, pad_bottom, pad_right;
    size_t max_col_elems;
    size_t h_out() const { return (h + pad_top + pad_bottom - kh) / stride + 1; }
    size_t w_out() const { return (w + pad_left + pad_right - kw) / stride + 1; }
    size_t k() const { return c_in * kh * kw; }
    size_t out_pixels() const { return h_out() * w_out(); }
    size_t in_image() const { return c_in * h * w; }
    size_t out_image() const { return c_out * out_pixels(); }
    bool is_identity() const { return kh == 1 && kw == 1 && stride == 1 && h_out() == h && w_out() == w; }
    // `ConvGeom::rows_per_chunk`
    size_t rows_per_chunk() const {
        return std::clamp<size_t>(max_col_elems / std::max<size_t>(k() * w_out(), 1), 1, std::max<size_t>(h_out(), 1));
    }
    // `ConvGeom::input_rows`
    std::pair<size_t, size_t> input_rows(size_t r0, size_t rows) const {
        const auto sat_sub = [](size_t a, size_t b) { return a > b ? a - b : 0; };
        const size_t first = sat_sub(r0 * stride, pad_top);
        const size_t end = std::min(sat_sub((r0 + rows - 1) * stride + kh, pad_top), h);
        return {std::min(first, end), end};
    }
    // `ConvDesc::new`
    ConvDesc desc() const {
        return {(int64_t)c_in,  (int64_t)h,        (int64_t)w,         (int64_t)kh,      (int64_t)kw,
                (int64_t)stride, (int64_t)pad_top, (int64_t)pad_left, (int64_t)h_out(), (int64_t)w_out()};
    }
    std::string name() const {
        return format("conv b=%zu c_in=%zu %zux%zu c_out=%zu k=%zux%zu s=%zu pad t%zu l%zu b%zu r%zu band≤%zu rows",
                      batch, c_in, h, w, c_out, kh, kw, stride, pad_top, pad_left, pad_bottom, pad_right,
                      rows_per_chunk());
    }
};

// `band_rows`: rows_per_chunk rounded down to a multiple of the rows that keep band starts
// 256-byte aligned, when one fits.
template <class T>
size_t band_rows(const Geom& g) {
    const size_t per = g.rows_per_chunk();
    if (per >= g.h_out()) return per;
    const size_t step = kGemmAlign / std::gcd(kGemmAlign, std::max<size_t>(g.w_out() * sizeof(T), 1));
    return per >= step ? per / step * step : per;
}

// `in_place`: image b uses the 1×1 path (input and output both aligned).
template <class T>
bool in_place(const Geom& g, size_t b) {
    return g.is_identity() && aligned<T>(b * g.in_image()) && aligned<T>(b * g.out_image());
}

// `bands`
std::vector<std::pair<size_t, size_t>> bands(const Geom& g, size_t per) {
    std::vector<std::pair<size_t, size_t>> out;
    for (size_t r0 = 0; r0 < g.h_out(); r0 += std::max<size_t>(per, 1)) out.push_back({r0, std::min(per, g.h_out() - r0)});
    return out;
}

// What cuBLASLt computes for `gemm_rows`: row-major C[m, n] = op(A)·op(B), A stored
// [m, k] ([k, m] when ta) with row length lda, B [k, n] ([n, k] when tb) with ldb; in
// double, stored rounded to T (beta = 0).
template <class T>
void host_gemm(size_t m, size_t n, size_t k, const T* a, size_t lda, bool ta, const T* b, size_t ldb, bool tb, T* c,
               size_t ldc) {
    for (size_t i = 0; i < m; ++i)
        for (size_t j = 0; j < n; ++j) {
            double acc = 0;
            for (size_t l = 0; l < k; ++l) {
                const T av = ta ? a[l * lda + i] : a[i * lda + l];
                const T bv = tb ? b[j * ldb + l] : b[l * ldb + j];
                acc += Elem<T>::to(av) * Elem<T>::to(bv);
            }
            c[i * ldc + j] = Elem<T>::from(acc);
        }
}

// A scratch slot of the launcher: allocated (poisoned) with n elements on first use.
template <class T>
DeviceArray<T>& scratch(std::unique_ptr<DeviceArray<T>>& slot, size_t n) {
    if (!slot) slot = std::make_unique<DeviceArray<T>>(n);
    return *slot;
}

// `row_pass` with SYNTHOS_CUDA_IM2COL=rows: 256 threads, columns along x, rows along y.
emu::LaunchConfig row_grid(size_t rows, size_t cols) {
    return {dim3((unsigned)std::clamp<size_t>(ceil_div(cols, kThreads), 1, max_blocks),
                 (unsigned)std::clamp<size_t>(rows, 1, max_rows)),
            dim3(kThreads), 0};
}

// A copy of `a` (its whole allocation, so offsets keep their meaning).
template <class T>
std::unique_ptr<DeviceArray<T>> clone(const DeviceArray<T>& a) {
    auto c = std::make_unique<DeviceArray<T>>(a.size());
    std::memcpy(static_cast<void*>(c->ptr()), a.ptr(), a.size() * sizeof(T));
    return c;
}

// Every element of the two arrays equal, bit for bit (NaN poison included).
template <class T>
void same_bits(const std::string& what, const DeviceArray<T>& a, const DeviceArray<T>& b) {
    report.expect(std::memcmp(a.ptr(), b.ptr(), a.size() * sizeof(T)) == 0, what);
}

// `rows_copy`: dst[d_off + r·d_ld + c] = src[s_off + r·s_ld + c] (+ bias[r]); the by-rows
// kernel writes the same into a copy of dst, which must then equal it bit for bit.
template <class T>
void rows_copy(const DeviceArray<T>& src, size_t s_off, size_t s_ld, DeviceArray<T>& dst, size_t d_off, size_t d_ld,
               size_t rows, size_t cols, const DeviceArray<float>* bias) {
    const int64_t a[] = {(int64_t)s_off, (int64_t)s_ld, (int64_t)d_off, (int64_t)d_ld, (int64_t)rows, (int64_t)cols};
    auto other = clone(dst);
    const auto rg = row_grid(rows, cols);
    if (bias) {
        emu::launch(grid(rows * cols), K<T>::rows_copy_bias, src.ptr(), a[0], a[1], dst.ptr(), a[2], a[3], a[4], a[5],
                    (const float*)bias->ptr());
        emu::launch(rg, K<T>::rows_copy_bias_by_rows, src.ptr(), a[0], a[1], other->ptr(), a[2], a[3], a[4], a[5],
                    (const float*)bias->ptr());
    } else {
        emu::launch(grid(rows * cols), K<T>::rows_copy, src.ptr(), a[0], a[1], dst.ptr(), a[2], a[3], a[4], a[5]);
        emu::launch(rg, K<T>::rows_copy_by_rows, src.ptr(), a[0], a[1], other->ptr(), a[2], a[3], a[4], a[5]);
    }
    same_bits(format("rows_copy%s_by_rows = rows_copy%s: [%zu, %zu] %s", bias ? "_bias" : "", bias ? "_bias" : "",
                     rows, cols, Elem<T>::name),
              *other, dst);
}

// `rows_bias_add`
template <class T>
void rows_bias_add(DeviceArray<T>& dst, size_t off, size_t ld, size_t rows, size_t cols, const DeviceArray<float>& bias) {
    auto other = clone(dst);
    emu::launch(row_grid(rows, cols), K<T>::rows_bias_add_by_rows, other->ptr(), (int64_t)off, (int64_t)ld,
                (int64_t)rows, (int64_t)cols, (const float*)bias.ptr());
    emu::launch(grid(rows * cols), K<T>::rows_bias_add, dst.ptr(), (int64_t)off, (int64_t)ld, (int64_t)rows,
                (int64_t)cols, (const float*)bias.ptr());
    same_bits(format("rows_bias_add_by_rows = rows_bias_add: [%zu, %zu] %s", rows, cols, Elem<T>::name), *other, dst);
}

// `im2col`, with the element kernel; `im2col_rows` (SYNTHOS_CUDA_IM2COL=rows) writes the
// same band again into a buffer of its own, which must equal it bit for bit (the buffer
// starts as NaN, so an element it leaves unwritten differs).
template <class T>
void im2col(const DeviceArray<T>& x, size_t x_off, DeviceArray<T>& cols, const Geom& g, size_t r0, size_t rows) {
    const size_t n = g.k() * rows * g.w_out();
    emu::launch(grid(n), K<T>::im2col, (const T*)x.ptr(), (int64_t)x_off, cols.ptr(), g.desc(), (int64_t)r0,
                (int64_t)rows);
    DeviceArray<T> by_rows(n);
    const size_t pairs = g.k() * rows;
    const emu::LaunchConfig cfg{dim3((unsigned)std::clamp<size_t>(ceil_div(pairs, kIm2colRowsPairs), 1, max_blocks)),
                                dim3(32, (unsigned)kIm2colRowsPairs), 0};
    emu::launch(cfg, K<T>::im2col_rows, (const T*)x.ptr(), (int64_t)x_off, by_rows.ptr(), g.desc(), (int64_t)r0,
                (int64_t)rows);
    std::vector<double> want(n);
    for (size_t i = 0; i < n; ++i) want[i] = Elem<T>::to(cols.ptr()[i]);
    report.close(format("im2col_rows = im2col: %s %s band r0=%zu rows=%zu grid cap %zu", g.name().c_str(),
                        Elem<T>::name, r0, rows, max_blocks),
                 by_rows.download(), want, 0, 0);
}

// `col2im`'s launch of `col2im_rows`: one warp per input row, 8 rows per block.
emu::LaunchConfig col2im_rows_grid(const Geom& g, std::pair<size_t, size_t> iy) {
    const size_t rows = g.c_in * (iy.second - iy.first);
    return {dim3((unsigned)std::clamp<size_t>(ceil_div(rows, kIm2colRowsPairs), 1, max_blocks)),
            dim3(32, (unsigned)kIm2colRowsPairs), 0};
}

// `col2im` (nothing to launch when the band's taps all fall in the padding): the element
// kernel adds the band into dx, `col2im_rows` (SYNTHOS_CUDA_IM2COL=rows) into dx_rows,
// each summing over the bands on its own; after every band the two must be equal bit
// for bit.
template <class T>
void col2im(const DeviceArray<T>& dcols, DeviceArray<T>& dx, DeviceArray<T>& dx_rows, size_t dx_off, const Geom& g,
            size_t r0, size_t rows, std::pair<size_t, size_t> iy) {
    const size_t n = g.c_in * (iy.second - iy.first) * g.w;
    if (n == 0) return;
    const int64_t a[] = {(int64_t)dx_off, (int64_t)r0, (int64_t)rows, (int64_t)iy.first, (int64_t)iy.second};
    emu::launch(grid(n), K<T>::col2im, (const T*)dcols.ptr(), dx.ptr(), a[0], g.desc(), a[1], a[2], a[3], a[4]);
    emu::launch(col2im_rows_grid(g, iy), K<T>::col2im_rows, (const T*)dcols.ptr(), dx_rows.ptr(), a[0], g.desc(), a[1],
                a[2], a[3], a[4]);
    same_bits(format("col2im_rows = col2im: %s %s band r0=%zu rows=%zu iy [%zu, %zu) grid cap %zu", g.name().c_str(),
                     Elem<T>::name, r0, rows, iy.first, iy.second, max_blocks),
              dx_rows, dx);
}

// Both col2im kernels on every band of `g`'s last image (so that dx_off > 0), each from
// the same dx and dcols, random but for -0 on every row outside the band (and the other
// images) and on every 7th pixel inside it: the element kernel adds 0.f to each pixel of
// the band, turning its -0 into +0, and leaves the rest alone, so a pixel that the rows
// kernel skips or a write outside the band differs in its bits. A dx that is not zero
// also fixes when the sum meets dx (after all its taps).
template <class T>
void col2im_bands(const Geom& g) {
    const size_t per = band_rows<T>(g), b = g.batch - 1, xo = b * g.in_image();
    const DeviceArray<T> dcols(rng.values<T>(g.k() * per * g.w_out()));
    for (auto [r0, rows] : bands(g, per)) {
        const auto iy = g.input_rows(r0, rows);
        std::vector<double> init(g.batch * g.in_image(), -0.0);
        const auto v = rng.values<T>(init.size());
        for (size_t c = 0; c < g.c_in; ++c)
            for (size_t y = iy.first; y < iy.second; ++y)
                for (size_t x = 0; x < g.w; ++x) {
                    const size_t i = xo + (c * g.h + y) * g.w + x;
                    init[i] = i % 7 == 0 ? -0.0 : v[i];
                }
        DeviceArray<T> dx(init), dx_rows(init);
        col2im(dcols, dx, dx_rows, xo, g, r0, rows, iy);
    }
}

// `accumulate`
template <class T>
void accumulate(DeviceArray<float>& acc, const DeviceArray<T>& x, size_t n) {
    emu::launch(grid(n), K<T>::accumulate, acc.ptr(), (const T*)x.ptr(), (int64_t)n);
}

// Index helpers of the [B, C, H, W] tensors.
struct Idx {
    const Geom& g;
    size_t x(size_t b, size_t c, size_t iy, size_t ix) const { return ((b * g.c_in + c) * g.h + iy) * g.w + ix; }
    size_t y(size_t b, size_t o, size_t oy, size_t ox) const {
        return ((b * g.c_out + o) * g.h_out() + oy) * g.w_out() + ox;
    }
    size_t wt(size_t o, size_t c, size_t ky, size_t kx) const { return ((o * g.c_in + c) * g.kh + ky) * g.kw + kx; }
};

// Calls f(iy, ix) for the input pixel under tap (ky, kx) of output (oy, ox), if any.
template <class F>
void for_tap(const Geom& g, size_t oy, size_t ox, size_t ky, size_t kx, F f) {
    const long iy = (long)(oy * g.stride + ky) - (long)g.pad_top, ix = (long)(ox * g.stride + kx) - (long)g.pad_left;
    if (iy >= 0 && iy < (long)g.h && ix >= 0 && ix < (long)g.w) f((size_t)iy, (size_t)ix);
}

template <class T>
void conv(const Geom& g, bool with_bias) {
    const std::string what =
        format("%s %s%s grid cap %zu", g.name().c_str(), Elem<T>::name, with_bias ? " +bias" : "", max_blocks);
    const size_t k = g.k(), opix = g.out_pixels(), o = g.c_out, wo = g.w_out();
    const auto xv = rng.values<T>(g.batch * g.in_image()), wv = rng.values<T>(o * k, 0.3);
    const auto bv = rng.values<float>(o), dyv = rng.values<T>(g.batch * g.out_image());
    DeviceArray<T> x(xv), w(wv), dy(dyv);
    DeviceArray<float> bias(bv);
    const DeviceArray<float>* bias_ptr = with_bias ? &bias : nullptr;

    // ---- forward (`forward_t`)
    const size_t per = band_rows<T>(g);
    DeviceArray<T> out(g.batch * g.out_image());
    std::unique_ptr<DeviceArray<T>> cols_slot, band_slot;
    for (size_t b = 0; b < g.batch; ++b) {
        const size_t xo = b * g.in_image(), oo = b * g.out_image();
        if (in_place<T>(g, b)) {
            host_gemm(o, opix, k, w.ptr(), k, false, x.ptr() + xo, opix, false, out.ptr() + oo, opix);
            if (with_bias) rows_bias_add(out, oo, opix, o, opix, bias);
            continue;
        }
        for (auto [r0, rows] : bands(g, per)) {
            const size_t npix = rows * wo;
            auto& cols = scratch(cols_slot, k * per * wo);
            im2col(x, xo, cols, g, r0, rows);
            const size_t dst = oo + r0 * wo;
            if (aligned<T>(dst)) {
                host_gemm(o, npix, k, w.ptr(), k, false, cols.ptr(), npix, false, out.ptr() + dst, opix);
                if (with_bias) rows_bias_add(out, dst, opix, o, npix, bias);
            } else {
                auto& band = scratch(band_slot, o * per * wo);
                host_gemm(o, npix, k, w.ptr(), k, false, cols.ptr(), npix, false, band.ptr(), npix);
                rows_copy(band, 0, npix, out, dst, opix, o, npix, bias_ptr);
            }
        }
    }

    // ---- backward (`backward_t`, both gradients)
    DeviceArray<T> dx(g.batch * g.in_image()), dx_rows(g.batch * g.in_image());
    dx.zero();
    dx_rows.zero();
    DeviceArray<float> dw(o * k);
    dw.zero();
    std::unique_ptr<DeviceArray<T>> bcols_slot, dcols_slot, bband_slot, part_slot;
    for (size_t b = 0; b < g.batch; ++b) {
        const size_t xo = b * g.in_image(), oo = b * g.out_image();
        const bool direct = in_place<T>(g, b);
        const size_t bper = direct ? g.h_out() : per;
        for (auto [r0, rows] : bands(g, bper)) {
            const size_t npix = rows * wo, src = oo + r0 * wo;
            const bool dy_in_place = aligned<T>(src);
            if (!dy_in_place) rows_copy(dy, src, opix, scratch(bband_slot, o * bper * wo), 0, npix, o, npix, nullptr);
            if (!direct) im2col(x, xo, scratch(bcols_slot, k * bper * wo), g, r0, rows);
            const T* dy_view = dy_in_place ? dy.ptr() + src : bband_slot->ptr();
            const size_t ld_dy = dy_in_place ? opix : npix;
            const T* cols_view = direct ? x.ptr() + xo : bcols_slot->ptr();
            auto& part = scratch(part_slot, o * k);
            host_gemm(o, k, npix, dy_view, ld_dy, false, cols_view, npix, true, part.ptr(), k);
            accumulate(dw, part, o * k);
            if (direct) {
                host_gemm(k, npix, o, w.ptr(), k, true, dy_view, ld_dy, false, dx.ptr() + xo, npix);
                host_gemm(k, npix, o, w.ptr(), k, true, dy_view, ld_dy, false, dx_rows.ptr() + xo, npix);
            } else {
                auto& dcols = scratch(dcols_slot, k * bper * wo);
                host_gemm(k, npix, o, w.ptr(), k, true, dy_view, ld_dy, false, dcols.ptr(), npix);
                col2im(dcols, dx, dx_rows, xo, g, r0, rows, g.input_rows(r0, rows));
            }
        }
    }

    // ---- references: the direct convolution and its gradients, by taps from the output side
    const Idx ix{g};
    std::vector<double> want_y(g.batch * g.out_image()), y_abs(want_y.size());
    std::vector<double> want_dx(g.batch * g.in_image(), 0.0), dx_abs(want_dx.size(), 0.0);
    std::vector<double> want_dw(o * k, 0.0), dw_abs(o * k, 0.0);
    for (size_t b = 0; b < g.batch; ++b)
        for (size_t oc = 0; oc < o; ++oc)
            for (size_t oy = 0; oy < g.h_out(); ++oy)
                for (size_t ox = 0; ox < wo; ++ox) {
                    const size_t yi = ix.y(b, oc, oy, ox);
                    double acc = with_bias ? bv[oc] : 0.0, abs = with_bias ? std::fabs(bv[oc]) : 0.0;
                    for (size_t c = 0; c < g.c_in; ++c)
                        for (size_t ky = 0; ky < g.kh; ++ky)
                            for (size_t kx = 0; kx < g.kw; ++kx)
                                for_tap(g, oy, ox, ky, kx, [&](size_t iy, size_t ixx) {
                                    const size_t xi = ix.x(b, c, iy, ixx), wi = ix.wt(oc, c, ky, kx);
                                    acc += wv[wi] * xv[xi];
                                    abs += std::fabs(wv[wi] * xv[xi]);
                                    want_dx[xi] += wv[wi] * dyv[yi];
                                    dx_abs[xi] += std::fabs(wv[wi] * dyv[yi]);
                                    want_dw[wi] += dyv[yi] * xv[xi];
                                    dw_abs[wi] += std::fabs(dyv[yi] * xv[xi]);
                                });
                    want_y[yi] = acc;
                    y_abs[yi] = abs;
                }
    // bf16: the GEMM result and the biased value are each rounded (y); dcols entries and
    // the per-band partial sums of dx are rounded, as are the per-band dW partials: a few
    // roundings of terms bounded by the sums of absolute products.
    const double r = std::is_same_v<T, bf16> ? 1.0 / 128 : 1e-6;
    const auto tol = [&](const std::vector<double>& abs) {
        std::vector<double> t(abs.size());
        for (size_t i = 0; i < abs.size(); ++i) t[i] = (1e-6 + r) * abs[i] + 1e-12;
        return t;
    };
    const double rel = std::is_same_v<T, bf16> ? 1.0 / 128 : 1e-6;
    const auto got_y = out.download(), got_dx = dx.download(), got_dw = dw.download();
    report.within(what + ": y", got_y, want_y, tol(y_abs), "(1e-6 + rounding)·Σ|w·x|");
    report.norm_close(what + ": y (L2)", got_y, want_y, rel);
    report.within(what + ": dx", got_dx, want_dx, tol(dx_abs), "(1e-6 + rounding)·Σ|w·dy|");
    report.norm_close(what + ": dx (L2)", got_dx, want_dx, rel);
    report.within(what + ": dx by rows", dx_rows.download(), want_dx, tol(dx_abs), "(1e-6 + rounding)·Σ|w·dy|");
    report.within(what + ": dw", got_dw, want_dw, tol(dw_abs), "(1e-6 + rounding)·Σ|dy·x|");
    report.norm_close(what + ": dw (L2)", got_dw, want_dw, rel);
}

// ---- Upsample -------------------------------------------------------------------------

template <class T>
void upsample(size_t planes, size_t h, size_t w) {
    const std::string what =
        format("upsample_nearest2x %s planes=%zu %zux%zu grid cap %zu", Elem<T>::name, planes, h, w, max_blocks);
    const size_t n_in = planes * h * w, n_out = 4 * n_in;
    const auto xv = rng.values<T>(n_in), gv = rng.values<T>(n_out);
    DeviceArray<T> x(xv), g(gv), out(n_out), dx(n_in);
    const int64_t hh = (int64_t)h, ww = (int64_t)w;
    emu::launch(grid(n_out), K<T>::upsample, (const T*)x.ptr(), out.ptr(), hh, ww, (int64_t)n_out);
    DeviceArray<T> by_rows(n_out);
    emu::launch(row_grid(planes * 2 * h, 2 * w), K<T>::upsample_by_rows, (const T*)x.ptr(), by_rows.ptr(), hh, ww,
                (int64_t)n_out);
    same_bits(what + ": upsample2x_by_rows = upsample2x", by_rows, out);
    emu::launch(grid(n_in), K<T>::upsample_bwd, (const T*)g.ptr(), dx.ptr(), hh, ww, (int64_t)n_in);
    DeviceArray<T> dx_by_rows(n_in);
    emu::launch(row_grid(planes * h, w), K<T>::upsample_bwd_by_rows, (const T*)g.ptr(), dx_by_rows.ptr(), hh, ww,
                (int64_t)n_in);
    same_bits(what + ": upsample2x_bwd_by_rows = upsample2x_bwd", dx_by_rows, dx);

    std::vector<double> want(n_out), want_dx(n_in, 0.0), dx_abs(n_in, 0.0);
    for (size_t p = 0; p < planes; ++p)
        for (size_t oy = 0; oy < 2 * h; ++oy)
            for (size_t ox = 0; ox < 2 * w; ++ox) {
                const size_t o = (p * 2 * h + oy) * 2 * w + ox, i = (p * h + oy / 2) * w + ox / 2;
                want[o] = xv[i];
                want_dx[i] += gv[o];
                dx_abs[i] += std::fabs(gv[o]);
            }
    report.close(what + ": y", out.download(), want, 0, 0);
    std::vector<double> tol(n_in);
    for (size_t i = 0; i < n_in; ++i) tol[i] = 1e-6 * dx_abs[i] + rtol_of<T>() * std::fabs(want_dx[i]);
    report.within(what + ": dx", dx.download(), want_dx, tol, "1e-6·Σ|g| + rounding");
    report.within(what + ": dx by rows", dx_by_rows.download(), want_dx, tol, "1e-6·Σ|g| + rounding");
}

// ---- Channel RMS norm -----------------------------------------------------------------

// `crn_launch`
std::pair<emu::LaunchConfig, size_t> crn_launch(size_t batch, size_t s) {
    const size_t blocks = std::clamp<size_t>(ceil_div(batch * s, kCrnPix), 1, crn_max_blocks);
    return {{dim3((unsigned)blocks), dim3((unsigned)kCrnPix, (unsigned)kCrnRows), 0}, blocks};
}

// x viewed as [batch, c, s]; `clamped` pixels get a norm below eps (zero when eps is
// F.normalize's 1e-12).
template <class T>
void channel_rms_norm(size_t batch, size_t c, size_t s, float eps, size_t clamped) {
    const std::string what = format("channel_rms_norm %s batch=%zu c=%zu s=%zu eps=%g grid cap %zu", Elem<T>::name,
                                    batch, c, s, (double)eps, crn_max_blocks);
    const size_t n = batch * c * s, npix = batch * s;
    auto xv = rng.values<T>(n);
    const auto base = [&](size_t p) { return (p / s) * c * s + p % s; };
    for (size_t q = 0; q < clamped; ++q) {
        const size_t p = rng.below(npix);
        const double f = eps < 1e-6f ? 0.0 : 0.3 * eps / std::sqrt((double)c);
        for (size_t ch = 0; ch < c; ++ch) xv[base(p) + ch * s] = round_to<T>(f * xv[base(p) + ch * s]);
    }
    std::vector<double> gv(c);
    for (auto& v : gv) v = (double)(float)(1 + 0.5 * rng.normal());
    const auto dyv = rng.values<T>(n);
    DeviceArray<T> x(xv), dy(dyv), y(n), dx(n);
    DeviceArray<float> gamma(gv);
    const auto [cfg, blocks] = crn_launch(batch, s);
    DeviceArray<float> part(blocks * c);
    part.zero();
    const float scale = std::sqrt((float)c);  // `ChannelNorm::scale`
    const int64_t a[] = {(int64_t)c, (int64_t)s, (int64_t)npix};
    emu::launch(cfg, K<T>::crn, (const T*)x.ptr(), (const float*)gamma.ptr(), y.ptr(), a[0], a[1], a[2], eps, scale);
    emu::launch(cfg, K<T>::crn_bwd, (const T*)x.ptr(), (const float*)gamma.ptr(), (const T*)dy.ptr(), dx.ptr(),
                part.ptr(), a[0], a[1], a[2], eps, scale);

    // y_c = x_c·r·√c·γ_c with r = 1/max(‖x‖, eps); dx_c = √c·r·(γ_c·dy_c − x_c·r²·dot)
    // where ‖x‖ > eps, else √c·r·γ_c·dy_c; dγ_c = Σ_pixels dy_c·x_c·r·√c.
    const double sc = std::sqrt((double)c), rt = rtol_of<T>();
    std::vector<double> want_y(n), y_tol(n), want_dx(n), dx_tol(n), want_dg(c, 0.0), dg_abs(c, 0.0);
    for (size_t p = 0; p < npix; ++p) {
        double ss = 0, dot = 0, dot_abs = 0;
        for (size_t ch = 0; ch < c; ++ch) {
            const size_t i = base(p) + ch * s;
            ss += xv[i] * xv[i];
            dot += gv[ch] * dyv[i] * xv[i];
            dot_abs += std::fabs(gv[ch] * dyv[i] * xv[i]);
        }
        const double norm = std::sqrt(ss), r = 1 / std::max(norm, (double)eps);
        const bool proj = norm > eps;
        for (size_t ch = 0; ch < c; ++ch) {
            const size_t i = base(p) + ch * s;
            want_y[i] = xv[i] * r * sc * gv[ch];
            y_tol[i] = (1e-5 + rt) * std::fabs(want_y[i]);
            const double second = proj ? xv[i] * r * r * dot : 0.0;
            want_dx[i] = sc * r * (gv[ch] * dyv[i] - second);
            dx_tol[i] = 1e-5 * sc * r * (std::fabs(gv[ch] * dyv[i]) + (proj ? std::fabs(xv[i]) * r * r * dot_abs : 0.0)) +
                        rt * std::fabs(want_dx[i]);
            want_dg[ch] += dyv[i] * xv[i] * r * sc;
            dg_abs[ch] += std::fabs(dyv[i] * xv[i] * r * sc);
        }
    }
    report.within(what + ": y", y.download(), want_y, y_tol, "(1e-5 + rounding)·|y|");
    report.within(what + ": dx", dx.download(), want_dx, dx_tol, "1e-5·(terms) + rounding");
    // The host sums the [blocks, c] partials over blocks.
    const auto pv = part.download();
    std::vector<double> got_dg(c, 0.0), dg_tol(c);
    for (size_t b = 0; b < blocks; ++b)
        for (size_t ch = 0; ch < c; ++ch) got_dg[ch] += pv[b * c + ch];
    for (size_t ch = 0; ch < c; ++ch) dg_tol[ch] = 1e-5 * dg_abs[ch];
    report.within(what + ": dgamma (partials summed)", got_dg, want_dg, dg_tol, "1e-5·Σ|terms|");
}

// The grid-stride loops, with the grid caps lowered (see `max_blocks`): blocks take
// several pixel groups (and add to their dγ row several times; the norm's second barrier
// guards its shared memory between groups) or several grid-sized spans of elements.
template <class T>
void small_grids() {
    max_blocks = 3;
    crn_max_blocks = 2;
    max_rows = 2;
    channel_rms_norm<T>(3, 21, 45, 1e-12f, 3);
    channel_rms_norm<T>(2, 13, 7, 0.5f, 4);
    if (!kTsan) {
        conv<T>({2, 5, 7, 9, 6, 3, 3, 1, 1, 1, 1, 1, 900}, true);
        conv<T>({1, 3, 11, 10, 4, 5, 3, 2, 2, 1, 1, 0, 700}, false);
        // 13 channels × 9 input rows in one band: col2im_rows' 3 blocks of 8 rows loop.
        const Geom many_rows{1, 13, 9, 7, 3, 3, 3, 2, 1, 1, 1, 1, 1 << 20};
        conv<T>(many_rows, false);
        col2im_bands<T>(many_rows);
        col2im_bands<T>({2, 5, 7, 9, 6, 3, 3, 1, 1, 1, 1, 1, 900});
        upsample<T>(3, 37, 29);
        // Rows of 1000 input pixels: 4 blocks of columns wanted, 3 allowed.
        upsample<T>(1, 2, 1000);
    }
    max_blocks = kMaxBlocks;
    crn_max_blocks = kCrnMaxBlocks;
    max_rows = 65535;
}

template <class T>
void family() {
    // Channel RMS norm: fewer channels than rows of the block, channels not a multiple of
    // 8, pixels per plane not a multiple of 32 (groups spanning two images), clamped norms.
    channel_rms_norm<T>(1, 3, 37, 1e-12f, 2);
    channel_rms_norm<T>(3, 21, 45, 1e-12f, 3);
    channel_rms_norm<T>(2, 13, 7, 0.5f, 4);
    small_grids<T>();
    if (kTsan) return;
    // More pixel groups than the real CRN_MAX_BLOCKS.
    channel_rms_norm<T>(1, 2, kCrnMaxBlocks * kCrnPix + 45, 1e-12f, 5);

    //    batch c_in  h   w c_out kh kw  s  pt pl pb pr  max_col_elems
    const Geom geoms[] = {
        {2, 5, 7, 9, 6, 3, 3, 1, 1, 1, 1, 1, 900},     // 3x3, bands of 2 rows + a short last band
        {1, 3, 11, 10, 4, 5, 3, 2, 2, 1, 1, 0, 700},   // 5x3, stride 2, asymmetric padding, bands of 3
        {2, 7, 8, 13, 3, 3, 3, 3, 0, 2, 2, 1, 1},      // stride 3, one row per band
        {2, 9, 5, 7, 5, 1, 1, 1, 0, 0, 0, 0, 100},     // 1x1: image 0 in place, image 1 not aligned
        {1, 4, 6, 5, 3, 1, 1, 2, 1, 1, 1, 1, 1},       // 1x1, pad 1, stride 2: a band of padding only
        {1, 2, 9, 16, 3, 3, 3, 1, 1, 1, 1, 1, 18 * 16 * 4},  // bands of 4 rows: r0 = 4, 8 start aligned
        {1, 11, 4, 3, 2, 3, 3, 1, 1, 1, 1, 1, 1 << 20},      // one band for the whole image
        {1, 3, 5, 71, 2, 3, 3, 1, 1, 1, 1, 1, 27 * 71 * 2},  // rows of 71 pixels: lanes take 3 each
        {1, 2, 4, 80, 2, 3, 3, 2, 1, 1, 1, 1, 1 << 20},      // stride 2: 40 output pixels per row
        {1, 2, 30, 16, 3, 3, 3, 1, 1, 1, 1, 1, 3300},        // 11 rows fit, bands of 8 start aligned
        {1, 3, 7, 70, 2, 3, 3, 3, 1, 2, 1, 1, 1 << 20},      // stride 3, 70-pixel input rows: 32 = 3·10 + 2
        {2, 5, 6, 45, 3, 3, 3, 2, 1, 1, 1, 1, 45 * 23 * 2},  // stride 2, 45-pixel rows, bands of 2 rows
        {1, 6, 5, 37, 2, 1, 1, 2, 0, 0, 0, 0, 6 * 19},       // 1x1 stride 2: odd input pixels get no tap
    };
    for (const Geom& g : geoms) {
        conv<T>(g, true);
        conv<T>(g, false);
        col2im_bands<T>(g);
    }
    upsample<T>(5, 3, 7);
    upsample<T>(1, 1, 1);
    upsample<T>(3, 37, 29);
}

}  // namespace

int main() {
    emu::watchdog(300);
    family<float>();
    family<bf16>();
    return report.finish();
}
