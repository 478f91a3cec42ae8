//! The Synthos-I2I pipeline: the demo components, the sampler, checkpoints over the DiT.

mod common;

use synthos_engine::data::demo::{render, Colour, DemoAttrs, Shape, ShapeSize, Texture};
use synthos_engine::image::ImageRgb;
use synthos_engine::pipeline::{demo, GenerateOptions, SynthosPipeline};
use synthos_engine::{DType, Device};

fn demo_pipe() -> SynthosPipeline {
    SynthosPipeline::demo(Device::Cpu, DType::F32, &[]).unwrap()
}

fn small_opts() -> GenerateOptions {
    GenerateOptions {
        prompt: "a red circle on a blue background".into(),
        height: 32,
        width: 48,
        steps: 3,
        ..Default::default()
    }
}

#[test]
fn demo_tokenizer_maps_caption_words_and_appends_eos() {
    let pipe = demo_pipe();
    let vocab = demo::vocabulary();
    let ids = pipe.text.tokenizer.encode_cleaned("A Red circle, on a blue background").unwrap();
    let words: Vec<&str> = ids.iter().map(|&i| vocab[i as usize].as_str()).collect();
    assert_eq!(words, ["a", "red", "circle", "<unk>", "on", "a", "blue", "background", "</s>"]);
    // Every demo caption fits the text length with its </s>.
    for a in DemoAttrs::all() {
        let n = pipe.text.tokenizer.encode_cleaned(&a.caption()).unwrap().len();
        assert!(n <= demo::TEXT_LEN, "{} takes {n} tokens", a.caption());
    }
}

#[test]
fn demo_sample_has_the_requested_size_and_is_deterministic() {
    let pipe = demo_pipe();
    let opts = small_opts();
    let a = pipe.generate(&opts, None).unwrap();
    assert_eq!((a.width(), a.height()), (48, 32));
    let b = pipe.generate(&opts, None).unwrap();
    assert_eq!(a.data(), b.data(), "same seed, same image");
    let c = pipe.generate(&GenerateOptions { seed: 43, ..opts.clone() }, None).unwrap();
    assert_ne!(a.data(), c.data(), "another seed, another image");
}

#[test]
fn batched_prompts_equal_one_at_a_time() {
    let pipe = demo_pipe();
    let opts = small_opts();
    let prompts = ["a red circle on a blue background", "a small green square with dots on a white background"];
    let mut calls = 0;
    let batch = pipe.generate_batch(&prompts, &opts, None, &mut |_, _| calls += 1).unwrap();
    assert_eq!(calls, opts.steps);
    for (i, p) in prompts.iter().enumerate() {
        let one = GenerateOptions { prompt: p.to_string(), seed: opts.seed + i as u64, ..opts.clone() };
        let single = pipe.generate(&one, None).unwrap();
        let diff = batch[i].data().iter().zip(single.data()).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
        assert!(diff <= 1, "image {i} differs by {diff} levels between batched and single sampling");
    }
}

#[test]
fn reference_image_changes_the_sample() {
    let pipe = demo_pipe();
    let opts = small_opts();
    let attrs = DemoAttrs {
        shape: Shape::Square,
        colour: Colour::Yellow,
        background: Colour::Purple,
        size: ShapeSize::Large,
        texture: Texture::Plain,
    };
    let img = render(&attrs, 64).unwrap();
    let reference = ImageRgb::new(64, 64, img.data().to_vec()).unwrap();
    let with = pipe.generate(&opts, Some(&reference)).unwrap();
    let without = pipe.generate(&opts, None).unwrap();
    assert_ne!(with.data(), without.data());
}

