//! What a training run does: every knob of `synthos-engine train`.

use std::path::PathBuf;

use crate::data::BadRowPolicy;
use crate::models::wan::Trainable;
use crate::{bail, Result};

/// How the learning rate moves after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LrSchedule {
    /// The base rate throughout (the seed's `ConstantLR`).
    Constant,
    /// Cosine decay from the base rate to 0 at the last step.
    Cosine,
}

/// What a checkpointed DiT block keeps from its first pass for the recompute to reuse
/// (selective checkpointing, [`crate::autograd::Keep`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckpointKeep {
    /// Nothing: the whole block is recomputed (least memory).
    #[default]
    None,
    /// The attention outputs: little memory, the attention forward is not recomputed.
    Attention,
    /// The outputs of every linear layer: most of the block's FLOPs are not recomputed.
    Linear,
    /// Both: only the norms, modulations, activations and RoPE are recomputed.
    All,
}

impl CheckpointKeep {
    /// The autograd policy.
    pub fn keep(self) -> crate::autograd::Keep {
        let (attention, linear) = match self {
            CheckpointKeep::None => (false, false),
            CheckpointKeep::Attention => (true, false),
            CheckpointKeep::Linear => (false, true),
            CheckpointKeep::All => (true, true),
        };
        crate::autograd::Keep { attention, linear }
    }
}

/// Where the frozen encoders' outputs are kept between epochs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Recompute umT5, CLIP and the VAE for every sample every epoch.
    Off,
    /// Keep them in host memory for the run.
    Memory,
    /// Keep them as safetensors files in this folder (reused by later runs on the same
    /// data, size and encoders).
    Disk(PathBuf),
}

/// A training run's settings. The two recipes are [`TrainConfig::synthos`] (the Synthos
/// full fine-tune, with published weights) and [`TrainConfig::demo`] (the built-in demo).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Dataset folder (`metadata.csv` + images); `None`: the procedurally generated demo set.
    pub data: Option<PathBuf>,
    /// Images generated for the demo set.
    pub demo_images: usize,
    /// Run folder: checkpoints, resume state, metrics, plots, samples.
    pub output: PathBuf,
    /// Training image width in pixels.
    pub width: usize,
    /// Training image height in pixels.
    pub height: usize,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled AdamW weight decay (all trainable tensors, as `torch.optim.AdamW`).
    pub weight_decay: f64,
    /// Linear warm-up steps from 0 to `lr`.
    pub warmup_steps: u64,
    /// Learning-rate shape after the warm-up.
    pub lr_schedule: LrSchedule,
    /// Passes over the data.
    pub epochs: u64,
    /// Stop after this many optimizer steps even if epochs remain.
    pub max_steps: Option<u64>,
    /// Sigma shift of the timestep schedule, in training and in validation sampling (5 in
    /// the Synthos recipe; the demo's own value is [`crate::pipeline::demo::SHIFT`]).
    pub shift: f64,
    /// Probability that a sample's prompt is replaced by the empty prompt.
    pub text_dropout: f64,
    /// Probability that a sample's reference image tokens are removed from the context.
    pub image_dropout: f64,
    /// Which DiT tensors train (and are saved).
    pub trainable: Trainable,
    /// Seed of the data order, noise, timesteps and dropout.
    pub seed: u64,
    /// Write `step-N.safetensors` every this many steps (epoch checkpoints are always written).
    pub save_every: Option<u64>,
    /// Keep only the newest this many `epoch-N` checkpoints (`None`: all).
    pub keep_epochs: Option<u64>,
    /// Sample the validation prompts and images every this many steps (and at the end).
    pub validate_every: Option<u64>,
    /// Validation prompts (text-only samples).
    pub validation_prompts: Vec<String>,
    /// Validation reference images (samples guided by each image).
    pub validation_images: Vec<PathBuf>,
    /// Euler steps of the validation samples.
    pub validation_steps: usize,
    /// Guidance scale of the validation samples.
    pub validation_cfg: f32,
    /// Negative prompt of the validation samples.
    pub negative_prompt: String,
    /// Encoder-output caching.
    pub cache: CacheMode,
    /// What to do with unusable dataset rows.
    pub bad_rows: BadRowPolicy,
    /// Decode every image before training (bad files are found up front, not mid-run).
    pub check_images: bool,
    /// Write `metrics.jsonl` and the loss plot (the seed's experiment-logging switch).
    pub log_metrics: bool,
    /// Recompute each DiT block in the backward pass instead of keeping its activations.
    pub activation_checkpointing: bool,
    /// With `activation_checkpointing`: checkpoint only the first N blocks (`None`: all).
    pub checkpoint_blocks: Option<usize>,
    /// With `activation_checkpointing`: what each checkpointed block keeps for its
    /// recompute to reuse.
    pub checkpoint_keep: CheckpointKeep,
    /// Clip the global gradient norm to this value (the seed does not clip).
    pub max_grad_norm: Option<f32>,
    /// Update each parameter inside the backward pass as soon as its gradient is final,
    /// so the gradients of the whole model are never held at once (same updates; see
    /// [`super::run_loop::LoopSettings::optimizer_in_backward`]), when the step allows it:
    /// with `grad_accum` 1 and no `max_grad_norm`. Otherwise (both need every gradient
    /// first) the update runs after the pass.
    pub optimizer_in_backward: bool,
    /// Continue the run in `output` from its resume state.
    pub resume: bool,
    /// At the end of a demo run, measure how well samples follow prompts and reference
    /// images ([`crate::pipeline::demo::quality`]); ignored with a dataset.
    pub demo_quality: bool,
}

