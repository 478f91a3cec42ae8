// kernels/attention_mma.cu under emulation, launched as src/cuda/attention.rs does for
// the mma kernels: the forward's output and row log-sum-exp for every compiled (warps,
// row tiles per warp, head dim) form, then the backward (attn_bwd_dot of attention.cu for D, the mma
// backward, the cast of the f32 dq accumulator) and the deterministic backward (dK/dV and
// dQ kernels, no atomics) for every head dim, against the double-precision reference, with key masks (a batch whose keys are all
// hidden, a query that sees no key), causal masking, shared and per-batch biases, and
// lengths that leave partial tiles and need several tiles (both cp.async stages). The
// mma, ldmatrix and cp.async emulation uses the PTX ISA's register layouts and defers
// each copy to its wait (see include/ptx_emu.h).
#include "attention_ref.h"

#include "attention.cu"
#include "attention_mma.cu"
#include "elementwise.cu"

using namespace harness;
using namespace attention_ref;

namespace {

Report report("attention_mma");

// Mirror of src/cuda/attention.rs (`MmaForward`): W warps of MT 16-row tiles (32 W threads,
// 16 MT W rows a block), key tiles of BK.
struct FwdShape {
    size_t warps, row_tiles, key_tile;
    size_t rows() const { return 16 * row_tiles * warps; }
    unsigned smem_bytes(size_t head_dim) const { return (unsigned)((rows() + 4 * key_tile) * (head_dim + 8) * 2); }
};

// `mma_bwd_smem_bytes`; 64 keys a block, 128 threads.
unsigned mma_bwd_smem_bytes(size_t head_dim) { return (unsigned)(512 * (head_dim + 8) + 5632); }

using Bwd = emu::Kernel<const bf16*, const bf16*, const bf16*, const bf16*, const float*, const float*, const float*,
                        const float*, float*, bf16*, bf16*, float*, int, int, int, int, int, int, int, float>;

Bwd backward_kernel(size_t head_dim) {
    switch (head_dim) {
        case 32: return EMU_KERNEL(attn_bwd_mma_d32_bf16);
        case 64: return EMU_KERNEL(attn_bwd_mma_d64_bf16);
        case 80: return EMU_KERNEL(attn_bwd_mma_d80_bf16);
        case 96: return EMU_KERNEL(attn_bwd_mma_d96_bf16);
        case 128: return EMU_KERNEL(attn_bwd_mma_d128_bf16);
        default: emu::fail("no mma attention backward for head dim %zu", head_dim);
    }
}

// `mma_dq_smem_bytes`; 64 query rows a block, 128 threads.
unsigned mma_dq_smem_bytes(size_t head_dim) { return (unsigned)(512 * (head_dim + 8)); }

using Dkdv = emu::Kernel<const bf16*, const bf16*, const bf16*, const bf16*, const float*, const float*, const float*,
                         const float*, bf16*, bf16*, int, int, int, int, int, int, float>;
using Dq = emu::Kernel<const bf16*, const bf16*, const bf16*, const bf16*, const float*, const float*, const float*,
                       const float*, bf16*, float*, int, int, int, int, int, int, int, float>;

Dkdv dkdv_kernel(size_t head_dim) {
    switch (head_dim) {
        case 32: return EMU_KERNEL(attn_bwd_dkdv_mma_d32_bf16);
        case 64: return EMU_KERNEL(attn_bwd_dkdv_mma_d64_bf16);
        case 80: return EMU_KERNEL(attn_bwd_dkdv_mma_d80_bf16);
        case 96: return EMU_KERNEL(attn_bwd_dkdv_mma_d96_bf16);
        case 128: return EMU_KERNEL(attn_bwd_dkdv_mma_d128_bf16);
        default: emu::fail("no mma attention backward for head dim %zu", head_dim);
    }
}

Dq dq_kernel(size_t head_dim) {
    switch (head_dim) {
        case 32: return EMU_KERNEL(attn_bwd_dq_mma_d32_bf16);
        case 64: return EMU_KERNEL(attn_bwd_dq_mma_d64_bf16);
        case 80: return EMU_KERNEL(attn_bwd_dq_mma_d80_bf16);
        case 96: return EMU_KERNEL(attn_bwd_dq_mma_d96_bf16);
        case 128: return EMU_KERNEL(attn_bwd_dq_mma_d128_bf16);
        default: emu::fail("no mma attention dq kernel for head dim %zu", head_dim);
    }
}

using Fwd = emu::Kernel<const bf16*, const bf16*, const bf16*, const float*, const float*, bf16*, float*, int, int, int,
                        int, int, int, float>;

// `mma_forward_name`.
// `MmaForward::name`.
Fwd kernel(const FwdShape& f, size_t head_dim) {
    switch ((f.warps * 10 + f.row_tiles) * 1000 + head_dim) {
        case 41032: return EMU_KERNEL(attn_fwd_mma_w4_d32_bf16);
        case 41064: return EMU_KERNEL(attn_fwd_mma_w4_d64_bf16);
        case 41080: return EMU_KERNEL(attn_fwd_mma_w4_d80_bf16);
        case 41096: return EMU_KERNEL(attn_fwd_mma_w4_d96_bf16);
        case 41128: return EMU_KERNEL(attn_fwd_mma_w4_d128_bf16);
        case 81064: return EMU_KERNEL(attn_fwd_mma_w8_d64_bf16);
        case 81128: return EMU_KERNEL(attn_fwd_mma_w8_d128_bf16);
        case 42064: return EMU_KERNEL(attn_fwd_mma_w4_m2_d64_bf16);
        case 42128: return EMU_KERNEL(attn_fwd_mma_w4_m2_d128_bf16);
        default: emu::fail("no mma attention kernel for %zu warps of %zu tiles, head dim %zu", f.warps, f.row_tiles, head_dim);
    }
}

void run(const Config& c, const FwdShape& f, uint64_t seed) {
    const size_t B = c.batch, Nq = c.q_len, Nk = c.kv_len, H = c.heads, D = c.head_dim;
    const Inputs x = draw(c, seed);
    const Reference ref = reference(c, x.scale, x.q, x.k, x.v, x.dout, x.mask, x.bias);

    DeviceArray<bf16> dq(x.q), dk(x.k), dv(x.v);
    DeviceArray<float> dummy(std::vector<double>{0.0}), dmask(x.mask.empty() ? std::vector<double>{0.0} : x.mask),
        dbias(x.bias.empty() ? std::vector<double>{0.0} : x.bias);
    const float* mask_ptr = x.mask.empty() ? dummy.ptr() : dmask.ptr();
    const float* bias_ptr = x.bias.empty() ? dummy.ptr() : dbias.ptr();
    DeviceArray<bf16> out(B * Nq * H * D);
    DeviceArray<float> lse(B * H * Nq);
    const emu::LaunchConfig cfg{dim3((unsigned)ceil_div(Nq, f.rows()), (unsigned)H, (unsigned)B),
                                dim3((unsigned)(32 * f.warps)), f.smem_bytes(D)};
    emu::launch(cfg, kernel(f, D), dq.ptr(), dk.ptr(), dv.ptr(), mask_ptr, bias_ptr, out.ptr(), lse.ptr(), (int)Nq,
                (int)Nk, (int)H, (int)c.bias_batch, (int)!x.mask.empty(), (int)c.causal, x.scale);

    const std::string name = format("w%zu m%zu ", f.warps, f.row_tiles) + attention_ref::name(c);
    check(report, "mma forward " + name + ": out", out.download(), ref.out, 6e-3);
    report.close("mma forward " + name + ": lse", lse.download(), ref.lse, 1e-4, 1e-5);
    if (f.warps != 4 || f.row_tiles != 1) return;  // one backward per configuration

    const size_t rows = B * Nq * H;
    DeviceArray<bf16> dg(x.dout);
    DeviceArray<float> drow(std::max<size_t>(rows, 1));
    drow.zero();
    emu::launch(grid_1d(rows * 32, 256), EMU_KERNEL(attn_bwd_dot_bf16), out.ptr(), dg.ptr(), drow.ptr(), (int)Nq,
                (int)H, (int)D, (int64_t)rows);
    DeviceArray<float> dq32(B * Nq * H * D), dbias_out(c.want_dbias ? c.bias_batch * H * Nq * Nk : 1), dbias_dummy(1);
    dq32.zero();
    dbias_out.zero();
    dbias_dummy.zero();
    DeviceArray<bf16> dkg(B * Nk * H * D), dvg(B * Nk * H * D);
    const emu::LaunchConfig bcfg{dim3((unsigned)ceil_div(Nk, 64), (unsigned)H, (unsigned)B), dim3(128),
                                 mma_bwd_smem_bytes(D)};
    emu::launch(bcfg, backward_kernel(D), dq.ptr(), dk.ptr(), dv.ptr(), dg.ptr(), lse.ptr(), drow.ptr(), mask_ptr,
                bias_ptr, dq32.ptr(), dkg.ptr(), dvg.ptr(), c.want_dbias ? dbias_out.ptr() : dbias_dummy.ptr(),
                (int)Nq, (int)Nk, (int)H, (int)c.bias_batch, (int)!x.mask.empty(), (int)c.causal, (int)c.want_dbias, x.scale);
    const size_t n_q = B * Nq * H * D;
    DeviceArray<bf16> dqg(n_q);
    emu::launch(grid_chunks(n_q), EMU_KERNEL(cast_f32_bf16), dq32.ptr(), dqg.ptr(), (int64_t)n_q);
    const std::string bname = attention_ref::name(c);
    check(report, "mma backward " + bname + ": dq", dqg.download(), ref.dq, 1e-2);
    check(report, "mma backward " + bname + ": dk", dkg.download(), ref.dk, 1e-2);
    check(report, "mma backward " + bname + ": dv", dvg.download(), ref.dv, 1e-2);
    if (c.want_dbias) check(report, "mma backward " + bname + ": dbias", dbias_out.download(), ref.dbias, 1e-2);

    // The deterministic backward: attn_bwd_dkdv_mma, then attn_bwd_dq_mma (dq in bf16 and
    // dbias per batch element with plain stores; the launcher then sums a shared bias's
    // gradient over the batch, here on the host).
    DeviceArray<bf16> dk2(B * Nk * H * D), dv2(B * Nk * H * D), dq2(n_q);
    emu::launch(bcfg, dkdv_kernel(D), dq.ptr(), dk.ptr(), dv.ptr(), dg.ptr(), lse.ptr(), drow.ptr(), mask_ptr,
                bias_ptr, dk2.ptr(), dv2.ptr(), (int)Nq, (int)Nk, (int)H, (int)c.bias_batch, (int)!x.mask.empty(),
                (int)c.causal, x.scale);
    DeviceArray<float> dbias_full(c.want_dbias ? B * H * Nq * Nk : 1);
    const emu::LaunchConfig qcfg{dim3((unsigned)ceil_div(Nq, 64), (unsigned)H, (unsigned)B), dim3(128),
                                 mma_dq_smem_bytes(D)};
    emu::launch(qcfg, dq_kernel(D), dq.ptr(), dk.ptr(), dv.ptr(), dg.ptr(), lse.ptr(), drow.ptr(), mask_ptr, bias_ptr,
                dq2.ptr(), c.want_dbias ? dbias_full.ptr() : dbias_dummy.ptr(), (int)Nq, (int)Nk, (int)H,
                (int)c.bias_batch, (int)!x.mask.empty(), (int)c.causal, (int)c.want_dbias, x.scale);
    check(report, "deterministic backward " + bname + ": dq", dq2.download(), ref.dq, 1e-2);
    check(report, "deterministic backward " + bname + ": dk", dk2.download(), ref.dk, 1e-2);
    check(report, "deterministic backward " + bname + ": dv", dv2.download(), ref.dv, 1e-2);
    if (c.want_dbias) {
        const std::vector<double> full = dbias_full.download();
        std::vector<double> db(ref.dbias.size(), 0.0);
        for (size_t e = 0; e < full.size(); ++e) db[e % db.size()] += full[e];  // sum over b when shared
        check(report, "deterministic backward " + bname + ": dbias", db, ref.dbias, 1e-2);
    }
}

}  // namespace

