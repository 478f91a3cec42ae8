// Kernels of convolutional image models (the Wan VAE): the data movement around the
// im2col + cuBLASLt convolution, nearest 2x upsampling, the channel RMS norm.
//
// Convolution (the GEMMs run in cuBLASLt; these kernels feed and drain them). Layout
// [B, C, H, W]; one image and one band of output rows [r0, r0 + rows) at a time, so the
// column matrix has K = C·kh·kw rows and npix = rows·w_out columns:
//   im2col:   cols[(c·kh + ky)·kw + kx, (oy − r0)·w_out + ox]
//                 = x[c, oy·s − pad_top + ky, ox·s − pad_left + kx]   (0 in the padding)
//             (one thread per element; im2col_rows, opt-in, one warp per row segment)
//   col2im:   dx[c, iy, ix] += Σ_{ky,kx} dcols[(c·kh+ky)·kw+kx, (oy − r0)·w_out + ox]
//             over the taps with oy·s = iy + pad_top − ky, ox·s = ix + pad_left − kx
//             that land in the band. A gather (one thread per input pixel) rather than a
//             scatter, so there are no atomics and the sum order is fixed; bands run one
//             after another on the stream, so the read-modify-write of a pixel shared by
//             two bands is race-free. (col2im_rows, opt-in, one warp per input row.)
//   rows_copy[_bias]: dst[dst_off + r·dst_ld + c] = src[src_off + r·src_ld + c] (+ bias[r]),
//             a strided [rows, cols] copy between a band-sized buffer and its place in
//             the [O, H·W] output (cuBLASLt gets only 256-byte-aligned pointers, so a band
//             whose start is not aligned goes through a scratch buffer).
//   rows_bias_add: the bias of a GEMM that wrote its output in place.
//   accumulate_f32: acc += x, the weight gradient summed over bands in fp32.
// Launch: 1-D grids of 256 threads, grid-stride; consecutive threads on consecutive
// columns / pixels, so stores are coalesced (and loads too for stride 1).
//
// Upsample: out[p, y, x] = x[p, y/2, x/2] over planes p; its backward sums each 2x2 block.
// One thread per output (forward) or input (backward) element; the opt-in *_by_rows forms
// take one row per grid row.
//
// Channel RMS norm (Wan's RMS_norm, F.normalize over the channel dimension), x viewed as
// [B, C, S] with S pixels per plane; per pixel, over its C channels (stride S):
//   r = 1 / max(‖x‖₂, eps),  y_c = x_c·r·scale·γ_c     (scale = √C, γ in fp32)
// Backward, with dot = Σ_c γ_c·dy_c·x_c:
//   dx_c = scale·r·(γ_c·dy_c − x_c·r²·dot)   (no second term where the norm is clamped)
//   dγ_c = Σ_pixels dy_c·x_c·r·scale
// Launch: blocks of 32×8 threads; a block takes 32 consecutive pixels (threadIdx.x, so
// every channel plane is read with coalesced 32-element runs) and splits the channels
// over the 8 rows (threadIdx.y = c mod 8); per-pixel sums meet in shared memory. Blocks
// grid-stride over pixel groups. The backward leaves one partial dγ row per block
// (each warp is one threadIdx.y row and sums its 32 pixels with shuffles; each (block,
// channel) entry has a single writer), which the host sums over blocks: deterministic,
// no atomics.
//
// Clamp: y = min(max(x, lo), hi); backward passes g where lo ≤ x ≤ hi (PyTorch's rule).
#include "common.cuh"

// Mirrors `cuda::conv::ConvDesc`.
struct ConvDesc {
    int64_t c_in, h, w, kh, kw, stride, pad_top, pad_left, h_out, w_out;
};

#define GRID_STRIDE(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

