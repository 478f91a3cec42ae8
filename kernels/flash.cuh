// The per-row pieces the register-resident flash-attention kernels share
// (attention_mma.cu with mma.sync, attention_wgmma.cu with wgmma): the forwards' online
// softmax and row finish, the backwards' probabilities, statistics and dK/dV stores. Both
// hold each 16-row tile of S, P and O in the accumulator layout the two instructions share: lane 4g + t
// holds rows g and g + 8 of the tile (element e of a group of 4: row e / 2) and, of each
// 8-column tile n, columns 8n + 2t and 8n + 2t + 1 (e % 2). Scores live in the log2
// domain (exp2 instead of exp); the row statistics are m_run, the running maximum, and
// l_run, this lane's part of the row sum.
#pragma once
#include "common.cuh"
#include "ptx.cuh"

namespace flash {

constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

// The tile walks' double buffering, run before tile j of `tiles` is read: when a tile
// j+1 exists, `issue_next` starts its copies (into the stage tile j-1 used, whose readers
// all passed the barrier that ended tile j-1) and they are committed as one group; then
// this thread waits for its copies of tile j and of everything committed before it. The
// caller's barrier (after an async-proxy fence where tensor cores read the tiles) makes
// every thread's copies visible.
template <class IssueNext>
__device__ __forceinline__ void prefetch_next(int j, int tiles, IssueNext issue_next) {
    if (j + 1 < tiles) {
        issue_next();
        ptx::cp_async_commit();
        ptx::cp_async_wait<1>();
    } else {
        ptx::cp_async_wait<0>();
    }
}

// The bias row of query `row` (bias [bias_batch, H, Nq, Nk], one shared by the batch when
// bias_batch is 1), or null without a bias or for a row past Nq.
__device__ __forceinline__ const float* bias_row(const float* bias, int bias_batch, int64_t b, int H, int h, int Nq,
                                                 int Nk, int row) {
    return bias_batch > 0 && row < Nq ? bias + (((bias_batch == 1 ? 0 : b) * H + h) * (int64_t)Nq + row) * Nk
                                      : nullptr;
}

// One key tile's step of the online softmax for one 16-row tile. The scores s (NT 8-key
// tiles from key k0) become logits: scale·s plus the row's bias (brow), −∞ for a key past
// Nk, masked (has_mask: key_mask [B, Nk] of batch element b is 0) or after the row (causal);
// then probabilities exp2(x − m) against the new running maxima. l_run is rescaled and
// extended; alpha[r] is the factor row r of O must be rescaled by. (The mask arrives as
// the kernel's own arguments, which stay in the constant bank, not as a row pointer held
// in registers.)
template <int NT>
__device__ __forceinline__ void softmax_tile(float (&s)[NT][4], const int rows[2], int k0, int t, int Nq, int Nk,
                                             int causal, int has_mask, const float* key_mask, int64_t b,
                                             const float* const brow[2],
                                             float scale, float (&m_run)[2], float (&l_run)[2], float (&alpha)[2]) {
    float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int i = rows[e >> 1], key = k0 + n * 8 + 2 * t + (e & 1);
            bool keep = i < Nq && key < Nk && (!causal || key <= i);
            if (keep && has_mask) keep = key_mask[b * Nk + key] != 0.f;
            float x = -INFINITY;
            if (keep) {
                x = s[n][e] * scale;
                if (brow[e >> 1] != nullptr) x += brow[e >> 1][key];
                x *= LOG2E;
            }
            s[n][e] = x;
            tmax[e >> 1] = fmaxf(tmax[e >> 1], x);
        }
    }
    float m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
        const float m_new = fmaxf(m_run[r], tmax[r]);
        // While every key so far is hidden m_new is -inf: subtract 0 instead, so that
        // exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN.
        m_use[r] = m_new == -INFINITY ? 0.f : m_new;
        alpha[r] = exp2f(m_run[r] - m_use[r]);
        m_run[r] = m_new;
        l_run[r] *= alpha[r];
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float p = exp2f(s[n][e] - m_use[e >> 1]);
            s[n][e] = p;
            l_run[e >> 1] += p;
        }
    }
}

