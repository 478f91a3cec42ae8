//! Softmax over the last dimension (for attention whose scores are materialised).

use super::elementwise::in_dtype;
use super::{cpu_tensor, cuda_tensor};
use crate::autograd::record;
use crate::{bail, cpu, cuda, Device, Result, Tensor};

/// Softmax over the last dimension (max-subtracted, fp32 arithmetic).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 || x.numel() == 0 {
        bail!("softmax_last_dim: x must have a non-empty last dimension, got shape {:?}", x.shape());
    }
    let n = x.shape()[x.rank() - 1];
    let rows = x.numel() / n;
    let out = match x.device() {
        Device::Cpu => cpu_tensor(cpu::softmax::softmax_rows(x.storage().as_cpu()?, n), x.shape())?,
        Device::Cuda(_) => {
            let s = x.storage();
            let c = s.as_cuda()?;
            cuda_tensor(&c.dev, cuda::softmax::softmax(c, rows, n)?, x.shape())?
        }
    };
    // The backward needs only the output.
    let y = out.detach();
    Ok(record(
        "softmax_last_dim",
        out,
        &[x],
        Box::new(move |g| {
            let dx = match y.device() {
                Device::Cpu => {
                    let (sy, sg) = (y.storage(), g.storage());
                    cpu_tensor(cpu::softmax::softmax_rows_backward(sy.as_cpu()?, sg.as_cpu()?, n), y.shape())?
                }
                Device::Cuda(_) => {
                    let g = in_dtype(g, y.dtype())?;
                    let (sy, sg) = (y.storage(), g.storage());
                    let cy = sy.as_cuda()?;
                    cuda_tensor(&cy.dev, cuda::softmax::softmax_backward(cy, sg.as_cuda()?, rows, n)?, y.shape())?
                }
            };
            Ok(vec![Some(dx)])
        }),
    ))
}
