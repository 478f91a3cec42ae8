//! Reductions.

use super::{cpu_tensor, cuda_tensor};
use crate::autograd::record;
use crate::{bail, cpu, cuda, Device, Result, Tensor};

/// Sums `x` onto `shape`, which must broadcast to `x`'s shape (the adjoint of
/// broadcasting). Leading dimensions missing from `shape` are summed away.
pub fn sum_to(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if x.shape() == shape {
        return Ok(x.clone());
    }
    let r = x.rank();
    if shape.len() > r {
        bail!("sum_to: cannot reduce shape {:?} to {shape:?}", x.shape());
    }
    let mut padded = vec![1; r - shape.len()];
    padded.extend_from_slice(shape);
    for (a, b) in x.shape().iter().zip(&padded) {
        if *b != 1 && a != b {
            bail!("sum_to: cannot reduce shape {:?} to {shape:?}", x.shape());
        }
    }
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
    Ok(record(
        "sum_to",
        out,
        &[x],
        Box::new(move |g| Ok(vec![Some(super::broadcast_to(g, &in_shape)?)])),
    ))
}
