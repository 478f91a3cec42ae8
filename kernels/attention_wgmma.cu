// Attention on Hopper's warpgroup tensor-core instruction (wgmma, sm_90a): the same math,
// inputs, outputs and conventions as attention.cu and attention_mma.cu. This file holds
// the forward (attn_fwd_wgmma_d<Dh>_bf16, below), the forward with its softmax overlapped
// with its products (attn_fwd_wgmma_ovl_d<Dh>_bf16), the same warp-specialised with TMA
// loads and two consumer warpgroups in pingpong (attn_fwd_wgmma_ws_d<Dh>_bf16, which takes
// tensor maps instead of q, k, v pointers), the backward with dq atomics
// (attn_bwd_wgmma_d<Dh>_bf16) and the deterministic backward's two kernels
// (attn_bwd_dkdv_wgmma_d<Dh>_bf16, attn_bwd_dq_wgmma_d<Dh>_bf16); each is described where
// it is defined. The forwards' output and log-sum-exp feed any of the backwards.
//
// attn_fwd_wgmma_d<Dh>_bf16 (Dh 64 or 128): grid (ceil(Nq / 128), H, B), 256 threads =
//   two warpgroups. The block owns 128 query rows, warpgroup wg the 64 rows 64wg.. and,
//   within it, warp w (of 4) the 16 rows 16w.. of each product. The block walks the keys
//   in tiles of 128 (causal: only up to its last row; a last tile of at most 64 keys runs
//   as a 64-key tile). Q, K and V tiles go to shared
//   memory through cp.async in the 128-byte-swizzle layout of wgmma.cuh (Dh split into
//   panels of 64 columns, one 128-byte row per token and panel); K and V are two stages
//   deep, tile j+1 in flight while tile j is used. Per tile, each warpgroup:
//     S (64 x 128 fp32, 64 registers a thread) = Q K^T: Dh/16 wgmma with Q and K from
//       shared memory, both K-major (head dims contiguous);
//     scale, bias, masks and the online softmax on S's registers, as in attention_mma.cu
//       (S's register layout is mma.sync's, so a row's 4 lanes reduce with two shuffles);
//     O (64 x Dh fp32, Dh/2 registers) = alpha O + P V: 8 wgmma with P's 16-key slices
//       packed from S's registers as A operands and V from shared memory, N-major (V's
//       rows are keys, its head dims contiguous).
//   Out-of-range keys and query rows are zero-filled by cp.async and masked to -inf.
//
// Shared memory (dynamic): Q 128 rows, K and V 2 stages x 128 rows, Dh bf16 each, from the
//   first 1024-byte boundary of the window: 1280 Dh + 1024 bytes (Dh 64: 82944, 128: 164864).
// Built for sm_90a only; other targets get kernels that trap (the host launches them only
// on compute capability 9.0).
#include <type_traits>

#include "flash.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace {

// The forwards' layout: Q 128 rows, K two stages and V VS stages of 128 rows (VS = 2, or
// 3 for the overlapped forward, whose P V of tile j-1 reads V while tile j+1 loads).
template <int DH, bool OVERLAP>
struct WgFwd {
    static constexpr int THREADS = 256;
    static constexpr int BQ = 128;  // query rows per block
    static constexpr int BK = 128;  // keys per tile
    static constexpr int VS = OVERLAP ? 3 : 2;
    static constexpr int TILE = BK * DH * 2;
    static constexpr int Q = 0;  // byte offsets from the aligned base
    static constexpr int K = Q + BQ * DH * 2;
    static constexpr int V = K + 2 * TILE;
    static constexpr int BYTES = V + VS * TILE + 1024;  // + the alignment slack
    static_assert(DH == 64 || DH == 128, "head dim 64 or 128");
    // The host computes the same sizes (cuda/attention.rs, wgmma_fwd_smem_bytes and
    // wgmma_fwd_ovl_smem_bytes).
    static_assert(BYTES == (OVERLAP ? 1536 : 1280) * DH + 1024, "shared-memory size changed: update the host");
};

// Issues cp.async copies of tokens row0 .. row0+ROWS-1 of head h, batch b of a
// [B, N, H, DH] bf16 tensor into a 128-byte-swizzled tile at `dst` (1024-byte aligned):
// panel p (head dims 64p..64p+63) at dst + p ROWS 128, token r's row at + 128 r, its
// 16-byte chunk c at chunk c ^ (r % 8). Zeros for tokens >= N.
template <int DH, int ROWS, int THREADS>
__device__ __forceinline__ void issue_tile_sw128(unsigned char* dst, const bf16* __restrict__ src, int64_t b,
                                                 int row0, int N, int H, int h) {
    constexpr int CPR = DH / 8;  // 16-byte chunks per row
    static_assert(ROWS * CPR % THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int i = 0; i < ROWS * CPR / THREADS; ++i) {
        const int idx = threadIdx.x + i * THREADS;
        const int r = idx / CPR, c = idx % CPR;
        const int n = row0 + r;
        const bool in_range = n < N;
        const bf16* from = src + ((b * N + (in_range ? n : 0)) * H + h) * (int64_t)DH + c * 8;
        ptx::cp_async_16(dst + (c / 8) * (ROWS * 128) + r * 128 + (((c % 8) ^ (r % 8)) * 16), from, in_range);
    }
}

// Issues (without committing) D (64 x N) = A B^T over the head dims in slices of 16, with
// A and B token tiles in the layout of issue_tile_sw128, both K-major (head dims
// contiguous), 8-row groups 1024 bytes apart (SBO; the leading offset is unused in this
// layout): S = Q K^T, and the backwards' S^T = K Q^T, dP = dO V^T and dP^T = V dO^T.
// a_rows: the warpgroup's 64 rows of a tile of AROWS rows (panel kk / 4 at AROWS·128, 32
// bytes per 16 head dims within it); b: a tile of BROWS rows, of which the first N.
template <int DH, int N, int AROWS, int BROWS>
__device__ __forceinline__ void issue_qk(float (&d)[N / 2], const unsigned char* a_rows, const unsigned char* b) {
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
        const int slice = (kk % 4) * 32;  // 16 head dims within the panel
        const uint64_t da = ptx::wgmma_desc_sw128(a_rows + (kk / 4) * AROWS * 128 + slice, 16, 1024);
        const uint64_t db = ptx::wgmma_desc_sw128(b + (kk / 4) * BROWS * 128 + slice, 16, 1024);
        ptx::wgmma_ss<N, 0, 0>(d, da, db, kk > 0);
    }
}