impl TrainConfig {
    /// The built-in demo: the generated 64×64 set of 540 captioned shapes, batch 16,
    /// lr 1e-3 with 20 warm-up steps and cosine decay, 72 epochs (2448 steps, 9 minutes on 2 CPU
    /// cores), shift 1, validation at 20 steps
    /// and guidance 4 with an empty negative prompt.
    pub fn demo() -> Self {
        TrainConfig {
            data: None,
            demo_images: 540,
            output: PathBuf::from("runs/demo"),
            width: 64,
            height: 64,
            batch_size: 16,
            grad_accum: 1,
            lr: 1e-3,
            weight_decay: 0.01,
            warmup_steps: 20,
            lr_schedule: LrSchedule::Cosine,
            epochs: 72,
            max_steps: None,
            shift: crate::pipeline::demo::SHIFT,
            text_dropout: 0.1,
            image_dropout: 0.1,
            trainable: Trainable::All,
            seed: 42,
            save_every: None,
            keep_epochs: Some(1),
            validate_every: None,
            validation_prompts: Vec::new(),
            validation_images: Vec::new(),
            validation_steps: 20,
            validation_cfg: 4.0,
            negative_prompt: String::new(),
            cache: CacheMode::Memory,
            bad_rows: BadRowPolicy::Skip,
            check_images: false,
            log_metrics: true,
            activation_checkpointing: false,
            checkpoint_blocks: None,
            checkpoint_keep: CheckpointKeep::None,
            max_grad_norm: None,
            optimizer_in_backward: false,
            resume: false,
            demo_quality: true,
        }
    }

    /// The Synthos full fine-tune: every DiT tensor, 480×480, batch 1, lr 1e-5 constant,
    /// 10 epochs, weight decay 0.01, dropout 0.1/0.1, activation checkpointing, validation
    /// at 25 steps and guidance 5 with the default negative prompt; output `runs/synthos`;
    /// the optimizer runs inside the backward pass (the memory of one set of gradients
    /// saved).
    pub fn synthos() -> Self {
        TrainConfig {
            output: PathBuf::from("runs/synthos"),
            width: 480,
            height: 480,
            batch_size: 1,
            lr: 1e-5,
            warmup_steps: 0,
            lr_schedule: LrSchedule::Constant,
            epochs: 10,
            validation_steps: 25,
            validation_cfg: 5.0,
            negative_prompt: crate::pipeline::DEFAULT_NEGATIVE_PROMPT.to_string(),
            activation_checkpointing: true,
            checkpoint_blocks: None,
            checkpoint_keep: CheckpointKeep::None,
            shift: crate::schedule::SHIFT,
            keep_epochs: None,
            optimizer_in_backward: true,
            ..Self::demo()
        }
    }

    /// Checks the values that have to make sense together; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        let prob = |v: f64, name: &str| -> Result<()> {
            if !(0.0..=1.0).contains(&v) {
                bail!("{name} must be a probability in [0, 1], got {v}");
            }
            Ok(())
        };
        prob(self.text_dropout, "text dropout")?;
        prob(self.image_dropout, "image dropout")?;
        if self.batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        if self.checkpoint_blocks.is_some() && !self.activation_checkpointing {
            bail!("--checkpoint-blocks chooses which blocks activation checkpointing recomputes: turn it on with --activation-checkpointing on");
        }
        if self.checkpoint_keep != CheckpointKeep::None && !self.activation_checkpointing {
            bail!("--checkpoint-keep chooses what checkpointed blocks keep for their recompute: turn checkpointing on with --activation-checkpointing on");
        }
        if self.grad_accum == 0 {
            bail!("gradient accumulation must be at least 1 micro-batch");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("learning rate must be a positive number, got {}", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("weight decay must be a non-negative number, got {}", self.weight_decay);
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            bail!("epochs must be at least 1");
        }
        if self.max_steps == Some(0) {
            bail!("max steps must be at least 1");
        }
        if self.keep_epochs == Some(0) {
            bail!("keep epochs must be at least 1 (the last epoch's checkpoint is the trained model)");
        }
        if self.save_every == Some(0) || self.validate_every == Some(0) {
            bail!("checkpoint and validation intervals must be at least 1 step");
        }
        if self.validation_steps == 0 {
            bail!("validation sampling needs at least 1 step");
        }
        if self.data.is_none() && !(1..=crate::data::demo::MAX_DEMO_IMAGES).contains(&self.demo_images) {
            bail!("the demo set takes 1 to {} images, got {}", crate::data::demo::MAX_DEMO_IMAGES, self.demo_images);
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            bail!("the sigma shift must be a positive number, got {}", self.shift);
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                bail!("max grad norm must be a positive number, got {m}");
            }
        }
        Ok(())
    }

    /// The learning rate of optimizer step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        self.loop_settings().lr_at(step, total)
    }

    /// The settings of the shared run loop.
    pub fn loop_settings(&self) -> super::run_loop::LoopSettings {
        super::run_loop::LoopSettings {
            output: self.output.clone(),
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            drop_last: false,
            epochs: self.epochs,
            max_steps: self.max_steps,
            lr: self.lr,
            weight_decay: self.weight_decay,
            adam_betas: (0.9, 0.999),
            adam_eps: 1e-8,
            warmup_steps: self.warmup_steps,
            warmup_from: None,
            lr_end: 0.0,
            lr_schedule: self.lr_schedule,
            max_grad_norm: self.max_grad_norm,
            optimizer_in_backward: self.optimizer_in_backward && self.grad_accum == 1 && self.max_grad_norm.is_none(),
            seed: self.seed,
            save_every: self.save_every,
            keep_epochs: self.keep_epochs,
            validate_every: self.validate_every,
            log_metrics: self.log_metrics,
            resume: self.resume,
            loss_title: "training loss (weighted flow-matching MSE)".to_string(),
        }
    }
}
