// Attention, FlashAttention-2 style: forward and backward on tensor cores (WMMA, bf16 inputs,
// fp32 accumulators), never materialising the Nq x Nk score matrix.
//
// Math, per batch b and head h (s = softmax scale, bias optional):
//   S_ij = s * q_i.k_j + bias_ij, or -inf when key j is hidden from query i
//          (j >= Nk, key_mask[b, j] == 0, or causal and j > i)
//   L_i  = log sum_j exp(S_ij)            (+inf when every key of row i is hidden)
//   P_ij = exp(S_ij - L_i),   O_i = sum_j P_ij v_j     (a fully hidden row gives O_i = 0)
// Backward, given dO:
//   D_i   = sum_d dO_id O_id   (= sum_j P_ij dP_ij),     dP_ij = dO_i.v_j
//   dS_ij = P_ij (dP_ij - D_i)
//   dq_i  = s sum_j dS_ij k_j,   dk_j = s sum_i dS_ij q_i,   dv_j = sum_i P_ij dO_i,
//   dbias_ij = dS_ij (summed over b when the bias is shared by the batch).
// Softmax statistics are fp32 and kept in base 2 inside the kernels (t = S * log2 e, so
// exp(S - m) = exp2(t - m2)); L is stored in natural-log units.
//
// Layout: q, o, dO, dq are [B, Nq, H, Dh] and k, v, dk, dv are [B, Nk, H, Dh], row-major
// bf16 (what a linear layer produces): token n of head h in batch b starts at element
// ((b*N + n)*H + h)*Dh, and consecutive tokens of one head are H*Dh elements apart.
// L and D are [B, H, Nq] fp32; key_mask is [B, Nk] fp32; bias and dbias are
// [Bb, H, Nq, Nk] fp32 with Bb = 1 (shared by the batch) or B. dq is accumulated in an
// fp32 buffer (zeroed by the host, cast to bf16 afterwards); dbias likewise.
//
// Forward (attn_fwd_d<Dh>_bf16): grid (ceil(Nq/64), H, B), 128 threads = 4 warps.
//   The block owns 64 query rows, warp w the 16 rows 16w..16w+15. Q fragments stay in
//   registers; the block walks the keys in tiles of 64 (only up to its last row when
//   causal): K and V tiles go to shared memory; each warp computes its 16x64 scores with
//   WMMA into shared fp32, two lanes per row apply scale/bias/masks and the online
//   softmax (running max m, running sum l), write P as bf16, and the warp's O (16 x Dh,
//   fp32 accumulator fragments in registers) is rescaled by exp2(m_old - m_new) and
//   accumulates P V. Rescaling a fragment needs the row of each of its elements; the
//   fragment layout is opaque, so each warp loads a 16x16 matrix holding its row index
//   into an accumulator fragment once (row_of[t]) and reuses that map.
//   64x64 tiles give the tensor cores 16x64x64 of work per warp per shared-memory pass
//   and keep the score/probability scratch small; 4 warps keep one K/V tile shared.
// Backward (attn_bwd_dot_bf16, then attn_bwd_d<Dh>_bf16):
//   attn_bwd_dot: one warp per (b, i, h) row computes D_i.
//   attn_bwd: grid (ceil(Nk/64), H, B), 128 threads. The block owns 64 keys, warp w the
//   16 keys 16w..16w+15, with dK and dV (16 x Dh each) in accumulator fragments. It walks
//   the queries in tiles of 32 (causal: from the first tile that can see its keys):
//   each warp computes S^T = K Q^T and dP^T = V dO^T for its keys (16 x 32, WMMA into
//   shared fp32), then elementwise P^T = exp(S^T - L), dS^T = P^T (dP^T - D) (bf16 into
//   shared memory; dbias += dS with fp32 atomics when asked), then dV += P^T dO and
//   dK += dS^T Q. After a block barrier all 4 warps share the dQ tile (32 x Dh) = dS K
//   over the block's 64 keys and add it into the fp32 dq buffer with atomics.
//   Working with transposed scores lets each warp own whole key rows, so dK and dV never
//   leave registers; query tiles of 32 halve the score scratch so that two blocks fit
//   per SM on A100 for every head dim.
//
// Shared memory (bytes; dynamic, opted in above 48 KB by the host; the kernel traps if
// it was given less than it needs, so a host/kernel mismatch cannot corrupt memory):
//   forward:  3 tiles of 64 x (Dh+8) bf16 (Q, K, V) + 4 warps x 16 x 68 fp32 scores
//             + 4 x 16 x 72 bf16 probabilities + 64 key flags + 64 row factors
//             = 384 (Dh+8) + 27136:  Dh 32: 42496, 64: 54784, 80: 60928, 96: 67072, 128: 79360
//   backward: K, V 64 x (Dh+8) + Q, dO 32 x (Dh+8) bf16 + S^T, dP^T 64 x 36 fp32
//             + P^T, dS^T 64 x 40 bf16 + 4 x 16 x 16 fp32 staging + 64 key flags + L, D
//             = 384 (Dh+8) + 33280:  Dh 32: 48640, 64: 60928, 80: 67072, 96: 73216, 128: 85504
//   Row strides are padded (+8 bf16, +4 fp32) to spread shared-memory banks; every WMMA
//   pointer stays 32-byte aligned (rows start at multiples of 16 rows, columns at
//   multiples of 16 elements, and every region size is a multiple of 32 bytes).
//   Head dims: 32, 64, 80, 96, 128 (multiples of 16 for WMMA, of 8 for 16-byte loads).
#include "common.cuh"
#include <mma.h>

