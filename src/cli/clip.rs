//! `synthos-engine clip-train` and `clip-eval`: SynthCLIP's contrastive CLIP training and
//! its zero-shot / retrieval evaluation.

use std::path::PathBuf;

use clap::Args;
use synthos_engine::data::demo::{generate_clip_demo, CLIP_DEMO_IMAGE_SIZE};
use synthos_engine::data::{BadRowPolicy, CaptionDataset, CaptionOptions};
use synthos_engine::eval::{read_lines, retrieval_eval, zero_shot_eval, ImageFolder};
use synthos_engine::fsutil::write_atomic;
use synthos_engine::models::clip::ClipConfig;
use synthos_engine::report::format_duration;
use synthos_engine::tokenizer::{ClipTokenizer, Truncation};
use synthos_engine::train::clip::{initial_model, ClipTrainConfig, ClipTrainer, SYNTHCLIP_TEMPLATES};
use synthos_engine::{bail, Device, Result};

/// `--truncation`: how captions longer than the context are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TruncationArg {
    /// OpenCLIP: keep the end token in the last position.
    KeepEnd,
    /// SynthCLIP/SLIP: cut without the end token (long captions pool at the start token);
    /// for exact evaluation of SynthCLIP checkpoints.
    DropEnd,
}

impl TruncationArg {
    fn get(self) -> Truncation {
        match self {
            TruncationArg::KeepEnd => Truncation::KeepEnd,
            TruncationArg::DropEnd => Truncation::DropEnd,
        }
    }
}

/// The model a CLIP command builds.
#[derive(Args, Clone)]
pub struct ClipModelArgs {
    /// Architecture: a preset (synthclip-vit-b16, openclip-vit-b16, tiny) or a JSON config
    /// file. Default: synthclip-vit-b16 with --data, the demo's small CLIP without.
    #[arg(long, value_name = "PRESET|FILE")]
    model: Option<String>,
    /// Weights: our checkpoints, SynthCLIP/SLIP checkpoints (the released PyTorch `.pt`
    /// files, read directly, or safetensors in their naming, `visual.blocks.*`), or
    /// OpenCLIP ViT-B-16 safetensors with `--model openclip-vit-b16`.
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Device: auto (a GPU if usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Caption truncation beyond the context length.
    #[arg(long, value_enum, default_value_t = TruncationArg::KeepEnd)]
    truncation: TruncationArg,
}

impl ClipModelArgs {
    fn config(&self, demo: bool) -> Result<ClipConfig> {
        match self.model.as_deref() {
            None if demo => Ok(ClipConfig::tiny()),
            None => Ok(ClipConfig::synthclip_vit_b16()),
            Some(p) if p.ends_with(".json") => ClipConfig::from_json_file(p),
            Some(p) => ClipConfig::preset(p),
        }
    }

