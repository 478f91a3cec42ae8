// An emulated CUDA driver (libcuda.so) for the device emulation tier
// (tests/device_emu/README.md): the engine's own host code — every launcher in src/cuda,
// the memory pool, CUDA graphs, TMA tensor maps — runs unchanged against it, and the
// kernels run on the CPU through the kernel emulation (tests/kernel_emu/include).
//
// The device it shows is one sm_90 GPU with 132 SMs. Device memory is host memory;
// every call runs its work at once on the calling thread (a stream is always idle), under
// one lock. What it checks beyond computing results, each as the driver would fail:
//   * every copy, memset and cuBLASLt operand lies inside one live allocation;
//   * frees name live allocations;
//   * a launch with more than 48 KB of dynamic shared memory needs the kernel's
//     CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES set at least that high;
//   * stream capture records and does not run; synchronising, copying to or from the
//     host, or freeing memory the capture did not allocate, fails the capture;
//   * a graph whose allocations are still live cannot be launched again.
// Fresh allocations are filled with 0xFF bytes (NaN in f32 and bf16), so that an output
// element no kernel writes shows, and end at an unmapped page, so that an access past the
// end faults and is reported with the kernel and the allocation (writes into the rounding
// to 256 bytes before that page are found when the allocation is freed). Kernel errors
// end the process with status 70, as in the kernel emulation.
#include <dlfcn.h>
#include <dirent.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "family_abi.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

using CUresult = int;
using CUdeviceptr = unsigned long long;
using CUdevice = int;

enum : int {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    CAPTURE_UNSUPPORTED = 900,
    CAPTURE_INVALIDATED = 901,
};

