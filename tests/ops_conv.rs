//! Convolution-family ops (conv2d, nearest upsampling, channel RMS norm, and the VAE
//! spatial attention): forward against direct formulas in f64, gradients against finite
//! differences, banded (memory-capped) convolution against the one-band result, bad
//! inputs, and (with a GPU) every kernel against the CPU reference.
mod common;
use common::*;
use synthos_engine::models::vae;
use synthos_engine::ops::{self, Conv2dOptions, Padding2d};
use synthos_engine::{autograd, DType, Device, Rng, Tensor};

/// One convolution case: input `[b, c, h, w]`, weight `[o, c, kh, kw]`.
#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: Padding2d,
    bias: bool,
}

impl Case {
    fn new(b: usize, c: usize, hw: (usize, usize), o: usize, k: (usize, usize), stride: usize, pad: Padding2d) -> Case {
        Case { b, c, h: hw.0, w: hw.1, o, kh: k.0, kw: k.1, stride, pad, bias: true }
    }
    fn out_hw(&self) -> (usize, usize) {
        let p = self.pad;
        (
            (self.h + p.top + p.bottom - self.kh) / self.stride + 1,
            (self.w + p.left + p.right - self.kw) / self.stride + 1,
        )
    }
    fn opts(&self, max_col: usize) -> Conv2dOptions {
        Conv2dOptions { stride: self.stride, padding: self.pad, max_col_elems: max_col }
    }
    fn inputs(&self, rng: &mut Rng) -> (Tensor, Tensor, Option<Tensor>) {
        (
            randn(&[self.b, self.c, self.h, self.w], rng),
            randn(&[self.o, self.c, self.kh, self.kw], rng),
            self.bias.then(|| randn(&[self.o], rng)),
        )
    }
}

/// Direct convolution in f64.
fn conv_reference(c: &Case, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (ho, wo) = c.out_hw();
    let mut out = vec![0f32; c.b * c.o * ho * wo];
    for b in 0..c.b {
        for o in 0..c.o {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = bias.map_or(0.0, |bv| bv[o] as f64);
                    for ci in 0..c.c {
                        for ky in 0..c.kh {
                            for kx in 0..c.kw {
                                let iy = (oy * c.stride + ky) as isize - c.pad.top as isize;
                                let ix = (ox * c.stride + kx) as isize - c.pad.left as isize;
                                if iy < 0 || ix < 0 || iy >= c.h as isize || ix >= c.w as isize {
                                    continue;
                                }
                                let xv = x[((b * c.c + ci) * c.h + iy as usize) * c.w + ix as usize] as f64;
                                acc += xv * w[((o * c.c + ci) * c.kh + ky) * c.kw + kx] as f64;
                            }
                        }
                    }
                    out[((b * c.o + o) * ho + oy) * wo + ox] = acc as f32;
                }
            }
        }
    }
    out
}

fn cases() -> Vec<Case> {
    let p = Padding2d::same;
    vec![
        Case::new(2, 3, (7, 9), 5, (3, 3), 1, p(1)),
        // The VAE's downsampling: zero row and column after the input, stride 2.
        Case::new(1, 4, (9, 11), 3, (3, 3), 2, Padding2d { top: 0, bottom: 1, left: 0, right: 1 }),
        Case { bias: false, ..Case::new(3, 5, (5, 7), 7, (1, 1), 1, p(0)) },
        Case::new(2, 2, (6, 5), 3, (5, 3), 1, Padding2d { top: 2, bottom: 1, left: 0, right: 3 }),
        Case::new(1, 3, (8, 7), 2, (3, 3), 3, p(2)),
    ]
}

#[test]
fn conv2d_forward_matches_direct_convolution() {
    let mut rng = Rng::new(31);
    for c in cases() {
        let (x, w, b) = c.inputs(&mut rng);
        let want = conv_reference(
            &c,
            &x.to_vec().unwrap(),
            &w.to_vec().unwrap(),
            b.as_ref().map(|t| t.to_vec().unwrap()).as_deref(),
        );
        let (ho, wo) = c.out_hw();
        for max_col in [ops::DEFAULT_MAX_COL_ELEMS, 1, c.c * c.kh * c.kw * wo * 2 + 3] {
            let y = ops::conv2d_opts(&x, &w, b.as_ref(), &c.opts(max_col)).unwrap();
            assert_eq!(y.shape(), &[c.b, c.o, ho, wo], "{c:?}");
            assert_close(&y.to_vec().unwrap(), &want, 1e-5, 1e-5, &format!("{c:?} max_col {max_col}"));
        }
    }
    // The plain form is symmetric padding.
    let c = cases()[0];
    let (x, w, b) = c.inputs(&mut rng);
    let a = ops::conv2d(&x, &w, b.as_ref(), 1, 1).unwrap().to_vec().unwrap();
    let want = conv_reference(
        &c,
        &x.to_vec().unwrap(),
        &w.to_vec().unwrap(),
        b.as_ref().map(|t| t.to_vec().unwrap()).as_deref(),
    );
    assert_close(&a, &want, 1e-5, 1e-5, "conv2d(stride 1, padding 1)");
}

