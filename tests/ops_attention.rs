//! Attention: the CPU op against a naive full-matrix reference, finite-difference
//! gradients, bad inputs, and (with a GPU) the flash-attention kernels against the CPU.
mod common;
use common::*;
use synthos_engine::ops::{self, AttentionOptions};
use synthos_engine::{autograd, DType, Device, Rng, Tensor};

/// One attention configuration.
#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    nq: usize,
    nk: usize,
    h: usize,
    dh: usize,
    causal: bool,
    mask: bool,
    /// Leading dim of the bias (1 or b), 0 for none.
    bias_batch: usize,
    /// Softmax scale; `None` for 1/√dh.
    scale: Option<f32>,
}

impl Case {
    fn new(b: usize, nq: usize, nk: usize, h: usize, dh: usize) -> Case {
        Case { b, nq, nk, h, dh, causal: false, mask: false, bias_batch: 0, scale: None }
    }
    fn scale(&self) -> f32 {
        self.scale.unwrap_or(1.0 / (self.dh as f32).sqrt())
    }
}

/// Random inputs of a case on the CPU: q, k, v, key mask (about 30% hidden), bias.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Option<Tensor>,
    bias: Option<Tensor>,
}

fn random_inputs(c: &Case, rng: &mut Rng) -> Inputs {
    let q = randn(&[c.b, c.nq, c.h, c.dh], rng);
    let k = randn(&[c.b, c.nk, c.h, c.dh], rng);
    let v = randn(&[c.b, c.nk, c.h, c.dh], rng);
    let mask = c.mask.then(|| {
        let m: Vec<f32> =
            rng.uniform_vec(c.b * c.nk, 0.0, 1.0).into_iter().map(|u| if u < 0.3 { 0.0 } else { 1.0 }).collect();
        Tensor::from_vec(m, &[c.b, c.nk], Device::Cpu).unwrap()
    });
    let bias = (c.bias_batch > 0).then(|| randn(&[c.bias_batch, c.h, c.nq, c.nk], rng));
    Inputs { q, k, v, mask, bias }
}

/// The textbook computation: the whole [Nq, Nk] score matrix per (batch, head) in f64,
/// −∞ at hidden keys, a row softmax, then P·V. Fully hidden rows give zeros.
fn naive(c: &Case, x: &Inputs) -> Vec<f32> {
    let (q, k, v) = (x.q.to_vec().unwrap(), x.k.to_vec().unwrap(), x.v.to_vec().unwrap());
    let mask = x.mask.as_ref().map(|m| m.to_vec().unwrap());
    let bias = x.bias.as_ref().map(|b| b.to_vec().unwrap());
    let tok = |n: usize, len: usize, b: usize, h: usize| ((b * len + n) * c.h + h) * c.dh;
    let mut out = vec![0f32; c.b * c.nq * c.h * c.dh];
    for b in 0..c.b {
        for h in 0..c.h {
            let mut s = vec![vec![f64::NEG_INFINITY; c.nk]; c.nq];
            for (i, row) in s.iter_mut().enumerate() {
                for (j, sij) in row.iter_mut().enumerate() {
                    let hidden = (c.causal && j > i) || mask.as_ref().is_some_and(|m| m[b * c.nk + j] == 0.0);
                    if hidden {
                        continue;
                    }
                    let (qi, kj) = (tok(i, c.nq, b, h), tok(j, c.nk, b, h));
                    let dot: f64 = (0..c.dh).map(|d| q[qi + d] as f64 * k[kj + d] as f64).sum();
                    let bb = if c.bias_batch == 1 { 0 } else { b };
                    let add = bias.as_ref().map_or(0.0, |bs| bs[((bb * c.h + h) * c.nq + i) * c.nk + j] as f64);
                    *sij = c.scale() as f64 * dot + add;
                }
            }
            for (i, row) in s.iter().enumerate() {
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let e: Vec<f64> = row.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..c.dh {
                    let o: f64 = (0..c.nk).map(|j| e[j] / z * v[tok(j, c.nk, b, h) + d] as f64).sum();
                    out[tok(i, c.nq, b, h) + d] = o as f32;
                }
            }
        }
    }
    out
}

