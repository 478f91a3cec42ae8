// kernels/attention_wgmma.cu under emulation, launched as src/cuda/attention.rs does:
// the wgmma forwards' output and row log-sum-exp (the plain one and the one that overlaps
// its softmax with its products, and the warp-specialised one that loads by TMA and runs
// its two consumer warpgroups in pingpong), then the wgmma backward (attn_bwd_dot of
// attention.cu for D, the wgmma backward, the cast of the f32 dq accumulator) and the
// deterministic pair (the wgmma dK/dV and dq kernels, no atomics), for both head dims
// against the double-precision reference, with key masks (a batch whose keys are all hidden, a query
// that sees no key), causal masking, shared and per-batch biases, a block whose second
// warpgroup has no query row, and lengths that leave partial tiles and need both cp.async
// stages twice. The wgmma emulation decodes the 128-byte-swizzled descriptors on a shared
// window that is not 1024-aligned, defers each product to its wait and checks the proxy
// fences (see include/wgmma_emu.h).
#include "attention_ref.h"

#include "attention.cu"
#include "attention_wgmma.cu"
#include "elementwise.cu"

using namespace harness;
using namespace attention_ref;

namespace {

Report report("attention_wgmma");

// `wgmma_fwd_smem_bytes` in src/cuda/attention.rs; 128 query rows a block, 256 threads.
unsigned smem_bytes(size_t head_dim) { return (unsigned)(1280 * head_dim + 1024); }

// `wgmma_bwd_smem_bytes`; 128 keys a block, 256 threads.
unsigned bwd_smem_bytes(size_t head_dim) { return (unsigned)(1024 * head_dim + 18432); }

using Bwd = emu::Kernel<const bf16*, const bf16*, const bf16*, const bf16*, const float*, const float*, const float*,
                        const float*, float*, bf16*, bf16*, float*, int, int, int, int, int, int, int, float>;
using Dkdv = emu::Kernel<const bf16*, const bf16*, const bf16*, const bf16*, const float*, const float*, const float*,
                         const float*, bf16*, bf16*, int, int, int, int, int, int, float>;

// `wgmma_dq_smem_bytes`; 128 query rows a block, 256 threads.
unsigned dq_smem_bytes(size_t head_dim) { return (unsigned)(1024 * head_dim + 1024); }

using Dq = emu::Kernel<const bf16*, const bf16*, const bf16*, const bf16*, const float*, const float*, const float*,
                       const float*, bf16*, float*, int, int, int, int, int, int, int, float>;

Dq dq_kernel(size_t head_dim) {
    switch (head_dim) {
        case 64: return EMU_KERNEL(attn_bwd_dq_wgmma_d64_bf16);
        case 128: return EMU_KERNEL(attn_bwd_dq_wgmma_d128_bf16);
        default: emu::fail("no wgmma dq kernel for head dim %zu", head_dim);
    }
}

Bwd backward_kernel(size_t head_dim) {
    switch (head_dim) {
        case 64: return EMU_KERNEL(attn_bwd_wgmma_d64_bf16);
        case 128: return EMU_KERNEL(attn_bwd_wgmma_d128_bf16);
        default: emu::fail("no wgmma attention backward for head dim %zu", head_dim);
    }
}

Dkdv dkdv_kernel(size_t head_dim) {
    switch (head_dim) {
        case 64: return EMU_KERNEL(attn_bwd_dkdv_wgmma_d64_bf16);
        case 128: return EMU_KERNEL(attn_bwd_dkdv_wgmma_d128_bf16);
        default: emu::fail("no wgmma dK/dV kernel for head dim %zu", head_dim);
    }
}

using Fwd = emu::Kernel<const bf16*, const bf16*, const bf16*, const float*, const float*, bf16*, float*, int, int, int,
                        int, int, int, float>;

Fwd kernel(size_t head_dim) {
    switch (head_dim) {
        case 64: return EMU_KERNEL(attn_fwd_wgmma_d64_bf16);
        case 128: return EMU_KERNEL(attn_fwd_wgmma_d128_bf16);
        default: emu::fail("no wgmma attention kernel for head dim %zu", head_dim);
    }
}

// The forward with the softmax overlapped with the products (`wgmma_fwd_ovl_smem_bytes`).
unsigned ovl_smem_bytes(size_t head_dim) { return (unsigned)(1536 * head_dim + 1024); }

Fwd ovl_kernel(size_t head_dim) {
    switch (head_dim) {
        case 64: return EMU_KERNEL(attn_fwd_wgmma_ovl_d64_bf16);
        case 128: return EMU_KERNEL(attn_fwd_wgmma_ovl_d128_bf16);
        default: emu::fail("no overlapped wgmma attention kernel for head dim %zu", head_dim);
    }
}

// The warp-specialised forward (`wgmma_fwd_ws_smem_bytes`; 384 threads) and its tensor
// maps, encoded as `bhnd_tensor_map` in src/cuda/attention.rs encodes them: [B, N, H, Dh]
// as a 4-d map (Dh innermost), boxes of 64 head dims x 1 head x 128 tokens, 128-byte swizzle.
unsigned ws_smem_bytes(size_t head_dim) { return (unsigned)(1280 * head_dim + 1152); }

ptx::TmaMap tensor_map(const bf16* base, size_t B, size_t N, size_t H, size_t D) {
    const uint64_t dims[4] = {D, H, N, B};
    const uint64_t strides[3] = {D * 2, H * D * 2, N * H * D * 2};
    const uint32_t box[4] = {64, 1, 128, 1};
    return ptx::tma_encode_4d_bf16(base, dims, strides, box, true);
}

using FwdWs = emu::Kernel<ptx::TmaMap, ptx::TmaMap, ptx::TmaMap, const float*, const float*, bf16*, float*, int, int,
                          int, int, int, int, float>;

FwdWs ws_kernel(size_t head_dim) {
    switch (head_dim) {
        case 64: return EMU_KERNEL(attn_fwd_wgmma_ws_d64_bf16);
        case 128: return EMU_KERNEL(attn_fwd_wgmma_ws_d128_bf16);
        default: emu::fail("no warp-specialised wgmma attention kernel for head dim %zu", head_dim);
    }
}

void run(const Config& c, uint64_t seed) {
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
    const emu::LaunchConfig cfg{dim3((unsigned)ceil_div(Nq, 128), (unsigned)H, (unsigned)B), dim3(256),
                                smem_bytes(D), true};
    emu::launch(cfg, kernel(D), dq.ptr(), dk.ptr(), dv.ptr(), mask_ptr, bias_ptr, out.ptr(), lse.ptr(), (int)Nq,
                (int)Nk, (int)H, (int)c.bias_batch, (int)!x.mask.empty(), (int)c.causal, x.scale);

    const std::string name = attention_ref::name(c);
    check(report, "wgmma forward " + name + ": out", out.download(), ref.out, 6e-3);
    report.close("wgmma forward " + name + ": lse", lse.download(), ref.lse, 1e-4, 1e-5);
    {
        DeviceArray<bf16> out2(B * Nq * H * D);
        DeviceArray<float> lse2(B * H * Nq);
        const emu::LaunchConfig ocfg{cfg.grid, cfg.block, ovl_smem_bytes(D), true};
        emu::launch(ocfg, ovl_kernel(D), dq.ptr(), dk.ptr(), dv.ptr(), mask_ptr, bias_ptr, out2.ptr(), lse2.ptr(),
                    (int)Nq, (int)Nk, (int)H, (int)c.bias_batch, (int)!x.mask.empty(), (int)c.causal, x.scale);
        check(report, "overlapped wgmma forward " + name + ": out", out2.download(), ref.out, 6e-3);
        report.close("overlapped wgmma forward " + name + ": lse", lse2.download(), ref.lse, 1e-4, 1e-5);
    }
    {
        DeviceArray<bf16> out3(B * Nq * H * D);
        DeviceArray<float> lse3(B * H * Nq);
        const emu::LaunchConfig wcfg{cfg.grid, dim3(384), ws_smem_bytes(D), true};
        emu::launch(wcfg, ws_kernel(D), tensor_map(dq.ptr(), B, Nq, H, D), tensor_map(dk.ptr(), B, Nk, H, D),
                    tensor_map(dv.ptr(), B, Nk, H, D), mask_ptr, bias_ptr, out3.ptr(), lse3.ptr(), (int)Nq, (int)Nk,
                    (int)H, (int)c.bias_batch, (int)!x.mask.empty(), (int)c.causal, x.scale);
        check(report, "warp-specialised wgmma forward " + name + ": out", out3.download(), ref.out, 6e-3);
        report.close("warp-specialised wgmma forward " + name + ": lse", lse3.download(), ref.lse, 1e-4, 1e-5);
    }

    const size_t rows = B * Nq * H;
    DeviceArray<bf16> dg(x.dout);
    DeviceArray<float> drow(std::max<size_t>(rows, 1));
    drow.zero();
    emu::launch(grid_1d(rows * 32, 256), EMU_KERNEL(attn_bwd_dot_bf16), out.ptr(), dg.ptr(), drow.ptr(), (int)Nq,
                (int)H, (int)D, (int64_t)rows);
    const size_t n_q = B * Nq * H * D;
    DeviceArray<float> dq32(n_q), dbias_out(c.want_dbias ? c.bias_batch * H * Nq * Nk : 1), dbias_dummy(1);
    dq32.zero();
    dbias_out.zero();
    dbias_dummy.zero();
    DeviceArray<bf16> dkg(B * Nk * H * D), dvg(B * Nk * H * D);
    const emu::LaunchConfig bcfg{dim3((unsigned)ceil_div(Nk, 128), (unsigned)H, (unsigned)B), dim3(256),
                                 bwd_smem_bytes(D), true};
    emu::launch(bcfg, backward_kernel(D), dq.ptr(), dk.ptr(), dv.ptr(), dg.ptr(), lse.ptr(), drow.ptr(), mask_ptr,
                bias_ptr, dq32.ptr(), dkg.ptr(), dvg.ptr(), c.want_dbias ? dbias_out.ptr() : dbias_dummy.ptr(),
                (int)Nq, (int)Nk, (int)H, (int)c.bias_batch, (int)!x.mask.empty(), (int)c.causal, (int)c.want_dbias,
                x.scale);
    DeviceArray<bf16> dqg(n_q);
    emu::launch(grid_chunks(n_q), EMU_KERNEL(cast_f32_bf16), dq32.ptr(), dqg.ptr(), (int64_t)n_q);
    check(report, "wgmma backward " + name + ": dq", dqg.download(), ref.dq, 1e-2);
    check(report, "wgmma backward " + name + ": dk", dkg.download(), ref.dk, 1e-2);
    check(report, "wgmma backward " + name + ": dv", dvg.download(), ref.dv, 1e-2);
    if (c.want_dbias) check(report, "wgmma backward " + name + ": dbias", dbias_out.download(), ref.dbias, 1e-2);

    // The deterministic pair: the wgmma dK/dV kernel, then the wgmma dq kernel (dq in bf16
    // and dbias per batch element with plain stores; the launcher then sums a shared
    // bias's gradient over the batch, here on the host).
    DeviceArray<bf16> dk2(B * Nk * H * D), dv2(B * Nk * H * D), dq2(n_q);
    emu::launch(bcfg, dkdv_kernel(D), dq.ptr(), dk.ptr(), dv.ptr(), dg.ptr(), lse.ptr(), drow.ptr(), mask_ptr,
                bias_ptr, dk2.ptr(), dv2.ptr(), (int)Nq, (int)Nk, (int)H, (int)c.bias_batch, (int)!x.mask.empty(),
                (int)c.causal, x.scale);
    DeviceArray<float> dbias_full(c.want_dbias ? B * H * Nq * Nk : 1);
    const emu::LaunchConfig qcfg{dim3((unsigned)ceil_div(Nq, 128), (unsigned)H, (unsigned)B), dim3(256),
                                 dq_smem_bytes(D), true};
    emu::launch(qcfg, dq_kernel(D), dq.ptr(), dk.ptr(), dv.ptr(), dg.ptr(), lse.ptr(), drow.ptr(), mask_ptr, bias_ptr,
                dq2.ptr(), c.want_dbias ? dbias_full.ptr() : dbias_dummy.ptr(), (int)Nq, (int)Nk, (int)H,
                (int)c.bias_batch, (int)!x.mask.empty(), (int)c.causal, (int)c.want_dbias, x.scale);
    check(report, "wgmma deterministic backward " + name + ": dq", dq2.download(), ref.dq, 1e-2);
    check(report, "wgmma deterministic backward " + name + ": dk", dk2.download(), ref.dk, 1e-2);
    check(report, "wgmma deterministic backward " + name + ": dv", dv2.download(), ref.dv, 1e-2);
    if (c.want_dbias) {
        const std::vector<double> full = dbias_full.download();
        std::vector<double> db(ref.dbias.size(), 0.0);
        for (size_t e = 0; e < full.size(); ++e) db[e % db.size()] += full[e];  // sum over b when shared
        check(report, "wgmma deterministic backward " + name + ": dbias", db, ref.dbias, 1e-2);
    }
}

}  // namespace

