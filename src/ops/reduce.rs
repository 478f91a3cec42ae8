//! Reductions: sums and means over everything or over one dimension, and `sum_to` (the
//! adjoint of broadcasting). Outputs keep the input's dtype; accumulation is fp32 on
//! the GPU and f64 in the CPU reference.

use super::elementwise::in_dtype;
use super::{cpu_tensor, cuda_tensor};
use crate::autograd::record;
use crate::{bail, cpu, cuda, Device, Result, Tensor};

/// Sums `x` onto `shape`, which must broadcast to `x`'s shape (the adjoint of
/// broadcasting). Leading dimensions missing from `shape` are summed away.
pub fn sum_to(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if x.shape() == shape {
        return Ok(x.clone());
    }
    let padded = reduce_target(x.shape(), shape)?;
    let out = match x.device() {
        Device::Cpu => {
            let s = x.storage();
            cpu_tensor(cpu::reduce::sum_to(s.as_cpu()?, x.shape(), &padded), shape)?
        }
        Device::Cuda(_) => {
            let s = x.storage();
            let c = s.as_cuda()?;
            cuda_tensor(&c.dev, cuda::reduce::sum_to(c, x.shape(), &padded)?, shape)?
        }
    };
    let in_shape = x.shape().to_vec();
    Ok(record("sum_to", out, &[x], Box::new(move |g| Ok(vec![Some(super::broadcast_to(g, &in_shape)?)]))))
}

/// `shape` padded with leading 1s to the rank of `from`, checked to be a shape `from` sums
/// onto (each dimension 1 or `from`'s).
fn reduce_target(from: &[usize], shape: &[usize]) -> Result<Vec<usize>> {
    if shape.len() > from.len() {
        bail!("sum_to: cannot reduce shape {from:?} to {shape:?}");
    }
    let mut padded = vec![1; from.len() - shape.len()];
    padded.extend_from_slice(shape);
    if from.iter().zip(&padded).any(|(a, b)| *b != 1 && a != b) {
        bail!("sum_to: cannot reduce shape {from:?} to {shape:?}");
    }
    Ok(padded)
}

/// `sum_to(mul(a, b), shape)`: the sum of a product onto a broadcast shape, as a gate's
/// gradient is (`Σ g·y` over the tokens). With `SYNTHOS_CUDA_COLSUM=vec` on a GPU, when no
/// tape node is needed, `a` and `b` share shape and dtype, and the sum is a split column
/// sum (a reduced run of dimensions followed by a kept one), it is one pass over `a` and
/// `b` with each product in fp32, instead of writing the product and summing it; else the
/// two ops in turn.
pub fn sum_to_product(a: &Tensor, b: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let fused = a.device().is_cuda()
        && b.device() == a.device()
        && a.shape() == b.shape()
        && a.dtype() == b.dtype()
        && !crate::autograd::needs_grad(&[a, b])
        && cuda::reduce::vector_columns()?;
    if fused {
        let padded = reduce_target(a.shape(), shape)?;
        let (sa, sb) = (a.storage(), b.storage());
        let (ca, cb) = (sa.as_cuda()?, sb.as_cuda()?);
        if let Some(buf) = cuda::reduce::sum_to_product(ca, cb, a.shape(), &padded)? {
            return cuda_tensor(&ca.dev, buf, shape);
        }
    }
    sum_to(&super::mul(a, b)?, shape)
}

/// `scale · Σ x` over every element, as a `[]` tensor.
fn reduce_all(name: &'static str, x: &Tensor, mean: bool) -> Result<Tensor> {
    let n = x.numel();
    let scale = if mean { 1.0 / n as f64 } else { 1.0 };
    let out = match x.device() {
        Device::Cpu => cpu_tensor(vec![cpu::reduce::sum_all(x.storage().as_cpu()?, scale)], &[])?,
        Device::Cuda(_) => {
            let s = x.storage();
            let c = s.as_cuda()?;
            cuda_tensor(&c.dev, cuda::reduce::row_sum(c, 1, n, scale as f32)?, &[])?
        }
    };
    let (xs, xdt) = (x.shape().to_vec(), x.dtype());
    Ok(record(
        name,
        out,
        &[x],
        Box::new(move |g| {
            let g = if mean { super::scale(g, scale as f32)? } else { g.clone() };
            Ok(vec![Some(in_dtype(&super::broadcast_to(&g, &xs)?, xdt)?)])
        }),
    ))
}

/// Sum of all elements, shape `[]`.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    reduce_all("sum_all", x, false)
}

/// Mean of all elements, shape `[]` (NaN for an empty tensor).
pub fn mean_all(x: &Tensor) -> Result<Tensor> {
    reduce_all("mean_all", x, true)
}

/// `scale · Σ` over dimension `dim`.
fn reduce_dim(name: &'static str, x: &Tensor, dim: usize, keepdim: bool, mean: bool) -> Result<Tensor> {
    let shape = x.shape();
    if dim >= shape.len() {
        bail!("{name}: dimension {dim} out of range for shape {shape:?}");
    }
    let outer: usize = shape[..dim].iter().product();
    let len = shape[dim];
    let inner: usize = shape[dim + 1..].iter().product();
    let scale = if mean { 1.0 / len as f64 } else { 1.0 };
    let mut kept = shape.to_vec();
    kept[dim] = 1;
    let mut out_shape = kept.clone();
    if !keepdim {
        out_shape.remove(dim);
    }
    let out = match x.device() {
        Device::Cpu => {
            let v = cpu::reduce::sum_dim(x.storage().as_cpu()?, outer, len, inner, scale);
            cpu_tensor(v, &out_shape)?
        }
        Device::Cuda(_) => {
            let s = x.storage();
            let c = s.as_cuda()?;
            // Contiguous rows reduce best one block per row; otherwise threads run along
            // the inner dimension for coalesced reads.
            let buf = if inner == 1 {
                cuda::reduce::row_sum(c, outer, len, scale as f32)?
            } else {
                cuda::reduce::col_sum(c, outer, len, inner, scale as f32)?
            };
            cuda_tensor(&c.dev, buf, &out_shape)?
        }
    };
    let (xs, xdt) = (shape.to_vec(), x.dtype());
    Ok(record(
        name,
        out,
        &[x],
        Box::new(move |g| {
            let g = super::reshape(g, &kept)?;
            let g = if mean { super::scale(&g, scale as f32)? } else { g };
            Ok(vec![Some(in_dtype(&super::broadcast_to(&g, &xs)?, xdt)?)])
        }),
    ))
}

/// Sum over dimension `dim`, keeping it with size 1 when `keepdim`.
pub fn sum_dim(x: &Tensor, dim: usize, keepdim: bool) -> Result<Tensor> {
    reduce_dim("sum_dim", x, dim, keepdim, false)
}

/// Mean over dimension `dim`, keeping it with size 1 when `keepdim`.
pub fn mean_dim(x: &Tensor, dim: usize, keepdim: bool) -> Result<Tensor> {
    reduce_dim("mean_dim", x, dim, keepdim, true)
}
