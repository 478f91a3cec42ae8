//! The map between images and the latents the DiT works on: the Wan VAE, or, for the
//! built-in demo, an exact pixel rearrangement.

use crate::models::vae::{TileOptions, Vae};
use crate::{bail, ops, Result, Tensor};

/// Turns images `[B, 3, H, W]` in [−1, 1] into latents `[B, C, 1, H/f, W/f]` and back.
pub enum Codec {
    /// The Wan VAE (C = 16, f = 8); decoding is tiled when the latent exceeds a tile.
    Vae {
        /// The model.
        vae: Box<Vae>,
        /// Tiling of decodes larger than one tile.
        tiles: TileOptions,
    },
    /// Space-to-depth by `factor` (C = 3·factor²): lossless and free, so the tiny demo
    /// needs no trained autoencoder (a VAE with random weights cannot reconstruct).
    Pixels {
        /// The spatial factor.
        factor: usize,
    },
}

impl Codec {
    /// Latent channels C.
    pub fn latent_channels(&self) -> usize {
        match self {
            Codec::Vae { vae, .. } => vae.config().z_dim,
            Codec::Pixels { factor } => 3 * factor * factor,
        }
    }

    /// Spatial compression f: image sides must be multiples of it.
    pub fn factor(&self) -> usize {
        match self {
            Codec::Vae { vae, .. } => vae.config().spatial_factor(),
            Codec::Pixels { factor } => *factor,
        }
    }

    /// Latents `[B, C, 1, H/f, W/f]` of images `[B, 3, H, W]` in [−1, 1] (the VAE's
    /// normalised posterior mean).
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        match self {
            Codec::Vae { vae, .. } => vae.encode(images),
            Codec::Pixels { factor } => {
                let f = *factor;
                let [b, c, h, w] = *images.shape() else {
                    bail!("pixel codec: images must be [B, 3, H, W], got {:?}", images.shape());
                };
                if c != 3 || h % f != 0 || w % f != 0 || h == 0 || w == 0 {
                    bail!(
                        "pixel codec: images must be [B, 3, H, W] with H, W multiples of {f}, got {:?}",
                        images.shape()
                    );
                }
                let x = ops::reshape(images, &[b, 3, h / f, f, w / f, f])?;
                let x = ops::permute(&x, &[0, 1, 3, 5, 2, 4])?;
                ops::reshape(&x, &[b, 3 * f * f, 1, h / f, w / f])
            }
        }
    }

    /// Images `[B, 3, H, W]` clamped to [−1, 1] from latents `[B, C, 1, h, w]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        match self {
            Codec::Vae { vae, tiles } => vae.decode_tiled(latents, tiles),
            Codec::Pixels { factor } => {
                let f = *factor;
                let c = 3 * f * f;
                let (b, h, w) = match *latents.shape() {
                    [b, cc, 1, h, w] if cc == c => (b, h, w),
                    [b, cc, h, w] if cc == c => (b, h, w),
                    _ => bail!("pixel codec: latents must be [B, {c}, 1, h, w], got {:?}", latents.shape()),
                };
                let x = ops::reshape(latents, &[b, 3, f, f, h, w])?;
                let x = ops::permute(&x, &[0, 1, 4, 2, 5, 3])?;
                let x = ops::reshape(&x, &[b, 3, h * f, w * f])?;
                ops::clamp(&x, -1.0, 1.0)
            }
        }
    }
}
