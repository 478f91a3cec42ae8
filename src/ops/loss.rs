//! Losses: mean squared error (whole, and per sample for timestep-weighted flow
//! matching), cross-entropy over class logits, and CLIP's contrastive loss (composed of
//! L2 normalization, one product and two cross-entropies). On the GPU losses come out in
//! f32 whatever the inputs' dtype; gradients come back in each input's dtype.

use super::elementwise::in_dtype;
use super::{cpu_tensor, cuda_tensor, same_device};
use crate::autograd::record;
use crate::{bail, cpu, cuda, DType, Device, Result, Tensor};
use cudarc::driver::CudaSlice;

/// Mean squared error over rows: `[]` when `per_sample` is off (one row), else `[B]`
/// with one row per leading index.
fn sq_err(name: &'static str, pred: &Tensor, target: &Tensor, per_sample: bool) -> Result<Tensor> {
    let device = same_device(name, &[pred, target])?;
    if pred.shape() != target.shape() {
        bail!("{name}: pred of shape {:?} and target of shape {:?} differ", pred.shape(), target.shape());
    }
    if pred.numel() == 0 || (per_sample && pred.rank() == 0) {
        bail!(
            "{name}: needs a non-empty input{}, got shape {:?}",
            if per_sample { " of rank ≥ 1" } else { "" },
            pred.shape()
        );
    }
    let n = pred.numel();
    let rows = if per_sample { pred.shape()[0] } else { 1 };
    let len = n / rows;
    let out_shape: &[usize] = if per_sample { &pred.shape()[..1] } else { &[] };
    // Both in one dtype for the kernel; a mixed pair meets in f32, which loses nothing.
    let dt = if pred.dtype() == target.dtype() { pred.dtype() } else { DType::F32 };
    let (p, t) = (in_dtype(pred, dt)?, in_dtype(target, dt)?);
    let out = match device {
        Device::Cpu => {
            let (sp, st) = (p.storage(), t.storage());
            cpu_tensor(cpu::loss::sq_err_rows(sp.as_cpu()?, st.as_cpu()?, rows), out_shape)?
        }
        Device::Cuda(_) => {
            let (sp, st) = (p.storage(), t.storage());
            let (cp, ct) = (sp.as_cuda()?, st.as_cuda()?);
            cuda_tensor(&cp.dev, cuda::loss::sq_err_rows(cp, ct, rows, len)?, out_shape)?
        }
    };
    let (tp, tt) = (pred.is_tracked(), target.is_tracked());
    let (pdt, tdt) = (pred.dtype(), target.dtype());
    let shape = pred.shape().to_vec();
    Ok(record(
        name,
        out,
        &[pred, target],
        Box::new(move |g| {
            let dp = match device {
                Device::Cpu => {
                    let (sp, st, sg) = (p.storage(), t.storage(), g.storage());
                    cpu_tensor(cpu::loss::sq_err_rows_grad(sp.as_cpu()?, st.as_cpu()?, sg.as_cpu()?), &shape)?
                }
                Device::Cuda(_) => {
                    let g = in_dtype(g, DType::F32)?;
                    let (sp, st, sg) = (p.storage(), t.storage(), g.storage());
                    let (cp, ct, cg) = (sp.as_cuda()?, st.as_cuda()?, sg.as_cuda()?);
                    cuda_tensor(&cp.dev, cuda::loss::sq_err_backward(cp, ct, cg, len, n)?, &shape)?
                }
            };
            let dt_grad = if tt { Some(in_dtype(&super::scale(&dp, -1.0)?, tdt)?) } else { None };
            let dp_grad = if tp { Some(in_dtype(&dp, pdt)?) } else { None };
            Ok(vec![dp_grad, dt_grad])
        }),
    ))
}

/// Mean of `(pred − target)²` over all elements, shape `[]`.
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    sq_err("mse", pred, target, false)
}

/// Mean of `(pred − target)²` over all but the first dimension, shape `[B]` (for
/// per-sample loss weights).
pub fn mse_per_sample(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    sq_err("mse_per_sample", pred, target, true)
}

/// Mean cross-entropy of `logits` `[N, C]` against class indices `targets` (`N` of them,
/// each `< C`), shape `[]`. The softmax runs in fp32 with the row maximum subtracted.
///
/// The targets are host values (uploaded on a GPU), so the op may not run inside a
/// function recorded as a CUDA graph ([`crate::forbid_host_transfers`]).
pub fn cross_entropy(logits: &Tensor, targets: &[usize]) -> Result<Tensor> {
    let (rows, classes) = ce_shape(logits)?;
    if targets.len() != rows {
        bail!("cross_entropy: {} targets for logits of shape {:?}", targets.len(), logits.shape());
    }
    if let Some((i, t)) = targets.iter().enumerate().find(|(_, &t)| t >= classes) {
        bail!("cross_entropy: target {t} of row {i} out of range for {classes} classes (logits {:?})", logits.shape());
    }
    crate::tensor::check_host_transfer("cross_entropy's class targets given from the host")?;
    cross_entropy_of(logits, Some(targets))
}

/// `[N, C]` of cross-entropy logits, both non-zero.
fn ce_shape(logits: &Tensor) -> Result<(usize, usize)> {
    let &[rows, classes] = logits.shape() else {
        bail!("cross_entropy: logits must have shape [N, C], got {:?}", logits.shape());
    };
    if rows == 0 || classes == 0 {
        bail!("cross_entropy: empty logits of shape {:?}", logits.shape());
    }
    Ok((rows, classes))
}

