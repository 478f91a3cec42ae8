//! SynthCLIP training (`synthos-engine clip-train`): the contrastive CLIP of
//! [`crate::models::clip`] on image–caption pairs, through the shared [`RunLoop`]
//! (checkpoints, resume, metrics, loss plot, progress, NaN stop) with SynthCLIP's recipe
//! as the default ([`ClipTrainConfig::synthclip`], docs/MODELS.md, *SynthCLIP*).
//!
//! **The contrastive batch and accumulation.** `batch_size` is the contrastive batch:
//! every caption is a negative for every other image in it. When it does not fit in
//! memory, `accum_steps` = k splits it into k chunks without changing the loss (as
//! OpenCLIP's `--accum-freq`): each step first embeds the whole batch without a tape,
//! then, chunk by chunk, re-embeds one chunk with the tape, puts its rows into the cached
//! features, and back-propagates the loss of the whole batch into that chunk. The
//! gradients add up to those of the unsplit batch. (`logit_scale` takes its gradient
//! from the first chunk only, so it too gets the unsplit gradient; OpenCLIP adds it k
//! times.)
//!
//! **Data.** Batches are decoded and augmented (RandomResizedCrop 0.5–1, ImageNet
//! normalization) on worker threads ahead of the model ([`crate::data::loader`]), in the
//! order the run loop will ask for them, deterministically for a seed; captions are
//! tokenized with the OpenAI CLIP BPE ([`crate::tokenizer::ClipTokenizer`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::config::LrSchedule;
use super::run_loop::{LoopSettings, RunLoop, StepStats, TrainSummary, TrainTask};
use crate::data::loader::{BatchPlan, Loader, LoaderOptions, MAX_PREFETCH, MAX_WORKERS};
use crate::data::{BadRowPolicy, CaptionDataset, CaptionOptions, ClipBatch, ClipBatches};
use crate::eval::{zero_shot_eval, ImageFolder, ZeroShotReport};
use crate::fsutil::write_atomic;
use crate::image::augment::ClipTransform;
use crate::models::clip::{weight_decay_applies, ClipConfig, ClipModel, LOGIT_SCALE_MAX};
use crate::nn::Module;
use crate::optim::AdamW;
use crate::tokenizer::{ClipTokenizer, Truncation};
use crate::{autograd, bail, ops, Device, Error, Result, Tensor};

/// Everything a CLIP training run is set up with.
#[derive(Clone, Debug)]
pub struct ClipTrainConfig {
    /// The pairs: a SynthCLIP `.tsv` (columns `image_path`, `caption`) or a folder with
    /// `metadata.csv`.
    pub data: PathBuf,
    /// Run folder.
    pub output: PathBuf,
    /// The contrastive batch (all of it is each caption's negatives).
    pub batch_size: usize,
    /// Chunks the batch is computed in (same loss and gradients; less memory).
    pub accum_steps: usize,
    /// Passes over the data.
    pub epochs: u64,
    /// Stop after this many optimizer steps.
    pub max_steps: Option<u64>,
    /// Peak learning rate (SynthCLIP 5e-4).
    pub lr: f64,
    /// First warm-up learning rate (1e-6).
    pub lr_start: f64,
    /// Floor of the cosine (1e-5).
    pub lr_end: f64,
    /// Warm-up steps; `None`: one epoch, as SynthCLIP.
    pub warmup_steps: Option<u64>,
    /// AdamW weight decay on the decayed tensors (0.5).
    pub weight_decay: f64,
    /// AdamW betas (0.9, 0.98).
    pub betas: (f32, f32),
    /// AdamW epsilon (1e-8).
    pub eps: f32,
    /// Seed of the data order and the augmentation.
    pub seed: u64,
    /// Write `step-N.safetensors` every N steps (`epoch-N` after each epoch).
    pub save_every: Option<u64>,
    /// Keep only the newest this many `epoch-N` checkpoints (`None`: all).
    pub keep_epochs: Option<u64>,
    /// Zero-shot validation every N steps (and at the end), when `val_folder` is set.
    pub validate_every: Option<u64>,
    /// Zero-shot validation set: a folder with one sub-folder of images per class.
    pub val_folder: Option<PathBuf>,
    /// Class names of the validation folder (default: the sub-folder names).
    pub val_classes: Option<Vec<String>>,
    /// Prompt templates of the validation classifier (`{}` is the class name).
    pub val_templates: Vec<String>,
    /// Write `metrics.jsonl` and `loss.png`.
    pub log_metrics: bool,
    /// Continue the run in `output`.
    pub resume: bool,
    /// Decoding threads (0: decode on the training thread).
    pub workers: usize,
    /// Unusable rows: skip with a count, or stop naming the file and line.
    pub bad_rows: BadRowPolicy,
    /// Caption truncation (OpenCLIP keeps the end token; SynthCLIP drops it).
    pub truncation: Truncation,
}

