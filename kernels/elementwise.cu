// Elementwise kernels: binary ops with NumPy broadcasting, scalar ops, activations
// (GELU tanh/exact, SiLU) with their backward, the fused gated residual, casts.
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

// out[i] = x[i] + c
template <typename T>
__device__ void add_scalar_impl(const T* x, T* out, float c, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        store(out, i, load(x, i) + c);
}
extern "C" __global__ void add_scalar_f32(const float* x, float* o, float c, int64_t n) { add_scalar_impl(x, o, c, n); }
extern "C" __global__ void add_scalar_bf16(const bf16* x, bf16* o, float c, int64_t n) { add_scalar_impl(x, o, c, n); }

// Activations and their derivatives, in fp32.
//   gelu_tanh(x)  = ½x(1 + tanh(u)),  u = √(2/π)(x + 0.044715x³)   (PyTorch approximate='tanh')
//   gelu_exact(x) = ½x(1 + erf(x/√2)) = x·Φ(x);  derivative Φ(x) + x·φ(x)
//   silu(x)       = x·σ(x);                      derivative σ(x)(1 + x(1 − σ(x)))
#define SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_CUBIC 0.044715f
#define INV_SQRT_2PI 0.3989422804014327f

__device__ __forceinline__ float gelu_tanh_f(float x) {
    const float t = tanhf(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
    return 0.5f * x * (1.f + t);
}
__device__ __forceinline__ float gelu_tanh_df(float x) {
    const float x2 = x * x;
    const float t = tanhf(SQRT_2_OVER_PI * (x + GELU_CUBIC * x2 * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * SQRT_2_OVER_PI * (1.f + 3.f * GELU_CUBIC * x2);
}
__device__ __forceinline__ float gelu_exact_f(float x) { return 0.5f * x * (1.f + erff(x * 0.7071067811865476f)); }
__device__ __forceinline__ float gelu_exact_df(float x) {
    return 0.5f * (1.f + erff(x * 0.7071067811865476f)) + x * INV_SQRT_2PI * expf(-0.5f * x * x);
}
// expf(-x) overflows to inf for x < -88; x / inf = -0 is the right limit.
__device__ __forceinline__ float silu_f(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float silu_df(float x) {
    const float s = 1.f / (1.f + expf(-x));
    return s * (1.f + x * (1.f - s));
}

// NAME_<dtype>(x, out, n): out = f(x).  NAME_bwd_<dtype>(x, g, dx, n): dx = g·f'(x).
// The backward recomputes f' from x instead of storing it: one read more, no buffer.
#define ACTIVATION(NAME, F, DF)                                                              \
template <typename T>                                                                        \
__device__ void NAME##_fwd_impl(const T* x, T* out, int64_t n) {                             \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;                  \
         i += (int64_t)gridDim.x * blockDim.x)                                                \
        store(out, i, F(load(x, i)));                                                        \
}                                                                                            \
template <typename T>                                                                        \
__device__ void NAME##_bwd_impl(const T* x, const T* g, T* dx, int64_t n) {                  \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;                  \
         i += (int64_t)gridDim.x * blockDim.x)                                                \
        store(dx, i, load(g, i) * DF(load(x, i)));                                           \
}                                                                                            \
extern "C" __global__ void NAME##_f32(const float* x, float* o, int64_t n) { NAME##_fwd_impl(x, o, n); } \
extern "C" __global__ void NAME##_bf16(const bf16* x, bf16* o, int64_t n) { NAME##_fwd_impl(x, o, n); } \
extern "C" __global__ void NAME##_bwd_f32(const float* x, const float* g, float* dx, int64_t n) { \
    NAME##_bwd_impl(x, g, dx, n);                                                            \
}                                                                                            \
extern "C" __global__ void NAME##_bwd_bf16(const bf16* x, const bf16* g, bf16* dx, int64_t n) { \
    NAME##_bwd_impl(x, g, dx, n);                                                            \
}

ACTIVATION(gelu_tanh, gelu_tanh_f, gelu_tanh_df)
ACTIVATION(gelu_exact, gelu_exact_f, gelu_exact_df)
ACTIVATION(silu, silu_f, silu_df)

// Gated residual: out = x + gate·y, x and y of one shape, gate broadcast over it.
// The host collapses the broadcast to gate index (i / period)·inner + i % inner: `inner`
// is the product of the trailing dimensions the gate shares with x, `period` that times
// the product of the dimensions it is broadcast over. This covers [B,1,D], [1,1,D],
// [B,N,D], [B,1,1], ... with two divisions instead of a rank-long index walk.
template <typename T>
__device__ void gated_residual_impl(const T* x, const T* gate, const T* y, T* out, int64_t period, int64_t inner,
                                    int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t gi = (i / period) * inner + i % inner;
        store(out, i, load(x, i) + load(gate, gi) * load(y, i));
    }
}
extern "C" __global__ void gated_residual_f32(const float* x, const float* gate, const float* y, float* o,
                                              int64_t period, int64_t inner, int64_t n) {
    gated_residual_impl(x, gate, y, o, period, inner, n);
}
extern "C" __global__ void gated_residual_bf16(const bf16* x, const bf16* gate, const bf16* y, bf16* o,
                                               int64_t period, int64_t inner, int64_t n) {
    gated_residual_impl(x, gate, y, o, period, inner, n);
}
