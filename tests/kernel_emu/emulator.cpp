// The emulation's own checks: kernels that break CUDA's rules (divergent or abandoned
// barriers, deadlocks, partial-warp collectives, misaligned WMMA pointers, shared-memory
// overruns, bad launch shapes) must be reported, never silently computed. Each case runs
// in a child process whose exit status and error output are checked.
#include "harness.h"

#include <mma.h>
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
    return report.finish();
}
