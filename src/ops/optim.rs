//! The optimizer's in-place updates, dispatched like every other op (they are not
//! differentiable and record nothing on the tape).

use crate::desc::AdamWStep;
use crate::{bail, cpu, cuda, Device, Result, Tensor};

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

/// One parameter's update in [`adamw_update_many`]: the arguments of [`adamw_update`].
pub struct AdamWItem<'a> {
    /// The fp32 master when `compute` is given, else the parameter itself.
    pub weights: &'a Tensor,
    /// The bf16 copy the model computes with, if any.
    pub compute: Option<&'a Tensor>,
    /// First moment.
    pub exp_avg: &'a Tensor,
    /// Second moment.
    pub exp_avg_sq: &'a Tensor,
    /// The gradient.
    pub grad: &'a Tensor,
    /// This parameter's constants of the step.
    pub s: AdamWStep,
}

/// [`adamw_update`] for many parameters (all on one device), with the same results: on
/// the GPU in one launch for all of them when `SYNTHOS_CUDA_MULTI_TENSOR=1` (see
/// `cuda::adamw::multi_tensor`), otherwise one after another. Every tensor of
/// one item must differ from those of the others.
pub fn adamw_update_many(items: &[AdamWItem<'_>]) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let mut all: Vec<&Tensor> = Vec::with_capacity(items.len() * 5);
    let mut seen = std::collections::HashSet::with_capacity(items.len() * 5);
    for (k, i) in items.iter().enumerate() {
        for t in [i.weights, i.exp_avg, i.exp_avg_sq, i.grad].into_iter().chain(i.compute) {
            if !seen.insert(t.storage_id()) {
                bail!("adamw: item {k} names a tensor (storage) that an earlier argument names too");
            }
            all.push(t);
        }
    }
    let batched = match super::same_device("adamw", &all)? {
        Device::Cpu => false,
        Device::Cuda(_) => cuda::adamw::multi_tensor()?,
    };
    if !batched {
        for i in items {
            adamw_update(i.weights, i.compute, i.exp_avg, i.exp_avg_sq, i.grad, &i.s)?;
        }
        return Ok(());
    }
    // Guards for every item first (write locks on the updated tensors), then one
    // launch over all of them.
    let mut guards = Vec::with_capacity(items.len());
    for i in items {
        guards.push((
            i.grad.storage(),
            i.weights.storage_mut(),
            i.exp_avg.storage_mut(),
            i.exp_avg_sq.storage_mut(),
            i.compute.map(|c| c.storage_mut()),
        ));
    }
    let mut entries = Vec::with_capacity(items.len());
    for ((g, w, m, v, c), i) in guards.iter_mut().zip(items) {
        entries.push(cuda::adamw::AdamWEntry {
            grad: g.as_cuda()?,
            w: w.as_cuda_mut()?,
            m: m.as_cuda_mut()?,
            v: v.as_cuda_mut()?,
            copy: match c.as_mut() {
                Some(c) => Some(c.as_cuda_mut()?),
                None => None,
            },
            s: i.s,
            n: i.weights.numel(),
        });
    }
    cuda::adamw::step_many(&mut entries)
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

/// [`sum_squares`] as a one-element f32 tensor on the tensors' device, with no host
/// synchronisation on a GPU: for sums that are added up over a pass and read once at its
/// end. `xs` must not be empty.
pub fn sum_squares_tensor(xs: &[&Tensor]) -> Result<Tensor> {
    if xs.is_empty() {
        bail!("sum_squares_tensor: no tensors");
    }
    let device = super::same_device("sum_squares", xs)?;
    match device {
        Device::Cpu => Tensor::scalar(sum_squares(xs)? as f32, Device::Cpu),
        Device::Cuda(_) => {
            let guards: Vec<_> = xs.iter().map(|g| g.storage()).collect();
            let parts =
                guards.iter().zip(xs).map(|(s, g)| Ok((s.as_cuda()?, g.numel()))).collect::<Result<Vec<_>>>()?;
            let dev = parts[0].0.dev.clone();
            let sum = cuda::adamw::sum_squares_on_device(&parts)?;
            Tensor::from_storage(
                crate::tensor::Storage::Cuda(cuda::CudaStorage { dev, buf: cuda::CudaBuf::F32(sum) }),
                &[],
            )
        }
    }
}
