//! The demo flywheel: SynthCLIP's question (does a CLIP trained on a generator's images
//! alone learn what it would from real ones?) at toy scale, on the built-in shapes.
//!
//! [`run_flywheel_demo`] runs five stages into one folder, each keeping its output so a
//! rerun skips what is done and resumes what was cut off:
//!
//! 1. `real/`: the CLIP demo set ([`generate_clip_demo`]): 432 rendered training pairs and
//!    108 held-out zero-shot images of attribute combinations nothing trains on.
//! 2. `generator/`: the Synthos demo generator trained on the 432 training combinations
//!    alone (rendered at 64², `generator-data/`), so it never sees a held-out one.
//! 3. `synthetic/`: one image per training caption from that generator
//!    ([`generate_image_set`], stored at the CLIP demo's 32²), with its fidelity read by
//!    [`read_image`]: shape and background colours as captioned, and the shape's IoU with
//!    the rendered target.
//! 4. `clip-synthetic/`: the demo's tiny CLIP trained on the synthetic pairs alone.
//! 5. `clip-real/`: the same CLIP, recipe and seed trained on the real pairs.
//!
//! Both CLIPs are then scored zero-shot on the real held-out images (18 shape/colour
//! classes, named only through prompts), and [`FlywheelReport::table`] sets them side by
//! side with chance.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use super::images::{generate_image_set, image_path, ImageSetOptions};
use crate::data::demo::{clip_demo_split, generate_clip_demo, read_image, render, write_synthos_set, DemoAttrs};
use crate::data::{CaptionDataset, CaptionOptions};
use crate::eval::ZeroShotReport;
use crate::fsutil::write_atomic;
use crate::image::ImageRgb;
use crate::models::clip::ClipConfig;
use crate::pipeline::{demo, SynthosPipeline};
use crate::train::clip::{initial_model, ClipTrainConfig, ClipTrainer};
use crate::train::{TrainConfig, Trainer, RESUME_FILE};
use crate::{Device, Error, Result, ResultExt};

/// The settings of [`run_flywheel_demo`].
#[derive(Clone, Debug)]
pub struct FlywheelOptions {
    /// Run folder (every stage's output).
    pub output: PathBuf,
    /// Device of every stage (bf16 on a GPU, f32 on the CPU).
    pub device: Device,
    /// Seed of the data order, the generator's training, the synthetic images' noise and
    /// the CLIPs' initial weights.
    pub seed: u64,
    /// Passes of the generator's training over its 432 images (27 steps each).
    pub generator_epochs: u64,
    /// Passes of each CLIP's training over its 432 pairs (6 steps each).
    pub clip_epochs: u64,
    /// How the synthetic images are generated.
    pub images: ImageSetOptions,
    /// Progress bars and stage lines on stderr.
    pub verbose: bool,
}

impl FlywheelOptions {
    /// The defaults into `output`: a 60-epoch generator (1620 steps), the demo's sampling
    /// (20 steps, guidance 4, shift 1), 150-epoch CLIPs (the `clip-train` demo's), seed 0,
    /// the best available device.
    pub fn new(output: impl Into<PathBuf>) -> FlywheelOptions {
        FlywheelOptions {
            output: output.into(),
            device: Device::best_available(),
            seed: 0,
            generator_epochs: 60,
            clip_epochs: 150,
            images: ImageSetOptions::demo(),
            verbose: true,
        }
    }
}

/// One training set's row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct FlywheelRow {
    /// `synthetic` or `real`.
    pub set: String,
    /// Training pairs.
    pub pairs: usize,
    /// The zero-shot result on the real held-out images.
    pub zero_shot: ZeroShotReport,
    /// Seconds of its CLIP training (0 when an earlier run did it).
    pub seconds: f64,
}

/// What [`run_flywheel_demo`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct FlywheelReport {
    /// The `synthetic` row, then the `real` row.
    pub rows: Vec<FlywheelRow>,
    /// Synthetic images whose shape and background colours are those of their caption.
    pub synthetic_colour_match: f64,
    /// Mean IoU of the synthetic images' shape masks with the rendered targets'.
    pub synthetic_shape_iou: f64,
    /// Seconds of each stage in this call, in order (`generator`, `images`, …).
    pub stage_seconds: Vec<(String, f64)>,
}

