//! The trainer on the demo model: the loss falls, a resumed run equals an uninterrupted
//! one, caches change nothing, checkpoints hold what they should, bad input is reported.

mod common;

use std::path::{Path, PathBuf};

use synthos_engine::data::csv::format_record;
use synthos_engine::data::BadRowPolicy;
use synthos_engine::models::wan::Trainable;
use synthos_engine::pipeline::SynthosPipeline;
use synthos_engine::train::{CacheMode, CheckpointKeep, LrSchedule, TrainConfig, Trainer, RESUME_FILE};
use synthos_engine::weights::WeightSet;
use synthos_engine::{DType, Device};

fn pipe() -> SynthosPipeline {
    SynthosPipeline::demo(Device::Cpu, DType::F32, &[]).unwrap()
}

/// A small, fast demo run: 24 images at 32×32, batches of 6.
fn small(output: &Path) -> TrainConfig {
    TrainConfig {
        output: output.to_path_buf(),
        demo_images: 24,
        width: 32,
        height: 32,
        batch_size: 6,
        epochs: 2,
        warmup_steps: 2,
        validation_steps: 2,
        validation_prompts: vec!["a red circle on a blue background".into()],
        ..TrainConfig::demo()
    }
}

fn trainer(cfg: TrainConfig) -> Trainer {
    let mut t = Trainer::new(pipe(), cfg).unwrap();
    t.set_quiet(true);
    t
}

fn param_values(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.params().iter().map(|(n, p)| (n.clone(), p.to_vec().unwrap())).collect()
}

fn assert_same_params(a: &Trainer, b: &Trainer, what: &str) {
    for ((na, va), (nb, vb)) in param_values(a).iter().zip(param_values(b)) {
        assert_eq!(na, &nb);
        assert!(va == &vb, "{what}: parameter {na} differs");
    }
}