// Issues (without committing) D (64 x DH) += P V over K tokens in slices of 16: P's A
// operands from registers (pa[ks]: two adjacent 8-token accumulator tiles, packed), V a
// token tile of ROWS rows read N-major: 64-column panels LBO = ROWS·128 apart, 8-token
// groups 1024 bytes apart. O += P V, and the backwards' dV += P^T dO, dK += dS^T Q and
// dQ += dS K.
template <int DH, int K, int ROWS>
__device__ __forceinline__ void issue_pv(float (&o)[DH / 2], const uint32_t (*pa)[4], const unsigned char* v) {
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks)
        ptx::wgmma_rs<DH, 1>(o, pa[ks], ptx::wgmma_desc_sw128(v + ks * 16 * 128, ROWS * 128, 1024), 1);
}

// P's A operands from S's registers holding P (ptx::acc_to_a's repack: two adjacent 8-key
// tiles make one 16-key slice).
template <int BKT>
__device__ __forceinline__ void pack_p(const float (&s)[BKT / 2], uint32_t (*pa)[4]) {
#pragma unroll
    for (int ks = 0; ks < BKT / 16; ++ks)
#pragma unroll
        for (int i = 0; i < 4; ++i) pa[ks][i] = ptx::pack_bf16(s[8 * ks + 2 * i], s[8 * ks + 2 * i + 1]);
}

// O += P V (issue_pv's operands), run to completion: fenced, issued as one group and
// waited for.
template <int DH, int K, int ROWS>
__device__ __forceinline__ void pv_now(float (&o)[DH / 2], const uint32_t (*pa)[4], const unsigned char* v) {
    ptx::wgmma_fence_operand(o);
    ptx::wgmma_fence();
    issue_pv<DH, K, ROWS>(o, pa, v);
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::wgmma_fence_operand(o);
}

// The backwards' two score products of a tile (issue_qk's operands: S or S^T from a1 and
// b1, dP or dP^T from a2 and b2) issued as two groups; returns once the first is done, so
// that P is computed while dP's products run.
template <int DH, int N, int AROWS, int BROWS>
__device__ __forceinline__ void s_and_dp(float (&s)[N / 2], const unsigned char* a1, const unsigned char* b1,
                                         float (&dp)[N / 2], const unsigned char* a2, const unsigned char* b2) {
    ptx::wgmma_fence();
    issue_qk<DH, N, AROWS, BROWS>(s, a1, b1);
    ptx::wgmma_commit();
    issue_qk<DH, N, AROWS, BROWS>(dp, a2, b2);
    ptx::wgmma_commit();
    ptx::wgmma_wait<1>();
    ptx::wgmma_fence_operand(s);
}

// The end of a forward: each row's log-sum-exp, and O normalised and stored (a lane
// writes 2 consecutive dims of rows g and g+8 per 8-dim tile).
template <int DH>
__device__ __forceinline__ void store_out(const float (&o)[DH / 2], float (&l_run)[2], const float (&m_run)[2],
                                          const int (&rows)[2], int Nq, int H, int h, int64_t b, int t, bf16* out,
                                          float* lse) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = rows[r];
        const float inv = flash::finish_row(l_run[r], m_run[r], i, Nq, t, lse + (b * H + h) * (int64_t)Nq + i);
        if (i >= Nq) continue;
        bf16* orow = out + ((b * Nq + i) * H + h) * (int64_t)DH + 2 * t;
#pragma unroll
        for (int d = 0; d < DH / 8; ++d)
            *reinterpret_cast<__nv_bfloat162*>(orow + d * 8) =
                __floats2bfloat162_rn(o[4 * d + 2 * r] * inv, o[4 * d + 2 * r + 1] * inv);
    }
}

// The key tiles a forward block of BQ queries from q0 visits: ceil(k_end / BK), where
// k_end is Nk, or with the causal mask the block's last query + 1. `short_last`: the last
// tile holds at most BK / 2 keys and runs as a half tile (half the products where Nk leaves
// a short remainder, e.g. the 769-key cross-attention).
template <int BQ, int BK>
__device__ __forceinline__ int fwd_key_tiles(int q0, int Nk, int causal, bool& short_last) {
    const int k_end = causal ? min(Nk, q0 + BQ) : Nk;
    const int tiles = (k_end + BK - 1) / BK;
    short_last = tiles > 0 && k_end - (tiles - 1) * BK <= BK / 2;
    return tiles;
}

// A forward warpgroup's rows at the start: this lane's two query rows (row0 and row0 + 8:
// S and O elements e = 0, 1 and e = 2, 3), their bias rows, O = 0 and the running maxima and
// sums of the online softmax.
template <int DH>
__device__ __forceinline__ void fwd_rows_start(int row0, const float* bias, int bias_batch, int64_t b, int H, int h,
                                               int Nq, int Nk, int (&rows)[2], const float* (&brow)[2],
                                               float (&o)[DH / 2], float (&m_run)[2], float (&l_run)[2]) {
    rows[0] = row0;
    rows[1] = row0 + 8;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        brow[r] = flash::bias_row(bias, bias_batch, b, H, h, Nq, Nk, rows[r]);
        m_run[r] = -INFINITY;
        l_run[r] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < DH / 2; ++i) o[i] = 0.f;
}

