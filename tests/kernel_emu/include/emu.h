// CPU emulation of the CUDA execution model, so that kernels/*.cu compile unmodified with
// g++ and run on the host (see tests/kernel_emu/README.md and docs/NOTES.md).
//
// Model:
//   * Every CUDA thread is a fiber (its own stack, switched in user space); the threads of
//     one block run cooperatively: each runs until it reaches a barrier or warp collective
//     or finishes, then the next; a barrier completes when all its participants are there.
//     Passes over the runnable threads alternate in direction, so code that depends on
//     the order of threads between barriers tends to compute wrong values.
//   * `__syncthreads` is a barrier of the block; `__syncwarp`, `__shfl_sync`, `__shfl_xor_sync` and
//     `wmma::mma_sync` are barriers of the warp (32 consecutive linear thread ids). A
//     block barrier must be reached by every thread from one call site, a warp
//     collective by every lane with the same intrinsic and the whole-warp mask, and no
//     participant may have exited; anything else, or threads waiting at barriers that can
//     never complete (a deadlock), is a kernel error. CUDA leaves all of these undefined.
//   * Threads may also wait for a condition of the emulation's state (tma_emu.h: an
//     mbarrier phase, a named barrier) and are resumed once it holds; a thread that pauses
//     (after an mbarrier arrival) is resumed only when no other thread can run, so that
//     the threads its arrival released run first.
//   * Under ThreadSanitizer each fiber is a thread of its own with no ordering between
//     them except what barriers establish (__tsan_release on arrival, __tsan_acquire on
//     departure), so a missing barrier is reported as a data race. AddressSanitizer is told
//     about every stack switch.
//   * Blocks run one after another, in a fixed scrambled order (a kernel that depends on
//     block order fails). Each block gets freshly allocated dynamic shared memory of
//     exactly the launch's size, filled with 0xFF bytes (NaN as f32 and bf16). Static
//     `__shared__` variables are function statics: one instance per kernel, which is one
//     per block since blocks never overlap (they are not re-poisoned between blocks).
//   * Launch shapes are checked against the limits of sm_80 (the smallest target).
//
// Kernel errors print the kernel, block and thread (and a stack trace under a
// sanitizer) and end the process with status 70.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <source_location>
#include <string>
#include <sys/mman.h>
#include <tuple>
#include <type_traits>
#include <unistd.h>
#include <vector>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#include <sanitizer/common_interface_defs.h>
#endif
#ifdef __SANITIZE_THREAD__
#include <sanitizer/tsan_interface.h>
#endif
#ifndef __x86_64__
#include <ucontext.h>
#endif

// ---- Keywords -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// A function static: one instance per kernel, shared by all threads of the running block.
#define __shared__ static

// ---- Built-in vector types (with CUDA's alignments, so that UBSan checks 16-byte
// vector accesses) ------------------------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

constexpr int warpSize = 32;

// ---- Device math that is not in <cmath> -------------------------------------------------
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline unsigned int __float_as_uint(float x) {
    unsigned int u;
    memcpy(&u, &x, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}
// CUDA's integer min/max overloads (the usual arithmetic conversions, as there).
template <class A, class B>
constexpr std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B>
constexpr std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    return C(a) < C(b) ? C(b) : C(a);
}

