//! The flow-matching objective of the Synthos runs (docs/MODELS.md, *Training*) on one batch whose noise,
//! timestep indices and conditioning are given, so that it can be checked against a
//! reference step and replayed exactly on resume.

use crate::models::wan::WanModel;
use crate::schedule::TrainSchedule;
use crate::{bail, ops, DType, Device, Result, Tensor};

/// `Σ_b w(t_b) · mean((v̂_b − (ε_b − x0_b))²)` over the batch (a scalar `[]`, f32), where
/// `x_t = (1 − σ_b)·x0_b + σ_b·ε_b` and `v̂ = model(x_t, t_b, text, clip)`; `(σ_b, t_b,
/// w_b)` is row `indices[b]` of `schedule`. Divide by the batch size for the mean the
/// trainer minimises ([`flow_matching_loss`]); the sum lets a batch split into groups
/// (with and without a reference image) be recombined exactly.
///
/// Shapes: `x0`, `noise` `[B, C, 1, h, w]` (normalised latents and N(0, 1) noise), `text`
/// `[B, L, text_dim]`, `clip` `[B, N, clip_dim]` or `None` (the image condition dropped).
pub fn flow_matching_loss_sum(
    model: &WanModel,
    schedule: &TrainSchedule,
    x0: &Tensor,
    noise: &Tensor,
    indices: &[usize],
    text: &Tensor,
    clip: Option<&Tensor>,
) -> Result<Tensor> {
    let shape = x0.shape().to_vec();
    if shape.len() != 5 || shape[0] == 0 {
        bail!("flow_matching_loss: x0 must be [B, C, F, H, W] with B > 0, got {shape:?}");
    }
    if noise.shape() != shape.as_slice() {
        bail!("flow_matching_loss: noise {:?} differs from x0 {:?}", noise.shape(), shape);
    }
    let b = shape[0];
    if indices.len() != b {
        bail!("flow_matching_loss: {} timestep indices for a batch of {b}", indices.len());
    }
    let t = FlowMatchingTimes::new(model, schedule, indices, x0.device())?;
    flow_matching_loss_sum_at(model, x0, noise, &t, text, clip)
}

/// The per-sample values of the timesteps drawn for a batch, on the device: the inputs of
/// [`flow_matching_loss_sum_at`] besides the data, so that the loss itself issues
/// launches only (and a training step can be recorded as a CUDA graph).
pub struct FlowMatchingTimes {
    /// σ_b, `[B, 1, 1, 1, 1]`.
    pub sigma: Tensor,
    /// 1 − σ_b, `[B, 1, 1, 1, 1]`.
    pub keep: Tensor,
    /// The sinusoidal frequencies of t_b (`WanModel::time_frequencies`).
    pub frequencies: Tensor,
    /// The loss weight w(t_b), `[B]`.
    pub weight: Tensor,
}

impl FlowMatchingTimes {
    /// The values of schedule rows `indices` (checked against the table), on `device`.
    pub fn new(model: &WanModel, schedule: &TrainSchedule, indices: &[usize], device: Device) -> Result<Self> {
        if let Some(&i) = indices.iter().find(|&&i| i >= schedule.sigmas.len()) {
            bail!("flow_matching_loss: timestep index {i} is outside the {}-step table", schedule.sigmas.len());
        }
        let b = indices.len();
        let sig: Vec<f32> = indices.iter().map(|&i| schedule.sigmas[i] as f32).collect();
        let keep: Vec<f32> = sig.iter().map(|s| 1.0 - s).collect();
        let col = [b, 1, 1, 1, 1];
        let timesteps: Vec<f32> = indices.iter().map(|&i| schedule.timesteps[i] as f32).collect();
        let w: Vec<f32> = indices.iter().map(|&i| schedule.weights[i] as f32).collect();
        Ok(FlowMatchingTimes {
            sigma: Tensor::from_vec(sig, &col, device)?,
            keep: Tensor::from_vec(keep, &col, device)?,
            frequencies: model.time_frequencies(&timesteps)?,
            weight: Tensor::from_vec(w, &[b], device)?,
        })
    }
}

/// [`flow_matching_loss_sum`] with the timesteps' values already on the device.
pub fn flow_matching_loss_sum_at(
    model: &WanModel,
    x0: &Tensor,
    noise: &Tensor,
    t: &FlowMatchingTimes,
    text: &Tensor,
    clip: Option<&Tensor>,
) -> Result<Tensor> {
    let x0 = ops::cast(x0, DType::F32)?;
    let noise = ops::cast(noise, DType::F32)?;
    let x_t = ops::add(&ops::mul(&x0, &t.keep)?, &ops::mul(&noise, &t.sigma)?)?;
    let target = ops::sub(&noise, &x0)?;
    let pred = model.forward_at(&x_t, &t.frequencies, text, clip)?;
    let pred = ops::cast(&pred, DType::F32)?;
    let per_sample = ops::mse_per_sample(&pred, &target)?;
    ops::sum_all(&ops::mul(&per_sample, &t.weight)?)
}

/// The training loss of one batch: the mean over the batch of `w(t)·MSE(v̂, ε − x0)`
/// (see [`flow_matching_loss_sum`]).
pub fn flow_matching_loss(
    model: &WanModel,
    schedule: &TrainSchedule,
    x0: &Tensor,
    noise: &Tensor,
    indices: &[usize],
    text: &Tensor,
    clip: Option<&Tensor>,
) -> Result<Tensor> {
    let sum = flow_matching_loss_sum(model, schedule, x0, noise, indices, text, clip)?;
    ops::scale(&sum, 1.0 / indices.len().max(1) as f32)
}
