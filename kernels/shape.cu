// Shape kernels: permutation of dimensions, slab copies (concat, narrow and their
// gradients) and row gathers (embeddings, pooling) with their scatter gradient. All but
// the scatter are pure data movement: elements are copied as stored, never converted.
//
// The host (cuda/shape.rs) first simplifies a permutation (desc::simplify_permutation:
// size-1 dimensions dropped, input dimensions that stay adjacent merged), then picks:
//   permute_rows16  the last dimension stays last and its rows are whole 16-byte words:
//                   one thread per 16-byte word, one index decomposition per word;
//   transpose_tiles the last dimension moves: 32 x 32 tiles through shared memory, read
//                   along the input's last dimension and written along the output's, so
//                   both sides are coalesced; the other dimensions index the tile batch;
//   permute_<T>     anything else (short rows): one thread per output element decomposes
//                   its index over out_shape (rank <= 6) and reads the input at
//                   Σ c_d·src_stride[d], src_stride[d] being the input stride of perm[d].
//
// slab_copy: both tensors viewed as [outer, channels, inner]; for each o the copied
// channels form one contiguous run of len·inner elements on both sides:
// dst[(o·dst_dim + dst_off)·inner + j] = src[(o·src_dim + src_off)·inner + j], j < run.
// Grid: x along the run, y (grid-stride) over o: no division per element. slab_copy16 does
// the same in 16-byte words when every run start and length is a whole number of words.
// Launch: 256 threads per block, grid-stride.
#include "common.cuh"

// Mirrors `cuda::shape::PermuteDesc`.
struct PermuteDesc {
    int32_t rank;
    int64_t out_shape[6];
    int64_t src_stride[6];
};

// Input offset of the output index `i` decomposed over d.out_shape.
__device__ __forceinline__ int64_t permuted_offset(const PermuteDesc& d, int64_t i) {
    int64_t off = 0;
    // Unrolled with constant indices, so the descriptor stays in parameter space.
#pragma unroll
    for (int k = 5; k >= 0; --k) {
        if (k >= d.rank) continue;
        const int64_t q = i / d.out_shape[k];
        off += (i - q * d.out_shape[k]) * d.src_stride[k];
        i = q;
    }
    return off;
}

template <typename T>
__device__ void permute_impl(const T* x, T* out, PermuteDesc d, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = x[permuted_offset(d, i)];
}
extern "C" __global__ void permute_f32(const float* x, float* o, PermuteDesc d, int64_t n) { permute_impl(x, o, d, n); }
extern "C" __global__ void permute_bf16(const bf16* x, bf16* o, PermuteDesc d, int64_t n) { permute_impl(x, o, d, n); }

// Rows of `words` 16-byte words move whole: d describes the row index (out_shape of the
// leading dimensions, src_stride in words); word w of output row r is input word
// permuted_offset(d, r) + w. n = rows · words.
extern "C" __global__ void permute_rows16(const uint4* x, uint4* out, PermuteDesc d, int64_t words, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / words;
        out[i] = x[permuted_offset(d, r) + (i - r * words)];
    }
}

// Mirrors `cuda::shape::TransposeDesc`. Output element (batch, b, a) = input element
// (batch, a, b) in the simplified shapes: `a` is the input's last dimension (length
// len_a, output stride out_stride_a), `b` the output's last (length len_b, input stride
// in_stride_b); the other dimensions, in output order, have sizes batch_shape and
// strides batch_in / batch_out.
struct TransposeDesc {
    int32_t batch_rank;
    int64_t batch_shape[4];
    int64_t batch_in[4];
    int64_t batch_out[4];
    int64_t len_a, len_b, in_stride_b, out_stride_a, batches;
};

#define TT 32  // tile edge; blocks of 32 x 8 threads, 4 rows per thread

// Grid: x over the tiles of (a, b), y grid-stride over the batch.
template <typename T>
__device__ void transpose_tiles_impl(const T* x, T* out, TransposeDesc d) {
    __shared__ T tile[TT][TT + 1];
    const int64_t tiles_a = (d.len_a + TT - 1) / TT;
    const int64_t a0 = (blockIdx.x % tiles_a) * TT, b0 = (blockIdx.x / tiles_a) * TT;
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (int64_t bt = blockIdx.y; bt < d.batches; bt += gridDim.y) {
        int64_t in_base = 0, out_base = 0, rem = bt;
#pragma unroll
        for (int k = 3; k >= 0; --k) {
            if (k >= d.batch_rank) continue;
            const int64_t q = rem / d.batch_shape[k], c = rem - q * d.batch_shape[k];
            in_base += c * d.batch_in[k];
            out_base += c * d.batch_out[k];
            rem = q;
        }
        // Read: consecutive threads along a (the input's contiguous dimension).
        for (int j = ty; j < TT; j += blockDim.y) {
            const int64_t a = a0 + tx, b = b0 + j;
            if (a < d.len_a && b < d.len_b) tile[j][tx] = x[in_base + b * d.in_stride_b + a];
        }
        __syncthreads();
        // Write: consecutive threads along b (the output's contiguous dimension).
        for (int j = ty; j < TT; j += blockDim.y) {
            const int64_t a = a0 + j, b = b0 + tx;
            if (a < d.len_a && b < d.len_b) out[out_base + a * d.out_stride_a + b] = tile[tx][j];
        }
        __syncthreads();  // the tile is refilled for the next batch entry
    }
}
extern "C" __global__ void transpose_tiles_f32(const float* x, float* o, TransposeDesc d) { transpose_tiles_impl(x, o, d); }
extern "C" __global__ void transpose_tiles_bf16(const bf16* x, bf16* o, TransposeDesc d) { transpose_tiles_impl(x, o, d); }