template <typename T>
__device__ void im2col_impl(const T* x, int64_t x_off, T* cols, ConvDesc g, int64_t r0, int64_t rows) {
    const int64_t npix = rows * g.w_out;
    const int64_t n = g.c_in * g.kh * g.kw * npix;
    GRID_STRIDE(i, n) {
        const int64_t p = i % npix, k = i / npix;
        const int64_t kx = k % g.kw, ky = (k / g.kw) % g.kh, c = k / (g.kw * g.kh);
        const int64_t oy = r0 + p / g.w_out, ox = p % g.w_out;
        const int64_t iy = oy * g.stride - g.pad_top + ky, ix = ox * g.stride - g.pad_left + kx;
        float v = 0.f;
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) v = load(x, x_off + (c * g.h + iy) * g.w + ix);
        store(cols, i, v);
    }
}

// im2col by rows (opt-in: SYNTHOS_CUDA_IM2COL=rows): the same column matrix, bit for bit,
// written one row segment at a time. A warp takes one (k, output row) pair: the segment
// of cols row k = (c, ky, kx) that holds the w_out pixels of output row oy. The index
// arithmetic (five divisions) is done once per pair instead of once per element, and
// lane l copies pixels l, l + 32, …, so consecutive lanes read consecutive input pixels
// (stride 1) and write consecutive columns. Blocks of 32×8 threads (8 pairs), grid-stride
// over pairs.
template <typename T>
__device__ void im2col_rows_impl(const T* x, int64_t x_off, T* cols, ConvDesc g, int64_t r0, int64_t rows) {
    const int64_t npix = rows * g.w_out;
    const int64_t pairs = g.c_in * g.kh * g.kw * rows;
    for (int64_t q = blockIdx.x * (int64_t)blockDim.y + threadIdx.y; q < pairs;
         q += (int64_t)gridDim.x * blockDim.y) {
        const int64_t k = q / rows, oyr = q - k * rows;
        const int64_t kx = k % g.kw, t = k / g.kw;
        const int64_t ky = t % g.kh, c = t / g.kh;
        const int64_t iy = (r0 + oyr) * g.stride - g.pad_top + ky;
        T* dst = cols + k * npix + oyr * g.w_out;
        if (iy < 0 || iy >= g.h) {
            for (int64_t ox = threadIdx.x; ox < g.w_out; ox += 32) store(dst, ox, 0.f);
            continue;
        }
        const T* src = x + x_off + (c * g.h + iy) * g.w;
        const int64_t shift = kx - g.pad_left;
        for (int64_t ox = threadIdx.x; ox < g.w_out; ox += 32) {
            const int64_t ix = ox * g.stride + shift;
            store(dst, ox, (ix >= 0 && ix < g.w) ? load(src, ix) : 0.f);
        }
    }
}

// Input rows [iy0, iy1) of image at dx_off receive the taps of output rows [r0, r0+rows).
template <typename T>
__device__ void col2im_impl(const T* dcols, T* dx, int64_t dx_off, ConvDesc g, int64_t r0, int64_t rows,
                            int64_t iy0, int64_t iy1) {
    const int64_t npix = rows * g.w_out;
    const int64_t nrows = iy1 - iy0;
    const int64_t n = g.c_in * nrows * g.w;
    GRID_STRIDE(i, n) {
        const int64_t ix = i % g.w, t = i / g.w;
        const int64_t iy = iy0 + t % nrows, c = t / nrows;
        float acc = 0.f;
        for (int64_t ky = 0; ky < g.kh; ++ky) {
            const int64_t ny = iy + g.pad_top - ky;
            if (ny < 0 || ny % g.stride != 0) continue;
            const int64_t oy = ny / g.stride;
            if (oy < r0 || oy >= r0 + rows) continue;
            for (int64_t kx = 0; kx < g.kw; ++kx) {
                const int64_t nx = ix + g.pad_left - kx;
                if (nx < 0 || nx % g.stride != 0) continue;
                const int64_t ox = nx / g.stride;
                if (ox >= g.w_out) continue;
                acc += load(dcols, ((c * g.kh + ky) * g.kw + kx) * npix + (oy - r0) * g.w_out + ox);
            }
        }
        const int64_t o = dx_off + (c * g.h + iy) * g.w + ix;
        store(dx, o, load(dx, o) + acc);
    }
}

