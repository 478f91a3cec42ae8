//! Reference scaled dot-product attention, forward and backward, in f64 arithmetic on f32
//! slices.
//!
//! Layouts (row-major): q and the output `[B, Nq, H, Dh]`; k and v `[B, Nk, H, Dh]`;
//! key mask `[B, Nk]` (0 hides a key, anything else keeps it); bias `[Bb, H, Nq, Nk]`
//! with `Bb` 1 (shared by the batch) or B. Each query row is computed on its own with a
//! scratch vector of Nk scores, so memory stays linear in the sequence length.
//!
//! Math (per batch b, head h): `S_ij = scale·q_i·k_j + bias_ij` over the visible keys
//! (causal: j ≤ i; key mask ≠ 0), `P = softmax_j(S)`, `O_i = Σ_j P_ij v_j`. A row whose
//! keys are all hidden outputs zeros and receives zero gradients. Backward with `dO`:
//! `D_i = dO_i·O_i`, `dP_ij = dO_i·v_j`, `dS_ij = P_ij (dP_ij − D_i)`,
//! `dq_i = scale Σ_j dS_ij k_j`, `dk_j = scale Σ_i dS_ij q_i`, `dv_j = Σ_i P_ij dO_i`,
//! `dbias_ij = dS_ij` (summed over the batch when `Bb` = 1).

use crate::desc::{AttentionInputs, AttentionParams};

/// Gradients of one attention call (host buffers).
pub struct AttentionGrads {
    /// Gradient of q, `[B, Nq, H, Dh]`.
    pub dq: Vec<f32>,
    /// Gradient of k, `[B, Nk, H, Dh]`.
    pub dk: Vec<f32>,
    /// Gradient of v, `[B, Nk, H, Dh]`.
    pub dv: Vec<f32>,
    /// Gradient of the bias, `[Bb, H, Nq, Nk]`, when asked for.
    pub dbias: Option<Vec<f32>>,
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Fills `probs` (length Nk) with the softmax row `P_i·` of query `i` (head `h`, batch
/// `b`); returns false, with `probs` all zero, when every key is hidden from the row.
fn row_probs(p: &AttentionParams, x: &AttentionInputs<[f32]>, b: usize, h: usize, i: usize, probs: &mut [f64]) -> bool {
    let dh = p.head_dim;
    let qi = &x.q[p.token(p.q_len, b, i, h)..][..dh];
    let bias = x.bias.map(|bias| &bias[p.bias_row(b, h, i)..][..p.kv_len]);
    let mut max = f64::NEG_INFINITY;
    for (j, s) in probs.iter_mut().enumerate() {
        let visible = x.key_mask.is_none_or(|m| m[b * p.kv_len + j] != 0.0) && (!p.causal || j <= i);
        *s = if visible {
            let kj = &x.k[p.token(p.kv_len, b, j, h)..][..dh];
            p.scale as f64 * dot(qi, kj) + bias.map_or(0.0, |r| r[j] as f64)
        } else {
            f64::NEG_INFINITY
        };
        max = max.max(*s);
    }
    if max == f64::NEG_INFINITY {
        probs.fill(0.0);
        return false;
    }
    let mut sum = 0.0;
    for s in probs.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    probs.iter_mut().for_each(|s| *s /= sum);
    true
}

/// The attention output `[B, Nq, H, Dh]`.
pub fn forward(p: &AttentionParams, x: &AttentionInputs<[f32]>) -> Vec<f32> {
    let dh = p.head_dim;
    let mut out = vec![0f32; p.batch * p.q_len * p.heads * dh];
    let mut probs = vec![0f64; p.kv_len];
    let mut acc = vec![0f64; dh];
    for b in 0..p.batch {
        for h in 0..p.heads {
            for i in 0..p.q_len {
                if !row_probs(p, x, b, h, i, &mut probs) {
                    continue;
                }
                acc.fill(0.0);
                for (j, &pj) in probs.iter().enumerate() {
                    if pj == 0.0 {
                        continue;
                    }
                    let vj = &x.v[p.token(p.kv_len, b, j, h)..][..dh];
                    acc.iter_mut().zip(vj).for_each(|(a, v)| *a += pj * *v as f64);
                }
                let o = &mut out[p.token(p.q_len, b, i, h)..][..dh];
                o.iter_mut().zip(&acc).for_each(|(o, a)| *o = *a as f32);
            }
        }
    }
    out
}

/// Gradients of q, k, v (and of the bias when `want_dbias`) given the forward output
/// `out` and its gradient `dout` (both `[B, Nq, H, Dh]`).
pub fn backward(
    p: &AttentionParams,
    x: &AttentionInputs<[f32]>,
    out: &[f32],
    dout: &[f32],
    want_dbias: bool,
) -> AttentionGrads {
    let dh = p.head_dim;
    let scale = p.scale as f64;
    let mut dq = vec![0f32; p.batch * p.q_len * p.heads * dh];
    let mut dk = vec![0f64; p.batch * p.kv_len * p.heads * dh];
    let mut dv = vec![0f64; p.batch * p.kv_len * p.heads * dh];
    let mut dbias = (want_dbias && p.bias_batch > 0).then(|| vec![0f64; p.bias_batch * p.heads * p.q_len * p.kv_len]);
    let mut probs = vec![0f64; p.kv_len];
    let mut dqi = vec![0f64; dh];
    for b in 0..p.batch {
        for h in 0..p.heads {
            for i in 0..p.q_len {
                if !row_probs(p, x, b, h, i, &mut probs) {
                    continue;
                }
                let at = p.token(p.q_len, b, i, h);
                let (qi, oi, gi) = (&x.q[at..][..dh], &out[at..][..dh], &dout[at..][..dh]);
                let d_i = dot(gi, oi);
                dqi.fill(0.0);
                for (j, &pj) in probs.iter().enumerate() {
                    if pj == 0.0 {
                        continue;
                    }
                    let kv = p.token(p.kv_len, b, j, h);
                    let (kj, vj) = (&x.k[kv..][..dh], &x.v[kv..][..dh]);
                    let ds = pj * (dot(gi, vj) - d_i);
                    for d in 0..dh {
                        dqi[d] += scale * ds * kj[d] as f64;
                        dk[kv + d] += scale * ds * qi[d] as f64;
                        dv[kv + d] += pj * gi[d] as f64;
                    }
                    if let Some(db) = dbias.as_mut() {
                        db[p.bias_row(b, h, i) + j] += ds;
                    }
                }
                dq[at..][..dh].iter_mut().zip(&dqi).for_each(|(o, a)| *o = *a as f32);
            }
        }
    }
    let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    AttentionGrads { dq, dk: to_f32(dk), dv: to_f32(dv), dbias: dbias.map(to_f32) }
}
