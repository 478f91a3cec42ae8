// Attention forward and backward on mma.sync tensor-core instructions (FlashAttention-2
// style), successors of attn_fwd and attn_bwd in attention.cu: the same math, inputs,
// outputs and conventions (see the top of attention.cu), with the score and probability
// tiles kept in registers.
//
// attn_fwd_mma_w<W>_d<Dh>_bf16: grid (ceil(Nq / 16W), H, B), 32W threads = W warps.
//   The block owns 16W query rows, warp w the 16 rows 16w..16w+15. The block walks the
//   keys in tiles of 64 (causal: only up to its last row). K and V tiles go to shared
//   memory through cp.async, two stages deep: tile j+1 is in flight while tile j is used.
//   Per tile, each warp:
//     S (16 x 64, fp32, 32 registers per lane) = Q K^T with mma m16n8k16: Q's A
//       operands stay in registers for the whole kernel (ldmatrix once), K's B operands
//       come from ldmatrix on K's rows (a key row is a column of K^T);
//     scale, bias, masks and the online softmax on S's registers: a lane holds 16
//       elements of rows g and g+8 (g = lane / 4), so row maxima need two shuffles
//       within the 4 lanes of a group; the running sum stays per lane until the end;
//     O (16 x Dh, fp32 registers) = alpha O + P V, with P's A operands packed straight
//       from S's registers (the mma C layout of two adjacent 8-column tiles is the A
//       layout of one 16-column tile) and V's B operands from ldmatrix.trans on V's rows.
//   Out-of-range keys and query rows are zero-filled by cp.async and masked to -inf.
//
// Shared memory (dynamic): Q 16W x (Dh+8), K and V 2 stages x 64 x (Dh+8) bf16
//   = (16W + 256)(Dh + 8) x 2 bytes; rows padded by 16 bytes so that the 8 row addresses
//   of an ldmatrix fall on distinct banks. W = 4: Dh 128 -> 87040 bytes.
// Head dims: 32, 64, 80, 96, 128 (multiples of 16). Warps per block: 4 (64-row tiles,
// every head dim) and 8 (128-row tiles, Dh 64 and 128).
#include "flash.cuh"
#include "ptx.cuh"

