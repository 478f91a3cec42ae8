// Warp-level tensor-core and asynchronous-copy instructions of sm_80 (also on sm_90):
// mma.sync m16n8k16 (bf16 in, fp32 accumulate), ldmatrix and cp.async, as inline
// functions. Their register layouts are the ones the PTX ISA specifies, which kernels
// rely on (unlike WMMA's opaque fragments). With lane = 4 g + t (g = lane / 4 the
// "group", t = lane % 4):
//   mma A (16 x 16, row-major), 4 registers of 2 bf16 (lower index in the low half):
//     a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//   mma B (16 x 8, k x n), 2 registers: b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   mma C/D (16 x 8 fp32): d[0], d[1] = D[g][2t, 2t+1], d[2], d[3] = D[g+8][2t, 2t+1]
//   ldmatrix .x4: lanes 8m .. 8m+7 give the shared-memory addresses of rows 0..7 of 8x8
//     matrix m (16 bytes each, 16-byte aligned); register m of lane l receives row l/4,
//     columns 2(l%4), 2(l%4)+1 of matrix m (.trans: rows 2(l%4), 2(l%4)+1 of column l/4).
//   cp.async: 16 bytes global -> shared (zero-filled when the source is out of range),
//     complete for the issuing thread after cp_async_wait<N> leaves at most N of its
//     committed groups pending; other threads see them after a barrier.
//
// The CPU emulation (tests/kernel_emu/include/ptx_emu.h) implements the same functions
// with the same layouts: g++ cannot assemble PTX, so this is the one place that chooses.
#pragma once
#include "common.cuh"

#ifdef SYNTHOS_EMU
#include <ptx_emu.h>
#else
namespace ptx {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// d += A B for one m16n8k16 tile (layouts above).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8x8 b16 matrices from shared memory; `row` is this lane's row address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// The same, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// Copies 16 bytes from global `src` to shared `dst` asynchronously, or writes 16 zero
// bytes when `in_range` is false (src is then not read, but must be a valid address).
// Both addresses must be 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool in_range) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(in_range ? 16 : 0)
                 : "memory");
}

// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace ptx
#endif

namespace ptx {
// Two floats as bf16 in one register, `lo` in the low half (the mma operand order).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, sizeof r);
    return r;
}

// The A operand (16 x 16, bf16) holding two adjacent 16 x 8 fp32 accumulators, columns
// 0..7 from `left` and 8..15 from `right`: with the layouts above, a lane's accumulator
// elements are exactly its A elements, so this is a repack in registers.
__device__ __forceinline__ void acc_to_a(const float (&left)[4], const float (&right)[4], uint32_t (&a)[4]) {
    a[0] = pack_bf16(left[0], left[1]);
    a[1] = pack_bf16(left[2], left[3]);
    a[2] = pack_bf16(right[0], right[1]);
    a[3] = pack_bf16(right[2], right[3]);
}
}  // namespace ptx
