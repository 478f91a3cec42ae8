//! The Wan VAE: single-frame encode/decode and decode gradients against diffusers'
//! `AutoencoderKLWan` (fixtures from tests/reference/make_vae_fixtures.py), tiled against
//! untiled decoding, weight-loading and input errors, and (with a GPU) the CPU/GPU
//! agreement of the tiny model and timings of the full one.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use synthos_engine::image::ImageRgb;
use synthos_engine::models::vae::{TileOptions, Vae, VaeConfig};
use synthos_engine::nn::{Module, RandomInit};
use synthos_engine::weights::{save, SaveDType, WeightSet};
use synthos_engine::{autograd, no_grad, ops, DType, Device, Rng, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae").join(name)
}

fn weights() -> WeightSet {
    WeightSet::open(fixture("tiny_weights.safetensors")).unwrap()
}

fn io() -> WeightSet {
    WeightSet::open(fixture("tiny_io.safetensors")).unwrap()
}

/// A fixture tensor on the CPU.
fn io_tensor(set: &WeightSet, name: &str) -> Tensor {
    let shape = set.shape(name).unwrap().to_vec();
    Tensor::from_vec(set.read_f32(name).unwrap(), &shape, Device::Cpu).unwrap()
}

fn tiny_cpu() -> Vae {
    Vae::from_weights(&weights(), &VaeConfig::tiny(), Device::Cpu, DType::F32).unwrap()
}

/// Elementwise within `rel · max|want|`, and relative L2 error at most `rel`.
fn assert_rel(got: &[f32], want: &[f32], rel: f32, what: &str) {
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_close(got, want, rel * max, 0.0, what);
    let e = rel_err(got, want);
    assert!(e <= rel as f64, "{what}: relative L2 error {e} > {rel}");
}

#[test]
fn encode_matches_diffusers() {
    let vae = tiny_cpu();
    let io = io();
    let image = io_tensor(&io, "image");
    let latent = vae.encode(&image).unwrap();
    assert_eq!(latent.shape(), &[1, 16, 1, 5, 7]);
    assert_rel(&latent.to_vec().unwrap(), &io.read_f32("latent").unwrap(), 1e-4, "encode (normalised mean)");
    // A 4-D image is the same single frame.
    let image4 = image.to_vec().unwrap();
    let again = vae.encode(&Tensor::from_vec(image4, &[1, 3, 40, 56], Device::Cpu).unwrap()).unwrap();
    assert_eq!(again.to_vec().unwrap(), latent.to_vec().unwrap());
}

#[test]
fn decode_matches_diffusers() {
    let vae = tiny_cpu();
    let io = io();
    let z = io_tensor(&io, "z");
    let raw = vae.decode_unclamped(&z).unwrap();
    assert_eq!(raw.shape(), &[1, 3, 40, 56]);
    let want_raw = io.read_f32("decoded_raw").unwrap();
    assert_rel(&raw.to_vec().unwrap(), &want_raw, 1e-4, "decoder output");
    let img = vae.decode(&z).unwrap().to_vec().unwrap();
    assert_rel(&img, &io.read_f32("decoded").unwrap(), 1e-4, "decode (clamped)");
    // The fixture's decoder is scaled so that the clamp acts on a good share of pixels.
    let clamped = img.iter().filter(|v| v.abs() == 1.0).count();
    assert!(clamped > img.len() / 20, "only {clamped} of {} values clamped", img.len());
    assert!(img.iter().all(|v| v.abs() <= 1.0));
}

#[test]
fn decode_gradients_match_torch() {
    let vae = tiny_cpu();
    let io = io();
    let named: std::collections::HashMap<String, Tensor> = vae.named_params().into_iter().collect();
    let checked = [
        "decoder.up_blocks.1.resnets.0.conv1.weight",
        "decoder.mid_block.attentions.0.to_qkv.weight",
        "decoder.up_blocks.2.resnets.1.norm2.gamma",
        "post_quant_conv.weight",
    ];
    for n in checked {
        named[n].set_requires_grad(true);
    }
    let z = io_tensor(&io, "z").requires_grad();
    let raw = vae.decode_unclamped(&z).unwrap();
    let proj = io_tensor(&io, "proj");
    let loss = ops::sum_all(&ops::mul(&raw, &ops::reshape(&proj, raw.shape()).unwrap()).unwrap()).unwrap();
    let grads = autograd::backward(&loss).unwrap();
    for n in checked {
        named[n].set_requires_grad(false);
    }
    assert_rel(&grads.get(&z).unwrap().to_vec().unwrap(), &io.read_f32("grad_z").unwrap(), 1e-4, "d loss / d z");
    for n in checked {
        let g = grads.get(&named[n]).unwrap_or_else(|| panic!("no gradient for {n}"));
        assert_eq!(g.shape(), named[n].shape(), "{n}");
        assert_rel(&g.to_vec().unwrap(), &io.read_f32(&format!("grad.{n}")).unwrap(), 1e-4, &format!("d loss / d {n}"));
    }
}

