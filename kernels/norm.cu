// Row normalisations: LayerNorm (optional affine), LayerNorm fused with the adaLN
// modulation of the Wan DiT, and RMSNorm; forward and backward.
//
// Math, per row r of D elements (statistics in fp32, biased variance), with the row's
// parameter group g = r / rows_per_group:
//   mean = Σx/D            (0 for RMSNorm)
//   rstd = 1/sqrt(Σ(x − mean)²/D + eps)
//   xhat = (x − mean)·rstd
//   y    = xhat·(w_offset + w[g,c]) + b[g,c]      (absent w or b count as 0)
// One formula covers the three ops: LayerNorm (w_offset 0 with a weight, 1 without),
// adaLN modulate `LN(x)·(1+scale)+shift` (w = scale, b = shift, w_offset 1, one group per
// batch element) and RMSNorm (mean 0, no b).
// Backward, with gh = dy·(w_offset + w[g,c]):
//   dx      = rstd·(gh − mean_c(gh) − xhat·mean_c(gh·xhat))   (no mean_c(gh) for RMSNorm)
//   dw[g,c] = Σ_{r∈g} dy·xhat,   db[g,c] = Σ_{r∈g} dy.
//
// Layout: x, y, dy, dx are [rows, D] in T (f32 or bf16); w, b are [groups, D] in P (f32
// or bf16, independent of T so that fp32 modulation vectors and master weights can be
// used with bf16 activations); mean and rstd are [rows] f32, saved by the forward for
// the backward.
//
// Launch: one block per row (grid-stride over rows). Thread t owns the vectors
// t, t+blockDim, ... of VEC contiguous elements (VEC = 16 bytes of T when D allows, so
// a bf16 row is read with 16-byte loads); the first CACHE of them stay in registers, so
// x is read from global memory once and y written once. Vectors past CACHE·blockDim (a
// row too long for the register cache: only odd D above 256·CACHE) are re-read on each
// pass, which is correct but slower. Blocks have at most 256 threads (launch bounds), so
// every instantiation fits the register file whatever its register count.
//
// The backward's parameter gradients are a deterministic two-stage reduction: the grid is
// (J, groups); block (j, g) handles rows j, j+J, ... of group g, accumulates dy·xhat and
// dy for its columns in registers and writes one partial row; reduce.cu's `col_finish`
// then sums the J partial rows of each group in a fixed order. No atomics, so results
// are bitwise reproducible.
#include "common.cuh"

#define NORM_MAX_THREADS 256
#define FWD_CACHE 4
#define BWD_CACHE 2
#define WARP_CACHE 8

// The per-column factor w_offset + w[c] and shift b[c] of VEC columns from column c
// (p points at the row's parameter group).
template <int VEC, typename P>
__device__ __forceinline__ void load_affine(const P* w, const P* b, int64_t c, float w_offset, float (&f)[VEC],
                                            float (&s)[VEC]) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        f[e] = w_offset;
        s[e] = 0.f;
    }
    if (w != nullptr) {
        float t[VEC];
        load_vec(w, c, t);
#pragma unroll
        for (int e = 0; e < VEC; ++e) f[e] += t[e];
    }
    if (b != nullptr) load_vec(b, c, s);
}

// o = (v - mean)·rstd·(w_offset + w) + b for VEC columns from column c.
template <int VEC, typename P>
__device__ __forceinline__ void normed(const P* w, const P* b, int64_t c, const float (&v)[VEC], float mean,
                                       float rstd, float w_offset, float (&o)[VEC]) {
    float f[VEC], s[VEC];
    load_affine(w, b, c, w_offset, f, s);
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] = (v[e] - mean) * rstd * f[e] + s[e];
}

template <int VEC, typename T, typename P>
__device__ __forceinline__ void write_normed(T* yr, const P* w, const P* b, int64_t c, const float (&v)[VEC],
                                             float mean, float rstd, float w_offset) {
    float o[VEC];
    normed(w, b, c, v, mean, rstd, w_offset, o);
    store_vec(yr, c, o);
}

