// The emulation's own checks: kernels that break CUDA's rules (divergent or abandoned
// barriers, deadlocks, partial-warp collectives, misaligned WMMA pointers, ldmatrix rows
// that are misaligned or outside shared memory, cp.async copies never waited for, cp.async
// and ldmatrix on the same rows from different warps with no barrier between them,
// a read of rows whose cp.async is still in flight (after a barrier, before the copier's
// wait), shared-memory overruns, bad launch shapes, wgmma without its fence, wait or proxy
// fence (after cp.async and after plain stores),
// a wgmma operand rewritten in flight, wgmma outside whole warpgroups, TMA loads nobody
// waits for or that land on an operand in flight, mbarriers used before their init or
// that never complete, unbalanced named barriers, tensor maps that break
// cuTensorMapEncodeTiled's rules) must be reported,
// never silently computed. Each case runs in a child process whose exit status and error
// output are checked. And the PTX emulation's layouts agree with each other: a 16x16x16
// product through cp.async, ldmatrix and mma.sync, used as kernels/attention_mma.cu uses
// them, equals the matrix product, and so do the wgmma products of kernels/wgmma_probe.cu
// on 128-byte-swizzled tiles (both operands K-major; A in registers with B N-major; A
// M-major with B N-major; at N = 64 and K = 16, and K-major over four k-steps at K = 64,
// A in registers with a two-panel N-major B and both K-major at N = 128), which the GPU
// runs too; and so does the TMA
// probe of kernels/tma_probe.cu: a box lands in the layout kernels/attention_wgmma.cu's
// cp.async loader writes (128-byte swizzle), zero-filled past the tensor.
#include "harness.h"

#include <mma.h>

#include "tma_probe.cu"
#include "wgmma_probe.cu"
#include <sys/wait.h>

using namespace harness;

namespace {

Report report("emulator");

__global__ void divergent_barrier(float* out) {
    if (threadIdx.x < 32)
        __syncthreads();
    else
        __syncthreads();
    out[threadIdx.x] = 1.f;
}

__global__ void barrier_after_exit(float* out) {
    if (threadIdx.x >= 32) return;
    __syncthreads();
    out[threadIdx.x] = 1.f;
}

__global__ void warp_after_exit(float* out) {
    if (threadIdx.x % 32 >= 16) return;
    __syncwarp();
    out[threadIdx.x] = 1.f;
}

__global__ void deadlock(float* out) {
    if (threadIdx.x < 16)
        __syncwarp();
    else
        __syncthreads();
    out[threadIdx.x] = 1.f;
}

__global__ void partial_mask_shuffle(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffu, 1.f, 1); }

// Blocks of 48 threads: the second warp has 16 lanes, so the full mask names absent lanes.
__global__ void full_mask_in_partial_warp(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1); }

__global__ void misaligned_wmma(float* out) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, bf16, nvcuda::wmma::row_major> a;
    const bf16* smem = reinterpret_cast<const bf16*>(emu::dynamic_smem());
    nvcuda::wmma::load_matrix_sync(a, smem + 8, 16);  // 16 bytes past a 128-byte boundary
    out[threadIdx.x] = __bfloat162float(a.x[0]);
}

__global__ void shared_overrun(float* out) {
    float* smem = reinterpret_cast<float*>(emu::dynamic_smem());
    smem[threadIdx.x + 1] = 1.f;  // one float past the 32 the launch provides
    out[threadIdx.x] = smem[threadIdx.x];
}

__global__ void trapping(float* out) {
    if (threadIdx.x == 5) __trap();
    out[threadIdx.x] = 1.f;
}

__global__ void noop(float* out) { out[threadIdx.x] = 1.f; }

__global__ void misaligned_ldmatrix(float* out) {
    uint32_t r[4];
    ptx::ldmatrix_x4(r, emu::dynamic_smem() + 8 + 16 * (threadIdx.x % 8));
    out[threadIdx.x] = (float)r[0];
}