#[test]
fn conv2d_gradients() {
    let mut rng = Rng::new(32);
    for c in cases() {
        let (x, w, b) = c.inputs(&mut rng);
        let (_, wo) = c.out_hw();
        // Bands of two output rows, so gradients cross band boundaries.
        for max_col in [ops::DEFAULT_MAX_COL_ELEMS, c.c * c.kh * c.kw * wo * 2] {
            let opts = c.opts(max_col);
            let name = format!("conv2d {c:?} max_col {max_col}");
            match &b {
                Some(b) => gradcheck(
                    &name,
                    |t| ops::conv2d_opts(&t[0], &t[1], Some(&t[2]), &opts),
                    &[x.clone(), w.clone(), b.clone()],
                    1e-2,
                    1e-2,
                ),
                None => gradcheck(
                    &name,
                    |t| ops::conv2d_opts(&t[0], &t[1], None, &opts),
                    &[x.clone(), w.clone()],
                    1e-2,
                    1e-2,
                ),
            }
        }
    }
}

#[test]
fn conv2d_bad_inputs_are_errors() {
    let mut rng = Rng::new(33);
    let x = randn(&[1, 3, 8, 8], &mut rng);
    let err = |r: synthos_engine::Result<Tensor>| r.unwrap_err().to_string();
    let e = err(ops::conv2d(&x, &randn(&[4, 2, 3, 3], &mut rng), None, 1, 1));
    assert!(e.contains("conv2d") && e.contains("expects 2 input channels") && e.contains("[1, 3, 8, 8]"), "{e}");
    let w = randn(&[4, 3, 3, 3], &mut rng);
    let e = err(ops::conv2d(&x, &w, Some(&randn(&[3], &mut rng)), 1, 1));
    assert!(e.contains("bias of shape [3]") && e.contains("expected [4]"), "{e}");
    let e = err(ops::conv2d(&randn(&[3, 8, 8], &mut rng), &w, None, 1, 1));
    assert!(e.contains("input must be [B, C, H, W]") && e.contains("[3, 8, 8]"), "{e}");
    let e = err(ops::conv2d(&x, &randn(&[4, 3, 3], &mut rng), None, 1, 1));
    assert!(e.contains("weight must be [out, in, kh, kw]"), "{e}");
    let e = err(ops::conv2d(&randn(&[1, 3, 2, 8], &mut rng), &w, None, 1, 0));
    assert!(e.contains("kernel 3×3") && e.contains("larger than the padded input 2×8"), "{e}");
    let e = err(ops::conv2d(&x, &w, None, 0, 1));
    assert!(e.contains("stride (0)"), "{e}");
}

#[test]
fn upsample_forward_and_gradient() {
    let mut rng = Rng::new(34);
    let x = randn(&[2, 3, 5, 7], &mut rng);
    let y = ops::upsample_nearest2x(&x).unwrap();
    assert_eq!(y.shape(), &[2, 3, 10, 14]);
    let (xv, yv) = (x.to_vec().unwrap(), y.to_vec().unwrap());
    for (i, v) in yv.iter().enumerate() {
        let (ox, oy, p) = (i % 14, (i / 14) % 10, i / 140);
        assert_eq!(*v, xv[(p * 5 + oy / 2) * 7 + ox / 2], "element {i}");
    }
    gradcheck("upsample_nearest2x", |t| ops::upsample_nearest2x(&t[0]), &[randn(&[3, 5, 3], &mut rng)], 1e-2, 1e-3);
    let e = ops::upsample_nearest2x(&randn(&[5], &mut rng)).unwrap_err().to_string();
    assert!(e.contains("upsample_nearest2x") && e.contains("[5]"), "{e}");
}

