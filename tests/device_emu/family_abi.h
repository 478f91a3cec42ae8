// What a kernel family library (family.cpp) hands the emulated driver (driver.cpp).
#pragma once

#include <cstddef>

// One kernel parameter's size and alignment, as the kernel declares it.
struct EmuParam {
    size_t size;
    size_t align;
};

// A launch's shape, as cuLaunchKernel receives it.
struct EmuLaunch {
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_mem_bytes;
};

// One `extern "C"` function of a kernel file.
struct EmuKernel {
    const char* name;
    int param_count;
    const EmuParam* params;
    void (*fn)();
    // Runs the kernel over the launch's grid, reading argument i from args[i].
    void (*run)(void (*fn)(), const char* name, const EmuLaunch* launch, void** args);
};

// Exported by every libemu_<family>.so.
using EmuFamilyKernels = const EmuKernel* (*)(int* count);
