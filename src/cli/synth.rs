//! `synthos-engine synth captions` and `synth balance`: the text half of SynthCLIP's
//! synthetic-data pipeline (concepts → captions → balanced captions).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use synthos_engine::synth::balance::{balance, BalanceOptions, MatchMode};
use synthos_engine::synth::captions::{
    captions_from_rows, read_caption_rows, read_templates, template_captions, write_captions, MultiLine, TemplatePick,
};
use synthos_engine::synth::concepts::ConceptBank;
use synthos_engine::synth::llm::{caption_with_llm, LlmOptions};
use synthos_engine::synth::report::write_balance_outputs;
use synthos_engine::{bail, ensure, Result};

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
#[command(group(clap::ArgGroup::new("source").required(true).args(["from", "templates", "endpoint"])))]
pub struct CaptionsArgs {
    /// The concept bank: one concept per line (or SynthCLIP's metadata.json list).
    #[arg(long, value_name = "FILE")]
    concepts: PathBuf,
    /// The caption JSONL to write (with --endpoint: appended to and resumed from).
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
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

/// Runs `synth`.
pub fn run(args: &SynthArgs) -> Result<()> {
    match &args.command {
        SynthCommand::Captions(a) => run_captions(a),
        SynthCommand::Balance(a) => run_balance(a),
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

fn run_captions(a: &CaptionsArgs) -> Result<()> {
    let bank = load_bank(&a.concepts)?;
    if let Some(from) = &a.from {
        let rows = read_caption_rows(from)?;
        let (captions, s) = captions_from_rows(&bank, &rows, multiline(a.multiline), &from.display().to_string())?;
        write_captions(&a.output, &captions)?;
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
        write_captions(&a.output, &captions)?;
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
        let s = caption_with_llm(&bank, &o, &a.output)?;
        if let Some(r) = &s.repaired {
            println!("{}: {r}", a.output.display());
        }
        let rejected: usize = s.rejected.values().sum();
        let reasons: Vec<String> = s.rejected.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!(
            "captions: {} new, {} already in {} ({} concepts); {} without a caption{}; {} requests ({} retries); {} \
             over 15 words",
            s.captioned,
            s.already_done,
            a.output.display(),
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
    ensure!(a.t >= 1, "--t must be at least 1");
    let bank = load_bank(&a.concepts)?;
    let rows = read_caption_rows(&a.captions)?;
    let mode = match a.matching {
        MatchingArg::Word => MatchMode::Word,
        MatchingArg::Seed => MatchMode::Seed,
    };
    let options = BalanceOptions { t: a.t, seed: a.seed, mode };
    let start = std::time::Instant::now();
    let b = balance(&bank, &rows, &options)?;
    let secs = start.elapsed().as_secs_f64();
    let (files, _) = write_balance_outputs(&a.output, &bank, &rows, &b, &options)?;
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
        b.counts_before.iter().filter(|&&c| c > a.t).count(),
        a.t,
        b.counts_before.iter().max().unwrap_or(&0),
        b.counts_after.iter().max().unwrap_or(&0),
        secs
    );
    println!("wrote {}, {}, {}", files.captions.display(), files.report.display(), files.plot.display());
    Ok(())
}