#[test]
fn bad_sizes_and_arguments_are_reported() {
    let pipe = demo_pipe();
    let err = pipe.generate(&GenerateOptions { width: 30, ..small_opts() }, None).unwrap_err().to_string();
    assert!(err.contains("30×32") && err.contains("multiple of 8"), "{err}");
    let err = pipe.generate(&GenerateOptions { steps: 0, ..small_opts() }, None).unwrap_err().to_string();
    assert!(err.contains("steps"), "{err}");
    // A step count whose sigma table would not fit in memory is refused up front.
    let err = pipe.generate(&GenerateOptions { steps: 1 << 32, ..small_opts() }, None).unwrap_err().to_string();
    assert!(err.contains("steps must be between 1 and 10000") && err.contains("4294967296"), "{err}");
    // Sizes past the DiT's RoPE positions are refused before anything is allocated.
    let err = pipe
        .generate(&GenerateOptions { width: 100_000, height: 100_000, ..small_opts() }, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("100000×100000") && err.contains("tokens along each axis") && err.contains("8192"), "{err}");
}

/// A diffusers-layout Wan folder from the committed tiny fixtures (umT5, VAE, CLIP) and a
/// random tiny DiT whose widths match them.
fn diffusers_folder(tag: &str) -> std::path::PathBuf {
    use synthos_engine::models::wan::{Trainable, WanConfig, WanModel};
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = common::temp_dir(tag);
    let cfg = WanConfig { text_dim: 64, clip_dim: 64, ..WanConfig::tiny() };
    let dit = WanModel::random(&cfg, 3, Device::Cpu, DType::F32).unwrap();
    std::fs::create_dir_all(dir.join("transformer")).unwrap();
    dit.save(dir.join("transformer/diffusion_pytorch_model.safetensors"), Trainable::All).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("wan/diffusers/config.json")).unwrap()).unwrap();
    json["text_dim"] = 64.into();
    json["image_dim"] = 64.into();
    std::fs::write(dir.join("transformer/config.json"), json.to_string()).unwrap();
    std::os::unix::fs::symlink(fx.join("t5/text_encoder"), dir.join("text_encoder")).unwrap();
    std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
    std::fs::copy(fx.join("t5/tokenizer.json"), dir.join("tokenizer/tokenizer.json")).unwrap();
    std::fs::create_dir_all(dir.join("vae")).unwrap();
    std::fs::copy(fx.join("vae/tiny_weights.safetensors"), dir.join("vae/diffusion_pytorch_model.safetensors"))
        .unwrap();
    std::fs::write(dir.join("vae/config.json"), r#"{"_class_name": "AutoencoderKLWan", "base_dim": 6, "z_dim": 16}"#)
        .unwrap();
    dir
}

#[test]
fn loads_a_diffusers_wan_folder_with_clip_and_checkpoint() {
    use synthos_engine::pipeline::WeightPaths;
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = diffusers_folder("pipe-load");
    let paths = WeightPaths { wan: Some(dir.clone()), clip: Some(fx.join("clip/image_encoder")), ..Default::default() };
    let pipe = SynthosPipeline::load(&paths, Device::Cpu, DType::F32).unwrap();
    assert!(!pipe.is_demo());
    assert_eq!(pipe.codec.factor(), 8);
    let reference = ImageRgb::open(fx.join("clip/ref.png")).unwrap();
    let opts = GenerateOptions { prompt: "a lighthouse".into(), height: 32, width: 48, steps: 2, ..Default::default() };
    let img = pipe.generate(&opts, Some(&reference)).unwrap();
    assert_eq!((img.width(), img.height()), (48, 32));

    // A Synthos checkpoint over the base: its tensors replace the base's.
    let ckpt = dir.join("epoch-0.safetensors");
    let img_emb: Vec<(String, synthos_engine::Tensor)> = pipe
        .dit
        .params()
        .into_iter()
        .filter(|(n, _)| n.starts_with("img_emb."))
        .map(|(n, t)| (n, synthos_engine::ops::scale(&t, 0.5).unwrap()))
        .collect();
    synthos_engine::weights::save(&ckpt, &img_emb, synthos_engine::weights::SaveDType::F32, None).unwrap();
    let with =
        SynthosPipeline::load(&WeightPaths { checkpoints: vec![ckpt], ..paths.clone() }, Device::Cpu, DType::F32)
            .unwrap();
    for (name, t) in with.dit.params().into_iter().filter(|(n, _)| n.starts_with("img_emb.")) {
        let want = img_emb.iter().find(|(n, _)| *n == name).unwrap().1.to_vec().unwrap();
        assert_eq!(t.to_vec().unwrap(), want, "{name}");
    }
    let err = pipe.generate(&GenerateOptions { width: 40, ..opts }, None).unwrap_err().to_string();
    assert!(err.contains("multiple of 16"), "{err}");
}