__global__ void ldmatrix_outside_shared(float* out) {
    uint32_t r[4];
    ptx::ldmatrix_x4(r, out + 4 * (threadIdx.x % 8));
    out[threadIdx.x] = (float)r[0];
}

__global__ void unwaited_cp_async(float* out) {
    ptx::cp_async_16(emu::dynamic_smem() + 16 * threadIdx.x, out + 4 * threadIdx.x, true);
    ptx::cp_async_commit();
}

// Warp 1 reads rows by ldmatrix while warp 0 refills them by cp.async with no barrier in
// between (the refill-before-everyone-is-done race of a double-buffered kernel).
__global__ void refill_race(float* out) {
    unsigned char* smem = emu::dynamic_smem();
    uint32_t r[4] = {0, 0, 0, 0};
    if (threadIdx.x >= 32) ptx::ldmatrix_x4(r, smem + 16 * (threadIdx.x % 32));
    if (threadIdx.x < 32) {
        ptx::cp_async_16(smem + 16 * threadIdx.x, out + 4 * threadIdx.x, true);
        ptx::cp_async_commit();
        ptx::cp_async_wait<0>();
    }
    out[threadIdx.x] = (float)r[0];
}

// Warp 1 reads rows warp 0 is still copying into (the wait but no barrier).
__global__ void read_before_barrier(float* out) {
    unsigned char* smem = emu::dynamic_smem();
    uint32_t r[4] = {0, 0, 0, 0};
    if (threadIdx.x < 32) {
        ptx::cp_async_16(smem + 16 * threadIdx.x, out + 4 * threadIdx.x, true);
        ptx::cp_async_commit();
        ptx::cp_async_wait<0>();
    }
    if (threadIdx.x >= 32) ptx::ldmatrix_x4(r, smem + 16 * (threadIdx.x % 32));
    out[threadIdx.x] = (float)r[0];
}

// Warp 1 reads rows after a barrier, but warp 0 waits for its copy into them only later:
// the copy is still in flight (a pipeline one stage too shallow does this).
__global__ void read_inflight_copy(float* out) {
    unsigned char* smem = emu::dynamic_smem();
    uint32_t r[4] = {0, 0, 0, 0};
    if (threadIdx.x < 32) {
        ptx::cp_async_16(smem + 16 * threadIdx.x, out + 4 * threadIdx.x, true);
        ptx::cp_async_commit();
    }
    __syncthreads();
    if (threadIdx.x >= 32) ptx::ldmatrix_x4(r, smem + 16 * (threadIdx.x % 32));
    if (threadIdx.x < 32) ptx::cp_async_wait<0>();
    out[threadIdx.x] = (float)r[0];
}

// C (16 x 16, row-major, f32) = A (16 x 16, row-major) B, with B given as B^T (row n holds
// column n): one warp, the operands copied to shared memory (rows padded to 24 elements)
// by cp.async, A read by ldmatrix.x4, B by ldmatrix.x4 on B^T's rows (two 8-column tiles).
__global__ void mma_product(const bf16* a, const bf16* bt, float* c) {
    constexpr int LD = 24;
    bf16* sa = reinterpret_cast<bf16*>(emu::dynamic_smem());
    bf16* sb = sa + 16 * LD;
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4, lm = lane / 8, lr = lane % 8;
    for (int v = lane; v < 32; v += 32) {  // 32 16-byte vectors per matrix
        ptx::cp_async_16(sa + (v / 2) * LD + (v % 2) * 8, a + v * 8, true);
        ptx::cp_async_16(sb + (v / 2) * LD + (v % 2) * 8, bt + v * 8, true);
    }
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncwarp();
    uint32_t af[4], bf[4];
    ptx::ldmatrix_x4(af, sa + ((lm & 1) * 8 + lr) * LD + (lm >> 1) * 8);
    ptx::ldmatrix_x4(bf, sb + ((lm >> 1) * 8 + lr) * LD + (lm & 1) * 8);
    float d[2][4] = {};
    const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
    ptx::mma_bf16_16816(d[0], af, b0);
    ptx::mma_bf16_16816(d[1], af, b1);
    for (int n = 0; n < 2; ++n)
        for (int e = 0; e < 4; ++e) c[(g + 8 * (e / 2)) * 16 + n * 8 + 2 * t + e % 2] = d[n][e];
}

