//! Devices, tensor construction errors, and the command line.
mod common;

use std::process::Command;
use synthos_engine::{cuda, DType, Device, Rng, Tensor};

#[test]
fn cuda_without_a_usable_gpu_is_an_error_not_a_panic() {
    let r = Tensor::zeros(&[3], DType::BF16, Device::Cuda(0));
    if cuda::is_usable(0) {
        assert_eq!(r.unwrap().to_vec().unwrap(), vec![0.0; 3]);
    } else {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("driver") || e.contains("without CUDA kernels") || e.contains("GPU"),
            "error should say what is missing: {e}"
        );
    }
    // A device far beyond any machine's count is always an error.
    let e = Tensor::zeros(&[3], DType::F32, Device::Cuda(999)).unwrap_err().to_string();
    assert!(!e.is_empty());
}

#[test]
fn device_parsing() {
    assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
    assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
    assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
    let e = Device::parse("tpu").unwrap_err().to_string();
    assert!(e.contains("\"tpu\"") && e.contains("cuda:N"), "{e}");
    let e = Device::parse("cuda:x").unwrap_err().to_string();
    assert!(e.contains("cuda:x"), "{e}");
}

#[test]
fn tensor_constructor_errors_name_the_problem() {
    let e = Tensor::from_vec(vec![1.0; 5], &[2, 3], Device::Cpu).unwrap_err().to_string();
    assert!(e.contains('5') && e.contains("[2, 3]"), "{e}");
    let e = Tensor::from_vec_dtype(vec![1.0; 6], &[2, 3], Device::Cpu, DType::BF16).unwrap_err().to_string();
    assert!(e.contains("f32") && e.contains("bf16"), "{e}");
    let t = Tensor::randn(&[2, 3], 1.0, &mut Rng::new(0), Device::Cpu).unwrap();
    let e = t.item().unwrap_err().to_string();
    assert!(e.contains("[2, 3]"), "{e}");
    let e = t.dim(5).unwrap_err().to_string();
    assert!(e.contains('5') && e.contains("[2, 3]"), "{e}");
    assert_eq!(t.dim(-1).unwrap(), 3);
}

#[test]
fn seeded_random_tensors_are_reproducible() {
    let a = Tensor::randn(&[7, 5], 1.0, &mut Rng::new(9), Device::Cpu).unwrap().to_vec().unwrap();
    let b = Tensor::randn(&[7, 5], 1.0, &mut Rng::new(9), Device::Cpu).unwrap().to_vec().unwrap();
    let c = Tensor::randn(&[7, 5], 1.0, &mut Rng::new(10), Device::Cpu).unwrap().to_vec().unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let mean = a.iter().sum::<f32>() / a.len() as f32;
    assert!(mean.abs() < 0.5, "mean {mean}");
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_synthos-engine")).args(args).output().expect("run synthos-engine")
}

