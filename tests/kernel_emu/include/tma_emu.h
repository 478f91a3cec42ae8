// The instructions of kernels/tma.cuh (TMA tensor loads, mbarriers, named barriers,
// setmaxnreg) for the CPU emulation, with CUDA's semantics as tma.cuh lists them:
//
//   * Tensor maps: the harness encodes one with tma_encode_4d_bf16, which takes what
//     cuTensorMapEncodeTiled takes for a 4-d bf16 tensor and checks that function's rules
//     (16-byte aligned base, strides multiples of 16, boxes of 1..256 elements, an inner
//     box of at most 128 bytes under the 128-byte swizzle).
//   * tma_load_4d reads its box at issue (zeros outside the tensor), poisons the
//     destination (0xFF, in the tensor cores' view too) and keeps the bytes pending: they
//     land, and their transaction bytes complete on the mbarrier, only when a thread waits
//     on that mbarrier. So a kernel that reads a tile without waiting for its barrier
//     reads poison, and one that issues a load into a stage still being read destroys it
//     (and a wgmma reading it fails at its wait, see wgmma_emu.h). The data is written in
//     the 128-byte-swizzle order of absolute shared-window addresses, the order the wgmma
//     descriptors decode. A block that ends with loads no thread waited for is a kernel
//     error.
//   * mbarriers: per-block state (expected arrivals, pending arrivals, transaction bytes,
//     phase) kept beside shared memory, keyed by the barrier's offset; use before
//     mbar_init is a kernel error. mbar_wait blocks the thread in the scheduler until the
//     phase of the asked parity has completed (parity 1 counts as complete before the
//     first completion); threads that can never be released are reported as a deadlock.
//     mbar_arrive pauses its thread until the next scheduling pass, so that a producer it
//     frees may refill the stage before the arriving thread's in-flight products complete.
//   * Named barriers: ids 1..15 (0 is __syncthreads'), counts of whole warps; the arrivals
//     of named_bar_sync and named_bar_arrive count alike. A block that ends with a named
//     barrier part-arrived is a kernel error (an unbalanced pingpong).
//   * setmaxnreg: nothing to emulate (register counts are the compiler's).
//   * ThreadSanitizer: arrivals release the barrier's phase address and waits acquire it;
//     a TMA load releases at issue and is acquired where it lands. The emulation's own
//     state (barriers, pending loads), which every thread touches as the hardware would,
//     is accessed inside ignore regions, so that ThreadSanitizer neither reports those
//     accesses nor orders the threads by them; the loads' writes to shared memory stay
//     visible to it.
#pragma once
#include "wgmma_emu.h"

#include <map>
#include <vector>

#define SYNTHOS_GRID_CONSTANT

