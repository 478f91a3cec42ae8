//! Losses: MSE (whole and per sample) and cross-entropy. Values against direct f64
//! formulas, gradients against finite differences, bad inputs, and the GPU kernels
//! against the CPU reference.
mod common;
use common::*;
use synthos_engine::{autograd, ops, DType, Device, Result, Rng, Tensor};

#[test]
fn mse_matches_direct_formula() {
    let mut rng = Rng::new(51);
    let (p, t) = (randn(&[3, 5, 7], &mut rng), randn(&[3, 5, 7], &mut rng));
    let (pv, tv) = (p.to_vec().unwrap(), t.to_vec().unwrap());
    let sq: Vec<f64> = pv.iter().zip(&tv).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).collect();
    let loss = ops::mse(&p, &t).unwrap();
    assert_eq!(loss.shape(), &[] as &[usize]);
    let want = sq.iter().sum::<f64>() / 105.0;
    assert!((loss.item().unwrap() as f64 - want).abs() < 1e-6 * want, "mse {} vs {want}", loss.item().unwrap());
    let per = ops::mse_per_sample(&p, &t).unwrap();
    assert_eq!(per.shape(), &[3]);
    let per_want: Vec<f32> = sq.chunks(35).map(|c| (c.iter().sum::<f64>() / 35.0) as f32).collect();
    assert_close(&per.to_vec().unwrap(), &per_want, 0.0, 1e-6, "mse_per_sample");
}

#[test]
fn mse_gradients() {
    let mut rng = Rng::new(52);
    let inputs = [randn(&[3, 5, 7], &mut rng), randn(&[3, 5, 7], &mut rng)];
    gradcheck("mse", |x| ops::mse(&x[0], &x[1]), &inputs, 1e-2, 1e-2);
    gradcheck("mse_per_sample", |x| ops::mse_per_sample(&x[0], &x[1]), &inputs, 1e-2, 1e-2);
    // Per-sample weights, as in timestep-weighted flow matching: Σ w_b · mse_b.
    let w = Tensor::from_vec(vec![0.2, 1.7, 0.9], &[3], Device::Cpu).unwrap();
    gradcheck(
        "weighted mse",
        |x| ops::sum_all(&ops::mul(&ops::mse_per_sample(&x[0], &x[1])?, &w)?),
        &inputs,
        1e-2,
        1e-2,
    );
}

#[test]
fn mse_rejects_bad_inputs() {
    let mut rng = Rng::new(53);
    let (p, t) = (randn(&[3, 5], &mut rng), randn(&[3, 6], &mut rng));
    let e = ops::mse(&p, &t).unwrap_err().to_string();
    assert!(e.contains("mse") && e.contains("[3, 5]") && e.contains("[3, 6]"), "{e}");
    let s = Tensor::scalar(1.0, Device::Cpu).unwrap();
    let e = ops::mse_per_sample(&s, &s).unwrap_err().to_string();
    assert!(e.contains("mse_per_sample") && e.contains("rank"), "{e}");
    let empty = Tensor::zeros(&[0, 4], DType::F32, Device::Cpu).unwrap();
    assert!(ops::mse(&empty, &empty).unwrap_err().to_string().contains("empty"));
}

/// Mean cross-entropy by the textbook formula in f64.
fn direct_cross_entropy(logits: &[f32], classes: usize, targets: &[usize]) -> f64 {
    let mut total = 0.0;
    for (row, &t) in logits.chunks(classes).zip(targets) {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        total += lse - row[t] as f64;
    }
    total / targets.len() as f64
}

fn random_targets(rows: usize, classes: usize, rng: &mut Rng) -> Vec<usize> {
    (0..rows).map(|_| rng.below(classes)).collect()
}

