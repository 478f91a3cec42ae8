//! Normalisation ops: forward against formulas evaluated in f64, gradients against finite
//! differences, bad inputs, and (with a GPU) the CUDA kernels against the CPU reference.
mod common;
use common::*;
use synthos_engine::{autograd, ops, DType, Device, Result, Rng, Tensor};

const EPS: f32 = 1e-5;

fn randn_scaled(shape: &[usize], std: f32, mean: f32, rng: &mut Rng) -> Tensor {
    let v: Vec<f32> = rng.normal_vec(shape.iter().product(), std).into_iter().map(|x| x + mean).collect();
    Tensor::from_vec(v, shape, Device::Cpu).unwrap()
}

/// Reference normalisation of each row of `x` in f64: `(x - mean)/sqrt(var + eps)`, with
/// mean 0 when `rms`.
fn normalise_f64(x: &[f32], d: usize, eps: f32, rms: bool) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(d) {
        let r: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        let mean = if rms { 0.0 } else { r.iter().sum::<f64>() / d as f64 };
        let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        out.extend(r.iter().map(|v| (v - mean) / (var + eps as f64).sqrt()));
    }
    out
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

#[test]
fn layer_norm_forward_matches_formula() {
    let mut rng = Rng::new(11);
    let d = 13;
    // A large mean makes a one-pass E[x²] − mean² variance lose digits.
    let x = randn_scaled(&[3, 5, d], 2.0, 30.0, &mut rng);
    let w = randn(&[d], &mut rng);
    let b = randn(&[d], &mut rng);
    let xv = x.to_vec().unwrap();
    let (wv, bv) = (w.to_vec().unwrap(), b.to_vec().unwrap());
    let xhat = normalise_f64(&xv, d, EPS, false);

    let y = ops::layer_norm(&x, Some(&w), Some(&b), EPS).unwrap();
    assert_eq!(y.shape(), &[3, 5, d]);
    let want: Vec<f64> = xhat.iter().enumerate().map(|(i, v)| v * wv[i % d] as f64 + bv[i % d] as f64).collect();
    assert_close(&y.to_vec().unwrap(), &to_f32(&want), 1e-5, 1e-5, "layer_norm affine");

    let y = ops::layer_norm(&x, None, None, EPS).unwrap();
    assert_close(&y.to_vec().unwrap(), &to_f32(&xhat), 1e-5, 1e-5, "layer_norm plain");

    let y = ops::layer_norm(&x, Some(&w), None, EPS).unwrap();
    let want: Vec<f64> = xhat.iter().enumerate().map(|(i, v)| v * wv[i % d] as f64).collect();
    assert_close(&y.to_vec().unwrap(), &to_f32(&want), 1e-5, 1e-5, "layer_norm weight only");

    let y = ops::layer_norm(&x, None, Some(&b), EPS).unwrap();
    let want: Vec<f64> = xhat.iter().enumerate().map(|(i, v)| v + bv[i % d] as f64).collect();
    assert_close(&y.to_vec().unwrap(), &to_f32(&want), 1e-5, 1e-5, "layer_norm bias only");
}

#[test]
fn layer_norm_uses_eps_and_biased_variance() {
    // Row [1, 3]: mean 2, biased variance 1 → (x − 2)/sqrt(1 + eps).
    let x = Tensor::from_vec(vec![1.0, 3.0], &[1, 2], Device::Cpu).unwrap();
    let y = ops::layer_norm(&x, None, None, 0.5).unwrap().to_vec().unwrap();
    let s = 1.0 / 1.5f32.sqrt();
    assert_close(&y, &[-s, s], 1e-6, 0.0, "eps inside the square root");
}

