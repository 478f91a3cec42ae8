//! `synthos-engine train`: fine-tunes the Synthos-I2I DiT (or trains the demo model).

use std::path::PathBuf;

use clap::Args;
use synthos_engine::data::BadRowPolicy;
use synthos_engine::models::wan::Trainable;
use synthos_engine::report::format_duration;
use synthos_engine::train::{CacheMode, CheckpointKeep, LrSchedule, TrainConfig, Trainer};
use synthos_engine::{bail, Result};

use crate::cli::model_args::ModelArgs;

/// Arguments of `train`. Unset values take the recipe's defaults: the Synthos full
/// fine-tune with weights (lr 1e-5, batch 1, 10 epochs, 480×480, constant lr), the demo
/// recipe without (lr 1e-3, batch 16, 72 epochs, 64×64, cosine, shift 1).
#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Dataset folder: metadata.csv (columns `video` — or `path`/`image` — and `prompt`)
    /// and the images it names. Without it, the demo set is generated in OUTPUT/demo-data.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Images in the generated demo set (demo only).
    #[arg(long, value_name = "N")]
    demo_images: Option<usize>,
    /// Run folder for checkpoints, resume state, metrics.jsonl, loss.png and samples/.
    /// Default: runs/demo for the demo, runs/synthos otherwise.
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Continue the run in OUTPUT from its last checkpoint (resume.safetensors).
    #[arg(long)]
    resume: bool,
    /// Samples per micro-batch (the seed's batch size per GPU).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Linear learning-rate warm-up steps.
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Learning rate after the warm-up: constant or cosine (to 0 at the end).
    #[arg(long, value_enum)]
    lr_schedule: Option<LrSchedule>,
    /// Passes over the data.
    #[arg(long)]
    epochs: Option<u64>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Probability of replacing a sample's prompt with the empty prompt (0.1).
    #[arg(long)]
    text_dropout: Option<f64>,
    /// Probability of removing a sample's reference-image tokens (0.1).
    #[arg(long)]
    image_dropout: Option<f64>,
    /// Sigma shift of the timestep schedule in training and validation sampling (5 with
    /// weights; the demo's own value without).
    #[arg(long)]
    shift: Option<f64>,
    /// What trains: all (the whole DiT) or img_emb (the 3.6 M-parameter image projector).
    #[arg(long, value_enum, default_value_t = Trainable::All)]
    trainable: Trainable,
    /// Seed of data order, noise, timesteps and dropout.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Training resolution WIDTHxHEIGHT (images are resized to cover it and center-cropped).
    #[arg(long, value_name = "WxH")]
    resolution: Option<String>,
    /// Write step-N.safetensors every N steps (epoch-N.safetensors is written after every epoch).
    #[arg(long, value_name = "N")]
    save_every: Option<u64>,
    /// Keep only the newest N epoch-N.safetensors (default: all with weights, the last
    /// one for the demo).
    #[arg(long, value_name = "N")]
    keep_epochs: Option<u64>,
    /// Sample the validation prompts/images every N steps (always at the end).
    #[arg(long, value_name = "N")]
    validate_every: Option<u64>,
    /// Validation prompts, separated by `|`.
    #[arg(long, value_name = "P1|P2|…")]
    validation_prompts: Option<String>,
    /// Validation reference images, separated by `,`.
    #[arg(long, value_name = "IMG1,IMG2,…")]
    validation_images: Option<String>,
    /// Euler steps of validation samples.
    #[arg(long)]
    validation_steps: Option<usize>,
    /// Guidance scale of validation samples.
    #[arg(long)]
    validation_cfg: Option<f32>,
    /// Negative prompt of validation samples (default: "ugly, deformed, blurry, low quality"; empty for the demo, whose
    /// vocabulary has none of its words).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Encoder-output cache: memory, disk (OUTPUT/cache or --cache-dir) or off.
    #[arg(long, value_enum, default_value_t = CacheArg::Memory)]
    cache: CacheArg,
    /// Folder of the disk cache (implies --cache disk).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Unusable dataset rows (missing/undecodable image, no prompt): skip (with a count) or stop.
    #[arg(long, value_enum, default_value_t = BadRowPolicy::Skip)]
    bad_rows: BadRowPolicy,
    /// Decode every image before training, to find bad files up front.
    #[arg(long)]
    check_images: bool,
    /// Do not write metrics.jsonl and loss.png (the seed's experiment-logging switch off).
    #[arg(long)]
    no_log: bool,
    /// Recompute DiT blocks in the backward pass (less memory); default on with weights.
    #[arg(long, value_enum)]
    activation_checkpointing: Option<Switch>,
    /// With activation checkpointing: recompute only the first N DiT blocks and keep the
    /// others' activations (less recompute time where memory allows; same gradients).
    #[arg(long, value_name = "N")]
    checkpoint_blocks: Option<usize>,
    /// With activation checkpointing: what each checkpointed block keeps from its forward
    /// pass so that the recompute skips it (selective checkpointing; same gradients, more
    /// memory, less recompute time).
    #[arg(long, value_enum, default_value_t = CheckpointKeep::None)]
    checkpoint_keep: CheckpointKeep,
    /// Skip the demo's closing quality measurement (colour match and shape IoU of 72
    /// samples against the rendered targets).
    #[arg(long)]
    no_quality: bool,
    /// Clip the global gradient norm to this value (off by default, as in the seed).
    #[arg(long)]
    max_grad_norm: Option<f32>,
    /// Update each weight inside the backward pass as soon as its gradient is final, so
    /// the whole model's gradients are never held at once (2.65 GiB less for Wan2.1-1.3B;
    /// the same updates). Default: on with model weights, off for the demo; --grad-accum
    /// above 1 and --max-grad-norm turn it off (both need every gradient first). On a
    /// non-finite loss the run stops either way; with this on, the weights in memory are
    /// then partly updated, the checkpoints on disk untouched.
    #[arg(long, value_enum)]
    optimizer_in_backward: Option<Switch>,
}