// One run per o: grid x along the run, y grid-stride over the outer index.
template <typename T>
__device__ void slab_runs(const T* src, T* dst, int64_t run, int64_t src_stride, int64_t src_base, int64_t dst_stride,
                          int64_t dst_base, int64_t outer) {
    for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
        const T* s = src + o * src_stride + src_base;
        T* t = dst + o * dst_stride + dst_base;
        for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < run; j += (int64_t)gridDim.x * blockDim.x)
            t[j] = s[j];
    }
}
// Arguments in elements: run = len·inner, src_stride = src_dim·inner, src_base =
// src_off·inner, and the same for dst.
extern "C" __global__ void slab_copy_f32(const float* src, float* dst, int64_t run, int64_t src_stride,
                                         int64_t src_base, int64_t dst_stride, int64_t dst_base, int64_t outer) {
    slab_runs(src, dst, run, src_stride, src_base, dst_stride, dst_base, outer);
}
extern "C" __global__ void slab_copy_bf16(const bf16* src, bf16* dst, int64_t run, int64_t src_stride,
                                          int64_t src_base, int64_t dst_stride, int64_t dst_base, int64_t outer) {
    slab_runs(src, dst, run, src_stride, src_base, dst_stride, dst_base, outer);
}
// The same in 16-byte words (every argument in words).
extern "C" __global__ void slab_copy16(const uint4* src, uint4* dst, int64_t run, int64_t src_stride,
                                       int64_t src_base, int64_t dst_stride, int64_t dst_base, int64_t outer) {
    slab_runs(src, dst, run, src_stride, src_base, dst_stride, dst_base, outer);
}

// gather_rows: out[i, :] = table[idx[i], :] for i < n rows of d elements (an embedding
// lookup, or picking one token per sequence). One thread per output element. The indices
// are exact integers in f32, made on the host before the op (`ops::RowIndices`, so that
// a recorded CUDA graph can take them as an input); an index outside [0, rows) reads
// zeros instead of memory the table does not own.
template <typename T>
__device__ void gather_rows_impl(const T* table, const float* idx, T* out, int64_t d, int64_t n, int64_t rows) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = (int64_t)idx[i / d];
        if (r >= 0 && r < rows)
            out[i] = table[r * d + i % d];
        else
            store(out, i, 0.f);
    }
}
extern "C" __global__ void gather_rows_f32(const float* t, const float* idx, float* o, int64_t d, int64_t n,
                                           int64_t rows) {
    gather_rows_impl(t, idx, o, d, n, rows);
}
extern "C" __global__ void gather_rows_bf16(const bf16* t, const float* idx, bf16* o, int64_t d, int64_t n,
                                            int64_t rows) {
    gather_rows_impl(t, idx, o, d, n, rows);
}

// scatter_rows, the gradient of gather_rows, without atomics: the host groups the output
// rows by the table row they read (CSR: table row uniq[u] was read by output rows
// pos[start[u] .. start[u+1]], in increasing order). One thread per (u, column) sums
// those rows of g in fp32 in that fixed order and writes dtable[uniq[u], column]; rows
// nobody read keep the zeros the host filled in. The result does not depend on the launch.
// The groups are padded to a fixed count (one per gathered row), so that the launch does
// not depend on the indices: a padding group has uniq < 0 and no rows. Groups outside the
// table, and positions outside g (npos: its rows, also the length of pos), are skipped.
template <typename T>
__device__ void scatter_rows_impl(const T* g, const float* uniq, const float* start, const float* pos, T* dtable,
                                  int64_t d, int64_t n, int64_t rows, int64_t npos) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t u = i / d, c = i % d, r = (int64_t)uniq[u];
        if (r < 0 || r >= rows) continue;
        const int64_t s0 = (int64_t)start[u], s1 = (int64_t)start[u + 1];
        const int64_t lo = s0 > 0 ? s0 : 0, hi = s1 < npos ? s1 : npos;
        float acc = 0.f;
        for (int64_t k = lo; k < hi; ++k) {
            const int64_t p = (int64_t)pos[k];
            if (p >= 0 && p < npos) acc += load(g, p * d + c);
        }
        store(dtable, r * d + c, acc);
    }
}
extern "C" __global__ void scatter_rows_f32(const float* g, const float* uniq, const float* start, const float* pos,
                                            float* dt, int64_t d, int64_t n, int64_t rows, int64_t npos) {
    scatter_rows_impl(g, uniq, start, pos, dt, d, n, rows, npos);
}
extern "C" __global__ void scatter_rows_bf16(const bf16* g, const float* uniq, const float* start, const float* pos,
                                             bf16* dt, int64_t d, int64_t n, int64_t rows, int64_t npos) {
    scatter_rows_impl(g, uniq, start, pos, dt, d, n, rows, npos);
}
