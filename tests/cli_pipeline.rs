//! `synthos-engine train` and `sample` as a user runs them: a run killed with SIGKILL and
//! resumed ends exactly where an uninterrupted run ends; samples have the requested size
//! and repeat for a seed; mistakes get readable errors.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_synthos-engine");

fn train_args(out: &Path) -> Vec<String> {
    [
        "train",
        "--device",
        "cpu",
        "--demo-images",
        "16",
        "--resolution",
        "32x32",
        "--batch-size",
        "4",
        "--epochs",
        "10",
        "--max-steps",
        "30",
        "--save-every",
        "2",
        "--validation-steps",
        "2",
        "--output",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.display().to_string()])
    .collect()
}

fn run(args: &[String]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "command failed: {text}");
    text
}

fn err(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(!out.status.success(), "expected a failure for {args:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn killed_run_resumes_to_the_same_weights_and_samples_repeat() {
    let base = common::temp_dir("cli-resume");
    let (a, b) = (base.join("a"), base.join("b"));
    ok(&run(&train_args(&a)));

    let mut child = Command::new(BIN).args(train_args(&b)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while !b.join("step-4.safetensors").exists() {
        assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!b.join("step-30.safetensors").exists(), "the run finished before it was killed");

    let mut resume = train_args(&b);
    resume.push("--resume".into());
    let text = ok(&run(&resume));
    assert!(text.contains("resuming"), "{text}");
    // The run says what it keeps in memory (the demo: the update after the pass).
    assert!(text.contains("AdamW update: after the backward pass"), "{text}");
    for step in [10, 30] {
        let name = format!("step-{step}.safetensors");
        let (x, y) = (std::fs::read(a.join(&name)).unwrap(), std::fs::read(b.join(&name)).unwrap());
        assert!(x == y, "{name} differs between the uninterrupted and the resumed run");
    }
    let metrics = synthos_engine::report::read_metrics(b.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>(), "every step logged once");
    assert!(b.join("loss.png").is_file());

    // Sampling the trained checkpoint.
    let ckpt = b.join("step-30.safetensors").display().to_string();
    let png = base.join("s.png");
    let sample = |out: &Path, seed: &str| {
        let args = [
            "sample",
            "--device",
            "cpu",
            "--checkpoint",
            &ckpt,
            "--prompt",
            "a red circle on a blue background",
            "--width",
            "48",
            "--height",
            "32",
            "--steps",
            "3",
            "--seed",
            seed,
            "-o",
        ];
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.push(out.display().to_string());
        ok(&run(&v))
    };
    sample(&png, "7");
    let img = synthos_engine::image::ImageRgb::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (48, 32));
    let again = base.join("s2.png");
    sample(&again, "7");
    assert_eq!(std::fs::read(&png).unwrap(), std::fs::read(&again).unwrap(), "same seed, same PNG");
    let other = base.join("s3.png");
    sample(&other, "8");
    assert_ne!(std::fs::read(&png).unwrap(), std::fs::read(&other).unwrap());

    // A prompts file: one image each, plus a grid.
    let prompts = base.join("prompts.txt");
    std::fs::write(&prompts, "a red circle on a blue background\n\na small white square on a green background\n")
        .unwrap();
    let out = base.join("batch.png");
    let grid = base.join("grid.png");
    let args = [
        "sample",
        "--device",
        "cpu",
        "--checkpoint",
        &ckpt,
        "--prompts-file",
        &prompts.display().to_string(),
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "2",
        "--reference",
        &b.join("demo-data/images/00000.png").display().to_string(),
        "-o",
        &out.display().to_string(),
        "--grid",
        &grid.display().to_string(),
    ];
    ok(&Command::new(BIN).args(args).output().unwrap());
    for f in ["batch-000.png", "batch-001.png", "grid.png"] {
        assert!(base.join(f).is_file(), "{f} missing");
    }
}

#[test]
fn cli_mistakes_get_readable_errors() {
    let base = common::temp_dir("cli-errors");
    let e = err(&["sample", "--device", "cpu", "--reference", "/nonexistent/ref.jpg", "--steps", "1"]);
    assert!(e.contains("/nonexistent/ref.jpg"), "{e}");
    let e = err(&["sample", "--device", "cpu", "--width", "50", "--steps", "1"]);
    assert!(e.contains("multiple of 8"), "{e}");
    let e = err(&["sample", "--device", "cpu", "--checkpoint", "/nonexistent/epoch-3.safetensors"]);
    assert!(e.contains("epoch-3.safetensors"), "{e}");
    let e = err(&["sample", "--device", "cpu", "--wan", "/nonexistent/wan"]);
    assert!(e.contains("/nonexistent/wan"), "{e}");
    let out = base.join("o").display().to_string();
    let e = err(&["train", "--device", "cpu", "--resolution", "64by64", "--output", &out]);
    assert!(e.contains("--resolution"), "{e}");
    let e = err(&["train", "--device", "cpu", "--text-dropout", "2", "--output", &out]);
    assert!(e.contains("text dropout"), "{e}");
    let e = err(&["train", "--device", "cpu", "--data", "/nonexistent/data", "--output", &out]);
    assert!(e.contains("--data needs model weights"), "{e}");
    let e = err(&["train", "--device", "cpu", "--trainable", "vae", "--output", &out]);
    assert!(e.contains("trainable"), "{e}");
    let e = err(&["train", "--device", "cpu", "--resume", "--output", &out]);
    assert!(e.contains("resume"), "{e}");
    let e = err(&["train", "--device", "cpu", "--optimizer-in-backward", "on", "--grad-accum", "2", "--output", &out]);
    assert!(e.contains("--optimizer-in-backward") && e.contains("--grad-accum"), "{e}");
}

#[test]
fn clip_train_demo_then_clip_eval() {
    let base = common::temp_dir("cli-clip");
    let out = base.join("run").display().to_string();
    let text = ok(&run(&["clip-train", "--device", "cpu", "--max-steps", "4", "--output", &out].map(String::from)));
    assert!(text.contains("zero-shot on held-out shape images") && text.contains("chance 5.56%"), "{text}");
    let ckpt = base.join("run/step-4.safetensors").display().to_string();
    let val = base.join("run/demo-data/zeroshot").display().to_string();
    let tsv = base.join("run/demo-data/train.tsv").display().to_string();
    let json = base.join("eval.json").display().to_string();
    let text = ok(&run(&[
        "clip-eval",
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--weights",
        &ckpt,
        "--images",
        &val,
        "--retrieval",
        &tsv,
        "--json",
        &json,
    ]
    .map(String::from)));
    assert!(text.contains("top-1") && text.contains("R@10"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["zero_shot"]["images"], 108);
    assert_eq!(v["retrieval"]["pairs"], 432);
    // Mistakes.
    let e = err(&["clip-eval", "--device", "cpu", "--images", &val]);
    assert!(e.contains("--weights"), "{e}");
    let e = err(&["clip-eval", "--device", "cpu", "--weights", &ckpt]);
    assert!(e.contains("nothing to evaluate"), "{e}");
    let e = err(&["clip-eval", "--device", "cpu", "--weights", &ckpt, "--images", &val]);
    assert!(e.contains("naming") || e.contains("shape"), "the default ViT-B/16 config does not fit tiny weights: {e}");
    let e =
        err(&["clip-train", "--device", "cpu", "--batch-size", "1", "--output", &base.join("b").display().to_string()]);
    assert!(e.contains("--batch-size must be at least 2"), "{e}");
    let e = err(&[
        "clip-train",
        "--device",
        "cpu",
        "--data",
        "/nonexistent/pairs.tsv",
        "--output",
        &base.join("c").display().to_string(),
    ]);
    assert!(e.contains("/nonexistent/pairs.tsv"), "{e}");
}
