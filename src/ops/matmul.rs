//! Matrix products, each one tape node: [`matmul`], [`matmul_t`] (transposed operands
//! read in place, which is what the backward passes use) and [`linear`] (`x·wᵀ + b`,
//! the bias fused into the GEMM's epilogue on the GPU).
//!
//! Every product is described by one [`Gemm`] and runs through `cpu::matmul::gemm`
//! (matrixmultiply) or `cuda::matmul::gemm` (cuBLASLt). A 2-D right operand shared by
//! all batches is folded into one big 2-D product (`[batch·m, k] · [k, n]`), which is
//! both faster and makes its gradient's sum over batches part of the product.

use super::{cast, common_dtype, cpu_tensor, cuda_tensor, same_device, sum_to};
use crate::autograd::{self, record};
use crate::desc::Gemm;
use crate::{bail, cpu, cuda, Device, Result, Tensor};

/// Runs `g` (plus `bias` along every output row) on the operands' device; operands and
/// bias already share one dtype.
fn run(a: &Tensor, b: &Tensor, bias: Option<&Tensor>, g: &Gemm, out_shape: &[usize]) -> Result<Tensor> {
    run_epilogue(a, b, bias, false, g, out_shape)
}

/// [`run`], then GELU-tanh in the GEMM's epilogue when `gelu` (GPU only).
fn run_epilogue(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    gelu: bool,
    g: &Gemm,
    out_shape: &[usize],
) -> Result<Tensor> {
    let (sa, sb) = (a.storage(), b.storage());
    let sbias = bias.map(|t| t.storage());
    match a.device() {
        Device::Cpu if gelu => bail!("linear: the GELU epilogue runs on the GPU only"),
        Device::Cpu => {
            let bias = sbias.as_ref().map(|s| s.as_cpu()).transpose()?;
            cpu_tensor(cpu::matmul::gemm(sa.as_cpu()?, sb.as_cpu()?, bias, g)?, out_shape)
        }
        Device::Cuda(_) => {
            let bias = sbias.as_ref().map(|s| s.as_cuda()).transpose()?;
            let x = sa.as_cuda()?;
            cuda_tensor(&x.dev, cuda::matmul::gemm_epilogue(x, sb.as_cuda()?, bias, gelu, g)?, out_shape)
        }
    }
}

/// Checks the shapes of `op(a)·op(b)` and describes the product; returns it with the
/// output shape.
fn plan(a: &[usize], b: &[usize], trans_a: bool, trans_b: bool) -> Result<(Gemm, Vec<usize>)> {
    let (ra, rb) = (a.len(), b.len());
    if ra < 2 || rb < 2 {
        bail!("matmul: operands need at least 2 dimensions, got a {a:?} and b {b:?}");
    }
    let (m, ka) = if trans_a { (a[ra - 1], a[ra - 2]) } else { (a[ra - 2], a[ra - 1]) };
    let (kb, n) = if trans_b { (b[rb - 1], b[rb - 2]) } else { (b[rb - 2], b[rb - 1]) };
    let t = |on: bool| if on { "ᵀ" } else { "" };
    if ka != kb {
        bail!("matmul: inner dimensions differ: a{} {a:?} · b{} {b:?} ({ka} vs {kb})", t(trans_a), t(trans_b));
    }
    if ka == 0 {
        bail!("matmul: empty inner dimension in a {a:?} · b {b:?}");
    }
    let batch_dims = &a[..ra - 2];
    let batch: usize = batch_dims.iter().product();
    let gemm = if rb == 2 {
        if trans_a && ra > 2 {
            bail!("matmul: a transposed batched a {a:?} with a shared 2-D b {b:?} is not supported");
        }
        // One B for every batch: the batches of A are just more rows.
        Gemm { batch: 1, m: batch * m, k: ka, n, trans_a, trans_b }
    } else {
        if &b[..rb - 2] != batch_dims {
            bail!("matmul: batch dimensions differ: a {a:?}, b {b:?} (b must have a's batch dimensions or be 2-D)");
        }
        Gemm { batch, m, k: ka, n, trans_a, trans_b }
    };
    let mut out = batch_dims.to_vec();
    out.extend([m, n]);
    Ok((gemm, out))
}

/// `t` viewed as a 2-D matrix `[rows, last dimension]`.
fn rows_view(t: &Tensor) -> Result<Tensor> {
    let r = t.rank();
    t.view_as(&[t.shape()[..r - 1].iter().product(), t.shape()[r - 1]])
}

/// Matrix product `a · b`: a `[..., M, K]`, b `[..., K, N]` with the same batch
/// dimensions, or b `[K, N]` shared by every batch → `[..., M, N]`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_t(a, b, false, false)
}