// Where a forward's row ends its statistics: mean and rstd stored for the backward when
// the caller keeps them (by the one thread `leader`), and wg, bg set to the weight and
// bias rows of the row's group (null where absent).
template <typename P>
__device__ __forceinline__ void finish_row_stats(int64_t row, float mean, float rstd, bool leader,
                                                 float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                 const P* w, const P* b, int64_t rows_per_group, int d,
                                                 const P*& wg, const P*& bg) {
    if (mean_out != nullptr && leader) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
    const int64_t poff = (row / rows_per_group) * d;
    wg = w != nullptr ? w + poff : nullptr;
    bg = b != nullptr ? b + poff : nullptr;
}

template <typename T, typename P, int VEC>
__device__ void norm_fwd(const T* __restrict__ x, T* __restrict__ y, const P* __restrict__ w,
                         const P* __restrict__ b, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                         int64_t rows, int d, int64_t rows_per_group, float w_offset, float eps, int rms) {
    __shared__ float scratch[32];
    const int nvec = d / VEC;
    const int tid = threadIdx.x, bd = blockDim.x;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + row * d;
        float v[FWD_CACHE][VEC];
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < FWD_CACHE; ++k) {
            const int i = tid + k * bd;
            if (i < nvec) {
                load_vec(xr, (int64_t)i * VEC, v[k]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) s += v[k][e];
            }
        }
        for (int i = tid + FWD_CACHE * bd; i < nvec; i += bd) {
            float t[VEC];
            load_vec(xr, (int64_t)i * VEC, t);
#pragma unroll
            for (int e = 0; e < VEC; ++e) s += t[e];
        }
        // `rms` is uniform over the grid, so either every thread reaches block_sum or none.
        const float mean = rms ? 0.f : block_sum(s, scratch) / (float)d;

        // Second pass over the centred values (not E[x²] − mean², which cancels badly
        // when |mean| ≫ std).
        float s2 = 0.f;
#pragma unroll
        for (int k = 0; k < FWD_CACHE; ++k) {
            const int i = tid + k * bd;
            if (i < nvec) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float c = v[k][e] - mean;
                    s2 += c * c;
                }
            }
        }
        for (int i = tid + FWD_CACHE * bd; i < nvec; i += bd) {
            float t[VEC];
            load_vec(xr, (int64_t)i * VEC, t);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float c = t[e] - mean;
                s2 += c * c;
            }
        }
        const float rstd = rsqrtf(block_sum(s2, scratch) / (float)d + eps);
        const P *wg, *bg;
        finish_row_stats(row, mean, rstd, tid == 0, mean_out, rstd_out, w, b, rows_per_group, d, wg, bg);
        T* yr = y + row * d;
#pragma unroll
        for (int k = 0; k < FWD_CACHE; ++k) {
            const int i = tid + k * bd;
            if (i < nvec) write_normed(yr, wg, bg, (int64_t)i * VEC, v[k], mean, rstd, w_offset);
        }
        for (int i = tid + FWD_CACHE * bd; i < nvec; i += bd) {
            float t[VEC];
            load_vec(xr, (int64_t)i * VEC, t);
            write_normed(yr, wg, bg, (int64_t)i * VEC, t, mean, rstd, w_offset);
        }
    }
}

