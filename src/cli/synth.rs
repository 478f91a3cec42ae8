//! `synthos-engine synth`: SynthCLIP's synthetic-data pipeline (concepts → captions →
//! balanced captions → images) step by step (`captions`, `balance`, `images`) or chained
//! (`all`), and the demo flywheel (`demo`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use synthos_engine::synth::balance::{balance, BalanceOptions, MatchMode};
use synthos_engine::synth::captions::{
    captions_from_rows, read_caption_rows, read_templates, template_captions, write_captions, MultiLine, TemplatePick,
};
use synthos_engine::synth::concepts::ConceptBank;
use synthos_engine::synth::flywheel::{run_flywheel_demo, FlywheelOptions};
use synthos_engine::synth::images::{generate_image_set, ImageSetOptions, TRAIN_TSV};
use synthos_engine::synth::llm::{caption_with_llm, LlmOptions};
use synthos_engine::synth::report::write_balance_outputs;
use synthos_engine::{bail, ensure, Device, Result};

use crate::cli::model_args::ModelArgs;

/// Arguments of `synth`.
#[derive(Args)]
pub struct SynthArgs {
    #[command(subcommand)]
    command: SynthCommand,
}

/// The `synth` subcommands.
#[derive(Subcommand)]
enum SynthCommand {
    /// Write one caption per concept (JSONL `{"concept", "caption"}`): from a caption
    /// file (--from), from templates (--templates), or from an OpenAI-compatible
    /// chat-completions server with SynthCLIP's prompt (--endpoint and --model; appends
    /// and resumes: a rerun skips the concepts already in --output).
    Captions(Box<CaptionsArgs>),
    /// Balance captions over the concepts as MetaCLIP/SynthCLIP do: match each caption
    /// against every concept (whole words), count captions per concept and keep a
    /// caption with probability min(1, t/count) per matched concept; writes
    /// balanced.jsonl, balance-report.json and balance-histogram.png into --output.
    Balance(BalanceArgs),
    /// Generate one image per caption with the engine's text-to-image pipeline (Wan2.1
    /// weights with --wan; the built-in demo generator with --checkpoint otherwise):
    /// batched, resumable (a rerun skips the images present; writes are atomic), into
    /// sharded folders, then writes the train.tsv that clip-train reads.
    Images(Box<ImagesArgs>),
    /// The whole chain into one folder: captions (captions.jsonl), balance
    /// (balanced.jsonl and its report), images (images/, train.tsv). Each step's output is
    /// kept, so a rerun resumes and any step can be rerun alone with its own command.
    All(Box<AllArgs>),
    /// The demo flywheel on the built-in shapes: train the demo generator on rendered
    /// shapes, make a synthetic caption/image set with it, train the tiny CLIP on the
    /// synthetic set alone and on the real rendered set, and compare both zero-shot on real
    /// shapes neither saw. Prints the table last and writes it as JSON. About 12 minutes
    /// on 2 CPU cores; a rerun resumes.
    Demo(DemoArgs),
}

/// `--multiline`: what to do with a reply of several lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum MultiLineArg {
    /// Leave it out (SynthCLIP).
    Drop,
    /// Keep its first non-blank line.
    FirstLine,
}

/// `--pick`: how many template captions a concept gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PickArg {
    /// One per template.
    All,
    /// One template per concept, drawn with --seed.
    One,
}

/// `--matching`: how captions are matched against concepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum MatchingArg {
    /// Case-insensitive whole words (Unicode \w boundaries; overlapping concepts count).
    Word,
    /// SynthCLIP/MetaCLIP substr_matching.py exactly: case-sensitive, the concept between
    /// spaces after spacing out , . ; : ? ! `
    Seed,
}

/// Arguments of `synth captions`.
#[derive(Args)]
pub struct CaptionsArgs {
    /// The concept bank: one concept per line (or SynthCLIP's metadata.json list).
    #[arg(long, value_name = "FILE")]
    concepts: PathBuf,
    /// The caption JSONL to write (with --endpoint: appended to and resumed from).
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    #[command(flatten)]
    source: CaptionSourceArgs,
}