#[test]
fn loading_reports_missing_and_mismatched_components() {
    use synthos_engine::pipeline::WeightPaths;
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = diffusers_folder("pipe-bad");
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    let err =
        SynthosPipeline::load(&WeightPaths { wan: Some(dir.clone()), ..Default::default() }, Device::Cpu, DType::F32)
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("VAE") && err.contains("vae"), "{err}");
    // The committed text-only DiT fixture reads 32-wide text: the 64-wide umT5 does not fit.
    let paths = WeightPaths { wan: Some(dir.clone()), dit: Some(fx.join("wan/diffusers")), ..Default::default() };
    let err = SynthosPipeline::load(&paths, Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("text_dim 32") && err.contains("64"), "{err}");
    // Without CLIP, text-only sampling works and a reference image is refused clearly.
    let dir = diffusers_folder("pipe-noclip");
    let pipe =
        SynthosPipeline::load(&WeightPaths { wan: Some(dir), ..Default::default() }, Device::Cpu, DType::F32).unwrap();
    let opts = GenerateOptions { height: 16, width: 16, steps: 1, ..Default::default() };
    pipe.generate(&opts, None).unwrap();
    let reference = ImageRgb::open(fx.join("clip/ref.png")).unwrap();
    let err = pipe.generate(&opts, Some(&reference)).unwrap_err().to_string();
    assert!(err.contains("--clip"), "{err}");
}

/// Issue 5's GPU figures: the Synthos-I2I shapes with random weights — 1.3B DiT, the
/// Wan2.1 VAE, and one-layer encoders of the real widths (umT5 4096, CLIP 1280 × 257
/// tokens; their cost is a once-per-prompt constant, measured in tests/t5.rs and
/// tests/clip.rs) — timing a 25-step 480×480 guided sample and training steps at
/// 480×480 batch 1 (AdamW fp32 masters, activation checkpointing). GPU only.
#[test]
fn gpu_1_3b_sample_and_train_step_480() {
    use std::time::Instant;
    use synthos_engine::models::clip::{ClipVisionConfig, ClipVisionEncoder};
    use synthos_engine::models::t5::{T5Config, T5Encoder, TextEncoder};
    use synthos_engine::models::vae::{TileOptions, Vae, VaeConfig};
    use synthos_engine::models::wan::{WanConfig, WanModel};
    use synthos_engine::nn::RandomInit;
    use synthos_engine::pipeline::Codec;
    use synthos_engine::tokenizer::T5Tokenizer;
    use synthos_engine::train::{memory_in_use, TrainConfig, Trainer};
    let Some(dev) = common::gpu() else { return };
    let _shared = common::beside_recordings();
    synthos_engine::cuda::set_poison(false);
    let dt = DType::BF16;
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let build = || {
        let t5 = T5Config { num_layers: 1, text_len: 512, ..T5Config::umt5_xxl() };
        let tok = T5Tokenizer::from_file(fx.join("t5/tokenizer.json"), 512).unwrap();
        let t5 = T5Config { vocab_size: tok.vocab_size().max(416), ..t5 };
        let text = TextEncoder::new(tok, T5Encoder::random(&t5, 1, dev, dt).unwrap()).unwrap();
        let clip =
            ClipVisionEncoder::random(&ClipVisionConfig { num_layers: 2, ..ClipVisionConfig::vit_h14() }, 2, dev, dt)
                .unwrap();
        let dit = WanModel::random(&WanConfig::wan21_t2v_1_3b(), 3, dev, dt).unwrap();
        let vae = Vae::new(&mut RandomInit::new(4, dev, dt), &VaeConfig::wan21()).unwrap();
        let codec = Codec::Vae { vae: Box::new(vae), tiles: TileOptions::default() };
        SynthosPipeline::from_parts(text, Some(clip), dit, codec).unwrap()
    };
    let pipe = build();
    let gib = |b: Option<u64>| b.unwrap_or(0) as f64 / (1u64 << 30) as f64;
    let opts = GenerateOptions { prompt: "a lighthouse at dusk".into(), ..Default::default() };
    let reference = ImageRgb::open(fx.join("clip/ref.png")).unwrap();
    for run in 0..2 {
        let t = Instant::now();
        let img = pipe.generate(&opts, Some(&reference)).unwrap();
        assert_eq!((img.width(), img.height()), (480, 480));
        println!(
            "1.3B sample 480x480, 25 steps, cfg 5 (both branches batched), run {run}: {:.2} s per image, {:.2} GiB in use",
            t.elapsed().as_secs_f64(),
            gib(memory_in_use(dev))
        );
    }
    drop(pipe);

    let dir = common::temp_dir("gpu-train");
    synthos_engine::data::demo::generate(dir.join("data"), 8, 480, 1).unwrap();
    let cfg = TrainConfig {
        data: Some(dir.join("data")),
        output: dir.join("run"),
        width: 480,
        height: 480,
        batch_size: 1,
        lr: 1e-5,
        max_steps: Some(6),
        activation_checkpointing: true,
        cache: synthos_engine::train::CacheMode::Memory,
        ..TrainConfig::demo()
    };
    let mut trainer = Trainer::new(build(), cfg).unwrap();
    trainer.set_quiet(true);
    for _ in 0..6 {
        let t = Instant::now();
        let s = trainer.train_step().unwrap();
        assert!(s.loss.is_finite());
        println!(
            "1.3B train step {} at 480x480 B=1: {:.0} ms ({:.2} samples/s), loss {:.4}, {:.2} GiB in use",
            s.step,
            t.elapsed().as_secs_f64() * 1e3,
            s.samples_per_s,
            s.loss,
            gib(memory_in_use(dev))
        );
    }
}

