// Reductions: sum of a tensor onto a broadcast-compatible smaller shape (the backward
// of broadcasting), sums of contiguous rows (full sums, sums over the last dimension)
// and sums over a middle dimension. fp32 accumulation everywhere.
//
// sum_to: the general case (the launcher sends the common shapes to the row and column
// sums below): one thread per output element; it walks the reduced positions (mixed-radix
// over `red_shape`) at the input strides. With the common (B,N,D) -> (B,1,D) reduction,
// consecutive threads read consecutive addresses, so reads are coalesced.
//
// Row sums (x viewed as [rows, len], out[r] = scale·Σ x[r, :]) run in two passes so that
// a full sum of tens of millions of elements uses the whole GPU and is deterministic
// (no atomics; the split depends only on the sizes):
//   row_partial: rows·bpr blocks of 256 threads; block b sums chunk b % bpr of row
//                b / bpr (a grid-stride walk over the row) into partials[b];
//   row_finish:  one 256-thread block per row adds its bpr partials, scales, stores.
// Each thread adds ~len/(bpr·256) values and the tree of warp/block sums adds the rest,
// so the rounding error grows far slower than in a serial sum.
//
// col_sum: x viewed as [outer, len, inner] with inner > 1, out[o, i] = scale·Σ_r x[o, r, i].
// A 32×8 block covers 32 consecutive i (coalesced reads) while its 8 rows of threads
// split r; one shared-memory step adds the 8 partial sums. col_partial + col_finish do
// the same in two passes with the rows also split across blocks (long columns).
#include "common.cuh"

// Mirrors `cuda::reduce::ReduceDesc`.
struct ReduceDesc {
    int32_t rank;
    int64_t keep_shape[6];
    int64_t keep_stride[6];
    int64_t red_shape[6];
    int64_t red_stride[6];
};

template <typename T>
__device__ void sum_to_impl(const T* x, T* out, ReduceDesc d, int64_t n_out, int64_t n_red) {
    for (int64_t o = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; o < n_out;
         o += (int64_t)gridDim.x * blockDim.x) {
        int64_t rem = o, base = 0;
        for (int k = d.rank - 1; k >= 0; --k) {
            base += (rem % d.keep_shape[k]) * d.keep_stride[k];
            rem /= d.keep_shape[k];
        }
        float acc = 0.f;
        for (int64_t r = 0; r < n_red; ++r) {
            int64_t rr = r, off = base;
            for (int k = d.rank - 1; k >= 0; --k) {
                off += (rr % d.red_shape[k]) * d.red_stride[k];
                rr /= d.red_shape[k];
            }
            acc += load(x, off);
        }
        store(out, o, acc);
    }
}

