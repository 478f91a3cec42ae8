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

mod attention;
mod coder;
mod config;
mod layers;
mod tiles;

pub use attention::{spatial_attention, DEFAULT_MAX_SCORE_ELEMS};
pub use config::{VaeConfig, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD};
pub use tiles::{TileOptions, WHOLE_DECODE_MAX_PIXELS};

use crate::nn::{Module, NamedParam, ParamSource};
use crate::ops;
use crate::weights::{Loader, WeightSet};
use crate::{bail, DType, Device, Error, Result, Tensor};
use coder::*;
use layers::*;
use tiles::*;

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
    /// A latent no larger than one tile, or of at most `opts.whole_up_to` pixels, is
    /// decoded whole. Clamped to [−1, 1].
    pub fn decode_tiled(&self, latent: &Tensor, opts: &TileOptions) -> Result<Tensor> {
        let (b, h, w) = self.latent_dims(latent, "vae.decode_tiled")?;
        if opts.stride == 0 || opts.stride > opts.tile {
            bail!("vae.decode_tiled: need 0 < stride ≤ tile, got {opts:?}");
        }
        if (h <= opts.tile && w <= opts.tile) || h * w <= opts.whole_up_to {
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