#[test]
fn pixel_codec_is_lossless_and_channel_major() {
    use synthos_engine::pipeline::Codec;
    let codec = Codec::Pixels { factor: 4 };
    let mut rng = synthos_engine::Rng::new(5);
    let x = synthos_engine::Tensor::rand_uniform(&[2, 3, 12, 20], -1.0, 1.0, &mut rng, Device::Cpu).unwrap();
    let z = codec.encode(&x).unwrap();
    assert_eq!(z.shape(), &[2, 48, 1, 3, 5]);
    // Channel (c, dy, dx) of latent pixel (i, j) is image pixel (c, 4i + dy, 4j + dx).
    let (xv, zv) = (x.to_vec().unwrap(), z.to_vec().unwrap());
    let (b, c, dy, dx, i, j) = (1, 2, 3, 1, 2, 4);
    let zi = ((b * 48 + c * 16 + dy * 4 + dx) * 3 + i) * 5 + j;
    let xi = ((b * 3 + c) * 12 + 4 * i + dy) * 20 + 4 * j + dx;
    assert_eq!(zv[zi], xv[xi]);
    assert_eq!(codec.decode(&z).unwrap().to_vec().unwrap(), xv);
    assert!(codec.encode(&synthos_engine::Tensor::zeros(&[1, 3, 10, 8], DType::F32, Device::Cpu).unwrap()).is_err());
}

/// The demo quality check covers every attribute, reads an untrained model as poor (its
/// samples are noise), and reports in the documented form.
#[test]
fn demo_quality_reads_an_untrained_model_as_poor() {
    let set = demo::quality_set();
    assert_eq!(set.len(), 36);
    for s in Shape::ALL {
        assert!(set.iter().any(|a| a.shape == s));
    }
    for c in Colour::ALL {
        assert!(set.iter().any(|a| a.colour == c) && set.iter().any(|a| a.background == c));
    }
    for t in Texture::ALL {
        assert!(set.iter().any(|a| a.texture == t));
    }
    assert!(set.iter().any(|a| a.size == ShapeSize::Small) && set.iter().any(|a| a.size == ShapeSize::Large));
    let opts = GenerateOptions {
        steps: 1,
        cfg_scale: 4.0,
        negative_prompt: String::new(),
        shift: demo::SHIFT,
        ..Default::default()
    };
    let q = demo::quality(&demo_pipe(), &opts).unwrap();
    assert_eq!(q.samples, 36);
    assert!(q.colour_match <= 0.2 && q.image_only_colour_match <= 0.2, "{q:?}");
    assert!(q.shape_iou < 0.3 && q.image_only_iou < 0.3, "{q:?}");
    let line = q.line();
    assert!(line.starts_with("demo quality: colour match "), "{line}");
    assert!(line.contains("%, shape IoU ") && line.contains(", image-only IoU "), "{line}");
    let j = q.to_json();
    assert_eq!(j["samples"], 36);
    assert!((j["shape_iou"].as_f64().unwrap() - q.shape_iou).abs() < 1e-12);
}

