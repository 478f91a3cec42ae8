//! Ops of convolutional image models (the Wan VAE), channel-first `[B, C, H, W]`:
//! [`conv2d`] (im2col + GEMM, the column matrix built one band of output rows at a time
//! so that large images fit), [`upsample_nearest2x`], [`channel_rms_norm`] (Wan's
//! `RMS_norm`), [`softmax_last_dim`], [`clamp`], and [`spatial_attention`], the VAE's
//! single-head attention over pixels, composed from matrix products and the softmax with
//! query rows in chunks so that the full N×N score matrix never exists at once.
//!
//! Each op is one tape node with its backward; on the GPU the output keeps the input's
//! dtype, parameters may be f32 or bf16 and get their gradients in their own dtype.

use super::elementwise::in_dtype;
use super::{common_dtype, cpu_tensor, cuda_tensor, reshape, same_device, sum_dim};
use crate::autograd::record;
use crate::desc::{ChannelNorm, ConvGeom};
use crate::{bail, cpu, cuda, DType, Device, Result, Tensor};

/// Default cap on the elements of a convolution's column matrix (one band of output
/// rows): 64 Mi elements, 128 MiB in bf16.
pub const DEFAULT_MAX_COL_ELEMS: usize = 1 << 26;

/// Zero padding around the spatial dimensions of a [`conv2d`] input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Padding2d {
    /// Rows above.
    pub top: usize,
    /// Rows below.
    pub bottom: usize,
    /// Columns to the left.
    pub left: usize,
    /// Columns to the right.
    pub right: usize,
}

impl Padding2d {
    /// `p` on every side (PyTorch's `padding=p`).
    pub fn same(p: usize) -> Self {
        Padding2d { top: p, bottom: p, left: p, right: p }
    }
}

/// How [`conv2d_opts`] convolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dOptions {
    /// Stride along both spatial dimensions (≥ 1).
    pub stride: usize,
    /// Zero padding.
    pub padding: Padding2d,
    /// Cap on the elements of the column matrix: the output is computed in bands of rows
    /// small enough to stay under it (at least one row per band).
    pub max_col_elems: usize,
}

impl Conv2dOptions {
    /// Stride and padding, with the default column budget.
    pub fn new(stride: usize, padding: Padding2d) -> Self {
        Conv2dOptions { stride, padding, max_col_elems: DEFAULT_MAX_COL_ELEMS }
    }
}

/// 2-D convolution (cross-correlation, as PyTorch's `Conv2d`): `x` `[B, C, H, W]`,
/// `w` `[O, C, kh, kw]`, optional `bias` `[O]` → `[B, O, H_out, W_out]` with
/// `H_out = (H + 2·padding − kh)/stride + 1`.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_opts(x, w, bias, &Conv2dOptions::new(stride, Padding2d::same(padding)))
}

/// Checks the shapes of a convolution and describes it.
fn geometry(x: &[usize], w: &[usize], bias: Option<&[usize]>, o: &Conv2dOptions) -> Result<ConvGeom> {
    let [b, c, h, wd] = *x else {
        bail!("conv2d: input must be [B, C, H, W], got shape {x:?}");
    };
    let [co, ci, kh, kw] = *w else {
        bail!("conv2d: weight must be [out, in, kh, kw], got shape {w:?}");
    };
    if ci != c {
        bail!("conv2d: weight {w:?} expects {ci} input channels but the input {x:?} has {c}");
    }
    if let Some(bs) = bias {
        if bs != [co] {
            bail!("conv2d: bias of shape {bs:?} for weight {w:?} (expected [{co}])");
        }
    }
    if b == 0 || c == 0 || co == 0 || kh == 0 || kw == 0 {
        bail!("conv2d: empty input {x:?} or weight {w:?}");
    }
    if o.stride == 0 || o.max_col_elems == 0 {
        bail!("conv2d: stride ({}) and column budget ({}) must be at least 1", o.stride, o.max_col_elems);
    }
    let p = o.padding;
    let (hp, wp) = (h + p.top + p.bottom, wd + p.left + p.right);
    if hp < kh || wp < kw {
        bail!("conv2d: kernel {kh}×{kw} (weight {w:?}) is larger than the padded input {hp}×{wp} (input {x:?}, padding {p:?})");
    }
    Ok(ConvGeom {
        batch: b,
        c_in: c,
        h,
        w: wd,
        c_out: co,
        kh,
        kw,
        stride: o.stride,
        pad_top: p.top,
        pad_left: p.left,
        h_out: (hp - kh) / o.stride + 1,
        w_out: (wp - kw) / o.stride + 1,
    })
}