/// [`cross_entropy`] against `targets` (checked), or with `None` against the row index
/// (row r's class is r; needs N ≤ C), which uploads nothing.
fn cross_entropy_of(logits: &Tensor, targets: Option<&[usize]>) -> Result<Tensor> {
    let (rows, classes) = ce_shape(logits)?;
    if targets.is_none() && rows > classes {
        bail!("cross_entropy: diagonal targets need no more rows than classes, got logits {:?}", logits.shape());
    }
    let x = logits.clone();
    match logits.device() {
        Device::Cpu => {
            let targets = targets.map_or_else(|| (0..rows).collect(), <[usize]>::to_vec);
            let (loss, lse) = cpu::loss::cross_entropy_rows(logits.storage().as_cpu()?, classes, &targets);
            let mean = loss.iter().map(|&v| v as f64).sum::<f64>() / rows as f64;
            let out = cpu_tensor(vec![mean as f32], &[])?;
            Ok(record(
                "cross_entropy",
                out,
                &[logits],
                Box::new(move |g| {
                    // (The incoming gradient's one value, read from CPU storage.)
                    let g = g.storage().as_cpu()?[0];
                    let d = cpu::loss::cross_entropy_grad(x.storage().as_cpu()?, classes, &targets, &lse, g);
                    Ok(vec![Some(cpu_tensor(d, &[rows, classes])?)])
                }),
            ))
        }
        Device::Cuda(_) => {
            let st = logits.storage();
            let c = st.as_cuda()?;
            let dev = c.dev.clone();
            let targets = targets.map(|t| dev.upload_indices(t)).transpose()?;
            let (loss, lse) = cuda::loss::cross_entropy(c, targets_of(&targets), rows, classes)?;
            let out = cuda_tensor(&dev, loss, &[])?;
            let lse = cuda_tensor(&dev, lse, &[rows])?;
            drop(st);
            Ok(record(
                "cross_entropy",
                out,
                &[logits],
                Box::new(move |g| {
                    let g = in_dtype(g, DType::F32)?;
                    let (sx, sl, sg) = (x.storage(), lse.storage(), g.storage());
                    let (cx, cl, cg) = (sx.as_cuda()?, sl.as_cuda()?, sg.as_cuda()?);
                    let d = cuda::loss::cross_entropy_backward(cx, targets_of(&targets), cl, cg, rows, classes)?;
                    Ok(vec![Some(cuda_tensor(&dev, d, &[rows, classes])?)])
                }),
            ))
        }
    }
}

/// The kernel's targets for uploaded ones, or the diagonal.
fn targets_of(t: &Option<CudaSlice<i64>>) -> cuda::loss::Targets<'_> {
    t.as_ref().map_or(cuda::loss::Targets::Diagonal, cuda::loss::Targets::Rows)
}

/// Rows scaled to unit L2 norm over the last dimension, as `F.normalize(x, dim=-1)`:
/// `x / ‖x‖` (a zero row stays zero). Computed as an RMS norm with weight `1/√D` and an
/// epsilon of 1e-24 on `‖x‖²/D`, so in fp32 whatever the input's dtype.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let Some(&d) = x.shape().last() else {
        bail!("l2_normalize: x must have at least one dimension, got a scalar");
    };
    // (Filled on the device: nothing is uploaded, so the op can run in a recorded step.)
    let w = Tensor::full(&[d], 1.0 / (d.max(1) as f32).sqrt(), x.dtype(), x.device())?;
    super::rms_norm(x, &w, 1e-24)
}

/// CLIP's scaled cosine similarities `exp(logit_scale)·îtᵀ` `[Ni, Nt]` of image
/// embeddings `[Ni, E]` and text embeddings `[Nt, E]` (î, t̂: rows L2-normalized), with
/// `logit_scale` a scalar tensor (`[]` or `[1]`). In f32 on both devices: at a scale of
/// 100 a bf16 logit would be off by up to 0.5.
pub fn clip_logits(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    const OP: &str = "clip_logits";
    same_device(OP, &[image, text, logit_scale])?;
    let (&[ni, e], &[nt, et]) = (image.shape(), text.shape()) else {
        bail!("{OP}: image and text embeddings must be [N, E], got {:?} and {:?}", image.shape(), text.shape());
    };
    if e != et || ni == 0 || nt == 0 || e == 0 {
        bail!(
            "{OP}: image embeddings {:?} and text embeddings {:?} must be non-empty with one width",
            image.shape(),
            text.shape()
        );
    }
    if logit_scale.numel() != 1 || logit_scale.rank() > 1 {
        bail!("{OP}: logit_scale must be a scalar ([] or [1]), got shape {:?}", logit_scale.shape());
    }
    let f32 = |t: &Tensor| super::cast(t, DType::F32);
    let a = l2_normalize(&f32(image)?)?;
    let b = l2_normalize(&f32(text)?)?;
    let sim = super::matmul_t(&a, &b, false, true)?;
    let s = super::reshape(&super::exp(&f32(logit_scale)?)?, &[1, 1])?;
    super::mul(&sim, &s)
}

/// CLIP's contrastive loss (SLIP's `CLIPLoss`) of `N` matching image/text embedding
/// pairs `[N, E]`: the mean of the cross-entropy of [`clip_logits`] against the
/// diagonal, by rows (image → text) and by columns (text → image). Shape `[]`, f32.
pub fn clip_loss(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    if image.shape().first() != text.shape().first() {
        bail!("clip_loss: {:?} image and {:?} text embeddings do not pair up", image.shape(), text.shape());
    }
    let logits = clip_logits(image, text, logit_scale)?;
    // Pair i's target is i both ways (no targets uploaded).
    let by_image = cross_entropy_of(&logits, None)?;
    let by_text = cross_entropy_of(&super::transpose(&logits, 0, 1)?, None)?;
    super::scale(&super::add(&by_image, &by_text)?, 0.5)
}
