//! Elementwise ops: arithmetic with broadcasting, activations, the fused gated
//! residual, casts.
//!
//! On the GPU an op whose inputs mix f32 and bf16 computes in bf16 (see
//! [`super::common_dtype`]); every gradient is returned in its input's dtype, so that f32
//! master parameters receive f32 gradients.

use super::{cpu_tensor, cuda_tensor, result_dtype, same_device, same_shape, sum_to};
use crate::autograd::{no_grad, record};
use crate::cuda::Bcast;
use crate::{bail, cpu, cuda, DType, Device, Error, Result, Tensor};

/// `t` in `dtype`, converted without recording on the tape (for kernels that take one
/// dtype, and for gradients handed back in their input's dtype).
pub(crate) fn in_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        no_grad(|| cast(t, dtype))
    }
}

#[derive(Clone, Copy)]
enum Bin {
    Add,
    Sub,
    Mul,
}

fn binary(op: Bin, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let name = match op {
        Bin::Add => "add",
        Bin::Sub => "sub",
        Bin::Mul => "mul",
    };
    let device = same_device(name, &[a, b])?;
    let Some(shape) = cpu::elementwise::broadcast_shape(a.shape(), b.shape()) else {
        bail!("{name}: shapes {:?} and {:?} do not broadcast", a.shape(), b.shape());
    };
    let out = match device {
        Device::Cpu => {
            let (sa, sb) = (a.storage(), b.storage());
            let (x, y) = (sa.as_cpu()?, sb.as_cpu()?);
            let v = match op {
                Bin::Add => cpu::elementwise::binary(x, a.shape(), y, b.shape(), &shape, |p, q| p + q),
                Bin::Sub => cpu::elementwise::binary(x, a.shape(), y, b.shape(), &shape, |p, q| p - q),
                Bin::Mul => cpu::elementwise::binary(x, a.shape(), y, b.shape(), &shape, |p, q| p * q),
            };
            cpu_tensor(v, &shape)?
        }
        Device::Cuda(_) => {
            // Converted off the tape: the gradients are cast back in the backward below.
            let (a2, b2) = no_grad(|| super::common_dtype(a, b))?;
            let (sa, sb) = (a2.storage(), b2.storage());
            let (x, y) = (sa.as_cuda()?, sb.as_cuda()?);
            let same = a.shape() == shape.as_slice() && b.shape() == shape.as_slice();
            let bc = Bcast::new(&shape, a.shape(), b.shape())?;
            cuda_tensor(&x.dev, cuda::elementwise::binary(name, x, y, &bc, shape.iter().product(), same)?, &shape)?
        }
    };
    let (ash, bsh) = (a.shape().to_vec(), b.shape().to_vec());
    let (adt, bdt) = (a.dtype(), b.dtype());
    let (ta, tb) = (a.is_tracked(), b.is_tracked());
    let saved = match op {
        Bin::Mul => Some((a.clone(), b.clone())),
        _ => None,
    };
    Ok(record(
        name,
        out,
        &[a, b],
        Box::new(move |g| {
            let (ga, gb) = match (op, saved) {
                (Bin::Add, _) => (ta.then(|| g.clone()), tb.then(|| g.clone())),
                (Bin::Sub, _) => (ta.then(|| g.clone()), if tb { Some(super::scale(g, -1.0)?) } else { None }),
                (Bin::Mul, Some((a, b))) => {
                    (if ta { Some(mul(g, &b)?) } else { None }, if tb { Some(mul(g, &a)?) } else { None })
                }
                (Bin::Mul, None) => bail!("mul: saved inputs missing"),
            };
            let ga = ga.map(|t| in_dtype(&sum_to(&t, &ash)?, adt)).transpose()?;
            let gb = gb.map(|t| in_dtype(&sum_to(&t, &bsh)?, bdt)).transpose()?;
            Ok(vec![ga, gb])
        }),
    ))
}

/// `a + b` with NumPy broadcasting.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Bin::Add, a, b)
}

/// `a - b` with NumPy broadcasting.
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Bin::Sub, a, b)
}

/// `a * b` (elementwise) with NumPy broadcasting.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(Bin::Mul, a, b)
}

/// `s · x` for a constant `s`.
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    let out = match x.device() {
        Device::Cpu => cpu_tensor(x.storage().as_cpu()?.iter().map(|v| v * s).collect(), x.shape())?,
        Device::Cuda(_) => {
            let st = x.storage();
            let c = st.as_cuda()?;
            cuda_tensor(&c.dev, cuda::elementwise::scale(c, s, x.numel())?, x.shape())?
        }
    };
    Ok(record("scale", out, &[x], Box::new(move |g| Ok(vec![Some(scale(g, s)?)]))))
}