/// Channel RMS norm in f64: x / max(‖x_pixel‖, eps) · √C · γ.
fn channel_norm_reference(x: &[f32], gamma: &[f32], shape: &[usize], eps: f64) -> Vec<f32> {
    let (b, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    let mut y = vec![0f32; x.len()];
    for bi in 0..b {
        for p in 0..s {
            let at = |ch: usize| (bi * c + ch) * s + p;
            let norm = (0..c).map(|ch| (x[at(ch)] as f64).powi(2)).sum::<f64>().sqrt().max(eps);
            for ch in 0..c {
                y[at(ch)] = (x[at(ch)] as f64 / norm * (c as f64).sqrt() * gamma[ch] as f64) as f32;
            }
        }
    }
    y
}

#[test]
fn channel_rms_norm_forward_and_gradients() {
    let mut rng = Rng::new(35);
    let shape = [2, 5, 3, 7];
    let x = randn(&shape, &mut rng);
    let gamma =
        Tensor::from_vec(rng.normal_vec(5, 0.3).into_iter().map(|v| v + 1.0).collect(), &[5], Device::Cpu).unwrap();
    let y = ops::channel_rms_norm(&x, &gamma, 1e-12).unwrap();
    let want = channel_norm_reference(&x.to_vec().unwrap(), &gamma.to_vec().unwrap(), &shape, 1e-12);
    assert_close(&y.to_vec().unwrap(), &want, 1e-6, 1e-5, "channel_rms_norm");
    // Each pixel's output has RMS |γ| when γ is constant: y = x/rms(x).
    let ones = Tensor::full(&[5], 1.0, DType::F32, Device::Cpu).unwrap();
    let y1 = ops::channel_rms_norm(&x, &ones, 1e-12).unwrap().to_vec().unwrap();
    for p in 0..21 {
        let ms: f32 = (0..5).map(|c| y1[c * 21 + p].powi(2)).sum::<f32>() / 5.0;
        assert!((ms - 1.0).abs() < 1e-5, "pixel {p}: mean square {ms}");
    }
    // A zero pixel stays zero (the norm is clamped to eps, not divided by 0).
    let mut zv = x.to_vec().unwrap();
    for c in 0..5 {
        zv[c * 21] = 0.0;
    }
    let z = ops::channel_rms_norm(&Tensor::from_vec(zv, &shape, Device::Cpu).unwrap(), &gamma, 1e-12)
        .unwrap()
        .to_vec()
        .unwrap();
    assert!((0..5).all(|c| z[c * 21] == 0.0));
    // Rank 3 ([B, C, N]) and rank 5 ([B, C, T, H, W]) inputs normalise dim 1 too.
    let x3 = randn(&[3, 4, 11], &mut rng);
    let g4 = randn(&[4], &mut rng);
    let want3 = channel_norm_reference(&x3.to_vec().unwrap(), &g4.to_vec().unwrap(), &[3, 4, 11], 1e-12);
    assert_close(&ops::channel_rms_norm(&x3, &g4, 1e-12).unwrap().to_vec().unwrap(), &want3, 1e-6, 1e-5, "rank 3");
    gradcheck(
        "channel_rms_norm",
        |t| ops::channel_rms_norm(&t[0], &t[1], 1e-12),
        &[x.clone(), gamma.clone()],
        1e-2,
        1e-2,
    );
    gradcheck(
        "channel_rms_norm rank 5",
        |t| ops::channel_rms_norm(&t[0], &t[1], 1e-12),
        &[randn(&[1, 3, 1, 3, 5], &mut rng), randn(&[3], &mut rng)],
        1e-2,
        1e-2,
    );

    let e = ops::channel_rms_norm(&x, &randn(&[4], &mut rng), 1e-12).unwrap_err().to_string();
    assert!(e.contains("gamma has shape [4], expected [5]"), "{e}");
    let e = ops::channel_rms_norm(&randn(&[5], &mut rng), &gamma, 1e-12).unwrap_err().to_string();
    assert!(e.contains("[B, C, ...]"), "{e}");
}

/// Attention over pixels in f64: q, k, v `[b, c, n]`.
fn attention_reference(q: &[f32], k: &[f32], v: &[f32], b: usize, c: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; b * c * n];
    let s = 1.0 / (c as f64).sqrt();
    for bi in 0..b {
        let at = |t: &[f32], ch: usize, i: usize| t[(bi * c + ch) * n + i] as f64;
        for i in 0..n {
            let scores: Vec<f64> =
                (0..n).map(|j| (0..c).map(|ch| at(q, ch, i) * at(k, ch, j)).sum::<f64>() * s).collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for ch in 0..c {
                out[(bi * c + ch) * n + i] = ((0..n).map(|j| e[j] * at(v, ch, j)).sum::<f64>() / z) as f32;
            }
        }
    }
    out
}

