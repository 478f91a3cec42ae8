//! The image half of the synthetic-data flywheel: `synth images` (one image per caption,
//! sharded, atomic, resumable: a run killed mid-way and rerun ends with exactly the set an
//! uninterrupted run makes, no image made twice, none lost), its `train.tsv` read back by
//! the CLIP data loader, its refusals, `synth all` end to end, and `synth demo` (the table,
//! the JSON and the resume of every stage) at a tiny budget.
mod common;
use common::temp_dir;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use synthos_engine::data::demo::DemoAttrs;
use synthos_engine::data::{CaptionDataset, CaptionOptions};
use synthos_engine::pipeline::SynthosPipeline;
use synthos_engine::synth::images::{generate_image_set, image_path, ImageSetOptions, MANIFEST, SHARD_SIZE};
use synthos_engine::{DType, Device, Result};

const BIN: &str = env!("CARGO_BIN_EXE_synthos-engine");

fn err_of<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// `n` distinct demo captions.
fn demo_captions(n: usize) -> Vec<String> {
    DemoAttrs::all().iter().step_by(7).take(n).map(DemoAttrs::caption).collect()
}

fn write_caption_file(dir: &Path, captions: &[String]) -> PathBuf {
    let mut text = String::new();
    for c in captions {
        text.push_str(&serde_json::json!({ "caption": c }).to_string());
        text.push('\n');
    }
    let p = dir.join("captions.jsonl");
    fs::write(&p, text).unwrap();
    p
}

/// Every file under `dir/images`, sorted, with its bytes.
fn image_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(shards) = fs::read_dir(dir.join("images")) else { return out };
    for shard in shards.flatten() {
        for f in fs::read_dir(shard.path()).unwrap().flatten() {
            let name = format!("{}/{}", shard.file_name().to_string_lossy(), f.file_name().to_string_lossy());
            out.push((name, fs::read(f.path()).unwrap()));
        }
    }
    out.sort();
    out
}

fn quick(batch: usize) -> ImageSetOptions {
    ImageSetOptions { steps: 2, batch_size: batch, ..ImageSetOptions::demo() }
}

fn demo_pipe() -> SynthosPipeline {
    SynthosPipeline::demo(Device::Cpu, DType::F32, &[]).unwrap()
}

#[test]
fn image_paths_are_sharded_by_the_thousand() {
    assert_eq!(image_path(0), "images/0000/0000000.png");
    assert_eq!(image_path(SHARD_SIZE - 1), "images/0000/0000999.png");
    assert_eq!(image_path(SHARD_SIZE), "images/0001/0001000.png");
    assert_eq!(image_path(1_234_567), "images/1234/1234567.png");
}

#[test]
fn a_limited_run_resumes_to_the_set_a_single_run_makes() {
    let pipe = demo_pipe();
    let captions = demo_captions(7);
    let (a, b) = (temp_dir("synth-img-a"), temp_dir("synth-img-b"));
    // One run, batch 4.
    let whole = generate_image_set(&pipe, &captions, &a, &quick(4), "demo").unwrap();
    assert_eq!((whole.made, whole.already_done, whole.remaining), (7, 0, 0));
    // Three runs of at most 3 images, batch 2: batches fall differently, images do not.
    let limited = ImageSetOptions { max_new: Some(3), ..quick(2) };
    let s1 = generate_image_set(&pipe, &captions, &b, &limited, "demo").unwrap();
    assert_eq!((s1.made, s1.already_done, s1.remaining), (3, 0, 4));
    let tsv = CaptionDataset::open(&s1.train_tsv, &CaptionOptions::default()).unwrap();
    assert_eq!(tsv.len(), 3, "train.tsv lists the images present");
    let s2 = generate_image_set(&pipe, &captions, &b, &limited, "demo").unwrap();
    assert_eq!((s2.made, s2.already_done, s2.remaining), (3, 3, 1));
    let s3 = generate_image_set(&pipe, &captions, &b, &quick(2), "demo").unwrap();
    assert_eq!((s3.made, s3.already_done, s3.remaining), (1, 6, 0));
    let s4 = generate_image_set(&pipe, &captions, &b, &quick(2), "demo").unwrap();
    assert_eq!((s4.made, s4.already_done), (0, 7), "a finished set makes nothing");
    let (fa, fb) = (image_files(&a), image_files(&b));
    assert_eq!(fa.len(), 7);
    assert!(fa == fb, "the resumed set differs from the single run's");
    // Stored at the CLIP demo's 32² from 64² images.
    let img = synthos_engine::image::ImageRgb::open(a.join(image_path(6))).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    // The pair table reads back in caption order.
    let ds = CaptionDataset::open(a.join("train.tsv"), &CaptionOptions::default()).unwrap();
    assert_eq!(ds.len(), 7);
    for (i, c) in captions.iter().enumerate() {
        assert_eq!(ds.caption(i), Some(c.as_str()));
    }
    assert_eq!(fs::read(a.join("train.tsv")).unwrap(), fs::read(b.join("train.tsv")).unwrap());
}