/// Matrix product `op(a) · op(b)` where `op(x)` is `x`, or `xᵀ` (last two dimensions
/// swapped) when its flag is set, without materialising the transpose. Batch rules as
/// in [`matmul`]; a transposed batched `a` needs a batched `b`. On the GPU, operands of
/// different dtypes are both cast to bf16.
pub fn matmul_t(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    let device = same_device("matmul", &[a, b])?;
    let (g, out_shape) = plan(a.shape(), b.shape(), trans_a, trans_b)?;
    let (a, b) = if device.is_cuda() { common_dtype(a, b)? } else { (a.clone(), b.clone()) };
    let out = run(&a, &b, None, &g, &out_shape)?;
    let (sa, sb) = (a.clone(), b.clone());
    Ok(record(
        "matmul",
        out,
        &[&a, &b],
        Box::new(move |grad| {
            let ga = if sa.is_tracked() { Some(matmul_grad_a(grad, &sb, trans_a, trans_b)?) } else { None };
            let gb = if sb.is_tracked() { Some(matmul_grad_b(grad, &sa, &sb, trans_a, trans_b)?) } else { None };
            Ok(vec![ga, gb])
        }),
    ))
}

/// Gradient of A in `C = op(A)·op(B)`: `d op(A) = dC·op(B)ᵀ`, transposed back when A
/// is stored transposed.
fn matmul_grad_a(grad: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    if trans_a {
        // dA = (dC·op(B)ᵀ)ᵀ = op(B)·dCᵀ
        matmul_t(b, grad, trans_b, true)
    } else {
        // A shared-B product keeps the batch folded: dC [..., M, N] · op(B)ᵀ [N, K].
        matmul_t(grad, b, false, !trans_b)
    }
}

/// Gradient of B in `C = op(A)·op(B)`: `d op(B) = op(A)ᵀ·dC`. A 2-D B shared by all
/// batches gets the sum over batches, which is the same product with the batches folded
/// into the rows of A and dC.
fn matmul_grad_b(grad: &Tensor, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    let (a, grad) = if b.rank() == 2 && a.rank() > 2 {
        // `plan` only allows this with an untransposed A, whose rows fold cleanly.
        (rows_view(a)?, rows_view(grad)?)
    } else {
        (a.clone(), grad.clone())
    };
    if trans_b {
        // dB = (op(A)ᵀ·dC)ᵀ = dCᵀ·op(A)
        matmul_t(&grad, &a, true, trans_a)
    } else {
        matmul_t(&a, &grad, !trans_a, false)
    }
}

/// The operands of `linear` checked and brought to one dtype (on the GPU), with the
/// product they describe and the output shape.
struct LinearOperands {
    x: Tensor,
    w: Tensor,
    bias: Option<Tensor>,
    gemm: Gemm,
    out_shape: Vec<usize>,
}

fn linear_operands(op: &str, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<LinearOperands> {
    let mut all = vec![x, w];
    all.extend(bias);
    let device = same_device(op, &all)?;
    if w.rank() != 2 || x.rank() < 1 || x.shape()[x.rank() - 1] != w.shape()[1] {
        bail!(
            "{op}: input {:?} and weight {:?} do not fit (weight must be [out, in] with in = the input's last dimension)",
            x.shape(),
            w.shape()
        );
    }
    let (out_f, in_f) = (w.shape()[0], w.shape()[1]);
    if in_f == 0 {
        bail!("{op}: weight {:?} has no input features", w.shape());
    }
    if let Some(b) = bias {
        if b.shape() != [out_f] {
            bail!("{op}: bias of shape {:?} for weight {:?} (expected [{out_f}])", b.shape(), w.shape());
        }
    }
    let (x, w) = if device.is_cuda() { common_dtype(x, w)? } else { (x.clone(), w.clone()) };
    let bias = match bias {
        Some(b) if device.is_cuda() => Some(cast(b, x.dtype())?),
        other => other.cloned(),
    };
    let rows = x.numel() / in_f;
    let gemm = Gemm { batch: 1, m: rows, k: in_f, n: out_f, trans_a: false, trans_b: true };
    let mut out_shape = x.shape()[..x.rank() - 1].to_vec();
    out_shape.push(out_f);
    Ok(LinearOperands { x, w, bias, gemm, out_shape })
}

/// Affine map `x·wᵀ + bias`: x `[..., in]`, w `[out, in]` (PyTorch layout), bias `[out]`
/// → `[..., out]`. One tape node; on the GPU the bias is added in the GEMM epilogue and
/// x, w (and bias) of different dtypes are brought to bf16.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let LinearOperands { x, w, bias, gemm: g, out_shape } = linear_operands("linear", x, w, bias)?;
    let out_f = g.n;
    // Inside a checkpointed block that keeps linear outputs, the recompute reuses them.
    let out = autograd::kept_or_compute(autograd::Kept::Linear, &[&out_shape], || {
        Ok(vec![run(&x, &w, bias.as_ref(), &g, &out_shape)?])
    })?
    .remove(0);

    let mut inputs = vec![&x, &w];
    inputs.extend(bias.as_ref());
    let (sx, sw, has_bias) = (x.clone(), w.clone(), bias.is_some());
    let bias_tracked = bias.as_ref().is_some_and(|b| b.is_tracked());
    Ok(record(
        "linear",
        out,
        &inputs,
        Box::new(move |grad| {
            let g2 = rows_view(grad)?;
            // dx = dy·w
            let gx = if sx.is_tracked() { Some(matmul_t(&g2, &sw, false, false)?.view_as(sx.shape())?) } else { None };
            // dw = dyᵀ·x over all rows
            let gw = if sw.is_tracked() { Some(matmul_t(&g2, &rows_view(&sx)?, true, false)?) } else { None };
            let mut grads = vec![gx, gw];
            if has_bias {
                grads.push(if bias_tracked { Some(sum_to(&g2, &[out_f])?) } else { None });
            }
            Ok(grads)
        }),
    ))
}

