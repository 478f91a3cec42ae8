// Shared device helpers: bf16 <-> f32 loads/stores, and warp / block reductions.
//
// Every kernel computes in fp32 and converts at the load/store boundary, so the same
// kernel body serves f32 and bf16 tensors through the `load`/`store` overloads.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// The block's dynamic shared memory (declared as `name`), and its size in bytes.
#ifdef SYNTHOS_EMU  // CPU emulation (tests/kernel_emu/): the emulator owns shared memory
#define DYNAMIC_SMEM(name) unsigned char* const name = emu::dynamic_smem()
__device__ __forceinline__ unsigned dynamic_smem_bytes() { return emu::dynamic_smem_bytes(); }
#else
#define DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
    unsigned r;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}
#endif

// The block's dynamic shared memory, once the kernel has checked that the launch gave it
// at least BYTES: a host that sized it from another layout traps here instead of having
// the kernel run past the end.
template <unsigned BYTES>
__device__ __forceinline__ unsigned char* dynamic_smem_at_least() {
    DYNAMIC_SMEM(smem);
    if (dynamic_smem_bytes() < BYTES) __trap();
    return smem;
}

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const bf16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }

// The two reductions warps and blocks run: a sum, and a maximum (identity −∞).
struct SumOp {
    static constexpr float identity = 0.f;
    __device__ __forceinline__ static float apply(float a, float b) { return a + b; }
};
struct MaxOp {
    static constexpr float identity = -INFINITY;
    __device__ __forceinline__ static float apply(float a, float b) { return fmaxf(a, b); }
};

// Op over the 32 lanes of a warp (butterfly shuffles): every lane receives the result.
template <class Op>
__device__ __forceinline__ float warp_reduce(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = Op::apply(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<SumOp>(v); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce<MaxOp>(v); }

// Op over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32
// floats of shared memory. Every thread receives the result. Starts with a barrier, so
// `scratch` may be reused right after another block reduction.
template <class Op>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_reduce<Op>(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int nwarps = (blockDim.x + 31) >> 5;
    float t = (threadIdx.x < nwarps) ? scratch[threadIdx.x] : Op::identity;
    if (warp == 0) t = warp_reduce<Op>(t);
    if (threadIdx.x == 0) scratch[0] = t;
    __syncthreads();
    return scratch[0];
}
__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce<SumOp>(v, scratch); }
__device__ __forceinline__ float block_max(float v, float* scratch) { return block_reduce<MaxOp>(v, scratch); }

// The largest m of the n values x[0..n) and Σ exp(x − m) over them, reduced by the whole
// block (every thread receives both): a softmax's or a log-sum-exp's row statistics.
template <typename T>
__device__ __forceinline__ void block_max_sumexp(const T* x, int64_t n, float* scratch, float& m, float& s) {
    m = -INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, load(x, j));
    m = block_max(m, scratch);
    s = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += expf(load(x, j) - m);
    s = block_sum(s, scratch);
}

// Loads VEC consecutive elements starting at p[i] as fp32. When VEC elements span whole
// 16-byte words the caller guarantees 16-byte alignment of p + i and they are loaded as
// such; otherwise element by element.
template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* p, int64_t i, float (&v)[VEC]) {
    if constexpr ((VEC * sizeof(T)) % 16 == 0) {
        constexpr int PER_WORD = 16 / sizeof(T);
#pragma unroll
        for (int q = 0; q < VEC / PER_WORD; ++q) {
            const uint4 raw = reinterpret_cast<const uint4*>(p + i)[q];
            const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int k = 0; k < PER_WORD; ++k) v[q * PER_WORD + k] = load(e, k);
        }
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = load(p, i + k);
    }
}

// Stores VEC fp32 values to p[i..i+VEC) in T, with 16-byte stores when they fit.
template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t i, const float (&v)[VEC]) {
    if constexpr ((VEC * sizeof(T)) % 16 == 0) {
        constexpr int PER_WORD = 16 / sizeof(T);
#pragma unroll
        for (int q = 0; q < VEC / PER_WORD; ++q) {
            uint4 raw;
            T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
            for (int k = 0; k < PER_WORD; ++k) store(e, k, v[q * PER_WORD + k]);
            reinterpret_cast<uint4*>(p + i)[q] = raw;
        }
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) store(p, i + k, v[k]);
    }
}

// True when p is 16-byte aligned (fresh allocations are; views at odd offsets may not be).
__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Elements per 16-byte word of T: 8 for bf16, 4 for f32.
template <typename T>
constexpr int vec_width() { return 16 / (int)sizeof(T); }

// Broadcast description of a binary op, up to rank 6: output shape and the element
// strides of each input (0 along broadcast dimensions). Mirrors `cuda::Bcast` in Rust.
struct Bcast {
    int32_t rank;
    int64_t shape[6];
    int64_t sa[6];
    int64_t sb[6];
};

__device__ __forceinline__ void bcast_offsets(const Bcast& b, int64_t i, int64_t& ia, int64_t& ib) {
    ia = 0; ib = 0;
    // Unrolled with constant indices, so the descriptor stays in parameter space.
#pragma unroll
    for (int d = 5; d >= 0; --d) {
        if (d >= b.rank) continue;
        const int64_t q = i / b.shape[d], c = i - q * b.shape[d];
        ia += c * b.sa[d];
        ib += c * b.sb[d];
        i = q;
    }
}

// The innermost dimension of a broadcast: its length and the strides of a and b along it
// (length 1 and strides 0 for rank 0).
__device__ __forceinline__ void bcast_inner(const Bcast& b, int64_t& len, int64_t& sa, int64_t& sb) {
    len = 1; sa = 0; sb = 0;
#pragma unroll
    for (int d = 0; d < 6; ++d)
        if (d == b.rank - 1) {
            len = b.shape[d];
            sa = b.sa[d];
            sb = b.sb[d];
        }
}

// VEC values of a row from p[i]: consecutive (contiguous, 16-byte words when they fit) or
// one value repeated (the input is broadcast along the row).
template <int VEC, typename T>
__device__ __forceinline__ void load_row(const T* p, int64_t i, bool contiguous, float (&v)[VEC]) {
    if (contiguous) {
        load_vec<VEC>(p, i, v);
    } else {
        const float s = load(p, i);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = s;
    }
}