// col2im by rows (opt-in: SYNTHOS_CUDA_IM2COL=rows): the same dx, bit for bit. A warp takes
// one input row (c, iy) of the band's rows [iy0, iy1), lane l its pixels l, l + 32, …
// A tap contributes where iy + pad_top − ky is a non-negative multiple of the stride s:
// with iy + pad_top = qy·s + ry those are ky = ry + j·s, for output row oy = qy − j, and
// the j whose oy falls in the band are a contiguous run. So the rows' taps follow from
// one division per row, and the columns' likewise from ix + pad_left = qx·s + rx: lane l
// divides once for its first pixel and steps (qx, rx) by 32 pixels with an add and a
// compare. Both loops run ky and kx upwards and leave out only taps that col2im_impl
// skips, so every pixel adds the same terms in the same order, from the same 0.f, and
// adds its sum to dx last, as there. Consecutive lanes read and write consecutive dx
// pixels (and consecutive dcols columns for stride 1). Blocks of 32×8 threads (8 rows),
// grid-stride over rows.
template <typename T>
__device__ void col2im_rows_impl(const T* dcols, T* dx, int64_t dx_off, ConvDesc g, int64_t r0, int64_t rows,
                                 int64_t iy0, int64_t iy1) {
    const int64_t npix = rows * g.w_out;
    const int64_t nrows = iy1 - iy0;
    const int64_t n = g.c_in * nrows;
    const int64_t s = g.stride;
    // The lane's first pixel and the lanes' step of 32 pixels, as quotient and remainder.
    const int64_t u0 = threadIdx.x + g.pad_left;
    const int64_t qx0 = u0 / s, rx0 = u0 - qx0 * s;
    const int64_t dq = 32 / s, dr = 32 - dq * s;
    for (int64_t q = blockIdx.x * (int64_t)blockDim.y + threadIdx.y; q < n; q += (int64_t)gridDim.x * blockDim.y) {
        const int64_t c = q / nrows, iy = iy0 + (q - c * nrows);
        const int64_t uy = iy + g.pad_top;
        const int64_t qy = uy / s, ry = uy - qy * s;
        // The first tap whose output row is inside the band (oy ≤ r0 + rows − 1); the
        // loops below stop at ky = kh or at oy = r0 − 1.
        const int64_t jy = qy - (r0 + rows - 1) > 0 ? qy - (r0 + rows - 1) : 0;
        const int64_t ky0 = ry + jy * s, oy0 = qy - jy;
        // Tap (ky, kx) of channel c is row (c·kh + ky)·kw + kx of dcols; output pixel
        // (oy, ox) its column (oy − r0)·w_out + ox.
        const T* taps = dcols + c * g.kh * g.kw * npix;
        T* d = dx + dx_off + (c * g.h + iy) * g.w;
        int64_t qx = qx0, rx = rx0;
        for (int64_t ix = threadIdx.x; ix < g.w; ix += 32) {
            // Likewise along the row: the first kx with ox ≤ w_out − 1; stop at kw or ox = −1.
            const int64_t jx = qx - (g.w_out - 1) > 0 ? qx - (g.w_out - 1) : 0;
            const int64_t kx0 = rx + jx * s, ox0 = qx - jx;
            float acc = 0.f;
            for (int64_t ky = ky0, oy = oy0; ky < g.kh && oy >= r0; ky += s, --oy) {
                const T* row = taps + ky * g.kw * npix + (oy - r0) * g.w_out;
                for (int64_t kx = kx0, ox = ox0; kx < g.kw && ox >= 0; kx += s, --ox) acc += load(row, kx * npix + ox);
            }
            store(d, ix, load(d, ix) + acc);
            qx += dq;
            rx += dr;
            if (rx >= s) {
                rx -= s;
                ++qx;
            }
        }
    }
}