/// Materialises `x` broadcast to `shape` (NumPy rules).
pub fn broadcast_to(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if x.shape() == shape {
        return Ok(x.clone());
    }
    match cpu::elementwise::broadcast_shape(x.shape(), shape) {
        Some(s) if s == shape => {}
        _ => bail!("broadcast_to: shape {:?} does not broadcast to {shape:?}", x.shape()),
    }
    let out = match x.device() {
        Device::Cpu => {
            let st = x.storage();
            let v = st.as_cpu()?;
            let strides = cpu::elementwise::broadcast_strides(shape, x.shape());
            let n: usize = shape.iter().product();
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let (mut rem, mut o) = (i, 0);
                for d in (0..shape.len()).rev() {
                    o += (rem % shape[d]) * strides[d];
                    rem /= shape[d];
                }
                out.push(v[o]);
            }
            cpu_tensor(out, shape)?
        }
        Device::Cuda(_) => {
            let st = x.storage();
            let c = st.as_cuda()?;
            let bc = Bcast::new(shape, x.shape(), shape)?;
            cuda_tensor(&c.dev, cuda::elementwise::broadcast(c, &bc, shape.iter().product())?, shape)?
        }
    };
    let xs = x.shape().to_vec();
    Ok(record("broadcast_to", out, &[x], Box::new(move |g| Ok(vec![Some(sum_to(g, &xs)?)]))))
}

/// Converts to `dtype` (CUDA: f32 ↔ bf16; CPU tensors stay f32). Gradients flow back
/// in the input's dtype.
pub fn cast(x: &Tensor, dtype: crate::DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    let out = match x.device() {
        Device::Cpu => bail!("cast: CPU tensors are f32 (asked for {dtype})"),
        Device::Cuda(_) => {
            let st = x.storage();
            let c = st.as_cuda()?;
            cuda_tensor(&c.dev, cuda::elementwise::cast(c, dtype, x.numel())?, x.shape())?
        }
    };
    let from = x.dtype();
    Ok(record("cast", out, &[x], Box::new(move |g| Ok(vec![Some(cast(g, from)?)]))))
}

/// `x + c` for a constant `c`.
pub fn add_scalar(x: &Tensor, c: f32) -> Result<Tensor> {
    let out = match x.device() {
        Device::Cpu => cpu_tensor(x.storage().as_cpu()?.iter().map(|v| v + c).collect(), x.shape())?,
        Device::Cuda(_) => {
            let st = x.storage();
            let s = st.as_cuda()?;
            cuda_tensor(&s.dev, cuda::elementwise::add_scalar(s, c, x.numel())?, x.shape())?
        }
    };
    Ok(record("add_scalar", out, &[x], Box::new(move |g| Ok(vec![Some(g.clone())]))))
}

/// Which form of GELU to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluApprox {
    /// PyTorch's `approximate='tanh'`: ½x(1 + tanh(√(2/π)(x + 0.044715x³))) (Wan's FFN,
    /// umT5).
    Tanh,
    /// ½x(1 + erf(x/√2)) (CLIP, the image projector).
    Exact,
}

/// Pointwise activations sharing one forward/backward path.
#[derive(Clone, Copy)]
enum Activation {
    GeluTanh,
    GeluExact,
    Silu,
    QuickGelu,
    Exp,
}

impl Activation {
    /// Op name on the tape, and the kernel name.
    fn name(self) -> &'static str {
        match self {
            Activation::GeluTanh => "gelu_tanh",
            Activation::GeluExact => "gelu_exact",
            Activation::Silu => "silu",
            Activation::QuickGelu => "quick_gelu",
            Activation::Exp => "exp",
        }
    }

    /// `f(x)` on the CPU (each arm a separate, inlined and vectorised loop).
    fn cpu_forward(self, x: &[f32]) -> Vec<f32> {
        use cpu::elementwise as e;
        match self {
            Activation::GeluTanh => cpu::par::map(x, e::gelu_tanh),
            Activation::GeluExact => cpu::par::map(x, e::gelu_exact),
            Activation::Silu => cpu::par::map(x, e::silu),
            Activation::QuickGelu => cpu::par::map(x, e::quick_gelu),
            Activation::Exp => cpu::par::map(x, f32::exp),
        }
    }

    /// `g·f'(x)` on the CPU.
    fn cpu_backward(self, x: &[f32], g: &[f32]) -> Vec<f32> {
        use cpu::elementwise as e;
        match self {
            Activation::GeluTanh => cpu::par::zip_map(x, g, |x, g| g * e::gelu_tanh_grad(x)),
            Activation::GeluExact => cpu::par::zip_map(x, g, |x, g| g * e::gelu_exact_grad(x)),
            Activation::Silu => cpu::par::zip_map(x, g, |x, g| g * e::silu_grad(x)),
            Activation::QuickGelu => cpu::par::zip_map(x, g, |x, g| g * e::quick_gelu_grad(x)),
            Activation::Exp => cpu::par::zip_map(x, g, |x, g| g * x.exp()),
        }
    }
}

fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    let out = match x.device() {
        Device::Cpu => cpu_tensor(act.cpu_forward(x.storage().as_cpu()?), x.shape())?,
        Device::Cuda(_) => {
            let st = x.storage();
            let s = st.as_cuda()?;
            cuda_tensor(&s.dev, cuda::elementwise::activation(s, act.name(), x.numel())?, x.shape())?
        }
    };
    let saved = x.clone();
    Ok(record(act.name(), out, &[x], Box::new(move |g| Ok(vec![Some(activation_backward(&saved, g, act)?)]))))
}

/// `g · f'(x)`, recomputing the derivative from `x`; in `x`'s dtype.
fn activation_backward(x: &Tensor, g: &Tensor, act: Activation) -> Result<Tensor> {
    same_shape(act.name(), x, g)?;
    match x.device() {
        Device::Cpu => {
            let (sx, sg) = (x.storage(), g.storage());
            let v = act.cpu_backward(sx.as_cpu()?, sg.as_cpu()?);
            cpu_tensor(v, x.shape())
        }
        Device::Cuda(_) => {
            let g = in_dtype(g, x.dtype())?;
            let (sx, sg) = (x.storage(), g.storage());
            let (cx, cg) = (sx.as_cuda()?, sg.as_cuda()?);
            cuda_tensor(&cx.dev, cuda::elementwise::activation_backward(cx, cg, act.name(), x.numel())?, x.shape())
        }
    }
}

/// GELU, in the tanh or the exact (erf) form.
pub fn gelu(x: &Tensor, approx: GeluApprox) -> Result<Tensor> {
    activation(
        x,
        match approx {
            GeluApprox::Tanh => Activation::GeluTanh,
            GeluApprox::Exact => Activation::GeluExact,
        },
    )
}

/// SiLU (swish): `x·σ(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    activation(x, Activation::Silu)
}

/// QuickGELU, `x·σ(1.702x)`: the activation of the OpenAI CLIP text tower.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    activation(x, Activation::QuickGelu)
}

/// `eˣ` elementwise (CLIP's `logit_scale.exp()`).
pub fn exp(x: &Tensor) -> Result<Tensor> {
    activation(x, Activation::Exp)
}

/// How a gate broadcasts over `x` in [`gated_residual`]: `(period, inner)` such that
/// element `i` of `x` meets gate element `(i / period)·inner + i % inner`. The gate
/// (right-aligned against `x`) must keep a run of trailing dimensions, broadcast a run
/// before them and keep the leading rest: `[B,1,D]`, `[1,1,D]`, `[B,N,D]`, `[B,1,1]`...
fn gate_layout(x: &[usize], gate: &[usize]) -> Option<(usize, usize)> {
    if gate.len() > x.len() {
        return None;
    }
    let pad = x.len() - gate.len();
    #[derive(PartialEq)]
    enum Run {
        TrailingKept,
        Broadcast,
        LeadingKept,
    }
    let (mut run, mut inner, mut broadcast) = (Run::TrailingKept, 1, 1);
    for d in (0..x.len()).rev() {
        let g = if d >= pad { gate[d - pad] } else { 1 };
        if x[d] == 1 {
            // A size-1 dimension fits every run.
            if g != 1 {
                return None;
            }
        } else if g == x[d] {
            match run {
                Run::TrailingKept => inner *= x[d],
                Run::Broadcast => run = Run::LeadingKept,
                Run::LeadingKept => {}
            }
        } else if g == 1 && run != Run::LeadingKept {
            run = Run::Broadcast;
            broadcast *= x[d];
        } else {
            return None;
        }
    }
    Some((broadcast * inner, inner))
}