// wgmma operands for the error cases: two 64 x 16 bf16 tiles (8 KB each, 128-byte rows)
// from the first 1024-byte boundary of the shared window, written with plain stores.
__device__ unsigned char* wg_tiles() {
    unsigned char* s = emu::dynamic_smem();
    s = ptx::align_1024(s);
    bf16* e = reinterpret_cast<bf16*>(s);
    for (unsigned i = threadIdx.x; i < 8192; i += blockDim.x) e[i] = __float2bfloat16((float)(i % 7) - 3.f);
    ptx::fence_proxy_async();
    __syncthreads();
    return s;
}

__device__ void wg_issue(unsigned char* s, float (&d)[32]) {
    ptx::wgmma_ss<64, 0, 0>(d, ptx::wgmma_desc_sw128(s, 16, 1024), ptx::wgmma_desc_sw128(s + 8192, 16, 1024), 0);
    ptx::wgmma_commit();
}

__global__ void wgmma_without_fence(float* out) {
    unsigned char* s = wg_tiles();
    float d[32];
    wg_issue(s, d);  // no wgmma_fence first
    ptx::wgmma_wait<0>();
    out[threadIdx.x] = d[0];
}

__global__ void wgmma_never_waited(float* out) {
    unsigned char* s = wg_tiles();
    float d[32];
    ptx::wgmma_fence();
    wg_issue(s, d);
    out[threadIdx.x] = 1.f;
}

// Thread 0 changes an element of B while the product is in flight.
__global__ void wgmma_tile_rewritten(float* out) {
    unsigned char* s = wg_tiles();
    float d[32];
    ptx::wgmma_fence();
    wg_issue(s, d);
    if (threadIdx.x == 0) s[8193] ^= 0x40;
    ptx::wgmma_wait<0>();
    out[threadIdx.x] = d[0];
}

// The tiles come by cp.async, and no thread runs fence.proxy.async before the product.
__global__ void wgmma_unfenced_copy(float* out) {
    unsigned char* s = emu::dynamic_smem();
    s = ptx::align_1024(s);
    for (unsigned i = threadIdx.x; i < 1024; i += blockDim.x)
        ptx::cp_async_16(s + 16 * i, out + 4 * (i % 64), true);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();
    float d[32];
    ptx::wgmma_fence();
    wg_issue(s, d);
    ptx::wgmma_wait<0>();
    out[threadIdx.x] = d[0];
}

// The tiles come by plain stores, and no thread runs fence.proxy.async before the product.
__global__ void wgmma_unfenced_store(float* out) {
    unsigned char* s = emu::dynamic_smem();
    s = ptx::align_1024(s);
    bf16* e = reinterpret_cast<bf16*>(s);
    for (unsigned i = threadIdx.x; i < 8192; i += blockDim.x) e[i] = __float2bfloat16((float)(i % 5) - 2.f);
    __syncthreads();
    float d[32];
    ptx::wgmma_fence();
    wg_issue(s, d);
    ptx::wgmma_wait<0>();
    out[threadIdx.x] = d[0];
}

__global__ void wgmma_partial_warpgroup(float* out) {
    unsigned char* s = wg_tiles();
    float d[32];
    ptx::wgmma_fence();
    wg_issue(s, d);
    ptx::wgmma_wait<0>();
    out[threadIdx.x] = d[0];
}

