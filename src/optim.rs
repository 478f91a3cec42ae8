//! AdamW with fp32 master weights, and global gradient-norm clipping.
//!
//! [`AdamW`] follows `torch.optim.AdamW`: decoupled weight decay (`w -= lr·wd·w`),
//! bias-corrected moments, and one step count per parameter (a parameter that had no
//! gradient in some steps gets the bias correction of the steps it actually took). Each
//! parameter may opt out of weight decay (SynthCLIP excludes biases and norm weights).
//!
//! State per parameter: fp32 first and second moments, and for a bf16 parameter an fp32
//! master copy that the update runs on; the bf16 parameter is rewritten as the rounded
//! master in the same fused pass (`kernels/adamw.cu`). An f32 parameter (every CPU
//! parameter, or an f32 one on the GPU) is its own master. Parameters are updated in
//! place, so every handle to them (the model's) sees the new values.
//!
//! Split masters (GPU, opt-in with `SYNTHOS_CUDA_SPLIT_MASTER=1` until a GPU run has
//! shown the kernels): the fp32 master of a bf16 parameter is kept as the parameter itself
//! (its high 16 bits, rounded to nearest with ties away from zero) and the 16 low bits,
//! exact, in 2 bytes per weight instead of 4 (2.65 GiB less for Wan2.1-1.3B). The updates
//! are those of fp32 masters bit for bit; the bf16 parameter differs from round-to-nearest-
//! even of the master only at exact ties.
//!
//! Clipping: [`grad_norm`] gives the global L2 norm, [`clip_coefficient`] turns it into a
//! factor that [`AdamW::step`] multiplies into every gradient inside the update kernel,
//! together with any accumulation averaging — the gradients are never rewritten. The same
//! factor can be made on the device ([`ops::step_gate`], from the gradients' sum of squares
//! and the loss) and applied by [`AdamW::update_params_gated`], which leaves everything as
//! it was when the loss or the norm is not finite: the update is then queued before the
//! host has read either (what the trainers' single-micro-batch step does).

use std::collections::{HashMap, HashSet};

use crate::desc::AdamWStep;
use crate::{autograd, bail, ops, DType, Device, Error, Gradients, Result, Tensor};

/// AdamW hyper-parameters (defaults: PyTorch's `AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay (0.9).
    pub beta1: f32,
    /// Second-moment decay (0.999).
    pub beta2: f32,
    /// Denominator epsilon (1e-8).
    pub eps: f32,
    /// Decoupled weight decay (0.01), applied to parameters added with `decay = true`.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// The fp32 master of a parameter.
enum Master {
    /// An f32 parameter is its own master.
    Own,
    /// A bf16 parameter's fp32 master.
    Full(Tensor),
    /// A bf16 parameter's split master: the parameter holds the rounded high halves, this
    /// tensor the low halves ([`ops::AdamWWeights::Split`]).
    Split(Tensor),
}

struct ParamState {
    name: String,
    param: Tensor,
    decay: bool,
    master: Master,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: u64,
}

impl ParamState {
    /// The fp32 master's values: the parameter itself, its master, or the joined split
    /// master (a new tensor).
    fn master_value(&self) -> Result<Tensor> {
        match &self.master {
            Master::Own => Ok(self.param.clone()),
            Master::Full(m) => Ok(m.clone()),
            Master::Split(lo) => ops::master_join(&self.param, lo),
        }
    }
}

/// The AdamW optimizer over a set of named parameters.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    steps: u64,
}

/// Key of the global step count in [`AdamW::state_tensors`].
const STEP_KEY: &str = "step";

