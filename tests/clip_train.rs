//! CLIP training and evaluation end to end on the CPU: the demo set, accumulation that
//! keeps the whole batch's negatives (same weights as the unsplit batch), resume after a
//! stop equal to an uninterrupted run, metrics and checkpoints, zero-shot and retrieval
//! evaluation, bad data.
mod common;
use common::temp_dir;

use std::path::Path;

use synthos_engine::data::demo::{generate_clip_demo, DemoAttrs};
use synthos_engine::data::BadRowPolicy;
use synthos_engine::eval::{recall_at, retrieval_eval, zero_shot_eval, ImageFolder, ZeroShotReport};
use synthos_engine::models::clip::{ClipConfig, ClipModel};
use synthos_engine::nn::Module;
use synthos_engine::tokenizer::{ClipTokenizer, Truncation};
use synthos_engine::train::clip::{ClipTrainConfig, ClipTrainer};
use synthos_engine::{DType, Device};

/// A short run's settings on `data` into `out`.
fn short(data: &Path, out: &Path, batch: usize, accum: usize, steps: u64) -> ClipTrainConfig {
    ClipTrainConfig {
        batch_size: batch,
        accum_steps: accum,
        epochs: 0,
        max_steps: Some(steps),
        lr: 1e-3,
        warmup_steps: Some(2),
        workers: 2,
        log_metrics: true,
        ..ClipTrainConfig::synthclip(data, out)
    }
}

fn weights(m: &ClipModel) -> Vec<(String, Vec<f32>)> {
    m.named_params().into_iter().map(|(n, t)| (n, t.to_vec().unwrap())).collect()
}

#[test]
fn demo_set_holds_out_attribute_combinations() {
    let dir = temp_dir("clip_demo_set");
    let set = generate_clip_demo(&dir, 32, 3).unwrap();
    assert_eq!((set.train_pairs, set.val_images, set.classes.len()), (432, 108, 18));
    let tsv = std::fs::read_to_string(&set.train_tsv).unwrap();
    assert!(tsv.starts_with("image_path\tcaption\n"));
    assert_eq!(tsv.lines().count(), 433);
    let train: std::collections::HashSet<&str> = tsv.lines().skip(1).map(|l| l.split('\t').nth(1).unwrap()).collect();
    let held: Vec<DemoAttrs> = DemoAttrs::all().into_iter().filter(|a| !train.contains(a.caption().as_str())).collect();
    assert_eq!(held.len(), 108, "every combination is either trained on or held out");
    let folder = ImageFolder::open(&set.val_dir).unwrap();
    assert_eq!(folder.class_names(), set.classes.as_slice());
    assert_eq!(folder.items().len(), 108);
    // Six unseen images in every class, under the right class.
    for (c, name) in set.classes.iter().enumerate() {
        assert_eq!(folder.items().iter().filter(|(_, k)| *k == c).count(), 6, "{name}");
        assert_eq!(held.iter().filter(|a| format!("{} {}", a.colour.name(), a.shape.name()) == *name).count(), 6);
    }
    assert!(set.templates.iter().all(|t| t.contains("{}")) && set.templates.len() == 12);
    // Deterministic: the same call writes the same bytes.
    let again = temp_dir("clip_demo_set_again");
    let set2 = generate_clip_demo(&again, 32, 3).unwrap();
    assert_eq!(std::fs::read(&set.train_tsv).unwrap(), std::fs::read(&set2.train_tsv).unwrap());
    assert_eq!(
        std::fs::read(dir.join("train/00007.png")).unwrap(),
        std::fs::read(again.join("train/00007.png")).unwrap()
    );
}

