// What every kernel harness shares: the launch shapes of src/cuda/mod.rs, host-side
// "device" arrays (exactly sized, so AddressSanitizer catches any access past the end;
// filled with 0xFF bytes like the poisoned allocations of the GPU tests), random inputs
// that are exact in the element type, and the comparison report.
//
// A harness includes this, then the kernel file it tests (`#include "<family>.cu"`), and
// launches the kernels exactly as the Rust launchers in src/cuda/<family>.rs do.
#pragma once

#include <cuda_bf16.h>
#include <emu.h>

#include <algorithm>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace harness {

using bf16 = __nv_bfloat16;

// ThreadSanitizer builds run fewer and smaller cases (it is ~10x slower).
#ifdef __SANITIZE_THREAD__
constexpr bool kTsan = true;
#else
constexpr bool kTsan = false;
#endif

inline size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

// ---- Launch shapes: src/cuda/mod.rs ---------------------------------------------------

// `grid_1d`: a 1-D launch covering n elements with `block` threads per block.
inline emu::LaunchConfig grid_1d(size_t n, unsigned block) {
    return {dim3((unsigned)std::max<size_t>(ceil_div(n, block), 1)), dim3(block), 0};
}

// `grid_chunks`: one thread per 8 elements, 256 threads per block.
inline emu::LaunchConfig grid_chunks(size_t n) { return grid_1d(ceil_div(n, 8), 256); }

// `grid_rows`: one block of `block` threads per row.
inline emu::LaunchConfig grid_rows(size_t rows, unsigned block) {
    return {dim3((unsigned)std::max<size_t>(rows, 1)), dim3(block), 0};
}

// ---- Element types --------------------------------------------------------------------

template <class T>
struct Elem;
template <>
struct Elem<float> {
    static constexpr const char* name = "f32";
    static float from(double v) { return (float)v; }
    static double to(float v) { return v; }
};
template <>
struct Elem<bf16> {
    static constexpr const char* name = "bf16";
    static bf16 from(double v) { return __float2bfloat16((float)v); }
    static double to(bf16 v) { return __bfloat162float(v); }
};

template <>
struct Elem<uint16_t> {
    static constexpr const char* name = "u16";
    static uint16_t from(double v) { return (uint16_t)v; }
    static double to(uint16_t v) { return v; }
};

// `v` as stored in T.
template <class T>
double round_to(double v) {
    return Elem<T>::to(Elem<T>::from(v));
}

// ---- Device memory --------------------------------------------------------------------

// n elements of T, `offset` elements past a 256-byte aligned allocation (the alignment of
// cudaMalloc; an offset makes a misaligned view), whose end is the end of the allocation.
// Starts as 0xFF bytes: NaN in f32 and bf16.
template <class T>
class DeviceArray {
  public:
    explicit DeviceArray(size_t n, size_t offset = 0) : n_(n) {
        const size_t bytes = std::max<size_t>((n + offset) * sizeof(T), 1);
        if (posix_memalign(&base_, 256, bytes) != 0) emu::fail("out of host memory");
        memset(base_, 0xFF, bytes);
        ptr_ = static_cast<T*>(base_) + offset;
    }
    DeviceArray(const std::vector<double>& values, size_t offset = 0) : DeviceArray(values.size(), offset) {
        for (size_t i = 0; i < n_; ++i) ptr_[i] = Elem<T>::from(values[i]);
    }
    DeviceArray(const DeviceArray&) = delete;
    DeviceArray& operator=(const DeviceArray&) = delete;
    ~DeviceArray() { free(base_); }

    T* ptr() const { return ptr_; }
    size_t size() const { return n_; }

    std::vector<double> download() const {
        std::vector<double> v(n_);
        for (size_t i = 0; i < n_; ++i) v[i] = Elem<T>::to(ptr_[i]);
        return v;
    }

    // True when element i still holds the 0xFF poison bytes.
    bool poisoned(size_t i) const {
        const unsigned char* b = reinterpret_cast<const unsigned char*>(ptr_ + i);
        return std::all_of(b, b + sizeof(T), [](unsigned char c) { return c == 0xFF; });
    }

    // Zero, like cudarc's `alloc_zeros`.
    void zero() { memset(static_cast<void*>(ptr_), 0, n_ * sizeof(T)); }

  private:
    void* base_ = nullptr;
    T* ptr_ = nullptr;
    size_t n_;
};

