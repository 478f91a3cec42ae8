// Reductions: sum of a tensor onto a broadcast-compatible smaller shape (the backward
// of broadcasting), and full sums.
//
// sum_to: one thread per output element; it walks the reduced positions (mixed-radix
// over `red_shape`) at the input strides. With the common (B,N,D) -> (B,1,D) reduction,
// consecutive threads read consecutive addresses, so reads are coalesced. fp32
// accumulation.
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

extern "C" __global__ void sum_to_f32(const float* x, float* o, ReduceDesc d, int64_t n_out, int64_t n_red) {
    sum_to_impl(x, o, d, n_out, n_red);
}
extern "C" __global__ void sum_to_bf16(const bf16* x, bf16* o, ReduceDesc d, int64_t n_out, int64_t n_red) {
    sum_to_impl(x, o, d, n_out, n_red);
}