int main() {
    emu::watchdog(300);
    // Fields: B, Nq, Nk, H, Dh, hidden key fraction, batch 1 hidden, causal, bias batch,
    // dbias. Nk > 128 gives three or more key tiles, Nq > 64 three or more query tiles of
    // the backward.
    const Config configs[] = {
        {2, 33, 65, 2, 32, 0.3, true, false, 0, false},
        {2, 77, 131, 2, 64, 0.3, false, false, 1, true},
        {2, 70, 70, 1, 80, 0.0, false, true, 2, true},
        {1, 100, 45, 1, 96, 0.2, false, true, 1, false},
        {1, 40, 200, 1, 128, 0.1, false, false, 0, false},
        {1, 150, 150, 1, 128, 0.0, false, true, 0, false},
        {2, 130, 77, 1, 64, 0.0, true, true, 0, false},
    };
    for (size_t i = 0; i < std::size(configs); ++i) {
        if (kTsan && i != 0 && i != 2 && i != 5) continue;  // TSan: masks; uneven dQ work; several tiles
        const Config& c = configs[i];
        run(c, {4, 1, 64}, 300 + i);
        if (c.head_dim == 64 || c.head_dim == 128) {
            run(c, {8, 1, 64}, 400 + i);
            run(c, {4, 2, 32}, 500 + i);
        }
    }
    return report.finish();
}