using namespace nvcuda;

namespace {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

constexpr int FWD_BQ = WARPS * 16;   // query rows per block: 16 per warp
constexpr int FWD_BK = 64;           // keys per step
constexpr int FWD_LDS = FWD_BK + 4;  // row stride (fp32) of a warp's score scratch
constexpr int FWD_LDP = FWD_BK + 8;  // row stride (bf16) of a warp's probabilities

constexpr int BWD_BK = WARPS * 16;   // keys per block: 16 per warp
constexpr int BWD_BQ = 32;           // queries per step
constexpr int BWD_LDT = BWD_BQ + 4;  // row stride (fp32) of S^T and dP^T (rows = keys)
constexpr int BWD_LDTP = BWD_BQ + 8; // row stride (bf16) of P^T and dS^T

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> FragAcol;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> FragB;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> FragBcol;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

// Byte offsets of the forward kernel's shared-memory regions (see the top comment).
template <int DH>
struct FwdSmem {
    static constexpr int LDQ = DH + 8;  // row stride (bf16) of the Q, K, V tiles
    static constexpr int Q = 0;
    static constexpr int K = Q + FWD_BQ * LDQ * 2;
    static constexpr int V = K + FWD_BK * LDQ * 2;
    static constexpr int S = V + FWD_BK * LDQ * 2;
    static constexpr int P = S + WARPS * 16 * FWD_LDS * 4;
    static constexpr int KEEP = P + WARPS * 16 * FWD_LDP * 2;
    static constexpr int ROWF = KEEP + FWD_BK * 4;
    static constexpr int BYTES = ROWF + WARPS * 16 * 4;
    static_assert(DH % 16 == 0, "head dim must be a multiple of 16");
    static_assert(K % 32 == 0 && V % 32 == 0 && S % 32 == 0 && P % 32 == 0 && KEEP % 32 == 0,
                  "WMMA needs 32-byte aligned regions");
    // The host computes the same size (cuda/attention.rs, fwd_smem_bytes).
    static_assert(BYTES == 384 * (DH + 8) + 27136, "forward shared-memory size changed: update the host");
};

// Byte offsets of the backward kernel's shared-memory regions (see the top comment).
template <int DH>
struct BwdSmem {
    static constexpr int LDQ = DH + 8;  // row stride (bf16) of the K, V, Q, dO tiles
    static constexpr int K = 0;
    static constexpr int V = K + BWD_BK * LDQ * 2;
    static constexpr int Q = V + BWD_BK * LDQ * 2;
    static constexpr int DO = Q + BWD_BQ * LDQ * 2;
    static constexpr int ST = DO + BWD_BQ * LDQ * 2;
    static constexpr int DPT = ST + BWD_BK * BWD_LDT * 4;
    static constexpr int PT = DPT + BWD_BK * BWD_LDT * 4;
    static constexpr int DST = PT + BWD_BK * BWD_LDTP * 2;
    static constexpr int STAGE = DST + BWD_BK * BWD_LDTP * 2;
    static constexpr int KEEP = STAGE + WARPS * 256 * 4;
    static constexpr int LSE = KEEP + BWD_BK * 4;
    static constexpr int DROW = LSE + BWD_BQ * 4;
    static constexpr int BYTES = DROW + BWD_BQ * 4;
    static_assert(DH % 16 == 0, "head dim must be a multiple of 16");
    static_assert(V % 32 == 0 && Q % 32 == 0 && DO % 32 == 0 && ST % 32 == 0 && DPT % 32 == 0 &&
                      PT % 32 == 0 && DST % 32 == 0 && STAGE % 32 == 0,
                  "WMMA needs 32-byte aligned regions");
    // The host computes the same size (cuda/attention.rs, bwd_smem_bytes).
    static_assert(BYTES == 384 * (DH + 8) + 33280, "backward shared-memory size changed: update the host");
};

// Copies tokens row0 .. row0+ROWS-1 of head h, batch b of a [B, N, H, DH] bf16 tensor into
// shared memory with row stride LD, zero-filling tokens >= N (so that out-of-range rows
// contribute exactly zero to every product). 16-byte vectors: DH is a multiple of 8, so
// every row start ((b*N + n)*H + h)*DH is 16-byte aligned, and so is r*LD (LD % 8 == 0).
template <int DH, int ROWS, int LD>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* __restrict__ src, int64_t b, int row0, int N,
                                          int H, int h) {
    constexpr int VPR = DH / 8;  // 16-byte vectors per row
    for (int idx = threadIdx.x; idx < ROWS * VPR; idx += THREADS) {
        const int r = idx / VPR;        // tile row
        const int c = (idx % VPR) * 8;  // first element of the vector within the row
        const int n = row0 + r;         // token
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (n < N) val = *reinterpret_cast<const uint4*>(src + ((b * N + n) * H + h) * (int64_t)DH + c);
        *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
    }
}