// One key tile of BKT keys (at k0, in kt) of the overlapped forwards (attn_fwd_wgmma_ovl,
// attn_fwd_wgmma_ws): issues S_j = Q K_j^T and, unless v_prev is null (the first tile),
// O += P_{j-1} V_{j-1} with P_{j-1} packed in pa and V_{j-1} in v_prev, as two groups; runs
// issued() once both are issued; waits for S_j and runs s_read() (K_j is read); runs the
// softmax of tile j while P V is in flight; waits for it and runs pv_read() (V_{j-1} is
// read); rescales O and packs P_j into pa.
template <int DH, int BKT, int BQ, int BK, class Issued, class SRead, class PvRead>
__device__ __forceinline__ void overlapped_tile(float (&o)[DH / 2], uint32_t (&pa)[BK / 16][4],
                                                const unsigned char* q_rows, const unsigned char* kt,
                                                const unsigned char* v_prev, const int (&rows)[2], int k0, int t,
                                                int Nq, int Nk, int causal, int has_mask, const float* key_mask,
                                                int64_t b, const float* const (&brow)[2], float scale,
                                                float (&m_run)[2], float (&l_run)[2], Issued issued, SRead s_read,
                                                PvRead pv_read) {
    constexpr int NTT = BKT / 8;
    float s[BKT / 2];
    float alpha[2];
    ptx::wgmma_fence_operand(o);
    ptx::wgmma_fence();
    issue_qk<DH, BKT, BQ, BK>(s, q_rows, kt);
    ptx::wgmma_commit();
    if (v_prev != nullptr) issue_pv<DH, BK, BK>(o, pa, v_prev);  // (never the short tile)
    ptx::wgmma_commit();
    issued();
    ptx::wgmma_wait<1>();  // S_j (P_{j-1} V_{j-1} may still run)
    ptx::wgmma_fence_operand(s);
    s_read();
    flash::softmax_tile<NTT>(reinterpret_cast<float(&)[NTT][4]>(s), rows, k0, t, Nq, Nk, causal, has_mask, key_mask, b,
                             brow, scale, m_run, l_run, alpha);
    ptx::wgmma_wait<0>();
    ptx::wgmma_fence_operand(o);
    ptx::wgmma_fence_operand(pa);
    pv_read();
#pragma unroll
    for (int i = 0; i < DH / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
    pack_p<BKT>(s, pa);
}

// The overlapped forwards' last P V, after their tile loop (v: the last tile's V; a short
// last tile has BK / 2 keys).
template <int DH, int BK>
__device__ __forceinline__ void final_pv(float (&o)[DH / 2], uint32_t (&pa)[BK / 16][4], const unsigned char* v,
                                         bool short_tile) {
    ptx::wgmma_fence_operand(o);
    ptx::wgmma_fence();
    if (short_tile)
        issue_pv<DH, BK / 2, BK>(o, pa, v);
    else
        issue_pv<DH, BK, BK>(o, pa, v);
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::wgmma_fence_operand(o);
    ptx::wgmma_fence_operand(pa);
}

// OVERLAP (attn_fwd_wgmma_ovl_d<Dh>_bf16): the same forward with each warpgroup's softmax
// overlapped with its tensor-core work, as FlashAttention-3 does within a warpgroup: per
// tile j it issues S_j = Q K_j^T and O += P_{j-1} V_{j-1}, waits for S_j only, runs the
// softmax of tile j while P_{j-1} V_{j-1} is in flight, then waits for it, rescales O and
// keeps P_j packed for the next tile; the last P V runs after the loop. V_{j-1} is read
// while tile j+1 loads, so V has three stages: 1536 Dh + 1024 bytes of shared memory
// (Dh 64: 99328, 128: 197632).
template <int DH, bool OVERLAP>
__device__ __forceinline__ void attn_fwd_wgmma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                               const bf16* __restrict__ v, const float* __restrict__ key_mask,
                                               const float* __restrict__ bias, bf16* __restrict__ out,
                                               float* __restrict__ lse, int Nq, int Nk, int H, int bias_batch,
                                               int has_mask, int causal, float scale) {
#if defined(SYNTHOS_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using L = WgFwd<DH, OVERLAP>;
    constexpr int BQ = L::BQ, BK = L::BK, TILE = L::TILE;
    unsigned char* smem = ptx::align_1024(dynamic_smem_at_least<L::BYTES>());
    unsigned char* Qs = smem + L::Q;
    unsigned char* Ks = smem + L::K;
    unsigned char* Vs = smem + L::V;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp within it
    const int g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * BQ;
    const int h = blockIdx.y;
    const int64_t b = blockIdx.z;

    bool short_last;
    const int tiles = fwd_key_tiles<BQ, BK>(q0, Nk, causal, short_last);
    const auto v_stage = [](int j) { return OVERLAP ? j % 3 : j & 1; };

    issue_tile_sw128<DH, BQ, L::THREADS>(Qs, q, b, q0, Nq, H, h);
    if (tiles > 0) {
        issue_tile_sw128<DH, BK, L::THREADS>(Ks, k, b, 0, Nk, H, h);
        issue_tile_sw128<DH, BK, L::THREADS>(Vs, v, b, 0, Nk, H, h);
    }
    ptx::cp_async_commit();

    int rows[2];
    const float* brow[2];
    float o[DH / 2], m_run[2], l_run[2];
    fwd_rows_start<DH>(q0 + wg * 64 + wq * 16 + g, bias, bias_batch, b, H, h, Nq, Nk, rows, brow, o, m_run, l_run);
    // This warpgroup's 64 rows of Q: panel kk / 4, 32 bytes per 16 head dims within it.
    const unsigned char* q_rows = Qs + wg * 64 * 128;
    uint32_t pa[BK / 16][4];  // P packed (OVERLAP: the previous tile's, kept across the loop)

    for (int j = 0; j < tiles; ++j) {
        const int k0 = j * BK;
        // Tile j+1 into K stage (j+1) % 2 and its V stage, both free since the barrier
        // ending tile j-1 (plain: their last reader was tile j-1; OVERLAP: K_{j-1}, and
        // V_{j-2}, whose P V ran in tile j-1).
        flash::prefetch_next(j, tiles, [&] {
            issue_tile_sw128<DH, BK, L::THREADS>(Ks + ((j + 1) & 1) * TILE, k, b, k0 + BK, Nk, H, h);
            issue_tile_sw128<DH, BK, L::THREADS>(Vs + v_stage(j + 1) * TILE, v, b, k0 + BK, Nk, H, h);
        });
        ptx::fence_proxy_async();  // this thread's copies, visible to the tensor cores
        __syncthreads();           // ... and every other thread's: tile j (and Q) is in place
        const unsigned char* Kt = Ks + (j & 1) * TILE;

        // One tile of BKT keys (128, or 64 for the short last tile).
        auto tile_step = [&](auto keys) {
            constexpr int BKT = decltype(keys)::value, NTT = BKT / 8;
            if constexpr (!OVERLAP) {
                float s[BKT / 2];
                float alpha[2];
                ptx::wgmma_fence();
                issue_qk<DH, BKT, BQ, BK>(s, q_rows, Kt);
                ptx::wgmma_commit();
                ptx::wgmma_wait<0>();
                ptx::wgmma_fence_operand(s);
                flash::softmax_tile<NTT>(reinterpret_cast<float(&)[NTT][4]>(s), rows, k0, t, Nq, Nk, causal,
                                         has_mask, key_mask, b, brow, scale, m_run, l_run, alpha);
#pragma unroll
                for (int i = 0; i < DH / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
                // O += P V over the tile's keys. Every slice is packed before the fence, so
                // that one fence covers all the products (packing between them would make
                // the compiler fence each one).
                pack_p<BKT>(s, pa);
                pv_now<DH, BKT, BK>(o, pa, Vs + v_stage(j) * TILE);
            } else {
                const auto none = [] {};
                overlapped_tile<DH, BKT, BQ, BK>(o, pa, q_rows, Kt, j > 0 ? Vs + v_stage(j - 1) * TILE : nullptr, rows,
                                                 k0, t, Nq, Nk, causal, has_mask, key_mask, b, brow, scale, m_run,
                                                 l_run, none, none, none);
            }
        };
        if (j + 1 == tiles && short_last)
            tile_step(std::integral_constant<int, BK / 2>{});
        else
            tile_step(std::integral_constant<int, BK>{});
        __syncthreads();  // every warpgroup is done with these stages before they are refilled
    }
    if constexpr (OVERLAP) {
        if (tiles > 0)  // the last tile's P V (its V stays in place: no copy follows)
            final_pv<DH, BK>(o, pa, Vs + v_stage(tiles - 1) * TILE, short_last);
    }
    if (tiles == 0) ptx::cp_async_wait<0>();  // (Q's copies; no key is visible to the block)
    store_out<DH>(o, l_run, m_run, rows, Nq, H, h, b, t, out, lse);
#else
    __trap();
#endif
}

}  // namespace

