//! The CLIP vision tower that conditions Synthos-I2I on a reference image: open-clip
//! ViT-H/14 ("Reproducible scaling laws for contrastive language-image learning",
//! <https://arxiv.org/abs/2212.07143>) as Hugging Face's `CLIPVisionModel` (the
//! `image_encoder/` folder of a diffusers-format Wan I2V repository). Facts: docs/MODELS.md, *Image encoder*.
//!
//! ```text
//! image ─resize to the output size, [−1,1], bicubic 224², [0,1], CLIP mean/std─► [1,3,224,224]
//! patches 16×16 of 14² ─ linear (conv without bias) ─► [B,256,1280]
//! cat[class token] + position embedding ─ pre-LayerNorm ─► [B,257,1280]
//! 31 of the 32 pre-norm blocks { x += attn(LN1 x) (16 heads of 80); x += fc2(gelu(fc1(LN2 x))) }
//! ─► the penultimate hidden states [B,257,1280] (no final LayerNorm, no projection)
//! ```
//!
//! This is `hidden_states[-2]` of `CLIPVisionModel(…, output_hidden_states=True)` (what
//! diffusers' Wan I2V pipeline and Wan's `use_31_block=True` take). The last block and the
//! post-LayerNorm of the checkpoint are not loaded. Keys may carry transformers 4's
//! `vision_model.` prefix or not (transformers 5).
//!
//! ```no_run
//! use synthos_engine::image::ImageRgb;
//! use synthos_engine::models::clip::{ClipVisionConfig, ClipVisionEncoder};
//! use synthos_engine::{DType, Device};
//! # fn main() -> synthos_engine::Result<()> {
//! let cfg = ClipVisionConfig::vit_h14();
//! let enc = ClipVisionEncoder::load(&cfg, "Wan2.1-I2V-14B-480P-Diffusers/image_encoder", Device::Cuda(0), DType::BF16)?;
//! let tokens = enc.encode_image(&ImageRgb::open("reference.jpg")?, 480, 480)?; // [1, 257, 1280]
//! # Ok(()) }
//! ```
//! Parity with transformers is tested in `tests/clip.rs` (`cargo test --test clip`).

use std::path::Path;

use serde_json::Value;

use crate::image::clip::clip_pixels;
use crate::image::ImageRgb;
use crate::nn::{Init, LayerNorm, Linear, Module, NamedParam, ParamSource, RandomInit};
use crate::ops::{self, AttentionOptions, GeluApprox};
use crate::weights::{Loader, WeightSet};
use crate::{autograd, bail, DType, Device, Result, Tensor};

/// Hyper-parameters of a CLIP vision tower.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    /// Input side in pixels (224).
    pub image_size: usize,
    /// Patch side in pixels (14).
    pub patch_size: usize,
    /// Width (1280).
    pub hidden_size: usize,
    /// Blocks in the checkpoint (32); the encoder runs all but the last.
    pub num_layers: usize,
    /// Attention heads (16, head dim 80).
    pub num_heads: usize,
    /// Hidden width of the MLP (5120).
    pub intermediate_size: usize,
    /// LayerNorm epsilon (1e-5).
    pub eps: f32,
}

impl ClipVisionConfig {
    /// open-clip ViT-H/14, the image encoder of Wan2.1 I2V and Synthos-I2I.
    pub fn vit_h14() -> ClipVisionConfig {
        ClipVisionConfig {
            image_size: 224,
            patch_size: 14,
            hidden_size: 1280,
            num_layers: 32,
            num_heads: 16,
            intermediate_size: 5120,
            eps: 1e-5,
        }
    }

    /// A tiny tower for tests: 42 px (3×3 patches of 14), width 64, 2 heads of 32, MLP
    /// 80, 3 blocks (2 run). `tests/fixtures/clip/` has this shape.
    pub fn tiny() -> ClipVisionConfig {
        ClipVisionConfig {
            image_size: 42,
            hidden_size: 64,
            num_layers: 3,
            num_heads: 2,
            intermediate_size: 80,
            ..Self::vit_h14()
        }
    }

