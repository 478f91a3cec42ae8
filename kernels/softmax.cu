// Softmax over the last dimension, forward and backward, for attention whose scores are
// materialised (the VAE's single-head spatial attention, head dim = channels, which the
// flash-attention kernels do not cover).
//
// Math, per row of n elements, in fp32:
//   forward:  y_j = exp(x_j − max x) / Σ_k exp(x_k − max x)
//   backward: dx_j = y_j·(g_j − Σ_k g_k·y_k)          (from the saved output y)
// Layout: [rows, n] row-major, T = f32 or bf16.
// Launch: one block of 256 threads per row (grid-stride over rows); the row is walked
// three times (max, sum, write) from global memory — rows are a few thousand elements
// and stay in L2 between the passes, so this costs bandwidth close to one read.
#include "common.cuh"

#define SOFTMAX_THREADS 256

template <typename T>
__device__ void softmax_fwd_impl(const T* x, T* y, int64_t rows, int64_t n) {
    __shared__ float scratch[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * n;
        T* yr = y + r * n;
        float m, s;
        block_max_sumexp(xr, n, scratch, m, s);
        const float inv = 1.f / s;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) store(yr, j, expf(load(xr, j) - m) * inv);
    }
}

template <typename T>
__device__ void softmax_bwd_impl(const T* y, const T* g, T* dx, int64_t rows, int64_t n) {
    __shared__ float scratch[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* yr = y + r * n;
        const T* gr = g + r * n;
        T* dr = dx + r * n;
        float dot = 0.f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dot += load(yr, j) * load(gr, j);
        dot = block_sum(dot, scratch);
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) store(dr, j, load(yr, j) * (load(gr, j) - dot));
    }
}

extern "C" __global__ void __launch_bounds__(SOFTMAX_THREADS) softmax_f32(const float* x, float* y, int64_t rows,
                                                                          int64_t n) {
    softmax_fwd_impl(x, y, rows, n);
}
extern "C" __global__ void __launch_bounds__(SOFTMAX_THREADS) softmax_bf16(const bf16* x, bf16* y, int64_t rows,
                                                                           int64_t n) {
    softmax_fwd_impl(x, y, rows, n);
}
extern "C" __global__ void __launch_bounds__(SOFTMAX_THREADS) softmax_bwd_f32(const float* y, const float* g,
                                                                              float* dx, int64_t rows, int64_t n) {
    softmax_bwd_impl(y, g, dx, rows, n);
}
extern "C" __global__ void __launch_bounds__(SOFTMAX_THREADS) softmax_bwd_bf16(const bf16* y, const bf16* g, bf16* dx,
                                                                               int64_t rows, int64_t n) {
    softmax_bwd_impl(y, g, dx, rows, n);
}