namespace {

std::recursive_mutex& lock() {
    static std::recursive_mutex m;
    return m;
}
#define LOCK std::lock_guard<std::recursive_mutex> guard(lock())

// Reports why a call fails (the engine shows only the error code).
void why(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void why(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "emu driver: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

constexpr unsigned long long kTotalMemory = 80ull << 30;
constexpr unsigned kDefaultSmem = 48 * 1024;

// ---- Memory ---------------------------------------------------------------------------

struct Allocation {
    size_t bytes;
    bool graph;  // owned by a graph (freed with it)
};
std::map<uintptr_t, Allocation>& allocations() {
    static std::map<uintptr_t, Allocation> m;
    return m;
}
unsigned long long pool_used = 0, pool_high = 0;

// Allocations end at a page that is not mapped (rounded up to 256 bytes, the alignment
// of the driver's allocations), so that a kernel access past the end faults at once and
// the fault handler names the kernel and the allocation; the bytes between the end and
// the guard page hold kSlack, checked at free.
constexpr size_t kPage = 4096;
constexpr unsigned char kSlack = 0xA5;

size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

// The mapping that holds an allocation of `bytes` at `ptr`: its start and length
// (including the guard page).
std::pair<uintptr_t, size_t> mapping_of(uintptr_t ptr, size_t bytes) {
    const size_t body = round_up(std::max<size_t>(bytes, 1), 256), span = round_up(body, kPage);
    return {ptr + body - span, span + kPage};
}

uintptr_t allocate(size_t bytes) {
    const size_t body = round_up(std::max<size_t>(bytes, 1), 256), span = round_up(body, kPage);
    void* base = mmap(nullptr, span + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return 0;
    if (mprotect(static_cast<char*>(base) + span, kPage, PROT_NONE) != 0) {
        munmap(base, span + kPage);
        return 0;
    }
    unsigned char* p = static_cast<unsigned char*>(base) + span - body;
    memset(p, 0xFF, bytes);
    memset(p + bytes, kSlack, body - bytes);
    return reinterpret_cast<uintptr_t>(p);
}

// The kernel running now (for fault reports), or null.
const char* running_kernel = nullptr;

void release(uintptr_t ptr, size_t bytes) {
    const size_t body = round_up(std::max<size_t>(bytes, 1), 256);
    const unsigned char* p = reinterpret_cast<const unsigned char*>(ptr);
    for (size_t i = bytes; i < body; ++i)
        if (p[i] != kSlack) {
            fprintf(stderr,
                    "emu driver: byte %zu past the end of the %zu-byte allocation at %#lx was written (found when it "
                    "was freed)\n",
                    i - bytes, bytes, (unsigned long)ptr);
            abort();
        }
    auto [start, len] = mapping_of(ptr, bytes);
    munmap(reinterpret_cast<void*>(start), len);
}

// True when [ptr, ptr + bytes) lies inside one live allocation.
bool inside(uintptr_t ptr, size_t bytes) {
    auto& m = allocations();
    auto it = m.upper_bound(ptr);
    if (it == m.begin()) return false;
    --it;
    return ptr >= it->first && ptr + bytes <= it->first + it->second.bytes;
}

bool check_range(const char* what, uintptr_t ptr, size_t bytes) {
    if (bytes == 0 || inside(ptr, bytes)) return true;
    why("%s: [%#lx, +%zu bytes) is not inside one live allocation", what, (unsigned long)ptr, bytes);
    return false;
}

// ---- Kernels --------------------------------------------------------------------------

struct Function {
    const EmuKernel* kernel;
    int max_dynamic_smem = kDefaultSmem;
};

// Every kernel of every libemu_<family>.so beside this library, by name (names are unique
// across families; the build checks).
std::unordered_map<std::string, Function>& functions() {
    static std::unordered_map<std::string, Function> fns = [] {
        std::unordered_map<std::string, Function> out;
        Dl_info info;
        if (dladdr(reinterpret_cast<void*>(&functions), &info) == 0 || info.dli_fname == nullptr) return out;
        std::string dir = info.dli_fname;
        dir = dir.substr(0, dir.rfind('/') + 1);
        DIR* d = opendir(dir.c_str());
        if (d == nullptr) return out;
        while (dirent* e = readdir(d)) {
            std::string name = e->d_name;
            if (name.rfind("libemu_", 0) != 0 || name.size() < 4 || name.substr(name.size() - 3) != ".so") continue;
            void* lib = dlopen((dir + name).c_str(), RTLD_NOW | RTLD_LOCAL);
            if (lib == nullptr) {
                why("cannot load %s: %s", name.c_str(), dlerror());
                continue;
            }
            auto list = reinterpret_cast<EmuFamilyKernels>(dlsym(lib, "emu_family_kernels"));
            if (list == nullptr) continue;
            int n = 0;
            const EmuKernel* k = list(&n);
            for (int i = 0; i < n; ++i) out[k[i].name] = Function{&k[i]};
        }
        closedir(d);
        return out;
    }();
    return fns;
}

// ---- Faults ---------------------------------------------------------------------------

struct sigaction previous_segv;

// A fault in the guard page of a live allocation: names the kernel and the allocation,
// then ends the process (status 70, as kernel errors in the emulation do). Other faults go
// to the handler that was there before (Rust's stack-overflow report).
void on_fault(int sig, siginfo_t* info, void* ctx) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
    for (const auto& [ptr, a] : allocations()) {
        const size_t body = round_up(std::max<size_t>(a.bytes, 1), 256);
        if (addr >= ptr + body && addr < ptr + body + kPage) {
            char msg[512];
            const int n = snprintf(msg, sizeof msg,
                                   "emu driver: %s accessed byte %lu past the end of the %zu-byte allocation at "
                                   "%#lx\n",
                                   running_kernel != nullptr ? running_kernel : "a host copy", (unsigned long)(addr - ptr - a.bytes),
                                   a.bytes, (unsigned long)ptr);
            (void)!write(2, msg, n);
            _exit(70);
        }
    }
    if (previous_segv.sa_flags & SA_SIGINFO) {
        previous_segv.sa_sigaction(sig, info, ctx);
    } else if (previous_segv.sa_handler != SIG_DFL && previous_segv.sa_handler != SIG_IGN) {
        previous_segv.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);
        raise(sig);
    }
}

// Installs on_fault (once) with an alternate stack for the calling thread (kernel threads
// are fibers with small stacks).
void watch_faults() {
    static thread_local bool stack_set = false;
    if (!stack_set) {
        stack_t st{};
        st.ss_size = 64 * 1024;
        st.ss_sp = malloc(st.ss_size);
        sigaltstack(&st, nullptr);
        stack_set = true;
    }
    static bool installed = [] {
        struct sigaction sa{};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
        return true;
    }();
    (void)installed;
}

// ---- Streams, capture and graphs --------------------------------------------------------

struct Graph;

struct Stream {
    Graph* capture = nullptr;  // the graph being recorded, while capturing
    bool invalidated = false;  // the capture met an operation it cannot record
};

struct Graph {
    std::vector<std::function<CUresult()>> nodes;
    // Allocations made by the recording: the graph owns them until it is destroyed.
    std::vector<uintptr_t> owned;
    std::vector<size_t> owned_bytes;
    std::vector<bool> live;  // allocated by a launch and not yet freed
    int execs = 0;           // instantiations that still exist
    bool destroyed = false;
};

struct Exec {
    Graph* graph;
};

std::vector<Graph*>& graphs() {
    static std::vector<Graph*> g;
    return g;
}
unsigned long long graph_reserved = 0, graph_reserved_high = 0;

// The graph a stream records into, or null.
Graph* capturing(void* stream) { return stream == nullptr ? nullptr : static_cast<Stream*>(stream)->capture; }

// Marks the stream's capture as failed by `what` (an operation a capture cannot hold).
CUresult refuse_in_capture(void* stream, const char* what) {
    auto* s = static_cast<Stream*>(stream);
    s->invalidated = true;
    why("%s while the stream is being captured: a recorded graph cannot hold it", what);
    return CAPTURE_UNSUPPORTED;
}

// Runs `op` on `stream` now, or records it into the stream's capture.
CUresult enqueue(void* stream, std::function<CUresult()> op) {
    if (Graph* g = capturing(stream)) {
        g->nodes.push_back(std::move(op));
        return OK;
    }
    return op();
}

bool any_capture() {
    for (Graph* g : graphs())
        if (!g->destroyed && g->execs < 0) return true;
    return false;
}

void release_graph(Graph* g) {
    for (size_t i = 0; i < g->owned.size(); ++i) {
        allocations().erase(g->owned[i]);
        release(g->owned[i], g->owned_bytes[i]);
        graph_reserved -= g->owned_bytes[i];
    }
    g->owned.clear();
    g->owned_bytes.clear();
    g->live.clear();
    graphs().erase(std::find(graphs().begin(), graphs().end(), g));
    delete g;
}

}  // namespace

// ---- Initialisation, devices, contexts --------------------------------------------------

EXPORT CUresult cuInit(unsigned) { return OK; }
EXPORT CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return OK;
}
EXPORT CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return OK;
}
EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return OK;
}
EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, len, "%s", "emulated sm_90 device (CPU)");
    return OK;
}
EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = kTotalMemory;
    return OK;
}
EXPORT CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;                // MAX_THREADS_PER_BLOCK
        case 8: *v = kDefaultSmem; break;        // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;                 // WARP_SIZE
        case 13: *v = 1980000; break;            // CLOCK_RATE (kHz)
        case 16: *v = 132; break;                // MULTIPROCESSOR_COUNT
        case 36: *v = 2619000; break;            // MEMORY_CLOCK_RATE (kHz)
        case 37: *v = 6144; break;               // GLOBAL_MEMORY_BUS_WIDTH
        case 38: *v = 50 * 1024 * 1024; break;   // L2_CACHE_SIZE
        case 75: *v = 9; break;                  // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;                  // COMPUTE_CAPABILITY_MINOR
        case 81: *v = 233472; break;             // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 97: *v = 232448; break;             // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *v = 1; break;                 // MEMORY_POOLS_SUPPORTED
        default: *v = 0;
    }
    return OK;
}
EXPORT CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
    static int primary;
    *ctx = &primary;
    return OK;
}
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return OK; }
static void* current_ctx = nullptr;
EXPORT CUresult cuCtxSetCurrent(void* ctx) {
    current_ctx = ctx;
    return OK;
}
EXPORT CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = current_ctx;
    return OK;
}
EXPORT CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return OK;
}
EXPORT CUresult cuCtxSynchronize() {
    LOCK;
    for (Graph* g : graphs())
        if (g->execs < 0) return CAPTURE_UNSUPPORTED;
    return OK;
}
EXPORT CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    LOCK;
    *total = kTotalMemory;
    *free_bytes = kTotalMemory - std::min<unsigned long long>(kTotalMemory, pool_used + graph_reserved);
    return OK;
}