#[test]
fn rms_norm_forward_matches_formula() {
    let mut rng = Rng::new(12);
    let d = 13;
    let x = randn_scaled(&[3, 5, d], 1.5, 0.7, &mut rng);
    let w = randn(&[d], &mut rng);
    let (xv, wv) = (x.to_vec().unwrap(), w.to_vec().unwrap());
    let xhat = normalise_f64(&xv, d, 1e-6, true);
    let want: Vec<f64> = xhat.iter().enumerate().map(|(i, v)| v * wv[i % d] as f64).collect();
    let y = ops::rms_norm(&x, &w, 1e-6).unwrap();
    assert_close(&y.to_vec().unwrap(), &to_f32(&want), 1e-5, 1e-5, "rms_norm");
    // No mean subtraction: a constant row maps to sign·w (|x|/rms = 1).
    let c = Tensor::from_vec(vec![-4.0; d], &[1, d], Device::Cpu).unwrap();
    let y = ops::rms_norm(&c, &w, 0.0).unwrap().to_vec().unwrap();
    let neg_w: Vec<f32> = wv.iter().map(|v| -v).collect();
    assert_close(&y, &neg_w, 1e-6, 1e-6, "rms_norm of a constant row");
}

#[test]
fn layer_norm_modulate_forward_matches_formula() {
    let mut rng = Rng::new(13);
    let (b, n, d) = (3, 5, 13);
    let x = randn_scaled(&[b, n, d], 1.0, -0.5, &mut rng);
    let xv = x.to_vec().unwrap();
    let xhat = normalise_f64(&xv, d, 1e-6, false);
    for groups in [b, 1] {
        let shift = randn(&[groups, 1, d], &mut rng);
        let scale = randn(&[groups, 1, d], &mut rng);
        let (sh, sc) = (shift.to_vec().unwrap(), scale.to_vec().unwrap());
        let want: Vec<f64> = xhat
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let p = if groups == 1 { i % d } else { (i / (n * d)) * d + i % d };
                v * (1.0 + sc[p] as f64) + sh[p] as f64
            })
            .collect();
        let y = ops::layer_norm_modulate(&x, &shift, &scale, 1e-6).unwrap();
        assert_eq!(y.shape(), &[b, n, d]);
        assert_close(&y.to_vec().unwrap(), &to_f32(&want), 1e-5, 1e-5, &format!("modulate, {groups} groups"));
    }
}

#[test]
fn norm_gradients() {
    let mut rng = Rng::new(14);
    let (b, n, d) = (3, 5, 13);
    let x = randn_scaled(&[b, n, d], 1.3, 0.4, &mut rng);
    let w = randn_scaled(&[d], 0.5, 1.0, &mut rng);
    let bias = randn(&[d], &mut rng);
    gradcheck(
        "layer_norm affine",
        |t| ops::layer_norm(&t[0], Some(&t[1]), Some(&t[2]), EPS),
        &[x.clone(), w.clone(), bias.clone()],
        1e-2,
        1e-2,
    );
    gradcheck("layer_norm plain", |t| ops::layer_norm(&t[0], None, None, EPS), std::slice::from_ref(&x), 1e-2, 1e-2);
    gradcheck(
        "layer_norm weight",
        |t| ops::layer_norm(&t[0], Some(&t[1]), None, EPS),
        &[x.clone(), w.clone()],
        1e-2,
        1e-2,
    );
    gradcheck(
        "layer_norm bias",
        |t| ops::layer_norm(&t[0], None, Some(&t[1]), EPS),
        &[x.clone(), bias.clone()],
        1e-2,
        1e-2,
    );
    gradcheck("rms_norm", |t| ops::rms_norm(&t[0], &t[1], 1e-6), &[x.clone(), w.clone()], 1e-2, 1e-2);
    // 2-D input: rows are not a [B, N] grid.
    let x2 = randn(&[7, d], &mut rng);
    gradcheck("layer_norm 2-D", |t| ops::layer_norm(&t[0], Some(&t[1]), Some(&t[2]), EPS), &[x2, w, bias], 1e-2, 1e-2);
    for groups in [b, 1] {
        let shift = randn(&[groups, 1, d], &mut rng);
        let scale = randn_scaled(&[groups, 1, d], 0.3, 0.0, &mut rng);
        gradcheck(
            &format!("layer_norm_modulate {groups} groups"),
            |t| ops::layer_norm_modulate(&t[0], &t[1], &t[2], 1e-6),
            &[x.clone(), shift, scale],
            1e-2,
            1e-2,
        );
    }
}