/// The CLIP demo's contrastive batch ([`ClipTrainConfig::demo`]).
pub const DEMO_BATCH_SIZE: usize = 64;

/// SynthCLIP's seven zero-shot templates.
pub const SYNTHCLIP_TEMPLATES: [&str; 7] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
];

impl ClipTrainConfig {
    /// SynthCLIP's recipe (SPEC §8) on `data` into `output`: batch 256 (of the paper's
    /// 4096 over 16 GPUs), 40 epochs, lr 5e-4 with a one-epoch warm-up from 1e-6 and a
    /// cosine to 1e-5, AdamW (0.9, 0.98), eps 1e-8, weight decay 0.5 under SLIP's rule.
    pub fn synthclip(data: impl Into<PathBuf>, output: impl Into<PathBuf>) -> ClipTrainConfig {
        ClipTrainConfig {
            data: data.into(),
            output: output.into(),
            batch_size: 256,
            accum_steps: 1,
            epochs: 40,
            max_steps: None,
            lr: 5e-4,
            lr_start: 1e-6,
            lr_end: 1e-5,
            warmup_steps: None,
            weight_decay: 0.5,
            betas: (0.9, 0.98),
            eps: 1e-8,
            seed: 0,
            save_every: None,
            keep_epochs: None,
            validate_every: None,
            val_folder: None,
            val_classes: None,
            val_templates: SYNTHCLIP_TEMPLATES.iter().map(|s| s.to_string()).collect(),
            log_metrics: true,
            resume: false,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()).min(8),
            bad_rows: BadRowPolicy::Skip,
            truncation: Truncation::KeepEnd,
        }
    }

    /// The built-in demo: the tiny CLIP on a [`crate::data::demo::ClipDemoSet`] (432
    /// generated shape images), batch 64, 150 epochs (900 steps, about a minute on two
    /// CPU cores), lr 2e-3 with a 20-step warm-up, weight decay 0.1, zero-shot on the
    /// held-out images at the end.
    pub fn demo(set: &crate::data::demo::ClipDemoSet, output: impl Into<PathBuf>) -> ClipTrainConfig {
        ClipTrainConfig {
            batch_size: DEMO_BATCH_SIZE,
            epochs: 150,
            lr: 2e-3,
            lr_start: 1e-5,
            lr_end: 1e-5,
            warmup_steps: Some(20),
            weight_decay: 0.1,
            seed: 0,
            keep_epochs: Some(1),
            val_folder: Some(set.val_dir.clone()),
            val_templates: set.templates.clone(),
            ..ClipTrainConfig::synthclip(&set.train_tsv, output)
        }
    }

    /// Checks the values; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size < 2 {
            bail!("--batch-size must be at least 2 (a contrastive batch needs negatives), got {}", self.batch_size);
        }
        if self.accum_steps == 0 || !self.batch_size.is_multiple_of(self.accum_steps) {
            bail!(
                "--accum-steps {} must divide --batch-size {} (the batch is split into equal chunks)",
                self.accum_steps,
                self.batch_size
            );
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            bail!("--epochs 0 needs --max-steps");
        }
        for (name, v) in [("--lr", self.lr), ("--lr-start", self.lr_start), ("--lr-end", self.lr_end)] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} must be a non-negative number, got {v}");
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("--weight-decay must be a non-negative number, got {}", self.weight_decay);
        }
        if self.keep_epochs == Some(0) {
            bail!("--keep-epochs must be at least 1 (the last epoch's checkpoint is the trained model)");
        }
        if self.save_every == Some(0) || self.validate_every == Some(0) {
            bail!("--save-every and --validate-every must be at least 1 step");
        }
        if self.workers > MAX_WORKERS {
            bail!("--workers {} is above {MAX_WORKERS}", self.workers);
        }
        if self.val_templates.iter().any(|t| !t.contains("{}")) {
            bail!("every zero-shot template needs a {{}} for the class name");
        }
        Ok(())
    }

    fn loop_settings(&self, steps_per_epoch: u64) -> LoopSettings {
        LoopSettings {
            output: self.output.clone(),
            batch_size: self.batch_size / self.accum_steps,
            grad_accum: self.accum_steps,
            drop_last: true,
            epochs: self.epochs,
            max_steps: self.max_steps,
            lr: self.lr,
            weight_decay: self.weight_decay,
            adam_betas: self.betas,
            adam_eps: self.eps,
            warmup_steps: self.warmup_steps.unwrap_or(steps_per_epoch),
            warmup_from: Some(self.lr_start),
            lr_end: self.lr_end,
            lr_schedule: LrSchedule::Cosine,
            max_grad_norm: None,
            // SynthCLIP accumulates micro-batches, which needs every gradient first.
            optimizer_in_backward: false,
            seed: self.seed,
            save_every: self.save_every,
            keep_epochs: self.keep_epochs,
            validate_every: self.validate_every,
            log_metrics: self.log_metrics,
            resume: self.resume,
            loss_title: "CLIP contrastive loss".into(),
        }
    }
}