namespace {

// Forward layout: W warps, each owning MT tiles of 16 query rows (16 MT W rows a block),
// keys in tiles of BK.
template <int DH, int W, int MT, int BK>
struct MmaFwd {
    static constexpr int THREADS = 32 * W;
    static constexpr int BQ = 16 * MT * W;  // query rows per block
    static constexpr int LD = DH + 8;       // row stride (bf16) of every tile
    static constexpr int Q = 0;             // byte offsets
    static constexpr int K = Q + BQ * LD * 2;
    static constexpr int V = K + 2 * BK * LD * 2;
    static constexpr int BYTES = V + 2 * BK * LD * 2;
    static_assert(DH % 16 == 0 && BK % 16 == 0, "head dim and key tile must be multiples of 16");
    // The host computes the same size (cuda/attention.rs, mma_fwd_smem_bytes).
    static_assert(BYTES == (BQ + 4 * BK) * (DH + 8) * 2, "shared-memory size changed: update the host");
};

// Issues cp.async copies of tokens row0 .. row0+ROWS-1 of head h, batch b of a
// [B, N, H, DH] bf16 tensor into shared memory (row stride LD), zeros for tokens >= N.
template <int DH, int ROWS, int LD, int THREADS>
__device__ __forceinline__ void issue_tile(bf16* dst, const bf16* __restrict__ src, int64_t b, int row0, int N,
                                           int H, int h) {
    constexpr int VPR = DH / 8;  // 16-byte vectors per row
#pragma unroll 2
    for (int idx = threadIdx.x; idx < ROWS * VPR; idx += THREADS) {
        const int r = idx / VPR, c = (idx % VPR) * 8;
        const int n = row0 + r;
        const bool in_range = n < N;
        const bf16* from = src + ((b * N + (in_range ? n : 0)) * H + h) * (int64_t)DH + c;
        ptx::cp_async_16(dst + r * LD + c, from, in_range);
    }
}

template <int DH, int W, int MT, int BK>
__device__ __forceinline__ void attn_fwd_mma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                             const bf16* __restrict__ v, const float* __restrict__ key_mask,
                                             const float* __restrict__ bias, bf16* __restrict__ out,
                                             float* __restrict__ lse, int Nq, int Nk, int H, int bias_batch,
                                             int has_mask, int causal, float scale) {
    using L = MmaFwd<DH, W, MT, BK>;
    constexpr int LD = L::LD, KD = DH / 16, NT = BK / 8, DT = DH / 8;
    // One 16-row tile per warp keeps Q's A operands in registers; with two, they are
    // re-read from shared memory per key tile (registers go to the second O and S).
    constexpr bool Q_IN_REGS = MT == 1;
    unsigned char* smem = dynamic_smem_at_least<L::BYTES>();
    bf16* Qs = reinterpret_cast<bf16*>(smem + L::Q);
    bf16* Ks = reinterpret_cast<bf16*>(smem + L::K);
    bf16* Vs = reinterpret_cast<bf16*>(smem + L::V);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;    // mma group and thread within the group
    const int lm = lane >> 3, lr = lane & 7;  // ldmatrix: matrix and row this lane addresses
    const int q0 = blockIdx.x * L::BQ;
    const int h = blockIdx.y;
    const int64_t b = blockIdx.z;
    // Query rows of this lane's S and O elements: tile mt, e = 0, 1 -> rows[mt][0];
    // e = 2, 3 -> rows[mt][1]. The warp's tiles are rows 16 (MT warp + mt) ...
    int rows[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        rows[mt][0] = q0 + (MT * warp + mt) * 16 + g;
        rows[mt][1] = rows[mt][0] + 8;
    }

    const int k_end = causal ? min(Nk, q0 + L::BQ) : Nk;
    const int tiles = (k_end + BK - 1) / BK;

    issue_tile<DH, L::BQ, LD, L::THREADS>(Qs, q, b, q0, Nq, H, h);
    if (tiles > 0) {
        issue_tile<DH, BK, LD, L::THREADS>(Ks, k, b, 0, Nk, H, h);
        issue_tile<DH, BK, LD, L::THREADS>(Vs, v, b, 0, Nk, H, h);
    }
    ptx::cp_async_commit();

    const float* brow[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            brow[mt][r] = flash::bias_row(bias, bias_batch, b, H, h, Nq, Nk, rows[mt][r]);

    uint32_t qf[Q_IN_REGS ? KD : 1][4];  // MT = 1: the warp's 16 query rows as A operands
    float o[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int d = 0; d < DT; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.f;
    float m_run[MT][2], l_run[MT][2];  // running max of S log2 e and this lane's part of the sum
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m_run[mt][0] = m_run[mt][1] = -INFINITY;
        l_run[mt][0] = l_run[mt][1] = 0.f;
    }

    for (int j = 0; j < tiles; ++j) {
        const int stage = j & 1, k0 = j * BK;
        flash::prefetch_next(j, tiles, [&] {
            issue_tile<DH, BK, LD, L::THREADS>(Ks + (stage ^ 1) * BK * LD, k, b, k0 + BK, Nk, H, h);
            issue_tile<DH, BK, LD, L::THREADS>(Vs + (stage ^ 1) * BK * LD, v, b, k0 + BK, Nk, H, h);
        });
        __syncthreads();  // tile j (and, the first time, Q) is in shared memory for every warp
        const bf16* Kt = Ks + stage * BK * LD;
        const bf16* Vt = Vs + stage * BK * LD;
        // Q's A operand of tile mt, head dims 16kk..: matrices rows +0/+8 (lm & 1), columns
        // +0/+8 (lm >> 1).
        const auto q_rows = [&](int mt, int kk) {
            return Qs + ((MT * warp + mt) * 16 + (lm & 1) * 8 + lr) * LD + kk * 16 + (lm >> 1) * 8;
        };
        if constexpr (Q_IN_REGS) {
            if (j == 0) {
#pragma unroll
                for (int kk = 0; kk < KD; ++kk) ptx::ldmatrix_x4(qf[kk], q_rows(0, kk));
            }
        }

        // S = Q K^T: two 8-key tiles per ldmatrix (matrices: keys +0/+8 (lm >> 1), dims +0/+8
        // (lm & 1)), each used by every row tile of the warp.
        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NT; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            uint32_t qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (Q_IN_REGS) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) qa[mt][i] = qf[kk][i];
                } else {
                    ptx::ldmatrix_x4(qa[mt], q_rows(mt, kk));
                }
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t kb[4];
                ptx::ldmatrix_x4(kb, Kt + (np * 16 + (lm >> 1) * 8 + lr) * LD + kk * 16 + (lm & 1) * 8);
                const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    ptx::mma_bf16_16816(s[mt][2 * np], qa[mt], b0);
                    ptx::mma_bf16_16816(s[mt][2 * np + 1], qa[mt], b1);
                }
            }
        }

