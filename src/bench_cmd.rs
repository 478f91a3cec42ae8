//! `synthos-engine bench`: times the kernels and prints a table (and optionally JSON).

use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;
use synthos_engine::bench::{self, BenchResult, Size};
use synthos_engine::{Device, Error, Result, ResultExt};

/// Arguments of `bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Device: `auto` (a GPU if usable, else the CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Problem sizes: `full` (real model sizes; the default on a GPU) or `small`
    /// (the default on the CPU, seconds in all).
    #[arg(long)]
    size: Option<String>,
    /// Minimum seconds spent timing each case.
    #[arg(long, default_value_t = 0.5)]
    min_seconds: f64,
    /// Only run cases whose family or name contains this text (e.g. `attention`).
    #[arg(long)]
    filter: Option<String>,
    /// Also write the results to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn fmt_row(r: &BenchResult) -> String {
    let frac = r.fraction.map(|f| format!("{:5.1}%", 100.0 * f)).unwrap_or_else(|| "     -".into());
    format!(
        "{:<12} {:<44} {:>10.3} ms {:>9.1} GB/s {:>8.2} TFLOP/s {}",
        r.family,
        r.name,
        r.seconds * 1e3,
        r.gbps,
        r.tflops,
        frac
    )
}

/// Runs the benchmarks.
pub fn run(args: &BenchArgs) -> Result<()> {
    let device = Device::parse(&args.device)?;
    let size = match args.size.as_deref() {
        None if device.is_cuda() => Size::Full,
        None => Size::Small,
        Some("full") => Size::Full,
        Some("small") => Size::Small,
        Some(s) => return Err(Error::msg(format!("--size {s:?}: expected `full` or `small`"))),
    };
    println!("device: {device}, sizes: {size:?}, at least {} s per case", args.min_seconds);
    println!("(fraction: of the measured copy bandwidth for memory-bound cases, of the measured GEMM rate for compute-bound ones)");
    let filter = args.filter.clone();
    let results = bench::run_all(device, size, args.min_seconds, filter.as_deref(), |r| {
        println!("{}", fmt_row(r));
        let _ = std::io::stdout().flush();
    })?;
    if let Some(path) = &args.json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                serde_json::json!({
                    "family": r.family, "name": r.name, "seconds": r.seconds,
                    "gbps": r.gbps, "tflops": r.tflops, "fraction_of_ceiling": r.fraction,
                })
            })
            .collect();
        let doc = serde_json::json!({ "device": device.to_string(), "size": format!("{size:?}"), "results": rows });
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .with_ctx(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