#define WGMMA_FWD(DH)                                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 1)                                                          \
        attn_fwd_wgmma_d##DH##_bf16(const bf16* q, const bf16* k, const bf16* v, const float* key_mask,           \
                                    const float* bias, bf16* out, float* lse, int Nq, int Nk, int H,               \
                                    int bias_batch, int has_mask, int causal, float scale) {                       \
        attn_fwd_wgmma<DH, false>(q, k, v, key_mask, bias, out, lse, Nq, Nk, H, bias_batch, has_mask, causal,      \
                                  scale);                                                                         \
    }
WGMMA_FWD(64)
WGMMA_FWD(128)

#define WGMMA_FWD_OVL(DH)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256, 1)                                                          \
        attn_fwd_wgmma_ovl_d##DH##_bf16(const bf16* q, const bf16* k, const bf16* v, const float* key_mask,       \
                                        const float* bias, bf16* out, float* lse, int Nq, int Nk, int H,           \
                                        int bias_batch, int has_mask, int causal, float scale) {                   \
        attn_fwd_wgmma<DH, true>(q, k, v, key_mask, bias, out, lse, Nq, Nk, H, bias_batch, has_mask, causal,       \
                                 scale);                                                                          \
    }
WGMMA_FWD_OVL(64)
WGMMA_FWD_OVL(128)

// ---- Warp-specialised forward -------------------------------------------------------------
// attn_fwd_wgmma_ws_d<Dh>_bf16 (Dh 64 or 128): the forward of attn_fwd_wgmma_ovl with its
// loads moved to a producer and its two warpgroups in pingpong, as FlashAttention-3 runs
// on Hopper. Grid (ceil(Nq / 128), H, B), 384 threads = three warpgroups:
//   warpgroup 0, the producer, gives most of its registers back (setmaxnreg 24); one
//     thread loads Q once and then, per key tile j, K_j and V_j with TMA (q_map, k_map,
//     v_map: the [B, N, H, Dh] tensors as 4-d maps, boxes of 64 head dims x 1 head x 128
//     tokens, 128-byte swizzle, so each box lands in the layout of issue_tile_sw128) into
//     stage j % 2 of K and of V, each stage guarded by a "full" mbarrier (one arrival
//     with the tile's transaction bytes) and an "empty" one (an arrival of every consumer
//     thread);
//   warpgroups 1 and 2, the consumers (setmaxnreg 240), own query rows 0..63 and 64..127
//     and run the overlapped tile step of attn_fwd_wgmma_ovl: issue S_j = Q K_j^T and
//     O += P_{j-1} V_{j-1}, wait for S_j (K_j's stage is then free), the softmax of tile
//     j while P_{j-1} V_{j-1} runs, wait for it (V_{j-1}'s stage is then free), rescale,
//     pack P_j. Pingpong: a consumer issues its products only after the other has issued
//     its own (named barriers 1 and 2, 256 threads: the waiting warpgroup's bar.sync and
//     the other's bar.arrive), so one warpgroup's softmax runs while the other's products
//     occupy the tensor cores.
// No thread waits for a copy it issued and no block barrier follows the set-up: the
// consumers wait only for data and for their turn.
// Shared memory (dynamic): Q 128 rows, K and V 2 stages x 128 rows, Dh bf16 each, 9
//   mbarriers (128 bytes) and 1024 bytes to align the tiles: 1280 Dh + 1152 bytes
//   (Dh 64: 83072, 128: 164992).
namespace {

template <int DH>
struct WgWs {
    static constexpr int THREADS = 384;  // (the launch bounds below; the host's WGMMA_WS_THREADS)
    static constexpr int CONSUMERS = 256;  // threads of the two consumer warpgroups
    static constexpr int BQ = 128;         // query rows per block
    static constexpr int BK = 128;         // keys per tile
    static constexpr int TILE = BK * DH * 2;
    static constexpr int Q = 0;  // byte offsets from the aligned base
    static constexpr int K = Q + BQ * DH * 2;
    static constexpr int V = K + 2 * TILE;
    static constexpr int BAR = V + 2 * TILE;
    static constexpr int BYTES = BAR + 128 + 1024;
    static_assert(DH == 64 || DH == 128, "head dim 64 or 128");
    // The host computes the same size (cuda/attention.rs, wgmma_fwd_ws_smem_bytes).
    static_assert(BYTES == 1280 * DH + 1152, "shared-memory size changed: update the host");
};

template <int DH>
__device__ __forceinline__ void attn_fwd_wgmma_ws(const ptx::TmaMap* q_map, const ptx::TmaMap* k_map,
                                                  const ptx::TmaMap* v_map, const float* __restrict__ key_mask,
                                                  const float* __restrict__ bias, bf16* __restrict__ out,
                                                  float* __restrict__ lse, int Nq, int Nk, int H, int bias_batch,
                                                  int has_mask, int causal, float scale) {
#if defined(SYNTHOS_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using L = WgWs<DH>;
    constexpr int BQ = L::BQ, BK = L::BK, TILE = L::TILE, PANELS = DH / 64;
    unsigned char* smem = ptx::align_1024(dynamic_smem_at_least<L::BYTES>());
    unsigned char* Qs = smem + L::Q;
    unsigned char* Ks = smem + L::K;
    unsigned char* Vs = smem + L::V;
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L::BAR);
    uint64_t* q_full = bars;
    uint64_t* k_full = bars + 1;   // [2]
    uint64_t* k_empty = bars + 3;  // [2]
    uint64_t* v_full = bars + 5;   // [2]
    uint64_t* v_empty = bars + 7;  // [2]

