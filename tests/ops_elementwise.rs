//! Elementwise ops (activations, scalar add, gated residual, mixed-dtype arithmetic) and
//! reductions: values against direct formulas, gradients against finite differences,
//! bad inputs, and GPU kernels against the CPU reference.
mod common;
use common::*;
use synthos_engine::ops::{self, GeluApprox};
use synthos_engine::{autograd, cpu, DType, Device, Result, Rng, Tensor};

/// erf by composite Simpson integration of 2/√π·e^(−t²) (independent of the library's
/// series): error below 1e-11 for |x| ≤ 6.
fn erf_simpson(x: f64) -> f64 {
    let n = 4000;
    let h = x / n as f64;
    let mut s = 1.0 + (-x * x).exp();
    for k in 1..n {
        let t = k as f64 * h;
        s += if k % 2 == 1 { 4.0 } else { 2.0 } * (-t * t).exp();
    }
    s * h / 3.0 * std::f64::consts::FRAC_2_SQRT_PI
}

/// Test points from −6 to 6 in odd steps, plus zero.
fn points() -> Vec<f32> {
    (-60..=60).map(|k| k as f32 * 0.1 + 0.0137).chain([0.0]).collect()
}

#[test]
fn erf_matches_integration() {
    for x in [-5.9, -3.6, -3.5, -3.4, -1.0, -0.3, 0.0, 1e-4, 0.5, 1.0, 2.2, 3.49, 3.51, 4.7, 6.0] {
        let (a, b) = (cpu::elementwise::erf(x), erf_simpson(x));
        assert!((a - b).abs() < 1e-10, "erf({x}) = {a}, expected {b}");
    }
}

#[test]
fn activations_match_formulas() {
    let xs = points();
    let x = Tensor::from_vec(xs.clone(), &[xs.len()], Device::Cpu).unwrap();
    let exact = ops::gelu(&x, GeluApprox::Exact).unwrap().to_vec().unwrap();
    let tanh = ops::gelu(&x, GeluApprox::Tanh).unwrap().to_vec().unwrap();
    let silu = ops::silu(&x).unwrap().to_vec().unwrap();
    let plus = ops::add_scalar(&x, -0.75).unwrap().to_vec().unwrap();
    for (i, &v) in xs.iter().enumerate() {
        let v = v as f64;
        let e = 0.5 * v * (1.0 + erf_simpson(v / 2f64.sqrt()));
        let t = 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh());
        let s = v / (1.0 + (-v).exp());
        assert!((exact[i] as f64 - e).abs() <= 1e-6 * (1.0 + e.abs()), "gelu exact({v}) = {} vs {e}", exact[i]);
        assert!((tanh[i] as f64 - t).abs() <= 1e-6 * (1.0 + t.abs()), "gelu tanh({v}) = {} vs {t}", tanh[i]);
        assert!((silu[i] as f64 - s).abs() <= 1e-6 * (1.0 + s.abs()), "silu({v}) = {} vs {s}", silu[i]);
        assert_eq!(plus[i], xs[i] - 0.75);
    }
    // The two GELU forms differ, by at most ~5e-4 (why the choice is explicit).
    let gap = exact.iter().zip(&tanh).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(gap > 1e-5 && gap < 1e-3, "gelu exact vs tanh gap {gap}");
}

#[test]
fn activation_gradients() {
    let mut rng = Rng::new(11);
    let x = randn(&[3, 5, 7], &mut rng);
    gradcheck("gelu-exact", |t| ops::gelu(&t[0], GeluApprox::Exact), std::slice::from_ref(&x), 1e-2, 1e-2);
    gradcheck("gelu-tanh", |t| ops::gelu(&t[0], GeluApprox::Tanh), std::slice::from_ref(&x), 1e-2, 1e-2);
    gradcheck("silu", |t| ops::silu(&t[0]), std::slice::from_ref(&x), 1e-2, 1e-2);
    gradcheck("add_scalar", |t| ops::add_scalar(&t[0], 2.5), std::slice::from_ref(&x), 1e-2, 1e-2);
    // Far into the tails too, where the derivatives saturate.
    let wide = Tensor::from_vec(points(), &[points().len()], Device::Cpu).unwrap();
    gradcheck("gelu-exact-wide", |t| ops::gelu(&t[0], GeluApprox::Exact), std::slice::from_ref(&wide), 1e-2, 1e-2);
    gradcheck("silu-wide", |t| ops::silu(&t[0]), std::slice::from_ref(&wide), 1e-2, 1e-2);
}

