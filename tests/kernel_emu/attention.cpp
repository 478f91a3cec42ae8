// kernels/attention.cu under emulation, launched as src/cuda/attention.rs does: the
// forward (output and row log-sum-exp), then the backward (attn_bwd_dot for D, the main
// backward kernel, and the cast of the f32 dq accumulator to bf16 with elementwise.cu's
// cast_f32_bf16, as the launcher does), for each head dim once, with key masks (including
// a batch whose keys are all hidden), causal masking, shared and per-batch biases with
// their gradient, and sequence lengths that leave partial tiles. The WMMA fragments have
// a scrambled layout here (see include/mma.h), so a kernel relying on any particular
// layout fails.
#include "attention_ref.h"

#include "attention.cu"
#include "elementwise.cu"

using namespace harness;
using namespace attention_ref;

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

void run(const Config& c, uint64_t seed) {
    const size_t B = c.batch, Nq = c.q_len, Nk = c.kv_len, H = c.heads, D = c.head_dim;
    const Inputs x = draw(c, seed);
    const auto& [scale, q, k, v, dout, mask, bias] = x;
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

    const std::string name = attention_ref::name(c);
    check(report, "attention forward " + name + ": out", out.download(), ref.out, 6e-3);
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

    check(report, "attention backward " + name + ": dq", dq.download(), ref.dq, 1e-2);
    check(report, "attention backward " + name + ": dk", dk.download(), ref.dk, 1e-2);
    check(report, "attention backward " + name + ": dv", dv.download(), ref.dv, 1e-2);
    if (c.want_dbias) check(report, "attention backward " + name + ": dbias", dbias.download(), ref.dbias, 1e-2);
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
