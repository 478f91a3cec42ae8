// The warpgroup instructions of kernels/wgmma.cuh (wgmma.mma_async m64nNk16 bf16 -> fp32,
// its fence / commit / wait, fence.proxy.async) for the CPU emulation, with the layouts
// wgmma.cuh lists (the PTX ISA's): the descriptors are decoded as the tensor cores decode
// them, 128-byte swizzle on absolute shared-window addresses included (the emulation's
// window starts at ptx::detail::kSharedBase, which is not 1024-aligned).
//
//   * Each warp computes its own 16 rows of the 64-row product (a warp collective: lanes
//     publish their A registers); each lane forms its N/2 accumulators as C + the 16
//     products in f32, k ascending.
//   * Products are asynchronous, as on the GPU: the result is computed at issue, the
//     accumulator registers are poisoned (NaN) at once and written only by the
//     wgmma_wait that completes the product's group, so a kernel that reads them early
//     computes NaN. The wait recomputes the product and fails if the shared memory it
//     read changed in between (a tile refilled while a product was in flight).
//   * A product needs a wgmma_fence since the thread's last wait (or its start); its
//     shared memory may not hold cp.async data whose writer has not run fence_proxy_async
//     since, nor bytes written by ordinary stores since the block's last
//     fence_proxy_async (the emulation keeps the tensor cores' view of shared memory, a
//     copy refreshed at every fence: a fence by any thread refreshes it, so it catches a
//     missing fence, not one run by the wrong thread); its reads count for the cross-warp
//     race check of ptx_emu.h, at issue and at the wait. A thread that ends with products
//     never waited for is a kernel error.
//   * Descriptors: only the 128-byte swizzle with base offset 0 (what the kernels use).
#pragma once
#include "ptx_emu.h"

#include <vector>

