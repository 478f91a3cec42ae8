//! Kernel benchmarks shared by `synthos-engine bench` and the criterion benches
//! (`benches/kernels.rs`): one list of cases, each with the bytes it must move and the
//! floating-point operations it must do, so that throughput (GB/s, TFLOP/s) and the
//! fraction of the device's *measured* ceilings (device copy bandwidth, GEMM rate) come
//! out of one place.

use std::time::Instant;

use crate::ops::{self, AttentionOptions, GeluApprox};
use crate::train::CheckpointKeep;
use crate::{autograd, bail, cuda, Device, Result, Rng, Tensor};

/// Problem sizes: `Full` is what the GPU figures are recorded at; `Small` keeps a CPU
/// run to seconds, at the shapes of the built-in demo's training step (batch 16, 64
/// tokens, width 256, 8 heads of 32, FFN 512, 26 context rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// Sizes of the real models (1.3B DiT at 480×832, 4096-token attention).
    Full,
    /// The demo's sizes, for the CPU reference path.
    Small,
}

/// What a case is bound by, which decides the ceiling it is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// Compared with the measured device copy bandwidth.
    Memory,
    /// Compared with the measured GEMM rate.
    Compute,
}

/// One benchmark: a closure that issues the work once.
pub struct BenchCase {
    /// Kernel family (criterion group).
    pub family: &'static str,
    /// Case name with its sizes.
    pub name: String,
    /// Fewest bytes the work must move through device memory.
    pub bytes: f64,
    /// Floating-point operations of the work.
    pub flops: f64,
    /// Which ceiling applies.
    pub bound: Bound,
    /// What one run of a whole-model case (training steps and sampling) processes.
    pub model: Option<ModelWork>,
    /// Issues the work once (asynchronously on a GPU).
    pub run: Box<dyn FnMut() -> Result<()>>,
}

impl BenchCase {
    /// A kernel case: compared with the measured copy bandwidth (`Bound::Memory`) or
    /// GEMM rate (`Bound::Compute`).
    pub fn kernel(
        bound: Bound,
        family: &'static str,
        name: String,
        bytes: f64,
        flops: f64,
        run: impl FnMut() -> Result<()> + 'static,
    ) -> Self {
        BenchCase { family, name, bytes, flops, bound, model: None, run: Box::new(run) }
    }

    /// A whole-model case (family "model": training steps and sampling), compared with the
    /// GEMM rate: `flops` is everything the run computes (recomputation included), `work`
    /// what it processes.
    pub fn model(name: String, flops: f64, work: ModelWork, run: impl FnMut() -> Result<()> + 'static) -> Self {
        BenchCase {
            family: "model",
            name,
            bytes: 0.0,
            flops,
            bound: Bound::Compute,
            model: Some(work),
            run: Box::new(run),
        }
    }
}

/// The work of one run of a whole-model case.
#[derive(Clone, Copy, Debug)]
pub struct ModelWork {
    /// Samples processed, for samples/s.
    pub samples: usize,
    /// FLOPs of the model's own math, without the recomputation of activation
    /// checkpointing that the case's `flops` counts: the numerator of MFU.
    pub model_flops: f64,
}

/// The timing of one case.
#[derive(Clone, Debug)]
pub struct BenchResult {
    /// Kernel family.
    pub family: &'static str,
    /// Case name.
    pub name: String,
    /// Mean seconds per run.
    pub seconds: f64,
    /// Achieved GB/s (bytes / time).
    pub gbps: f64,
    /// Achieved TFLOP/s.
    pub tflops: f64,
    /// Fraction of the measured ceiling (copy bandwidth or GEMM rate), if known.
    pub fraction: Option<f64>,
    /// Samples per second (training steps and sampling).
    pub samples_per_s: Option<f64>,
    /// Model FLOPs utilisation (whole-model cases): [`ModelWork::model_flops`] per second over the
    /// device's peak, its nominal dense bf16 rate where [`nominal_bf16_tflops`] knows the
    /// GPU, else the measured GEMM rate (see [`mfu_peak`]).
    pub mfu: Option<f64>,
    /// The most device memory allocated at once while the case ran (GPU whole-model
    /// cases only).
    pub peak_bytes: Option<u64>,
    /// Why the case could not run (then the timings are NaN).
    pub error: Option<String>,
}

/// Waits for all work issued on `device`.
pub fn synchronize(device: Device) -> Result<()> {
    device.synchronize()
}

/// Mean seconds per call of `run`: warm up, then repeat until `min_seconds` have passed
/// (at least 3 calls), synchronising the device before reading the clock.
pub fn time(device: Device, min_seconds: f64, run: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    run()?;
    synchronize(device)?;
    let mut iters = 0u32;
    let start = Instant::now();
    loop {
        run()?;
        iters += 1;
        if iters >= 3 {
            synchronize(device)?;
            let t = start.elapsed().as_secs_f64();
            if t >= min_seconds {
                return Ok(t / iters as f64);
            }
        }
    }
}

fn rand(shape: &[usize], rng: &mut Rng, device: Device) -> Result<Tensor> {
    Tensor::randn(shape, 1.0, rng, device)
}

/// The device copy ceiling: a large device-to-device copy, counting bytes read plus
/// written, in GB/s.
pub fn copy_case(device: Device, size: Size) -> Result<BenchCase> {
    let n = match size {
        Size::Full => 1 << 28,
        Size::Small => 1 << 22,
    };
    let x = rand(&[n], &mut Rng::new(1), device)?;
    let bytes = 2.0 * (n * x.dtype().size()) as f64;
    Ok(BenchCase::kernel(Bound::Memory, "copy", format!("copy {n}"), bytes, 0.0, move || x.deep_copy().map(|_| ())))
}

/// The GEMM ceiling: a square matmul through cuBLASLt (or the CPU GEMM).
pub fn gemm_case(device: Device, size: Size) -> Result<BenchCase> {
    let n = match size {
        Size::Full => 8192,
        Size::Small => 512,
    };
    let mut rng = Rng::new(2);
    let (a, b) = (rand(&[n, n], &mut rng, device)?, rand(&[n, n], &mut rng, device)?);
    let e = a.dtype().size() as f64;
    Ok(BenchCase::kernel(
        Bound::Compute,
        "matmul",
        format!("gemm {n}x{n}x{n}"),
        3.0 * (n * n) as f64 * e,
        2.0 * (n as f64).powi(3),
        move || ops::matmul(&a, &b).map(|_| ()),
    ))
}