/// The largest batch whose `clip_acc` is measured (its logits are copied to the host).
const ACCURACY_MAX_PAIRS: usize = 1024;

/// One micro-batch on the device: pixels and token ids.
struct Chunk {
    pixels: Tensor,
    ids: Vec<u32>,
    rows: usize,
}

/// The [`TrainTask`] of CLIP training.
struct ClipTask {
    model: Arc<ClipModel>,
    cfg: ClipTrainConfig,
    dataset: Arc<CaptionDataset>,
    tokenizer: Arc<ClipTokenizer>,
    loader: Option<Loader<ClipBatch>>,
    /// The current step's chunks, and (with accumulation) their features without a tape.
    chunks: Vec<Chunk>,
    cached: Vec<(Tensor, Tensor)>,
    /// Figures of the step for metrics.jsonl.
    metrics: Map<String, Value>,
    /// The step's image-text logits for `clip_acc`, read after its update is queued.
    accuracy_logits: Option<Tensor>,
    val: Option<(ImageFolder, Vec<String>)>,
    skipped_images: usize,
}

impl ClipTask {
    fn encode(&self, c: &Chunk) -> Result<(Tensor, Tensor)> {
        Ok((self.model.encode_image(&c.pixels)?, self.model.encode_text(&c.ids, c.rows)?))
    }

    /// Queues the logits for the top-1 accuracy of image → text matching over the step's
    /// whole batch (SLIP's `clip_acc`), from the cached or given features; skipped above
    /// 1024 pairs (the logits would make a large host copy). They are read after the
    /// step's update is queued ([`ClipTask::record_accuracy`]), so that the host does not
    /// wait for the forward pass before it issues the backward.
    fn queue_accuracy(&mut self, img: &Tensor, txt: &Tensor) -> Result<()> {
        if img.shape()[0] <= ACCURACY_MAX_PAIRS {
            self.accuracy_logits = Some(autograd::no_grad(|| ops::clip_logits(img, txt, self.model.logit_scale()))?);
        }
        Ok(())
    }

    /// Reads the logits [`ClipTask::queue_accuracy`] queued into the step's `clip_acc`.
    fn record_accuracy(&mut self) -> Result<()> {
        let Some(logits) = self.accuracy_logits.take() else { return Ok(()) };
        let n = logits.shape()[0];
        let logits = logits.to_vec()?;
        let hits = logits
            .chunks(n)
            .enumerate()
            .filter(|(i, row)| row.iter().enumerate().all(|(j, &v)| j == *i || v < row[*i]))
            .count();
        self.metrics.insert("clip_acc".into(), json!(100.0 * hits as f64 / n as f64));
        Ok(())
    }
}

impl TrainTask for ClipTask {
    fn dataset_len(&self) -> usize {
        self.dataset.len()
    }

    fn epoch_order(&self, epoch: u64, seed: u64) -> Vec<usize> {
        self.dataset.epoch_order(epoch, seed)
    }

