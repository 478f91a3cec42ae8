// The part of CUDA's cuda_bf16.h our kernels use, for the CPU emulation (emu.h).
// bf16 is the top half of an IEEE f32; conversions from f32 round to nearest even, as
// __float2bfloat16 does on the GPU, and NaN becomes the canonical NaN 0x7FFF.
#pragma once
#include "emu.h"

struct __nv_bfloat16 {
    unsigned short raw;  // the bits (the CUDA type keeps them private; kernels never touch them)
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t u = (uint32_t)h.raw << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fff};
    u += 0x7fffu + ((u >> 16) & 1u);  // round half to even (overflow carries into the exponent: inf)
    return {(unsigned short)(u >> 16)};
}

// The bits of a bf16 and back (CUDA's reinterpretations).
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.raw; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }

inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }

inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16(a), __float2bfloat16(b)}; }
