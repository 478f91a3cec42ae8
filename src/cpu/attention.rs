//! Scaled dot-product attention, forward and backward, on f32 slices: blocked, with the
//! products done by `cpu::sgemm` (one thread each) and the (batch, head) pairs spread over the
//! rayon pool.
//!
//! Layouts (row-major): q and the output `[B, Nq, H, Dh]`; k and v `[B, Nk, H, Dh]`;
//! key mask `[B, Nk]` (0 hides a key, anything else keeps it); bias `[Bb, H, Nq, Nk]`
//! with `Bb` 1 (shared by the batch) or B. The rows of one head are read in place (row
//! stride `H·Dh`); nothing is transposed or copied on the way in.
//!
//! Math (per batch b, head h): `S_ij = scale·q_i·k_j + bias_ij` over the visible keys
//! (causal: j ≤ i; key mask ≠ 0), `P = softmax_j(S)`, `O_i = Σ_j P_ij v_j`. A row whose
//! keys are all hidden outputs zeros and receives zero gradients. Backward with `dO`:
//! `D_i = dO_i·O_i`, `dP_ij = dO_i·v_j`, `dS_ij = P_ij (dP_ij − D_i)`,
//! `dq_i = scale Σ_j dS_ij k_j`, `dk_j = scale Σ_i dS_ij q_i`, `dv_j = Σ_i P_ij dO_i`,
//! `dbias_ij = dS_ij` (summed over the batch when `Bb` = 1).
//!
//! Blocking and precision: queries go in blocks of at most [`BLOCK_ROWS`] rows. A block's
//! scores against all keys (under causal masking, only the keys up to its last query)
//! are one sgemm; the softmax runs in f32 after subtracting the row maximum (a vectorised
//! `exp`, about 1 ulp), its row sum accumulated in f64; `P·V` is a second sgemm, scaled by
//! `1/Σ` afterwards. The backward recomputes `P` block by block the same way and forms
//! `dP = dO·Vᵀ`, `dS`, `dq = scale·dS·K`, `dk += scale·dSᵀ·Q` and `dv += Pᵀ·dO` with
//! sgemm (f32 accumulation; `D_i` in f64). Results agree with an f64 evaluation to about
//! 1e-6 relative. Memory: no `Nq × Nk` matrix is formed; each running task holds one
//! block of scores (`BLOCK_ROWS × Nk`, and one of `dP` in the backward), and the outputs
//! are assembled from per-task buffers (one extra copy of q-, k- and v-sized results).
//! The bias gradient, itself `[Bb, H, Nq, Nk]`, is written in place.
//!
//! Determinism: every task (one query block of one (batch, head) in the forward, one
//! (batch, head), or one head over the whole batch when a shared bias needs its gradient,
//! in the backward) does a fixed sequence of operations and writes outputs no other task
//! writes; sums over query blocks and over the batch happen inside a task in a fixed order.
//! Results are therefore bit-identical for any number of threads.

use super::sgemm::{sgemm, Init, Mat as View};
use rayon::prelude::*;

use super::math::exp_nonpositive;
use crate::desc::{AttentionInputs, AttentionParams};

/// Query rows per block: the scores of one block (`BLOCK_ROWS × Nk`) are the largest
/// scratch buffer of a task.
pub const BLOCK_ROWS: usize = 64;

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

// ---- Strided products ----

/// `C = alpha·A·B + beta·C` with `A` `m × k`, `B` `k × n` and `C` `m × n` stored in rows
/// `ldc` apart (with `beta` 0, C is overwritten without being read), on this thread:
/// tasks are already spread over the pool one (batch, head) or query block each.
#[allow(clippy::too_many_arguments)]
fn gemm(m: usize, k: usize, n: usize, alpha: f32, a: View, b: View, beta: f32, c: &mut [f32], ldc: usize) {
    let init = if beta == 0.0 { Init::Zero } else { Init::Accumulate };
    sgemm(m, k, n, alpha, a, b, init, c, ldc, false);
}

// ---- Softmax ----

/// Turns the score row `s` (already `scale·q·k`) into unnormalised probabilities
/// `e^(S − max)`: adds the bias, hides masked keys and keys from `visible` on, and
/// returns `1 / Σ` — or 0, with the row zeroed, when every key is hidden.
fn softmax_row(s: &mut [f32], bias: Option<&[f32]>, mask: Option<&[f32]>, visible: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { softmax_row_avx512(s, bias, mask, visible) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { softmax_row_avx2(s, bias, mask, visible) };
    }
    softmax_row_body(s, bias, mask, visible)
}

