// A diagnostic of the wgmma layouts (sm_90a) on their own: one warpgroup computes
// D (64 x 64, fp32) = A B^T from A (64 x 16) and B (64 x 16) bf16, D[m][n] = sum over k of
// A[m][k] B[n][k], in each operand form the attention kernels of attention_wgmma.cu use:
//   form 0: A and B in shared memory, both K-major (ss, tnsp-a 0, tnsp-b 0): S = Q K^T;
//   form 1: A in registers (mma.sync's A layout), B N-major (rs, tnsp-b 1): O += P V;
//   form 2: A M-major and B N-major in shared memory (ss, tnsp-a 1, tnsp-b 1): dQ = dS K.
// The operands are written to 128-byte-swizzled tiles with plain stores (the layouts of
// kernels/wgmma.cuh), made visible with fence.proxy.async and a barrier. If the attention
// kernels disagree with the CPU on a GPU, this tells whether the layouts themselves are
// wrong (src/cuda/probe.rs runs it; `synthos-engine info` reports it on Hopper).
//
// wgmma_probe_bf16: one block of 128 threads, 20 KB + 1024 bytes of dynamic shared memory
// (tiles from the first 1024-byte boundary); a [64 * 16] row-major (m, k), b [64 * 16]
// row-major (n, k), out [64 * 64] row-major (m, n); form 0, 1 or 2.
#include "wgmma.cuh"

#if defined(SYNTHOS_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

// The byte offset of element (r, c) of a tile whose rows r are 128 bytes (64 bf16) long,
// 16-byte chunk c / 8 swizzled with the row within its 8-row (1024-byte) atom.
__device__ __forceinline__ int sw128(int r, int c) { return r * 128 + (((c / 8) ^ (r % 8)) * 16) + (c % 8) * 2; }

}  // namespace
#endif

extern "C" __global__ void __launch_bounds__(128) wgmma_probe_bf16(const bf16* a, const bf16* b, float* out,
                                                                   int form) {
#if defined(SYNTHOS_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    unsigned char* s = ptx::align_1024(dynamic_smem_at_least<20480 + 1024>());
    // K-major A and B: 64 rows (m or n) of 128 bytes, k in the first 32 of each (8 KB each);
    // N-major B and M-major A: 16 rows (k) of 128 bytes, n or m across them (2 KB each).
    unsigned char *a_k = s, *b_k = s + 8192, *b_n = s + 16384, *a_m = s + 18432;
    for (int i = threadIdx.x; i < 64 * 16; i += blockDim.x) {
        const int x = i / 16, k = i % 16;  // m (of a) or n (of b), and k
        *reinterpret_cast<bf16*>(a_k + sw128(x, k)) = a[i];
        *reinterpret_cast<bf16*>(b_k + sw128(x, k)) = b[i];
        *reinterpret_cast<bf16*>(b_n + sw128(k, x)) = b[i];
        *reinterpret_cast<bf16*>(a_m + sw128(k, x)) = a[i];
    }
    ptx::fence_proxy_async();  // the stores, visible to the tensor cores
    __syncthreads();
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float d[32];
    ptx::wgmma_fence();
    // Descriptors as the attention kernels build them: SBO 1024 (8-row groups); LBO unused
    // for K-major, the 64-column panel stride for M/N-major (one panel here).
    if (form == 0) {
        ptx::wgmma_ss<64, 0, 0>(d, ptx::wgmma_desc_sw128(a_k, 16, 1024), ptx::wgmma_desc_sw128(b_k, 16, 1024), 0);
    } else if (form == 1) {
        // mma.sync's A layout: this lane's rows g, g+8 of its warp's 16, columns 2t, 2t+1
        // (registers 0, 1) and 2t+8, 2t+9 (registers 2, 3).
        const auto pair = [&](int m, int k) {
            return ptx::pack_bf16(__bfloat162float(a[m * 16 + k]), __bfloat162float(a[m * 16 + k + 1]));
        };
        const int r0 = 16 * w + g;
        const uint32_t ar[4] = {pair(r0, 2 * t), pair(r0 + 8, 2 * t), pair(r0, 2 * t + 8), pair(r0 + 8, 2 * t + 8)};
        ptx::wgmma_rs<64, 1>(d, ar, ptx::wgmma_desc_sw128(b_n, 2048, 1024), 0);
    } else {
        ptx::wgmma_ss<64, 1, 1>(d, ptx::wgmma_desc_sw128(a_m, 2048, 1024), ptx::wgmma_desc_sw128(b_n, 2048, 1024), 0);
    }
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::wgmma_fence_operand(d);
    for (int i = 0; i < 32; ++i) {
        const int m = 16 * w + g + 8 * (i % 4 / 2), n = 8 * (i / 4) + 2 * t + i % 2;
        out[m * 64 + n] = d[i];
    }
#else
    __trap();
#endif
}