#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float alpha[2];
            flash::softmax_tile<NT>(s[mt], rows[mt], k0, t, Nq, Nk, causal, has_mask, key_mask, b, brow[mt], scale, m_run[mt],
                                    l_run[mt], alpha);
#pragma unroll
            for (int d = 0; d < DT; ++d) {
                o[mt][d][0] *= alpha[0];
                o[mt][d][1] *= alpha[0];
                o[mt][d][2] *= alpha[1];
                o[mt][d][3] *= alpha[1];
            }
        }

        // O += P V: keys 16ks.. as the k dimension; V's matrices: keys +0/+8 (lm & 1),
        // dims +0/+8 (lm >> 1), transposed; each V operand serves every row tile.
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ptx::acc_to_a(s[mt][2 * ks], s[mt][2 * ks + 1], pa[mt]);
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                uint32_t vb[4];
                ptx::ldmatrix_x4_trans(vb, Vt + (ks * 16 + (lm & 1) * 8 + lr) * LD + dp * 16 + (lm >> 1) * 8);
                const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    ptx::mma_bf16_16816(o[mt][2 * dp], pa[mt], b0);
                    ptx::mma_bf16_16816(o[mt][2 * dp + 1], pa[mt], b1);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    if (tiles == 0) ptx::cp_async_wait<0>();  // (Q's copies; no key is visible to the block)

    // Normalise and store: a lane writes 2 consecutive dims of rows g and g+8 of each of
    // its row tiles per 8-dim tile.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = rows[mt][r];
            const float inv = flash::finish_row(l_run[mt][r], m_run[mt][r], i, Nq, t, lse + (b * H + h) * (int64_t)Nq + i);
            if (i >= Nq) continue;
            bf16* orow = out + ((b * Nq + i) * H + h) * (int64_t)DH + 2 * t;
#pragma unroll
            for (int d = 0; d < DT; ++d)
                *reinterpret_cast<__nv_bfloat162*>(orow + d * 8) =
                    __floats2bfloat162_rn(o[mt][d][2 * r] * inv, o[mt][d][2 * r + 1] * inv);
        }
    }
}

// ---- Backward -----------------------------------------------------------------------------
// attn_bwd_mma_d<Dh>_bf16: the same inputs, outputs and grid as attn_bwd_d<Dh>_bf16 in
// attention.cu (D from attn_bwd_dot first; dq and dbias accumulated in fp32 with atomics):
// grid (ceil(Nk/64), H, B), 128 threads. The block owns 64 keys, warp w the 16 keys
// 16w..16w+15, with dK and dV (16 x Dh each, fp32) in registers. K and V stay in shared
// memory; the block walks the queries in tiles of 32 (Q, dO through cp.async, two stages
// deep; causal: from the first tile that sees its keys). Per tile, each warp:
//   S^T = K_w Q^T and dP^T = V_w dO^T (16 x 32 each, registers; A from ldmatrix on K's
//     and V's rows, B from ldmatrix on Q's and dO's rows);
//   P^T = exp(S^T - L) and dS^T = P^T (dP^T - D) on the registers (L, D per query column
//     from shared memory), dbias += dS with fp32 atomics when asked;
//   dV += P^T dO and dK += dS^T Q, with P^T and dS^T repacked from registers as A
//     operands and dO, Q from ldmatrix.trans;
//   dS^T (bf16) to shared memory; after a barrier the 4 warps share dQ (32 x Dh) += dS K
//     over the block's 64 keys (A from ldmatrix.trans on dS^T, B from ldmatrix.trans on
//     K), one 16 x 16 piece at a time, added to the fp32 dq buffer with atomics
//     (8-byte vector atomics on sm_90 and in the emulation, scalar ones on sm_80).
// Shared memory: K, V 64 x (Dh+8), Q, dO 2 x 32 x (Dh+8) bf16, dS^T 64 x 40 bf16, L and D
//   2 x 32 fp32 each = 512 (Dh+8) + 5632 bytes (Dh 128: 75264).
constexpr int MMA_BWD_BK = 64;  // keys per block
constexpr int MMA_BWD_BQ = 32;  // queries per tile
constexpr int MMA_BWD_LDS = MMA_BWD_BQ + 8;  // row stride (bf16) of dS^T