/// [`softmax_row_body`] compiled for AVX2 (eight lanes instead of SSE2's four). No FMA:
/// every operation rounds as in the SSE2 build, so both give the same bits.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax_row_avx2(s: &mut [f32], bias: Option<&[f32]>, mask: Option<&[f32]>, visible: usize) -> f32 {
    softmax_row_body(s, bias, mask, visible)
}

/// [`softmax_row_body`] compiled for AVX-512F (sixteen lanes). No FMA, so it rounds as
/// the other builds do.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(s: &mut [f32], bias: Option<&[f32]>, mask: Option<&[f32]>, visible: usize) -> f32 {
    softmax_row_body(s, bias, mask, visible)
}

#[inline(always)]
fn softmax_row_body(s: &mut [f32], bias: Option<&[f32]>, mask: Option<&[f32]>, visible: usize) -> f32 {
    let visible = visible.min(s.len());
    let (s, hidden) = s.split_at_mut(visible);
    hidden.fill(0.0);
    if let Some(bias) = bias {
        s.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
    }
    if let Some(mask) = mask {
        s.iter_mut().zip(mask).for_each(|(s, m)| *s = if *m == 0.0 { f32::NEG_INFINITY } else { *s });
    }
    // Eight independent lanes, so that the loops vectorise (and round the same at any
    // vector width).
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        lanes.iter_mut().zip(c).for_each(|(l, x)| *l = l.max(*x));
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    if max == f32::NEG_INFINITY {
        s.fill(0.0);
        return 0.0;
    }
    s.iter_mut().for_each(|x| *x = exp_nonpositive(*x - max));
    let mut sums = [0f32; 8];
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        sums.iter_mut().zip(c).for_each(|(l, x)| *l += x);
    }
    let sum: f64 = chunks.remainder().iter().chain(&sums).map(|x| *x as f64).sum();
    (1.0 / sum) as f32
}

// ---- One head ----

/// The operands of one (batch, head): row views into the shared inputs.
struct Head<'a> {
    p: &'a AttentionParams,
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    mask: Option<&'a [f32]>,
    /// The `[Nq, Nk]` bias of this (batch, head).
    bias: Option<&'a [f32]>,
}

impl<'a> Head<'a> {
    fn new(p: &'a AttentionParams, x: &AttentionInputs<'a, [f32]>, b: usize, h: usize) -> Self {
        let ld = p.heads * p.head_dim;
        Head {
            p,
            q: View::rows(&x.q[p.token(p.q_len, b, 0, h)..], ld),
            k: View::rows(&x.k[p.token(p.kv_len, b, 0, h)..], ld),
            v: View::rows(&x.v[p.token(p.kv_len, b, 0, h)..], ld),
            mask: x.key_mask.map(|m| &m[b * p.kv_len..][..p.kv_len]),
            bias: x.bias.map(|bias| &bias[p.bias_row(b, h, 0)..][..p.q_len * p.kv_len]),
        }
    }

    /// Keys a block of queries ending before `i1` can see: all of them, or up to `i1`
    /// under causal masking.
    fn keys(&self, i1: usize) -> usize {
        if self.p.causal {
            i1.min(self.p.kv_len)
        } else {
            self.p.kv_len
        }
    }

    /// Fills `s` (`rows × nk`, `nk = self.keys(i0 + rows)`) with the unnormalised
    /// probabilities of queries `i0..i0 + rows` and `inv` with their `1 / Σ` (0 for a
    /// row that sees no key).
    fn probs(&self, i0: usize, rows: usize, s: &mut [f32], inv: &mut [f32]) {
        let (p, nk) = (self.p, self.keys(i0 + rows));
        let q = View { data: &self.q.data[i0 * self.q.rs..], ..self.q };
        gemm(rows, p.head_dim, nk, p.scale, q, self.k.t(), 0.0, s, nk);
        for (r, (row, inv)) in s.chunks_exact_mut(nk).zip(inv.iter_mut()).enumerate() {
            let i = i0 + r;
            let bias = self.bias.map(|bias| &bias[i * p.kv_len..][..nk]);
            let mask = self.mask.map(|m| &m[..nk]);
            *inv = softmax_row(row, bias, mask, if p.causal { i + 1 } else { nk });
        }
    }
}