#[test]
fn only_tracked_inputs_get_gradients() {
    let mut rng = Rng::new(15);
    let d = 13;
    let x0 = randn(&[5, d], &mut rng);
    let w0 = randn(&[d], &mut rng);
    let seed = randn(&[5, d], &mut rng);
    // Reference: everything tracked.
    let (x, w_all) = (x0.deep_copy().unwrap().requires_grad(), w0.deep_copy().unwrap().requires_grad());
    let y = ops::rms_norm(&x, &w_all, 1e-6).unwrap();
    let all = autograd::backward_with(&y, seed.clone()).unwrap();
    assert_eq!(all.len(), 2);
    // Frozen input, trained weight.
    let w = w0.deep_copy().unwrap().requires_grad();
    let y = ops::rms_norm(&x0, &w, 1e-6).unwrap();
    assert_eq!(autograd::tape_len(), 1);
    let some = autograd::backward_with(&y, seed).unwrap();
    assert_eq!(some.len(), 1, "only the weight gets a gradient");
    assert_eq!(some.get(&w).unwrap().to_vec().unwrap(), all.get(&w_all).unwrap().to_vec().unwrap());
    // Nothing tracked: nothing recorded.
    let y = ops::layer_norm(&x0, Some(&w0), None, EPS).unwrap();
    assert!(!y.is_tracked());
    assert_eq!(autograd::tape_len(), 0);
}

#[test]
fn bad_inputs_are_errors() {
    let mut rng = Rng::new(16);
    let x = randn(&[3, 5, 13], &mut rng);
    let w12 = randn(&[12], &mut rng);
    let e = ops::layer_norm(&x, Some(&w12), None, EPS).unwrap_err().to_string();
    assert!(e.contains("layer_norm") && e.contains("weight") && e.contains("[12]") && e.contains("[13]"), "{e}");
    let e = ops::layer_norm(&x, None, Some(&w12), EPS).unwrap_err().to_string();
    assert!(e.contains("bias") && e.contains("[12]"), "{e}");
    let e = ops::rms_norm(&x, &w12, EPS).unwrap_err().to_string();
    assert!(e.contains("rms_norm") && e.contains("weight"), "{e}");

    let good = randn(&[3, 1, 13], &mut rng);
    let bad = randn(&[3, 5, 13], &mut rng);
    let e = ops::layer_norm_modulate(&x, &bad, &bad, EPS).unwrap_err().to_string();
    assert!(e.contains("layer_norm_modulate") && e.contains("[3, 5, 13]") && e.contains("[3, 1, 13]"), "{e}");
    let e = ops::layer_norm_modulate(&x, &good, &randn(&[1, 1, 13], &mut rng), EPS).unwrap_err().to_string();
    assert!(e.contains("shift") && e.contains("scale"), "{e}");
    let wrong_b = randn(&[2, 1, 13], &mut rng);
    assert!(ops::layer_norm_modulate(&x, &wrong_b, &wrong_b, EPS).is_err());
    let e = ops::layer_norm_modulate(&randn(&[15, 13], &mut rng), &good, &good, EPS).unwrap_err().to_string();
    assert!(e.contains("[B, N, D]"), "{e}");

    let empty = Tensor::zeros(&[0, 13], DType::F32, Device::Cpu).unwrap();
    assert!(ops::layer_norm(&empty, None, None, EPS).unwrap_err().to_string().contains("non-empty"));
    let e = ops::layer_norm(&x, None, None, -1.0).unwrap_err().to_string();
    assert!(e.contains("eps"), "{e}");
}

// ---------------------------------------------------------------------------------------
// GPU parity

#[derive(Clone, Copy, Debug)]
enum Op {
    LayerNorm,
    LayerNormPlain,
    Modulate,
    ModulateShared,
    Rms,
}

