//! Elementwise ops: arithmetic with broadcasting, activations, casts.

use super::{cpu_tensor, cuda_tensor, same_device, sum_to};
use crate::autograd::record;
use crate::cuda::Bcast;
use crate::{bail, cpu, cuda, Device, Result, Tensor};

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
            let (a2, b2) = super::common_dtype(a, b)?;
            let (sa, sb) = (a2.storage(), b2.storage());
            let (x, y) = (sa.as_cuda()?, sb.as_cuda()?);
            let same = a.shape() == shape.as_slice() && b.shape() == shape.as_slice();
            let bc = Bcast::new(&shape, a.shape(), b.shape())?;
            cuda_tensor(&x.dev, cuda::elementwise::binary(name, x, y, &bc, shape.iter().product(), same)?, &shape)?
        }
    };
    let (ash, bsh) = (a.shape().to_vec(), b.shape().to_vec());
    let saved = match op {
        Bin::Mul => Some((a.clone(), b.clone())),
        _ => None,
    };
    Ok(record(
        name,
        out,
        &[a, b],
        Box::new(move |g| {
            Ok(match (op, saved) {
                (Bin::Add, _) => vec![Some(sum_to(g, &ash)?), Some(sum_to(g, &bsh)?)],
                (Bin::Sub, _) => vec![Some(sum_to(g, &ash)?), Some(sum_to(&super::scale(g, -1.0)?, &bsh)?)],
                (Bin::Mul, Some((a, b))) => {
                    let ga = if a.is_tracked() { Some(sum_to(&mul(g, &b)?, &ash)?) } else { None };
                    let gb = if b.is_tracked() { Some(sum_to(&mul(g, &a)?, &bsh)?) } else { None };
                    vec![ga, gb]
                }
                (Bin::Mul, None) => bail!("mul: saved inputs missing"),
            })
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