// A tensor map over `out` as a [1, 16, 1, 64] bf16 tensor (2048 bytes), boxes of 16 rows.
ptx::TmaMap out_map(float* out) {
    const uint64_t dims[4] = {64, 1, 16, 1}, strides[3] = {128, 128, 2048};
    const uint32_t box[4] = {64, 1, 16, 1};
    return ptx::tma_encode_4d_bf16(out, dims, strides, box, true);
}

// Shared memory of the TMA cases: 1024 bytes of alignment slack, a 2 KB tile, an mbarrier.
constexpr unsigned kTmaSmem = 1024 + 2048 + 8;

uint64_t* tma_barrier(unsigned char* s, unsigned count) {
    uint64_t* bar = reinterpret_cast<uint64_t*>(s + 2048);
    if (threadIdx.x == 0) {
        ptx::mbar_init(bar, count);
        ptx::fence_mbar_init();
    }
    __syncthreads();
    return bar;
}

__global__ void tma_never_waited(float* out) {
    const ptx::TmaMap map = out_map(out);
    unsigned char* s = ptx::align_1024(emu::dynamic_smem());
    uint64_t* bar = tma_barrier(s, 1);
    if (threadIdx.x == 0) {
        ptx::mbar_arrive_expect_tx(bar, 2048);
        ptx::tma_load_4d(s, &map, 0, 0, 0, 0, bar);
    }
}

// Two arrivals expected, one made: every thread waits forever.
__global__ void mbar_never_completes(float* out) {
    unsigned char* s = ptx::align_1024(emu::dynamic_smem());
    uint64_t* bar = tma_barrier(s, 2);
    if (threadIdx.x == 0) ptx::mbar_arrive(bar);
    ptx::mbar_wait(bar, 0);
    out[threadIdx.x] = 1.f;
}

__global__ void mbar_before_init(float* out) {
    unsigned char* s = ptx::align_1024(emu::dynamic_smem());
    ptx::mbar_arrive(reinterpret_cast<uint64_t*>(s + 2048));
    out[threadIdx.x] = 1.f;
}

// Warp 0 hands a turn to warp 1, which never takes it.
__global__ void named_barrier_unbalanced(float* out) {
    if (threadIdx.x < 32) ptx::named_bar_arrive(1, 64);
    out[threadIdx.x] = 1.f;
}

// A TMA load into the B tile of a product in flight.
__global__ void tma_into_operand_in_flight(float* out) {
    const ptx::TmaMap map = out_map(out);
    unsigned char* s = wg_tiles();
    uint64_t* bar = reinterpret_cast<uint64_t*>(s + 16384);
    if (threadIdx.x == 0) {
        ptx::mbar_init(bar, 1);
        ptx::fence_mbar_init();
    }
    __syncthreads();
    float d[32];
    ptx::wgmma_fence();
    wg_issue(s, d);
    if (threadIdx.x == 0) {
        ptx::mbar_arrive_expect_tx(bar, 2048);
        ptx::tma_load_4d(s + 8192, &map, 0, 0, 0, 0, bar);
    }
    ptx::wgmma_wait<0>();
    ptx::mbar_wait(bar, 0);
    out[threadIdx.x] = d[0];
}

__global__ void tma_map_misaligned(float* out) {
    const uint64_t dims[4] = {64, 1, 16, 1}, strides[3] = {128, 128, 2048};
    const uint32_t box[4] = {64, 1, 16, 1};
    const ptx::TmaMap map = ptx::tma_encode_4d_bf16(reinterpret_cast<char*>(out) + 2, dims, strides, box, true);
    out[threadIdx.x] = (float)map.words[0];
}

struct Case {
    const char* name;
    const char* expected;  // in the error output
    void (*run)(float* out);
};