/// Where captions come from (shared by `synth captions` and `synth all`).
#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from", "templates", "endpoint"])))]
pub struct CaptionSourceArgs {
    /// Captions written elsewhere: JSONL {"concept", "caption"} or a TSV/CSV with
    /// concept and caption columns; cleaned like model replies, kept for bank concepts.
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    /// Caption templates, one per line with {} for the concept.
    #[arg(long, value_name = "FILE")]
    templates: Option<PathBuf>,
    /// With --templates: every template for every concept, or one drawn per concept.
    #[arg(long, value_enum, default_value_t = PickArg::All)]
    pick: PickArg,
    /// An OpenAI-compatible server (http:// only): a base URL such as
    /// http://127.0.0.1:8000, or a URL ending in /v1 or /v1/chat/completions.
    #[arg(long, value_name = "URL", requires = "model")]
    endpoint: Option<String>,
    /// The model name the server serves (e.g. mistralai/Mistral-7B-Instruct-v0.2).
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    /// The environment variable holding an API key (sent as a Bearer token).
    #[arg(long, value_name = "VAR")]
    api_key_env: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// The most HTTP requests this run sends, retries included; a rerun continues.
    #[arg(long, value_name = "N")]
    max_requests: Option<u64>,
    /// The most requests started per second.
    #[arg(long, value_name = "R")]
    requests_per_second: Option<f64>,
    /// Retries of a request after HTTP 429/5xx, a time-out or a broken connection.
    #[arg(long, default_value_t = 5)]
    max_retries: u32,
    /// The first retry delay in milliseconds (doubled each retry, at most 30 s).
    #[arg(long, default_value_t = 500)]
    retry_delay_ms: u64,
    /// Time limit in seconds for connecting and for each read/write of a request.
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
    /// Sampling temperature (SynthCLIP: 0.7).
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Nucleus sampling (SynthCLIP: 0.95).
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Token limit of a reply; a reply cut at the limit is asked again.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Times a concept is asked again after a reply that gives no caption.
    #[arg(long, default_value_t = 2)]
    reask: u32,
    /// Replies (or --from captions) of several lines: dropped (SynthCLIP) or cut.
    #[arg(long, value_enum, default_value_t = MultiLineArg::Drop)]
    multiline: MultiLineArg,
    /// Seed of --pick one, and of the per-request "seed" sent to the server (not sent
    /// when unset). In `synth all` also the seed of the keep draws and the image noise (0
    /// when unset).
    #[arg(long)]
    seed: Option<u64>,
}

/// Arguments of `synth balance`.
#[derive(Args)]
pub struct BalanceArgs {
    /// Captions: JSONL ({"caption", optional "concept"}) or TSV/CSV with a caption column.
    #[arg(long, value_name = "FILE")]
    captions: PathBuf,
    /// The concept bank: one concept per line (or SynthCLIP's metadata.json list).
    #[arg(long, value_name = "FILE")]
    concepts: PathBuf,
    /// MetaCLIP's t: a concept with more than t captions keeps about t of them.
    #[arg(long, default_value_t = 10)]
    t: u64,
    /// Seed of the keep draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How captions are matched against concepts.
    #[arg(long, value_enum, default_value_t = MatchingArg::Word)]
    matching: MatchingArg,
    /// Output folder (balanced.jsonl, balance-report.json, balance-histogram.png).
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
}