fn opts<'a>(c: &Case, mask: Option<&'a Tensor>, bias: Option<&'a Tensor>) -> AttentionOptions<'a> {
    AttentionOptions { scale: c.scale(), causal: c.causal, key_mask: mask, bias }
}

/// Cases at odd sizes covering self/cross attention, masks, causal, bias (Bb = 1 and B).
fn cpu_cases() -> Vec<Case> {
    let base = Case::new(2, 7, 7, 3, 5);
    let cross = Case::new(2, 7, 11, 3, 5);
    vec![
        base,
        cross,
        Case { mask: true, ..cross },
        Case { causal: true, ..base },
        Case { causal: true, mask: true, ..cross },
        Case { bias_batch: 1, ..cross },
        Case { bias_batch: 2, scale: Some(1.0), ..cross },
        Case { dh: 16, ..cross },
        Case { dh: 16, causal: true, mask: true, bias_batch: 2, ..base },
        Case { dh: 16, mask: true, bias_batch: 1, ..Case::new(2, 11, 7, 3, 16) },
    ]
}

#[test]
fn cpu_matches_naive_reference() {
    let mut rng = Rng::new(11);
    for c in cpu_cases() {
        let x = random_inputs(&c, &mut rng);
        let out = ops::attention(&x.q, &x.k, &x.v, &opts(&c, x.mask.as_ref(), x.bias.as_ref())).unwrap();
        assert_eq!(out.shape(), &[c.b, c.nq, c.h, c.dh]);
        assert_close(&out.to_vec().unwrap(), &naive(&c, &x), 1e-5, 1e-5, &format!("{c:?}"));
    }
}

#[test]
fn default_options() {
    let o = AttentionOptions::new(64);
    assert_eq!(o.scale, 0.125);
    assert!(!o.causal && o.key_mask.is_none() && o.bias.is_none());
}