#[test]
fn image_seeds_follow_the_caption_index() {
    // The same caption at two indices gets two different images; a different base seed
    // changes them.
    let pipe = demo_pipe();
    let c = demo_captions(1).remove(0);
    let dir = temp_dir("synth-img-seeds");
    generate_image_set(&pipe, &[c.clone(), c.clone()], &dir, &quick(2), "demo").unwrap();
    let files = image_files(&dir);
    assert_ne!(files[0].1, files[1].1);
    let other = temp_dir("synth-img-seeds-other");
    let opts = ImageSetOptions { seed: 5, ..quick(2) };
    generate_image_set(&pipe, &[c.clone(), c], &other, &opts, "demo").unwrap();
    assert_ne!(image_files(&other)[0].1, files[0].1);
}

#[test]
fn captions_with_tabs_quotes_and_line_breaks_survive_the_pair_table() {
    let pipe = demo_pipe();
    let captions: Vec<String> = ["a red circle\twith a tab", "\"quoted\" blue square, comma", "two\nlines"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let dir = temp_dir("synth-img-tsv");
    let s = generate_image_set(&pipe, &captions, &dir, &quick(3), "demo").unwrap();
    let ds = CaptionDataset::open(&s.train_tsv, &CaptionOptions::default()).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.caption(0), Some("a red circle with a tab"));
    assert_eq!(ds.caption(1), Some("\"quoted\" blue square, comma"));
    assert_eq!(ds.caption(2), Some("two lines"));
}

#[test]
fn image_sets_refuse_other_captions_settings_and_bad_input() {
    let pipe = demo_pipe();
    let captions = demo_captions(3);
    let dir = temp_dir("synth-img-refuse");
    generate_image_set(&pipe, &captions, &dir, &quick(3), "demo").unwrap();
    let e = err_of(generate_image_set(&pipe, &demo_captions(4), &dir, &quick(3), "demo"));
    assert!(e.contains("the caption list") && e.contains("captions: 3 there, 4 now"), "{e}");
    let e = err_of(generate_image_set(&pipe, &captions, &dir, &ImageSetOptions { steps: 3, ..quick(3) }, "demo"));
    assert!(e.contains("steps: 2 there, 3 now") && e.contains("another --output"), "{e}");
    // Another generator name is allowed (a moved checkpoint), the batch size is free.
    generate_image_set(&pipe, &captions, &dir, &quick(1), "demo elsewhere").unwrap();

    let fresh = temp_dir("synth-img-bad");
    let e = err_of(generate_image_set(&pipe, &[], &fresh, &quick(1), "demo"));
    assert!(e.contains("caption list is empty"), "{e}");
    let e = err_of(generate_image_set(&pipe, &["a".into(), "  ".into()], &fresh, &quick(1), "demo"));
    assert!(e.contains("caption 1") && e.contains("empty"), "{e}");
    let e = err_of(generate_image_set(&pipe, &captions, &fresh, &ImageSetOptions { width: 60, ..quick(1) }, "demo"));
    assert!(e.contains("60") && e.contains("multiple of"), "{e}");
    let e = err_of(generate_image_set(
        &pipe,
        &captions,
        &fresh,
        &ImageSetOptions { store_size: Some(0), ..quick(1) },
        "demo",
    ));
    assert!(e.contains("--store-size"), "{e}");
    let e =
        err_of(generate_image_set(&pipe, &captions, &fresh, &ImageSetOptions { batch_size: 0, ..quick(1) }, "demo"));
    assert!(e.contains("--batch-size"), "{e}");
    // A folder with images but no manifest is not ours.
    let foreign = temp_dir("synth-img-foreign");
    fs::create_dir_all(foreign.join("images")).unwrap();
    let e = err_of(generate_image_set(&pipe, &captions, &foreign, &quick(1), "demo"));
    assert!(e.contains(MANIFEST) && e.contains("not made by synth images"), "{e}");
}

fn parse_counts(stdout: &str) -> (usize, usize) {
    let line = stdout.lines().find(|l| l.starts_with("images: ")).unwrap_or_else(|| panic!("no summary in {stdout}"));
    let nums: Vec<usize> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|t| t.parse().ok()).collect();
    (nums[0], nums[1])
}

