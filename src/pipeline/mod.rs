//! Synthos-I2I end to end: the text encoder, the CLIP image encoder, the DiT and the
//! latent codec together, loaded from published checkpoints (or built as the tiny
//! demo), with the guided flow-matching sampler of docs/MODELS.md, *Sampling*.
//!
//! ```no_run
//! use synthos_engine::pipeline::{GenerateOptions, SynthosPipeline, WeightPaths};
//! use synthos_engine::{DType, Device};
//! # fn main() -> synthos_engine::Result<()> {
//! let paths = WeightPaths {
//!     wan: Some("Wan2.1-T2V-1.3B-Diffusers".into()),
//!     clip: Some("CLIP-ViT-H-14".into()),
//!     checkpoints: vec!["runs/synthos/epoch-9.safetensors".into()],
//!     ..Default::default()
//! };
//! let pipe = SynthosPipeline::load(&paths, Device::Cuda(0), DType::BF16)?;
//! let reference = synthos_engine::image::ImageRgb::open("style.jpg")?;
//! let opts = GenerateOptions { prompt: "a lighthouse at dusk".into(), ..Default::default() };
//! let image = pipe.generate(&opts, Some(&reference))?;
//! image.save_png("out.png")?;
//! # Ok(()) }
//! ```

mod codec;
pub mod demo;
mod sample;

use std::path::{Path, PathBuf};

pub use codec::Codec;
pub use sample::{GenerateOptions, DEFAULT_NEGATIVE_PROMPT};

use crate::image::ImageRgb;
use crate::models::clip::{ClipVisionConfig, ClipVisionEncoder};
use crate::models::t5::{T5Config, T5Encoder, TextEncoder};
use crate::models::vae::{TileOptions, Vae, VaeConfig};
use crate::models::wan::{WanConfig, WanModel};
use crate::tokenizer::T5Tokenizer;
use crate::weights::WeightSet;
use crate::{autograd, bail, ops, DType, Device, Error, Result, ResultExt, Tensor};

/// Where the weights of each component come from. A diffusers-format Wan2.1 folder
/// (`wan`) supplies whatever is not named explicitly: `transformer/`, `text_encoder/`,
/// `tokenizer/tokenizer.json`, `vae/` (and their `config.json`). With neither `wan` nor
/// `dit` the pipeline is the built-in demo ([`SynthosPipeline::demo`]).
#[derive(Clone, Debug, Default)]
pub struct WeightPaths {
    /// A diffusers-format Wan2.1 repository folder.
    pub wan: Option<PathBuf>,
    /// DiT weights (a file, a sharded index or a folder; original or diffusers naming),
    /// instead of `wan/transformer`.
    pub dit: Option<PathBuf>,
    /// A DiT `config.json` or preset name (`wan2.1-t2v-1.3b`, `wan2.1-t2v-14b`, `tiny`);
    /// default: `transformer/config.json` beside the weights, else the 1.3B preset.
    pub dit_config: Option<String>,
    /// umT5 encoder weights (`UMT5EncoderModel` naming), instead of `wan/text_encoder`.
    pub text_encoder: Option<PathBuf>,
    /// umT5 `tokenizer.json`, instead of `wan/tokenizer/tokenizer.json`.
    pub tokenizer: Option<PathBuf>,
    /// Wan VAE weights (`AutoencoderKLWan` naming), instead of `wan/vae`.
    pub vae: Option<PathBuf>,
    /// CLIP ViT-H/14 vision weights (`CLIPVisionModel` naming: a folder or a file).
    /// Needed only for reference images.
    pub clip: Option<PathBuf>,
    /// Synthos checkpoints laid over the DiT in order (`epoch-N.safetensors`, …).
    pub checkpoints: Vec<PathBuf>,
}

impl WeightPaths {
    /// True when no base weights are named: the demo model.
    pub fn is_demo(&self) -> bool {
        self.wan.is_none() && self.dit.is_none()
    }
}

/// The Synthos-I2I components on one device.
pub struct SynthosPipeline {
    /// umT5 tokenizer and encoder (frozen).
    pub text: TextEncoder,
    /// CLIP vision tower (frozen); `None` when no CLIP weights were given.
    pub clip: Option<ClipVisionEncoder>,
    /// The DiT with the image projector.
    pub dit: WanModel,
    /// Images ↔ latents.
    pub codec: Codec,
    device: Device,
    demo: bool,
}

/// `dir/name` if `dir` is given.
fn under(dir: &Option<PathBuf>, name: &str) -> Option<PathBuf> {
    dir.as_ref().map(|d| d.join(name))
}

/// The `config.json` beside weights at `path` (in the folder, or next to the file).
fn config_beside(path: &Path) -> Option<PathBuf> {
    let dir = if path.is_dir() { path.to_path_buf() } else { path.parent()?.to_path_buf() };
    let c = dir.join("config.json");
    c.is_file().then_some(c)
}

