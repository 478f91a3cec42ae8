//! The CLIP vision side: image decoding, Pillow's resize and the Synthos preprocessing
//! against Pillow/PyTorch, the tower against transformers' `CLIPVisionModel`
//! (`hidden_states[-2]`, fixtures from tests/reference/make_encoder_fixtures.py), bad
//! inputs, and the GPU against the CPU.
mod common;
use common::temp_dir;

use std::path::PathBuf;
use std::time::Instant;

use synthos_engine::image::clip::{clip_pixels, CLIP_MEAN, CLIP_STD};
use synthos_engine::image::resize::{resize_bicubic, resize_bicubic_chw};
use synthos_engine::image::ImageRgb;
use synthos_engine::models::clip::{ClipVisionConfig, ClipVisionEncoder};
use synthos_engine::nn::Module;
use synthos_engine::weights::{save, SaveDType, WeightSet};
use synthos_engine::{DType, Device, Rng, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip").join(name)
}

/// (values, shape) of a tensor of the expected-output file.
fn expected(name: &str) -> (Vec<f32>, Vec<usize>) {
    let set = WeightSet::open(fixture("expected.safetensors")).unwrap();
    (set.read_f32(name).unwrap(), set.shape(name).unwrap().to_vec())
}

fn pixels_f32(img: &ImageRgb) -> Vec<f32> {
    img.data().iter().map(|&v| f32::from(v)).collect()
}

fn reference_png() -> ImageRgb {
    ImageRgb::open(fixture("ref.png")).unwrap()
}

#[test]
fn tiny_preset_is_the_fixture_config() {
    assert_eq!(
        ClipVisionConfig::from_json_file(fixture("image_encoder/config.json")).unwrap(),
        ClipVisionConfig::tiny()
    );
    let h = ClipVisionConfig::preset("vit-h-14").unwrap();
    assert_eq!((h.tokens(), h.hidden_size, h.head_dim(), h.num_layers, h.intermediate_size), (257, 1280, 80, 32, 5120));
    assert!(ClipVisionConfig::preset("vit-b-16").is_err());
}

#[test]
fn decodes_png_webp_and_jpeg() {
    let (png_want, shape) = expected("png_pixels");
    assert_eq!(shape, [61, 97, 3]);
    let png = reference_png();
    assert_eq!((png.width(), png.height()), (97, 61));
    assert_eq!(pixels_f32(&png), png_want, "PNG pixels");
    let webp = ImageRgb::open(fixture("ref.webp")).unwrap();
    assert_eq!(webp, png, "lossless WebP decodes to the PNG's pixels");
    // JPEG decoders differ by a level here and there (IDCT, chroma upsampling); Pillow's
    // libjpeg-turbo is the reference
    let jpg = ImageRgb::open(fixture("ref.jpg")).unwrap();
    let (jpg_want, _) = expected("jpg_pixels");
    let diffs: Vec<f32> = pixels_f32(&jpg).iter().zip(&jpg_want).map(|(a, b)| (a - b).abs()).collect();
    let max = diffs.iter().cloned().fold(0f32, f32::max);
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    eprintln!("JPEG vs Pillow: max {max}, mean {mean} levels");
    assert!(max <= 4.0 && mean <= 0.5, "JPEG vs Pillow: max {max}, mean {mean} levels");
}

#[test]
fn resize_is_pillows_bicubic_bit_for_bit() {
    let png = reference_png();
    for (w, h, name) in [(80, 48, "png_resized_80x48"), (120, 76, "png_resized_120x76")] {
        let (want, shape) = expected(name);
        assert_eq!(shape, [h, w, 3]);
        assert_eq!(pixels_f32(&resize_bicubic(&png, w, h).unwrap()), want, "Image.resize(({w}, {h}))");
    }
    assert_eq!(resize_bicubic(&png, 97, 61).unwrap(), png, "same size is a copy");
    assert!(resize_bicubic(&png, 0, 5).is_err());
}