namespace emu {

using Loc = std::source_location;

constexpr unsigned kMaxBlockThreads = 1024;
// Largest dynamic shared memory per block after opting in: sm_80 163 KB, sm_90 227 KB.
constexpr unsigned kMaxDynamicSmem = 166912;
constexpr unsigned kMaxDynamicSmemSm90 = 232448;

struct Warp;
struct Fiber;

// What a CUDA thread sees of itself.
struct ThreadContext {
    uint3 idx{0, 0, 0};
    unsigned linear = 0;  // x + y·Dx + z·Dx·Dy: warp linear / 32, lane linear % 32
    unsigned lane = 0;
    // Barriers of the block and collectives of the warp passed so far. Their parity picks
    // the ThreadSanitizer sync address of the next one (see Scheduler::wait) and the half
    // of the warp's double-buffered scratch it uses.
    unsigned block_phase = 0, warp_phase = 0;
    Warp* warp = nullptr;
    Fiber* fiber = nullptr;
    // cp.async copies issued and not yet complete (see ptx_emu.h): the 16 bytes read at
    // issue, written to `dst` when a wait completes their group.
    struct AsyncCopy {
        void* dst;
        unsigned group;
        unsigned char bytes[16];
    };
    static constexpr unsigned kMaxAsyncCopies = 128;
    AsyncCopy async_copies[kMaxAsyncCopies];
    unsigned async_pending = 0;    // entries of async_copies in use
    unsigned async_committed = 0;  // groups committed so far
    // Shared-memory chunks (16-byte indices) this thread's cp.async copies wrote since its
    // last fence.proxy.async (see wgmma_emu.h).
    std::vector<unsigned> unfenced_chunks;
    // wgmma (see wgmma_emu.h): products issued and not yet complete (their results wait
    // for the wgmma.wait_group that completes their group), groups committed, and whether
    // a wgmma.fence came since the last wait.
    struct Wgmma {
        float* d;                // the accumulator registers
        unsigned n;              // how many (N / 2)
        unsigned group;
        uint64_t a_desc, b_desc;
        bool a_in_regs;
        int trans_a, trans_b;
        float a[2][16];          // this lane's two rows of A (read at issue)
        float in[128], out[128];  // accumulators before and after
    };
    std::vector<Wgmma> wgmma_ops;
    unsigned wgmma_committed = 0;
    bool wgmma_fenced = false;
};

// The CUDA thread running now, null on the host. Set by the scheduler before it switches
// into a fiber. A relaxed atomic is the one kind of access that, under ThreadSanitizer,
// neither races with the fibers (each a thread of its own) nor orders them.
inline std::atomic<ThreadContext*> running{nullptr};

// Use of one 16-byte chunk of dynamic shared memory by ldmatrix (reads) or cp.async
// (writes) since a block-barrier phase: the phase and a mask of the warps (ptx_emu.h
// checks it). Relaxed atomics: under ThreadSanitizer this bookkeeping must neither race
// nor order the fibers.
struct SmemUse {
    std::atomic<unsigned> phase{~0u};
    std::atomic<uint64_t> warps{0};
    // (Written chunks only.) 1 + the thread whose cp.async wrote it, until that thread's
    // fence.proxy.async; 0 when the tensor cores may read it (wgmma_emu.h).
    std::atomic<unsigned> unfenced{0};
    // (Written chunks only.) 1 + the thread whose cp.async into it is in flight (issued,
    // not yet completed by that thread's wait), else 0: on the GPU the copy may land at
    // any moment, so no read of the chunk is safe, whatever barriers come between. Once
    // completed: the block-barrier phase of the completing wait and 1 + its thread, so
    // that a read by another warp in that phase (no barrier after the wait) is a race.
    std::atomic<unsigned> inflight{0};
    std::atomic<unsigned> landed_phase{~0u};
    std::atomic<unsigned> landed_by{0};
};

// The launch in progress, written by the host between blocks only.
struct LaunchContext {
    const char* kernel = nullptr;
    dim3 grid, block;
    uint3 block_idx{0, 0, 0};
    unsigned char* dynamic_smem = nullptr;
    unsigned dynamic_smem_bytes = 0;
    unsigned long launches = 0;  // launches so far (for the harness summary)
    // Per 16-byte chunk of the running block's dynamic shared memory (fresh per block).
    SmemUse* smem_reads = nullptr;
    SmemUse* smem_writes = nullptr;
    // The running block's dynamic shared memory as the tensor cores (the async proxy) see
    // it: a copy taken at the block's start and at every fence.proxy.async (wgmma_emu.h).
    unsigned char* async_view = nullptr;
};
inline LaunchContext launch_ctx;

// Reports a kernel (or launch) error with its position in the grid and ends the process.
[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] inline void fail(const char* fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fflush(stdout);
    const LaunchContext& l = launch_ctx;
    const ThreadContext* t = running.load(std::memory_order_relaxed);
    if (l.kernel != nullptr && t != nullptr)
        fprintf(stderr, "emu: KERNEL ERROR in %s, block (%u,%u,%u), thread (%u,%u,%u): %s\n", l.kernel,
                l.block_idx.x, l.block_idx.y, l.block_idx.z, t->idx.x, t->idx.y, t->idx.z, msg);
    else if (l.kernel != nullptr)
        fprintf(stderr, "emu: KERNEL ERROR in %s, block (%u,%u,%u): %s\n", l.kernel, l.block_idx.x, l.block_idx.y,
                l.block_idx.z, msg);
    else
        fprintf(stderr, "emu: ERROR: %s\n", msg);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    __sanitizer_print_stack_trace();
#endif
    fflush(stderr);
    std::_Exit(70);
}

// Happens-before edges for ThreadSanitizer (no-ops otherwise).
inline void tsan_release(void* addr) {
#ifdef __SANITIZE_THREAD__
    __tsan_release(addr);
#else
    (void)addr;
#endif
}
inline void tsan_acquire(void* addr) {
#ifdef __SANITIZE_THREAD__
    __tsan_acquire(addr);
#else
    (void)addr;
#endif
}

// ---- Machine contexts -------------------------------------------------------------------
#ifdef __x86_64__
// A context is the stack pointer of a switched-out stack, whose top holds the callee-saved
// registers (System V: rbx, rbp, r12-r15, the SSE and x87 control words) and the address
// to return to.
extern "C" void emu_switch_context(void** save_sp, void* to_sp);
extern "C" void emu_fiber_trampoline();
asm(R"(
    .text
    .weak emu_switch_context
    .type emu_switch_context, @function
emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    retq
    .size emu_switch_context, .-emu_switch_context

    .weak emu_fiber_trampoline
    .type emu_fiber_trampoline, @function
emu_fiber_trampoline:
    movq %rbx, %rdi
    callq *%r12
    ud2
    .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");

struct Context {
    void* sp = nullptr;
};

// Prepares `c` so that switching to it calls entry(arg) on the given stack.
inline void start_context(Context& c, void* stack, size_t bytes, void (*entry)(void*), void* arg) {
    uint64_t* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(static_cast<char*>(stack) + bytes) & ~15ul);
    uint64_t* sp = top - 10;  // the frame emu_switch_context pops; the trampoline then runs 16-byte aligned
    sp[0] = 0x0000037F00001F80ull;  // MXCSR and x87 control word at their defaults
    sp[1] = sp[2] = sp[3] = 0;      // r15, r14, r13
    sp[4] = reinterpret_cast<uint64_t>(entry);  // r12
    sp[5] = reinterpret_cast<uint64_t>(arg);    // rbx
    sp[6] = 0;                                  // rbp
    sp[7] = reinterpret_cast<uint64_t>(&emu_fiber_trampoline);
    c.sp = sp;
}

inline void switch_context(Context& from, const Context& to) { emu_switch_context(&from.sp, to.sp); }
#else
// Elsewhere: ucontext (slower, it saves the signal mask with a system call).
struct Context {
    ucontext_t uc;
    void (*entry)(void*) = nullptr;
    void* arg = nullptr;
};

inline std::atomic<Context*> starting{nullptr};

inline void start_context(Context& c, void* stack, size_t bytes, void (*entry)(void*), void* arg) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    c.entry = entry;
    c.arg = arg;
    makecontext(&c.uc, [] {
        Context* s = starting.load(std::memory_order_relaxed);
        s->entry(s->arg);
    }, 0);
}