#[test]
fn fully_masked_rows_give_zeros_and_zero_gradients() {
    let c = Case { causal: true, mask: true, bias_batch: 1, ..Case::new(2, 7, 11, 3, 5) };
    let mut rng = Rng::new(12);
    let x = random_inputs(&c, &mut rng);
    // Batch 0 hides key 0, so causal query 0 sees nothing; batch 1 hides every key.
    let mut m = vec![1.0f32; c.b * c.nk];
    m[0] = 0.0;
    m[c.nk..].fill(0.0);
    let mask = Tensor::from_vec(m, &[c.b, c.nk], Device::Cpu).unwrap();
    let (q, k, v) = (x.q.clone().requires_grad(), x.k.clone().requires_grad(), x.v.clone().requires_grad());
    let bias = x.bias.clone().unwrap().requires_grad();
    let out = ops::attention(&q, &k, &v, &opts(&c, Some(&mask), Some(&bias))).unwrap();
    let o = out.to_vec().unwrap();
    let row = c.h * c.dh; // one query token, all heads
    let masked_rows = |t: &[f32], len: usize| -> Vec<f32> {
        let mut r = t[..row].to_vec(); // batch 0, token 0
        r.extend_from_slice(&t[len * row..]); // batch 1
        r
    };
    assert!(o.iter().all(|x| x.is_finite()));
    assert!(masked_rows(&o, c.nq).iter().all(|x| *x == 0.0), "hidden rows must output zeros");
    assert!(o[row..c.nq * row].iter().any(|x| *x != 0.0), "visible rows are not zero");
    let seed = randn(out.shape(), &mut rng);
    let g = autograd::backward_with(&out, seed).unwrap();
    let (dq, dk, dv) = (
        g.get(&q).unwrap().to_vec().unwrap(),
        g.get(&k).unwrap().to_vec().unwrap(),
        g.get(&v).unwrap().to_vec().unwrap(),
    );
    let db = g.get(&bias).unwrap().to_vec().unwrap();
    for (name, t) in [("dq", &dq), ("dk", &dk), ("dv", &dv), ("dbias", &db)] {
        assert!(t.iter().all(|x| x.is_finite()), "{name} has non-finite values");
    }
    assert!(masked_rows(&dq, c.nq).iter().all(|x| *x == 0.0), "dq of hidden rows");
    assert!(dk[c.nk * row..].iter().all(|x| *x == 0.0) && dv[c.nk * row..].iter().all(|x| *x == 0.0));
    assert!(dk[row..c.nk * row].iter().any(|x| *x != 0.0));
    // Bias row 0 of each head only feeds the hidden query 0 of batch 0 (batch 1 is all hidden).
    for h in 0..c.h {
        assert!(db[h * c.nq * c.nk..][..c.nk].iter().all(|x| *x == 0.0), "dbias of a hidden row");
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(13);
    let cross = Case::new(2, 7, 11, 3, 5);
    let cases = [
        Case { mask: true, bias_batch: 1, ..cross },
        Case { causal: true, mask: true, bias_batch: 2, scale: Some(1.0), ..Case::new(2, 7, 7, 3, 5) },
        Case { dh: 16, causal: true, ..cross },
    ];
    for c in cases {
        let x = random_inputs(&c, &mut rng);
        let mut inputs = vec![x.q.clone(), x.k.clone(), x.v.clone()];
        inputs.extend(x.bias.clone());
        let mask = x.mask.clone();
        let name = format!("attention {c:?}");
        gradcheck(
            &name,
            |t| ops::attention(&t[0], &t[1], &t[2], &opts(&c, mask.as_ref(), t.get(3))),
            &inputs,
            1e-2,
            1e-2,
        );
    }
}

#[test]
fn untracked_bias_gets_no_gradient() {
    let c = Case { bias_batch: 1, ..Case::new(2, 7, 11, 3, 5) };
    let x = random_inputs(&c, &mut Rng::new(14));
    let q = x.q.clone().requires_grad();
    let out = ops::attention(&q, &x.k, &x.v, &opts(&c, None, x.bias.as_ref())).unwrap();
    let g = autograd::backward_with(&out, randn(out.shape(), &mut Rng::new(15))).unwrap();
    assert_eq!(g.len(), 1, "only q is tracked");
    assert!(g.get(&q).is_some());
}

/// The CPU op splits its work over the rayon pool; the results must not depend on how
/// many threads run it (odd sizes: several query blocks, a ragged last one).
#[test]
fn cpu_results_do_not_depend_on_the_thread_count() {
    let base = Case { mask: true, ..Case::new(2, 67, 45, 3, 20) };
    let cases = [Case { bias_batch: 1, ..base }, Case { bias_batch: 2, causal: true, ..base }];
    let mut rng = Rng::new(17);
    for c in cases {
        let x = random_inputs(&c, &mut rng);
        let seed = randn(&[c.b, c.nq, c.h, c.dh], &mut rng);
        let in_pool = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| run(&c, &x, &seed))
        };
        let (out1, grads1) = in_pool(1);
        let (out3, grads3) = in_pool(3);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&out1), bits(&out3), "output {c:?}");
        assert_eq!(grads1.len(), 4, "q, k, v and bias gradients");
        for (name, (a, b)) in ["dq", "dk", "dv", "dbias"].iter().zip(grads1.iter().zip(&grads3)) {
            assert_eq!(bits(a), bits(b), "{name} {c:?}");
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let mut rng = Rng::new(16);
    let q = randn(&[2, 7, 3, 5], &mut rng);
    let k = randn(&[2, 11, 3, 5], &mut rng);
    let v = randn(&[2, 11, 3, 5], &mut rng);
    let o = AttentionOptions::new(5);
    let err = |r: synthos_engine::Result<Tensor>| r.unwrap_err().to_string();

    let k4 = randn(&[2, 11, 4, 5], &mut rng);
    let e = err(ops::attention(&q, &k4, &k4, &o));
    assert!(e.contains("attention") && e.contains("[2, 7, 3, 5]") && e.contains("[2, 11, 4, 5]"), "{e}");

    let e = err(ops::attention(&q, &k, &randn(&[2, 11, 3, 6], &mut rng), &o));
    assert!(e.contains("attention") && e.contains("[2, 11, 3, 6]"), "{e}");

    let e = err(ops::attention(&randn(&[7, 3, 5], &mut rng), &k, &v, &o));
    assert!(e.contains("attention") && e.contains("[7, 3, 5]"), "{e}");

    let mask = randn(&[2, 7], &mut rng);
    let e = err(ops::attention(&q, &k, &v, &AttentionOptions { key_mask: Some(&mask), ..o }));
    assert!(e.contains("key_mask") && e.contains("[2, 11]") && e.contains("[2, 7]"), "{e}");

    for bad in [[3, 3, 7, 11], [1, 3, 11, 7], [2, 1, 7, 11]] {
        let bias = randn(&bad, &mut rng);
        let e = err(ops::attention(&q, &k, &v, &AttentionOptions { bias: Some(&bias), ..o }));
        assert!(e.contains("bias") && e.contains(&format!("{bad:?}")), "{e}");
    }

    let e = err(ops::attention(&q, &k, &v, &AttentionOptions { scale: f32::NAN, ..o }));
    assert!(e.contains("scale"), "{e}");
}