#[test]
fn demo_training_lowers_the_loss() {
    let dir = common::temp_dir("train-loss");
    let cfg = TrainConfig {
        demo_images: 48,
        batch_size: 8,
        epochs: 25,
        lr: 2e-3,
        lr_schedule: LrSchedule::Constant,
        ..small(&dir)
    };
    let mut t = trainer(cfg);
    let summary = t.run().unwrap();
    assert_eq!(summary.steps, 150);
    let metrics = synthos_engine::report::read_metrics(dir.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics.iter().map(|r| r["loss"].as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 150);
    let head: f64 = losses[..10].iter().sum::<f64>() / 10.0;
    let tail: f64 = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    eprintln!("loss {head:.3} → {tail:.3}");
    assert!(tail < 0.6 * head, "loss fell only from {head:.3} to {tail:.3}");
    // What a run leaves behind.
    for f in ["loss.png", "metrics.jsonl", RESUME_FILE, "epoch-24.safetensors"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    // The demo keeps its last epoch checkpoint only.
    assert!(!dir.join("epoch-23.safetensors").exists() && !dir.join("epoch-0.safetensors").exists());
    assert_eq!(summary.checkpoints, vec![dir.join("epoch-24.safetensors")]);
    assert!(summary.samples.iter().all(|p| p.is_file()) && summary.samples.len() == 2, "{:?}", summary.samples);
    for key in ["grad_norm", "samples_per_s", "lr", "mem_bytes"] {
        assert!(metrics[5][key].is_number(), "metrics lack {key}: {:?}", metrics[5]);
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let dir_a = common::temp_dir("train-a");
    let dir_b = common::temp_dir("train-b");
    let cfg = |d: &Path| TrainConfig { max_steps: Some(6), epochs: 3, ..small(d) };
    let mut a = trainer(cfg(&dir_a));
    for _ in 0..6 {
        a.train_step().unwrap();
    }
    // Run B: checkpoint after step 4, one more step, then it "dies" (dropped unsaved).
    let mut b = trainer(cfg(&dir_b));
    for _ in 0..4 {
        b.train_step().unwrap();
    }
    b.save_checkpoint("step-4").unwrap();
    b.train_step().unwrap();
    drop(b);
    let mut resumed = trainer(TrainConfig { resume: true, ..cfg(&dir_b) });
    assert_eq!(resumed.step_count(), 4);
    while resumed.step_count() < 6 {
        resumed.train_step().unwrap();
    }
    assert_same_params(&a, &resumed, "resumed vs uninterrupted");
}

#[test]
fn caches_give_the_same_training_as_recomputing() {
    let base = common::temp_dir("train-cache");
    // One data folder for every run, so that the disk cache can be shared.
    let data = base.join("data");
    synthos_engine::data::demo::generate(&data, 24, 64, 42).unwrap();
    let run = |name: &str, cache: CacheMode| {
        let cfg = TrainConfig { max_steps: Some(6), cache, data: Some(data.clone()), ..small(&base.join(name)) };
        let mut t = trainer(cfg);
        for _ in 0..6 {
            t.train_step().unwrap();
        }
        t
    };
    let off = run("off", CacheMode::Off);
    let mem = run("mem", CacheMode::Memory);
    assert_eq!(off.cache_hits(), 0);
    assert_eq!(mem.cache_hits(), 6 * 6 - 24, "epoch 2 is served from memory");
    assert_same_params(&off, &mem, "memory cache");
    let disk_dir = base.join("disk-cache");
    let first = run("disk1", CacheMode::Disk(disk_dir.clone()));
    assert_eq!(first.cache_hits(), 6 * 6 - 24);
    let files = std::fs::read_dir(&disk_dir).unwrap().count();
    assert_eq!(files, 24, "one cache file per sample");
    let second = run("disk2", CacheMode::Disk(disk_dir.clone()));
    assert_eq!(second.cache_hits(), 36, "a second run reads every sample from disk");
    assert_same_params(&off, &second, "disk cache");
}

#[test]
fn checkpoints_hold_the_trainable_tensors_in_bf16() {
    let dir = common::temp_dir("train-ckpt");
    let mut t = trainer(TrainConfig { max_steps: Some(2), trainable: Trainable::ImgEmb, ..small(&dir) });
    let before: Vec<(String, Vec<f32>)> =
        t.pipeline().dit.params().iter().map(|(n, p)| (n.clone(), p.to_vec().unwrap())).collect();
    t.train_step().unwrap();
    t.train_step().unwrap();
    let path = t.save_checkpoint("step-2").unwrap();
    // Only img_emb changed.
    for ((name, old), (_, p)) in before.iter().zip(t.pipeline().dit.params()) {
        let changed = old != &p.to_vec().unwrap();
        assert_eq!(changed, name.starts_with("img_emb."), "{name} changed: {changed}");
    }
    let file = synthos_engine::weights::WeightFile::open(&path).unwrap();
    let names: Vec<&str> = file.names().collect();
    assert_eq!(names.len(), 8, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("img_emb.proj.")), "{names:?}");
    assert!(names.iter().all(|n| file.info(n).unwrap().dtype.code() == "BF16"));
    // The checkpoint over a fresh demo model reproduces the trained projector (to bf16).
    let fresh = SynthosPipeline::demo(Device::Cpu, DType::F32, std::slice::from_ref(&path)).unwrap();
    for ((n, a), (_, b)) in t.pipeline().dit.params().iter().zip(fresh.dit.params()) {
        let (a, b) = (a.to_vec().unwrap(), b.to_vec().unwrap());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / x.abs().max(1e-3)).fold(0f32, f32::max);
        assert!(worst <= 1.0 / 128.0, "{n}: relative difference {worst} beyond bf16 rounding");
    }
    let set = WeightSet::open(dir.join(RESUME_FILE)).unwrap();
    assert!(set.contains("param/img_emb.proj.1.weight") && set.contains("img_emb.proj.1.weight.exp_avg"));
}

#[test]
fn nan_loss_stops_and_keeps_the_last_checkpoint() {
    let dir = common::temp_dir("train-nan");
    let mut t =
        trainer(TrainConfig { lr: 1e30, warmup_steps: 0, save_every: Some(1), max_steps: Some(5), ..small(&dir) });
    let err = t.run().unwrap_err().to_string();
    assert!(err.contains("not finite") && err.contains("step-"), "{err}");
    assert!(err.contains("last good checkpoint"), "{err}");
    let ckpt = dir.join("step-1.safetensors");
    assert!(ckpt.is_file());
    // The resume state is that of the last checkpoint, not of the failed step.
    let resumed = Trainer::new(
        pipe(),
        TrainConfig { resume: true, lr: 1e30, warmup_steps: 0, save_every: Some(1), max_steps: Some(5), ..small(&dir) },
    );
    assert!(resumed.is_ok_and(|r| r.step_count() >= 1));

    // The failed step's update was queued behind the device's gate before its loss was
    // read; the gate held it back: the weights in memory are the last good step's.
    let dir = common::temp_dir("train-nan-memory");
    let mut t =
        trainer(TrainConfig { lr: 1e30, warmup_steps: 0, max_steps: Some(5), log_metrics: false, ..small(&dir) });
    let bits = |t: &Trainer| -> Vec<Vec<u32>> {
        param_values(t).into_iter().map(|(_, v)| v.iter().map(|x| x.to_bits()).collect()).collect()
    };
    let mut last = bits(&t);
    let err = loop {
        match t.train_step() {
            Ok(_) => last = bits(&t),
            Err(e) => break e.to_string(),
        }
    };
    assert!(err.contains("not finite") && err.contains("were not updated"), "{err}");
    assert!(bits(&t) == last, "the failed step changed the weights in memory");
    std::fs::remove_dir_all(dir).unwrap();
}

fn write_dataset(dir: &Path, rows: &[[&str; 2]], header: [&str; 2]) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let img = synthos_engine::image::ImageRgb::filled(40, 40, [200, 30, 30]).unwrap();
    img.save_png(dir.join("images/ok.png")).unwrap();
    let mut csv = format_record(&header);
    for r in rows {
        csv.push_str(&format_record(r));
    }
    std::fs::write(dir.join("metadata.csv"), csv).unwrap();
}

