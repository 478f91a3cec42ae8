// A diagnostic of the TMA path of attn_fwd_wgmma_ws (sm_90a) on its own: one block of 32
// threads loads one box of a tensor map with cp.async.bulk.tensor into 128-byte-swizzled
// shared memory, waits on its mbarrier and copies the box's 16 KB of shared memory, as the
// bytes lie there, to `out`. The host (cuda::attention::tma_layout_mismatches) encodes the
// map as the attention launcher does (a [B, N, H, Dh] bf16 tensor, boxes of 64 head dims x
// 1 head x 128 tokens) and compares `out` with the layout issue_tile_sw128 writes (token r's
// 16-byte chunk c at chunk c ^ (r % 8) of its 128-byte row), zeros past N. If the
// warp-specialised forward disagrees with the CPU on a GPU, this tells whether the tensor
// maps, the swizzle or the barriers are at fault, or the kernel's logic.
//
// tma_probe_bf16: one block of 32 threads, 16384 + 1024 + 8 bytes of dynamic shared memory
// (the box from the first 1024-byte boundary, then the mbarrier); out [128 * 64] bf16; the
// box's coordinates c0..c3 (head dim, head, token, batch).
#include "tma.cuh"
#include "wgmma.cuh"

extern "C" __global__ void __launch_bounds__(32) tma_probe_bf16(const SYNTHOS_GRID_CONSTANT ptx::TmaMap map, bf16* out,
                                                                int c0, int c1, int c2, int c3) {
#if defined(SYNTHOS_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int BYTES = 128 * 128;  // 128 rows of 64 bf16
    unsigned char* s = ptx::align_1024(dynamic_smem_at_least<BYTES + 1024 + 8>());
    uint64_t* bar = reinterpret_cast<uint64_t*>(s + BYTES);
    if (threadIdx.x == 0) {
        ptx::mbar_init(bar, 1);
        ptx::fence_mbar_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        ptx::mbar_arrive_expect_tx(bar, BYTES);
        ptx::tma_load_4d(s, &map, c0, c1, c2, c3, bar);
    }
    ptx::mbar_wait_or_trap(bar, 0);
    for (int i = threadIdx.x; i < BYTES / 2; i += blockDim.x) out[i] = reinterpret_cast<const bf16*>(s)[i];
#else
    __trap();
#endif
}
