//! The run loop every trainer shares: epochs and steps over a seeded data order, gradient
//! accumulation, AdamW on fp32 masters with the learning-rate schedule and optional
//! clipping, the stop on a non-finite loss or gradient, checkpoints and atomic resume
//! state, metrics, the loss plot, progress and validation. A trainer supplies what is its
//! own through [`TrainTask`]: the loss of a micro-batch, how its weights are saved, its
//! validation, and the settings a resumed run must share.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::config::LrSchedule;
use crate::nn::NamedParam;
use crate::optim::{clip_coefficient, AdamW, AdamWConfig};
use crate::report::{plot_loss, read_metrics, series, MetricsRecord, MetricsWriter, Progress};
use crate::weights::{self, SaveDType, WeightSet};
use crate::{autograd, bail, ops, DType, Device, Error, Gradients, Result, ResultExt, Tensor};

/// File name of the resume state in the run folder.
pub const RESUME_FILE: &str = "resume.safetensors";
/// Metadata key of the resume state's JSON header.
const RESUME_KEY: &str = "synthos_resume";
/// Prefix of the trainable parameters' exact values in the resume state.
const PARAM_PREFIX: &str = "param/";

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// The step just completed (1-based).
    pub step: u64,
    /// Its epoch (0-based).
    pub epoch: u64,
    /// Mean weighted loss over the step's samples.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Samples in the step.
    pub samples: usize,
    /// Samples per second of wall time.
    pub samples_per_s: f64,
}

/// What a finished run produced.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Steps done in total (including those before a resume).
    pub steps: u64,
    /// Loss of the first step run in this call.
    pub first_loss: Option<f64>,
    /// Mean loss over the last tenth of the steps run in this call.
    pub final_loss: Option<f64>,
    /// Checkpoints written in this call, in order.
    pub checkpoints: Vec<PathBuf>,
    /// Validation grids written in this call.
    pub samples: Vec<PathBuf>,
    /// Seconds of wall time.
    pub seconds: f64,
}

/// The settings of the loop itself (a trainer's configuration fills them).
#[derive(Clone, Debug, PartialEq)]
pub struct LoopSettings {
    /// Run folder: checkpoints, resume state, metrics, plot.
    pub output: PathBuf,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Leave out each epoch's last step when it would be short (fewer than
    /// `batch_size × grad_accum` samples): SynthCLIP's `drop_last`, so that every
    /// contrastive batch has its full set of negatives.
    pub drop_last: bool,
    /// Passes over the data.
    pub epochs: u64,
    /// Stop after this many steps even if epochs remain.
    pub max_steps: Option<u64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled AdamW weight decay (for the parameters the task decays).
    pub weight_decay: f64,
    /// AdamW's moment decays and denominator epsilon (PyTorch's defaults: 0.9, 0.999,
    /// 1e-8; SynthCLIP: 0.9, 0.98, 1e-8).
    pub adam_betas: (f32, f32),
    /// AdamW's epsilon.
    pub adam_eps: f32,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// The warm-up's first learning rate. `None`: step `i` of the warm-up runs at
    /// lr·(i+1)/warmup; `Some(s)`: it runs at s + (lr − s)·i/(warmup − 1), SLIP's
    /// `np.linspace(s, lr, warmup)`.
    pub warmup_from: Option<f64>,
    /// The floor the cosine decays to (0, or SynthCLIP's 1e-5).
    pub lr_end: f64,
    /// Learning-rate shape after the warm-up.
    pub lr_schedule: LrSchedule,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: Option<f32>,
    /// Update each parameter inside the backward pass, as soon as its gradient is final,
    /// and free that gradient at once, instead of holding every gradient until the pass
    /// ends: the same updates, without the memory of a whole set of gradients (2.65 GiB
    /// for Wan2.1-1.3B). Needs `grad_accum` 1 and no `max_grad_norm` (both need every
    /// gradient before the first update). On a non-finite loss or gradient norm the run
    /// still stops, but the weights in memory are then partly updated (the checkpoints on
    /// disk are not touched).
    pub optimizer_in_backward: bool,
    /// Seed of the data order (and of whatever the task draws).
    pub seed: u64,
    /// Write `step-N.safetensors` every this many steps.
    pub save_every: Option<u64>,
    /// Keep only this many of the newest `epoch-N` checkpoints: writing `epoch-N`
    /// removes `epoch-(N−k)`. `None` keeps them all (the recipes of the published
    /// models); the demos keep the last one.
    pub keep_epochs: Option<u64>,
    /// Validate every this many steps (and at the end).
    pub validate_every: Option<u64>,
    /// Write `metrics.jsonl` and `loss.png`.
    pub log_metrics: bool,
    /// Continue the run in `output` from its resume state.
    pub resume: bool,
    /// Title of the loss plot.
    pub loss_title: String,
}