// The same forward with one warp per row (norm_fwd_warp_*): a block of W warps handles
// rows blockIdx.x·W + w, then strides by gridDim.x·W. Lane l holds the row's vectors l,
// l + 32, ... (at most WARP_CACHE: rows of up to 32·WARP_CACHE vectors, checked by the
// launcher) in registers; the sums are warp shuffles, with no shared memory and no block
// barrier, so a block's rows proceed independently and many are in flight per SM.
//
// With ROPE (norm_rope_fwd_warp_*: Wan's q/k RMSNorm followed by RoPE, one pass): the
// row is token n = row % tokens of a [B, N, H·Dh] tensor, and each normalised pair of
// columns (2j', 2j'+1) of a head, j = (column % head_dim) / 2, is rotated by the angle
// whose cos and sin are cos_t / sin_t [N, head_dim/2] at (n, j), as in rope.cu. VEC is
// even, so a pair never straddles two vectors.
template <typename T, typename P, int VEC, bool ROPE = false>
__device__ void norm_fwd_warp(const T* __restrict__ x, T* __restrict__ y, const P* __restrict__ w,
                              const P* __restrict__ b, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                              int64_t rows, int d, int64_t rows_per_group, float w_offset, float eps, int rms,
                              const float* __restrict__ cos_t = nullptr, const float* __restrict__ sin_t = nullptr,
                              int64_t tokens = 1, int head_dim = 2) {
    static_assert(!ROPE || VEC % 2 == 0, "RoPE pairs must not straddle vectors");
    const int nvec = d / VEC;
    const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    for (int64_t row = (int64_t)blockIdx.x * wpb + (threadIdx.x >> 5); row < rows; row += (int64_t)gridDim.x * wpb) {
        const T* xr = x + row * d;
        float v[WARP_CACHE][VEC];
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < WARP_CACHE; ++k) {
            const int i = lane + 32 * k;
            if (i < nvec) {
                load_vec(xr, (int64_t)i * VEC, v[k]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) s += v[k][e];
            }
        }
        const float mean = rms ? 0.f : warp_sum(s) / (float)d;
        float s2 = 0.f;
#pragma unroll
        for (int k = 0; k < WARP_CACHE; ++k) {
            if (lane + 32 * k < nvec) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float c = v[k][e] - mean;
                    s2 += c * c;
                }
            }
        }
        const float rstd = rsqrtf(warp_sum(s2) / (float)d + eps);
        const P *wg, *bg;
        finish_row_stats(row, mean, rstd, lane == 0, mean_out, rstd_out, w, b, rows_per_group, d, wg, bg);
        T* yr = y + row * d;
        const int64_t table_row = ROPE ? (row % tokens) * (head_dim / 2) : 0;
#pragma unroll
        for (int k = 0; k < WARP_CACHE; ++k) {
            const int i = lane + 32 * k;
            if (i >= nvec) continue;
            if constexpr (ROPE) {
                float o[VEC];
                normed(wg, bg, (int64_t)i * VEC, v[k], mean, rstd, w_offset, o);
                const int j0 = (i * VEC) % head_dim / 2;
#pragma unroll
                for (int p = 0; p < VEC / 2; ++p) {
                    const float a = o[2 * p], bb = o[2 * p + 1];
                    const float c = cos_t[table_row + j0 + p], sn = sin_t[table_row + j0 + p];
                    o[2 * p] = a * c - bb * sn;
                    o[2 * p + 1] = a * sn + bb * c;
                }
                store_vec(yr, (int64_t)i * VEC, o);
            } else {
                write_normed(yr, wg, bg, (int64_t)i * VEC, v[k], mean, rstd, w_offset);
            }
        }
    }
}

// One row's backward quantities for VEC columns from c: xhat, gh = dy·factor, and dy.
template <int VEC, typename T, typename P>
__device__ __forceinline__ void bwd_load(const T* xr, const T* gr, const P* wg, int64_t c, float mu, float rs,
                                         float w_offset, float (&xh)[VEC], float (&gh)[VEC], float (&dyv)[VEC]) {
    float f[VEC], unused[VEC];
    load_vec(xr, c, xh);
    load_vec(gr, c, dyv);
    load_affine<VEC, P>(wg, nullptr, c, w_offset, f, unused);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        xh[e] = (xh[e] - mu) * rs;
        gh[e] = dyv[e] * f[e];
    }
}