template <typename T, bool BIAS>
__device__ void rows_copy_impl(const T* src, int64_t src_off, int64_t src_ld, T* dst, int64_t dst_off, int64_t dst_ld,
                               int64_t rows, int64_t cols, const float* bias) {
    GRID_STRIDE(i, rows * cols) {
        const int64_t r = i / cols, c = i % cols;
        float v = load(src, src_off + r * src_ld + c);
        if (BIAS) v += bias[r];
        store(dst, dst_off + r * dst_ld + c, v);
    }
}

template <typename T>
__device__ void rows_bias_add_impl(T* dst, int64_t off, int64_t ld, int64_t rows, int64_t cols, const float* bias) {
    GRID_STRIDE(i, rows * cols) {
        const int64_t r = i / cols, c = i % cols;
        const int64_t o = off + r * ld + c;
        store(dst, o, load(dst, o) + bias[r]);
    }
}

// The same copies by rows (with SYNTHOS_CUDA_IM2COL=rows): a 2-D grid, blockIdx.y over
// rows (grid-stride) and blockIdx.x × threads over a row's columns, so there is no
// per-element division; the values are the same bit for bit.
#define FOR_ROWS(r, rows) for (int64_t r = blockIdx.y; r < (rows); r += gridDim.y)
#define FOR_ROW_COLS(c, cols) \
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < (cols); c += (int64_t)gridDim.x * blockDim.x)

template <typename T, bool BIAS>
__device__ void rows_copy_by_rows_impl(const T* src, int64_t src_off, int64_t src_ld, T* dst, int64_t dst_off,
                                       int64_t dst_ld, int64_t rows, int64_t cols, const float* bias) {
    FOR_ROWS(r, rows) {
        const T* s = src + src_off + r * src_ld;
        T* d = dst + dst_off + r * dst_ld;
        FOR_ROW_COLS(c, cols) {
            float v = load(s, c);
            if (BIAS) v += bias[r];
            store(d, c, v);
        }
    }
}

template <typename T>
__device__ void rows_bias_add_by_rows_impl(T* dst, int64_t off, int64_t ld, int64_t rows, int64_t cols,
                                           const float* bias) {
    FOR_ROWS(r, rows) {
        T* d = dst + off + r * ld;
        FOR_ROW_COLS(c, cols) store(d, c, load(d, c) + bias[r]);
    }
}

// Output row q = (p, oy) of the 2× upsampling copies input row (p, oy / 2), each input
// pixel twice.
template <typename T>
__device__ void upsample2x_by_rows_impl(const T* x, T* out, int64_t h, int64_t w, int64_t n_out) {
    const int64_t rows = n_out / (2 * w);
    FOR_ROWS(q, rows) {
        const int64_t p = q / (2 * h), oy = q - p * 2 * h;
        const T* s = x + (p * h + oy / 2) * w;
        T* d = out + q * 2 * w;
        FOR_ROW_COLS(c, 2 * w) d[c] = s[c >> 1];
    }
}

// Input row q = (p, iy) of the upsampling's backward sums the 2×2 blocks of output rows
// 2q and 2q + 1 (plane p's rows 2iy and 2iy + 1, as p·2h + 2iy = 2q): no division but the
// row count. The four terms are added in upsample2x_bwd_impl's order, so dx is the same
// bit for bit.
template <typename T>
__device__ void upsample2x_bwd_by_rows_impl(const T* g, T* dx, int64_t h, int64_t w, int64_t n_in) {
    const int64_t rows = n_in / w, w2 = 2 * w;
    FOR_ROWS(q, rows) {
        const T* s = g + q * 2 * w2;
        T* d = dx + q * w;
        FOR_ROW_COLS(c, w) {
            const int64_t o = 2 * c;
            store(d, c, load(s, o) + load(s, o + 1) + load(s, o + w2) + load(s, o + w2 + 1));
        }
    }
}