// ---------------------------------------------------------------------------------------
// GPU: the flash kernels against the CPU reference.

/// A copy of `t` whose values are rounded to bf16 (so the CPU and the GPU see the same
/// numbers).
fn bf16_rounded(t: &Tensor, dev: Device) -> Tensor {
    Tensor::from_vec(to_gpu_bf16(t, dev).to_vec().unwrap(), t.shape(), Device::Cpu).unwrap()
}

/// Output and gradients (q, k, v, bias) of one attention call on the device of the inputs.
fn run(c: &Case, x: &Inputs, seed: &Tensor) -> (Vec<f32>, Vec<Vec<f32>>) {
    let (q, k, v) = (
        x.q.deep_copy().unwrap().requires_grad(),
        x.k.deep_copy().unwrap().requires_grad(),
        x.v.deep_copy().unwrap().requires_grad(),
    );
    let bias = x.bias.as_ref().map(|b| b.deep_copy().unwrap().requires_grad());
    let out = ops::attention(&q, &k, &v, &opts(c, x.mask.as_ref(), bias.as_ref())).unwrap();
    let g = autograd::backward_with(&out, seed.clone()).unwrap();
    let mut grads = vec![];
    for t in [Some(&q), Some(&k), Some(&v), bias.as_ref()].into_iter().flatten() {
        let gt = g.get(t).expect("gradient present");
        assert_eq!(gt.dtype(), t.dtype(), "gradient dtype follows the input");
        grads.push(gt.to_vec().unwrap());
    }
    (out.to_vec().unwrap(), grads)
}

/// bf16-aware closeness: elementwise within `rtol` of the value plus `atol_frac` of the
/// largest reference magnitude, and a relative L2 error below `l2`.
fn assert_bf16_close(got: &[f32], want: &[f32], rtol: f32, atol_frac: f32, l2: f64, what: &str) {
    let max = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert_close(got, want, atol_frac * max.max(1e-6), rtol, what);
    let e = rel_err(got, want);
    assert!(e < l2, "{what}: relative L2 error {e} ≥ {l2}");
}

/// Runs `c` on the CPU and on `dev` (q, k, v in `dtype`, bias in `bias_dtype`) from the
/// same bf16-representable inputs and compares output and gradients.
fn compare_gpu(dev: Device, c: &Case, dtype: DType, bias_dtype: DType, rng: &mut Rng) {
    let raw = random_inputs(c, rng);
    let x = Inputs {
        q: bf16_rounded(&raw.q, dev),
        k: bf16_rounded(&raw.k, dev),
        v: bf16_rounded(&raw.v, dev),
        mask: raw.mask,
        bias: raw.bias.as_ref().map(|b| bf16_rounded(b, dev)),
    };
    let seed = bf16_rounded(&randn(&[c.b, c.nq, c.h, c.dh], rng), dev);
    let (out_c, grads_c) = run(c, &x, &seed);

    let on = |t: &Tensor, d: DType| t.to_device(dev, d).unwrap();
    let xg = Inputs {
        q: on(&x.q, dtype),
        k: on(&x.k, dtype),
        v: on(&x.v, dtype),
        mask: x.mask.as_ref().map(|m| on(m, DType::F32)),
        bias: x.bias.as_ref().map(|b| on(b, bias_dtype)),
    };
    let (out_g, grads_g) = run(c, &xg, &on(&seed, DType::BF16));

    let what = format!("{c:?} {dtype:?}");
    assert_bf16_close(&out_g, &out_c, 1.0 / 64.0, 1e-2, 1e-2, &format!("output {what}"));
    for (name, (g, r)) in ["dq", "dk", "dv", "dbias"].iter().zip(grads_g.iter().zip(&grads_c)) {
        assert_bf16_close(g, r, 1.0 / 32.0, 2e-2, 2e-2, &format!("{name} {what}"));
    }
}