/// How images are generated (shared by `synth images` and `synth all`).
#[derive(Args)]
pub struct ImageGenArgs {
    /// Generated size of square images (default 512 with Wan weights, 64 for the demo).
    #[arg(long, value_name = "PIXELS", conflicts_with_all = ["width", "height"])]
    resolution: Option<usize>,
    /// Generated width (with --height, for non-square images).
    #[arg(long, requires = "height")]
    width: Option<usize>,
    /// Generated height.
    #[arg(long, requires = "width")]
    height: Option<usize>,
    /// Short side of the stored copy (default 256 with Wan weights, as SynthCLIP stored
    /// its 512² images; 32 for the demo, the tiny CLIP's input).
    #[arg(long, value_name = "PIXELS", conflicts_with = "full_size")]
    store_size: Option<usize>,
    /// Store images as generated, without the smaller copy.
    #[arg(long)]
    full_size: bool,
    /// Euler steps (25; 20 for the demo).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale (5; 4 for the demo).
    #[arg(long = "cfg")]
    cfg_scale: Option<f32>,
    /// Sigma shift of the sampling schedule (5; 1 for the demo).
    #[arg(long)]
    shift: Option<f64>,
    /// Negative prompt (default: "ugly, deformed, blurry, low quality"; empty for the demo).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Captions denoised together (default 4 with Wan weights, 16 for the demo).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Make at most N images in this run (a rerun makes the next N).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

impl ImageGenArgs {
    fn options(&self, demo: bool, seed: u64) -> ImageSetOptions {
        let mut o = if demo { ImageSetOptions::demo() } else { ImageSetOptions::wan() };
        if let Some(r) = self.resolution {
            (o.width, o.height) = (r, r);
        }
        if let (Some(w), Some(h)) = (self.width, self.height) {
            (o.width, o.height) = (w, h);
        }
        if self.full_size {
            o.store_size = None;
        } else if let Some(s) = self.store_size {
            o.store_size = Some(s);
        }
        o.steps = self.steps.unwrap_or(o.steps);
        o.cfg_scale = self.cfg_scale.unwrap_or(o.cfg_scale);
        o.shift = self.shift.unwrap_or(o.shift);
        if let Some(n) = &self.negative_prompt {
            o.negative_prompt = n.clone();
        }
        o.batch_size = self.batch_size.unwrap_or(o.batch_size);
        o.max_new = self.limit;
        o.seed = seed;
        o.progress = true;
        o
    }
}

/// Arguments of `synth images`.
#[derive(Args)]
pub struct ImagesArgs {
    /// Captions: balanced.jsonl of synth balance, or any JSONL/TSV/CSV with a caption
    /// column. Image N is the caption on the N-th caption row.
    #[arg(long, value_name = "FILE")]
    captions: PathBuf,
    /// Output folder: images/SSSS/NNNNNNN.png, train.tsv, synth-images.json.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    gen: ImageGenArgs,
    /// Image N starts from the noise of seed + N.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Arguments of `synth all`.
#[derive(Args)]
pub struct AllArgs {
    /// The concept bank: one concept per line (or SynthCLIP's metadata.json list).
    #[arg(long, value_name = "FILE")]
    concepts: PathBuf,
    /// Output folder of every step.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    #[command(flatten)]
    source: CaptionSourceArgs,
    /// MetaCLIP's t: a concept with more than t captions keeps about t of them.
    #[arg(long, default_value_t = 10)]
    t: u64,
    /// How captions are matched against concepts.
    #[arg(long, value_enum, default_value_t = MatchingArg::Word)]
    matching: MatchingArg,
    #[command(flatten)]
    gen: ImageGenArgs,
    #[command(flatten)]
    weights: ModelArgs,
}

/// Arguments of `synth demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Run folder (every stage's output; a rerun resumes).
    #[arg(long, value_name = "DIR", default_value = "runs/synth-demo")]
    output: PathBuf,
    /// Device: auto (a GPU if usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Seed of every stage.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Passes of the generator's training over its 432 shapes (27 steps each).
    #[arg(long, default_value_t = 60)]
    generator_epochs: u64,
    /// Passes of each CLIP's training over its 432 pairs (6 steps each).
    #[arg(long, default_value_t = 150)]
    clip_epochs: u64,
    /// Euler steps of the synthetic images (20).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale of the synthetic images (4).
    #[arg(long = "cfg")]
    cfg_scale: Option<f32>,
}

/// Runs `synth`.
pub fn run(args: &SynthArgs) -> Result<()> {
    match &args.command {
        SynthCommand::Captions(a) => run_captions(&a.concepts, &a.output, &a.source),
        SynthCommand::Balance(a) => run_balance(a),
        SynthCommand::Images(a) => run_images(a),
        SynthCommand::All(a) => run_all(a),
        SynthCommand::Demo(a) => run_demo(a),
    }
}

fn load_bank(path: &std::path::Path) -> Result<ConceptBank> {
    let bank = ConceptBank::read(path)?;
    let dups = bank.duplicates();
    print!("concepts: {} from {}", bank.len(), path.display());
    if dups.is_empty() {
        println!();
    } else {
        let d = &dups[0];
        println!(
            " ({} duplicate lines merged, e.g. line {} repeats {:?} of line {})",
            dups.len(),
            d.line,
            d.concept,
            d.first_line
        );
    }
    Ok(bank)
}

fn multiline(a: MultiLineArg) -> MultiLine {
    match a {
        MultiLineArg::Drop => MultiLine::Drop,
        MultiLineArg::FirstLine => MultiLine::FirstLine,
    }
}

fn run_captions(concepts: &Path, output: &Path, a: &CaptionSourceArgs) -> Result<()> {
    let bank = load_bank(concepts)?;
    if let Some(from) = &a.from {
        let rows = read_caption_rows(from)?;
        let (captions, s) = captions_from_rows(&bank, &rows, multiline(a.multiline), &from.display().to_string())?;
        write_captions(output, &captions)?;
        println!(
            "captions: {} of {} rows kept ({} for concepts outside the bank, {} left out by the clean-up, {} over 15 \
             words); {} concepts without a caption",
            s.kept, s.rows, s.not_in_bank, s.rejected, s.over_max_words, s.concepts_without_caption
        );
    } else if let Some(path) = &a.templates {
        let templates = read_templates(path)?;
        let pick = match a.pick {
            PickArg::All => TemplatePick::All,
            PickArg::One => TemplatePick::One,
        };
        let captions = template_captions(&bank, &templates, pick, a.seed.unwrap_or(0));
        write_captions(output, &captions)?;
        println!("captions: {} from {} templates", captions.len(), templates.len());
    } else if let Some(endpoint) = &a.endpoint {
        let Some(model) = &a.model else { bail!("--endpoint needs --model") };
        ensure!(a.timeout_s.is_finite() && a.timeout_s > 0.0, "--timeout-s must be positive");
        let mut o = LlmOptions::new(endpoint.clone(), model.clone());
        if let Some(var) = &a.api_key_env {
            match std::env::var(var) {
                Ok(key) if !key.trim().is_empty() => o.api_key = Some(key),
                _ => bail!("--api-key-env {var}: the environment variable {var} is not set (or empty)"),
            }
        }
        o.workers = a.workers;
        o.max_requests = a.max_requests;
        o.requests_per_second = a.requests_per_second;
        o.max_retries = a.max_retries;
        o.retry_delay = Duration::from_millis(a.retry_delay_ms);
        o.timeout = Duration::from_secs_f64(a.timeout_s);
        o.temperature = a.temperature;
        o.top_p = a.top_p;
        o.max_tokens = a.max_tokens;
        o.reask = a.reask;
        o.multiline = multiline(a.multiline);
        o.seed = a.seed;
        o.progress = true;
        let s = caption_with_llm(&bank, &o, output)?;
        if let Some(r) = &s.repaired {
            println!("{}: {r}", output.display());
        }
        let rejected: usize = s.rejected.values().sum();
        let reasons: Vec<String> = s.rejected.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!(
            "captions: {} new, {} already in {} ({} concepts); {} without a caption{}; {} requests ({} retries); {} \
             over 15 words",
            s.captioned,
            s.already_done,
            output.display(),
            s.concepts,
            rejected,
            if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) },
            s.requests,
            s.retries,
            s.over_max_words
        );
    }
    Ok(())
}