/// Every benchmark case on `device` (the ceilings first).
pub fn cases(device: Device, size: Size) -> Result<Vec<BenchCase>> {
    let full = size == Size::Full;
    let mut rng = Rng::new(3);
    let mut v = vec![copy_case(device, size)?, gemm_case(device, size)?];
    let e = device.default_dtype().size() as f64;

    // Elementwise: the DiT's activations at 480×832 (1560 tokens × 1536), batch 8.
    let (tokens, dim) = if full { (8 * 1560, 1536) } else { (16 * 64, 256) };
    let n = tokens * dim;
    {
        let (a, b) = (rand(&[n], &mut rng, device)?, rand(&[n], &mut rng, device)?);
        v.push(BenchCase::kernel(
            Bound::Memory,
            "elementwise",
            format!("add {n}"),
            3.0 * n as f64 * e,
            n as f64,
            move || ops::add(&a, &b).map(|_| ()),
        ));
        // A broadcast: one row added to every token (the per-row chunk path).
        let (x, row) = (rand(&[tokens, dim], &mut rng, device)?, rand(&[dim], &mut rng, device)?);
        v.push(BenchCase::kernel(
            Bound::Memory,
            "elementwise",
            format!("add {tokens}x{dim} + row"),
            2.0 * n as f64 * e,
            n as f64,
            move || ops::add(&x, &row).map(|_| ()),
        ));
    }
    {
        let x = rand(&[n], &mut rng, device)?;
        v.push(BenchCase::kernel(
            Bound::Memory,
            "elementwise",
            format!("gelu_tanh {n}"),
            2.0 * n as f64 * e,
            10.0 * n as f64,
            move || ops::gelu(&x, GeluApprox::Tanh).map(|_| ()),
        ));
    }
    {
        let batch = if full { 8 } else { 16 };
        let per = tokens / batch;
        let x = rand(&[batch, per, dim], &mut rng, device)?;
        let g = rand(&[batch, 1, dim], &mut rng, device)?;
        let y = rand(&[batch, per, dim], &mut rng, device)?;
        v.push(BenchCase::kernel(
            Bound::Memory,
            "elementwise",
            format!("gated_residual {batch}x{per}x{dim}"),
            3.0 * n as f64 * e,
            2.0 * n as f64,
            move || ops::gated_residual(&x, &g, &y).map(|_| ()),
        ));
        let (shift, scale) = (rand(&[batch, 1, dim], &mut rng, device)?, rand(&[batch, 1, dim], &mut rng, device)?);
        let x2 = rand(&[batch, per, dim], &mut rng, device)?;
        v.push(BenchCase::kernel(
            Bound::Memory,
            "norm",
            format!("layer_norm_modulate {batch}x{per}x{dim}"),
            2.0 * n as f64 * e,
            8.0 * n as f64,
            {
                let (x2, shift, scale) = (x2.clone(), shift.clone(), scale.clone());
                move || ops::layer_norm_modulate(&x2, &shift, &scale, 1e-6).map(|_| ())
            },
        ));
        let x3 = rand(&[batch, per, dim], &mut rng, device)?;
        let w = rand(&[dim], &mut rng, device)?;
        v.push(BenchCase::kernel(
            Bound::Memory,
            "norm",
            format!("rms_norm {batch}x{per}x{dim}"),
            2.0 * n as f64 * e,
            5.0 * n as f64,
            {
                let (x3, w) = (x3.clone(), w.clone());
                move || ops::rms_norm(&x3, &w, 1e-6).map(|_| ())
            },
        ));
        // Forward and backward as a training step runs them: the input and the parameters
        // (the modulation, the weight) tracked. The backward reads x and dy and writes dx,
        // and reduces the parameter gradients over the rows (the bytes count 5 tensors:
        // the forward's read and write, the backward's two reads and a write). On a GPU
        // also with SYNTHOS_CUDA_NORM=warp (`[warp]`).
        let variants: &[bool] = if device == Device::Cpu { &[false] } else { &[false, true] };
        for &warp in variants {
            let tag = if warp { "[warp]" } else { "" };
            let (xa, sha, sca, dya) =
                (x2.clone(), shift.clone(), scale.clone(), rand(&[batch, per, dim], &mut rng, device)?);
            v.push(BenchCase::kernel(
                Bound::Memory,
                "norm",
                format!("layer_norm_modulate fwd+bwd{tag} {batch}x{per}x{dim}"),
                5.0 * n as f64 * e,
                20.0 * n as f64,
                move || {
                    crate::cuda::norm::with_warp_forward(warp, || {
                        let (x, sh, sc) =
                            (xa.detach().requires_grad(), sha.detach().requires_grad(), sca.detach().requires_grad());
                        let y = ops::layer_norm_modulate(&x, &sh, &sc, 1e-6)?;
                        autograd::backward_with(&y, dya.clone()).map(|_| ())
                    })
                },
            ));
            let (xb, wb, dyb) = (x3.clone(), w.clone(), rand(&[batch, per, dim], &mut rng, device)?);
            v.push(BenchCase::kernel(
                Bound::Memory,
                "norm",
                format!("rms_norm fwd+bwd{tag} {batch}x{per}x{dim}"),
                5.0 * n as f64 * e,
                14.0 * n as f64,
                move || {
                    crate::cuda::norm::with_warp_forward(warp, || {
                        let (x, w) = (xb.detach().requires_grad(), wb.detach().requires_grad());
                        let y = ops::rms_norm(&x, &w, 1e-6)?;
                        autograd::backward_with(&y, dyb.clone()).map(|_| ())
                    })
                },
            ));
        }
        // The one-warp-per-row forward beside the default (GPU only; SYNTHOS_CUDA_NORM=warp).
        if device != Device::Cpu {
            use crate::cuda::norm::with_warp_forward;
            let (x4, shift, scale) = (x2.clone(), shift.clone(), scale.clone());
            v.push(BenchCase::kernel(
                Bound::Memory,
                "norm",
                format!("layer_norm_modulate[warp] {batch}x{per}x{dim}"),
                2.0 * n as f64 * e,
                8.0 * n as f64,
                move || with_warp_forward(true, || ops::layer_norm_modulate(&x4, &shift, &scale, 1e-6).map(|_| ())),
            ));
            let (x5, w5) = (x3.clone(), w.clone());
            v.push(BenchCase::kernel(
                Bound::Memory,
                "norm",
                format!("rms_norm[warp] {batch}x{per}x{dim}"),
                2.0 * n as f64 * e,
                5.0 * n as f64,
                move || with_warp_forward(true, || ops::rms_norm(&x5, &w5, 1e-6).map(|_| ())),
            ));
        }
    }

    // RoPE on the DiT's q: 30×52 latent patches (480×832), 12 heads of 128.
    {
        let (b, fh, fw, h, d) = if full { (8, 30, 52, 12, 128) } else { (16, 8, 8, 8, 32) };
        let table = ops::rope_table_3d(1, fh, fw, d, 10000.0)?;
        let (cos, sin) = table.to_tensors(device)?;
        let x = rand(&[b, fh * fw, h, d], &mut rng, device)?;
        let n = (b * fh * fw * h * d) as f64;
        v.push(BenchCase::kernel(
            Bound::Memory,
            "rope",
            format!("rope {b}x{}x{h}x{d}", fh * fw),
            2.0 * n * e,
            3.0 * n,
            move || ops::rope(&x, &cos, &sin).map(|_| ()),
        ));
    }
    // Reductions and shape copies: a full sum, the [B,N,H,D] -> [B,H,N,D] permute and a
    // channels-last transpose.
    {
        let x = rand(&[n], &mut rng, device)?;
        // With the 16-byte row kernel beside the default on a GPU (SYNTHOS_CUDA_COLSUM=vec).
        let variants: &[bool] = if device == Device::Cpu { &[false] } else { &[false, true] };
        for &vector in variants {
            let x = x.clone();
            let name = format!("sum_all{} {n}", if vector { "[vec]" } else { "" });
            v.push(BenchCase::kernel(Bound::Memory, "reduce", name, n as f64 * e, n as f64, move || {
                crate::cuda::reduce::with_vector_columns(vector, || ops::sum_all(&x).map(|_| ()))
            }));
        }
        // Bias and gate gradients: column sums of [B·N, D] onto [D] and of [B, N, D] onto
        // [B, 1, D] (split over the rows), with the 16-byte vector kernel beside the default
        // on a GPU (SYNTHOS_CUDA_COLSUM=vec).
        let (b, nn, dd) = if full { (8, 1560, 1536) } else { (16, 64, 256) };
        let g = rand(&[b, nn, dd], &mut rng, device)?;
        let variants: &[bool] = if device == Device::Cpu { &[false] } else { &[false, true] };
        for &vector in variants {
            let tag = if vector { "[vec]" } else { "" };
            for (what, to) in [("bias", vec![dd]), ("gate", vec![b, 1, dd])] {
                // A bias gradient sums a [B·N, D] gradient, a gate gradient a [B, N, D] one.
                let x = if what == "bias" { ops::reshape(&g, &[b * nn, dd])? } else { g.clone() };
                let out = to.iter().product::<usize>();
                v.push(BenchCase::kernel(
                    Bound::Memory,
                    "reduce",
                    format!("sum_to {what} grad{tag} {b}x{nn}x{dd} -> {to:?}"),
                    (b * nn * dd + out) as f64 * e,
                    (b * nn * dd) as f64,
                    move || {
                        let run = || ops::sum_to(&x, &to).map(|_| ());
                        if vector {
                            crate::cuda::reduce::with_vector_columns(true, run)
                        } else {
                            run()
                        }
                    },
                ));
            }
        }
        // A gate's gradient, Σ over the tokens of g·y ([B, N, D] -> [B, 1, D]): the product
        // written then summed, or (GPU, SYNTHOS_CUDA_COLSUM=vec) one pass over g and y.
        // The bytes count the two reads and the output.
        let y = rand(&[b, nn, dd], &mut rng, device)?;
        for &vector in variants {
            let (g, y) = (g.clone(), y.clone());
            v.push(BenchCase::kernel(
                Bound::Memory,
                "reduce",
                format!("sum_to gate grad of g*y{} {b}x{nn}x{dd} -> [{b}, 1, {dd}]", if vector { "[vec]" } else { "" }),
                (2 * b * nn * dd + b * dd) as f64 * e,
                (2 * b * nn * dd) as f64,
                move || {
                    crate::cuda::reduce::with_vector_columns(vector, || {
                        ops::sum_to_product(&g, &y, &[b, 1, dd]).map(|_| ())
                    })
                },
            ));
        }
        let (b, nn, h, d) = if full { (8, 1560, 12, 128) } else { (16, 64, 8, 32) };
        let y = rand(&[b, nn, h, d], &mut rng, device)?;
        v.push(BenchCase::kernel(
            Bound::Memory,
            "shape",
            format!("permute {b}x{nn}x{h}x{d} -> bhnd"),
            2.0 * (b * nn * h * d) as f64 * e,
            0.0,
            move || ops::permute(&y, &[0, 2, 1, 3]).map(|_| ()),
        ));
        // Channels first to channels last (the last dimension moves: tiled transposes).
        let (c, hw) = if full { (384, 120 * 120) } else { (32, 33 * 33) };
        let z = rand(&[2, c, hw], &mut rng, device)?;
        v.push(BenchCase::kernel(
            Bound::Memory,
            "shape",
            format!("permute 2x{c}x{hw} -> channels last"),
            2.0 * (2 * c * hw) as f64 * e,
            0.0,
            move || ops::permute(&z, &[0, 2, 1]).map(|_| ()),
        ));
    }
    // Loss: the SynthCLIP contrastive logits (global batch 4096 → 4096 classes per row).
    {
        let rows = if full { 4096 } else { 256 };
        let logits = rand(&[rows, rows], &mut rng, device)?;
        let targets: Vec<usize> = (0..rows).collect();
        v.push(BenchCase::kernel(
            Bound::Memory,
            "loss",
            format!("cross_entropy {rows}x{rows}"),
            (rows * rows) as f64 * e,
            4.0 * (rows * rows) as f64,
            move || ops::cross_entropy(&logits, &targets).map(|_| ()),
        ));
    }

    // Linear layers of the DiT block: 1536 → 8960 (FFN up).
    {
        let (m, k, nn) = if full { (8 * 1560, 1536, 8960) } else { (16 * 64, 256, 512) };
        let x = rand(&[m, k], &mut rng, device)?;
        let w = rand(&[nn, k], &mut rng, device)?;
        let b = rand(&[nn], &mut rng, device)?;
        v.push(BenchCase::kernel(
            Bound::Compute,
            "matmul",
            format!("linear+bias {m}x{k}->{nn}"),
            ((m * k) + (nn * k) + (m * nn)) as f64 * e,
            2.0 * (m * k * nn) as f64,
            {
                let (x, w, b) = (x.clone(), w.clone(), b.clone());
                move || ops::linear(&x, &w, Some(&b)).map(|_| ())
            },
        ));
        // The FFN's first layer with its GELU-tanh, as the sampler runs it (outside the
        // tape): a second pass over the output, or (GPU only, SYNTHOS_CUDA_GELU_EPILOGUE=1)
        // cuBLASLt's GELU_BIAS epilogue.
        let variants: &[bool] = if device == Device::Cpu { &[false] } else { &[false, true] };
        for &fused in variants {
            let (x, w, b) = (x.clone(), w.clone(), b.clone());
            v.push(BenchCase::kernel(
                Bound::Compute,
                "matmul",
                format!("linear+bias+gelu{} {m}x{k}->{nn}", if fused { "[epilogue]" } else { "" }),
                ((m * k) + (nn * k) + (m * nn)) as f64 * e,
                2.0 * (m * k * nn) as f64,
                move || {
                    cuda::matmul::with_gelu_epilogue(fused, || {
                        autograd::no_grad(|| ops::linear_gelu_tanh(&x, &w, Some(&b)).map(|_| ()))
                    })
                },
            ));
        }
        // The whole FFN forward and backward as a training step runs it (input, weights and
        // biases tracked): the three ops, or (GPU only, SYNTHOS_CUDA_GELU_EPILOGUE=1) one
        // tape node with GELU_AUX_BIAS forward and DGELU_BGRAD backward. Six products of
        // 2·m·k·n FLOPs; the bytes count the operands and outputs of the six products.
        let w2 = rand(&[k, nn], &mut rng, device)?;
        let b2 = rand(&[k], &mut rng, device)?;
        let dy = rand(&[m, k], &mut rng, device)?;
        for &fused in variants {
            let (x, w, b, w2, b2, dy) = (x.clone(), w.clone(), b.clone(), w2.clone(), b2.clone(), dy.clone());
            v.push(BenchCase::kernel(
                Bound::Compute,
                "matmul",
                format!("mlp fwd+bwd{} {m}x{k}->{nn}->{k}", if fused { "[epilogue]" } else { "" }),
                6.0 * ((m * k) + (nn * k) + (m * nn)) as f64 * e,
                12.0 * (m * k * nn) as f64,
                move || {
                    cuda::matmul::with_gelu_epilogue(fused, || {
                        let t = |v: &Tensor| v.detach().requires_grad();
                        let (x, w, b, w2, b2) = (t(&x), t(&w), t(&b), t(&w2), t(&b2));
                        let y = ops::mlp_gelu_tanh(&x, &w, Some(&b), &w2, Some(&b2))?;
                        autograd::backward_with(&y, dy.clone()).map(|_| ())
                    })
                },
            ));
        }
    }

    // Attention at Wan's shapes: head dim 128, 12 heads; self-attention over the latent
    // tokens of 480×480 (900), 832×480 (1560), 960×960 (3600) and 8192 tokens, and
    // cross-attention of 1560 queries over 257 CLIP + 512 text keys (forward, and
    // forward+backward).
    let attn_shapes: Vec<(usize, usize, usize, usize, usize)> = if full {
        let mut v: Vec<_> = [900, 1560, 3600, 8192].iter().map(|&n| (1, n, n, 12, 128)).collect();
        v.push((1, 1560, 769, 12, 128));
        v
    } else {
        vec![(16, 64, 64, 8, 32), (16, 64, 26, 8, 32)]
    };
    for (b, n, nk, h, d) in attn_shapes {
        let q = rand(&[b, n, h, d], &mut rng, device)?;
        let k = rand(&[b, nk, h, d], &mut rng, device)?;
        let vv = rand(&[b, nk, h, d], &mut rng, device)?;
        let flops = 4.0 * (b * h) as f64 * n as f64 * nk as f64 * d as f64;
        let bytes = (2 * b * n * h * d + 2 * b * nk * h * d) as f64 * e;
        let shape = if nk == n { format!("b{b} n{n} h{h} d{d}") } else { format!("b{b} n{n} k{nk} h{h} d{d}") };
        let (q2, k2, v2) = (q.clone(), k.clone(), vv.clone());
        v.push(BenchCase::kernel(
            Bound::Compute,
            "attention",
            format!("attention fwd {shape}"),
            bytes,
            flops,
            move || autograd::no_grad(|| ops::attention(&q2, &k2, &v2, &AttentionOptions::new(d))).map(|_| ()),
        ));
        // The mma.sync and wgmma kernels beside the default (GPU only; see
        // cuda::attention::AttentionKernel): forward in each shape, and the backward
        // with atomics and the deterministic one.
        use crate::cuda::attention::{with_attention_kernel, AttentionKernel};
        let mma_kernels: &[AttentionKernel] = if device == Device::Cpu {
            &[]
        } else {
            &[
                AttentionKernel::Mma,
                AttentionKernel::Mma128,
                AttentionKernel::MmaRows32,
                AttentionKernel::Wgmma,
                AttentionKernel::WgmmaOverlap,
                AttentionKernel::WgmmaWarpSpecialized,
            ]
        };
        for &kernel in mma_kernels {
            let (q2, k2, v2) = (q.clone(), k.clone(), vv.clone());
            v.push(BenchCase::kernel(
                Bound::Compute,
                "attention",
                format!("attention fwd[{}] {shape}", kernel.name()),
                bytes,
                flops,
                move || {
                    with_attention_kernel(kernel, || {
                        autograd::no_grad(|| ops::attention(&q2, &k2, &v2, &AttentionOptions::new(d))).map(|_| ())
                    })
                },
            ));
        }
        let dout = rand(&[b, n, h, d], &mut rng, device)?;
        let mma_backward: &[AttentionKernel] = if device == Device::Cpu {
            &[]
        } else {
            &[
                AttentionKernel::Mma,
                AttentionKernel::MmaDeterministic,
                AttentionKernel::Wgmma,
                AttentionKernel::WgmmaDeterministic,
            ]
        };
        for &kernel in mma_backward {
            let (q, k, vv, dout) = (q.clone(), k.clone(), vv.clone(), dout.clone());
            v.push(BenchCase::kernel(
                Bound::Compute,
                "attention",
                format!("attention fwd+bwd[{}] {shape}", kernel.name()),
                2.5 * bytes,
                3.5 * flops,
                move || {
                    with_attention_kernel(kernel, || {
                        let (q, k, v) =
                            (q.detach().requires_grad(), k.detach().requires_grad(), vv.detach().requires_grad());
                        let o = ops::attention(&q, &k, &v, &AttentionOptions::new(d))?;
                        autograd::backward_with(&o, dout.clone()).map(|_| ())
                    })
                },
            ));
        }
        v.push(BenchCase::kernel(
            Bound::Compute,
            "attention",
            format!("attention fwd+bwd {shape}"),
            2.5 * bytes,
            3.5 * flops,
            move || {
                let (q, k, v) = (q.detach().requires_grad(), k.detach().requires_grad(), vv.detach().requires_grad());
                let o = ops::attention(&q, &k, &v, &AttentionOptions::new(d))?;
                autograd::backward_with(&o, dout.clone()).map(|_| ())
            },
        ));
    }

    // AdamW over a 1536×8960 weight (one FFN matrix).
    {
        let (r, c) = if full { (8960, 1536) } else { (512, 256) };
        let p = rand(&[r, c], &mut rng, device)?.requires_grad();
        let mut opt = crate::optim::AdamW::new(crate::optim::AdamWConfig::default());
        opt.add_param("w", &p, true)?;
        let g = rand(&[r, c], &mut rng, device)?;
        let grads = {
            let y = ops::mul(&p, &g)?;
            autograd::backward_with(&y, g.clone())?
        };
        let n = (r * c) as f64;
        // grad (e) + master, m, v (4 B each, read and written) + compute copy (e) written.
        let bytes = n * (e + 6.0 * 4.0 + e);
        v.push(BenchCase::kernel(Bound::Memory, "adamw", format!("adamw {r}x{c}"), bytes, 15.0 * n, move || {
            opt.step(&grads, 1e-4, 1.0)
        }));
    }
    // A VAE decoder convolution: 3×3, 384 → 384 channels at 120×120 (480×480 output / 4).
    {
        let (c, hw) = if full { (384, 120) } else { (32, 24) };
        let x = rand(&[1, c, hw, hw], &mut rng, device)?;
        let w = Tensor::randn(&[c, c, 3, 3], 0.02, &mut rng, device)?;
        let b = rand(&[c], &mut rng, device)?;
        // With the column matrix written by rows beside the default on a GPU
        // (SYNTHOS_CUDA_IM2COL=rows).
        let variants: &[bool] = if device == Device::Cpu { &[false] } else { &[false, true] };
        for &by_rows in variants {
            let (x, w, b) = (x.clone(), w.clone(), b.clone());
            v.push(BenchCase::kernel(
                Bound::Compute,
                "conv",
                format!("conv2d{} 3x3 {c}->{c} {hw}x{hw}", if by_rows { "[rows]" } else { "" }),
                (2 * c * hw * hw + 9 * c * c) as f64 * e,
                2.0 * (c * c * 9 * hw * hw) as f64,
                move || {
                    let run = || ops::conv2d(&x, &w, Some(&b), 1, 1).map(|_| ());
                    if by_rows {
                        crate::cuda::conv::with_im2col_by_rows(true, run)
                    } else {
                        run()
                    }
                },
            ));
        }
    }
    Ok(v)
}

