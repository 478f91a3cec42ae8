// Shape kernels: permutation of dimensions, slab copies (concat, narrow and their
// gradients) and row gathers (embeddings, pooling) with their scatter gradient. All but
// the scatter are pure data movement: elements are copied as stored, never converted.
//
// permute: out has shape out_shape[d] = in_shape[perm[d]]; one thread per output
// element decomposes its index over out_shape (rank <= 6) and reads the input at
// Σ c_d·src_stride[d], where src_stride[d] is the input stride of dimension perm[d].
// Writes are coalesced, reads strided: for the permutations used here (heads <-> tokens,
// channels <-> pixels) the inner output dimension still reads within a few cache lines.
//
// slab_copy: both tensors viewed as [outer, channels, inner];
// dst[o, dst_off + c, i] = src[o, src_off + c, i] for c < len. One thread per copied
// element, consecutive threads on consecutive i, so reads and writes are coalesced.
// Launch: 1-D grid of 256 threads, grid-stride.
#include "common.cuh"

// Mirrors `cuda::shape::PermuteDesc`.
struct PermuteDesc {
    int32_t rank;
    int64_t out_shape[6];
    int64_t src_stride[6];
};

template <typename T>
__device__ void permute_impl(const T* x, T* out, PermuteDesc d, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t rem = i, off = 0;
        for (int k = d.rank - 1; k >= 0; --k) {
            off += (rem % d.out_shape[k]) * d.src_stride[k];
            rem /= d.out_shape[k];
        }
        out[i] = x[off];
    }
}
extern "C" __global__ void permute_f32(const float* x, float* o, PermuteDesc d, int64_t n) { permute_impl(x, o, d, n); }
extern "C" __global__ void permute_bf16(const bf16* x, bf16* o, PermuteDesc d, int64_t n) { permute_impl(x, o, d, n); }

template <typename T>
__device__ void slab_copy_impl(const T* src, T* dst, int64_t inner, int64_t src_dim, int64_t src_off,
                               int64_t dst_dim, int64_t dst_off, int64_t len, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t in = i % inner, rest = i / inner;
        const int64_t c = rest % len, o = rest / len;
        dst[(o * dst_dim + dst_off + c) * inner + in] = src[(o * src_dim + src_off + c) * inner + in];
    }
}
extern "C" __global__ void slab_copy_f32(const float* src, float* dst, int64_t inner, int64_t src_dim,
                                         int64_t src_off, int64_t dst_dim, int64_t dst_off, int64_t len, int64_t n) {
    slab_copy_impl(src, dst, inner, src_dim, src_off, dst_dim, dst_off, len, n);
}
extern "C" __global__ void slab_copy_bf16(const bf16* src, bf16* dst, int64_t inner, int64_t src_dim,
                                          int64_t src_off, int64_t dst_dim, int64_t dst_off, int64_t len, int64_t n) {
    slab_copy_impl(src, dst, inner, src_dim, src_off, dst_dim, dst_off, len, n);
}

// gather_rows: out[i, :] = table[idx[i], :] for i < rows, rows of d elements (an
// embedding lookup, or picking one token per sequence). One thread per output element.
template <typename T>
__device__ void gather_rows_impl(const T* table, const int64_t* idx, T* out, int64_t d, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        out[i] = table[idx[i / d] * d + i % d];
    }
}
extern "C" __global__ void gather_rows_f32(const float* t, const int64_t* idx, float* o, int64_t d, int64_t n) {
    gather_rows_impl(t, idx, o, d, n);
}
extern "C" __global__ void gather_rows_bf16(const bf16* t, const int64_t* idx, bf16* o, int64_t d, int64_t n) {
    gather_rows_impl(t, idx, o, d, n);
}

// scatter_rows, the gradient of gather_rows, without atomics: the host groups the output
// rows by the table row they read (CSR: table row uniq[u] was read by output rows
// pos[start[u] .. start[u+1]], in increasing order). One thread per (u, column) sums
// those rows of g in fp32 in that fixed order and writes dtable[uniq[u], column]; rows
// nobody read keep the zeros the host filled in. The result does not depend on the launch.
template <typename T>
__device__ void scatter_rows_impl(const T* g, const int64_t* uniq, const int64_t* start, const int64_t* pos,
                                  T* dtable, int64_t d, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t u = i / d, c = i % d;
        float acc = 0.f;
        for (int64_t k = start[u]; k < start[u + 1]; ++k) acc += load(g, pos[k] * d + c);
        store(dtable, uniq[u] * d + c, acc);
    }
}
extern "C" __global__ void scatter_rows_f32(const float* g, const int64_t* uniq, const int64_t* start,
                                            const int64_t* pos, float* dt, int64_t d, int64_t n) {
    scatter_rows_impl(g, uniq, start, pos, dt, d, n);
}
extern "C" __global__ void scatter_rows_bf16(const bf16* g, const int64_t* uniq, const int64_t* start,
                                             const int64_t* pos, bf16* dt, int64_t d, int64_t n) {
    scatter_rows_impl(g, uniq, start, pos, dt, d, n);
}
