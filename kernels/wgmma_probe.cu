// A diagnostic of the wgmma layouts (sm_90a) on their own: one warpgroup computes
// D (64 x N, fp32) = A B^T from A (64 x K) and B (N x K) bf16, D[m][n] = sum over k of
// A[m][k] B[n][k], in each operand form the attention kernels of attention_wgmma.cu use:
//   form 0: A and B in shared memory, both K-major (ss, tnsp-a 0, tnsp-b 0): S = Q K^T;
//   form 1: A in registers (mma.sync's A layout), B N-major (rs, tnsp-b 1): O += P V;
//   form 2: A M-major and B N-major in shared memory (ss, tnsp-a 1, tnsp-b 1): dQ = dS K;
//   form 3: form 0 over K = 64 in four k-steps, each descriptor's start 32 bytes further
//     into the swizzled 128-byte rows (issue_qk's k-steps 1..3 of a 64-dim panel),
//     accumulating after the first;
//   form 4: form 1 at N = 128 (m64n128k16): B N-major in two 64-column panels, LBO the
//     panel stride (issue_pv at head dim 128);
//   form 5: form 0 at N = 128 (m64n128k16): S = Q K^T of a 128-key tile.
// Forms 0, 1, 2: K = 16, N = 64; form 3: K = 64, N = 64; forms 4, 5: K = 16, N = 128.
// The operands are written to 128-byte-swizzled tiles with plain stores (the layouts of
// kernels/wgmma.cuh), made visible with fence.proxy.async and a barrier. If the attention
// kernels disagree with the CPU on a GPU, this tells whether the layouts themselves are
// wrong (src/cuda/attention.rs, wgmma_layout_errors, runs it; `synthos-engine info`
// reports it on Hopper).
//
// wgmma_probe_bf16: one block of 128 threads, 30 KB + 1024 bytes of dynamic shared memory
// (tiles from the first 1024-byte boundary); a [64 * K] row-major (m, k), b [N * K]
// row-major (n, k), out [64 * N] row-major (m, n); form 0 .. 5.
#include "wgmma.cuh"

#if defined(SYNTHOS_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

// The byte offset of element (r, c) of a tile whose rows r are 128 bytes (64 bf16) long,
// 16-byte chunk c / 8 swizzled with the row within its 8-row (1024-byte) atom.
__device__ __forceinline__ int sw128(int r, int c) { return r * 128 + (((c / 8) ^ (r % 8)) * 16) + (c % 8) * 2; }

// The N-major tiles hold 16 rows (k) per 64-column panel: panel p at p * 2048 bytes, the
// leading byte offset of their descriptors (issue_pv's LBO, ROWS * 128, at ROWS = 16).
constexpr int kPanel = 16 * 128;

// D (this lane's N/2 accumulators, wgmma.cuh's D layout) to out, [64 * N] row-major.
template <int N>
__device__ __forceinline__ void store_d(const float (&d)[N / 2], float* out) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
        const int m = 16 * w + g + 8 * (i % 4 / 2), n = 8 * (i / 4) + 2 * t + i % 2;
        out[m * N + n] = d[i];
    }
}

}  // namespace
#endif

extern "C" __global__ void __launch_bounds__(128) wgmma_probe_bf16(const bf16* a, const bf16* b, float* out,
                                                                   int form) {
#if defined(SYNTHOS_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if (form < 0 || form > 5) __trap();
    unsigned char* s = ptx::align_1024(dynamic_smem_at_least<30720 + 1024>());
    const int K = form == 3 ? 64 : 16, N = form >= 4 ? 128 : 64;
    // K-major A and B: 64 (A) or N (B) rows of 128 bytes, k in the first 2K bytes of each
    // (8 KB and up to 16 KB); N-major B and M-major A (K = 16 only): 16 rows (k) of 128
    // bytes per 64-column panel, n or m across them (B up to two panels, 4 KB; A 2 KB).
    unsigned char *a_k = s, *b_k = s + 8192, *b_n = s + 24576, *a_m = s + 28672;
    for (int i = threadIdx.x; i < 64 * K; i += blockDim.x) {
        const int m = i / K, k = i % K;
        *reinterpret_cast<bf16*>(a_k + sw128(m, k)) = a[i];
        if (K == 16) *reinterpret_cast<bf16*>(a_m + sw128(k, m)) = a[i];
    }
    for (int i = threadIdx.x; i < N * K; i += blockDim.x) {
        const int n = i / K, k = i % K;
        *reinterpret_cast<bf16*>(b_k + sw128(n, k)) = b[i];
        if (K == 16) *reinterpret_cast<bf16*>(b_n + (n / 64) * kPanel + sw128(k, n % 64)) = b[i];
    }
    ptx::fence_proxy_async();  // the stores, visible to the tensor cores
    __syncthreads();
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // A in registers for forms 1 and 4 (K = 16), in mma.sync's A layout: this lane's rows g,
    // g+8 of its warp's 16, columns 2t, 2t+1 (registers 0, 1) and 2t+8, 2t+9 (registers 2,
    // 3). Packed before the fence (every form's a holds at least 64 x 16 elements).
    const auto pair = [&](int m, int k) {
        return ptx::pack_bf16(__bfloat162float(a[m * 16 + k]), __bfloat162float(a[m * 16 + k + 1]));
    };
    const int r0 = 16 * w + g;
    const uint32_t ar[4] = {pair(r0, 2 * t), pair(r0 + 8, 2 * t), pair(r0, 2 * t + 8), pair(r0 + 8, 2 * t + 8)};
    float d[32], e[64];  // D at N = 64 and N = 128
    ptx::wgmma_fence();
    // Descriptors as the attention kernels build them: SBO 1024 (8-row groups); LBO unused
    // for K-major (16), the 64-column panel stride for M/N-major.
    if (form == 0) {
        ptx::wgmma_ss<64, 0, 0>(d, ptx::wgmma_desc_sw128(a_k, 16, 1024), ptx::wgmma_desc_sw128(b_k, 16, 1024), 0);
    } else if (form == 1) {
        ptx::wgmma_rs<64, 1>(d, ar, ptx::wgmma_desc_sw128(b_n, kPanel, 1024), 0);
    } else if (form == 2) {
        ptx::wgmma_ss<64, 1, 1>(d, ptx::wgmma_desc_sw128(a_m, kPanel, 1024), ptx::wgmma_desc_sw128(b_n, kPanel, 1024),
                                0);
    } else if (form == 3) {
        // issue_qk's k-steps: 16 k (32 bytes) each, the start advancing within the swizzled
        // rows (the swizzle applies to the absolute address the start is part of).
#pragma unroll
        for (int j = 0; j < 4; ++j)
            ptx::wgmma_ss<64, 0, 0>(d, ptx::wgmma_desc_sw128(a_k + 32 * j, 16, 1024),
                                    ptx::wgmma_desc_sw128(b_k + 32 * j, 16, 1024), j > 0);
    } else if (form == 4) {
        ptx::wgmma_rs<128, 1>(e, ar, ptx::wgmma_desc_sw128(b_n, kPanel, 1024), 0);
    } else {
        ptx::wgmma_ss<128, 0, 0>(e, ptx::wgmma_desc_sw128(a_k, 16, 1024), ptx::wgmma_desc_sw128(b_k, 16, 1024), 0);
    }
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    if (N == 64) {
        ptx::wgmma_fence_operand(d);
        store_d<64>(d, out);
    } else {
        ptx::wgmma_fence_operand(e);
        store_d<128>(e, out);
    }
#else
    __trap();
#endif
}