    /// A preset by name: `vit-h-14` or `tiny`.
    pub fn preset(name: &str) -> Result<ClipVisionConfig> {
        Ok(match name {
            "vit-h-14" => Self::vit_h14(),
            "tiny" => Self::tiny(),
            _ => bail!("unknown CLIP vision config preset {name:?} (known: vit-h-14, tiny)"),
        })
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Output tokens: the class token and one per patch (257 for ViT-H/14).
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Checks that the sizes fit together; errors name the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("intermediate_size", self.intermediate_size),
        ] {
            if v == 0 {
                bail!("CLIP vision config: {name} must be positive");
            }
        }
        if self.num_layers < 2 {
            bail!("CLIP vision config: num_layers must be at least 2 (the penultimate block's output is used)");
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            bail!(
                "CLIP vision config: image_size {} is not a multiple of patch_size {}",
                self.image_size,
                self.patch_size
            );
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            bail!(
                "CLIP vision config: hidden_size {} is not a multiple of num_heads {}",
                self.hidden_size,
                self.num_heads
            );
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("CLIP vision config: eps must be positive, got {}", self.eps);
        }
        Ok(())
    }

    /// Reads a transformers `CLIPVisionConfig` `config.json` (or a `CLIPConfig` with a
    /// `vision_config`). Only the exact GELU of ViT-H/14 is supported.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<ClipVisionConfig> {
        crate::models::read_json_config(path.as_ref(), "CLIP vision config", Self::from_json)
    }

    /// [`ClipVisionConfig::from_json_file`] on parsed JSON.
    pub fn from_json(json: &Value) -> Result<ClipVisionConfig> {
        let json = json.get("vision_config").unwrap_or(json);
        let Some(obj) = json.as_object() else {
            bail!("expected a JSON object");
        };
        let size = |key: &str| crate::models::json_usize(obj, key);
        let act = obj.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu");
        if act != "gelu" {
            bail!("\"hidden_act\" is {act:?}; only the exact GELU (\"gelu\") of ViT-H/14 is supported");
        }
        if let Some(c) = obj.get("num_channels").and_then(Value::as_u64) {
            if c != 3 {
                bail!("\"num_channels\" is {c}; only RGB (3) is supported");
            }
        }
        let cfg = ClipVisionConfig {
            image_size: size("image_size")?,
            patch_size: size("patch_size")?,
            hidden_size: size("hidden_size")?,
            num_layers: size("num_hidden_layers")?,
            num_heads: size("num_attention_heads")?,
            intermediate_size: size("intermediate_size")?,
            eps: obj.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-5) as f32,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// One pre-norm transformer block (`encoder.layers.{i}`).
struct ClipLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl ClipLayer {
    fn new(src: &mut dyn ParamSource, cfg: &ClipVisionConfig, p: &str) -> Result<ClipLayer> {
        let d = cfg.hidden_size;
        Ok(ClipLayer {
            norm1: LayerNorm::new(src, &format!("{p}.layer_norm1"), d, cfg.eps, true)?,
            q: Linear::new(src, &format!("{p}.self_attn.q_proj"), d, d, true)?,
            k: Linear::new(src, &format!("{p}.self_attn.k_proj"), d, d, true)?,
            v: Linear::new(src, &format!("{p}.self_attn.v_proj"), d, d, true)?,
            out: Linear::new(src, &format!("{p}.self_attn.out_proj"), d, d, true)?,
            norm2: LayerNorm::new(src, &format!("{p}.layer_norm2"), d, cfg.eps, true)?,
            fc1: Linear::new(src, &format!("{p}.mlp.fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::new(src, &format!("{p}.mlp.fc2"), cfg.intermediate_size, d, true)?,
        })
    }

    fn forward(&self, x: &Tensor, cfg: &ClipVisionConfig) -> Result<Tensor> {
        let (b, n, d) = (x.shape()[0], x.shape()[1], cfg.hidden_size);
        let heads = [b, n, cfg.num_heads, cfg.head_dim()];
        let h = self.norm1.forward(x)?;
        let q = ops::reshape(&self.q.forward(&h)?, &heads)?;
        let k = ops::reshape(&self.k.forward(&h)?, &heads)?;
        let v = ops::reshape(&self.v.forward(&h)?, &heads)?;
        let a = ops::attention(&q, &k, &v, &AttentionOptions::new(cfg.head_dim()))?;
        let x = ops::add(x, &self.out.forward(&ops::reshape(&a, &[b, n, d])?)?)?;
        let h = ops::gelu(&self.fc1.forward(&self.norm2.forward(&x)?)?, GeluApprox::Exact)?;
        ops::add(&x, &self.fc2.forward(&h)?)
    }
}

impl Module for ClipLayer {
    fn params(&self, out: &mut Vec<NamedParam>) {
        self.norm1.params(out);
        for l in [&self.q, &self.k, &self.v, &self.out] {
            l.params(out);
        }
        self.norm2.params(out);
        self.fc1.params(out);
        self.fc2.params(out);
    }
}

/// The CLIP vision tower up to its penultimate block.
pub struct ClipVisionEncoder {
    cfg: ClipVisionConfig,
    device: Device,
    prefix: String,
    /// `[D, 3, p, p]` as in the checkpoint.
    patch_weight: Tensor,
    /// `[D]`.
    class_embedding: Tensor,
    /// `[tokens, D]`.
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    /// The first `num_layers − 1` blocks.
    layers: Vec<ClipLayer>,
}

impl ClipVisionEncoder {
    fn build(cfg: &ClipVisionConfig, src: &mut dyn ParamSource, prefix: &str) -> Result<ClipVisionEncoder> {
        cfg.validate()?;
        let (d, p) = (cfg.hidden_size, cfg.patch_size);
        let emb = format!("{prefix}embeddings");
        let fan_in = 3 * p * p;
        let patch_weight = src.param(
            &format!("{emb}.patch_embedding.weight"),
            &[d, 3, p, p],
            Init::Uniform(1.0 / (fan_in as f32).sqrt()),
        )?;
        let class_embedding =
            src.param(&format!("{emb}.class_embedding"), &[d], Init::Normal(1.0 / (d as f32).sqrt()))?;
        let position_embedding =
            src.param(&format!("{emb}.position_embedding.weight"), &[cfg.tokens(), d], Init::Normal(0.02))?;
        let pre_norm = LayerNorm::new(src, &format!("{prefix}pre_layrnorm"), d, cfg.eps, true)?;
        let layers = (0..cfg.num_layers - 1)
            .map(|i| ClipLayer::new(src, cfg, &format!("{prefix}encoder.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVisionEncoder {
            cfg: cfg.clone(),
            device: src.device(),
            prefix: prefix.to_string(),
            patch_weight,
            class_embedding,
            position_embedding,
            pre_norm,
            layers,
        })
    }

    /// A tower with random weights (tests, benchmarks), seeded, in transformers 5 naming.
    pub fn random(cfg: &ClipVisionConfig, seed: u64, device: Device, dtype: DType) -> Result<ClipVisionEncoder> {
        Self::build(cfg, &mut RandomInit::new(seed, device, dtype), "")
    }

    /// Loads `CLIPVisionModel` weights (a `.safetensors` file, a sharded index json or a
    /// directory such as a diffusers repository's `image_encoder/`) onto `device` as
    /// `dtype`. The last block, the post-LayerNorm, and any projection or text tower are
    /// skipped; missing, mis-shaped and unexpected tensors are reported together.
    pub fn load(
        cfg: &ClipVisionConfig,
        path: impl AsRef<Path>,
        device: Device,
        dtype: DType,
    ) -> Result<ClipVisionEncoder> {
        let set = WeightSet::open(path.as_ref())?;
        let prefix = if set.contains("vision_model.embeddings.class_embedding") { "vision_model." } else { "" };
        let mut loader = Loader::new(&set, device, dtype);
        let last = format!("{prefix}encoder.layers.{}.", cfg.num_layers.saturating_sub(1));
        let post = format!("{prefix}post_layernorm.");
        loader.ignore_where(|n| {
            n.starts_with(&last)
                || n.starts_with(&post)
                || n.starts_with("visual_projection.")
                || n.starts_with("text_model.")
                || n.starts_with("text_projection.")
                || n == "logit_scale"
                || n.ends_with("embeddings.position_ids")
        });
        let built = Self::build(cfg, &mut loader, prefix);
        let finished = loader.finish();
        match (built, finished) {
            (Ok(model), Ok(())) => Ok(model),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e.context("CLIP vision encoder")),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The penultimate hidden states `[B, tokens, D]` of normalized pixels
    /// `[B, 3, image_size, image_size]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (s, p, d) = (self.cfg.image_size, self.cfg.patch_size, self.cfg.hidden_size);
        let ps = pixels.shape();
        if ps.len() != 4 || ps[1] != 3 || ps[2] != s || ps[3] != s || ps[0] == 0 {
            bail!("ClipVisionEncoder: pixels must be [B, 3, {s}, {s}], got {ps:?}");
        }
        let (b, g) = (ps[0], self.cfg.grid());
        // The stride-p convolution is a linear map of each patch flattened as (c, y, x).
        let patches = ops::reshape(pixels, &[b, 3, g, p, g, p])?;
        let patches = ops::permute(&patches, &[0, 2, 4, 1, 3, 5])?;
        let patches = ops::reshape(&patches, &[b, g * g, 3 * p * p])?;
        let weight = ops::reshape(&self.patch_weight, &[d, 3 * p * p])?;
        let x = ops::linear(&patches, &weight, None)?;
        let class = ops::broadcast_to(&ops::reshape(&self.class_embedding, &[1, 1, d])?, &[b, 1, d])?;
        let x = ops::concat(&[&class, &x], 1)?;
        let x = ops::add(&x, &self.position_embedding)?;
        let mut x = self.pre_norm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, &self.cfg)?;
        }
        Ok(x)
    }

    /// The image tokens of a reference image for an output of `width`×`height`
    /// (`[1, 257, 1280]` for ViT-H/14): the Synthos preprocessing
    /// ([`crate::image::clip::clip_pixels`]), then [`ClipVisionEncoder::forward`], without
    /// recording gradients (the encoder is frozen).
    pub fn encode_image(&self, image: &ImageRgb, width: usize, height: usize) -> Result<Tensor> {
        let s = self.cfg.image_size;
        let pixels = clip_pixels(image, width, height, s)?;
        let pixels = Tensor::from_vec_dtype(pixels, &[1, 3, s, s], self.device, self.patch_weight.dtype())?;
        autograd::no_grad(|| self.forward(&pixels))
    }
}

impl Module for ClipVisionEncoder {
    fn params(&self, out: &mut Vec<NamedParam>) {
        let emb = format!("{}embeddings", self.prefix);
        out.push((format!("{emb}.patch_embedding.weight"), self.patch_weight.clone()));
        out.push((format!("{emb}.class_embedding"), self.class_embedding.clone()));
        out.push((format!("{emb}.position_embedding.weight"), self.position_embedding.clone()));
        self.pre_norm.params(out);
        for layer in &self.layers {
            layer.params(out);
        }
    }
}