    const int q0 = blockIdx.x * BQ;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    bool short_last;
    const int tiles = fwd_key_tiles<BQ, BK>(q0, Nk, causal, short_last);
    // The warpgroup, from lane 0: ptxas then knows it is uniform in each warp (the wgmma
    // of a branch it cannot prove warp-uniform are serialised).
    const int wg = __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 7), 0);

    if (threadIdx.x == 0) {
        ptx::mbar_init(q_full, 1);
        for (int s = 0; s < 2; ++s) {
            ptx::mbar_init(k_full + s, 1);
            ptx::mbar_init(v_full + s, 1);
            ptx::mbar_init(k_empty + s, L::CONSUMERS);
            ptx::mbar_init(v_empty + s, L::CONSUMERS);
        }
        ptx::fence_mbar_init();
    }
    __syncthreads();

    if (wg == 0) {  // the producer
        ptx::setmaxnreg_dec<24>();
        if (threadIdx.x != 0 || tiles == 0) return;
        ptx::mbar_arrive_expect_tx(q_full, BQ * DH * 2);
        for (int p = 0; p < PANELS; ++p) ptx::tma_load_4d(Qs + p * BQ * 128, q_map, 64 * p, h, q0, b, q_full);
        for (int j = 0; j < tiles; ++j) {
            const int s = j & 1;
            const unsigned free_parity = ((j >> 1) & 1) ^ 1;  // the stage's previous use released
            ptx::mbar_wait_or_trap(k_empty + s, free_parity);
            ptx::mbar_arrive_expect_tx(k_full + s, TILE);
            for (int p = 0; p < PANELS; ++p)
                ptx::tma_load_4d(Ks + s * TILE + p * BK * 128, k_map, 64 * p, h, j * BK, b, k_full + s);
            ptx::mbar_wait_or_trap(v_empty + s, free_parity);
            ptx::mbar_arrive_expect_tx(v_full + s, TILE);
            for (int p = 0; p < PANELS; ++p)
                ptx::tma_load_4d(Vs + s * TILE + p * BK * 128, v_map, 64 * p, h, j * BK, b, v_full + s);
        }
        return;
    }

    ptx::setmaxnreg_inc<240>();
    const int cw = wg - 1;  // consumer 0 or 1
    const int wq = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    int rows[2];
    const float* brow[2];
    float o[DH / 2], m_run[2], l_run[2];
    fwd_rows_start<DH>(q0 + cw * 64 + wq * 16 + g, bias, bias_batch, b, H, h, Nq, Nk, rows, brow, o, m_run, l_run);
    const unsigned char* q_rows = Qs + cw * 64 * 128;
    uint32_t pa[BK / 16][4];  // the previous tile's P, packed
    // Pingpong: consumer c issues at its barrier (1 + c) once the other has issued; the
    // first turn is consumer 0's.
    const unsigned my_turn = 1 + cw, their_turn = 2 - cw;
    if (tiles > 0) {
        ptx::mbar_wait(q_full, 0);
        if (cw == 1) ptx::named_bar_arrive(1, L::CONSUMERS);
    }

    for (int j = 0; j < tiles; ++j) {
        const int k0 = j * BK, s = j & 1;
        ptx::mbar_wait(k_full + s, (j >> 1) & 1);
        if (j > 0) ptx::mbar_wait(v_full + ((j - 1) & 1), ((j - 1) >> 1) & 1);
        const unsigned char* Kt = Ks + s * TILE;
        auto tile_step = [&](auto keys) {
            constexpr int BKT = decltype(keys)::value;
            ptx::named_bar_sync(my_turn, L::CONSUMERS);
            overlapped_tile<DH, BKT, BQ, BK>(
                o, pa, q_rows, Kt, j > 0 ? Vs + ((j - 1) & 1) * TILE : nullptr, rows, k0, t, Nq, Nk, causal, has_mask,
                key_mask, b, brow, scale, m_run, l_run,
                // The other consumer's turn (consumer 1's last turn has no one to hand to).
                [&] {
                    if (cw == 0 || j + 1 < tiles) ptx::named_bar_arrive(their_turn, L::CONSUMERS);
                },
                [&] { ptx::mbar_arrive(k_empty + s); },  // K_j is read
                [&] {
                    if (j > 0) ptx::mbar_arrive(v_empty + ((j - 1) & 1));  // V_{j-1} is read
                });
        };
        if (j + 1 == tiles && short_last)
            tile_step(std::integral_constant<int, BK / 2>{});
        else
            tile_step(std::integral_constant<int, BK>{});
    }
    if (tiles > 0) {  // the last tile's P V
        const int s = (tiles - 1) & 1;
        ptx::mbar_wait(v_full + s, ((tiles - 1) >> 1) & 1);
        final_pv<DH, BK>(o, pa, Vs + s * TILE, short_last);
    }
    store_out<DH>(o, l_run, m_run, rows, Nq, H, h, b, t, out, lse);
#else
    __trap();
#endif
}

}  // namespace

#define WGMMA_FWD_WS(DH)                                                                                          \
    extern "C" __global__ void __launch_bounds__(384, 1) attn_fwd_wgmma_ws_d##DH##_bf16(                           \
        const SYNTHOS_GRID_CONSTANT ptx::TmaMap q_map, const SYNTHOS_GRID_CONSTANT ptx::TmaMap k_map,              \
        const SYNTHOS_GRID_CONSTANT ptx::TmaMap v_map, const float* key_mask, const float* bias, bf16* out,        \
        float* lse, int Nq, int Nk, int H, int bias_batch, int has_mask, int causal, float scale) {               \
        attn_fwd_wgmma_ws<DH>(&q_map, &k_map, &v_map, key_mask, bias, out, lse, Nq, Nk, H, bias_batch, has_mask,   \
                              causal, scale);                                                                     \
    }
WGMMA_FWD_WS(64)
WGMMA_FWD_WS(128)