template <int DH>
struct MmaBwd {
    static constexpr int LD = DH + 8;
    static constexpr int K = 0;
    static constexpr int V = K + MMA_BWD_BK * LD * 2;
    static constexpr int Q = V + MMA_BWD_BK * LD * 2;
    static constexpr int DO = Q + 2 * MMA_BWD_BQ * LD * 2;
    static constexpr int DST = DO + 2 * MMA_BWD_BQ * LD * 2;
    static constexpr int LSE = DST + MMA_BWD_BK * MMA_BWD_LDS * 2;
    static constexpr int DROW = LSE + 2 * MMA_BWD_BQ * 4;
    static constexpr int BYTES = DROW + 2 * MMA_BWD_BQ * 4;
    static_assert(DH % 16 == 0, "head dim must be a multiple of 16");
    // The host computes the same size (cuda/attention.rs, mma_bwd_smem_bytes).
    static_assert(BYTES == 512 * (DH + 8) + 5632, "shared-memory size changed: update the host");
};

template <int DH, bool WITH_DQ>
__device__ __forceinline__ void attn_bwd_mma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                             const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                             const float* __restrict__ lse, const float* __restrict__ drow,
                                             const float* __restrict__ key_mask, const float* __restrict__ bias,
                                             float* __restrict__ dq_acc, bf16* __restrict__ dk,
                                             bf16* __restrict__ dv, float* __restrict__ dbias, int Nq, int Nk,
                                             int H, int bias_batch, int has_mask, int causal, int want_dbias,
                                             float scale) {
    using L = MmaBwd<DH>;
    constexpr int LD = L::LD, KD = DH / 16, DT = DH / 8, NT = MMA_BWD_BQ / 8, THREADS = 128;
    unsigned char* smem = dynamic_smem_at_least<L::BYTES>();
    bf16* Ks = reinterpret_cast<bf16*>(smem + L::K);
    bf16* Vs = reinterpret_cast<bf16*>(smem + L::V);
    bf16* Qs = reinterpret_cast<bf16*>(smem + L::Q);
    bf16* dOs = reinterpret_cast<bf16*>(smem + L::DO);
    bf16* dSt = reinterpret_cast<bf16*>(smem + L::DST);
    float* Ls = reinterpret_cast<float*>(smem + L::LSE);
    float* Ds = reinterpret_cast<float*>(smem + L::DROW);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3, lm = lane >> 3, lr = lane & 7;
    const int k0 = blockIdx.x * MMA_BWD_BK;
    const int h = blockIdx.y;
    const int64_t b = blockIdx.z;
    const int kw = warp * 16;
    const int64_t bias_base = bias_batch > 0 ? ((bias_batch == 1 ? 0 : b) * H + h) * (int64_t)Nq * Nk : 0;
    // Keys of this lane's S^T elements (rows g and g+8 of the warp's 16) and whether
    // each takes part at all.
    int keys[2];
    bool key_on[2];
    flash::bwd_keys(k0 + kw, g, Nk, has_mask, key_mask, b, keys, key_on);

    const int q_begin = causal ? (k0 / MMA_BWD_BQ) * MMA_BWD_BQ : 0;
    const int tiles = Nq > q_begin ? (Nq - q_begin + MMA_BWD_BQ - 1) / MMA_BWD_BQ : 0;
    issue_tile<DH, MMA_BWD_BK, LD, THREADS>(Ks, k, b, k0, Nk, H, h);
    issue_tile<DH, MMA_BWD_BK, LD, THREADS>(Vs, v, b, k0, Nk, H, h);
    if (tiles > 0) {
        issue_tile<DH, MMA_BWD_BQ, LD, THREADS>(Qs, q, b, q_begin, Nq, H, h);
        issue_tile<DH, MMA_BWD_BQ, LD, THREADS>(dOs, dout, b, q_begin, Nq, H, h);
    }
    ptx::cp_async_commit();

    float dk_acc[DT][4], dv_acc[DT][4];
#pragma unroll
    for (int d = 0; d < DT; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[d][e] = dv_acc[d][e] = 0.f;

    for (int j = 0; j < tiles; ++j) {
        const int stage = j & 1, q0 = q_begin + j * MMA_BWD_BQ;
        flash::prefetch_next(j, tiles, [&] {
            const int off = (stage ^ 1) * MMA_BWD_BQ * LD;
            issue_tile<DH, MMA_BWD_BQ, LD, THREADS>(Qs + off, q, b, q0 + MMA_BWD_BQ, Nq, H, h);
            issue_tile<DH, MMA_BWD_BQ, LD, THREADS>(dOs + off, dout, b, q0 + MMA_BWD_BQ, Nq, H, h);
        });
        flash::bwd_stats<MMA_BWD_BQ>(Ls + stage * MMA_BWD_BQ, Ds + stage * MMA_BWD_BQ, lse, drow, b, H, h, Nq, q0);
        __syncthreads();  // tile j (and, the first time, K and V) is in shared memory
        const bf16* Qt = Qs + stage * MMA_BWD_BQ * LD;
        const bf16* dOt = dOs + stage * MMA_BWD_BQ * LD;
        const float* Lt = Ls + stage * MMA_BWD_BQ;
        const float* Dt = Ds + stage * MMA_BWD_BQ;

        // S^T = K_w Q^T, dP^T = V_w dO^T.
        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            uint32_t ka[4], va[4];
            ptx::ldmatrix_x4(ka, Ks + (kw + (lm & 1) * 8 + lr) * LD + kk * 16 + (lm >> 1) * 8);
            ptx::ldmatrix_x4(va, Vs + (kw + (lm & 1) * 8 + lr) * LD + kk * 16 + (lm >> 1) * 8);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t qb[4], ob[4];
                ptx::ldmatrix_x4(qb, Qt + (np * 16 + (lm >> 1) * 8 + lr) * LD + kk * 16 + (lm & 1) * 8);
                ptx::ldmatrix_x4(ob, dOt + (np * 16 + (lm >> 1) * 8 + lr) * LD + kk * 16 + (lm & 1) * 8);
                const uint32_t q0b[2] = {qb[0], qb[1]}, q1b[2] = {qb[2], qb[3]};
                const uint32_t o0b[2] = {ob[0], ob[1]}, o1b[2] = {ob[2], ob[3]};
                ptx::mma_bf16_16816(s[2 * np], ka, q0b);
                ptx::mma_bf16_16816(s[2 * np + 1], ka, q1b);
                ptx::mma_bf16_16816(dp[2 * np], va, o0b);
                ptx::mma_bf16_16816(dp[2 * np + 1], va, o1b);
            }
        }

        // P^T and dS^T in place of S^T and dP^T.
        flash::bwd_p<NT>(s, keys, key_on, q0, t, Nq, Nk, causal, bias, bias_batch, bias_base, Lt, scale);
        flash::bwd_ds<NT>(s, dp, keys, q0, t, Nk, bias_base, Dt, WITH_DQ && want_dbias ? dbias : nullptr);

        // dV += P^T dO, dK += dS^T Q (queries as the k dimension).
#pragma unroll
        for (int ks = 0; ks < MMA_BWD_BQ / 16; ++ks) {
            uint32_t pa[4];
            ptx::acc_to_a(s[2 * ks], s[2 * ks + 1], pa);
            uint32_t da[4];
            ptx::acc_to_a(dp[2 * ks], dp[2 * ks + 1], da);
#pragma unroll
            for (int dpi = 0; dpi < DT / 2; ++dpi) {
                uint32_t ob[4], qb[4];
                ptx::ldmatrix_x4_trans(ob, dOt + (ks * 16 + (lm & 1) * 8 + lr) * LD + dpi * 16 + (lm >> 1) * 8);
                ptx::ldmatrix_x4_trans(qb, Qt + (ks * 16 + (lm & 1) * 8 + lr) * LD + dpi * 16 + (lm >> 1) * 8);
                const uint32_t o0b[2] = {ob[0], ob[1]}, o1b[2] = {ob[2], ob[3]};
                const uint32_t q0b[2] = {qb[0], qb[1]}, q1b[2] = {qb[2], qb[3]};
                ptx::mma_bf16_16816(dv_acc[2 * dpi], pa, o0b);
                ptx::mma_bf16_16816(dv_acc[2 * dpi + 1], pa, o1b);
                ptx::mma_bf16_16816(dk_acc[2 * dpi], da, q0b);
                ptx::mma_bf16_16816(dk_acc[2 * dpi + 1], da, q1b);
            }
        }

        if (!WITH_DQ) {  // (dq and dbias come from attn_bwd_dq_mma)
            __syncthreads();  // every warp is done with this stage before it is refilled
            continue;
        }
        // dS^T to shared memory (bf16, as the products above used it).
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                *reinterpret_cast<uint32_t*>(dSt + (kw + g + 8 * r) * MMA_BWD_LDS + n * 8 + 2 * t) =
                    ptx::pack_bf16(dp[n][2 * r], dp[n][2 * r + 1]);
        __syncthreads();  // dS^T of all 64 keys is in shared memory

        // dQ (32 x Dh) += s dS K: piece (rb, f) is queries 16rb.., dims 16f...
        for (int unit = warp; unit < (MMA_BWD_BQ / 16) * KD; unit += 4) {
            const int rb = unit / KD, f = unit % KD;
            float acc[2][4] = {};
#pragma unroll
            for (int kk = 0; kk < MMA_BWD_BK / 16; ++kk) {
                uint32_t sa[4], kb[4];
                ptx::ldmatrix_x4_trans(sa, dSt + (kk * 16 + (lm >> 1) * 8 + lr) * MMA_BWD_LDS + rb * 16 + (lm & 1) * 8);
                ptx::ldmatrix_x4_trans(kb, Ks + (kk * 16 + (lm & 1) * 8 + lr) * LD + f * 16 + (lm >> 1) * 8);
                const uint32_t k0b[2] = {kb[0], kb[1]}, k1b[2] = {kb[2], kb[3]};
                ptx::mma_bf16_16816(acc[0], sa, k0b);
                ptx::mma_bf16_16816(acc[1], sa, k1b);
            }
#if defined(SYNTHOS_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
            // sm_90: one 8-byte vector atomic per pair of head dims (half the operations).
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = q0 + rb * 16 + g + 8 * r;
                if (i >= Nq) continue;
                float* row = dq_acc + ((b * Nq + i) * H + h) * (int64_t)DH + f * 16 + 2 * t;
                atomicAdd(reinterpret_cast<float2*>(row), make_float2(scale * acc[0][2 * r], scale * acc[0][2 * r + 1]));
                atomicAdd(reinterpret_cast<float2*>(row + 8),
                          make_float2(scale * acc[1][2 * r], scale * acc[1][2 * r + 1]));
            }
#else
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = q0 + rb * 16 + g + 8 * (e >> 1);
                if (i >= Nq) continue;
                float* row = dq_acc + ((b * Nq + i) * H + h) * (int64_t)DH + f * 16 + 2 * t + (e & 1);
                atomicAdd(row, scale * acc[0][e]);
                atomicAdd(row + 8, scale * acc[1][e]);
            }
