//! Elementwise ops (activations including QuickGELU and exp, clamp, scalar add, gated residual, mixed-dtype arithmetic):
//! values against direct formulas, gradients against finite differences, bad inputs, and
//! GPU kernels against the CPU reference. Reductions are in `ops_reduce.rs`.
mod common;
use common::*;
use synthos_engine::ops::{self, GeluApprox};
use synthos_engine::{autograd, cpu, DType, Device, Rng, Tensor};

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
    let quick = ops::quick_gelu(&x).unwrap().to_vec().unwrap();
    let exp = ops::exp(&x).unwrap().to_vec().unwrap();
    let plus = ops::add_scalar(&x, -0.75).unwrap().to_vec().unwrap();
    for (i, &v) in xs.iter().enumerate() {
        let v = v as f64;
        let e = 0.5 * v * (1.0 + erf_simpson(v / 2f64.sqrt()));
        let t = 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh());
        let s = v / (1.0 + (-v).exp());
        assert!((exact[i] as f64 - e).abs() <= 1e-6 * (1.0 + e.abs()), "gelu exact({v}) = {} vs {e}", exact[i]);
        assert!((tanh[i] as f64 - t).abs() <= 1e-6 * (1.0 + t.abs()), "gelu tanh({v}) = {} vs {t}", tanh[i]);
        assert!((silu[i] as f64 - s).abs() <= 1e-6 * (1.0 + s.abs()), "silu({v}) = {} vs {s}", silu[i]);
        let q = v / (1.0 + (-1.702 * v).exp());
        assert!((quick[i] as f64 - q).abs() <= 1e-6 * (1.0 + q.abs()), "quick_gelu({v}) = {} vs {q}", quick[i]);
        let ex = v.exp();
        assert!((exp[i] as f64 - ex).abs() <= 1e-6 * ex, "exp({v}) = {} vs {ex}", exp[i]);
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
    gradcheck("quick_gelu", |t| ops::quick_gelu(&t[0]), std::slice::from_ref(&x), 1e-2, 1e-2);
    gradcheck("exp", |t| ops::exp(&t[0]), std::slice::from_ref(&x), 1e-2, 1e-2);
    gradcheck("add_scalar", |t| ops::add_scalar(&t[0], 2.5), std::slice::from_ref(&x), 1e-2, 1e-2);
    // Far into the tails too, where the derivatives saturate.
    let wide = Tensor::from_vec(points(), &[points().len()], Device::Cpu).unwrap();
    gradcheck("gelu-exact-wide", |t| ops::gelu(&t[0], GeluApprox::Exact), std::slice::from_ref(&wide), 1e-2, 1e-2);
    gradcheck("silu-wide", |t| ops::silu(&t[0]), std::slice::from_ref(&wide), 1e-2, 1e-2);
    gradcheck("quick_gelu-wide", |t| ops::quick_gelu(&t[0]), std::slice::from_ref(&wide), 1e-2, 1e-2);
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

#[test]
fn clamp_forward_and_gradient() {
    let mut rng = Rng::new(37);
    let x = randn(&[4, 9], &mut rng);
    let y = ops::clamp(&x, -0.5, 0.75).unwrap().to_vec().unwrap();
    let xv = x.to_vec().unwrap();
    for (a, b) in y.iter().zip(&xv) {
        assert_eq!(*a, b.clamp(-0.5, 0.75));
    }
    // Values kept away from the bounds, where the function is differentiable.
    let v: Vec<f32> =
        rng.normal_vec(29, 1.0).into_iter().map(|v| if (v.abs() - 0.5).abs() < 0.05 { v * 2.0 } else { v }).collect();
    gradcheck(
        "clamp",
        |t| ops::clamp(&t[0], -0.5, 0.5),
        &[Tensor::from_vec(v, &[29], Device::Cpu).unwrap()],
        1e-3,
        1e-3,
    );
    let e = ops::clamp(&x, 1.0, -1.0).unwrap_err().to_string();
    assert!(e.contains("clamp") && e.contains("not an interval"), "{e}");
}

// ---------------------------------------------------------------------------------
// GPU parity

/// (dtype, atol, rtol) for the GPU checks: bf16 tolerances are a few bf16 ulps.
const DTYPES: [(DType, f32, f32); 2] = PARITY_DTYPES;

