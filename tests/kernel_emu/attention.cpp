// kernels/attention.cu under emulation, launched as src/cuda/attention.rs does: the
// forward (output and row log-sum-exp), then the backward (attn_bwd_dot for D, the main
// backward kernel, and the cast of the f32 dq accumulator to bf16 with elementwise.cu's
// cast_f32_bf16, as the launcher does), for each head dim once, with key masks (including
// a batch whose keys are all hidden), causal masking, shared and per-batch biases with
// their gradient, and sequence lengths that leave partial tiles. The WMMA fragments have
// a scrambled layout here (see include/mma.h), so a kernel relying on any particular
// layout fails.
#include "harness.h"

#include "attention.cu"
#include "elementwise.cu"

using namespace harness;

namespace {

Report report("attention");

// Mirrors of src/cuda/attention.rs.
constexpr unsigned kThreads = 128;  // THREADS
constexpr size_t kFwdQueries = 64;  // FWD_QUERIES
constexpr size_t kBwdKeys = 64;     // BWD_KEYS
unsigned fwd_smem_bytes(size_t head_dim) { return (unsigned)(384 * (head_dim + 8) + 27136); }
unsigned bwd_smem_bytes(size_t head_dim) { return (unsigned)(384 * (head_dim + 8) + 33280); }

using Fwd = emu::Kernel<const bf16*, const bf16*, const bf16*, const float*, const float*, bf16*, float*, int, int, int,
                        int, int, int, float>;
using Bwd = emu::Kernel<const bf16*, const bf16*, const bf16*, const bf16*, const float*, const float*, const float*,
                        const float*, float*, bf16*, bf16*, float*, int, int, int, int, int, int, int, float>;

// `kernel_names`.
std::pair<Fwd, Bwd> kernels(size_t head_dim) {
    switch (head_dim) {
        case 32: return {EMU_KERNEL(attn_fwd_d32_bf16), EMU_KERNEL(attn_bwd_d32_bf16)};
        case 64: return {EMU_KERNEL(attn_fwd_d64_bf16), EMU_KERNEL(attn_bwd_d64_bf16)};
        case 80: return {EMU_KERNEL(attn_fwd_d80_bf16), EMU_KERNEL(attn_bwd_d80_bf16)};
        case 96: return {EMU_KERNEL(attn_fwd_d96_bf16), EMU_KERNEL(attn_bwd_d96_bf16)};
        case 128: return {EMU_KERNEL(attn_fwd_d128_bf16), EMU_KERNEL(attn_bwd_d128_bf16)};
        default: emu::fail("no attention kernel for head dim %zu", head_dim);
    }
}

struct Config {
    size_t batch, q_len, kv_len, heads, head_dim;
    double hidden_keys;  // fraction of keys the mask hides (0: no mask)
    bool hide_batch1;    // the mask hides every key of batch 1
    bool causal;
    size_t bias_batch;  // 0 (no bias), 1 (shared) or batch
    bool want_dbias;
};

// Double-precision attention on the bf16 inputs: outputs and gradients.
struct Reference {
    std::vector<double> out, lse, dq, dk, dv, dbias;
};

Reference reference(const Config& c, float scale, const std::vector<double>& q, const std::vector<double>& k,
                    const std::vector<double>& v, const std::vector<double>& dout, const std::vector<double>& mask,
                    const std::vector<double>& bias) {
    const size_t B = c.batch, Nq = c.q_len, Nk = c.kv_len, H = c.heads, D = c.head_dim;
    const auto tok = [&](size_t len, size_t b, size_t n, size_t h) { return ((b * len + n) * H + h) * D; };
    Reference r{std::vector<double>(q.size(), 0.0), std::vector<double>(B * H * Nq),
                std::vector<double>(q.size(), 0.0), std::vector<double>(k.size(), 0.0),
                std::vector<double>(k.size(), 0.0), std::vector<double>(bias.size(), 0.0)};
    std::vector<double> s(Nk), p(Nk), dp(Nk);
    for (size_t b = 0; b < B; ++b)
        for (size_t h = 0; h < H; ++h)
            for (size_t i = 0; i < Nq; ++i) {
                const double* qi = &q[tok(Nq, b, i, h)];
                const double* gi = &dout[tok(Nq, b, i, h)];
                double m = -INFINITY;
                for (size_t j = 0; j < Nk; ++j) {
                    const bool hidden = (!mask.empty() && mask[b * Nk + j] == 0) || (c.causal && j > i);
                    s[j] = -INFINITY;
                    if (hidden) continue;
                    double dot = 0;
                    for (size_t e = 0; e < D; ++e) dot += qi[e] * k[tok(Nk, b, j, h) + e];
                    s[j] = scale * dot;
                    if (c.bias_batch > 0) s[j] += bias[(((c.bias_batch == 1 ? 0 : b) * H + h) * Nq + i) * Nk + j];
                    m = std::max(m, s[j]);
                }
                const size_t row = (b * H + h) * Nq + i;
                if (m == -INFINITY) {  // every key hidden: no output, no gradient
                    r.lse[row] = INFINITY;
                    continue;
                }
                double z = 0;
                for (size_t j = 0; j < Nk; ++j) z += std::exp(s[j] - m);
                r.lse[row] = m + std::log(z);
                double d_row = 0;  // Σ_j P_ij dP_ij
                for (size_t j = 0; j < Nk; ++j) {
                    p[j] = std::exp(s[j] - r.lse[row]);
                    dp[j] = 0;
                    for (size_t e = 0; e < D; ++e) dp[j] += gi[e] * v[tok(Nk, b, j, h) + e];
                    d_row += p[j] * dp[j];
                    for (size_t e = 0; e < D; ++e) r.out[tok(Nq, b, i, h) + e] += p[j] * v[tok(Nk, b, j, h) + e];
                }
                for (size_t j = 0; j < Nk; ++j) {
                    if (p[j] == 0) continue;
                    const double ds = p[j] * (dp[j] - d_row);
                    for (size_t e = 0; e < D; ++e) {
                        r.dq[tok(Nq, b, i, h) + e] += scale * ds * k[tok(Nk, b, j, h) + e];
                        r.dk[tok(Nk, b, j, h) + e] += scale * ds * qi[e];
                        r.dv[tok(Nk, b, j, h) + e] += p[j] * gi[e];
                    }
                    if (c.want_dbias) r.dbias[(((c.bias_batch == 1 ? 0 : b) * H + h) * Nq + i) * Nk + j] += ds;
                }
            }
    return r;
}

// bf16 results of a chain of bf16-rounded products: elementwise within 2⁻⁶ relative plus
// 1% of the largest reference value, and within `rel_l2` as a whole.
void check(const std::string& what, const std::vector<double>& got, const std::vector<double>& want, double rel_l2) {
    double largest = 0;
    for (double w : want)
        if (std::isfinite(w)) largest = std::max(largest, std::fabs(w));
    report.close(what, got, want, 1e-2 * largest, 1.0 / 64);
    report.norm_close(what, got, want, rel_l2);
}

void run(const Config& c, uint64_t seed) {
    Rng rng(seed);
    const size_t B = c.batch, Nq = c.q_len, Nk = c.kv_len, H = c.heads, D = c.head_dim;
    const float scale = 1.0f / std::sqrt((float)D);
    const auto q = rng.values<bf16>(B * Nq * H * D), k = rng.values<bf16>(B * Nk * H * D),
               v = rng.values<bf16>(B * Nk * H * D), dout = rng.values<bf16>(B * Nq * H * D);
    std::vector<double> mask;
    if (c.hidden_keys > 0 || c.hide_batch1) {
        mask.resize(B * Nk);
        for (size_t i = 0; i < B * Nk; ++i) mask[i] = rng.uniform(0, 1) < c.hidden_keys ? 0.0 : 1.0;
        if (c.hide_batch1)
            for (size_t j = 0; j < Nk; ++j) mask[Nk + j] = 0.0;
        if (c.causal) mask[0] = 0.0;  // query 0 then sees no key at all
    }
    const auto bias = c.bias_batch > 0 ? rng.values<float>(c.bias_batch * H * Nq * Nk) : std::vector<double>{};
    const Reference ref = reference(c, scale, q, k, v, dout, mask, bias);

    const auto [fwd, bwd] = kernels(D);
    DeviceArray<bf16> dq_in(q), dk_in(k), dv_in(v), dg(dout);
    DeviceArray<float> dummy(std::vector<double>{0.0}), dmask(mask.empty() ? std::vector<double>{0.0} : mask),
        dbias_in(bias.empty() ? std::vector<double>{0.0} : bias);
    const float* mask_ptr = mask.empty() ? dummy.ptr() : dmask.ptr();
    const float* bias_ptr = bias.empty() ? dummy.ptr() : dbias_in.ptr();
    const int has_mask = !mask.empty(), causal = c.causal, bias_batch = (int)c.bias_batch;

    // ---- forward
    DeviceArray<bf16> out(B * Nq * H * D);
    DeviceArray<float> lse(B * H * Nq);
    const emu::LaunchConfig fcfg{dim3((unsigned)ceil_div(Nq, kFwdQueries), (unsigned)H, (unsigned)B), dim3(kThreads),
                                 fwd_smem_bytes(D)};
    emu::launch(fcfg, fwd, dq_in.ptr(), dk_in.ptr(), dv_in.ptr(), mask_ptr, bias_ptr, out.ptr(), lse.ptr(), (int)Nq,
                (int)Nk, (int)H, bias_batch, has_mask, causal, scale);

    const std::string name = format("d%zu B=%zu Nq=%zu Nk=%zu H=%zu%s%s%s%s", D, B, Nq, Nk, H,
                                    mask.empty() ? "" : " masked", c.causal ? " causal" : "",
                                    c.bias_batch == 0 ? "" : c.bias_batch == 1 ? " shared-bias" : " batch-bias",
                                    c.want_dbias ? "+dbias" : "");
    check("attention forward " + name + ": out", out.download(), ref.out, 6e-3);
    report.close("attention forward " + name + ": lse", lse.download(), ref.lse, 1e-4, 1e-5);

    // ---- backward
    const size_t rows = B * Nq * H;
    DeviceArray<float> drow(std::max<size_t>(rows, 1));
    drow.zero();
    emu::launch(grid_1d(rows * 32, 256), EMU_KERNEL(attn_bwd_dot_bf16), out.ptr(), dg.ptr(), drow.ptr(), (int)Nq,
                (int)H, (int)D, (int64_t)rows);
    DeviceArray<float> dq32(B * Nq * H * D), dbias(c.want_dbias ? c.bias_batch * H * Nq * Nk : 1), dbias_dummy(1);
    dq32.zero();
    dbias.zero();
    dbias_dummy.zero();
    DeviceArray<bf16> dk(B * Nk * H * D), dv(B * Nk * H * D);
    const emu::LaunchConfig bcfg{dim3((unsigned)ceil_div(Nk, kBwdKeys), (unsigned)H, (unsigned)B), dim3(kThreads),
                                 bwd_smem_bytes(D)};
    emu::launch(bcfg, bwd, dq_in.ptr(), dk_in.ptr(), dv_in.ptr(), dg.ptr(), lse.ptr(), drow.ptr(), mask_ptr, bias_ptr,
                dq32.ptr(), dk.ptr(), dv.ptr(), c.want_dbias ? dbias.ptr() : dbias_dummy.ptr(), (int)Nq, (int)Nk,
                (int)H, bias_batch, has_mask, causal, (int)c.want_dbias, scale);
    const size_t n_q = B * Nq * H * D;
    DeviceArray<bf16> dq(n_q);
    emu::launch(grid_chunks(n_q), EMU_KERNEL(cast_f32_bf16), dq32.ptr(), dq.ptr(), (int64_t)n_q);

    check("attention backward " + name + ": dq", dq.download(), ref.dq, 1e-2);
    check("attention backward " + name + ": dk", dk.download(), ref.dk, 1e-2);
    check("attention backward " + name + ": dv", dv.download(), ref.dv, 1e-2);
    if (c.want_dbias) check("attention backward " + name + ": dbias", dbias.download(), ref.dbias, 1e-2);
}

}  // namespace

int main() {
    emu::watchdog(300);
    // One configuration per head dim (fields: B, Nq, Nk, H, Dh, hidden key fraction,
    // batch 1 hidden, causal, bias batch, dbias).
    const Config configs[] = {
        {2, 33, 65, 2, 32, 0.3, true, false, 0, false},
        {2, 77, 131, 2, 64, 0.3, false, false, 1, true},
        {2, 70, 70, 1, 80, 0.0, false, true, 2, true},
        {1, 100, 45, 1, 96, 0.2, false, true, 1, false},
        {1, 40, 130, 1, 128, 0.1, false, true, 0, false},
    };
    for (size_t i = 0; i < std::size(configs); ++i)
        if (!kTsan || i == 0 || i == 2) run(configs[i], 100 + i);  // TSan: masks; causal with dbias
    return report.finish();
}