template <typename T>
__device__ void accumulate_impl(float* acc, const T* x, int64_t n) {
    GRID_STRIDE(i, n) acc[i] += load(x, i);
}

template <typename T>
__device__ void upsample2x_impl(const T* x, T* out, int64_t h, int64_t w, int64_t n_out) {
    const int64_t h2 = 2 * h, w2 = 2 * w;
    GRID_STRIDE(i, n_out) {
        const int64_t ox = i % w2, t = i / w2;
        const int64_t oy = t % h2, p = t / h2;
        out[i] = x[(p * h + oy / 2) * w + ox / 2];
    }
}

template <typename T>
__device__ void upsample2x_bwd_impl(const T* g, T* dx, int64_t h, int64_t w, int64_t n_in) {
    const int64_t w2 = 2 * w;
    GRID_STRIDE(i, n_in) {
        const int64_t ix = i % w, t = i / w;
        const int64_t iy = t % h, p = t / h;
        const int64_t o = (p * 2 * h + 2 * iy) * w2 + 2 * ix;
        store(dx, i, load(g, o) + load(g, o + 1) + load(g, o + w2) + load(g, o + w2 + 1));
    }
}

#define CRN_PIX 32
#define CRN_ROWS 8

// Pixel p of B·S lives at (p / S)·C·S + p % S; channel c is c·S further.
__device__ __forceinline__ int64_t crn_base(int64_t p, int64_t c, int64_t s) { return (p / s) * c * s + p % s; }

// Walks this block's groups of CRN_PIX pixels (grid-stride): body(valid, base) for pixel
// first + threadIdx.x of each group, base being its channel-0 offset (0 past npix). Every
// thread runs every group, so the body's barriers are reached by the whole block.
template <class Body>
__device__ __forceinline__ void crn_for_groups(int64_t npix, int64_t c, int64_t s, Body body) {
    for (int64_t first = blockIdx.x * (int64_t)CRN_PIX; first < npix; first += (int64_t)gridDim.x * CRN_PIX) {
        const int64_t p = first + threadIdx.x;
        const bool valid = p < npix;
        body(valid, valid ? crn_base(p, c, s) : 0);
    }
}

// The pixel group's N sums over channels: thread row ty holds its partials (channels ty,
// ty + CRN_ROWS, ...) of pixel tx; afterwards every thread of column tx holds the totals.
// Barriers before and after, so `part` may be rewritten by the next group.
template <int N>
__device__ __forceinline__ void crn_column_totals(float (&part)[N][CRN_ROWS][CRN_PIX + 1], float (&v)[N], int tx,
                                                  int ty) {
#pragma unroll
    for (int q = 0; q < N; ++q) part[q][ty][tx] = v[q];
    __syncthreads();
#pragma unroll
    for (int q = 0; q < N; ++q) {
        v[q] = 0.f;
#pragma unroll
        for (int k = 0; k < CRN_ROWS; ++k) v[q] += part[q][k][tx];
    }
    __syncthreads();
}

