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
// are bitwise reproducible. The opt-in warp backward (below norm_bwd) splits the work in
// two kernels instead: dx with one warp per row, and the parameter gradients as a column
// reduction over each group's rows into partial rows, finished by the same col_finish.
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

// ---- The one-warp-per-row backward (SYNTHOS_CUDA_NORM=warp), in two kernels: dx by rows,
// then the parameter gradients by columns. Both take only the 16-byte vector walk (VEC
// elements of T are one uint4) and rows of at most 32·WARP_CACHE vectors, the rows the
// warp forward takes; the launcher sends every other row to norm_bwd.

// One 16-byte vector of T at p[i] as it is stored (p + i 16-byte aligned).
template <typename T>
__device__ __forceinline__ uint4 load_raw(const T* p, int64_t i) {
    return *reinterpret_cast<const uint4*>(p + i);
}

// The VEC values of T packed in one 16-byte vector, as fp32.
template <int VEC, typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&v)[VEC]) {
    static_assert(VEC * sizeof(T) == 16, "one vector is 16 bytes of T");
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = load(e, k);
}

// bwd_load from raw vectors of x and dy: xhat and gh = dy·(w_offset + w) for VEC columns
// from c.
template <int VEC, typename T, typename P>
__device__ __forceinline__ void bwd_terms(const uint4& xraw, const uint4& graw, const P* wg, int64_t c, float mu,
                                          float rs, float w_offset, float (&xh)[VEC], float (&gh)[VEC]) {
    float f[VEC], unused[VEC];
    unpack<VEC, T>(xraw, xh);
    unpack<VEC, T>(graw, gh);
    load_affine<VEC, P>(wg, nullptr, c, w_offset, f, unused);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        xh[e] = (xh[e] - mu) * rs;
        gh[e] *= f[e];
    }
}

// dx with one warp per row (norm_bwd_dx_warp_*): the warp forward's layout (blocks of W
// warps, rows blockIdx.x·W + w, striding by gridDim.x·W; lane l owns vectors l, l + 32,
// ...). The lane keeps its vectors of x and dy as loaded (16-byte words, not fp32), so
// the row costs the registers of the forward's cache; pass 1 sums gh and gh·xhat (warp
// shuffles), pass 2 recomputes xhat and gh from the words and stores dx. No shared
// memory, no block barrier.
template <typename T, typename P, int VEC>
__device__ void norm_bwd_dx_warp(const T* __restrict__ x, const T* __restrict__ dy, const P* __restrict__ w,
                                 const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                                 int64_t rows, int d, int64_t rows_per_group, float w_offset, int rms) {
    const int nvec = d / VEC;
    const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    for (int64_t row = (int64_t)blockIdx.x * wpb + (threadIdx.x >> 5); row < rows; row += (int64_t)gridDim.x * wpb) {
        const int64_t off = row * d;
        const float mu = mean[row], rs = rstd[row];
        const P* wg = w != nullptr ? w + (row / rows_per_group) * d : nullptr;
        uint4 xv[WARP_CACHE], gv[WARP_CACHE];
#pragma unroll
        for (int k = 0; k < WARP_CACHE; ++k) {
            const int i = lane + 32 * k;
            if (i < nvec) {
                xv[k] = load_raw(x, off + (int64_t)i * VEC);
                gv[k] = load_raw(dy, off + (int64_t)i * VEC);
            }
        }
        float s_g = 0.f, s_gx = 0.f;
#pragma unroll
        for (int k = 0; k < WARP_CACHE; ++k) {
            const int i = lane + 32 * k;
            if (i < nvec) {
                float xh[VEC], gh[VEC];
                bwd_terms<VEC, T>(xv[k], gv[k], wg, (int64_t)i * VEC, mu, rs, w_offset, xh, gh);
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    s_g += gh[e];
                    s_gx += gh[e] * xh[e];
                }
            }
        }
        // `rms` is uniform over the grid and a warp's lanes share the row: every lane of
        // the warp reaches each shuffle.
        const float mg = rms ? 0.f : warp_sum(s_g) / (float)d;
        const float mgx = warp_sum(s_gx) / (float)d;
        T* dxr = dx + off;
#pragma unroll
        for (int k = 0; k < WARP_CACHE; ++k) {
            const int i = lane + 32 * k;
            if (i < nvec) {
                float xh[VEC], gh[VEC], o[VEC];
                bwd_terms<VEC, T>(xv[k], gv[k], wg, (int64_t)i * VEC, mu, rs, w_offset, xh, gh);
#pragma unroll
                for (int e = 0; e < VEC; ++e) o[e] = rs * (gh[e] - mg - xh[e] * mgx);
                store_vec(dxr, (int64_t)i * VEC, o);
            }
        }
    }
}

// Rows of threads of a norm_param_grad block (blockDim = (32, PGRAD_ROWS)).
#define PGRAD_ROWS 8

// aw += dy·(x − mu)·rs and ab += dy for the VEC columns of one row's raw vectors.
template <int VEC, typename T>
__device__ __forceinline__ void add_param_grads(const uint4& xraw, const uint4& graw, float mu, float rs,
                                                float (&aw)[VEC], float (&ab)[VEC]) {
    float xv[VEC], gv[VEC];
    unpack<VEC, T>(xraw, xv);
    unpack<VEC, T>(graw, gv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        aw[e] += gv[e] * ((xv[e] - mu) * rs);
        ab[e] += gv[e];
    }
}