#[test]
fn accumulation_keeps_the_whole_batch_loss_and_gradients() {
    let dir = temp_dir("clip_accum");
    let set = generate_clip_demo(dir.join("data"), 32, 1).unwrap();
    let cfg = ClipConfig::tiny();
    let mut runs = Vec::new();
    for accum in [1, 4] {
        let model = ClipModel::random(&cfg, 9, Device::Cpu, DType::F32).unwrap();
        // A large Adam epsilon keeps the update proportional to the gradient where the
        // gradient is rounding noise (the key biases' is zero in exact arithmetic), so the
        // weights compare the two runs' gradients rather than their noise's sign.
        let c = ClipTrainConfig { eps: 1e-3, ..short(&set.train_tsv, &dir.join(format!("a{accum}")), 16, accum, 2) };
        let mut t = ClipTrainer::new(model, c).unwrap();
        t.set_quiet(true);
        let s1 = t.train_step().unwrap();
        let s2 = t.train_step().unwrap();
        runs.push((s1.loss, s2.loss, weights(t.model())));
    }
    let (a, b) = (&runs[0], &runs[1]);
    assert!((a.0 - b.0).abs() < 1e-5 * a.0.abs(), "first-step loss: unsplit {} vs 4 chunks {}", a.0, b.0);
    assert!((a.1 - b.1).abs() < 1e-4 * a.1.abs(), "second-step loss: unsplit {} vs 4 chunks {}", a.1, b.1);
    for ((name, x), (_, y)) in a.2.iter().zip(&b.2) {
        let max = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() <= 1e-4 * max, "{name}: {p} vs {q} after two steps");
        }
    }
}