impl FlywheelReport {
    /// The table: one row per training set with top-1, top-5 and their chance levels.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<10} {:>6} {:>8} {:>8} {:>13} {:>13}\n",
            "training", "pairs", "top-1", "top-5", "chance top-1", "chance top-5"
        );
        for r in &self.rows {
            s.push_str(&format!(
                "{:<10} {:>6} {:>7.1}% {:>7.1}% {:>12.1}% {:>12.1}%\n",
                r.set,
                r.pairs,
                r.zero_shot.top1,
                r.zero_shot.top5,
                r.zero_shot.chance_top1(),
                r.zero_shot.chance_top5()
            ));
        }
        s
    }

    /// The JSON form of the table and the synthetic set's fidelity.
    pub fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "set": r.set,
                    "pairs": r.pairs,
                    "top1": r.zero_shot.top1,
                    "top5": r.zero_shot.top5,
                    "chance_top1": r.zero_shot.chance_top1(),
                    "chance_top5": r.zero_shot.chance_top5(),
                    "zero_shot_images": r.zero_shot.images,
                    "classes": r.zero_shot.classes.len(),
                    "train_seconds": r.seconds,
                })
            })
            .collect();
        let stages: serde_json::Map<String, Value> =
            self.stage_seconds.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        json!({
            "rows": rows,
            "synthetic_colour_match": self.synthetic_colour_match,
            "synthetic_shape_iou": self.synthetic_shape_iou,
            "stage_seconds": stages,
        })
    }
}

/// The fidelity of a synthetic set: the fraction of images whose colours match their
/// caption and the mean shape IoU against the rendered target, over the captions that
/// parse as demo captions.
pub fn synthetic_fidelity(dir: &Path, captions: &[String]) -> Result<(f64, f64)> {
    let (mut matched, mut iou, mut n) = (0usize, 0f64, 0usize);
    for (i, c) in captions.iter().enumerate() {
        let Some(attrs) = DemoAttrs::from_caption(c) else { continue };
        let img = ImageRgb::open(dir.join(image_path(i)))?;
        let got = read_image(&img)?;
        let want = read_image(&render(&attrs, img.width())?)?;
        matched += usize::from(got.colours_match(&attrs));
        iou += got.iou(&want);
        n += 1;
    }
    let n = n.max(1) as f64;
    Ok((matched as f64 / n, iou / n))
}

fn say(verbose: bool, line: &str) {
    if verbose {
        eprintln!("{line}");
    }
}