/// FLOPs of one DiT forward over `tokens` latent tokens and `ctx` context rows: the
/// linear layers (2 per multiply-add) plus the two attentions (4·N·M·dim each).
pub fn dit_forward_flops(cfg: &crate::models::wan::WanConfig, tokens: usize, ctx: usize) -> f64 {
    let (d, f, n, m) = (cfg.dim as f64, cfg.ffn_dim as f64, tokens as f64, ctx as f64);
    let per_block = 2.0 * n * (4.0 * d * d) // self-attention q, k, v, o
        + 2.0 * n * (2.0 * d * d) + 2.0 * m * (2.0 * d * d) // cross q, o; k, v over the context
        + 2.0 * n * (2.0 * d * f) // FFN
        + 4.0 * n * n * d + 4.0 * n * m * d; // attention scores and values
    cfg.num_layers as f64 * per_block
}

/// FLOPs of a guided `steps`-step sample of one image (both branches every step) at
/// `tokens` latent tokens and `ctx` context rows: the cross-attention keys and values are
/// projected once for all steps ([`crate::models::wan::WanModel::cross_kv`]), the rest of
/// the forward every step.
pub fn dit_sample_flops(cfg: &crate::models::wan::WanConfig, tokens: usize, ctx: usize, steps: usize) -> f64 {
    let (d, m) = (cfg.dim as f64, ctx as f64);
    let cross_kv = cfg.num_layers as f64 * 2.0 * m * (2.0 * d * d);
    2.0 * (steps as f64 * (dit_forward_flops(cfg, tokens, ctx) - cross_kv) + cross_kv)
}

