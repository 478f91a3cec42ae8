//! Normalisation ops over the last dimension: LayerNorm, LayerNorm fused with the adaLN
//! modulation of the Wan DiT, and RMSNorm. Statistics are computed in fp32 (f64 on the
//! CPU reference) whatever the activations' dtype; each op is one tape node whose
//! backward is one fused kernel (plus a small reduction for parameter gradients).
//!
//! On CUDA the output has the dtype of `x`; parameters may be f32 or bf16 independently
//! of it (fp32 modulation vectors and master weights work with bf16 activations), and
//! their gradients come back in their own dtype.

use super::{cast, cpu_tensor, cuda_tensor, same_device};
use crate::autograd::{needs_grad, record};
use crate::desc::RowNorm;
use crate::{bail, cpu, cuda, Device, Result, Tensor};

/// LayerNorm over the last dimension `D` of `x` (`[..., D]`):
/// `(x − mean)/sqrt(var + eps)·weight + bias` with the biased variance, statistics in
/// fp32. `weight` and `bias` are `[D]` when given (PyTorch's `elementwise_affine`).
pub fn layer_norm(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let (rows, d) = rows_and_dim(OP, x, eps)?;
    for (name, p) in [("weight", weight), ("bias", bias)] {
        if let Some(p) = p {
            check_param(OP, name, p, &[d], x)?;
        }
    }
    let spec =
        RowNorm { rows, d, rows_per_group: rows, w_offset: if weight.is_some() { 0.0 } else { 1.0 }, eps, rms: false };
    row_norm(OP, x, weight, bias, spec)
}

/// The fused adaLN modulation of the Wan DiT: `LN(x)·(1 + scale) + shift` with a
/// LayerNorm without affine parameters. `x` is `[B, N, D]`; `shift` and `scale` have one
/// shape, `[B, 1, D]` (per sample) or `[1, 1, D]` (shared).
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "layer_norm_modulate";
    let (rows, d) = rows_and_dim(OP, x, eps)?;
    if x.rank() != 3 {
        bail!("{OP}: x must be [B, N, D], got {:?}", x.shape());
    }
    let (b, n) = (x.shape()[0], x.shape()[1]);
    if shift.shape() != scale.shape() {
        bail!("{OP}: shift {:?} and scale {:?} must have one shape", shift.shape(), scale.shape());
    }
    let rows_per_group = match shift.shape() {
        [1, 1, dd] if *dd == d => rows,
        [bb, 1, dd] if *bb == b && *dd == d => n,
        s => bail!("{OP}: shift/scale have shape {s:?}, expected [{b}, 1, {d}] or [1, 1, {d}] for x {:?}", x.shape()),
    };
    let spec = RowNorm { rows, d, rows_per_group, w_offset: 1.0, eps, rms: false };
    row_norm(OP, x, Some(scale), Some(shift), spec)
}

/// RMSNorm over the last dimension: `x·rsqrt(mean(x²) + eps)·weight`, computed in fp32
/// (T5's layer norm; Wan's q/k norm over all heads). `weight` is `[D]`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    let (rows, d) = rows_and_dim(OP, x, eps)?;
    check_param(OP, "weight", weight, &[d], x)?;
    let spec = RowNorm { rows, d, rows_per_group: rows, w_offset: 0.0, eps, rms: true };
    row_norm(OP, x, Some(weight), None, spec)
}

/// Rows and row length of `x`, rejecting empty inputs and bad `eps`.
pub(super) fn rows_and_dim(op: &str, x: &Tensor, eps: f32) -> Result<(usize, usize)> {
    if x.rank() == 0 || x.numel() == 0 {
        bail!("{op}: x must have at least one non-empty dimension, got shape {:?}", x.shape());
    }
    if !(eps.is_finite() && eps >= 0.0) {
        bail!("{op}: eps must be finite and non-negative, got {eps}");
    }
    let d = x.shape()[x.rank() - 1];
    Ok((x.numel() / d, d))
}

fn check_param(op: &str, name: &str, p: &Tensor, want: &[usize], x: &Tensor) -> Result<()> {
    if p.shape() != want {
        bail!("{op}: {name} has shape {:?}, expected {want:?} for x of shape {:?}", p.shape(), x.shape());
    }
    Ok(())
}