#[test]
fn resume_after_a_stop_equals_an_uninterrupted_run() {
    let dir = temp_dir("clip_resume");
    let set = generate_clip_demo(dir.join("data"), 32, 2).unwrap();
    let cfg = ClipConfig::tiny();
    let whole = dir.join("whole");
    let mut full = {
        let model = ClipModel::random(&cfg, 4, Device::Cpu, DType::F32).unwrap();
        let mut c = short(&set.train_tsv, &whole, 32, 1, 6);
        c.save_every = Some(3);
        ClipTrainer::new(model, c).unwrap()
    };
    full.set_quiet(true);
    let summary = full.train().unwrap();
    assert_eq!(summary.run.steps, 6);
    // The interrupted run: trained through `train()` to step 3 (the checkpoint), then resumed.
    let part = dir.join("part");
    {
        let model = ClipModel::random(&cfg, 4, Device::Cpu, DType::F32).unwrap();
        let mut c = short(&set.train_tsv, &part, 32, 1, 3);
        c.save_every = Some(3);
        let mut t = ClipTrainer::new(model, c).unwrap();
        t.set_quiet(true);
        t.train().unwrap();
    }
    let model = ClipModel::random(&cfg, 99, Device::Cpu, DType::F32).unwrap();
    let mut c = short(&set.train_tsv, &part, 32, 1, 3);
    c.max_steps = Some(6);
    c.save_every = Some(3);
    c.resume = true;
    // max_steps differs from the first part's (3): the resume state checks the data
    // layout, not the length of the run.
    let mut resumed = ClipTrainer::new(model, c).unwrap();
    resumed.set_quiet(true);
    assert_eq!(resumed.step_count(), 3);
    resumed.train().unwrap();
    for ((name, x), (_, y)) in weights(full.model()).iter().zip(weights(resumed.model())) {
        assert_eq!(x, &y, "{name} differs between the uninterrupted and the resumed run");
    }
    // The run folder: checkpoints, metrics with the CLIP figures, the loss plot.
    assert!(whole.join("step-3.safetensors").is_file() && whole.join("step-6.safetensors").is_file());
    let metrics = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(last["clip_acc"].as_f64().is_some() && last["logit_scale"].as_f64().unwrap() > 1.0, "{last}");
    assert!(whole.join("loss.png").is_file());
    // A fresh run refuses the folder, as train does.
    let model = ClipModel::random(&cfg, 4, Device::Cpu, DType::F32).unwrap();
    let e = ClipTrainer::new(model, short(&set.train_tsv, &whole, 32, 1, 6)).err().unwrap().to_string();
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn demo_training_learns_and_validates_zero_shot() {
    let dir = temp_dir("clip_demo_train");
    let set = generate_clip_demo(dir.join("data"), 32, 0).unwrap();
    let mut cfg = ClipTrainConfig::demo(&set, dir.join("run"));
    cfg.epochs = 0;
    cfg.max_steps = Some(40);
    cfg.validate_every = Some(20);
    let model = ClipModel::random(&ClipConfig::tiny(), 0, Device::Cpu, DType::F32).unwrap();
    let mut t = ClipTrainer::new(model, cfg).unwrap();
    t.set_quiet(true);
    let s = t.train().unwrap();
    let (first, last) = (s.run.first_loss.unwrap(), s.run.final_loss.unwrap());
    assert!(last < 0.8 * first, "the contrastive loss did not fall: {first} → {last}");
    let z = s.zero_shot.expect("a zero-shot report at the end");
    assert_eq!((z.images, z.classes.len()), (108, 18));
    assert!(dir.join("run/zeroshot-step-20.json").is_file() && dir.join("run/zeroshot-step-40.json").is_file());
    assert_eq!(ZeroShotReport::read(dir.join("run/zeroshot-step-40.json")).unwrap().to_json(), z.to_json());
    assert_eq!(z.per_class_top1.iter().filter(|v| v.is_finite()).count(), 18);
}

#[test]
fn zero_shot_and_retrieval_evaluation() {
    let dir = temp_dir("clip_eval");
    let set = generate_clip_demo(dir.join("data"), 32, 0).unwrap();
    let model = ClipModel::random(&ClipConfig::tiny(), 5, Device::Cpu, DType::F32).unwrap();
    let tok = ClipTokenizer::new().unwrap().with_context_length(16).unwrap();
    let folder = ImageFolder::open(&set.val_dir).unwrap();
    let r = zero_shot_eval(&model, &tok, &folder, &set.classes, &set.templates, Truncation::KeepEnd, 7, 0).unwrap();
    assert_eq!(r.images, 108);
    assert!((0.0..=100.0).contains(&r.top1) && r.top5 >= r.top1);
    // Batching does not change the result.
    let r2 = zero_shot_eval(&model, &tok, &folder, &set.classes, &set.templates, Truncation::KeepEnd, 64, 0).unwrap();
    assert_eq!(r.top1, r2.top1);
    let e = zero_shot_eval(&model, &tok, &folder, &set.classes[..3], &set.templates, Truncation::KeepEnd, 8, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 class names for 18 class folders"), "{e}");
    // A tokenizer whose rows do not fit the text tower (77 ids for 16 positions).
    let long = ClipTokenizer::new().unwrap();
    let e = zero_shot_eval(&model, &long, &folder, &set.classes, &set.templates, Truncation::KeepEnd, 8, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rows of 77 token ids") && e.contains("with_context_length(16)"), "{e}");
    // Retrieval over the first 20 pairs.
    let tsv = std::fs::read_to_string(&set.train_tsv).unwrap();
    let small: String = tsv.lines().take(21).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("data/small.tsv"), small).unwrap();
    let ds = synthos_engine::data::CaptionDataset::open(dir.join("data/small.tsv"), &Default::default()).unwrap();
    let rr = retrieval_eval(&model, &tok, &ds, Truncation::KeepEnd, 8).unwrap();
    let e = retrieval_eval(&model, &long, &ds, Truncation::KeepEnd, 8).unwrap_err().to_string();
    assert!(e.contains("16 positions"), "{e}");
    assert_eq!(rr.pairs, 20);
    assert!(rr.image_to_text[0] <= rr.image_to_text[1] && rr.image_to_text[1] <= rr.image_to_text[2]);
}

#[test]
fn recall_counts_ranks() {
    // Query 0 ranks its match first, query 1 second, query 2 third (a tie with a lower
    // index counts against it).
    let sim = [0.9, 0.1, 0.2, 0.8, 0.5, 0.1, 0.3, 0.3, 0.3];
    let r = recall_at(&sim, 3);
    assert_eq!(r, [100.0 / 3.0, 100.0, 100.0]);
}

#[test]
fn bad_data_is_named() {
    let dir = temp_dir("clip_bad");
    let set = generate_clip_demo(dir.join("data"), 32, 0).unwrap();
    let mut tsv = std::fs::read_to_string(&set.train_tsv).unwrap();
    tsv.push_str("train/missing.png\ta red circle\n");
    let bad = dir.join("data/bad.tsv");
    std::fs::write(&bad, &tsv).unwrap();
    let mut c = short(&bad, &dir.join("run"), 16, 1, 2);
    c.bad_rows = BadRowPolicy::Stop;
    let model = ClipModel::random(&ClipConfig::tiny(), 0, Device::Cpu, DType::F32).unwrap();
    let e = ClipTrainer::new(model, c).err().unwrap().to_string();
    assert!(e.contains("bad.tsv") && e.contains("434") && e.contains("missing.png"), "{e}");
    let c = ClipTrainConfig { accum_steps: 3, ..short(&set.train_tsv, &dir.join("run2"), 16, 1, 2) };
    let model = ClipModel::random(&ClipConfig::tiny(), 0, Device::Cpu, DType::F32).unwrap();
    let e = ClipTrainer::new(model, c).err().unwrap().to_string();
    assert!(e.contains("--accum-steps 3") && e.contains("--batch-size 16"), "{e}");
    // Arguments that once divided by zero or tried to start 2^32 threads.
    for (c, want) in [
        (ClipTrainConfig { save_every: Some(0), ..short(&set.train_tsv, &dir.join("run3"), 16, 1, 2) }, "--save-every"),
        (
            ClipTrainConfig { validate_every: Some(0), ..short(&set.train_tsv, &dir.join("run3"), 16, 1, 2) },
            "--validate-every",
        ),
        (
            ClipTrainConfig { workers: 1 << 32, ..short(&set.train_tsv, &dir.join("run3"), 16, 1, 2) },
            "--workers 4294967296",
        ),
    ] {
        let model = ClipModel::random(&ClipConfig::tiny(), 0, Device::Cpu, DType::F32).unwrap();
        let e = ClipTrainer::new(model, c).err().unwrap().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}

/// A training step started on a pool thread that is itself inside `no_grad` (as happens
/// when a waiting pool thread picks up another caller's step) records on a tape of its
/// own and trains; the caller's tape and recording state are as they were after.
#[test]
fn a_step_run_inside_no_grad_on_a_pool_thread_still_trains() {
    use synthos_engine::autograd;
    let dir = temp_dir("clip_isolated_step");
    let set = generate_clip_demo(dir.join("data"), 32, 2).unwrap();
    let model = ClipModel::random(&ClipConfig::tiny(), 4, Device::Cpu, DType::F32).unwrap();
    let before = weights(&model);
    let mut t = ClipTrainer::new(model, short(&set.train_tsv, &dir.join("run"), 32, 1, 2)).unwrap();
    t.set_quiet(true);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (summary, still_off) = pool.install(|| {
        autograd::no_grad(|| {
            let s = t.train();
            (s, !autograd::is_recording())
        })
    });
    assert_eq!(summary.unwrap().run.steps, 2);
    assert!(still_off, "the caller's no_grad holds after the step");
    let after = weights(t.model());
    assert!(before.iter().zip(&after).any(|(a, b)| a.1 != b.1), "the step changed the weights");
}

/// On a GPU with CUDA graphs, the CLIP step (no accumulation) is recorded once and replayed:
/// the same losses and weights as plain steps (f32 weights, so that the rounding the
/// attention backward's atomics leave from run to run stays far below the updates). GPU
/// only.
#[test]
fn gpu_clip_steps_replayed_as_graphs_match() {
    use synthos_engine::cuda::graph::with_graphs;
    let Some(dev) = common::gpu() else { return };
    let _alone = common::recording_alone();
    let dir = temp_dir("gpu_clip_graphs");
    let set = generate_clip_demo(dir.join("data"), 32, 1).unwrap();
    let run = |name: &str, graphs: bool| {
        let model = ClipModel::random(&ClipConfig::tiny(), 9, dev, DType::F32).unwrap();
        let start = weights(&model);
        let c = ClipTrainConfig { log_metrics: false, ..short(&set.train_tsv, &dir.join(name), 16, 1, 6) };
        let mut t = ClipTrainer::new(model, c).unwrap();
        t.set_quiet(true);
        let losses: Vec<f64> = with_graphs(graphs, || (0..6).map(|_| t.train_step().unwrap().loss).collect());
        (start, losses, weights(t.model()), t.recorded_step_graphs())
    };
    let (start, plain_losses, plain, none) = run("plain", false);
    let (_, graphed_losses, graphed, recorded) = run("graphs", true);
    assert_eq!((none, recorded), (0, 1), "one input layout, recorded once");
    for (i, (a, b)) in plain_losses.iter().zip(&graphed_losses).enumerate() {
        assert!(a.is_finite() && (a - b).abs() <= 1e-3 * a.abs().max(1e-3), "step {}: loss {a} vs {b}", i + 1);
    }
    common::assert_same_run(&start, &plain, &graphed, 1e-4, "CLIP steps with graphs");
    std::fs::remove_dir_all(dir).unwrap();
}
