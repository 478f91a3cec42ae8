//! Rotary position embedding: Wan2.1's 3D angle table and the rotation op.
//!
//! The table follows `rope_params`/`rope_apply` of Wan2.1 (`wan/modules/model.py`) and
//! diffusers' `WanRotaryPosEmbed`: of a head's `c = head_dim/2` complex pairs
//! `(2i, 2i+1)`, the first `c − 2·(c/3)` turn with the frame index, the next `c/3` with
//! the row and the last `c/3` with the column; pair `j` of an axis with `p` pairs turns by
//! `position·θ^(−2j/(2p))`.

use super::{cpu_tensor, cuda_tensor, same_device};
use crate::autograd::record;
use crate::desc::RowNorm;
use crate::{bail, cpu, cuda, DType, Device, Result, Tensor};

/// The cos/sin table of a 3D RoPE: `[tokens, head_dim/2]` each, tokens in
/// (frame, row, column) row-major order, as host f32 values (angles computed in f64).
#[derive(Clone, Debug)]
pub struct RopeTable {
    /// Grid size along time.
    pub frames: usize,
    /// Grid size along height.
    pub height: usize,
    /// Grid size along width.
    pub width: usize,
    /// Channels per attention head.
    pub head_dim: usize,
    /// cos of the angles, `[tokens, head_dim/2]` row-major.
    pub cos: Vec<f32>,
    /// sin of the angles, `[tokens, head_dim/2]` row-major.
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// Number of tokens (`frames·height·width`).
    pub fn tokens(&self) -> usize {
        self.frames * self.height * self.width
    }

    /// Number of complex pairs per head (`head_dim/2`).
    pub fn pairs(&self) -> usize {
        self.head_dim / 2
    }

    /// The table as f32 tensors `(cos, sin)` of shape `[tokens, head_dim/2]` on `device`,
    /// ready for [`rope`].
    pub fn to_tensors(&self, device: Device) -> Result<(Tensor, Tensor)> {
        let shape = [self.tokens(), self.pairs()];
        Ok((
            Tensor::from_vec_dtype(self.cos.clone(), &shape, device, DType::F32)?,
            Tensor::from_vec_dtype(self.sin.clone(), &shape, device, DType::F32)?,
        ))
    }
}

/// The 3D RoPE table of Wan2.1 for a `frames × height × width` token grid (one image is
/// one frame) and heads of `head_dim` channels, with base `theta` (10000 in Wan).
///
/// Wan precomputes 1024 positions per axis; any grid size works here.
pub fn rope_table_3d(frames: usize, height: usize, width: usize, head_dim: usize, theta: f64) -> Result<RopeTable> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail!("rope_table_3d: head_dim must be even and positive (channels rotate in pairs), got {head_dim}");
    }
    if frames == 0 || height == 0 || width == 0 {
        bail!("rope_table_3d: empty token grid {frames}×{height}×{width}");
    }
    if !(theta.is_finite() && theta > 0.0) {
        bail!("rope_table_3d: theta must be finite and positive, got {theta}");
    }
    let (cos, sin) = cpu::rope::table_3d(frames, height, width, head_dim, theta);
    Ok(RopeTable { frames, height, width, head_dim, cos, sin })
}

/// Applies rotary embedding to `x` (`[B, N, H, Dh]`, heads as a linear layer's output
/// `[B, N, H·Dh]` viewed per head): each pair `(x[2j], x[2j+1])` of token `n` is
/// multiplied, as a complex number, by `cos[n, j] + i·sin[n, j]`. `cos` and `sin` are f32
/// `[N, Dh/2]` tensors on `x`'s device (see [`RopeTable::to_tensors`]); they are
/// constants and get no gradient. The output has `x`'s dtype; the backward rotates by
/// the negative angle.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    const OP: &str = "rope";
    same_device(OP, &[x, cos, sin])?;
    let [_, n, _, dh] = *x.shape() else {
        bail!("{OP}: x must be [B, N, H, head_dim], got {:?}", x.shape());
    };
    if dh % 2 != 0 {
        bail!("{OP}: head_dim must be even (channels rotate in pairs), x has shape {:?}", x.shape());
    }
    for (name, t) in [("cos", cos), ("sin", sin)] {
        if t.shape() != [n, dh / 2] {
            bail!("{OP}: {name} has shape {:?}, expected [{n}, {}] for x of shape {:?}", t.shape(), dh / 2, x.shape());
        }
        if t.dtype() != DType::F32 {
            bail!(
                "{OP}: {name} must be f32 (bf16 angles lose precision), got {}; use RopeTable::to_tensors",
                t.dtype()
            );
        }
        if t.is_tracked() {
            bail!("{OP}: {name} is tracked, but the angle table gets no gradient");
        }
    }
    let out = rotate(x, cos, sin, 1.0)?;
    let (cos, sin) = (cos.clone(), sin.clone());
    let dtype = x.dtype();
    Ok(record(
        OP,
        out,
        &[x],
        Box::new(move |g| {
            let g = if g.dtype() != dtype { super::cast(g, dtype)? } else { g.clone() };
            Ok(vec![Some(rotate(&g, &cos, &sin, -1.0)?)])
        }),
    ))
}