#[test]
fn preprocessing_matches_the_synthos_pipeline() {
    let png = reference_png();
    // 224² (ViT-H/14), stored as f16 by the fixture: |error| < 1e-3, far below one
    // 8-bit level (≈ 0.015 after normalization)
    let (want, shape) = expected("png_pre224_80x48");
    assert_eq!(shape, [1, 3, 224, 224]);
    let got = clip_pixels(&png, 80, 48, 224).unwrap();
    common::assert_close(&got, &want, 1.5e-3, 0.0, "224x224 CLIP input");
    // the tiny encoder's size, in f32
    let (want, _) = expected("e2e_pre42_80x48");
    common::assert_close(&clip_pixels(&png, 80, 48, 42).unwrap(), &want, 2e-6, 2e-6, "42x42 CLIP input");
    // the JPEG file through each side's own decoder: a few 8-bit levels apart at most
    // (one level is 2/255·0.5/std ≈ 0.015 after normalization)
    let jpg = ImageRgb::open(fixture("ref.jpg")).unwrap();
    let (want, _) = expected("jpg_pre42_80x48");
    let got = clip_pixels(&jpg, 80, 48, 42).unwrap();
    common::assert_close(&got, &want, 0.06, 0.0, "42x42 CLIP input of the JPEG");
    let mean = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum::<f32>() / got.len() as f32;
    assert!(mean < 0.01, "JPEG preprocessing: mean difference {mean}");
}

#[test]
fn bicubic_interpolation_properties() {
    // a constant image stays constant (the weights sum to 1); a mirrored input gives the
    // mirrored output; a step overshoots (negative lobes, no clamping, as in PyTorch)
    let c = resize_bicubic_chw(&[0.25; 2 * 5 * 7], 2, 5, 7, 13, 3).unwrap();
    assert!(c.iter().all(|v| (v - 0.25).abs() < 1e-6));
    let mut rng = Rng::new(4);
    let x = rng.normal_vec(9 * 11, 1.0);
    let mirrored: Vec<f32> = x.chunks(11).flat_map(|row| row.iter().rev().cloned().collect::<Vec<_>>()).collect();
    let a = resize_bicubic_chw(&x, 1, 9, 11, 5, 17).unwrap();
    let b = resize_bicubic_chw(&mirrored, 1, 9, 11, 5, 17).unwrap();
    let b_back: Vec<f32> = b.chunks(17).flat_map(|row| row.iter().rev().cloned().collect::<Vec<_>>()).collect();
    common::assert_close(&a, &b_back, 1e-5, 1e-5, "mirror symmetry");
    let step: Vec<f32> = (0..8).map(|x| if x < 4 { 0.0 } else { 1.0 }).collect();
    let up = resize_bicubic_chw(&step, 1, 1, 8, 1, 16).unwrap();
    assert!(up.iter().any(|&v| v < 0.0) && up.iter().any(|&v| v > 1.0));
    // one sample by hand: 8 → 16, output 3 reads source 1.25 (t = 1/4) with a = −0.75
    // weights (−0.10546875, 0.87890625, 0.26171875, −0.03515625) at sources 0..3
    let ramp: Vec<f32> = (0..8).map(|x| x as f32).collect();
    let up = resize_bicubic_chw(&ramp, 1, 1, 8, 1, 16).unwrap();
    assert!((up[3] - 1.296875).abs() < 1e-6, "sample 3: {}", up[3]);
    assert!(resize_bicubic_chw(&ramp, 1, 2, 8, 4, 4).is_err());
    // the normalization constants are CLIP's
    let published = |v: [f64; 3]| v.map(|x| x as f32);
    assert_eq!(CLIP_MEAN, published([0.48145466, 0.4578275, 0.40821073]));
    assert_eq!(CLIP_STD, published([0.26862954, 0.26130258, 0.27577711]));
}

#[test]
fn tower_matches_transformers_on_cpu() {
    let model =
        ClipVisionEncoder::load(&ClipVisionConfig::tiny(), fixture("image_encoder"), Device::Cpu, DType::F32).unwrap();
    let (pixels, shape) = expected("model_in");
    let (want, want_shape) = expected("model_out");
    let out = model.forward(&Tensor::from_vec(pixels, &shape, Device::Cpu).unwrap()).unwrap();
    assert_eq!(out.shape(), &want_shape[..]);
    let got = out.to_vec().unwrap();
    let err = common::rel_err(&got, &want);
    assert!(err <= 1e-4, "hidden_states[-2] vs CLIPVisionModel: relative error {err:e}");
    common::assert_close(&got, &want, 1e-4, 1e-4, "CLIP penultimate hidden states");
}

