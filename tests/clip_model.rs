//! The contrastive CLIP (SynthCLIP): the SLIP/SynthCLIP model code and OpenCLIP on tiny
//! random configs in float64 (fixtures from tests/reference/make_clip_fixtures.py) against
//! the f32 CPU path — embeddings, logits, loss, every gradient, one AdamW step with SLIP's
//! decay rule and clamp, the zero-shot classifier — plus configs, bad inputs, and (with a
//! GPU) the GPU against the CPU.
mod common;
use common::*;

use std::path::PathBuf;

use synthos_engine::models::clip::{
    top_k_hits, weight_decay_applies, zero_shot_classifier, zero_shot_logits, ClipAct, ClipConfig, ClipModel,
    VisionForm, LOGIT_SCALE_MAX,
};
use synthos_engine::nn::Module;
use synthos_engine::optim::{AdamW, AdamWConfig};
use synthos_engine::weights::WeightSet;
use synthos_engine::{autograd, ops, DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip").join(name)
}

/// The tiny config of the fixtures (tests/reference/make_clip_fixtures.py).
fn fixture_config(form: VisionForm) -> ClipConfig {
    let mut c = ClipConfig::tiny();
    c.embed_dim = 24;
    (c.vision.trunk.width, c.vision.trunk.heads, c.vision.trunk.mlp_dim) = (32, 1, 128);
    (c.text.trunk.width, c.text.trunk.heads, c.text.trunk.mlp_dim) = (64, 2, 256);
    c.text.vocab_size = 64;
    if form == VisionForm::OpenClip {
        c.vision.form = VisionForm::OpenClip;
        c.vision.trunk.eps = 1e-5;
        c.text.trunk.act = ClipAct::Gelu;
    }
    c
}

struct Expected(WeightSet);

impl Expected {
    fn open(name: &str) -> Expected {
        Expected(WeightSet::open(fixture(name)).unwrap())
    }
    fn vec(&self, name: &str) -> Vec<f32> {
        self.0.read_f32(name).unwrap()
    }
    fn tensor(&self, name: &str) -> Tensor {
        Tensor::from_vec(self.vec(name), self.0.shape(name).unwrap(), Device::Cpu).unwrap()
    }
    fn ids(&self, name: &str) -> (Vec<u32>, usize) {
        let v = self.vec(name);
        let rows = self.0.shape(name).unwrap()[0];
        (v.into_iter().map(|x| x as u32).collect(), rows)
    }
}

/// Relative agreement of the f32 path with the float64 reference: every element within
/// 1e-4 of the largest magnitude plus 1e-4 relative.
fn close(got: &[f32], want: &[f32], what: &str) {
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    assert_close(got, want, 1e-4 * max, 1e-4, what);
}

#[test]
fn presets_and_parameter_count() {
    let b16 = ClipConfig::synthclip_vit_b16();
    // SPEC §8: ≈149.6 M parameters.
    let n = b16.num_params();
    assert!((149_500_000..149_700_000).contains(&n), "synthclip-vit-b16 has {n} parameters");
    let tiny = ClipModel::random(&ClipConfig::tiny(), 0, Device::Cpu, DType::F32).unwrap();
    let counted: usize = tiny.named_params().iter().map(|(_, t)| t.numel()).sum();
    assert_eq!(counted, ClipConfig::tiny().num_params());
    let open = ClipModel::random(&ClipConfig::openclip_vit_b16(), 0, Device::Cpu, DType::F32);
    let counted: usize = open.unwrap().named_params().iter().map(|(_, t)| t.numel()).sum();
    assert_eq!(counted, ClipConfig::openclip_vit_b16().num_params());
    for name in ["synthclip-vit-b16", "openclip-vit-b16", "tiny"] {
        let c = ClipConfig::preset(name).unwrap();
        assert_eq!(ClipConfig::from_json(&c.to_json()).unwrap(), c, "{name} JSON round trip");
    }
    let e = ClipConfig::preset("vit-z").unwrap_err().to_string();
    assert!(e.contains("vit-z") && e.contains("synthclip-vit-b16"), "{e}");
    let e = ClipConfig::from_json(&serde_json::json!({"vision": {"heads": 5}})).unwrap_err().to_string();
    assert!(e.contains("vision.width 768") && e.contains("vision.heads 5"), "{e}");
    let e = ClipConfig::from_json(&serde_json::json!({"text": {"widht": 5}})).unwrap_err().to_string();
    assert!(e.contains("text.widht"), "{e}");
    let c = ClipConfig::from_json(&serde_json::json!({"preset": "tiny", "text": {"act": "gelu"}})).unwrap();
    assert_eq!((c.text.trunk.act, c.vision.trunk.width), (ClipAct::Gelu, 64));
}

