//! Every op, once: each checks its arguments (errors name the op and the shapes),
//! dispatches to the CPU reference (`crate::cpu`) or the CUDA launcher (`crate::cuda`),
//! and, when differentiable, records itself on the tape with its backward. The
//! optimizer's in-place updates (`adamw_update`, `sum_squares`) are dispatched here too.
//!
//! Host code above this module never matches on the device to run a computation; the
//! descriptions both devices share live in `crate::desc`.

mod attention;
mod conv;
mod elementwise;
mod graph;
mod loss;
mod matmul;
mod norm;
mod optim;
mod reduce;
mod rope;
mod shape;
mod softmax;

pub use attention::*;
pub use conv::*;
pub use elementwise::*;
pub use graph::*;
pub(crate) use graph::{signature_of, Signature};
pub use loss::*;
pub use matmul::*;
pub use norm::*;
pub use optim::*;
pub use reduce::*;
pub use rope::*;
pub use shape::*;
pub use softmax::*;

use crate::cuda::{CudaBuf, CudaDevice, CudaStorage};
use crate::tensor::Storage;
use crate::{bail, DType, Device, Result, Tensor};
use std::sync::Arc;

/// Checks that all tensors are on one device and returns it; the error names `op`.
pub(crate) fn same_device(op: &str, ts: &[&Tensor]) -> Result<Device> {
    let d = ts[0].device();
    for t in &ts[1..] {
        if t.device() != d {
            bail!("{op}: tensors on different devices ({d} and {})", t.device());
        }
    }
    Ok(d)
}

/// Checks that two tensors have the same shape; the error names `op`.
pub(crate) fn same_shape(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        bail!("{op}: shape mismatch {:?} vs {:?}", a.shape(), b.shape());
    }
    Ok(())
}

/// Wraps host values as a CPU tensor.
pub(crate) fn cpu_tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_storage(Storage::Cpu(data), shape)
}

/// Wraps a device buffer as a CUDA tensor.
pub(crate) fn cuda_tensor(dev: &Arc<CudaDevice>, buf: CudaBuf, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_storage(Storage::Cuda(CudaStorage { dev: dev.clone(), buf }), shape)
}

/// The dtype an op's output takes on `device` given its inputs' dtypes: bf16 if any
/// input is bf16, else f32.
pub(crate) fn result_dtype(device: Device, ts: &[&Tensor]) -> DType {
    match device {
        Device::Cpu => DType::F32,
        Device::Cuda(_) => {
            if ts.iter().any(|t| t.dtype() == DType::BF16) {
                DType::BF16
            } else {
                DType::F32
            }
        }
    }
}

/// Brings two CUDA tensors to one dtype (bf16 when they differ).
pub(crate) fn common_dtype(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    if a.dtype() == b.dtype() {
        return Ok((a.clone(), b.clone()));
    }
    Ok((cast(a, DType::BF16)?, cast(b, DType::BF16)?))
}
