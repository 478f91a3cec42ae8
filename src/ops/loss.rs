//! Losses: mean squared error (whole, and per sample for timestep-weighted flow
//! matching) and cross-entropy over class logits. On the GPU losses come out in f32
//! whatever the inputs' dtype; gradients come back in each input's dtype.

use super::elementwise::in_dtype;
use super::{cpu_tensor, cuda_tensor, same_device};
use crate::autograd::record;
use crate::{bail, cpu, cuda, DType, Device, Result, Tensor};

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
pub fn cross_entropy(logits: &Tensor, targets: &[usize]) -> Result<Tensor> {
    let &[rows, classes] = logits.shape() else {
        bail!("cross_entropy: logits must have shape [N, C], got {:?}", logits.shape());
    };
    if rows == 0 || classes == 0 {
        bail!("cross_entropy: empty logits of shape {:?}", logits.shape());
    }
    if targets.len() != rows {
        bail!("cross_entropy: {} targets for logits of shape {:?}", targets.len(), logits.shape());
    }
    if let Some((i, t)) = targets.iter().enumerate().find(|(_, &t)| t >= classes) {
        bail!("cross_entropy: target {t} of row {i} out of range for {classes} classes (logits {:?})", logits.shape());
    }
    let x = logits.clone();
    match logits.device() {
        Device::Cpu => {
            let (loss, lse) = cpu::loss::cross_entropy_rows(logits.storage().as_cpu()?, classes, targets);
            let mean = loss.iter().map(|&v| v as f64).sum::<f64>() / rows as f64;
            let out = cpu_tensor(vec![mean as f32], &[])?;
            let targets = targets.to_vec();
            Ok(record(
                "cross_entropy",
                out,
                &[logits],
                Box::new(move |g| {
                    let g = g.item()?;
                    let d = cpu::loss::cross_entropy_grad(x.storage().as_cpu()?, classes, &targets, &lse, g);
                    Ok(vec![Some(cpu_tensor(d, &[rows, classes])?)])
                }),
            ))
        }
        Device::Cuda(_) => {
            let st = logits.storage();
            let c = st.as_cuda()?;
            let dev = c.dev.clone();
            let targets = dev.upload_indices(targets)?;
            let (loss, lse) = cuda::loss::cross_entropy(c, &targets, rows, classes)?;
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
                    let d = cuda::loss::cross_entropy_backward(cx, &targets, cl, cg, rows, classes)?;
                    Ok(vec![Some(cuda_tensor(&dev, d, &[rows, classes])?)])
                }),
            ))
        }
    }
}
