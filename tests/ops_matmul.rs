//! Matrix products: `matmul`, `matmul_t` and `linear` against a naive f64 triple loop,
//! finite-difference gradients of every input, shape errors, and (with a GPU) cuBLASLt
//! against the CPU reference in bf16 and f32, forward and backward.
mod common;
use common::*;
use synthos_engine::{autograd, ops, DType, Device, Result, Rng, Tensor};

/// `C[b] = op(A[b])·op(B[b])` by the definition, in f64. `a_batched`/`b_batched` say
/// whether the operand has one matrix per batch or one for all.
fn naive(
    a: &[f32],
    b: &[f32],
    batch: usize,
    (m, k, n): (usize, usize, usize),
    trans_a: bool,
    trans_b: bool,
    b_batched: bool,
) -> Vec<f32> {
    let mut c = vec![0f32; batch * m * n];
    for bi in 0..batch {
        let a0 = bi * m * k;
        let b0 = if b_batched { bi * k * n } else { 0 };
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f64;
                for p in 0..k {
                    let av = if trans_a { a[a0 + p * m + i] } else { a[a0 + i * k + p] };
                    let bv = if trans_b { b[b0 + j * k + p] } else { b[b0 + p * n + j] };
                    acc += av as f64 * bv as f64;
                }
                c[bi * m * n + i * n + j] = acc as f32;
            }
        }
    }
    c
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_vec().unwrap()
}

const M: usize = 7;
const K: usize = 13;
const N: usize = 5;
const B: usize = 3;

#[test]
fn matmul_forward_matches_naive() {
    let mut rng = Rng::new(11);
    // 2-D
    let (a, b) = (randn(&[M, K], &mut rng), randn(&[K, N], &mut rng));
    let c = ops::matmul(&a, &b).unwrap();
    assert_eq!(c.shape(), [M, N]);
    assert_close(&vals(&c), &naive(&vals(&a), &vals(&b), 1, (M, K, N), false, false, true), 1e-5, 1e-5, "2-D");
    // batched with batched b, two batch dimensions
    let (a, b) = (randn(&[2, B, M, K], &mut rng), randn(&[2, B, K, N], &mut rng));
    let c = ops::matmul(&a, &b).unwrap();
    assert_eq!(c.shape(), [2, B, M, N]);
    assert_close(&vals(&c), &naive(&vals(&a), &vals(&b), 2 * B, (M, K, N), false, false, true), 1e-5, 1e-5, "batched");
    // batched with a shared 2-D b
    let (a, b) = (randn(&[B, M, K], &mut rng), randn(&[K, N], &mut rng));
    let c = ops::matmul(&a, &b).unwrap();
    assert_eq!(c.shape(), [B, M, N]);
    assert_close(&vals(&c), &naive(&vals(&a), &vals(&b), B, (M, K, N), false, false, false), 1e-5, 1e-5, "shared b");
}

#[test]
fn matmul_t_forward_matches_naive() {
    let mut rng = Rng::new(12);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let ash = |batch: &[usize]| [batch, &(if ta { [K, M] } else { [M, K] })[..]].concat();
        let bsh = |batch: &[usize]| [batch, &(if tb { [N, K] } else { [K, N] })[..]].concat();
        // batched
        let (a, b) = (randn(&ash(&[B]), &mut rng), randn(&bsh(&[B]), &mut rng));
        let c = ops::matmul_t(&a, &b, ta, tb).unwrap();
        assert_eq!(c.shape(), [B, M, N]);
        let want = naive(&vals(&a), &vals(&b), B, (M, K, N), ta, tb, true);
        assert_close(&vals(&c), &want, 1e-5, 1e-5, &format!("batched ta={ta} tb={tb}"));
        // 2-D
        let (a, b) = (randn(&ash(&[]), &mut rng), randn(&bsh(&[]), &mut rng));
        let c = ops::matmul_t(&a, &b, ta, tb).unwrap();
        assert_eq!(c.shape(), [M, N]);
        let want = naive(&vals(&a), &vals(&b), 1, (M, K, N), ta, tb, true);
        assert_close(&vals(&c), &want, 1e-5, 1e-5, &format!("2-D ta={ta} tb={tb}"));
        // shared b (a untransposed only)
        if !ta {
            let (a, b) = (randn(&ash(&[B]), &mut rng), randn(&bsh(&[]), &mut rng));
            let c = ops::matmul_t(&a, &b, ta, tb).unwrap();
            let want = naive(&vals(&a), &vals(&b), B, (M, K, N), ta, tb, false);
            assert_close(&vals(&c), &want, 1e-5, 1e-5, &format!("shared b tb={tb}"));
        }
    }
}

