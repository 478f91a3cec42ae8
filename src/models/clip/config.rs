//! Hyper-parameters of the contrastive CLIP model (both towers), its presets and its
//! JSON form.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::{bail, Result};

/// The MLP activation of a tower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipAct {
    /// The exact (erf) GELU: timm ViTs, OpenCLIP's own models.
    Gelu,
    /// `x·σ(1.702x)`: OpenAI CLIP and SLIP/SynthCLIP's text tower.
    QuickGelu,
}

impl ClipAct {
    fn name(self) -> &'static str {
        match self {
            ClipAct::Gelu => "gelu",
            ClipAct::QuickGelu => "quick_gelu",
        }
    }

    fn parse(s: &str, key: &str) -> Result<ClipAct> {
        match s {
            "gelu" => Ok(ClipAct::Gelu),
            "quick_gelu" => Ok(ClipAct::QuickGelu),
            _ => bail!("\"{key}\" is {s:?}; expected \"gelu\" or \"quick_gelu\""),
        }
    }
}

/// How the image tower is laid out, which fixes its checkpoint names too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionForm {
    /// timm `VisionTransformer` (SLIP/SynthCLIP `visual.*`): patch convolution with a
    /// bias, no LayerNorm before the blocks, LayerNorm eps 1e-6, the class token taken
    /// after the final norm, then `image_projection`.
    Timm,
    /// OpenCLIP / OpenAI `VisionTransformer` (`visual.conv1`, `visual.ln_pre`,
    /// `visual.transformer.resblocks.N`, `visual.ln_post`, `visual.proj`): patch
    /// convolution without bias, a LayerNorm before the blocks, eps 1e-5.
    OpenClip,
}

impl VisionForm {
    fn name(self) -> &'static str {
        match self {
            VisionForm::Timm => "timm",
            VisionForm::OpenClip => "openclip",
        }
    }
}

/// The transformer a tower is built on: pre-norm blocks of attention and an MLP.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipTrunk {
    /// Width (768 image, 512 text).
    pub width: usize,
    /// Blocks (12).
    pub layers: usize,
    /// Attention heads (12 image, 8 text).
    pub heads: usize,
    /// MLP hidden width (3072 image, 2048 text).
    pub mlp_dim: usize,
    /// LayerNorm epsilon (1e-6 timm, 1e-5 OpenCLIP and the text tower).
    pub eps: f32,
    /// MLP activation.
    pub act: ClipAct,
}