// ---- Backward -----------------------------------------------------------------------------
// attn_bwd_wgmma_d<Dh>_bf16 (Dh 64 or 128): the inputs and outputs of attn_bwd_mma_d<Dh>_bf16
// in attention_mma.cu (D from attn_bwd_dot first; dq and dbias accumulated in fp32 with
// atomics). Grid (ceil(Nk / 128), H, B), 256 threads = two warpgroups. The block owns 128
// keys, warpgroup wg the 64 keys 64wg.. and, within it, warp w the 16 keys 16w.. of each
// product, with dK and dV (64 x Dh fp32 per warpgroup, Dh/2 registers each) in registers.
// K and V stay in shared memory; the block walks the queries in tiles of 64 (causal: from
// the first tile that sees its keys), Q and dO through cp.async two stages deep, in the
// 128-byte-swizzle layout of the forward. Per tile, each warpgroup:
//   S^T = K_wg Q^T and dP^T = V_wg dO^T (64 keys x 64 queries, 32 registers each): Dh/16
//     wgmma each, both operands K-major from shared memory;
//   P^T = exp(S^T - L) and dS^T = P^T (dP^T - D) on the registers (L, D per query from
//     shared memory), dbias += dS with fp32 atomics when asked;
//   dV += P^T dO and dK += dS^T Q: P^T and dS^T packed from the registers as A operands,
//     dO and Q N-major from shared memory (their head dims are contiguous);
//   dS^T (bf16) to shared memory, 128-byte rows per key (swizzled); after a barrier,
//     dQ (64 queries x 64 dims, 32 registers) = dS K with dS^T read M-major as A and K's
//     tile N-major as B, added to the fp32 dq buffer with 8-byte vector atomics (two head
//     dims each; sm_90 has them, sm_80 does not): at Dh 128 warpgroup wg
//     takes head dims 64wg.. over all 128 keys, at Dh 64 every head dim over its own 64
//     keys (each dq element then gets two adds per block).
// attn_bwd_dkdv_wgmma_d<Dh>_bf16: the same without dQ and dbias (the deterministic
// backward's dK/dV kernel; attn_bwd_dq_wgmma below then computes dq without atomics).
// Shared memory (dynamic): K, V 128 rows, Q, dO 2 stages x 64 rows, Dh bf16 each, dS^T
//   128 x 64 bf16, L and D 2 x 64 fp32 each, and 1024 bytes to align the tiles:
//   1024 Dh + 18432 bytes (Dh 64: 83968, 128: 149504).
namespace {

template <int DH>
struct WgBwd {
    static constexpr int THREADS = 256;
    static constexpr int BK = 128;  // keys per block
    static constexpr int BQ = 64;   // queries per tile
    static constexpr int K = 0;     // byte offsets from the aligned base
    static constexpr int V = K + BK * DH * 2;
    static constexpr int Q = V + BK * DH * 2;
    static constexpr int DO = Q + 2 * BQ * DH * 2;
    static constexpr int DST = DO + 2 * BQ * DH * 2;
    static constexpr int LSE = DST + BK * BQ * 2;
    static constexpr int DROW = LSE + 2 * BQ * 4;
    static constexpr int BYTES = DROW + 2 * BQ * 4 + 1024;  // + the alignment slack
    static_assert(DH == 64 || DH == 128, "head dim 64 or 128");
    static_assert(V % 1024 == 0 && Q % 1024 == 0 && DO % 1024 == 0 && DST % 1024 == 0 && BQ * DH * 2 % 1024 == 0,
                  "every swizzled tile starts on a 1024-byte boundary");
    // The host computes the same size (cuda/attention.rs, wgmma_bwd_smem_bytes).
    static_assert(BYTES == 1024 * DH + 18432, "shared-memory size changed: update the host");
};

template <int DH, bool WITH_DQ>
__device__ __forceinline__ void attn_bwd_wgmma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                               const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                               const float* __restrict__ lse, const float* __restrict__ drow,
                                               const float* __restrict__ key_mask, const float* __restrict__ bias,
                                               float* __restrict__ dq_acc, bf16* __restrict__ dk,
                                               bf16* __restrict__ dv, float* __restrict__ dbias, int Nq, int Nk,
                                               int H, int bias_batch, int has_mask, int causal, int want_dbias,
                                               float scale) {
#if defined(SYNTHOS_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using L = WgBwd<DH>;
    constexpr int BK = L::BK, BQ = L::BQ, DT = DH / 8, NT = BQ / 8, QS = BQ / 16;
    unsigned char* smem = ptx::align_1024(dynamic_smem_at_least<L::BYTES>());
    unsigned char* Ks = smem + L::K;
    unsigned char* Vs = smem + L::V;
    unsigned char* Qs = smem + L::Q;
    unsigned char* dOs = smem + L::DO;
    unsigned char* dSt = smem + L::DST;
    float* Ls = reinterpret_cast<float*>(smem + L::LSE);
    float* Ds = reinterpret_cast<float*>(smem + L::DROW);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp within it
    const int g = lane >> 2, t = lane & 3;
    const int k0 = blockIdx.x * BK;
    const int h = blockIdx.y;
    const int64_t b = blockIdx.z;
    const int64_t bias_base = bias_batch > 0 ? ((bias_batch == 1 ? 0 : b) * H + h) * (int64_t)Nq * Nk : 0;
    // Keys of this lane's S^T elements (rows g and g+8 of its warp's 16: e = 0, 1 -> keys[0];
    // e = 2, 3 -> keys[1]), and whether each takes part at all.
    int keys[2];
    bool key_on[2];
    flash::bwd_keys(k0 + wg * 64 + wq * 16, g, Nk, has_mask, key_mask, b, keys, key_on);
    // dQ's 16-key slices: all 128 keys at Dh 128 (head dims split between the warpgroups),
    // the warpgroup's own 64 at Dh 64. Keys past Nk add zeros (K's rows there are
    // zero-filled, dS^T's rows are 0). Every warpgroup runs every product, even one whose
    // keys all lie past Nk: ptxas serialises every wgmma of a kernel that issues them under
    // a run-time condition (C7518, C7514), which costs far more than the idle products of
    // a last block.
    constexpr int DQ_SLICES = DH == 128 ? 8 : 4;
    const int dq_first = DH == 128 ? 0 : wg * 4;
    const int dq_panel = DH == 128 ? wg : 0;

    const int q_begin = causal ? (k0 / BQ) * BQ : 0;
    const int tiles = Nq > q_begin ? (Nq - q_begin + BQ - 1) / BQ : 0;
    issue_tile_sw128<DH, BK, L::THREADS>(Ks, k, b, k0, Nk, H, h);
    issue_tile_sw128<DH, BK, L::THREADS>(Vs, v, b, k0, Nk, H, h);
    if (tiles > 0) {
        issue_tile_sw128<DH, BQ, L::THREADS>(Qs, q, b, q_begin, Nq, H, h);
        issue_tile_sw128<DH, BQ, L::THREADS>(dOs, dout, b, q_begin, Nq, H, h);
    }
    ptx::cp_async_commit();

    float dk_acc[DH / 2], dv_acc[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; ++i) dk_acc[i] = dv_acc[i] = 0.f;
    // This warpgroup's 64 rows of K and V: panel kk / 4, 32 bytes per 16 head dims within it.
    unsigned char* k_rows = Ks + wg * 64 * 128;
    unsigned char* v_rows = Vs + wg * 64 * 128;

    for (int j = 0; j < tiles; ++j) {
        const int stage = j & 1, q0 = q_begin + j * BQ;
        flash::prefetch_next(j, tiles, [&] {  // (the other stage's readers passed tile j-1's waits)
            issue_tile_sw128<DH, BQ, L::THREADS>(Qs + (stage ^ 1) * BQ * DH * 2, q, b, q0 + BQ, Nq, H, h);
            issue_tile_sw128<DH, BQ, L::THREADS>(dOs + (stage ^ 1) * BQ * DH * 2, dout, b, q0 + BQ, Nq, H, h);
        });
        flash::bwd_stats<BQ>(Ls + stage * BQ, Ds + stage * BQ, lse, drow, b, H, h, Nq, q0);
        ptx::fence_proxy_async();  // this thread's copies, visible to the tensor cores
        __syncthreads();           // ... and every other thread's: tile j (and K, V) is in place
        unsigned char* Qt = Qs + stage * BQ * DH * 2;
        unsigned char* dOt = dOs + stage * BQ * DH * 2;
        const float* Lt = Ls + stage * BQ;
        const float* Dt = Ds + stage * BQ;

        // S^T = K_wg Q^T, dP^T = V_wg dO^T over Dh in slices of 16, all K-major: 8-row
        // groups 1024 bytes apart (SBO). Two groups, so that P^T is computed while dP^T's
        // products run, and dS^T while dV's do.
        float s[BQ / 2], dp[BQ / 2];
        uint32_t pa[QS][4], da[QS][4];  // P^T and dS^T as A operands, 16 queries each
        auto& s4 = reinterpret_cast<float(&)[NT][4]>(s);
        auto& dp4 = reinterpret_cast<float(&)[NT][4]>(dp);
        s_and_dp<DH, BQ, BK, BQ>(s, k_rows, Qt, dp, v_rows, dOt);

        // P^T in place of S^T (element e of 8-query tile n: key keys[e / 2], query
        // q0 + 8n + 2t + e % 2), then dV += P^T dO over the tile's queries in slices of 16:
        // dO N-major, 64-column panels LBO = BQ·128 apart, 8-query groups 1024 bytes apart.
        flash::bwd_p<NT>(s4, keys, key_on, q0, t, Nq, Nk, causal, bias, bias_batch, bias_base, Lt, scale);
        pack_p<BQ>(s, pa);
        ptx::wgmma_fence_operand(dv_acc);
        ptx::wgmma_fence();
        issue_pv<DH, BQ, BQ>(dv_acc, pa, dOt);
        ptx::wgmma_commit();
        ptx::wgmma_wait<1>();  // dP^T (dV's products may still run)
        ptx::wgmma_fence_operand(dp);

        // dS^T in place of dP^T, then dK += dS^T Q (Q N-major as dO above).
        flash::bwd_ds<NT>(s4, dp4, keys, q0, t, Nk, bias_base, Dt, WITH_DQ && want_dbias ? dbias : nullptr);
        pack_p<BQ>(dp, da);
        if constexpr (WITH_DQ) {
            // dS^T to shared memory (bf16, as the products use it): key row 128 bytes, the
            // 16-byte chunk of queries 8n.. at chunk n ^ (row % 8). Stored from da before the
            // dK products that take da are issued: their A registers may not be accessed
            // while they run.
            const int row0 = wg * 64 + wq * 16 + g;
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = row0 + 8 * r;
                    *reinterpret_cast<uint32_t*>(dSt + row * 128 + ((n ^ (row & 7)) * 16) + 4 * t) =
                        da[n / 2][2 * (n % 2) + r];  // (dS^T's row g + 8r, queries 8n + 2t, +1)
                }
            ptx::fence_proxy_async();  // the stores, visible to the tensor cores
        }
        ptx::wgmma_fence_operand(dk_acc);
        ptx::wgmma_fence();
        issue_pv<DH, BQ, BQ>(dk_acc, da, Qt);
        ptx::wgmma_commit();
        // Tile j's Q and dO are read before the barrier below (the next tile's copies
        // may refill this stage as soon as every thread has passed it).
        ptx::wgmma_wait<0>();
        ptx::wgmma_fence_operand(dv_acc);
        ptx::wgmma_fence_operand(dk_acc);
        ptx::wgmma_fence_operand(pa);
        ptx::wgmma_fence_operand(da);
        __syncthreads();  // dS^T of all 128 keys is in shared memory; this stage is read
        if constexpr (WITH_DQ) {
            // dQ (64 x 64) = dS K over the slices: A = dS^T read M-major (the 64 queries of
            // a key row contiguous; 8-key groups 1024 bytes apart), B = K's panel
            // dq_panel N-major (8-key groups 1024 bytes apart).
            float dqa[32];
            ptx::wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < DQ_SLICES; ++ks) {
                const int kk = dq_first + ks;
                ptx::wgmma_ss<64, 1, 1>(dqa, ptx::wgmma_desc_sw128(dSt + kk * 16 * 128, BQ * 128, 1024),
                                        ptx::wgmma_desc_sw128(Ks + dq_panel * BK * 128 + kk * 16 * 128, BK * 128,
                                                              1024),
                                        ks > 0);
            }
            ptx::wgmma_commit();
            ptx::wgmma_wait<0>();
            ptx::wgmma_fence_operand(dqa);
            // Element e of 8-dim tile n: query q0 + 16wq + g + 8(e/2), head dim
            // 64 dq_panel + 8n + 2t + e%2.
#pragma unroll
            for (int e2 = 0; e2 < 2; ++e2) {
                const int i = q0 + wq * 16 + g + 8 * e2;
                if (i >= Nq) continue;
                float* row = dq_acc + ((b * Nq + i) * H + h) * (int64_t)DH + dq_panel * 64 + 2 * t;
                // One 8-byte vector atomic per pair of head dims (sm_90): half the
                // atomic operations of two scalar adds.
#pragma unroll
                for (int n = 0; n < 8; ++n)
                    atomicAdd(reinterpret_cast<float2*>(row + 8 * n),
                              make_float2(scale * dqa[4 * n + 2 * e2], scale * dqa[4 * n + 2 * e2 + 1]));
            }
        }
        // No barrier here: the next tile's copies and L, D go to the other stage, whose
        // readers all passed the barrier above, and dS^T is rewritten only after the
        // barrier at the top of the loop, which every thread reaches after its dQ wait.
    }
    if (tiles == 0) ptx::cp_async_wait<0>();  // (K and V; no query sees these keys)

    // Zeros for keys no query sees.
    flash::bwd_store_kv<DH>(reinterpret_cast<const float(&)[DT][4]>(dk_acc),
                            reinterpret_cast<const float(&)[DT][4]>(dv_acc), keys, Nk, b, H, h, t, scale, dk, dv);