fn dit_step_name(size: Size) -> String {
    match size {
        Size::Full => "dit fwd+bwd 1.3B 60x60 latent, 257+512 ctx".into(),
        Size::Small => "dit fwd+bwd tiny 16x16 latent, 257+512 ctx".into(),
    }
}

/// One DiT training step (forward + backward, no optimizer): the 1.3B config at 480×480
/// (900 tokens, 257 CLIP + 512 text rows) on a GPU, the tiny config on the CPU.
pub fn dit_step_case(device: Device, size: Size) -> Result<BenchCase> {
    use crate::models::wan::{WanConfig, WanModel};
    let (cfg, lat) = match size {
        Size::Full => (WanConfig::preset("wan2.1-t2v-1.3b")?, 60),
        Size::Small => (WanConfig::preset("tiny")?, 16),
    };
    let mut model = WanModel::random(&cfg, 7, device, device.default_dtype())?;
    model.set_checkpointing(size == Size::Full);
    let params: Vec<Tensor> = model.params().into_iter().map(|(_, t)| t.requires_grad()).collect();
    let mut rng = Rng::new(11);
    let x = rand(&[1, cfg.in_channels, 1, lat, lat], &mut rng, device)?;
    let text = rand(&[1, cfg.text_len, cfg.text_dim], &mut rng, device)?;
    let clip = rand(&[1, 257, cfg.clip_dim], &mut rng, device)?;
    let tokens = (lat / 2) * (lat / 2);
    let flops = 3.0 * dit_forward_flops(&cfg, tokens, 257 + cfg.text_len);
    let bytes = params.iter().map(|p| p.numel() as f64 * p.dtype().size() as f64).sum::<f64>() * 3.0;
    let name = dit_step_name(size);
    Ok(BenchCase::kernel(Bound::Compute, "model", name, bytes, flops, move || {
        let v = model.forward(&x, &[500.0], &text, Some(&clip))?;
        let loss = ops::mean_all(&ops::mul(&v, &v)?)?;
        autograd::backward(&loss).map(|_| ())
    }))
}

/// A case whose set-up is heavy (whole models), built only when it is selected.
pub struct LazyCase {
    /// Kernel family.
    pub family: &'static str,
    /// Case name.
    pub name: String,
    /// Builds the case (weights, data, trainer).
    pub build: Box<dyn FnOnce() -> Result<BenchCase>>,
}