int main() {
    emu::watchdog(600);
    // Fields: B, Nq, Nk, H, Dh, hidden key fraction, batch 1 hidden, causal, bias batch,
    // dbias. Forward: Nk > 384 needs four key tiles (each stage twice), Nq > 128 two query
    // blocks; Nq <= 64 leaves the second warpgroup without rows. Backward: Nq > 128 needs
    // three query tiles (each stage, twice for one), Nk of 131 and 45 leave a last block
    // whose second warpgroup has no key, Nk 200 one whose second warpgroup has 8, Nk 769
    // seven blocks.
    const Config configs[] = {
        {2, 77, 131, 2, 64, 0.3, true, false, 1, true},
        {1, 150, 400, 1, 128, 0.1, false, false, 2, false},
        {1, 200, 200, 1, 64, 0.0, false, true, 0, false},
        {2, 40, 45, 1, 128, 0.2, false, true, 2, true},
        {1, 170, 200, 2, 128, 0.0, false, false, 0, false},
        // The cross-attention's 769 keys: six full key tiles and a short one (each forward
        // stage used three or four times, so the mbarrier parities wrap), one query block.
        {1, 64, 769, 1, 128, 0.1, false, false, 1, false},
    };
    for (size_t i = 0; i < std::size(configs); ++i) {
        // TSan: masks and a shared bias with its gradient; causal with several query tiles.
        if (kTsan && i != 0 && i != 2) continue;
        run(configs[i], 700 + i);
    }
    return report.finish();
}