inline void switch_context(Context& from, Context& to) {
    starting.store(&to, std::memory_order_relaxed);
    swapcontext(&from.uc, &to.uc);
}
#endif

// ---- Threads of a block -----------------------------------------------------------------

// What a fiber is stopped at.
// kCondition: waiting until a predicate of emulator state holds (tma_emu.h's mbarriers and
// named barriers); kPaused: resumed only when no other thread can run.
enum Wait : int { kRunning, kBlockBarrier, kWarpCollective, kCondition, kPaused, kFinished };

struct Warp {
    unsigned lanes = 32;  // fewer in the last warp of a block that is not a multiple of 32
    // Double-buffered scratch of the collectives (indexed by ThreadContext::warp_phase
    // & 1): two consecutive collectives use different halves, so a lane may write the
    // next one while others still read the previous one.
    uint64_t exchange[2][32];
    float mma[2][3][256];  // wmma::mma_sync operands A, B, C (see mma.h)
    uint32_t mma16816[2][32][6];  // ptx::mma_bf16_16816 operands of each lane (see ptx_emu.h)
    char sync[2];          // ThreadSanitizer sync addresses of even and odd phases
};

struct Fiber {
    Context ctx;
    void* stack = nullptr;
    size_t stack_bytes = 0;
    ThreadContext thread;
    // Where the fiber stopped, written by the fiber and read by the scheduler (relaxed
    // atomics, see `running`).
    std::atomic<int> wait{kRunning};
    std::atomic<const char*> what{""}, file{""};
    std::atomic<unsigned> line{0}, column{0};
    // At kCondition: resumed once cond(cond_arg) holds (evaluated by the scheduler).
    std::atomic<bool (*)(const void*)> cond{nullptr};
    std::atomic<const void*> cond_arg{nullptr};
#ifdef __SANITIZE_ADDRESS__
    void* fake_stack = nullptr;
#endif
#ifdef __SANITIZE_THREAD__
    void* tsan_fiber = nullptr;
#endif
};

// Runs the threads of one block at a time. Fibers (and their stacks) are made once and
// reused: CUDA thread i of every block is fiber i.
class Scheduler {
  public:
    using Body = void (*)(const void*);

    // Runs body(arg) for every thread of a block of shape `shape`, to completion.
    void run_block(const dim3& shape, std::vector<Warp>& warps, Body body, const void* arg) {
        const unsigned n = shape.x * shape.y * shape.z;
        while (fibers_.size() < n) add_fiber();
        body_ = body;
        arg_ = arg;
        for (unsigned i = 0; i < n; ++i) {
            Fiber& f = *fibers_[i];
            ThreadContext& t = f.thread;  // (field by field: the cp.async slots need no reset)
            t.idx = {i % shape.x, i / shape.x % shape.y, i / (shape.x * shape.y)};
            t.linear = i;
            t.lane = i % 32;
            t.block_phase = t.warp_phase = 0;
            t.warp = &warps[i / 32];
            t.fiber = &f;
            t.async_pending = t.async_committed = 0;
            t.unfenced_chunks.clear();
            t.wgmma_ops.clear();
            t.wgmma_committed = 0;
            t.wgmma_fenced = false;
            f.wait.store(kRunning, std::memory_order_relaxed);
        }
        tsan_release(&start_token_);
        std::vector<unsigned>& ready = ready_;
        ready.resize(n);
        for (unsigned i = 0; i < n; ++i) ready[i] = i;
        for (bool forward = true;; forward = !forward) {
            for (size_t k = 0; k < ready.size(); ++k) resume(*fibers_[forward ? ready[k] : ready[ready.size() - 1 - k]]);
            ready.clear();
            if (!release_waiters(n, warps, ready)) break;
        }
        tsan_acquire(&done_token_);
    }