/// Gate shapes the fused gated residual accepts for x of shape [3, 5, 13].
const GATES: [&[usize]; 6] = [&[3, 1, 13], &[1, 1, 13], &[3, 5, 13], &[13], &[3, 1, 1], &[1, 5, 13]];

#[test]
fn gated_residual_matches_composed_ops_and_gradients() {
    let mut rng = Rng::new(12);
    let x = randn(&[3, 5, 13], &mut rng);
    let y = randn(&[3, 5, 13], &mut rng);
    for gs in GATES {
        let gate = randn(gs, &mut rng);
        let fused = ops::gated_residual(&x, &gate, &y).unwrap().to_vec().unwrap();
        let composed = ops::add(&x, &ops::mul(&gate, &y).unwrap()).unwrap().to_vec().unwrap();
        assert_close(&fused, &composed, 1e-6, 1e-6, &format!("gated_residual gate {gs:?}"));
        gradcheck(
            &format!("gated_residual gate {gs:?}"),
            |t| ops::gated_residual(&t[0], &t[1], &t[2]),
            &[x.clone(), gate, y.clone()],
            1e-2,
            1e-2,
        );
    }
}

#[test]
fn gated_residual_rejects_bad_shapes() {
    let mut rng = Rng::new(13);
    let x = randn(&[3, 5, 13], &mut rng);
    let y = randn(&[3, 5, 13], &mut rng);
    for gs in [&[1, 5, 1][..], &[2, 1, 13], &[3, 5, 13, 1], &[5, 1]] {
        let gate = randn(gs, &mut rng);
        let e = ops::gated_residual(&x, &gate, &y).unwrap_err().to_string();
        assert!(e.contains("gated_residual") && e.contains(&format!("{gs:?}")) && e.contains("[3, 5, 13]"), "{e}");
    }
    let gate = randn(&[3, 1, 13], &mut rng);
    let short = randn(&[3, 4, 13], &mut rng);
    let e = ops::gated_residual(&x, &gate, &short).unwrap_err().to_string();
    assert!(e.contains("gated_residual") && e.contains("[3, 4, 13]"), "{e}");
}

/// Σ over dimension `dim` of a [a, b, c] tensor, by direct indexing.
fn direct_sum_dim(v: &[f32], s: [usize; 3], dim: usize) -> Vec<f64> {
    let mut out_shape = s;
    out_shape[dim] = 1;
    let mut out = vec![0f64; out_shape.iter().product()];
    for i in 0..s[0] {
        for j in 0..s[1] {
            for k in 0..s[2] {
                let mut o = [i, j, k];
                o[dim] = 0;
                out[(o[0] * out_shape[1] + o[1]) * out_shape[2] + o[2]] += v[(i * s[1] + j) * s[2] + k] as f64;
            }
        }
    }
    out
}

#[test]
fn reductions_match_direct_sums() {
    let mut rng = Rng::new(14);
    let s = [3, 5, 7];
    let x = randn(&s, &mut rng);
    let v = x.to_vec().unwrap();
    let total: f64 = v.iter().map(|&a| a as f64).sum();
    let sum = ops::sum_all(&x).unwrap();
    assert_eq!(sum.shape(), &[] as &[usize]);
    assert!((sum.item().unwrap() as f64 - total).abs() < 1e-5);
    assert!((ops::mean_all(&x).unwrap().item().unwrap() as f64 - total / 105.0).abs() < 1e-6);
    for dim in 0..3 {
        let want = direct_sum_dim(&v, s, dim);
        let mut kept = s.to_vec();
        kept[dim] = 1;
        let mut dropped = s.to_vec();
        dropped.remove(dim);
        let a = ops::sum_dim(&x, dim, true).unwrap();
        let b = ops::mean_dim(&x, dim, false).unwrap();
        assert_eq!(a.shape(), kept.as_slice());
        assert_eq!(b.shape(), dropped.as_slice());
        let want32: Vec<f32> = want.iter().map(|&w| w as f32).collect();
        let mean32: Vec<f32> = want.iter().map(|&w| (w / s[dim] as f64) as f32).collect();
        assert_close(&a.to_vec().unwrap(), &want32, 1e-5, 1e-5, &format!("sum_dim {dim}"));
        assert_close(&b.to_vec().unwrap(), &mean32, 1e-6, 1e-5, &format!("mean_dim {dim}"));
    }
}