#[test]
fn encode_image_is_the_reference_pipeline() {
    let model = ClipVisionEncoder::load(
        &ClipVisionConfig::tiny(),
        fixture("image_encoder/model.safetensors"),
        Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let (want, shape) = expected("e2e_out_80x48");
    let out = model.encode_image(&reference_png(), 80, 48).unwrap();
    assert_eq!(out.shape(), &shape[..]);
    assert_eq!(out.shape(), &[1, 10, 64]);
    common::assert_close(&out.to_vec().unwrap(), &want, 1e-4, 1e-4, "encode_image");
}

#[test]
fn loads_transformers_4_naming_with_extras() {
    // diffusers-format Wan repositories were written by transformers 4: keys under
    // `vision_model.`, sometimes with a projection; both load to the same tower
    let set = WeightSet::open(fixture("image_encoder/model.safetensors")).unwrap();
    let mut tensors: Vec<(String, Tensor)> = set
        .names()
        .map(|n| {
            let shape = set.shape(n).unwrap().to_vec();
            (format!("vision_model.{n}"), Tensor::from_vec(set.read_f32(n).unwrap(), &shape, Device::Cpu).unwrap())
        })
        .collect();
    let mut rng = Rng::new(1);
    tensors.push(("visual_projection.weight".into(), Tensor::randn(&[32, 64], 1.0, &mut rng, Device::Cpu).unwrap()));
    let dir = temp_dir("clip-hf4");
    let path = dir.join("model.safetensors");
    save(&path, &tensors, SaveDType::F32, None).unwrap();
    let cfg = ClipVisionConfig::tiny();
    let a = ClipVisionEncoder::load(&cfg, &path, Device::Cpu, DType::F32).unwrap();
    assert!(a.named_params().iter().all(|(n, _)| n.starts_with("vision_model.")));
    let b = ClipVisionEncoder::load(&cfg, fixture("image_encoder"), Device::Cpu, DType::F32).unwrap();
    let img = reference_png();
    assert_eq!(
        a.encode_image(&img, 64, 64).unwrap().to_vec().unwrap(),
        b.encode_image(&img, 64, 64).unwrap().to_vec().unwrap()
    );
    // what the tower runs: all blocks but the last, no post-LayerNorm
    let names: Vec<String> = b.named_params().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().any(|n| n.starts_with("encoder.layers.1.")));
    assert!(!names.iter().any(|n| n.starts_with("encoder.layers.2.") || n.starts_with("post_layernorm")));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_images_are_named_errors() {
    let dir = temp_dir("clip-img");
    let e = ImageRgb::open(dir.join("absent.png")).unwrap_err().to_string();
    assert!(e.contains("absent.png") && e.contains("cannot read"), "{e}");

    let gif = dir.join("anim.gif");
    std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    let e = ImageRgb::open(&gif).unwrap_err().to_string();
    assert!(e.contains("anim.gif") && e.contains("Gif") && e.contains("not supported"), "{e}");

    let text = dir.join("notes.jpg");
    std::fs::write(&text, b"this is not an image at all").unwrap();
    let e = ImageRgb::open(&text).unwrap_err().to_string();
    assert!(e.contains("notes.jpg") && e.contains("unrecognised image format"), "{e}");

    let png = std::fs::read(fixture("ref.png")).unwrap();
    let truncated = dir.join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    let e = ImageRgb::open(&truncated).unwrap_err().to_string();
    assert!(e.contains("truncated.png") && e.contains("cannot decode"), "{e}");

    let e = ImageRgb::new(4, 4, vec![0; 47]).unwrap_err().to_string();
    assert!(e.contains("47") && e.contains("4x4"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_weights_and_inputs_are_named_errors() {
    let wrong = ClipVisionConfig { intermediate_size: 96, ..ClipVisionConfig::tiny() };
    let e =
        ClipVisionEncoder::load(&wrong, fixture("image_encoder"), Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("mis-shaped") && e.contains("encoder.layers.0.mlp.fc1.weight") && e.contains("[96, 64]"), "{e}");
    let bigger = ClipVisionConfig { image_size: 56, ..ClipVisionConfig::tiny() };
    let e =
        ClipVisionEncoder::load(&bigger, fixture("image_encoder"), Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("embeddings.position_embedding.weight") && e.contains("[17, 64]"), "{e}");
    let e = ClipVisionEncoder::load(&ClipVisionConfig::tiny(), fixture("absent.safetensors"), Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("absent.safetensors"), "{e}");
    let bad = ClipVisionConfig { image_size: 40, ..ClipVisionConfig::tiny() };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("image_size 40") && e.contains("patch_size 14"), "{e}");

    let model = ClipVisionEncoder::random(&ClipVisionConfig::tiny(), 1, Device::Cpu, DType::F32).unwrap();
    let e = model.forward(&Tensor::zeros(&[1, 3, 40, 40], DType::F32, Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("[B, 3, 42, 42]") && e.contains("[1, 3, 40, 40]"), "{e}");
}

/// bf16 tolerance for a whole tower: relative L2 error and elementwise bounds.
#[test]
fn gpu_matches_cpu_on_the_fixture_model() {
    let Some(dev) = common::gpu() else { return };
    let cfg = ClipVisionConfig::tiny();
    let img = reference_png();
    let cpu = ClipVisionEncoder::load(&cfg, fixture("image_encoder"), Device::Cpu, DType::F32).unwrap();
    let gpu = ClipVisionEncoder::load(&cfg, fixture("image_encoder"), dev, DType::BF16).unwrap();
    let out = gpu.encode_image(&img, 80, 48).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    common::assert_bf16_close(
        &out.to_vec().unwrap(),
        &cpu.encode_image(&img, 80, 48).unwrap().to_vec().unwrap(),
        "tiny CLIP",
    );
}

#[test]
fn gpu_matches_cpu_with_80_wide_heads() {
    let Some(dev) = common::gpu() else { return };
    // head dim 80 as in ViT-H/14, 5×5 patches, a batch of 3
    let cfg = ClipVisionConfig {
        image_size: 70,
        hidden_size: 240,
        num_layers: 4,
        num_heads: 3,
        intermediate_size: 300,
        ..ClipVisionConfig::vit_h14()
    };
    let mut rng = Rng::new(7);
    let pixels = Tensor::randn(&[3, 3, 70, 70], 1.0, &mut rng, Device::Cpu).unwrap();
    let cpu = ClipVisionEncoder::random(&cfg, 2, Device::Cpu, DType::F32).unwrap().forward(&pixels).unwrap();
    let gpu_model = ClipVisionEncoder::random(&cfg, 2, dev, DType::BF16).unwrap();
    let gpu = gpu_model.forward(&pixels.to_device(dev, DType::BF16).unwrap()).unwrap();
    assert_eq!(gpu.shape(), &[3, 26, 240]);
    common::assert_bf16_close(&gpu.to_vec().unwrap(), &cpu.to_vec().unwrap(), "CLIP (head dim 80)");
}

#[test]
fn gpu_vit_h14_encodes_a_reference_image() {
    let Some(dev) = common::gpu() else { return };
    let cuda = synthos_engine::cuda::device(0).unwrap();
    let model = ClipVisionEncoder::random(&ClipVisionConfig::vit_h14(), 3, dev, DType::BF16).unwrap();
    let img = reference_png();
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = model.encode_image(&img, 480, 832).unwrap();
        cuda.synchronize().unwrap();
        times.push(t.elapsed().as_secs_f64());
        assert_eq!(out.shape(), &[1, 257, 1280]);
        assert!(out.to_vec().unwrap().iter().all(|v| v.is_finite()));
    }
    eprintln!("ViT-H/14 (31 blocks) encode_image 480x832 on {}: {times:.3?} s", cuda.describe().unwrap_or_default());
}