/// `Tensor::full` on the GPU is a device memset: every element is the value (rounded to
/// nearest in bf16), at sizes whose tails are not a multiple of anything.
#[test]
fn gpu_full_sets_every_element() {
    let Some(dev) = gpu() else { return };
    for n in [1usize, 7, 1_000_003] {
        for value in [1.0f32, -2.5, 1.0 / 3.0] {
            let f = Tensor::full(&[n], value, DType::F32, dev).unwrap().to_vec().unwrap();
            assert!(f.iter().all(|&v| v.to_bits() == value.to_bits()), "f32 {value} x {n}");
            let b = Tensor::full(&[n], value, DType::BF16, dev).unwrap().to_vec().unwrap();
            let want = half::bf16::from_f32(value).to_f32();
            assert!(b.iter().all(|&v| v.to_bits() == want.to_bits()), "bf16 {value} x {n}");
        }
    }
    assert_eq!(Tensor::full(&[], 4.0, DType::F32, dev).unwrap().item().unwrap(), 4.0);
}

/// `Tensor::copy_from_slice` on the GPU writes the buffer in place (a recorded CUDA graph
/// reads its address), rounding to nearest in bf16; uploads and downloads of large buffers
/// convert every value as small ones do.
#[test]
fn gpu_copy_from_slice_keeps_the_buffer() {
    let Some(dev) = gpu() else { return };
    let addr = |t: &Tensor| {
        let st = t.storage();
        let c = st.as_cuda().unwrap();
        c.buf.device_addr(&c.dev.stream)
    };
    for dt in [DType::F32, DType::BF16] {
        let t = Tensor::zeros(&[5], dt, dev).unwrap();
        let before = addr(&t);
        let v = [1.0f32, -2.5, 1.0 / 3.0, 7.0, 0.1];
        t.copy_from_slice(&v).unwrap();
        assert_eq!(addr(&t), before, "{dt}: the buffer moved");
        let want: Vec<f32> =
            v.iter().map(|&x| if dt == DType::BF16 { half::bf16::from_f32(x).to_f32() } else { x }).collect();
        assert_eq!(t.to_vec().unwrap(), want, "{dt}");
    }
    // A buffer large enough that the host converts it on the thread pool, both ways.
    let v = Rng::new(4).normal_vec(300_007, 5.0);
    for dt in [DType::F32, DType::BF16] {
        let t = Tensor::zeros(&[v.len()], dt, dev).unwrap();
        t.copy_from_slice(&v).unwrap();
        let want: Vec<f32> =
            v.iter().map(|&x| if dt == DType::BF16 { half::bf16::from_f32(x).to_f32() } else { x }).collect();
        assert!(t.to_vec().unwrap() == want, "{dt}: {} values", v.len());
        let made = Tensor::from_vec_dtype(v.clone(), &[v.len()], dev, dt).unwrap();
        assert!(made.to_vec().unwrap() == want, "{dt}: a tensor made from {} values", v.len());
    }
}

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
            parity("quick_gelu", dev, dt, one, |t| ops::quick_gelu(&t[0]), atol, rtol);
            parity("exp", dev, dt, one, |t| ops::exp(&t[0]), atol, rtol);
            parity("add_scalar", dev, dt, one, |t| ops::add_scalar(&t[0], 0.37), atol, rtol);
            parity("scale", dev, dt, one, |t| ops::scale(&t[0], -1.7), atol, rtol);
        }
    }
}

#[test]
fn gpu_broadcast_binaries_match_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(25);
    // Element-wise offsets (odd rows), and rows of a multiple of 8 where each input is
    // contiguous or constant along the row (offsets once per 8-element chunk).
    let cases: [(&[usize], &[usize]); 7] = [
        (&[3, 5, 7], &[5, 1]),
        (&[2, 1, 3, 5], &[3, 1]),
        (&[6, 1536], &[1536]),
        (&[4, 33, 24], &[4, 33, 1]),
        (&[3, 40, 16], &[1, 40, 16]),
        (&[2, 1001, 128], &[2, 1, 128]),
        (&[1, 1, 1], &[1]),
    ];
    for (a_shape, b_shape) in cases {
        let (a, b) = (randn(a_shape, &mut rng), randn(b_shape, &mut rng));
        let two = [a.clone(), b.clone()];
        for (dt, atol, rtol) in DTYPES {
            let what = format!("{a_shape:?} by {b_shape:?}");
            parity(&format!("add {what}"), dev, dt, &two, |t| ops::add(&t[0], &t[1]), atol, rtol);
            parity(&format!("sub {what}"), dev, dt, &two, |t| ops::sub(&t[1], &t[0]), atol, rtol);
            parity(&format!("mul {what}"), dev, dt, &two, |t| ops::mul(&t[0], &t[1]), atol, rtol);
            parity(
                &format!("broadcast_to {what}"),
                dev,
                dt,
                std::slice::from_ref(&b),
                |t| ops::broadcast_to(&t[0], a_shape),
                atol,
                rtol,
            );
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
fn gpu_clamp_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(45);
    for (dt, atol, rtol) in DTYPES {
        let x = randn(&[5, 77], &mut rng);
        parity("clamp", dev, dt, &[x], |t| ops::clamp(&t[0], -0.5, 0.75), atol, rtol);
    }
}