#endif
        }
        // No barrier here: the next tile's copies and L, D go to the other stage, whose
        // last readers passed the dS^T barrier above, and dS^T is rewritten only after the
        // barrier at the top of the loop. (Without the dQ part that barrier is missing, so
        // the dK/dV-only kernel ends its tile with one; ThreadSanitizer reports the race
        // without it.)
    }
    if (tiles == 0) ptx::cp_async_wait<0>();  // (K and V; no query sees these keys)

    // Zeros for keys no query sees.
    flash::bwd_store_kv<DH>(dk_acc, dv_acc, keys, Nk, b, H, h, t, scale, dk, dv);
}

// attn_bwd_dq_mma_d<Dh>_bf16, the deterministic backward's second kernel: dq (bf16, plain
// stores) and dbias (fp32, plain stores into [B, H, Nq, Nk]; the host sums over the batch
// for a shared bias) without atomics, beside attn_bwd_dkdv_mma (attn_bwd_mma without its
// dq part). Grid (ceil(Nq/64), H, B), 128 threads: warp w owns query rows 16w..16w+15 of
// the block's 64, with Q's and dO's A operands and dQ (16 x Dh, fp32) in registers. It
// walks the keys in tiles of 32 (K, V through cp.async, two stages deep; causal: up to
// its last row) and recomputes, per tile, S = Q K^T and dP = dO V^T (B operands from
// ldmatrix on K's and V's rows), P = exp(S - L), dS = P (dP - D), then dQ += dS K (dS
// repacked from registers, K from ldmatrix.trans). Every dq and dbias element has one
// writer and one summation order: results are bit-identical run to run.
// Shared memory: Q, dO 64 x (Dh+8) (read once into registers), K, V 2 x 32 x (Dh+8) bf16
//   = 256 (Dh+8) x 2 bytes (Dh 128: 69632).
constexpr int MMA_DQ_BQ = 64;  // query rows per block
constexpr int MMA_DQ_BK = 32;  // keys per tile