// ---- Inputs ---------------------------------------------------------------------------

class Rng {
  public:
    explicit Rng(uint64_t seed) : gen_(seed) {}
    double normal() { return std::normal_distribution<double>()(gen_); }
    double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen_); }
    size_t below(size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(gen_); }

    // n normal values times `scale`, each exactly representable in T.
    template <class T>
    std::vector<double> values(size_t n, double scale = 1.0) {
        std::vector<double> v(n);
        for (auto& x : v) x = round_to<T>(scale * normal());
        return v;
    }

  private:
    std::mt19937_64 gen_;
};

// ---- Checking -------------------------------------------------------------------------

inline std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string format(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

// Counts checks and failures; prints each failure and one summary line for the family.
class Report {
  public:
    explicit Report(const char* family) : family_(family) {}

    // Elementwise |got − want| ≤ atol + rtol·|want| (see `within`).
    void close(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
               double atol, double rtol) {
        std::vector<double> tol(want.size());
        for (size_t i = 0; i < want.size(); ++i) tol[i] = atol + rtol * std::fabs(want[i]);
        within(what, got, want, tol, format("atol %g, rtol %g", atol, rtol));
    }

    // Elementwise |got − want| ≤ tol. A non-finite reference value must be matched exactly;
    // a non-finite result where the reference is finite (an unwritten, still poisoned
    // element) fails.
    void within(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                const std::vector<double>& tol, const std::string& tol_desc = "per-element tolerance") {
        ++checks_;
        elements_ += want.size();
        if (got.size() != want.size()) {
            fail(what, format("%zu results for %zu reference values", got.size(), want.size()));
            return;
        }
        size_t bad = 0, first = 0;
        double worst = 0;
        for (size_t i = 0; i < want.size(); ++i) {
            const double g = got[i], w = want[i];
            bool ok;
            if (!std::isfinite(w)) {
                ok = std::isnan(w) ? std::isnan(g) : g == w;
            } else {
                const double err = std::fabs(g - w);
                ok = std::isfinite(g) && err <= tol[i];
                if (std::isfinite(g)) worst = std::max(worst, err);
            }
            if (!ok && bad++ == 0) first = i;
        }
        if (bad > 0)
            fail(what, format("%zu of %zu elements differ; first [%zu]: got %.9g, want %.9g, tolerance %.3g (%s); "
                              "largest finite error %.3g",
                              bad, want.size(), first, got[first], want[first], tol[first], tol_desc.c_str(), worst));
    }

    // ‖got − want‖₂ ≤ rel·‖want‖₂ over the finite reference values (non-finite ones must
    // be matched exactly): catches small systematic errors that loose elementwise
    // tolerances let through.
    void norm_close(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                    double rel) {
        ++checks_;
        double num = 0, den = 0;
        bool exact = got.size() == want.size();
        for (size_t i = 0; exact && i < want.size(); ++i) {
            if (!std::isfinite(want[i])) {
                exact = std::isnan(want[i]) ? std::isnan(got[i]) : got[i] == want[i];
                continue;
            }
            num += (got[i] - want[i]) * (got[i] - want[i]);
            den += want[i] * want[i];
        }
        const double err = std::sqrt(num / std::max(den, 1e-300));
        if (!exact || !(err <= rel)) fail(what, format("relative L2 error %.3g exceeds %g", err, rel));
    }

    // One condition.
    void expect(bool ok, const std::string& what) {
        ++checks_;
        if (!ok) fail(what, "condition does not hold");
    }

    // Prints the summary line; returns the process exit status.
    int finish() const {
        const char* build = kTsan ? "tsan" : "asan+ubsan";
        if (failures_ == 0)
            printf("%s [%s]: all %zu checks match (%zu values, %lu launches)\n", family_, build, checks_, elements_,
                   emu::launch_ctx.launches);
        else
            printf("%s [%s]: %zu of %zu checks FAILED\n", family_, build, failures_, checks_);
        fflush(stdout);
        return failures_ == 0 ? 0 : 1;
    }

  private:
    void fail(const std::string& what, const std::string& detail) {
        ++failures_;
        printf("FAIL %s: %s\n", what.c_str(), detail.c_str());
    }

    const char* family_;
    size_t checks_ = 0, failures_ = 0, elements_ = 0;
};

}  // namespace harness