#[test]
fn synth_images_runs_on_a_diffusers_wan_folder() {
    // `synth images` on published-format weights (the tiny stand-ins): VAE latents, the
    // umT5 tokenizer, a non-square size and the stored smaller copy.
    let dir = diffusers_folder("synth-images-wan");
    let captions = dir.join("captions.tsv");
    std::fs::write(&captions, "caption\na lighthouse at dusk\na red kite over the sea\n").unwrap();
    let out = dir.join("set");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_synthos-engine"))
        .args(["synth", "images", "--captions", captions.to_str().unwrap(), "--output", out.to_str().unwrap()])
        .args(["--wan", dir.to_str().unwrap(), "--width", "48", "--height", "32", "--store-size", "16"])
        .args(["--steps", "2", "--device", "cpu"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("images: 2 made, 0 already there"), "{stdout}");
    let img = ImageRgb::open(out.join("images/0000/0000001.png")).unwrap();
    assert_eq!((img.width(), img.height()), (24, 16), "short side 16, aspect kept");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("synth-images.json")).unwrap()).unwrap();
    assert_eq!(manifest["steps"], 2);
    assert_eq!(manifest["cfg"], 5.0, "the Synthos guidance by default with Wan weights");
    assert_eq!(manifest["negative_prompt"], synthos_engine::pipeline::DEFAULT_NEGATIVE_PROMPT);
    assert_eq!(manifest["model"], dir.display().to_string());
    let ds = synthos_engine::data::CaptionDataset::open(out.join("train.tsv"), &Default::default()).unwrap();
    assert_eq!(ds.caption(1), Some("a red kite over the sea"));
}

