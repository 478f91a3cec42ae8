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
    /// Only run cases whose family or name contains this text (e.g. `attention`;
    /// repeatable: cases matching any of them).
    #[arg(long, value_name = "TEXT")]
    filter: Vec<String>,
    /// Leave out cases whose family or name contains this text (repeatable; e.g. `--skip
    /// "[wgmma"` for the wgmma attention cases). The two ceilings (copy, GEMM) always run.
    #[arg(long, value_name = "TEXT")]
    skip: Vec<String>,
    /// Also write the results to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A JSON file of PyTorch timings of the same cases (written by
    /// `scripts/reference/bench_torch.py`): prints ours, PyTorch's and the ratio
    /// (PyTorch time / ours; above 1 means we are faster) for every case both ran.
    /// With `--json`, the comparison is written there too.
    #[arg(long)]
    compare: Option<PathBuf>,
}

fn fmt_row(r: &BenchResult) -> String {
    if let Some(e) = &r.error {
        return format!("{:<12} {:<44} FAILED: {e}", r.family, r.name);
    }
    let mut extra = match (r.samples_per_s, r.peak_bytes) {
        (Some(s), Some(p)) => format!("  {s:.2} samples/s, peak {:.2} GiB", p as f64 / (1u64 << 30) as f64),
        (Some(s), None) => format!("  {s:.2} samples/s"),
        _ => String::new(),
    };
    if let Some(m) = r.mfu {
        extra += &format!(", MFU {:.1}%", 100.0 * m);
    }
    let frac = r.fraction.map(|f| format!("{:5.1}%", 100.0 * f)).unwrap_or_else(|| "     -".into());
    format!(
        "{:<12} {:<44} {:>10.3} ms {:>9.1} GB/s {:>8.2} TFLOP/s {}",
        r.family,
        r.name,
        r.seconds * 1e3,
        r.gbps,
        r.tflops,
        frac
    ) + &extra
}

/// One PyTorch timing read from a `bench_torch.py` JSON file (the fastest variant of a
/// case name).
struct TorchCase {
    seconds: f64,
    variant: String,
    peak_gib: Option<f64>,
}

/// The PyTorch case a case of ours compares with: its name without a kernel-variant tag
/// (`attention fwd[mma] b1 n900 h12 d128` compares with `attention fwd b1 n900 h12 d128`).
fn reference_name(name: &str) -> String {
    match (name.find('['), name.find(']')) {
        (Some(open), Some(close)) if open < close => format!("{}{}", &name[..open], &name[close + 1..]),
        _ => name.to_string(),
    }
}