EXPORT CUresult cuGetErrorString(CUresult e, const char** s) {
    static const char* text = "error (emulated driver; see its message above)";
    *s = text;
    return e == OK ? OK : OK;
}
EXPORT CUresult cuGetErrorName(CUresult, const char** s) {
    static const char* text = "CUDA_ERROR (emulated driver)";
    *s = text;
    return OK;
}

// ---- Memory pools -------------------------------------------------------------------------

EXPORT CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice) {
    static int the_pool;
    *pool = &the_pool;
    return OK;
}
EXPORT CUresult cuMemPoolSetAttribute(void*, int attr, void* value) {
    LOCK;
    if (attr == 8 || attr == 6) pool_high = pool_used;  // USED_MEM_HIGH / RESERVED_MEM_HIGH: reset
    (void)value;
    return OK;
}
EXPORT CUresult cuMemPoolGetAttribute(void*, int attr, void* value) {
    LOCK;
    auto* v = static_cast<unsigned long long*>(value);
    switch (attr) {
        case 5: case 7: *v = pool_used; break;
        case 6: case 8: *v = pool_high; break;
        case 4: *v = ~0ull; break;
        default: *static_cast<int*>(value) = 0;
    }
    return OK;
}

// ---- Allocation ---------------------------------------------------------------------------