#else
    __trap();
#endif
}

// attn_bwd_dq_wgmma_d<Dh>_bf16: the deterministic backward's dq kernel (the inputs and
// outputs of attn_bwd_dq_mma_d<Dh>_bf16: dq in bf16 and dbias per batch element, plain
// stores, no atomics), beside attn_bwd_dkdv_wgmma. Grid (ceil(Nq / 128), H, B), 256
// threads: warpgroup wg owns query rows 64wg.. of the block's 128, warp w of it the 16
// rows 16w.., with dQ (64 x Dh fp32, Dh/2 registers) in registers. It walks the keys in
// tiles of 64 (K, V through cp.async, two stages deep; causal: up to its last row) and
// recomputes, per tile, S = Q K^T and dP = dO V^T (64 x 64 each: Q, dO and K, V from
// shared memory, all K-major), P = exp(S - L) and dS = P (dP - D) on the registers, then
// dQ += dS K (dS packed from the registers as the A operand, K N-major). Every dq and
// dbias element has one writer and one summation order: bit-identical run to run.
// Shared memory (dynamic): Q, dO 128 rows, K, V 2 stages x 64 rows, Dh bf16 each, and
//   1024 bytes to align the tiles: 1024 Dh + 1024 bytes (Dh 64: 66560, 128: 132096).
template <int DH>
struct WgDq {
    static constexpr int THREADS = 256;
    static constexpr int BQ = 128;  // query rows per block
    static constexpr int BK = 64;   // keys per tile
    static constexpr int Q = 0;     // byte offsets from the aligned base
    static constexpr int DO = Q + BQ * DH * 2;
    static constexpr int K = DO + BQ * DH * 2;
    static constexpr int V = K + 2 * BK * DH * 2;
    static constexpr int BYTES = V + 2 * BK * DH * 2 + 1024;  // + the alignment slack
    static_assert(DH == 64 || DH == 128, "head dim 64 or 128");
    static_assert(DO % 1024 == 0 && K % 1024 == 0 && V % 1024 == 0 && BK * DH * 2 % 1024 == 0,
                  "every swizzled tile starts on a 1024-byte boundary");
    // The host computes the same size (cuda/attention.rs, wgmma_dq_smem_bytes).
    static_assert(BYTES == 1024 * DH + 1024, "shared-memory size changed: update the host");
};