#[test]
fn spatial_attention_matches_formula_in_chunks() {
    let mut rng = Rng::new(38);
    let (b, c, n) = (2, 6, 23);
    let (q, k, v) = (randn(&[b, c, n], &mut rng), randn(&[b, c, n], &mut rng), randn(&[b, c, n], &mut rng));
    let want = attention_reference(&q.to_vec().unwrap(), &k.to_vec().unwrap(), &v.to_vec().unwrap(), b, c, n);
    // One chunk, chunks of 5 rows (the last one short), one row at a time.
    for max in [vae::DEFAULT_MAX_SCORE_ELEMS, 5 * b * n, 1] {
        let y = vae::spatial_attention(&q, &k, &v, max).unwrap();
        assert_eq!(y.shape(), &[b, c, n]);
        assert_close(&y.to_vec().unwrap(), &want, 1e-5, 1e-4, &format!("spatial_attention max {max}"));
    }
    let (q2, k2, v2) = (randn(&[1, 3, 7], &mut rng), randn(&[1, 3, 7], &mut rng), randn(&[1, 3, 7], &mut rng));
    gradcheck("spatial_attention", |t| vae::spatial_attention(&t[0], &t[1], &t[2], 3 * 7), &[q2, k2, v2], 1e-2, 1e-2);
    let e = vae::spatial_attention(&q, &k, &randn(&[b, c, n + 1], &mut rng), 1 << 20).unwrap_err().to_string();
    assert!(e.contains("spatial_attention") && e.contains("[2, 6, 24]"), "{e}");
}

// ---------------------------------------------------------------------------------------
// GPU: every kernel against the CPU reference on bf16-representable inputs.

/// A CPU copy of `t` with bf16-rounded values (so CPU and GPU see the same inputs).
fn bf16_rounded(t: &Tensor, dev: Device) -> Tensor {
    t.to_device(dev, DType::BF16).unwrap().to_device(Device::Cpu, DType::F32).unwrap()
}

/// `|got − want| ≤ atol_frac·max|want| + rtol·|want|` elementwise, plus a relative L2 bound.
fn assert_scaled_close(got: &[f32], want: &[f32], atol_frac: f32, rtol: f32, l2: f64, what: &str) {
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    assert_close(got, want, atol_frac * max, rtol, what);
    let e = rel_err(got, want);
    assert!(e < l2, "{what}: relative L2 error {e} ≥ {l2}");
}

/// Tolerances for a dtype: (atol fraction of the max, rtol, relative L2).
fn tol(dtype: DType) -> (f32, f32, f64) {
    match dtype {
        DType::BF16 => (1.0 / 64.0, 1.0 / 64.0, 1e-2),
        // cuBLASLt runs f32 products in TF32.
        DType::F32 => (2e-3, 2e-3, 2e-3),
    }
}

/// Runs `f` on CPU copies and on GPU copies (in `dtype`) of `inputs`, seeds the backward
/// with one random gradient, and compares output and input gradients.
fn compare_gpu(
    what: &str,
    dev: Device,
    dtype: DType,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> synthos_engine::Result<Tensor>,
    rng: &mut Rng,
) {
    let cpu_in: Vec<Tensor> = inputs.iter().map(|t| bf16_rounded(t, dev).requires_grad()).collect();
    let out_c = f(&cpu_in).unwrap();
    let seed = bf16_rounded(&randn(out_c.shape(), rng), dev);
    let grads_c = autograd::backward_with(&out_c, seed.clone()).unwrap();

    let gpu_in: Vec<Tensor> = cpu_in.iter().map(|t| t.to_device(dev, dtype).unwrap().requires_grad()).collect();
    let out_g = f(&gpu_in).unwrap();
    assert_eq!(out_g.dtype(), dtype, "{what}: output dtype");
    let grads_g = autograd::backward_with(&out_g, seed.to_device(dev, dtype).unwrap()).unwrap();

    let (a, r, l2) = tol(dtype);
    assert_scaled_close(
        &out_g.to_vec().unwrap(),
        &out_c.to_vec().unwrap(),
        a,
        r,
        l2,
        &format!("{what} {dtype} output"),
    );
    for (i, (tc, tg)) in cpu_in.iter().zip(&gpu_in).enumerate() {
        let gc = grads_c.get(tc).unwrap().to_vec().unwrap();
        let gg = grads_g.get(tg).unwrap();
        assert_eq!(gg.dtype(), dtype, "{what}: gradient {i} dtype");
        assert_scaled_close(
            &gg.to_vec().unwrap(),
            &gc,
            2.0 * a,
            2.0 * r,
            2.0 * l2,
            &format!("{what} {dtype} grad {i}"),
        );
    }
}