impl Op {
    /// Input shapes for x of `[b, n, d]` (x first, then the parameters).
    fn shapes(self, b: usize, n: usize, d: usize) -> Vec<Vec<usize>> {
        match self {
            Op::LayerNorm => vec![vec![b, n, d], vec![d], vec![d]],
            Op::LayerNormPlain => vec![vec![b, n, d]],
            Op::Modulate => vec![vec![b, n, d], vec![b, 1, d], vec![b, 1, d]],
            Op::ModulateShared => vec![vec![b, n, d], vec![1, 1, d], vec![1, 1, d]],
            Op::Rms => vec![vec![b, n, d], vec![d]],
        }
    }

    fn run(self, t: &[Tensor]) -> Result<Tensor> {
        match self {
            Op::LayerNorm => ops::layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-6),
            Op::LayerNormPlain => ops::layer_norm(&t[0], None, None, 1e-6),
            Op::Modulate | Op::ModulateShared => ops::layer_norm_modulate(&t[0], &t[1], &t[2], 1e-6),
            Op::Rms => ops::rms_norm(&t[0], &t[1], 1e-6),
        }
    }
}

/// Tolerance (atol as a fraction of the reference's largest magnitude, rtol) for results
/// stored in `dtype`.
fn tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-5, 1e-4),
        DType::BF16 => (8e-3, 1.6e-2),
    }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// Runs `op` on the GPU with x in `xdt` and parameters in `pdt`, and on the CPU on the
/// same (rounded) values; compares the outputs and every input's gradient. Returns the
/// GPU gradients of every input, x's first (for the determinism checks).
fn gpu_parity(
    dev: Device,
    op: Op,
    (b, n, d): (usize, usize, usize),
    xdt: DType,
    pdt: DType,
    seed: u64,
) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let shapes = op.shapes(b, n, d);
    let host: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| match k {
            0 => randn_scaled(s, 1.7, 0.3, &mut rng),
            _ => randn_scaled(s, 0.5, 0.2, &mut rng),
        })
        .collect();
    let gpu: Vec<Tensor> = host
        .iter()
        .enumerate()
        .map(|(k, t)| t.to_device(dev, if k == 0 { xdt } else { pdt }).unwrap().requires_grad())
        .collect();
    let cpu: Vec<Tensor> = gpu.iter().map(|t| t.to_device(Device::Cpu, DType::F32).unwrap().requires_grad()).collect();
    let what = format!("{op:?} [{b}, {n}, {d}] x {xdt} params {pdt}");

    let yg = op.run(&gpu).unwrap();
    assert_eq!(yg.dtype(), xdt, "{what}: output dtype");
    let yc = op.run(&cpu).unwrap();
    let (yg_v, yc_v) = (yg.to_vec().unwrap(), yc.to_vec().unwrap());
    let (a, r) = tol(xdt);
    assert_close(&yg_v, &yc_v, a * max_abs(&yc_v), r, &format!("{what}: forward"));

    let seed_grad = Tensor::randn(&[b, n, d], 1.0, &mut rng, Device::Cpu).unwrap();
    let sg = seed_grad.to_device(dev, xdt).unwrap();
    let sc = sg.to_device(Device::Cpu, DType::F32).unwrap();
    let gg = autograd::backward_with(&yg, sg).unwrap();
    let gc = autograd::backward_with(&yc, sc).unwrap();
    let mut grads = Vec::new();
    for (k, (tg, tc)) in gpu.iter().zip(&cpu).enumerate() {
        let g = gg.get(tg).unwrap_or_else(|| panic!("{what}: no GPU gradient for input {k}"));
        assert_eq!(g.dtype(), tg.dtype(), "{what}: gradient {k} dtype");
        let (g, c) = (g.to_vec().unwrap(), gc.get(tc).unwrap().to_vec().unwrap());
        let (a, r) = tol(tg.dtype());
        assert_close(&g, &c, a * max_abs(&c), r, &format!("{what}: gradient of input {k}"));
        grads.push(g);
    }
    grads
}

