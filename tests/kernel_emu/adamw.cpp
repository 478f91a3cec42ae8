// kernels/adamw.cu under emulation, launched as src/cuda/adamw.rs does: the fused AdamW
// step (f32 or bf16 gradients, with or without the bf16 compute copy of an f32 master) at
// odd sizes around its 8-element vectors, with each pointer in turn misaligned (the
// vector path needs all of them 16-byte aligned: UBSan checks the float4/uint4
// accesses); the deterministic sum of squares of several tensors (sum_squares per tensor
// into one partials buffer, then sum_partials); and the multi-tensor forms: the step
// (adamw_multi, every result equal to the single-tensor kernel's bit for bit) and the sum
// of squares (sum_squares_multi, then sum_partials), with the launcher's chunk size and a
// small one that cuts tensors into many chunks.
#include "harness.h"

#include "adamw.cu"

using namespace harness;

namespace {

Report report("adamw");
Rng rng(0xADA3);

constexpr size_t kVec = 8;             // VEC of src/cuda/adamw.rs
constexpr unsigned kBlock = 256;       // BLOCK
constexpr size_t kMultiChunk = 65536;   // MULTI_CHUNK
constexpr size_t kMaxSumsqBlocks = 1024;  // MAX_SUMSQ_BLOCKS

// Hyper-parameters of step t as `Optimizer::step` (src/optim.rs) computes them.
AdamWStep step_params(double t, bool decay, float grad_scale) {
    const float lr = 3e-3f, beta1 = 0.9f, beta2 = 0.999f, wd = 0.1f;
    return {lr,
            beta1,
            beta2,
            1e-8f,
            decay ? (float)(1.0 - (double)lr * (double)wd) : 1.0f,
            (float)(1.0 - std::pow((double)beta1, t)),
            (float)std::sqrt(1.0 - std::pow((double)beta2, t)),
            grad_scale};
}

// Which argument is shifted by one element (misaligned) in a case.
enum Shift { kNone, kGrad, kW, kM, kV, kCopy };
const char* shift_name(Shift s) {
    const char* names[] = {"aligned", "grad misaligned", "w misaligned", "m misaligned", "v misaligned",
                           "copy misaligned"};
    return names[s];
}

// `cuda::adamw::step` on n elements; G is the gradient's dtype, `copy` whether the bf16
// compute copy is written.
template <class G>
void step(size_t n, bool copy, Shift shift, double t) {
    const AdamWStep s = step_params(t, n % 2 == 1, n % 3 == 0 ? 0.5f : 1.0f);
    const auto g = rng.values<G>(n), w0 = rng.values<float>(n);
    // Moments of earlier steps: m of either sign, v ≥ 0 and of the order of g².
    std::vector<double> m0(n), v0(n);
    for (size_t i = 0; i < n; ++i) {
        m0[i] = round_to<float>(0.1 * rng.normal());
        v0[i] = round_to<float>(0.01 * std::fabs(rng.normal()));
    }
    DeviceArray<G> dg(g, shift == kGrad);
    DeviceArray<float> w(w0, shift == kW), m(m0, shift == kM), v(v0, shift == kV);
    DeviceArray<bf16> c(n, shift == kCopy);
    const auto cfg = grid_1d(ceil_div(n, kVec), kBlock);
    if (copy) {
        if constexpr (std::is_same_v<G, float>)
            emu::launch(cfg, EMU_KERNEL(adamw_master_f32), dg.ptr(), w.ptr(), m.ptr(), v.ptr(), c.ptr(), s, (int64_t)n);
        else
            emu::launch(cfg, EMU_KERNEL(adamw_master_bf16), dg.ptr(), w.ptr(), m.ptr(), v.ptr(), c.ptr(), s, (int64_t)n);
    } else {
        if constexpr (std::is_same_v<G, float>)
            emu::launch(cfg, EMU_KERNEL(adamw_f32), dg.ptr(), w.ptr(), m.ptr(), v.ptr(), s, (int64_t)n);
        else
            emu::launch(cfg, EMU_KERNEL(adamw_bf16), dg.ptr(), w.ptr(), m.ptr(), v.ptr(), s, (int64_t)n);
    }

    // torch.optim.AdamW in double, from the same f32 hyper-parameters.
    std::vector<double> want_w(n), want_m(n), want_v(n), w_tol(n), m_tol(n);
    const double lr = s.lr, b1 = s.beta1, b2 = s.beta2;
    for (size_t i = 0; i < n; ++i) {
        const double gi = g[i] * (double)s.grad_scale;
        want_m[i] = b1 * m0[i] + (1 - b1) * gi;
        m_tol[i] = 1e-6 * (std::fabs(b1 * m0[i]) + std::fabs((1 - b1) * gi));  // the terms may cancel
        want_v[i] = b2 * v0[i] + (1 - b2) * gi * gi;
        const double update = (lr / s.bias_correction1) * want_m[i] /
                              (std::sqrt(want_v[i]) / s.bias_correction2_sqrt + (double)s.eps);
        want_w[i] = (double)s.decay * w0[i] - update;
        // f32 arithmetic: a few ulps of the weight and of the update.
        w_tol[i] = 1e-6 * (std::fabs(w0[i]) + std::fabs(update));
    }
    const std::string what = format("adamw%s_%s n=%zu step %g %s", copy ? "_master" : "", Elem<G>::name, n, t,
                                    shift_name(shift));
    const auto got_w = w.download();
    report.within(what + ": w", got_w, want_w, w_tol, "1e-6·(|w| + |update|)");
    report.within(what + ": m", m.download(), want_m, m_tol, "1e-6·(|β1·m| + |(1 − β1)·g|)");
    report.close(what + ": v", v.download(), want_v, 1e-12, 1e-6);
    if (copy) {
        // The copy is the new master rounded to nearest even, bit for bit.
        std::vector<double> want_c(n);
        for (size_t i = 0; i < n; ++i) want_c[i] = round_to<bf16>(got_w[i]);
        report.close(what + ": bf16 copy", c.download(), want_c, 0, 0);
    }
}

// The chunk table of `cuda::adamw::chunks`: chunk c of tensor t for every c < ceil(n/chunk).
std::vector<MultiChunk> chunk_table(const std::vector<size_t>& sizes, size_t chunk) {
    std::vector<MultiChunk> out;
    for (size_t t = 0; t < sizes.size(); ++t)
        for (size_t c = 0; c < ceil_div(sizes[t], chunk); ++c) out.push_back({(int)t, (int)c});
    return out;
}

// The table and chunks as device arrays (the launcher uploads both with clone_htod).
template <class T>
struct Table {
    std::vector<T> host;
    T* dev = nullptr;
    explicit Table(std::vector<T> v) : host(std::move(v)) {
        dev = static_cast<T*>(std::malloc(host.size() * sizeof(T)));
        std::memcpy(dev, host.data(), host.size() * sizeof(T));
    }
    ~Table() { std::free(dev); }
};

// `cuda::adamw::step_many` on tensors of mixed kinds (f32 or bf16 gradient, with or
// without a compute copy, one misaligned), with `chunk` elements per chunk; each result
// must equal the single-tensor kernel's bit for bit.
void step_many(const std::vector<size_t>& sizes, size_t chunk) {
    struct One {
        bool bf16_grad, copy;
        AdamWStep s;
        std::vector<double> g, w0, m0, v0;
    };
    std::vector<One> ones;
    for (size_t k = 0; k < sizes.size(); ++k) {
        const size_t n = sizes[k];
        One o{k % 2 == 1, k % 3 != 0, step_params((double)(1 + k), k % 2 == 0, 0.75f), {}, {}, {}, {}};
        o.g = o.bf16_grad ? rng.values<bf16>(n) : rng.values<float>(n);
        o.w0 = rng.values<float>(n);
        o.m0.resize(n);
        o.v0.resize(n);
        for (size_t i = 0; i < n; ++i) {
            o.m0[i] = round_to<float>(0.1 * rng.normal());
            o.v0[i] = round_to<float>(0.01 * std::fabs(rng.normal()));
        }
        ones.push_back(std::move(o));
    }
    // Device buffers for the multi launch and for the reference single launches.
    std::vector<std::unique_ptr<DeviceArray<float>>> gf, w, m, v, w1, m1, v1;
    std::vector<std::unique_ptr<DeviceArray<bf16>>> gb, c, c1;
    std::vector<MultiTensor> table;
    for (size_t k = 0; k < ones.size(); ++k) {
        const One& o = ones[k];
        const bool shift = k == 2;  // one tensor misaligned: its scalar path
        gf.push_back(std::make_unique<DeviceArray<float>>(o.bf16_grad ? std::vector<double>{0.0} : o.g, shift));
        gb.push_back(std::make_unique<DeviceArray<bf16>>(o.bf16_grad ? o.g : std::vector<double>{0.0}, shift));
        w.push_back(std::make_unique<DeviceArray<float>>(o.w0, shift));
        m.push_back(std::make_unique<DeviceArray<float>>(o.m0, shift));
        v.push_back(std::make_unique<DeviceArray<float>>(o.v0, shift));
        c.push_back(std::make_unique<DeviceArray<bf16>>(o.w0.size(), shift));
        w1.push_back(std::make_unique<DeviceArray<float>>(o.w0));
        m1.push_back(std::make_unique<DeviceArray<float>>(o.m0));
        v1.push_back(std::make_unique<DeviceArray<float>>(o.v0));
        c1.push_back(std::make_unique<DeviceArray<bf16>>(o.w0.size()));
        const void* grad = o.bf16_grad ? (const void*)gb[k]->ptr() : (const void*)gf[k]->ptr();
        table.push_back({grad, w[k]->ptr(), m[k]->ptr(), v[k]->ptr(), o.copy ? c[k]->ptr() : nullptr,
                         (int64_t)sizes[k], o.s, (int)o.bf16_grad, 0});
    }
    Table<MultiTensor> tensors(table);
    Table<MultiChunk> chunks(chunk_table(sizes, chunk));
    emu::launch(grid_rows(chunks.host.size(), kBlock), EMU_KERNEL(adamw_multi), (const MultiTensor*)tensors.dev,
                (const MultiChunk*)chunks.dev, (int64_t)chunk);

    std::string what = format("adamw_multi chunk %zu of", chunk);
    for (size_t n : sizes) what += format(" %zu", n);
    for (size_t k = 0; k < ones.size(); ++k) {
        const One& o = ones[k];
        const size_t n = sizes[k];
        const auto cfg = grid_1d(ceil_div(n, kVec), kBlock);
        if (o.bf16_grad) {
            DeviceArray<bf16> g1(o.g);
            if (o.copy)
                emu::launch(cfg, EMU_KERNEL(adamw_master_bf16), g1.ptr(), w1[k]->ptr(), m1[k]->ptr(), v1[k]->ptr(),
                            c1[k]->ptr(), o.s, (int64_t)n);
            else
                emu::launch(cfg, EMU_KERNEL(adamw_bf16), g1.ptr(), w1[k]->ptr(), m1[k]->ptr(), v1[k]->ptr(), o.s,
                            (int64_t)n);
        } else {
            DeviceArray<float> g1(o.g);
            if (o.copy)
                emu::launch(cfg, EMU_KERNEL(adamw_master_f32), g1.ptr(), w1[k]->ptr(), m1[k]->ptr(), v1[k]->ptr(),
                            c1[k]->ptr(), o.s, (int64_t)n);
            else
                emu::launch(cfg, EMU_KERNEL(adamw_f32), g1.ptr(), w1[k]->ptr(), m1[k]->ptr(), v1[k]->ptr(), o.s,
                            (int64_t)n);
        }
        const std::string t = what + format(": tensor %zu (%s grad%s)", k, o.bf16_grad ? "bf16" : "f32",
                                            o.copy ? ", copy" : "");
        report.close(t + " w", w[k]->download(), w1[k]->download(), 0, 0);
        report.close(t + " m", m[k]->download(), m1[k]->download(), 0, 0);
        report.close(t + " v", v[k]->download(), v1[k]->download(), 0, 0);
        if (o.copy) report.close(t + " copy", c[k]->download(), c1[k]->download(), 0, 0);
    }
}

// `cuda::adamw::sum_squares` over tensors of mixed dtypes: sum_squares_multi with
// `chunk` elements per chunk, then sum_partials.
void sum_squares(const std::vector<std::pair<bool, size_t>>& tensors, size_t chunk) {  // (bf16?, n)
    std::vector<size_t> sizes;
    std::vector<MultiTensor> table;
    std::vector<std::unique_ptr<DeviceArray<float>>> fs;
    std::vector<std::unique_ptr<DeviceArray<bf16>>> bs;
    double want = 0;
    std::string what = format("sum_squares chunk %zu of", chunk);
    for (const auto& [is_bf16, n] : tensors) {
        const std::vector<double> x = is_bf16 ? rng.values<bf16>(n) : rng.values<float>(n);
        const void* p;
        if (is_bf16) {
            bs.push_back(std::make_unique<DeviceArray<bf16>>(x));
            p = bs.back()->ptr();
        } else {
            fs.push_back(std::make_unique<DeviceArray<float>>(x));
            p = fs.back()->ptr();
        }
        table.push_back({p, nullptr, nullptr, nullptr, nullptr, (int64_t)n, AdamWStep{}, (int)is_bf16, 0});
        sizes.push_back(n);
        for (double e : x) want += e * e;
        what += format(" %s[%zu]", is_bf16 ? "bf16" : "f32", n);
    }
    Table<MultiTensor> dt(table);
    Table<MultiChunk> dc(chunk_table(sizes, chunk));
    const size_t total = dc.host.size();
    DeviceArray<float> partials(total), out(1);
    emu::launch(grid_rows(total, kBlock), EMU_KERNEL(sum_squares_multi), (const MultiTensor*)dt.dev,
                (const MultiChunk*)dc.dev, (int64_t)chunk, partials.ptr());
    emu::launch(grid_rows(1, kBlock), EMU_KERNEL(sum_partials), partials.ptr(), (int64_t)total, out.ptr());
    report.close(what, out.download(), {want}, 0, 1e-6);
}

// `cuda::adamw::sum_squares_per_tensor` over tensors of mixed dtypes: sum_squares_<dtype>
// per tensor into one partials buffer, then sum_partials.
void sum_squares_per_tensor(const std::vector<std::pair<bool, size_t>>& tensors) {  // (bf16?, n)
    std::vector<size_t> blocks;
    size_t total = 0;
    for (const auto& [is_bf16, n] : tensors) {
        blocks.push_back(std::clamp<size_t>(ceil_div(n, kBlock), 1, kMaxSumsqBlocks));
        total += blocks.back();
    }
    DeviceArray<float> partials(total), out(1);
    double want = 0;
    int64_t offset = 0;
    std::string what = "sum_squares per tensor of";
    for (size_t k = 0; k < tensors.size(); ++k) {
        const auto [is_bf16, n] = tensors[k];
        const emu::LaunchConfig cfg{dim3((unsigned)blocks[k]), dim3(kBlock), 0};
        std::vector<double> x;
        if (is_bf16) {
            x = rng.values<bf16>(n);
            DeviceArray<bf16> dx(x);
            emu::launch(cfg, EMU_KERNEL(sum_squares_bf16), dx.ptr(), (int64_t)n, partials.ptr(), offset);
        } else {
            x = rng.values<float>(n);
            DeviceArray<float> dx(x);
            emu::launch(cfg, EMU_KERNEL(sum_squares_f32), dx.ptr(), (int64_t)n, partials.ptr(), offset);
        }
        offset += (int64_t)blocks[k];
        for (double e : x) want += e * e;
        what += format(" %s[%zu]", is_bf16 ? "bf16" : "f32", n);
    }
    emu::launch(grid_rows(1, kBlock), EMU_KERNEL(sum_partials), partials.ptr(), (int64_t)total, out.ptr());
    report.close(what, out.download(), {want}, 0, 1e-6);
}

}  // namespace