    // Called on a fiber: stop at a barrier. Arrivals release `sync` and departures acquire
    // it. Consecutive phases of a barrier must use different addresses: a thread acquires
    // when it is resumed, possibly after others have already released for the next phase,
    // and acquiring those releases too would order accesses that are in fact concurrent.
    void wait(Wait kind, const char* what, void* sync, const Loc& loc) {
        Fiber& f = *running.load(std::memory_order_relaxed)->fiber;
        f.what.store(what, std::memory_order_relaxed);
        f.file.store(loc.file_name(), std::memory_order_relaxed);
        f.line.store(loc.line(), std::memory_order_relaxed);
        f.column.store(loc.column(), std::memory_order_relaxed);
        tsan_release(sync);
        yield(f, kind);
        tsan_acquire(sync);
    }

    // Called on a fiber: stop until cond(arg) holds (at once when it already does), then
    // acquire `sync` (the address the threads that make it true release).
    void wait_until(bool (*cond)(const void*), const void* arg, const char* what, void* sync, const Loc& loc) {
        if (!cond(arg)) {
            Fiber& f = *running.load(std::memory_order_relaxed)->fiber;
            f.what.store(what, std::memory_order_relaxed);
            f.file.store(loc.file_name(), std::memory_order_relaxed);
            f.line.store(loc.line(), std::memory_order_relaxed);
            f.column.store(loc.column(), std::memory_order_relaxed);
            f.cond.store(cond, std::memory_order_relaxed);
            f.cond_arg.store(arg, std::memory_order_relaxed);
            yield(f, kCondition);
        }
        tsan_acquire(sync);
    }

    // Called on a fiber: stop until no other thread can run, so that the threads this one
    // just released run first (an mbarrier arrival: the producer it frees may refill a
    // buffer at once on the GPU, before the arriving warp's next instruction).
    void pause(const char* what, const Loc& loc) {
        Fiber& f = *running.load(std::memory_order_relaxed)->fiber;
        f.what.store(what, std::memory_order_relaxed);
        f.file.store(loc.file_name(), std::memory_order_relaxed);
        f.line.store(loc.line(), std::memory_order_relaxed);
        f.column.store(loc.column(), std::memory_order_relaxed);
        yield(f, kPaused);
    }

    // The ThreadSanitizer sync address of block barrier phases of this parity.
    void* block_sync(unsigned parity) { return &block_sync_[parity]; }

  private:
    // Stack of a fiber: deep enough for sanitizer reports, reserved lazily, with a guard page.
    static constexpr size_t kStackBytes = 1 << 20;