    fn begin_step(&mut self, step: u64, batches: &[Vec<usize>]) -> Result<()> {
        let loader = self.loader.as_mut().ok_or_else(|| Error::msg("CLIP training: the data loader is not started"))?;
        self.chunks.clear();
        self.cached.clear();
        self.metrics.clear();
        self.accuracy_logits = None;
        for want in batches {
            let batch = loader
                .next()
                .ok_or_else(|| Error::msg(format!("CLIP training: the data loader ran out at step {}", step + 1)))??;
            if &batch.indices != want && batch.skipped.is_empty() {
                bail!("CLIP training: the loader's batch does not match step {} (internal error)", step + 1);
            }
            self.skipped_images += batch.skipped.len();
            if batch.is_empty() {
                continue;
            }
            let tokens = self.tokenizer.tokenize(&batch.captions, self.cfg.truncation);
            let pixels = batch.pixels_tensor()?.to_device(self.model.device(), self.model.dtype())?;
            self.chunks.push(Chunk { pixels, ids: tokens.ids, rows: batch.len() });
        }
        if self.chunks.iter().map(|c| c.rows).sum::<usize>() < 2 {
            bail!("CLIP training: step {} has fewer than 2 usable pairs", step + 1);
        }
        if self.chunks.len() > 1 {
            let cached = autograd::no_grad(|| self.chunks.iter().map(|c| self.encode(c)).collect::<Result<Vec<_>>>())?;
            let img: Vec<&Tensor> = cached.iter().map(|(i, _)| i).collect();
            let txt: Vec<&Tensor> = cached.iter().map(|(_, t)| t).collect();
            let (img, txt) = (ops::concat(&img, 0)?, ops::concat(&txt, 0)?);
            self.queue_accuracy(&img, &txt)?;
            self.cached = cached;
        }
        Ok(())
    }

    fn micro_loss(&mut self, step: u64, micro: usize, indices: &[usize], n_step: usize) -> Result<Tensor> {
        if self.chunks.len() <= 1 {
            // (Under the skip policy a micro-batch may have lost all its pairs: then the
            // whole step is one chunk, and only its first micro-batch carries the loss.)
            if micro > 0 {
                return Tensor::scalar(0.0, self.model.device()).map(|z| z.requires_grad());
            }
            let inputs = self.micro_inputs(step, micro, indices, n_step)?;
            let (loss, logits) = self.loss_from_inputs(&inputs)?;
            self.keep_step_outputs(logits)?;
            return Ok(loss);
        }
        let k = self.chunks.len();
        if micro >= k {
            return Tensor::scalar(0.0, self.model.device()).map(|z| z.requires_grad());
        }
        let (img_live, txt_live) = self.encode(&self.chunks[micro])?;
        let mut imgs = Vec::with_capacity(k);
        let mut txts = Vec::with_capacity(k);
        for (j, (i, t)) in self.cached.iter().enumerate() {
            if j == micro {
                imgs.push(img_live.clone());
                txts.push(txt_live.clone());
            } else {
                imgs.push(i.detach());
                txts.push(t.detach());
            }
        }
        let scale = if micro == 0 { self.model.logit_scale().clone() } else { self.model.logit_scale().detach() };
        let img = ops::concat(&imgs.iter().collect::<Vec<_>>(), 0)?;
        let txt = ops::concat(&txts.iter().collect::<Vec<_>>(), 0)?;
        let loss = ops::clip_loss(&img, &txt, &scale)?;
        // The value of each chunk's loss is 1/k of the batch's (so the loop's sum is the
        // batch loss); its gradient is the batch loss's gradient through this chunk.
        let constant = ops::scale(&loss.detach(), -(1.0 - 1.0 / k as f32))?;
        ops::add(&loss, &constant)
    }

    /// With the whole batch in one chunk (no accumulation): the pixels `[B, 3, S, S]` and
    /// the caption's two index tensors ([`crate::models::clip::TextIndices`]), so that the
    /// step can be recorded as a CUDA graph. With accumulation, none (the steps run plainly).
    fn micro_inputs(&mut self, _step: u64, micro: usize, _indices: &[usize], _n_step: usize) -> Result<Vec<Tensor>> {
        match self.chunks.as_slice() {
            [c] if micro == 0 => {
                let idx = self.model.text_indices(&c.ids, c.rows)?;
                let [tokens, pooled] = idx.tensors();
                Ok(vec![c.pixels.clone(), tokens.clone(), pooled.clone()])
            }
            [] => bail!("CLIP training: no data for this step"),
            _ => Ok(Vec::new()),
        }
    }

