//! Row normalisations (LayerNorm, adaLN modulate, RMSNorm): reference forward and
//! backward over the last dimension, with row statistics accumulated in f64.
//!
//! One description, [`RowNorm`], covers the three ops exactly as `kernels/norm.cu` does:
//! `y = xhat·(w_offset + w[g]) + b[g]` with `xhat = (x − mean)·rstd` (mean 0 for RMSNorm)
//! and `g = row / rows_per_group` selecting the parameter row.

use crate::desc::RowNorm;

/// Forward of `spec` on `x` (`[rows, d]`), with optional weight and bias of
/// `[groups, d]`. Returns the output and each row's mean and rstd (saved for backward).
pub fn forward(x: &[f32], w: Option<&[f32]>, b: Option<&[f32]>, spec: &RowNorm) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = spec.d;
    let mut out = vec![0f32; spec.rows * d];
    let mut means = Vec::with_capacity(spec.rows);
    let mut rstds = Vec::with_capacity(spec.rows);
    for (r, (xr, yr)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
        let (mean, rstd) = row_stats(xr, spec);
        let p = (r / spec.rows_per_group) * d;
        for (c, (y, &xv)) in yr.iter_mut().zip(xr).enumerate() {
            let f = spec.w_offset + w.map_or(0.0, |w| w[p + c]);
            let s = b.map_or(0.0, |b| b[p + c]);
            *y = (xv - mean) * rstd * f + s;
        }
        means.push(mean);
        rstds.push(rstd);
    }
    (out, means, rstds)
}

fn row_stats(xr: &[f32], spec: &RowNorm) -> (f32, f32) {
    let n = xr.len() as f64;
    let mean = if spec.rms { 0.0 } else { xr.iter().map(|&v| v as f64).sum::<f64>() / n };
    let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
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

/// Backward of `spec` given the forward's input, weight and saved statistics.
pub fn backward(x: &[f32], dy: &[f32], w: Option<&[f32]>, mean: &[f32], rstd: &[f32], spec: &RowNorm) -> NormGrads {
    let d = spec.d;
    let mut dx = vec![0f32; spec.rows * d];
    let mut dw = vec![0f32; spec.groups() * d];
    let mut db = vec![0f32; spec.groups() * d];
    let mut xhat = vec![0f32; d];
    let mut gh = vec![0f32; d];
    for r in 0..spec.rows {
        let (xr, gr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
        let p = (r / spec.rows_per_group) * d;
        let (mu, rs) = (mean[r], rstd[r]);
        let (mut s_g, mut s_gx) = (0f64, 0f64);
        for c in 0..d {
            xhat[c] = (xr[c] - mu) * rs;
            gh[c] = gr[c] * (spec.w_offset + w.map_or(0.0, |w| w[p + c]));
            s_g += gh[c] as f64;
            s_gx += (gh[c] * xhat[c]) as f64;
            dw[p + c] += gr[c] * xhat[c];
            db[p + c] += gr[c];
        }
        let mg = if spec.rms { 0.0 } else { (s_g / d as f64) as f32 };
        let mgx = (s_gx / d as f64) as f32;
        for c in 0..d {
            dx[r * d + c] = rs * (gh[c] - mg - xhat[c] * mgx);
        }
    }
    NormGrads { dx, dw, db }
}