fn run_balance(a: &BalanceArgs) -> Result<()> {
    balance_step(&a.captions, &a.concepts, a.t, a.seed, a.matching, &a.output).map(|_| ())
}

/// Balances `captions` over the bank and writes the outputs into `output`; returns the
/// path of `balanced.jsonl`.
fn balance_step(
    captions: &Path,
    concepts: &Path,
    t: u64,
    seed: u64,
    matching: MatchingArg,
    output: &Path,
) -> Result<PathBuf> {
    ensure!(t >= 1, "--t must be at least 1");
    let bank = load_bank(concepts)?;
    let rows = read_caption_rows(captions)?;
    let mode = match matching {
        MatchingArg::Word => MatchMode::Word,
        MatchingArg::Seed => MatchMode::Seed,
    };
    let options = BalanceOptions { t, seed, mode };
    let start = std::time::Instant::now();
    let b = balance(&bank, &rows, &options)?;
    let secs = start.elapsed().as_secs_f64();
    let (files, _) = write_balance_outputs(output, &bank, &rows, &b, &options)?;
    let covered = |c: &[u64]| c.iter().filter(|&&n| n > 0).count();
    println!(
        "captions: {} read, {} empty, {} duplicates, {} unique, {} match a concept, {} kept (expected {:.1})",
        b.rows,
        b.empty,
        b.duplicates,
        b.unique.len(),
        b.matched_captions(),
        b.kept_count(),
        b.expected_kept
    );
    println!(
        "concepts: {} of {} covered before, {} after; {} over t={} before, max count {} → {} ({:.1}s)",
        covered(&b.counts_before),
        b.names.len(),
        covered(&b.counts_after),
        b.counts_before.iter().filter(|&&c| c > t).count(),
        t,
        b.counts_before.iter().max().unwrap_or(&0),
        b.counts_after.iter().max().unwrap_or(&0),
        secs
    );
    println!("wrote {}, {}, {}", files.captions.display(), files.report.display(), files.plot.display());
    Ok(files.captions)
}