/// Scratch buffers of one worker, reused across its tasks (every use overwrites them).
#[derive(Default)]
struct Scratch {
    s: Vec<f32>,
    dp: Vec<f32>,
    inv: Vec<f32>,
}

impl Scratch {
    fn take(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        &mut buf[..len]
    }
}

/// Query blocks `(i0, rows)` of a sequence of `len` queries.
fn blocks(len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len).step_by(BLOCK_ROWS).map(move |i0| (i0, BLOCK_ROWS.min(len - i0)))
}

fn is_empty(p: &AttentionParams) -> bool {
    p.batch == 0 || p.heads == 0 || p.q_len == 0 || p.head_dim == 0
}

/// The attention output `[B, Nq, H, Dh]`.
pub fn forward(p: &AttentionParams, x: &AttentionInputs<[f32]>) -> Vec<f32> {
    let dh = p.head_dim;
    let mut out = vec![0f32; p.batch * p.q_len * p.heads * dh];
    if is_empty(p) || p.kv_len == 0 {
        return out;
    }
    // Tasks: every query block of every (batch, head), in that order.
    let nblocks = p.q_len.div_ceil(BLOCK_ROWS);
    let tasks: Vec<(usize, usize, usize)> =
        (0..p.batch).flat_map(|b| (0..p.heads).flat_map(move |h| (0..nblocks).map(move |blk| (b, h, blk)))).collect();
    let blocks_out: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(Scratch::default, |scr, &(b, h, blk)| {
            let head = Head::new(p, x, b, h);
            let i0 = blk * BLOCK_ROWS;
            let rows = BLOCK_ROWS.min(p.q_len - i0);
            let nk = head.keys(i0 + rows);
            let s = Scratch::take(&mut scr.s, rows * nk);
            let inv = Scratch::take(&mut scr.inv, rows);
            head.probs(i0, rows, s, inv);
            let mut o = vec![0f32; rows * dh];
            gemm(rows, nk, dh, 1.0, View::rows(s, nk), head.v, 0.0, &mut o, dh);
            for (o, &inv) in o.chunks_exact_mut(dh).zip(inv.iter()) {
                if inv == 0.0 {
                    o.fill(0.0);
                } else {
                    o.iter_mut().for_each(|o| *o *= inv);
                }
            }
            o
        })
        .collect();
    for (&(b, h, blk), o) in tasks.iter().zip(&blocks_out) {
        for (r, o) in o.chunks_exact(dh).enumerate() {
            out[p.token(p.q_len, b, blk * BLOCK_ROWS + r, h)..][..dh].copy_from_slice(o);
        }
    }
    out
}

/// Gradients of one backward task: dq `[nb, Nq, Dh]`, dk and dv `[nb, Nk, Dh]` for the
/// `nb` batches of one head it covers.
struct TaskGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
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
    let (dh, nq, nk) = (p.head_dim, p.q_len, p.kv_len);
    let mut dq = vec![0f32; p.batch * nq * p.heads * dh];
    let mut dk = vec![0f32; p.batch * nk * p.heads * dh];
    let mut dv = vec![0f32; p.batch * nk * p.heads * dh];
    let mut dbias = (want_dbias && p.bias_batch > 0).then(|| vec![0f32; p.bias_batch * p.heads * nq * nk]);
    if is_empty(p) || nk == 0 {
        return AttentionGrads { dq, dk, dv, dbias };
    }
    // Tasks: one per (batch, head), batch-major, so that task t owns the bias-gradient
    // slab t of `[B, H, Nq, Nk]`; with a shared bias (Bb = 1) whose gradient sums over
    // the batch, one per head, owning slab h of `[1, H, Nq, Nk]` and visiting the batch
    // in order.
    let per_head = dbias.is_some() && p.bias_batch == 1;
    let tasks: Vec<(usize, std::ops::Range<usize>)> = if per_head {
        (0..p.heads).map(|h| (h, 0..p.batch)).collect()
    } else {
        (0..p.batch).flat_map(|b| (0..p.heads).map(move |h| (h, b..b + 1))).collect()
    };
    let slabs: Vec<Option<&mut [f32]>> = match dbias.as_mut() {
        Some(d) => d.chunks_exact_mut(nq * nk).map(Some).collect(),
        None => tasks.iter().map(|_| None).collect(),
    };
    let grads: Vec<TaskGrads> = tasks
        .par_iter()
        .zip(slabs)
        .map_init(Scratch::default, |scr, ((h, batches), mut slab)| {
            let nb = batches.len();
            let mut g =
                TaskGrads { dq: vec![0.0; nb * nq * dh], dk: vec![0.0; nb * nk * dh], dv: vec![0.0; nb * nk * dh] };
            for (n, b) in batches.clone().enumerate() {
                let head = Head::new(p, x, b, *h);
                let at = p.token(nq, b, 0, *h);
                let o = View::rows(&out[at..], p.heads * dh);
                let go = View::rows(&dout[at..], p.heads * dh);
                let dq = &mut g.dq[n * nq * dh..][..nq * dh];
                let dk = &mut g.dk[n * nk * dh..][..nk * dh];
                let dv = &mut g.dv[n * nk * dh..][..nk * dh];
                for (i0, rows) in blocks(nq) {
                    backward_block(&head, o, go, i0, rows, scr, dq, dk, dv, slab.as_deref_mut());
                }
            }
            g
        })
        .collect();
    for ((h, batches), g) in tasks.iter().zip(&grads) {
        for (n, b) in batches.clone().enumerate() {
            for i in 0..nq {
                dq[p.token(nq, b, i, *h)..][..dh].copy_from_slice(&g.dq[(n * nq + i) * dh..][..dh]);
            }
            for j in 0..nk {
                let at = p.token(nk, b, j, *h);
                dk[at..][..dh].copy_from_slice(&g.dk[(n * nk + j) * dh..][..dh]);
                dv[at..][..dh].copy_from_slice(&g.dv[(n * nk + j) * dh..][..dh]);
            }
        }
    }
    AttentionGrads { dq, dk, dv, dbias }
}