#[test]
fn gpu_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(21);
    for dh in [64, 80, 128] {
        let cross = Case::new(2, 77, 131, 3, dh);
        let synthos = Case::new(1, 257, 769, 2, dh);
        let cases = [
            (cross, DType::F32),
            (Case { mask: true, ..cross }, DType::F32),
            (Case { causal: true, ..Case::new(2, 131, 131, 3, dh) }, DType::F32),
            (Case { causal: true, mask: true, bias_batch: 2, ..cross }, DType::F32),
            (Case { bias_batch: 1, scale: Some(1.0 / 16.0), ..Case::new(2, 131, 77, 3, dh) }, DType::BF16),
            (synthos, DType::F32),
            (Case { mask: true, bias_batch: 1, ..synthos }, DType::BF16),
        ];
        for (c, bias_dtype) in cases {
            compare_gpu(dev, &c, DType::BF16, bias_dtype, &mut rng);
        }
    }
}

/// The mma.sync kernels (`SYNTHOS_CUDA_ATTENTION=mma|mma128|mma-r32|mma-det`: every
/// forward shape, the backward with atomics and the deterministic one) against the CPU on
/// every head dim, with masks, causal masking, biases and several key and query tiles.
#[test]
fn gpu_mma_kernels_match_cpu() {
    use synthos_engine::cuda::attention::{with_attention_kernel, AttentionKernel};
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(24);
    for kernel in
        [AttentionKernel::Mma, AttentionKernel::Mma128, AttentionKernel::MmaRows32, AttentionKernel::MmaDeterministic]
    {
        with_attention_kernel(kernel, || {
            for dh in [32, 64, 80, 96, 128] {
                let cases = [
                    (Case::new(2, 77, 131, 3, dh), DType::F32),
                    (Case { mask: true, causal: true, ..Case::new(2, 150, 150, 2, dh) }, DType::F32),
                    (Case { mask: true, bias_batch: 2, ..Case::new(2, 131, 200, 2, dh) }, DType::BF16),
                    (Case { mask: true, bias_batch: 1, ..Case::new(1, 257, 769, 2, dh) }, DType::F32),
                ];
                for (c, bias_dtype) in cases {
                    compare_gpu(dev, &c, DType::BF16, bias_dtype, &mut rng);
                }
            }
        });
    }
}

/// The wgmma kernels (`SYNTHOS_CUDA_ATTENTION=wgmma|wgmma-det|wgmma-ovl`, compute
/// capability 9.0 only; other GPUs take the mma ones), forward and backward, against the
/// CPU at their
/// head dims, with masks, causal masking, biases and their gradients, partial tiles,
/// blocks whose second warpgroup has no query row or no key, and the Wan shapes (1560
/// tokens, and 769 keys of cross-attention).
#[test]
fn gpu_wgmma_kernels_match_cpu() {
    use synthos_engine::cuda::attention::{with_attention_kernel, AttentionKernel};
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(26);
    for kernel in [AttentionKernel::Wgmma, AttentionKernel::WgmmaDeterministic, AttentionKernel::WgmmaOverlap] {
        with_attention_kernel(kernel, || compare_wgmma_cases(dev, &mut rng));
    }
}

/// The wgmma cases of [`gpu_wgmma_kernels_match_cpu`] under the current attention set.
fn compare_wgmma_cases(dev: Device, rng: &mut Rng) {
    for dh in [64, 128] {
        let cases = [
            (Case::new(2, 77, 131, 3, dh), DType::F32),
            (Case { mask: true, causal: true, ..Case::new(2, 150, 300, 2, dh) }, DType::F32),
            (Case { mask: true, bias_batch: 2, ..Case::new(2, 40, 45, 2, dh) }, DType::BF16),
            (Case { mask: true, bias_batch: 1, ..Case::new(1, 257, 769, 2, dh) }, DType::F32),
            (Case::new(1, 1560, 1560, 2, dh), DType::F32),
        ];
        for (c, bias_dtype) in cases {
            compare_gpu(dev, &c, DType::BF16, bias_dtype, rng);
        }
    }
}