template <typename T>
__device__ void crn_fwd_impl(const T* x, const float* gamma, T* y, int64_t c, int64_t s, int64_t npix, float eps,
                             float scale) {
    __shared__ float part[1][CRN_ROWS][CRN_PIX + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    crn_for_groups(npix, c, s, [&](bool valid, int64_t base) {
        float ss[1] = {0.f};
        if (valid)
            for (int64_t ch = ty; ch < c; ch += CRN_ROWS) {
                const float v = load(x, base + ch * s);
                ss[0] += v * v;
            }
        crn_column_totals(part, ss, tx, ty);
        const float r = 1.f / fmaxf(sqrtf(ss[0]), eps);
        if (valid)
            for (int64_t ch = ty; ch < c; ch += CRN_ROWS)
                store(y, base + ch * s, load(x, base + ch * s) * r * scale * gamma[ch]);
    });
}

// dgamma_part: [gridDim.x, C] f32, zero-initialised by the host.
template <typename T>
__device__ void crn_bwd_impl(const T* x, const float* gamma, const T* dy, T* dx, float* dgamma_part, int64_t c,
                             int64_t s, int64_t npix, float eps, float scale) {
    __shared__ float part[2][CRN_ROWS][CRN_PIX + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    crn_for_groups(npix, c, s, [&](bool valid, int64_t base) {
        float sums[2] = {0.f, 0.f};  // Σ x², Σ γ·dy·x
        if (valid)
            for (int64_t ch = ty; ch < c; ch += CRN_ROWS) {
                const float xv = load(x, base + ch * s);
                sums[0] += xv * xv;
                sums[1] += gamma[ch] * load(dy, base + ch * s) * xv;
            }
        crn_column_totals(part, sums, tx, ty);
        const float norm = sqrtf(sums[0]);
        const float r = 1.f / fmaxf(norm, eps);
        const float proj = norm > eps ? r * r * sums[1] : 0.f;
        // The loop bound depends on ty only, so the whole warp (one ty row) runs it
        // together and the shuffles in warp_sum see all 32 lanes.
        for (int64_t ch = ty; ch < c; ch += CRN_ROWS) {
            float contrib = 0.f;
            if (valid) {
                const float xv = load(x, base + ch * s), gv = load(dy, base + ch * s);
                store(dx, base + ch * s, scale * r * (gamma[ch] * gv - xv * proj));
                contrib = gv * xv * r * scale;
            }
            contrib = warp_sum(contrib);
            if (tx == 0) dgamma_part[blockIdx.x * c + ch] += contrib;
        }
    });
}

#define CONV_ENTRY_POINTS(T, SFX)                                                                                     \
    extern "C" __global__ void im2col_##SFX(const T* x, int64_t x_off, T* cols, ConvDesc g, int64_t r0,             \
                                            int64_t rows) {                                                          \
        im2col_impl(x, x_off, cols, g, r0, rows);                                                                    \
    }                                                                                                                 \
    extern "C" __global__ void im2col_rows_##SFX(const T* x, int64_t x_off, T* cols, ConvDesc g, int64_t r0,        \
                                                 int64_t rows) {                                                     \
        im2col_rows_impl(x, x_off, cols, g, r0, rows);                                                               \
    }                                                                                                                 \
    extern "C" __global__ void rows_copy_by_rows_##SFX(const T* src, int64_t src_off, int64_t src_ld, T* dst,       \
                                                       int64_t dst_off, int64_t dst_ld, int64_t rows, int64_t cols) { \
        rows_copy_by_rows_impl<T, false>(src, src_off, src_ld, dst, dst_off, dst_ld, rows, cols, nullptr);           \
    }                                                                                                                 \
    extern "C" __global__ void rows_copy_bias_by_rows_##SFX(const T* src, int64_t src_off, int64_t src_ld, T* dst,  \
                                                            int64_t dst_off, int64_t dst_ld, int64_t rows,            \
                                                            int64_t cols, const float* bias) {                        \
        rows_copy_by_rows_impl<T, true>(src, src_off, src_ld, dst, dst_off, dst_ld, rows, cols, bias);               \
    }                                                                                                                 \
    extern "C" __global__ void rows_bias_add_by_rows_##SFX(T* dst, int64_t off, int64_t ld, int64_t rows,           \
                                                           int64_t cols, const float* bias) {                         \
        rows_bias_add_by_rows_impl(dst, off, ld, rows, cols, bias);                                                  \
    }                                                                                                                 \
    extern "C" __global__ void upsample2x_by_rows_##SFX(const T* x, T* out, int64_t h, int64_t w, int64_t n_out) {  \
        upsample2x_by_rows_impl(x, out, h, w, n_out);                                                                \
    }                                                                                                                 \
    extern "C" __global__ void col2im_##SFX(const T* dcols, T* dx, int64_t dx_off, ConvDesc g, int64_t r0,          \
                                            int64_t rows, int64_t iy0, int64_t iy1) {                                \
        col2im_impl(dcols, dx, dx_off, g, r0, rows, iy0, iy1);                                                       \
    }                                                                                                                 \
    extern "C" __global__ void col2im_rows_##SFX(const T* dcols, T* dx, int64_t dx_off, ConvDesc g, int64_t r0,     \
                                                 int64_t rows, int64_t iy0, int64_t iy1) {                           \
        col2im_rows_impl(dcols, dx, dx_off, g, r0, rows, iy0, iy1);                                                  \
    }                                                                                                                 \
    extern "C" __global__ void rows_copy_##SFX(const T* src, int64_t src_off, int64_t src_ld, T* dst,               \
                                               int64_t dst_off, int64_t dst_ld, int64_t rows, int64_t cols) {        \
        rows_copy_impl<T, false>(src, src_off, src_ld, dst, dst_off, dst_ld, rows, cols, nullptr);                   \
    }                                                                                                                 \
    extern "C" __global__ void rows_copy_bias_##SFX(const T* src, int64_t src_off, int64_t src_ld, T* dst,          \
                                                    int64_t dst_off, int64_t dst_ld, int64_t rows, int64_t cols,     \
                                                    const float* bias) {                                             \
        rows_copy_impl<T, true>(src, src_off, src_ld, dst, dst_off, dst_ld, rows, cols, bias);                       \
    }                                                                                                                 \
    extern "C" __global__ void rows_bias_add_##SFX(T* dst, int64_t off, int64_t ld, int64_t rows, int64_t cols,     \
                                                   const float* bias) {                                              \
        rows_bias_add_impl(dst, off, ld, rows, cols, bias);                                                          \
    }                                                                                                                 \
    extern "C" __global__ void accumulate_f32_from_##SFX(float* acc, const T* x, int64_t n) {                       \
        accumulate_impl(acc, x, n);                                                                                  \
    }                                                                                                                 \
    extern "C" __global__ void upsample2x_##SFX(const T* x, T* out, int64_t h, int64_t w, int64_t n_out) {          \
        upsample2x_impl(x, out, h, w, n_out);                                                                        \
    }                                                                                                                 \
    extern "C" __global__ void upsample2x_bwd_##SFX(const T* g, T* dx, int64_t h, int64_t w, int64_t n_in) {        \
        upsample2x_bwd_impl(g, dx, h, w, n_in);                                                                      \
    }                                                                                                                 \
    extern "C" __global__ void upsample2x_bwd_by_rows_##SFX(const T* g, T* dx, int64_t h, int64_t w,                \
                                                            int64_t n_in) {                                           \
        upsample2x_bwd_by_rows_impl(g, dx, h, w, n_in);                                                              \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(CRN_PIX * CRN_ROWS)                                                 \
        channel_rms_norm_##SFX(const T* x, const float* gamma, T* y, int64_t c, int64_t s, int64_t npix, float eps, \
                               float scale) {                                                                        \
        crn_fwd_impl(x, gamma, y, c, s, npix, eps, scale);                                                           \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(CRN_PIX * CRN_ROWS)                                                 \
        channel_rms_norm_bwd_##SFX(const T* x, const float* gamma, const T* dy, T* dx, float* dgamma_part,          \
                                   int64_t c, int64_t s, int64_t npix, float eps, float scale) {                     \
        crn_bwd_impl(x, gamma, dy, dx, dgamma_part, c, s, npix, eps, scale);                                         \
    }

CONV_ENTRY_POINTS(float, f32)
CONV_ENTRY_POINTS(bf16, bf16)