template <int DH>
struct MmaDq {
    static constexpr int LD = DH + 8;
    static constexpr int Q = 0;
    static constexpr int DO = Q + MMA_DQ_BQ * LD * 2;
    static constexpr int K = DO + MMA_DQ_BQ * LD * 2;
    static constexpr int V = K + 2 * MMA_DQ_BK * LD * 2;
    static constexpr int BYTES = V + 2 * MMA_DQ_BK * LD * 2;
    // The host computes the same size (cuda/attention.rs, mma_dq_smem_bytes).
    static_assert(BYTES == 512 * (DH + 8), "shared-memory size changed: update the host");
};

template <int DH>
__device__ __forceinline__ void attn_bwd_dq_mma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                                const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                                const float* __restrict__ lse, const float* __restrict__ drow,
                                                const float* __restrict__ key_mask, const float* __restrict__ bias,
                                                bf16* __restrict__ dq, float* __restrict__ dbias, int Nq, int Nk,
                                                int H, int bias_batch, int has_mask, int causal, int want_dbias,
                                                float scale) {
    using L = MmaDq<DH>;
    constexpr int LD = L::LD, KD = DH / 16, DT = DH / 8, NT = MMA_DQ_BK / 8, THREADS = 128;
    unsigned char* smem = dynamic_smem_at_least<L::BYTES>();
    bf16* Qs = reinterpret_cast<bf16*>(smem + L::Q);
    bf16* dOs = reinterpret_cast<bf16*>(smem + L::DO);
    bf16* Ks = reinterpret_cast<bf16*>(smem + L::K);
    bf16* Vs = reinterpret_cast<bf16*>(smem + L::V);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3, lm = lane >> 3, lr = lane & 7;
    const int q0 = blockIdx.x * MMA_DQ_BQ;
    const int h = blockIdx.y;
    const int64_t b = blockIdx.z;
    const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    float lrow[2], drw[2];  // L (base 2) and D of this lane's two rows
    const float* brow[2];
    float* dbrow[2];
    flash::bwd_row_setup(rows, lse, drow, bias, bias_batch, dbias, want_dbias, b, H, h, Nq, Nk, lrow, drw, brow,
                         dbrow);

    const int k_end = causal ? min(Nk, q0 + MMA_DQ_BQ) : Nk;
    const int tiles = (k_end + MMA_DQ_BK - 1) / MMA_DQ_BK;
    issue_tile<DH, MMA_DQ_BQ, LD, THREADS>(Qs, q, b, q0, Nq, H, h);
    issue_tile<DH, MMA_DQ_BQ, LD, THREADS>(dOs, dout, b, q0, Nq, H, h);
    if (tiles > 0) {
        issue_tile<DH, MMA_DQ_BK, LD, THREADS>(Ks, k, b, 0, Nk, H, h);
        issue_tile<DH, MMA_DQ_BK, LD, THREADS>(Vs, v, b, 0, Nk, H, h);
    }
    ptx::cp_async_commit();

    uint32_t qf[KD][4], of[KD][4];
    float acc[DT][4];
#pragma unroll
    for (int d = 0; d < DT; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;

    for (int j = 0; j < tiles; ++j) {
        const int stage = j & 1, k0 = j * MMA_DQ_BK;
        flash::prefetch_next(j, tiles, [&] {
            const int off = (stage ^ 1) * MMA_DQ_BK * LD;
            issue_tile<DH, MMA_DQ_BK, LD, THREADS>(Ks + off, k, b, k0 + MMA_DQ_BK, Nk, H, h);
            issue_tile<DH, MMA_DQ_BK, LD, THREADS>(Vs + off, v, b, k0 + MMA_DQ_BK, Nk, H, h);
        });
        __syncthreads();  // tile j (and, the first time, Q and dO) is in shared memory
        const bf16* Kt = Ks + stage * MMA_DQ_BK * LD;
        const bf16* Vt = Vs + stage * MMA_DQ_BK * LD;
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                const int off = (warp * 16 + (lm & 1) * 8 + lr) * LD + kk * 16 + (lm >> 1) * 8;
                ptx::ldmatrix_x4(qf[kk], Qs + off);
                ptx::ldmatrix_x4(of[kk], dOs + off);
            }
        }

        // S = Q K^T and dP = dO V^T (16 x 32 each).
        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t kb[4], vb[4];
                const int off = (np * 16 + (lm >> 1) * 8 + lr) * LD + kk * 16 + (lm & 1) * 8;
                ptx::ldmatrix_x4(kb, Kt + off);
                ptx::ldmatrix_x4(vb, Vt + off);
                const uint32_t k0b[2] = {kb[0], kb[1]}, k1b[2] = {kb[2], kb[3]};
                const uint32_t v0b[2] = {vb[0], vb[1]}, v1b[2] = {vb[2], vb[3]};
                ptx::mma_bf16_16816(s[2 * np], qf[kk], k0b);
                ptx::mma_bf16_16816(s[2 * np + 1], qf[kk], k1b);
                ptx::mma_bf16_16816(dp[2 * np], of[kk], v0b);
                ptx::mma_bf16_16816(dp[2 * np + 1], of[kk], v1b);
            }
        }

        // dS = P (dP - D) in place of dP.
        flash::bwd_p_rows<NT>(s, rows, k0, t, Nq, Nk, causal, has_mask, key_mask, b, brow, lrow, scale);
        flash::bwd_ds_rows<NT>(s, dp, k0, t, Nk, dbrow, drw);

        // dQ += dS K: keys 16ks.. as the k dimension; K's matrices: keys +0/+8 (lm & 1),
        // dims +0/+8 (lm >> 1), transposed.