    /// The contrastive loss of the batch, and its logits for `clip_acc` (without the tape;
    /// none above 1024 pairs, as [`ClipTask::queue_accuracy`]).
    fn loss_from_inputs(&self, inputs: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        let [pixels, tokens, pooled] = inputs else {
            bail!("the CLIP loss takes 3 inputs (pixels, token indices, end-token indices), got {}", inputs.len());
        };
        let img = self.model.encode_image(pixels)?;
        let txt = self.model.encode_text_at(&self.model.text_indices_from(tokens, pooled)?)?;
        let scale = self.model.logit_scale();
        let logits = if img.shape()[0] <= ACCURACY_MAX_PAIRS {
            vec![autograd::no_grad(|| ops::clip_logits(&img.detach(), &txt.detach(), scale))?]
        } else {
            Vec::new()
        };
        Ok((ops::clip_loss(&img, &txt, scale)?, logits))
    }

    fn keep_step_outputs(&mut self, outputs: Vec<Tensor>) -> Result<()> {
        self.accuracy_logits = outputs.into_iter().next();
        Ok(())
    }

    fn save_weights(&self, path: &Path) -> Result<()> {
        self.model.save(path)
    }

    fn validate(&self, step: u64) -> Result<Vec<PathBuf>> {
        let Some((folder, classes)) = &self.val else { return Ok(Vec::new()) };
        let report = zero_shot_eval(
            &self.model,
            &self.tokenizer,
            folder,
            classes,
            &self.cfg.val_templates,
            self.cfg.truncation,
            64,
            self.cfg.workers,
        )?;
        let path = self.cfg.output.join(format!("zeroshot-step-{step}.json"));
        write_atomic(
            &path,
            serde_json::to_string_pretty(&report.to_json()).map_err(|e| Error::msg(e.to_string()))?.as_bytes(),
        )?;
        eprintln!("zero-shot at step {step}: {}", report.summary());
        Ok(vec![path])
    }

    fn resume_settings(&self) -> Value {
        json!({
            "task": "clip",
            "model": self.model.config().to_json(),
            "truncation": format!("{:?}", self.cfg.truncation),
            "data_len": self.dataset.len(),
        })
    }

    fn device(&self) -> Device {
        self.model.device()
    }

    fn decays(&self, name: &str, shape: &[usize]) -> bool {
        weight_decay_applies(name, shape)
    }

    fn after_step(&mut self, opt: &mut AdamW) -> Result<()> {
        self.record_accuracy()?;
        let name = format!("{}logit_scale", self.model.prefix());
        opt.clamp_param(&name, 0.0, LOGIT_SCALE_MAX)?;
        let s = self.model.logit_scale().item()?;
        self.metrics.insert("logit_scale".into(), json!((s as f64).exp()));
        Ok(())
    }

    fn step_metrics(&self) -> Map<String, Value> {
        self.metrics.clone()
    }
}

/// A CLIP training run: the model, its data and the run loop.
pub struct ClipTrainer {
    task: ClipTask,
    run: RunLoop,
}

/// What a finished CLIP run produced.
#[derive(Clone, Debug)]
pub struct ClipTrainSummary {
    /// The run loop's summary (steps, losses, checkpoints, seconds).
    pub run: TrainSummary,
    /// The last zero-shot validation, if a validation set was given.
    pub zero_shot: Option<ZeroShotReport>,
    /// Images skipped because they did not decode (skip policy).
    pub skipped_images: usize,
}

