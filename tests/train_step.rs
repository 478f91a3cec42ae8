//! One Synthos training step — the flow-matching loss of a batch, its gradients and one
//! AdamW update — against the seed trainer's step in PyTorch (DiffSynth's
//! `FlowMatchSFTLoss` per sample, the batch mean, `torch.optim.AdamW`) on the tiny DiT of
//! tests/fixtures/wan. Fixture: `tests/reference/make_train_step_fixtures.py`.
mod common;
use common::*;

use std::path::Path;

use synthos_engine::models::wan::{Trainable, WanConfig, WanModel};
use synthos_engine::optim::{AdamW, AdamWConfig};
use synthos_engine::schedule::TrainSchedule;
use synthos_engine::train::{flow_matching_loss, flow_matching_loss_sum};
use synthos_engine::weights::WeightSet;
use synthos_engine::{autograd, ops, DType, Device, Gradients, Tensor};

const WAN: &str = "tests/fixtures/wan";
const STEP: &str = "tests/fixtures/train/step.safetensors";
const META: &str = "tests/fixtures/train/step.json";
/// Relative error allowed on the loss (f32 path against the float64 reference).
const LOSS_TOL: f64 = 1e-5;
/// Relative L2 error allowed on a gradient.
const GRAD_TOL: f64 = 1e-4;

/// The Synthos-mode tiny DiT on the CPU in f32: the committed bf16 weights with the
/// `img_emb` overlay, as tests/wan.rs loads it.
fn model() -> WanModel {
    let cfg = WanConfig::from_json_file(Path::new(WAN).join("synthos_config/config.json")).unwrap();
    let paths = [Path::new(WAN).join("wan_original.safetensors"), Path::new(WAN).join("img_emb.safetensors")];
    WanModel::load(&cfg, &paths, Device::Cpu, DType::F32).unwrap()
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(META).unwrap()).unwrap()
}

/// One reference case: its timestep indices, whether the image is kept, and the fixture.
struct Case {
    name: &'static str,
    indices: Vec<usize>,
    clip: bool,
    set: WeightSet,
}