/// [`conv2d`] with asymmetric padding and an explicit column budget.
pub fn conv2d_opts(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, opts: &Conv2dOptions) -> Result<Tensor> {
    const OP: &str = "conv2d";
    let mut all = vec![x, w];
    all.extend(bias);
    let device = same_device(OP, &all)?;
    let g = geometry(x.shape(), w.shape(), bias.map(Tensor::shape), opts)?;
    // The GEMM needs one dtype (the casts are on the tape); the bias is read in f32.
    let (x, w) = if device.is_cuda() { common_dtype(x, w)? } else { (x.clone(), w.clone()) };
    let bias32 = match bias {
        Some(b) if device.is_cuda() => Some(in_dtype(b, DType::F32)?),
        other => other.cloned(),
    };
    let max = opts.max_col_elems;
    let out_shape = [g.batch, g.c_out, g.h_out, g.w_out];
    let out = {
        let (sx, sw) = (x.storage(), w.storage());
        let sb = bias32.as_ref().map(|b| b.storage());
        match device {
            Device::Cpu => {
                let bv = sb.as_ref().map(|s| s.as_cpu()).transpose()?;
                cpu_tensor(cpu::conv::conv2d_forward(sx.as_cpu()?, sw.as_cpu()?, bv, &g, max)?, &out_shape)?
            }
            Device::Cuda(_) => {
                let cx = sx.as_cuda()?;
                let bv = sb.as_ref().map(|s| s.as_cuda()).transpose()?;
                cuda_tensor(&cx.dev, cuda::conv::conv2d_forward(cx, sw.as_cuda()?, bv, &g, max)?, &out_shape)?
            }
        }
    };
    let mut inputs = vec![&x, &w];
    inputs.extend(bias);
    let (sx, sw) = (x.clone(), w.clone());
    let bias_grad_dtype = bias.map(|b| b.is_tracked().then(|| b.dtype()));
    Ok(record(
        OP,
        out,
        &inputs,
        Box::new(move |gy| {
            let (dx, dw) = conv2d_backward(&sx, &sw, gy, &g, max)?;
            let mut grads = vec![dx, dw];
            if let Some(dt) = bias_grad_dtype {
                grads.push(dt.map(|dt| in_dtype(&sum_pixels(gy, &g)?, dt)).transpose()?);
            }
            Ok(grads)
        }),
    ))
}

/// `Σ_{b, pixels} gy[b, o, ·]` → `[O]` (the bias gradient).
fn sum_pixels(gy: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    let per_image = sum_dim(&reshape(gy, &[g.batch, g.c_out, g.out_pixels()])?, 2, false)?;
    sum_dim(&per_image, 0, false)
}

/// Gradients of the input and the weight of a convolution (each when tracked), in
/// their own dtypes.
fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    g: &ConvGeom,
    max: usize,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (want_dx, want_dw) = (x.is_tracked(), w.is_tracked());
    if !want_dx && !want_dw {
        return Ok((None, None));
    }
    match x.device() {
        Device::Cpu => {
            let (sx, sw, sg) = (x.storage(), w.storage(), gy.storage());
            let r = cpu::conv::conv2d_backward(sx.as_cpu()?, sw.as_cpu()?, sg.as_cpu()?, g, max, want_dx, want_dw)?;
            let (dx, dw) = (r.dx, r.dw);
            Ok((dx.map(|v| cpu_tensor(v, x.shape())).transpose()?, dw.map(|v| cpu_tensor(v, w.shape())).transpose()?))
        }
        Device::Cuda(_) => {
            let gy = in_dtype(gy, x.dtype())?;
            let (sx, sw, sg) = (x.storage(), w.storage(), gy.storage());
            let cx = sx.as_cuda()?;
            let (dx, dw) = cuda::conv::conv2d_backward(cx, sw.as_cuda()?, sg.as_cuda()?, g, max, want_dx, want_dw)?;
            let dx = dx.map(|b| cuda_tensor(&cx.dev, b, x.shape())).transpose()?;
            // The weight gradient was summed in f32.
            let dw =
                dw.map(|b| cuda_tensor(&cx.dev, b, w.shape()).and_then(|t| in_dtype(&t, w.dtype()))).transpose()?;
            Ok((dx, dw))
        }
    }
}

