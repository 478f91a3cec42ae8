// kernels/adamw.cu under emulation, launched as src/cuda/adamw.rs does: the fused AdamW
// step (f32 or bf16 gradients, with or without the bf16 compute copy of an f32 master) at
// odd sizes around its 8-element vectors, with each pointer in turn misaligned (the
// vector path needs all of them 16-byte aligned: UBSan checks the float4/uint4
// accesses); the deterministic sum of squares of several tensors (sum_squares per tensor
// into one partials buffer, then sum_partials); and the multi-tensor forms: the step
// (adamw_multi, every result equal to the single-tensor kernel's bit for bit) and the sum
// of squares (sum_squares_multi, then sum_partials), with the launcher's chunk size and a
// small one that cuts tensors into many chunks. The split master (a bf16 parameter and
// the 16 low bits of its fp32 master): master_split and master_join on edge and random
// bit patterns (exact round trip, ties away from zero), and adamw_split_<grad>, alone and
// in adamw_multi, against adamw_master_<grad> on the joined master, bit for bit.
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
            emu::launch(cfg, EMU_KERNEL(adamw_master_f32), dg.ptr(), w.ptr(), m.ptr(), v.ptr(), c.ptr(), s, (int64_t)n, (const float*)nullptr);
        else
            emu::launch(cfg, EMU_KERNEL(adamw_master_bf16), dg.ptr(), w.ptr(), m.ptr(), v.ptr(), c.ptr(), s, (int64_t)n, (const float*)nullptr);
    } else {
        if constexpr (std::is_same_v<G, float>)
            emu::launch(cfg, EMU_KERNEL(adamw_f32), dg.ptr(), w.ptr(), m.ptr(), v.ptr(), s, (int64_t)n, (const float*)nullptr);
        else
            emu::launch(cfg, EMU_KERNEL(adamw_bf16), dg.ptr(), w.ptr(), m.ptr(), v.ptr(), s, (int64_t)n, (const float*)nullptr);
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

uint32_t bits_of(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}
float float_of(uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

// The split of master bits M (src/optim.rs, kernels/adamw.cu), written out here from its
// definition: (hi, lo) with lo = M mod 2^16 and hi the high half rounded to nearest, ties
// away from zero; a NaN keeps a NaN high half (its quiet bit set).
std::pair<uint16_t, uint16_t> split_bits(uint32_t m) {
    const uint16_t lo = (uint16_t)(m & 0xFFFF);
    const bool nan = (m & 0x7FFFFFFFu) > 0x7F800000u;
    if (nan) return {(uint16_t)((m >> 16) | 0x40), lo};
    return {(uint16_t)((m >> 16) + (lo >= 0x8000 ? 1 : 0)), lo};
}

// master_split then master_join over `patterns` (fp32 bits): the high half as above, the
// same bits back (a NaN stays a NaN), and the high half equal to round-to-nearest-even
// except at exact ties.
void split_round_trip(const std::vector<uint32_t>& patterns) {
    const size_t n = patterns.size();
    DeviceArray<float> w(n);
    for (size_t i = 0; i < n; ++i) w.ptr()[i] = float_of(patterns[i]);
    DeviceArray<bf16> hi(n);
    DeviceArray<uint16_t> lo(n);
    DeviceArray<float> back(n);
    const auto cfg = grid_1d(ceil_div(n, (size_t)kBlock), kBlock);
    emu::launch(cfg, EMU_KERNEL(master_split), (const float*)w.ptr(), hi.ptr(), lo.ptr(), (int64_t)n);
    emu::launch(cfg, EMU_KERNEL(master_join), (const bf16*)hi.ptr(), (const uint16_t*)lo.ptr(), back.ptr(),
                (int64_t)n);
    size_t bad_split = 0, bad_join = 0, ties = 0, off_rne = 0;
    for (size_t i = 0; i < n; ++i) {
        const uint32_t m = patterns[i];
        const auto [h, l] = split_bits(m);
        if (hi.ptr()[i].raw != h || lo.ptr()[i] != l) ++bad_split;
        const uint32_t b = bits_of(back.ptr()[i]);
        const bool nan = (m & 0x7FFFFFFFu) > 0x7F800000u;
        if (nan ? !((b & 0x7FFFFFFFu) > 0x7F800000u) : b != m) ++bad_join;
        if (!nan) {
            const bool tie = (m & 0xFFFF) == 0x8000;
            ties += tie;
            const uint16_t rne = __float2bfloat16(float_of(m)).raw;
            if (rne != h && !tie) ++off_rne;
        }
    }
    const std::string what = format("master_split/master_join on %zu patterns (%zu ties)", n, ties);
    report.expect(bad_split == 0, what + format(": %zu splits differ from the definition", bad_split));
    report.expect(bad_join == 0, what + format(": %zu masters not restored", bad_join));
    report.expect(off_rne == 0, what + format(": %zu high halves off round-to-nearest-even away from ties", off_rne));
}

// adamw_split_<G> on a split master against adamw_master_<G> on the same fp32 master:
// m, v and the joined master bit for bit, the parameter the split of the new master.
// `shift` misaligns one argument (kW: the low halves, kCopy: the parameter).
template <class G>
void step_split(size_t n, Shift shift, double t) {
    const AdamWStep s = step_params(t, n % 2 == 0, n % 3 == 0 ? 0.5f : 1.0f);
    const auto g = rng.values<G>(n);
    // Masters with low bits of every kind (a bf16 value plus noise below its last bit).
    std::vector<double> w0(n), m0(n), v0(n);
    for (size_t i = 0; i < n; ++i) {
        w0[i] = round_to<float>(rng.normal() * (1.0 + 1e-3 * rng.normal()));
        m0[i] = round_to<float>(0.1 * rng.normal());
        v0[i] = round_to<float>(0.01 * std::fabs(rng.normal()));
    }
    DeviceArray<G> dg(g, shift == kGrad);
    DeviceArray<float> m(m0, shift == kM), v(v0, shift == kV);
    DeviceArray<bf16> hi(n, shift == kCopy);
    DeviceArray<uint16_t> lo(n, shift == kW);
    for (size_t i = 0; i < n; ++i) {
        const auto [h, l] = split_bits(bits_of((float)w0[i]));
        hi.ptr()[i].raw = h;
        lo.ptr()[i] = l;
    }
    DeviceArray<G> rg(g);
    DeviceArray<float> rw(w0), rm(m0), rv(v0);
    DeviceArray<bf16> rc(n);
    const auto cfg = grid_1d(ceil_div(n, kVec), kBlock);
    if constexpr (std::is_same_v<G, float>) {
        emu::launch(cfg, EMU_KERNEL(adamw_split_f32), (const float*)dg.ptr(), hi.ptr(), lo.ptr(), m.ptr(), v.ptr(), s,
                    (int64_t)n, (const float*)nullptr);
        emu::launch(cfg, EMU_KERNEL(adamw_master_f32), (const float*)rg.ptr(), rw.ptr(), rm.ptr(), rv.ptr(),
                    rc.ptr(), s, (int64_t)n, (const float*)nullptr);
    } else {
        emu::launch(cfg, EMU_KERNEL(adamw_split_bf16), (const bf16*)dg.ptr(), hi.ptr(), lo.ptr(), m.ptr(), v.ptr(),
                    s, (int64_t)n, (const float*)nullptr);
        emu::launch(cfg, EMU_KERNEL(adamw_master_bf16), (const bf16*)rg.ptr(), rw.ptr(), rm.ptr(), rv.ptr(),
                    rc.ptr(), s, (int64_t)n, (const float*)nullptr);
    }
    const std::string what =
        format("adamw_split_%s n=%zu step %g %s", Elem<G>::name, n, t, shift == kW ? "lo misaligned" : shift_name(shift));
    size_t bad_master = 0, bad_param = 0;
    for (size_t i = 0; i < n; ++i) {
        const uint32_t want = bits_of(rw.ptr()[i]);
        const uint32_t got = ((uint32_t)hi.ptr()[i].raw << 16) + (uint32_t)(int32_t)(int16_t)lo.ptr()[i];
        bad_master += got != want;
        bad_param += hi.ptr()[i].raw != split_bits(want).first;
    }
    report.expect(bad_master == 0, what + format(": %zu masters differ from adamw_master's", bad_master));
    report.expect(bad_param == 0, what + format(": %zu parameters are not the split of the master", bad_param));
    report.close(what + ": m", m.download(), rm.download(), 0, 0);
    report.close(what + ": v", v.download(), rv.download(), 0, 0);
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
        bool bf16_grad, copy, split;  // split: a split master (the copy holds the high halves)
        AdamWStep s;
        std::vector<double> g, w0, m0, v0;
    };
    std::vector<One> ones;
    for (size_t k = 0; k < sizes.size(); ++k) {
        const size_t n = sizes[k];
        One o{k % 2 == 1, k % 3 != 0, k % 3 == 2, step_params((double)(1 + k), k % 2 == 0, 0.75f), {}, {}, {}, {}};
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
    std::vector<std::unique_ptr<DeviceArray<uint16_t>>> lo, lo1;
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
        lo.push_back(std::make_unique<DeviceArray<uint16_t>>(o.w0.size(), shift));
        lo1.push_back(std::make_unique<DeviceArray<uint16_t>>(o.w0.size()));
        if (o.split)  // the split master of w0 in both the multi and the single launch's buffers
            for (size_t i = 0; i < o.w0.size(); ++i) {
                const auto [h, l] = split_bits(bits_of((float)o.w0[i]));
                c[k]->ptr()[i].raw = c1[k]->ptr()[i].raw = h;
                lo[k]->ptr()[i] = lo1[k]->ptr()[i] = l;
            }
        const void* grad = o.bf16_grad ? (const void*)gb[k]->ptr() : (const void*)gf[k]->ptr();
        table.push_back({grad, o.split ? nullptr : w[k]->ptr(), m[k]->ptr(), v[k]->ptr(),
                         (o.copy || o.split) ? c[k]->ptr() : nullptr, o.split ? lo[k]->ptr() : nullptr,
                         (int64_t)sizes[k], o.s, (int)o.bf16_grad, 0});
    }
    Table<MultiTensor> tensors(table);
    Table<MultiChunk> chunks(chunk_table(sizes, chunk));
    emu::launch(grid_rows(chunks.host.size(), kBlock), EMU_KERNEL(adamw_multi), (const MultiTensor*)tensors.dev,
                (const MultiChunk*)chunks.dev, (int64_t)chunk, (const float*)nullptr);

    std::string what = format("adamw_multi chunk %zu of", chunk);
    for (size_t n : sizes) what += format(" %zu", n);
    for (size_t k = 0; k < ones.size(); ++k) {
        const One& o = ones[k];
        const size_t n = sizes[k];
        const auto cfg = grid_1d(ceil_div(n, kVec), kBlock);
        if (o.split) {
            if (o.bf16_grad) {
                DeviceArray<bf16> g1(o.g);
                emu::launch(cfg, EMU_KERNEL(adamw_split_bf16), (const bf16*)g1.ptr(), c1[k]->ptr(), lo1[k]->ptr(),
                            m1[k]->ptr(), v1[k]->ptr(), o.s, (int64_t)n, (const float*)nullptr);
            } else {
                DeviceArray<float> g1(o.g);
                emu::launch(cfg, EMU_KERNEL(adamw_split_f32), (const float*)g1.ptr(), c1[k]->ptr(), lo1[k]->ptr(),
                            m1[k]->ptr(), v1[k]->ptr(), o.s, (int64_t)n, (const float*)nullptr);
            }
        } else if (o.bf16_grad) {
            DeviceArray<bf16> g1(o.g);
            if (o.copy)
                emu::launch(cfg, EMU_KERNEL(adamw_master_bf16), g1.ptr(), w1[k]->ptr(), m1[k]->ptr(), v1[k]->ptr(),
                            c1[k]->ptr(), o.s, (int64_t)n, (const float*)nullptr);
            else
                emu::launch(cfg, EMU_KERNEL(adamw_bf16), g1.ptr(), w1[k]->ptr(), m1[k]->ptr(), v1[k]->ptr(), o.s,
                            (int64_t)n, (const float*)nullptr);
        } else {
            DeviceArray<float> g1(o.g);
            if (o.copy)
                emu::launch(cfg, EMU_KERNEL(adamw_master_f32), g1.ptr(), w1[k]->ptr(), m1[k]->ptr(), v1[k]->ptr(),
                            c1[k]->ptr(), o.s, (int64_t)n, (const float*)nullptr);
            else
                emu::launch(cfg, EMU_KERNEL(adamw_f32), g1.ptr(), w1[k]->ptr(), m1[k]->ptr(), v1[k]->ptr(), o.s,
                            (int64_t)n, (const float*)nullptr);
        }
        const std::string t = what + format(": tensor %zu (%s grad%s)", k, o.bf16_grad ? "bf16" : "f32",
                                            o.split ? ", split master" : o.copy ? ", copy" : "");
        if (!o.split) report.close(t + " w", w[k]->download(), w1[k]->download(), 0, 0);
        report.close(t + " m", m[k]->download(), m1[k]->download(), 0, 0);
        report.close(t + " v", v[k]->download(), v1[k]->download(), 0, 0);
        if (o.copy || o.split) report.close(t + " copy", c[k]->download(), c1[k]->download(), 0, 0);
        if (o.split) report.close(t + " lo", lo[k]->download(), lo1[k]->download(), 0, 0);
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
        table.push_back({p, nullptr, nullptr, nullptr, nullptr, nullptr, (int64_t)n, AdamWStep{}, (int)is_bf16, 0});
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

// The gate (the last argument of every update entry point; `cuda::adamw::step_gate` makes
// it): a finite gate c gives, bit for bit, the ungated update with the gradient scale
// multiplied by c; a NaN or infinite gate leaves every buffer as it was. For a plain f32
// parameter (f32 gradient), an fp32 master with its bf16 copy (bf16 gradient), a split
// master (f32 gradient), and adamw_multi over all three.
void gated(size_t n) {
    struct Kind {
        const char* name;
        bool bf16_grad, copy, split;
    };
    const Kind kinds[] = {{"plain", false, false, false}, {"master", true, true, false}, {"split", false, false, true}};
    const AdamWStep s0 = step_params(3.0, true, 0.75f);
    const float c = 0.3712f;
    struct State {
        std::unique_ptr<DeviceArray<float>> gf, w, m, v;
        std::unique_ptr<DeviceArray<bf16>> gb, copy;
        std::unique_ptr<DeviceArray<uint16_t>> lo;
        std::vector<std::vector<double>> all() const {
            return {w->download(), m->download(), v->download(), copy->download(), lo->download()};
        }
    };
    std::vector<std::vector<double>> g(3), w0(3), m0(3), v0(3);
    for (int k = 0; k < 3; ++k) {
        g[k] = kinds[k].bf16_grad ? rng.values<bf16>(n) : rng.values<float>(n);
        w0[k] = rng.values<float>(n);
        for (size_t i = 0; i < n; ++i) {
            m0[k].push_back(round_to<float>(0.1 * rng.normal()));
            v0[k].push_back(round_to<float>(0.01 * std::fabs(rng.normal())));
        }
    }
    auto fresh = [&](int k) {
        State st;
        st.gf = std::make_unique<DeviceArray<float>>(g[k]);
        st.gb = std::make_unique<DeviceArray<bf16>>(g[k]);
        st.w = std::make_unique<DeviceArray<float>>(w0[k]);
        st.m = std::make_unique<DeviceArray<float>>(m0[k]);
        st.v = std::make_unique<DeviceArray<float>>(v0[k]);
        st.copy = std::make_unique<DeviceArray<bf16>>(w0[k]);
        st.lo = std::make_unique<DeviceArray<uint16_t>>(n);
        st.lo->zero();
        return st;
    };
    // One tensor's single-tensor launch with step constants s and gate.
    auto single = [&](int k, State& st, AdamWStep s, const float* gate) {
        const auto cfg = grid_1d(ceil_div(n, kVec), kBlock);
        const Kind& kd = kinds[k];
        if (kd.split)
            emu::launch(cfg, EMU_KERNEL(adamw_split_f32), (const float*)st.gf->ptr(), st.copy->ptr(), st.lo->ptr(),
                        st.m->ptr(), st.v->ptr(), s, (int64_t)n, gate);
        else if (kd.copy)
            emu::launch(cfg, EMU_KERNEL(adamw_master_bf16), (const bf16*)st.gb->ptr(), st.w->ptr(), st.m->ptr(),
                        st.v->ptr(), st.copy->ptr(), s, (int64_t)n, gate);
        else
            emu::launch(cfg, EMU_KERNEL(adamw_f32), (const float*)st.gf->ptr(), st.w->ptr(), st.m->ptr(), st.v->ptr(), s,
                        (int64_t)n, gate);
    };
    // All three tensors in one adamw_multi launch with step constants s and gate.
    auto multi = [&](std::vector<State>& sts, AdamWStep s, const float* gate) {
        std::vector<MultiTensor> table;
        for (int k = 0; k < 3; ++k) {
            const Kind& kd = kinds[k];
            State& st = sts[k];
            const void* grad = kd.bf16_grad ? (const void*)st.gb->ptr() : (const void*)st.gf->ptr();
            table.push_back({grad, kd.split ? nullptr : st.w->ptr(), st.m->ptr(), st.v->ptr(),
                             (kd.copy || kd.split) ? st.copy->ptr() : nullptr, kd.split ? st.lo->ptr() : nullptr,
                             (int64_t)n, s, (int)kd.bf16_grad, 0});
        }
        Table<MultiTensor> tensors(table);
        Table<MultiChunk> chunks(chunk_table({n, n, n}, 64));
        emu::launch(grid_rows(chunks.host.size(), kBlock), EMU_KERNEL(adamw_multi), (const MultiTensor*)tensors.dev,
                    (const MultiChunk*)chunks.dev, (int64_t)64, gate);
    };
    AdamWStep scaled = s0;
    scaled.grad_scale = s0.grad_scale * c;
    const char* parts[] = {"w", "m", "v", "copy", "lo"};
    for (int form = 0; form < 2; ++form) {  // single-tensor launches, then adamw_multi
        std::vector<State> gate_c, ref, skip_nan, skip_inf;
        for (int k = 0; k < 3; ++k) {
            gate_c.push_back(fresh(k));
            ref.push_back(fresh(k));
            skip_nan.push_back(fresh(k));
            skip_inf.push_back(fresh(k));
        }
        DeviceArray<float> g_c(std::vector<double>{c}), g_nan(std::vector<double>{NAN}),
            g_inf(std::vector<double>{INFINITY});
        if (form == 0) {
            for (int k = 0; k < 3; ++k) {
                single(k, gate_c[k], s0, g_c.ptr());
                single(k, ref[k], scaled, nullptr);
                single(k, skip_nan[k], s0, g_nan.ptr());
                single(k, skip_inf[k], s0, g_inf.ptr());
            }
        } else {
            multi(gate_c, s0, g_c.ptr());
            multi(ref, scaled, nullptr);
            multi(skip_nan, s0, g_nan.ptr());
            multi(skip_inf, s0, g_inf.ptr());
        }
        for (int k = 0; k < 3; ++k) {
            const std::string what = format("gated %s n=%zu %s", form == 0 ? "single" : "multi", n, kinds[k].name);
            const auto got = gate_c[k].all(), want = ref[k].all(), before = fresh(k).all();
            const auto nan_after = skip_nan[k].all(), inf_after = skip_inf[k].all();
            for (int q = 0; q < 5; ++q) {
                report.close(what + format(" gate %g: %s", c, parts[q]), got[q], want[q], 0, 0);
                report.close(what + format(" NaN gate: %s unchanged", parts[q]), nan_after[q], before[q], 0, 0);
                report.close(what + format(" inf gate: %s unchanged", parts[q]), inf_after[q], before[q], 0, 0);
            }
            report.expect(got[1] != before[1], what + ": the finite gate updated m");
        }
    }
}

// step_gate against `optim::clip_coefficient` on the norm, for clipping and not, with the
// loss or the sum of squares not finite.
void step_gate_cases() {
    const float inf = INFINITY, nan = NAN;
    struct Case {
        float sumsq, loss, max_norm;
    };
    const Case cases[] = {{4.0f, 1.5f, 1.0f},  {0.25f, 1.5f, 1.0f}, {1e-20f, -3.0f, 0.5f}, {7.0f, 2.0f, 0.0f},
                          {0.0f, 0.0f, 1.0f},  {2.0f, nan, 1.0f},   {2.0f, inf, 0.0f},     {inf, 1.0f, 1.0f},
                          {nan, 1.0f, 0.0f},   {3e38f, 1.0f, 2.0f}, {5.0f, -inf, 1.0f}};
    for (const Case& k : cases) {
        DeviceArray<float> sumsq(std::vector<double>{k.sumsq}), loss(std::vector<double>{k.loss}), out(1);
        emu::launch(grid_1d(1, 1), EMU_KERNEL(step_gate), (const float*)sumsq.ptr(), (const float*)loss.ptr(),
                    k.max_norm, out.ptr());
        const float norm = std::sqrt(k.sumsq);
        const bool finite = std::isfinite(k.loss) && std::isfinite(norm);
        float want = 1.0f;
        if (k.max_norm > 0.0f) {
            want = k.max_norm / (norm + 1e-6f);
            if (!std::isnan(want)) want = std::min(want, 1.0f);
        }
        const float got = out.ptr()[0];
        const std::string what =
            format("step_gate sumsq %g loss %g max_norm %g: %g", k.sumsq, k.loss, k.max_norm, (double)got);
        if (finite)
            report.expect(bits_of(got) == bits_of(want), what + format(", want %g", (double)want));
        else
            report.expect(std::isnan(got), what + ", want NaN");
    }
}

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

    // Split masters: edge patterns (zeros, subnormals, ties on odd and even high halves,
    // low halves around 0x8000, the largest finite values, infinities, NaNs) and random bits.
    std::vector<uint32_t> patterns = {0x00000000, 0x80000000, 0x00000001, 0x80007FFF, 0x3F800000, 0x3F808000,
                                      0x3F818000, 0xBF808000, 0xBF818000, 0x3F807FFF, 0x3F80FFFF, 0x3F7F8000,
                                      0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
                                      0x7FC00000, 0x7F800001, 0x7F808000, 0x7FFFFFFF, 0xFFFFFFFF, 0xFF80FFFF};
    for (int i = 0; i < (kTsan ? 2000 : 200000); ++i) patterns.push_back((uint32_t)(rng.below(1ull << 32)));
    split_round_trip(patterns);
    for (size_t n : sizes)
        for (Shift shift : {kNone, kGrad, kW, kM, kV, kCopy}) {
            if (shift != kNone && n < kVec) continue;
            const double t = (double)(1 + n % 4);
            step_split<float>(n, shift, t);
            step_split<bf16>(n, shift, t);
        }

    step_many({9, 100, 37, 1, 256, 1000}, 64);  // several chunks per tensor, partial chunks
    if (!kTsan) step_many({70001, 8, 5, 4099}, kMultiChunk);
    sum_squares_per_tensor({{false, 1}});
    sum_squares_per_tensor({{true, 7}, {false, 300}, {true, 2049}, {false, 257}});
    if (!kTsan) sum_squares_per_tensor({{false, 300001}, {true, 5}});  // 1024 blocks: threads stride
    sum_squares({{false, 1}}, kMultiChunk);
    sum_squares({{true, 7}, {false, 300}, {true, 2049}, {false, 257}}, 64);
    if (!kTsan) sum_squares({{false, 140001}, {true, 5}}, kMultiChunk);
    for (size_t n : {1, 9, 1000}) gated(n);
    step_gate_cases();
    return report.finish();
}