#[test]
fn params_cover_the_checkpoint() {
    let vae = tiny_cpu();
    let set = weights();
    let mut ours: Vec<String> = vae.named_params().into_iter().map(|(n, _)| n).collect();
    ours.sort();
    let mut theirs: Vec<String> = set.names().map(String::from).collect();
    theirs.sort();
    assert_eq!(ours, theirs);
    // The full config has the published parameter count (about 127 M) without building it.
    assert_eq!(VaeConfig::wan21().spatial_factor(), 8);
}

#[test]
fn tiled_decode_matches_diffusers() {
    let vae = tiny_cpu();
    let io = io();
    let z = io_tensor(&io, "z_tiled");
    // diffusers' enable_tiling(64-pixel tiles, 40-pixel stride) = 8-pixel latent tiles every 5.
    let tiled = no_grad(|| vae.decode_tiled(&z, &TileOptions { tile: 8, stride: 5, whole_up_to: 0 })).unwrap();
    assert_eq!(tiled.shape(), &[1, 3, 104, 88]);
    assert_rel(&tiled.to_vec().unwrap(), &io.read_f32("decoded_tiled").unwrap(), 1e-4, "tiled decode");
    let e = vae.decode_tiled(&z, &TileOptions { tile: 4, stride: 5, whole_up_to: 0 }).unwrap_err().to_string();
    assert!(e.contains("stride ≤ tile"), "{e}");
}

/// Largest difference between horizontally adjacent pixels of `[1, 3, h, w]` values.
fn max_step(v: &[f32], h: usize, w: usize) -> f32 {
    let mut m = 0f32;
    for row in v.chunks(w).take(3 * h) {
        for x in 1..w {
            m = m.max((row[x] - row[x - 1]).abs());
        }
    }
    m
}

#[test]
fn tiled_decode_agrees_with_untiled() {
    let vae = tiny_cpu();
    let mut rng = Rng::new(51);
    let z = Tensor::randn(&[1, 16, 1, 13, 11], 1.0, &mut rng, Device::Cpu).unwrap();
    let whole = no_grad(|| vae.decode(&z)).unwrap().to_vec().unwrap();
    // One tile covering everything is the untiled decode.
    let one = no_grad(|| vae.decode_tiled(&z, &TileOptions { tile: 13, stride: 13, whole_up_to: 0 })).unwrap();
    assert_eq!(one.to_vec().unwrap(), whole);
    // With diffusers' proportions (tiles of 32, stride 24) on a 40×40 latent the tiles
    // agree with the whole image up to the context a tile lacks: the middle attention
    // sees only its tile and the convolutions see zeros past its border (random weights
    // make that context matter more than trained ones do).
    let z = Tensor::randn(&[1, 16, 1, 40, 40], 1.0, &mut rng, Device::Cpu).unwrap();
    let whole = no_grad(|| vae.decode(&z)).unwrap().to_vec().unwrap();
    let diffusers_tiles = TileOptions { whole_up_to: 0, ..TileOptions::default() };
    let tiled = no_grad(|| vae.decode_tiled(&z, &diffusers_tiles)).unwrap().to_vec().unwrap();
    let e = rel_err(&tiled, &whole);
    assert!(e < 0.1, "tiled vs untiled: relative L2 error {e}");
    // The blending leaves no seam: no jump between neighbours beyond the image's own.
    let (a, b) = (max_step(&tiled, 320, 320), max_step(&whole, 320, 320));
    assert!(a <= 1.25 * b, "tiled image has a seam: largest step {a} vs {b} untiled");
}

/// Latents of at most `whole_up_to` pixels decode whole (the default: up to 128×128, so a
/// 480×480 image is one decode); larger ones in tiles.
#[test]
fn small_latents_decode_whole() {
    let vae = tiny_cpu();
    let mut rng = Rng::new(53);
    let opts = TileOptions { tile: 8, stride: 5, whole_up_to: 100 };
    let z = Tensor::randn(&[1, 16, 1, 9, 11], 1.0, &mut rng, Device::Cpu).unwrap();
    let whole = no_grad(|| vae.decode(&z)).unwrap().to_vec().unwrap();
    assert_eq!(no_grad(|| vae.decode_tiled(&z, &opts)).unwrap().to_vec().unwrap(), whole, "99 pixels: whole");
    let z = Tensor::randn(&[1, 16, 1, 13, 11], 1.0, &mut rng, Device::Cpu).unwrap();
    let whole = no_grad(|| vae.decode(&z)).unwrap().to_vec().unwrap();
    assert_ne!(no_grad(|| vae.decode_tiled(&z, &opts)).unwrap().to_vec().unwrap(), whole, "143 pixels: tiles");
    let d = TileOptions::default();
    assert!(60 * 60 <= d.whole_up_to && d.whole_up_to < 129 * 129, "{d:?}");
}