template <int DH>
__device__ __forceinline__ void attn_bwd_dq_wgmma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                  const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                                  const float* __restrict__ lse, const float* __restrict__ drow,
                                                  const float* __restrict__ key_mask, const float* __restrict__ bias,
                                                  bf16* __restrict__ dq, float* __restrict__ dbias, int Nq, int Nk,
                                                  int H, int bias_batch, int has_mask, int causal, int want_dbias,
                                                  float scale) {
#if defined(SYNTHOS_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using L = WgDq<DH>;
    constexpr int BQ = L::BQ, BK = L::BK, DT = DH / 8, NT = BK / 8;
    unsigned char* smem = ptx::align_1024(dynamic_smem_at_least<L::BYTES>());
    unsigned char* Qs = smem + L::Q;
    unsigned char* dOs = smem + L::DO;
    unsigned char* Ks = smem + L::K;
    unsigned char* Vs = smem + L::V;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp within it
    const int g = lane >> 2, t = lane & 3;
    const int q0 = blockIdx.x * BQ;
    const int h = blockIdx.y;
    const int64_t b = blockIdx.z;
    // Query rows of this lane's S, dP and dQ elements: e = 0, 1 -> rows[0]; e = 2, 3 -> rows[1].
    const int rows[2] = {q0 + wg * 64 + wq * 16 + g, q0 + wg * 64 + wq * 16 + g + 8};
    float lrow[2], drw[2];  // L (base 2) and D of this lane's two rows
    const float* brow[2];
    float* dbrow[2];
    flash::bwd_row_setup(rows, lse, drow, bias, bias_batch, dbias, want_dbias, b, H, h, Nq, Nk, lrow, drw, brow,
                         dbrow);

    const int k_end = causal ? min(Nk, q0 + BQ) : Nk;
    const int tiles = (k_end + BK - 1) / BK;
    issue_tile_sw128<DH, BQ, L::THREADS>(Qs, q, b, q0, Nq, H, h);
    issue_tile_sw128<DH, BQ, L::THREADS>(dOs, dout, b, q0, Nq, H, h);
    if (tiles > 0) {
        issue_tile_sw128<DH, BK, L::THREADS>(Ks, k, b, 0, Nk, H, h);
        issue_tile_sw128<DH, BK, L::THREADS>(Vs, v, b, 0, Nk, H, h);
    }
    ptx::cp_async_commit();

    float acc[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; ++i) acc[i] = 0.f;
    // This warpgroup's 64 rows of Q and dO: panel kk / 4, 32 bytes per 16 head dims within it.
    unsigned char* q_rows = Qs + wg * 64 * 128;
    unsigned char* o_rows = dOs + wg * 64 * 128;

    for (int j = 0; j < tiles; ++j) {
        const int stage = j & 1, k0 = j * BK;
        flash::prefetch_next(j, tiles, [&] {
            issue_tile_sw128<DH, BK, L::THREADS>(Ks + (stage ^ 1) * BK * DH * 2, k, b, k0 + BK, Nk, H, h);
            issue_tile_sw128<DH, BK, L::THREADS>(Vs + (stage ^ 1) * BK * DH * 2, v, b, k0 + BK, Nk, H, h);
        });
        ptx::fence_proxy_async();  // this thread's copies, visible to the tensor cores
        __syncthreads();           // ... and every other thread's: tile j (and Q, dO) is in place
        unsigned char* Kt = Ks + stage * BK * DH * 2;
        unsigned char* Vt = Vs + stage * BK * DH * 2;

        // S = Q K^T and dP = dO V^T over Dh in slices of 16, all K-major: 8-row groups
        // 1024 bytes apart (SBO). Two groups, so that P is computed while dP's products run.
        float s[BK / 2], dp[BK / 2];
        auto& s4 = reinterpret_cast<float(&)[NT][4]>(s);
        auto& dp4 = reinterpret_cast<float(&)[NT][4]>(dp);
        s_and_dp<DH, BK, BQ, BK>(s, q_rows, Kt, dp, o_rows, Vt);
        flash::bwd_p_rows<NT>(s4, rows, k0, t, Nq, Nk, causal, has_mask, key_mask, b, brow, lrow, scale);
        ptx::wgmma_wait<0>();  // dP
        ptx::wgmma_fence_operand(dp);

        // dS = P (dP - D) in place of dP (and into dbias).
        flash::bwd_ds_rows<NT>(s4, dp4, k0, t, Nk, dbrow, drw);

        // dQ += dS K over the tile's keys in slices of 16: dS's A operand packed from two
        // adjacent 8-key tiles, K N-major (64-column panels LBO = BK·128 apart, 8-key groups
        // 1024 bytes apart).
        uint32_t da[BK / 16][4];
        pack_p<BK>(dp, da);
        pv_now<DH, BK, BK>(acc, da, Kt);
        ptx::wgmma_fence_operand(da);
        __syncthreads();  // every warpgroup is done with this stage before it is refilled
    }
    if (tiles == 0) ptx::cp_async_wait<0>();  // (Q's and dO's copies; no key is visible to the block)

    // Rows with no visible key keep dq = 0 (every dS was 0) and their dbias row untouched
    // by the loop beyond the tiles walked: the rest of it is written here.
    flash::bwd_store_dq<DH>(reinterpret_cast<const float(&)[DT][4]>(acc), rows, dbrow, tiles * BK, Nq, Nk, b, H, h,
                            t, scale, dq);
#else
    __trap();
#endif
}

}  // namespace

FLASH_BWD_ENTRIES(wgmma, 64, 256, 1)
FLASH_BWD_ENTRIES(wgmma, 128, 256, 1)