/// The whole-model cases: the `dit fwd+bwd` step at `size`, the built-in demo's
/// training step ([`demo_train_step_case`], at the demo's own sizes whatever `size`), the
/// SynthCLIP training step ([`clip_train_step_case`]: ViT-B/16 at batch 256 at
/// `Size::Full`, the tiny CLIP at batch 64 otherwise), on a GPU the CLIP demo's step
/// through its trainer, plain and replayed as CUDA graphs ([`clip_demo_step_case`]), and
/// at `Size::Full` only: the Wan2.1-1.3B training step (Synthos full fine-tune: every DiT
/// tensor trained with AdamW on fp32 masters, activation checkpointing, encoders cached)
/// at 480×480 batch 1 and 832×480 batch 4 (both also with the update after the backward
/// pass, the 480×480 one then also replayed as CUDA graphs, `train step[graphs] …`; both
/// with no checkpointing, where every activation fits; and 832×480 batch 4 keeping the
/// linear and attention outputs for the recompute), the 25-step guided 480×480 sample (the
/// DiT forwards alone, and the whole pipeline: umT5 and CLIP at full width but 1 and 2
/// layers, the DiT, the tiled VAE decode) and the 25-step guided sample of a demo batch
/// (`demo_sample_case`), these two also with CUDA graphs (`sample[graphs] …`). At
/// `Size::Full` the list runs most decisive first (the demo's cases, the recipe's steps,
/// the samples, SynthCLIP's step, then the variants), since a time limit may cut it.
pub fn model_cases(device: Device, size: Size) -> Vec<LazyCase> {
    let case = |name: String, build: Box<dyn FnOnce() -> Result<BenchCase>>| LazyCase { family: "model", name, build };
    let dit_step = case(dit_step_name(size), Box::new(move || dit_step_case(device, size)));
    let (clip_preset, clip_batch) = match size {
        Size::Full => ("synthclip-vit-b16", 256),
        Size::Small => ("tiny", 64),
    };
    let clip_step = case(
        clip_train_step_name(clip_preset, clip_batch),
        Box::new(move || clip_train_step_case(device, clip_preset, clip_batch)),
    );
    let mut v = vec![case(demo_train_step_name(), Box::new(move || demo_train_step_case(device)))];
    if device.is_cuda() {
        v.push(case(demo_train_step_graphs_name(), Box::new(move || demo_train_step_graphs_case(device))));
        // The CLIP demo's step through its trainer (`clip-train` and `synth demo`), plain and
        // replayed as CUDA graphs: launch-bound on a GPU, as the generator's.
        for graphs in [false, true] {
            v.push(case(clip_demo_step_name(graphs), Box::new(move || clip_demo_step_case(device, graphs))));
        }
    }
    if size != Size::Full {
        v.insert(0, dit_step);
        v.push(clip_step);
        return v;
    }
    // At full size the most decisive first (a time limit may cut the list): the demo's
    // cases (cheap), the recipe's training steps, the samples, SynthCLIP's step, then the
    // variants of the training step and the DiT's forward and backward alone.
    for graphs in [false, true] {
        v.push(case(demo_sample_name(graphs), Box::new(move || demo_sample_case(device, graphs))));
    }
    let checkpointed = Some(CheckpointKeep::None);
    let recipe = |width, height, batch, checkpointing| StepCase {
        width,
        height,
        batch,
        checkpointing,
        optimizer_in_backward: true,
        graphs: false,
    };
    let step = |c: StepCase| case(c.name(), Box::new(move || train_step_case(device, c)));
    v.extend([step(recipe(480, 480, 1, checkpointed)), step(recipe(832, 480, 4, checkpointed))]);
    v.push(case("sample 1.3b 480x480 25 steps dit".into(), Box::new(move || sample_dit_case(device))));
    for graphs in [false, true] {
        // With the sampler's DiT forward replayed as a CUDA graph (SYNTHOS_CUDA_GRAPHS=1).
        let name = format!("sample{} 1.3b 480x480 25 steps pipeline", graphs_tag(graphs));
        v.push(case(name, Box::new(move || sample_pipeline_case(device, graphs))));
    }
    v.push(clip_step);
    // The recipe's step with the AdamW update after the backward pass rather than inside
    // it: the gradients of the whole model held at once (peak memory against time). At
    // 480×480 b1 (whose GPU work is a fraction of its host work's time) also with the loss
    // and backward pass replayed as CUDA graphs, beside it.
    for c in [recipe(480, 480, 1, checkpointed), recipe(832, 480, 4, checkpointed)] {
        v.push(step(StepCase { optimizer_in_backward: false, ..c }));
    }
    v.push(step(StepCase { optimizer_in_backward: false, graphs: true, ..recipe(480, 480, 1, checkpointed) }));
    // Selective checkpointing: the recompute reuses the attention outputs (about 0.6 GiB
    // kept at b4), or the linear and attention outputs (about 4 GiB).
    for kept in [CheckpointKeep::Attention, CheckpointKeep::All] {
        v.push(step(recipe(832, 480, 4, Some(kept))));
    }
    // The steps without the recompute, where every activation fits (the weights, fp32
    // masters, gradients and Adam state take about 22 GiB; the case records its peak, and
    // reports the allocation error if the device is too small).
    v.extend([step(recipe(480, 480, 1, None)), step(recipe(832, 480, 4, None))]);
    v.push(dit_step);
    v
}

/// The tag of a case run with CUDA graphs (`SYNTHOS_CUDA_GRAPHS=1`), after its op: `sample[graphs] …`.
fn graphs_tag(graphs: bool) -> &'static str {
    if graphs {
        "[graphs]"
    } else {
        ""
    }
}

/// Name of `demo_sample_case`: `sample demo 64x64 b16 25 steps` (`sample[graphs] …`
/// with CUDA graphs).
pub fn demo_sample_name(graphs: bool) -> String {
    let side = crate::pipeline::demo::IMAGE_SIZE;
    let tag = graphs_tag(graphs);
    format!("sample{tag} demo {side}x{side} b{} 25 steps", crate::train::TrainConfig::demo().batch_size)
}

/// A guided 25-step sample of one demo batch (16 prompts, both branches in one forward,
/// random demo weights): the launch-bound sampling of the demo's quality measure and of
/// `synth demo`'s synthetic set. With `graphs`, under `SYNTHOS_CUDA_GRAPHS=1`.
fn demo_sample_case(device: Device, graphs: bool) -> Result<BenchCase> {
    use crate::pipeline::{demo, GenerateOptions, SynthosPipeline};
    let pipe = SynthosPipeline::demo(device, device.default_dtype(), &[])?;
    let batch = crate::train::TrainConfig::demo().batch_size;
    let captions: Vec<String> = crate::data::demo::DemoAttrs::all().iter().take(batch).map(|a| a.caption()).collect();
    let side = demo::IMAGE_SIZE;
    let opts = GenerateOptions { width: side, height: side, shift: demo::SHIFT, ..Default::default() };
    let cfg = pipe.dit.config().clone();
    let latent = side / demo::PIXEL_FACTOR;
    let [_, ph, pw] = cfg.patch_size;
    let tokens = (latent / ph) * (latent / pw);
    let context = demo::clip_config().tokens() + cfg.text_len;
    let flops = batch as f64 * dit_sample_flops(&cfg, tokens, context, opts.steps);
    Ok(BenchCase::model(demo_sample_name(graphs), flops, ModelWork { samples: batch, model_flops: flops }, move || {
        let prompts: Vec<&str> = captions.iter().map(String::as_str).collect();
        cuda::graph::with_graphs(graphs, || pipe.generate_batch(&prompts, &opts, None, &mut |_, _| {}).map(|_| ()))
    }))
}

/// Name of [`clip_train_step_case`]: `clip train step <preset> b<batch>`;
/// `scripts/reference/bench_torch.py` records open_clip's step under the same name.
pub fn clip_train_step_name(preset: &str, batch: usize) -> String {
    format!("clip train step {preset} b{batch}")
}

/// Forward FLOPs of one CLIP sample (both towers; matrix products only): per token and
/// block 24·W² for the projections and the MLP (MLP 4×) and 4·N·W for attention.
pub fn clip_forward_flops(cfg: &crate::models::clip::ClipConfig) -> f64 {
    let tower = |tokens: usize, k: &crate::models::clip::ClipTrunk| {
        let (n, w, m) = (tokens as f64, k.width as f64, k.mlp_dim as f64);
        k.layers as f64 * n * (2.0 * (4.0 * w * w + 2.0 * w * m) + 4.0 * n * w)
    };
    let (v, t) = (&cfg.vision, &cfg.text);
    let patch = 2.0 * (v.grid() * v.grid()) as f64 * (3 * v.patch_size * v.patch_size * v.trunk.width) as f64;
    patch
        + tower(v.tokens(), &v.trunk)
        + tower(t.context_length, &t.trunk)
        + 2.0 * (v.trunk.width + t.trunk.width) as f64 * cfg.embed_dim as f64
}