impl LoopSettings {
    /// The learning rate of step `step` (0-based) of `total`: the linear warm-up (see
    /// [`LoopSettings::warmup_from`]), then constant, or a cosine from lr towards
    /// [`LoopSettings::lr_end`] over the remaining steps, `lr_end + (lr − lr_end)·½(1 +
    /// cos(π·i/n))` for step `i` of `n` (SLIP's `cosine_scheduler`).
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        let w = self.warmup_steps;
        if step < w {
            return match self.warmup_from {
                None => self.lr * (step + 1) as f64 / w as f64,
                Some(s) if w > 1 => s + (self.lr - s) * step as f64 / (w - 1) as f64,
                Some(s) => s,
            };
        }
        match self.lr_schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Cosine => {
                let span = total.saturating_sub(w).max(1) as f64;
                let done = (step - w) as f64;
                let shape = 0.5 * (1.0 + (std::f64::consts::PI * (done / span).min(1.0)).cos());
                self.lr_end + (self.lr - self.lr_end) * shape
            }
        }
    }
}

/// What a trainer plugs into the [`RunLoop`].
pub trait TrainTask {
    /// Samples in the dataset.
    fn dataset_len(&self) -> usize;
    /// The dataset indices in the order epoch `epoch` visits them.
    fn epoch_order(&self, epoch: u64, seed: u64) -> Vec<usize>;
    /// The loss of micro-batch `micro` of step `step` over the samples `indices`, scaled
    /// by 1/`n_step` (the samples of the whole step) so that accumulated gradients are
    /// those of the step's mean loss. Recorded on the tape.
    fn micro_loss(&mut self, step: u64, micro: usize, indices: &[usize], n_step: usize) -> Result<Tensor>;
    /// The device inputs of [`TrainTask::micro_loss`]: every host value the loss needs,
    /// uploaded, so that [`TrainTask::loss_from_inputs`] issues launches only and a step
    /// can be recorded as a CUDA graph (`SYNTHOS_CUDA_GRAPHS=1`). The default, no inputs,
    /// keeps the task's steps plain.
    fn micro_inputs(&mut self, _step: u64, _micro: usize, _indices: &[usize], _n_step: usize) -> Result<Vec<Tensor>> {
        Ok(Vec::new())
    }
    /// The loss of the micro-batch whose inputs [`TrainTask::micro_inputs`] gave (the
    /// value and the tape of [`TrainTask::micro_loss`]), and tensors the task wants back
    /// after the step (say, the logits of a metric; computed without the tape), which it
    /// receives through [`TrainTask::keep_step_outputs`].
    fn loss_from_inputs(&self, _inputs: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        bail!("this task's loss is not computed from device inputs")
    }
    /// Receives the extra tensors [`TrainTask::loss_from_inputs`] gave for the step being
    /// run, before its update. Read them at the latest in [`TrainTask::after_step`]: the
    /// step after may overwrite them (they may be a recorded graph's result buffers).
    fn keep_step_outputs(&mut self, _outputs: Vec<Tensor>) -> Result<()> {
        Ok(())
    }
    /// Writes the trained weights (atomically) to `path`.
    fn save_weights(&self, path: &Path) -> Result<()>;
    /// Writes validation outputs for step `step`; returns the files written.
    fn validate(&self, step: u64) -> Result<Vec<PathBuf>>;
    /// Settings a resumed run must share with the run it continues (JSON object), beyond
    /// the loop's own.
    fn resume_settings(&self) -> Value;
    /// The device the task computes on (for the memory figures).
    fn device(&self) -> Device;
    /// Whether AdamW's weight decay applies to the parameter `name` of `shape` (default:
    /// every parameter).
    fn decays(&self, _name: &str, _shape: &[usize]) -> bool {
        true
    }
    /// Called once per optimizer step before its first [`TrainTask::micro_loss`], with
    /// the indices of every micro-batch of the step (a contrastive task caches the whole
    /// batch's features here).
    fn begin_step(&mut self, _step: u64, _batches: &[Vec<usize>]) -> Result<()> {
        Ok(())
    }
    /// Called after each optimizer update (a task constrains parameters here, e.g.
    /// CLIP's `logit_scale` clamp through [`AdamW::clamp_param`]).
    fn after_step(&mut self, _opt: &mut AdamW) -> Result<()> {
        Ok(())
    }
    /// Task-specific figures of the step just run, added to its `metrics.jsonl` line.
    fn step_metrics(&self) -> serde_json::Map<String, Value> {
        serde_json::Map::new()
    }
}