#[test]
fn cli_help_lists_the_subcommands() {
    let out = cli(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["info", "bench", "train", "sample"] {
        assert!(text.contains(sub), "--help lacks {sub}:\n{text}");
    }
    let out = cli(&["bench", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--device") && text.contains("--json"), "{text}");
}

#[test]
fn cli_info_reports_the_build_and_devices() {
    let out = cli(&["info"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kernels:") && text.contains("visible GPUs:") && text.contains("default device:"), "{text}");
    assert!(text.contains("kernel choices: SYNTHOS_CUDA_ATTENTION=") && text.contains("SYNTHOS_CUDA_NORM="), "{text}");
    if !cuda::KERNEL_MODULES.is_empty() {
        assert!(text.contains("sm_90a") && text.contains("attention"), "{text}");
    }
}

#[test]
fn cli_errors_are_readable() {
    let out = cli(&["bench", "--size", "huge", "--device", "cpu"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--size") && err.contains("huge"), "{err}");
    let out = cli(&["bench", "--device", "tpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tpu"));
    let out = cli(&["train", "--device", "cpu", "--batch-size", "0", "--output", "/nonexistent/run"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error:") && err.contains("batch size"), "{err}");
}

#[test]
fn cli_bench_runs_on_the_cpu_and_writes_json() {
    let path = std::env::temp_dir().join(format!("synthos-bench-{}.json", std::process::id()));
    let out =
        cli(&["bench", "--device", "cpu", "--size", "small", "--min-seconds", "0.01", "--filter", "norm", "--json"])
            .status
            .success();
    // `--json` without a value is a usage error.
    assert!(!out);
    let out = cli(&[
        "bench",
        "--device",
        "cpu",
        "--size",
        "small",
        "--min-seconds",
        "0.01",
        "--filter",
        "rms_norm",
        "--json",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rms_norm") && !text.contains("attention fwd"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let names: Vec<&str> = json["results"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert!(
        names.iter().any(|n| n.starts_with("copy")) && names.iter().any(|n| n.starts_with("rms_norm")),
        "{names:?}"
    );
    std::fs::remove_file(&path).ok();
}

#[test]
fn cli_bench_filters_and_skips_by_family_or_name() {
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "--device", "cpu", "--size", "small", "--min-seconds", "0.01"];
        args.extend_from_slice(extra);
        let out = cli(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Two filters select the cases matching either; a skip leaves one out; the ceilings
    // run even when named, since every fraction is of them.
    let text = bench(&["--filter", "rms_norm", "--filter", "layer_norm", "--skip", "rms_norm", "--skip", "gemm"]);
    assert!(text.contains("layer_norm") && text.contains("copy") && text.contains("gemm"), "{text}");
    assert!(!text.contains("rms_norm") && !text.contains("attention"), "{text}");
    // A skip by family ("norm") leaves out every case of it.
    let text = bench(&["--filter", "norm", "--skip", "norm"]);
    assert!(!text.contains("layer_norm") && !text.contains("rms_norm") && text.contains("copy"), "{text}");
}

#[test]
fn cli_bench_times_the_demo_train_step_against_a_torch_file() {
    let dir = std::env::temp_dir().join(format!("synthos-bench-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ours, torch) = (dir.join("ours.json"), dir.join("torch.json"));
    let name = synthos_engine::bench::demo_train_step_name();
    assert_eq!(name, "train step demo 64x64 b16");
    // What `scripts/reference/bench_torch.py --device cpu` writes for the case (two variants;
    // the faster one is compared).
    let doc = serde_json::json!({"tool": "torch", "cases": [
        {"name": name, "variant": "fp32 foreach", "seconds": 2.0},
        {"name": name, "variant": "fp32 fused", "seconds": 1.0},
    ]});
    std::fs::write(&torch, doc.to_string()).unwrap();
    let out = cli(&[
        "bench",
        "--device",
        "cpu",
        "--min-seconds",
        "0.01",
        "--filter",
        "train step demo",
        "--json",
        ours.to_str().unwrap(),
        "--compare",
        torch.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("samples/s") && text.contains("fp32 fused") && !text.contains("dit fwd+bwd"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ours).unwrap()).unwrap();
    let row = json["results"].as_array().unwrap().iter().find(|r| r["name"] == name).expect("the demo case ran");
    assert!(row["error"].is_null(), "{row}");
    assert!(row["samples_per_s"].as_f64().unwrap() > 0.0 && row["tflops"].as_f64().unwrap() > 0.0, "{row}");
    // MFU: on the CPU of the measured GEMM rate; the demo step recomputes nothing, so its
    // model FLOPs are all its FLOPs and MFU equals the fraction of the GEMM ceiling.
    assert_eq!(json["mfu_peak"], "measured GEMM rate");
    let (mfu, fraction) = (row["mfu"].as_f64().unwrap(), row["fraction_of_ceiling"].as_f64().unwrap());
    assert!(mfu > 0.0 && (mfu - fraction).abs() < 1e-12 * fraction, "{row}");
    assert!(text.contains("MFU") && text.contains("over the measured GEMM rate"), "{text}");
    let cmp = &json["cases"][0];
    assert_eq!(cmp["name"], name);
    assert_eq!(cmp["torch_s"], 1.0);
    let ratio = cmp["ratio"].as_f64().unwrap();
    assert!((ratio - 1.0 / row["seconds"].as_f64().unwrap()).abs() < 1e-9, "{cmp}");
    std::fs::remove_dir_all(&dir).ok();
}
