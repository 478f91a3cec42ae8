//! The optimizer's in-place updates, dispatched like every other op (they are not
//! differentiable and record nothing on the tape).

use crate::desc::AdamWStep;
use crate::{cpu, cuda, Device, Result, Tensor};

/// One fused AdamW update in place: `weights` (the fp32 master when `compute` is given,
/// else the parameter itself), the moments `exp_avg` and `exp_avg_sq`, and with
/// `compute` the bf16 copy the model computes with, rounded from the new master.
pub fn adamw_update(
    weights: &Tensor,
    compute: Option<&Tensor>,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    grad: &Tensor,
    s: &AdamWStep,
) -> Result<()> {
    let device = super::same_device("adamw", &[weights, exp_avg, exp_avg_sq, grad])?;
    let gs = grad.storage();
    let mut ms = exp_avg.storage_mut();
    let mut vs = exp_avg_sq.storage_mut();
    let mut ws = weights.storage_mut();
    match device {
        Device::Cpu => cpu::adamw::step(ws.as_cpu_mut()?, gs.as_cpu()?, ms.as_cpu_mut()?, vs.as_cpu_mut()?, s),
        Device::Cuda(_) => {
            let n = weights.numel();
            let (g, m, v) = (gs.as_cuda()?, ms.as_cuda_mut()?, vs.as_cuda_mut()?);
            match compute {
                Some(c) => {
                    let mut cs = c.storage_mut();
                    cuda::adamw::step(g, ws.as_cuda_mut()?, m, v, Some(cs.as_cuda_mut()?), s, n)
                }
                None => cuda::adamw::step(g, ws.as_cuda_mut()?, m, v, None, s, n),
            }
        }
    }
}

/// `Σ x²` over every element of every tensor (all on one device): fp32 accumulation with a
/// fixed reduction order on the GPU, f64 on the CPU. 0 for no tensors.
pub fn sum_squares(xs: &[&Tensor]) -> Result<f64> {
    if xs.is_empty() {
        return Ok(0.0);
    }
    let device = super::same_device("sum_squares", xs)?;
    let guards: Vec<_> = xs.iter().map(|g| g.storage()).collect();
    Ok(match device {
        Device::Cpu => {
            let mut acc = 0f64;
            for s in &guards {
                acc += cpu::adamw::sum_squares(s.as_cpu()?);
            }
            acc
        }
        Device::Cuda(_) => {
            let parts =
                guards.iter().zip(xs).map(|(s, g)| Ok((s.as_cuda()?, g.numel()))).collect::<Result<Vec<_>>>()?;
            cuda::adamw::sum_squares(&parts)? as f64
        }
    })
}