    fn device(&self) -> Result<Device> {
        match self.device.as_str() {
            "auto" => Ok(Device::best_available()),
            d => Device::parse(d),
        }
    }
}

/// Arguments of `clip-train`. Unset values take SynthCLIP's recipe (with --data) or the
/// demo's (without).
#[derive(Args)]
pub struct ClipTrainArgs {
    #[command(flatten)]
    model: ClipModelArgs,
    /// Image–caption pairs: a SynthCLIP .tsv (columns image_path, caption; paths relative
    /// to the file) or a folder holding metadata.csv. Without it: the built-in demo (a
    /// small CLIP on generated shapes, zero-shot on attribute combinations it never saw).
    #[arg(long, value_name = "TSV|DIR")]
    data: Option<PathBuf>,
    /// Run folder (checkpoints, resume state, metrics.jsonl, loss.png, zeroshot-*.json).
    /// Default: runs/clip-demo or runs/clip.
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Continue the run in OUTPUT (resume.safetensors).
    #[arg(long)]
    resume: bool,
    /// The contrastive batch (every caption is a negative for the other images in it).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Compute the batch in this many chunks: the same loss and gradients (features of
    /// the whole batch are cached and each chunk recomputed), less memory.
    #[arg(long, default_value_t = 1)]
    accum_steps: usize,
    /// Passes over the data (SynthCLIP: 40).
    #[arg(long)]
    epochs: Option<u64>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Peak learning rate (SynthCLIP: 5e-4).
    #[arg(long)]
    lr: Option<f64>,
    /// First learning rate of the linear warm-up (1e-6).
    #[arg(long)]
    lr_start: Option<f64>,
    /// Floor of the cosine decay (1e-5).
    #[arg(long)]
    lr_end: Option<f64>,
    /// Warm-up steps (default: one epoch, as SynthCLIP).
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// AdamW weight decay, skipped for 1-D tensors and names with bias/ln/bn (0.5).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Seed of the initial weights, data order and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write step-N.safetensors every N steps (epoch-N.safetensors after each epoch).
    #[arg(long, value_name = "N")]
    save_every: Option<u64>,
    /// Keep only the newest N epoch-N.safetensors (default: all with --data, the last one
    /// for the demo).
    #[arg(long, value_name = "N")]
    keep_epochs: Option<u64>,
    /// Zero-shot validation every N steps (and at the end) on --val.
    #[arg(long, value_name = "N")]
    validate_every: Option<u64>,
    /// Zero-shot validation folder: one sub-folder of images per class.
    #[arg(long, value_name = "DIR")]
    val: Option<PathBuf>,
    /// Class names of --val, one per line in sorted sub-folder order (default: the folder names).
    #[arg(long, value_name = "FILE")]
    classes: Option<PathBuf>,
    /// Zero-shot prompt templates, one per line with {} for the class (default: SynthCLIP's seven).
    #[arg(long, value_name = "FILE")]
    templates: Option<PathBuf>,
    /// Decoding threads (default: the CPU count, at most 8).
    #[arg(long)]
    workers: Option<usize>,
    /// Unusable pairs (missing/undecodable image, empty caption): skip with a count, or stop.
    #[arg(long, value_enum, default_value_t = BadRowPolicy::Skip)]
    bad_rows: BadRowPolicy,
    /// Do not write metrics.jsonl and loss.png.
    #[arg(long)]
    no_log: bool,
}

/// Runs `clip-train`.
pub fn run_train(args: &ClipTrainArgs) -> Result<()> {
    let demo = args.data.is_none();
    let mcfg = args.model.config(demo)?;
    let device = args.model.device()?;
    let output =
        args.output.clone().unwrap_or_else(|| PathBuf::from(if demo { "runs/clip-demo" } else { "runs/clip" }));
    let mut cfg = if demo {
        if args.model.weights.is_some() {
            bail!("--weights needs --data: the demo trains its small CLIP from scratch on generated shapes");
        }
        if args.resume && !output.join("demo-data").is_dir() {
            bail!("--resume: {} has no demo-data folder", output.display());
        }
        let set =
            generate_clip_demo(output.join("demo-data"), mcfg.vision.image_size.max(CLIP_DEMO_IMAGE_SIZE), args.seed)?;
        let mut c = ClipTrainConfig::demo(&set, &output);
        c.val_folder = Some(set.val_dir.clone());
        c
    } else {
        ClipTrainConfig::synthclip(args.data.clone().unwrap_or_default(), &output)
    };
    if let Some(v) = args.batch_size {
        cfg.batch_size = v;
    }
    cfg.accum_steps = args.accum_steps;
    if let Some(v) = args.epochs {
        cfg.epochs = v;
    }
    cfg.max_steps = args.max_steps.or(cfg.max_steps);
    if let Some(v) = args.lr {
        cfg.lr = v;
    }
    if let Some(v) = args.lr_start {
        cfg.lr_start = v;
    }
    if let Some(v) = args.lr_end {
        cfg.lr_end = v;
    }
    cfg.warmup_steps = args.warmup_steps.or(cfg.warmup_steps);
    if let Some(v) = args.weight_decay {
        cfg.weight_decay = v;
    }
    cfg.seed = args.seed;
    cfg.save_every = args.save_every;
    cfg.keep_epochs = args.keep_epochs.or(cfg.keep_epochs);
    cfg.validate_every = args.validate_every.or(cfg.validate_every);
    if let Some(v) = &args.val {
        cfg.val_folder = Some(v.clone());
    }
    if let Some(c) = &args.classes {
        cfg.val_classes = Some(read_lines(c)?);
    }
    if let Some(t) = &args.templates {
        cfg.val_templates = read_lines(t)?;
    }
    if let Some(w) = args.workers {
        cfg.workers = w;
    }
    cfg.bad_rows = args.bad_rows;
    cfg.log_metrics = !args.no_log;
    cfg.resume = args.resume;
    cfg.truncation = args.model.truncation.get();
    let model = initial_model(&mcfg, args.model.weights.as_deref(), args.seed, device)?;
    eprintln!("CLIP {:.1} M parameters on {device}; data {}", mcfg.num_params() as f64 / 1e6, cfg.data.display());
    let mut trainer = ClipTrainer::new(model, cfg)?;
    eprintln!("{} steps into {}", trainer.total_steps(), output.display());
    let summary = trainer.train()?;
    let fmt = |v: Option<f64>| v.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into());
    println!(
        "done: {} steps in {}; loss {} (first step) → {} (last tenth)",
        summary.run.steps,
        format_duration(summary.run.seconds),
        fmt(summary.run.first_loss),
        fmt(summary.run.final_loss)
    );
    if summary.skipped_images > 0 {
        println!("{} images skipped (did not decode)", summary.skipped_images);
    }
    if let Some(c) = summary.run.checkpoints.last() {
        println!("last checkpoint: {}", c.display());
    }
    if output.join("loss.png").exists() {
        println!("loss curve: {}", output.join("loss.png").display());
    }
    if let Some(z) = &summary.zero_shot {
        let what = if demo { "zero-shot on held-out shape images (18 shape/colour classes)" } else { "zero-shot" };
        println!("{what}: {}", z.summary());
    }
    Ok(())
}

