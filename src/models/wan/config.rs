//! Hyper-parameters of the Wan2.1 DiT: named presets and `config.json` files in the
//! diffusers (`WanTransformer3DModel`) or the original Wan (`WanModel`) form.

use std::path::Path;

use serde_json::{Map, Value};

use crate::models::MAX_CONFIG_SIZE;
use crate::{bail, Result};

/// Width of the CLIP ViT-H/14 tokens that the Synthos image projector reads.
pub const CLIP_VIT_H_DIM: usize = 1280;

/// Hyper-parameters of a Wan2.1 DiT with the Synthos image projector `img_emb`.
#[derive(Clone, Debug, PartialEq)]
pub struct WanConfig {
    /// Patch size (frames, rows, columns); the frame size must be 1 (all Wan2.1 models).
    pub patch_size: [usize; 3],
    /// Latent channels in (16).
    pub in_channels: usize,
    /// Velocity channels out (16).
    pub out_channels: usize,
    /// Model width.
    pub dim: usize,
    /// Hidden width of the feed-forward network.
    pub ffn_dim: usize,
    /// Attention heads (head dim = `dim / num_heads`).
    pub num_heads: usize,
    /// Number of DiT blocks.
    pub num_layers: usize,
    /// Width of the text encoder's output (umT5-XXL: 4096).
    pub text_dim: usize,
    /// Number of text rows the text encoder pads to (512). The model accepts any number
    /// of rows; this is what the pipeline feeds it.
    pub text_len: usize,
    /// Size of the sinusoidal timestep embedding.
    pub freq_dim: usize,
    /// Width of the CLIP tokens that `img_emb` projects (ViT-H/14: 1280).
    pub clip_dim: usize,
    /// Epsilon of the blocks' LayerNorms and RMSNorms (1e-6). The image projector's
    /// LayerNorms use PyTorch's default 1e-5, as in DiffSynth's `MLP`.
    pub eps: f32,
    /// RMSNorm over the full width on queries and keys.
    pub qk_norm: bool,
    /// LayerNorm with affine parameters before the cross-attention (`norm3`).
    pub cross_attn_norm: bool,
    /// RoPE base (10000).
    pub rope_theta: f64,
    /// Largest position along each grid axis (Wan precomputes 1024).
    pub rope_max_seq_len: usize,
    /// Add a fixed 2-D sine/cosine embedding of each token's row and column to the patch
    /// embedding's output. Not part of Wan2.1 (false in every preset and loaded config,
    /// whose models learn where a token sits from RoPE's edge effects over long
    /// training); the built-in demo sets it, so that its small model can learn centred
    /// shapes within minutes (docs/NOTES.md, *Demo quality*).
    pub abs_pos_embed: bool,
}

impl WanConfig {
    /// Wan2.1-T2V-1.3B (the Synthos-I2I backbone) with a 1280-wide image projector.
    pub fn wan21_t2v_1_3b() -> WanConfig {
        WanConfig {
            patch_size: [1, 2, 2],
            in_channels: 16,
            out_channels: 16,
            dim: 1536,
            ffn_dim: 8960,
            num_heads: 12,
            num_layers: 30,
            text_dim: 4096,
            text_len: 512,
            freq_dim: 256,
            clip_dim: CLIP_VIT_H_DIM,
            eps: 1e-6,
            qk_norm: true,
            cross_attn_norm: true,
            rope_theta: 10000.0,
            rope_max_seq_len: 1024,
            abs_pos_embed: false,
        }
    }

    /// Wan2.1-T2V-14B (same structure, wider and deeper).
    pub fn wan21_t2v_14b() -> WanConfig {
        WanConfig { dim: 5120, ffn_dim: 13824, num_heads: 40, num_layers: 40, ..Self::wan21_t2v_1_3b() }
    }

    /// A tiny model for tests and the demo: width 64, 2 heads of 32 (a head size the
    /// GPU attention kernel supports), FFN 128, 2 layers, text width 32, CLIP width 32;
    /// the fixtures under `tests/fixtures/wan/` use exactly this shape.
    pub fn tiny() -> WanConfig {
        WanConfig {
            dim: 64,
            ffn_dim: 128,
            num_heads: 2,
            num_layers: 2,
            text_dim: 32,
            clip_dim: 32,
            ..Self::wan21_t2v_1_3b()
        }
    }

