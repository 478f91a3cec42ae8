//! The training loop: data, encoders (cached), flow-matching steps with gradient
//! accumulation, AdamW with fp32 masters, checkpoints, resume, metrics and validation.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::cache::{Encoded, EncoderCache};
use super::config::{CacheMode, TrainConfig};
use super::loss::flow_matching_loss_sum;
use crate::data::{demo as demo_data, DatasetOptions, SynthosDataset};
use crate::fsutil::write_atomic;
use crate::image::resize::resize_cover_crop;
use crate::image::ImageRgb;
use crate::nn::{Module, NamedParam};
use crate::optim::{clip_coefficient, AdamW, AdamWConfig};
use crate::pipeline::{demo, GenerateOptions, SynthosPipeline};
use crate::report::{image_grid, plot_loss, read_metrics, series, MetricsRecord, MetricsWriter, Progress};
use crate::schedule::{TrainSchedule, SHIFT, TRAIN_STEPS};
use crate::weights::{self, SaveDType, WeightSet};
use crate::{autograd, bail, ops, Device, Error, Gradients, Result, ResultExt, Rng, Tensor};

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

/// What a finished [`Trainer::run`] produced.
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

/// Fine-tunes the DiT of a [`SynthosPipeline`].
///
/// ```no_run
/// use synthos_engine::pipeline::SynthosPipeline;
/// use synthos_engine::train::{TrainConfig, Trainer};
/// use synthos_engine::{DType, Device};
/// # fn main() -> synthos_engine::Result<()> {
/// let pipe = SynthosPipeline::demo(Device::Cpu, DType::F32, &[])?;
/// let cfg = TrainConfig { max_steps: Some(100), ..TrainConfig::demo() };
/// let mut trainer = Trainer::new(pipe, cfg)?;
/// let summary = trainer.run()?;
/// println!("loss {:?} → {:?}", summary.first_loss, summary.final_loss);
/// # Ok(()) }
/// ```
pub struct Trainer {
    pipe: SynthosPipeline,
    cfg: TrainConfig,
    data: SynthosDataset,
    schedule: TrainSchedule,
    opt: AdamW,
    params: Vec<NamedParam>,
    cache: EncoderCache,
    /// Text rows of the empty prompt (what a dropped prompt becomes).
    empty_text: Encoded,
    step: u64,
    steps_per_epoch: u64,
    total_steps: u64,
    metrics: Option<MetricsWriter>,
    last_checkpoint: Option<PathBuf>,
    /// Validation references: (file, CLIP input, grid thumbnail).
    references: Vec<(PathBuf, ImageRgb, ImageRgb)>,
    quiet: bool,
}

/// A generator for one sample slot of one step, independent of every other, so that a
/// resumed run draws exactly what an uninterrupted one would.
fn slot_rng(seed: u64, step: u64, micro: usize, slot: usize) -> Rng {
    let mut h = DefaultHasher::new();
    (seed, step, micro as u64, slot as u64, 0x7EA1_u64).hash(&mut h);
    Rng::new(h.finish())
}

/// Device memory in use: the GPU's (total − free), or the process's resident memory
/// (see [`Device::memory_in_use`]).
pub fn memory_in_use(device: Device) -> Option<u64> {
    device.memory_in_use()
}