EXPORT CUresult cuMemAllocAsync(CUdeviceptr* out, size_t bytes, void* stream) {
    LOCK;
    uintptr_t p = allocate(bytes);
    if (p == 0) return OUT_OF_MEMORY;
    *out = p;
    if (Graph* g = capturing(stream)) {
        // An allocation node: the address is the graph's for all its launches.
        allocations()[p] = {bytes, true};
        const size_t i = g->owned.size();
        g->owned.push_back(p);
        g->owned_bytes.push_back(bytes);
        g->live.push_back(false);
        graph_reserved += bytes;
        graph_reserved_high = std::max(graph_reserved_high, graph_reserved);
        g->nodes.push_back([g, i]() -> CUresult {
            if (g->live[i]) {
                why("a graph is launched again while an allocation of its previous launch is still live");
                return INVALID_VALUE;
            }
            g->live[i] = true;
            memset(reinterpret_cast<void*>(g->owned[i]), 0xFF, g->owned_bytes[i]);
            return OK;
        });
        return OK;
    }
    allocations()[p] = {bytes, false};
    pool_used += bytes;
    pool_high = std::max(pool_high, pool_used);
    return OK;
}
EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* out, size_t bytes) {
    LOCK;
    if (any_capture()) return CAPTURE_UNSUPPORTED;
    return cuMemAllocAsync(out, bytes, nullptr);
}

EXPORT CUresult cuMemFreeAsync(CUdeviceptr ptr, void* stream) {
    LOCK;
    auto it = allocations().find(ptr);
    if (it == allocations().end()) {
        why("free of %#llx, which is not a live allocation", ptr);
        return INVALID_VALUE;
    }
    if (it->second.graph) {
        // Graph memory: a free node inside a capture, or a free after a launch.
        for (Graph* g : graphs())
            for (size_t i = 0; i < g->owned.size(); ++i)
                if (g->owned[i] == ptr) {
                    if (capturing(stream) == g) {
                        g->nodes.push_back([g, i]() -> CUresult {
                            g->live[i] = false;
                            return OK;
                        });
                    } else {
                        g->live[i] = false;
                    }
                    return OK;
                }
        return OK;
    }
    if (capturing(stream) != nullptr) {
        why("free of %#llx (%zu bytes, allocated outside the capture) while the stream is being captured", ptr,
            it->second.bytes);
        static_cast<Stream*>(stream)->invalidated = true;
        return INVALID_VALUE;
    }
    pool_used -= it->second.bytes;
    release(ptr, it->second.bytes);
    allocations().erase(it);
    return OK;
}
EXPORT CUresult cuMemFree_v2(CUdeviceptr ptr) { return cuMemFreeAsync(ptr, nullptr); }

EXPORT CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = malloc(std::max<size_t>(bytes, 1));
    return *p == nullptr ? OUT_OF_MEMORY : OK;
}
EXPORT CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
EXPORT CUresult cuMemFreeHost(void* p) {
    free(p);
    return OK;
}

// ---- Copies and memsets ---------------------------------------------------------------------

EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, void* stream) {
    LOCK;
    if (capturing(stream)) return refuse_in_capture(stream, "a host-to-device copy");
    if (!check_range("host-to-device copy", dst, bytes)) return INVALID_VALUE;
    memcpy(reinterpret_cast<void*>(dst), src, bytes);
    return OK;
}
EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    return cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr);
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, void* stream) {
    LOCK;
    if (capturing(stream)) return refuse_in_capture(stream, "a device-to-host copy");
    if (!check_range("device-to-host copy", src, bytes)) return INVALID_VALUE;
    memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    return OK;
}
EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    return cuMemcpyDtoHAsync_v2(dst, src, bytes, nullptr);
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void* stream) {
    LOCK;
    return enqueue(stream, [=]() -> CUresult {
        if (!check_range("device-to-device copy (source)", src, bytes) ||
            !check_range("device-to-device copy (destination)", dst, bytes))
            return INVALID_VALUE;
        memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
        return OK;
    });
}

template <class T>
static CUresult memset_n(const char* what, CUdeviceptr dst, T value, size_t n, void* stream) {
    LOCK;
    return enqueue(stream, [=]() -> CUresult {
        if (!check_range(what, dst, n * sizeof(T))) return INVALID_VALUE;
        if (dst % sizeof(T) != 0) {
            why("%s at %#llx, which is not %zu-byte aligned", what, dst, sizeof(T));
            return INVALID_VALUE;
        }
        T* p = reinterpret_cast<T*>(dst);
        for (size_t i = 0; i < n; ++i) p[i] = value;
        return OK;
    });
}
EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* stream) {
    return memset_n<unsigned char>("cuMemsetD8", dst, v, n, stream);
}
EXPORT CUresult cuMemsetD16Async(CUdeviceptr dst, unsigned short v, size_t n, void* stream) {
    return memset_n<unsigned short>("cuMemsetD16", dst, v, n, stream);
}
EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* stream) {
    return memset_n<unsigned>("cuMemsetD32", dst, v, n, stream);
}
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { return cuMemsetD8Async(dst, v, n, nullptr); }

// ---- Streams and events ---------------------------------------------------------------------

EXPORT CUresult cuStreamCreate(void** stream, unsigned) {
    *stream = new Stream;
    return OK;
}
EXPORT CUresult cuStreamCreateWithPriority(void** stream, unsigned, int) { return cuStreamCreate(stream, 0); }
EXPORT CUresult cuStreamDestroy_v2(void* stream) {
    delete static_cast<Stream*>(stream);
    return OK;
}
EXPORT CUresult cuStreamSynchronize(void* stream) {
    LOCK;
    if (capturing(stream)) return refuse_in_capture(stream, "a stream synchronisation");
    return OK;
}
EXPORT CUresult cuStreamQuery(void*) { return OK; }
EXPORT CUresult cuStreamWaitEvent(void* stream, void*, unsigned) {
    LOCK;
    return OK;
}

struct Event {
    double at = 0;
};
EXPORT CUresult cuEventCreate(void** ev, unsigned) {
    *ev = new Event;
    return OK;
}
EXPORT CUresult cuEventDestroy_v2(void* ev) {
    delete static_cast<Event*>(ev);
    return OK;
}
EXPORT CUresult cuEventRecord(void* ev, void* stream) {
    LOCK;
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    static_cast<Event*>(ev)->at = t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
    (void)stream;
    return OK;
}
EXPORT CUresult cuEventSynchronize(void*) { return OK; }
EXPORT CUresult cuEventQuery(void*) { return OK; }
EXPORT CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    *ms = (float)(static_cast<Event*>(end)->at - static_cast<Event*>(start)->at);
    return OK;
}
EXPORT CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

// ---- Modules and launches -------------------------------------------------------------------