#[test]
fn synth_images_killed_mid_run_resumes_without_duplicates_or_losses() {
    let n = 40;
    let captions = demo_captions(n);
    let dir = temp_dir("synth-img-kill");
    let file = write_caption_file(&dir, &captions);
    let args = |out: &Path| -> Vec<String> {
        [
            "synth",
            "images",
            "--captions",
            file.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--steps",
            "12",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // The uninterrupted run.
    let whole = dir.join("whole");
    let o = Command::new(BIN).args(args(&whole)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(parse_counts(&String::from_utf8_lossy(&o.stdout)), (n, 0));

    // A run killed (SIGKILL) once its first images are on disk.
    let cut = dir.join("cut");
    let mut child = Command::new(BIN).args(args(&cut)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    let finished = |d: &Path| image_files(d).iter().filter(|(name, _)| !name.contains("/.")).count();
    while finished(&cut) < 3 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = image_files(&cut);
    let done = before.iter().filter(|(name, _)| name.ends_with(".png") && !name.contains("/.")).count();
    assert!(done >= 3 && done < n, "the kill came at {done} of {n} images");
    // Every finished image is whole: it decodes and equals the uninterrupted run's.
    let reference = image_files(&whole);
    for (name, bytes) in before.iter().filter(|(name, _)| !name.contains("/.")) {
        let r = reference.iter().find(|(m, _)| m == name).unwrap();
        assert!(&r.1 == bytes, "{name} differs from the uninterrupted run's");
    }

    let o = Command::new(BIN).args(args(&cut)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (made, already) = parse_counts(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(already, done, "the rerun must skip exactly the finished images");
    assert_eq!(made, n - done, "the rerun must make exactly the missing images");
    let after = image_files(&cut);
    assert!(after.iter().all(|(name, _)| !name.contains("/.")), "temporary files left behind");
    assert!(after == reference, "the resumed set differs from the uninterrupted run's");
    assert_eq!(fs::read(cut.join("train.tsv")).unwrap(), fs::read(whole.join("train.tsv")).unwrap());
}

#[test]
fn synth_all_chains_captions_balance_and_images() {
    let dir = temp_dir("synth-all");
    fs::write(dir.join("concepts.txt"), "red circle\nblue square\n").unwrap();
    fs::write(dir.join("templates.txt"), "a large {} on a white background\na small {} on a green background\n")
        .unwrap();
    let out = dir.join("out");
    let run = |extra: &[&str]| {
        let mut args = vec!["synth", "all", "--concepts", "concepts.txt", "--templates", "templates.txt"];
        args.extend(["--output", out.to_str().unwrap(), "--steps", "2", "--t", "1", "--seed", "3", "--device", "cpu"]);
        args.extend(extra);
        Command::new(BIN).current_dir(&dir).args(&args).output().unwrap()
    };
    let o = run(&["--limit", "1"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // t = 1: each concept keeps one of its two captions on average; the draws are seeded.
    let kept = fs::read_to_string(out.join("balanced.jsonl")).unwrap().lines().count();
    assert!((1..=4).contains(&kept), "{kept} kept");
    assert!(stdout.contains("images: 1 made, 0 already there"), "{stdout}");
    assert!(out.join("captions.jsonl").is_file() && out.join("balance-report.json").is_file());
    // The rerun resumes: the same balanced captions, the remaining images.
    let o = run(&[]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains(&format!("images: {} made, 1 already there", kept - 1)), "{stdout}");
    assert!(stdout.contains("clip-train --data"), "{stdout}");
    let ds = CaptionDataset::open(out.join("train.tsv"), &CaptionOptions::default()).unwrap();
    assert_eq!(ds.len(), kept);
}

#[test]
fn synth_demo_prints_its_table_and_resumes_every_stage() {
    let dir = temp_dir("synth-demo");
    let out = dir.join("run");
    let run = || {
        Command::new(BIN)
            .args(["synth", "demo", "--output", out.to_str().unwrap(), "--device", "cpu"])
            .args(["--generator-epochs", "1", "--clip-epochs", "1", "--steps", "2"])
            .output()
            .unwrap()
    };
    let o = run();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    let n = lines.len();
    assert!(n >= 3, "{stdout}");
    assert!(lines[n - 3].starts_with("training") && lines[n - 3].contains("top-1") && lines[n - 3].contains("chance"));
    assert!(lines[n - 2].starts_with("synthetic") && lines[n - 1].starts_with("real"), "{stdout}");
    for row in &lines[n - 2..] {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], "432", "{row}");
        assert_eq!(cells[4], "5.6%", "chance top-1 of 18 classes: {row}");
        assert_eq!(cells[5], "27.8%", "chance top-5 of 18 classes: {row}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("synth-demo.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["set"], "synthetic");
    assert_eq!(rows[1]["set"], "real");
    assert_eq!(rows[0]["zero_shot_images"], 108);
    let top1 = rows[0]["top1"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&top1));
    // The generator never saw a held-out combination: its training set is the CLIP
    // training split.
    let gen = fs::read_to_string(out.join("generator-data/metadata.csv")).unwrap();
    let held_out = synthos_engine::data::demo::clip_demo_split().1;
    assert_eq!(gen.lines().count(), 1 + 432);
    assert_eq!(held_out.len(), 108);
    for a in &held_out {
        let tail = format!(",{}", a.caption());
        assert!(!gen.lines().any(|l| l.ends_with(&tail)), "{} in the generator's data", a.caption());
    }
    assert_eq!(image_files(&out.join("synthetic")).len(), 432);

    // A rerun redoes nothing and prints the same table.
    let o = run();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("generator: trained already"), "{stderr}");
    assert!(stderr.contains("0 made, 432 already there"), "{stderr}");
    assert!(stderr.contains("CLIP on synthetic pairs: trained already"), "{stderr}");
    assert!(stderr.contains("CLIP on real pairs: trained already"), "{stderr}");
    let again = String::from_utf8_lossy(&o.stdout).to_string();
    let tail = |s: &str| s.lines().rev().take(3).map(String::from).collect::<Vec<_>>();
    assert_eq!(tail(&again), tail(&stdout));
}