fn data_cfg(dir: &Path, out: &Path) -> TrainConfig {
    TrainConfig { data: Some(dir.to_path_buf()), output: out.to_path_buf(), ..small(out) }
}

#[test]
fn bad_datasets_are_reported_with_row_and_file() {
    let base = common::temp_dir("train-bad");
    let d = base.join("cols");
    write_dataset(&d, &[["images/ok.png", "a red square"]], ["file", "caption"]);
    let err = Trainer::new(pipe(), data_cfg(&d, &base.join("o1"))).err().unwrap().to_string();
    assert!(err.contains("metadata.csv") && err.contains("video"), "{err}");

    let d = base.join("missing");
    write_dataset(&d, &[["images/ok.png", "a red square"], ["images/gone.png", "a blue circle"]], ["video", "prompt"]);
    let err = Trainer::new(pipe(), TrainConfig { bad_rows: BadRowPolicy::Stop, ..data_cfg(&d, &base.join("o2")) })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("gone.png") && err.contains("row 2"), "{err}");
    let t = Trainer::new(pipe(), data_cfg(&d, &base.join("o3"))).unwrap();
    assert_eq!(t.dataset().len(), 1);
    assert_eq!(t.dataset().skipped().len(), 1);

    let d = base.join("corrupt");
    write_dataset(&d, &[["images/ok.png", "a red square"], ["images/bad.png", "a blue circle"]], ["video", "prompt"]);
    std::fs::write(d.join("images/bad.png"), b"not a png").unwrap();
    let cfg = TrainConfig { bad_rows: BadRowPolicy::Stop, check_images: true, ..data_cfg(&d, &base.join("o4")) };
    let err = Trainer::new(pipe(), cfg).err().unwrap().to_string();
    assert!(err.contains("bad.png") && err.contains("row 2"), "{err}");
    // Without the up-front check the undecodable image stops training at its step, named.
    let mut t = trainer(TrainConfig { bad_rows: BadRowPolicy::Stop, batch_size: 2, ..data_cfg(&d, &base.join("o5")) });
    let err = t.train_step().unwrap_err().to_string();
    assert!(err.contains("bad.png") || err.contains("row 2"), "{err}");

    let d = base.join("noprompt");
    write_dataset(&d, &[["images/ok.png", "  "]], ["video", "prompt"]);
    let err = Trainer::new(pipe(), data_cfg(&d, &base.join("o6"))).err().unwrap().to_string();
    assert!(err.contains("prompt") && err.contains("row 1"), "{err}");
}