#[test]
fn linear_forward_matches_naive() {
    let mut rng = Rng::new(13);
    let x = randn(&[B, M, K], &mut rng);
    let w = randn(&[N, K], &mut rng);
    let bias = randn(&[N], &mut rng);
    let plain = naive(&vals(&x), &vals(&w), 1, (B * M, K, N), false, true, true);
    let y = ops::linear(&x, &w, None).unwrap();
    assert_eq!(y.shape(), [B, M, N]);
    assert_close(&vals(&y), &plain, 1e-5, 1e-5, "linear");
    let y = ops::linear(&x, &w, Some(&bias)).unwrap();
    let bv = vals(&bias);
    let want: Vec<f32> = plain.iter().enumerate().map(|(i, v)| v + bv[i % N]).collect();
    assert_close(&vals(&y), &want, 1e-5, 1e-5, "linear+bias");
    // a single vector
    let x1 = randn(&[K], &mut rng);
    let y1 = ops::linear(&x1, &w, Some(&bias)).unwrap();
    assert_eq!(y1.shape(), [N]);
    let want: Vec<f32> =
        naive(&vals(&x1), &vals(&w), 1, (1, K, N), false, true, true).iter().zip(&bv).map(|(v, b)| v + b).collect();
    assert_close(&vals(&y1), &want, 1e-5, 1e-5, "linear vector");
}

#[test]
fn matmul_gradients() {
    let mut rng = Rng::new(14);
    let mm = |x: &[Tensor]| ops::matmul(&x[0], &x[1]);
    gradcheck("matmul 2-D", mm, &[randn(&[M, K], &mut rng), randn(&[K, N], &mut rng)], 1e-2, 1e-2);
    gradcheck("matmul batched", mm, &[randn(&[B, M, K], &mut rng), randn(&[B, K, N], &mut rng)], 1e-2, 1e-2);
    gradcheck("matmul shared b", mm, &[randn(&[B, M, K], &mut rng), randn(&[K, N], &mut rng)], 1e-2, 1e-2);
    gradcheck("matmul 4-D", mm, &[randn(&[2, B, M, K], &mut rng), randn(&[2, B, K, N], &mut rng)], 1e-2, 1e-2);
    gradcheck("matmul 4-D shared b", mm, &[randn(&[2, B, M, K], &mut rng), randn(&[K, N], &mut rng)], 1e-2, 1e-2);
}

#[test]
fn matmul_t_gradients() {
    let mut rng = Rng::new(15);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a2 = if ta { [K, M] } else { [M, K] };
        let b2 = if tb { [N, K] } else { [K, N] };
        let f = move |x: &[Tensor]| ops::matmul_t(&x[0], &x[1], ta, tb);
        let name = format!("matmul_t ta={ta} tb={tb}");
        gradcheck(&format!("{name} 2-D"), f, &[randn(&a2, &mut rng), randn(&b2, &mut rng)], 1e-2, 1e-2);
        let (a3, b3) = ([&[B][..], &a2].concat(), [&[B][..], &b2].concat());
        gradcheck(&format!("{name} batched"), f, &[randn(&a3, &mut rng), randn(&b3, &mut rng)], 1e-2, 1e-2);
        if !ta {
            gradcheck(&format!("{name} shared b"), f, &[randn(&a3, &mut rng), randn(&b2, &mut rng)], 1e-2, 1e-2);
        }
    }
}

#[test]
fn linear_gradients() {
    let mut rng = Rng::new(16);
    let with_bias = |x: &[Tensor]| ops::linear(&x[0], &x[1], Some(&x[2]));
    let without = |x: &[Tensor]| ops::linear(&x[0], &x[1], None);
    let (x, w, b) = (randn(&[B, M, K], &mut rng), randn(&[N, K], &mut rng), randn(&[N], &mut rng));
    gradcheck("linear+bias", with_bias, &[x.clone(), w.clone(), b.clone()], 1e-2, 1e-2);
    gradcheck("linear", without, &[x, w.clone()], 1e-2, 1e-2);
    gradcheck("linear 2-D", with_bias, &[randn(&[M, K], &mut rng), w.clone(), b.clone()], 1e-2, 1e-2);
    gradcheck("linear vector", with_bias, &[randn(&[K], &mut rng), w, b], 1e-2, 1e-2);
}