/// Creates the run folder `output` and checks it against `resume`: a fresh run refuses a
/// folder holding a resume state, and a resumed one needs it.
pub fn check_run_folder(output: &Path, resume: bool) -> Result<()> {
    std::fs::create_dir_all(output).with_ctx(|| format!("cannot create the output folder {}", output.display()))?;
    let resume_path = output.join(RESUME_FILE);
    if resume && !resume_path.is_file() {
        bail!("--resume: {} has no {RESUME_FILE} to continue from", output.display());
    }
    if !resume && resume_path.is_file() {
        bail!(
            "{} already holds a run ({RESUME_FILE}); pass --resume to continue it, or choose another output folder",
            output.display()
        );
    }
    Ok(())
}

/// Most gradient bytes gathered before one group's update in a step with the optimizer
/// inside the backward pass: a group is one launch of many MB, small beside the
/// gradients of a whole model. A small model's groups hold about an eighth of its
/// gradients, so that its updates too run while the pass goes on.
const STREAM_GROUP_BYTES: usize = 64 << 20;

/// The loop's state: optimizer, parameters, step counters, metrics and checkpoints.
pub struct RunLoop {
    settings: LoopSettings,
    opt: AdamW,
    params: Vec<NamedParam>,
    dataset_len: usize,
    step: u64,
    steps_per_epoch: u64,
    total_steps: u64,
    metrics: Option<MetricsWriter>,
    last_checkpoint: Option<PathBuf>,
    quiet: bool,
    /// The step from device inputs, recorded as CUDA graphs (`SYNTHOS_CUDA_GRAPHS=1`).
    graphs: ops::GraphRunner,
    /// Per layout of a step's inputs, what a replay's results are: the task's extra
    /// tensors, then the gradients of which parameters (by registration index).
    graphed_steps: HashMap<ops::Signature, GraphedStep>,
}

/// What a step function recorded for one input layout returns, besides the loss: how many
/// extra tensors for the task, then the gradients of these parameters (indices into the
/// optimizer's list; a layout may leave some parameters without a gradient).
struct GraphedStep {
    extras: usize,
    params: Vec<usize>,
}

/// Input layouts of a step recorded as CUDA graphs (with image dropout, a batch splits
/// into groups whose sizes vary from step to step; each recorded layout keeps its graph's
/// working memory, so the rarer ones run plainly).
const STEP_GRAPH_LAYOUTS: usize = 4;

impl RunLoop {
    /// A loop training `params` (every one decayed) over a dataset of `dataset_len`
    /// samples. Creates the output folder; refuses a fresh run in a folder holding a
    /// resume state, and `resume` without one. Call [`RunLoop::start`] before stepping.
    pub fn new(settings: LoopSettings, params: Vec<NamedParam>, dataset_len: usize) -> Result<RunLoop> {
        Self::with_decay(settings, params, dataset_len, &|_, _| true)
    }

    /// [`RunLoop::new`] with weight decay only on the parameters for which `decays(name,
    /// shape)` holds.
    pub fn with_decay(
        settings: LoopSettings,
        params: Vec<NamedParam>,
        dataset_len: usize,
        decays: &dyn Fn(&str, &[usize]) -> bool,
    ) -> Result<RunLoop> {
        if settings.batch_size == 0 || settings.grad_accum == 0 {
            bail!(
                "the batch size and the accumulation steps must be at least 1 (batch {}, accumulation {})",
                settings.batch_size,
                settings.grad_accum
            );
        }
        if settings.save_every == Some(0) || settings.validate_every == Some(0) {
            bail!("checkpoint and validation intervals must be at least 1 step");
        }
        check_run_folder(&settings.output, settings.resume)?;
        if settings.optimizer_in_backward && (settings.grad_accum > 1 || settings.max_grad_norm.is_some()) {
            bail!(
                "the optimizer step inside the backward pass needs every gradient final after one pass: it cannot be \
                 combined with gradient accumulation (grad_accum {}) or clipping (max_grad_norm {:?})",
                settings.grad_accum,
                settings.max_grad_norm
            );
        }
        if params.is_empty() {
            bail!("no trainable parameters");
        }
        let mut opt = AdamW::new(AdamWConfig {
            beta1: settings.adam_betas.0,
            beta2: settings.adam_betas.1,
            eps: settings.adam_eps,
            weight_decay: settings.weight_decay as f32,
        });
        for (name, t) in &params {
            opt.add_param(name, t, decays(name, t.shape()))?;
        }
        let steps_per_epoch = if settings.drop_last {
            let per_step = settings.batch_size.saturating_mul(settings.grad_accum);
            if dataset_len < per_step {
                bail!(
                    "{dataset_len} samples do not fill one step of {per_step} (batch {} × {})",
                    settings.batch_size,
                    settings.grad_accum
                );
            }
            (dataset_len / per_step) as u64
        } else {
            (dataset_len.div_ceil(settings.batch_size) as u64).div_ceil(settings.grad_accum as u64)
        };
        // (More epochs than steps can count: the run ends at --max-steps, or never.)
        let by_epochs = steps_per_epoch.saturating_mul(settings.epochs);
        let total_steps = match settings.max_steps {
            Some(m) if settings.epochs == 0 => m,
            Some(m) => m.min(by_epochs),
            None => by_epochs,
        };
        Ok(RunLoop {
            settings,
            opt,
            params,
            dataset_len,
            step: 0,
            steps_per_epoch,
            total_steps,
            metrics: None,
            last_checkpoint: None,
            quiet: false,
            graphs: ops::GraphRunner::with_backward_inside("the training step", STEP_GRAPH_LAYOUTS),
            graphed_steps: HashMap::new(),
        })
    }