#[test]
fn weight_decay_follows_slip() {
    assert!(weight_decay_applies("visual.blocks.0.attn.qkv.weight", &[96, 32]));
    assert!(weight_decay_applies("visual.cls_token", &[1, 1, 32]));
    assert!(weight_decay_applies("visual.pos_embed", &[1, 17, 32]));
    assert!(weight_decay_applies("token_embedding.weight", &[64, 32]));
    assert!(weight_decay_applies("positional_embedding", &[16, 32]));
    assert!(weight_decay_applies("image_projection", &[32, 24]));
    assert!(!weight_decay_applies("visual.blocks.0.attn.qkv.bias", &[96]));
    assert!(!weight_decay_applies("visual.norm.weight", &[32]));
    assert!(!weight_decay_applies("logit_scale", &[]));
    // "ln" anywhere in the name, even in a 2-D tensor's name.
    assert!(!weight_decay_applies("transformer.resblocks.0.ln_1.weight", &[32]));
    assert!(!weight_decay_applies("visual.ln_something", &[4, 4]));
}

/// Loads the SLIP fixture, runs the loss and returns (model, pixels, loss, gradients).
fn slip_forward() -> (ClipModel, Tensor, Tensor, autograd::Gradients, Expected) {
    let cfg = fixture_config(VisionForm::Timm);
    let model = ClipModel::load(&cfg, fixture("slip_tiny.safetensors"), Device::Cpu, DType::F32).unwrap();
    model.set_trainable(true);
    let exp = Expected::open("slip_tiny_expected.safetensors");
    let pixels = exp.tensor("pixels").requires_grad();
    let (ids, rows) = exp.ids("text_ids");
    let img = model.encode_image(&pixels).unwrap();
    let txt = model.encode_text(&ids, rows).unwrap();
    close(&img.to_vec().unwrap(), &exp.vec("image_embed"), "image_embed");
    close(&txt.to_vec().unwrap(), &exp.vec("text_embed"), "text_embed");
    let logits = ops::clip_logits(&img, &txt, model.logit_scale()).unwrap();
    close(&logits.to_vec().unwrap(), &exp.vec("logits"), "logits");
    let loss = ops::clip_loss(&img, &txt, model.logit_scale()).unwrap();
    let grads = autograd::backward(&loss).unwrap();
    (model, pixels, loss, grads, exp)
}

#[test]
fn slip_model_matches_synthclip_code() {
    let (model, pixels, loss, grads, exp) = slip_forward();
    close(&[loss.item().unwrap()], &exp.vec("loss"), "loss");
    close(&grads.get(&pixels).unwrap().to_vec().unwrap(), &exp.vec("grad.pixels"), "grad pixels");
    let params = model.named_params();
    assert_eq!(params.len(), exp.0.names().filter(|n| n.starts_with("grad.") && *n != "grad.pixels").count());
    for (name, t) in &params {
        let g = grads.get(t).unwrap_or_else(|| panic!("no gradient for {name}"));
        close(&g.to_vec().unwrap(), &exp.vec(&format!("grad.{name}")), &format!("grad {name}"));
    }
}

#[test]
fn slip_adamw_step_and_clamp() {
    let (model, _, _, grads, exp) = slip_forward();
    let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.5 });
    for (name, t) in model.named_params() {
        opt.add_param(&name, &t, weight_decay_applies(&name, t.shape())).unwrap();
    }
    opt.step(&grads, 1e-3, 1.0).unwrap();
    model.clamp_logit_scale().unwrap();
    for (name, t) in model.named_params() {
        let (mut got, mut want) = (t.to_vec().unwrap(), exp.vec(&format!("step.{name}")));
        if name.ends_with("attn.qkv.bias") || name.ends_with("attn.in_proj_bias") {
            // The key bias's gradient is zero in exact arithmetic (softmax ignores a shift
            // shared by all keys): both sides hold rounding noise, which Adam's first step
            // turns into ±lr. Check that it moved at most lr, and the rest exactly.
            let w = got.len() / 3;
            for (a, b) in got.drain(w..2 * w).zip(want.drain(w..2 * w)) {
                assert!((a - b).abs() <= 2.0 * 1e-3 + 1e-6, "{name}: key bias moved {a} vs {b}");
            }
        }
        close(&got, &want, &format!("after the step: {name}"));
    }
    // The clamp: above ln 100 and below 0 come back to the bounds.
    model.logit_scale().copy_from_slice(&[7.5]).unwrap();
    model.clamp_logit_scale().unwrap();
    assert_eq!(model.logit_scale().item().unwrap(), LOGIT_SCALE_MAX);
    model.logit_scale().copy_from_slice(&[-0.25]).unwrap();
    model.clamp_logit_scale().unwrap();
    assert_eq!(model.logit_scale().item().unwrap(), 0.0);
}