fn require(path: Option<PathBuf>, what: &str, flag: &str) -> Result<PathBuf> {
    let p = path
        .ok_or_else(|| Error::msg(format!("no {what} given: pass {flag} (or --wan with a diffusers Wan2.1 folder)")))?;
    if !p.exists() {
        bail!("{what}: {} does not exist", p.display());
    }
    Ok(p)
}

impl SynthosPipeline {
    /// Loads the pipeline named by `paths` (the demo when it names no base weights) onto
    /// `device`; weights are converted to `dtype` on a GPU and kept f32 on the CPU.
    pub fn load(paths: &WeightPaths, device: Device, dtype: DType) -> Result<SynthosPipeline> {
        if paths.is_demo() {
            return Self::demo(device, dtype, &paths.checkpoints);
        }
        let dit_path = require(paths.dit.clone().or_else(|| under(&paths.wan, "transformer")), "DiT weights", "--dit")?;
        let dit_cfg = match &paths.dit_config {
            Some(s) if s.ends_with(".json") => WanConfig::from_json_file(s)?,
            Some(s) => WanConfig::preset(s)?,
            None => match config_beside(&dit_path) {
                Some(c) => WanConfig::from_json_file(c)?,
                None => WanConfig::wan21_t2v_1_3b(),
            },
        };
        let mut files = vec![dit_path];
        files.extend(paths.checkpoints.iter().cloned());
        let dit = WanModel::load(&dit_cfg, &files, device, dtype).ctx("DiT")?;

        let te_path = require(
            paths.text_encoder.clone().or_else(|| under(&paths.wan, "text_encoder")),
            "umT5 text encoder weights",
            "--text-encoder",
        )?;
        let t5_cfg = match config_beside(&te_path) {
            Some(c) => T5Config::from_json_file(c)?,
            None => T5Config::umt5_xxl(),
        };
        let tok_path = require(
            paths.tokenizer.clone().or_else(|| under(&paths.wan, "tokenizer/tokenizer.json")),
            "umT5 tokenizer.json",
            "--tokenizer",
        )?;
        let text = TextEncoder::load(&t5_cfg, &te_path, &tok_path, device, dtype)?;
        if text.model.config().d_model != dit_cfg.text_dim {
            bail!(
                "the text encoder's width {} differs from the DiT's text_dim {}",
                text.model.config().d_model,
                dit_cfg.text_dim
            );
        }

        let vae_path = require(paths.vae.clone().or_else(|| under(&paths.wan, "vae")), "Wan VAE weights", "--vae")?;
        let vae_cfg = match config_beside(&vae_path) {
            Some(c) => VaeConfig::from_json_file(c)?,
            None => VaeConfig::wan21(),
        };
        let vae = Vae::from_weights(&WeightSet::open(&vae_path)?, &vae_cfg, device, dtype)
            .with_ctx(|| format!("Wan VAE from {}", vae_path.display()))?;
        let codec = Codec::Vae { vae: Box::new(vae), tiles: TileOptions::default() };
        if codec.latent_channels() != dit_cfg.in_channels {
            bail!(
                "the VAE's {} latent channels differ from the DiT's {}",
                codec.latent_channels(),
                dit_cfg.in_channels
            );
        }

        let clip = match &paths.clip {
            None => None,
            Some(p) => {
                if !p.exists() {
                    bail!("CLIP weights: {} does not exist", p.display());
                }
                let cfg = match config_beside(p) {
                    Some(c) => ClipVisionConfig::from_json_file(c)?,
                    None => ClipVisionConfig::vit_h14(),
                };
                if cfg.hidden_size != dit_cfg.clip_dim {
                    bail!(
                        "the CLIP tower's width {} differs from the DiT's clip_dim {}",
                        cfg.hidden_size,
                        dit_cfg.clip_dim
                    );
                }
                Some(ClipVisionEncoder::load(&cfg, p, device, dtype)?)
            }
        };
        Ok(SynthosPipeline { text, clip, dit, codec, device, demo: false })
    }

    /// A pipeline from components built elsewhere (random weights for benchmarks, custom
    /// loading); their widths must agree.
    pub fn from_parts(
        text: TextEncoder,
        clip: Option<ClipVisionEncoder>,
        dit: WanModel,
        codec: Codec,
    ) -> Result<SynthosPipeline> {
        let cfg = dit.config();
        if text.model.config().d_model != cfg.text_dim {
            bail!(
                "the text encoder's width {} differs from the DiT's text_dim {}",
                text.model.config().d_model,
                cfg.text_dim
            );
        }
        if let Some(c) = &clip {
            if c.config().hidden_size != cfg.clip_dim {
                bail!(
                    "the CLIP tower's width {} differs from the DiT's clip_dim {}",
                    c.config().hidden_size,
                    cfg.clip_dim
                );
            }
        }
        if codec.latent_channels() != cfg.in_channels {
            bail!("the codec's {} latent channels differ from the DiT's {}", codec.latent_channels(), cfg.in_channels);
        }
        let device = dit.device();
        Ok(SynthosPipeline { text, clip, dit, codec, device, demo: false })
    }