#[test]
fn run_folder_and_settings_errors() {
    let dir = common::temp_dir("train-folder");
    let err = Trainer::new(pipe(), TrainConfig { resume: true, ..small(&dir) }).err().unwrap().to_string();
    assert!(err.contains("resume") && err.contains(RESUME_FILE), "{err}");
    let mut t = trainer(TrainConfig { max_steps: Some(1), ..small(&dir) });
    t.train_step().unwrap();
    t.save_checkpoint("step-1").unwrap();
    let err = Trainer::new(pipe(), small(&dir)).err().unwrap().to_string();
    assert!(err.contains("already holds a run") && err.contains("--resume"), "{err}");
    let err = Trainer::new(pipe(), TrainConfig { resume: true, batch_size: 5, max_steps: Some(1), ..small(&dir) })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("batch_size"), "{err}");

    let other = common::temp_dir("train-settings");
    let check = |cfg: TrainConfig, want: &str| {
        let err = Trainer::new(pipe(), cfg).err().unwrap().to_string();
        assert!(err.contains(want), "expected {want:?} in {err}");
    };
    check(TrainConfig { text_dropout: 1.5, ..small(&other) }, "text dropout");
    check(TrainConfig { batch_size: 0, ..small(&other) }, "batch size");
    check(TrainConfig { width: 30, ..small(&other) }, "30×32");
    check(TrainConfig { validation_images: vec![PathBuf::from("/nonexistent/ref.png")], ..small(&other) }, "ref.png");
}

#[test]
fn micro_batches_visit_each_sample_once_per_epoch() {
    let dir = common::temp_dir("train-order");
    let t = trainer(TrainConfig { batch_size: 5, grad_accum: 2, ..small(&dir) });
    assert_eq!(t.steps_per_epoch(), 3, "24 samples in micro-batches of 5 (5 of them), 2 per step");
    for epoch in 0..2u64 {
        let mut seen = Vec::new();
        for s in 0..3 {
            for m in 0..2 {
                if let Some(b) = t.micro_batch(epoch * 3 + s, m) {
                    seen.extend(b);
                }
            }
        }
        seen.sort();
        assert_eq!(seen, (0..24).collect::<Vec<_>>());
    }
    assert_ne!(t.micro_batch(0, 0), t.micro_batch(3, 0), "epochs are shuffled differently");
}

#[test]
fn learning_rate_schedule() {
    let cfg = TrainConfig { lr: 1.0, warmup_steps: 4, lr_schedule: LrSchedule::Cosine, ..TrainConfig::demo() };
    assert!((cfg.lr_at(0, 104) - 0.25).abs() < 1e-12);
    assert!((cfg.lr_at(3, 104) - 1.0).abs() < 1e-12);
    assert!((cfg.lr_at(54, 104) - 0.5).abs() < 1e-12, "half-way through the decay");
    assert!(cfg.lr_at(103, 104) < 1e-3);
    let c = TrainConfig { lr_schedule: LrSchedule::Constant, ..cfg };
    assert_eq!(c.lr_at(90, 104), 1.0);
}

/// `--checkpoint-blocks` without checkpointing is refused with an error that says how to
/// turn it on; with it, the trainer checkpoints that many blocks.
#[test]
fn checkpoint_blocks_need_checkpointing() {
    let cfg = TrainConfig { checkpoint_blocks: Some(1), activation_checkpointing: false, ..TrainConfig::demo() };
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("--checkpoint-blocks") && e.contains("--activation-checkpointing on"), "{e}");
    let cfg = TrainConfig { checkpoint_blocks: Some(1), activation_checkpointing: true, ..TrainConfig::demo() };
    cfg.validate().unwrap();
    // The same for what checkpointed blocks keep.
    let keep = CheckpointKeep::All;
    let cfg = TrainConfig { checkpoint_keep: keep, activation_checkpointing: false, ..TrainConfig::demo() };
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("--checkpoint-keep") && e.contains("--activation-checkpointing on"), "{e}");
    let cfg = TrainConfig { checkpoint_keep: keep, activation_checkpointing: true, ..TrainConfig::demo() };
    cfg.validate().unwrap();
    assert_eq!(keep.keep(), synthos_engine::Keep { attention: true, linear: true });
    assert_eq!(CheckpointKeep::None.keep(), synthos_engine::Keep::NOTHING);
}