/// The warp-specialised wgmma forward (`SYNTHOS_CUDA_ATTENTION=wgmma-ws`: TMA loads,
/// mbarriers, pingpong between two consumer warpgroups; compute capability 9.0 only) on the
/// cases of [`gpu_wgmma_kernels_match_cpu`], in a test of its own so that a GPU run tells
/// its verdict apart from the other wgmma kernels'.
#[test]
fn gpu_wgmma_ws_matches_cpu() {
    use synthos_engine::cuda::attention::{with_attention_kernel, AttentionKernel};
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(27);
    with_attention_kernel(AttentionKernel::WgmmaWarpSpecialized, || compare_wgmma_cases(dev, &mut rng));
}

/// The wgmma operand layouts alone (`kernels/wgmma_probe.cu`, compute capability 9.0
/// only): each of the six forms the wgmma attention kernels use (the three operand forms at
/// N = 64; K-major k-steps at +32 bytes in the swizzled rows; a two-panel N-major B and
/// both K-major at N = 128, the m64n128 instructions) gives the product to fp32 rounding.
/// If `gpu_wgmma_kernels_match_cpu` fails and this passes, the fault is in the attention
/// kernels, not in the descriptors and swizzle.
#[test]
fn gpu_wgmma_layouts_match_cpu() {
    if gpu().is_none() {
        return;
    }
    let dev = synthos_engine::cuda::device(0).unwrap();
    use synthos_engine::cuda::attention::{wgmma_layout_errors, WGMMA_LAYOUT_TOLERANCE};
    match wgmma_layout_errors(&dev).unwrap() {
        None => eprintln!("not compute capability 9.0: wgmma layout probe skipped"),
        Some(errors) => {
            // Every form's verdict at once: which of them fail tells which layout is wrong.
            let names = [
                "0: A, B K-major (n64)",
                "1: A in registers, B N-major (n64)",
                "2: A M-major, B N-major (n64)",
                "3: A, B K-major, k-steps at +32 bytes (n64, K = 64)",
                "4: A in registers, B N-major in two panels (n128)",
                "5: A, B K-major (n128)",
            ];
            for (name, e) in names.iter().zip(&errors) {
                eprintln!("wgmma layout form {name}: largest error {e:.1e} of the product's magnitude");
            }
            let failed = |e: f64| e.is_nan() || e >= WGMMA_LAYOUT_TOLERANCE;
            let bad: Vec<&str> = names.iter().zip(&errors).filter(|(_, e)| failed(**e)).map(|(n, _)| *n).collect();
            assert!(bad.is_empty(), "wgmma layout forms off by more than {WGMMA_LAYOUT_TOLERANCE:e}: {bad:?}");
        }
    }
}

/// The TMA path of the warp-specialised forward alone (`kernels/tma_probe.cu`, compute
/// capability 9.0 only): a box loaded through a tensor map encoded as the forward's lands in
/// the layout the wgmma descriptors read, bit for bit, zeros past the tensor. If
/// `gpu_wgmma_ws_matches_cpu` fails and this passes, the fault is in the kernel's logic.
#[test]
fn gpu_tma_probe_matches_the_wgmma_layout() {
    if gpu().is_none() {
        return;
    }
    let dev = synthos_engine::cuda::device(0).unwrap();
    match synthos_engine::cuda::attention::tma_layout_mismatches(&dev).unwrap() {
        None => eprintln!("not compute capability 9.0: TMA probe skipped"),
        Some(bad) => assert_eq!(
            bad,
            0,
            "TMA probe: {bad} of 2 × {} elements differ from the wgmma layout",
            synthos_engine::cuda::attention::TMA_PROBE_BOX
        ),
    }
}

