//! Tape mechanics: broadcasting arithmetic gradients, accumulation, no_grad,
//! checkpointing.
mod common;
use common::*;
use synthos_engine::{autograd, ops, Device, Rng, Tensor};

#[test]
fn add_sub_mul_broadcast_gradients() {
    let mut rng = Rng::new(1);
    let a = randn(&[3, 5, 7], &mut rng);
    let b = randn(&[3, 1, 7], &mut rng);
    let c = randn(&[7], &mut rng);
    gradcheck("add", |x| ops::add(&x[0], &x[1]), &[a.clone(), b.clone()], 1e-2, 1e-2);
    gradcheck("sub", |x| ops::sub(&x[0], &x[1]), &[a.clone(), c.clone()], 1e-2, 1e-2);
    gradcheck("mul", |x| ops::mul(&x[0], &x[1]), &[a.clone(), b.clone()], 1e-2, 1e-2);
    gradcheck("mul-rev", |x| ops::mul(&x[1], &x[0]), &[a, c], 1e-2, 1e-2);
}

#[test]
fn broadcast_shapes_are_checked() {
    let mut rng = Rng::new(2);
    let a = randn(&[3, 5], &mut rng);
    let b = randn(&[4], &mut rng);
    let e = ops::add(&a, &b).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("[3, 5]") && e.contains("[4]"), "{e}");
}

#[test]
fn gradients_accumulate_over_reuse() {
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3], Device::Cpu).unwrap().requires_grad();
    // y = x*x + x  →  dy/dx = 2x + 1
    let y = ops::add(&ops::mul(&x, &x).unwrap(), &x).unwrap();
    let g =
        autograd::backward_with(&y, Tensor::full(&[3], 1.0, synthos_engine::DType::F32, Device::Cpu).unwrap()).unwrap();
    assert_eq!(g.get(&x).unwrap().to_vec().unwrap(), vec![3.0, 5.0, 7.0]);
    assert_eq!(autograd::tape_len(), 0, "backward consumes the tape");
}

#[test]
fn no_grad_records_nothing() {
    let x = Tensor::from_vec(vec![1.0; 4], &[4], Device::Cpu).unwrap().requires_grad();
    let y = autograd::no_grad(|| ops::mul(&x, &x)).unwrap();
    assert!(!y.is_tracked());
    assert_eq!(autograd::tape_len(), 0);
    let err = autograd::backward_with(&y, y.clone()).unwrap_err().to_string();
    assert!(err.contains("does not depend"), "{err}");
}

#[test]
fn checkpoint_matches_plain_backward() {
    let mut rng = Rng::new(3);
    let x0 = randn(&[4, 6], &mut rng);
    let w0 = randn(&[6], &mut rng);
    let block = |xs: &[Tensor], w: &Tensor| -> synthos_engine::Result<Tensor> {
        let h = ops::mul(&xs[0], w)?;
        ops::mul(&h, &ops::add(&h, &xs[0])?)
    };
    let seed = randn(&[4, 6], &mut rng);
    // plain
    let (x, w) = (x0.deep_copy().unwrap().requires_grad(), w0.deep_copy().unwrap().requires_grad());
    let y = block(std::slice::from_ref(&x), &w).unwrap();
    let g1 = autograd::backward_with(&y, seed.clone()).unwrap();
    // checkpointed
    let (x2, w2) = (x0.deep_copy().unwrap().requires_grad(), w0.deep_copy().unwrap().requires_grad());
    let wc = w2.clone();
    let y2 =
        autograd::checkpoint(std::slice::from_ref(&x2), std::slice::from_ref(&w2), move |xs| block(xs, &wc)).unwrap();
    assert_eq!(autograd::tape_len(), 1, "a checkpointed block is one node");
    assert_close(&y2.to_vec().unwrap(), &y.to_vec().unwrap(), 0.0, 0.0, "checkpoint forward");
    let g2 = autograd::backward_with(&y2, seed).unwrap();
    assert_close(&g2.get(&x2).unwrap().to_vec().unwrap(), &g1.get(&x).unwrap().to_vec().unwrap(), 1e-6, 1e-6, "dx");
    assert_close(&g2.get(&w2).unwrap().to_vec().unwrap(), &g1.get(&w).unwrap().to_vec().unwrap(), 1e-6, 1e-6, "dw");
}

#[test]
fn backward_leaves_other_graphs_on_the_tape() {
    // Two independent graphs recorded one after the other, then back-propagated in
    // either order: each backward consumes its own operations only.
    let x = Tensor::from_vec(vec![1.0, 2.0], &[2], Device::Cpu).unwrap().requires_grad();
    let z = Tensor::from_vec(vec![3.0, -1.0], &[2], Device::Cpu).unwrap().requires_grad();
    let y1 = ops::mul(&x, &x).unwrap(); // dy1/dx = 2x
    let y2 = ops::scale(&ops::mul(&z, &z).unwrap(), 3.0).unwrap(); // dy2/dz = 6z
    let ones = || Tensor::full(&[2], 1.0, synthos_engine::DType::F32, Device::Cpu).unwrap();
    let g1 = autograd::backward_with(&y1, ones()).unwrap();
    assert!(g1.get(&z).is_none(), "the first graph does not reach z");
    assert_eq!(autograd::tape_len(), 2, "the second graph's two operations stay recorded");
    let g2 = autograd::backward_with(&y2, ones()).unwrap();
    assert_eq!(g1.get(&x).unwrap().to_vec().unwrap(), vec![2.0, 4.0]);
    assert_eq!(g2.get(&z).unwrap().to_vec().unwrap(), vec![18.0, -6.0]);
    assert_eq!(autograd::tape_len(), 0);
}

/// Gradient accumulation over micro-batches sums in fp32, even for bf16 gradients: 256 +
/// 64 × 1 stays 256 in bf16 (its spacing at 256 is 2), and is 320 in f32.
#[test]
fn gpu_micro_batch_sums_are_fp32() {
    use synthos_engine::DType;
    let Some(dev) = gpu() else { return };
    let p = Tensor::full(&[5], 0.5, DType::BF16, dev).unwrap().requires_grad();
    let grad_of = |c: f32| {
        let c = Tensor::full(&[5], c, DType::BF16, dev).unwrap();
        autograd::backward(&ops::sum_all(&ops::mul(&p, &c).unwrap()).unwrap()).unwrap()
    };
    let mut acc = grad_of(256.0);
    assert_eq!(acc.get(&p).unwrap().dtype(), DType::BF16, "one micro-batch keeps the parameter's dtype");
    for _ in 0..64 {
        acc.merge(grad_of(1.0)).unwrap();
    }
    let g = acc.get(&p).unwrap();
    assert_eq!(g.dtype(), DType::F32);
    assert_eq!(g.to_vec().unwrap(), vec![320.0; 5]);
}