/// The optimizer inside the backward pass changes no weight, with activation
/// checkpointing too (each block's recompute runs after later blocks were updated); a
/// non-finite step still stops the run, and says the weights in memory were partly
/// updated.
#[test]
fn the_optimizer_inside_the_backward_pass_changes_no_weight() {
    let base = common::temp_dir("train-inside");
    let run = |name: &str, inside: bool, checkpointing: bool| {
        let cfg = TrainConfig {
            max_steps: Some(4),
            optimizer_in_backward: inside,
            activation_checkpointing: checkpointing,
            log_metrics: false,
            ..small(&base.join(name))
        };
        let mut t = trainer(cfg);
        let losses: Vec<f64> = (0..4).map(|_| t.train_step().unwrap().loss).collect();
        (t, losses)
    };
    for checkpointing in [false, true] {
        let tag = if checkpointing { "-ckpt" } else { "" };
        let (after, la) = run(&format!("after{tag}"), false, checkpointing);
        let (inside, li) = run(&format!("inside{tag}"), true, checkpointing);
        assert_eq!(la, li, "losses, checkpointing {checkpointing}");
        assert_same_params(
            &after,
            &inside,
            &format!("optimizer inside the backward pass, checkpointing {checkpointing}"),
        );
    }
    // With accumulation or clipping the recipe's preference gives way: the update runs
    // after the pass (as the loop's settings say), and training works.
    for (accum, clip) in [(2, None), (1, Some(1.0))] {
        let cfg = TrainConfig {
            optimizer_in_backward: true,
            grad_accum: accum,
            max_grad_norm: clip,
            max_steps: Some(1),
            log_metrics: false,
            ..small(&base.join(format!("accum{accum}")))
        };
        assert!(!cfg.loop_settings().optimizer_in_backward);
        trainer(cfg).train_step().unwrap();
    }

    let dir = base.join("nan");
    let mut t = trainer(TrainConfig {
        lr: 1e30,
        warmup_steps: 0,
        save_every: Some(1),
        max_steps: Some(5),
        optimizer_in_backward: true,
        ..small(&dir)
    });
    let err = t.run().unwrap_err().to_string();
    assert!(err.contains("not finite") && err.contains("partly updated") && err.contains("step-"), "{err}");
    assert!(dir.join("step-1.safetensors").is_file());
    std::fs::remove_dir_all(base).unwrap();
}

/// Every checkpointing choice keeps the rule of a step recorded as a CUDA graph (nothing
/// crosses between host and device inside it): with no dropout every batch has one
/// layout, so from the second step on the run loop's graph runner runs the loss and the
/// backward pass (each checkpointed block's recompute included) under that rule on the CPU,
/// as it records them on a GPU. Every choice of what the recompute reuses gives the losses
/// and weights of whole-block recompute bit for bit, and those of the run without
/// checkpointing up to rounding (a block's input gradient sums its parts in another order).
#[test]
fn checkpointed_steps_keep_the_recording_rule() {
    let base = common::temp_dir("train-ckpt-rule");
    let run = |name: &str, checkpointing: Option<CheckpointKeep>| {
        let cfg = TrainConfig {
            max_steps: Some(3),
            text_dropout: 0.0,
            image_dropout: 0.0,
            activation_checkpointing: checkpointing.is_some(),
            checkpoint_keep: checkpointing.unwrap_or_default(),
            log_metrics: false,
            ..small(&base.join(name))
        };
        assert!(!cfg.loop_settings().optimizer_in_backward, "the step that is recorded updates after the pass");
        let mut t = trainer(cfg);
        let start = param_values(&t);
        let losses: Vec<f64> = (0..3).map(|_| t.train_step().unwrap().loss).collect();
        (t, start, losses)
    };
    let (plain, start, plain_losses) = run("plain", None);
    let (whole, _, whole_losses) = run("whole", Some(CheckpointKeep::None));
    for (a, b) in plain_losses.iter().zip(&whole_losses) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "losses {plain_losses:?} without checkpointing, {whole_losses:?} with"
        );
    }
    common::assert_same_run(&start, &param_values(&plain), &param_values(&whole), 1e-4, "checkpointing");
    for keep in [CheckpointKeep::Attention, CheckpointKeep::Linear, CheckpointKeep::All] {
        let (t, _, losses) = run(&format!("{keep:?}"), Some(keep));
        assert_eq!(losses, whole_losses, "losses, checkpointing keeping {keep:?}");
        assert_same_params(&whole, &t, &format!("checkpointing keeping {keep:?}"));
    }
    std::fs::remove_dir_all(base).unwrap();
}