/// Runs `spec` on `x` with multiplicative parameter `w` and additive `b` (each
/// `[groups, D]` in memory), and records the backward.
fn row_norm(op: &'static str, x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, spec: RowNorm) -> Result<Tensor> {
    let mut all = vec![x];
    all.extend(w);
    all.extend(b);
    let device = same_device(op, &all)?;
    // One kernel parameter type: a bias in another dtype than the weight is cast (on the
    // tape, so its gradient still reaches it in its own dtype).
    let b = match (device, w, b) {
        (Device::Cuda(_), Some(w), Some(b)) if w.dtype() != b.dtype() => Some(cast(b, w.dtype())?),
        _ => b.cloned(),
    };
    let w = w.cloned();
    let mut inputs = vec![x];
    inputs.extend(w.as_ref());
    inputs.extend(b.as_ref());
    let track = needs_grad(&inputs);

    let (out, stats) = match device {
        Device::Cpu => {
            let (sx, sw, sb) = (x.storage(), w.as_ref().map(|t| t.storage()), b.as_ref().map(|t| t.storage()));
            let wv = sw.as_ref().map(|s| s.as_cpu()).transpose()?;
            let bv = sb.as_ref().map(|s| s.as_cpu()).transpose()?;
            let (y, mean, rstd) = cpu::norm::forward(sx.as_cpu()?, wv, bv, &spec);
            let stats =
                if track { Some((cpu_tensor(mean, &[spec.rows])?, cpu_tensor(rstd, &[spec.rows])?)) } else { None };
            (cpu_tensor(y, x.shape())?, stats)
        }
        Device::Cuda(_) => {
            let (sx, sw, sb) = (x.storage(), w.as_ref().map(|t| t.storage()), b.as_ref().map(|t| t.storage()));
            let cx = sx.as_cuda()?;
            let cw = sw.as_ref().map(|s| s.as_cuda()).transpose()?;
            let cb = sb.as_ref().map(|s| s.as_cuda()).transpose()?;
            let (y, stats) = cuda::norm::forward(cx, cw, cb, &spec, track)?;
            let stats = match stats {
                Some((m, r)) => Some((cuda_tensor(&cx.dev, m, &[spec.rows])?, cuda_tensor(&cx.dev, r, &[spec.rows])?)),
                None => None,
            };
            (cuda_tensor(&cx.dev, y, x.shape())?, stats)
        }
    };
    let Some((mean, rstd)) = stats else {
        return Ok(out);
    };
    let (xs, ws, bs) = (x.clone(), w.clone(), b.clone());
    Ok(record(
        op,
        out,
        &inputs,
        Box::new(move |g| {
            let (dx, dw, db) = row_norm_backward(&xs, g, ws.as_ref(), bs.as_ref(), &mean, &rstd, &spec)?;
            let mut grads = vec![dx];
            if ws.is_some() {
                grads.push(dw);
            }
            if bs.is_some() {
                grads.push(db);
            }
            Ok(grads)
        }),
    ))
}

pub(super) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// Gradients of `x`, `w` and `b` (each only when tracked).
pub(super) fn row_norm_backward(
    x: &Tensor,
    g: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    spec: &RowNorm,
) -> Result<Grads3> {
    let (want_w, want_b) = (w.filter(|t| t.is_tracked()), b.filter(|t| t.is_tracked()));
    match x.device() {
        Device::Cpu => {
            let (sx, sg, sm, sr) = (x.storage(), g.storage(), mean.storage(), rstd.storage());
            let sw = w.map(|t| t.storage());
            let wv = sw.as_ref().map(|s| s.as_cpu()).transpose()?;
            let r = cpu::norm::backward(sx.as_cpu()?, sg.as_cpu()?, wv, sm.as_cpu()?, sr.as_cpu()?, spec);
            let dx = if x.is_tracked() { Some(cpu_tensor(r.dx, x.shape())?) } else { None };
            let dw = want_w.map(|t| cpu_tensor(r.dw, t.shape())).transpose()?;
            let db = want_b.map(|t| cpu_tensor(r.db, t.shape())).transpose()?;
            Ok((dx, dw, db))
        }
        Device::Cuda(_) => {
            let g = if g.dtype() != x.dtype() { cast(g, x.dtype())? } else { g.clone() };
            let (sx, sg, sm, sr) = (x.storage(), g.storage(), mean.storage(), rstd.storage());
            let sw = w.map(|t| t.storage());
            let cx = sx.as_cuda()?;
            let cw = sw.as_ref().map(|s| s.as_cuda()).transpose()?;
            let want =
                cuda::norm::Wanted { dx: x.is_tracked(), dw: want_w.map(Tensor::dtype), db: want_b.map(Tensor::dtype) };
            let r = cuda::norm::backward(cx, sg.as_cuda()?, cw, sm.as_cuda()?, sr.as_cuda()?, spec, want)?;
            let wrap = |buf: Option<cuda::CudaBuf>, like: Option<&Tensor>| -> Result<Option<Tensor>> {
                match (buf, like) {
                    (Some(buf), Some(t)) => Ok(Some(cuda_tensor(&cx.dev, buf, t.shape())?)),
                    _ => Ok(None),
                }
            };
            Ok((wrap(r.dx, Some(x))?, wrap(r.dw, want_w)?, wrap(r.db, want_b)?))
        }
    }
}
