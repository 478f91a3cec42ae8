// Warpgroup tensor-core instructions of sm_90a (Hopper): wgmma.mma_async with bf16
// operands and fp32 accumulators, its fence / commit / wait, the shared-memory matrix
// descriptor, and fence.proxy.async. Only the forms kernels/attention_wgmma.cu uses:
// m64nNk16 for N = 64 and 128, A and B from shared memory (ss) or A from registers (rs).
//
// A warpgroup is 4 consecutive warps whose first warp index is a multiple of 4; all 128
// threads issue each instruction together. Warp w of the group owns rows 16w..16w+15 of
// the 64-row product, with lane = 4 g + t:
//   D (64 x N fp32, N/2 registers): d[4j + e] = D[16w + g + 8(e/2)][8j + 2t + e%2], the
//     mma.sync C layout of ptx.cuh repeated over the N/8 column tiles;
//   A in registers: the warp's 16 x 16 slice in mma.sync's A layout (ptx.cuh);
//   A and B in shared memory: a 64-bit descriptor (wgmma_desc_sw128) of a tile in the
//     128-byte-swizzle layout. Rows of 128 bytes (64 bf16); the 16-byte chunk c of the
//     row at address r is stored at chunk c ^ ((r / 128) % 8), on absolute shared-window
//     addresses, so tiles start on 1024-byte boundaries. K-major (an N x K operand whose
//     K is contiguous, B of Q K^T): element (n, k) at start + (n % 8) 128 + (n / 8) SBO
//     + 2k; N-major (trans = 1, B of P V, whose N is contiguous): element (n, k) at start
//     + 2 (n % 64) + (n / 64) LBO + (k % 8) 128 + (k / 8) SBO.
// wgmma runs asynchronously: the accumulators and the shared memory it reads may not be
// touched until wgmma_wait<N> has left at most N of this thread's committed groups
// pending; wgmma_fence orders earlier register writes before the next wgmma;
// wgmma_fence_operand keeps the compiler from moving accumulator accesses across the
// asynchronous region. Shared memory written by cp.async (the generic proxy) needs
// fence_proxy_async in each writing thread, then a barrier, before a wgmma reads it.
//
// The CPU emulation (tests/kernel_emu/include/wgmma_emu.h) implements the same functions
// with these layouts: it decodes the descriptors, defers each product's result to its
// wait, and reports a missing fence.
#pragma once
#include "ptx.cuh"

#ifdef SYNTHOS_EMU
#include <wgmma_emu.h>
#else
namespace ptx {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The accumulator operands of the asm statements: d[0..N) as "+f" and the matching
// register list of the instruction text.
#define WG_D8(i)                                                                                           \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
        "+f"(d[i + 7])
#define WG_D32 WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24)
#define WG_D64 WG_D32, WG_D8(32), WG_D8(40), WG_D8(48), WG_D8(56)
#define WG_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d (64 x 64) = A (64 x 16, shared memory, descriptor a) B (64 x 16 as N x K, descriptor b)
// + d when `accumulate`; TA / TB: A M-major / B N-major (1) instead of K-major (0).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_R32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
        : WG_D32
        : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));
}

// The same with A (this warp's 16 rows) in registers, in mma.sync's A layout.
template <int TB>
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_R32 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : WG_D32
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TB));
}

// d (64 x 128) = A (64 x 16, shared memory, descriptor a) B (128 x 16 as N x K, descriptor b)
// + d when `accumulate`; TA / TB: A M-major / B N-major (1) instead of K-major (0).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WG_R64 ", %64, %65, p, 1, 1, %67, %68;\n}\n"
        : WG_D64
        : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));
}

// The same with A (this warp's 16 rows) in registers, in mma.sync's A layout.
template <int TB>
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WG_R64 ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : WG_D64
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TB));
}


template <int N, int TA, int TB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {
    static_assert(N == 64 || N == 128, "wgmma_ss: N is 64 or 128");
    if constexpr (N == 64)
        wgmma_ss_n64<TA, TB>(d, a, b, accumulate);
    else
        wgmma_ss_n128<TA, TB>(d, a, b, accumulate);
}

template <int N, int TB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    static_assert(N == 64 || N == 128, "wgmma_rs: N is 64 or 128");
    if constexpr (N == 64)
        wgmma_rs_n64<TB>(d, a, b, accumulate);
    else
        wgmma_rs_n128<TB>(d, a, b, accumulate);
}
#undef WG_D8
#undef WG_D32
#undef WG_D64
#undef WG_R32
#undef WG_R64
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Keeps the compiler from moving accesses of these registers across this point.
template <int N>
__device__ __forceinline__ void wgmma_fence_operand(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The same for A operands held in registers: fenced after the wait that retires their
// products, they stay live (unreused) while the tensor cores may still read them.
template <int M, int N>
__device__ __forceinline__ void wgmma_fence_operand(uint32_t (&a)[M][N]) {
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

}  // namespace ptx
#endif

namespace ptx {
// The first 1024-byte boundary of the shared window at or after p: the 128-byte swizzle is
// a function of absolute shared-window addresses, repeating every 1024 bytes, so swizzled
// tiles start on such a boundary (a kernel asks for 1024 bytes of slack).
__device__ __forceinline__ unsigned char* align_1024(unsigned char* p) {
    return p + ((1024u - (smem_addr(p) & 1023u)) & 1023u);
}

// The descriptor of a 128-byte-swizzled tile starting at `p` (shared memory, 16-byte
// aligned; the swizzle phase is that of p's absolute address): leading and stride byte
// offsets as above (multiples of 16, below 256 KB).
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* p, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    const uint32_t a = smem_addr(p);
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)((lbo_bytes & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo_bytes & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}
}  // namespace ptx