#pragma unroll
        for (int ks = 0; ks < MMA_DQ_BK / 16; ++ks) {
            uint32_t da[4];
            ptx::acc_to_a(dp[2 * ks], dp[2 * ks + 1], da);
#pragma unroll
            for (int dpi = 0; dpi < DT / 2; ++dpi) {
                uint32_t kb[4];
                ptx::ldmatrix_x4_trans(kb, Kt + (ks * 16 + (lm & 1) * 8 + lr) * LD + dpi * 16 + (lm >> 1) * 8);
                const uint32_t k0b[2] = {kb[0], kb[1]}, k1b[2] = {kb[2], kb[3]};
                ptx::mma_bf16_16816(acc[2 * dpi], da, k0b);
                ptx::mma_bf16_16816(acc[2 * dpi + 1], da, k1b);
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    if (tiles == 0) ptx::cp_async_wait<0>();

    // Rows with no visible key keep dq = 0 (every dS was 0) and their dbias row untouched
    // by the loop beyond the tiles walked: the rest of it is written here.
    flash::bwd_store_dq<DH>(acc, rows, dbrow, tiles * MMA_DQ_BK, Nq, Nk, b, H, h, t, scale, dq);
}

}  // namespace

// attn_fwd_mma_w<W>[_m<MT>]_d<DH>_bf16: W warps of MT 16-row tiles, key tiles of 64
// (MT = 1) or 32 (MT = 2, to leave registers for the second tile).
#define ATTN_MMA_FWD(NAME, W, MT, BK, DH)                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * W)                                                        \
        NAME(const bf16* q, const bf16* k, const bf16* v, const float* key_mask, const float* bias, bf16* out,   \
             float* lse, int Nq, int Nk, int H, int bias_batch, int has_mask, int causal, float scale) {        \
        attn_fwd_mma<DH, W, MT, BK>(q, k, v, key_mask, bias, out, lse, Nq, Nk, H, bias_batch, has_mask, causal, \
                                    scale);                                                                     \
    }