impl Trainer {
    /// Prepares a run: opens (or, without `cfg.data`, generates) the dataset, marks the
    /// trainable tensors, builds the optimizer, and with `cfg.resume` restores the run in
    /// `cfg.output`. A fresh run refuses a folder that holds another run's resume state.
    pub fn new(mut pipe: SynthosPipeline, mut cfg: TrainConfig) -> Result<Trainer> {
        cfg.validate()?;
        pipe.check_size(cfg.width, cfg.height).ctx("training resolution")?;
        std::fs::create_dir_all(&cfg.output)
            .with_ctx(|| format!("cannot create the output folder {}", cfg.output.display()))?;
        let resume_path = cfg.output.join(RESUME_FILE);
        if cfg.resume && !resume_path.is_file() {
            bail!("--resume: {} has no {RESUME_FILE} to continue from", cfg.output.display());
        }
        if !cfg.resume && resume_path.is_file() {
            bail!(
                "{} already holds a run ({RESUME_FILE}); pass --resume to continue it, or choose another output folder",
                cfg.output.display()
            );
        }

        let data_dir = match &cfg.data {
            Some(d) => d.clone(),
            None => {
                let dir = cfg.output.join("demo-data");
                ensure_demo_data(&dir, cfg.demo_images, cfg.seed)?;
                if cfg.validation_prompts.is_empty() {
                    cfg.validation_prompts = demo::validation_prompts();
                }
                if cfg.validation_images.is_empty() {
                    cfg.validation_images = demo_references(&dir)?;
                }
                dir
            }
        };
        let opts = DatasetOptions { bad_rows: cfg.bad_rows, ..Default::default() };
        let mut data = SynthosDataset::open(&data_dir, &opts)?;
        if cfg.check_images {
            data.check_all()?;
        }
        if let Some(report) = data.skip_report() {
            eprintln!("{report}");
        }

        pipe.dit.set_checkpointing(cfg.activation_checkpointing);
        let params = pipe.dit.trainable(cfg.trainable);
        if params.is_empty() {
            bail!("the trainable set {:?} selects no parameters", cfg.trainable);
        }
        let mut opt = AdamW::new(AdamWConfig { weight_decay: cfg.weight_decay as f32, ..Default::default() });
        for (name, t) in &params {
            opt.add_param(name, t, true)?;
        }

        let micro = data.len().div_ceil(cfg.batch_size) as u64;
        let steps_per_epoch = micro.div_ceil(cfg.grad_accum as u64);
        let by_epochs = steps_per_epoch * cfg.epochs;
        let total_steps = match cfg.max_steps {
            Some(m) if cfg.epochs == 0 => m,
            Some(m) => m.min(by_epochs),
            None => by_epochs,
        };

        let dcfg = pipe.dit.config().clone();
        let f = pipe.codec.factor();
        let latent_shape = [dcfg.in_channels, 1, cfg.height / f, cfg.width / f];
        let clip_tokens = match &pipe.clip {
            Some(c) => c.config().tokens(),
            None => {
                bail!("training needs the CLIP image encoder (the reference image is the target itself): pass --clip")
            }
        };
        let clip_shape = [clip_tokens, dcfg.clip_dim];
        let (memory, disk) = match &cfg.cache {
            CacheMode::Off => (false, None),
            CacheMode::Memory => (true, None),
            CacheMode::Disk(d) => (false, Some(d.clone())),
        };
        let tag = encoder_fingerprint(&pipe, cfg.width, cfg.height)?;
        let cache = EncoderCache::new(memory, disk, tag, latent_shape, dcfg.text_dim, clip_shape)?;
        let empty_text = {
            let rows = pipe.encode_prompts(&[""])?;
            let len = pipe.text.tokenizer.encode(&[""])?.lengths[0];
            let text = ops::narrow(&rows, 1, 0, len)?.to_vec()?;
            Encoded { latent: Vec::new(), text, text_len: len, clip: Vec::new() }
        };

        let mut references = Vec::new();
        for p in &cfg.validation_images {
            let img = ImageRgb::open(p).with_ctx(|| format!("validation image {}", p.display()))?;
            let thumb = resize_cover_crop(&img, cfg.width, cfg.height)?;
            references.push((p.clone(), img, thumb));
        }

        let mut trainer = Trainer {
            pipe,
            cfg,
            data,
            schedule: TrainSchedule::new(SHIFT),
            opt,
            params,
            cache,
            empty_text,
            step: 0,
            steps_per_epoch,
            total_steps,
            metrics: None,
            last_checkpoint: None,
            references,
            quiet: false,
        };
        if trainer.cfg.resume {
            trainer.load_resume_state()?;
        }
        if trainer.cfg.log_metrics {
            let path = trainer.cfg.output.join("metrics.jsonl");
            trainer.metrics = Some(MetricsWriter::resume(path, trainer.step)?);
        }
        Ok(trainer)
    }

    /// Silences the progress bar and notes (tests, library use).
    pub fn set_quiet(&mut self, quiet: bool) {
        self.quiet = quiet;
    }