    void add_fiber() {
        auto f = std::make_unique<Fiber>();
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED || mprotect(p, page, PROT_NONE) != 0) fail("cannot map a fiber stack");
        f->stack = static_cast<char*>(p) + page;
        f->stack_bytes = kStackBytes;
        start_context(f->ctx, f->stack, f->stack_bytes, &Scheduler::fiber_main, f.get());
#ifdef __SANITIZE_THREAD__
        f->tsan_fiber = __tsan_create_fiber(0);
        char name[32];
        snprintf(name, sizeof name, "CUDA thread %zu", fibers_.size());
        __tsan_set_fiber_name(f->tsan_fiber, name);
#endif
        fibers_.push_back(std::move(f));
    }

    static void fiber_main(void* p);

    // Host side: runs fiber f until it stops.
    void resume(Fiber& f) {
        running.store(&f.thread, std::memory_order_relaxed);
#ifdef __SANITIZE_ADDRESS__
        __sanitizer_start_switch_fiber(&host_fake_stack_, f.stack, f.stack_bytes);
#endif
#ifdef __SANITIZE_THREAD__
        __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
        switch_context(host_, f.ctx);
#ifdef __SANITIZE_ADDRESS__
        __sanitizer_finish_switch_fiber(host_fake_stack_, nullptr, nullptr);
#endif
        running.store(nullptr, std::memory_order_relaxed);
    }

    // Fiber side: back to the host.
    void yield(Fiber& f, Wait why) {
        f.wait.store(why, std::memory_order_relaxed);
#ifdef __SANITIZE_ADDRESS__
        __sanitizer_start_switch_fiber(&f.fake_stack, host_stack_, host_stack_bytes_);
#endif
#ifdef __SANITIZE_THREAD__
        __tsan_switch_to_fiber(host_tsan_fiber_, __tsan_switch_to_fiber_no_sync);
#endif
        switch_context(f.ctx, host_);
#ifdef __SANITIZE_ADDRESS__
        __sanitizer_finish_switch_fiber(f.fake_stack, &host_stack_, &host_stack_bytes_);
#endif
    }

    // After a pass, with every thread stopped: completes the barriers whose participants
    // are all there (their threads go to `ready`). False when the block is finished;
    // fails on a deadlock or a malformed barrier.
    bool release_waiters(unsigned n, const std::vector<Warp>& warps, std::vector<unsigned>& ready) const {
        unsigned finished = 0, at_block = 0;
        for (unsigned i = 0; i < n; ++i) {
            const Fiber& f = *fibers_[i];
            const int w = f.wait.load(std::memory_order_relaxed);
            finished += w == kFinished;
            at_block += w == kBlockBarrier;
            if (w == kCondition && f.cond.load(std::memory_order_relaxed)(f.cond_arg.load(std::memory_order_relaxed)))
                ready.push_back(i);
        }
        if (finished == n) return false;
        if (!ready.empty()) return true;
        if (at_block > 0 && at_block + finished == n) {
            const Fiber& first = *first_at(0, n, kBlockBarrier);
            for (unsigned i = 0; i < n; ++i) {
                const Fiber& f = *fibers_[i];
                if (f.wait.load(std::memory_order_relaxed) == kFinished)
                    fail("thread %s waits at __syncthreads() (%s) but thread %s has exited", coords(first).c_str(),
                         site(first).c_str(), coords(f).c_str());
                if (!same_site(f, first))
                    fail("divergent __syncthreads(): thread %s at %s, thread %s at %s", coords(first).c_str(),
                         site(first).c_str(), coords(f).c_str(), site(f).c_str());
                ready.push_back(i);
            }
            return true;
        }
        for (unsigned w0 = 0; w0 < n; w0 += 32) {
            const unsigned lanes = warps[w0 / 32].lanes;
            unsigned at_warp = 0, done = 0;
            for (unsigned i = w0; i < w0 + lanes; ++i) {
                const int w = fibers_[i]->wait.load(std::memory_order_relaxed);
                at_warp += w == kWarpCollective;
                done += w == kFinished;
            }
            if (at_warp == 0 || at_warp + done < lanes) continue;
            const Fiber& first = *first_at(w0, w0 + lanes, kWarpCollective);
            for (unsigned i = w0; i < w0 + lanes; ++i) {
                const Fiber& f = *fibers_[i];
                if (f.wait.load(std::memory_order_relaxed) == kFinished)
                    fail("thread %s waits at %s (%s) but thread %s of its warp has exited", coords(first).c_str(),
                         first.what.load(std::memory_order_relaxed), site(first).c_str(), coords(f).c_str());
                if (strcmp(f.what.load(std::memory_order_relaxed), first.what.load(std::memory_order_relaxed)) != 0)
                    fail("divergent warp: thread %s at %s (%s), thread %s at %s (%s)", coords(first).c_str(),
                         first.what.load(std::memory_order_relaxed), site(first).c_str(), coords(f).c_str(),
                         f.what.load(std::memory_order_relaxed), site(f).c_str());
                ready.push_back(i);
            }
        }
        if (ready.empty())  // nothing else can run: the paused threads go on
            for (unsigned i = 0; i < n; ++i)
                if (fibers_[i]->wait.load(std::memory_order_relaxed) == kPaused) ready.push_back(i);
        if (ready.empty()) {
            std::string where;
            for (unsigned i = 0, shown = 0; i < n && shown < 8; ++i) {
                const Fiber& f = *fibers_[i];
                const int w = f.wait.load(std::memory_order_relaxed);
                if (w == kFinished || (shown > 0 && same_site(f, *fibers_[i - 1]))) continue;
                where += "\n    thread " + coords(f) + " waits at " + f.what.load(std::memory_order_relaxed) + " (" +
                         site(f) + ")";
                ++shown;
            }
            fail("deadlock: no barrier can complete (%u of %u threads finished); first waiters:%s", finished, n,
                 where.c_str());
        }
        return true;
    }

    const Fiber* first_at(unsigned from, unsigned to, Wait kind) const {
        for (unsigned i = from; i < to; ++i)
            if (fibers_[i]->wait.load(std::memory_order_relaxed) == kind) return fibers_[i].get();
        return nullptr;
    }

    static bool same_site(const Fiber& a, const Fiber& b) {
        const auto get = [](const auto& field) { return field.load(std::memory_order_relaxed); };
        return get(a.line) == get(b.line) && get(a.column) == get(b.column) &&
               (get(a.file) == get(b.file) || strcmp(get(a.file), get(b.file)) == 0);
    }

    static std::string site(const Fiber& f) {
        return std::string(f.file.load(std::memory_order_relaxed)) + ":" +
               std::to_string(f.line.load(std::memory_order_relaxed)) + ":" +
               std::to_string(f.column.load(std::memory_order_relaxed));
    }

    static std::string coords(const Fiber& f) {
        const uint3 t = f.thread.idx;
        return "(" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) + ")";
    }

    std::vector<std::unique_ptr<Fiber>> fibers_;
    std::vector<unsigned> ready_;  // threads to resume in the next pass
    Context host_;
    Body body_ = nullptr;
    const void* arg_ = nullptr;
    char start_token_ = 0, done_token_ = 0, block_sync_[2] = {};  // ThreadSanitizer sync addresses