#[test]
fn gpu_conv2d_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(41);
    let p = Padding2d::same;
    let mut all = cases();
    all.extend([
        // Batch 1 with 128-pixel rows: bands of two rows start 256-byte aligned in bf16,
        // so the GEMMs write and read the output in place.
        Case::new(1, 5, (9, 128), 6, (3, 3), 1, p(1)),
        // 1×1 on a single aligned image reads the input in place.
        Case::new(1, 37, (8, 16), 19, (1, 1), 1, p(0)),
        // The VAE's stride-2 downsampling on a larger, odd-channel image.
        Case::new(2, 19, (34, 30), 19, (3, 3), 2, Padding2d { top: 0, bottom: 1, left: 0, right: 1 }),
    ]);
    for c in all {
        let (_, wo) = c.out_hw();
        for dtype in [DType::BF16, DType::F32] {
            for max_col in [ops::DEFAULT_MAX_COL_ELEMS, c.c * c.kh * c.kw * wo * 2] {
                let opts = c.opts(max_col);
                let (x, w, b) = c.inputs(&mut rng);
                let what = format!("conv2d {c:?} max_col {max_col}");
                match b {
                    Some(b) => compare_gpu(
                        &what,
                        dev,
                        dtype,
                        &[x, w, b],
                        |t| ops::conv2d_opts(&t[0], &t[1], Some(&t[2]), &opts),
                        &mut rng,
                    ),
                    None => compare_gpu(
                        &what,
                        dev,
                        dtype,
                        &[x, w],
                        |t| ops::conv2d_opts(&t[0], &t[1], None, &opts),
                        &mut rng,
                    ),
                }
            }
        }
    }
}

/// The convolution's data movement by rows (`SYNTHOS_CUDA_IM2COL=rows`: the column
/// matrix, band copies and bias adds, and `col2im_rows` for the input gradient) gives
/// every convolution of `gpu_conv2d_matches_cpu`'s cases, and a few with input rows wider
/// than a warp, the same outputs and gradients, bit for bit, as the element kernels; so
/// does the 2× upsampling, forward and backward.
#[test]
fn gpu_im2col_by_rows_matches_the_element_kernel() {
    use synthos_engine::cuda::conv::with_im2col_by_rows;
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(43);
    let mut all = cases();
    all.push(Case::new(1, 5, (9, 128), 6, (3, 3), 1, Padding2d::same(1)));
    all.push(Case::new(2, 19, (34, 30), 19, (3, 3), 2, Padding2d { top: 0, bottom: 1, left: 0, right: 1 }));
    // col2im_rows' lanes walk rows of 70 and 45 input pixels (32 = 3·10 + 2 at stride 3);
    // at stride 2, a 1×1 kernel leaves every other input pixel without a tap.
    all.push(Case::new(1, 3, (7, 70), 2, (3, 3), 3, Padding2d { top: 1, bottom: 1, left: 2, right: 1 }));
    all.push(Case::new(2, 5, (6, 45), 3, (3, 3), 2, Padding2d::same(1)));
    all.push(Case { bias: false, ..Case::new(1, 6, (5, 37), 2, (1, 1), 2, Padding2d::same(0)) });
    for c in all {
        let (_, wo) = c.out_hw();
        let (x, w, b) = c.inputs(&mut rng);
        for dtype in [DType::BF16, DType::F32] {
            for max_col in [ops::DEFAULT_MAX_COL_ELEMS, c.c * c.kh * c.kw * wo * 2] {
                let opts = c.opts(max_col);
                let run = |rows: bool| {
                    with_im2col_by_rows(rows, || {
                        let xg = x.to_device(dev, dtype).unwrap().requires_grad();
                        let wg = w.to_device(dev, dtype).unwrap().requires_grad();
                        let bg = b.as_ref().map(|b| b.to_device(dev, dtype).unwrap().requires_grad());
                        let y = ops::conv2d_opts(&xg, &wg, bg.as_ref(), &opts).unwrap();
                        let g = autograd::backward(&ops::sum_all(&ops::mul(&y, &y).unwrap()).unwrap()).unwrap();
                        let mut out = vec![y.to_vec().unwrap(), g.get(&xg).unwrap().to_vec().unwrap()];
                        out.push(g.get(&wg).unwrap().to_vec().unwrap());
                        out
                    })
                };
                assert_eq!(run(true), run(false), "conv2d {c:?} {dtype} max_col {max_col}: rows vs elements");
            }
        }
    }
    // The 2× upsampling by rows, and its gradient (upsample2x_bwd_by_rows); rows of 300
    // input pixels take two blocks of columns.
    for shape in [[2, 3, 7, 33], [1, 2, 3, 300]] {
        let x = randn(&shape, &mut rng);
        for dtype in [DType::BF16, DType::F32] {
            let run = |rows: bool| {
                with_im2col_by_rows(rows, || {
                    let xg = x.to_device(dev, dtype).unwrap().requires_grad();
                    let y = ops::upsample_nearest2x(&xg).unwrap();
                    let g = autograd::backward(&ops::sum_all(&ops::mul(&y, &y).unwrap()).unwrap()).unwrap();
                    (y.to_vec().unwrap(), g.get(&xg).unwrap().to_vec().unwrap())
                })
            };
            assert_eq!(run(true), run(false), "upsample_nearest2x {shape:?} {dtype}: rows vs elements");
        }
    }
}