    /// Optimizer steps done.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Optimizer steps the run makes in all.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// The pipeline being trained.
    pub fn pipeline(&self) -> &SynthosPipeline {
        &self.pipe
    }

    /// The dataset.
    pub fn dataset(&self) -> &SynthosDataset {
        &self.data
    }

    /// Samples served by the encoder cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.cache.hits()
    }

    /// The trainable parameters by name.
    pub fn params(&self) -> &[NamedParam] {
        &self.params
    }

    /// The dataset indices of micro-batch `micro` of optimizer step `step` (0-based), or
    /// `None` past the epoch's end. Each epoch visits a fresh seeded permutation in
    /// micro-batches of `batch_size` (the last may be smaller); an optimizer step takes
    /// `grad_accum` of them (the epoch's last step may take fewer).
    pub fn micro_batch(&self, step: u64, micro: usize) -> Option<Vec<usize>> {
        let epoch = step / self.steps_per_epoch;
        let within = step % self.steps_per_epoch;
        let b = self.cfg.batch_size;
        let start = ((within as usize) * self.cfg.grad_accum + micro) * b;
        let len = self.data.len();
        if start >= len {
            return None;
        }
        let order = self.data.epoch_order(epoch, self.cfg.seed);
        Some(order[start..(start + b).min(len)].to_vec())
    }

    /// The encoder outputs of dataset sample `index` (cached per the configuration).
    fn encoded(&mut self, index: usize) -> Result<Encoded> {
        let entry = self.data.entries()[index].clone();
        let (w, h) = (self.cfg.width, self.cfg.height);
        let pipe = &self.pipe;
        let data = &self.data;
        self.cache.get_or_encode(index, &entry.path, &entry.prompt, || {
            let sample = data.get(index, w, h)?;
            let img = Tensor::from_vec(sample.image.clone(), &[1, 3, h, w], Device::Cpu)?;
            let latent = pipe.encode_images(&img)?.to_vec()?;
            let len = pipe.text.tokenizer.encode(&[&sample.prompt])?.lengths[0];
            let rows = pipe.encode_prompts(&[&sample.prompt])?;
            let text = ops::narrow(&rows, 1, 0, len)?.to_vec()?;
            let rgb = ImageRgb::from_chw(&sample.image, h, w)?;
            let clip = pipe.encode_reference(&rgb, w, h)?.to_vec()?;
            Ok(Encoded { latent, text, text_len: len, clip })
        })
    }

    /// Runs one optimizer step (all its micro-batches). A non-finite loss or gradient is
    /// an error and leaves the weights untouched.
    pub fn train_step(&mut self) -> Result<StepStats> {
        if self.step >= self.total_steps {
            bail!("the run is complete ({} steps)", self.total_steps);
        }
        let t0 = Instant::now();
        let step = self.step;
        let epoch = step / self.steps_per_epoch;
        let batches: Vec<Vec<usize>> = (0..self.cfg.grad_accum).map_while(|m| self.micro_batch(step, m)).collect();
        let n_samples: usize = batches.iter().map(Vec::len).sum();
        let mut grads: Option<Gradients> = None;
        let mut losses = Vec::with_capacity(batches.len());
        for (m, indices) in batches.iter().enumerate() {
            let loss = self.micro_loss(step, m, indices, n_samples)?;
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
        if !loss_total.is_finite() || !grad_norm.is_finite() {
            let kept = match &self.last_checkpoint {
                Some(p) => format!("the last good checkpoint is {}", p.display()),
                None => "no checkpoint was written yet".to_string(),
            };
            bail!(
                "training stopped at step {} (epoch {epoch}): the loss is {loss_total} and the gradient norm {grad_norm} — \
                 not finite. The weights were not updated; {kept}. Try a lower learning rate or gradient clipping.",
                step + 1
            );
        }
        let lr = self.cfg.lr_at(step, self.total_steps);
        let scale = self.cfg.max_grad_norm.map_or(1.0, |m| clip_coefficient(grad_norm as f32, m));
        self.opt.step(&grads, lr as f32, scale)?;
        self.step += 1;
        let secs = t0.elapsed().as_secs_f64();
        Ok(StepStats {
            step: self.step,
            epoch,
            loss: loss_total,
            lr,
            grad_norm,
            samples: n_samples,
            samples_per_s: n_samples as f64 / secs.max(1e-9),
        })
    }

    /// The loss of one micro-batch, scaled by 1/`n_step` (the samples of the whole step)
    /// so that accumulated gradients are those of the step's mean loss.
    fn micro_loss(&mut self, step: u64, micro: usize, indices: &[usize], n_step: usize) -> Result<Tensor> {
        let dev = self.pipe.device();
        let dcfg = self.pipe.dit.config().clone();
        let f = self.pipe.codec.factor();
        let (c, h, w) = (dcfg.in_channels, self.cfg.height / f, self.cfg.width / f);
        let (l, d) = (dcfg.text_len, dcfg.text_dim);
        // Per group (with / without the image): x0, noise, timestep indices, text, clip.
        #[derive(Default)]
        struct Group {
            x0: Vec<f32>,
            noise: Vec<f32>,
            idx: Vec<usize>,
            text: Vec<f32>,
            clip: Vec<f32>,
        }
        let mut groups: [Group; 2] = Default::default();
        for (slot, &index) in indices.iter().enumerate() {
            let enc = self.encoded(index)?;
            let mut rng = slot_rng(self.cfg.seed, step, micro, slot);
            let drop_text = rng.uniform() < self.cfg.text_dropout;
            let drop_image = rng.uniform() < self.cfg.image_dropout;
            let t_index = rng.below(TRAIN_STEPS);
            let noise = rng.normal_vec(c * h * w, 1.0);
            let g = &mut groups[usize::from(drop_image)];
            g.x0.extend_from_slice(&enc.latent);
            g.noise.extend(noise);
            g.idx.push(t_index);
            let (rows, len) =
                if drop_text { (&self.empty_text.text, self.empty_text.text_len) } else { (&enc.text, enc.text_len) };
            let len = len.min(l);
            g.text.extend_from_slice(&rows[..len * d]);
            g.text.extend(std::iter::repeat_n(0.0, (l - len) * d));
            if !drop_image {
                g.clip.extend_from_slice(&enc.clip);
            }
        }
        let mut total: Option<Tensor> = None;
        for (dropped, g) in groups.into_iter().enumerate() {
            let b = g.idx.len();
            if b == 0 {
                continue;
            }
            let x0 = Tensor::from_vec(g.x0, &[b, c, 1, h, w], dev)?;
            let noise = Tensor::from_vec(g.noise, &[b, c, 1, h, w], dev)?;
            let text = Tensor::from_vec(g.text, &[b, l, d], dev)?;
            let clip = if dropped == 0 {
                let n = g.clip.len() / (b * dcfg.clip_dim);
                Some(Tensor::from_vec(g.clip, &[b, n, dcfg.clip_dim], dev)?)
            } else {
                None
            };
            let s = flow_matching_loss_sum(&self.pipe.dit, &self.schedule, &x0, &noise, &g.idx, &text, clip.as_ref())?;
            total = Some(match total {
                Some(t) => ops::add(&t, &s)?,
                None => s,
            });
        }
        let total = total.ok_or_else(|| Error::msg("empty micro-batch"))?;
        ops::scale(&total, 1.0 / n_step as f32)
    }

    /// Runs the remaining steps with progress, metrics, checkpoints (`step-N` every
    /// `save_every`, `epoch-N` after each epoch, 0-based as the seed names them, and the
    /// final step), validation grids and the loss plot.
    pub fn run(&mut self) -> Result<TrainSummary> {
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
            let stats = match self.train_step() {
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
                rec.mem_bytes = memory_in_use(self.pipe.device());
                m.write(&rec)?;
            }
            if let Some(p) = progress.as_mut() {
                p.update(stats.step, Some(stats.loss), samples_done);
            }
            let epoch_end = stats.step % self.steps_per_epoch == 0;
            let last = stats.step == self.total_steps;
            let mut names = Vec::new();
            if self.cfg.save_every.is_some_and(|n| stats.step % n == 0) || (last && !epoch_end) {
                names.push(format!("step-{}", stats.step));
            }
            if epoch_end {
                names.push(format!("epoch-{}", stats.epoch));
            }
            for name in names {
                let path = self.save_checkpoint(&name)?;
                if let Some(p) = progress.as_mut() {
                    p.message(&format!("saved {}", path.display()));
                }
                summary.checkpoints.push(path);
            }
            if self.cfg.validate_every.is_some_and(|n| stats.step % n == 0) || last {
                let grids = self.validate()?;
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
            plot_loss(&points, self.cfg.output.join("loss.png"), "training loss (weighted flow-matching MSE)")?;
        }
        Ok(())
    }

    /// Writes `<name>.safetensors` (the trainable tensors in the Synthos naming, bf16) and
    /// then the resume state, each atomically; returns the checkpoint's path.
    pub fn save_checkpoint(&mut self, name: &str) -> Result<PathBuf> {
        let path = self.cfg.output.join(format!("{name}.safetensors"));
        self.pipe.dit.save(&path, self.cfg.trainable)?;
        self.last_checkpoint = Some(path.clone());
        self.save_resume_state()?;
        Ok(path)
    }

    fn resume_header(&self) -> Value {
        json!({
            "version": 1,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "dataset_len": self.data.len(),
            "batch_size": self.cfg.batch_size,
            "grad_accum": self.cfg.grad_accum,
            "seed": self.cfg.seed,
            "trainable": format!("{:?}", self.cfg.trainable),
            "width": self.cfg.width,
            "height": self.cfg.height,
            "last_checkpoint": self.last_checkpoint.as_ref().map(|p| p.display().to_string()),
        })
    }

    fn save_resume_state(&self) -> Result<()> {
        let mut tensors = self.opt.state_tensors()?;
        for (name, t) in &self.params {
            tensors.push((format!("{PARAM_PREFIX}{name}"), t.clone()));
        }
        let meta: HashMap<String, String> = [(RESUME_KEY.to_string(), self.resume_header().to_string())].into();
        weights::save(self.cfg.output.join(RESUME_FILE), &tensors, SaveDType::F32, Some(&meta))
    }

    fn load_resume_state(&mut self) -> Result<()> {
        let path = self.cfg.output.join(RESUME_FILE);
        let ctx = || format!("resume state {}", path.display());
        let file = crate::weights::WeightFile::open(&path).with_ctx(ctx)?;
        let header: Value =
            file.metadata().get(RESUME_KEY).and_then(|s| serde_json::from_str(s).ok()).ok_or_else(|| {
                Error::msg(format!("{}: no {RESUME_KEY} header (not a synthos-engine resume state)", ctx()))
            })?;
        let now = self.resume_header();
        let mut differs = Vec::new();
        for key in
            ["steps_per_epoch", "dataset_len", "batch_size", "grad_accum", "seed", "trainable", "width", "height"]
        {
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
            eprintln!("resuming {} at step {step} of {}", self.cfg.output.display(), self.total_steps);
        }
        Ok(())
    }

    /// Samples the validation prompts (text only) and references (image only, and with
    /// the matching prompt) with the current weights; writes `samples/step-N-text.png`
    /// and `samples/step-N-reference.png`. Returns the grids written.
    pub fn validate(&self) -> Result<Vec<PathBuf>> {
        let dir = self.cfg.output.join("samples");
        std::fs::create_dir_all(&dir).with_ctx(|| format!("cannot create {}", dir.display()))?;
        let opts = GenerateOptions {
            height: self.cfg.height,
            width: self.cfg.width,
            steps: self.cfg.validation_steps,
            cfg_scale: self.cfg.validation_cfg,
            seed: self.cfg.seed,
            negative_prompt: self.cfg.negative_prompt.clone(),
            ..Default::default()
        };
        let mut written = Vec::new();
        let prompts: Vec<&str> = self.cfg.validation_prompts.iter().map(String::as_str).collect();
        if !prompts.is_empty() {
            let images = self.pipe.generate_batch(&prompts, &opts, None, &mut |_, _| {})?;
            let labels: Vec<String> = prompts.iter().map(|p| p.to_string()).collect();
            let path = dir.join(format!("step-{:06}-text.png", self.step));
            image_grid(&images, images.len().min(4), Some(&labels), &path)?;
            written.push(path);
        }
        if !self.references.is_empty() {
            let mut cells = Vec::new();
            let mut labels = Vec::new();
            for (i, (file, img, thumb)) in self.references.iter().enumerate() {
                cells.push(thumb.clone());
                labels.push(format!("reference {}", file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
                let alone = self.pipe.generate_batch(&[""], &opts, Some(img), &mut |_, _| {})?;
                cells.extend(alone);
                labels.push("image only".to_string());
                if let Some(p) = prompts.get(i % prompts.len().max(1)) {
                    let both = self.pipe.generate_batch(&[p], &opts, Some(img), &mut |_, _| {})?;
                    cells.extend(both);
                    labels.push(format!("+ {p}"));
                }
            }
            let cols = if prompts.is_empty() { 2 } else { 3 };
            let path = dir.join(format!("step-{:06}-reference.png", self.step));
            image_grid(&cells, cols, Some(&labels), &path)?;
            written.push(path);
        }
        Ok(written)
    }
}

/// A hash of what makes encoder outputs valid: the pipeline's configurations, every
/// small encoder tensor's values, and the training size.
fn encoder_fingerprint(pipe: &SynthosPipeline, width: usize, height: usize) -> Result<u64> {
    let mut h = DefaultHasher::new();
    (width, height, pipe.is_demo()).hash(&mut h);
    format!("{:?}", pipe.text.model.config()).hash(&mut h);
    if let Some(c) = &pipe.clip {
        format!("{:?}", c.config()).hash(&mut h);
    }
    let mut params = pipe.text.model.named_params();
    if let Some(c) = &pipe.clip {
        params.extend(c.named_params());
    }
    if let crate::pipeline::Codec::Vae { vae, .. } = &pipe.codec {
        params.extend(vae.named_params());
    }
    for (name, t) in params {
        name.hash(&mut h);
        t.shape().hash(&mut h);
        if t.numel() <= 4096 {
            for v in t.to_vec()? {
                v.to_bits().hash(&mut h);
            }
        }
    }
    Ok(h.finish())
}

/// Generates the demo set in `dir` unless it already holds `n` images for this seed.
fn ensure_demo_data(dir: &Path, n: usize, seed: u64) -> Result<()> {
    let stamp = dir.join("demo.json");
    let want = json!({"images": n, "size": demo::IMAGE_SIZE, "seed": seed}).to_string();
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    demo_data::generate(dir, n, demo::IMAGE_SIZE, seed)?;
    write_atomic(&stamp, want.as_bytes())
}

/// Renders the demo's validation references (attribute sets also drawn in training, so
/// the grid shows whether the model follows an image it knows) into `dir/validation`.
fn demo_references(dir: &Path) -> Result<Vec<PathBuf>> {
    use crate::data::demo::{Colour, DemoAttrs, Shape, ShapeSize, Texture};
    let out = dir.join("validation");
    std::fs::create_dir_all(&out).with_ctx(|| format!("cannot create {}", out.display()))?;
    let picks = [
        DemoAttrs {
            shape: Shape::Triangle,
            colour: Colour::Yellow,
            background: Colour::Blue,
            size: ShapeSize::Large,
            texture: Texture::Plain,
        },
        DemoAttrs {
            shape: Shape::Square,
            colour: Colour::Red,
            background: Colour::White,
            size: ShapeSize::Large,
            texture: Texture::Stripes,
        },
        DemoAttrs {
            shape: Shape::Circle,
            colour: Colour::Purple,
            background: Colour::Green,
            size: ShapeSize::Small,
            texture: Texture::Plain,
        },
    ];
    let mut paths = Vec::new();
    for (i, a) in picks.iter().enumerate() {
        let p = out.join(format!("reference-{i}.png"));
        demo_data::render(a, demo::IMAGE_SIZE)?.save_png(&p)?;
        paths.push(p);
    }
    Ok(paths)
}