#[test]
fn bad_inputs_are_errors() {
    let vae = tiny_cpu();
    let mut rng = Rng::new(52);
    let e = vae.encode(&randn(&[1, 3, 44, 56], &mut rng)).unwrap_err().to_string();
    assert!(e.contains("44×56") && e.contains("not divisible by 8"), "{e}");
    let e = vae.encode(&randn(&[1, 4, 40, 56], &mut rng)).unwrap_err().to_string();
    assert!(e.contains("3 channels"), "{e}");
    let e = vae.encode(&randn(&[1, 3, 2, 40, 56], &mut rng)).unwrap_err().to_string();
    assert!(e.contains("one frame") && e.contains("[1, 3, 2, 40, 56]"), "{e}");
    let e = vae.decode(&randn(&[1, 8, 1, 5, 7], &mut rng)).unwrap_err().to_string();
    assert!(e.contains("latent must be [B, 16, 1, h, w]") && e.contains("[1, 8, 1, 5, 7]"), "{e}");
    let e = vae.decode(&randn(&[1, 16, 3, 5, 7], &mut rng)).unwrap_err().to_string();
    assert!(e.contains("one frame"), "{e}");

    // A checkpoint with a mis-shaped tensor and a missing one: both named in one error.
    let set = weights();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for name in set.names() {
        if name == "decoder.norm_out.gamma" {
            continue;
        }
        let shape = set.shape(name).unwrap().to_vec();
        let mut t = Tensor::from_vec(set.read_f32(name).unwrap(), &shape, Device::Cpu).unwrap();
        if name == "encoder.conv_in.weight" {
            t = ops::reshape(&t, &[shape[0], shape[1], 1, 9, 3]).unwrap();
        }
        tensors.push((name.to_string(), t));
    }
    let dir = std::env::temp_dir().join(format!("synthos-vae-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.safetensors");
    save(&path, &tensors, SaveDType::F32, None).unwrap();
    let broken = WeightSet::open(&path).unwrap();
    let e = Vae::from_weights(&broken, &VaeConfig::tiny(), Device::Cpu, DType::F32).err().unwrap().to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(e.contains("mis-shaped 'encoder.conv_in.weight'") && e.contains("[6, 3, 3, 3, 3]"), "{e}");
    assert!(e.contains("missing 'decoder.norm_out.gamma'"), "{e}");
    // The tiny checkpoint is not the full model.
    let e = Vae::from_weights(&weights(), &VaeConfig::wan21(), Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("mis-shaped"), "{e}");

    let mut cfg = VaeConfig::tiny();
    cfg.latents_std.pop();
    let e = Vae::new(&mut RandomInit::new(0, Device::Cpu, DType::F32), &cfg).err().unwrap().to_string();
    assert!(e.contains("latents_std (15)"), "{e}");
}

#[test]
fn rgb8_mapping() {
    let v = vec![-1.0, 0.0, 1.0, 1.5, -0.2, 0.5];
    // [3, 1, 2]: channel-major in, interleaved out.
    let t = Tensor::from_vec(v, &[3, 1, 2], Device::Cpu).unwrap();
    assert_eq!(ImageRgb::from_tensor(&t).unwrap().data(), vec![0, 255, 102, 128, 255, 191]);
    let e =
        ImageRgb::from_tensor(&Tensor::zeros(&[2, 3, 1, 1], DType::F32, Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("[2, 3, 1, 1]"), "{e}");
}

// ---------------------------------------------------------------------------------------
// GPU

/// Encode and decode on the GPU in `dtype` against the CPU, and decode gradients.
fn compare_tiny_gpu(dev: Device, dtype: DType) {
    let cpu = tiny_cpu();
    let gpu = Vae::from_weights(&weights(), &VaeConfig::tiny(), dev, dtype).unwrap();
    let io = io();
    // Whole-model bounds: cuBLASLt runs f32 GEMMs in TF32 (about 6e-4 relative each), and
    // the errors of some 45 layers add up; bf16 rounds every activation.
    let (l2, what) = match dtype {
        DType::F32 => (1e-2, "f32 (TF32 GEMMs)"),
        DType::BF16 => (5e-2, "bf16"),
    };
    let image = io_tensor(&io, "image");
    let lc = cpu.encode(&image).unwrap().to_vec().unwrap();
    let lg = gpu.encode(&image.to_device(dev, dtype).unwrap()).unwrap().to_vec().unwrap();
    let e = rel_err(&lg, &lc);
    assert!(e < l2, "encode {what}: relative L2 error {e}");

    let z = io_tensor(&io, "z");
    let proj = ops::reshape(&io_tensor(&io, "proj"), &[1, 3, 40, 56]).unwrap();
    let run = |vae: &Vae, z: Tensor, proj: &Tensor| {
        let z = z.requires_grad();
        let raw = vae.decode_unclamped(&z).unwrap();
        let loss = ops::sum_all(&ops::mul(&raw, proj).unwrap()).unwrap();
        let g = autograd::backward(&loss).unwrap();
        (raw.to_vec().unwrap(), g.get(&z).unwrap().to_vec().unwrap())
    };
    let (dc, gc) = run(&cpu, z.clone(), &proj);
    let (dg, gg) = run(&gpu, z.to_device(dev, dtype).unwrap(), &proj.to_device(dev, dtype).unwrap());
    let e = rel_err(&dg, &dc);
    assert!(e < l2, "decode {what}: relative L2 error {e}");
    let e = rel_err(&gg, &gc);
    assert!(e < 2.0 * l2, "decode gradient {what}: relative L2 error {e}");
}

#[test]
fn gpu_tiny_vae_matches_cpu() {
    let Some(dev) = gpu() else { return };
    compare_tiny_gpu(dev, DType::F32);
    compare_tiny_gpu(dev, DType::BF16);
}

/// Lowest free device memory seen by a sampling thread while `f` runs, and `f`'s result.
fn with_min_free<R>(dev: &synthos_engine::cuda::CudaDevice, f: impl FnOnce() -> R) -> (R, usize) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let done = AtomicBool::new(false);
    let min_free = AtomicUsize::new(usize::MAX);
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Ok((free, _)) = dev.mem_info() {
                    min_free.fetch_min(free, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        let r = f();
        done.store(true, Ordering::Relaxed);
        r
    });
    (r, min_free.load(Ordering::Relaxed))
}

#[test]
fn gpu_full_config_decode_timing_and_memory() {
    let Some(dev) = gpu() else { return };
    let cuda = synthos_engine::cuda::device(0).unwrap();
    let t0 = std::time::Instant::now();
    let vae = Vae::new(&mut RandomInit::new(7, dev, DType::BF16), &VaeConfig::wan21()).unwrap();
    let nparams: usize = vae.named_params().iter().map(|(_, t)| t.numel()).sum();
    println!("full Wan VAE: {:.1} M parameters (random, bf16), built in {:.1?}", nparams as f64 / 1e6, t0.elapsed());
    let mut rng = Rng::new(8);
    for (side, tiled) in [(480usize, false), (1024, false), (1024, true)] {
        let z = Tensor::randn(&[1, 16, 1, side / 8, side / 8], 1.0, &mut rng, dev).unwrap();
        cuda.synchronize().unwrap();
        let (free0, total) = cuda.mem_info().unwrap();
        let t = std::time::Instant::now();
        let (img, min_free) = with_min_free(&cuda, || {
            let img =
                no_grad(|| if tiled { vae.decode_tiled(&z, &TileOptions::default()) } else { vae.decode(&z) }).unwrap();
            cuda.synchronize().unwrap();
            img
        });
        let dt = t.elapsed();
        assert_eq!(img.shape(), &[1, 3, side, side]);
        let v = img.to_vec().unwrap();
        assert!(v.iter().all(|x| x.is_finite() && x.abs() <= 1.0), "{side}: values outside [-1, 1]");
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        println!(
            "decode {side}×{side}{}: {dt:.2?}, peak extra device memory ≈ {:.2} GiB (free {:.1} → min {:.1} of {:.1} GiB)",
            if tiled { " tiled" } else { "" },
            gib(free0.saturating_sub(min_free)),
            gib(free0),
            gib(min_free),
            gib(total)
        );
    }
    let x = Tensor::rand_uniform(&[1, 3, 480, 480], -1.0, 1.0, &mut rng, dev).unwrap();
    let t = std::time::Instant::now();
    let latent = no_grad(|| vae.encode(&x)).unwrap();
    cuda.synchronize().unwrap();
    println!("encode 480×480: {:.2?}", t.elapsed());
    assert_eq!(latent.shape(), &[1, 16, 1, 60, 60]);
}