/// Nearest-neighbour 2× upsampling of the last two dimensions: `[..., H, W]` →
/// `[..., 2H, 2W]`, `out[..., y, x] = x[..., y/2, x/2]` (PyTorch's `nearest` and
/// `nearest-exact` agree at scale 2).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let r = x.rank();
    if r < 2 {
        bail!("upsample_nearest2x: input needs at least 2 dimensions, got shape {:?}", x.shape());
    }
    let (h, w) = (x.shape()[r - 2], x.shape()[r - 1]);
    let planes: usize = x.shape()[..r - 2].iter().product();
    let mut out_shape = x.shape().to_vec();
    out_shape[r - 2] = 2 * h;
    out_shape[r - 1] = 2 * w;
    let out = match x.device() {
        Device::Cpu => cpu_tensor(cpu::conv::upsample_nearest2x(x.storage().as_cpu()?, planes, h, w), &out_shape)?,
        Device::Cuda(_) => {
            let s = x.storage();
            let c = s.as_cuda()?;
            cuda_tensor(&c.dev, cuda::conv::upsample_nearest2x(c, planes, h, w)?, &out_shape)?
        }
    };
    let xs = x.shape().to_vec();
    Ok(record(
        "upsample_nearest2x",
        out,
        &[x],
        Box::new(move |g| {
            let dx = match g.device() {
                Device::Cpu => {
                    cpu_tensor(cpu::conv::upsample_nearest2x_backward(g.storage().as_cpu()?, planes, h, w), &xs)?
                }
                Device::Cuda(_) => {
                    let s = g.storage();
                    let c = s.as_cuda()?;
                    cuda_tensor(&c.dev, cuda::conv::upsample_nearest2x_backward(c, planes, h, w)?, &xs)?
                }
            };
            Ok(vec![Some(dx)])
        }),
    ))
}

/// Wan's `RMS_norm` over the channel dimension of `x` `[B, C, ...]`: every pixel's
/// channel vector divided by its L2 norm (at least `eps`; PyTorch's `F.normalize` uses
/// 1e-12) and scaled by `√C · gamma[c]`. Equivalently `x / rms(x) · gamma`. `gamma` is
/// `[C]`; the norm is computed in fp32 (f64 on the CPU). The Wan VAE's norms have no
/// bias, so none is taken.
pub fn channel_rms_norm(x: &Tensor, gamma: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "channel_rms_norm";
    let device = same_device(OP, &[x, gamma])?;
    if x.rank() < 2 || x.numel() == 0 {
        bail!("{OP}: x must be a non-empty [B, C, ...], got shape {:?}", x.shape());
    }
    let c = x.shape()[1];
    if gamma.shape() != [c] {
        bail!("{OP}: gamma has shape {:?}, expected [{c}] for x of shape {:?}", gamma.shape(), x.shape());
    }
    if !(eps.is_finite() && eps > 0.0) {
        bail!("{OP}: eps must be finite and positive, got {eps}");
    }
    let n = ChannelNorm { batch: x.shape()[0], c, s: x.shape()[2..].iter().product(), eps };
    // The kernels read gamma in f32.
    let gamma32 = if device.is_cuda() { in_dtype(gamma, DType::F32)? } else { gamma.clone() };
    let out = {
        let (sx, sg) = (x.storage(), gamma32.storage());
        match device {
            Device::Cpu => cpu_tensor(cpu::conv::channel_rms_norm(sx.as_cpu()?, sg.as_cpu()?, &n), x.shape())?,
            Device::Cuda(_) => {
                let cx = sx.as_cuda()?;
                cuda_tensor(&cx.dev, cuda::conv::channel_rms_norm(cx, sg.as_cuda()?, &n)?, x.shape())?
            }
        }
    };
    let (sx, gdt, want_dx, want_dg) = (x.clone(), gamma.dtype(), x.is_tracked(), gamma.is_tracked());
    Ok(record(
        OP,
        out,
        &[x, gamma],
        Box::new(move |g| {
            let (dx, dgamma) = match sx.device() {
                Device::Cpu => {
                    let (s_x, s_g, s_dy) = (sx.storage(), gamma32.storage(), g.storage());
                    let (dx, dg) =
                        cpu::conv::channel_rms_norm_backward(s_x.as_cpu()?, s_g.as_cpu()?, s_dy.as_cpu()?, &n);
                    (cpu_tensor(dx, sx.shape())?, cpu_tensor(dg, &[n.c])?)
                }
                Device::Cuda(_) => {
                    let g = in_dtype(g, sx.dtype())?;
                    let (s_x, s_g, s_dy) = (sx.storage(), gamma32.storage(), g.storage());
                    let cx = s_x.as_cuda()?;
                    let (dx, part, blocks) =
                        cuda::conv::channel_rms_norm_backward(cx, s_g.as_cuda()?, s_dy.as_cuda()?, &n)?;
                    let part = cuda_tensor(&cx.dev, part, &[blocks, n.c])?;
                    (cuda_tensor(&cx.dev, dx, sx.shape())?, sum_dim(&part, 0, false)?)
                }
            };
            Ok(vec![want_dx.then_some(dx), if want_dg { Some(in_dtype(&dgamma, gdt)?) } else { None }])
        }),
    ))
}
