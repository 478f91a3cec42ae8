// Elementwise kernels: binary ops with NumPy broadcasting, scalar ops, activations
// (GELU tanh/exact, SiLU) with their backward, the fused gated residual, casts.
//
// Math: out[i] = a[ia] (op) b[ib], offsets from `Bcast` strides; fp32 arithmetic.
// Launch: 1-D grid-stride, 256 threads; each thread takes chunks of EW = 8 consecutive
// elements (grid sized n/8 by the launchers, `cuda::grid_chunks`).
// Memory-bound, so the access width is what matters: when every pointer is 16-byte
// aligned (fresh allocations are) a chunk moves as 16-byte words (one for 8 bf16, two
// for 8 f32); the tail chunk and unaligned pointers go element by element.
// Broadcasting binaries and bcast_copy (with the broadcast simplified by the host,
// `cuda::Bcast::new`): when the innermost dimension is a multiple of EW long and each
// input is contiguous or constant along it, a chunk never leaves a row, so its offsets
// are computed once per chunk and contiguous inputs load as 16-byte words; otherwise the
// offsets are walked per element.
#include "common.cuh"

#define EW 8

// for (i0 = first chunk of this thread; i0 < n; i0 += chunk stride of the grid)
#define FOR_CHUNKS(i0, n)                                                                   \
    for (int64_t i0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * EW; i0 < (n);     \
         i0 += (int64_t)gridDim.x * blockDim.x * EW)

#define CHUNK_END(i0, n) ((i0) + EW < (n) ? (i0) + EW : (n))