// 1.0 when key j of batch b takes part (j < Nk and, with a mask, key_mask[b, j] != 0).
__device__ __forceinline__ float key_flag(const float* __restrict__ key_mask, int has_mask, int64_t b, int j,
                                          int Nk) {
    if (j >= Nk) return 0.f;
    if (has_mask && key_mask[b * Nk + j] == 0.f) return 0.f;
    return 1.f;
}

// Writes a warp's 16x16 fp32 tile `acc` as bf16 into tokens row0..row0+15 (those < N),
// columns col0..col0+15 of head h, batch b of a [B, N, H, DH] tensor, through `stage`
// (256 fp32 of this warp's shared memory, 32-byte aligned).
template <int DH>
__device__ __forceinline__ void store_rows(bf16* __restrict__ dst, const FragC& acc, float* stage, int64_t b,
                                           int row0, int col0, int N, int H, int h, int lane) {
    wmma::store_matrix_sync(stage, acc, 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
        const int r = e >> 4, c = e & 15;  // element (r, c) of the tile
        const int n = row0 + r;
        if (n < N) dst[((b * N + n) * H + h) * (int64_t)DH + col0 + c] = __float2bfloat16(stage[e]);
    }
    __syncwarp();
}

template <int DH>
__device__ __forceinline__ void attn_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, const float* __restrict__ key_mask,
                                         const float* __restrict__ bias, bf16* __restrict__ out,
                                         float* __restrict__ lse, int Nq, int Nk, int H, int bias_batch,
                                         int has_mask, int causal, float scale) {
    using L = FwdSmem<DH>;
    constexpr int LDQ = L::LDQ;
    constexpr int DF = DH / 16;  // 16-wide column blocks of the head dim
    unsigned char* smem = dynamic_smem_at_least<L::BYTES>();
    bf16* Qs = reinterpret_cast<bf16*>(smem + L::Q);
    bf16* Ks = reinterpret_cast<bf16*>(smem + L::K);
    bf16* Vs = reinterpret_cast<bf16*>(smem + L::V);
    float* keep = reinterpret_cast<float*>(smem + L::KEEP);  // [FWD_BK] key flags of the tile

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q0 = blockIdx.x * FWD_BQ;  // first query row of the block
    const int h = blockIdx.y;
    const int64_t b = blockIdx.z;
    float* Sw = reinterpret_cast<float*>(smem + L::S) + warp * 16 * FWD_LDS;  // this warp's 16 x 64 scores
    bf16* Pw = reinterpret_cast<bf16*>(smem + L::P) + warp * 16 * FWD_LDP;    // this warp's 16 x 64 probs
    float* rowf = reinterpret_cast<float*>(smem + L::ROWF) + warp * 16;       // a factor per warp row

    load_tile<DH, FWD_BQ, LDQ>(Qs, q, b, q0, Nq, H, h);
    // The row-index map: element (r, c) of a 16x16 tile holds r.
    for (int e = lane; e < 256; e += 32) Sw[(e >> 4) * FWD_LDS + (e & 15)] = (float)(e >> 4);
    __syncthreads();
    int row_of[FragC::num_elements];  // tile row of each accumulator element this lane holds
    {
        FragC ids;
        wmma::load_matrix_sync(ids, Sw, FWD_LDS, wmma::mem_row_major);
#pragma unroll
        for (int t = 0; t < FragC::num_elements; ++t) row_of[t] = (int)ids.x[t];
    }
    FragA qf[DF];  // this warp's 16 query rows, all head dims
#pragma unroll
    for (int kk = 0; kk < DF; ++kk) wmma::load_matrix_sync(qf[kk], Qs + warp * 16 * LDQ + kk * 16, LDQ);
    FragC o[DF];
#pragma unroll
    for (int f = 0; f < DF; ++f) wmma::fill_fragment(o[f], 0.f);

    // Softmax work split: lanes 2r and 2r+1 share warp row r; lane half `half` takes the
    // columns c = 2e + half (interleaved, which spreads the rows over the banks).
    const int r = lane >> 1, half = lane & 1;
    const int i = q0 + warp * 16 + r;  // this lane's query row
    float* srow = Sw + r * FWD_LDS;
    bf16* prow = Pw + r * FWD_LDP;
    const float* brow = (bias_batch > 0 && i < Nq)
                            ? bias + (((bias_batch == 1 ? 0 : b) * H + h) * (int64_t)Nq + i) * Nk
                            : nullptr;
    float m_run = -INFINITY;  // running max of t = S * log2 e over the keys seen
    float l_run = 0.f;        // running sum of exp2(t - m_run)

    // Causal: keys beyond the block's last row are hidden from all of its rows.
    const int k_end = causal ? min(Nk, q0 + FWD_BQ) : Nk;
    for (int k0 = 0; k0 < k_end; k0 += FWD_BK) {
        __syncthreads();  // every warp is done with the previous K, V and key flags
        load_tile<DH, FWD_BK, LDQ>(Ks, k, b, k0, Nk, H, h);
        load_tile<DH, FWD_BK, LDQ>(Vs, v, b, k0, Nk, H, h);
        if (threadIdx.x < FWD_BK) keep[threadIdx.x] = key_flag(key_mask, has_mask, b, k0 + threadIdx.x, Nk);
        __syncthreads();

        // S_w (16 x 64) = Q_w K^T: B(kdim, key) = Ks[key][kdim] is K read column-major.
#pragma unroll
        for (int n = 0; n < FWD_BK / 16; ++n) {
            FragC s;
            wmma::fill_fragment(s, 0.f);
#pragma unroll
            for (int kk = 0; kk < DF; ++kk) {
                FragBcol kb;
                wmma::load_matrix_sync(kb, Ks + n * 16 * LDQ + kk * 16, LDQ);
                wmma::mma_sync(s, qf[kk], kb, s);
            }
            wmma::store_matrix_sync(Sw + n * 16, s, FWD_LDS, wmma::mem_row_major);
        }
        __syncwarp();

        float tmax = -INFINITY;
#pragma unroll 8
        for (int e = 0; e < FWD_BK / 2; ++e) {
            const int c = 2 * e + half;  // column within the tile
            const int j = k0 + c;        // key
            float t = -INFINITY;
            if (i < Nq && keep[c] != 0.f && (!causal || j <= i)) {
                float sv = srow[c] * scale;
                if (brow) sv += brow[j];
                t = sv * LOG2E;
            }
            srow[c] = t;
            tmax = fmaxf(tmax, t);
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        const float m_new = fmaxf(m_run, tmax);
        // While every key so far is hidden, m_new is -inf: subtract 0 instead, so that
        // exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN.
        const float m_use = (m_new == -INFINITY) ? 0.f : m_new;
        const float alpha = exp2f(m_run - m_use);  // rescales what was accumulated so far
        float psum = 0.f;
#pragma unroll 8
        for (int e = 0; e < FWD_BK / 2; ++e) {
            const int c = 2 * e + half;
            const float p = exp2f(srow[c] - m_use);
            psum += p;
            prow[c] = __float2bfloat16(p);
        }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);
        l_run = l_run * alpha + psum;
        m_run = m_new;
        if (half == 0) rowf[r] = alpha;
        __syncwarp();

        // O_w = alpha * O_w + P_w V.
#pragma unroll
        for (int t = 0; t < FragC::num_elements; ++t) {
            const float a = rowf[row_of[t]];
#pragma unroll
            for (int f = 0; f < DF; ++f) o[f].x[t] *= a;
        }
#pragma unroll
        for (int n = 0; n < FWD_BK / 16; ++n) {
            FragA pa;
            wmma::load_matrix_sync(pa, Pw + n * 16, FWD_LDP);
#pragma unroll
            for (int f = 0; f < DF; ++f) {
                FragB vb;
                wmma::load_matrix_sync(vb, Vs + n * 16 * LDQ + f * 16, LDQ);
                wmma::mma_sync(o[f], pa, vb, o[f]);
            }
        }
    }

    __syncwarp();  // all lanes are done reading rowf
    if (half == 0) {
        rowf[r] = l_run > 0.f ? 1.f / l_run : 0.f;
        if (i < Nq) lse[(b * H + h) * (int64_t)Nq + i] = l_run > 0.f ? (m_run + log2f(l_run)) * LN2 : INFINITY;
    }
    __syncwarp();
#pragma unroll
    for (int f = 0; f < DF; ++f) {
#pragma unroll
        for (int t = 0; t < FragC::num_elements; ++t) o[f].x[t] *= rowf[row_of[t]];
        store_rows<DH>(out, o[f], Sw, b, q0 + warp * 16, f * 16, Nq, H, h, lane);
    }
}

