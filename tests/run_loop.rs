//! The shared run loop with a task other than Synthos: a toy least-squares model plugged
//! in through `TrainTask` trains, checkpoints and resumes exactly as the Synthos trainer
//! does (the CLIP trainer plugs in the same way).
mod common;
use common::temp_dir;

use std::path::{Path, PathBuf};

use synthos_engine::train::{LoopSettings, LrSchedule, RunLoop, TrainTask, RESUME_FILE};
use synthos_engine::weights::{self, SaveDType};
use synthos_engine::{data, ops, Device, Result, Rng, Tensor};

/// y = x·a for a fixed `a`, learned by a 4-weight linear model.
struct Toy {
    xs: Vec<[f32; 4]>,
    ys: Vec<f32>,
    w: Tensor,
    /// A task setting a resumed run must share.
    tag: &'static str,
}

impl Toy {
    fn new() -> Toy {
        let mut rng = Rng::new(5);
        let a = [0.5f32, -1.0, 2.0, 0.25];
        let xs: Vec<[f32; 4]> = (0..37)
            .map(|_| [rng.normal() as f32, rng.normal() as f32, rng.normal() as f32, rng.normal() as f32])
            .collect();
        let ys = xs.iter().map(|x| x.iter().zip(&a).map(|(p, q)| p * q).sum()).collect();
        let w = Tensor::from_vec(vec![0.0; 4], &[4, 1], Device::Cpu).unwrap().requires_grad();
        Toy { xs, ys, w, tag: "toy" }
    }
}