ATTN_MMA_FWD(attn_fwd_mma_w4_d32_bf16, 4, 1, 64, 32)
ATTN_MMA_FWD(attn_fwd_mma_w4_d64_bf16, 4, 1, 64, 64)
ATTN_MMA_FWD(attn_fwd_mma_w4_d80_bf16, 4, 1, 64, 80)
ATTN_MMA_FWD(attn_fwd_mma_w4_d96_bf16, 4, 1, 64, 96)
ATTN_MMA_FWD(attn_fwd_mma_w4_d128_bf16, 4, 1, 64, 128)
ATTN_MMA_FWD(attn_fwd_mma_w8_d64_bf16, 8, 1, 64, 64)
ATTN_MMA_FWD(attn_fwd_mma_w8_d128_bf16, 8, 1, 64, 128)
ATTN_MMA_FWD(attn_fwd_mma_w4_m2_d64_bf16, 4, 2, 32, 64)
ATTN_MMA_FWD(attn_fwd_mma_w4_m2_d128_bf16, 4, 2, 32, 128)

FLASH_BWD_ENTRIES(mma, 32, 128)
FLASH_BWD_ENTRIES(mma, 64, 128)
FLASH_BWD_ENTRIES(mma, 80, 128)
FLASH_BWD_ENTRIES(mma, 96, 128)
FLASH_BWD_ENTRIES(mma, 128, 128)