namespace ptx {

struct alignas(128) TmaMap {
    unsigned long long words[16];
};

namespace detail {

constexpr unsigned long long kTmaMagic = 0x7e05a3d1c4b2f609ull;

#ifdef __SANITIZE_THREAD__
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

// While alive, ThreadSanitizer ignores this thread's memory accesses (the bookkeeping).
struct Bookkeeping {
    Bookkeeping() {
#ifdef __SANITIZE_THREAD__
        __tsan_ignore_thread_begin();
#endif
    }
    ~Bookkeeping() {
#ifdef __SANITIZE_THREAD__
        __tsan_ignore_thread_end();
#endif
    }
    Bookkeeping(const Bookkeeping&) = delete;
    Bookkeeping& operator=(const Bookkeeping&) = delete;
};

// The map's fields, as tma_encode_4d_bf16 stores them in its words.
struct TmaFields {
    const unsigned char* base;
    uint64_t dims[4];
    uint64_t strides[4];  // bytes; strides[0] = 2 (bf16)
    uint32_t box[4];
    bool swizzle128;
};

inline TmaFields decode_map(const TmaMap* map) {
    if (map->words[15] != kTmaMagic)
        emu::fail("cp.async.bulk.tensor: %p is not a tensor map encoded by tma_encode_4d_bf16", (const void*)map);
    TmaFields f{};
    f.base = reinterpret_cast<const unsigned char*>(map->words[0]);
    for (int k = 0; k < 4; ++k) {
        f.dims[k] = map->words[1 + k];
        f.strides[k] = map->words[5 + k];
        f.box[k] = (uint32_t)map->words[9 + k];
    }
    f.swizzle128 = map->words[13] != 0;
    return f;
}

struct MBar {
    unsigned count = 0, pending = 0;
    long long tx = 0;
    unsigned phase = 0;  // phases completed so far
    char sync[2] = {};   // ThreadSanitizer addresses of even and odd phases
};

struct PendingLoad {
    unsigned bar;  // the mbarrier's offset in dynamic shared memory
    unsigned dst;  // offset of the destination
    std::vector<unsigned char> bytes;
};

struct NamedBar {
    unsigned expected = 0, arrived = 0, generation = 0;
    char sync[2] = {};
};

// The running block's state: reset before each block, checked after it.
struct TmaBlock {
    std::map<unsigned, MBar> bars;
    std::vector<PendingLoad> loads;
    NamedBar named[16];
    char load_token = 0;
};

inline TmaBlock& tma_block() {
    static TmaBlock b;
    return b;
}

inline const bool tma_hooks_installed = [] {
    emu::block_start_hooks().push_back([] {
        Bookkeeping ignore;
        tma_block() = TmaBlock{};
    });
    emu::block_end_hooks().push_back([] {
        Bookkeeping ignore;
        const TmaBlock& b = tma_block();
        if (!b.loads.empty())
            emu::fail("the block ended with %zu TMA loads (the first into offset %u) whose mbarrier no thread waited "
                      "for",
                      b.loads.size(), b.loads[0].dst);
        for (unsigned id = 0; id < 16; ++id)
            if (b.named[id].arrived != 0)
                emu::fail("the block ended with named barrier %u holding %u of its %u arrivals (unbalanced "
                          "bar.sync / bar.arrive)",
                          id, b.named[id].arrived, b.named[id].expected);
    });
    return true;
}();

inline unsigned smem_offset(const void* p, unsigned align, unsigned bytes, const char* what) {
    const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(emu::dynamic_smem());
    if (base == 0 || a < base || a + bytes > base + emu::dynamic_smem_bytes())
        emu::fail("%s: address %p is outside the block's dynamic shared memory (%u bytes at %p)", what, p,
                  emu::dynamic_smem_bytes(), emu::dynamic_smem());
    const unsigned off = (unsigned)(a - base);
    if ((kSharedBase + off) % align != 0)
        emu::fail("%s: shared address %#x is not %u-byte aligned", what, kSharedBase + off, align);
    return off;
}

// The mbarrier at `bar` (call inside a Bookkeeping region).
inline MBar& mbar(uint64_t* bar, const char* what) {
    const unsigned off = smem_offset(bar, 8, 8, what);
    auto it = tma_block().bars.find(off);
    if (it == tma_block().bars.end())
        emu::fail("%s: the mbarrier at shared offset %u is used before mbarrier.init", what, off);
    return it->second;
}

// (Inside a Bookkeeping region.)
inline void complete_if_done(MBar& m) {
    if (m.pending == 0 && m.tx == 0) {
        ++m.phase;
        m.pending = m.count;
    }
}

// One arrival, announcing `tx` transaction bytes first.
inline void arrive(uint64_t* bar, unsigned tx, const char* what) {
    emu::self(what);
    char* sync;
    {
        Bookkeeping ignore;
        MBar& m = mbar(bar, what);
        if (m.pending == 0)
            emu::fail("%s: every arrival of the mbarrier's current phase is in and its transaction bytes are not: an "
                      "arrival meant for the next phase",
                      what);
        sync = &m.sync[m.phase & 1];
    }
    emu::tsan_release(sync);
    Bookkeeping ignore;
    MBar& m = mbar(bar, what);
    m.tx += tx;
    --m.pending;
    complete_if_done(m);
}

__attribute__((no_sanitize("thread", "address"))) inline void write_async_view(unsigned off, const unsigned char* p,
                                                                                size_t n) {
    volatile unsigned char* view = emu::launch_ctx.async_view;
    for (size_t i = 0; i < n; ++i) view[off + i] = p != nullptr ? p[i] : 0xFF;
}

// Lands every pending load on the barrier at offset `off`: its bytes are written (for the
// tensor cores too) and complete on the barrier.
inline void land_loads(unsigned off) {
    std::vector<PendingLoad> landing;
    {
        Bookkeeping ignore;
        TmaBlock& b = tma_block();
        std::vector<PendingLoad> kept;
        for (PendingLoad& l : b.loads) (l.bar == off ? landing : kept).push_back(std::move(l));
        b.loads = std::move(kept);
    }
    for (const PendingLoad& l : landing) {
        emu::tsan_acquire(&tma_block().load_token);
        memcpy(emu::dynamic_smem() + l.dst, l.bytes.data(), l.bytes.size());
        write_async_view(l.dst, l.bytes.data(), l.bytes.size());
        char* sync;
        {
            Bookkeeping ignore;
            sync = &tma_block().bars.at(off).sync[tma_block().bars.at(off).phase & 1];
        }
        emu::tsan_release(sync);
        Bookkeeping ignore;
        MBar& m = tma_block().bars.at(off);
        m.tx -= (long long)l.bytes.size();
        complete_if_done(m);
    }
    Bookkeeping ignore;
    landing.clear();
}

struct MbarWait {
    const MBar* m;
    unsigned off, parity;
};

struct NamedWait {
    const NamedBar* nb;
    unsigned generation;
};

}  // namespace detail

// Encodes a tensor map of a 4-d bf16 tensor as cuTensorMapEncodeTiled would (dims and box
// innermost first, strides in bytes of dims 1..3), with its rules checked.
inline TmaMap tma_encode_4d_bf16(const void* base, const uint64_t (&dims)[4], const uint64_t (&strides)[3],
                                 const uint32_t (&box)[4], bool swizzle128) {
    if (reinterpret_cast<uintptr_t>(base) % 16 != 0)
        emu::fail("cuTensorMapEncodeTiled: global address %p is not 16-byte aligned", base);
    for (int k = 0; k < 4; ++k) {
        if (dims[k] == 0 || dims[k] > (1ull << 32))
            emu::fail("cuTensorMapEncodeTiled: dim %d has size %llu", k, (unsigned long long)dims[k]);
        if (box[k] == 0 || box[k] > 256) emu::fail("cuTensorMapEncodeTiled: box dim %d is %u (1..256)", k, box[k]);
    }
    for (int k = 0; k < 3; ++k)
        if (strides[k] % 16 != 0 || strides[k] >= (1ull << 40))
            emu::fail("cuTensorMapEncodeTiled: stride %d is %llu bytes (a multiple of 16 below 2^40)", k + 1,
                      (unsigned long long)strides[k]);
    if (box[0] * 2 % 16 != 0) emu::fail("cuTensorMapEncodeTiled: inner box of %u bytes (a multiple of 16)", box[0] * 2);
    if (swizzle128 && box[0] * 2 > 128)
        emu::fail("cuTensorMapEncodeTiled: inner box of %u bytes exceeds the 128-byte swizzle", box[0] * 2);
    TmaMap m{};
    m.words[0] = reinterpret_cast<uintptr_t>(base);
    for (int k = 0; k < 4; ++k) {
        m.words[1 + k] = dims[k];
        m.words[5 + k] = k == 0 ? 2 : strides[k - 1];
        m.words[9 + k] = box[k];
    }
    m.words[13] = swizzle128;
    m.words[15] = detail::kTmaMagic;
    return m;
}

inline void mbar_init(uint64_t* bar, unsigned count) {
    const char* what = "mbarrier.init";
    emu::self(what);
    const unsigned off = detail::smem_offset(bar, 8, 8, what);
    if (count == 0 || count >= (1u << 20)) emu::fail("%s: count %u (1 .. 2^20 - 1)", what, count);
    detail::Bookkeeping ignore;
    if (!detail::tma_block().bars.emplace(off, detail::MBar{count, count, 0, 0, {}}).second)
        emu::fail("%s: the mbarrier at shared offset %u is initialised twice", what, off);
}

inline void fence_mbar_init() { emu::self("fence.mbarrier_init"); }

inline void mbar_arrive(uint64_t* bar, const emu::Loc& loc = emu::Loc::current()) {
    const char* what = "mbarrier.arrive";
    detail::arrive(bar, 0, what);
    // The threads this releases (a producer waiting for a free stage) run before this one
    // goes on, as they may on the GPU.
    emu::scheduler().pause(what, loc);
}

inline void mbar_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
    detail::arrive(bar, bytes, "mbarrier.arrive.expect_tx");
}