#[test]
fn gpu_norms_match_cpu() {
    let Some(dev) = gpu() else { return };
    let ops_all = [Op::LayerNorm, Op::LayerNormPlain, Op::Modulate, Op::ModulateShared, Op::Rms];
    // Odd sizes (scalar path); the real width (16-byte vectors); odd widths past the
    // register cache (scalar, re-read path) and a vectorisable one past it.
    let sizes = [(3, 5, 13), (2, 7, 1536), (2, 3, 1537), (1, 3, 8200)];
    let mut seed = 100;
    for op in ops_all {
        for size in sizes {
            for (xdt, pdt) in [
                (DType::F32, DType::F32),
                (DType::BF16, DType::BF16),
                (DType::BF16, DType::F32),
                (DType::F32, DType::BF16),
            ] {
                seed += 1;
                gpu_parity(dev, op, size, xdt, pdt, seed);
            }
        }
    }
}

/// The warp norms (`SYNTHOS_CUDA_NORM=warp`, opt-in: the one-warp-per-row forward, and the
/// backward's `dx` by warps with the parameter gradients by a column reduction) on the same
/// ops and dtypes. Rows of up to 256 vectors take the warp forward (odd widths, the DiT's
/// 1536, more rows than warps in one block), and the warp backward where they are also
/// whole 16-byte vectors (1536 and 200); 13 and 8200 stay on the block kernels. 901 rows per
/// group split the parameter gradients into several row blocks with a short last one.
#[test]
fn gpu_warp_forward_norms_match_cpu() {
    let Some(dev) = gpu() else { return };
    let ops_all = [Op::LayerNorm, Op::LayerNormPlain, Op::Modulate, Op::ModulateShared, Op::Rms];
    let sizes = [(3, 5, 13), (2, 7, 1536), (2, 37, 200), (1, 3, 8200)];
    let mut seed = 200;
    synthos_engine::cuda::norm::with_warp_forward(true, || {
        for op in ops_all {
            for size in sizes {
                for (xdt, pdt) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::BF16, DType::F32)] {
                    seed += 1;
                    gpu_parity(dev, op, size, xdt, pdt, seed);
                }
            }
        }
        // Many rows per group, with two groups (Modulate) and one (RMSNorm).
        for (op, xdt, pdt) in [
            (Op::Modulate, DType::BF16, DType::F32),
            (Op::Modulate, DType::F32, DType::BF16),
            (Op::Rms, DType::BF16, DType::BF16),
        ] {
            seed += 1;
            gpu_parity(dev, op, (2, 901, 1536), xdt, pdt, seed);
        }
    });
}

#[test]
fn gpu_norm_parameter_gradients_are_deterministic() {
    let Some(dev) = gpu() else { return };
    // Many rows per group, so the two-stage reduction has several partial rows.
    for op in [Op::Modulate, Op::LayerNorm] {
        let a = gpu_parity(dev, op, (2, 901, 1536), DType::BF16, DType::F32, 7);
        let b = gpu_parity(dev, op, (2, 901, 1536), DType::BF16, DType::F32, 7);
        assert_eq!(a, b, "{op:?}: gradients differ between identical runs");
    }
}

/// The warp backward (`SYNTHOS_CUDA_NORM=warp`) is reproducible bit for bit: its parameter
/// gradients' row split depends only on the sizes, with no atomics.
#[test]
fn gpu_warp_backward_is_deterministic() {
    let Some(dev) = gpu() else { return };
    synthos_engine::cuda::norm::with_warp_forward(true, || {
        for op in [Op::Modulate, Op::LayerNorm] {
            let a = gpu_parity(dev, op, (2, 901, 1536), DType::BF16, DType::F32, 8);
            let b = gpu_parity(dev, op, (2, 901, 1536), DType::BF16, DType::F32, 8);
            assert_eq!(a, b, "{op:?}: gradients differ between identical warp runs");
        }
    });
}