    /// Input layouts of the step recorded as CUDA graphs so far
    /// (steps whose task gives device inputs, [`TrainTask::micro_inputs`]).
    pub fn recorded_step_graphs(&self) -> usize {
        self.graphs.recorded_layouts()
    }

    /// Restores the resume state (with `resume`) and opens the metrics file.
    pub fn start(&mut self, task: &impl TrainTask) -> Result<()> {
        if self.settings.resume {
            self.load_resume_state(task)?;
        }
        if self.settings.log_metrics {
            let path = self.settings.output.join("metrics.jsonl");
            self.metrics = Some(MetricsWriter::resume(path, self.step)?);
        }
        Ok(())
    }

    /// Silences the progress bar and notes.
    pub fn set_quiet(&mut self, quiet: bool) {
        self.quiet = quiet;
    }

    /// Optimizer steps done so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Steps the run will have done when complete.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// The trained parameters by name.
    pub fn params(&self) -> &[NamedParam] {
        &self.params
    }

    /// The loop's settings.
    pub fn settings(&self) -> &LoopSettings {
        &self.settings
    }

    /// The dataset indices of micro-batch `micro` of optimizer step `step` (0-based), or
    /// `None` past the epoch's end. Each epoch visits the task's order for that epoch in
    /// micro-batches of `batch_size` (the last may be smaller); an optimizer step takes
    /// `grad_accum` of them (the epoch's last step may take fewer).
    pub fn micro_batch(&self, task: &impl TrainTask, step: u64, micro: usize) -> Option<Vec<usize>> {
        let epoch = step / self.steps_per_epoch;
        let within = step % self.steps_per_epoch;
        let b = self.settings.batch_size;
        let start = ((within as usize) * self.settings.grad_accum + micro) * b;
        let len = self.dataset_len;
        if start >= len {
            return None;
        }
        let order = task.epoch_order(epoch, self.settings.seed);
        Some(order[start..(start + b).min(len)].to_vec())
    }

    /// Runs one optimizer step (all its micro-batches). A non-finite loss or gradient is
    /// an error and leaves the weights untouched.
    ///
    /// On the CPU the step runs on a thread of the rayon pool, so that every op's
    /// parallel loop starts where its workers are, instead of handing each op over from
    /// an outside thread and waiting for it (a wake-up and a sleep per op).
    pub fn train_step(&mut self, task: &mut (impl TrainTask + Send)) -> Result<StepStats> {
        // The step records on a tape of its own (a pool thread may pick it up while it
        // waits inside another job, whose tape and recording state are not this one's).
        if task.device() == Device::Cpu && rayon::current_thread_index().is_none() {
            return rayon::join(|| autograd::isolated(true, || self.train_step_here(task)), || ()).0;
        }
        autograd::isolated(true, || self.train_step_here(task))
    }