const Case kCases[] = {
    {"divergent __syncthreads", "divergent __syncthreads()",
     [](float* out) { emu::launch({dim3(1), dim3(64), 0}, EMU_KERNEL(divergent_barrier), out); }},
    {"__syncthreads after threads exited", "has exited",
     [](float* out) { emu::launch({dim3(1), dim3(64), 0}, EMU_KERNEL(barrier_after_exit), out); }},
    {"__syncwarp after lanes exited", "has exited",
     [](float* out) { emu::launch({dim3(1), dim3(32), 0}, EMU_KERNEL(warp_after_exit), out); }},
    {"deadlock between warp and block barriers", "deadlock",
     [](float* out) { emu::launch({dim3(1), dim3(64), 0}, EMU_KERNEL(deadlock), out); }},
    {"shuffle with a partial mask", "whole-warp collectives only",
     [](float* out) { emu::launch({dim3(1), dim3(32), 0}, EMU_KERNEL(partial_mask_shuffle), out); }},
    {"full mask in a partial warp", "whole-warp collectives only",
     [](float* out) { emu::launch({dim3(1), dim3(48), 0}, EMU_KERNEL(full_mask_in_partial_warp), out); }},
    {"misaligned WMMA pointer", "not 32-byte aligned",
     [](float* out) { emu::launch({dim3(1), dim3(32), 1024}, EMU_KERNEL(misaligned_wmma), out); }},
    {"dynamic shared memory overrun", "heap-buffer-overflow",
     [](float* out) { emu::launch({dim3(1), dim3(32), 128}, EMU_KERNEL(shared_overrun), out); }},
    {"misaligned ldmatrix row", "not 16-byte aligned",
     [](float* out) { emu::launch({dim3(1), dim3(32), 1024}, EMU_KERNEL(misaligned_ldmatrix), out); }},
    {"ldmatrix row outside shared memory", "outside the block's dynamic shared memory",
     [](float* out) { emu::launch({dim3(1), dim3(32), 1024}, EMU_KERNEL(ldmatrix_outside_shared), out); }},
    {"cp.async never waited for", "never waited for",
     [](float* out) { emu::launch({dim3(1), dim3(32), 1024}, EMU_KERNEL(unwaited_cp_async), out); }},
    {"cp.async refill of rows another warp reads, no barrier between", "since the last __syncthreads: a race",
     [](float* out) { emu::launch({dim3(1), dim3(64), 1024}, EMU_KERNEL(refill_race), out); }},
    {"ldmatrix of rows another warp is copying into", "since the last __syncthreads: a race",
     [](float* out) { emu::launch({dim3(1), dim3(64), 1024}, EMU_KERNEL(read_before_barrier), out); }},
    {"ldmatrix of rows whose cp.async completes only after the barrier", "a race",
     [](float* out) { emu::launch({dim3(1), dim3(64), 1024}, EMU_KERNEL(read_inflight_copy), out); }},
    {"__trap", "__trap()", [](float* out) { emu::launch({dim3(2), dim3(32), 0}, EMU_KERNEL(trapping), out); }},
    {"block of 1025 threads", "invalid block",
     [](float* out) { emu::launch({dim3(1), dim3(1025), 0}, EMU_KERNEL(noop), out); }},
    {"grid.y of 65536", "invalid grid",
     [](float* out) { emu::launch({dim3(1, 65536), dim3(32), 0}, EMU_KERNEL(noop), out); }},
    {"more shared memory than sm_80 has", "sm_80 allows",
     [](float* out) { emu::launch({dim3(1), dim3(32), 200000}, EMU_KERNEL(noop), out); }},
    {"wgmma without wgmma.fence", "without a wgmma.fence",
     [](float* out) { emu::launch({dim3(1), dim3(128), 18432}, EMU_KERNEL(wgmma_without_fence), out); }},
    {"wgmma never waited for", "wgmma products it never waited for",
     [](float* out) { emu::launch({dim3(1), dim3(128), 18432}, EMU_KERNEL(wgmma_never_waited), out); }},
    {"wgmma operand rewritten in flight", "changed before the wgmma.wait_group",
     [](float* out) { emu::launch({dim3(1), dim3(128), 18432}, EMU_KERNEL(wgmma_tile_rewritten), out); }},
    {"wgmma on cp.async data without fence.proxy.async", "(fence.proxy.async)",
     [](float* out) { emu::launch({dim3(1), dim3(128), 18432}, EMU_KERNEL(wgmma_unfenced_copy), out); }},
    {"wgmma on stored data without fence.proxy.async", "after the block's last fence.proxy.async",
     [](float* out) { emu::launch({dim3(1), dim3(128), 18432}, EMU_KERNEL(wgmma_unfenced_store), out); }},
    {"wgmma in a block of 64 threads", "whole warpgroups",
     [](float* out) { emu::launch({dim3(1), dim3(64), 18432}, EMU_KERNEL(wgmma_partial_warpgroup), out); }},
    {"TMA load whose mbarrier nobody waits for", "whose mbarrier no thread waited for",
     [](float* out) { emu::launch({dim3(1), dim3(64), kTmaSmem}, EMU_KERNEL(tma_never_waited), out); }},
    {"mbarrier that never completes", "deadlock",
     [](float* out) { emu::launch({dim3(1), dim3(64), kTmaSmem}, EMU_KERNEL(mbar_never_completes), out); }},
    {"mbarrier used before its init", "before mbarrier.init",
     [](float* out) { emu::launch({dim3(1), dim3(32), kTmaSmem}, EMU_KERNEL(mbar_before_init), out); }},
    {"named barrier left part-arrived", "unbalanced",
     [](float* out) { emu::launch({dim3(1), dim3(64), 0}, EMU_KERNEL(named_barrier_unbalanced), out); }},
    {"TMA load into a wgmma operand in flight", "changed before the wgmma.wait_group",
     [](float* out) { emu::launch({dim3(1), dim3(128), 18432}, EMU_KERNEL(tma_into_operand_in_flight), out); }},
    {"tensor map over a misaligned address", "not 16-byte aligned",
     [](float* out) { emu::launch({dim3(1), dim3(32), 0}, EMU_KERNEL(tma_map_misaligned), out); }},
};

