//! The optimizer's in-place updates, dispatched like every other op (they are not
//! differentiable and record nothing on the tape).

use crate::desc::AdamWStep;
use crate::{bail, cpu, cuda, DType, Device, Result, Tensor};

/// Where the weights of one AdamW update live.
#[derive(Clone, Copy)]
pub enum AdamWWeights<'a> {
    /// An f32 parameter: its own master.
    Plain(&'a Tensor),
    /// A bf16 parameter and its fp32 master; the parameter is rewritten as the new master
    /// rounded to nearest even.
    Master {
        /// The fp32 master the update runs on.
        master: &'a Tensor,
        /// The bf16 parameter the model computes with.
        param: &'a Tensor,
    },
    /// A bf16 parameter whose fp32 master is split (GPU only): the parameter holds the
    /// master's high 16 bits rounded to nearest (ties away from zero), `lo` (a 16-bit
    /// tensor, dtype bf16, holding raw bits, not values) the low 16 bits. See
    /// [`master_join`] and [`master_split`].
    Split {
        /// The bf16 parameter: the rounded high halves.
        param: &'a Tensor,
        /// The low halves.
        lo: &'a Tensor,
    },
}

impl<'a> AdamWWeights<'a> {
    /// The tensors the update writes (besides the moments).
    fn tensors(&self) -> Vec<&'a Tensor> {
        match *self {
            AdamWWeights::Plain(w) => vec![w],
            AdamWWeights::Master { master, param } => vec![master, param],
            AdamWWeights::Split { param, lo } => vec![param, lo],
        }
    }
}

/// One parameter's fused AdamW update: its weights, moments, gradient and step constants.
pub struct AdamWItem<'a> {
    /// The weights (and, for a bf16 parameter, its master).
    pub weights: AdamWWeights<'a>,
    /// First moment (fp32).
    pub exp_avg: &'a Tensor,
    /// Second moment (fp32).
    pub exp_avg_sq: &'a Tensor,
    /// The gradient.
    pub grad: &'a Tensor,
    /// This parameter's constants of the step.
    pub s: AdamWStep,
}

/// One fused AdamW update in place: the weights (see [`AdamWWeights`]), the moments
/// `exp_avg` and `exp_avg_sq`, from the gradient.
pub fn adamw_update(item: &AdamWItem<'_>) -> Result<()> {
    update_one(item, None)
}

/// [`adamw_update`], behind a step's `gate` ([`step_gate`]) when given.
fn update_one(item: &AdamWItem<'_>, gate: Option<&Tensor>) -> Result<()> {
    let mut all = item.weights.tensors();
    all.extend([item.exp_avg, item.exp_avg_sq, item.grad]);
    all.extend(gate);
    let device = super::same_device("adamw", &all)?;
    let gs = item.grad.storage();
    let mut ms = item.exp_avg.storage_mut();
    let mut vs = item.exp_avg_sq.storage_mut();
    let gate_storage = gate.map(|g| g.storage());
    match (device, item.weights) {
        (Device::Cpu, AdamWWeights::Plain(w)) => {
            // The kernels' gate (`apply_gate` in kernels/adamw.cu): a factor of the
            // gradient scale, or no update at all when it is not finite.
            let mut s = item.s;
            if let Some(g) = &gate_storage {
                let c = g.as_cpu()?[0];
                if !c.is_finite() {
                    return Ok(());
                }
                s.grad_scale *= c;
            }
            let mut ws = w.storage_mut();
            cpu::adamw::step(ws.as_cpu_mut()?, gs.as_cpu()?, ms.as_cpu_mut()?, vs.as_cpu_mut()?, &s)
        }
        (Device::Cpu, _) => bail!("adamw: a CPU parameter is f32, its own master"),
        (Device::Cuda(_), weights) => {
            let n = item.grad.numel();
            let (g, m, v) = (gs.as_cuda()?, ms.as_cuda_mut()?, vs.as_cuda_mut()?);
            let gate = gate_storage.as_ref().map(|g| g.as_cuda()).transpose()?;
            match weights {
                AdamWWeights::Plain(w) => {
                    let mut ws = w.storage_mut();
                    cuda::adamw::step(g, cuda::adamw::Weights::Plain(ws.as_cuda_mut()?), m, v, &item.s, n, gate)
                }
                AdamWWeights::Master { master, param } => {
                    let (mut ws, mut ps) = (master.storage_mut(), param.storage_mut());
                    let w = cuda::adamw::Weights::Master { w: ws.as_cuda_mut()?, copy: ps.as_cuda_mut()? };
                    cuda::adamw::step(g, w, m, v, &item.s, n, gate)
                }
                AdamWWeights::Split { param, lo } => {
                    let (mut ps, mut ls) = (param.storage_mut(), lo.storage_mut());
                    let w = cuda::adamw::Weights::Split { param: ps.as_cuda_mut()?, lo: ls.as_cuda_mut()? };
                    cuda::adamw::step(g, w, m, v, &item.s, n, gate)
                }
            }
        }
    }
}