namespace ptx {

namespace detail {

struct WgDesc {
    unsigned start, lbo, sbo;  // bytes
};

inline WgDesc decode_desc(uint64_t d, const char* what) {
    const unsigned swizzle = (unsigned)(d >> 62), base_offset = (unsigned)(d >> 49) & 7u;
    if (swizzle != 1)
        emu::fail("%s: descriptor %#llx has swizzle mode %u; the emulation supports the 128-byte swizzle (1) only", what,
                  (unsigned long long)d, swizzle);
    if (base_offset != 0)
        emu::fail("%s: descriptor %#llx has base offset %u; the emulation supports 0 only", what,
                  (unsigned long long)d, base_offset);
    return {(unsigned)(d & 0x3FFF) << 4, (unsigned)((d >> 16) & 0x3FFF) << 4, (unsigned)((d >> 32) & 0x3FFF) << 4};
}

// The window address of element (mn, k), k < 16, of a bf16 operand: K-major (trans 0) or
// M/N-major (trans 1), then the 128-byte swizzle (16-byte chunk ^= 128-byte row % 8).
inline unsigned wg_element_addr(const WgDesc& d, unsigned mn, unsigned k, int trans) {
    const unsigned a = trans == 0 ? d.start + (mn % 8) * 128 + (mn / 8) * d.sbo + 2 * k
                                  : d.start + 2 * (mn % 64) + (mn / 64) * d.lbo + (k % 8) * 128 + (k / 8) * d.sbo;
    return a ^ (((a >> 7) & 7u) << 4);
}

// The block's dynamic shared memory at window address `addr`, checked.
inline unsigned char* wg_shared(unsigned addr, const char* what) {
    if (addr < kSharedBase || addr - kSharedBase + 2 > emu::dynamic_smem_bytes())
        emu::fail("%s: a descriptor addresses %#x, outside the block's dynamic shared memory (%u bytes at %#x)", what,
                  addr, emu::dynamic_smem_bytes(), kSharedBase);
    return emu::dynamic_smem() + (addr - kSharedBase);
}

inline float wg_operand(const WgDesc& d, unsigned mn, unsigned k, int trans, const char* what) {
    uint16_t bits;
    memcpy(&bits, wg_shared(wg_element_addr(d, mn, k, trans), what), 2);
    return bf16_bits(bits);
}

// The tensor cores' view of shared memory (launch_ctx.async_view): refreshed from the
// block's shared memory by fence.proxy.async, compared with it by wgmma reads. Neither is
// instrumented: the copy reads every thread's bytes, which is not an access the kernel
// makes (ThreadSanitizer would call it a race), and the loop is kept from becoming a call
// to the (intercepted) memcpy.
__attribute__((no_sanitize("thread", "address"), optimize("no-tree-loop-distribute-patterns"))) inline void
refresh_async_view() {
    volatile unsigned char* view = emu::launch_ctx.async_view;
    const unsigned char* smem = emu::dynamic_smem();
    for (unsigned i = 0, n = emu::dynamic_smem_bytes(); i < n; ++i) view[i] = smem[i];
}

__attribute__((no_sanitize("thread", "address"))) inline bool async_view_differs(const unsigned char* p) {
    const size_t off = (size_t)(p - emu::dynamic_smem());
    const volatile unsigned char* view = emu::launch_ctx.async_view;
    return view[off] != p[0] || view[off + 1] != p[1];
}

// Every element of rows mn0 .. mn0+rows-1 (all 16 k): no cp.async data its writer has not
// fenced, no bytes stored since the last fence, and the warp's reads recorded for the
// race check.
inline void wg_touch(uint64_t desc, unsigned mn0, unsigned rows, int trans, const char* what) {
    const WgDesc d = decode_desc(desc, what);
    for (unsigned mn = mn0; mn < mn0 + rows; ++mn)
        for (unsigned k = 0; k < 16; ++k) {
            const unsigned char* p = wg_shared(wg_element_addr(d, mn, k, trans), what);
            const size_t chunk = (size_t)(p - emu::dynamic_smem()) / 16;
            const unsigned writer = emu::launch_ctx.smem_writes[chunk].unfenced.load(std::memory_order_relaxed);
            if (writer != 0)
                emu::fail("%s reads shared memory at offset %zu that thread %u wrote by cp.async and has not made "
                          "visible to the tensor cores (fence.proxy.async)",
                          what, chunk * 16, writer - 1);
            if (async_view_differs(p))
                emu::fail("%s reads shared memory at offset %zu that was stored to (st.shared, the generic proxy) "
                          "after the block's last fence.proxy.async: the tensor cores may not see it",
                          what, (size_t)(p - emu::dynamic_smem()));
            record_use(what, emu::dynamic_smem() + chunk * 16, false);
        }
}

using WgOp = emu::ThreadContext::Wgmma;

// This lane's two rows (g, g+8 of its warp's 16) of A from the descriptor.
inline void wg_rows_of_a(const WgOp& op, const emu::ThreadContext& self, float (&a)[2][16], const char* what) {
    const WgDesc d = decode_desc(op.a_desc, what);
    const unsigned w = self.linear / 32 % 4;
    for (unsigned r = 0; r < 2; ++r)
        for (unsigned k = 0; k < 16; ++k) a[r][k] = wg_operand(d, 16 * w + self.lane / 4 + 8 * r, k, op.trans_a, what);
}

// out = in + A B for this lane's accumulators.
inline void wg_product(const WgOp& op, const float (&a)[2][16], const emu::ThreadContext& self, float* out,
                       const char* what) {
    const WgDesc b = decode_desc(op.b_desc, what);
    const unsigned t = self.lane % 4;
    for (unsigned i = 0; i < op.n; ++i) {
        const unsigned r = i % 4 / 2, col = 8 * (i / 4) + 2 * t + i % 2;
        float s = op.in[i];
        for (unsigned k = 0; k < 16; ++k) s += a[r][k] * wg_operand(b, col, k, op.trans_b, what);
        out[i] = s;
    }
}

// The reads a warp's product makes: its 16 rows of A (when in shared memory) and all of B.
inline void wg_touch_all(const WgOp& op, const emu::ThreadContext& self, const char* what) {
    if (!op.a_in_regs) wg_touch(op.a_desc, 16 * (self.linear / 32 % 4), 16, op.trans_a, what);
    wg_touch(op.b_desc, 0, 2 * op.n, op.trans_b, what);
}

inline void wgmma_issue(float* d, unsigned n, const uint32_t* a_regs, uint64_t a_desc, uint64_t b_desc, int trans_a,
                        int trans_b, int accumulate, const char* what, const emu::Loc& loc) {
    emu::ThreadContext& self = emu::warp_collective(0xffffffffu, what);
    const dim3 blk = emu::launch_ctx.block;
    if ((blk.x * blk.y * blk.z) % 128 != 0)
        emu::fail("%s in a block of %u threads: wgmma needs whole warpgroups (multiples of 128 threads)", what,
                  blk.x * blk.y * blk.z);
    if (!self.wgmma_fenced)
        emu::fail("%s without a wgmma.fence since this thread's last wgmma.wait_group (or its start)", what);
    emu::Warp& w = *self.warp;
    const unsigned p = self.warp_phase & 1;
    if (a_regs != nullptr)
        for (int i = 0; i < 4; ++i) w.mma16816[p][self.lane][i] = a_regs[i];
    emu::warp_wait(self, what, loc);

    WgOp op{};
    op.d = d;
    op.n = n;
    op.group = self.wgmma_committed;
    op.a_desc = a_desc;
    op.b_desc = b_desc;
    op.a_in_regs = a_regs != nullptr;
    op.trans_a = trans_a;
    op.trans_b = trans_b;
    if (a_regs != nullptr) {
        // mma.sync's A layout: row r, column k is in lane 4 (r % 8) + (k % 8) / 2, register
        // (r / 8) + 2 (k / 8), half k % 2.
        for (unsigned r = 0; r < 2; ++r) {
            const unsigned row = self.lane / 4 + 8 * r;
            for (unsigned k = 0; k < 16; ++k) {
                const uint32_t reg = w.mma16816[p][4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)];
                op.a[r][k] = k % 2 == 0 ? lo(reg) : hi(reg);
            }
        }
    } else {
        wg_rows_of_a(op, self, op.a, what);
    }
    // The accumulators going in: the latest pending product on the same registers, else
    // the registers themselves.
    const WgOp* prev = nullptr;
    for (const WgOp& o : self.wgmma_ops)
        if (o.d == d) prev = &o;
    for (unsigned i = 0; i < n; ++i) op.in[i] = !accumulate ? 0.f : prev != nullptr ? prev->out[i] : d[i];
    wg_product(op, op.a, self, op.out, what);
    for (unsigned i = 0; i < n; ++i) d[i] = NAN;  // undefined until the wait
    if (self.lane == 0) wg_touch_all(op, self, what);
    self.wgmma_ops.push_back(op);
}

}  // namespace detail

