//! The Wan2.1 VAE (z = 16) for single images: encode an image to its normalised latent
//! mean, decode a latent to an image, with tiled decoding for large images.
//!
//! Weights are read in diffusers' `AutoencoderKLWan` naming (`encoder.down_blocks.3.conv1.weight`,
//! `decoder.up_blocks.0.upsamplers.0.resample.1.weight`, ...), every tensor in its
//! published shape; the model is the one of Wan2.1's `wan/modules/vae.py` (`WanVAE_`) and
//! diffusers 0.42.1's `autoencoder_kl_wan.py`, which agree.
//!
//! # One frame
//!
//! The VAE is a video model; a single image is one frame, `(B, 3, 1, H, W) → (B, 16, 1,
//! H/8, W/8)`. Both references process a video chunk by chunk with a feature cache, and
//! for the first (here: only) chunk the 3-D machinery reduces to 2-D ops:
//!
//! - A causal `Conv3d` with temporal kernel `kt` pads `kt − 1` zero frames in front and
//!   none behind (the cache is empty on the first chunk), so its one output frame is the
//!   2-D convolution of the frame with the *last* temporal slice `w[:, :, kt−1]` of the
//!   kernel and the same spatial padding (1 for the 3×3×3 convs, 0 for 1×1×1). The
//!   weights keep their 5-D shape; the slice is taken on the tape, so training updates
//!   exactly the taps that see the frame.
//! - `downsample3d` (encoder): on the first chunk the `time_conv` only stores the frame in
//!   the cache and is skipped, so it is `downsample2d`: zero-pad one row below and one
//!   column to the right, then a 3×3 stride-2 conv.
//! - `upsample3d` (decoder): on the first chunk the cache slot is marked `"Rep"` and
//!   `time_conv` is skipped, so it is `upsample2d`: nearest 2× upsampling, then a 3×3 conv
//!   to half the channels. The `time_conv` weights are loaded (they are part of the
//!   checkpoint) but never used, and get no gradient.
//! - The middle attention already works frame by frame (single head over the pixels,
//!   head dimension = channels, scale 1/√C).
//!
//! Latents are normalised per channel, `z = (μ − mean)·(1/std)` (the encoder's mean μ, no
//! sampling), and `decode` inverts that (`z·std + mean`) before the decoder; its output is
//! clamped to [−1, 1].
//!
//! Run the parity test against diffusers with `cargo test --test vae`.

use crate::nn::{Init, Module, NamedParam, ParamSource};
use crate::ops::{self, Conv2dOptions, Padding2d};
use crate::weights::{Loader, WeightSet};
use crate::{bail, DType, Device, Error, Result, Tensor};

/// F.normalize's lower bound on the norm in `RMS_norm`.
const NORM_EPS: f32 = 1e-12;

/// The per-channel latent means of the Wan2.1 VAE (z = 16).
pub const WAN21_LATENTS_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922,
    -0.9497, 0.2503, -0.2921,
];

/// The per-channel latent standard deviations of the Wan2.1 VAE (z = 16).
pub const WAN21_LATENTS_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253,
    2.8251, 1.9160,
];

/// The architecture of a Wan VAE (diffusers' `AutoencoderKLWan` config, `is_residual`
/// false, no attention outside the middle blocks).
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Channels of the first stage (`base_dim`).
    pub base_dim: usize,
    /// Latent channels (`z_dim`).
    pub z_dim: usize,
    /// Channel multiplier of each stage; one 2× spatial downsampling between stages.
    pub dim_mult: Vec<usize>,
    /// Residual blocks per encoder stage (decoder stages have one more).
    pub num_res_blocks: usize,
    /// Per downsampling step, whether it is temporal too (`temperal_downsample`, as the
    /// references spell it); it selects `downsample3d`/`upsample3d` and with them the
    /// presence of `time_conv` weights. The decoder uses it reversed.
    pub temperal_downsample: Vec<bool>,
    /// Per-channel latent means (`latents_mean`).
    pub latents_mean: Vec<f32>,
    /// Per-channel latent standard deviations (`latents_std`).
    pub latents_std: Vec<f32>,
}