/// `linear_gelu_tanh` is `linear` then `gelu(…, Tanh)`: the same bits and the same
/// gradients on the CPU (which never fuses), with and without a bias.
#[test]
fn linear_gelu_tanh_is_linear_then_gelu() {
    let mut rng = Rng::new(18);
    let (x, w, b) = (randn(&[B, M, K], &mut rng), randn(&[N, K], &mut rng), randn(&[N], &mut rng));
    for bias in [Some(&b), None] {
        let (xt, wt) = (x.detach().requires_grad(), w.detach().requires_grad());
        let bt = bias.map(|b| b.detach().requires_grad());
        assert!(!ops::gelu_epilogue_applies(&xt, &wt, bt.as_ref()).unwrap(), "the CPU never fuses");
        let fused = ops::linear_gelu_tanh(&xt, &wt, bt.as_ref()).unwrap();
        let plain = ops::gelu(&ops::linear(&xt, &wt, bt.as_ref()).unwrap(), ops::GeluApprox::Tanh).unwrap();
        assert_eq!(vals(&fused), vals(&plain), "bias {}: values", bias.is_some());
        let seed = randn(&[B, M, N], &mut rng);
        let gf = autograd::backward_with(&fused, seed.clone()).unwrap();
        let gp = autograd::backward_with(&plain, seed).unwrap();
        let mut all = vec![&xt, &wt];
        all.extend(bt.as_ref());
        for (i, t) in all.into_iter().enumerate() {
            assert_eq!(vals(gf.get(t).unwrap()), vals(gp.get(t).unwrap()), "bias {}: gradient {i}", bias.is_some());
        }
    }
    let e = err(ops::linear_gelu_tanh(&x, &randn(&[N, K + 1], &mut rng), None));
    assert!(e.contains("linear") && e.contains("[3, 7, 13]") && e.contains("[5, 14]"), "{e}");
}

/// `mlp_gelu_tanh` is `linear`, `gelu(…, Tanh)`, `linear`: the same bits and the same
/// gradients on the CPU (which never fuses), with and without biases; bad shapes name it.
#[test]
fn mlp_gelu_tanh_is_linear_gelu_linear() {
    let mut rng = Rng::new(19);
    let (x, w1, b1) = (randn(&[B, M, K], &mut rng), randn(&[16, K], &mut rng), randn(&[16], &mut rng));
    let (w2, b2) = (randn(&[N, 16], &mut rng), randn(&[N], &mut rng));
    for bias in [true, false] {
        let t = |v: &Tensor| v.detach().requires_grad();
        let (xt, w1t, w2t) = (t(&x), t(&w1), t(&w2));
        let (b1t, b2t) = if bias { (Some(t(&b1)), Some(t(&b2))) } else { (None, None) };
        let fuses = ops::mlp_gelu_fuses(&xt, &w1t, b1t.as_ref(), &w2t, b2t.as_ref()).unwrap();
        assert!(!fuses, "the CPU never fuses");
        let fused = ops::mlp_gelu_tanh(&xt, &w1t, b1t.as_ref(), &w2t, b2t.as_ref()).unwrap();
        let h = ops::gelu(&ops::linear(&xt, &w1t, b1t.as_ref()).unwrap(), ops::GeluApprox::Tanh).unwrap();
        let plain = ops::linear(&h, &w2t, b2t.as_ref()).unwrap();
        assert_eq!(vals(&fused), vals(&plain), "bias {bias}: values");
        let seed = randn(&[B, M, N], &mut rng);
        let gf = autograd::backward_with(&fused, seed.clone()).unwrap();
        let gp = autograd::backward_with(&plain, seed).unwrap();
        let mut all = vec![&xt, &w1t, &w2t];
        all.extend(b1t.as_ref());
        all.extend(b2t.as_ref());
        for (i, t) in all.into_iter().enumerate() {
            assert_eq!(vals(gf.get(t).unwrap()), vals(gp.get(t).unwrap()), "bias {bias}: gradient {i}");
        }
    }
    let e = err(ops::mlp_gelu_tanh(&x, &w1, Some(&b1), &randn(&[N, 15], &mut rng), None));
    assert!(e.contains("linear") && e.contains("[3, 7, 16]") && e.contains("[5, 15]"), "{e}");
}

