// The PTX instructions of kernels/ptx.cuh (mma.sync m16n8k16 bf16, ldmatrix, cp.async)
// for the CPU emulation (emu.h), with the register layouts the PTX ISA specifies (listed
// in kernels/ptx.cuh). Unlike WMMA's fragments (mma.h), these layouts are architectural,
// so the emulation uses the real ones: a kernel that gets a layout wrong computes wrong
// values here as on the GPU.
//
//   * mma_bf16_16816 and ldmatrix_x4[_trans] are warp collectives (every lane, whole
//     warp). mma: each lane publishes its A and B registers; each lane then forms its four
//     D elements as C + the 16 products in f32, k ascending (a tensor core's order and
//     internal rounding are unspecified). ldmatrix: each lane publishes its row address,
//     which must be 16-byte aligned and lie inside the block's dynamic shared memory.
//   * cp.async copies are deferred: the 16 source bytes are read when the copy is issued
//     (zeros when out of range; the source is then not read), the destination is poisoned
//     (0xFF) at once and written only when cp_async_wait completes the copy's group. So a
//     kernel that reads a tile before waiting for it sees poison, and one that refills a
//     buffer another warp may still be reading races with that read (ThreadSanitizer).
//     A thread that ends with copies it never waited for is a kernel error.
//   * Across warps: a cp.async into 16 bytes another warp read by ldmatrix since the last
//     __syncthreads, or an ldmatrix of 16 bytes another warp has a cp.async into since
//     then, is reported as a race whatever the order the emulation ran them in.
#pragma once
#include "cuda_bf16.h"

namespace ptx {

namespace detail {

// Who touched each 16-byte chunk of the block's dynamic shared memory through these
// instructions since the toucher's last __syncthreads: the block-barrier phase and a mask
// of the warps. A cp.async into a chunk that another warp read by ldmatrix in the same
// phase (no barrier between them), or an ldmatrix of a chunk another warp has a cp.async
// into in the same phase, is a race on the GPU whatever the timing, and is reported as a
// kernel error. (ThreadSanitizer sees these too, but keeps only four accesses per 8 bytes,
// and an ldmatrix row is read by many lanes of every warp.) So is any read (ldmatrix, a
// wgmma operand) of a chunk whose cp.async is still in flight, barriers or not: the copy
// lands at some moment before its thread's wait, and the emulation lands it only at the
// wait. The records live in emu::launch_ctx, fresh for every block.
//
// Records that the calling thread's warp uses the 16 bytes at `p` (in dynamic shared
// memory, checked), and fails if another warp used them the other way in the same phase.
inline void record_use(const char* what, const void* p, bool write) {
    constexpr auto relaxed = std::memory_order_relaxed;
    const emu::ThreadContext& t = emu::self(what);
    const size_t chunk = (size_t)(reinterpret_cast<const unsigned char*>(p) - emu::dynamic_smem()) / 16;
    const uint64_t me = 1ull << (t.linear / 32 % 64);
    const emu::SmemUse& other = write ? emu::launch_ctx.smem_reads[chunk] : emu::launch_ctx.smem_writes[chunk];
    const uint64_t others = other.warps.load(relaxed) & ~me;
    if (other.phase.load(relaxed) == t.block_phase && others != 0)
        emu::fail("%s %s shared memory at offset %zu that warp(s) %#llx %s since the last __syncthreads: a race", what,
                  write ? "overwrites" : "reads", chunk * 16, (unsigned long long)others,
                  write ? "read" : "are copying into");
    if (!write) {
        const emu::SmemUse& w = emu::launch_ctx.smem_writes[chunk];
        const unsigned copier = w.inflight.load(relaxed);
        if (copier != 0)
            emu::fail("%s reads shared memory at offset %zu that a cp.async of thread %u, still in flight, will "
                      "overwrite: a race whatever the barriers (the copy may land at any time before its wait)",
                      what, chunk * 16, copier - 1);
        const unsigned landed = w.landed_phase.load(relaxed), by = w.landed_by.load(relaxed);
        if (landed != ~0u && landed >= t.block_phase && by != 0 && (by - 1) / 32 != t.linear / 32)
            emu::fail("%s reads shared memory at offset %zu whose cp.async thread %u completed (its wait) after the "
                      "last __syncthreads this warp passed: a race (the copy may land after the read)",
                      what, chunk * 16, by - 1);
    }
    emu::SmemUse& mine = write ? emu::launch_ctx.smem_writes[chunk] : emu::launch_ctx.smem_reads[chunk];
    if (mine.phase.load(relaxed) != t.block_phase) {
        mine.phase.store(t.block_phase, relaxed);
        mine.warps.store(0, relaxed);
    }
    mine.warps.fetch_or(me, relaxed);
}

inline void check_smem(const char* what, const void* p, unsigned bytes) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    const auto base = reinterpret_cast<uintptr_t>(emu::dynamic_smem());
    if (a % 16 != 0) emu::fail("%s: shared-memory address %p is not 16-byte aligned", what, p);
    if (base == 0 || a < base || a + bytes > base + emu::dynamic_smem_bytes())
        emu::fail("%s: address %p is outside the block's dynamic shared memory (%u bytes at %p)", what, p,
                  emu::dynamic_smem_bytes(), emu::dynamic_smem());
}

// The emulation's shared window: dynamic shared memory starts at this address (not a
// multiple of 1024, so kernels that need 1024-byte-aligned tiles must align them).
constexpr unsigned kSharedBase = 0x80;

inline float bf16_bits(uint32_t bits) {
    const uint32_t u = bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
inline float lo(uint32_t r) { return bf16_bits(r & 0xffffu); }
inline float hi(uint32_t r) { return bf16_bits(r >> 16); }

template <bool TRANS>
inline void ldmatrix(uint32_t (&r)[4], const void* row, const char* what, const emu::Loc& loc) {
    emu::ThreadContext& self = emu::warp_collective(0xffffffffu, what);
    emu::Warp& w = *self.warp;
    const unsigned p = self.warp_phase & 1, lane = self.lane;
    w.exchange[p][lane] = reinterpret_cast<uintptr_t>(row);
    emu::warp_wait(self, what, loc);
    const unsigned g = lane / 4, t = lane % 4;
    for (unsigned m = 0; m < 4; ++m) {
        uint16_t e[2];
        for (unsigned k = 0; k < 2; ++k) {
            const unsigned rr = TRANS ? 2 * t + k : g, cc = TRANS ? g : 2 * t + k;  // (row, column) of matrix m
            const auto* src = reinterpret_cast<const unsigned char*>(w.exchange[p][8 * m + rr]);
            check_smem(what, src, 16);
            record_use(what, src, false);
            memcpy(&e[k], src + 2 * cc, 2);
        }
        r[m] = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
    }
}

}  // namespace detail

// The shared-window address of `p` (in the block's dynamic shared memory), as cvta.
inline unsigned smem_addr(const void* p) {
    const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(emu::dynamic_smem());
    if (base == 0 || a < base || a > base + emu::dynamic_smem_bytes())
        emu::fail("smem_addr: %p is outside the block's dynamic shared memory", p);
    return detail::kSharedBase + (unsigned)(a - base);
}

inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                           const emu::Loc& loc = emu::Loc::current()) {
    const char* what = "mma.sync.m16n8k16";
    emu::ThreadContext& self = emu::warp_collective(0xffffffffu, what);
    emu::Warp& w = *self.warp;
    const unsigned p = self.warp_phase & 1;
    uint32_t* mine = w.mma16816[p][self.lane];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    mine[4] = b[0];
    mine[5] = b[1];
    emu::warp_wait(self, what, loc);
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const uint32_t* r = w.mma16816[p][l];
        const unsigned g = l / 4, t = l % 4;
        for (unsigned k = 0; k < 2; ++k) {
            const auto pick = [&](uint32_t v) { return k == 0 ? detail::lo(v) : detail::hi(v); };
            A[g][2 * t + k] = pick(r[0]);
            A[g + 8][2 * t + k] = pick(r[1]);
            A[g][2 * t + 8 + k] = pick(r[2]);
            A[g + 8][2 * t + 8 + k] = pick(r[3]);
            B[2 * t + k][g] = pick(r[4]);
            B[2 * t + 8 + k][g] = pick(r[5]);
        }
    }
    const unsigned g = self.lane / 4, t = self.lane % 4;
    for (unsigned e = 0; e < 4; ++e) {
        const unsigned row = g + 8 * (e / 2), col = 2 * t + e % 2;
        float s = d[e];
        for (unsigned k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        d[e] = s;
    }
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, const emu::Loc& loc = emu::Loc::current()) {
    detail::ldmatrix<false>(r, row, "ldmatrix.x4", loc);
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row, const emu::Loc& loc = emu::Loc::current()) {
    detail::ldmatrix<true>(r, row, "ldmatrix.x4.trans", loc);
}

