// Elementwise kernels: binary ops with NumPy broadcasting, and (added by their ops)
// activations, casts and fills.
//
// Math: out[i] = a[ia] (op) b[ib], offsets from `Bcast` strides; fp32 arithmetic.
// Launch: 1-D grid, 256 threads, one element per thread (grid-stride).
// Memory-bound: the same-shape fast path avoids the index arithmetic of broadcasting.
#include "common.cuh"

#define BINARY(NAME, EXPR)                                                                  \
template <typename T>                                                                       \
__device__ void NAME##_impl(const T* a, const T* b, T* out, Bcast bc, int64_t n, int same) { \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;                 \
         i += (int64_t)gridDim.x * blockDim.x) {                                             \
        int64_t ia = i, ib = i;                                                             \
        if (!same) bcast_offsets(bc, i, ia, ib);                                            \
        const float x = load(a, ia), y = load(b, ib);                                       \
        store(out, i, (EXPR));                                                              \
    }                                                                                       \
}                                                                                           \
extern "C" __global__ void NAME##_f32(const float* a, const float* b, float* o, Bcast bc,   \
                                      int64_t n, int same) { NAME##_impl(a, b, o, bc, n, same); } \
extern "C" __global__ void NAME##_bf16(const bf16* a, const bf16* b, bf16* o, Bcast bc,     \
                                       int64_t n, int same) { NAME##_impl(a, b, o, bc, n, same); }

BINARY(add, x + y)
BINARY(sub, x - y)
BINARY(mul, x * y)

// out[i] = s * x[i]
template <typename T>
__device__ void scale_impl(const T* x, T* out, float s, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        store(out, i, s * load(x, i));
}
extern "C" __global__ void scale_f32(const float* x, float* o, float s, int64_t n) { scale_impl(x, o, s, n); }
extern "C" __global__ void scale_bf16(const bf16* x, bf16* o, float s, int64_t n) { scale_impl(x, o, s, n); }

// out[i] = x[ia]: materialises a broadcast (the adjoint of sum_to). Uses `sa` of Bcast.
template <typename T>
__device__ void bcast_copy_impl(const T* x, T* out, Bcast bc, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t ia, ib;
        bcast_offsets(bc, i, ia, ib);
        store(out, i, load(x, ia));
    }
}
extern "C" __global__ void bcast_copy_f32(const float* x, float* o, Bcast bc, int64_t n) { bcast_copy_impl(x, o, bc, n); }
extern "C" __global__ void bcast_copy_bf16(const bf16* x, bf16* o, Bcast bc, int64_t n) { bcast_copy_impl(x, o, bc, n); }

// Casts (round to nearest even for f32 -> bf16).
extern "C" __global__ void cast_f32_bf16(const float* x, bf16* o, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        o[i] = __float2bfloat16(x[i]);
}
extern "C" __global__ void cast_bf16_f32(const bf16* x, float* o, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        o[i] = __bfloat162float(x[i]);
}
