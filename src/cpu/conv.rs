//! Reference ops of convolutional image models (the Wan VAE): 2-D convolution by im2col
//! + GEMM, nearest 2× upsampling, the channel RMS norm, a row softmax.
//!
//! Layouts are PyTorch's channel-first `[B, C, H, W]`. The convolution is computed one
//! image and one band of output rows at a time ([`ConvGeom::rows_per_chunk`]), so the
//! column matrix never holds more than a set number of elements; the CUDA launchers walk
//! the same bands.

use crate::desc::{ChannelNorm, ConvGeom, Gemm};

use super::matmul::gemm;
use crate::Result;

/// The input pixel `(iy, ix)` under kernel tap `(ky, kx)` of output pixel `(oy, ox)`,
/// or `None` when it falls in the padding.
fn tap(g: &ConvGeom, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
    let iy = (oy * g.stride + ky).checked_sub(g.pad_top)?;
    let ix = (ox * g.stride + kx).checked_sub(g.pad_left)?;
    (iy < g.h && ix < g.w).then_some((iy, ix))
}

/// Visits the column matrix of output rows `[r0, r0 + rows)` in storage order:
/// `f(e, src)` for entry `e` = `(c·kh + ky)·kw + kx` row, `(oy − r0)·w_out + ox` column,
/// with `src` the index in one `[c_in, h, w]` image of the input pixel it holds (`None`
/// in the padding).
fn for_each_column_entry(g: &ConvGeom, r0: usize, rows: usize, mut f: impl FnMut(usize, Option<usize>)) {
    let npix = rows * g.w_out;
    for c in 0..g.c_in {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let k = (c * g.kh + ky) * g.kw + kx;
                for p in 0..npix {
                    let (oy, ox) = (r0 + p / g.w_out, p % g.w_out);
                    f(k * npix + p, tap(g, oy, ox, ky, kx).map(|(iy, ix)| (c * g.h + iy) * g.w + ix));
                }
            }
        }
    }
}

/// Column matrix of output rows `[r0, r0 + rows)` of one image `x_img` (`[c_in, h, w]`):
/// `cols[(c·kh + ky)·kw + kx, (oy − r0)·w_out + ox] = x[c, oy·s − pad_top + ky, ox·s −
/// pad_left + kx]` (0 in the padding). `cols` holds `k · rows · w_out` elements.
pub fn im2col(x_img: &[f32], g: &ConvGeom, r0: usize, rows: usize, cols: &mut [f32]) {
    for_each_column_entry(g, r0, rows, |e, src| cols[e] = src.map_or(0.0, |i| x_img[i]));
}

/// The adjoint of [`im2col`]: adds every column entry back onto the input pixel it was
/// read from (`dx_img` is one image, `[c_in, h, w]`), in the column matrix's order.
pub fn col2im_add(dcols: &[f32], g: &ConvGeom, r0: usize, rows: usize, dx_img: &mut [f32]) {
    for_each_column_entry(g, r0, rows, |e, src| {
        if let Some(i) = src {
            dx_img[i] += dcols[e];
        }
    });
}

/// The bands of output rows: `(r0, rows)` pairs covering `0..h_out`.
fn bands(g: &ConvGeom, max_col_elems: usize) -> impl Iterator<Item = (usize, usize)> {
    let per = g.rows_per_chunk(max_col_elems);
    let h_out = g.h_out;
    (0..h_out).step_by(per).map(move |r0| (r0, per.min(h_out - r0)))
}

/// Convolution forward: `x` `[batch, c_in, h, w]`, `w` `[c_out, k]`, optional `bias`
/// `[c_out]` → `[batch, c_out, h_out, w_out]`.
pub fn conv2d_forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    max_col_elems: usize,
) -> Result<Vec<f32>> {
    let (k, opix) = (g.k(), g.out_pixels());
    let mut out = vec![0f32; g.batch * g.out_image()];
    let mut cols = vec![0f32; k * g.rows_per_chunk(max_col_elems) * g.w_out];
    for b in 0..g.batch {
        let x_img = &x[b * g.in_image()..(b + 1) * g.in_image()];
        for (r0, rows) in bands(g, max_col_elems) {
            let npix = rows * g.w_out;
            im2col(x_img, g, r0, rows, &mut cols[..k * npix]);
            let y = gemm(
                w,
                &cols[..k * npix],
                None,
                &Gemm { batch: 1, m: g.c_out, k, n: npix, trans_a: false, trans_b: false },
            )?;
            for (o, yo) in y.chunks_exact(npix).enumerate() {
                let add = bias.map_or(0.0, |bv| bv[o]);
                let dst = b * g.out_image() + o * opix + r0 * g.w_out;
                for (d, &v) in out[dst..dst + npix].iter_mut().zip(yo) {
                    *d = v + add;
                }
            }
        }
    }
    Ok(out)
}

/// Gradients of a convolution, each present when asked for.
pub struct ConvGrads {
    /// Of the input, `[batch, c_in, h, w]`.
    pub dx: Option<Vec<f32>>,
    /// Of the weight, `[c_out, k]`.
    pub dw: Option<Vec<f32>>,
}