template <int DH>
__device__ __forceinline__ void attn_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                         const float* __restrict__ lse, const float* __restrict__ drow,
                                         const float* __restrict__ key_mask, const float* __restrict__ bias,
                                         float* __restrict__ dq_acc, bf16* __restrict__ dk, bf16* __restrict__ dv,
                                         float* __restrict__ dbias, int Nq, int Nk, int H, int bias_batch,
                                         int has_mask, int causal, int want_dbias, float scale) {
    using L = BwdSmem<DH>;
    constexpr int LDQ = L::LDQ;
    constexpr int DF = DH / 16;
    unsigned char* smem = dynamic_smem_at_least<L::BYTES>();
    bf16* Ks = reinterpret_cast<bf16*>(smem + L::K);
    bf16* Vs = reinterpret_cast<bf16*>(smem + L::V);
    bf16* Qs = reinterpret_cast<bf16*>(smem + L::Q);
    bf16* dOs = reinterpret_cast<bf16*>(smem + L::DO);
    bf16* dSt = reinterpret_cast<bf16*>(smem + L::DST);       // [BWD_BK keys][BWD_BQ queries]
    float* keep = reinterpret_cast<float*>(smem + L::KEEP);   // [BWD_BK] key flags
    float* Ls = reinterpret_cast<float*>(smem + L::LSE);      // [BWD_BQ] L of the query tile
    float* Ds = reinterpret_cast<float*>(smem + L::DROW);     // [BWD_BQ] D of the query tile

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int k0 = blockIdx.x * BWD_BK;  // first key of the block
    const int h = blockIdx.y;
    const int64_t b = blockIdx.z;
    const int kw = warp * 16;  // first key of this warp within the block
    float* Stw = reinterpret_cast<float*>(smem + L::ST) + kw * BWD_LDT;    // 16 x 32 S^T rows of the warp
    float* dPtw = reinterpret_cast<float*>(smem + L::DPT) + kw * BWD_LDT;  // 16 x 32 dP^T rows
    bf16* Ptw = reinterpret_cast<bf16*>(smem + L::PT) + kw * BWD_LDTP;     // 16 x 32 P^T rows
    bf16* dStw = dSt + kw * BWD_LDTP;                                      // 16 x 32 dS^T rows
    float* stage = reinterpret_cast<float*>(smem + L::STAGE) + warp * 256;
    const int64_t bias_base = bias_batch > 0 ? ((bias_batch == 1 ? 0 : b) * H + h) * (int64_t)Nq * Nk : 0;

    load_tile<DH, BWD_BK, LDQ>(Ks, k, b, k0, Nk, H, h);
    load_tile<DH, BWD_BK, LDQ>(Vs, v, b, k0, Nk, H, h);
    if (threadIdx.x < BWD_BK) keep[threadIdx.x] = key_flag(key_mask, has_mask, b, k0 + threadIdx.x, Nk);

    FragC dk_acc[DF], dv_acc[DF];  // this warp's 16 keys x all head dims
#pragma unroll
    for (int f = 0; f < DF; ++f) {
        wmma::fill_fragment(dk_acc[f], 0.f);
        wmma::fill_fragment(dv_acc[f], 0.f);
    }

    // Causal: queries before the block's first key see none of its keys.
    const int q_begin = causal ? (k0 / BWD_BQ) * BWD_BQ : 0;
    for (int q0 = q_begin; q0 < Nq; q0 += BWD_BQ) {
        __syncthreads();  // every warp is done with the previous Q, dO, dS^T, L, D
        load_tile<DH, BWD_BQ, LDQ>(Qs, q, b, q0, Nq, H, h);
        load_tile<DH, BWD_BQ, LDQ>(dOs, dout, b, q0, Nq, H, h);
        if (threadIdx.x < BWD_BQ) {
            const int i = q0 + threadIdx.x;
            const int64_t row = (b * H + h) * (int64_t)Nq + i;  // index into [B, H, Nq]
            Ls[threadIdx.x] = i < Nq ? lse[row] : 0.f;
            Ds[threadIdx.x] = i < Nq ? drow[row] : 0.f;
        }
        __syncthreads();  // (the first time, this also publishes K, V and the key flags)

        // S^T_w = K_w Q^T and dP^T_w = V_w dO^T (16 keys x 32 queries each):
        // B(kdim, query) = Qs[query][kdim] is Q read column-major (dO likewise).
#pragma unroll
        for (int n = 0; n < BWD_BQ / 16; ++n) {
            FragC s, dp;
            wmma::fill_fragment(s, 0.f);
            wmma::fill_fragment(dp, 0.f);
#pragma unroll
            for (int kk = 0; kk < DF; ++kk) {
                FragA ka, va;
                FragBcol qb, ob;
                wmma::load_matrix_sync(ka, Ks + kw * LDQ + kk * 16, LDQ);
                wmma::load_matrix_sync(qb, Qs + n * 16 * LDQ + kk * 16, LDQ);
                wmma::mma_sync(s, ka, qb, s);
                wmma::load_matrix_sync(va, Vs + kw * LDQ + kk * 16, LDQ);
                wmma::load_matrix_sync(ob, dOs + n * 16 * LDQ + kk * 16, LDQ);
                wmma::mma_sync(dp, va, ob, dp);
            }
            wmma::store_matrix_sync(Stw + n * 16, s, BWD_LDT, wmma::mem_row_major);
            wmma::store_matrix_sync(dPtw + n * 16, dp, BWD_LDT, wmma::mem_row_major);
        }
        __syncwarp();

        // Elementwise on the warp's 16 x 32 tile. Element e: key row r = e % 16, query
        // column c = e / 16, so a warp's 32 lanes cover 16 consecutive keys of two queries
        // (contiguous bias reads).
#pragma unroll 4
        for (int e = lane; e < 16 * BWD_BQ; e += 32) {
            const int r = e & 15, c = e >> 4;
            const int j = k0 + kw + r;  // key
            const int i = q0 + c;       // query
            float p = 0.f, ds = 0.f;
            if (i < Nq && keep[kw + r] != 0.f && (!causal || j <= i)) {
                float sv = Stw[r * BWD_LDT + c] * scale;
                if (bias_batch > 0) sv += bias[bias_base + (int64_t)i * Nk + j];
                // L_i is finite here: row i sees at least key j.
                p = exp2f((sv - Ls[c]) * LOG2E);
                ds = p * (dPtw[r * BWD_LDT + c] - Ds[c]);
                if (want_dbias) atomicAdd(dbias + bias_base + (int64_t)i * Nk + j, ds);
            }
            Ptw[r * BWD_LDTP + c] = __float2bfloat16(p);
            dStw[r * BWD_LDTP + c] = __float2bfloat16(ds);
        }
        __syncwarp();

        // dV_w += P^T_w dO and dK_w += dS^T_w Q (scaled by s at the end).
#pragma unroll
        for (int n = 0; n < BWD_BQ / 16; ++n) {
            FragA pa, sa;
            wmma::load_matrix_sync(pa, Ptw + n * 16, BWD_LDTP);
            wmma::load_matrix_sync(sa, dStw + n * 16, BWD_LDTP);
#pragma unroll
            for (int f = 0; f < DF; ++f) {
                FragB ob, qb;
                wmma::load_matrix_sync(ob, dOs + n * 16 * LDQ + f * 16, LDQ);
                wmma::mma_sync(dv_acc[f], pa, ob, dv_acc[f]);
                wmma::load_matrix_sync(qb, Qs + n * 16 * LDQ + f * 16, LDQ);
                wmma::mma_sync(dk_acc[f], sa, qb, dk_acc[f]);
            }
        }
        __syncthreads();  // dS^T of all 64 keys is in shared memory

        // dQ tile (32 x DH) += s * dS K over the block's 64 keys, one 16x16 output tile g
        // per warp at a time: rows rb*16.., columns f*16... A(query, key) = dSt[key][query]
        // is dS^T read column-major.
        for (int g = warp; g < (BWD_BQ / 16) * DF; g += WARPS) {
            const int rb = g / DF, f = g % DF;
            FragC acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < BWD_BK / 16; ++kk) {
                FragAcol sa;
                FragB kb;
                wmma::load_matrix_sync(sa, dSt + kk * 16 * BWD_LDTP + rb * 16, BWD_LDTP);
                wmma::load_matrix_sync(kb, Ks + kk * 16 * LDQ + f * 16, LDQ);
                wmma::mma_sync(acc, sa, kb, acc);
            }
            wmma::store_matrix_sync(stage, acc, 16, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                const int i = q0 + rb * 16 + (e >> 4);  // query of element (e / 16, e % 16)
                if (i < Nq) atomicAdd(dq_acc + ((b * Nq + i) * H + h) * (int64_t)DH + f * 16 + (e & 15), scale * stage[e]);
            }
            __syncwarp();
        }
    }

    // Every key < Nk belongs to exactly one block and warp: plain stores (zeros for keys
    // no query sees).