fn read_torch(path: &std::path::Path) -> Result<std::collections::BTreeMap<String, TorchCase>> {
    let text = std::fs::read_to_string(path).with_ctx(|| format!("cannot read {}", path.display()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::msg(format!("{}: not valid JSON: {e}", path.display())))?;
    let cases = doc.get("cases").and_then(|c| c.as_array()).ok_or_else(|| {
        Error::msg(format!("{}: no \"cases\" array (expected bench_torch.py output)", path.display()))
    })?;
    let mut best = std::collections::BTreeMap::<String, TorchCase>::new();
    for c in cases {
        let (Some(name), Some(seconds)) =
            (c.get("name").and_then(|v| v.as_str()), c.get("seconds").and_then(|v| v.as_f64()))
        else {
            continue;
        };
        if seconds.is_nan() || seconds <= 0.0 {
            continue;
        }
        let variant = c.get("variant").and_then(|v| v.as_str()).unwrap_or("").to_string();
        let peak_gib = c.get("peak_mem_gib").and_then(|v| v.as_f64());
        if best.get(name).is_none_or(|b| seconds < b.seconds) {
            best.insert(name.to_string(), TorchCase { seconds, variant, peak_gib });
        }
    }
    Ok(best)
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
    let mfu_peak = bench::mfu_peak(device)?;
    println!(
        "(MFU of whole-model cases: model FLOPs without checkpointing's recompute, over {})",
        mfu_peak.as_ref().map_or("the measured GEMM rate", |(_, label)| label.as_str())
    );
    let results = bench::run_all(device, size, args.min_seconds, &args.filter, &args.skip, |r| {
        println!("{}", fmt_row(r));
        let profile = synthos_engine::cuda::take_profile();
        if !profile.is_empty() {
            let total: f64 = profile.iter().map(|p| p.2).sum();
            println!("    profile (SYNTHOS_CUDA_PROFILE=1, every launch synchronised; all runs of the case):");
            for (name, n, secs) in profile.iter().take(25) {
                println!(
                    "    {:<40} {:>8} calls {:>10.3} ms {:>8.1} us/call {:>5.1}%",
                    name,
                    n,
                    secs * 1e3,
                    secs * 1e6 / *n as f64,
                    100.0 * secs / total
                );
            }
        }
        let _ = std::io::stdout().flush();
    })?;
    let torch = args.compare.as_deref().map(read_torch).transpose()?;
    let mut compared = Vec::new();
    if let Some(torch) = &torch {
        println!("\n{:<44} {:>11} {:>11} {:>7}  torch variant", "case", "ours ms", "torch ms", "ratio");
        for r in results.iter().filter(|r| r.error.is_none()) {
            let Some(t) = torch.get(&reference_name(&r.name)) else { continue };
            let ratio = t.seconds / r.seconds;
            println!(
                "{:<44} {:>11.3} {:>11.3} {:>7.2}  {}",
                r.name,
                r.seconds * 1e3,
                t.seconds * 1e3,
                ratio,
                t.variant
            );
            compared.push(serde_json::json!({
                "name": r.name, "ours_s": r.seconds, "torch_s": t.seconds, "ratio": ratio,
                "tflops": r.tflops, "gbps": r.gbps, "torch_variant": t.variant,
                "ours_peak_gib": r.peak_bytes.map(|p| p as f64 / (1u64 << 30) as f64), "torch_peak_gib": t.peak_gib,
            }));
        }
        let missing: Vec<&str> = torch
            .keys()
            .filter(|k| !results.iter().any(|r| reference_name(&r.name) == **k))
            .map(|k| k.as_str())
            .collect();
        if !missing.is_empty() {
            println!("torch only (no case of ours by that name in this run): {}", missing.join(", "));
        }
    }
    if let Some(path) = &args.json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let num = |x: f64| if x.is_finite() { serde_json::json!(x) } else { serde_json::Value::Null };
                serde_json::json!({
                    "family": r.family, "name": r.name, "seconds": num(r.seconds),
                    "gbps": num(r.gbps), "tflops": num(r.tflops), "fraction_of_ceiling": r.fraction,
                    "samples_per_s": r.samples_per_s, "mfu": r.mfu,
                    "peak_gib": r.peak_bytes.map(|p| p as f64 / (1u64 << 30) as f64), "error": r.error,
                })
            })
            .collect();
        let mut doc = serde_json::json!({
            "device": device.to_string(), "size": format!("{size:?}"), "results": rows,
            "mfu_peak": mfu_peak.as_ref().map_or("measured GEMM rate".to_string(), |(_, label)| label.clone()),
        });
        if torch.is_some() {
            doc["cases"] = serde_json::Value::Array(compared);
        }
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .with_ctx(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn nominal_peaks_by_device_name() {
        use synthos_engine::bench::nominal_bf16_tflops as peak;
        assert_eq!(peak("NVIDIA H200"), Some(989.4));
        assert_eq!(peak("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(peak("NVIDIA H100 PCIe"), Some(756.5));
        assert_eq!(peak("NVIDIA H100 NVL"), Some(835.5));
        assert_eq!(peak("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(peak("NVIDIA GeForce RTX 4090"), None);
    }

    #[test]
    fn variant_tags_compare_with_the_plain_case() {
        assert_eq!(super::reference_name("attention fwd[mma128] b1 n900 h12 d128"), "attention fwd b1 n900 h12 d128");
        assert_eq!(
            super::reference_name("attention fwd+bwd[mma-det] b1 n1560 k769 h12 d128"),
            "attention fwd+bwd b1 n1560 k769 h12 d128"
        );
        assert_eq!(super::reference_name("train step 1.3b 480x480 b1"), "train step 1.3b 480x480 b1");
    }
}