template <typename T, typename P, int VEC>
__device__ void norm_bwd(const T* __restrict__ x, const T* __restrict__ dy, const P* __restrict__ w,
                         const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                         float* __restrict__ part_w, float* __restrict__ part_b, int64_t rows_per_group, int d,
                         float w_offset, int rms) {
    __shared__ float scratch[32];
    const int nvec = d / VEC;
    const int tid = threadIdx.x, bd = blockDim.x;
    const int64_t g = blockIdx.y, nblk = gridDim.x;
    const P* wg = w != nullptr ? w + g * d : nullptr;
    // This block's partial rows: part[(g·J + j)·D + c], owned by this block alone.
    const int64_t part_off = (g * nblk + blockIdx.x) * d;

    float aw[BWD_CACHE][VEC], ab[BWD_CACHE][VEC];
#pragma unroll
    for (int k = 0; k < BWD_CACHE; ++k)
#pragma unroll
        for (int e = 0; e < VEC; ++e) aw[k][e] = ab[k][e] = 0.f;
    // Columns past the register cache accumulate in place in the partial rows; each is
    // touched only by its owning thread, so no synchronisation is needed.
    for (int i = tid + BWD_CACHE * bd; i < nvec; i += bd)
        for (int e = 0; e < VEC; ++e) {
            if (part_w != nullptr) part_w[part_off + (int64_t)i * VEC + e] = 0.f;
            if (part_b != nullptr) part_b[part_off + (int64_t)i * VEC + e] = 0.f;
        }

    for (int64_t rl = blockIdx.x; rl < rows_per_group; rl += nblk) {
        const int64_t row = g * rows_per_group + rl;
        const float mu = mean[row], rs = rstd[row];
        const T* xr = x + row * d;
        const T* gr = dy + row * d;
        float xh[BWD_CACHE][VEC], gh[BWD_CACHE][VEC];
        float s_g = 0.f, s_gx = 0.f;
#pragma unroll
        for (int k = 0; k < BWD_CACHE; ++k) {
            const int i = tid + k * bd;
            if (i < nvec) {
                float dyv[VEC];
                bwd_load(xr, gr, wg, (int64_t)i * VEC, mu, rs, w_offset, xh[k], gh[k], dyv);
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    s_g += gh[k][e];
                    s_gx += gh[k][e] * xh[k][e];
                    aw[k][e] += dyv[e] * xh[k][e];
                    ab[k][e] += dyv[e];
                }
            }
        }
        for (int i = tid + BWD_CACHE * bd; i < nvec; i += bd) {
            float txh[VEC], tgh[VEC], dyv[VEC];
            const int64_t c = (int64_t)i * VEC;
            bwd_load(xr, gr, wg, c, mu, rs, w_offset, txh, tgh, dyv);
            for (int e = 0; e < VEC; ++e) {
                s_g += tgh[e];
                s_gx += tgh[e] * txh[e];
                if (part_w != nullptr) part_w[part_off + c + e] += dyv[e] * txh[e];
                if (part_b != nullptr) part_b[part_off + c + e] += dyv[e];
            }
        }
        // Uniform branches: every thread of the block takes the same path.
        const float mg = rms ? 0.f : block_sum(s_g, scratch) / (float)d;
        const float mgx = block_sum(s_gx, scratch) / (float)d;
        if (dx != nullptr) {
            T* dxr = dx + row * d;
#pragma unroll
            for (int k = 0; k < BWD_CACHE; ++k) {
                const int i = tid + k * bd;
                if (i < nvec) {
                    float o[VEC];
#pragma unroll
                    for (int e = 0; e < VEC; ++e) o[e] = rs * (gh[k][e] - mg - xh[k][e] * mgx);
                    store_vec(dxr, (int64_t)i * VEC, o);
                }
            }
            for (int i = tid + BWD_CACHE * bd; i < nvec; i += bd) {
                float txh[VEC], tgh[VEC], dyv[VEC], o[VEC];
                const int64_t c = (int64_t)i * VEC;
                bwd_load(xr, gr, wg, c, mu, rs, w_offset, txh, tgh, dyv);
#pragma unroll
                for (int e = 0; e < VEC; ++e) o[e] = rs * (tgh[e] - mg - txh[e] * mgx);
                store_vec(dxr, c, o);
            }
        }
    }