/// `--cache`: where encoder outputs are kept (the folder of `disk` is OUTPUT/cache unless
/// `--cache-dir` names one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CacheArg {
    /// In host memory for the run.
    Memory,
    /// As files, reused by later runs.
    Disk,
    /// Recomputed every epoch.
    Off,
}

/// An on/off flag value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

fn parse_resolution(s: &str) -> Result<(usize, usize)> {
    let parts: Vec<&str> = s.split(['x', 'X', '×']).collect();
    match parts.as_slice() {
        [w, h] => match (w.trim().parse(), h.trim().parse()) {
            (Ok(w), Ok(h)) => Ok((w, h)),
            _ => bail!("--resolution {s:?}: expected WIDTHxHEIGHT, e.g. 480x832"),
        },
        _ => bail!("--resolution {s:?}: expected WIDTHxHEIGHT, e.g. 480x832"),
    }
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let demo = self.model.is_demo();
        let base = if demo { TrainConfig::demo() } else { TrainConfig::synthos() };
        if demo && self.data.is_some() {
            bail!("--data needs model weights (--wan or --dit): the demo model trains on its own generated set");
        }
        let (width, height) = match &self.resolution {
            Some(r) => parse_resolution(r)?,
            None => (base.width, base.height),
        };
        let output = self.output.clone().unwrap_or(base.output.clone());
        let cache = match (self.cache, &self.cache_dir) {
            (_, Some(d)) => CacheMode::Disk(d.clone()),
            (CacheArg::Memory, None) => CacheMode::Memory,
            (CacheArg::Disk, None) => CacheMode::Disk(output.join("cache")),
            (CacheArg::Off, None) => CacheMode::Off,
        };
        let lr_schedule = self.lr_schedule.unwrap_or(base.lr_schedule);
        let activation_checkpointing =
            self.activation_checkpointing.map_or(base.activation_checkpointing, |s| s == Switch::On);
        let split = |s: &Option<String>, sep: char| -> Vec<String> {
            s.as_deref()
                .map(|v| v.split(sep).map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect())
                .unwrap_or_default()
        };
        let cfg = TrainConfig {
            data: self.data.clone(),
            demo_images: self.demo_images.unwrap_or(base.demo_images),
            output,
            width,
            height,
            batch_size: self.batch_size.unwrap_or(base.batch_size),
            grad_accum: self.grad_accum,
            lr: self.lr.unwrap_or(base.lr),
            weight_decay: self.weight_decay,
            warmup_steps: self.warmup_steps.unwrap_or(base.warmup_steps),
            lr_schedule,
            epochs: self.epochs.unwrap_or(base.epochs),
            max_steps: self.max_steps,
            shift: self.shift.unwrap_or(base.shift),
            text_dropout: self.text_dropout.unwrap_or(base.text_dropout),
            image_dropout: self.image_dropout.unwrap_or(base.image_dropout),
            trainable: self.trainable,
            seed: self.seed,
            save_every: self.save_every,
            keep_epochs: self.keep_epochs.or(base.keep_epochs),
            validate_every: self.validate_every,
            validation_prompts: split(&self.validation_prompts, '|'),
            validation_images: split(&self.validation_images, ',').into_iter().map(PathBuf::from).collect(),
            validation_steps: self.validation_steps.unwrap_or(base.validation_steps),
            validation_cfg: self.validation_cfg.unwrap_or(base.validation_cfg),
            negative_prompt: self.negative_prompt.clone().unwrap_or(base.negative_prompt.clone()),
            cache,
            bad_rows: self.bad_rows,
            check_images: self.check_images,
            log_metrics: !self.no_log,
            activation_checkpointing,
            checkpoint_blocks: self.checkpoint_blocks,
            checkpoint_keep: self.checkpoint_keep,
            max_grad_norm: self.max_grad_norm,
            optimizer_in_backward: self.optimizer_in_backward.map_or(base.optimizer_in_backward, |s| s == Switch::On),
            resume: self.resume,
            demo_quality: !self.no_quality,
        };
        if self.optimizer_in_backward == Some(Switch::On) && (self.grad_accum > 1 || self.max_grad_norm.is_some()) {
            bail!(
                "--optimizer-in-backward on updates each weight as soon as its gradient is final, which --grad-accum \
                 above 1 and --max-grad-norm rule out (both need every gradient first): leave one of them out"
            );
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// One line on what the run keeps in memory: activation checkpointing and where the
/// AdamW update runs.
fn memory_plan(cfg: &TrainConfig) -> String {
    let checkpointing = if !cfg.activation_checkpointing {
        "off (every activation kept)".to_string()
    } else {
        let blocks =
            cfg.checkpoint_blocks.map_or("every DiT block".to_string(), |n| format!("the first {n} DiT blocks"));
        let kept = match cfg.checkpoint_keep {
            CheckpointKeep::None => "",
            CheckpointKeep::Attention => "attention",
            CheckpointKeep::Linear => "linear-layer",
            CheckpointKeep::All => "attention and linear-layer",
        };
        if kept.is_empty() {
            blocks
        } else {
            format!("{blocks}, keeping their {kept} outputs for the recompute")
        }
    };
    let update = if cfg.loop_settings().optimizer_in_backward {
        "inside the backward pass (each gradient freed once used)"
    } else {
        "after the backward pass"
    };
    format!("activation checkpointing: {checkpointing}; AdamW update: {update}")
}

/// One line on what runs as CUDA graphs, when `SYNTHOS_CUDA_GRAPHS=1` on a GPU.
fn graphs_plan(cfg: &TrainConfig, device: synthos_engine::Device) -> Result<Option<String>> {
    if !device.is_cuda() || !synthos_engine::cuda::graph::graphs_enabled()? {
        return Ok(None);
    }
    let s = cfg.loop_settings();
    let step = if s.grad_accum == 1 && !s.optimizer_in_backward {
        "the loss and backward pass replayed from the second step of each batch layout (up to 4)"
    } else {
        "not used for the step (gradient accumulation or the update inside the backward pass)"
    };
    Ok(Some(format!("CUDA graphs: sampling replayed from each sample's second step; training: {step}")))
}

/// Runs `train`.
pub fn run(args: &TrainArgs) -> Result<()> {
    let cfg = args.config()?;
    let pipe = args.model.load(&args.model.paths())?;
    let output = cfg.output.clone();
    let memory = memory_plan(&cfg);
    let graphs = graphs_plan(&cfg, pipe.device())?;
    let mut trainer = Trainer::new(pipe, cfg)?;
    eprintln!(
        "training {} samples, {} steps ({} per epoch) into {}",
        trainer.dataset().len(),
        trainer.total_steps(),
        trainer.steps_per_epoch(),
        output.display()
    );
    eprintln!("{memory}");
    if let Some(line) = graphs {
        eprintln!("{line}");
    }
    let summary = trainer.run()?;
    if trainer.recorded_step_graphs() > 0 {
        eprintln!("CUDA graphs: {} batch layouts of the step were replayed", trainer.recorded_step_graphs());
    }
    let fmt = |v: Option<f64>| v.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into());
    println!(
        "done: {} steps in {}; loss {} (first step) → {} (last tenth)",
        summary.steps,
        format_duration(summary.seconds),
        fmt(summary.first_loss),
        fmt(summary.final_loss)
    );
    if let Some(c) = summary.checkpoints.last() {
        println!("last checkpoint: {}", c.display());
    }
    for s in &summary.samples {
        println!("samples: {}", s.display());
    }
    if let Some(q) = trainer.demo_quality() {
        println!("{}", q.line());
    }
    if output.join("loss.png").exists() {
        println!("loss curve: {}", output.join("loss.png").display());
    }
    Ok(())
}