// The end of a row: its sum over the quad (every lane calls), its log-sum-exp (natural
// log; +inf for a row that saw no key) written by lane t = 0 to *lse_at when row < Nq,
// and the factor that normalises its O (0 for a row that saw no key).
__device__ __forceinline__ float finish_row(float l, float m, int row, int Nq, int t, float* lse_at) {
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (row < Nq && t == 0) *lse_at = l > 0.f ? (m + log2f(l)) * LN2 : INFINITY;
    return l > 0.f ? 1.f / l : 0.f;
}

// ---- Backward ---------------------------------------------------------------------------
// The register-resident backwards (attention_mma.cu, attention_wgmma.cu) hold S^T and dP^T
// of 16 keys x (8 NT) queries in the same accumulator layout, with the keys as rows: lane
// 4g + t holds keys g and g + 8 of its 16 (element e: keys[e / 2]) and, of each 8-query
// tile n, queries 8n + 2t and 8n + 2t + 1 (e % 2).

// The keys of this lane's rows (first: the first of its 16), and whether each takes part
// (below Nk and not hidden by the key mask).
__device__ __forceinline__ void bwd_keys(int first, int g, int Nk, int has_mask, const float* key_mask, int64_t b,
                                         int (&keys)[2], bool (&key_on)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        keys[r] = first + g + 8 * r;
        key_on[r] = keys[r] < Nk && (!has_mask || key_mask[b * Nk + keys[r]] != 0.f);
    }
}

// The row statistics of queries q0 .. q0+BQ-1 into shared memory (threads 0 .. BQ-1):
// L in the log2 domain and D, zeros past Nq.
template <int BQ>
__device__ __forceinline__ void bwd_stats(float* Ls, float* Ds, const float* lse, const float* drow, int64_t b, int H,
                                          int h, int Nq, int q0) {
    if (threadIdx.x < BQ) {
        const int i = q0 + threadIdx.x;
        const int64_t row = (b * H + h) * (int64_t)Nq + i;
        Ls[threadIdx.x] = i < Nq ? lse[row] * LOG2E : 0.f;
        Ds[threadIdx.x] = i < Nq ? drow[row] : 0.f;
    }
}

// P^T = exp(scale S^T + bias - L) in place of S^T, for the NT 8-query tiles from q0 (L: the
// tile's statistics from bwd_stats); exactly 0 where the key is off, the query past Nq or
// (causal) before the key.
template <int NT>
__device__ __forceinline__ void bwd_p(float (&s)[NT][4], const int (&keys)[2], const bool (&key_on)[2], int q0, int t,
                                      int Nq, int Nk, int causal, const float* bias, int bias_batch, int64_t bias_base,
                                      const float* Lt, float scale) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = n * 8 + 2 * t + (e & 1), i = q0 + c, key = keys[e >> 1];
            float p = 0.f;
            if (i < Nq && key_on[e >> 1] && (!causal || key <= i)) {
                float sv = s[n][e] * scale;
                if (bias_batch > 0) sv += bias[bias_base + (int64_t)i * Nk + key];
                // L_i is finite here: row i sees at least this key.
                p = exp2f(sv * LOG2E - Lt[c]);
            }
            s[n][e] = p;
        }
    }
}

// dS^T = P^T (dP^T - D) in place of dP^T (D: the tile's statistics), exactly 0 where P^T
// is; with dbias (not null), each nonzero dS is added to it with fp32 atomics (bias_base:
// this (batch, head)'s [Nq, Nk] block). Every position bwd_p hides has P = 0, so no
// atomic leaves the block's rows and keys.
template <int NT>
__device__ __forceinline__ void bwd_ds(const float (&p)[NT][4], float (&dp)[NT][4], const int (&keys)[2], int q0,
                                       int t, int Nk, int64_t bias_base, const float* Dt, float* dbias) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = n * 8 + 2 * t + (e & 1);
            const float ds = p[n][e] != 0.f ? p[n][e] * (dp[n][e] - Dt[c]) : 0.f;
            if (dbias != nullptr && p[n][e] != 0.f) atomicAdd(dbias + bias_base + (int64_t)(q0 + c) * Nk + keys[e >> 1], ds);
            dp[n][e] = ds;
        }
    }
}