template <typename T>
__device__ void row_partial_impl(const T* x, float* partials, int64_t len, int64_t bpr) {
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x / bpr, chunk = blockIdx.x % bpr;
    const T* xr = x + row * len;
    float acc = 0.f;
    for (int64_t i = chunk * blockDim.x + threadIdx.x; i < len; i += bpr * blockDim.x) acc += load(xr, i);
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// One term of a sum: x[k], or the product x[k]·y[k] (in fp32) when MUL: the gate
// gradient Σ g·y summed without writing g·y first.
template <bool MUL, typename T>
__device__ __forceinline__ float term(const T* x, const T* y, int64_t k) {
    if constexpr (MUL) {
        return load(x, k) * load(y, k);
    } else {
        return load(x, k);
    }
}

// The VEC-wide terms at i: p[i..i+VEC), times q[i..i+VEC) when MUL.
template <int VEC, bool MUL, typename T>
__device__ __forceinline__ void load_terms(const T* p, const T* q, int64_t i, float (&v)[VEC]) {
    load_vec<VEC>(p, i, v);
    if constexpr (MUL) {
        float w[VEC];
        load_vec<VEC>(q, i, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] *= w[j];
    }
}

// acc[j] += value j of the VEC-wide terms at at(k) (loads of p, times those of q when
// MUL), for k = first, first + step, … below end: four loads in flight before their
// adds, which keep k's order.
template <int VEC, bool MUL = false, typename T, typename At>
__device__ __forceinline__ void add_strided(const T* p, const T* q, int64_t first, int64_t end, int64_t step, At at,
                                            float (&acc)[VEC]) {
    int64_t k = first;
    for (; k + 3 * step < end; k += 4 * step) {
        float v[4][VEC];
#pragma unroll
        for (int u = 0; u < 4; ++u) load_terms<VEC, MUL>(p, q, at(k + u * step), v[u]);
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[j] += v[u][j];
    }
    for (; k < end; k += step) {
        float v[VEC];
        load_terms<VEC, MUL>(p, q, at(k), v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += v[j];
    }
}

// row_partial with 16-byte reads (SYNTHOS_CUDA_COLSUM=vec): the row's W-element words
// (W = 16 / sizeof(T); the row starts 16-byte aligned, which the launcher checks) are
// dealt to the row's blocks as row_partial deals elements, four words per thread in
// flight; the len % W last elements go to the first threads of the row's first block.
// Its blocks cover four times row_partial's elements (`blocks_per_row_vec`), so that each
// thread has several words to load; the count still depends only on the sizes, and the
// finish pass is row_finish.
template <typename T>
__device__ void row_partial_vec_impl(const T* x, float* partials, int64_t len, int64_t bpr) {
    constexpr int W = 16 / sizeof(T);
    __shared__ float scratch[32];
    const int64_t row = blockIdx.x / bpr, chunk = blockIdx.x % bpr;
    const T* xr = x + row * len;
    const int64_t words = len / W;
    float lanes[W] = {};
    add_strided<W>(xr, xr, chunk * blockDim.x + threadIdx.x, words, bpr * blockDim.x,
                   [](int64_t i) { return i * W; }, lanes);
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < W; ++k) acc += lanes[k];
    if (chunk == 0 && threadIdx.x < len - words * W) acc += load(xr, words * W + threadIdx.x);
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <typename T>
__device__ void row_finish_impl(const float* partials, T* out, int64_t bpr, float scale) {
    __shared__ float scratch[32];
    const float* p = partials + blockIdx.x * bpr;
    float acc = 0.f;
    for (int64_t i = threadIdx.x; i < bpr; i += blockDim.x) acc += p[i];
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) store(out, blockIdx.x, total * scale);
}

// blockDim must be (32, COL_ROWS).
#define COL_ROWS 8
template <typename Tin, typename Tout>
__device__ void col_sum_impl(const Tin* x, Tout* out, int64_t len, int64_t inner, float scale) {
    __shared__ float tile[COL_ROWS][33];
    const int64_t tiles = (inner + 31) / 32;
    const int64_t o = blockIdx.x / tiles;
    const int64_t i = (blockIdx.x % tiles) * 32 + threadIdx.x;
    float acc = 0.f;
    if (i < inner) {
        const Tin* base = x + o * len * inner + i;
        for (int64_t r = threadIdx.y; r < len; r += COL_ROWS) acc += load(base, r * inner);
    }
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && i < inner) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < COL_ROWS; ++k) s += tile[k][threadIdx.x];
        store(out, o * inner + i, s * scale);
    }
}

// Split column sums, for long columns (bias and gate gradients: [B·N, D] -> [D] and
// [B, N, D] -> [B, 1, D]), in two deterministic passes:
//   col_partial: x as [outer, len, inner]; the rows are cut into `splits` chunks of
//                `chunk` rows, and block (o, s, tile) sums chunk s of 32 columns into
//                partials[(o·splits + s)·inner + i] (fp32);
//   col_finish:  col_sum over partials viewed as [outer, splits, inner], scaled, in T.
// The split depends only on the sizes, so results are the same run to run.
// Block b of a split column sum with `cols` columns per block: slab o, split s, column
// tile t (blocks run over tiles fastest, then splits, then slabs).
__device__ __forceinline__ void col_block(int64_t cols, int64_t inner, int64_t splits, int64_t& o, int64_t& s,
                                          int64_t& t) {
    const int64_t tiles = (inner + cols - 1) / cols;
    const int64_t b = blockIdx.x;
    o = b / (tiles * splits);
    s = (b / tiles) % splits;
    t = b % tiles;
}