#pragma unroll
    for (int f = 0; f < DF; ++f) {
#pragma unroll
        for (int t = 0; t < FragC::num_elements; ++t) dk_acc[f].x[t] *= scale;
        store_rows<DH>(dk, dk_acc[f], stage, b, k0 + kw, f * 16, Nk, H, h, lane);
        store_rows<DH>(dv, dv_acc[f], stage, b, k0 + kw, f * 16, Nk, H, h, lane);
    }
}

}  // namespace

// D[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]: one warp per row of [B*Nq*H, DH].
extern "C" __global__ void attn_bwd_dot_bf16(const bf16* __restrict__ o, const bf16* __restrict__ dout,
                                             float* __restrict__ drow, int Nq, int H, int DH, int64_t rows) {
    const int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;  // (b*Nq + i)*H + h
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  // whole warps leave together: `row` is uniform per warp
    float acc = 0.f;
    for (int d = lane; d < DH; d += 32) acc += load(o, row * DH + d) * load(dout, row * DH + d);
    acc = warp_sum(acc);
    if (lane == 0) {
        const int h = (int)(row % H);
        const int64_t bi = row / H;  // b*Nq + i
        const int i = (int)(bi % Nq);
        const int64_t b = bi / Nq;
        drow[(b * H + h) * (int64_t)Nq + i] = acc;
    }
}