#[test]
fn reduction_gradients_and_errors() {
    let mut rng = Rng::new(15);
    let x = randn(&[3, 5, 7], &mut rng);
    let one = std::slice::from_ref(&x);
    gradcheck("sum_all", |t| ops::sum_all(&t[0]), one, 1e-2, 1e-2);
    gradcheck("mean_all", |t| ops::mean_all(&t[0]), one, 1e-2, 1e-2);
    for dim in 0..3 {
        gradcheck("sum_dim", |t| ops::sum_dim(&t[0], dim, false), one, 1e-2, 1e-2);
        gradcheck("mean_dim", |t| ops::mean_dim(&t[0], dim, true), one, 1e-2, 1e-2);
    }
    let e = ops::sum_dim(&x, 3, false).unwrap_err().to_string();
    assert!(e.contains("sum_dim") && e.contains('3') && e.contains("[3, 5, 7]"), "{e}");
    let e = ops::mean_dim(&x, 7, true).unwrap_err().to_string();
    assert!(e.contains("mean_dim") && e.contains("[3, 5, 7]"), "{e}");
}

// ---------------------------------------------------------------------------------
// GPU parity

/// Checks `f` on the GPU (inputs converted to `dtype`) against the CPU reference on the
/// same rounded values: the output, and each input's gradient (which must come back in
/// the input's dtype) for one random output gradient. Per element:
/// `|gpu − cpu| ≤ atol·max|cpu| + rtol·|cpu|`.
fn parity(
    name: &str,
    dev: Device,
    dtype: DType,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    atol: f32,
    rtol: f32,
) {
    let gin: Vec<Tensor> = inputs.iter().map(|t| t.to_device(dev, dtype).unwrap().requires_grad()).collect();
    let cin: Vec<Tensor> = gin.iter().map(|t| t.to_device(Device::Cpu, DType::F32).unwrap().requires_grad()).collect();
    // CPU forward + backward first (each backward consumes only its own graph).
    let yc = f(&cin).unwrap_or_else(|e| panic!("{name}: CPU forward: {e}"));
    let mut rng = Rng::new(99);
    let seed = Tensor::randn(yc.shape(), 1.0, &mut rng, Device::Cpu).unwrap();
    let seed_dtype = if dtype == DType::BF16 { DType::BF16 } else { DType::F32 };
    let seed_gpu = seed.to_device(dev, seed_dtype).unwrap();
    let seed_cpu = seed_gpu.to_device(Device::Cpu, DType::F32).unwrap();
    let gc = autograd::backward_with(&yc, seed_cpu).unwrap();
    let yg = f(&gin).unwrap_or_else(|e| panic!("{name}: GPU forward: {e}"));
    assert_eq!(yg.shape(), yc.shape(), "{name}: output shape");
    assert_eq!(yg.device(), dev, "{name}: output device");
    let tol = |r: &[f32]| atol * r.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let want = yc.to_vec().unwrap();
    assert_close(&yg.to_vec().unwrap(), &want, tol(&want), rtol, &format!("{name} {dtype} forward"));
    let gg = autograd::backward_with(&yg, seed_gpu).unwrap_or_else(|e| panic!("{name}: GPU backward: {e}"));
    for k in 0..inputs.len() {
        let a = gg.get(&gin[k]).unwrap_or_else(|| panic!("{name}: no GPU gradient for input {k}"));
        assert_eq!(a.dtype(), dtype, "{name}: gradient {k} dtype");
        let want = gc.get(&cin[k]).unwrap_or_else(|| panic!("{name}: no CPU gradient for input {k}")).to_vec().unwrap();
        assert_close(&a.to_vec().unwrap(), &want, tol(&want), rtol, &format!("{name} {dtype} d input {k}"));
    }
}

/// (dtype, atol, rtol) for the GPU checks: bf16 tolerances are a few bf16 ulps.
const DTYPES: [(DType, f32, f32); 2] = [(DType::F32, 1e-5, 1e-4), (DType::BF16, 1.0 / 128.0, 1.0 / 64.0)];

#[test]
fn gpu_activations_match_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(21);
    for shape in [&[3, 5, 7][..], &[1_000_003]] {
        let x = Tensor::randn(shape, 2.0, &mut rng, Device::Cpu).unwrap();
        let one = std::slice::from_ref(&x);
        for (dt, atol, rtol) in DTYPES {
            parity("gelu-exact", dev, dt, one, |t| ops::gelu(&t[0], GeluApprox::Exact), atol, rtol);
            parity("gelu-tanh", dev, dt, one, |t| ops::gelu(&t[0], GeluApprox::Tanh), atol, rtol);
            parity("silu", dev, dt, one, |t| ops::silu(&t[0]), atol, rtol);
            parity("add_scalar", dev, dt, one, |t| ops::add_scalar(&t[0], 0.37), atol, rtol);
            parity("scale", dev, dt, one, |t| ops::scale(&t[0], -1.7), atol, rtol);
        }
    }
}