impl Case {
    fn load(name: &'static str) -> Case {
        let m = meta();
        let c = &m["cases"][name];
        let indices = c["indices"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        Case { name, indices, clip: c["clip"].as_bool().unwrap(), set: WeightSet::open(STEP).unwrap() }
    }

    fn key(&self, what: &str) -> String {
        format!("{}.{what}", self.name)
    }

    fn floats(&self, what: &str) -> Vec<f32> {
        self.set.read_f32(&self.key(what)).unwrap()
    }

    fn tensor(&self, what: &str) -> Tensor {
        let key = self.key(what);
        Tensor::from_vec(self.set.read_f32(&key).unwrap(), self.set.shape(&key).unwrap(), Device::Cpu).unwrap()
    }

    /// x0, noise, text and the CLIP tokens (when the case keeps the image).
    fn inputs(&self) -> (Tensor, Tensor, Tensor, Option<Tensor>) {
        (self.tensor("x0"), self.tensor("noise"), self.tensor("text"), self.clip.then(|| self.tensor("clip")))
    }

    /// The batch loss of this case on `model`, with the model's parameters trainable.
    fn loss(&self, model: &WanModel) -> Tensor {
        let (x0, noise, text, clip) = self.inputs();
        flow_matching_loss(model, &TrainSchedule::new(5.0), &x0, &noise, &self.indices, &text, clip.as_ref()).unwrap()
    }
}

fn param_names() -> Vec<String> {
    meta()["params"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

fn param<'a>(params: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &params.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no parameter {name}")).1
}

fn check_rel(what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let e = rel_err(got, want);
    println!("{what}: relative error {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    e
}

/// Checks an AdamW update `new − old` against the reference's, element by element.
///
/// On a first step AdamW moves each weight by `−lr·(g/(|g|+ε) + wd·w)`: about `lr` in the
/// gradient's direction whatever the gradient's size, so a relative tolerance on the
/// gradient says nothing about the update where `|g|` is near ε (1e-8; the fixture has
/// entries down to 4e-9). The update's sensitivity is `lr·ε/(|g|+ε)²` (`g/(|g|+ε)` is
/// 1/ε-Lipschitz across zero too), so each element may differ by that times the gradient
/// difference `dg` (0 when both sides step on the same gradients), plus the rounding of
/// the f32 master weight: the decay factor `1 − lr·wd` is an f32 (off by up to 2^-24,
/// half an ulp of `w` after the product), and the product, the subtraction and `new − old`
/// round again — at most 2 ulps of the weight — and a few ulps of `lr` for the update term
/// itself. The sensitivity term is doubled for slack. Against the float64 reference an
/// update of lr = 1e-3 on a weight near 1 is thus only known to ~1e-4 relative: that is
/// f32 master weights, not an error. Returns the relative L2 error of the update vector.
fn check_update(what: &str, old: &[f32], new: &[f32], want: &[f32], grads: Option<(&[f32], &[f32])>, lr: f64) -> f64 {
    assert_eq!((old.len(), new.len()), (want.len(), want.len()), "{what}: length");
    let eps = 1e-8f64;
    let got: Vec<f32> = new.iter().zip(old).map(|(n, o)| n - o).collect();
    for i in 0..want.len() {
        let (d, r) = (got[i] as f64, want[i] as f64);
        let sens = grads.map_or(0.0, |(g, gr)| {
            let m = (g[i] as f64).abs().min((gr[i] as f64).abs());
            2.0 * lr * eps * (g[i] as f64 - gr[i] as f64).abs() / ((m + eps) * (m + eps))
        });
        let rounding = 2.0 * ulp(old[i].abs().max(new[i].abs())) + 4.0 * f32::EPSILON as f64 * lr;
        assert!(
            (d - r).abs() <= sens + rounding,
            "{what}[{i}]: update {d:e} vs reference {r:e} (allowed {:e}: {sens:e} from the gradient, {rounding:e} rounding)",
            sens + rounding
        );
    }
    let e = rel_err(&got, want);
    println!("{what}: update relative error {e:.2e}");
    e
}

/// The spacing of f32 values at `x`.
fn ulp(x: f32) -> f64 {
    let a = x.abs().max(f32::MIN_POSITIVE);
    (f32::from_bits(a.to_bits() + 1) - a) as f64
}

#[test]
fn schedule_rows_are_the_references() {
    let s = TrainSchedule::new(5.0);
    for name in ["a", "b"] {
        let case = Case::load(name);
        let (sig, t, w) = (case.floats("sigma"), case.floats("t"), case.floats("w"));
        for (k, &i) in case.indices.iter().enumerate() {
            let (s_i, t_i, w_i) = s.at(i);
            // The reference table is float32 arithmetic: σ and t to two f32 ulps; w
            // subtracts the table's minimum first, which costs it more digits.
            let rel = |a: f64, b: f32| (a - b as f64).abs() / (b as f64).abs();
            assert!(rel(s_i, sig[k]) <= 2.4e-7, "{name}: sigma of row {i}: {s_i} vs {}", sig[k]);
            assert!(rel(t_i, t[k]) <= 2.4e-7, "{name}: t of row {i}: {t_i} vs {}", t[k]);
            assert!(rel(w_i, w[k]) <= 1e-6, "{name}: w of row {i}: {w_i} vs {}", w[k]);
            assert!((t_i - 1000.0 * s_i).abs() < 1e-9);
        }
    }
}

/// Loss, gradients and one AdamW step of one case against the reference.
fn step_case(name: &'static str) {
    let case = Case::load(name);
    let m = meta();
    let model = model();
    let params = model.trainable(Trainable::All);
    let loss = case.loss(&model);
    assert_eq!(loss.shape(), &[] as &[usize]);
    check_rel(&format!("{name}: loss"), &[loss.item().unwrap()], &case.floats("loss"), LOSS_TOL);
    let grads = autograd::backward(&loss).unwrap();

    let names = param_names();
    let mut ref_grads = Vec::new();
    for p in &names {
        let got = grads.get(param(&params, p)).map(|g| g.to_vec().unwrap());
        if case.set.contains(&case.key(&format!("grad.{p}"))) {
            let want = case.floats(&format!("grad.{p}"));
            let got = got.unwrap_or_else(|| panic!("{name}: no gradient for {p}"));
            check_rel(&format!("{name}: d/d{p}"), &got, &want, GRAD_TOL);
            ref_grads.push(Some((got, want)));
        } else {
            // The image dropped: the reference's img_emb has no gradient, nor has ours.
            assert!(!case.clip && p.starts_with("img_emb."), "{name}: the fixture lacks the gradient of {p}");
            assert!(got.is_none(), "{name}: {p} got a gradient without an image");
            ref_grads.push(None);
        }
    }

    // One AdamW step over every parameter, all with weight decay (torch applies
    // weight_decay to every parameter of the group).
    let lr = m["lr"].as_f64().unwrap() as f32;
    let cfg = AdamWConfig { weight_decay: m["weight_decay"].as_f64().unwrap() as f32, ..Default::default() };
    assert_eq!((cfg.beta1, cfg.beta2, cfg.eps), (0.9, 0.999, 1e-8), "torch's defaults");
    let mut opt = AdamW::new(cfg);
    for (n, t) in &params {
        opt.add_param(n, t, true).unwrap();
    }
    let old: Vec<Vec<f32>> = names.iter().map(|p| param(&params, p).to_vec().unwrap()).collect();
    opt.step(&grads, lr, 1.0).unwrap();
    for ((p, old), g) in names.iter().zip(&old).zip(&ref_grads) {
        let new = param(&params, p).to_vec().unwrap();
        let want = case.floats(&format!("update.{p}"));
        let Some((g, gr)) = g.as_ref().map(|(a, b)| (a.as_slice(), b.as_slice())) else {
            assert!(want.iter().all(|&v| v == 0.0), "{name}: the reference moved {p}");
            assert_eq!(&new, old, "{name}: {p} has no gradient and must not move (no decay either)");
            continue;
        };
        check_update(&format!("{name}: {p}"), old, &new, &want, Some((g, gr)), lr as f64);
        // Where both gradients are ≥ 100 ε the update is ~lr·sign(g) and only the
        // weight's rounding is left (≤ ~5e-5 relative for weights near 1).
        let keep: Vec<usize> = (0..want.len()).filter(|&i| g[i].abs().min(gr[i].abs()) >= 1e-6).collect();
        assert!(keep.len() * 10 >= want.len() * 9, "{name}: {p}: most gradients are well above ε");
        let pick = |v: &[f32]| keep.iter().map(|&i| v[i]).collect::<Vec<f32>>();
        let got: Vec<f32> = new.iter().zip(old).map(|(n, o)| n - o).collect();
        let e = rel_err(&pick(&got), &pick(&want));
        println!("{name}: {p}: update relative error {e:.2e} where |g| ≥ 1e-6 ({} of {})", keep.len(), want.len());
        assert!(e <= 2e-4, "{name}: {p}: update relative error {e:.3e} where |g| ≥ 1e-6");
    }
}

#[test]
fn synthos_step_matches_the_reference() {
    step_case("a");
}

#[test]
fn image_dropped_step_matches_the_reference() {
    step_case("b");
}

/// Gradients holding the given tensors for the given parameters (one recorded node hands
/// them to the tape), so the optimizer can step on the reference's own gradients.
fn inject(pairs: Vec<(Tensor, Tensor)>) -> Gradients {
    let params: Vec<&Tensor> = pairs.iter().map(|(p, _)| p).collect();
    let grads: Vec<Tensor> = pairs.iter().map(|(_, g)| g.clone()).collect();
    let out = Tensor::scalar(0.0, Device::Cpu).unwrap();
    let out = autograd::record("inject", out, &params, Box::new(move |_| Ok(grads.into_iter().map(Some).collect())));
    autograd::backward_with(&out, Tensor::scalar(1.0, Device::Cpu).unwrap()).unwrap()
}

#[test]
fn adamw_on_the_reference_gradients_gives_the_reference_update() {
    // The optimizer alone: on the reference's gradients only f32 rounding separates the
    // two updates (see check_update).
    let m = meta();
    let lr = m["lr"].as_f64().unwrap() as f32;
    let case = Case::load("a");
    let model = model();
    let params = model.trainable(Trainable::All);
    let names = param_names();
    let mut opt =
        AdamW::new(AdamWConfig { weight_decay: m["weight_decay"].as_f64().unwrap() as f32, ..Default::default() });
    let mut pairs = Vec::new();
    for p in &names {
        let t = param(&params, p);
        opt.add_param(p, t, true).unwrap();
        let g = Tensor::from_vec(case.floats(&format!("grad.{p}")), t.shape(), Device::Cpu).unwrap();
        pairs.push((t.clone(), g));
    }
    let old: Vec<Vec<f32>> = names.iter().map(|p| param(&params, p).to_vec().unwrap()).collect();
    opt.step(&inject(pairs), lr, 1.0).unwrap();
    for (p, old) in names.iter().zip(&old) {
        let new = param(&params, p).to_vec().unwrap();
        let e = check_update(
            &format!("a: {p} (reference gradients)"),
            old,
            &new,
            &case.floats(&format!("update.{p}")),
            None,
            lr as f64,
        );
        assert!(e <= 1e-4, "{p}: update relative error {e:.3e}");
    }
}

#[test]
fn batch_loss_is_the_mean_of_the_per_sample_losses() {
    let model = model();
    let s = TrainSchedule::new(5.0);
    for name in ["a", "b"] {
        let case = Case::load(name);
        let (x0, noise, text, clip) = case.inputs();
        let want = case.floats("loss_per_sample");
        let batch = autograd::no_grad(|| {
            flow_matching_loss(&model, &s, &x0, &noise, &case.indices, &text, clip.as_ref()).unwrap().item().unwrap()
        });
        let sum = autograd::no_grad(|| {
            flow_matching_loss_sum(&model, &s, &x0, &noise, &case.indices, &text, clip.as_ref())
                .unwrap()
                .item()
                .unwrap()
        });
        let mut singles = Vec::new();
        for (b, &i) in case.indices.iter().enumerate() {
            let one = |t: &Tensor| ops::narrow(t, 0, b, 1).unwrap();
            let c = clip.as_ref().map(one);
            let l = autograd::no_grad(|| {
                flow_matching_loss(&model, &s, &one(&x0), &one(&noise), &[i], &one(&text), c.as_ref())
                    .unwrap()
                    .item()
                    .unwrap()
            });
            check_rel(&format!("{name}: loss of sample {b}"), &[l], &want[b..b + 1], LOSS_TOL);
            singles.push(l as f64);
        }
        // The same per-sample arithmetic either way: equal to f32 rounding of the sum.
        let mean = (singles[0] + singles[1]) / 2.0;
        assert!((batch as f64 - mean).abs() <= 1e-6 * mean, "{name}: batch loss {batch} vs mean of singles {mean}");
        assert!((sum as f64 - 2.0 * mean).abs() <= 1e-6 * mean, "{name}: loss sum {sum} vs {}", 2.0 * mean);
    }
}

#[test]
fn bad_inputs_are_errors() {
    let model = model();
    let s = TrainSchedule::new(5.0);
    let case = Case::load("a");
    let (x0, noise, text, clip) = case.inputs();
    let err = |indices: &[usize], noise: &Tensor| {
        flow_matching_loss(&model, &s, &x0, noise, indices, &text, clip.as_ref()).unwrap_err().to_string()
    };
    let e = err(&[37], &noise);
    assert!(e.contains("flow_matching_loss") && e.contains("1 timestep indices for a batch of 2"), "{e}");
    let e = err(&[37, 1000], &noise);
    assert!(e.contains("timestep index 1000") && e.contains("1000-step table"), "{e}");
    let short = ops::narrow(&noise, 4, 0, 9).unwrap();
    let e = err(&[37, 912], &short);
    assert!(e.contains("noise [2, 16, 1, 6, 9] differs from x0 [2, 16, 1, 6, 10]"), "{e}");
    let flat = ops::reshape(&x0, &[2, 16, 60]).unwrap();
    let e = flow_matching_loss(&model, &s, &flat, &flat, &[37, 912], &text, clip.as_ref()).unwrap_err().to_string();
    assert!(e.contains("x0 must be [B, C, F, H, W]") && e.contains("[2, 16, 60]"), "{e}");
}

/// The step as training runs it: bf16 weights on the GPU, fp32 master weights in AdamW.
/// Loss and gradients within bf16 tolerances of the float64 reference; the master's
/// update equal to the reference's wherever the gradient's sign is not in doubt.
#[test]
fn gpu_bf16_step_follows_the_reference() {
    let Some(dev) = gpu() else { return };
    let m = meta();
    let lr = m["lr"].as_f64().unwrap() as f32;
    let cfg = WanConfig::from_json_file(Path::new(WAN).join("synthos_config/config.json")).unwrap();
    let paths = [Path::new(WAN).join("wan_original.safetensors"), Path::new(WAN).join("img_emb.safetensors")];
    let model = WanModel::load(&cfg, &paths, dev, DType::BF16).unwrap();
    let params = model.trainable(Trainable::All);
    let case = Case::load("a");
    let up = |t: Tensor| t.to_device(dev, DType::F32).unwrap();
    let (x0, noise, text, clip) = case.inputs();
    let (x0, noise, text, clip) = (up(x0), up(noise), up(text), clip.map(up));
    let loss =
        flow_matching_loss(&model, &TrainSchedule::new(5.0), &x0, &noise, &case.indices, &text, clip.as_ref()).unwrap();
    // bf16 activations through two blocks (tests/wan.rs: ≤ 3e-2 on the output).
    check_rel("GPU a: loss", &[loss.item().unwrap()], &case.floats("loss"), 3e-2);
    let grads = autograd::backward(&loss).unwrap();
    let names = param_names();
    let mut ref_grads = Vec::new();
    for p in &names {
        let g = grads.get(param(&params, p)).unwrap_or_else(|| panic!("no gradient for {p}")).to_vec().unwrap();
        let want = case.floats(&format!("grad.{p}"));
        // The loss's gradient is the residual v̂ − (ε − x0), a difference of similar
        // magnitudes, which amplifies the output's bf16 error (wan.rs: ≤ 6e-2 on a
        // projection of the output).
        check_rel(&format!("GPU a: d/d{p}"), &g, &want, 1e-1);
        ref_grads.push(want);
    }
    let mut opt =
        AdamW::new(AdamWConfig { weight_decay: m["weight_decay"].as_f64().unwrap() as f32, ..Default::default() });
    for (n, t) in &params {
        opt.add_param(n, t, true).unwrap();
    }
    let old: Vec<Vec<f32>> = names.iter().map(|p| param(&params, p).to_vec().unwrap()).collect();
    opt.step(&grads, lr, 1.0).unwrap();
    let state = opt.state_tensors().unwrap();
    for ((p, old), gr) in names.iter().zip(&old).zip(&ref_grads) {
        let master = state.iter().find(|(k, _)| *k == format!("{p}.master")).expect("a bf16 parameter has a master");
        let master = master.1.to_vec().unwrap();
        let rounded: Vec<f32> = master.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        assert_eq!(param(&params, p).to_vec().unwrap(), rounded, "{p}: the bf16 weight is the rounded master");
        // Where |g| ≥ half the gradient's RMS a 1e-1 gradient error cannot flip the sign
        // (barring rare outliers, hence 99%): the update is −lr·(sign(g) + wd·w) to f32
        // rounding, as in the reference.
        let rms = (gr.iter().map(|&g| (g as f64).powi(2)).sum::<f64>() / gr.len() as f64).sqrt();
        let want = case.floats(&format!("update.{p}"));
        let sure: Vec<usize> = (0..gr.len()).filter(|&i| (gr[i] as f64).abs() >= 0.5 * rms).collect();
        let agree = sure
            .iter()
            .filter(|&&i| {
                let d = (master[i] - old[i]) as f64;
                (d - want[i] as f64).abs() <= 1e-3 * lr as f64 + 2.0 * ulp(master[i].abs().max(old[i].abs()))
            })
            .count();
        println!("GPU a: {p}: master update agrees on {agree} of {} sign-certain elements", sure.len());
        assert!(agree * 100 >= sure.len() * 99, "{p}: master update agrees on {agree} of {}", sure.len());
    }
}