#[test]
fn slip_zero_shot_classifier() {
    let cfg = fixture_config(VisionForm::Timm);
    let model = ClipModel::load(&cfg, fixture("slip_tiny.safetensors"), Device::Cpu, DType::F32).unwrap();
    let exp = Expected::open("slip_tiny_expected.safetensors");
    let (ids, rows) = exp.ids("zeroshot.class_ids");
    assert_eq!(rows, 6);
    // Batches that split a class's templates must not change the result.
    for batch in [1, 4, 6] {
        let classifier = zero_shot_classifier(&model, &ids, 3, 2, batch).unwrap();
        close(&classifier.to_vec().unwrap(), &exp.vec("zeroshot.classifier"), "classifier");
        let img = autograd::no_grad(|| model.encode_image(&exp.tensor("pixels"))).unwrap();
        let logits = zero_shot_logits(&img, &classifier).unwrap();
        close(&logits.to_vec().unwrap(), &exp.vec("zeroshot.logits"), "zero-shot logits");
    }
    let e = zero_shot_classifier(&model, &ids, 3, 3, 4).unwrap_err().to_string();
    assert!(e.contains("3 classes × 3 templates"), "{e}");
}

#[test]
fn top_k_counts_ties_towards_lower_index() {
    let logits = Tensor::from_vec(vec![0.1, 0.9, 0.5, 0.5, 0.5, 0.2, 0.3, 0.3, 0.3], &[3, 3], Device::Cpu).unwrap();
    assert_eq!(top_k_hits(&logits, &[1, 1, 2], 1).unwrap(), vec![true, false, false]);
    assert_eq!(top_k_hits(&logits, &[2, 1, 2], 2).unwrap(), vec![true, true, false]);
    assert!(top_k_hits(&logits, &[3, 0, 0], 1).is_err());
}

#[test]
fn openclip_weights_load_and_match() {
    let cfg = fixture_config(VisionForm::OpenClip);
    let model = ClipModel::load(&cfg, fixture("openclip_tiny.safetensors"), Device::Cpu, DType::F32).unwrap();
    let exp = Expected::open("openclip_tiny_expected.safetensors");
    let (ids, rows) = exp.ids("text_ids");
    let img = model.encode_image(&exp.tensor("pixels")).unwrap();
    let txt = model.encode_text(&ids, rows).unwrap();
    close(&img.to_vec().unwrap(), &exp.vec("image_embed"), "OpenCLIP image_embed");
    close(&txt.to_vec().unwrap(), &exp.vec("text_embed"), "OpenCLIP text_embed");
    // The wrong layout for the file is a clear error either way.
    let e = ClipModel::load(
        &fixture_config(VisionForm::Timm),
        fixture("openclip_tiny.safetensors"),
        Device::Cpu,
        DType::F32,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("OpenCLIP naming") && e.contains("openclip_tiny.safetensors"), "{e}");
    let e = ClipModel::load(&cfg, fixture("slip_tiny.safetensors"), Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("SLIP/SynthCLIP naming"), "{e}");
}

#[test]
fn save_load_round_trip_and_module_prefix() {
    let cfg = ClipConfig::tiny();
    let model = ClipModel::random(&cfg, 7, Device::Cpu, DType::F32).unwrap();
    let dir = temp_dir("clip_model_save");
    let path = dir.join("clip.safetensors");
    model.save(&path).unwrap();
    let back = ClipModel::load(&cfg, &path, Device::Cpu, DType::F32).unwrap();
    for ((n1, a), (n2, b)) in model.named_params().iter().zip(back.named_params()) {
        assert_eq!(n1, &n2);
        assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "{n1}");
    }
    assert_eq!(model.logit_scale().item().unwrap(), synthos_engine::models::clip::LOGIT_SCALE_INIT);
    // DDP names (`module.` prefix) load too.
    let prefixed: Vec<(String, Tensor)> =
        model.named_params().into_iter().map(|(n, t)| (format!("module.{n}"), t)).collect();
    let ddp = dir.join("ddp.safetensors");
    synthos_engine::weights::save(&ddp, &prefixed, synthos_engine::weights::SaveDType::F32, None).unwrap();
    let back = ClipModel::load(&cfg, &ddp, Device::Cpu, DType::F32).unwrap();
    assert_eq!(back.prefix(), "module.");
    assert_eq!(back.logit_scale().item().unwrap(), model.logit_scale().item().unwrap());
    // A missing tensor is named.
    let partial: Vec<(String, Tensor)> =
        model.named_params().into_iter().filter(|(n, _)| n != "text_projection").collect();
    let bad = dir.join("partial.safetensors");
    synthos_engine::weights::save(&bad, &partial, synthos_engine::weights::SaveDType::F32, None).unwrap();
    let e = ClipModel::load(&cfg, &bad, Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("text_projection") && e.contains("partial.safetensors"), "{e}");
}