    /// The preset of this name: `wan2.1-t2v-1.3b`, `wan2.1-t2v-14b` or `tiny`.
    pub fn preset(name: &str) -> Result<WanConfig> {
        Ok(match name {
            "wan2.1-t2v-1.3b" => Self::wan21_t2v_1_3b(),
            "wan2.1-t2v-14b" => Self::wan21_t2v_14b(),
            "tiny" => Self::tiny(),
            _ => bail!("unknown Wan config preset {name:?} (known: wan2.1-t2v-1.3b, wan2.1-t2v-14b, tiny)"),
        })
    }

    /// Channels per attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.num_heads.max(1)
    }

    /// Inputs of the patch embedding per token (`in_channels · pt · ph · pw`).
    pub fn patch_inputs(&self) -> usize {
        self.in_channels * self.patch_size.iter().product::<usize>()
    }

    /// Checks that the sizes fit together; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        for (name, v) in [
            ("in_channels", c.in_channels),
            ("out_channels", c.out_channels),
            ("dim", c.dim),
            ("ffn_dim", c.ffn_dim),
            ("num_heads", c.num_heads),
            ("num_layers", c.num_layers),
            ("text_dim", c.text_dim),
            ("text_len", c.text_len),
            ("freq_dim", c.freq_dim),
            ("clip_dim", c.clip_dim),
            ("rope_max_seq_len", c.rope_max_seq_len),
        ] {
            if v == 0 {
                bail!("Wan config: {name} must be positive");
            }
            if v > MAX_CONFIG_SIZE {
                bail!("Wan config: {name} {v} is above {MAX_CONFIG_SIZE}, not a size of these models");
            }
        }
        if c.patch_size[0] != 1 || c.patch_size[1] == 0 || c.patch_size[2] == 0 || c.patch_size.iter().any(|&p| p > 64)
        {
            bail!("Wan config: patch_size {:?} is not supported (the frame patch must be 1)", c.patch_size);
        }
        if !c.dim.is_multiple_of(c.num_heads) {
            bail!("Wan config: dim {} is not a multiple of num_heads {}", c.dim, c.num_heads);
        }
        if !c.head_dim().is_multiple_of(2) {
            bail!("Wan config: head dim {} must be even (RoPE turns channel pairs)", c.head_dim());
        }
        if !c.freq_dim.is_multiple_of(2) {
            bail!("Wan config: freq_dim {} must be even (cos and sin halves)", c.freq_dim);
        }
        if !(c.eps.is_finite() && c.eps > 0.0) {
            bail!("Wan config: eps must be finite and positive, got {}", c.eps);
        }
        if !(c.rope_theta.is_finite() && c.rope_theta > 0.0) {
            bail!("Wan config: rope_theta must be finite and positive, got {}", c.rope_theta);
        }
        Ok(())
    }

    /// Reads a `config.json`: the diffusers `WanTransformer3DModel` form (`patch_size`,
    /// `num_attention_heads`, `attention_head_dim`, `in_channels`, `out_channels`,
    /// `text_dim`, `freq_dim`, `ffn_dim`, `num_layers`, `cross_attn_norm`, `qk_norm`,
    /// `eps`, `image_dim`, `rope_max_seq_len`, ...) or the original Wan form (`dim`,
    /// `num_heads`, `in_dim`, `out_dim`, `text_len`, ...). `image_dim` null (a T2V model)
    /// means the 1280-wide projector that Synthos adds.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<WanConfig> {
        crate::models::read_json_config(path.as_ref(), "Wan config", Self::from_json)
    }

    /// Parses the JSON object of [`WanConfig::from_json_file`].
    pub fn from_json(json: &Value) -> Result<WanConfig> {
        let Some(obj) = json.as_object() else {
            bail!("expected a JSON object");
        };
        let cfg = if obj.contains_key("num_attention_heads") || obj.contains_key("attention_head_dim") {
            from_diffusers(obj)?
        } else {
            from_original(obj)?
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Accessors for one JSON object, with errors that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.present(key) {
            Some(v) => crate::models::config_size(v, key),
            None => default.ok_or_else(|| crate::Error::msg(format!("field {key:?} is missing"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.present(key) {
            Some(v) => v.as_f64().ok_or_else(|| crate::Error::msg(format!("field {key:?} must be a number, got {v}"))),
            None => Ok(default),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            Some(v) => {
                v.as_bool().ok_or_else(|| crate::Error::msg(format!("field {key:?} must be true or false, got {v}")))
            }
            None => Ok(default),
        }
    }

    fn patch_size(&self) -> Result<[usize; 3]> {
        match self.present("patch_size") {
            None => Ok([1, 2, 2]),
            Some(v) => {
                let p: Option<Vec<usize>> =
                    v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64().map(|n| n as usize)).collect());
                match p.as_deref() {
                    Some(&[a, b, c]) => Ok([a, b, c]),
                    _ => bail!("field \"patch_size\" must be three integers, got {v}"),
                }
            }
        }
    }

    /// `qk_norm`: diffusers writes `"rms_norm_across_heads"` (Wan's full-width RMSNorm)
    /// or null (none); the original config a boolean. Absent means Wan's default (on).
    fn qk_norm(&self) -> Result<bool> {
        match self.0.get("qk_norm") {
            None => Ok(true),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(s)) if s == "rms_norm_across_heads" => Ok(true),
            Some(v) => bail!("field \"qk_norm\" = {v} is not supported (only \"rms_norm_across_heads\", Wan's)"),
        }
    }
}

fn from_diffusers(obj: &Map<String, Value>) -> Result<WanConfig> {
    let f = Fields(obj);
    for key in ["added_kv_proj_dim", "pos_embed_seq_len"] {
        if let Some(v) = f.present(key) {
            bail!(
                "field {key:?} = {v}: Wan I2V / FLF2V checkpoints (separate image keys and values) are not \
                 supported; Synthos puts the image tokens in front of the text instead"
            );
        }
    }
    let heads = f.usize_or("num_attention_heads", None)?;
    let head_dim = f.usize_or("attention_head_dim", None)?;
    let Some(dim) = heads.checked_mul(head_dim).filter(|&d| d <= MAX_CONFIG_SIZE) else {
        bail!("Wan config: num_attention_heads {heads} × attention_head_dim {head_dim} is above {MAX_CONFIG_SIZE}");
    };
    let in_channels = f.usize_or("in_channels", Some(16))?;
    Ok(WanConfig {
        patch_size: f.patch_size()?,
        in_channels,
        out_channels: f.usize_or("out_channels", Some(in_channels))?,
        dim,
        ffn_dim: f.usize_or("ffn_dim", None)?,
        num_heads: heads,
        num_layers: f.usize_or("num_layers", None)?,
        text_dim: f.usize_or("text_dim", None)?,
        text_len: 512,
        freq_dim: f.usize_or("freq_dim", Some(256))?,
        clip_dim: f.usize_or("image_dim", Some(CLIP_VIT_H_DIM))?,
        eps: f.f64_or("eps", 1e-6)? as f32,
        qk_norm: f.qk_norm()?,
        cross_attn_norm: f.bool_or("cross_attn_norm", true)?,
        rope_theta: 10000.0,
        rope_max_seq_len: f.usize_or("rope_max_seq_len", Some(1024))?,
        abs_pos_embed: false,
    })
}

fn from_original(obj: &Map<String, Value>) -> Result<WanConfig> {
    let f = Fields(obj);
    if let Some(kind) = f.present("model_type").and_then(Value::as_str) {
        if kind != "t2v" {
            bail!("field \"model_type\" = {kind:?}: only t2v backbones are supported (Synthos adds its own img_emb)");
        }
    }
    let in_channels = f.usize_or("in_dim", Some(16))?;
    Ok(WanConfig {
        patch_size: f.patch_size()?,
        in_channels,
        out_channels: f.usize_or("out_dim", Some(in_channels))?,
        dim: f.usize_or("dim", None)?,
        ffn_dim: f.usize_or("ffn_dim", None)?,
        num_heads: f.usize_or("num_heads", None)?,
        num_layers: f.usize_or("num_layers", None)?,
        text_dim: f.usize_or("text_dim", Some(4096))?,
        text_len: f.usize_or("text_len", Some(512))?,
        freq_dim: f.usize_or("freq_dim", Some(256))?,
        clip_dim: CLIP_VIT_H_DIM,
        eps: f.f64_or("eps", 1e-6)? as f32,
        qk_norm: f.qk_norm()?,
        cross_attn_norm: f.bool_or("cross_attn_norm", true)?,
        rope_theta: 10000.0,
        rope_max_seq_len: 1024,
        abs_pos_embed: false,
    })
}