// The deterministic dq kernels hold S and dP with the queries as rows (as the forwards
// do). P = exp(scale S + bias - L) in place of S, for the NT 8-key tiles from k0 of this
// lane's rows (L in the log2 domain per row, brow the rows' bias rows or null); exactly 0
// where the key is past Nk, masked or (causal) after the row.
template <int NT>
__device__ __forceinline__ void bwd_p_rows(float (&s)[NT][4], const int rows[2], int k0, int t, int Nq, int Nk,
                                           int causal, int has_mask, const float* key_mask, int64_t b,
                                           const float* const brow[2], const float (&lrow)[2], float scale) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = e >> 1, i = rows[r], key = k0 + n * 8 + 2 * t + (e & 1);
            bool keep = i < Nq && key < Nk && (!causal || key <= i);
            if (keep && has_mask) keep = key_mask[b * Nk + key] != 0.f;
            float p = 0.f;
            if (keep) {
                float sv = s[n][e] * scale;
                if (brow[r] != nullptr) sv += brow[r][key];
                // L_i is finite here: row i sees at least this key.
                p = exp2f(sv * LOG2E - lrow[r]);
            }
            s[n][e] = p;
        }
    }
}

// dS = P (dP - D) in place of dP (D per row), exactly 0 where P is; with dbrow[r] (not
// null), row r's dS is stored there for every key below Nk (one writer each).
template <int NT>
__device__ __forceinline__ void bwd_ds_rows(const float (&p)[NT][4], float (&dp)[NT][4], int k0, int t, int Nk,
                                            float* const dbrow[2], const float (&drw)[2]) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = e >> 1, key = k0 + n * 8 + 2 * t + (e & 1);
            const float ds = p[n][e] != 0.f ? p[n][e] * (dp[n][e] - drw[r]) : 0.f;
            if (dbrow[r] != nullptr && key < Nk) dbrow[r][key] = ds;
            dp[n][e] = ds;
        }
    }
}

// The per-row set-up of a dq kernel: L (log2 domain) and D of this lane's rows, their
// bias rows, and their dbias rows when asked for (dbias [B, H, Nq, Nk]).
__device__ __forceinline__ void bwd_row_setup(const int rows[2], const float* lse, const float* drow,
                                              const float* bias, int bias_batch, float* dbias, int want_dbias,
                                              int64_t b, int H, int h, int Nq, int Nk, float (&lrow)[2],
                                              float (&drw)[2], const float* (&brow)[2], float* (&dbrow)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const bool in = rows[r] < Nq;
        const int64_t row = (b * H + h) * (int64_t)Nq + rows[r];
        lrow[r] = in ? lse[row] * LOG2E : 0.f;
        drw[r] = in ? drow[row] : 0.f;
        brow[r] = bias_row(bias, bias_batch, b, H, h, Nq, Nk, rows[r]);
        dbrow[r] = in && want_dbias ? dbias + row * Nk : nullptr;
    }
}

// The end of a dq kernel for this lane's rows: the dbias row past the keys walked (from
// `walked`) set to 0, and dq (times scale, bf16, DT 8-dim tiles) stored for rows < Nq.
template <int DH>
__device__ __forceinline__ void bwd_store_dq(const float (&acc)[DH / 8][4], const int rows[2], float* const dbrow[2],
                                             int walked, int Nq, int Nk, int64_t b, int H, int h, int t, float scale,
                                             bf16* dq) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (dbrow[r] != nullptr)
            for (int key = walked + t; key < Nk; key += 4) dbrow[r][key] = 0.f;
        if (rows[r] >= Nq) continue;
        bf16* orow = dq + ((b * Nq + rows[r]) * H + h) * (int64_t)DH + 2 * t;