impl ClipTrunk {
    /// Parameters of one block: two LayerNorms, the fused QKV and output projections, the
    /// MLP's two layers, each with its bias.
    pub fn block_params(&self) -> usize {
        let (w, m) = (self.width, self.mlp_dim);
        4 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * m + m) + (m * w + w)
    }

    /// Checks the sizes of `tower`'s trunk; errors name the field as `tower.field`.
    fn validate(&self, tower: &str) -> Result<()> {
        let sizes = [("width", self.width), ("layers", self.layers), ("heads", self.heads), ("mlp_dim", self.mlp_dim)];
        if let Some((k, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            bail!("CLIP config: {tower}.{k} must be positive");
        }
        if !self.width.is_multiple_of(self.heads) {
            bail!("CLIP config: {tower}.width {} is not a multiple of {tower}.heads {}", self.width, self.heads);
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            bail!("CLIP config: {tower}.eps (the LayerNorm epsilon) must be positive");
        }
        Ok(())
    }

    /// Adds the trunk's fields to a tower's JSON object.
    fn write_json(&self, o: &mut Map<String, Value>) {
        o.insert("width".into(), json!(self.width));
        o.insert("layers".into(), json!(self.layers));
        o.insert("heads".into(), json!(self.heads));
        o.insert("mlp_dim".into(), json!(self.mlp_dim));
        o.insert("eps".into(), json!(self.eps));
        o.insert("act".into(), json!(self.act.name()));
    }

    /// Sets field `k` from `val` (`key`: its full name, for errors); false when `k` is
    /// not a trunk field.
    fn set_json(&mut self, k: &str, val: &Value, key: &str) -> Result<bool> {
        match k {
            "width" => self.width = as_usize(val, key)?,
            "layers" => self.layers = as_usize(val, key)?,
            "heads" => self.heads = as_usize(val, key)?,
            "mlp_dim" => self.mlp_dim = as_usize(val, key)?,
            "eps" => self.eps = as_f32(val, key)?,
            "act" => self.act = ClipAct::parse(val.as_str().unwrap_or_default(), key)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// The image tower.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionTower {
    /// Layout and naming.
    pub form: VisionForm,
    /// Input side in pixels (224).
    pub image_size: usize,
    /// Patch side (16).
    pub patch_size: usize,
    /// Its transformer (width 768, 12 blocks of 12 heads, MLP 3072).
    pub trunk: ClipTrunk,
}

impl ClipVisionTower {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens: the patches and the class token.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// The text tower.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextTower {
    /// Tokens per caption (77).
    pub context_length: usize,
    /// Vocabulary (49408).
    pub vocab_size: usize,
    /// Its transformer (width 512, 12 blocks of 8 heads, MLP 2048).
    pub trunk: ClipTrunk,
}

/// A CLIP model: both towers and the shared embedding width.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    /// The joint embedding width (512).
    pub embed_dim: usize,
    /// The image tower.
    pub vision: ClipVisionTower,
    /// The text tower.
    pub text: ClipTextTower,
}

/// The names [`ClipConfig::preset`] knows.
pub const CLIP_PRESETS: [&str; 3] = ["synthclip-vit-b16", "openclip-vit-b16", "tiny"];

impl ClipConfig {
    /// SynthCLIP / SLIP `CLIP_VITB16`: timm `vit_base_patch16_224` (exact GELU) and the
    /// OpenAI text transformer (QuickGELU), ≈149.6 M parameters.
    pub fn synthclip_vit_b16() -> ClipConfig {
        ClipConfig {
            embed_dim: 512,
            vision: ClipVisionTower {
                form: VisionForm::Timm,
                image_size: 224,
                patch_size: 16,
                trunk: ClipTrunk { width: 768, layers: 12, heads: 12, mlp_dim: 3072, eps: 1e-6, act: ClipAct::Gelu },
            },
            text: ClipTextTower {
                context_length: 77,
                vocab_size: 49408,
                trunk: ClipTrunk {
                    width: 512,
                    layers: 12,
                    heads: 8,
                    mlp_dim: 2048,
                    eps: 1e-5,
                    act: ClipAct::QuickGelu,
                },
            },
        }
    }

    /// OpenCLIP `ViT-B-16` (exact GELU in both towers), for zero-shot evaluation of
    /// published OpenCLIP weights.
    pub fn openclip_vit_b16() -> ClipConfig {
        let mut c = Self::synthclip_vit_b16();
        c.vision.form = VisionForm::OpenClip;
        c.vision.trunk.eps = 1e-5;
        c.text.trunk.act = ClipAct::Gelu;
        c
    }

    /// A tiny SynthCLIP-form model for tests, benchmarks and the built-in demo: 32 px
    /// images in 8 px patches; per tower width 64, 2 blocks of 2 heads (head dim 32, the
    /// smallest the GPU attention takes), MLP 128; context 16; the full vocabulary;
    /// embedding 32.
    pub fn tiny() -> ClipConfig {
        let mut c = Self::synthclip_vit_b16();
        c.embed_dim = 32;
        let small = |t: ClipTrunk| ClipTrunk { width: 64, layers: 2, heads: 2, mlp_dim: 128, ..t };
        c.vision = ClipVisionTower { image_size: 32, patch_size: 8, trunk: small(c.vision.trunk), ..c.vision };
        c.text = ClipTextTower { context_length: 16, trunk: small(c.text.trunk), ..c.text };
        c
    }

    /// A named preset ([`CLIP_PRESETS`]).
    pub fn preset(name: &str) -> Result<ClipConfig> {
        match name {
            "synthclip-vit-b16" => Ok(Self::synthclip_vit_b16()),
            "openclip-vit-b16" => Ok(Self::openclip_vit_b16()),
            "tiny" => Ok(Self::tiny()),
            _ => bail!("unknown CLIP preset {name:?}; known: {}", CLIP_PRESETS.join(", ")),
        }
    }

    /// Checks that the sizes fit together; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision;
        let t = &self.text;
        let positive = [
            ("embed_dim", self.embed_dim),
            ("vision.image_size", v.image_size),
            ("vision.patch_size", v.patch_size),
            ("text.context_length", t.context_length),
            ("text.vocab_size", t.vocab_size),
        ];
        if let Some((k, _)) = positive.iter().find(|(_, v)| *v == 0) {
            bail!("CLIP config: {k} must be positive");
        }
        v.trunk.validate("vision")?;
        t.trunk.validate("text")?;
        if !v.image_size.is_multiple_of(v.patch_size) {
            bail!(
                "CLIP config: vision.image_size {} is not a multiple of vision.patch_size {}",
                v.image_size,
                v.patch_size
            );
        }
        Ok(())
    }

    /// Parameters in the model: both towers, the projections and `logit_scale`.
    pub fn num_params(&self) -> usize {
        let (v, t) = (&self.vision, &self.text);
        let (vw, tw) = (v.trunk.width, t.trunk.width);
        let patch = 3 * v.patch_size * v.patch_size * vw + if v.form == VisionForm::Timm { vw } else { 0 };
        let pre = if v.form == VisionForm::OpenClip { 2 * vw } else { 0 };
        let vision = patch + vw + v.tokens() * vw + pre + v.trunk.layers * v.trunk.block_params() + 2 * vw;
        let text = t.vocab_size * tw + t.context_length * tw + t.trunk.layers * t.trunk.block_params() + 2 * tw;
        vision + text + vw * self.embed_dim + tw * self.embed_dim + 1
    }

    /// The JSON form ([`ClipConfig::from_json`] reads it back).
    pub fn to_json(&self) -> Value {
        let (v, t) = (&self.vision, &self.text);
        let mut vision = Map::new();
        vision.insert("form".into(), json!(v.form.name()));
        vision.insert("image_size".into(), json!(v.image_size));
        vision.insert("patch_size".into(), json!(v.patch_size));
        v.trunk.write_json(&mut vision);
        let mut text = Map::new();
        text.insert("context_length".into(), json!(t.context_length));
        text.insert("vocab_size".into(), json!(t.vocab_size));
        t.trunk.write_json(&mut text);
        json!({ "embed_dim": self.embed_dim, "vision": vision, "text": text })
    }

    /// Reads the JSON form. `"preset"` names a base ([`CLIP_PRESETS`], default
    /// `synthclip-vit-b16`) whose fields the others override; errors name the key.
    pub fn from_json(json: &Value) -> Result<ClipConfig> {
        let Some(obj) = json.as_object() else { bail!("a CLIP config must be a JSON object") };
        let mut c = match obj.get("preset") {
            None => Self::synthclip_vit_b16(),
            Some(Value::String(p)) => Self::preset(p)?,
            Some(other) => bail!("\"preset\" must be a string, got {other}"),
        };
        let known = ["preset", "embed_dim", "vision", "text"];
        if let Some(k) = obj.keys().find(|k| !known.contains(&k.as_str())) {
            bail!("unknown key {k:?} in the CLIP config (known: {})", known.join(", "));
        }
        if let Some(e) = obj.get("embed_dim") {
            c.embed_dim = as_usize(e, "embed_dim")?;
        }
        if let Some(v) = obj.get("vision") {
            let o = section(v, "vision")?;
            let tw = &mut c.vision;
            for (k, val) in o {
                let key = format!("vision.{k}");
                match k.as_str() {
                    "form" => {
                        tw.form = match val.as_str() {
                            Some("timm") => VisionForm::Timm,
                            Some("openclip") => VisionForm::OpenClip,
                            _ => bail!("\"{key}\" must be \"timm\" or \"openclip\", got {val}"),
                        }
                    }
                    "image_size" => tw.image_size = as_usize(val, &key)?,
                    "patch_size" => tw.patch_size = as_usize(val, &key)?,
                    _ if tw.trunk.set_json(k, val, &key)? => {}
                    _ => bail!("unknown key {key:?} in the CLIP config"),
                }
            }
        }
        if let Some(t) = obj.get("text") {
            let o = section(t, "text")?;
            let tw = &mut c.text;
            for (k, val) in o {
                let key = format!("text.{k}");
                match k.as_str() {
                    "context_length" => tw.context_length = as_usize(val, &key)?,
                    "vocab_size" => tw.vocab_size = as_usize(val, &key)?,
                    _ if tw.trunk.set_json(k, val, &key)? => {}
                    _ => bail!("unknown key {key:?} in the CLIP config"),
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Reads a JSON config file; errors name the file.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<ClipConfig> {
        crate::models::read_json_config(path.as_ref(), "CLIP config", Self::from_json)
    }
}

fn section<'a>(v: &'a Value, key: &str) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| crate::Error::msg(format!("\"{key}\" must be an object")))
}

fn as_usize(v: &Value, key: &str) -> Result<usize> {
    crate::models::config_size(v, key)
}

fn as_f32(v: &Value, key: &str) -> Result<f32> {
    v.as_f64().map(|x| x as f32).ok_or_else(|| crate::Error::msg(format!("\"{key}\" must be a number, got {v}")))
}
