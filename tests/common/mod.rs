//! Test helpers shared by the integration tests: finite-difference gradient checks,
//! closeness assertions, and the GPU gate.
#![allow(dead_code)]

use synthos_engine::{autograd, Device, Result, Rng, Tensor};

/// A CPU tensor of standard normal values.
pub fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 1.0, rng, Device::Cpu).unwrap()
}

/// Asserts `|a-b| <= atol + rtol·|b|` elementwise; the message names `what` and the
/// worst element.
pub fn assert_close(a: &[f32], b: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length {} vs {}", a.len(), b.len());
    let mut worst = (0usize, 0f32);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(x.is_finite(), "{what}: non-finite value {x} at {i}");
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}: element {i}: got {} expected {} (atol {atol}, rtol {rtol})", a[i], b[i]);
}

/// Relative L2 error ‖a−b‖/‖b‖.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Checks the tape's gradients of `f` w.r.t. every input in `inputs` against central
/// finite differences of the scalar `Σ f(x)·R` (R a fixed random projection), on the CPU.
///
/// Every element is checked for inputs up to `max_elems` elements; larger inputs are
/// checked on `max_elems` random positions.
pub fn gradcheck(name: &str, f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], eps: f32, tol: f32) {
    let mut rng = Rng::new(0xC0FFEE);
    let leaves: Vec<Tensor> = inputs.iter().map(|t| t.deep_copy().unwrap().requires_grad()).collect();
    let out = f(&leaves).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
    let proj = Tensor::randn(out.shape(), 1.0, &mut rng, Device::Cpu).unwrap();
    let pv = proj.to_vec().unwrap();
    let grads = autograd::backward_with(&out, proj).unwrap_or_else(|e| panic!("{name}: backward failed: {e}"));
    let loss_at = |xs: &[Tensor]| -> f64 {
        let y = autograd::no_grad(|| f(xs)).unwrap().to_vec().unwrap();
        y.iter().zip(&pv).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let max_elems = 64;
    for (k, leaf) in leaves.iter().enumerate() {
        let g = grads.get(leaf).unwrap_or_else(|| panic!("{name}: no gradient for input {k}")).to_vec().unwrap();
        let base = inputs[k].to_vec().unwrap();
        let positions: Vec<usize> = if base.len() <= max_elems {
            (0..base.len()).collect()
        } else {
            (0..max_elems).map(|_| rng.below(base.len())).collect()
        };
        let scale = g.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        for &i in &positions {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let mut xs: Vec<Tensor> = inputs.iter().map(|t| t.deep_copy().unwrap()).collect();
            xs[k] = Tensor::from_vec(plus, inputs[k].shape(), Device::Cpu).unwrap();
            let lp = loss_at(&xs);
            xs[k] = Tensor::from_vec(minus, inputs[k].shape(), Device::Cpu).unwrap();
            let lm = loss_at(&xs);
            let num = ((lp - lm) / (2.0 * eps as f64)) as f32;
            let err = (num - g[i]).abs();
            assert!(
                err <= tol * scale,
                "{name}: d/d input{k}[{i}]: analytic {} vs numeric {num} (err {err}, allowed {})",
                g[i],
                tol * scale
            );
        }
    }
}

/// The GPU to test on (with output poisoning switched on), or `None` (test prints that it skipped) when none is usable.
pub fn gpu() -> Option<Device> {
    if synthos_engine::cuda::is_usable(0) {
        synthos_engine::cuda::set_poison(true);
        Some(Device::Cuda(0))
    } else {
        eprintln!("no usable CUDA device: GPU check skipped");
        None
    }
}

/// Poisons a fresh GPU output check: returns a CUDA copy of `t` in bf16.
pub fn to_gpu_bf16(t: &Tensor, dev: Device) -> Tensor {
    t.to_device(dev, synthos_engine::DType::BF16).unwrap()
}

/// A fresh empty directory under the system temp dir, unique per test and process.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("synthos-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