//   With MUL (col_partial_mul, col_partial_vec_mul) the terms are x·y, y laid out as x:
//   the gate gradient Σ_r g·y in one pass over g and y, instead of writing g·y and
//   summing it. The products are fp32, not rounded to T.
template <bool MUL, typename T>
__device__ void col_partial_impl(const T* x, const T* y, float* partials, int64_t len, int64_t inner, int64_t splits,
                                 int64_t chunk) {
    __shared__ float tile[COL_ROWS][33];
    int64_t o, s, t;
    col_block(32, inner, splits, o, s, t);
    const int64_t i = t * 32 + threadIdx.x;
    const int64_t r0 = s * chunk;
    const int64_t r1 = r0 + chunk < len ? r0 + chunk : len;
    float acc = 0.f;
    if (i < inner) {
        const int64_t base = o * len * inner + i;
        for (int64_t r = r0 + threadIdx.y; r < r1; r += COL_ROWS) acc += term<MUL>(x, y, base + r * inner);
    }
    tile[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && i < inner) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < COL_ROWS; ++k) t += tile[k][threadIdx.x];
        partials[(o * splits + s) * inner + i] = t;
    }
}
// Vector column partials (opt-in: SYNTHOS_CUDA_COLSUM=vec): col_partial with each thread
// reading VW = 16 / sizeof(T) consecutive columns as one 16-byte vector (8 bf16 or 4 f32)
// per row, so a 32×8 block covers 32·VW columns and a warp reads 512 contiguous bytes per
// row instead of 64 (bf16). Every column is summed in the same order as in col_partial
// (rows y, y + 8, … per thread row y, then the 8 rows of threads in order), so for the
// same split the partials are equal bit for bit. Needs inner % VW == 0 and x 16-byte
// aligned (the launcher checks both).
template <bool MUL, typename T>
__device__ void col_partial_vec_impl(const T* x, const T* y, float* partials, int64_t len, int64_t inner,
                                     int64_t splits, int64_t chunk) {
    constexpr int VW = 16 / (int)sizeof(T);
    constexpr int COLS = 32 * VW;
    __shared__ float tile[COL_ROWS][COLS];
    int64_t o, s, t;
    col_block(COLS, inner, splits, o, s, t);
    const int64_t c0 = t * COLS;
    const int64_t c = c0 + threadIdx.x * VW;
    const int64_t r0 = s * chunk;
    const int64_t r1 = r0 + chunk < len ? r0 + chunk : len;
    float acc[VW];
#pragma unroll
    for (int j = 0; j < VW; ++j) acc[j] = 0.f;
    if (c < inner) {
        const int64_t base = o * len * inner + c;
        // Four rows' loads in flight before their adds (which keep the row order).
        add_strided<VW, MUL>(x, y, r0 + threadIdx.y, r1, COL_ROWS, [=](int64_t r) { return base + r * inner; }, acc);
    }
#pragma unroll
    for (int j = 0; j < VW; ++j) tile[threadIdx.y][threadIdx.x * VW + j] = acc[j];
    __syncthreads();
    // Thread j finishes column j of the tile (COLS ≤ 256 threads).
    const int j = threadIdx.y * 32 + threadIdx.x;
    if (j < COLS && c0 + j < inner) {
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < COL_ROWS; ++k) sum += tile[k][j];
        partials[(o * splits + s) * inner + c0 + j] = sum;
    }
}

// The entry points of one element type T (suffix f32 or bf16): partials are always fp32.
#define REDUCE_ENTRY_POINTS(T, SFX)                                                                               \
    extern "C" __global__ void sum_to_##SFX(const T* x, T* o, ReduceDesc d, int64_t n_out, int64_t n_red) {     \
        sum_to_impl(x, o, d, n_out, n_red);                                                                     \
    }                                                                                                           \
    extern "C" __global__ void row_partial_##SFX(const T* x, float* partials, int64_t len, int64_t bpr) {        \
        row_partial_impl(x, partials, len, bpr);                                                                \
    }                                                                                                           \
    extern "C" __global__ void row_partial_vec_##SFX(const T* x, float* partials, int64_t len, int64_t bpr) {    \
        row_partial_vec_impl(x, partials, len, bpr);                                                            \
    }                                                                                                           \
    extern "C" __global__ void row_finish_##SFX(const float* partials, T* out, int64_t bpr, float scale) {       \
        row_finish_impl(partials, out, bpr, scale);                                                             \
    }                                                                                                           \
    extern "C" __global__ void col_sum_##SFX(const T* x, T* out, int64_t len, int64_t inner, float scale) {      \
        col_sum_impl(x, out, len, inner, scale);                                                                \
    }                                                                                                           \
    extern "C" __global__ void col_partial_##SFX(const T* x, float* partials, int64_t len, int64_t inner,        \
                                                 int64_t splits, int64_t chunk) {                               \
        col_partial_impl<false>(x, x, partials, len, inner, splits, chunk);                                     \
    }                                                                                                           \
    extern "C" __global__ void col_partial_mul_##SFX(const T* x, const T* y, float* partials, int64_t len,      \
                                                     int64_t inner, int64_t splits, int64_t chunk) {            \
        col_partial_impl<true>(x, y, partials, len, inner, splits, chunk);                                      \
    }                                                                                                           \
    extern "C" __global__ void col_partial_vec_##SFX(const T* x, float* partials, int64_t len, int64_t inner,    \
                                                     int64_t splits, int64_t chunk) {                           \
        col_partial_vec_impl<false>(x, x, partials, len, inner, splits, chunk);                                 \
    }                                                                                                           \
    extern "C" __global__ void col_partial_vec_mul_##SFX(const T* x, const T* y, float* partials, int64_t len,  \
                                                         int64_t inner, int64_t splits, int64_t chunk) {        \
        col_partial_vec_impl<true>(x, y, partials, len, inner, splits, chunk);                                  \
    }                                                                                                           \
    extern "C" __global__ void col_finish_##SFX(const float* partials, T* out, int64_t splits, int64_t inner,    \
                                                float scale) {                                                  \
        col_sum_impl(partials, out, splits, inner, scale);                                                      \
    }
REDUCE_ENTRY_POINTS(float, f32)
REDUCE_ENTRY_POINTS(bf16, bf16)
