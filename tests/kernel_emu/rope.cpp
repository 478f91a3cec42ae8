// kernels/rope.cu under emulation, launched as src/cuda/rope.rs does: the rotation of
// channel pairs of [B, tokens, heads, head_dim] by +θ (forward) and −θ (backward), four
// pairs per thread with 16-byte accesses when head_dim/2 is a multiple of 4, one pair
// otherwise. The launcher only ever passes fresh (aligned) buffers, so there is no
// misaligned variant to test; UBSan checks the alignment of the vector accesses.
#include "harness.h"

#include "rope.cu"

using namespace harness;

namespace {

Report report("rope");
Rng rng(0x20FE);

template <class T>
struct K;
template <>
struct K<float> {
    static constexpr auto p1 = EMU_KERNEL(rope_f32_p1), p4 = EMU_KERNEL(rope_f32_p4);
};
template <>
struct K<bf16> {
    static constexpr auto p1 = EMU_KERNEL(rope_bf16_p1), p4 = EMU_KERNEL(rope_bf16_p4);
};

// `cuda::rope::rope`.
template <class T>
void rope(size_t batch, size_t tokens, size_t heads, size_t head_dim, float sign) {
    const size_t half = head_dim / 2, n = batch * tokens * heads * head_dim;
    // Angles per (token, pair); the f32 tables are what the kernel and the reference share.
    std::vector<double> cos_t(tokens * half), sin_t(tokens * half);
    for (size_t i = 0; i < tokens * half; ++i) {
        const double theta = rng.uniform(-4, 4);
        cos_t[i] = (float)std::cos(theta);
        sin_t[i] = (float)std::sin(theta);
    }
    const auto x = rng.values<T>(n);
    DeviceArray<T> dx(x), out(n);
    DeviceArray<float> dcos(cos_t), dsin(sin_t);
    const size_t pairs_per_thread = half % 4 == 0 ? 4 : 1;
    const int64_t n_chunks = (int64_t)(n / 2 / pairs_per_thread);
    const auto cfg = grid_1d((size_t)n_chunks, 256);
    if (pairs_per_thread == 4)
        emu::launch(cfg, K<T>::p4, dx.ptr(), dcos.ptr(), dsin.ptr(), out.ptr(), n_chunks, (int64_t)tokens,
                    (int)heads, (int)half, sign);
    else
        emu::launch(cfg, K<T>::p1, dx.ptr(), dcos.ptr(), dsin.ptr(), out.ptr(), n_chunks, (int64_t)tokens,
                    (int)heads, (int)half, sign);

    // (a + ib)·e^{i·sign·θ} for every pair.
    std::vector<double> want(n);
    for (size_t b = 0; b < batch; ++b)
        for (size_t t = 0; t < tokens; ++t)
            for (size_t h = 0; h < heads; ++h)
                for (size_t j = 0; j < half; ++j) {
                    const size_t e = ((b * tokens + t) * heads + h) * head_dim + 2 * j;
                    const double c = cos_t[t * half + j], s = sign * sin_t[t * half + j];
                    want[e] = x[e] * c - x[e + 1] * s;
                    want[e + 1] = x[e] * s + x[e + 1] * c;
                }
    const bool bf = std::is_same_v<T, bf16>;
    report.close(format("rope_%s_p%zu [%zu, %zu, %zu, %zu] sign %+g", Elem<T>::name, pairs_per_thread, batch, tokens,
                        heads, head_dim, sign),
                 out.download(), want, bf ? 1e-5 : 1e-6, bf ? 1.0 / 128 : 1e-5);
}

template <class T>
void family() {
    for (float sign : {1.f, -1.f}) {
        rope<T>(2, 7, 3, 2, sign);     // one pair per head
        rope<T>(2, 7, 3, 6, sign);     // odd number of pairs
        rope<T>(1, 5, 2, 10, sign);
        rope<T>(2, 7, 3, 8, sign);     // four pairs: the vector path
        rope<T>(2, 9, 3, 24, sign);
        rope<T>(1, 13, 2, 128, sign);  // the DiT's head dim
        rope<T>(3, 33, 5, 16, sign);   // more than one block
    }
}

}  // namespace

int main() {
    emu::watchdog(300);
    family<float>();
    family<bf16>();
    return report.finish();
}