/// The deterministic backwards (`mma-det`, and `wgmma-det` on compute capability 9.0) give
/// bit-identical gradients, dbias of a bias shared by the batch included, when run twice
/// on the same inputs.
#[test]
fn gpu_deterministic_backward_is_bit_identical() {
    use synthos_engine::cuda::attention::{with_attention_kernel, AttentionKernel};
    let Some(dev) = gpu() else { return };
    let c = Case { mask: true, causal: true, bias_batch: 1, ..Case::new(3, 300, 300, 2, 128) };
    let mut rng = Rng::new(25);
    let raw = random_inputs(&c, &mut rng);
    let on = |t: &Tensor, d: DType| t.to_device(dev, d).unwrap();
    let x = Inputs {
        q: on(&raw.q, DType::BF16),
        k: on(&raw.k, DType::BF16),
        v: on(&raw.v, DType::BF16),
        mask: raw.mask.as_ref().map(|m| on(m, DType::F32)),
        bias: raw.bias.as_ref().map(|b| on(b, DType::F32)),
    };
    let seed = on(&randn(&[c.b, c.nq, c.h, c.dh], &mut rng), DType::BF16);
    for kernel in [AttentionKernel::MmaDeterministic, AttentionKernel::WgmmaDeterministic] {
        let (first, second) = with_attention_kernel(kernel, || (run(&c, &x, &seed), run(&c, &x, &seed)));
        assert_eq!(first.0, second.0, "output ({})", kernel.name());
        for (name, (a, b)) in ["dq", "dk", "dv", "dbias"].iter().zip(first.1.iter().zip(&second.1)) {
            assert!(!a.is_empty(), "{name} missing ({})", kernel.name());
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} differs between two runs ({})",
                kernel.name()
            );
        }
    }
}

#[test]
fn gpu_all_head_dims_and_f32_inputs() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(22);
    for dh in [32, 96] {
        compare_gpu(
            dev,
            &Case { mask: true, causal: true, ..Case::new(2, 70, 70, 2, dh) },
            DType::BF16,
            DType::F32,
            &mut rng,
        );
    }
    // f32 q, k, v are cast to bf16 on the way in; their gradients come back as f32.
    compare_gpu(
        dev,
        &Case { mask: true, bias_batch: 1, ..Case::new(2, 77, 131, 3, 64) },
        DType::F32,
        DType::F32,
        &mut rng,
    );
}

#[test]
fn gpu_fully_masked_rows_are_zero() {
    let Some(dev) = gpu() else { return };
    let c = Case { causal: true, mask: true, ..Case::new(2, 77, 131, 2, 64) };
    let mut rng = Rng::new(23);
    let x = random_inputs(&c, &mut rng);
    let mut m = vec![1.0f32; c.b * c.nk];
    m[0] = 0.0; // batch 0: causal query 0 sees nothing
    m[c.nk..].fill(0.0); // batch 1: no key at all
    let mask = Tensor::from_vec_dtype(m, &[c.b, c.nk], dev, DType::F32).unwrap();
    let (q, k, v) = (
        to_gpu_bf16(&x.q, dev).requires_grad(),
        to_gpu_bf16(&x.k, dev).requires_grad(),
        to_gpu_bf16(&x.v, dev).requires_grad(),
    );
    let out = ops::attention(&q, &k, &v, &opts(&c, Some(&mask), None)).unwrap();
    let o = out.to_vec().unwrap();
    let row = c.h * c.dh;
    assert!(o.iter().all(|x| x.is_finite()), "output has non-finite values");
    assert!(o[..row].iter().chain(&o[c.nq * row..]).all(|x| *x == 0.0), "hidden rows must output zeros");
    let g = autograd::backward_with(&out, to_gpu_bf16(&randn(out.shape(), &mut rng), dev)).unwrap();
    let dq = g.get(&q).unwrap().to_vec().unwrap();
    let dk = g.get(&k).unwrap().to_vec().unwrap();
    assert!(dq.iter().chain(&dk).all(|x| x.is_finite()), "gradients have non-finite values");
    assert!(dq[..row].iter().chain(&dq[c.nq * row..]).all(|x| *x == 0.0), "dq of hidden rows");
    assert!(dk[c.nk * row..].iter().all(|x| *x == 0.0), "dk of hidden keys");
}

#[test]
fn gpu_bad_inputs_are_errors() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(24);
    let q = randn(&[2, 7, 3, 48], &mut rng);
    let qg = to_gpu_bf16(&q, dev);
    let e = ops::attention(&qg, &qg, &qg, &AttentionOptions::new(48)).unwrap_err().to_string();
    assert!(e.contains("head dim 48") && e.contains("CPU"), "{e}");
    let q64 = randn(&[2, 7, 3, 64], &mut rng);
    let e = ops::attention(&to_gpu_bf16(&q64, dev), &q64, &q64, &AttentionOptions::new(64)).unwrap_err().to_string();
    assert!(e.contains("attention") && e.contains("different devices"), "{e}");
}