// Runs a case in a child process; true when it failed with the expected message.
bool reported(const Case& c) {
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) emu::fail("pipe: %s", strerror(errno));
    fflush(stdout);
    const pid_t pid = fork();
    if (pid < 0) emu::fail("fork: %s", strerror(errno));
    if (pid == 0) {
        dup2(pipe_fds[1], 2);
        close(pipe_fds[0]);
        DeviceArray<float> out(1100);
        c.run(out.ptr());
        _exit(0);  // not reported
    }
    close(pipe_fds[1]);
    std::string err;
    char buf[4096];
    for (ssize_t n; (n = read(pipe_fds[0], buf, sizeof buf)) > 0;) err.append(buf, (size_t)n);
    close(pipe_fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    const bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    const bool ok = failed && err.find(c.expected) != std::string::npos;
    if (!ok)
        printf("case \"%s\": expected a failure mentioning \"%s\"; %s, error output:\n%s\n", c.name, c.expected,
               failed ? "it failed otherwise" : "it passed", err.c_str());
    return ok;
}

}  // namespace

int main() {
    emu::watchdog(120);
    for (const Case& c : kCases) report.expect(reported(c), format("the emulation reports: %s", c.name));
    // And a well-formed launch of the same shape passes.
    DeviceArray<float> out(64);
    emu::launch({dim3(1), dim3(64), 0}, EMU_KERNEL(noop), out.ptr());
    report.close("a well-formed kernel runs", out.download(), std::vector<double>(64, 1.0), 0, 0);

    Rng rng(7);
    const std::vector<double> a = rng.values<bf16>(256), bt = rng.values<bf16>(256);
    std::vector<double> want(256, 0.0);
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j)
            for (int k = 0; k < 16; ++k) want[i * 16 + j] += a[i * 16 + k] * bt[j * 16 + k];
    DeviceArray<bf16> da(a), dbt(bt);
    DeviceArray<float> dc(256);
    emu::launch({dim3(1), dim3(32), 2 * 16 * 24 * 2}, EMU_KERNEL(mma_product), da.ptr(), dbt.ptr(), dc.ptr());
    report.close("cp.async + ldmatrix + mma.sync m16n8k16 = A B", dc.download(), want, 1e-5, 1e-5);

    // The wgmma layout probe (kernels/wgmma_probe.cu, which the GPU runs as well, as
    // `wgmma_layout_errors` in src/cuda/attention.rs launches it): D (64 x N) = A B^T of A
    // (64 x K) and B (N x K) in each operand form the attention kernels use.
    struct ProbeForm {
        int k, n;
        const char* what;
    };
    const ProbeForm forms[6] = {
        {16, 64, "A and B K-major in shared memory"},
        {16, 64, "A in registers, B N-major"},
        {16, 64, "A M-major and B N-major in shared memory"},
        {64, 64, "A and B K-major, four k-steps at +32 bytes in the swizzled rows"},
        {16, 128, "A in registers, B N-major in two 64-column panels"},
        {16, 128, "A and B K-major in shared memory, 128 rows of B"},
    };
    for (int form = 0; form < 6; ++form) {
        const int K = forms[form].k, N = forms[form].n;
        const std::vector<double> wa = rng.values<bf16>(64 * K), wb = rng.values<bf16>(N * K);
        std::vector<double> want(64 * N, 0.0);
        for (int i = 0; i < 64; ++i)
            for (int j = 0; j < N; ++j)
                for (int k = 0; k < K; ++k) want[i * N + j] += wa[i * K + k] * wb[j * K + k];
        DeviceArray<bf16> dwa(wa), dwb(wb);
        DeviceArray<float> d(64 * N);
        emu::launch({dim3(1), dim3(128), 30720 + 1024, true}, EMU_KERNEL(wgmma_probe_bf16), dwa.ptr(), dwb.ptr(),
                    d.ptr(), form);
        // fp32 sums of K products: 1e-5 per 16 (a wrong layout errs by order 1).
        const double tol = 1e-5 * K / 16;
        report.close(format("wgmma m64n%dk16 probe, form %d (%s, K = %d) = A B^T", N, form, forms[form].what, K),
                     d.download(), want, tol, tol);
    }

    // The TMA probe as `tma_layout_mismatches` (src/cuda/attention.rs) runs it: a box of a
    // [2, 150, 3, 128] tensor whose map is encoded as `bhnd_tensor_map` encodes it, at head
    // dims 64.., head 2, tokens 100..227 of batch element 1, lands as issue_tile_sw128 writes
    // a tile (token r's 16-byte chunk c at chunk c ^ (r % 8)), zeros past the 150 tokens.
    const size_t B = 2, N = 150, H = 3, D = 128;
    const std::vector<double> x = rng.values<bf16>(B * N * H * D);
    std::vector<double> tile(128 * 64, 0.0);
    for (size_t r = 0; r < 128 && 100 + r < N; ++r)
        for (size_t c = 0; c < 64; ++c)
            tile[r * 64 + (((c / 8) ^ (r % 8)) * 8) + c % 8] = x[((1 * N + 100 + r) * H + 2) * D + 64 + c];
    DeviceArray<bf16> dx(x), dtile(128 * 64);
    const uint64_t dims[4] = {D, H, N, B}, strides[3] = {D * 2, H * D * 2, N * H * D * 2};
    const uint32_t box[4] = {64, 1, 128, 1};
    emu::launch({dim3(1), dim3(32), 16384 + 1024 + 8, true}, EMU_KERNEL(tma_probe_bf16),
                ptx::tma_encode_4d_bf16(dx.ptr(), dims, strides, box, true), dtile.ptr(), 64, 2, 100, 1);
    report.close("the TMA probe: a box lands 128-byte-swizzled, zero-filled past the tensor", dtile.download(), tile,
                 0, 0);
    return report.finish();
}