EXPORT CUresult cuModuleLoadData(void** module, const void*) {
    LOCK;
    static int all;  // one module holds every kernel of every family
    if (functions().empty()) {
        why("no kernel family libraries (libemu_*.so) beside the emulated driver");
        return NOT_FOUND;
    }
    *module = &all;
    return OK;
}
EXPORT CUresult cuModuleUnload(void*) { return OK; }
EXPORT CUresult cuModuleGetFunction(void** fn, void*, const char* name) {
    LOCK;
    auto it = functions().find(name);
    if (it == functions().end()) {
        why("no kernel named %s", name);
        return NOT_FOUND;
    }
    *fn = &it->second;
    return OK;
}
EXPORT CUresult cuFuncSetAttribute(void* fn, int attr, int value) {
    LOCK;
    auto* f = static_cast<Function*>(fn);
    if (attr == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > 232448) {
            why("%s: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES %d above the device's 232448", f->kernel->name,
                value);
            return INVALID_VALUE;
        }
        f->max_dynamic_smem = value;
    }
    return OK;
}
EXPORT CUresult cuFuncGetAttribute(int* v, int attr, void* fn) {
    LOCK;
    auto* f = static_cast<Function*>(fn);
    switch (attr) {
        case 0: *v = 1024; break;
        case 4: *v = 32; break;
        case 8: *v = f->max_dynamic_smem; break;
        default: *v = 0;
    }
    return OK;
}
EXPORT CUresult cuFuncSetCacheConfig(void*, int) { return OK; }

EXPORT CUresult cuLaunchKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                               unsigned smem, void* stream, void** params, void** extra) {
    LOCK;
    auto* f = static_cast<Function*>(fn);
    const EmuKernel* k = f->kernel;
    if (extra != nullptr) {
        why("%s: launch arguments through `extra` are not emulated", k->name);
        return INVALID_VALUE;
    }
    if ((int)smem > f->max_dynamic_smem) {
        why("%s: launch with %u bytes of dynamic shared memory, above the kernel's limit of %d "
            "(set CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)",
            k->name, smem, f->max_dynamic_smem);
        return INVALID_VALUE;
    }
    // The arguments are copied now: cudarc's parameter array lives only during this call.
    size_t offset = 0;
    std::vector<size_t> at(k->param_count);
    for (int i = 0; i < k->param_count; ++i) {
        offset = (offset + k->params[i].align - 1) / k->params[i].align * k->params[i].align;
        at[i] = offset;
        offset += k->params[i].size;
    }
    auto bytes = std::shared_ptr<unsigned char[]>(
        static_cast<unsigned char*>(aligned_alloc(128, (offset + 127) / 128 * 128 + 128)), free);
    for (int i = 0; i < k->param_count; ++i) memcpy(bytes.get() + at[i], params[i], k->params[i].size);
    EmuLaunch launch{{gx, gy, gz}, {bx, by, bz}, smem};
    watch_faults();
    return enqueue(stream, [k, launch, bytes, at]() -> CUresult {
        std::vector<void*> args(at.size());
        for (size_t i = 0; i < at.size(); ++i) args[i] = bytes.get() + at[i];
        running_kernel = k->name;
        k->run(k->fn, k->name, &launch, args.data());
        running_kernel = nullptr;
        return OK;
    });
}

EXPORT CUresult cuLaunchHostFunc(void* stream, void (*fn)(void*), void* data) {
    LOCK;
    return enqueue(stream, [fn, data]() -> CUresult {
        fn(data);
        return OK;
    });
}

// ---- Work recorded by other emulated libraries (cuBLASLt) ------------------------------------

// Runs `op(ctx)` on `stream` now, or records it into the stream's capture; `drop(ctx)`
// when the op is no longer needed.
EXPORT int emu_driver_enqueue(void* stream, int (*op)(void*), void* ctx, void (*drop)(void*)) {
    LOCK;
    auto shared = std::shared_ptr<void>(ctx, drop);
    return enqueue(stream, [op, shared]() -> CUresult { return op(shared.get()); });
}
// True when [ptr, ptr + bytes) lies inside one live allocation (else reports `what`).
EXPORT int emu_driver_check_range(const char* what, unsigned long long ptr, size_t bytes) {
    LOCK;
    return check_range(what, ptr, bytes) ? 1 : 0;
}

// ---- Capture and graphs ---------------------------------------------------------------------