    fn train_step_here(&mut self, task: &mut impl TrainTask) -> Result<StepStats> {
        if self.step >= self.total_steps {
            bail!("the run is complete ({} steps)", self.total_steps);
        }
        let t0 = Instant::now();
        let step = self.step;
        let epoch = step / self.steps_per_epoch;
        let batches: Vec<Vec<usize>> =
            (0..self.settings.grad_accum).map_while(|m| self.micro_batch(task, step, m)).collect();
        let n_samples: usize = batches.iter().map(Vec::len).sum();
        task.begin_step(step, &batches)?;
        let lr = self.settings.lr_at(step, self.total_steps);
        if self.settings.optimizer_in_backward {
            let (loss_total, grad_norm) = self.streamed_step(task, step, &batches, n_samples, lr)?;
            return self.finish_step(task, t0, epoch, loss_total, grad_norm, lr, n_samples);
        }
        if let [indices] = batches.as_slice() {
            let inputs = task.micro_inputs(step, 0, indices, n_samples)?;
            if !inputs.is_empty() {
                let (loss_total, grad_norm) = self.step_from_inputs(task, step, &inputs, lr)?;
                return self.finish_step(task, t0, epoch, loss_total, grad_norm, lr, n_samples);
            }
        }
        let mut grads: Option<Gradients> = None;
        let mut losses = Vec::with_capacity(batches.len());
        for (m, indices) in batches.iter().enumerate() {
            let loss = task.micro_loss(step, m, indices, n_samples)?;
            let g = autograd::backward(&loss)?;
            match grads.as_mut() {
                Some(acc) => acc.merge(g)?,
                None => grads = Some(g),
            }
            losses.push(loss);
        }
        // Read back after the backward passes are queued, so the GPU never idles while
        // the host issues them.
        let mut loss_total = 0.0f64;
        for loss in &losses {
            loss_total += loss.item()? as f64;
        }
        // Nothing recorded in this step outlives it (only what the loss depends on was
        // consumed by the backward passes).
        autograd::clear_tape();
        let grads = grads.ok_or_else(|| Error::msg(format!("step {}: no samples", step + 1)))?;
        let grad_norm = self.opt.grad_norm(&grads)? as f64;
        self.check_finite(step, epoch, loss_total, grad_norm, "The weights were not updated")?;
        let scale = self.settings.max_grad_norm.map_or(1.0, |m| clip_coefficient(grad_norm as f32, m));
        self.opt.step(&grads, lr as f32, scale)?;
        self.finish_step(task, t0, epoch, loss_total, grad_norm, lr, n_samples)
    }

    /// A step of one micro-batch whose loss the task computes from device inputs
    /// ([`TrainTask::micro_inputs`]): the loss and its backward pass run through the loop's
    /// [`ops::GraphRunner`] (replayed as a CUDA graph from the second step of an input
    /// layout on, with `SYNTHOS_CUDA_GRAPHS=1` on a GPU; plainly elsewhere), then the
    /// update is queued behind a device gate ([`ops::step_gate`]: the clip coefficient, or
    /// no update when the loss or the norm is not finite) before the loss and the norm are
    /// read. Returns (loss, gradient norm).
    fn step_from_inputs(
        &mut self,
        task: &mut impl TrainTask,
        step: u64,
        inputs: &[Tensor],
        lr: f64,
    ) -> Result<(f64, f64)> {
        let epoch = step / self.steps_per_epoch;
        let params = self.opt.params();
        let layout = ops::signature_of(inputs);
        let mut graphed_now = None;
        let refs: Vec<&Tensor> = inputs.iter().collect();
        let task_ref = &*task;
        let results = self.graphs.call(&refs, |xs| {
            let (loss, extras) = task_ref.loss_from_inputs(xs)?;
            let grads = autograd::backward(&loss)?;
            // Nothing recorded outlives the step (nor, when recorded, the graph).
            autograd::clear_tape();
            let mut out = vec![loss];
            let n_extras = extras.len();
            out.extend(extras);
            let mut present = Vec::new();
            for (i, p) in params.iter().enumerate() {
                if let Some(g) = grads.get(p) {
                    present.push(i);
                    out.push(g.clone());
                }
            }
            graphed_now = Some(GraphedStep { extras: n_extras, params: present });
            Ok(out)
        })?;
        if let Some(graphed) = graphed_now {
            self.graphed_steps.insert(layout.clone(), graphed);
        }
        let graphed = self.graphed_steps.get(&layout).ok_or_else(|| {
            Error::msg(format!("step {}: a replayed training step whose gradients are not known", step + 1))
        })?;
        let present = &graphed.params;
        let (loss, rest) = results.split_first().ok_or_else(|| Error::msg("the training step gave no loss"))?;
        if rest.len() != graphed.extras + present.len() {
            bail!(
                "step {}: {} results for {} extra tensors and {} gradients",
                step + 1,
                rest.len(),
                graphed.extras,
                present.len()
            );
        }
        let (extras, grads) = rest.split_at(graphed.extras);
        task.keep_step_outputs(extras.to_vec())?;
        // The update is queued behind a gate the device makes from the loss and the
        // gradients' sum of squares (the clip coefficient, or no update at all when either
        // is not finite), before the host reads them: the device goes from the backward
        // pass to the update without waiting for the host.
        let grad_list: Vec<&Tensor> = grads.iter().collect();
        let squares = match grad_list.as_slice() {
            [] => Tensor::zeros(&[], DType::F32, loss.device())?,
            gs => ops::sum_squares_tensor(gs)?,
        };
        let loss32 = autograd::no_grad(|| ops::cast(loss, DType::F32))?;
        let gate = ops::step_gate(&squares, &loss32, self.settings.max_grad_norm)?;
        let items: Vec<(usize, &Tensor)> = present.iter().copied().zip(grads).collect();
        self.opt.update_params_gated(&items, lr as f32, &gate)?;
        let loss_total = loss32.item()? as f64;
        let grad_norm = (squares.item()? as f64).sqrt();
        if let Err(e) = self.check_finite(step, epoch, loss_total, grad_norm, "The weights were not updated") {
            // (The gate kept every tensor as it was; the counts go back with them.)
            self.opt.rewind_params(present);
            return Err(e);
        }
        self.opt.end_step();
        Ok((loss_total, grad_norm))
    }