#define ATTN_ENTRY_POINTS(DH)                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                       \
        attn_fwd_d##DH##_bf16(const bf16* q, const bf16* k, const bf16* v, const float* key_mask,               \
                              const float* bias, bf16* out, float* lse, int Nq, int Nk, int H, int bias_batch,  \
                              int has_mask, int causal, float scale) {                                          \
        attn_fwd<DH>(q, k, v, key_mask, bias, out, lse, Nq, Nk, H, bias_batch, has_mask, causal, scale);        \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                       \
        attn_bwd_d##DH##_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,  \
                              const float* drow, const float* key_mask, const float* bias, float* dq_acc,       \
                              bf16* dk, bf16* dv, float* dbias, int Nq, int Nk, int H, int bias_batch,          \
                              int has_mask, int causal, int want_dbias, float scale) {                          \
        attn_bwd<DH>(q, k, v, dout, lse, drow, key_mask, bias, dq_acc, dk, dv, dbias, Nq, Nk, H, bias_batch,    \
                     has_mask, causal, want_dbias, scale);                                                      \
    }

ATTN_ENTRY_POINTS(32)
ATTN_ENTRY_POINTS(64)
ATTN_ENTRY_POINTS(80)
ATTN_ENTRY_POINTS(96)
ATTN_ENTRY_POINTS(128)