/// One SynthCLIP training step: the CLIP of `preset` with random weights (bf16 on a GPU
/// with fp32 AdamW masters, SynthCLIP's betas, decay rule and `logit_scale` clamp),
/// random normalized pixels and random captions of random lengths, the contrastive loss
/// over the whole batch, backward, and the optimizer step.
pub fn clip_train_step_case(device: Device, preset: &str, batch: usize) -> Result<BenchCase> {
    use crate::models::clip::{weight_decay_applies, ClipConfig, ClipModel, LOGIT_SCALE_MAX};
    use crate::nn::Module;
    use crate::optim::{AdamW, AdamWConfig};
    let cfg = ClipConfig::preset(preset)?;
    let model = ClipModel::random(&cfg, 5, device, device.default_dtype())?;
    model.set_trainable(true);
    let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.5 });
    for (name, t) in model.named_params() {
        opt.add_param(&name, &t, weight_decay_applies(&name, t.shape()))?;
    }
    let mut rng = Rng::new(13);
    let s = cfg.vision.image_size;
    let pixels = rand(&[batch, 3, s, s], &mut rng, device)?;
    let c = cfg.text.context_length;
    let mut ids = vec![0u32; batch * c];
    for row in ids.chunks_mut(c) {
        let len = 2 + rng.below(c - 1);
        row[0] = 49406;
        for id in &mut row[1..len - 1] {
            *id = 1 + (rng.next_u64() % 49000) as u32;
        }
        row[len - 1] = 49407;
    }
    let flops = 3.0 * batch as f64 * clip_forward_flops(&cfg);
    Ok(BenchCase::model(
        clip_train_step_name(preset, batch),
        flops,
        ModelWork { samples: batch, model_flops: flops },
        move || {
            let img = model.encode_image(&pixels)?;
            let txt = model.encode_text(&ids, batch)?;
            let loss = ops::clip_loss(&img, &txt, model.logit_scale())?;
            let grads = autograd::backward(&loss)?;
            autograd::clear_tape();
            opt.step(&grads, 5e-4, 1.0)?;
            opt.clamp_param("logit_scale", 0.0, LOGIT_SCALE_MAX)
        },
    ))
}

/// Name of [`clip_demo_step_case`]: `clip train step demo b64` (`clip train step[graphs]
/// demo b64` with CUDA graphs).
pub fn clip_demo_step_name(graphs: bool) -> String {
    format!("clip train step{} demo b{}", graphs_tag(graphs), crate::train::clip::DEMO_BATCH_SIZE)
}

/// One optimizer step of the CLIP demo (`clip-train` with no arguments, and each of the two
/// CLIPs `synth demo` trains): the tiny CLIP trained by [`crate::train::clip::ClipTrainConfig::demo`]
/// through its trainer (data loader, augmentation, the step, AdamW, the `logit_scale`
/// clamp, the accuracy metric) on the generated demo set, with the step's loss and
/// backward pass replayed as CUDA graphs when `graphs`.
pub fn clip_demo_step_case(device: Device, graphs: bool) -> Result<BenchCase> {
    use crate::data::demo::{generate_clip_demo, CLIP_DEMO_IMAGE_SIZE};
    use crate::models::clip::{ClipConfig, ClipModel};
    use crate::train::clip::{ClipTrainConfig, ClipTrainer};
    let dir = ScratchDir::new(&format!("clip-demo{}", if graphs { "-graphs" } else { "" }));
    let cfg = ClipConfig::tiny();
    let set = generate_clip_demo(dir.0.join("data"), cfg.vision.image_size.max(CLIP_DEMO_IMAGE_SIZE), 0)?;
    let tcfg = ClipTrainConfig {
        // No epoch limit, and no validation: as many steps as the timing asks for.
        epochs: 0,
        max_steps: Some(10_000),
        val_folder: None,
        log_metrics: false,
        ..ClipTrainConfig::demo(&set, dir.0.join("run"))
    };
    let batch = tcfg.batch_size;
    let model = ClipModel::random(&cfg, 5, device, device.default_dtype())?;
    let mut trainer = ClipTrainer::new(model, tcfg)?;
    trainer.set_quiet(true);
    let flops = 3.0 * batch as f64 * clip_forward_flops(&cfg);
    Ok(BenchCase::model(
        clip_demo_step_name(graphs),
        flops,
        ModelWork { samples: batch, model_flops: flops },
        move || {
            let _keep = &dir;
            cuda::graph::with_graphs(graphs, || trainer.train_step().map(|_| ()))
        },
    ))
}

/// The 1.3B Synthos pipeline with random weights: umT5-XXL width with 1 layer, CLIP
/// ViT-H/14 width with 2 layers, the Wan2.1-1.3B DiT and the Wan VAE (tiled decode).
pub fn random_pipeline_1_3b(device: Device) -> Result<crate::pipeline::SynthosPipeline> {
    use crate::models::clip::{ClipVisionConfig, ClipVisionEncoder};
    use crate::models::t5::{T5Config, T5Encoder, TextEncoder};
    use crate::models::vae::{TileOptions, Vae, VaeConfig};
    use crate::models::wan::{WanConfig, WanModel};
    use crate::nn::RandomInit;
    use crate::pipeline::{Codec, SynthosPipeline};
    use crate::tokenizer::T5Tokenizer;
    let dt = device.default_dtype();
    let t5 = T5Config { num_layers: 1, text_len: 512, ..T5Config::umt5_xxl() };
    let tok = T5Tokenizer::from_bytes(crate::pipeline::demo::tokenizer_json().as_bytes(), 512)?;
    // The embedding table only needs the tokenizer's rows (a gather costs the same).
    let t5 = T5Config { vocab_size: tok.vocab_size().max(416), ..t5 };
    let text = TextEncoder::new(tok, T5Encoder::random(&t5, 1, device, dt)?)?;
    let clip =
        ClipVisionEncoder::random(&ClipVisionConfig { num_layers: 2, ..ClipVisionConfig::vit_h14() }, 2, device, dt)?;
    let dit = WanModel::random(&WanConfig::wan21_t2v_1_3b(), 3, device, dt)?;
    let vae = Vae::new(&mut RandomInit::new(4, device, dt), &VaeConfig::wan21())?;
    let codec = Codec::Vae { vae: Box::new(vae), tiles: TileOptions::default() };
    SynthosPipeline::from_parts(text, Some(clip), dit, codec)
}