#ifdef __SANITIZE_ADDRESS__
    void* host_fake_stack_ = nullptr;
    const void* host_stack_ = nullptr;
    size_t host_stack_bytes_ = 0;
#endif
#ifdef __SANITIZE_THREAD__
    void* host_tsan_fiber_ = __tsan_get_current_fiber();  // set before any fiber exists
#endif
};

// Never destroyed: its fibers stay suspended inside their loop until the process exits.
inline Scheduler& scheduler() {
    static Scheduler& s = *new Scheduler;
    return s;
}

inline void Scheduler::fiber_main(void* p) {
    Fiber& f = *static_cast<Fiber*>(p);
    Scheduler& s = scheduler();
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_finish_switch_fiber(nullptr, &s.host_stack_, &s.host_stack_bytes_);
#endif
    for (;;) {  // one CUDA thread per block
        tsan_acquire(&s.start_token_);
        s.body_(s.arg_);
        if (f.thread.async_pending != 0)
            fail("the thread ended with %u cp.async copies it never waited for", f.thread.async_pending);
        if (!f.thread.wgmma_ops.empty())
            fail("the thread ended with %zu wgmma products it never waited for", f.thread.wgmma_ops.size());
        tsan_release(&s.done_token_);
        s.yield(f, kFinished);
    }
}

// ---- Built-in variables -----------------------------------------------------------------
inline ThreadContext* self_or_null() { return running.load(std::memory_order_relaxed); }

inline const uint3& thread_idx() {
    static const uint3 host{0, 0, 0};
    const ThreadContext* t = self_or_null();
    return t != nullptr ? t->idx : host;
}
inline const uint3& block_idx() { return launch_ctx.block_idx; }
inline const dim3& block_dim() { return launch_ctx.block; }
inline const dim3& grid_dim() { return launch_ctx.grid; }

// Dynamic shared memory of the running block (`extern __shared__`; kernels reach it
// through an `#ifdef SYNTHOS_EMU` hook, see kernels/attention.cu) and its size.
inline unsigned char* dynamic_smem() { return launch_ctx.dynamic_smem; }
inline unsigned dynamic_smem_bytes() { return launch_ctx.dynamic_smem_bytes; }

// ---- Collectives ------------------------------------------------------------------------
inline ThreadContext& self(const char* what) {
    ThreadContext* t = self_or_null();
    if (t == nullptr) fail("%s called outside a kernel", what);
    return *t;
}

inline void syncthreads(const Loc& loc) {
    ThreadContext& t = self("__syncthreads()");
    scheduler().wait(kBlockBarrier, "__syncthreads()", scheduler().block_sync(t.block_phase++ & 1), loc);
}

// The calling thread, checked to take part in a collective over `mask`: the whole warp.
inline ThreadContext& warp_collective(unsigned mask, const char* what) {
    ThreadContext& t = self(what);
    const unsigned lanes = t.warp->lanes;
    const unsigned full = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    if (mask != full)
        fail("%s with mask %#x: the emulation supports whole-warp collectives only (this warp: %#x)", what, mask,
             full);
    return t;
}

// Waits until every lane of the caller's warp reaches a collective `what`. The collective
// owns half t.warp_phase & 1 (taken before the call) of the warp's scratch.
inline void warp_wait(ThreadContext& t, const char* what, const Loc& loc) {
    scheduler().wait(kWarpCollective, what, &t.warp->sync[t.warp_phase++ & 1], loc);
}

inline void syncwarp(unsigned mask, const Loc& loc) {
    warp_wait(warp_collective(mask, "__syncwarp()"), "__syncwarp()", loc);
}

// Every lane publishes `bits` and receives those of lane `src`.
inline uint64_t warp_exchange(unsigned mask, uint64_t bits, unsigned src, const char* what, const Loc& loc) {
    ThreadContext& t = warp_collective(mask, what);
    Warp& w = *t.warp;
    const unsigned p = t.warp_phase & 1;
    w.exchange[p][t.lane] = bits;
    warp_wait(t, what, loc);
    if (src >= w.lanes) fail("%s reads lane %u of a warp of %u lanes", what, src, w.lanes);
    return w.exchange[p][src];
}

// ---- Launching --------------------------------------------------------------------------