/// `gelu(linear(x, w, bias), GeluApprox::Tanh)`: the MLP's first layer and its
/// activation. The same value and tape as the two ops in turn, except on the GPU with
/// `SYNTHOS_CUDA_GELU_EPILOGUE=1` outside the tape (inference: no input tracked, or
/// recording off) and outside checkpointed blocks (whose recompute must reproduce their
/// first pass exactly). There one GEMM applies GELU-tanh in cuBLASLt's epilogue, to the
/// fp32 result before it is rounded, instead of a second pass over the `[..., out]`
/// output: one write of it instead of a write, a read and a write.
pub fn linear_gelu_tanh(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if !gelu_epilogue_applies(x, w, bias)? {
        return super::gelu(&linear(x, w, bias)?, super::GeluApprox::Tanh);
    }
    let LinearOperands { x, w, bias, gemm, out_shape } = linear_operands("linear_gelu_tanh", x, w, bias)?;
    run_epilogue(&x, &w, bias.as_ref(), true, &gemm, &out_shape)
}

/// Whether [`linear_gelu_tanh`] would apply its GELU in the GEMM's epilogue for these
/// operands here and now: on a GPU, with `SYNTHOS_CUDA_GELU_EPILOGUE=1` (or its
/// per-thread override), when no tape node would be recorded and no checkpointed block
/// is running.
pub fn gelu_epilogue_applies(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<bool> {
    let mut all = vec![x, w];
    all.extend(bias);
    Ok(x.device().is_cuda()
        && !autograd::needs_grad(&all)
        && !autograd::inside_checkpoint()
        && cuda::matmul::gelu_epilogue()?)
}

/// A transformer MLP with GELU-tanh: `linear(gelu(linear(x, w1, b1), Tanh), w2, b2)`, x
/// `[..., in]`, w1 `[hidden, in]`, w2 `[out, hidden]` → `[..., out]`. The same value and
/// gradients as the three ops in turn, with two fusions on a GPU with
/// `SYNTHOS_CUDA_GELU_EPILOGUE=1`:
///
/// - outside the tape and outside checkpointed blocks, [`linear_gelu_tanh`]'s `GELU_BIAS`
///   epilogue (inference);
/// - on the tape, and in checkpointed blocks that do not keep linear outputs (both
///   passes alike), one tape node whose forward runs the first layer with cuBLASLt's
///   `GELU_AUX_BIAS` epilogue (the GELU output, and its input kept for the backward) and
///   whose backward runs the product that gives the GELU output's gradient with
///   `DGELU_BGRAD` (the GELU gradient applied, and the first bias's gradient summed, in
///   its epilogue). That removes the separate GELU pass of the forward and the GELU
///   gradient and bias gradient passes of the backward, each over the `[..., hidden]`
///   activation. It needs a hidden size that is a multiple of 8 (cuBLASLt's rule for the
///   kept GELU input); other sizes run unfused.
///
/// [`mlp_gelu_fuses`] says which form runs.
pub fn mlp_gelu_tanh(x: &Tensor, w1: &Tensor, b1: Option<&Tensor>, w2: &Tensor, b2: Option<&Tensor>) -> Result<Tensor> {
    if !mlp_gelu_fuses(x, w1, b1, w2, b2)? {
        return linear(&linear_gelu_tanh(x, w1, b1)?, w2, b2);
    }
    let LinearOperands { x, w: w1, bias: b1, gemm: g1, out_shape: h_shape } =
        linear_operands("mlp_gelu_tanh", x, w1, b1)?;
    let (h, pre) = {
        let (sx, sw) = (x.storage(), w1.storage());
        let sb = b1.as_ref().map(|b| b.storage());
        let xs = sx.as_cuda()?;
        let bias = sb.as_ref().map(|s| s.as_cuda()).transpose()?;
        let (h, pre) = cuda::matmul::gemm_gelu_aux(xs, sw.as_cuda()?, bias, &g1)?;
        (cuda_tensor(&xs.dev, h, &h_shape)?, cuda_tensor(&xs.dev, pre, &h_shape)?)
    };
    let LinearOperands { w: w2, bias: b2, gemm: g2, out_shape, .. } =
        linear_operands("mlp_gelu_tanh (second layer)", &h, w2, b2)?;
    let y = run(&h, &w2, b2.as_ref(), &g2, &out_shape)?;

    let mut inputs = vec![&x, &w1];
    inputs.extend(b1.as_ref());
    inputs.push(&w2);
    inputs.extend(b2.as_ref());
    let tracked = |t: Option<&Tensor>| t.is_some_and(|t| t.is_tracked());
    let (b1_tracked, b2_tracked) = (tracked(b1.as_ref()), tracked(b2.as_ref()));
    let (has_b1, has_b2) = (b1.is_some(), b2.is_some());
    let (sx, sw1, sw2) = (x.clone(), w1.clone(), w2.clone());
    let (hidden, out_f) = (g1.n, g2.n);
    Ok(record(
        "mlp_gelu_tanh",
        y,
        &inputs,
        Box::new(move |grad| {
            let dy = cast(&rows_view(grad)?, pre.dtype())?;
            // Second layer: dw2 = dyᵀ·h, db2 = Σ dy.
            let gw2 = if sw2.is_tracked() { Some(matmul_t(&dy, &rows_view(&h)?, true, false)?) } else { None };
            let gb2 = if b2_tracked { Some(sum_to(&dy, &[out_f])?) } else { None };
            // d pre = (dy·w2) · GELU'(pre) and db1 = Σ d pre, in one product's epilogue.
            let (gx, gw1, gb1) = if sx.is_tracked() || sw1.is_tracked() || b1_tracked {
                let g = Gemm { batch: 1, m: dy.shape()[0], k: out_f, n: hidden, trans_a: false, trans_b: false };
                let (sd, sw, sp) = (dy.storage(), sw2.storage(), pre.storage());
                let d = sd.as_cuda()?;
                let (dpre, db1) = cuda::matmul::gemm_dgelu(d, sw.as_cuda()?, sp.as_cuda()?, b1_tracked, &g)?;
                let dpre = cuda_tensor(&d.dev, dpre, &[g.m, hidden])?;
                let gb1 = db1.map(|b| cuda_tensor(&d.dev, b, &[hidden])).transpose()?;
                let gw1 = if sw1.is_tracked() { Some(matmul_t(&dpre, &rows_view(&sx)?, true, false)?) } else { None };
                let gx = if sx.is_tracked() {
                    Some(matmul_t(&dpre, &sw1, false, false)?.view_as(sx.shape())?)
                } else {
                    None
                };
                (gx, gw1, gb1)
            } else {
                (None, None, None)
            };
            let mut grads = vec![gx, gw1];
            if has_b1 {
                grads.push(gb1);
            }
            grads.push(gw2);
            if has_b2 {
                grads.push(gb2);
            }
            Ok(grads)
        }),
    ))
}

/// Whether [`mlp_gelu_tanh`] would run its fused training form for these operands here and
/// now: on a GPU with `SYNTHOS_CUDA_GELU_EPILOGUE=1` (or its per-thread override), when a
/// tape node would be recorded or a checkpointed block is running, no checkpointed block
/// that keeps linear outputs is involved, and the hidden size is a multiple of 8.
pub fn mlp_gelu_fuses(x: &Tensor, w1: &Tensor, b1: Option<&Tensor>, w2: &Tensor, b2: Option<&Tensor>) -> Result<bool> {
    let mut all = vec![x, w1, w2];
    all.extend(b1);
    all.extend(b2);
    if !x.device().is_cuda() || !(autograd::needs_grad(&all) || autograd::inside_checkpoint()) {
        return Ok(false);
    }
    // cuBLASLt keeps the GELU input with the hidden activation's row length, which must be
    // a multiple of 8 (`cuda::matmul::gelu_aux_fits`).
    let hidden = if w1.rank() == 2 { w1.shape()[0] } else { return Ok(false) };
    Ok(hidden > 0
        && hidden.is_multiple_of(8)
        && x.numel() > 0
        && autograd::linear_fusion_allowed()
        && cuda::matmul::gelu_epilogue()?)
}