/// The backward of queries `i0..i0 + rows` of one (batch, head): writes their rows of
/// `dq` (`[Nq, Dh]`), adds their share to `dk` and `dv` (`[Nk, Dh]`) and, with `dbias`
/// (the `[Nq, Nk]` slab of this head), adds `dS` to it. `o` and `go` are the head's rows
/// of the output and of its gradient.
#[allow(clippy::too_many_arguments)]
fn backward_block(
    head: &Head,
    o: View,
    go: View,
    i0: usize,
    rows: usize,
    scr: &mut Scratch,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dbias: Option<&mut [f32]>,
) {
    let (p, dh) = (head.p, head.p.head_dim);
    let nk = head.keys(i0 + rows);
    let s = Scratch::take(&mut scr.s, rows * nk);
    let inv = Scratch::take(&mut scr.inv, rows);
    let dp = Scratch::take(&mut scr.dp, rows * nk);
    head.probs(i0, rows, s, inv);
    let go = View { data: &go.data[i0 * go.rs..], ..go };
    let o = View { data: &o.data[i0 * o.rs..], ..o };
    // dP = dO·Vᵀ.
    gemm(rows, dh, nk, 1.0, go, head.v.t(), 0.0, dp, nk);
    // P (normalised) and dS = P∘(dP − D) in place of the scores and of dP.
    for (r, ((pr, dpr), &inv)) in s.chunks_exact_mut(nk).zip(dp.chunks_exact_mut(nk)).zip(inv.iter()).enumerate() {
        if inv == 0.0 {
            dpr.fill(0.0);
            continue;
        }
        let (gi, oi) = (&go.data[r * go.rs..][..dh], &o.data[r * o.rs..][..dh]);
        let d: f64 = gi.iter().zip(oi).map(|(g, o)| *g as f64 * *o as f64).sum();
        let d = d as f32;
        pr.iter_mut().zip(dpr.iter_mut()).for_each(|(pij, dpij)| {
            *pij *= inv;
            *dpij = *pij * (*dpij - d);
        });
    }
    let (ps, ds) = (View::rows(s, nk), View::rows(dp, nk));
    // dq = scale·dS·K; dk += scale·dSᵀ·Q; dv += Pᵀ·dO.
    gemm(rows, nk, dh, p.scale, ds, head.k, 0.0, &mut dq[i0 * dh..], dh);
    let q = View { data: &head.q.data[i0 * head.q.rs..], ..head.q };
    gemm(nk, rows, dh, p.scale, ds.t(), q, 1.0, dk, dh);
    gemm(nk, rows, dh, 1.0, ps.t(), go, 1.0, dv, dh);
    if let Some(dbias) = dbias {
        for (r, dsr) in dp.chunks_exact(nk).enumerate() {
            let row = &mut dbias[(i0 + r) * p.kv_len..][..nk];
            row.iter_mut().zip(dsr).for_each(|(b, d)| *b += d);
        }
    }
}