/// A scratch folder under the system temp dir, removed when dropped (held by a case's
/// closure, so it lives as long as the case).
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("synthos-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Name of [`demo_train_step_case`]: `train step demo 64x64 b16` (the demo's image side
/// and batch size). `scripts/reference/bench_torch.py` records its PyTorch step under
/// the same name.
pub fn demo_train_step_name() -> String {
    let side = crate::pipeline::demo::IMAGE_SIZE;
    format!("train step demo {side}x{side} b{}", crate::train::TrainConfig::demo().batch_size)
}

/// [`demo_train_step_name`] of the step replayed as CUDA graphs: `train step[graphs] demo …`.
pub fn demo_train_step_graphs_name() -> String {
    demo_train_step_name().replacen("train step", &format!("train step{}", graphs_tag(true)), 1)
}

/// One optimizer step of the built-in demo (`synthos-engine train` with no arguments):
/// the demo pipeline ([`crate::pipeline::SynthosPipeline::demo`]: random demo DiT, frozen
/// tiny umT5 and CLIP, pixel codec) trained by [`crate::train::TrainConfig::demo`] — 64×64,
/// batch 16, AdamW, text/image dropout 0.1, no activation checkpointing — on a generated
/// set of one batch in a temp folder. One epoch is one step, so the untimed warm-up step
/// fills the encoder cache and every timed step reads it, as the demo run does after its
/// first epoch. Runs the same on every device and `Size` (f32 on the CPU).
pub fn demo_train_step_case(device: Device) -> Result<BenchCase> {
    demo_train_step_case_named(device, demo_train_step_name())
}

/// [`demo_train_step_case`] with its loss and backward pass replayed as CUDA graphs
/// (`SYNTHOS_CUDA_GRAPHS=1`; the update stays outside the graph).
pub fn demo_train_step_graphs_case(device: Device) -> Result<BenchCase> {
    demo_train_step_case_named(device, demo_train_step_graphs_name())
}

fn demo_train_step_case_named(device: Device, name: String) -> Result<BenchCase> {
    use crate::pipeline::{demo, SynthosPipeline};
    use crate::train::{TrainConfig, Trainer};
    let demo_cfg = TrainConfig::demo();
    let batch = demo_cfg.batch_size;
    let side = demo::IMAGE_SIZE;
    let dir = ScratchDir::new(&format!("train-demo-{side}b{batch}"));
    crate::data::demo::generate(dir.0.join("data"), batch, side, demo_cfg.seed)?;
    let cfg = TrainConfig {
        data: Some(dir.0.join("data")),
        output: dir.0.join("run"),
        // No epoch limit: the case may run as many steps as the timing asks for.
        epochs: 0,
        max_steps: Some(1_000_000),
        log_metrics: false,
        ..demo_cfg
    };
    let pipe = SynthosPipeline::demo(device, device.default_dtype(), &[])?;
    let dit_cfg = pipe.dit.config().clone();
    let clip_tokens = demo::clip_config().tokens();
    let mut trainer = Trainer::new(pipe, cfg)?;
    trainer.set_quiet(true);
    let latent = side / demo::PIXEL_FACTOR;
    let [_, ph, pw] = dit_cfg.patch_size;
    let tokens = (latent / ph) * (latent / pw);
    // forward + backward (2×), no recompute; every sample counted with the image tokens
    // (the ~10% whose image is dropped attend over the text rows only).
    let flops = 3.0 * batch as f64 * dit_forward_flops(&dit_cfg, tokens, clip_tokens + dit_cfg.text_len);
    train_case(name, flops, flops, batch, trainer, dir)
}

/// A `model` case timing `trainer.train_step()` on `batch` samples, keeping the
/// trainer's scratch folder alive as long as the case. A case named `…[graphs]…` runs
/// with CUDA graphs (`SYNTHOS_CUDA_GRAPHS=1`) and takes its first step here.
fn train_case(
    name: String,
    flops: f64,
    model_flops: f64,
    batch: usize,
    mut trainer: crate::train::Trainer,
    dir: ScratchDir,
) -> Result<BenchCase> {
    let graphs = name.contains(graphs_tag(true));
    if graphs {
        // A batch layout's first step runs plainly (filling the caches) and its second is
        // recorded: run the first here, so that the timing's warm-up call records and
        // every timed call replays.
        cuda::graph::with_graphs(true, || trainer.train_step())?;
    }
    Ok(BenchCase::model(name, flops, ModelWork { samples: batch, model_flops }, move || {
        let _keep = &dir;
        // A case named `…[graphs]…` runs with CUDA graphs, the others without.
        cuda::graph::with_graphs(graphs, || trainer.train_step().map(|_| ()))
    }))
}

/// One Wan2.1-1.3B training step case of the bench (see [`model_cases`]).
#[derive(Clone, Copy, Debug)]
struct StepCase {
    width: usize,
    height: usize,
    batch: usize,
    /// What checkpointed blocks keep for the recompute; `None`: no checkpointing.
    checkpointing: Option<CheckpointKeep>,
    /// The AdamW update inside the backward pass (the recipe's) or after it.
    optimizer_in_backward: bool,
    /// The loss and backward pass replayed as CUDA graphs (the update after the pass only,
    /// as the run loop records).
    graphs: bool,
}

impl StepCase {
    /// `train step 1.3b <w>x<h> b<batch>`, with ` no checkpointing` when every activation
    /// is kept (PyTorch's reference checkpoints, so that case has no counterpart there),
    /// ` keeping attention+linear` (and so on) for selective checkpointing, ` optimizer
    /// after backward` when the update follows the pass, and `train step[graphs] …` when
    /// the step is replayed as CUDA graphs.
    fn name(&self) -> String {
        let tail = match self.checkpointing {
            None => " no checkpointing",
            Some(CheckpointKeep::None) => "",
            Some(CheckpointKeep::Attention) => " keeping attention",
            Some(CheckpointKeep::Linear) => " keeping linear",
            Some(CheckpointKeep::All) => " keeping attention+linear",
        };
        let after = if self.optimizer_in_backward { "" } else { " optimizer after backward" };
        format!(
            "train step{} 1.3b {}x{} b{}{tail}{after}",
            graphs_tag(self.graphs),
            self.width,
            self.height,
            self.batch
        )
    }
}

/// The training step case `c` on a random Wan2.1-1.3B with the Synthos recipe.
fn train_step_case(device: Device, c: StepCase) -> Result<BenchCase> {
    let StepCase { width, height, batch, checkpointing, optimizer_in_backward, graphs } = c;
    if graphs && optimizer_in_backward {
        bail!("a training step with the update inside the backward pass is not recorded as a CUDA graph");
    }
    use crate::train::{CacheMode, TrainConfig, Trainer};
    let dir = ScratchDir::new(&format!("train-{width}x{height}b{batch}"));
    // One epoch is one step, so the warm-up step fills the encoder cache and every timed
    // step reads it, as a long run does.
    crate::data::demo::generate(dir.0.join("data"), batch, width.max(height), 1)?;
    let cfg = TrainConfig {
        data: Some(dir.0.join("data")),
        output: dir.0.join("run"),
        width,
        height,
        batch_size: batch,
        lr: 1e-5,
        // No epoch limit (the recipe's 10 epochs of one step would end the case after 10
        // steps, before a long --min-seconds is reached).
        epochs: 0,
        max_steps: Some(1_000_000),
        activation_checkpointing: checkpointing.is_some(),
        checkpoint_keep: checkpointing.unwrap_or_default(),
        cache: CacheMode::Memory,
        optimizer_in_backward,
        ..TrainConfig::synthos()
    };
    let pipe = random_pipeline_1_3b(device)?;
    let dit_cfg = pipe.dit.config().clone();
    let mut trainer = Trainer::new(pipe, cfg)?;
    trainer.set_quiet(true);
    let tokens = (height / 16) * (width / 16);
    // forward + backward (2×) + the checkpointed forward recomputed in the backward (all
    // but the elementwise work skipped when the linear and attention outputs are kept).
    let passes = match checkpointing {
        None | Some(CheckpointKeep::All) => 3.0,
        Some(_) => 4.0,
    };
    let forward = batch as f64 * dit_forward_flops(&dit_cfg, tokens, 257 + dit_cfg.text_len);
    train_case(c.name(), passes * forward, 3.0 * forward, batch, trainer, dir)
}

fn sample_dit_case(device: Device) -> Result<BenchCase> {
    use crate::models::wan::{WanConfig, WanModel};
    let cfg = WanConfig::wan21_t2v_1_3b();
    let model = WanModel::random(&cfg, 3, device, device.default_dtype())?;
    let mut rng = Rng::new(12);
    let lat = 60;
    let x0 = rand(&[1, cfg.in_channels, 1, lat, lat], &mut rng, device)?;
    // Both guidance branches in one batch of 2 (as the sampler runs them).
    let text = rand(&[2, cfg.text_len, cfg.text_dim], &mut rng, device)?;
    let clip = rand(&[2, 257, cfg.clip_dim], &mut rng, device)?;
    let steps = 25;
    let sigmas = crate::schedule::sample_sigmas(steps, crate::schedule::SHIFT);
    let flops = dit_sample_flops(&cfg, (lat / 2) * (lat / 2), 257 + cfg.text_len, steps);
    Ok(BenchCase::model(
        "sample 1.3b 480x480 25 steps dit".into(),
        flops,
        ModelWork { samples: 1, model_flops: flops },
        move || {
            autograd::no_grad(|| {
                let kv = model.cross_kv(&model.context(&text, Some(&clip))?)?;
                let mut x = x0.clone();
                for i in 0..steps {
                    let t = crate::schedule::timestep(sigmas[i]) as f32;
                    let xx = ops::concat(&[&x, &x], 0)?;
                    let v = model.forward_with_cross_kv(&xx, &[t, t], &kv)?;
                    let cond = ops::narrow(&v, 0, 0, 1)?;
                    let uncond = ops::narrow(&v, 0, 1, 1)?;
                    let guided = ops::add(&uncond, &ops::scale(&ops::sub(&cond, &uncond)?, 5.0)?)?;
                    x = ops::add(
                        &x,
                        &ops::scale(&guided, (crate::schedule::next_sigma(&sigmas, i) - sigmas[i]) as f32)?,
                    )?;
                }
                ops::sum_all(&x)?.item().map(|_| ())
            })
        },
    ))
}

fn sample_pipeline_case(device: Device, graphs: bool) -> Result<BenchCase> {
    use crate::image::ImageRgb;
    use crate::pipeline::GenerateOptions;
    let pipe = random_pipeline_1_3b(device)?;
    let cfg = pipe.dit.config().clone();
    let pixels: Vec<u8> = (0..224 * 224 * 3).map(|i| ((i * 37) % 251) as u8).collect();
    let reference = ImageRgb::new(224, 224, pixels)?;
    let opts = GenerateOptions { prompt: "a lighthouse at dusk".into(), ..Default::default() };
    let flops = dit_sample_flops(&cfg, 900, 257 + cfg.text_len, 25);
    Ok(BenchCase::model(
        format!("sample{} 1.3b 480x480 25 steps pipeline", graphs_tag(graphs)),
        flops,
        ModelWork { samples: 1, model_flops: flops },
        move || cuda::graph::with_graphs(graphs, || pipe.generate(&opts, Some(&reference)).map(|_| ())),
    ))
}

/// The nominal dense bf16 tensor-core rate (TFLOP/s, fp32 accumulation, no sparsity) of a
/// GPU by its CUDA device name, from NVIDIA's datasheets (half of the "with sparsity"
/// figures): H100 SXM and H200 989.4, H100 NVL 835.5, H100 PCIe 756.5, A100 312. None for
/// other names.
pub fn nominal_bf16_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    if n.contains("H200") {
        Some(989.4)
    } else if n.contains("H100") && n.contains("NVL") {
        Some(835.5)
    } else if n.contains("H100") && n.contains("PCIE") {
        Some(756.5)
    } else if n.contains("H100") {
        Some(989.4)
    } else if n.contains("A100") {
        Some(312.0)
    } else {
        None
    }
}