// Grid and block shape and dynamic shared memory, as in cudarc's LaunchConfig.
struct LaunchConfig {
    dim3 grid;
    dim3 block;
    unsigned shared_mem_bytes = 0;
    bool sm90 = false;  // a kernel built for sm_90a only: Hopper's shared-memory limit
};

inline void check_config(const LaunchConfig& c) {
    const dim3 g = c.grid, b = c.block;
    const unsigned long threads = (unsigned long)b.x * b.y * b.z;
    if (threads == 0 || threads > kMaxBlockThreads || b.x > 1024 || b.y > 1024 || b.z > 64)
        fail("invalid block (%u,%u,%u): 1 to 1024 threads, at most (1024,1024,64)", b.x, b.y, b.z);
    if (g.x == 0 || g.x > 0x7fffffffu || g.y == 0 || g.y > 65535 || g.z == 0 || g.z > 65535)
        fail("invalid grid (%u,%u,%u): x in 1..2^31-1, y and z in 1..65535", g.x, g.y, g.z);
    const unsigned limit = c.sm90 ? kMaxDynamicSmemSm90 : kMaxDynamicSmem;
    if (c.shared_mem_bytes > limit)
        fail("%u bytes of dynamic shared memory: %s allows at most %u per block", c.shared_mem_bytes,
             c.sm90 ? "sm_90" : "sm_80", limit);
}

// Functions run before and after every block (tma_emu.h resets and checks its per-block
// state with them).
inline std::vector<void (*)()>& block_start_hooks() {
    static std::vector<void (*)()> hooks;
    return hooks;
}
inline std::vector<void (*)()>& block_end_hooks() {
    static std::vector<void (*)()> hooks;
    return hooks;
}

// Runs body(arg) once per CUDA thread of the grid.
inline void run_grid(const char* name, const LaunchConfig& cfg, Scheduler::Body body, const void* arg) {
    launch_ctx.kernel = name;
    check_config(cfg);
    launch_ctx.grid = cfg.grid;
    launch_ctx.block = cfg.block;
    ++launch_ctx.launches;
    const unsigned threads = cfg.block.x * cfg.block.y * cfg.block.z;
    std::vector<Warp> warps((threads + 31) / 32);
    for (size_t w = 0; w < warps.size(); ++w) warps[w].lanes = std::min(32u, threads - (unsigned)w * 32);
    // Blocks in a scrambled order: an odd multiplier modulo a power of two is a bijection;
    // indices past the grid are skipped.
    const unsigned long blocks = (unsigned long)cfg.grid.x * cfg.grid.y * cfg.grid.z;
    unsigned long pow2 = 1;
    while (pow2 < blocks) pow2 *= 2;
    for (unsigned long s = 0; s < pow2; ++s) {
        const unsigned long i = (s * 0x9E3779B1ul + 12345) & (pow2 - 1);
        if (i >= blocks) continue;
        launch_ctx.block_idx = {(unsigned)(i % cfg.grid.x), (unsigned)(i / cfg.grid.x % cfg.grid.y),
                                (unsigned)(i / ((unsigned long)cfg.grid.x * cfg.grid.y))};
        // Exactly the requested bytes, so that AddressSanitizer flags any access past them.
        void* smem = nullptr;
        if (cfg.shared_mem_bytes > 0) {
            if (posix_memalign(&smem, 128, cfg.shared_mem_bytes) != 0) fail("out of host memory");
            memset(smem, 0xFF, cfg.shared_mem_bytes);
        }
        launch_ctx.dynamic_smem = static_cast<unsigned char*>(smem);
        launch_ctx.dynamic_smem_bytes = cfg.shared_mem_bytes;
        std::unique_ptr<SmemUse[]> reads(new SmemUse[(cfg.shared_mem_bytes + 15) / 16]);
        std::unique_ptr<SmemUse[]> writes(new SmemUse[(cfg.shared_mem_bytes + 15) / 16]);
        launch_ctx.smem_reads = reads.get();
        launch_ctx.smem_writes = writes.get();
        std::vector<unsigned char> view(static_cast<unsigned char*>(smem),
                                        static_cast<unsigned char*>(smem) + cfg.shared_mem_bytes);
        launch_ctx.async_view = view.data();
        for (auto hook : block_start_hooks()) hook();
        scheduler().run_block(cfg.block, warps, body, arg);
        for (auto hook : block_end_hooks()) hook();
        free(smem);
    }
    launch_ctx = {nullptr, {}, {}, {0, 0, 0}, nullptr, 0, launch_ctx.launches, nullptr, nullptr, nullptr};
}

// A kernel entry point and its name (for error messages); see EMU_KERNEL.
template <class... P>
struct Kernel {
    const char* name;
    void (*fn)(P...);
};
template <class... P>
constexpr Kernel<P...> kernel(const char* name, void (*fn)(P...)) {
    return {name, fn};
}

