// Hopper's (sm_90a) asynchronous data movement and intra-block scheduling, as inline
// functions: the tensor memory accelerator (TMA: cp.async.bulk.tensor), the shared-memory
// transaction barriers it signals (mbarrier), named barriers over part of a block
// (bar.sync / bar.arrive with an id and a thread count) and the warpgroup register
// reallocation (setmaxnreg). kernels/attention_wgmma.cu's warp-specialised forward uses
// them: a producer warpgroup loads tiles with TMA, consumer warpgroups compute.
//
//   * TmaMap: the 128-byte tensor map (CUtensorMap) the host encodes with
//     cuTensorMapEncodeTiled (src/cuda/attention.rs) and passes by value as a
//     `const __grid_constant__` kernel parameter; kernels pass its address.
//   * tma_load_4d(dst, map, c0..c3, bar): one box of the map's 4-d tensor at coordinates
//     (c0 innermost) to shared memory at dst (1024-byte aligned for the 128-byte swizzle,
//     which the map chooses), out-of-range elements zero-filled; its bytes count against
//     the transaction count of mbarrier `bar` when they land. Issued by one thread.
//   * An mbarrier (8 bytes of shared memory, 8-byte aligned): mbar_init(bar, n) by one
//     thread, then fence_mbar_init and a block barrier before any other use. A phase
//     completes when it has had n arrivals (mbar_arrive, mbar_arrive_expect_tx) and every
//     transaction byte announced with mbar_arrive_expect_tx has landed. mbar_wait(bar, p)
//     returns once the phase of parity p has completed: phases alternate in parity from 0,
//     and before the first completion the (virtual) phase of parity 1 counts as complete,
//     so a producer's first wait for a free stage passes at once. mbar_wait_or_trap traps
//     after two seconds of waiting instead of hanging.
//   * named_bar_sync(id, n) waits until n threads (whole warps) have arrived at barrier id
//     (1..15; 0 is __syncthreads) through named_bar_sync or named_bar_arrive, which does
//     not wait.
//   * setmaxnreg_dec<N> / setmaxnreg_inc<N>: the warpgroup gives registers back to the SM
//     or takes them, N per thread (a multiple of 8, 24..256); all 128 threads execute it.
//
// The CPU emulation (tests/kernel_emu/include/tma_emu.h) implements the same functions:
// it keeps each mbarrier's phase and counts, lands a TMA copy only when a thread waits on
// its barrier (its destination reads as poison until then), blocks waiting threads in
// the scheduler, and reports barriers that can never complete.
#pragma once
#include "ptx.cuh"

#ifdef SYNTHOS_EMU
#include <tma_emu.h>
#else
#define SYNTHOS_GRID_CONSTANT __grid_constant__
namespace ptx {

struct alignas(128) TmaMap {
    unsigned long long words[16];
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Makes the initialised barriers visible to the other threads and the async proxy (with
// the block barrier that follows).
__device__ __forceinline__ void fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Announces `bytes` of transactions for the current phase, then arrives.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, unsigned parity) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    return done != 0;
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
    while (!mbar_try_wait(bar, parity)) {
    }
}

// The GPU's nanosecond clock (%globaltimer; it advances in steps of up to a microsecond).
__device__ __forceinline__ uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
    return t;
}

// The same, but a phase that has not completed two seconds after the first failed poll
// (no wait of these kernels lasts more than milliseconds) traps instead of hanging: a
// kernel error the host reports, where a hang would cost a GPU run the minutes until its
// timeout. The clock is read once per 4096 polls: how long one try_wait suspends the
// thread is up to the hardware, so a count of polls alone bounds nothing. For threads
// with registers to spare (a producer): the clock costs the compute warpgroups' wgmma
// their registers.
__device__ __forceinline__ void mbar_wait_or_trap(uint64_t* bar, unsigned parity) {
    if (mbar_try_wait(bar, parity)) return;
    const uint64_t start = global_timer_ns();
    for (uint32_t polls = 1; !mbar_try_wait(bar, parity); ++polls)
        if ((polls & 4095u) == 0 && global_timer_ns() - start > 2000000000ull) __trap();
}

__device__ __forceinline__ void tma_load_4d(void* dst, const TmaMap* map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
        "%5}], [%6];\n" ::"r"(smem_addr(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
        : "memory");
}

__device__ __forceinline__ void named_bar_sync(unsigned id, unsigned threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_bar_arrive(unsigned id, unsigned threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace ptx
#endif