/// CUDA graphs (`SYNTHOS_CUDA_GRAPHS`, opt-in): a recorded replay of the sampler's DiT
/// forward gives the plain run's bits, call after call with new inputs, and the whole
/// guided sampler (text prompts and an image-only reference) gives the same images with
/// graphs on and off. GPU only.
#[test]
fn gpu_graph_replays_match_plain_runs() {
    use synthos_engine::cuda::graph::with_graphs;
    use synthos_engine::models::wan::{WanConfig, WanModel};
    use synthos_engine::{autograd, ops, Rng, Tensor};
    let Some(dev) = common::gpu() else { return };
    let _alone = common::recording_alone();
    let cfg = WanConfig::tiny();
    let model = WanModel::random(&cfg, 5, dev, DType::BF16).unwrap();
    let mut rng = Rng::new(3);
    let (b, h, w) = (2, 4, 6);
    let mut rand = |shape: &[usize]| {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normal_vec(n, 1.0), shape, dev).unwrap()
    };
    let context = rand(&[b, 7, cfg.text_dim]);
    let clip = rand(&[b, 257, cfg.clip_dim]);
    autograd::no_grad(|| {
        let kv = model.cross_kv(&model.context(&context, Some(&clip)).unwrap()).unwrap();
        let forward =
            |xt: &[Tensor]| Ok(vec![ops::cast(&model.forward_with_cross_kv_at(&xt[0], &xt[1], &kv)?, DType::F32)?]);
        let mut graphs = ops::GraphRunner::new("test forward", 1);
        for call in 0..4 {
            let x = rand(&[b, cfg.in_channels, 1, h, w]);
            let t = model.time_frequencies(&[900.0 - 200.0 * call as f32, 50.0 * call as f32]).unwrap();
            let plain = forward(&[x.clone(), t.clone()]).unwrap()[0].to_vec().unwrap();
            let replayed = with_graphs(true, || graphs.call(&[&x, &t], forward)).unwrap()[0].to_vec().unwrap();
            assert_eq!(graphs.recorded_layouts(), usize::from(call >= 1), "recorded at the second call");
            assert!(plain.iter().all(|v| v.is_finite()));
            let differ = plain.iter().zip(&replayed).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "call {call}: {differ} of {} values differ from the plain run", plain.len());
        }
        // Another layout of inputs runs plainly (the runner records one at most) and
        // gives the plain results; the recorded layout still replays after it.
        let x = rand(&[b, cfg.in_channels, 1, h, w + 2]);
        let t = model.time_frequencies(&[1.0, 2.0]).unwrap();
        let plain = forward(&[x.clone(), t.clone()]).unwrap()[0].to_vec().unwrap();
        let other = with_graphs(true, || graphs.call(&[&x, &t], forward)).unwrap()[0].to_vec().unwrap();
        assert_eq!(plain, other, "a layout past the limit");
        assert_eq!(graphs.recorded_layouts(), 1);

        // Two input layouts whose results differ in shape: each recorded with its own
        // result buffers, each replay right.
        let double = |xs: &[Tensor]| Ok(vec![ops::scale(&xs[0], 2.0)?, ops::sum_all(&xs[0])?]);
        let mut two = ops::GraphRunner::new("two layouts", 2);
        for round in 0..3 {
            for n in [3usize, 5] {
                let v: Vec<f32> = (0..n).map(|i| (i + round) as f32).collect();
                let x = Tensor::from_vec_dtype(v.clone(), &[n], dev, DType::F32).unwrap();
                let ys = with_graphs(true, || two.call(&[&x], double)).unwrap();
                let want: Vec<f32> = v.iter().map(|a| 2.0 * a).collect();
                assert_eq!(ys[0].to_vec().unwrap(), want, "round {round}, n {n}");
                assert_eq!(ys[1].item().unwrap(), v.iter().sum::<f32>(), "round {round}, n {n}");
            }
        }
        assert_eq!(two.recorded_layouts(), 2);
    });

    let pipe = SynthosPipeline::demo(dev, DType::BF16, &[]).unwrap();
    let opts = GenerateOptions { height: 32, width: 48, steps: 5, ..Default::default() };
    let prompts = ["a red circle on a blue background", "a small green square with dots on a white background"];
    let target = render(
        &DemoAttrs {
            shape: Shape::Circle,
            colour: Colour::Red,
            background: Colour::Blue,
            size: ShapeSize::Large,
            texture: Texture::Plain,
        },
        64,
    )
    .unwrap();
    let sample = |on: bool| {
        with_graphs(on, || {
            let texts = pipe.generate_batch(&prompts, &opts, None, &mut |_, _| {}).unwrap();
            let alone = pipe.generate_batch(&[""], &opts, Some(&target), &mut |_, _| {}).unwrap();
            texts.into_iter().chain(alone).map(|i| i.data().to_vec()).collect::<Vec<_>>()
        })
    };
    let plain = sample(false);
    assert_eq!(plain, sample(true), "the sampler with graphs on");
    assert_eq!(plain, sample(true), "the sampler with graphs on, recorded again");
}

/// A function that reads a device value on the host cannot be recorded: the error says
/// why, and the device runs work normally afterwards. GPU only.
#[test]
fn gpu_graph_recording_errors_are_clear() {
    use synthos_engine::cuda::graph::with_graphs;
    use synthos_engine::{autograd, ops, Tensor};
    let Some(dev) = common::gpu() else { return };
    let _alone = common::recording_alone();
    let x = Tensor::from_vec_dtype(vec![1.0, 2.0, 3.0], &[3], dev, DType::F32).unwrap();
    autograd::no_grad(|| {
        let reads = |xs: &[Tensor]| {
            let s = ops::sum_all(&xs[0])?.item()?;
            Ok(vec![ops::scale(&xs[0], s)?])
        };
        let mut graphs = ops::GraphRunner::new("a host read", 1);
        assert_eq!(with_graphs(true, || graphs.call(&[&x], reads)).unwrap()[0].to_vec().unwrap(), [6.0, 12.0, 18.0]);
        let e = with_graphs(true, || graphs.call(&[&x], reads)).unwrap_err().to_string();
        assert!(e.contains("CUDA graph") && e.contains("must not synchronise"), "{e}");
        assert_eq!(graphs.recorded_layouts(), 0);
    });
    let y = ops::add(&x, &x).unwrap();
    assert_eq!(y.to_vec().unwrap(), [2.0, 4.0, 6.0], "the device after a failed recording");
}