#[test]
fn bad_inputs_are_named_errors() {
    let cfg = ClipConfig::tiny();
    let model = ClipModel::random(&cfg, 1, Device::Cpu, DType::F32).unwrap();
    let e =
        model.encode_image(&Tensor::zeros(&[1, 3, 31, 32], DType::F32, Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("encode_image") && e.contains("[1, 3, 31, 32]"), "{e}");
    let e = model.encode_text(&[1, 2, 3], 1).unwrap_err().to_string();
    assert!(e.contains("encode_text") && e.contains("3 token ids"), "{e}");
    let mut ids = vec![0u32; 16];
    ids[3] = 49408;
    let e = model.encode_text(&ids, 1).unwrap_err().to_string();
    assert!(e.contains("token id 49408") && e.contains("position 3"), "{e}");
    let a = Tensor::zeros(&[2, 32], DType::F32, Device::Cpu).unwrap();
    let b = Tensor::zeros(&[3, 32], DType::F32, Device::Cpu).unwrap();
    let e = ops::clip_loss(&a, &b, model.logit_scale()).unwrap_err().to_string();
    assert!(e.contains("clip_loss") && e.contains("[2, 32]") && e.contains("[3, 32]"), "{e}");
    let e = ops::clip_logits(&a, &Tensor::zeros(&[2, 5], DType::F32, Device::Cpu).unwrap(), model.logit_scale())
        .unwrap_err()
        .to_string();
    assert!(e.contains("clip_logits") && e.contains("one width"), "{e}");
}

#[test]
fn clip_loss_formula_and_gradients() {
    let mut rng = synthos_engine::Rng::new(5);
    let img = randn(&[5, 7], &mut rng);
    let txt = randn(&[5, 7], &mut rng);
    let s = Tensor::from_vec(vec![1.3], &[], Device::Cpu).unwrap();
    // Against the formula in f64.
    let (iv, tv) = (img.to_vec().unwrap(), txt.to_vec().unwrap());
    let norm = |v: &[f32]| -> Vec<f64> {
        let n = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        v.iter().map(|&x| x as f64 / n).collect()
    };
    let a: Vec<Vec<f64>> = iv.chunks(7).map(norm).collect();
    let b: Vec<Vec<f64>> = tv.chunks(7).map(norm).collect();
    let scale = 1.3f64.exp();
    let l: Vec<Vec<f64>> = a
        .iter()
        .map(|r| b.iter().map(|c| scale * r.iter().zip(c).map(|(x, y)| x * y).sum::<f64>()).collect())
        .collect();
    let ce = |rows: &dyn Fn(usize, usize) -> f64| -> f64 {
        (0..5)
            .map(|i| {
                let lse = (0..5).map(|j| rows(i, j).exp()).sum::<f64>().ln();
                lse - rows(i, i)
            })
            .sum::<f64>()
            / 5.0
    };
    let want = 0.5 * (ce(&|i, j| l[i][j]) + ce(&|i, j| l[j][i]));
    let got = ops::clip_loss(&img, &txt, &s).unwrap().item().unwrap() as f64;
    assert!((got - want).abs() < 1e-5 * want.abs(), "clip_loss {got} vs {want}");
    gradcheck("clip_loss", |t| ops::clip_loss(&t[0], &t[1], &t[2]), &[img, txt, s], 1e-2, 1e-2);
}

#[test]
fn gpu_clip_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let cfg = fixture_config(VisionForm::Timm);
    let cpu = ClipModel::load(&cfg, fixture("slip_tiny.safetensors"), Device::Cpu, DType::F32).unwrap();
    let gpu_m = ClipModel::load(&cfg, fixture("slip_tiny.safetensors"), dev, DType::BF16).unwrap();
    let exp = Expected::open("slip_tiny_expected.safetensors");
    let (ids, rows) = exp.ids("text_ids");
    let pixels = exp.tensor("pixels");
    let run = |m: &ClipModel, d: Device| {
        m.set_trainable(true);
        let px = pixels.to_device(d, m.dtype()).unwrap();
        let img = m.encode_image(&px).unwrap();
        let txt = m.encode_text(&ids, rows).unwrap();
        let loss = ops::clip_loss(&img, &txt, m.logit_scale()).unwrap();
        let g = autograd::backward(&loss).unwrap();
        let grads: Vec<Vec<f32>> = m.named_params().iter().map(|(_, t)| g.get(t).unwrap().to_vec().unwrap()).collect();
        (img.to_vec().unwrap(), txt.to_vec().unwrap(), loss.item().unwrap(), grads)
    };
    let (ic, tc, lc, gc) = run(&cpu, Device::Cpu);
    let (ig, tg, lg, gg) = run(&gpu_m, dev);
    assert_bf16_close(&ig, &ic, "GPU image_embed");
    assert_bf16_close(&tg, &tc, "GPU text_embed");
    assert!((lg - lc).abs() < 0.05 * lc.abs(), "GPU loss {lg} vs CPU {lc}");
    for ((name, _), (a, b)) in cpu.named_params().iter().zip(gg.iter().zip(&gc)) {
        let err = rel_err(a, b);
        assert!(err < 0.1, "GPU gradient of {name}: relative error {err}");
    }
}