/// The peak MFU is taken against on `device`: the nominal rate of [`nominal_bf16_tflops`]
/// and a label naming it, or None where the GPU is not in that table or the device is the
/// CPU (then MFU is of the measured GEMM rate).
pub fn mfu_peak(device: Device) -> Result<Option<(f64, String)>> {
    let Device::Cuda(i) = device else { return Ok(None) };
    let name = cuda::device(i)?.name()?;
    Ok(nominal_bf16_tflops(&name).map(|t| (t, format!("{name}: nominal dense bf16 {t} TFLOP/s"))))
}

/// Runs every case for at least `min_seconds` each and reports throughput, with the
/// fraction of the measured copy bandwidth (memory-bound cases) or GEMM rate
/// (compute-bound cases), then the whole-model cases of [`model_cases`].
/// Cases other than the two ceilings are skipped unless their family or name contains one
/// of `filter` (when any is given), and so is every case whose family or name contains one
/// of `skip` (e.g. `[wgmma` for the cases of kernels a GPU test found wrong). A case that
/// fails is reported with its error and the run goes on.
pub fn run_all(
    device: Device,
    size: Size,
    min_seconds: f64,
    filter: &[String],
    skip: &[String],
    mut progress: impl FnMut(&BenchResult),
) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    let (mut copy_gbps, mut gemm_tflops) = (None, None);
    let nominal = mfu_peak(device)?.map(|(t, _)| t);
    let selected = |family: &str, name: &str| {
        let ceiling = family == "copy" || name.starts_with("gemm");
        let matches = |texts: &[String]| texts.iter().any(|f| family.contains(f.as_str()) || name.contains(f.as_str()));
        ceiling || (!matches(skip) && (filter.is_empty() || matches(filter)))
    };
    let mut lazy: Vec<LazyCase> = cases(device, size)?
        .into_iter()
        .map(|c| LazyCase { family: c.family, name: c.name.clone(), build: Box::new(move || Ok(c)) })
        .collect();
    lazy.extend(model_cases(device, size));
    for lc in lazy {
        if !selected(lc.family, &lc.name) {
            continue;
        }
        let (family, name) = (lc.family, lc.name.clone());
        let outcome = (|| -> Result<(f64, BenchCase, Option<u64>)> {
            let mut case = (lc.build)()?;
            // A profile (SYNTHOS_CUDA_PROFILE=1) covers the timed runs, not the set-up.
            synchronize(device)?;
            let _ = cuda::take_profile();
            device.reset_peak_memory()?;
            let seconds = time(device, min_seconds, &mut case.run)?;
            // Only whole-model cases own the memory in use; the kernel cases' inputs are
            // all allocated up front.
            let peak = if case.model.is_some() { device.peak_memory()? } else { None };
            Ok((seconds, case, peak))
        })();
        let r = match outcome {
            Ok((seconds, case, peak_bytes)) => {
                let gbps = case.bytes / seconds / 1e9;
                let tflops = case.flops / seconds / 1e12;
                if case.family == "copy" {
                    copy_gbps = Some(gbps);
                }
                if case.name.starts_with("gemm") {
                    gemm_tflops = Some(tflops);
                }
                let fraction = match case.bound {
                    Bound::Memory => copy_gbps.map(|c| gbps / c),
                    Bound::Compute => gemm_tflops.map(|g| tflops / g),
                };
                let samples_per_s = case.model.map(|m| m.samples as f64 / seconds);
                let mfu =
                    case.model.zip(nominal.or(gemm_tflops)).map(|(m, peak)| m.model_flops / seconds / 1e12 / peak);
                BenchResult {
                    family,
                    name,
                    seconds,
                    gbps,
                    tflops,
                    fraction,
                    samples_per_s,
                    mfu,
                    peak_bytes,
                    error: None,
                }
            }
            Err(e) => BenchResult {
                family,
                name,
                seconds: f64::NAN,
                gbps: f64::NAN,
                tflops: f64::NAN,
                fraction: None,
                samples_per_s: None,
                mfu: None,
                peak_bytes: None,
                error: Some(e.to_string()),
            },
        };
        progress(&r);
        results.push(r);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole-model case names are an interface: the PyTorch reference records its
    /// times under them (`--compare`), `scripts/gpu-check.sh` selects by them and
    /// `scripts/gpu-summary.py` pairs each opt-in with its default by them. At full size
    /// they come most decisive first, as a time limit may cut the list.
    #[test]
    fn model_case_names_in_order() {
        let names = |size| model_cases(Device::Cpu, size).into_iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(
            names(Size::Full),
            [
                "train step demo 64x64 b16",
                "sample demo 64x64 b16 25 steps",
                "sample[graphs] demo 64x64 b16 25 steps",
                "train step 1.3b 480x480 b1",
                "train step 1.3b 832x480 b4",
                "sample 1.3b 480x480 25 steps dit",
                "sample 1.3b 480x480 25 steps pipeline",
                "sample[graphs] 1.3b 480x480 25 steps pipeline",
                "clip train step synthclip-vit-b16 b256",
                "train step 1.3b 480x480 b1 optimizer after backward",
                "train step 1.3b 832x480 b4 optimizer after backward",
                "train step[graphs] 1.3b 480x480 b1 optimizer after backward",
                "train step 1.3b 832x480 b4 keeping attention",
                "train step 1.3b 832x480 b4 keeping attention+linear",
                "train step 1.3b 480x480 b1 no checkpointing",
                "train step 1.3b 832x480 b4 no checkpointing",
                "dit fwd+bwd 1.3B 60x60 latent, 257+512 ctx",
            ]
        );
        assert_eq!(
            names(Size::Small),
            ["dit fwd+bwd tiny 16x16 latent, 257+512 ctx", "train step demo 64x64 b16", "clip train step tiny b64"]
        );
        let e = train_step_case(
            Device::Cpu,
            StepCase {
                width: 480,
                height: 480,
                batch: 1,
                checkpointing: None,
                optimizer_in_backward: true,
                graphs: true,
            },
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("not recorded as a CUDA graph"), "{e}");
    }
}