#define BINARY(NAME, EXPR)                                                                  \
template <typename T>                                                                       \
__device__ void NAME##_impl(const T* a, const T* b, T* out, Bcast bc, int64_t n, int same) { \
    const bool vec = same && aligned16(a) && aligned16(b) && aligned16(out);                \
    int64_t len, sa, sb;                                                                     \
    bcast_inner(bc, len, sa, sb);                                                            \
    const bool rows = !same && len % EW == 0 && (sa == 0 || (sa == 1 && aligned16(a))) &&   \
                      (sb == 0 || (sb == 1 && aligned16(b))) && aligned16(out);             \
    FOR_CHUNKS(i0, n) {                                                                      \
        if ((vec || rows) && i0 + EW <= n) {                                                 \
            float xa[EW], yb[EW], o[EW];                                                     \
            if (vec) {                                                                       \
                load_vec<EW>(a, i0, xa);                                                     \
                load_vec<EW>(b, i0, yb);                                                     \
            } else {                                                                         \
                int64_t ia, ib;                                                              \
                bcast_offsets(bc, i0, ia, ib);                                               \
                load_row<EW>(a, ia, sa == 1, xa);                                            \
                load_row<EW>(b, ib, sb == 1, yb);                                            \
            }                                                                                \
            _Pragma("unroll") for (int k = 0; k < EW; ++k) {                                 \
                const float x = xa[k], y = yb[k];                                            \
                o[k] = (EXPR);                                                               \
            }                                                                                \
            store_vec<EW>(out, i0, o);                                                       \
        } else {                                                                             \
            for (int64_t i = i0; i < CHUNK_END(i0, n); ++i) {                                \
                int64_t ia = i, ib = i;                                                      \
                if (!same) bcast_offsets(bc, i, ia, ib);                                     \
                const float x = load(a, ia), y = load(b, ib);                                \
                store(out, i, (EXPR));                                                       \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
extern "C" __global__ void NAME##_f32(const float* a, const float* b, float* o, Bcast bc,   \
                                      int64_t n, int same) { NAME##_impl(a, b, o, bc, n, same); } \
extern "C" __global__ void NAME##_bf16(const bf16* a, const bf16* b, bf16* o, Bcast bc,     \
                                       int64_t n, int same) { NAME##_impl(a, b, o, bc, n, same); }

BINARY(add, x + y)
BINARY(sub, x - y)
BINARY(mul, x * y)

// out[i] = F(x[i]) for a functor F, in chunks of EW; TI and TO may differ (casts).
template <typename TI, typename TO, typename F>
__device__ __forceinline__ void map_unary(const TI* x, TO* out, int64_t n, F f) {
    const bool vec = aligned16(x) && aligned16(out);
    FOR_CHUNKS(i0, n) {
        if (vec && i0 + EW <= n) {
            float v[EW];
            load_vec<EW>(x, i0, v);
#pragma unroll
            for (int k = 0; k < EW; ++k) v[k] = f(v[k]);
            store_vec<EW>(out, i0, v);
        } else {
            for (int64_t i = i0; i < CHUNK_END(i0, n); ++i) store(out, i, f(load(x, i)));
        }
    }
}

// out[i] = G(x[i], g[i]) (the backward of an activation), in chunks of EW.
template <typename T, typename G>
__device__ __forceinline__ void map_binary(const T* x, const T* g, T* out, int64_t n, G f) {
    const bool vec = aligned16(x) && aligned16(g) && aligned16(out);
    FOR_CHUNKS(i0, n) {
        if (vec && i0 + EW <= n) {
            float v[EW], w[EW];
            load_vec<EW>(x, i0, v);
            load_vec<EW>(g, i0, w);
#pragma unroll
            for (int k = 0; k < EW; ++k) v[k] = f(v[k], w[k]);
            store_vec<EW>(out, i0, v);
        } else {
            for (int64_t i = i0; i < CHUNK_END(i0, n); ++i) store(out, i, f(load(x, i), load(g, i)));
        }
    }
}

struct Scale {
    float s;
    __device__ float operator()(float x) const { return s * x; }
};
struct AddScalar {
    float c;
    __device__ float operator()(float x) const { return x + c; }
};
struct Identity {
    __device__ float operator()(float x) const { return x; }
};

// out[i] = s * x[i]
extern "C" __global__ void scale_f32(const float* x, float* o, float s, int64_t n) { map_unary(x, o, n, Scale{s}); }
extern "C" __global__ void scale_bf16(const bf16* x, bf16* o, float s, int64_t n) { map_unary(x, o, n, Scale{s}); }

// out[i] = x[i] + c
extern "C" __global__ void add_scalar_f32(const float* x, float* o, float c, int64_t n) {
    map_unary(x, o, n, AddScalar{c});
}
extern "C" __global__ void add_scalar_bf16(const bf16* x, bf16* o, float c, int64_t n) {
    map_unary(x, o, n, AddScalar{c});
}

// Casts (round to nearest even for f32 -> bf16, through `store`).
extern "C" __global__ void cast_f32_bf16(const float* x, bf16* o, int64_t n) { map_unary(x, o, n, Identity{}); }
extern "C" __global__ void cast_bf16_f32(const bf16* x, float* o, int64_t n) { map_unary(x, o, n, Identity{}); }

// out[i] = x[ia]: materialises a broadcast (the adjoint of sum_to). Uses `sa` of Bcast;
// chunks of EW as the broadcasting binaries.
template <typename T>
__device__ void bcast_copy_impl(const T* x, T* out, Bcast bc, int64_t n) {
    int64_t len, sa, sb;
    bcast_inner(bc, len, sa, sb);
    const bool rows = len % EW == 0 && (sa == 0 || (sa == 1 && aligned16(x))) && aligned16(out);
    FOR_CHUNKS(i0, n) {
        int64_t ia, ib;
        if (rows && i0 + EW <= n) {
            float v[EW];
            bcast_offsets(bc, i0, ia, ib);
            load_row<EW>(x, ia, sa == 1, v);
            store_vec<EW>(out, i0, v);
        } else {
            for (int64_t i = i0; i < CHUNK_END(i0, n); ++i) {
                bcast_offsets(bc, i, ia, ib);
                store(out, i, load(x, ia));
            }
        }
    }
}
extern "C" __global__ void bcast_copy_f32(const float* x, float* o, Bcast bc, int64_t n) { bcast_copy_impl(x, o, bc, n); }
extern "C" __global__ void bcast_copy_bf16(const bf16* x, bf16* o, Bcast bc, int64_t n) { bcast_copy_impl(x, o, bc, n); }

// Activations and their derivatives, in fp32.
//   gelu_tanh(x)  = ½x(1 + tanh(u)),  u = √(2/π)(x + 0.044715x³)   (PyTorch approximate='tanh')
//   gelu_exact(x) = ½x(1 + erf(x/√2)) = x·Φ(x);  derivative Φ(x) + x·φ(x)
//   silu(x)       = x·σ(x);                      derivative σ(x)(1 + x(1 − σ(x)))
//   quick_gelu(x) = x·σ(1.702x) (OpenAI CLIP);   derivative s(1 + 1.702x(1 − s)), s = σ(1.702x)
//   exp(x);                                       derivative exp(x)
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
struct NAME##_fwd_op {                                                                       \
    __device__ float operator()(float x) const { return F(x); }                              \
};                                                                                           \
struct NAME##_bwd_op {                                                                       \
    __device__ float operator()(float x, float g) const { return g * DF(x); }                \
};                                                                                           \
extern "C" __global__ void NAME##_f32(const float* x, float* o, int64_t n) { map_unary(x, o, n, NAME##_fwd_op{}); } \
extern "C" __global__ void NAME##_bf16(const bf16* x, bf16* o, int64_t n) { map_unary(x, o, n, NAME##_fwd_op{}); } \
extern "C" __global__ void NAME##_bwd_f32(const float* x, const float* g, float* dx, int64_t n) { \
    map_binary(x, g, dx, n, NAME##_bwd_op{});                                                \
}                                                                                            \
extern "C" __global__ void NAME##_bwd_bf16(const bf16* x, const bf16* g, bf16* dx, int64_t n) { \
    map_binary(x, g, dx, n, NAME##_bwd_op{});                                                \
}

ACTIVATION(gelu_tanh, gelu_tanh_f, gelu_tanh_df)
ACTIVATION(gelu_exact, gelu_exact_f, gelu_exact_df)
ACTIVATION(silu, silu_f, silu_df)
#define QUICK_GELU_ALPHA 1.702f
__device__ __forceinline__ float quick_gelu_f(float x) { return x / (1.f + expf(-QUICK_GELU_ALPHA * x)); }
__device__ __forceinline__ float quick_gelu_df(float x) {
    const float s = 1.f / (1.f + expf(-QUICK_GELU_ALPHA * x));
    return s * (1.f + QUICK_GELU_ALPHA * x * (1.f - s));
}
ACTIVATION(quick_gelu, quick_gelu_f, quick_gelu_df)
__device__ __forceinline__ float exp_f(float x) { return expf(x); }
ACTIVATION(exp, exp_f, exp_f)

// Gated residual: out = x + gate·y, x and y of one shape, gate broadcast over it.
// The host collapses the broadcast to gate index (i / period)·inner + i % inner: `inner`
// is the product of the trailing dimensions the gate shares with x, `period` that times
// the product of the dimensions it is broadcast over. This covers [B,1,D], [1,1,D],
// [B,N,D], [B,1,1], ... with two divisions instead of a rank-long index walk.
template <typename T>
__device__ void gated_residual_impl(const T* x, const T* gate, const T* y, T* out, int64_t period, int64_t inner,
                                    int64_t n) {
    const bool vec = aligned16(x) && aligned16(y) && aligned16(out);
    // With inner a multiple of EW, a chunk (i0 a multiple of EW) never crosses a gate row:
    // its gate values are EW consecutive elements, one index computation per chunk.
    const bool gate_vec = vec && aligned16(gate) && inner % EW == 0;
    FOR_CHUNKS(i0, n) {
        if (gate_vec && i0 + EW <= n) {
            float xv[EW], yv[EW], gv[EW];
            load_vec<EW>(x, i0, xv);
            load_vec<EW>(y, i0, yv);
            load_vec<EW>(gate, (i0 / period) * inner + i0 % inner, gv);
#pragma unroll
            for (int k = 0; k < EW; ++k) xv[k] += gv[k] * yv[k];
            store_vec<EW>(out, i0, xv);
        } else if (vec && i0 + EW <= n) {
            float xv[EW], yv[EW];
            load_vec<EW>(x, i0, xv);
            load_vec<EW>(y, i0, yv);
#pragma unroll
            for (int k = 0; k < EW; ++k) {
                const int64_t i = i0 + k;
                xv[k] += load(gate, (i / period) * inner + i % inner) * yv[k];
            }
            store_vec<EW>(out, i0, xv);
        } else {
            for (int64_t i = i0; i < CHUNK_END(i0, n); ++i)
                store(out, i, load(x, i) + load(gate, (i / period) * inner + i % inner) * load(y, i));
        }
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

// clamp: y = min(max(x, lo), hi); backward passes g where lo ≤ x ≤ hi (PyTorch's rule, so
// values exactly on a bound get the gradient). One element per thread, grid-stride.
template <typename T>
__device__ void clamp_impl(const T* x, T* y, float lo, float hi, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        store(y, i, fminf(fmaxf(load(x, i), lo), hi));
}
template <typename T>
__device__ void clamp_bwd_impl(const T* x, const T* g, T* dx, float lo, float hi, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float v = load(x, i);
        store(dx, i, (v >= lo && v <= hi) ? load(g, i) : 0.f);
    }
}
extern "C" __global__ void clamp_f32(const float* x, float* y, float lo, float hi, int64_t n) {
    clamp_impl(x, y, lo, hi, n);
}
extern "C" __global__ void clamp_bf16(const bf16* x, bf16* y, float lo, float hi, int64_t n) {
    clamp_impl(x, y, lo, hi, n);
}
extern "C" __global__ void clamp_bwd_f32(const float* x, const float* g, float* dx, float lo, float hi, int64_t n) {
    clamp_bwd_impl(x, g, dx, lo, hi, n);
}
extern "C" __global__ void clamp_bwd_bf16(const bf16* x, const bf16* g, bf16* dx, float lo, float hi, int64_t n) {
    clamp_bwd_impl(x, g, dx, lo, hi, n);
}