impl ClipTrainer {
    /// Opens the data, sets up the optimizer (SLIP's decay rule) and, with
    /// `cfg.resume`, restores the run in `cfg.output`. The model is trained in place.
    pub fn new(model: ClipModel, cfg: ClipTrainConfig) -> Result<ClipTrainer> {
        cfg.validate()?;
        let dataset =
            CaptionDataset::open(&cfg.data, &CaptionOptions { bad_rows: cfg.bad_rows, ..Default::default() })?;
        if let Some(report) = dataset.skip_report() {
            eprintln!("{report}");
        }
        if dataset.len() < 2 {
            bail!("{}: a contrastive run needs at least 2 pairs, found {}", cfg.data.display(), dataset.len());
        }
        let ctx = model.config().text.context_length;
        let tokenizer = ClipTokenizer::new()?.with_context_length(ctx)?;
        let val = match &cfg.val_folder {
            Some(dir) => {
                let folder = ImageFolder::open(dir)?;
                let classes = match &cfg.val_classes {
                    Some(c) => folder.check_class_names(c)?,
                    None => folder.class_names().to_vec(),
                };
                Some((folder, classes))
            }
            None => None,
        };
        model.set_trainable(true);
        let model = Arc::new(model);
        // Each epoch's last short step is dropped, as SynthCLIP drops its last batch.
        let steps_per_epoch = (dataset.len() / cfg.batch_size) as u64;
        if steps_per_epoch == 0 {
            bail!("{}: {} pairs do not fill one batch of {}", cfg.data.display(), dataset.len(), cfg.batch_size);
        }
        let settings = cfg.loop_settings(steps_per_epoch);
        let params = model.named_params();
        let task = ClipTask {
            model,
            cfg,
            dataset: Arc::new(dataset),
            tokenizer: Arc::new(tokenizer),
            loader: None,
            chunks: Vec::new(),
            cached: Vec::new(),
            metrics: Map::new(),
            accuracy_logits: None,
            val,
            skipped_images: 0,
        };
        let n = task.dataset.len();
        let mut run = RunLoop::with_decay(settings, params, n, &|name, shape| weight_decay_applies(name, shape))?;
        run.start(&task)?;
        let mut trainer = ClipTrainer { task, run };
        trainer.start_loader()?;
        Ok(trainer)
    }

    /// Plans every remaining micro-batch in the order the loop will ask for it and
    /// starts the workers.
    fn start_loader(&mut self) -> Result<()> {
        let steps = self.run.step_count()..self.run.total_steps();
        let accum = self.task.cfg.accum_steps;
        let mut plans = Vec::new();
        for step in steps {
            let epoch = step / self.run.steps_per_epoch();
            for m in 0..accum {
                if let Some(indices) = self.run.micro_batch(&self.task, step, m) {
                    plans.push(BatchPlan { epoch, position: plans.len(), indices });
                }
            }
        }
        let source = ClipBatches::new(
            self.task.dataset.clone(),
            ClipTransform::train(self.task.model.config().vision.image_size),
            self.task.cfg.seed,
        );
        let prefetch = accum.saturating_mul(2).clamp(4, MAX_PREFETCH);
        let opts = LoaderOptions { workers: self.task.cfg.workers, prefetch };
        self.task.loader = Some(Loader::new(Arc::new(source), plans, opts)?);
        Ok(())
    }

    /// Silences the progress bar and notes.
    pub fn set_quiet(&mut self, quiet: bool) {
        self.run.set_quiet(quiet);
    }

    /// The model being trained.
    pub fn model(&self) -> &ClipModel {
        &self.task.model
    }

    /// Steps done so far.
    pub fn step_count(&self) -> u64 {
        self.run.step_count()
    }

    /// Input layouts of the step recorded as CUDA graphs so far (`SYNTHOS_CUDA_GRAPHS=1`
    /// on a GPU, without accumulation).
    pub fn recorded_step_graphs(&self) -> usize {
        self.run.recorded_step_graphs()
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> u64 {
        self.run.total_steps()
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepStats> {
        self.run.train_step(&mut self.task)
    }

    /// Trains to the end: progress, metrics, checkpoints, validation and the loss plot.
    pub fn train(&mut self) -> Result<ClipTrainSummary> {
        let run = self.run.run(&mut self.task)?;
        let zero_shot = match run.samples.last() {
            Some(p) => ZeroShotReport::read(p).ok(),
            None => None,
        };
        Ok(ClipTrainSummary { run, zero_shot, skipped_images: self.task.skipped_images })
    }
}

/// The model a run would start from: `init` weights (our format, SLIP/SynthCLIP `.pt` or
/// safetensors, OpenCLIP safetensors) or a random one seeded with `seed`.
pub fn initial_model(cfg: &ClipConfig, init: Option<&Path>, seed: u64, device: Device) -> Result<ClipModel> {
    match init {
        Some(p) => ClipModel::load(cfg, p, device, device.default_dtype()),
        None => ClipModel::random(cfg, seed, device, device.default_dtype()),
    }
}