// The parameter gradients' partial rows (norm_param_grad_*), a column reduction over each
// group's rows shaped like reduce.cu's col_partial_vec: block (t, s, g), 32 × PGRAD_ROWS
// threads, covers the 32·VEC columns of tile t over split s of group g, i.e. the group's
// rows [s·chunk, min((s + 1)·chunk, rows_per_group)); thread (l, y) owns the 16-byte
// vector of columns c = (32t + l)·VEC and takes the split's rows y, y + PGRAD_ROWS, ...,
// four rows' loads in flight before their adds (which keep the row order), accumulating
// Σ dy·xhat and Σ dy in fp32. One shared-memory step then adds the PGRAD_ROWS rows of
// threads in order and the block writes part[(g·splits + s)·d + c] (both buffers, where
// present), which reduce.cu's col_finish sums over s. The split depends only on the sizes
// (the launcher's `param_grad_splits`), so results are bitwise reproducible.
template <typename T, int VEC>
__device__ void norm_param_grad(const T* __restrict__ x, const T* __restrict__ dy, const float* __restrict__ mean,
                                const float* __restrict__ rstd, float* __restrict__ part_w,
                                float* __restrict__ part_b, int64_t rows_per_group, int d, int64_t splits,
                                int64_t chunk) {
    constexpr int COLS = 32 * VEC;
    __shared__ float tile[PGRAD_ROWS][COLS];
    const int64_t g = blockIdx.z, s = blockIdx.y;
    const int64_t c0 = (int64_t)blockIdx.x * COLS;
    const int64_t c = c0 + (int64_t)threadIdx.x * VEC;
    const int64_t base = g * rows_per_group;
    const int64_t r1 = base + (s * chunk + chunk < rows_per_group ? s * chunk + chunk : rows_per_group);
    float aw[VEC], ab[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) aw[e] = ab[e] = 0.f;
    if (c < d) {
        int64_t r = base + s * chunk + threadIdx.y;
        for (; r + 3 * PGRAD_ROWS < r1; r += 4 * PGRAD_ROWS) {
            uint4 xv[4], gv[4];
            float mu[4], rs[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int64_t rq = r + q * PGRAD_ROWS;
                xv[q] = load_raw(x, rq * d + c);
                gv[q] = load_raw(dy, rq * d + c);
                mu[q] = mean[rq];
                rs[q] = rstd[rq];
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) add_param_grads<VEC, T>(xv[q], gv[q], mu[q], rs[q], aw, ab);
        }
        for (; r < r1; r += PGRAD_ROWS)
            add_param_grads<VEC, T>(load_raw(x, r * d + c), load_raw(dy, r * d + c), mean[r], rstd[r], aw, ab);
    }
    // Thread j finishes column c0 + j of the tile (COLS ≤ 256 threads), for each buffer.
    const int j = threadIdx.y * 32 + threadIdx.x;
    float* const parts[2] = {part_w, part_b};
#pragma unroll
    for (int p = 0; p < 2; ++p) {
        float* part = parts[p];
        if (part == nullptr) continue;  // uniform over the grid: the block skips it together
        __syncthreads();  // the previous buffer's reads of the tile are done
#pragma unroll
        for (int e = 0; e < VEC; ++e) tile[threadIdx.y][threadIdx.x * VEC + e] = p == 0 ? aw[e] : ab[e];
        __syncthreads();
        if (j < COLS && c0 + j < d) {
            float sum = 0.f;
#pragma unroll
            for (int k = 0; k < PGRAD_ROWS; ++k) sum += tile[k][j];
            part[(g * splits + s) * d + c0 + j] = sum;
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

// The warp backward, vector walk only: dx by warps and the parameter-gradient partials. The
// partials do not read the parameters; P only names the entry point after the pair, as
// for the other norm kernels (the launcher's `norm_kernel`).
#define NORM_WARP_BWD_ENTRIES(TN, T, PN, P, VEC)                                                                \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS)                                               \
        norm_bwd_dx_warp_##TN##_##PN##_vec(const T* x, const T* dy, const P* w, const float* mean,              \
                                           const float* rstd, T* dx, int64_t rows, int d, int64_t rows_per_group, \
                                           float w_offset, int rms) {                                           \
        norm_bwd_dx_warp<T, P, VEC>(x, dy, w, mean, rstd, dx, rows, d, rows_per_group, w_offset, rms);          \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS)                                               \
        norm_param_grad_##TN##_##PN##_vec(const T* x, const T* dy, const float* mean, const float* rstd,        \
                                          float* part_w, float* part_b, int64_t rows_per_group, int d,          \
                                          int64_t splits, int64_t chunk) {                                      \
        norm_param_grad<T, VEC>(x, dy, mean, rstd, part_w, part_b, rows_per_group, d, splits, chunk);           \
    }
NORM_WARP_BWD_ENTRIES(f32, float, f32, float, 4)
NORM_WARP_BWD_ENTRIES(f32, float, bf16, bf16, 4)
NORM_WARP_BWD_ENTRIES(bf16, bf16, f32, float, 8)
NORM_WARP_BWD_ENTRIES(bf16, bf16, bf16, bf16, 8)

// `vec`: 16 bytes of T per vector (8 bf16 or 4 f32), used when D is a multiple of that.
NORM_ENTRIES(f32, float, f32, float, v1, 1)
NORM_ENTRIES(f32, float, f32, float, vec, 4)
NORM_ENTRIES(f32, float, bf16, bf16, v1, 1)
NORM_ENTRIES(f32, float, bf16, bf16, vec, 4)
NORM_ENTRIES(bf16, bf16, f32, float, v1, 1)
NORM_ENTRIES(bf16, bf16, f32, float, vec, 8)
NORM_ENTRIES(bf16, bf16, bf16, bf16, v1, 1)
NORM_ENTRIES(bf16, bf16, bf16, bf16, vec, 8)