inline void cp_async_16(void* dst, const void* src, bool in_range) {
    emu::ThreadContext& self = emu::self("cp.async");
    detail::check_smem("cp.async", dst, 16);
    detail::record_use("cp.async", dst, true);
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::fail("cp.async: source %p is not 16-byte aligned", src);
    if (self.async_pending == emu::ThreadContext::kMaxAsyncCopies)
        emu::fail("cp.async: more than %u copies in flight in one thread (the emulation's limit)",
                  emu::ThreadContext::kMaxAsyncCopies);
    auto& c = self.async_copies[self.async_pending++];
    c.dst = dst;
    c.group = self.async_committed;
    if (in_range)
        memcpy(c.bytes, src, 16);
    else
        memset(c.bytes, 0, 16);
    memset(dst, 0xFF, 16);  // in flight: undefined until the wait (and a write other threads race with)
    const size_t chunk = (size_t)(static_cast<unsigned char*>(dst) - emu::dynamic_smem()) / 16;
    emu::launch_ctx.smem_writes[chunk].inflight.store(self.linear + 1, std::memory_order_relaxed);
}

inline void cp_async_commit() { ++emu::self("cp.async.commit_group").async_committed; }

template <int N>
inline void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a count of groups");
    emu::ThreadContext& self = emu::self("cp.async.wait_group");
    unsigned kept = 0;
    for (unsigned i = 0; i < self.async_pending; ++i) {
        auto& c = self.async_copies[i];
        if (c.group + N < self.async_committed) {  // among the groups the wait completes
            memcpy(c.dst, c.bytes, 16);
            // Written through the generic proxy: the tensor cores may read it only after
            // this thread's fence.proxy.async (wgmma_emu.h).
            const unsigned chunk = (unsigned)((static_cast<unsigned char*>(c.dst) - emu::dynamic_smem()) / 16);
            emu::launch_ctx.smem_writes[chunk].inflight.store(0, std::memory_order_relaxed);
            emu::launch_ctx.smem_writes[chunk].landed_phase.store(self.block_phase, std::memory_order_relaxed);
            emu::launch_ctx.smem_writes[chunk].landed_by.store(self.linear + 1, std::memory_order_relaxed);
            emu::launch_ctx.smem_writes[chunk].unfenced.store(self.linear + 1, std::memory_order_relaxed);
            self.unfenced_chunks.push_back(chunk);
        } else
            self.async_copies[kept++] = c;
    }
    self.async_pending = kept;
}

}  // namespace ptx
