//! The `synthos-engine` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use synthos_engine::{cuda, Device, Result};

mod cli;

/// synthos-engine: train and sample Synthos-I2I (Wan2.1 DiT + umT5 + CLIP ViT-H/14 +
/// Wan VAE) and train CLIP on synthetic data, with hand-written CUDA kernels in bf16 on
/// NVIDIA GPUs, and a plain f32 CPU reference path that runs anywhere.
#[derive(Parser)]
#[command(name = "synthos-engine", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the build (embedded kernel architectures), the visible GPUs and whether one
    /// is usable.
    Info,
    /// Time the engine's kernels (matmul, attention, norms, elementwise, AdamW) on a
    /// device and print throughput (GB/s, TFLOP/s) and the fraction of the device's
    /// measured copy bandwidth / GEMM rate; optionally write the numbers as JSON.
    Bench(cli::bench::BenchArgs),
    /// Fine-tune the Synthos-I2I diffusion transformer by flow matching (docs/MODELS.md), with
    /// checkpoints, resume, metrics, a loss plot and validation grids. Without weights it
    /// trains the built-in tiny demo model on a generated set of captioned shapes.
    Train(Box<cli::train::TrainArgs>),
    /// Generate images with Synthos-I2I from prompts and an optional reference image
    /// (guided flow-matching Euler sampler). Without weights it samples the demo
    /// model (its newest checkpoint in runs/demo).
    Sample(Box<cli::sample::SampleArgs>),
    /// Train a CLIP contrastively on image–caption pairs (SynthCLIP: ViT-B/16, its
    /// recipe and data format), with checkpoints, resume, metrics, a loss plot and
    /// zero-shot validation. Without --data it trains a small CLIP on generated shapes
    /// and evaluates it zero-shot on shape images it never saw.
    ClipTrain(Box<cli::clip::ClipTrainArgs>),
    /// Evaluate a CLIP: zero-shot classification of an image folder (top-1/top-5) and
    /// image↔text retrieval (recall@1/5/10); takes our checkpoints, SynthCLIP/SLIP `.pt`
    /// and OpenCLIP weights.
    ClipEval(Box<cli::clip::ClipEvalArgs>),
    /// The text half of SynthCLIP's synthetic data: captions for a concept bank (from a
    /// file, templates or an OpenAI-compatible chat server) and MetaCLIP-style balancing
    /// of captions over the concepts.
    Synth(Box<cli::synth::SynthArgs>),
}

fn info() -> Result<()> {
    println!("synthos-engine {}", env!("CARGO_PKG_VERSION"));
    if cuda::KERNEL_ARCHS.is_empty() {
        println!("kernels: none embedded (built without nvcc) — CPU only");
    } else {
        let names: Vec<&str> = cuda::KERNEL_MODULES.iter().map(|(n, _)| *n).collect();
        println!("kernels: {} ({} modules: {})", cuda::KERNEL_ARCHS, names.len(), names.join(", "));
    }
    let count = cuda::device_count();
    println!("visible GPUs: {count}");
    for i in 0..count {
        match cuda::device(i).and_then(|d| d.describe()) {
            Ok(desc) => println!("  cuda:{i}: {desc}"),
            Err(e) => println!("  cuda:{i}: not usable: {e}"),
        }
        // On Hopper, the wgmma operand layouts the opt-in attention kernels rely on.
        match cuda::device(i).and_then(|d| cuda::attention::wgmma_layout_errors(&d)) {
            Ok(Some(errors)) => {
                let worst = errors.iter().fold(0.0f64, |w, e| w.max(*e));
                let verdict = if worst < cuda::attention::WGMMA_LAYOUT_TOLERANCE {
                    "ok"
                } else {
                    "MISMATCH: the wgmma attention kernels will be wrong"
                };
                let list: Vec<String> = errors.iter().map(|e| format!("{e:.1e}")).collect();
                println!(
                    "  cuda:{i}: wgmma layouts {verdict} (largest error per form, of the product: {})",
                    list.join(", ")
                );
            }
            Ok(None) => {}
            Err(e) => println!("  cuda:{i}: wgmma layout probe failed: {e}"),
        }
        // And the TMA loads of the warp-specialised forward (`wgmma-ws`).
        match cuda::device(i).and_then(|d| cuda::attention::tma_layout_mismatches(&d)) {
            Ok(Some(0)) => println!("  cuda:{i}: TMA tile loads ok (boxes land in the wgmma layout)"),
            Ok(Some(bad)) => println!(
                "  cuda:{i}: TMA tile loads MISMATCH: {bad} of 2 × {} elements (the wgmma-ws forward will be wrong)",
                cuda::attention::TMA_PROBE_BOX
            ),
            Ok(None) => {}
            Err(e) => println!("  cuda:{i}: TMA probe failed: {e}"),
        }
    }
    println!("kernel choices: {}", cuda::kernel_choices()?.join(", "));
    let best = Device::best_available();
    match best {
        Device::Cpu => println!("default device: cpu (no usable GPU)"),
        d => println!("default device: {d}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => info(),
        Command::Bench(args) => cli::bench::run(&args),
        Command::Train(args) => cli::train::run(&args),
        Command::Sample(args) => cli::sample::run(&args),
        Command::ClipTrain(args) => cli::clip::run_train(&args),
        Command::ClipEval(args) => cli::clip::run_eval(&args),
        Command::Synth(args) => cli::synth::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