    /// The step's single backward pass with each parameter updated as soon as its
    /// gradient is final ([`LoopSettings::optimizer_in_backward`]). Gradients are
    /// collected into groups (of [`STREAM_GROUP_BYTES`] at most), each group updated in one
    /// [`AdamW::update_params`] call and its sum of squares added on the device, so the
    /// gradient norm is read once, after the pass. Returns (loss, gradient norm).
    fn streamed_step(
        &mut self,
        task: &mut impl TrainTask,
        step: u64,
        batches: &[Vec<usize>],
        n_samples: usize,
        lr: f64,
    ) -> Result<(f64, f64)> {
        let [indices] = batches else {
            bail!("step {}: the optimizer inside the backward pass takes one micro-batch", step + 1);
        };
        let epoch = step / self.steps_per_epoch;
        let loss = task.micro_loss(step, 0, indices, n_samples)?;
        let params = self.opt.params();
        let model_bytes: usize = params.iter().map(|p| p.numel() * p.dtype().size()).sum();
        let group_limit = (model_bytes / 8).clamp(1, STREAM_GROUP_BYTES);
        let opt = &mut self.opt;
        let mut group: Vec<(usize, Tensor)> = Vec::new();
        let mut group_bytes = 0usize;
        let mut squares: Option<Tensor> = None;
        let mut flush = |group: &mut Vec<(usize, Tensor)>| -> Result<()> {
            if group.is_empty() {
                return Ok(());
            }
            let grads: Vec<&Tensor> = group.iter().map(|(_, g)| g).collect();
            let part = ops::sum_squares_tensor(&grads)?;
            squares = Some(match squares.take() {
                Some(acc) => ops::add(&acc, &part)?,
                None => part,
            });
            let items: Vec<(usize, &Tensor)> = group.iter().map(|(i, g)| (*i, g)).collect();
            opt.update_params(&items, lr as f32, 1.0)?;
            group.clear();
            Ok(())
        };
        autograd::backward_streaming(&loss, &params, &mut |index, g| {
            group_bytes += g.numel() * g.dtype().size();
            group.push((index, g));
            if group_bytes >= group_limit {
                group_bytes = 0;
                flush(&mut group)?;
            }
            Ok(())
        })?;
        flush(&mut group)?;
        self.opt.end_step();
        autograd::clear_tape();
        let loss_total = loss.item()? as f64;
        // No gradient at all (say, only the image projector trains and every image of the
        // batch was dropped): nothing was updated, as the step after the pass would do.
        let grad_norm = match squares {
            Some(s) => (s.item()? as f64).sqrt(),
            None => 0.0,
        };
        self.check_finite(
            step,
            epoch,
            loss_total,
            grad_norm,
            "The weights in memory were partly updated (the optimizer runs inside the backward pass)",
        )?;
        Ok((loss_total, grad_norm))
    }

    /// Stops the run on a non-finite loss or gradient norm; `weights` says what became of
    /// the weights.
    fn check_finite(&self, step: u64, epoch: u64, loss: f64, grad_norm: f64, weights: &str) -> Result<()> {
        if loss.is_finite() && grad_norm.is_finite() {
            return Ok(());
        }
        let kept = match &self.last_checkpoint {
            Some(p) => format!("the last good checkpoint is {}", p.display()),
            None => "no checkpoint was written yet".to_string(),
        };
        bail!(
            "training stopped at step {} (epoch {epoch}): the loss is {loss} and the gradient norm {grad_norm} — not \
             finite. {weights}; {kept}. Try a lower learning rate or gradient clipping.",
            step + 1
        );
    }