/// The rule of a function recorded as a CUDA graph (no copy between host and device
/// inside it) holds on the CPU too: from a layout's second call on, `GraphRunner` runs the
/// function under `forbid_host_transfers`, so a function that reads a value on the host
/// fails here as it would when recorded on a GPU; the first call (which fills caches) may.
#[test]
fn graph_runner_enforces_the_recording_rule_on_the_cpu() {
    use synthos_engine::{ops, Tensor};
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3], Device::Cpu).unwrap();
    let reads = |xs: &[Tensor]| Ok(vec![ops::scale(&xs[0], ops::sum_all(&xs[0])?.item()?)?]);
    let mut graphs = ops::GraphRunner::new("a host read", 1);
    assert_eq!(graphs.call(&[&x], reads).unwrap()[0].to_vec().unwrap(), [6.0, 12.0, 18.0]);
    let e = graphs.call(&[&x], reads).unwrap_err().to_string();
    assert!(e.contains("a tensor read on the host inside a host read") && e.contains("recorded CUDA graph"), "{e}");
    let uploads = |xs: &[Tensor]| Ok(vec![ops::add(&xs[0], &Tensor::from_vec(vec![1.0; 3], &[3], Device::Cpu)?)?]);
    let mut graphs = ops::GraphRunner::new("an upload", 1);
    graphs.call(&[&x], uploads).unwrap();
    let e = graphs.call(&[&x], uploads).unwrap_err().to_string();
    assert!(e.contains("a tensor made from host values inside an upload"), "{e}");
    // A function that keeps the rule runs every time (zeros and constants are device
    // memsets on a GPU, not transfers); the guard ends with the call.
    let mut graphs = ops::GraphRunner::new("a product", 1);
    for _ in 0..3 {
        let y = graphs
            .call(&[&x], |xs| {
                let c = ops::add(
                    &Tensor::zeros(&[3], DType::F32, Device::Cpu)?,
                    &Tensor::full(&[3], 1.0, DType::F32, Device::Cpu)?,
                )?;
                Ok(vec![ops::mul(&ops::mul(&xs[0], &xs[0])?, &c)?])
            })
            .unwrap();
        assert_eq!(y[0].to_vec().unwrap(), [1.0, 4.0, 9.0]);
    }
    assert_eq!(graphs.recorded_layouts(), 0, "nothing is recorded on the CPU");
}

/// A batch with a reference image per prompt gives the images of one generation per
/// reference, bit for bit on the CPU; a count mismatch is an error.
#[test]
fn references_per_prompt_equal_one_generation_each() {
    let pipe = demo_pipe();
    let opts = GenerateOptions { cfg_scale: 1.0, ..small_opts() };
    let attrs = DemoAttrs::all();
    let targets: Vec<ImageRgb> = [0, 7, 100].iter().map(|&i| render(&attrs[i], 64).unwrap()).collect();
    let refs: Vec<&ImageRgb> = targets.iter().collect();
    let prompts = ["", "a red circle on a blue background", ""];
    let seeds = [5u64, 6, 7];
    let batch = pipe.generate_with_references(&prompts, &seeds, &opts, &refs, &mut |_, _| {}).unwrap();
    for i in 0..3 {
        let one = pipe.generate_seeded(&prompts[i..=i], &seeds[i..=i], &opts, Some(refs[i]), &mut |_, _| {}).unwrap();
        assert_eq!(batch[i].data(), one[0].data(), "image {i}");
    }
    let e = pipe.generate_with_references(&prompts, &seeds, &opts, &refs[..2], &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("2 reference images for 3 prompts"), "{e}");
}