impl AdamW {
    /// An optimizer with no parameters yet.
    pub fn new(cfg: AdamWConfig) -> AdamW {
        AdamW { cfg, params: Vec::new(), steps: 0 }
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Registers `param` under `name` (used for the state's keys), with weight decay
    /// when `decay`. Allocates its zero moments, and its fp32 master when it is bf16.
    pub fn add_param(&mut self, name: &str, param: &Tensor, decay: bool) -> Result<()> {
        if name == STEP_KEY || self.params.iter().any(|p| p.name == name) {
            bail!("AdamW: parameter name {name:?} is already in use");
        }
        if let Some(p) = self.params.iter().find(|p| p.param.same_storage(param)) {
            bail!("AdamW: parameter {name:?} is the same tensor as {:?}", p.name);
        }
        let master = match param.dtype() {
            DType::F32 => Master::Own,
            // A bf16 value's low half is zero.
            DType::BF16 if ops::split_masters(param.device())? => {
                Master::Split(Tensor::zeros(param.shape(), DType::BF16, param.device())?)
            }
            DType::BF16 => Master::Full(autograd::no_grad(|| ops::cast(param, DType::F32))?),
        };
        let zeros = || Tensor::zeros(param.shape(), DType::F32, param.device());
        self.params.push(ParamState {
            name: name.to_string(),
            param: param.clone(),
            decay,
            master,
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
            steps: 0,
        });
        Ok(())
    }

    /// Clamps every element of the parameter `name` into [lo, hi], in its fp32 master
    /// too (so that the next step starts from the clamped value): CLIP's `logit_scale`
    /// after every step. A small host round trip; meant for tiny tensors.
    pub fn clamp_param(&mut self, name: &str, lo: f32, hi: f32) -> Result<()> {
        let Some(p) = self.params.iter().find(|p| p.name == name) else {
            bail!("AdamW::clamp_param: no parameter {name:?}");
        };
        let v = p.master_value()?.to_vec()?;
        let c: Vec<f32> = v.iter().map(|x| x.clamp(lo, hi)).collect();
        if c != v {
            match &p.master {
                Master::Own => p.param.copy_from_slice(&c)?,
                Master::Full(m) => {
                    m.copy_from_slice(&c)?;
                    p.param.copy_from_slice(&c)?;
                }
                Master::Split(low) => {
                    let m = Tensor::from_vec_dtype(c, p.param.shape(), p.param.device(), DType::F32)?;
                    ops::master_split(&m, &p.param, low)?;
                }
            }
        }
        Ok(())
    }

    /// Number of [`step`](AdamW::step) calls so far (including restored ones).
    pub fn step_count(&self) -> u64 {
        self.steps
    }

    /// The registered parameters, in registration order.
    pub fn params(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.param.clone()).collect()
    }

    /// One update of every parameter that has a gradient in `grads` (others are left
    /// untouched, state included), with learning rate `lr`; every gradient is multiplied
    /// by `grad_scale` first (a clipping coefficient times 1/accumulation steps). A
    /// non-finite `grad_scale` or gradient poisons the weights: skip such steps.
    pub fn step(&mut self, grads: &Gradients, lr: f32, grad_scale: f32) -> Result<()> {
        let present: Vec<(usize, &Tensor)> =
            self.params.iter().enumerate().filter_map(|(i, p)| grads.get(&p.param).map(|g| (i, g))).collect();
        self.update_params(&present, lr, grad_scale)?;
        self.end_step();
        Ok(())
    }

    /// Part of a step whose gradients arrive in groups (the update inside the backward
    /// pass, see [`crate::autograd::backward_streaming`]): updates the parameters given by
    /// their registration index (the order of [`AdamW::params`]) with their gradients, as
    /// [`AdamW::step`] does. Each parameter may appear once per step; call
    /// [`AdamW::end_step`] after the last group. Nothing changes unless every gradient
    /// matches its parameter.
    pub fn update_params(&mut self, grads: &[(usize, &Tensor)], lr: f32, grad_scale: f32) -> Result<()> {
        self.update_with(grads, lr, grad_scale, None)
    }

    /// [`AdamW::update_params`] behind a step's `gate` ([`ops::step_gate`], a one-element
    /// tensor on the parameters' device): every gradient is also multiplied by the gate's
    /// value (the clip coefficient), and when that value is not finite nothing changes on
    /// the device. The update is thus queued before the loss and the gradient norm are
    /// read; the step counts advance here as in `update_params`, so a caller that then
    /// finds the step not finite calls [`AdamW::rewind_params`] with the same indices.
    pub fn update_params_gated(&mut self, grads: &[(usize, &Tensor)], lr: f32, gate: &Tensor) -> Result<()> {
        self.update_with(grads, lr, 1.0, Some(gate))
    }

    /// Takes back the step counts that [`AdamW::update_params_gated`] advanced for the
    /// parameters `indices`, after a gate that was not finite left their values as they
    /// were (so the next update uses the bias corrections it would have).
    pub fn rewind_params(&mut self, indices: &[usize]) {
        for &i in indices {
            if let Some(p) = self.params.get_mut(i) {
                p.steps = p.steps.saturating_sub(1);
            }
        }
    }

    fn update_with(
        &mut self,
        grads: &[(usize, &Tensor)],
        lr: f32,
        grad_scale: f32,
        gate: Option<&Tensor>,
    ) -> Result<()> {
        // Check everything before the first parameter changes.
        for &(index, g) in grads {
            let Some(p) = self.params.get(index) else {
                bail!("AdamW: no parameter with index {index} ({} registered)", self.params.len());
            };
            if g.shape() != p.param.shape() || g.device() != p.param.device() {
                bail!(
                    "AdamW: gradient of {} is {:?} on {}, the parameter {:?} on {}",
                    p.name,
                    g.shape(),
                    g.device(),
                    p.param.shape(),
                    p.param.device()
                );
            }
            if g.same_storage(&p.param) {
                bail!("AdamW: the gradient of {} shares the parameter's storage", p.name);
            }
        }
        let cfg = self.cfg;
        // One update for every parameter (one launch on a GPU).
        let batch: Vec<ops::AdamWItem<'_>> = grads
            .iter()
            .map(|&(index, g)| {
                let p = &self.params[index];
                let t = (p.steps + 1) as f64;
                let lr64 = lr as f64;
                let s = AdamWStep {
                    lr,
                    beta1: cfg.beta1,
                    beta2: cfg.beta2,
                    eps: cfg.eps,
                    decay: if p.decay { (1.0 - lr64 * cfg.weight_decay as f64) as f32 } else { 1.0 },
                    bias_correction1: (1.0 - (cfg.beta1 as f64).powf(t)) as f32,
                    bias_correction2_sqrt: (1.0 - (cfg.beta2 as f64).powf(t)).sqrt() as f32,
                    grad_scale,
                };
                let weights = match &p.master {
                    Master::Own => ops::AdamWWeights::Plain(&p.param),
                    Master::Full(master) => ops::AdamWWeights::Master { master, param: &p.param },
                    Master::Split(lo) => ops::AdamWWeights::Split { param: &p.param, lo },
                };
                ops::AdamWItem { weights, exp_avg: &p.exp_avg, exp_avg_sq: &p.exp_avg_sq, grad: g, s }
            })
            .collect();
        let updated = match gate {
            Some(gate) => ops::adamw_update_many_gated(&batch, gate),
            None => ops::adamw_update_many(&batch),
        };
        updated.map_err(|e| {
            let names: Vec<&str> = grads.iter().take(4).map(|(i, _)| self.params[*i].name.as_str()).collect();
            let more = if grads.len() > 4 { ", …" } else { "" };
            e.context(format!("AdamW step of {} parameters ({}{more})", grads.len(), names.join(", ")))
        })?;
        drop(batch);
        for &(index, _) in grads {
            self.params[index].steps += 1;
        }
        Ok(())
    }

    /// Ends a step made of [`AdamW::update_params`] groups: counts it in
    /// [`AdamW::step_count`].
    pub fn end_step(&mut self) {
        self.steps += 1;
    }

    /// Global L2 norm of the gradients of the registered parameters (see [`grad_norm`]).
    pub fn grad_norm(&self, grads: &Gradients) -> Result<f32> {
        grad_norm(grads, &self.params())
    }

    /// The optimizer state to save: `step` (global count, a CPU scalar) and per parameter
    /// `<name>.exp_avg`, `<name>.exp_avg_sq`, `<name>.step` (CPU scalar) and, for bf16
    /// parameters, `<name>.master`. The tensors are handles to the live state (fp32, on
    /// the parameters' devices; a split master is joined into a new tensor): save them
    /// before the next step.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(STEP_KEY.to_string(), Tensor::scalar(self.steps as f32, Device::Cpu)?)];
        for p in &self.params {
            out.push((format!("{}.exp_avg", p.name), p.exp_avg.clone()));
            out.push((format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.clone()));
            match &p.master {
                Master::Own => {}
                Master::Full(m) => out.push((format!("{}.master", p.name), m.clone())),
                Master::Split(_) => out.push((format!("{}.master", p.name), p.master_value()?)),
            }
            out.push((format!("{}.step", p.name), Tensor::scalar(p.steps as f32, Device::Cpu)?));
        }
        Ok(out)
    }