impl TrainTask for Toy {
    fn dataset_len(&self) -> usize {
        self.xs.len()
    }
    fn epoch_order(&self, epoch: u64, seed: u64) -> Vec<usize> {
        data::epoch_order(self.xs.len(), epoch, seed)
    }
    fn micro_loss(&mut self, _step: u64, _micro: usize, indices: &[usize], n_step: usize) -> Result<Tensor> {
        let x: Vec<f32> = indices.iter().flat_map(|&i| self.xs[i]).collect();
        let y: Vec<f32> = indices.iter().map(|&i| self.ys[i]).collect();
        let x = Tensor::from_vec(x, &[indices.len(), 4], Device::Cpu)?;
        let y = Tensor::from_vec(y, &[indices.len(), 1], Device::Cpu)?;
        let err = ops::sub(&ops::matmul(&x, &self.w)?, &y)?;
        ops::scale(&ops::sum_all(&ops::mul(&err, &err)?)?, 1.0 / n_step as f32)
    }
    fn save_weights(&self, path: &Path) -> Result<()> {
        weights::save(path, &[("w".to_string(), self.w.clone())], SaveDType::F32, None)
    }
    fn validate(&self, _step: u64) -> Result<Vec<PathBuf>> {
        Ok(Vec::new())
    }
    fn resume_settings(&self) -> serde_json::Value {
        serde_json::json!({ "task": self.tag })
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
}

fn settings(output: &Path, max_steps: u64, resume: bool) -> LoopSettings {
    LoopSettings {
        output: output.to_path_buf(),
        batch_size: 4,
        grad_accum: 2,
        drop_last: false,
        epochs: 20,
        max_steps: Some(max_steps),
        lr: 0.1,
        weight_decay: 0.0,
        adam_betas: (0.9, 0.999),
        adam_eps: 1e-8,
        warmup_steps: 2,
        warmup_from: None,
        lr_end: 0.0,
        lr_schedule: LrSchedule::Cosine,
        max_grad_norm: Some(10.0),
        optimizer_in_backward: false,
        seed: 11,
        save_every: Some(5),
        keep_epochs: None,
        validate_every: None,
        log_metrics: true,
        resume,
        loss_title: "toy loss".into(),
    }
}

fn train(output: &Path, max_steps: u64, resume: bool, task: &mut Toy) -> synthos_engine::train::TrainSummary {
    let params = vec![("w".to_string(), task.w.clone())];
    let mut run = RunLoop::new(settings(output, max_steps, resume), params, task.dataset_len()).unwrap();
    run.set_quiet(true);
    run.start(task).unwrap();
    run.run(task).unwrap()
}

#[test]
fn a_second_task_trains_checkpoints_and_logs() {
    let dir = temp_dir("run-loop-toy");
    let mut task = Toy::new();
    let summary = train(&dir, 60, false, &mut task);
    assert_eq!(summary.steps, 60);
    let (first, last) = (summary.first_loss.unwrap(), summary.final_loss.unwrap());
    assert!(last < 0.02 * first, "loss {first} → {last}");
    // 37 samples in micro-batches of 4, two per step: 5 steps per epoch.
    for name in ["step-5", "epoch-0", "step-60", "epoch-11"] {
        assert!(dir.join(format!("{name}.safetensors")).is_file(), "{name} missing");
    }
    assert!(dir.join(RESUME_FILE).is_file() && dir.join("metrics.jsonl").is_file() && dir.join("loss.png").is_file());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_second_task_resumes_to_the_same_weights() {
    let whole = temp_dir("run-loop-whole");
    let mut a = Toy::new();
    train(&whole, 23, false, &mut a);

    // The same run stopped after 10 of its 23 steps, as a kill right after the step-10
    // checkpoint leaves it...
    let parts = temp_dir("run-loop-parts");
    let mut b = Toy::new();
    let mut run = RunLoop::new(settings(&parts, 23, false), vec![("w".into(), b.w.clone())], 37).unwrap();
    run.set_quiet(true);
    run.start(&b).unwrap();
    for _ in 0..10 {
        run.train_step(&mut b).unwrap();
    }
    run.save_checkpoint(&b, "step-10").unwrap();
    drop(run);
    // ...then resumed by a fresh task whose weights start at their initial values.
    let mut c = Toy::new();
    let s = train(&parts, 23, true, &mut c);
    assert_eq!(s.steps, 23);
    assert_eq!(c.w.to_vec().unwrap(), a.w.to_vec().unwrap(), "resumed run = uninterrupted run, bit for bit");
    let e = RunLoop::new(settings(&parts, 23, false), vec![("w".into(), c.w.clone())], 37).err().unwrap().to_string();
    assert!(e.contains("already holds a run"), "{e}");
    // A resume whose task settings differ is refused, naming the setting.
    let mut d = Toy::new();
    d.tag = "other";
    let mut run = RunLoop::new(settings(&parts, 23, true), vec![("w".into(), d.w.clone())], 37).unwrap();
    let e = run.start(&d).unwrap_err().to_string();
    assert!(e.contains("other settings") && e.contains("task"), "{e}");
    std::fs::remove_dir_all(whole).unwrap();
    std::fs::remove_dir_all(parts).unwrap();
}

/// The optimizer inside the backward pass makes the same updates as the step after it:
/// the same weights and losses, bit for bit; it refuses accumulation and clipping.
#[test]
fn the_optimizer_inside_the_backward_pass_gives_the_same_run() {
    let run_with = |inside: bool| {
        let dir = temp_dir(if inside { "run-loop-inside" } else { "run-loop-after" });
        let mut task = Toy::new();
        let s = LoopSettings {
            grad_accum: 1,
            max_grad_norm: None,
            optimizer_in_backward: inside,
            log_metrics: false,
            save_every: None,
            ..settings(&dir, 17, false)
        };
        let mut run = RunLoop::new(s, vec![("w".into(), task.w.clone())], 37).unwrap();
        run.set_quiet(true);
        run.start(&task).unwrap();
        let stats: Vec<(f64, f64)> = (0..17)
            .map(|_| {
                let st = run.train_step(&mut task).unwrap();
                (st.loss, st.grad_norm)
            })
            .collect();
        std::fs::remove_dir_all(dir).unwrap();
        (task.w.to_vec().unwrap(), stats)
    };
    let (after, after_stats) = run_with(false);
    let (inside, inside_stats) = run_with(true);
    assert_eq!(inside, after);
    for ((la, ga), (li, gi)) in after_stats.iter().zip(&inside_stats) {
        assert_eq!(la, li);
        assert!((ga - gi).abs() <= 1e-6 * ga, "gradient norm {ga} vs {gi}");
    }
    let mean = |s: &[(f64, f64)]| s.iter().map(|x| x.0).sum::<f64>() / s.len() as f64;
    assert!(mean(&after_stats[12..]) < 0.5 * mean(&after_stats[..5]), "the toy trains: {after_stats:?}");

    let dir = temp_dir("run-loop-inside-bad");
    for (accum, clip) in [(2, None), (1, Some(1.0))] {
        let s = LoopSettings {
            grad_accum: accum,
            max_grad_norm: clip,
            optimizer_in_backward: true,
            ..settings(&dir, 5, false)
        };
        let e = RunLoop::new(s, vec![("w".into(), Toy::new().w)], 37).err().unwrap().to_string();
        assert!(e.contains("gradient accumulation") && e.contains("clipping"), "{e}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Settings a user can type that the loop must refuse or bound, never divide by zero or
/// overflow on.
#[test]
fn extreme_settings_are_errors_or_bounded() {
    let dir = temp_dir("runloop-extreme");
    let task = Toy::new();
    let params = || vec![("w".to_string(), task.w.clone())];
    for (s, want) in [
        (LoopSettings { save_every: Some(0), ..settings(&dir, 3, false) }, "intervals"),
        (LoopSettings { validate_every: Some(0), ..settings(&dir, 3, false) }, "intervals"),
        (LoopSettings { batch_size: 0, ..settings(&dir, 3, false) }, "batch size"),
        (LoopSettings { grad_accum: 0, ..settings(&dir, 3, false) }, "accumulation"),
    ] {
        let e = RunLoop::new(s, params(), 37).err().expect("refused").to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    // More epochs than a step count can hold: the run ends at max_steps.
    let s = LoopSettings { epochs: u64::MAX, ..settings(&dir, 3, false) };
    assert_eq!(RunLoop::new(s, params(), 37).unwrap().total_steps(), 3);
    let s = LoopSettings { epochs: u64::MAX, max_steps: None, ..settings(&dir, 3, false) };
    assert_eq!(RunLoop::new(s, params(), 37).unwrap().total_steps(), u64::MAX);
    let s = LoopSettings { batch_size: usize::MAX, drop_last: true, ..settings(&dir, 3, false) };
    let e = RunLoop::new(s, params(), 37).err().expect("refused").to_string();
    assert!(e.contains("do not fill one step"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A damaged resume state (cut short, bytes overwritten, the settings JSON edited) is an
/// error when the run starts, never a panic.
#[test]
fn damaged_resume_states_are_errors() {
    let dir = temp_dir("run-loop-damaged-resume");
    let mut task = Toy::new();
    train(&dir, 7, false, &mut task);
    let state = std::fs::read(dir.join(RESUME_FILE)).unwrap();
    let header_len = u64::from_le_bytes(state[..8].try_into().unwrap()) as usize;
    let mut rng = Rng::new(21);
    let mut panicked = 0;
    for i in 0..300 {
        let mut b = state.clone();
        match i % 3 {
            0 => b.truncate((rng.next_u64() % b.len() as u64) as usize),
            1 => {
                for _ in 0..3 {
                    let at = 8 + (rng.next_u64() % header_len as u64) as usize;
                    b[at] = b"0123456789-:,\"{}[]e"[(rng.next_u64() % 19) as usize];
                }
            }
            _ => {
                let at = 8 + header_len + (rng.next_u64() % (b.len() - 8 - header_len) as u64) as usize;
                b[at] = rng.next_u64() as u8;
            }
        }
        std::fs::write(dir.join(RESUME_FILE), &b).unwrap();
        let task = Toy::new();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Ok(mut run) = RunLoop::new(settings(&dir, 9, true), vec![("w".into(), task.w.clone())], 37) {
                run.set_quiet(true);
                let _ = run.start(&task);
            }
        }));
        panicked += outcome.is_err() as usize;
    }
    assert_eq!(panicked, 0, "damaged resume states that panicked");
    std::fs::remove_dir_all(dir).unwrap();
}