#[test]
fn gpu_gated_residual_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(22);
    let x = randn(&[3, 5, 13], &mut rng);
    let y = randn(&[3, 5, 13], &mut rng);
    for gs in GATES {
        let gate = randn(gs, &mut rng);
        for (dt, atol, rtol) in DTYPES {
            let inputs = [x.clone(), gate.clone(), y.clone()];
            parity(
                &format!("gated_residual {gs:?}"),
                dev,
                dt,
                &inputs,
                |t| ops::gated_residual(&t[0], &t[1], &t[2]),
                atol,
                rtol,
            );
        }
    }
    // DiT-like sizes: tokens not a multiple of anything; width odd, then a multiple of 8
    // (the kernel's one-gate-index-per-chunk path).
    for d in [67, 136] {
        let (x, y, gate) =
            (randn(&[2, 1001, d], &mut rng), randn(&[2, 1001, d], &mut rng), randn(&[2, 1, d], &mut rng));
        for (dt, atol, rtol) in DTYPES {
            parity(
                &format!("gated_residual big, width {d}"),
                dev,
                dt,
                &[x.clone(), gate.clone(), y.clone()],
                |t| ops::gated_residual(&t[0], &t[1], &t[2]),
                atol,
                rtol,
            );
        }
    }
}

#[test]
fn gpu_gated_residual_mixed_dtypes() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(23);
    let (x, y, gate) = (randn(&[3, 5, 13], &mut rng), randn(&[3, 5, 13], &mut rng), randn(&[3, 1, 13], &mut rng));
    let xg = x.to_device(dev, DType::BF16).unwrap().requires_grad();
    let yg = y.to_device(dev, DType::BF16).unwrap().requires_grad();
    let gg = gate.to_device(dev, DType::F32).unwrap().requires_grad();
    let out = ops::gated_residual(&xg, &gg, &yg).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    let want = ops::gated_residual(
        &xg.to_device(Device::Cpu, DType::F32).unwrap(),
        &gate,
        &yg.to_device(Device::Cpu, DType::F32).unwrap(),
    )
    .unwrap();
    assert_close(&out.to_vec().unwrap(), &want.to_vec().unwrap(), 2e-2, 1.0 / 64.0, "mixed gated_residual");
    let seed = Tensor::full(out.shape(), 1.0, DType::BF16, dev).unwrap();
    let g = autograd::backward_with(&out, seed).unwrap();
    assert_eq!(g.get(&gg).unwrap().dtype(), DType::F32, "an f32 gate gets an f32 gradient");
    assert_eq!(g.get(&xg).unwrap().dtype(), DType::BF16);
    // dgate = Σ_n y with a unit seed.
    let want_dgate =
        ops::sum_to(&yg.to_device(Device::Cpu, DType::F32).unwrap(), &[3, 1, 13]).unwrap().to_vec().unwrap();
    assert_close(&g.get(&gg).unwrap().to_vec().unwrap(), &want_dgate, 5e-2, 1.0 / 32.0, "mixed dgate");
}

#[test]
fn gpu_add_mixes_f32_and_bf16() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(24);
    let (a, b) = (randn(&[3, 5, 7], &mut rng), randn(&[5, 1], &mut rng));
    let ag = a.to_device(dev, DType::F32).unwrap().requires_grad();
    let bg = b.to_device(dev, DType::BF16).unwrap().requires_grad();
    let before = autograd::tape_len();
    let y = ops::mul(&ops::add(&ag, &bg).unwrap(), &ag).unwrap();
    assert_eq!(autograd::tape_len() - before, 2, "dtype conversion inside add/mul is not a tape node");
    assert_eq!(y.dtype(), DType::BF16);
    let seed = Tensor::full(y.shape(), 1.0, DType::BF16, dev).unwrap();
    let g = autograd::backward_with(&y, seed).unwrap();
    let (da, db) = (g.get(&ag).unwrap(), g.get(&bg).unwrap());
    assert_eq!((da.dtype(), db.dtype()), (DType::F32, DType::BF16));
    // y = (a + b)·a → dy/da = 2a + b, dy/db = Σ a over the broadcast dims.
    let (ac, bc) = (ag.to_device(Device::Cpu, DType::F32).unwrap(), bg.to_device(Device::Cpu, DType::F32).unwrap());
    let want_da = ops::add(&ops::scale(&ac, 2.0).unwrap(), &bc).unwrap().to_vec().unwrap();
    let want_db = ops::sum_to(&ac, &[5, 1]).unwrap().to_vec().unwrap();
    assert_close(&da.to_vec().unwrap(), &want_da, 3e-2, 1.0 / 32.0, "mixed da");
    assert_close(&db.to_vec().unwrap(), &want_db, 5e-2, 1.0 / 32.0, "mixed db");
}