/// [`adamw_update`] for many parameters (all on one device), with the same results: on
/// the GPU in one launch for all of them when `SYNTHOS_CUDA_MULTI_TENSOR=1` (see
/// `cuda::adamw::multi_tensor`), otherwise one after another. Every tensor of
/// one item must differ from those of the others.
pub fn adamw_update_many(items: &[AdamWItem<'_>]) -> Result<()> {
    update_many(items, None)
}

/// [`adamw_update_many`] behind a step's gate ([`step_gate`]): every gradient is scaled by
/// the gate's value as well, and when that value is not finite no tensor changes. The
/// update can thus be queued before the host has read the step's loss and gradient norm.
pub fn adamw_update_many_gated(items: &[AdamWItem<'_>], gate: &Tensor) -> Result<()> {
    if gate.numel() != 1 || gate.dtype() != DType::F32 {
        bail!("adamw: the step's gate must be one f32 value, not {:?} {:?}", gate.shape(), gate.dtype());
    }
    update_many(items, Some(gate))
}

/// The gate of a step whose update is queued before its loss and gradient norm are read:
/// a one-element f32 tensor holding the factor every gradient is multiplied by, the clip
/// coefficient of the norm `sqrt(squares)` ([`crate::optim::clip_coefficient`]) with
/// `max_norm`, 1 without; or NaN when `loss` or the norm is not finite, which makes
/// [`adamw_update_many_gated`] change nothing. `squares` (the gradients' sum of squares,
/// [`sum_squares_tensor`]) and `loss` are one-element tensors on one device; nothing is
/// read on the host.
pub fn step_gate(squares: &Tensor, loss: &Tensor, max_norm: Option<f32>) -> Result<Tensor> {
    let device = super::same_device("step_gate", &[squares, loss])?;
    if squares.numel() != 1 || loss.numel() != 1 {
        bail!(
            "step_gate: the sum of squares {:?} and the loss {:?} must be one value each",
            squares.shape(),
            loss.shape()
        );
    }
    if let Some(m) = max_norm {
        if !(m > 0.0 && m.is_finite()) {
            bail!("step_gate: the clipping norm {m} is not a positive number");
        }
    }
    let (ss, ls) = (squares.storage(), loss.storage());
    match device {
        Device::Cpu => {
            let norm = ss.as_cpu()?[0].sqrt();
            let c = match max_norm {
                Some(m) => crate::optim::clip_coefficient(norm, m),
                None => 1.0,
            };
            let gate = if ls.as_cpu()?[0].is_finite() && norm.is_finite() { c } else { f32::NAN };
            // (A result, not a host transfer: it may be computed inside a recorded function.)
            Tensor::from_storage(crate::tensor::Storage::Cpu(vec![gate]), &[])
        }
        Device::Cuda(_) => {
            let (s, l) = (ss.as_cuda()?, ls.as_cuda()?);
            let buf = cuda::adamw::step_gate(s, l, max_norm)?;
            Tensor::from_storage(crate::tensor::Storage::Cuda(cuda::CudaStorage { dev: s.dev.clone(), buf }), &[])
        }
    }
}

/// [`adamw_update_many`], behind a step's `gate` when given.
fn update_many(items: &[AdamWItem<'_>], gate: Option<&Tensor>) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let mut all: Vec<&Tensor> = Vec::with_capacity(items.len() * 5 + 1);
    let mut seen = std::collections::HashSet::with_capacity(items.len() * 5);
    for (k, i) in items.iter().enumerate() {
        for t in i.weights.tensors().into_iter().chain([i.exp_avg, i.exp_avg_sq, i.grad]) {
            if !seen.insert(t.storage_id()) {
                bail!("adamw: item {k} names a tensor (storage) that an earlier argument names too");
            }
            all.push(t);
        }
    }
    all.extend(gate);
    let batched = match super::same_device("adamw", &all)? {
        Device::Cpu => false,
        Device::Cuda(_) => cuda::adamw::multi_tensor()?,
    };
    if !batched {
        for i in items {
            update_one(i, gate)?;
        }
        return Ok(());
    }
    // Guards for every item first (write locks on the updated tensors), then one
    // launch over all of them.
    let mut guards = Vec::with_capacity(items.len());
    for i in items {
        let weights: Vec<_> = i.weights.tensors().into_iter().map(|t| t.storage_mut()).collect();
        guards.push((i.grad.storage(), weights, i.exp_avg.storage_mut(), i.exp_avg_sq.storage_mut()));
    }
    let mut entries = Vec::with_capacity(items.len());
    for ((g, ws, m, v), i) in guards.iter_mut().zip(items) {
        let weights = match (i.weights, ws.as_mut_slice()) {
            (AdamWWeights::Plain(_), [w]) => cuda::adamw::Weights::Plain(w.as_cuda_mut()?),
            (AdamWWeights::Master { .. }, [w, c]) => {
                cuda::adamw::Weights::Master { w: w.as_cuda_mut()?, copy: c.as_cuda_mut()? }
            }
            (AdamWWeights::Split { .. }, [p, l]) => {
                cuda::adamw::Weights::Split { param: p.as_cuda_mut()?, lo: l.as_cuda_mut()? }
            }
            _ => bail!("adamw: the weights' guards do not match their kind"),
        };
        entries.push(cuda::adamw::AdamWEntry {
            grad: g.as_cuda()?,
            weights,
            m: m.as_cuda_mut()?,
            v: v.as_cuda_mut()?,
            s: i.s,
            n: i.grad.numel(),
        });
    }
    let gate_storage = gate.map(|g| g.storage());
    let gate = gate_storage.as_ref().map(|g| g.as_cuda()).transpose()?;
    cuda::adamw::step_many(&mut entries, gate)
}

/// The fp32 master of a split master ([`AdamWWeights::Split`]): a new f32 tensor on the
/// parameter's device.
pub fn master_join(param: &Tensor, lo: &Tensor) -> Result<Tensor> {
    let device = super::same_device("master_join", &[param, lo])?;
    if param.shape() != lo.shape() || param.dtype() != DType::BF16 || lo.dtype() != DType::BF16 {
        bail!(
            "master_join: the parameter ({:?}, {:?}) and its low halves ({:?}, {:?}) must be bf16 of one shape",
            param.shape(),
            param.dtype(),
            lo.shape(),
            lo.dtype()
        );
    }
    let Device::Cuda(_) = device else {
        bail!("master_join: split masters live on a GPU");
    };
    let (ps, ls) = (param.storage(), lo.storage());
    let (p, l) = (ps.as_cuda()?, ls.as_cuda()?);
    let buf = cuda::adamw::master_join(p, l, param.numel())?;
    Tensor::from_storage(crate::tensor::Storage::Cuda(cuda::CudaStorage { dev: p.dev.clone(), buf }), param.shape())
}

/// Writes the split of the fp32 `master` into `param` (the rounded high halves) and `lo`
/// (the low halves), all three of one shape on one GPU ([`AdamWWeights::Split`]).
pub fn master_split(master: &Tensor, param: &Tensor, lo: &Tensor) -> Result<()> {
    let device = super::same_device("master_split", &[master, param, lo])?;
    if master.shape() != param.shape() || lo.shape() != param.shape() {
        bail!("master_split: shapes {:?}, {:?} and {:?} differ", master.shape(), param.shape(), lo.shape());
    }
    if master.dtype() != DType::F32 || param.dtype() != DType::BF16 || lo.dtype() != DType::BF16 {
        bail!("master_split: needs an f32 master, a bf16 parameter and bf16 low halves");
    }
    let Device::Cuda(_) = device else {
        bail!("master_split: split masters live on a GPU");
    };
    let ms = master.storage();
    let (mut ps, mut ls) = (param.storage_mut(), lo.storage_mut());
    cuda::adamw::master_split(ms.as_cuda()?, ps.as_cuda_mut()?, ls.as_cuda_mut()?, master.numel())
}

/// True when bf16 parameters on `device` keep split masters ([`AdamWWeights::Split`]):
/// on a GPU with `SYNTHOS_CUDA_SPLIT_MASTER=1` (opt-in until a GPU run has shown the
/// kernels), never on the CPU, whose parameters are f32.
pub fn split_masters(device: Device) -> Result<bool> {
    match device {
        Device::Cpu => Ok(false),
        Device::Cuda(_) => cuda::adamw::split_masters(),
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

/// [`sum_squares`] as a one-element f32 tensor on the tensors' device, with no host
/// synchronisation on a GPU: for sums that are added up over a pass and read once at its
/// end. `xs` must not be empty.
pub fn sum_squares_tensor(xs: &[&Tensor]) -> Result<Tensor> {
    if xs.is_empty() {
        bail!("sum_squares_tensor: no tensors");
    }
    let device = super::same_device("sum_squares", xs)?;
    match device {
        // (A result, not a host transfer: it may be computed inside a recorded function.)
        Device::Cpu => Tensor::from_storage(crate::tensor::Storage::Cpu(vec![sum_squares(xs)? as f32]), &[]),
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