inline void mbar_wait(uint64_t* bar, unsigned parity, const emu::Loc& loc = emu::Loc::current()) {
    const char* what = "mbarrier.try_wait.parity";
    emu::self(what);
    if (parity > 1) emu::fail("%s: parity %u", what, parity);
    const unsigned off = detail::smem_offset(bar, 8, 8, what);
    const detail::MBar* m;
    {
        detail::Bookkeeping ignore;
        m = &detail::mbar(bar, what);
    }
    const detail::MbarWait w{m, off, parity};
    const auto ready = [](const void* p) {
        detail::Bookkeeping ignore;
        const auto& w = *static_cast<const detail::MbarWait*>(p);
        if ((w.m->phase & 1) != w.parity) return true;
        for (const detail::PendingLoad& l : detail::tma_block().loads)
            if (l.bar == w.off) return true;  // loads to land
        return false;
    };
    for (;;) {
        detail::land_loads(off);
        bool done;
        {
            detail::Bookkeeping ignore;
            done = (m->phase & 1) != parity;
        }
        if (done) break;
        emu::scheduler().wait_until(ready, &w, what, const_cast<char*>(&m->sync[parity]), loc);
    }
    emu::tsan_acquire(const_cast<char*>(&m->sync[parity]));
}

// (The emulation reports a wait that can never end as a deadlock.)
inline void mbar_wait_or_trap(uint64_t* bar, unsigned parity, const emu::Loc& loc = emu::Loc::current()) {
    mbar_wait(bar, parity, loc);
}