#[test]
fn slip_learning_rate_schedule() {
    use synthos_engine::train::{LoopSettings, LrSchedule};
    let exp = Expected::open("slip_tiny_expected.safetensors");
    let want = exp.vec("schedule");
    assert_eq!(want.len(), 21);
    let s = LoopSettings {
        output: temp_dir("clip_schedule"),
        batch_size: 1,
        grad_accum: 1,
        drop_last: false,
        epochs: 3,
        max_steps: None,
        lr: 5e-4,
        weight_decay: 0.5,
        adam_betas: (0.9, 0.98),
        adam_eps: 1e-8,
        warmup_steps: 7,
        warmup_from: Some(1e-6),
        lr_end: 1e-5,
        lr_schedule: LrSchedule::Cosine,
        max_grad_norm: None,
        optimizer_in_backward: false,
        seed: 0,
        save_every: None,
        keep_epochs: None,
        validate_every: None,
        log_metrics: false,
        resume: false,
        loss_title: String::new(),
    };
    let got: Vec<f32> = (0..21).map(|i| s.lr_at(i, 21) as f32).collect();
    assert_close(&got, &want, 0.0, 1e-6, "SLIP cosine_scheduler");
}

#[test]
fn adamw_clamps_a_bf16_parameter_and_its_master() {
    // On the CPU parameters are f32 (their own master); the clamp must reach both forms.
    let p = Tensor::from_vec(vec![5.0, -1.0, 2.0], &[3], Device::Cpu).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.add_param("s", &p, false).unwrap();
    opt.clamp_param("s", 0.0, LOGIT_SCALE_MAX).unwrap();
    assert_eq!(p.to_vec().unwrap(), vec![LOGIT_SCALE_MAX, 0.0, 2.0]);
    let e = opt.clamp_param("t", 0.0, 1.0).unwrap_err().to_string();
    assert!(e.contains("no parameter \"t\""), "{e}");
    if let Some(dev) = gpu() {
        let p = Tensor::from_vec(vec![5.0, -1.0, 2.0], &[3], Device::Cpu).unwrap().to_device(dev, DType::BF16).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.add_param("s", &p, false).unwrap();
        opt.clamp_param("s", 0.0, 4.0).unwrap();
        assert_eq!(p.to_vec().unwrap(), vec![4.0, 0.0, 2.0]);
        let master = opt.state_tensors().unwrap().into_iter().find(|(n, _)| n == "s.master").unwrap().1;
        assert_eq!(master.to_vec().unwrap(), vec![4.0, 0.0, 2.0]);
    }
}

#[test]
fn synthclip_pt_checkpoint_loads_directly() {
    // SynthCLIP's own checkpoint layout: a torch zip pickle, the weights under
    // `state_dict` with DDP's `module.` prefix, beside `args` and `epoch`.
    let cfg = fixture_config(VisionForm::Timm);
    let model = ClipModel::load(&cfg, fixture("slip_tiny_ddp.pt"), Device::Cpu, DType::F32).unwrap();
    let exp = Expected::open("slip_tiny_expected.safetensors");
    let (ids, rows) = exp.ids("text_ids");
    let img = model.encode_image(&exp.tensor("pixels")).unwrap();
    let txt = model.encode_text(&ids, rows).unwrap();
    close(&img.to_vec().unwrap(), &exp.vec("image_embed"), ".pt image_embed");
    close(&txt.to_vec().unwrap(), &exp.vec("text_embed"), ".pt text_embed");
}