/// Runs the demo flywheel (see the module documentation) and writes the table as
/// `synth-demo.json` into the run folder.
pub fn run_flywheel_demo(opts: &FlywheelOptions) -> Result<FlywheelReport> {
    let out = &opts.output;
    let dtype = opts.device.default_dtype();
    let mut stages = Vec::new();

    // 1. The real set and the zero-shot images.
    let clip_cfg = ClipConfig::tiny();
    let size = opts.images.stored_size().0;
    let real = generate_clip_demo(out.join("real"), size, opts.seed).ctx("the real demo set")?;
    let real_pairs = CaptionDataset::open(&real.train_tsv, &CaptionOptions::default())?;
    let captions: Vec<String> = (0..real_pairs.len()).filter_map(|i| real_pairs.caption(i).map(String::from)).collect();

    // 2. The generator, on the training combinations only.
    let t = Instant::now();
    let gen_dir = out.join("generator");
    let marker = gen_dir.join("generator.json");
    let checkpoint = match std::fs::read_to_string(&marker) {
        Ok(text) => {
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::msg(format!("{}: not a generator record: {e}", marker.display())))?;
            let p = v["checkpoint"].as_str().map(PathBuf::from);
            match p {
                Some(p) if p.is_file() => {
                    say(opts.verbose, &format!("generator: trained already ({})", p.display()));
                    p
                }
                _ => train_generator(opts, &gen_dir, &marker)?,
            }
        }
        Err(_) => train_generator(opts, &gen_dir, &marker)?,
    };
    stages.push(("generator".to_string(), t.elapsed().as_secs_f64()));

    // 3. The synthetic set.
    let t = Instant::now();
    let pipe = SynthosPipeline::demo(opts.device, dtype, std::slice::from_ref(&checkpoint))?;
    let syn_dir = out.join("synthetic");
    say(opts.verbose, &format!("synthetic images: {} captions into {}", captions.len(), syn_dir.display()));
    let images = ImageSetOptions { seed: opts.seed, progress: opts.verbose, ..opts.images.clone() };
    let made = generate_image_set(&pipe, &captions, &syn_dir, &images, &format!("demo {}", checkpoint.display()))?;
    drop(pipe);
    let (colour_match, shape_iou) = synthetic_fidelity(&syn_dir, &captions)?;
    say(
        opts.verbose,
        &format!(
            "synthetic images: {} made, {} already there; colour match {:.1}%, shape IoU {:.3}",
            made.made,
            made.already_done,
            100.0 * colour_match,
            shape_iou
        ),
    );
    stages.push(("images".to_string(), t.elapsed().as_secs_f64()));

    // 4–5. The two CLIPs.
    let mut rows = Vec::new();
    for (set, tsv) in [("synthetic", made.train_tsv.clone()), ("real", real.train_tsv.clone())] {
        let t = Instant::now();
        let dir = out.join(format!("clip-{set}"));
        let result = dir.join("zeroshot.json");
        let (zero_shot, seconds) = match ZeroShotReport::read(&result) {
            Ok(z) => {
                say(opts.verbose, &format!("CLIP on {set} pairs: trained already ({})", result.display()));
                (z, 0.0)
            }
            Err(_) => {
                say(opts.verbose, &format!("CLIP on {set} pairs: training into {}", dir.display()));
                let mut cfg = ClipTrainConfig::demo(&real, &dir);
                cfg.data = tsv.clone();
                cfg.epochs = opts.clip_epochs;
                cfg.seed = opts.seed;
                cfg.resume = dir.join(RESUME_FILE).is_file();
                let model = initial_model(&clip_cfg, None, opts.seed, opts.device)?;
                let mut trainer = ClipTrainer::new(model, cfg)?;
                trainer.set_quiet(!opts.verbose);
                let summary = trainer.train().with_ctx(|| format!("CLIP on the {set} pairs"))?;
                let z = summary
                    .zero_shot
                    .ok_or_else(|| Error::msg(format!("CLIP on the {set} pairs: no zero-shot result")))?;
                let text = serde_json::to_string_pretty(&z.to_json()).map_err(|e| Error::msg(e.to_string()))?;
                write_atomic(&result, text.as_bytes())?;
                (z, t.elapsed().as_secs_f64())
            }
        };
        let pairs = CaptionDataset::open(&tsv, &CaptionOptions::default())?.len();
        rows.push(FlywheelRow { set: set.to_string(), pairs, zero_shot, seconds });
        stages.push((format!("clip-{set}"), t.elapsed().as_secs_f64()));
    }

    let report = FlywheelReport {
        rows,
        synthetic_colour_match: colour_match,
        synthetic_shape_iou: shape_iou,
        stage_seconds: stages,
    };
    let text = serde_json::to_string_pretty(&report.to_json()).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(out.join("synth-demo.json"), text.as_bytes())?;
    Ok(report)
}

/// Trains the demo generator on the CLIP demo's training combinations (resuming a cut-off
/// run) and records its final checkpoint in `marker`.
fn train_generator(opts: &FlywheelOptions, dir: &Path, marker: &Path) -> Result<PathBuf> {
    let data = opts.output.join("generator-data");
    if !data.join("metadata.csv").is_file() {
        let (train, _) = clip_demo_split();
        write_synthos_set(&data, &train, demo::IMAGE_SIZE).ctx("the generator's training set")?;
    }
    let cfg = TrainConfig {
        data: Some(data),
        output: dir.to_path_buf(),
        epochs: opts.generator_epochs,
        seed: opts.seed,
        validation_prompts: demo::validation_prompts(),
        resume: dir.join(RESUME_FILE).is_file(),
        ..TrainConfig::demo()
    };
    let resume = cfg.resume;
    let pipe = SynthosPipeline::demo(opts.device, opts.device.default_dtype(), &[])?;
    let mut trainer = Trainer::new(pipe, cfg)?;
    trainer.set_quiet(!opts.verbose);
    say(
        opts.verbose,
        &format!(
            "generator: {} the demo DiT on 432 rendered shapes ({} steps) into {}",
            if resume { "resuming" } else { "training" },
            trainer.total_steps(),
            dir.display()
        ),
    );
    let summary = trainer.run().ctx("training the demo generator")?;
    let last = format!("epoch-{}.safetensors", opts.generator_epochs.saturating_sub(1));
    let checkpoint = summary.checkpoints.last().cloned().unwrap_or_else(|| dir.join(&last));
    if !checkpoint.is_file() {
        return Err(Error::msg(format!("the demo generator's run left no checkpoint {}", checkpoint.display())));
    }
    let text =
        serde_json::to_string_pretty(&json!({"checkpoint": checkpoint.display().to_string(), "steps": summary.steps}))
            .map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(marker, text.as_bytes())?;
    Ok(checkpoint)
}