    /// The end of every step: the task's hook, the count, the step's figures.
    #[allow(clippy::too_many_arguments)]
    fn finish_step(
        &mut self,
        task: &mut impl TrainTask,
        t0: Instant,
        epoch: u64,
        loss: f64,
        grad_norm: f64,
        lr: f64,
        samples: usize,
    ) -> Result<StepStats> {
        task.after_step(&mut self.opt)?;
        self.step += 1;
        let secs = t0.elapsed().as_secs_f64();
        Ok(StepStats {
            step: self.step,
            epoch,
            loss,
            lr,
            grad_norm,
            samples,
            samples_per_s: samples as f64 / secs.max(1e-9),
        })
    }

    /// Runs the remaining steps with progress, metrics, checkpoints (`step-N` every
    /// `save_every`, `epoch-N` after each epoch, 0-based, and the final step),
    /// validation and the loss plot.
    pub fn run(&mut self, task: &mut (impl TrainTask + Send)) -> Result<TrainSummary> {
        let start = Instant::now();
        let mut progress = (!self.quiet).then(|| Progress::new(self.total_steps, self.step));
        let mut summary = TrainSummary {
            steps: self.step,
            first_loss: None,
            final_loss: None,
            checkpoints: Vec::new(),
            samples: Vec::new(),
            seconds: 0.0,
        };
        let mut losses = Vec::new();
        let mut samples_done = 0u64;
        while self.step < self.total_steps {
            let stats = match self.train_step(task) {
                Ok(s) => s,
                Err(e) => {
                    if let Some(p) = progress.as_mut() {
                        p.finish();
                    }
                    self.write_plot()?;
                    return Err(e);
                }
            };
            losses.push(stats.loss);
            samples_done += stats.samples as u64;
            if let Some(m) = self.metrics.as_mut() {
                let mut rec = MetricsRecord::new(stats.step, stats.epoch, stats.loss, stats.lr);
                rec.grad_norm = Some(stats.grad_norm);
                rec.samples_per_s = Some(stats.samples_per_s);
                rec.mem_bytes = task.device().memory_in_use();
                rec.extra = task.step_metrics();
                m.write(&rec)?;
            }
            if let Some(p) = progress.as_mut() {
                p.update(stats.step, Some(stats.loss), samples_done);
            }
            let epoch_end = stats.step % self.steps_per_epoch == 0;
            let last = stats.step == self.total_steps;
            let mut names = Vec::new();
            if self.settings.save_every.is_some_and(|n| stats.step % n == 0) || (last && !epoch_end) {
                names.push(format!("step-{}", stats.step));
            }
            if epoch_end {
                names.push(format!("epoch-{}", stats.epoch));
            }
            for name in names {
                let path = self.save_checkpoint(task, &name)?;
                if let Some(p) = progress.as_mut() {
                    p.message(&format!("saved {}", path.display()));
                }
                summary.checkpoints.push(path);
            }
            if let (true, Some(k)) = (epoch_end, self.settings.keep_epochs) {
                if let Some(old) = stats.epoch.checked_sub(k.max(1)) {
                    let path = self.settings.output.join(format!("epoch-{old}.safetensors"));
                    if path.is_file() {
                        std::fs::remove_file(&path).map_err(|e| {
                            Error::msg(format!("cannot remove the old checkpoint {}: {e}", path.display()))
                        })?;
                    }
                    summary.checkpoints.retain(|c| c != &path);
                }
            }
            if self.settings.validate_every.is_some_and(|n| stats.step % n == 0) || last {
                let grids = task.validate(self.step)?;
                if let Some(p) = progress.as_mut() {
                    for g in &grids {
                        p.message(&format!("samples: {}", g.display()));
                    }
                }
                summary.samples.extend(grids);
            }
        }
        if let Some(p) = progress.as_mut() {
            p.finish();
        }
        self.write_plot()?;
        summary.steps = self.step;
        summary.first_loss = losses.first().copied();
        if !losses.is_empty() {
            let tail = (losses.len() / 10).max(1);
            summary.final_loss = Some(losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64);
        }
        summary.seconds = start.elapsed().as_secs_f64();
        Ok(summary)
    }

