// Rotary position embedding (the 3D RoPE of Wan2.1), forward and backward.
//
// Math: channels (2j, 2j+1) of every head are a complex number a + i·b that is multiplied
// by e^{i·sign·θ[n,j]}, where θ is the angle of token n and pair j (the table `cos`/`sin`
// [N, Dh/2] holds cos θ and sin θ, built on the host in f64):
//   a' = a·cos θ − sign·b·sin θ
//   b' = sign·a·sin θ + b·cos θ
// sign = +1 is the forward; sign = −1 rotates by −θ, which is the backward (a rotation's
// adjoint is its inverse). Arithmetic in fp32.
//
// Layout: x, out [B, N, H, Dh] in T (f32 or bf16; heads interleaved as a linear layer
// produces them, D = H·Dh); cos, sin [N, Dh/2] f32.
//
// Launch: 1-D grid-stride, 256 threads; each thread rotates PAIRS consecutive pairs of one
// head. With PAIRS = 4 (Dh/2 a multiple of 4) a thread moves 16 bytes of bf16 (32 of
// f32) and reads 16-byte vectors of cos and sin; PAIRS = 1 handles any even Dh.
// Memory-bound: one read and one write of x, the table is small and stays in L2.
#include "common.cuh"

// `n_chunks` = B·N·H·(Dh/2)/PAIRS; `half` = Dh/2 (a multiple of PAIRS).
template <typename T, int PAIRS>
__device__ void rope_impl(const T* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                          T* __restrict__ out, int64_t n_chunks, int64_t tokens, int heads, int half, float sign) {
    for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < n_chunks;
         q += (int64_t)gridDim.x * blockDim.x) {
        const int64_t pair = q * PAIRS;  // global pair index over [B, N, H, half]
        const int j = (int)(pair % half);
        const int64_t n = (pair / ((int64_t)half * heads)) % tokens;
        float v[2 * PAIRS], c[PAIRS], s[PAIRS], o[2 * PAIRS];
        load_vec(x, pair * 2, v);
        load_vec(cos_t, n * half + j, c);
        load_vec(sin_t, n * half + j, s);
#pragma unroll
        for (int p = 0; p < PAIRS; ++p) {
            const float a = v[2 * p], b = v[2 * p + 1], sn = sign * s[p];
            o[2 * p] = a * c[p] - b * sn;
            o[2 * p + 1] = a * sn + b * c[p];
        }
        store_vec(out, pair * 2, o);
    }
}

#define ROPE_ENTRY(TN, T, PAIRS)                                                                             \
    extern "C" __global__ void rope_##TN##_p##PAIRS(const T* x, const float* cos_t, const float* sin_t, T* out, \
                                                    int64_t n_chunks, int64_t tokens, int heads, int half,      \
                                                    float sign) {                                               \
        rope_impl<T, PAIRS>(x, cos_t, sin_t, out, n_chunks, tokens, heads, half, sign);                          \
    }

ROPE_ENTRY(f32, float, 1)
ROPE_ENTRY(f32, float, 4)
ROPE_ENTRY(bf16, bf16, 1)
ROPE_ENTRY(bf16, bf16, 4)