/// Wan's q/k path in one op: `rope(rms_norm(x, weight, eps)` viewed as heads of
/// `head_dim`, `cos`, `sin)`. `x` is `[B, N, D]`, `weight` `[D]`, `cos`/`sin` as for
/// [`rope`]; the result is `[B, N, D / head_dim, head_dim]`. On a GPU with the
/// one-warp-per-row norm forward switched on (`SYNTHOS_CUDA_NORM=warp`), one kernel
/// normalises and rotates each row, and the backward rotates the gradient back before the
/// RMSNorm backward; otherwise (and on the CPU) the two ops run in turn, exactly as when
/// called one after the other.
pub fn rms_norm_rope(
    x: &Tensor,
    weight: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    head_dim: usize,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "rms_norm_rope";
    let [b, n, d] = *x.shape() else {
        bail!("{OP}: x must be [B, N, D], got {:?}", x.shape());
    };
    if head_dim == 0 || d % head_dim != 0 {
        bail!("{OP}: head_dim {head_dim} does not divide the width {d} of x {:?}", x.shape());
    }
    let heads = d / head_dim;
    let fused = x.device().is_cuda()
        && same_device(OP, &[x, weight, cos, sin]).is_ok()
        && weight.shape() == [d]
        && [cos, sin].iter().all(|t| t.shape() == [n, head_dim / 2] && t.dtype() == DType::F32 && !t.is_tracked())
        && cuda::norm::rope_fusable(x.dtype(), weight.dtype(), d, head_dim)?;
    if !fused {
        let y = super::reshape(&super::rms_norm(x, weight, eps)?, &[b, n, heads, head_dim])?;
        return rope(&y, cos, sin);
    }
    let (rows, _) = super::norm::rows_and_dim(OP, x, eps)?;
    let spec = RowNorm { rows, d, rows_per_group: rows, w_offset: 0.0, eps, rms: true };
    let (out, mean, rstd) = {
        let (sx, sw, sc, ss) = (x.storage(), weight.storage(), cos.storage(), sin.storage());
        let cx = sx.as_cuda()?;
        let (y, (mean, rstd)) =
            cuda::norm::forward_rope(cx, sw.as_cuda()?, sc.as_cuda()?, ss.as_cuda()?, &spec, n, head_dim)?;
        let dev = &cx.dev;
        (
            cuda_tensor(dev, y, &[b, n, heads, head_dim])?,
            cuda_tensor(dev, mean, &[rows])?,
            cuda_tensor(dev, rstd, &[rows])?,
        )
    };
    let (xs, ws, cos, sin) = (x.clone(), weight.clone(), cos.clone(), sin.clone());
    Ok(record(
        OP,
        out,
        &[x, weight],
        Box::new(move |g| {
            let g = if g.dtype() != xs.dtype() { super::cast(g, xs.dtype())? } else { g.clone() };
            // The rotation's adjoint is its inverse; then the RMSNorm backward.
            let g = rotate(&g, &cos, &sin, -1.0)?;
            let (dx, dw, _) = super::norm::row_norm_backward(&xs, &g, Some(&ws), None, &mean, &rstd, &spec)?;
            Ok(vec![dx, dw])
        }),
    ))
}

/// Rotates the pairs of `x` by `sign`·angle (shapes checked by [`rope`]).
pub(super) fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, sign: f32) -> Result<Tensor> {
    let [_, n, h, dh] = *x.shape() else {
        bail!("rope: x must be [B, N, H, head_dim], got {:?}", x.shape());
    };
    if x.numel() == 0 {
        return Tensor::zeros(x.shape(), x.dtype(), x.device());
    }
    let (sx, sc, ss) = (x.storage(), cos.storage(), sin.storage());
    match x.device() {
        Device::Cpu => {
            let v = cpu::rope::rope(sx.as_cpu()?, sc.as_cpu()?, ss.as_cpu()?, n, h, dh, sign);
            cpu_tensor(v, x.shape())
        }
        Device::Cuda(_) => {
            let cx = sx.as_cuda()?;
            let buf = cuda::rope::rope(cx, sc.as_cuda()?, ss.as_cuda()?, n, h, dh, sign)?;
            cuda_tensor(&cx.dev, buf, x.shape())
        }
    }
}
