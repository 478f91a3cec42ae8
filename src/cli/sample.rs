//! `synthos-engine sample`: generates images from prompts and an optional reference image.

use std::path::{Path, PathBuf};

use clap::Args;
use synthos_engine::image::ImageRgb;
use synthos_engine::pipeline::{GenerateOptions, WeightPaths, DEFAULT_NEGATIVE_PROMPT};
use synthos_engine::report::{image_grid, Progress};
use synthos_engine::{bail, Error, Result, ResultExt};

use crate::cli::model_args::ModelArgs;

/// Arguments of `sample`.
#[derive(Args)]
pub struct SampleArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What to draw. May be empty when a reference image guides alone.
    #[arg(long, default_value = "")]
    prompt: String,
    /// A text file with one prompt per line (blank lines skipped): one image each, all
    /// denoised in one batch.
    #[arg(long, value_name = "FILE")]
    prompts_file: Option<PathBuf>,
    /// Reference image (png/jpeg/webp) whose CLIP features guide the image through
    /// cross-attention; in both guidance branches.
    #[arg(long, value_name = "IMAGE")]
    reference: Option<PathBuf>,
    /// Negative prompt of the guidance's unconditional branch (default: "ugly, deformed,
    /// blurry, low quality"; empty for the demo model, whose vocabulary lacks those words).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Output height in pixels (default 480; 64 for the demo).
    #[arg(long)]
    height: Option<usize>,
    /// Output width in pixels (default 480; 64 for the demo).
    #[arg(long)]
    width: Option<usize>,
    /// Euler steps (25; the demo's validation setting for the demo model).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale (1 = no guidance, one branch; default 5, the demo's validation
    /// setting for the demo model).
    #[arg(long = "cfg")]
    cfg_scale: Option<f32>,
    /// Sigma shift of the sampling schedule (5; the demo's own value for the demo model).
    #[arg(long)]
    shift: Option<f64>,
    /// Seed of the initial noise (image i of a batch uses seed + i).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output PNG. With several prompts, images go to OUTPUT with -000, -001, … before
    /// the extension.
    #[arg(long, short = 'o', default_value = "sample.png")]
    output: PathBuf,
    /// Also write all images as one labelled grid to this PNG.
    #[arg(long, value_name = "PNG")]
    grid: Option<PathBuf>,
    /// Demo model only: instead of sampling the prompts, measure how well the model
    /// follows prompts and reference images (colour match and shape IoU of 36 text-only
    /// and 36 image-only samples against the rendered targets), as a demo run ends.
    #[arg(long)]
    quality: bool,
}

/// The most recently written `epoch-N` / `step-N` checkpoint in `dir`, if any.
fn newest_checkpoint(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            (name.starts_with("epoch-") || name.starts_with("step-")) && name.ends_with(".safetensors")
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

fn numbered(path: &Path, i: usize) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "sample".into());
    let ext = path.extension().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}-{i:03}.{ext}"))
}

/// Runs `sample`.
pub fn run(args: &SampleArgs) -> Result<()> {
    let mut paths: WeightPaths = args.model.paths();
    let demo = paths.is_demo();
    if demo && paths.checkpoints.is_empty() {
        match newest_checkpoint(Path::new("runs/demo")) {
            Some(c) => {
                eprintln!("demo model: using the newest demo checkpoint {}", c.display());
                paths.checkpoints.push(c);
            }
            None => eprintln!(
                "demo model: no checkpoint in runs/demo — sampling the untrained model (noise). \
                 Run `synthos-engine train` first, or pass --checkpoint."
            ),
        }
    }
    let mut prompts: Vec<String> = match &args.prompts_file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| Error::msg(format!("prompts file {}: cannot read it: {e}", f.display())))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        None => vec![args.prompt.clone()],
    };
    if prompts.is_empty() {
        bail!(
            "prompts file {}: no prompts in it",
            args.prompts_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
        );
    }
    if args.prompts_file.is_some() && !args.prompt.is_empty() {
        prompts.insert(0, args.prompt.clone());
    }
    let reference = match &args.reference {
        Some(p) => Some(ImageRgb::open(p).with_ctx(|| format!("--reference {}", p.display()))?),
        None => None,
    };
    let size = if demo { 64 } else { 480 };
    let demo_recipe = synthos_engine::train::TrainConfig::demo();
    let opts = GenerateOptions {
        prompt: String::new(),
        negative_prompt: args.negative_prompt.clone().unwrap_or_else(|| {
            if demo {
                String::new()
            } else {
                DEFAULT_NEGATIVE_PROMPT.to_string()
            }
        }),
        height: args.height.unwrap_or(size),
        width: args.width.unwrap_or(size),
        steps: args.steps.unwrap_or(if demo { demo_recipe.validation_steps } else { 25 }),
        cfg_scale: args.cfg_scale.unwrap_or(if demo { demo_recipe.validation_cfg } else { 5.0 }),
        shift: args.shift.unwrap_or(if demo { demo_recipe.shift } else { synthos_engine::schedule::SHIFT }),
        seed: args.seed,
    };
    let pipe = args.model.load(&paths)?;
    if args.quality {
        if !demo {
            bail!(
                "--quality measures the demo model (it renders the demo's shapes as targets); it needs no --wan/--dit"
            );
        }
        let q = synthos_engine::pipeline::demo::quality(&pipe, &opts)?;
        println!("{}", q.line());
        println!(
            "image-only colour match {:.1}% ({} samples of each kind)",
            100.0 * q.image_only_colour_match,
            q.samples
        );
        return Ok(());
    }
    pipe.check_size(opts.width, opts.height).ctx("--width/--height")?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let mut progress = Progress::new(opts.steps as u64, 0);
    let start = std::time::Instant::now();
    let images = pipe.generate_batch(&refs, &opts, reference.as_ref(), &mut |s, _| {
        progress.update(s as u64, None, (s * refs.len()) as u64);
    })?;
    progress.finish();
    let secs = start.elapsed().as_secs_f64();
    for (i, img) in images.iter().enumerate() {
        let out = if images.len() == 1 { args.output.clone() } else { numbered(&args.output, i) };
        img.save_png(&out)?;
        println!("wrote {} ({}×{}, seed {})", out.display(), opts.width, opts.height, opts.seed + i as u64);
    }
    if let Some(g) = &args.grid {
        image_grid(&images, images.len().min(4), Some(&prompts), g)?;
        println!("wrote grid {}", g.display());
    }
    println!(
        "{:.2} s per image ({} images, {} steps, cfg {})",
        secs / images.len() as f64,
        images.len(),
        opts.steps,
        opts.cfg_scale
    );
    Ok(())
}