/// `x + gate·y` in one kernel (the DiT's gated residual), `x` and `y` of one shape and
/// `gate` broadcast over them: `[B,1,D]`, `[1,1,D]`, the full shape, or any shape that
/// keeps trailing dimensions, broadcasts a middle run and keeps the leading rest.
pub fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    let device = same_device("gated_residual", &[x, gate, y])?;
    if x.shape() != y.shape() {
        bail!("gated_residual: x of shape {:?} and y of shape {:?} differ", x.shape(), y.shape());
    }
    let (period, inner) = gate_layout(x.shape(), gate.shape()).ok_or_else(|| {
        Error::msg(format!(
            "gated_residual: gate of shape {:?} does not broadcast over x of shape {:?} \
             (expected kept trailing dims, then broadcast dims, e.g. [B,1,D] or [1,1,D])",
            gate.shape(),
            x.shape()
        ))
    })?;
    let out = match device {
        Device::Cpu => {
            let (sx, sg, sy) = (x.storage(), gate.storage(), y.storage());
            let v = cpu::elementwise::gated_residual(sx.as_cpu()?, sg.as_cpu()?, gate.shape(), sy.as_cpu()?, x.shape());
            cpu_tensor(v, x.shape())?
        }
        Device::Cuda(_) => {
            let dt = result_dtype(device, &[x, gate, y]);
            let (x2, g2, y2) = (in_dtype(x, dt)?, in_dtype(gate, dt)?, in_dtype(y, dt)?);
            let (sx, sg, sy) = (x2.storage(), g2.storage(), y2.storage());
            let (cx, cg, cy) = (sx.as_cuda()?, sg.as_cuda()?, sy.as_cuda()?);
            let buf = cuda::elementwise::gated_residual(cx, cg, cy, period, inner, x.numel())?;
            cuda_tensor(&cx.dev, buf, x.shape())?
        }
    };
    let (tx, tgate, ty) = (x.is_tracked(), gate.is_tracked(), y.is_tracked());
    let (xdt, gdt, ydt) = (x.dtype(), gate.dtype(), y.dtype());
    let gshape = gate.shape().to_vec();
    let saved_gate = ty.then(|| gate.clone());
    let saved_y = tgate.then(|| y.clone());
    Ok(record(
        "gated_residual",
        out,
        &[x, gate, y],
        Box::new(move |g| {
            let dx = if tx { Some(in_dtype(g, xdt)?) } else { None };
            let dgate = match &saved_y {
                Some(y) => Some(in_dtype(&super::sum_to_product(g, y, &gshape)?, gdt)?),
                None => None,
            };
            let dy = match &saved_gate {
                Some(gate) => Some(in_dtype(&mul(g, gate)?, ydt)?),
                None => None,
            };
            Ok(vec![dx, dgate, dy])
        }),
    ))
}

/// `min(max(x, lo), hi)`; the gradient passes where `lo ≤ x ≤ hi` (as in PyTorch).
pub fn clamp(x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
    if lo.is_nan() || hi.is_nan() || lo > hi {
        bail!("clamp: bounds [{lo}, {hi}] are not an interval");
    }
    let n = x.numel();
    let out = match x.device() {
        Device::Cpu => cpu_tensor(x.storage().as_cpu()?.iter().map(|v| v.max(lo).min(hi)).collect(), x.shape())?,
        Device::Cuda(_) => {
            let s = x.storage();
            let c = s.as_cuda()?;
            cuda_tensor(&c.dev, cuda::elementwise::clamp(c, lo, hi, n)?, x.shape())?
        }
    };
    let sx = x.clone();
    Ok(record(
        "clamp",
        out,
        &[x],
        Box::new(move |g| {
            let dx = match sx.device() {
                Device::Cpu => {
                    let (s_x, s_g) = (sx.storage(), g.storage());
                    let v = s_x
                        .as_cpu()?
                        .iter()
                        .zip(s_g.as_cpu()?)
                        .map(|(&xv, &gv)| if xv >= lo && xv <= hi { gv } else { 0.0 });
                    cpu_tensor(v.collect(), sx.shape())?
                }
                Device::Cuda(_) => {
                    let g = in_dtype(g, sx.dtype())?;
                    let (s_x, s_g) = (sx.storage(), g.storage());
                    let cx = s_x.as_cuda()?;
                    cuda_tensor(&cx.dev, cuda::elementwise::clamp_backward(cx, s_g.as_cuda()?, lo, hi, n)?, sx.shape())?
                }
            };
            Ok(vec![Some(dx)])
        }),
    ))
}