inline void tma_load_4d(void* dst, const TmaMap* map, int c0, int c1, int c2, int c3, uint64_t* bar) {
    const char* what = "cp.async.bulk.tensor.4d";
    emu::self(what);
    const detail::TmaFields f = detail::decode_map(map);
    const size_t bytes = (size_t)f.box[0] * f.box[1] * f.box[2] * f.box[3] * 2;
    const unsigned dst_off = detail::smem_offset(dst, f.swizzle128 ? 1024 : 128, (unsigned)bytes, what);
    const unsigned bar_off = detail::smem_offset(bar, 8, 8, what);
    {
        detail::Bookkeeping ignore;
        detail::mbar(bar, what);
    }
    const int c[4] = {c0, c1, c2, c3};
    std::vector<unsigned char> img(bytes, 0);
    size_t linear = 0;
    for (uint32_t i3 = 0; i3 < f.box[3]; ++i3)
        for (uint32_t i2 = 0; i2 < f.box[2]; ++i2)
            for (uint32_t i1 = 0; i1 < f.box[1]; ++i1)
                for (uint32_t i0 = 0; i0 < f.box[0]; ++i0, ++linear) {
                    const int64_t x[4] = {(int64_t)c[0] + i0, (int64_t)c[1] + i1, (int64_t)c[2] + i2,
                                          (int64_t)c[3] + i3};
                    bool inside = true;
                    size_t src = 0;
                    for (int k = 0; k < 4; ++k) {
                        inside = inside && x[k] >= 0 && (uint64_t)x[k] < f.dims[k];
                        src += (size_t)x[k] * f.strides[k];
                    }
                    unsigned a = detail::kSharedBase + dst_off + (unsigned)(2 * linear);
                    if (f.swizzle128) a ^= ((a >> 7) & 7u) << 4;
                    if (inside) memcpy(&img[a - detail::kSharedBase - dst_off], f.base + src, 2);
                }
    // In flight: undefined until it lands (for the tensor cores too).
    memset(emu::dynamic_smem() + dst_off, 0xFF, bytes);
    detail::write_async_view(dst_off, nullptr, bytes);
    emu::tsan_release(&detail::tma_block().load_token);
    detail::Bookkeeping ignore;
    detail::tma_block().loads.push_back({bar_off, dst_off, std::move(img)});
}

namespace detail {
// One arrival at named barrier `id`; the generation it arrived in goes to `generation`.
inline void named_arrive(unsigned id, unsigned threads, const char* what, unsigned* generation) {
    emu::self(what);
    const dim3 blk = emu::launch_ctx.block;
    if (id == 0 || id > 15) emu::fail("%s: barrier id %u (1..15; 0 is __syncthreads')", what, id);
    if (threads == 0 || threads % 32 != 0 || threads > blk.x * blk.y * blk.z)
        emu::fail("%s: %u threads (whole warps of the block's %u)", what, threads, blk.x * blk.y * blk.z);
    NamedBar& nb = tma_block().named[id];
    {
        Bookkeeping ignore;
        if (nb.arrived > 0 && nb.expected != threads)
            emu::fail("%s: barrier %u used with %u threads while %u arrivals of a %u-thread phase are in", what, id,
                      threads, nb.arrived, nb.expected);
        *generation = nb.generation;
    }
    emu::tsan_release(&nb.sync[*generation & 1]);
    Bookkeeping ignore;
    nb.expected = threads;
    if (++nb.arrived == threads) {
        nb.arrived = 0;
        ++nb.generation;
    }
}
}  // namespace detail

inline void named_bar_sync(unsigned id, unsigned threads, const emu::Loc& loc = emu::Loc::current()) {
    const char* what = "bar.sync (named)";
    unsigned generation = 0;
    detail::named_arrive(id, threads, what, &generation);
    detail::NamedBar& nb = detail::tma_block().named[id];
    const detail::NamedWait w{&nb, generation};
    emu::scheduler().wait_until(
        [](const void* p) {
            detail::Bookkeeping ignore;
            const auto& w = *static_cast<const detail::NamedWait*>(p);
            return w.nb->generation != w.generation;
        },
        &w, what, &nb.sync[generation & 1], loc);
}

inline void named_bar_arrive(unsigned id, unsigned threads) {
    unsigned generation = 0;
    detail::named_arrive(id, threads, "bar.arrive (named)", &generation);
}

template <int N>
inline void setmaxnreg_dec() {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg takes 24..256, a multiple of 8");
}

template <int N>
inline void setmaxnreg_inc() {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg takes 24..256, a multiple of 8");
}

}  // namespace ptx
