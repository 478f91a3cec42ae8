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

/// `backward_streaming` hands each watched gradient over once no later node can add to it,
/// so the callback may overwrite the parameter: here it fills it with NaN, and every
/// gradient must still equal the plain backward pass's (a parameter poisoned too early
/// would reach the input gradient through the first product, or the checkpointed block's
/// recompute).
#[test]
fn streaming_backward_hands_over_final_gradients_only() {
    let mut rng = Rng::new(11);
    let x0 = randn(&[4, 6], &mut rng);
    let w1_0 = randn(&[6, 6], &mut rng);
    let w2_0 = randn(&[6, 6], &mut rng);
    let b0 = randn(&[6], &mut rng);
    let u0 = randn(&[6], &mut rng);
    // loss = Σ (lin(ckpt(lin(x, w1, b)), w1))² with ckpt(h) = lin(h·h, w2): w1 is read
    // first and last, w2 only inside the checkpointed block, u never.
    let run = |x: &Tensor, w1: &Tensor, w2: &Tensor, b: &Tensor| -> synthos_engine::Result<Tensor> {
        let h1 = ops::linear(x, w1, Some(b))?;
        let w2c = w2.clone();
        let h2 = autograd::checkpoint(&[h1], std::slice::from_ref(w2), move |xs| {
            ops::linear(&ops::mul(&xs[0], &xs[0])?, &w2c, None)
        })?;
        let h3 = ops::linear(&h2, w1, None)?;
        ops::sum_all(&ops::mul(&h3, &h3)?)
    };
    let fresh = |t: &Tensor| t.deep_copy().unwrap().requires_grad();

    let (x, w1, w2, b) = (fresh(&x0), fresh(&w1_0), fresh(&w2_0), fresh(&b0));
    let plain = autograd::backward(&run(&x, &w1, &w2, &b).unwrap()).unwrap();
    let expect: Vec<Vec<f32>> = [&w1, &w2, &b].iter().map(|p| plain.get(p).unwrap().to_vec().unwrap()).collect();
    let expect_x = plain.get(&x).unwrap().to_vec().unwrap();

    let (x, w1, w2, b, u) = (fresh(&x0), fresh(&w1_0), fresh(&w2_0), fresh(&b0), fresh(&u0));
    let loss = run(&x, &w1, &w2, &b).unwrap();
    let watched = vec![w1.clone(), w2.clone(), b.clone(), u.clone()];
    let mut got: Vec<(usize, Vec<f32>)> = Vec::new();
    let rest = autograd::backward_streaming(&loss, &watched, &mut |i, g| {
        got.push((i, g.to_vec()?));
        watched[i].copy_from_slice(&vec![f32::NAN; watched[i].numel()])
    })
    .unwrap();
    // Order of finality: w2 (its block's recompute), then w1 and b (the first product).
    let order: Vec<usize> = got.iter().map(|(i, _)| *i).collect();
    assert_eq!(order, vec![1, 0, 2], "u is not reached and gets no call");
    for (i, g) in &got {
        assert_eq!(g, &expect[*i], "gradient of watched tensor {i}");
    }
    assert_eq!(rest.get(&x).unwrap().to_vec().unwrap(), expect_x, "the input's gradient, after w1 was poisoned");
    assert!(rest.get(&w1).is_none() && rest.get(&b).is_none(), "handed-over gradients are not kept");
    assert_eq!(autograd::tape_len(), 0);

    let dup = autograd::backward_streaming(&loss, &[w1.clone(), w1], &mut |_, _| Ok(())).unwrap_err().to_string();
    assert!(dup.contains("listed twice"), "{dup}");
}

/// A node whose output gets no gradient still counts as done: a watched tensor it reads is
/// handed over after it, not left behind in the returned set.
#[test]
fn streaming_backward_counts_nodes_that_get_no_gradient() {
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3], Device::Cpu).unwrap();
    let v = Tensor::from_vec(vec![0.5, -1.0, 2.0], &[3], Device::Cpu).unwrap().requires_grad();
    let a = ops::mul(&x, &v).unwrap();
    // A node that passes no gradient back to `a`: `a`'s own node runs with none.
    let stopped = autograd::no_grad(|| ops::scale(&a, 1.0)).unwrap();
    let stopped = autograd::record("stop", stopped, &[&a], Box::new(|_| Ok(vec![None])));
    let loss = ops::sum_all(&ops::add(&stopped, &ops::mul(&x, &v).unwrap()).unwrap()).unwrap();
    let mut got = Vec::new();
    let rest = autograd::backward_streaming(&loss, std::slice::from_ref(&v), &mut |i, g| {
        got.push((i, g.to_vec()?));
        Ok(())
    })
    .unwrap();
    assert_eq!(got, vec![(0, vec![1.0, 2.0, 3.0])]);
    assert!(rest.is_empty());

    // A loss that is itself a watched leaf: its gradient, the seed, is handed over too.
    let w = Tensor::from_vec(vec![2.5], &[1], Device::Cpu).unwrap().requires_grad();
    let mut got = Vec::new();
    autograd::backward_streaming(&w, std::slice::from_ref(&w), &mut |i, g| {
        got.push((i, g.to_vec()?));
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, vec![(0, vec![1.0])]);
}