#pragma unroll
    for (int k = 0; k < BWD_CACHE; ++k) {
        const int i = tid + k * bd;
        if (i < nvec) {
            const int64_t c = part_off + (int64_t)i * VEC;
            if (part_w != nullptr) store_vec(part_w, c, aw[k]);
            if (part_b != nullptr) store_vec(part_b, c, ab[k]);
        }
    }
}

#define NORM_ENTRIES(TN, T, PN, P, VN, VEC)                                                                      \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS)                                               \
        norm_fwd_##TN##_##PN##_##VN(const T* x, T* y, const P* w, const P* b, float* mean_out, float* rstd_out, \
                                    int64_t rows, int d, int64_t rows_per_group, float w_offset, float eps,      \
                                    int rms) {                                                                   \
        norm_fwd<T, P, VEC>(x, y, w, b, mean_out, rstd_out, rows, d, rows_per_group, w_offset, eps, rms);       \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS)                                               \
        norm_fwd_warp_##TN##_##PN##_##VN(const T* x, T* y, const P* w, const P* b, float* mean_out,             \
                                         float* rstd_out, int64_t rows, int d, int64_t rows_per_group,          \
                                         float w_offset, float eps, int rms) {                                  \
        norm_fwd_warp<T, P, VEC>(x, y, w, b, mean_out, rstd_out, rows, d, rows_per_group, w_offset, eps, rms);  \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS)                                               \
        norm_bwd_##TN##_##PN##_##VN(const T* x, const T* dy, const P* w, const float* mean, const float* rstd,  \
                                    T* dx, float* part_w, float* part_b, int64_t rows_per_group, int d,          \
                                    float w_offset, int rms) {                                                   \
        norm_bwd<T, P, VEC>(x, dy, w, mean, rstd, dx, part_w, part_b, rows_per_group, d, w_offset, rms);        \
    }

// RMSNorm + RoPE, vector walk only (pairs inside one vector; head_dim a multiple of VEC).
#define NORM_ROPE_ENTRY(TN, T, PN, P, VEC)                                                                      \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS)                                               \
        norm_rope_fwd_warp_##TN##_##PN##_vec(const T* x, T* y, const P* w, float* mean_out, float* rstd_out,    \
                                             int64_t rows, int d, float eps, const float* cos_t,                \
                                             const float* sin_t, int64_t tokens, int head_dim) {                \
        norm_fwd_warp<T, P, VEC, true>(x, y, w, nullptr, mean_out, rstd_out, rows, d, rows, 0.f, eps, 1, cos_t,  \
                                       sin_t, tokens, head_dim);                                                 \
    }
NORM_ROPE_ENTRY(f32, float, f32, float, 4)
NORM_ROPE_ENTRY(bf16, bf16, f32, float, 8)
NORM_ROPE_ENTRY(bf16, bf16, bf16, bf16, 8)

// `vec`: 16 bytes of T per vector (8 bf16 or 4 f32), used when D is a multiple of that.
NORM_ENTRIES(f32, float, f32, float, v1, 1)
NORM_ENTRIES(f32, float, f32, float, vec, 4)
NORM_ENTRIES(f32, float, bf16, bf16, v1, 1)
NORM_ENTRIES(f32, float, bf16, bf16, vec, 4)
NORM_ENTRIES(bf16, bf16, f32, float, v1, 1)
NORM_ENTRIES(bf16, bf16, f32, float, vec, 8)
NORM_ENTRIES(bf16, bf16, bf16, bf16, v1, 1)
NORM_ENTRIES(bf16, bf16, bf16, bf16, vec, 8)