#[test]
fn gpu_conv2d_mixed_dtypes() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(42);
    let c = Case::new(2, 3, (7, 9), 5, (3, 3), 1, Padding2d::same(1));
    let (x, w, b) = c.inputs(&mut rng);
    // bf16 activations with f32 master weights: gradients come back in each dtype.
    let xg = x.to_device(dev, DType::BF16).unwrap().requires_grad();
    let wg = w.to_device(dev, DType::F32).unwrap().requires_grad();
    let bg = b.unwrap().to_device(dev, DType::F32).unwrap().requires_grad();
    let y = ops::conv2d(&xg, &wg, Some(&bg), 1, 1).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let g = autograd::backward(&ops::sum_all(&y).unwrap()).unwrap();
    assert_eq!(g.get(&xg).unwrap().dtype(), DType::BF16);
    assert_eq!(g.get(&wg).unwrap().dtype(), DType::F32);
    assert_eq!(g.get(&bg).unwrap().dtype(), DType::F32);
    let db = g.get(&bg).unwrap().to_vec().unwrap();
    let want = (c.b * 7 * 9) as f32;
    assert!(db.iter().all(|v| (v - want).abs() <= want / 64.0), "bias gradient {db:?} vs {want}");
}

#[test]
fn gpu_small_ops_match_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(43);
    for dtype in [DType::BF16, DType::F32] {
        compare_gpu(
            "upsample",
            dev,
            dtype,
            &[randn(&[2, 3, 5, 7], &mut rng)],
            |t| ops::upsample_nearest2x(&t[0]),
            &mut rng,
        );
        let gamma =
            Tensor::from_vec(rng.normal_vec(37, 0.3).into_iter().map(|v| v + 1.0).collect(), &[37], Device::Cpu)
                .unwrap();
        // 41·43 pixels per image: several pixel groups, the last one partial.
        compare_gpu(
            "channel_rms_norm",
            dev,
            dtype,
            &[randn(&[2, 37, 41, 43], &mut rng), gamma],
            |t| ops::channel_rms_norm(&t[0], &t[1], 1e-12),
            &mut rng,
        );
        compare_gpu(
            "spatial_attention",
            dev,
            dtype,
            &[randn(&[2, 24, 131], &mut rng), randn(&[2, 24, 131], &mut rng), randn(&[2, 24, 131], &mut rng)],
            |t| vae::spatial_attention(&t[0], &t[1], &t[2], 2 * 131 * 40),
            &mut rng,
        );
    }
}

#[test]
fn gpu_channel_rms_norm_large_grid() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(44);
    // More pixel groups than the kernel's grid cap (4096·32), so blocks loop.
    let x = randn(&[1, 3, 397, 401], &mut rng);
    let gamma = randn(&[3], &mut rng);
    compare_gpu(
        "channel_rms_norm large",
        dev,
        DType::F32,
        &[x, gamma],
        |t| ops::channel_rms_norm(&t[0], &t[1], 1e-12),
        &mut rng,
    );
}