#pragma unroll
        for (int d = 0; d < DH / 8; ++d)
            *reinterpret_cast<__nv_bfloat162*>(orow + d * 8) =
                __floats2bfloat162_rn(acc[d][2 * r] * scale, acc[d][2 * r + 1] * scale);
    }
}

// dK (times scale) and dV of this lane's keys below Nk, DT 8-dim tiles each, as bf16
// ([B, Nk, H, DH] tensors): every key belongs to one warp, so plain stores.
template <int DH>
__device__ __forceinline__ void bwd_store_kv(const float (&dk_acc)[DH / 8][4], const float (&dv_acc)[DH / 8][4],
                                             const int (&keys)[2], int Nk, int64_t b, int H, int h, int t, float scale,
                                             bf16* dk, bf16* dv) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (keys[r] >= Nk) continue;
        const int64_t base = ((b * Nk + keys[r]) * H + h) * (int64_t)DH + 2 * t;
#pragma unroll
        for (int d = 0; d < DH / 8; ++d) {
            *reinterpret_cast<__nv_bfloat162*>(dk + base + d * 8) =
                __floats2bfloat162_rn(dk_acc[d][2 * r] * scale, dk_acc[d][2 * r + 1] * scale);
            *reinterpret_cast<__nv_bfloat162*>(dv + base + d * 8) =
                __floats2bfloat162_rn(dv_acc[d][2 * r], dv_acc[d][2 * r + 1]);
        }
    }
}

}  // namespace flash

// The three backward entry points of a flash-attention family (mma or wgmma) at head dim
// DH, each forwarding to the family's device templates attn_bwd_<family><DH, WITH_DQ> and
// attn_bwd_dq_<family><DH>:
// - attn_bwd_<family>_d<DH>_bf16: dK and dV stored, dQ added to dq_acc (fp32, atomics);
// - attn_bwd_dkdv_<family>_d<DH>_bf16: the deterministic mode's dK and dV alone;
// - attn_bwd_dq_<family>_d<DH>_bf16: the deterministic mode's dQ (and dbias), one writer
//   per element.
// The launch bounds follow (threads, and the minimum blocks per SM where given).
#define FLASH_BWD_ENTRIES(FAMILY, DH, ...)                                                                          \
    extern "C" __global__ void __launch_bounds__(__VA_ARGS__)                                                       \
        attn_bwd_##FAMILY##_d##DH##_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,            \
                                         const float* lse, const float* drow, const float* key_mask,               \
                                         const float* bias, float* dq_acc, bf16* dk, bf16* dv, float* dbias,       \
                                         int Nq, int Nk, int H, int bias_batch, int has_mask, int causal,          \
                                         int want_dbias, float scale) {                                            \
        attn_bwd_##FAMILY<DH, true>(q, k, v, dout, lse, drow, key_mask, bias, dq_acc, dk, dv, dbias, Nq, Nk, H,    \
                                    bias_batch, has_mask, causal, want_dbias, scale);                               \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(__VA_ARGS__)                                                       \
        attn_bwd_dkdv_##FAMILY##_d##DH##_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,       \
                                              const float* lse, const float* drow, const float* key_mask,          \
                                              const float* bias, bf16* dk, bf16* dv, int Nq, int Nk, int H,        \
                                              int bias_batch, int has_mask, int causal, float scale) {             \
        attn_bwd_##FAMILY<DH, false>(q, k, v, dout, lse, drow, key_mask, bias, nullptr, dk, dv, nullptr, Nq, Nk, \
                                     H, bias_batch, has_mask, causal, 0, scale);                                    \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(__VA_ARGS__)                                                       \
        attn_bwd_dq_##FAMILY##_d##DH##_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,         \
                                            const float* lse, const float* drow, const float* key_mask,            \
                                            const float* bias, bf16* dq, float* dbias, int Nq, int Nk, int H,      \
                                            int bias_batch, int has_mask, int causal, int want_dbias,              \
                                            float scale) {                                                         \
        attn_bwd_dq_##FAMILY<DH>(q, k, v, dout, lse, drow, key_mask, bias, dq, dbias, Nq, Nk, H, bias_batch,      \
                                 has_mask, causal, want_dbias, scale);                                              \
    }