/// Arguments of `clip-eval`.
#[derive(Args)]
pub struct ClipEvalArgs {
    #[command(flatten)]
    model: ClipModelArgs,
    /// Zero-shot classification folder: one sub-folder of images per class.
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Class names, one per line in sorted sub-folder order (default: the folder names).
    #[arg(long, value_name = "FILE")]
    classes: Option<PathBuf>,
    /// Prompt templates, one per line with {} for the class (default: SynthCLIP's seven).
    #[arg(long, value_name = "FILE")]
    templates: Option<PathBuf>,
    /// Image↔text retrieval on the pairs of a caption table (.tsv or folder with metadata.csv).
    #[arg(long, value_name = "TSV|DIR")]
    retrieval: Option<PathBuf>,
    /// Images or prompts per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Also write the results to this JSON file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Runs `clip-eval`.
pub fn run_eval(args: &ClipEvalArgs) -> Result<()> {
    if args.images.is_none() && args.retrieval.is_none() {
        bail!("nothing to evaluate: give --images DIR (zero-shot) and/or --retrieval TSV");
    }
    let Some(weights) = &args.model.weights else {
        bail!("clip-eval needs --weights (a checkpoint of clip-train, SynthCLIP/SLIP or OpenCLIP)");
    };
    let cfg = args.model.config(false)?;
    let device = args.model.device()?;
    let model = initial_model(&cfg, Some(weights), 0, device)?;
    let tokenizer = ClipTokenizer::new()?.with_context_length(cfg.text.context_length)?;
    let truncation = args.model.truncation.get();
    let mut out = serde_json::Map::new();
    out.insert("weights".into(), weights.display().to_string().into());
    if let Some(dir) = &args.images {
        let folder = ImageFolder::open(dir)?;
        let classes = match &args.classes {
            Some(f) => folder.check_class_names(&read_lines(f)?)?,
            None => folder.class_names().to_vec(),
        };
        let templates = match &args.templates {
            Some(f) => read_lines(f)?,
            None => SYNTHCLIP_TEMPLATES.iter().map(|s| s.to_string()).collect(),
        };
        let r = zero_shot_eval(&model, &tokenizer, &folder, &classes, &templates, truncation, args.batch_size, 0)?;
        println!("zero-shot {}: {}", dir.display(), r.summary());
        out.insert("zero_shot".into(), r.to_json());
    }
    if let Some(t) = &args.retrieval {
        let ds = CaptionDataset::open(t, &CaptionOptions::default())?;
        let r = retrieval_eval(&model, &tokenizer, &ds, truncation, args.batch_size)?;
        println!("retrieval over {} pairs of {}", r.pairs, t.display());
        println!("  {:<14} {:>7} {:>7} {:>7}", "", "R@1", "R@5", "R@10");
        for (name, v) in [("image → text", r.image_to_text), ("text → image", r.text_to_image)] {
            println!("  {name:<14} {:>7.2} {:>7.2} {:>7.2}", v[0], v[1], v[2]);
        }
        out.insert("retrieval".into(), r.to_json());
    }
    if let Some(j) = &args.json {
        write_atomic(
            j,
            serde_json::to_string_pretty(&serde_json::Value::Object(out))
                .map_err(|e| synthos_engine::Error::msg(e.to_string()))?
                .as_bytes(),
        )?;
        println!("results: {}", j.display());
    }
    Ok(())
}