#[test]
fn cross_entropy_matches_direct_formula() {
    let mut rng = Rng::new(54);
    let (rows, classes) = (7, 13);
    let x = Tensor::randn(&[rows, classes], 3.0, &mut rng, Device::Cpu).unwrap();
    let targets = random_targets(rows, classes, &mut rng);
    let loss = ops::cross_entropy(&x, &targets).unwrap();
    assert_eq!(loss.shape(), &[] as &[usize]);
    let want = direct_cross_entropy(&x.to_vec().unwrap(), classes, &targets);
    assert!((loss.item().unwrap() as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
    // Logits in the thousands: without the max subtraction exp() would overflow.
    let shifted = ops::add_scalar(&x, 3000.0).unwrap();
    let l2 = ops::cross_entropy(&shifted, &targets).unwrap().item().unwrap();
    assert!(l2.is_finite() && (l2 as f64 - want).abs() < 2e-3, "shifted logits: {l2} vs {want}");
    // Uniform logits: log C.
    let flat = Tensor::full(&[rows, classes], 0.25, DType::F32, Device::Cpu).unwrap();
    let l3 = ops::cross_entropy(&flat, &targets).unwrap().item().unwrap();
    assert!((l3 - (classes as f32).ln()).abs() < 1e-6);
}

#[test]
fn cross_entropy_gradients() {
    let mut rng = Rng::new(55);
    let (rows, classes) = (5, 13);
    let x = Tensor::randn(&[rows, classes], 2.0, &mut rng, Device::Cpu).unwrap();
    let targets = random_targets(rows, classes, &mut rng);
    gradcheck("cross_entropy", |t| ops::cross_entropy(&t[0], &targets), std::slice::from_ref(&x), 1e-2, 1e-2);
    // The gradient is (softmax − onehot)/N: each row sums to zero.
    let xl = x.deep_copy().unwrap().requires_grad();
    let g = autograd::backward(&ops::cross_entropy(&xl, &targets).unwrap()).unwrap();
    for row in g.get(&xl).unwrap().to_vec().unwrap().chunks(classes) {
        assert!(row.iter().sum::<f32>().abs() < 1e-6);
    }
}

#[test]
fn cross_entropy_rejects_bad_inputs() {
    let mut rng = Rng::new(56);
    let x = randn(&[4, 13], &mut rng);
    let e = ops::cross_entropy(&x, &[0, 1, 13, 2]).unwrap_err().to_string();
    assert!(e.contains("cross_entropy") && e.contains("13") && e.contains("row 2"), "{e}");
    let e = ops::cross_entropy(&x, &[0, 1, 2]).unwrap_err().to_string();
    assert!(e.contains("cross_entropy") && e.contains("3 targets") && e.contains("[4, 13]"), "{e}");
    let e = ops::cross_entropy(&randn(&[4, 13, 1], &mut rng), &[0; 4]).unwrap_err().to_string();
    assert!(e.contains("cross_entropy") && e.contains("[4, 13, 1]"), "{e}");
}

/// CLIP's loss takes its targets (0..N) from the row index: nothing is uploaded, so it may
/// run, with its backward pass, where a recorded CUDA graph runs, and it equals the two
/// cross-entropies against explicit targets. `cross_entropy` with host targets is refused
/// there, with the rule named.
#[test]
fn clip_loss_uploads_no_targets() {
    let mut rng = Rng::new(57);
    let (img, txt, s) = (randn(&[6, 8], &mut rng), randn(&[6, 8], &mut rng), randn(&[], &mut rng));
    let (img, txt) = (img.requires_grad(), txt.requires_grad());
    let inside = synthos_engine::forbid_host_transfers("a test", || -> Result<_> {
        let loss = ops::clip_loss(&img, &txt, &s)?;
        let g = autograd::backward(&loss)?;
        Ok((loss, g.get(&img).unwrap().clone()))
    })
    .unwrap();
    let logits = ops::clip_logits(&img, &txt, &s).unwrap();
    let targets: Vec<usize> = (0..6).collect();
    let by_image = ops::cross_entropy(&logits, &targets).unwrap();
    let by_text = ops::cross_entropy(&ops::transpose(&logits, 0, 1).unwrap(), &targets).unwrap();
    let want = ops::scale(&ops::add(&by_image, &by_text).unwrap(), 0.5).unwrap();
    assert_eq!(inside.0.item().unwrap(), want.item().unwrap());
    let g = autograd::backward(&want).unwrap();
    assert_eq!(inside.1.to_vec().unwrap(), g.get(&img).unwrap().to_vec().unwrap());

    let e = synthos_engine::forbid_host_transfers("a test", || ops::cross_entropy(&logits, &targets))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cross_entropy") && e.contains("a test") && e.contains("recorded CUDA graph"), "{e}");
}

// ---------------------------------------------------------------------------------
// GPU parity

/// GPU vs CPU on the same rounded values (`common::gpu_parity`): inputs in `dtype`, the
/// loss in f32 on both devices, the output gradient in f32; per element
/// `|gpu − cpu| ≤ atol·max|cpu| + rtol·|cpu|`.
fn loss_parity(
    name: &str,
    dev: Device,
    dtype: DType,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    atol: f32,
    rtol: f32,
) {
    parity_scaled(name, dev, dtype, inputs, DType::F32, Some(DType::F32), f, atol, rtol);
}

/// (dtype, atol, rtol): the loss itself is accumulated in fp32 either way, so only the
/// gradients (stored in the input dtype) need bf16 tolerances.
const DTYPES: [(DType, f32, f32); 2] = [(DType::F32, 1e-5, 1e-4), (DType::BF16, 1.0 / 128.0, 1.0 / 64.0)];

#[test]
fn gpu_mse_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(61);
    for shape in [&[3, 5, 7][..], &[5, 3, 7, 11], &[1, 1_000_003], &[3, 1_000_003]] {
        let inputs = [randn(shape, &mut rng), randn(shape, &mut rng)];
        for (dt, atol, rtol) in DTYPES {
            loss_parity(&format!("mse {shape:?}"), dev, dt, &inputs, |x| ops::mse(&x[0], &x[1]), atol, rtol);
            loss_parity(
                &format!("mse_per_sample {shape:?}"),
                dev,
                dt,
                &inputs,
                |x| ops::mse_per_sample(&x[0], &x[1]),
                atol,
                rtol,
            );
        }
    }
}

#[test]
fn gpu_cross_entropy_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(62);
    for (rows, classes, std) in [(7, 13, 2.0), (37, 1001, 4.0), (3, 50_021, 1.0), (1, 1, 1.0)] {
        let x = Tensor::randn(&[rows, classes], std, &mut rng, Device::Cpu).unwrap();
        let targets = random_targets(rows, classes, &mut rng);
        for (dt, atol, rtol) in DTYPES {
            loss_parity(
                &format!("cross_entropy {rows}x{classes}"),
                dev,
                dt,
                std::slice::from_ref(&x),
                |t| ops::cross_entropy(&t[0], &targets),
                atol,
                rtol,
            );
        }
    }
    // Large logits stay finite on the GPU as well.
    let x = Tensor::randn(&[5, 257], 1.0, &mut rng, Device::Cpu).unwrap();
    let shifted = ops::add_scalar(&x, 5000.0).unwrap().to_device(dev, DType::F32).unwrap();
    let targets = random_targets(5, 257, &mut rng);
    let got = ops::cross_entropy(&shifted, &targets).unwrap().item().unwrap();
    let want = direct_cross_entropy(&shifted.to_vec().unwrap(), 257, &targets);
    assert!(got.is_finite() && (got as f64 - want).abs() < 1e-3 * want.max(1.0), "shifted: {got} vs {want}");

    // CLIP's loss: its diagonal-target kernels against the CPU, and bit for bit against the
    // uploaded-target kernels with targets 0..N.
    for n in [1, 7, 64] {
        let (img, txt) = (randn(&[n, 24], &mut rng), randn(&[n, 24], &mut rng));
        let scale = Tensor::from_vec(vec![2.3], &[], Device::Cpu).unwrap();
        let inputs = [img, txt, scale];
        for (dt, atol, rtol) in DTYPES {
            loss_parity(
                &format!("clip_loss n={n}"),
                dev,
                dt,
                &inputs,
                |t| ops::clip_loss(&t[0], &t[1], &t[2]),
                atol,
                rtol,
            );
            let g: Vec<Tensor> = inputs.iter().map(|t| t.to_device(dev, dt).unwrap().requires_grad()).collect();
            let logits = ops::clip_logits(&g[0], &g[1], &g[2]).unwrap();
            let targets: Vec<usize> = (0..n).collect();
            let by_image = ops::cross_entropy(&logits, &targets).unwrap();
            let by_text = ops::cross_entropy(&ops::transpose(&logits, 0, 1).unwrap(), &targets).unwrap();
            let want = ops::scale(&ops::add(&by_image, &by_text).unwrap(), 0.5).unwrap();
            let got = ops::clip_loss(&g[0], &g[1], &g[2]).unwrap();
            assert_eq!(got.item().unwrap(), want.item().unwrap(), "clip_loss n={n} {dt}");
            let (gw, gg) = (autograd::backward(&want).unwrap(), autograd::backward(&got).unwrap());
            for t in &g {
                assert_eq!(gw.get(t).unwrap().to_vec().unwrap(), gg.get(t).unwrap().to_vec().unwrap(), "n={n} {dt}");
            }
        }
    }
}