#[test]
fn gpu_reductions_match_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(25);
    for shape in [&[3, 5, 37][..], &[7, 1001, 13], &[5, 3, 4099]] {
        let x = randn(shape, &mut rng);
        let one = std::slice::from_ref(&x);
        for (dt, atol, rtol) in DTYPES {
            parity("sum_all", dev, dt, one, |t| ops::sum_all(&t[0]), atol, rtol);
            parity("mean_all", dev, dt, one, |t| ops::mean_all(&t[0]), atol, rtol);
            for dim in 0..3 {
                parity(
                    &format!("sum_dim {dim} {shape:?}"),
                    dev,
                    dt,
                    one,
                    |t| ops::sum_dim(&t[0], dim, false),
                    atol,
                    rtol,
                );
                parity(
                    &format!("mean_dim {dim} {shape:?}"),
                    dev,
                    dt,
                    one,
                    |t| ops::mean_dim(&t[0], dim, true),
                    atol,
                    rtol,
                );
            }
            parity("sum_to", dev, dt, one, |t| ops::sum_to(&t[0], &[shape[0], 1, shape[2]]), atol, rtol);
        }
    }
}

#[test]
fn gpu_sum_to_every_launch_path_matches_cpu() {
    // One shape per path of `cuda::reduce::sum_to`: split column sums ([R, K], [K1, R, K2]:
    // bias and gate gradients, long and short columns), row sums ([K, R], [R]) and the
    // general kernel (interleaved reduced dimensions), at odd sizes.
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(27);
    let cases: [(&[usize], &[usize]); 8] = [
        (&[3121, 37], &[37]),
        (&[2, 1561, 45], &[2, 1, 45]),
        (&[3, 5000, 70], &[3, 1, 70]),
        (&[1, 9, 33], &[1, 1, 33]),
        (&[7, 300], &[7, 1]),
        (&[1, 4097, 1], &[1, 1, 1]),
        (&[2, 3, 4, 5], &[1, 3, 1, 5]),
        (&[6, 1, 5], &[1, 1, 5]),
    ];
    for (shape, to) in cases {
        let x = randn(shape, &mut rng);
        for (dt, atol, rtol) in DTYPES {
            parity(
                &format!("sum_to {shape:?} -> {to:?}"),
                dev,
                dt,
                std::slice::from_ref(&x),
                |t| ops::sum_to(&t[0], to),
                atol,
                rtol,
            );
            // The split depends only on the sizes: the same bits every time.
            let xg = x.to_device(dev, dt).unwrap();
            let a = ops::sum_to(&xg, to).unwrap().to_vec().unwrap();
            let b = ops::sum_to(&xg, to).unwrap().to_vec().unwrap();
            assert_eq!(a, b, "sum_to {shape:?} -> {to:?} {dt}: not deterministic");
        }
    }
}

#[test]
fn gpu_big_sum_is_accurate() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(26);
    let n = 3_000_007;
    // Positive values: no cancellation, so a serial fp32 sum would be visibly off.
    let v = rng.uniform_vec(n, 0.0, 1.0);
    let x = Tensor::from_vec(v, &[n], Device::Cpu).unwrap();
    for (dt, _, rtol) in DTYPES {
        let xg = x.to_device(dev, dt).unwrap();
        let exact: f64 = xg.to_vec().unwrap().iter().map(|&a| a as f64).sum();
        let s = ops::sum_all(&xg).unwrap().item().unwrap() as f64;
        let m = ops::mean_all(&xg).unwrap().item().unwrap() as f64;
        let tol = if dt == DType::F32 { 1e-6 } else { rtol as f64 };
        assert!((s - exact).abs() <= tol * exact, "{dt} sum_all {s} vs {exact}");
        assert!((m - exact / n as f64).abs() <= tol * exact / n as f64, "{dt} mean_all {m}");
        // Deterministic: the same split every time.
        assert_eq!(ops::sum_all(&xg).unwrap().item().unwrap() as f64, s);
    }
    let big = Tensor::randn(&[n], 1.0, &mut rng, Device::Cpu).unwrap();
    for (dt, atol, rtol) in DTYPES {
        parity("sum_all big", dev, dt, std::slice::from_ref(&big), |t| ops::sum_all(&t[0]), atol, rtol);
    }
}