int main() {
    emu::watchdog(300);
    std::vector<size_t> sizes = {1, 7, 8, 9, 100, 2049};
    if (!kTsan) {
        sizes.push_back(4103);
        sizes.push_back(16391);  // 9 blocks
    }
    for (size_t n : sizes)
        for (bool copy : {false, true})
            for (Shift shift : {kNone, kGrad, kW, kM, kV, kCopy}) {
                if (shift == kCopy && !copy) continue;
                if (shift != kNone && n < kVec) continue;  // no vector path to avoid
                const double t = (double)(1 + n % 5);
                step<float>(n, copy, shift, t);
                step<bf16>(n, copy, shift, t);
            }

    step_many({9, 100, 37, 1, 256, 1000}, 64);  // several chunks per tensor, partial chunks
    if (!kTsan) step_many({70001, 8}, kMultiChunk);
    sum_squares_per_tensor({{false, 1}});
    sum_squares_per_tensor({{true, 7}, {false, 300}, {true, 2049}, {false, 257}});
    if (!kTsan) sum_squares_per_tensor({{false, 300001}, {true, 5}});  // 1024 blocks: threads stride
    sum_squares({{false, 1}}, kMultiChunk);
    sum_squares({{true, 7}, {false, 300}, {true, 2049}, {false, 257}}, 64);
    if (!kTsan) sum_squares({{false, 140001}, {true, 5}}, kMultiChunk);
    return report.finish();
}
