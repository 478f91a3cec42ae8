//! The Wan2.1 DiT with the Synthos image projector: parity with diffusers (text-only
//! path, both checkpoint namings) and DiffSynth (Synthos image path) on the fixtures of
//! `tests/reference/make_wan_fixtures.py`, loading/saving, checkpointing, errors, and
//! GPU-vs-CPU checks.
mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use synthos_engine::models::wan::names::{self, Naming};
use synthos_engine::models::wan::{Trainable, WanConfig, WanModel};
use synthos_engine::weights::{self, FileDType, SaveDType, WeightSet};
use synthos_engine::{autograd, bench, DType, Device, Gradients, Keep, Rng, Tensor};

const FIXTURES: &str = "tests/fixtures/wan";
/// Relative L2 error allowed against the float64 references on the f32 CPU path.
const PARITY: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

/// A fixture tensor as a CPU tensor.
fn read(set: &WeightSet, name: &str) -> Tensor {
    let shape = set.shape(name).unwrap().to_vec();
    Tensor::from_vec(set.read_f32(name).unwrap(), &shape, Device::Cpu).unwrap()
}

fn param<'a>(params: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &params.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no parameter {name}")).1
}

/// Checks `got` against `want` (relative L2 error ≤ `tol`), printing the error.
fn check_rel(what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let e = rel_err(got, want);
    println!("{what}: relative error {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    e
}

/// Runs one reference case: the model's forward on the fixture inputs, then the
/// gradients of `sum(out · proj)` against the stored ones.
fn parity_case(model: &WanModel, io: &str, with_clip: bool, grad_params: &[&str]) {
    let set = WeightSet::open(fixture(io)).unwrap();
    let latents = read(&set, "latents").requires_grad();
    let text = read(&set, "text").requires_grad();
    let clip = with_clip.then(|| read(&set, "clip").requires_grad());
    let timesteps = set.read_f32("timesteps").unwrap();
    let params = model.trainable(Trainable::All);

    let out = model.forward(&latents, &timesteps, &text, clip.as_ref()).unwrap();
    assert_eq!(out.shape(), set.shape("out").unwrap());
    check_rel(&format!("{io}: forward"), &out.to_vec().unwrap(), &set.read_f32("out").unwrap(), PARITY);

    let grads = autograd::backward_with(&out, read(&set, "proj")).unwrap();
    let mut inputs = vec![("latents", &latents), ("text", &text)];
    if let Some(c) = &clip {
        inputs.push(("clip", c));
    }
    for (name, t) in inputs {
        let g = grads.get(t).unwrap_or_else(|| panic!("no gradient for {name}")).to_vec().unwrap();
        check_rel(&format!("{io}: d/d{name}"), &g, &set.read_f32(&format!("grad.{name}")).unwrap(), PARITY);
    }
    for name in grad_params {
        let g = grads.get(param(&params, name)).unwrap_or_else(|| panic!("no gradient for {name}")).to_vec().unwrap();
        check_rel(&format!("{io}: d/d{name}"), &g, &set.read_f32(&format!("grad.param.{name}")).unwrap(), PARITY);
    }
}

const GRAD_PARAMS: [&str; 6] = [
    "patch_embedding.weight",
    "time_embedding.0.bias",
    "blocks.0.self_attn.q.weight",
    "blocks.1.cross_attn.k.weight",
    "blocks.1.modulation",
    "head.head.weight",
];

fn t2v_config() -> WanConfig {
    WanConfig::from_json_file(fixture("diffusers/config.json")).unwrap()
}

fn synthos_config() -> WanConfig {
    WanConfig::from_json_file(fixture("synthos_config/config.json")).unwrap()
}

#[test]
fn configs_from_json_and_presets() {
    let cfg = t2v_config();
    assert_eq!(
        (cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.num_layers, cfg.text_dim, cfg.freq_dim),
        (64, 2, 128, 2, 32, 256)
    );
    assert_eq!(cfg.clip_dim, 1280, "image_dim null means the Synthos ViT-H projector");
    assert_eq!(synthos_config(), WanConfig::tiny(), "the tiny preset is the fixtures' shape");
    let big = WanConfig::preset("wan2.1-t2v-1.3b").unwrap();
    assert_eq!((big.dim, big.ffn_dim, big.num_heads, big.num_layers, big.head_dim()), (1536, 8960, 12, 30, 128));
    // The original Wan2.1-T2V-1.3B config.json.
    let original = serde_json::json!({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06,
        "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
        "num_layers": 30, "out_dim": 16, "text_len": 512
    });
    assert_eq!(WanConfig::from_json(&original).unwrap(), big);
    let e = WanConfig::preset("wan3").unwrap_err().to_string();
    assert!(e.contains("wan3") && e.contains("tiny"), "{e}");
    let i2v = serde_json::json!({"num_attention_heads": 2, "attention_head_dim": 32, "ffn_dim": 128,
        "num_layers": 2, "text_dim": 32, "added_kv_proj_dim": 64});
    let e = WanConfig::from_json(&i2v).unwrap_err().to_string();
    assert!(e.contains("added_kv_proj_dim"), "{e}");
    let missing = serde_json::json!({"num_attention_heads": 2, "attention_head_dim": 32, "ffn_dim": 128});
    let e = WanConfig::from_json(&missing).unwrap_err().to_string();
    assert!(e.contains("num_layers"), "{e}");
    // Sizes whose product overflows, or far above any model, are named errors.
    let overflow = serde_json::json!({"num_attention_heads": 2, "attention_head_dim": u64::MAX, "ffn_dim": 128,
        "num_layers": 2, "text_dim": 32});
    let e = WanConfig::from_json(&overflow).unwrap_err().to_string();
    assert!(e.contains("attention_head_dim") && e.contains(&u64::MAX.to_string()), "{e}");
    let huge = serde_json::json!({"dim": 64, "num_heads": 2, "ffn_dim": 1u64 << 40, "num_layers": 2});
    let e = WanConfig::from_json(&huge).unwrap_err().to_string();
    assert!(e.contains("ffn_dim") && e.contains("above"), "{e}");
}

#[test]
fn naming_tables_round_trip() {
    let model = WanModel::random(&WanConfig::tiny(), 1, Device::Cpu, DType::F32).unwrap();
    let params = model.params();
    assert_eq!(params.len(), 69 + 8, "the diffusers T2V model's 69 tensors plus img_emb's 8");
    for (name, _) in &params {
        let d = names::to_diffusers(name).unwrap_or_else(|| panic!("{name} has no diffusers name"));
        assert_eq!(names::from_diffusers(&d).as_deref(), Some(name.as_str()), "{name} -> {d}");
    }
    assert_eq!(names::to_diffusers("blocks.17.norm3.bias").unwrap(), "blocks.17.norm2.bias");
    assert_eq!(names::to_diffusers("blocks.3.modulation").unwrap(), "blocks.3.scale_shift_table");
    assert_eq!(names::to_diffusers("head.modulation").unwrap(), "scale_shift_table");
    assert_eq!(names::to_diffusers("blocks.0.cross_attn.k_img.weight").unwrap(), "blocks.0.attn2.add_k_proj.weight");
    assert_eq!(names::from_diffusers("blocks.0.attn1.to_out.0.weight").unwrap(), "blocks.0.self_attn.o.weight");
    assert!(names::from_diffusers("blocks.x.attn1.to_q.weight").is_none());
    let diffusers = WeightSet::open(fixture("diffusers")).unwrap();
    let original = WeightSet::open(fixture("wan_original.safetensors")).unwrap();
    let img = WeightSet::open(fixture("img_emb.safetensors")).unwrap();
    assert_eq!(names::detect(diffusers.names()), Naming::Diffusers);
    assert_eq!(names::detect(original.names()), Naming::Original);
    assert_eq!(names::detect(img.names()), Naming::Original);
}

#[test]
fn parity_text_only_diffusers_naming_sharded() {
    let model = WanModel::load(&t2v_config(), &[fixture("diffusers")], Device::Cpu, DType::F32).unwrap();
    parity_case(&model, "t2v_io.safetensors", false, &GRAD_PARAMS);
}

#[test]
fn parity_text_only_original_naming() {
    let model = WanModel::load(&t2v_config(), &[fixture("wan_original.safetensors")], Device::Cpu, DType::F32).unwrap();
    parity_case(&model, "t2v_io.safetensors", false, &GRAD_PARAMS);
}

#[test]
fn parity_synthos_image_path() {
    let paths = [fixture("wan_original.safetensors"), fixture("img_emb.safetensors")];
    let model = WanModel::load(&synthos_config(), &paths, Device::Cpu, DType::F32).unwrap();
    assert!(model.load_notes().is_empty(), "img_emb comes from the overlay: {:?}", model.load_notes());
    let mut grads: Vec<&str> = GRAD_PARAMS.to_vec();
    grads.extend(["img_emb.proj.1.weight", "img_emb.proj.0.weight"]);
    parity_case(&model, "synthos_io.safetensors", true, &grads);
}

#[test]
fn mixed_namings_layer_in_order() {
    // Diffusers base weights with a Synthos partial checkpoint in original naming on top.
    let cfg = synthos_config();
    let a =
        WanModel::load(&cfg, &[fixture("diffusers"), fixture("img_emb.safetensors")], Device::Cpu, DType::F32).unwrap();
    let b = WanModel::load(
        &cfg,
        &[fixture("wan_original.safetensors"), fixture("img_emb.safetensors")],
        Device::Cpu,
        DType::F32,
    )
    .unwrap();
    // The index file itself opens like its directory.
    let index = fixture("diffusers/diffusion_pytorch_model.safetensors.index.json");
    let c = WanModel::load(&cfg, &[index, fixture("img_emb.safetensors")], Device::Cpu, DType::F32).unwrap();
    for (((na, ta), (nb, tb)), (_, tc)) in a.params().iter().zip(b.params()).zip(c.params()) {
        assert_eq!(na, &nb);
        assert_eq!(ta.to_vec().unwrap(), tb.to_vec().unwrap(), "{na}");
        assert_eq!(ta.to_vec().unwrap(), tc.to_vec().unwrap(), "{na}");
    }
    // An original-naming file over a diffusers one shadows the diffusers keys it renames.
    let dir = temp_dir("wan-mixed");
    let q = Tensor::full(&[64, 64], 0.5, DType::F32, Device::Cpu).unwrap();
    weights::save(dir.join("q.safetensors"), &[("blocks.1.self_attn.q.weight".into(), q)], SaveDType::F32, None)
        .unwrap();
    let paths = [fixture("diffusers"), fixture("img_emb.safetensors"), dir.join("q.safetensors")];
    let c = WanModel::load(&cfg, &paths, Device::Cpu, DType::F32).unwrap();
    let params = c.params();
    assert!(param(&params, "blocks.1.self_attn.q.weight").to_vec().unwrap().iter().all(|&v| v == 0.5));
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn img_emb_absent_is_created_and_logged() {
    // The T2V config has image_dim null: the ViT-H projector, 1280 → 64.
    let model = WanModel::load(&t2v_config(), &[fixture("wan_original.safetensors")], Device::Cpu, DType::F32).unwrap();
    let notes = model.load_notes();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("img_emb") && notes[0].contains("1280") && notes[0].contains("N(0, 0.02)"), "{notes:?}");
    let params = model.params();
    let values = |n: &str| param(&params, n).to_vec().unwrap();
    assert_eq!(param(&params, "img_emb.proj.1.weight").shape(), [1280, 1280]);
    assert_eq!(param(&params, "img_emb.proj.3.weight").shape(), [64, 1280]);
    for n in ["img_emb.proj.0.weight", "img_emb.proj.4.weight"] {
        assert!(values(n).iter().all(|&v| v == 1.0), "{n}: ones");
    }
    for n in ["img_emb.proj.0.bias", "img_emb.proj.1.bias", "img_emb.proj.3.bias", "img_emb.proj.4.bias"] {
        assert!(values(n).iter().all(|&v| v == 0.0), "{n}: zeros");
    }
    for n in ["img_emb.proj.1.weight", "img_emb.proj.3.weight"] {
        let v = values(n);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!(mean.abs() < 2e-3 && (std - 0.02).abs() < 1e-3, "{n}: mean {mean}, std {std}");
    }
    // The rest is the checkpoint's: the text-only output still matches diffusers.
    let set = WeightSet::open(fixture("t2v_io.safetensors")).unwrap();
    let out =
        model.forward(&read(&set, "latents"), &set.read_f32("timesteps").unwrap(), &read(&set, "text"), None).unwrap();
    check_rel("created img_emb, text-only forward", &out.to_vec().unwrap(), &set.read_f32("out").unwrap(), PARITY);
}

#[test]
fn overlay_replaces_exactly_its_tensors() {
    let dir = temp_dir("wan-overlay");
    let cfg = WanConfig::tiny();
    let base = WanModel::random(&cfg, 3, Device::Cpu, DType::F32).unwrap();
    base.save(dir.join("base.safetensors"), Trainable::All).unwrap();
    let other = WanModel::random(&cfg, 4, Device::Cpu, DType::F32).unwrap();
    let replaced = ["img_emb.proj.1.weight", "blocks.0.self_attn.q.weight", "head.modulation", "blocks.1.ffn.2.bias"];
    let partial: Vec<(String, Tensor)> =
        other.params().into_iter().filter(|(n, _)| replaced.contains(&n.as_str())).collect();
    weights::save(dir.join("epoch-0.safetensors"), &partial, SaveDType::BF16, None).unwrap();

    let plain = WanModel::load(&cfg, &[dir.join("base.safetensors")], Device::Cpu, DType::F32).unwrap();
    let layered =
        WanModel::load(&cfg, &[dir.join("base.safetensors"), dir.join("epoch-0.safetensors")], Device::Cpu, DType::F32)
            .unwrap();
    let epoch = WeightSet::open(dir.join("epoch-0.safetensors")).unwrap();
    let mut seen = 0;
    for ((name, t), (_, p)) in layered.params().iter().zip(plain.params()) {
        let got = t.to_vec().unwrap();
        if replaced.contains(&name.as_str()) {
            assert_eq!(got, epoch.read_f32(name).unwrap(), "{name} comes from the overlay");
            assert_ne!(got, p.to_vec().unwrap(), "{name} changed");
            seen += 1;
        } else {
            assert_eq!(got, p.to_vec().unwrap(), "{name} is the base's");
        }
    }
    assert_eq!(seen, replaced.len());
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn save_and_reload_round_trips() {
    let dir = temp_dir("wan-save");
    let cfg = synthos_config();
    let paths = [fixture("wan_original.safetensors"), fixture("img_emb.safetensors")];
    let model = WanModel::load(&cfg, &paths, Device::Cpu, DType::F32).unwrap();
    // The fixture values are bf16 numbers, so a bf16 save is exact.
    model.save(dir.join("all.safetensors"), Trainable::All).unwrap();
    let all = WeightSet::open(dir.join("all.safetensors")).unwrap();
    assert_eq!(all.len(), model.params().len());
    assert_eq!(all.shape("patch_embedding.weight").unwrap(), [64, 16, 1, 2, 2], "saved in the conv shape");
    assert!(all.names().all(|n| all.dtype_of(n).unwrap() == FileDType::BF16));
    let reloaded = WanModel::load(&cfg, &[dir.join("all.safetensors")], Device::Cpu, DType::F32).unwrap();
    for ((name, a), (_, b)) in model.params().iter().zip(reloaded.params()) {
        assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "{name}");
    }
    // The image-projector-only recipe saves img_emb.* alone, in original naming.
    model.save(dir.join("img.safetensors"), Trainable::ImgEmb).unwrap();
    let img = WeightSet::open(dir.join("img.safetensors")).unwrap();
    let fixture_img = WeightSet::open(fixture("img_emb.safetensors")).unwrap();
    assert_eq!(img.names().collect::<Vec<_>>(), fixture_img.names().collect::<Vec<_>>());
    for n in img.names() {
        assert_eq!(img.read_f32(n).unwrap(), fixture_img.read_f32(n).unwrap(), "{n}");
    }
    let e = model.save(dir.join("none.safetensors"), Trainable::Nothing).unwrap_err().to_string();
    assert!(e.contains("Nothing"), "{e}");
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn trainable_selects_parameters() {
    let model = WanModel::random(&WanConfig::tiny(), 5, Device::Cpu, DType::F32).unwrap();
    let img = model.trainable(Trainable::ImgEmb);
    assert_eq!(img.len(), 8);
    assert!(img.iter().all(|(n, t)| n.starts_with("img_emb.") && t.is_tracked()));
    assert!(model.params().iter().filter(|(n, _)| !n.starts_with("img_emb.")).all(|(_, t)| !t.is_tracked()));
    // Only img_emb trains: gradients reach it through every block's cross-attention.
    let mut rng = Rng::new(6);
    let latents = randn(&[1, 16, 1, 4, 6], &mut rng);
    let out = model.forward(&latents, &[500.0], &randn(&[1, 3, 32], &mut rng), Some(&randn(&[1, 5, 32], &mut rng)));
    let out = out.unwrap();
    let grads = autograd::backward_with(&out, randn(out.shape(), &mut rng)).unwrap();
    assert_eq!(grads.len(), 8, "gradients for img_emb only");
    for (n, t) in &img {
        assert!(grads.get(t).unwrap().to_vec().unwrap().iter().any(|&v| v != 0.0), "{n}");
    }
    assert_eq!(model.trainable(Trainable::All).len(), model.params().len());
    assert!(model.trainable(Trainable::Nothing).is_empty());
    assert!(model.params().iter().all(|(_, t)| !t.is_tracked()));
}

/// Inputs and gradients of one forward/backward on `model`: velocity, then the
/// gradients of the inputs and of every parameter, in a fixed order.
fn forward_backward(model: &WanModel, device: Device, seed: u64) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    let mut rng = Rng::new(seed);
    let to = |t: Tensor| t.to_device(device, DType::F32).unwrap().requires_grad();
    let latents = to(randn(&[2, 16, 1, 6, 10], &mut rng));
    let text = to(randn(&[2, 7, 32], &mut rng));
    let clip = to(randn(&[2, 11, 32], &mut rng));
    let proj = randn(&[2, 16, 1, 6, 10], &mut rng);
    let params = model.trainable(Trainable::All);
    let out = model.forward(&latents, &[937.5, 12.0], &text, Some(&clip)).unwrap();
    let proj = proj.to_device(device, out.dtype()).unwrap();
    let grads: Gradients = autograd::backward_with(&out, proj).unwrap();
    let mut all = Vec::new();
    for (name, t) in [("latents", &latents), ("text", &text), ("clip", &clip)] {
        all.push((name.to_string(), grads.get(t).unwrap().to_vec().unwrap()));
    }
    for (name, t) in &params {
        let g = grads.get(t).unwrap_or_else(|| panic!("no gradient for {name}"));
        all.push((name.clone(), g.to_vec().unwrap()));
    }
    (out.to_vec().unwrap(), all)
}

/// The sampler's forward with the context's cross-attention keys and values computed once
/// (`cross_kv`) gives exactly the forward on the context, image tokens included, step after
/// step on the same cache; a cache made for another batch is refused with a clear error.
#[test]
fn cached_cross_attention_keys_and_values_match_the_context() {
    let cfg = WanConfig::tiny();
    let model = WanModel::random(&cfg, 12, Device::Cpu, DType::F32).unwrap();
    let mut rng = Rng::new(13);
    let text = randn(&[2, 7, 32], &mut rng);
    let clip = randn(&[2, 11, 32], &mut rng);
    let context = model.context(&text, Some(&clip)).unwrap();
    let kv = model.cross_kv(&context).unwrap();
    for (step, t) in [[937.5f32, 937.5], [12.0, 480.0]].iter().enumerate() {
        let latents = randn(&[2, 16, 1, 6, 10], &mut rng);
        let want = model.forward_with_context(&latents, t, &context).unwrap().to_vec().unwrap();
        let got = model.forward_with_cross_kv(&latents, t, &kv).unwrap().to_vec().unwrap();
        assert_close(&got, &want, 0.0, 0.0, &format!("step {step}: cached keys and values"));
    }
    let first = synthos_engine::ops::narrow(&text, 0, 0, 1).unwrap();
    let one = model.cross_kv(&model.context(&first, None).unwrap()).unwrap();
    let err = model.forward_with_cross_kv(&randn(&[2, 16, 1, 6, 10], &mut rng), &[1.0, 1.0], &one).unwrap_err();
    assert!(err.to_string().contains("cached cross-attention keys and values for a batch of 1"), "{err}");
}

#[test]
fn checkpointed_blocks_match_plain() {
    let cfg = WanConfig::tiny();
    let mut model = WanModel::random(&cfg, 8, Device::Cpu, DType::F32).unwrap();
    let (out, grads) = forward_backward(&model, Device::Cpu, 9);
    // Every block, then only the first (`--checkpoint-blocks 1`).
    let blocks = cfg.num_layers;
    assert!(blocks >= 2, "the tiny config needs two blocks for a partial case");
    for n in [blocks, 1] {
        model.set_checkpointing(true);
        model.set_checkpointed_blocks(n);
        assert_eq!(model.checkpointed_blocks(), n);
        let (out_c, grads_c) = forward_backward(&model, Device::Cpu, 9);
        assert_close(&out_c, &out, 0.0, 0.0, &format!("forward, {n} blocks checkpointed"));
        // Gradients are summed in another order (per block, then across blocks): f32 rounding.
        for ((name, a), (_, b)) in grads_c.iter().zip(&grads) {
            let e = rel_err(a, b);
            assert!(e < 1e-6, "{n} blocks checkpointed: d/d{name}: relative error {e:e}");
        }
    }
    model.set_checkpointed_blocks(usize::MAX);
    assert_eq!(model.checkpointed_blocks(), blocks, "clamped to the block count");

    // Selective checkpointing: what the blocks keep changes no value (the recompute reuses
    // exactly what it would have computed), so the results equal plain checkpointing's bit
    // for bit.
    let (out_c, grads_c) = forward_backward(&model, Device::Cpu, 9);
    let mut reused = Vec::new();
    for (attention, linear) in [(true, false), (false, true), (true, true)] {
        model.set_checkpoint_keep(Keep { attention, linear });
        assert_eq!(model.checkpoint_keep(), Keep { attention, linear });
        let before = autograd::kept_outputs_reused();
        let (out_k, grads_k) = forward_backward(&model, Device::Cpu, 9);
        reused.push(autograd::kept_outputs_reused() - before);
        let what = format!("keeping attention {attention}, linear {linear}");
        assert_close(&out_k, &out_c, 0.0, 0.0, &format!("forward, {what}"));
        for ((name, a), (_, b)) in grads_k.iter().zip(&grads_c) {
            assert_close(a, b, 0.0, 0.0, &format!("{what}: d/d{name}"));
        }
    }
    // Two attentions per block (self, cross) and more linears; "all" reuses both.
    assert_eq!(reused[0], 2 * blocks, "attention outputs reused: {reused:?}");
    assert!(reused[1] > reused[0] && reused[2] == reused[0] + reused[1], "outputs reused: {reused:?}");
}

#[test]
fn odd_grids_and_batches() {
    // Batch 3, a 3×7 token grid over 2 frames, text-only: runs and keeps the shape; each
    // sample is independent of the others.
    let model = WanModel::random(&WanConfig::tiny(), 10, Device::Cpu, DType::F32).unwrap();
    let mut rng = Rng::new(11);
    let latents = randn(&[3, 16, 2, 6, 14], &mut rng);
    let text = randn(&[3, 5, 32], &mut rng);
    let t = [999.0, 500.5, 1.0];
    let out = model.forward(&latents, &t, &text, None).unwrap();
    assert_eq!(out.shape(), [3, 16, 2, 6, 14]);
    let one = |i: usize| -> Vec<f32> {
        let l = synthos_engine::ops::narrow(&latents, 0, i, 1).unwrap();
        let x = synthos_engine::ops::narrow(&text, 0, i, 1).unwrap();
        model.forward(&l, &t[i..i + 1], &x, None).unwrap().to_vec().unwrap()
    };
    let all = out.to_vec().unwrap();
    let n = all.len() / 3;
    for i in 0..3 {
        assert_close(&one(i), &all[i * n..(i + 1) * n], 1e-5, 1e-5, &format!("sample {i}"));
    }
}

#[test]
fn bad_inputs_are_errors() {
    let model = WanModel::random(&WanConfig::tiny(), 12, Device::Cpu, DType::F32).unwrap();
    let mut rng = Rng::new(13);
    let text = randn(&[1, 4, 32], &mut rng);
    let e = model.forward(&randn(&[1, 16, 1, 5, 6], &mut rng), &[1.0], &text, None).unwrap_err().to_string();
    assert!(e.contains("latents") && e.contains("[1, 16, 1, 5, 6]"), "{e}");
    let e = model.forward(&randn(&[1, 8, 1, 4, 6], &mut rng), &[1.0], &text, None).unwrap_err().to_string();
    assert!(e.contains("latents"), "{e}");
    let latents = randn(&[1, 16, 1, 4, 6], &mut rng);
    let e = model.forward(&latents, &[1.0, 2.0], &text, None).unwrap_err().to_string();
    assert!(e.contains("2 timesteps") && e.contains("batch of 1"), "{e}");
    let e = model.forward(&latents, &[1.0], &randn(&[1, 4, 31], &mut rng), None).unwrap_err().to_string();
    assert!(e.contains("text") && e.contains("31"), "{e}");
    let clip = randn(&[1, 5, 30], &mut rng);
    let e = model.forward(&latents, &[1.0], &text, Some(&clip)).unwrap_err().to_string();
    assert!(e.contains("clip_tokens") && e.contains("[1, 5, 30]"), "{e}");
    let big = randn(&[1, 16, 1, 2, 2050], &mut rng);
    let e = model.forward(&big, &[1.0], &text, None).unwrap_err().to_string();
    assert!(e.contains("rope_max_seq_len"), "{e}");
}

/// Writes the original-naming fixture with `edit` applied to its tensor list.
fn edited_checkpoint(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let set = WeightSet::open(fixture("wan_original.safetensors")).unwrap();
    let mut tensors: Vec<(String, Tensor)> = set.names().map(|n| (n.to_string(), read(&set, n))).collect();
    edit(&mut tensors);
    let path = dir.join("edited.safetensors");
    weights::save(&path, &tensors, SaveDType::BF16, None).unwrap();
    path
}

#[test]
fn loading_errors_name_the_tensor_or_file() {
    let dir = temp_dir("wan-errors");
    let cfg = t2v_config();
    let load =
        |p: &Path| WanModel::load(&cfg, &[p], Device::Cpu, DType::F32).err().expect("load must fail").to_string();

    let path = edited_checkpoint(&dir, |t| {
        let i = t.iter().position(|(n, _)| n == "blocks.1.ffn.0.weight").unwrap();
        t[i].1 = Tensor::zeros(&[128, 63], DType::F32, Device::Cpu).unwrap();
    });
    let e = load(&path);
    assert!(
        e.contains("mis-shaped 'blocks.1.ffn.0.weight'") && e.contains("[128, 64]") && e.contains("[128, 63]"),
        "{e}"
    );

    let path = edited_checkpoint(&dir, |t| t.retain(|(n, _)| n != "blocks.0.cross_attn.norm_k.weight"));
    let e = load(&path);
    assert!(e.contains("missing 'blocks.0.cross_attn.norm_k.weight'"), "{e}");

    let path = edited_checkpoint(&dir, |t| {
        t.push(("blocks.0.cross_attn.k_img.weight".into(), Tensor::zeros(&[64, 64], DType::F32, Device::Cpu).unwrap()))
    });
    let e = load(&path);
    assert!(e.contains("unexpected 'blocks.0.cross_attn.k_img.weight'"), "{e}");

    let junk = dir.join("notes.safetensors");
    fs::write(&junk, b"this is not a safetensors file at all").unwrap();
    let e = load(&junk);
    assert!(e.contains("notes.safetensors") && e.contains("not a safetensors file"), "{e}");

    // A missing diffusers tensor is named in diffusers naming.
    let diffusers = dir.join("diffusers");
    fs::create_dir_all(&diffusers).unwrap();
    let set = WeightSet::open(fixture("diffusers")).unwrap();
    let tensors: Vec<(String, Tensor)> =
        set.names().filter(|n| *n != "proj_out.bias").map(|n| (n.to_string(), read(&set, n))).collect();
    weights::save(diffusers.join("model.safetensors"), &tensors, SaveDType::BF16, None).unwrap();
    let e = load(&diffusers);
    assert!(e.contains("missing 'proj_out.bias'"), "{e}");

    let e = WanModel::load::<&Path>(&cfg, &[], Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("no weight files"), "{e}");
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn gpu_matches_cpu_tiny() {
    let Some(dev) = gpu() else { return };
    let cfg = WanConfig::tiny();
    let paths = [fixture("wan_original.safetensors"), fixture("img_emb.safetensors")];
    let cpu_model = WanModel::load(&cfg, &paths, Device::Cpu, DType::F32).unwrap();
    let (out_c, grads_c) = forward_backward(&cpu_model, Device::Cpu, 21);
    let all = Keep { attention: true, linear: true };
    for (checkpointing, keep) in [(false, Keep::NOTHING), (true, Keep::NOTHING), (true, all)] {
        let mut gpu_model = WanModel::load(&cfg, &paths, dev, DType::BF16).unwrap();
        gpu_model.set_checkpointing(checkpointing);
        gpu_model.set_checkpoint_keep(keep);
        let (out_g, grads_g) = forward_backward(&gpu_model, dev, 21);
        let what = match (checkpointing, keep == all) {
            (false, _) => "plain",
            (true, false) => "checkpointed",
            (true, true) => "checkpointed keeping attention and linear outputs",
        };
        // bf16 activations through two blocks: a few bf16 ulps relative, checked in L2.
        let e = rel_err(&out_g, &out_c);
        println!("GPU {what} forward: relative error {e:.2e}");
        assert!(e < 3e-2, "GPU {what} forward: relative error {e}");
        for ((name, g), (_, c)) in grads_g.iter().zip(&grads_c) {
            let e = rel_err(g, c);
            assert!(e < 6e-2, "GPU {what} d/d{name}: relative error {e}");
        }
    }
}

/// The DiT with the head dims of the wgmma kernels (64 and 128) on the GPU against the CPU,
/// checkpointed, under each attention set (on compute capability 9.0 the wgmma sets run
/// their kernels; elsewhere they fall back to mma): the model-level wiring of the fused
/// q/k RMSNorm + RoPE, the attention kernels and their backward, at 15 tokens with 18
/// context rows (partial tiles everywhere).
#[test]
fn gpu_matches_cpu_with_wide_heads_under_each_attention_set() {
    use synthos_engine::cuda::attention::{with_attention_kernel, AttentionKernel};
    let Some(dev) = gpu() else { return };
    for head_dim in [64, 128] {
        let cfg = WanConfig { dim: 2 * head_dim, num_heads: 2, ffn_dim: 256, ..WanConfig::tiny() };
        assert_eq!(cfg.head_dim(), head_dim);
        let cpu_model = WanModel::random(&cfg, 31, Device::Cpu, DType::F32).unwrap();
        let (out_c, grads_c) = forward_backward(&cpu_model, Device::Cpu, 22);
        let mut gpu_model = WanModel::random(&cfg, 31, dev, DType::BF16).unwrap();
        gpu_model.set_checkpointing(true);
        for kernel in [
            AttentionKernel::Wmma,
            AttentionKernel::Mma,
            AttentionKernel::Wgmma,
            AttentionKernel::WgmmaDeterministic,
            AttentionKernel::WgmmaOverlap,
            AttentionKernel::WgmmaWarpSpecialized,
        ] {
            let (out_g, grads_g) = with_attention_kernel(kernel, || forward_backward(&gpu_model, dev, 22));
            let what = format!("head dim {head_dim}, attention {}", kernel.name());
            let e = rel_err(&out_g, &out_c);
            println!("GPU forward ({what}): relative error {e:.2e}");
            assert!(e < 3e-2, "GPU forward ({what}): relative error {e}");
            for ((name, g), (_, c)) in grads_g.iter().zip(&grads_c) {
                let e = rel_err(g, c);
                assert!(e < 6e-2, "GPU d/d{name} ({what}): relative error {e}");
            }
        }
    }
}

/// The full Wan2.1-T2V-1.3B shape at 480×480 (latent 60×60, 900 tokens), batch 1, random
/// bf16 weights, Synthos context (257 image + 512 text rows): one forward and one
/// backward, timed, with the device memory in use. Runs only where a GPU is present.
#[test]
fn gpu_full_1_3b_forward_backward_480() {
    let Some(dev) = gpu() else { return };
    // Timings without the NaN fill of fresh buffers (scripts/gpu-check.sh runs the tests
    // one at a time, so no other test loses its poisoning meanwhile).
    synthos_engine::cuda::set_poison(false);
    let cfg = WanConfig::wan21_t2v_1_3b();
    let t0 = Instant::now();
    let model = WanModel::random(&cfg, 1, dev, DType::BF16).unwrap();
    let mem = || {
        let (free, total) = synthos_engine::cuda::device(0).unwrap().mem_info().unwrap();
        (total - free) as f64 / (1u64 << 30) as f64
    };
    println!(
        "1.3B: {} parameters, built in {:.1} s, {:.2} GiB in use",
        count(&model),
        t0.elapsed().as_secs_f64(),
        mem()
    );
    let mut rng = Rng::new(2);
    let latents = Tensor::randn(&[1, 16, 1, 60, 60], 1.0, &mut rng, dev).unwrap();
    let text = Tensor::randn(&[1, 512, 4096], 1.0, &mut rng, dev).unwrap();
    let clip = Tensor::randn(&[1, 257, 1280], 1.0, &mut rng, dev).unwrap();
    model.trainable(Trainable::All);
    let mut peak = 0f64;
    for step in 0..3 {
        let t = Instant::now();
        let out = model.forward(&latents, &[500.0], &text, Some(&clip)).unwrap();
        bench::synchronize(dev).unwrap();
        let fwd = t.elapsed().as_secs_f64();
        peak = peak.max(mem());
        let seed = Tensor::full(out.shape(), 1e-3, DType::BF16, dev).unwrap();
        let grads = autograd::backward_with(&out, seed).unwrap();
        bench::synchronize(dev).unwrap();
        let total = t.elapsed().as_secs_f64();
        peak = peak.max(mem());
        assert_eq!(grads.len(), model.params().len(), "every parameter gets a gradient");
        let v = out.to_vec().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "finite velocity");
        println!(
            "1.3B 480x480 B=1 step {step}: forward {:.1} ms, forward+backward {:.1} ms, {:.2} GiB in use (peak seen {:.2})",
            fwd * 1e3,
            total * 1e3,
            mem(),
            peak
        );
    }
}

fn count(model: &WanModel) -> usize {
    model.params().iter().map(|(_, t)| t.numel()).sum()
}

#[test]
fn a_checkpoint_with_nan_is_refused_and_changes_nothing() {
    let dir = temp_dir("wan-nan-ckpt");
    let model = WanModel::random(&WanConfig::tiny(), 5, Device::Cpu, DType::F32).unwrap();
    let (_, head_bias) = model.params().into_iter().find(|(n, _)| n == "head.head.bias").expect("head.head.bias");
    let before = head_bias.to_vec().unwrap();
    let mut bad = vec![0.25f32; head_bias.numel()];
    bad[3] = f32::NAN;
    let path = dir.join("epoch-0.safetensors");
    let t = Tensor::from_vec(bad, head_bias.shape(), Device::Cpu).unwrap();
    weights::save(&path, &[("head.head.bias".to_string(), t)], SaveDType::BF16, None).unwrap();
    let e = model.apply_checkpoint(&path).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()) && e.contains("'head.head.bias'") && e.contains("NaN/inf"), "{e}");
    assert_eq!(head_bias.to_vec().unwrap(), before, "a refused checkpoint changes no parameter");
    fs::remove_dir_all(dir).unwrap();
}