/// Convolution backward: the gradients of the input and of the weight given the output
/// gradient `dy`, each only when asked for.
pub fn conv2d_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: &ConvGeom,
    max_col_elems: usize,
    want_dx: bool,
    want_dw: bool,
) -> Result<ConvGrads> {
    let (k, opix) = (g.k(), g.out_pixels());
    let mut dx = want_dx.then(|| vec![0f32; g.batch * g.in_image()]);
    let mut dw = want_dw.then(|| vec![0f32; g.c_out * k]);
    let mut cols = vec![0f32; k * g.rows_per_chunk(max_col_elems) * g.w_out];
    for b in 0..g.batch {
        let x_img = &x[b * g.in_image()..(b + 1) * g.in_image()];
        for (r0, rows) in bands(g, max_col_elems) {
            let npix = rows * g.w_out;
            // This band of dy as a contiguous [c_out, npix] matrix.
            let mut dy_band = Vec::with_capacity(g.c_out * npix);
            for o in 0..g.c_out {
                let src = b * g.out_image() + o * opix + r0 * g.w_out;
                dy_band.extend_from_slice(&dy[src..src + npix]);
            }
            if let Some(dw) = dw.as_mut() {
                im2col(x_img, g, r0, rows, &mut cols[..k * npix]);
                // dW += dY_band · colsᵀ
                let part = gemm(
                    &dy_band,
                    &cols[..k * npix],
                    None,
                    &Gemm { batch: 1, m: g.c_out, k: npix, n: k, trans_a: false, trans_b: true },
                )?;
                dw.iter_mut().zip(&part).for_each(|(a, p)| *a += p);
            }
            if let Some(dx) = dx.as_mut() {
                // dcols = Wᵀ · dY_band, then back onto the pixels the columns came from.
                let dcols = gemm(
                    w,
                    &dy_band,
                    None,
                    &Gemm { batch: 1, m: k, k: g.c_out, n: npix, trans_a: true, trans_b: false },
                )?;
                col2im_add(&dcols, g, r0, rows, &mut dx[b * g.in_image()..(b + 1) * g.in_image()]);
            }
        }
    }
    Ok(ConvGrads { dx, dw })
}

/// Nearest-neighbour 2× upsampling of `planes` planes of `h × w`: `out[p, y, x] =
/// x[p, y/2, x/2]`.
pub fn upsample_nearest2x(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(planes * 4 * h * w);
    for p in 0..planes {
        for oy in 0..2 * h {
            let row = &x[(p * h + oy / 2) * w..(p * h + oy / 2 + 1) * w];
            out.extend((0..2 * w).map(|ox| row[ox / 2]));
        }
    }
    out
}

/// The adjoint of [`upsample_nearest2x`]: each input pixel gets the sum of its 2×2 block.
pub fn upsample_nearest2x_backward(g: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let (h2, w2) = (2 * h, 2 * w);
    let mut dx = vec![0f32; planes * h * w];
    for (i, v) in g.iter().enumerate() {
        let (ox, oy, p) = (i % w2, (i / w2) % h2, i / (w2 * h2));
        dx[(p * h + oy / 2) * w + ox / 2] += v;
    }
    dx
}

/// Forward of the channel RMS norm.
pub fn channel_rms_norm(x: &[f32], gamma: &[f32], n: &ChannelNorm) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let scale = n.scale() as f64;
    for p in 0..n.batch * n.s {
        let base = n.base(p);
        let norm = (0..n.c).map(|c| (x[base + c * n.s] as f64).powi(2)).sum::<f64>().sqrt();
        let denom = norm.max(n.eps as f64);
        for (c, &gm) in gamma.iter().enumerate() {
            let i = base + c * n.s;
            y[i] = (x[i] as f64 / denom * scale * gm as f64) as f32;
        }
    }
    y
}

/// Backward of the channel RMS norm: `(dx, dgamma)`. With `r = 1/max(‖x‖, eps)`,
/// `dx_c = √c·r·(γ_c·dy_c − x_c·r²·Σ_k γ_k·dy_k·x_k)` (the second term vanishes where
/// the norm is clamped to eps) and `dγ_c = Σ_pixels dy_c·x_c·r·√c`.
pub fn channel_rms_norm_backward(x: &[f32], gamma: &[f32], dy: &[f32], n: &ChannelNorm) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; x.len()];
    let mut dgamma = vec![0f64; n.c];
    let scale = n.scale() as f64;
    for p in 0..n.batch * n.s {
        let base = n.base(p);
        let at = |c: usize| base + c * n.s;
        let norm = (0..n.c).map(|c| (x[at(c)] as f64).powi(2)).sum::<f64>().sqrt();
        let clamped = norm <= n.eps as f64;
        let r = 1.0 / norm.max(n.eps as f64);
        let dot: f64 = (0..n.c).map(|c| gamma[c] as f64 * dy[at(c)] as f64 * x[at(c)] as f64).sum();
        let proj = if clamped { 0.0 } else { r * r * dot };
        for (c, (&gm, dg)) in gamma.iter().zip(dgamma.iter_mut()).enumerate() {
            let (xv, gv) = (x[at(c)] as f64, dy[at(c)] as f64);
            dx[at(c)] = (scale * r * (gm as f64 * gv - xv * proj)) as f32;
            *dg += gv * xv * r * scale;
        }
    }
    (dx, dgamma.into_iter().map(|v| v as f32).collect())
}