    /// Restores a state written by [`state_tensors`](AdamW::state_tensors) (from any
    /// device). Every key of the registered parameters must be present with its shape and
    /// no other key may appear; nothing changes unless all checks pass. A restored master
    /// also rewrites its bf16 parameter (as the rounded master).
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let mut map: HashMap<&str, &Tensor> = HashMap::new();
        for (k, t) in state {
            if map.insert(k.as_str(), t).is_some() {
                bail!("AdamW state: key {k:?} appears twice");
            }
        }
        let mut used = HashSet::new();
        let mut get = |key: String, shape: &[usize]| -> Result<Tensor> {
            let t = map.get(key.as_str()).ok_or_else(|| Error::msg(format!("AdamW state: missing {key:?}")))?;
            if t.shape() != shape {
                bail!("AdamW state: {key:?} has shape {:?}, expected {shape:?}", t.shape());
            }
            used.insert(key);
            Ok((*t).clone())
        };
        let count = |key: &str, t: &Tensor| -> Result<u64> {
            let v = t.item()?;
            if !(v >= 0.0 && v.fract() == 0.0) {
                bail!("AdamW state: {key:?} = {v} is not a step count");
            }
            Ok(v as u64)
        };
        let steps = count(STEP_KEY, &get(STEP_KEY.to_string(), &[])?)?;
        let mut loads = Vec::new();
        for p in &self.params {
            let shape = p.param.shape();
            let m = get(format!("{}.exp_avg", p.name), shape)?;
            let v = get(format!("{}.exp_avg_sq", p.name), shape)?;
            let master = match p.master {
                Master::Own => None,
                Master::Full(_) | Master::Split(_) => Some(get(format!("{}.master", p.name), shape)?),
            };
            let key = format!("{}.step", p.name);
            let n = count(&key, &get(key.clone(), &[])?)?;
            loads.push((m, v, master, n));
        }
        if let Some(k) = map.keys().find(|k| !used.contains(**k)) {
            bail!("AdamW state: unexpected key {k:?} (no such parameter registered)");
        }
        for (p, (m, v, master, n)) in self.params.iter_mut().zip(loads) {
            p.exp_avg.assign(&m)?;
            p.exp_avg_sq.assign(&v)?;
            match (&p.master, master) {
                (Master::Full(dst), Some(src)) => {
                    dst.assign(&src)?;
                    p.param.assign(&src)?;
                }
                (Master::Split(lo), Some(src)) => {
                    let src = src.to_device(p.param.device(), DType::F32)?;
                    ops::master_split(&src, &p.param, lo)?;
                }
                _ => {}
            }
            p.steps = n;
        }
        self.steps = steps;
        Ok(())
    }
}

/// Global L2 norm `sqrt(Σ g²)` over the gradients in `grads` of `params` (parameters
/// without a gradient are skipped), accumulated in fp32 on the GPU with a deterministic
/// reduction order (f64 on the CPU). 0 when no parameter has a gradient.
pub fn grad_norm(grads: &Gradients, params: &[Tensor]) -> Result<f32> {
    let present: Vec<&Tensor> = params.iter().filter_map(|p| grads.get(p)).collect();
    Ok(ops::sum_squares(&present)?.sqrt() as f32)
}

/// The gradient factor that clips the global norm to `max_norm`:
/// `min(1, max_norm / (norm + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`. Pass it as
/// `grad_scale` to [`AdamW::step`]. A NaN norm gives NaN (skip that step).
pub fn clip_coefficient(norm: f32, max_norm: f32) -> f32 {
    let c = max_norm / (norm + 1e-6);
    if c.is_nan() {
        c
    } else {
        c.min(1.0)
    }
}