/// The demo's absolute position table: sin/cos of row then column at the documented
/// frequencies, and a model with it differs from one without only through it.
#[test]
fn absolute_position_table_and_its_use() {
    let d = 64;
    let t = synthos_engine::models::wan::pos_embedding_2d([1, 3, 5], d);
    assert_eq!(t.len(), 15 * d);
    let q = d / 4;
    // Token (row 2, column 3) = index 13.
    let tok = &t[13 * d..14 * d];
    for k in 0..q {
        let f = 10000f64.powf(-(k as f64) / q as f64);
        assert!((tok[k] as f64 - (2.0 * f).sin()).abs() < 1e-6);
        assert!((tok[q + k] as f64 - (2.0 * f).cos()).abs() < 1e-6);
        assert!((tok[2 * q + k] as f64 - (3.0 * f).sin()).abs() < 1e-6);
        assert!((tok[3 * q + k] as f64 - (3.0 * f).cos()).abs() < 1e-6);
    }
    let base = WanConfig::tiny();
    let with = WanConfig { abs_pos_embed: true, ..base.clone() };
    let (a, b) = (
        WanModel::random(&base, 5, Device::Cpu, DType::F32).unwrap(),
        WanModel::random(&with, 5, Device::Cpu, DType::F32).unwrap(),
    );
    let x = Tensor::from_vec(Rng::new(1).normal_vec(16 * 4 * 6, 1.0), &[1, 16, 1, 4, 6], Device::Cpu).unwrap();
    let text = Tensor::from_vec(Rng::new(2).normal_vec(3 * 32, 1.0), &[1, 3, 32], Device::Cpu).unwrap();
    let ya = a.forward(&x, &[500.0], &text, None).unwrap().to_vec().unwrap();
    let yb = b.forward(&x, &[500.0], &text, None).unwrap().to_vec().unwrap();
    assert_eq!(ya.len(), yb.len());
    assert!(ya.iter().zip(&yb).any(|(p, q)| (p - q).abs() > 1e-4), "the table changes the output");
}
