// The double-precision attention reference shared by the attention harnesses
// (attention.cpp, attention_mma.cpp, attention_wgmma.cpp): a test configuration, outputs
// and gradients computed from the exact bf16 inputs, and the bf16 tolerance check.
#pragma once
#include "harness.h"

namespace attention_ref {

using namespace harness;

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

inline Reference reference(const Config& c, float scale, const std::vector<double>& q, const std::vector<double>& k,
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
inline void check(Report& report, const std::string& what, const std::vector<double>& got, const std::vector<double>& want, double rel_l2) {
    double largest = 0;
    for (double w : want)
        if (std::isfinite(w)) largest = std::max(largest, std::fabs(w));
    report.close(what, got, want, 1e-2 * largest, 1.0 / 64);
    report.norm_close(what, got, want, rel_l2);
}


// The inputs of one configuration, drawn from `seed`.
struct Inputs {
    float scale;
    std::vector<double> q, k, v, dout, mask, bias;
};

inline Inputs draw(const Config& c, uint64_t seed) {
    Rng rng(seed);
    const size_t B = c.batch, Nq = c.q_len, Nk = c.kv_len, H = c.heads, D = c.head_dim;
    Inputs x;
    x.scale = 1.0f / std::sqrt((float)D);
    x.q = rng.values<bf16>(B * Nq * H * D);
    x.k = rng.values<bf16>(B * Nk * H * D);
    x.v = rng.values<bf16>(B * Nk * H * D);
    x.dout = rng.values<bf16>(B * Nq * H * D);
    if (c.hidden_keys > 0 || c.hide_batch1) {
        x.mask.resize(B * Nk);
        for (size_t i = 0; i < B * Nk; ++i) x.mask[i] = rng.uniform(0, 1) < c.hidden_keys ? 0.0 : 1.0;
        if (c.hide_batch1)
            for (size_t j = 0; j < Nk; ++j) x.mask[Nk + j] = 0.0;
        if (c.causal) x.mask[0] = 0.0;  // query 0 then sees no key at all
    }
    if (c.bias_batch > 0) x.bias = rng.values<float>(c.bias_batch * H * Nq * Nk);
    return x;
}

// "d64 B=2 Nq=77 ..." for the report.
inline std::string name(const Config& c) {
    return format("d%zu B=%zu Nq=%zu Nk=%zu H=%zu%s%s%s%s", c.head_dim, c.batch, c.q_len, c.kv_len, c.heads,
                  c.hidden_keys > 0 || c.hide_batch1 ? " masked" : "", c.causal ? " causal" : "",
                  c.bias_batch == 0 ? "" : c.bias_batch == 1 ? " shared-bias" : " batch-bias",
                  c.want_dbias ? "+dbias" : "");
}

}  // namespace attention_ref
