// One kernel family of kernels/, compiled for the emulated driver (tests/device_emu/README.md).
//
// Built once per kernels/<family>.cu with
//   -DEMU_FAMILY_FILE='"<family>.cu"' -DEMU_FAMILY_NAMES='"<generated list>"'
// into libemu_<family>.so. The list holds one K(name) per `extern "C"` function of the
// file; each becomes an entry that the driver's cuLaunchKernel calls with cudarc's
// parameter array. The entry knows the kernel's parameter types, so it reads each
// argument as the kernel declares it (as the GPU does: a wrong type pushed by a launcher
// reads wrong bytes here too) and launches it through the emulation (include/emu.h),
// with Hopper's shared-memory limit.
#include <cuda_bf16.h>
#include <emu.h>

#include <cstddef>
#include <utility>

#include EMU_FAMILY_FILE

#include "family_abi.h"

namespace {

template <class... P>
struct Entry {
    static constexpr size_t count = sizeof...(P);
    // (one more element than parameters, so that kernels without any still have an array)
    static constexpr EmuParam params[sizeof...(P) + 1] = {{sizeof(P), alignof(P)}..., {0, 1}};

    template <size_t... I>
    static void call(void (*fn)(P...), const char* name, const emu::LaunchConfig& cfg, void** args,
                     std::index_sequence<I...>) {
        emu::launch(cfg, emu::Kernel<P...>{name, fn}, *static_cast<P*>(args[I])...);
    }

    static void run(void (*erased)(), const char* name, const EmuLaunch* l, void** args) {
        emu::LaunchConfig cfg{dim3(l->grid[0], l->grid[1], l->grid[2]), dim3(l->block[0], l->block[1], l->block[2]),
                              l->shared_mem_bytes, true};
        call(reinterpret_cast<void (*)(P...)>(erased), name, cfg, args, std::index_sequence_for<P...>{});
    }
};

template <class... P>
EmuKernel entry(const char* name, void (*fn)(P...)) {
    return {name, (int)Entry<P...>::count, Entry<P...>::params, reinterpret_cast<void (*)()>(fn), &Entry<P...>::run};
}

const EmuKernel kKernels[] = {
#define K(name) entry(#name, &name),
#include EMU_FAMILY_NAMES
#undef K
};

}  // namespace

extern "C" __attribute__((visibility("default"))) const EmuKernel* emu_family_kernels(int* count) {
    *count = (int)(sizeof kKernels / sizeof kKernels[0]);
    return kKernels;
}