    /// The loss curve `loss.png` from `metrics.jsonl` (when logging).
    fn write_plot(&self) -> Result<()> {
        let Some(m) = &self.metrics else { return Ok(()) };
        let records = read_metrics(m.path())?;
        let points = series(&records, "loss");
        if points.len() >= 2 {
            plot_loss(&points, self.settings.output.join("loss.png"), &self.settings.loss_title)?;
        }
        Ok(())
    }

    /// Writes `<name>.safetensors` (the task's weights) and then the resume state, each
    /// atomically; returns the checkpoint's path.
    pub fn save_checkpoint(&mut self, task: &impl TrainTask, name: &str) -> Result<PathBuf> {
        let path = self.settings.output.join(format!("{name}.safetensors"));
        task.save_weights(&path)?;
        self.last_checkpoint = Some(path.clone());
        self.save_resume_state(task)?;
        Ok(path)
    }

    /// The resume header: the loop's counters and settings, then the task's.
    fn resume_header(&self, task: &impl TrainTask) -> Value {
        let mut h = json!({
            "version": 1,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "dataset_len": self.dataset_len,
            "batch_size": self.settings.batch_size,
            "grad_accum": self.settings.grad_accum,
            "seed": self.settings.seed,
            "last_checkpoint": self.last_checkpoint.as_ref().map(|p| p.display().to_string()),
        });
        if let (Some(obj), Value::Object(extra)) = (h.as_object_mut(), task.resume_settings()) {
            obj.extend(extra);
        }
        h
    }

    fn save_resume_state(&self, task: &impl TrainTask) -> Result<()> {
        let mut tensors = self.opt.state_tensors()?;
        for (name, t) in &self.params {
            tensors.push((format!("{PARAM_PREFIX}{name}"), t.clone()));
        }
        let meta: HashMap<String, String> = [(RESUME_KEY.to_string(), self.resume_header(task).to_string())].into();
        weights::save(self.settings.output.join(RESUME_FILE), &tensors, SaveDType::F32, Some(&meta))
    }

    fn load_resume_state(&mut self, task: &impl TrainTask) -> Result<()> {
        let path = self.settings.output.join(RESUME_FILE);
        let ctx = || format!("resume state {}", path.display());
        let file = crate::weights::WeightFile::open(&path).with_ctx(ctx)?;
        let header: Value =
            file.metadata().get(RESUME_KEY).and_then(|s| serde_json::from_str(s).ok()).ok_or_else(|| {
                Error::msg(format!("{}: no {RESUME_KEY} header (not a synthos-engine resume state)", ctx()))
            })?;
        let now = self.resume_header(task);
        let mut keys: Vec<String> = ["steps_per_epoch", "dataset_len", "batch_size", "grad_accum", "seed"]
            .iter()
            .map(|k| k.to_string())
            .collect();
        if let Value::Object(extra) = task.resume_settings() {
            keys.extend(extra.keys().cloned());
        }
        let mut differs = Vec::new();
        for key in &keys {
            if header.get(key) != now.get(key) {
                differs.push(format!("{key}: saved {}, now {}", header.get(key).unwrap_or(&Value::Null), now[key]));
            }
        }
        if !differs.is_empty() {
            bail!("{}: the run was started with other settings — {}", ctx(), differs.join("; "));
        }
        let step =
            header.get("step").and_then(Value::as_u64).ok_or_else(|| Error::msg(format!("{}: no step", ctx())))?;
        let set = WeightSet::open(&path).with_ctx(ctx)?;
        let mut state = Vec::new();
        let mut values = HashMap::new();
        for name in set.names() {
            let shape = set.shape(name)?.to_vec();
            let t = Tensor::from_vec(set.read_f32(name)?, &shape, Device::Cpu)?;
            match name.strip_prefix(PARAM_PREFIX) {
                Some(p) => {
                    values.insert(p.to_string(), t);
                }
                None => state.push((name.to_string(), t)),
            }
        }
        for (name, t) in &self.params {
            let v = values.remove(name).ok_or_else(|| Error::msg(format!("{}: parameter {name} missing", ctx())))?;
            if v.shape() != t.shape() {
                bail!("{}: parameter {name} has shape {:?}, the model's is {:?}", ctx(), v.shape(), t.shape());
            }
            t.assign(&v)?;
        }
        if let Some(extra) = values.keys().next() {
            bail!("{}: parameter {extra} is not trainable in this run", ctx());
        }
        self.opt.load_state(&state).with_ctx(ctx)?;
        self.step = step;
        self.last_checkpoint = header.get("last_checkpoint").and_then(Value::as_str).map(PathBuf::from);
        if !self.quiet {
            eprintln!("resuming {} at step {step} of {}", self.settings.output.display(), self.total_steps);
        }
        Ok(())
    }
}
