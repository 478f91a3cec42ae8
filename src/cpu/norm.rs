//! Row normalisations (LayerNorm, adaLN modulate, RMSNorm): forward and backward over
//! the last dimension, with row statistics accumulated in f64, blocks of rows in parallel.
//!
//! One description, [`RowNorm`], covers the three ops exactly as `kernels/norm.cu` does:
//! `y = xhat·(w_offset + w[g]) + b[g]` with `xhat = (x − mean)·rstd` (mean 0 for RMSNorm)
//! and `g = row / rows_per_group` selecting the parameter row.

use super::math::{dot_f64, sum_f64, sum_sq_dev_f64};
use super::par;
use crate::desc::RowNorm;

/// Rows per parallel task. Tasks never straddle a parameter group, so each task's
/// parameter-gradient partial belongs to one group; partials are added in task order.
const ROWS: usize = 32;

/// The tasks `(group, first row, end row)` in row order.
fn tasks(spec: &RowNorm) -> Vec<(usize, usize, usize)> {
    let rpg = spec.rows_per_group.max(1);
    let mut v = Vec::new();
    let mut r0 = 0;
    while r0 < spec.rows {
        let g = r0 / rpg;
        let r1 = (r0 + ROWS).min((g + 1) * rpg).min(spec.rows);
        v.push((g, r0, r1));
        r0 = r1;
    }
    v
}

/// `buf` cut into consecutive pieces of `(r1 − r0)·d` elements, one per task.
fn split_rows<'a>(mut buf: &'a mut [f32], tasks: &[(usize, usize, usize)], d: usize) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::with_capacity(tasks.len());
    for &(_, r0, r1) in tasks {
        let (a, b) = std::mem::take(&mut buf).split_at_mut((r1 - r0) * d);
        parts.push(a);
        buf = b;
    }
    parts
}

/// Forward of `spec` on `x` (`[rows, d]`), with optional weight and bias of
/// `[groups, d]`. Returns the output and each row's mean and rstd (saved for backward).
/// Blocks of rows run in parallel.
pub fn forward(x: &[f32], w: Option<&[f32]>, b: Option<&[f32]>, spec: &RowNorm) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let d = spec.d;
    let mut out = vec![0f32; spec.rows * d];
    if d == 0 {
        return (out, vec![0.0; spec.rows], vec![0.0; spec.rows]);
    }
    let tasks = tasks(spec);
    let stats: Vec<Vec<(f32, f32)>> = split_rows(&mut out, &tasks, d)
        .into_par_iter()
        .zip(tasks.par_iter())
        .map(|(out, &(g, r0, r1))| {
            let p = g * d;
            let f = scales(w.map(|w| &w[p..p + d]), spec);
            let s = b.map_or_else(|| vec![0f32; d], |b| b[p..p + d].to_vec());
            forward_rows(&x[r0 * d..r1 * d], out, &f, &s, spec)
        })
        .collect();
    let (means, rstds) = stats.into_iter().flatten().unzip();
    (out, means, rstds)
}

par::avx2_fn! {
    /// Normalises the rows of `x` into `out` with per-column scale `f` and shift `s`;
    /// returns each row's (mean, rstd).
    fn forward_rows(x: &[f32], out: &mut [f32], f: &[f32], s: &[f32], spec: &RowNorm) -> Vec<(f32, f32)> {
        let d = f.len();
        let mut stats = Vec::with_capacity(x.len() / d);
        for (xr, yr) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let (mean, rstd) = row_stats(xr, spec);
            for ((y, &xv), (&f, &s)) in yr.iter_mut().zip(xr).zip(f.iter().zip(s)) {
                *y = (xv - mean) * rstd * f + s;
            }
            stats.push((mean, rstd));
        }
        stats
    }
}

/// The scale `w_offset + w` of every column (`w_offset` alone without a weight).
fn scales(w: Option<&[f32]>, spec: &RowNorm) -> Vec<f32> {
    match w {
        Some(w) => w.iter().map(|&w| spec.w_offset + w).collect(),
        None => vec![spec.w_offset; spec.d],
    }
}