EXPORT CUresult cuStreamBeginCapture_v2(void* stream, int) {
    LOCK;
    auto* s = static_cast<Stream*>(stream);
    if (s == nullptr || s->capture != nullptr) return INVALID_VALUE;
    s->capture = new Graph;
    s->capture->execs = -1;  // recording
    s->invalidated = false;
    graphs().push_back(s->capture);
    return OK;
}
EXPORT CUresult cuStreamBeginCapture(void* stream, int mode) { return cuStreamBeginCapture_v2(stream, mode); }
EXPORT CUresult cuStreamIsCapturing(void* stream, int* status) {
    LOCK;
    auto* s = static_cast<Stream*>(stream);
    *status = s != nullptr && s->capture != nullptr ? (s->invalidated ? 2 : 1) : 0;
    return OK;
}
EXPORT CUresult cuStreamEndCapture(void* stream, void** graph) {
    LOCK;
    auto* s = static_cast<Stream*>(stream);
    if (s == nullptr || s->capture == nullptr) return INVALID_VALUE;
    Graph* g = s->capture;
    s->capture = nullptr;
    g->execs = 0;
    if (s->invalidated) {
        s->invalidated = false;
        release_graph(g);
        *graph = nullptr;
        return CAPTURE_INVALIDATED;
    }
    *graph = g;
    return OK;
}
EXPORT CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    LOCK;
    auto* g = static_cast<Graph*>(graph);
    ++g->execs;
    *exec = new Exec{g};
    return OK;
}
EXPORT CUresult cuGraphUpload(void*, void*) { return OK; }
EXPORT CUresult cuGraphLaunch(void* exec, void* stream) {
    LOCK;
    Graph* g = static_cast<Exec*>(exec)->graph;
    if (capturing(stream)) return refuse_in_capture(stream, "a graph launch");
    watch_faults();
    for (auto& node : g->nodes)
        if (CUresult r = node(); r != OK) return r;
    return OK;
}
EXPORT CUresult cuGraphExecDestroy(void* exec) {
    LOCK;
    auto* e = static_cast<Exec*>(exec);
    Graph* g = e->graph;
    delete e;
    if (--g->execs == 0 && g->destroyed) release_graph(g);
    return OK;
}
EXPORT CUresult cuGraphDestroy(void* graph) {
    LOCK;
    auto* g = static_cast<Graph*>(graph);
    g->destroyed = true;
    if (g->execs == 0) release_graph(g);
    return OK;
}
EXPORT CUresult cuDeviceGraphMemTrim(CUdevice) { return OK; }
EXPORT CUresult cuDeviceGetGraphMemAttribute(CUdevice, int attr, void* value) {
    LOCK;
    auto* v = static_cast<unsigned long long*>(value);
    *v = (attr == 1 || attr == 3) ? graph_reserved_high : graph_reserved;
    return OK;
}
EXPORT CUresult cuDeviceSetGraphMemAttribute(CUdevice, int attr, void*) {
    LOCK;
    if (attr == 1 || attr == 3) graph_reserved_high = graph_reserved;
    return OK;
}

// ---- TMA tensor maps (encoded by the family that defines the encoder) -------------------------

using EncodeFn = int (*)(void* map, int dtype, unsigned rank, void* base, const unsigned long long* dims,
                         const unsigned long long* strides, const unsigned* box, const unsigned* elem_strides,
                         int interleave, int swizzle, int l2, int oob);

EXPORT CUresult cuTensorMapEncodeTiled(void* map, int dtype, unsigned rank, void* base, const unsigned long long* dims,
                                       const unsigned long long* strides, const unsigned* box,
                                       const unsigned* elem_strides, int interleave, int swizzle, int l2, int oob) {
    LOCK;
    static EncodeFn encode = [] {
        Dl_info info;
        EncodeFn found = nullptr;
        if (dladdr(reinterpret_cast<void*>(&functions), &info) != 0 && info.dli_fname != nullptr) {
            std::string dir = info.dli_fname;
            dir = dir.substr(0, dir.rfind('/') + 1);
            if (void* lib = dlopen((dir + "libemu_tma.so").c_str(), RTLD_NOW | RTLD_LOCAL))
                found = reinterpret_cast<EncodeFn>(dlsym(lib, "emu_tensor_map_encode_tiled"));
        }
        return found;
    }();
    if (encode == nullptr) {
        why("cuTensorMapEncodeTiled: libemu_tma.so is missing");
        return NOT_FOUND;
    }
    return encode(map, dtype, rank, base, dims, strides, box, elem_strides, interleave, swizzle, l2, oob) == 0
               ? OK
               : INVALID_VALUE;
}