fn read_captions(path: &Path) -> Result<Vec<String>> {
    Ok(read_caption_rows(path)?.into_iter().map(|r| r.caption).collect())
}

/// Generates the images of `captions` into `output` and reports what it did.
fn images_step(captions: &Path, output: &Path, model: &ModelArgs, gen: &ImageGenArgs, seed: u64) -> Result<()> {
    let list = read_captions(captions)?;
    let demo = model.is_demo();
    if demo && model.checkpoints.is_empty() {
        eprintln!(
            "warning: the demo generator has no trained weights (no --checkpoint): its images will be noise; train it \
             with `synthos-engine train` and pass --checkpoint runs/demo/epoch-71.safetensors"
        );
    }
    let opts = gen.options(demo, seed);
    let pipe = model.load(&model.paths())?;
    let name = if demo {
        format!("demo {}", model.checkpoints.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" + "))
    } else {
        model.wan.as_ref().or(model.dit.as_ref()).map(|p| p.display().to_string()).unwrap_or_default()
    };
    let (sw, sh) = opts.stored_size();
    eprintln!(
        "images: {} captions from {} at {}×{} (stored {sw}×{sh}), {} steps, cfg {}, batch {}",
        list.len(),
        captions.display(),
        opts.width,
        opts.height,
        opts.steps,
        opts.cfg_scale,
        opts.batch_size
    );
    let s = generate_image_set(&pipe, &list, output, &opts, &name)?;
    let rate = if s.made > 0 { format!(", {:.2} s per image", s.seconds / s.made as f64) } else { String::new() };
    println!(
        "images: {} made, {} already there, {} still to make, of {} captions{rate}",
        s.made, s.already_done, s.remaining, s.captions
    );
    println!("wrote {} (for clip-train --data)", s.train_tsv.display());
    if s.remaining > 0 {
        println!("rerun the same command to make the rest");
    }
    Ok(())
}

fn run_images(a: &ImagesArgs) -> Result<()> {
    images_step(&a.captions, &a.output, &a.model, &a.gen, a.seed)
}

fn run_all(a: &AllArgs) -> Result<()> {
    let seed = a.source.seed.unwrap_or(0);
    std::fs::create_dir_all(&a.output)
        .map_err(|e| synthos_engine::Error::msg(format!("cannot create {}: {e}", a.output.display())))?;
    println!("== 1/3 captions");
    let captions = a.output.join("captions.jsonl");
    run_captions(&a.concepts, &captions, &a.source)?;
    println!("== 2/3 balance");
    let balanced = balance_step(&captions, &a.concepts, a.t, seed, a.matching, &a.output)?;
    println!("== 3/3 images");
    images_step(&balanced, &a.output, &a.weights, &a.gen, seed)?;
    println!(
        "next: synthos-engine clip-train --data {} --output {}",
        a.output.join(TRAIN_TSV).display(),
        a.output.join("clip").display()
    );
    Ok(())
}

fn run_demo(a: &DemoArgs) -> Result<()> {
    let mut o = FlywheelOptions::new(&a.output);
    o.device = match a.device.as_str() {
        "auto" => Device::best_available(),
        d => Device::parse(d)?,
    };
    o.seed = a.seed;
    ensure!(a.generator_epochs > 0, "--generator-epochs must be at least 1");
    ensure!(a.clip_epochs > 0, "--clip-epochs must be at least 1");
    o.generator_epochs = a.generator_epochs;
    o.clip_epochs = a.clip_epochs;
    o.images.steps = a.steps.unwrap_or(o.images.steps);
    o.images.cfg_scale = a.cfg_scale.unwrap_or(o.images.cfg_scale);
    eprintln!("synth demo on {} into {}", o.device, a.output.display());
    let start = std::time::Instant::now();
    let r = run_flywheel_demo(&o)?;
    println!(
        "synthetic set: colour match {:.1}%, shape IoU {:.3} (the generator's images read against their captions)",
        100.0 * r.synthetic_colour_match,
        r.synthetic_shape_iou
    );
    println!("wrote {}", a.output.join("synth-demo.json").display());
    println!("done in {}", synthos_engine::report::format_duration(start.elapsed().as_secs_f64()));
    let z = &r.rows[0].zero_shot;
    println!(
        "zero-shot on {} real rendered shapes of {} colour/shape classes that no stage trained on:",
        z.images,
        z.classes.len()
    );
    print!("{}", r.table());
    Ok(())
}