#[inline(always)]
fn row_stats(xr: &[f32], spec: &RowNorm) -> (f32, f32) {
    let n = xr.len() as f64;
    let mean = if spec.rms { 0.0 } else { sum_f64(xr) / n };
    let var = sum_sq_dev_f64(xr, mean) / n;
    (mean as f32, (1.0 / (var + spec.eps as f64).sqrt()) as f32)
}

/// Gradients of a row normalisation: `dx` `[rows, d]`, and `dw` (Σ dy·xhat) and `db`
/// (Σ dy) per parameter row, `[groups, d]`.
pub struct NormGrads {
    /// Gradient of the input.
    pub dx: Vec<f32>,
    /// Gradient of the multiplicative parameter (weight or modulation scale).
    pub dw: Vec<f32>,
    /// Gradient of the additive parameter (bias or modulation shift).
    pub db: Vec<f32>,
}

/// Backward of `spec` given the forward's input, weight and saved statistics. Blocks of
/// rows run in parallel; each block's parameter-gradient partial is added to its group
/// in row order.
pub fn backward(x: &[f32], dy: &[f32], w: Option<&[f32]>, mean: &[f32], rstd: &[f32], spec: &RowNorm) -> NormGrads {
    use rayon::prelude::*;
    let d = spec.d;
    let mut dx = vec![0f32; spec.rows * d];
    let mut dw = vec![0f32; spec.groups() * d];
    let mut db = vec![0f32; spec.groups() * d];
    if d == 0 {
        return NormGrads { dx, dw, db };
    }
    let tasks = tasks(spec);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = split_rows(&mut dx, &tasks, d)
        .into_par_iter()
        .zip(tasks.par_iter())
        .map(|(dx, &(g, r0, r1))| {
            let p = g * d;
            let f = scales(w.map(|w| &w[p..p + d]), spec);
            let rows = r0 * d..r1 * d;
            backward_rows(&x[rows.clone()], &dy[rows], &mean[r0..r1], &rstd[r0..r1], &f, dx, spec)
        })
        .collect();
    for (&(g, _, _), (pdw, pdb)) in tasks.iter().zip(&partials) {
        dw[g * d..(g + 1) * d].iter_mut().zip(pdw).for_each(|(a, b)| *a += b);
        db[g * d..(g + 1) * d].iter_mut().zip(pdb).for_each(|(a, b)| *a += b);
    }
    NormGrads { dx, dw, db }
}

par::avx2_fn! {
    /// The backward of [`forward_rows`] for one block of rows: writes `dx` and returns
    /// the block's partial sums of `dy·xhat` and `dy` per column.
    fn backward_rows(
        x: &[f32],
        dy: &[f32],
        mean: &[f32],
        rstd: &[f32],
        f: &[f32],
        dx: &mut [f32],
        spec: &RowNorm,
    ) -> (Vec<f32>, Vec<f32>) {
        let d = f.len();
        let (mut pdw, mut pdb) = (vec![0f32; d], vec![0f32; d]);
        let (mut xhat, mut gh) = (vec![0f32; d], vec![0f32; d]);
        for (((xr, gr), dxr), (&mu, &rs)) in
            x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).zip(mean.iter().zip(rstd))
        {
            for ((xh, &xv), (&gv, (&fv, gh))) in xhat.iter_mut().zip(xr).zip(gr.iter().zip(f.iter().zip(gh.iter_mut()))) {
                *xh = (xv - mu) * rs;
                *gh = gv * fv;
            }
            for ((dw, db), (&gv, &xh)) in pdw.iter_mut().zip(pdb.iter_mut()).zip(gr.iter().zip(&xhat)) {
                *dw += gv * xh;
                *db += gv;
            }
            let mg = if spec.rms { 0.0 } else { (sum_f64(&gh) / d as f64) as f32 };
            let mgx = (dot_f64(&gh, &xhat) / d as f64) as f32;
            for (o, (&gh, &xh)) in dxr.iter_mut().zip(gh.iter().zip(&xhat)) {
                *o = rs * (gh - mg - xh * mgx);
            }
        }
        (pdw, pdb)
    }
}
