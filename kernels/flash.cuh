// The per-row pieces the register-resident flash-attention forwards share
// (attention_mma.cu with mma.sync, attention_wgmma.cu with wgmma). Both hold each 16-row
// tile of S, P and O in the accumulator layout the two instructions share: lane 4g + t
// holds rows g and g + 8 of the tile (element e of a group of 4: row e / 2) and, of each
// 8-column tile n, columns 8n + 2t and 8n + 2t + 1 (e % 2). Scores live in the log2
// domain (exp2 instead of exp); the row statistics are m_run, the running maximum, and
// l_run, this lane's part of the row sum.
#pragma once
#include "common.cuh"

namespace flash {

constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

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

}  // namespace flash