impl VaeConfig {
    /// The published Wan2.1 VAE: base 96, z 16, multipliers [1, 2, 4, 4], 2 residual
    /// blocks, temporal downsampling [false, true, true].
    pub fn wan21() -> Self {
        VaeConfig {
            base_dim: 96,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            temperal_downsample: vec![false, true, true],
            latents_mean: WAN21_LATENTS_MEAN.to_vec(),
            latents_std: WAN21_LATENTS_STD.to_vec(),
        }
    }

    /// The real structure with 6 base channels (≈0.5 M parameters), for tests; the
    /// configuration of `tests/fixtures/vae`.
    pub fn tiny() -> Self {
        VaeConfig { base_dim: 6, ..Self::wan21() }
    }

    /// Reads a diffusers `AutoencoderKLWan` `config.json`: `base_dim`, `z_dim`, `dim_mult`,
    /// `num_res_blocks`, `temperal_downsample`, `latents_mean`, `latents_std`; absent keys
    /// keep the Wan2.1 values.
    pub fn from_json_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        super::read_json_config(path.as_ref(), "Wan VAE config", Self::from_json)
    }

    /// [`VaeConfig::from_json_file`] on parsed JSON.
    pub fn from_json(json: &serde_json::Value) -> Result<Self> {
        use serde_json::Value;
        let Some(obj) = json.as_object() else {
            bail!("expected a JSON object");
        };
        let mut cfg = Self::wan21();
        let uint = |k: &str| -> Result<Option<usize>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => super::json_usize(obj, k).map(Some),
            }
        };
        let list = |k: &str| -> Result<Option<&Vec<Value>>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) => Ok(Some(a)),
                Some(_) => bail!("\"{k}\" must be a list"),
            }
        };
        if let Some(v) = uint("base_dim")? {
            cfg.base_dim = v;
        }
        if let Some(v) = uint("z_dim")? {
            cfg.z_dim = v;
        }
        if let Some(v) = uint("num_res_blocks")? {
            cfg.num_res_blocks = v;
        }
        if let Some(a) = list("dim_mult")? {
            cfg.dim_mult = a
                .iter()
                .map(|v| v.as_u64().map(|x| x as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| Error::msg("\"dim_mult\" must hold integers"))?;
        }
        if let Some(a) = list("temperal_downsample")? {
            cfg.temperal_downsample = a
                .iter()
                .map(Value::as_bool)
                .collect::<Option<_>>()
                .ok_or_else(|| Error::msg("\"temperal_downsample\" must hold booleans"))?;
        }
        for (k, dst) in [("latents_mean", &mut cfg.latents_mean), ("latents_std", &mut cfg.latents_std)] {
            if let Some(a) = list(k)? {
                *dst = a
                    .iter()
                    .map(|v| v.as_f64().map(|x| x as f32))
                    .collect::<Option<_>>()
                    .ok_or_else(|| Error::msg(format!("\"{k}\" must hold numbers")))?;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The spatial compression factor, 2^(stages − 1) (8 for Wan2.1).
    pub fn spatial_factor(&self) -> usize {
        1 << self.dim_mult.len().saturating_sub(1)
    }

    /// Checks that the fields fit together.
    pub fn validate(&self) -> Result<()> {
        let stages = self.dim_mult.len();
        if self.base_dim == 0 || self.z_dim == 0 || stages == 0 || self.dim_mult.contains(&0) {
            bail!("VaeConfig: base_dim, z_dim and every dim_mult must be positive, got {self:?}");
        }
        if self.temperal_downsample.len() != stages - 1 {
            bail!(
                "VaeConfig: temperal_downsample has {} entries, expected one per downsampling step ({})",
                self.temperal_downsample.len(),
                stages - 1
            );
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            bail!(
                "VaeConfig: latents_mean ({}) and latents_std ({}) need z_dim = {} entries",
                self.latents_mean.len(),
                self.latents_std.len(),
                self.z_dim
            );
        }
        if self.latents_std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail!("VaeConfig: latents_std must be positive, got {:?}", self.latents_std);
        }
        // The decoder halves the channels at each upsampling and feeds them to the next
        // stage, whose width must then be even.
        if (1..stages).any(|i| (self.base_dim * self.dim_mult[stages - i]) % 2 != 0) {
            bail!("VaeConfig: decoder stages before an upsampling need an even channel count, got {self:?}");
        }
        Ok(())
    }
}

fn join(prefix: &str, leaf: &str) -> String {
    format!("{prefix}.{leaf}")
}

/// PyTorch's default initialisation bound for a conv with this fan-in.
fn fan_in_bound(fan_in: usize) -> Init {
    Init::Uniform(1.0 / (fan_in as f32).sqrt())
}

/// A causal 3-D convolution (`WanCausalConv3d`) applied to a single frame: the 2-D conv
/// with the last temporal slice of its kernel (see the module comment).
struct CausalConv {
    name: String,
    /// `[out, in, kt, k, k]`.
    weight: Tensor,
    /// `[out]`.
    bias: Tensor,
}

impl CausalConv {
    /// `prefix.weight` `[out, in, kt, k, k]` and `prefix.bias` `[out]`.
    fn new(src: &mut dyn ParamSource, prefix: &str, c_in: usize, c_out: usize, kt: usize, k: usize) -> Result<Self> {
        let init = fan_in_bound(c_in * kt * k * k);
        Ok(CausalConv {
            name: prefix.to_string(),
            weight: src.param(&join(prefix, "weight"), &[c_out, c_in, kt, k, k], init)?,
            bias: src.param(&join(prefix, "bias"), &[c_out], init)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [o, i, kt, kh, kw] = *self.weight.shape() else {
            bail!("{}: weight of shape {:?} is not 5-D", self.name, self.weight.shape());
        };
        let last = ops::reshape(&ops::narrow(&self.weight, 2, kt - 1, 1)?, &[o, i, kh, kw])?;
        ops::conv2d(x, &last, Some(&self.bias), 1, kh / 2).map_err(|e| e.context(&self.name))
    }

    fn params(&self, out: &mut Vec<NamedParam>) {
        out.push((join(&self.name, "weight"), self.weight.clone()));
        out.push((join(&self.name, "bias"), self.bias.clone()));
    }
}

/// A plain 2-D convolution with bias.
struct Conv2d {
    name: String,
    weight: Tensor,
    bias: Tensor,
    opts: Conv2dOptions,
}

impl Conv2d {
    fn new(
        src: &mut dyn ParamSource,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        opts: Conv2dOptions,
    ) -> Result<Self> {
        let init = fan_in_bound(c_in * k * k);
        Ok(Conv2d {
            name: prefix.to_string(),
            weight: src.param(&join(prefix, "weight"), &[c_out, c_in, k, k], init)?,
            bias: src.param(&join(prefix, "bias"), &[c_out], init)?,
            opts,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d_opts(x, &self.weight, Some(&self.bias), &self.opts).map_err(|e| e.context(&self.name))
    }

    fn params(&self, out: &mut Vec<NamedParam>) {
        out.push((join(&self.name, "weight"), self.weight.clone()));
        out.push((join(&self.name, "bias"), self.bias.clone()));
    }
}

/// `RMS_norm` over channels with a gain `gamma` stored `[C, 1, 1, 1]` (video layers) or
/// `[C, 1, 1]` (the attention's image layer).
struct ChannelNorm {
    name: String,
    gamma: Tensor,
}

impl ChannelNorm {
    fn new(src: &mut dyn ParamSource, prefix: &str, c: usize, image_layer: bool) -> Result<Self> {
        let shape: &[usize] = if image_layer { &[c, 1, 1] } else { &[c, 1, 1, 1] };
        Ok(ChannelNorm { name: prefix.to_string(), gamma: src.param(&join(prefix, "gamma"), shape, Init::Ones)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gamma = ops::reshape(&self.gamma, &[self.gamma.numel()])?;
        ops::channel_rms_norm(x, &gamma, NORM_EPS).map_err(|e| e.context(&self.name))
    }

    fn params(&self, out: &mut Vec<NamedParam>) {
        out.push((join(&self.name, "gamma"), self.gamma.clone()));
    }
}

/// `WanResidualBlock`: `conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)`.
struct ResBlock {
    norm1: ChannelNorm,
    conv1: CausalConv,
    norm2: ChannelNorm,
    conv2: CausalConv,
    /// A 1×1×1 conv when the channel count changes.
    shortcut: Option<CausalConv>,
}

impl ResBlock {
    fn new(src: &mut dyn ParamSource, prefix: &str, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(ResBlock {
            norm1: ChannelNorm::new(src, &join(prefix, "norm1"), c_in, false)?,
            conv1: CausalConv::new(src, &join(prefix, "conv1"), c_in, c_out, 3, 3)?,
            norm2: ChannelNorm::new(src, &join(prefix, "norm2"), c_out, false)?,
            conv2: CausalConv::new(src, &join(prefix, "conv2"), c_out, c_out, 3, 3)?,
            shortcut: if c_in != c_out {
                Some(CausalConv::new(src, &join(prefix, "conv_shortcut"), c_in, c_out, 1, 1)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&ops::silu(&self.norm1.forward(x)?)?)?;
        let h = self.conv2.forward(&ops::silu(&self.norm2.forward(&h)?)?)?;
        match &self.shortcut {
            Some(s) => ops::add(&h, &s.forward(x)?),
            None => ops::add(&h, x),
        }
    }

    fn params(&self, out: &mut Vec<NamedParam>) {
        self.norm1.params(out);
        self.conv1.params(out);
        self.norm2.params(out);
        self.conv2.params(out);
        if let Some(s) = &self.shortcut {
            s.params(out);
        }
    }
}

/// `WanAttentionBlock`: single-head self-attention over the pixels of a frame, with a
/// residual connection.
struct AttnBlock {
    norm: ChannelNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
}

impl AttnBlock {
    fn new(src: &mut dyn ParamSource, prefix: &str, c: usize) -> Result<Self> {
        let one = Conv2dOptions::new(1, Padding2d::same(0));
        Ok(AttnBlock {
            norm: ChannelNorm::new(src, &join(prefix, "norm"), c, true)?,
            to_qkv: Conv2d::new(src, &join(prefix, "to_qkv"), c, 3 * c, 1, one)?,
            proj: Conv2d::new(src, &join(prefix, "proj"), c, c, 1, one)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [b, c, h, w] = *x.shape() else {
            bail!("{}: expected [B, C, H, W], got {:?}", self.norm.name, x.shape());
        };
        let qkv = ops::reshape(&self.to_qkv.forward(&self.norm.forward(x)?)?, &[b, 3 * c, h * w])?;
        let parts = ops::split(&qkv, 1, &[c, c, c])?;
        let y = ops::spatial_attention(&parts[0], &parts[1], &parts[2], ops::DEFAULT_MAX_SCORE_ELEMS)?;
        ops::add(&self.proj.forward(&ops::reshape(&y, &[b, c, h, w])?)?, x)
    }

    fn params(&self, out: &mut Vec<NamedParam>) {
        self.norm.params(out);
        self.to_qkv.params(out);
        self.proj.params(out);
    }
}

/// `WanMidBlock` with one attention layer: residual block, attention, residual block.
struct MidBlock {
    res0: ResBlock,
    attn: AttnBlock,
    res1: ResBlock,
}

impl MidBlock {
    fn new(src: &mut dyn ParamSource, prefix: &str, c: usize) -> Result<Self> {
        Ok(MidBlock {
            res0: ResBlock::new(src, &join(prefix, "resnets.0"), c, c)?,
            attn: AttnBlock::new(src, &join(prefix, "attentions.0"), c)?,
            res1: ResBlock::new(src, &join(prefix, "resnets.1"), c, c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.res1.forward(&self.attn.forward(&self.res0.forward(x)?)?)
    }

    fn params(&self, out: &mut Vec<NamedParam>) {
        self.res0.params(out);
        self.attn.params(out);
        self.res1.params(out);
    }
}

/// `WanResample` on the first chunk: a 2× spatial down- or upsampling (the temporal
/// `time_conv`, when the mode has one, is loaded but idle for one frame).
struct Resample {
    up: bool,
    conv: Conv2d,
    time_conv: Option<CausalConv>,
}

impl Resample {
    /// Downsampling of `c` channels: zero row below and column right, 3×3 stride 2.
    fn down(src: &mut dyn ParamSource, prefix: &str, c: usize, temporal: bool) -> Result<Self> {
        let opts = Conv2dOptions::new(2, Padding2d { top: 0, bottom: 1, left: 0, right: 1 });
        Ok(Resample {
            up: false,
            conv: Conv2d::new(src, &join(prefix, "resample.1"), c, c, 3, opts)?,
            time_conv: if temporal {
                Some(CausalConv::new(src, &join(prefix, "time_conv"), c, c, 3, 1)?)
            } else {
                None
            },
        })
    }

    /// Upsampling of `c` channels: nearest 2×, then 3×3 to `c / 2` channels.
    fn up(src: &mut dyn ParamSource, prefix: &str, c: usize, temporal: bool) -> Result<Self> {
        Ok(Resample {
            up: true,
            conv: Conv2d::new(
                src,
                &join(prefix, "resample.1"),
                c,
                c / 2,
                3,
                Conv2dOptions::new(1, Padding2d::same(1)),
            )?,
            time_conv: if temporal {
                Some(CausalConv::new(src, &join(prefix, "time_conv"), c, 2 * c, 3, 1)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.up {
            self.conv.forward(&ops::upsample_nearest2x(x)?)
        } else {
            self.conv.forward(x)
        }
    }

    fn params(&self, out: &mut Vec<NamedParam>) {
        self.conv.params(out);
        if let Some(t) = &self.time_conv {
            t.params(out);
        }
    }
}

/// One entry of the encoder's `down_blocks` list.
enum DownLayer {
    Res(ResBlock),
    Down(Resample),
}

/// `WanEncoder3d` (single frame).
struct Encoder {
    conv_in: CausalConv,
    layers: Vec<DownLayer>,
    mid: MidBlock,
    norm_out: ChannelNorm,
    conv_out: CausalConv,
}

impl Encoder {
    fn new(src: &mut dyn ParamSource, cfg: &VaeConfig) -> Result<Self> {
        let dims: Vec<usize> =
            std::iter::once(1).chain(cfg.dim_mult.iter().copied()).map(|m| cfg.base_dim * m).collect();
        let conv_in = CausalConv::new(src, "encoder.conv_in", 3, dims[0], 3, 3)?;
        let mut layers = Vec::new();
        let stages = cfg.dim_mult.len();
        for i in 0..stages {
            let (mut c_in, c_out) = (dims[i], dims[i + 1]);
            for _ in 0..cfg.num_res_blocks {
                let prefix = format!("encoder.down_blocks.{}", layers.len());
                layers.push(DownLayer::Res(ResBlock::new(src, &prefix, c_in, c_out)?));
                c_in = c_out;
            }
            if i + 1 != stages {
                let prefix = format!("encoder.down_blocks.{}", layers.len());
                layers.push(DownLayer::Down(Resample::down(src, &prefix, c_out, cfg.temperal_downsample[i])?));
            }
        }
        let top = dims[stages];
        Ok(Encoder {
            conv_in,
            layers,
            mid: MidBlock::new(src, "encoder.mid_block", top)?,
            norm_out: ChannelNorm::new(src, "encoder.norm_out", top, false)?,
            conv_out: CausalConv::new(src, "encoder.conv_out", top, 2 * cfg.z_dim, 3, 3)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for layer in &self.layers {
            h = match layer {
                DownLayer::Res(r) => r.forward(&h)?,
                DownLayer::Down(d) => d.forward(&h)?,
            };
        }
        h = self.mid.forward(&h)?;
        self.conv_out.forward(&ops::silu(&self.norm_out.forward(&h)?)?)
    }

    fn params(&self, out: &mut Vec<NamedParam>) {
        self.conv_in.params(out);
        for layer in &self.layers {
            match layer {
                DownLayer::Res(r) => r.params(out),
                DownLayer::Down(d) => d.params(out),
            }
        }
        self.mid.params(out);
        self.norm_out.params(out);
        self.conv_out.params(out);
    }
}

/// `WanUpBlock`: residual blocks, then an optional upsampling.
struct UpBlock {
    resnets: Vec<ResBlock>,
    upsampler: Option<Resample>,
}

/// `WanDecoder3d` (single frame).
struct Decoder {
    conv_in: CausalConv,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: ChannelNorm,
    conv_out: CausalConv,
}

impl Decoder {
    fn new(src: &mut dyn ParamSource, cfg: &VaeConfig) -> Result<Self> {
        let stages = cfg.dim_mult.len();
        let dims: Vec<usize> = std::iter::once(cfg.dim_mult[stages - 1])
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|m| cfg.base_dim * m)
            .collect();
        let temporal_up: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let conv_in = CausalConv::new(src, "decoder.conv_in", cfg.z_dim, dims[0], 3, 3)?;
        let mid = MidBlock::new(src, "decoder.mid_block", dims[0])?;
        let mut up_blocks = Vec::with_capacity(stages);
        for i in 0..stages {
            // Every stage after the first receives the halved channels of an upsampling.
            let mut c_in = if i > 0 { dims[i] / 2 } else { dims[i] };
            let c_out = dims[i + 1];
            let mut resnets = Vec::with_capacity(cfg.num_res_blocks + 1);
            for j in 0..=cfg.num_res_blocks {
                resnets.push(ResBlock::new(src, &format!("decoder.up_blocks.{i}.resnets.{j}"), c_in, c_out)?);
                c_in = c_out;
            }
            let upsampler = if i + 1 != stages {
                Some(Resample::up(src, &format!("decoder.up_blocks.{i}.upsamplers.0"), c_out, temporal_up[i])?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let last = dims[stages];
        Ok(Decoder {
            conv_in,
            mid,
            up_blocks,
            norm_out: ChannelNorm::new(src, "decoder.norm_out", last, false)?,
            conv_out: CausalConv::new(src, "decoder.conv_out", last, 3, 3, 3)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                h = r.forward(&h)?;
            }
            if let Some(u) = &block.upsampler {
                h = u.forward(&h)?;
            }
        }
        self.conv_out.forward(&ops::silu(&self.norm_out.forward(&h)?)?)
    }

    fn params(&self, out: &mut Vec<NamedParam>) {
        self.conv_in.params(out);
        self.mid.params(out);
        for block in &self.up_blocks {
            for r in &block.resnets {
                r.params(out);
            }
            if let Some(u) = &block.upsampler {
                u.params(out);
            }
        }
        self.norm_out.params(out);
        self.conv_out.params(out);
    }
}

/// How [`Vae::decode_tiled`] splits a latent: square tiles of `tile` latent pixels
/// starting every `stride` pixels; neighbouring decoded tiles overlap by
/// `(tile − stride)·8` image pixels, across which they are blended linearly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileOptions {
    /// Tile side in latent pixels.
    pub tile: usize,
    /// Distance between tile starts in latent pixels (≤ `tile`).
    pub stride: usize,
}

impl Default for TileOptions {
    /// diffusers' defaults: 256-pixel tiles every 192 pixels (32 and 24 latent pixels).
    fn default() -> Self {
        TileOptions { tile: 32, stride: 24 }
    }
}

/// The Wan VAE: encoder, `quant_conv`, `post_quant_conv`, decoder, and the latent
/// normalisation.
pub struct Vae {
    config: VaeConfig,
    encoder: Encoder,
    quant_conv: CausalConv,
    post_quant_conv: CausalConv,
    decoder: Decoder,
    /// `[1, z, 1, 1]` latent means, f32.
    mean: Tensor,
    /// `[1, z, 1, 1]` latent standard deviations, f32.
    std: Tensor,
    /// `[1, z, 1, 1]` reciprocals of `std`, f32.
    inv_std: Tensor,
}

impl Vae {
    /// Builds the model from `src` (a checkpoint [`Loader`] or `RandomInit`).
    pub fn new(src: &mut dyn ParamSource, config: &VaeConfig) -> Result<Vae> {
        config.validate()?;
        let z = config.z_dim;
        let device = src.device();
        let vec_tensor = |v: Vec<f32>| Tensor::from_vec_dtype(v, &[1, z, 1, 1], device, DType::F32);
        Ok(Vae {
            config: config.clone(),
            encoder: Encoder::new(src, config)?,
            quant_conv: CausalConv::new(src, "quant_conv", 2 * z, 2 * z, 1, 1)?,
            post_quant_conv: CausalConv::new(src, "post_quant_conv", z, z, 1, 1)?,
            decoder: Decoder::new(src, config)?,
            mean: vec_tensor(config.latents_mean.clone())?,
            std: vec_tensor(config.latents_std.clone())?,
            inv_std: vec_tensor(config.latents_std.iter().map(|s| 1.0 / s).collect())?,
        })
    }

    /// Loads every tensor of `set` (diffusers naming) on `device` in `dtype`; an error
    /// lists all missing, mis-shaped and unexpected tensors.
    pub fn from_weights(set: &WeightSet, config: &VaeConfig, device: Device, dtype: DType) -> Result<Vae> {
        let mut loader = Loader::new(set, device, dtype);
        let vae = Vae::new(&mut loader, config)?;
        loader.finish()?;
        Ok(vae)
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Encodes images `[B, 3, H, W]` (or one-frame videos `[B, 3, 1, H, W]`) with values in
    /// [−1, 1] to normalised latents `[B, z, 1, H/8, W/8]`: the encoder's mean, `(μ −
    /// mean)/std` per channel. H and W must be multiples of the spatial factor (8).
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let f = self.config.spatial_factor();
        let [b, c, h, w] = frame_shape(image.shape()).ok_or_else(|| {
            Error::msg(format!(
                "vae.encode: image must be [B, 3, H, W] or [B, 3, 1, H, W] (one frame), got {:?}",
                image.shape()
            ))
        })?;
        if c != 3 {
            bail!("vae.encode: image must have 3 channels, got shape {:?}", image.shape());
        }
        if h % f != 0 || w % f != 0 || h == 0 || w == 0 {
            bail!("vae.encode: image size {h}×{w} is not divisible by {f} (shape {:?})", image.shape());
        }
        let x = ops::reshape(image, &[b, c, h, w])?;
        let moments = self.quant_conv.forward(&self.encoder.forward(&x)?)?;
        let z = self.config.z_dim;
        let mu = ops::narrow(&moments, 1, 0, z)?;
        let latent = ops::mul(&ops::sub(&mu, &self.mean)?, &self.inv_std)?;
        ops::reshape(&latent, &[b, z, 1, h / f, w / f])
    }

    /// Decodes normalised latents `[B, z, 1, h, w]` (or `[B, z, h, w]`) to images `[B, 3,
    /// 8h, 8w]` clamped to [−1, 1].
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        ops::clamp(&self.decode_unclamped(latent)?, -1.0, 1.0)
    }

    /// [`Vae::decode`] without the final clamp (what a reconstruction loss should see).
    pub fn decode_unclamped(&self, latent: &Tensor) -> Result<Tensor> {
        let (b, h, w) = self.latent_dims(latent, "vae.decode")?;
        let z = ops::reshape(latent, &[b, self.config.z_dim, h, w])?;
        let z = ops::add(&ops::mul(&z, &self.std)?, &self.mean)?;
        self.decoder.forward(&self.post_quant_conv.forward(&z)?)
    }

    /// `(B, h, w)` of a latent, with an error naming `op` for any other shape.
    fn latent_dims(&self, latent: &Tensor, op: &str) -> Result<(usize, usize, usize)> {
        match frame_shape(latent.shape()) {
            Some([b, c, h, w]) if c == self.config.z_dim && b * h * w > 0 => Ok((b, h, w)),
            _ => bail!(
                "{op}: latent must be [B, {z}, 1, h, w] (one frame) or [B, {z}, h, w], got {:?}",
                latent.shape(),
                z = self.config.z_dim
            ),
        }
    }

    /// Decodes tile by tile so that large images fit in memory, as diffusers'
    /// `tiled_decode` does: tiles of `opts.tile` latent pixels every `opts.stride`, each
    /// decoded alone; each tile is blended linearly into the (already blended) tile above
    /// and to its left over their overlap, then cut to the stride and the pieces joined.
    /// A latent no larger than one tile is decoded whole. Clamped to [−1, 1].
    pub fn decode_tiled(&self, latent: &Tensor, opts: &TileOptions) -> Result<Tensor> {
        let (b, h, w) = self.latent_dims(latent, "vae.decode_tiled")?;
        if opts.stride == 0 || opts.stride > opts.tile {
            bail!("vae.decode_tiled: need 0 < stride ≤ tile, got {opts:?}");
        }
        if h <= opts.tile && w <= opts.tile {
            return self.decode(latent);
        }
        let f = self.config.spatial_factor();
        let z = ops::reshape(latent, &[b, self.config.z_dim, h, w])?;
        let blend = (opts.tile - opts.stride) * f;
        let cut = opts.stride * f;
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for i in (0..h).step_by(opts.stride) {
            let mut row: Vec<Tensor> = Vec::new();
            for j in (0..w).step_by(opts.stride) {
                let piece = ops::narrow(&ops::narrow(&z, 2, i, opts.tile.min(h - i))?, 3, j, opts.tile.min(w - j))?;
                let mut tile = self.decode_unclamped(&piece)?;
                if let Some(above) = rows.last() {
                    tile = blend_into(&above[row.len()], &tile, 2, blend)?;
                }
                if let Some(left) = row.last() {
                    tile = blend_into(left, &tile, 3, blend)?;
                }
                row.push(tile);
            }
            rows.push(row);
        }
        let mut bands = Vec::with_capacity(rows.len());
        for row in &rows {
            let pieces: Vec<Tensor> = row.iter().map(|t| crop(t, cut)).collect::<Result<_>>()?;
            bands.push(ops::concat(&pieces.iter().collect::<Vec<_>>(), 3)?);
        }
        let image = ops::concat(&bands.iter().collect::<Vec<_>>(), 2)?;
        ops::clamp(&image, -1.0, 1.0)
    }
}

impl Module for Vae {
    fn params(&self, out: &mut Vec<NamedParam>) {
        self.encoder.params(out);
        self.quant_conv.params(out);
        self.post_quant_conv.params(out);
        self.decoder.params(out);
    }
}

/// A one-frame shape as `[B, C, H, W]`: 4-D, or 5-D with one frame.
fn frame_shape(s: &[usize]) -> Option<[usize; 4]> {
    match *s {
        [b, c, h, w] | [b, c, 1, h, w] => Some([b, c, h, w]),
        _ => None,
    }
}

/// The first `cut` rows and columns of an image tile (fewer at the image's edge).
fn crop(t: &Tensor, cut: usize) -> Result<Tensor> {
    let (h, w) = (t.shape()[2], t.shape()[3]);
    ops::narrow(&ops::narrow(t, 2, 0, cut.min(h))?, 3, 0, cut.min(w))
}

/// diffusers' `blend_v` (`dim` 2) / `blend_h` (`dim` 3): over the first `e = min(extent,
/// both sizes)` positions `y` of `b` along `dim`, `b[y] = a[len_a − e + y]·(1 − y/e) +
/// b[y]·(y/e)`; the rest of `b` is kept.
fn blend_into(a: &Tensor, b: &Tensor, dim: usize, extent: usize) -> Result<Tensor> {
    let (la, lb) = (a.shape()[dim], b.shape()[dim]);
    let e = extent.min(la).min(lb);
    if e == 0 {
        return Ok(b.clone());
    }
    let mut ramp_shape = vec![1; 4];
    ramp_shape[dim] = e;
    let up: Vec<f32> = (0..e).map(|y| (y as f64 / e as f64) as f32).collect();
    let down: Vec<f32> = (0..e).map(|y| (1.0 - y as f64 / e as f64) as f32).collect();
    let up = Tensor::from_vec_dtype(up, &ramp_shape, b.device(), b.dtype())?;
    let down = Tensor::from_vec_dtype(down, &ramp_shape, b.device(), b.dtype())?;
    let mixed =
        ops::add(&ops::mul(&ops::narrow(a, dim, la - e, e)?, &down)?, &ops::mul(&ops::narrow(b, dim, 0, e)?, &up)?)?;
    if e == lb {
        return Ok(mixed);
    }
    ops::concat(&[&mixed, &ops::narrow(b, dim, e, lb - e)?], dim)
}