    /// The built-in demo ([`demo`]): frozen tiny encoders with fixed seeds, the pixel
    /// codec, and the demo DiT — random (to train) or the given demo checkpoints laid over
    /// it in order (a trained `epoch-N.safetensors` of `synthos-engine train`).
    pub fn demo(device: Device, dtype: DType, checkpoints: &[PathBuf]) -> Result<SynthosPipeline> {
        let t5_cfg = demo::t5_config();
        let tokenizer = T5Tokenizer::from_bytes(demo::tokenizer_json().as_bytes(), t5_cfg.text_len)?;
        let text = TextEncoder::new(tokenizer, T5Encoder::random(&t5_cfg, demo::TEXT_SEED, device, dtype)?)?;
        let clip = ClipVisionEncoder::random(&demo::clip_config(), demo::CLIP_SEED, device, dtype)?;
        let dit = WanModel::random(&demo::dit_config(), demo::DIT_SEED, device, dtype)?;
        for c in checkpoints {
            dit.apply_checkpoint(c)?;
        }
        Ok(SynthosPipeline {
            text,
            clip: Some(clip),
            dit,
            codec: Codec::Pixels { factor: demo::PIXEL_FACTOR },
            device,
            demo: true,
        })
    }

    /// The device everything runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// True for the built-in demo model.
    pub fn is_demo(&self) -> bool {
        self.demo
    }

    /// Text embeddings `[B, text_len, text_dim]` of `prompts` (zero past each prompt's
    /// length), without gradients.
    pub fn encode_prompts<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor> {
        autograd::no_grad(|| self.text.encode_text(prompts))
    }

    /// CLIP tokens `[1, N, clip_dim]` of a reference image for an output of
    /// `width`×`height`; an error when the pipeline has no CLIP tower.
    pub fn encode_reference(&self, image: &ImageRgb, width: usize, height: usize) -> Result<Tensor> {
        let Some(clip) = &self.clip else {
            bail!("a reference image needs the CLIP ViT-H/14 image encoder: pass --clip (a CLIPVisionModel folder)");
        };
        clip.encode_image(image, width, height)
    }

    /// Latents `[B, C, 1, H/f, W/f]` of images `[B, 3, H, W]` in [−1, 1] (any device).
    pub fn encode_images(&self, images: &Tensor) -> Result<Tensor> {
        let images = images.to_device(self.device, self.dit.dtype())?;
        autograd::no_grad(|| self.codec.encode(&images))
    }

    /// Checks that an output size fits the codec and the DiT's patches.
    pub fn check_size(&self, width: usize, height: usize) -> Result<()> {
        let [_, ph, pw] = self.dit.config().patch_size;
        let f = self.codec.factor();
        let (mh, mw) = (f * ph, f * pw);
        if width == 0 || height == 0 || !width.is_multiple_of(mw) || !height.is_multiple_of(mh) {
            bail!("image size {width}×{height}: width must be a positive multiple of {mw} and height of {mh}");
        }
        // The DiT's 3-D RoPE has positions for `rope_max_seq_len` tokens per axis.
        let max = self.dit.config().rope_max_seq_len;
        if width / mw > max || height / mh > max {
            bail!(
                "image size {width}×{height}: the DiT places at most {max} tokens along each axis, so width and \
                 height can be at most {} and {} pixels",
                max * mw,
                max * mh
            );
        }
        // The decoded image, in f32 on the host (plus its 8-bit copy), must fit in memory.
        let bytes = (width as u64) * (height as u64) * 3 * (4 + 1);
        if let Some(avail) = host_memory_available() {
            if bytes > avail {
                bail!(
                    "image size {width}×{height}: the decoded image alone needs about {:.1} GiB of host memory, \
                     {:.1} GiB are available",
                    bytes as f64 / (1u64 << 30) as f64,
                    avail as f64 / (1u64 << 30) as f64
                );
            }
        }
        Ok(())
    }

    /// Pads or cuts text embeddings `[B, L, d]` to the DiT's `text_len` rows (zeros after),
    /// as the Wan pipelines feed the model.
    pub fn pad_text(&self, text: &Tensor) -> Result<Tensor> {
        let len = self.dit.config().text_len;
        let [b, l, d] = *text.shape() else {
            bail!("pad_text: expected [B, L, d], got {:?}", text.shape());
        };
        if l == len {
            return Ok(text.clone());
        }
        if l > len {
            return ops::narrow(text, 1, 0, len);
        }
        let pad = Tensor::zeros(&[b, len - l, d], text.dtype(), text.device())?;
        ops::concat(&[text, &pad], 1)
    }
}

/// Host memory available to new allocations (Linux `MemAvailable`), if known.
fn host_memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