// An argument matches a kernel parameter when it has exactly the parameter's type (as the
// bytes cudarc pushes must), up to added constness of a pointee.
template <class P, class A>
constexpr bool arg_matches =
    std::is_same_v<P, A> ||
    (std::is_pointer_v<P> && std::is_pointer_v<A> &&
     std::is_same_v<std::remove_cv_t<std::remove_pointer_t<P>>, std::remove_cv_t<std::remove_pointer_t<A>>> &&
     std::is_const_v<std::remove_pointer_t<P>> >= std::is_const_v<std::remove_pointer_t<A>>);

// Launches `k` over the grid of `cfg` with `args`, which must have exactly the kernel's
// parameter types.
template <class... P, class... A>
void launch(const LaunchConfig& cfg, Kernel<P...> k, A... args) {
    static_assert(sizeof...(P) == sizeof...(A), "argument count differs from the kernel's parameter count");
    static_assert((arg_matches<P, A> && ...), "argument types must be exactly the kernel's parameter types");
    struct Call {
        void (*fn)(P...);
        std::tuple<P...> params;
        // Each thread gets its own copies of the parameters, as on the GPU.
        static void run(const void* self) {
            const Call& c = *static_cast<const Call*>(self);
            std::apply(c.fn, c.params);
        }
    } call{k.fn, std::tuple<P...>(args...)};
    run_grid(k.name, cfg, &Call::run, &call);
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
// Sanitizer reports name host frames only: add where in the grid the failing thread was.
inline const bool death_callback_installed = [] {
    __sanitizer_set_death_callback([] {
        const LaunchContext& l = launch_ctx;
        const ThreadContext* t = running.load(std::memory_order_relaxed);
        if (l.kernel == nullptr) return;
        if (t != nullptr)
            fprintf(stderr, "emu: the error above is in kernel %s, block (%u,%u,%u), thread (%u,%u,%u)\n", l.kernel,
                    l.block_idx.x, l.block_idx.y, l.block_idx.z, t->idx.x, t->idx.y, t->idx.z);
        else
            fprintf(stderr, "emu: the error above is in the launch of kernel %s, block (%u,%u,%u)\n", l.kernel,
                    l.block_idx.x, l.block_idx.y, l.block_idx.z);
    });
    return true;
}();
#endif

// Ends the process with a message if it is still running after `seconds` (a kernel stuck
// in a loop).
inline void watchdog(unsigned seconds) {
    signal(SIGALRM, [](int) {
        static const char msg[] = "emu: watchdog: still running, a kernel in an endless loop?\n";
        (void)!write(2, msg, sizeof msg - 1);
        _exit(124);
    });
    alarm(seconds);
}

}  // namespace emu

#define EMU_KERNEL(f) ::emu::kernel(#f, &f)

// ---- CUDA built-ins -----------------------------------------------------------------------
#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

inline void __syncthreads(const emu::Loc& loc = emu::Loc::current()) { emu::syncthreads(loc); }
inline void __syncwarp(unsigned mask = 0xffffffffu, const emu::Loc& loc = emu::Loc::current()) {
    emu::syncwarp(mask, loc);
}

// Every lane receives `var` of lane `src_lane` (of its segment of `width` lanes).
template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, const emu::Loc& loc = emu::Loc::current()) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of up to 8 bytes");
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
        emu::fail("__shfl_sync width %d is not a power of two up to 32", width);
    const unsigned lane = emu::self("__shfl_sync").lane;
    const unsigned src = lane / width * width + ((unsigned)src_lane % (unsigned)width);
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof var);
    bits = emu::warp_exchange(mask, bits, src, "__shfl_sync", loc);
    memcpy(&var, &bits, sizeof var);
    return var;
}

template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const emu::Loc& loc = emu::Loc::current()) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of up to 8 bytes");
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
        emu::fail("__shfl_xor_sync width %d is not a power of two up to 32", width);
    const unsigned lane = emu::self("__shfl_xor_sync").lane;
    unsigned src = lane ^ (unsigned)lane_mask;
    if (src >= (lane / width + 1) * width) src = lane;  // outside the lane's segment: own value
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof var);
    bits = emu::warp_exchange(mask, bits, src, "__shfl_xor_sync", loc);
    memcpy(&var, &bits, sizeof var);
    return var;
}

template <class T>
T atomicAdd(T* address, T val) {
    static_assert(std::is_arithmetic_v<T>, "atomicAdd on arithmetic types");
    return std::atomic_ref<T>(*address).fetch_add(val);
}

// The 8-byte vector form of sm_90 (atom.add.v2.f32): an aligned pair, each half atomic.
inline float2 atomicAdd(float2* address, float2 val) {
    if (reinterpret_cast<uintptr_t>(address) % 8 != 0)
        emu::fail("atomicAdd(float2*) on %p, which is not 8-byte aligned", static_cast<void*>(address));
    return {std::atomic_ref<float>(address->x).fetch_add(val.x), std::atomic_ref<float>(address->y).fetch_add(val.y)};
}

[[noreturn]] inline void __trap() { emu::fail("__trap()"); }