/// On a GPU (bf16 weights, fp32 masters), the update inside the backward pass moves every
/// weight as the update after it does: the same weights to within the rounding the
/// default attention backward's atomics leave run to run.
#[test]
fn gpu_optimizer_inside_the_backward_pass_matches() {
    let Some(dev) = common::gpu() else { return };
    let _shared = common::beside_recordings();
    let base = common::temp_dir("gpu-train-inside");
    let run = |name: &str, inside: bool| {
        let cfg = TrainConfig {
            max_steps: Some(3),
            optimizer_in_backward: inside,
            log_metrics: false,
            ..small(&base.join(name))
        };
        let mut t = Trainer::new(SynthosPipeline::demo(dev, DType::BF16, &[]).unwrap(), cfg).unwrap();
        t.set_quiet(true);
        let start = param_values(&t);
        for _ in 0..3 {
            t.train_step().unwrap();
        }
        (start, param_values(&t))
    };
    let (start, after) = run("after", false);
    let (_, inside) = run("inside", true);
    common::assert_same_run(&start, &after, &inside, 1e-3, "the update inside the backward pass");
    std::fs::remove_dir_all(base).unwrap();
}

/// CUDA graphs (`SYNTHOS_CUDA_GRAPHS=1`): a training step whose loss and backward pass are
/// replayed as a recorded graph moves every weight as the plain step does (to within the
/// rounding the default attention backward's atomics leave run to run), with one input
/// layout (no dropout: every step after the second replays), with the demo's dropout
/// (the batch's groups vary in size, so several layouts are recorded), and with one
/// layout and activation checkpointing (each block recomputed inside the recorded
/// backward pass, as in the 1.3B steps). GPU only.
#[test]
fn gpu_training_steps_replayed_as_graphs_match() {
    use synthos_engine::cuda::graph::with_graphs;
    let Some(dev) = common::gpu() else { return };
    let _alone = common::recording_alone();
    let base = common::temp_dir("gpu-train-graphs");
    for (dropout, checkpointing) in [(0.0, false), (0.1, false), (0.0, true)] {
        let run = |name: &str, graphs: bool| {
            let cfg = TrainConfig {
                text_dropout: dropout,
                image_dropout: dropout,
                activation_checkpointing: checkpointing,
                log_metrics: false,
                ..small(&base.join(format!("{name}-{dropout}-{checkpointing}")))
            };
            let mut t = Trainer::new(SynthosPipeline::demo(dev, DType::BF16, &[]).unwrap(), cfg).unwrap();
            t.set_quiet(true);
            let start = param_values(&t);
            let losses: Vec<f64> =
                with_graphs(graphs, || (0..8).map(|_| t.train_step().unwrap().loss).collect::<Vec<_>>());
            (start, param_values(&t), losses, t.recorded_step_graphs())
        };
        let (start, plain, plain_losses, none) = run("plain", false);
        let (_, graphed, graphed_losses, recorded) = run("graphs", true);
        assert_eq!(none, 0);
        assert!(recorded >= 1, "dropout {dropout}: no step was recorded");
        if dropout == 0.0 {
            assert_eq!(recorded, 1, "one input layout");
        }
        for (i, (a, b)) in plain_losses.iter().zip(&graphed_losses).enumerate() {
            assert!(a.is_finite() && (a - b).abs() <= 0.02 * a.abs().max(1e-3), "step {}: loss {a} vs {b}", i + 1);
        }
        common::assert_same_run(
            &start,
            &plain,
            &graphed,
            1e-3,
            &format!("graphs, dropout {dropout}, checkpointing {checkpointing}"),
        );
    }
    std::fs::remove_dir_all(base).unwrap();
}

/// A demo set size past the bound is refused by name before anything is allocated (a
/// count of 2^64 − 1 once overflowed a vector's capacity).
#[test]
fn demo_set_sizes_are_bounded() {
    for n in [0, usize::MAX, 1 << 32] {
        let e = TrainConfig { demo_images: n, ..TrainConfig::demo() }.validate().unwrap_err().to_string();
        assert!(e.contains("demo set takes 1 to 1000000 images") && e.contains(&n.to_string()), "{e}");
    }
    let e = synthos_engine::data::demo::generate(std::env::temp_dir(), usize::MAX, 64, 0).unwrap_err().to_string();
    assert!(e.contains("more than a demo set holds (1000000)"), "{e}");
}
