//! Softmax over the last dimension: values against the f64 formula, shift invariance,
//! gradients against finite differences, bad inputs, and (with a GPU) the kernel against
//! the CPU reference at row lengths below, at and above one block.
mod common;
use common::*;
use synthos_engine::ops;
use synthos_engine::{DType, Device, Rng, Tensor};

#[test]
fn softmax_forward_and_gradient() {
    let mut rng = Rng::new(36);
    let x = randn(&[3, 5, 13], &mut rng);
    let y = ops::softmax_last_dim(&x).unwrap();
    let (xv, yv) = (x.to_vec().unwrap(), y.to_vec().unwrap());
    for (xr, yr) in xv.chunks(13).zip(yv.chunks(13)) {
        let sum: f64 = xr.iter().map(|&v| (v as f64).exp()).sum();
        let want: Vec<f32> = xr.iter().map(|&v| ((v as f64).exp() / sum) as f32).collect();
        assert_close(yr, &want, 1e-7, 1e-5, "softmax row");
    }
    // Shift invariance, even far from 0 (the max is subtracted first).
    let shifted = ops::softmax_last_dim(&ops::add_scalar(&x, 500.0).unwrap()).unwrap().to_vec().unwrap();
    assert_close(&shifted, &yv, 1e-6, 1e-4, "softmax(x + 500)");
    gradcheck("softmax_last_dim", |t| ops::softmax_last_dim(&t[0]), &[x], 1e-2, 1e-2);
    let e = ops::softmax_last_dim(&Tensor::scalar(1.0, Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("softmax_last_dim"), "{e}");
}

#[test]
fn gpu_softmax_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(43);
    // (dtype, atol fraction of the largest value, rtol): bf16 to a few ulps, f32 to the
    // kernel's fast exponential.
    for (dtype, atol, rtol) in [(DType::BF16, 1.0 / 64.0, 1.0 / 64.0), (DType::F32, 2e-3, 2e-3)] {
        for n in [13, 1000, 4099] {
            let x = randn(&[3, 7, n], &mut rng);
            parity(&format!("softmax n={n}"), dev, dtype, &[x], |t| ops::softmax_last_dim(&t[0]), atol, rtol);
        }
    }
}
