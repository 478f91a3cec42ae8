// The emulation's own checks: kernels that break CUDA's rules (divergent or abandoned
// barriers, deadlocks, partial-warp collectives, misaligned WMMA pointers, ldmatrix rows
// that are misaligned or outside shared memory, cp.async copies never waited for, cp.async
// and ldmatrix on the same rows from different warps with no barrier between them,
// shared-memory overruns, bad launch shapes) must be reported, never silently computed.
// Each case runs in a child process whose exit status and error output are checked. And
// the PTX emulation's layouts agree with each other: a 16x16x16 product through cp.async,
// ldmatrix and mma.sync, used as kernels/attention_mma.cu uses them, equals the matrix
// product.
#include "harness.h"

#include <mma.h>

#include "ptx.cuh"
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
    {"__trap", "__trap()", [](float* out) { emu::launch({dim3(2), dim3(32), 0}, EMU_KERNEL(trapping), out); }},
    {"block of 1025 threads", "invalid block",
     [](float* out) { emu::launch({dim3(1), dim3(1025), 0}, EMU_KERNEL(noop), out); }},
    {"grid.y of 65536", "invalid grid",
     [](float* out) { emu::launch({dim3(1, 65536), dim3(32), 0}, EMU_KERNEL(noop), out); }},
    {"more shared memory than sm_80 has", "sm_80 allows",
     [](float* out) { emu::launch({dim3(1), dim3(32), 200000}, EMU_KERNEL(noop), out); }},
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
    return report.finish();
}