#[test]
fn frozen_inputs_get_no_gradient_and_one_node_is_recorded() {
    let mut rng = Rng::new(17);
    let x = randn(&[B, M, K], &mut rng);
    let w = randn(&[N, K], &mut rng).requires_grad();
    let b = randn(&[N], &mut rng);
    let y = ops::linear(&x, &w, Some(&b)).unwrap();
    assert_eq!(autograd::tape_len(), 1, "linear is one tape node");
    let g = autograd::backward_with(&y, randn(&[B, M, N], &mut rng)).unwrap();
    assert!(g.get(&w).is_some());
    assert!(g.get(&x).is_none() && g.get(&b).is_none());
    let a = randn(&[B, M, K], &mut rng).requires_grad();
    let c = ops::matmul(&a, &randn(&[K, N], &mut rng)).unwrap();
    assert_eq!(autograd::tape_len(), 1, "matmul is one tape node");
    let g = autograd::backward_with(&c, randn(&[B, M, N], &mut rng)).unwrap();
    assert_eq!(g.get(&a).unwrap().shape(), [B, M, K]);
}

fn err(r: Result<Tensor>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn bad_shapes_are_errors() {
    let mut rng = Rng::new(18);
    let e = err(ops::matmul(&randn(&[M, K], &mut rng), &randn(&[K + 1, N], &mut rng)));
    assert!(e.contains("matmul") && e.contains("[7, 13]") && e.contains("[14, 5]"), "{e}");
    let e = err(ops::matmul_t(&randn(&[M, K], &mut rng), &randn(&[K, N], &mut rng), false, true));
    assert!(e.contains("inner dimensions") && e.contains("13 vs 5"), "{e}");
    let e = err(ops::matmul(&randn(&[B, M, K], &mut rng), &randn(&[B + 1, K, N], &mut rng)));
    assert!(e.contains("batch dimensions") && e.contains("[4, 13, 5]"), "{e}");
    let e = err(ops::matmul(&randn(&[K], &mut rng), &randn(&[K, N], &mut rng)));
    assert!(e.contains("at least 2 dimensions"), "{e}");
    let e = err(ops::matmul(&randn(&[M, K], &mut rng), &randn(&[B, K, N], &mut rng)));
    assert!(e.contains("batch dimensions"), "{e}");
    let e = err(ops::matmul_t(&randn(&[B, K, M], &mut rng), &randn(&[K, N], &mut rng), true, false));
    assert!(e.contains("not supported"), "{e}");
    let e = err(ops::matmul(&randn(&[M, 0], &mut rng), &randn(&[0, N], &mut rng)));
    assert!(e.contains("empty inner dimension"), "{e}");

    let (x, w) = (randn(&[B, M, K], &mut rng), randn(&[N, K], &mut rng));
    let e = err(ops::linear(&x, &w, Some(&randn(&[N + 2], &mut rng))));
    assert!(e.contains("linear") && e.contains("bias") && e.contains("[7]") && e.contains("[5]"), "{e}");
    let e = err(ops::linear(&x, &randn(&[N, K + 1], &mut rng), None));
    assert!(e.contains("linear") && e.contains("[3, 7, 13]") && e.contains("[5, 14]"), "{e}");
    let e = err(ops::linear(&x, &randn(&[K], &mut rng), None));
    assert!(e.contains("linear"), "{e}");
}

// ---------------------------------------------------------------- GPU vs CPU

/// GPU vs CPU on the same rounded values (`common::gpu_parity`), inputs in `dtypes`, with
/// a tolerance for the GPU output's dtype (also for the gradients): `|Δ| ≤ atol·rms(ref) +
/// rtol·|ref|` and a relative L2 error below 4·rtol.
fn gpu_vs_cpu(name: &str, dev: Device, inputs: &[Tensor], dtypes: &[DType], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    gpu_parity(name, dev, inputs, dtypes, None, None, f, |g, w, out_dtype, what| {
        // bf16 results round to 8 significant bits; f32 products run in TF32 on cuBLASLt
        // (inputs rounded to 11 bits, so the sum's error grows like sqrt(K)·2⁻¹¹).
        let (atol, rtol) = match out_dtype {
            DType::BF16 => (2f32.powi(-8), 2f32.powi(-7)),
            DType::F32 => (2f32.powi(-7), 2f32.powi(-9)),
        };
        let rms = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        assert_close(g, w, atol * rms, rtol, &format!("{name}: {what}"));
        assert!(rel_err(g, w) < 4.0 * rtol as f64, "{name}: {what}: relative error {}", rel_err(g, w));
    });
}

/// A CPU tensor whose values are exactly representable in bf16, so that a GPU cast of
/// its f32 copy to bf16 loses nothing and the CPU reference sees the same operands.
fn bf16_exact(t: Tensor) -> Tensor {
    let v: Vec<f32> = vals(&t).iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    Tensor::from_vec(v, t.shape(), Device::Cpu).unwrap()
}

const GM: usize = 77;
const GK: usize = 131;
const GN: usize = 97;

#[test]
fn gpu_matmul_matches_cpu() {
    let Some(dev) = gpu() else { return };
    check_matmul(dev);
}

/// [`gpu_matmul_matches_cpu`] and [`gpu_linear_matches_cpu`] through cached cuBLASLt plans
/// (`SYNTHOS_CUDA_GEMM_PLANS=1`), twice, so the second pass reuses every plan.
#[test]
fn gpu_gemm_plans_match_cpu() {
    let Some(dev) = gpu() else { return };
    synthos_engine::cuda::gemm_plan::with_plans(true, || {
        for _ in 0..2 {
            check_matmul(dev);
            check_linear(dev);
        }
    });
}

/// The cached plans pick the algorithm the uncached path picks: the same bits.
#[test]
fn gpu_gemm_plans_are_bit_identical_to_uncached() {
    use synthos_engine::cuda::gemm_plan::with_plans;
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(23);
    for dt in [DType::BF16, DType::F32] {
        let on = |t: Tensor| t.to_device(dev, dt).unwrap();
        let (x, w, b) = (on(randn(&[B, GM, GK], &mut rng)), on(randn(&[GN, GK], &mut rng)), on(randn(&[GN], &mut rng)));
        let y = on(randn(&[B, GK, GN], &mut rng));
        let run = || {
            let l = ops::linear(&x, &w, Some(&b)).unwrap().to_vec().unwrap();
            let m = ops::matmul(&x, &y).unwrap().to_vec().unwrap();
            let t = ops::matmul_t(&x, &x, false, true).unwrap().to_vec().unwrap();
            (l, m, t)
        };
        let plain = with_plans(false, run);
        let cached = with_plans(true, || {
            run();
            run()
        });
        assert!(plain == cached, "{dt}: cached plans changed the results");
    }
}

fn check_matmul(dev: Device) {
    let mut rng = Rng::new(21);
    for dt in [DType::BF16, DType::F32] {
        let mm = |x: &[Tensor]| ops::matmul(&x[0], &x[1]);
        let ins = [randn(&[GM, GK], &mut rng), randn(&[GK, GN], &mut rng)];
        gpu_vs_cpu(&format!("matmul 2-D {dt}"), dev, &ins, &[dt, dt], mm);
        let ins = [randn(&[B, GM, GK], &mut rng), randn(&[B, GK, GN], &mut rng)];
        gpu_vs_cpu(&format!("matmul batched {dt}"), dev, &ins, &[dt, dt], mm);
        let ins = [randn(&[B, GM, GK], &mut rng), randn(&[GK, GN], &mut rng)];
        gpu_vs_cpu(&format!("matmul shared b {dt}"), dev, &ins, &[dt, dt], mm);
        for (ta, tb) in [(false, true), (true, false), (true, true)] {
            let a = if ta { [B, GK, GM] } else { [B, GM, GK] };
            let b = if tb { [B, GN, GK] } else { [B, GK, GN] };
            let f = move |x: &[Tensor]| ops::matmul_t(&x[0], &x[1], ta, tb);
            let ins = [randn(&a, &mut rng), randn(&b, &mut rng)];
            gpu_vs_cpu(&format!("matmul_t ta={ta} tb={tb} {dt}"), dev, &ins, &[dt, dt], f);
        }
    }
    // Mixed dtypes compute in bf16; each gradient returns in its input's dtype.
    let ins = [randn(&[B, GM, GK], &mut rng), bf16_exact(randn(&[GK, GN], &mut rng))];
    gpu_vs_cpu("matmul bf16·f32", dev, &ins, &[DType::BF16, DType::F32], |x| ops::matmul(&x[0], &x[1]));
}

/// GELU-tanh in cuBLASLt's epilogue (`SYNTHOS_CUDA_GELU_EPILOGUE=1`): where
/// `linear_gelu_tanh` fuses (outside the tape and outside checkpointed blocks), the fused
/// product against the CPU's `linear` then GELU, with and without a bias, in bf16 and f32
/// at odd sizes; where it does not, the same bits as the two ops in turn.
#[test]
fn gpu_gelu_epilogue_matches_cpu() {
    use synthos_engine::cuda::matmul::with_gelu_epilogue;
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(24);
    let gelu = |t: &Tensor| ops::gelu(t, ops::GeluApprox::Tanh).unwrap();
    for plans in [false, true] {
        synthos_engine::cuda::gemm_plan::with_plans(plans, || {
            with_gelu_epilogue(true, || {
                for dt in [DType::BF16, DType::F32] {
                    let (x, w, b) = (
                        bf16_exact(randn(&[B, GM, GK], &mut rng)),
                        bf16_exact(randn(&[GN, GK], &mut rng)),
                        bf16_exact(randn(&[GN], &mut rng)),
                    );
                    let on = |t: &Tensor| t.to_device(dev, dt).unwrap();
                    let (xg, wg, bg) = (on(&x), on(&w), on(&b));
                    for bias in [true, false] {
                        let (bc, bgpu) = if bias { (Some(&b), Some(&bg)) } else { (None, None) };
                        let name = format!("linear_gelu_tanh {dt} bias {bias} plans {plans}");
                        let want = vals(&gelu(&ops::linear(&x, &w, bc).unwrap()));
                        let got = autograd::no_grad(|| {
                            assert!(ops::gelu_epilogue_applies(&xg, &wg, bgpu).unwrap(), "{name}: not fused");
                            ops::linear_gelu_tanh(&xg, &wg, bgpu).unwrap()
                        });
                        assert_eq!(got.shape(), [B, GM, GN]);
                        assert_eq!(got.dtype(), dt);
                        let (atol, rtol) = match dt {
                            DType::BF16 => (2f32.powi(-8), 2f32.powi(-7)),
                            DType::F32 => (2f32.powi(-7), 2f32.powi(-9)),
                        };
                        let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
                        assert_close(&vals(&got), &want, atol * rms, rtol, &name);
                        assert!(rel_err(&vals(&got), &want) < 4.0 * rtol as f64, "{name}: relative error");

                        // On the tape and inside a checkpointed block: the two ops, bit for bit.
                        let wt = wg.detach().requires_grad();
                        assert!(!ops::gelu_epilogue_applies(&xg, &wt, bgpu).unwrap(), "{name}: fused on the tape");
                        let taped = ops::linear_gelu_tanh(&xg, &wt, bgpu).unwrap();
                        let plain = autograd::no_grad(|| {
                            with_gelu_epilogue(false, || gelu(&ops::linear(&xg, &wg, bgpu).unwrap()))
                        });
                        assert_eq!(vals(&taped), vals(&plain), "{name}: the tape's path changed");
                        autograd::clear_tape();
                        let params = vec![wt.clone()];
                        let (xc, bc2) = (xg.clone(), bgpu.cloned());
                        let y = autograd::checkpoint(std::slice::from_ref(&xc), &params, move |xs| {
                            let w = wt.detach();
                            assert!(!ops::gelu_epilogue_applies(&xs[0], &w, bc2.as_ref())?, "fused in a checkpoint");
                            ops::linear_gelu_tanh(&xs[0], &w, bc2.as_ref())
                        })
                        .unwrap();
                        assert_eq!(vals(&y), vals(&plain), "{name}: a checkpointed block's first pass");
                        autograd::clear_tape();
                    }
                }
            })
        });
    }
}

/// The MLP's training form with GELU in cuBLASLt's epilogues (`SYNTHOS_CUDA_GELU_EPILOGUE=1`:
/// `GELU_AUX_BIAS` forward, `DGELU_BGRAD` backward, one tape node): output and every
/// gradient against the CPU's three ops, in bf16 and f32, with and without biases, with
/// and without cached plans. A hidden size that is not a multiple of 8 runs unfused, bit
/// for bit the three ops. Checkpointed blocks fuse in both passes (the gradients are those
/// of the block run on the tape) unless they keep linear outputs, and a block nested in
/// such a one's recompute stays unfused in both of its own passes.
#[test]
fn gpu_mlp_gelu_epilogue_matches_cpu() {
    use synthos_engine::autograd::{checkpoint, checkpoint_keeping, Keep};
    use synthos_engine::cuda::matmul::with_gelu_epilogue;
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(25);
    const R: usize = 37;
    const C: usize = 45;
    const F: usize = 96;
    const D: usize = 29;
    // Operands [x, w1, b1, w2, b2], or [x, w1, w2] without biases.
    let mlp = |t: &[Tensor], bias: bool| match bias {
        true => ops::mlp_gelu_tanh(&t[0], &t[1], Some(&t[2]), &t[3], Some(&t[4])),
        false => ops::mlp_gelu_tanh(&t[0], &t[1], None, &t[2], None),
    };
    let fuses = |t: &[Tensor], bias: bool| match bias {
        true => ops::mlp_gelu_fuses(&t[0], &t[1], Some(&t[2]), &t[3], Some(&t[4])).unwrap(),
        false => ops::mlp_gelu_fuses(&t[0], &t[1], None, &t[2], None).unwrap(),
    };
    let inputs = |f: usize, rng: &mut Rng| {
        [
            bf16_exact(randn(&[2, R, C], rng)),
            bf16_exact(ops::scale(&randn(&[f, C], rng), 0.3).unwrap()),
            bf16_exact(randn(&[f], rng)),
            bf16_exact(ops::scale(&randn(&[D, f], rng), 0.3).unwrap()),
            bf16_exact(randn(&[D], rng)),
        ]
    };
    with_gelu_epilogue(true, || {
        for plans in [false, true] {
            synthos_engine::cuda::gemm_plan::with_plans(plans, || {
                for dt in [DType::BF16, DType::F32] {
                    let cpu = inputs(F, &mut rng);
                    for bias in [true, false] {
                        let name = format!("mlp_gelu_tanh {dt} bias {bias} plans {plans}");
                        let cpu =
                            if bias { cpu.to_vec() } else { vec![cpu[0].clone(), cpu[1].clone(), cpu[3].clone()] };
                        // Two layers: the rounded hidden activation feeds sums of 74 rows with
                        // cancellation, so the tolerance is four times `gpu_vs_cpu`'s in absolute
                        // terms (the unfused GPU ops measured up to 0.6 of it here, the fused 0.5).
                        let check = |g: &[f32], w: &[f32], out: DType, what: &str| {
                            let (atol, rtol) = match out {
                                DType::BF16 => (2f32.powi(-6), 2f32.powi(-6)),
                                DType::F32 => (2f32.powi(-6), 2f32.powi(-8)),
                            };
                            let rms = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
                            assert_close(g, w, atol * rms, rtol, &format!("{name}: {what}"));
                            let e = rel_err(g, w);
                            assert!(e < 2.0 * rtol as f64, "{name}: {what}: relative error {e}");
                        };
                        gpu_parity(
                            &name,
                            dev,
                            &cpu,
                            &vec![dt; cpu.len()],
                            None,
                            Some(dt),
                            |t| {
                                let on_gpu = t[0].device().is_cuda();
                                assert_eq!(fuses(t, bias), on_gpu, "{name}: fused on {:?}", t[0].device());
                                let before = autograd::tape_len();
                                let y = mlp(t, bias)?;
                                if on_gpu {
                                    assert_eq!(autograd::tape_len(), before + 1, "{name}: one tape node");
                                }
                                Ok(y)
                            },
                            check,
                        );
                    }
                }
            })
        }

        // A hidden size that is not a multiple of 8: the three ops, bit for bit.
        let cpu = inputs(F + 1, &mut rng);
        let gpu_in: Vec<Tensor> = cpu.iter().map(|t| t.to_device(dev, DType::BF16).unwrap().requires_grad()).collect();
        assert!(!fuses(&gpu_in, true), "hidden {} fused", F + 1);
        let y = mlp(&gpu_in, true).unwrap();
        let plain = with_gelu_epilogue(false, || mlp(&gpu_in, true).unwrap());
        assert_eq!(vals(&y), vals(&plain), "hidden {}: the three ops", F + 1);
        autograd::clear_tape();

        // Checkpointed blocks: fused in both passes (the gradients of the block on the tape,
        // bit for bit), unfused in both when linear outputs are kept (those of the three ops).
        let cpu = inputs(F, &mut rng);
        let gpu_in: Vec<Tensor> = cpu.iter().map(|t| t.to_device(dev, DType::BF16).unwrap().requires_grad()).collect();
        let seed = bf16_exact(randn(&[2, R, D], &mut rng)).to_device(dev, DType::BF16).unwrap();
        let grads = |y: Tensor| {
            let g = autograd::backward_with(&y, seed.clone()).unwrap();
            gpu_in.iter().map(|t| vals(g.get(t).expect("a gradient"))).collect::<Vec<_>>()
        };
        let taped = grads(mlp(&gpu_in, true).unwrap());
        let unfused = with_gelu_epilogue(false, || grads(mlp(&gpu_in, true).unwrap()));
        assert_ne!(taped, unfused, "the fused gradients are the unfused ones: nothing was fused");
        for (keep, want, what) in [
            (Keep::NOTHING, &taped, "keeping nothing"),
            (Keep { attention: true, linear: false }, &taped, "keeping attention"),
            (Keep { attention: false, linear: true }, &unfused, "keeping linear outputs"),
        ] {
            let params = gpu_in[1..].to_vec();
            let fused_wanted = !keep.linear;
            let block_params = params.clone();
            let y = checkpoint_keeping(&gpu_in[..1], &block_params, keep, move |xs| {
                let mut t = vec![xs[0].clone()];
                t.extend(params.iter().cloned());
                assert_eq!(fuses(&t, true), fused_wanted, "a checkpointed block {what}: fusion");
                mlp(&t, true)
            })
            .unwrap();
            assert_eq!(&grads(y), want, "a checkpointed block {what}: gradients");
        }
        let params = gpu_in[1..].to_vec();
        let y = checkpoint_keeping(&gpu_in[..1], &params.clone(), Keep { attention: false, linear: true }, move |xs| {
            let params = params.clone();
            let h = ops::scale(&xs[0], 1.0)?;
            checkpoint(&[h], &params.clone(), move |ys| {
                let mut t = vec![ys[0].clone()];
                t.extend(params.iter().cloned());
                assert!(!fuses(&t, true), "a block nested in a block keeping linear outputs: fused");
                mlp(&t, true)
            })
        })
        .unwrap();
        assert_eq!(grads(y), unfused, "a nested block: gradients");
    });
}

#[test]
fn gpu_linear_matches_cpu() {
    let Some(dev) = gpu() else { return };
    check_linear(dev);
}

fn check_linear(dev: Device) {
    let mut rng = Rng::new(22);
    let with_bias = |x: &[Tensor]| ops::linear(&x[0], &x[1], Some(&x[2]));
    let without = |x: &[Tensor]| ops::linear(&x[0], &x[1], None);
    for dt in [DType::BF16, DType::F32] {
        let ins = [randn(&[B, GM, GK], &mut rng), randn(&[GN, GK], &mut rng), randn(&[GN], &mut rng)];
        gpu_vs_cpu(&format!("linear+bias {dt}"), dev, &ins, &[dt, dt, dt], with_bias);
        gpu_vs_cpu(&format!("linear {dt}"), dev, &ins[..2], &[dt, dt], without);
    }
    // bf16 activations with f32 master-style weight and bias.
    let ins = [randn(&[GM, GK], &mut rng), bf16_exact(randn(&[GN, GK], &mut rng)), bf16_exact(randn(&[GN], &mut rng))];
    gpu_vs_cpu("linear bf16 x, f32 w/b", dev, &ins, &[DType::BF16, DType::F32, DType::F32], with_bias);
}