inline void wgmma_fence() { emu::self("wgmma.fence").wgmma_fenced = true; }

inline void wgmma_commit() { ++emu::self("wgmma.commit_group").wgmma_committed; }

template <int N>
inline void wgmma_wait() {
    static_assert(N >= 0, "wgmma.wait_group takes a count of groups");
    const char* what = "wgmma.wait_group";
    emu::ThreadContext& self = emu::self(what);
    std::vector<detail::WgOp> kept;
    for (const detail::WgOp& op : self.wgmma_ops) {
        if (op.group + N >= self.wgmma_committed) {
            kept.push_back(op);
            continue;
        }
        float a[2][16], out[128];
        if (op.a_in_regs)
            memcpy(a, op.a, sizeof a);
        else
            detail::wg_rows_of_a(op, self, a, what);
        detail::wg_product(op, a, self, out, what);
        if (memcmp(out, op.out, op.n * sizeof(float)) != 0)
            emu::fail("the shared memory a wgmma read changed before the wgmma.wait_group that completes it (a tile "
                      "rewritten while a product was in flight)");
        if (self.lane == 0) detail::wg_touch_all(op, self, what);
        memcpy(op.d, op.out, op.n * sizeof(float));
    }
    self.wgmma_ops = std::move(kept);
    self.wgmma_fenced = false;
}

inline void fence_proxy_async() {
    emu::ThreadContext& self = emu::self("fence.proxy.async");
    for (unsigned chunk : self.unfenced_chunks) {
        std::atomic<unsigned>& u = emu::launch_ctx.smem_writes[chunk].unfenced;
        if (u.load(std::memory_order_relaxed) == self.linear + 1) u.store(0, std::memory_order_relaxed);
    }
    self.unfenced_chunks.clear();
    detail::refresh_async_view();
}

template <int N, int TA, int TB>
inline void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate,
                     const emu::Loc& loc = emu::Loc::current()) {
    static_assert(N == 64 || N == 128, "wgmma_ss: N is 64 or 128");
    detail::wgmma_issue(d, N / 2, nullptr, a, b, TA, TB, accumulate, "wgmma.mma_async (A, B in shared memory)", loc);
}

template <int N, int TB>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, int accumulate,
                     const emu::Loc& loc = emu::Loc::current()) {
    static_assert(N == 64 || N == 128, "wgmma_rs: N is 64 or 128");
    detail::wgmma_issue(d, N / 2, a, 0, b, 0, TB, accumulate, "wgmma.mma_async (A in registers)", loc);
}

// (A compiler fence on the GPU; nothing to do here.)
template <int N>
inline void wgmma_fence_operand(float (&)[N]) {}
template <int M, int N>
inline void wgmma_fence_operand(uint32_t (&)[M][N]) {}

}  // namespace ptx
