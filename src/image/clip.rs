//! The CLIP image encoder's input from a reference image, as the Synthos/DiffSynth
//! pipeline prepares it (docs/MODELS.md, *Image encoder*), operation by operation:
//!
//! 1. `Image.resize((width, height))` of Pillow to the output size, its default bicubic
//!    filter ([`resize_bicubic`]);
//! 2. `x·(2/255) − 1` to [−1, 1] ([`ImageRgb::to_chw`]);
//! 3. `F.interpolate(mode="bicubic", align_corners=False)` of PyTorch to the encoder size
//!    ([`resize_bicubic_chw`]);
//! 4. `x·0.5 + 0.5`, then `(x − mean)/std` with [`CLIP_MEAN`] and [`CLIP_STD`].

use super::resize::{resize_bicubic, resize_bicubic_chw};
use super::ImageRgb;
use crate::{bail, Result};

/// CLIP's per-channel normalization mean (OpenAI CLIP, used by open-clip ViT-H/14).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel normalization standard deviation.
// The digits as published (OpenAI CLIP, open_clip, Wan); the compiler rounds them to f32.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The CLIP input of a reference image for an output of `width`×`height`: resized to the
/// output size, mapped to [−1, 1], resized bicubically to `size`×`size`, mapped back to
/// [0, 1] and normalized with [`CLIP_MEAN`]/[`CLIP_STD`] (see the module documentation).
/// Returns `[3, size, size]`.
pub fn clip_pixels(image: &ImageRgb, width: usize, height: usize, size: usize) -> Result<Vec<f32>> {
    if size == 0 {
        bail!("clip_pixels: the encoder size must be positive");
    }
    let chw = resize_bicubic(image, width, height)?.to_chw();
    let mut x = resize_bicubic_chw(&chw, 3, height, width, size, size)?;
    for (c, channel) in x.chunks_exact_mut(size * size).enumerate() {
        for v in channel {
            *v = (*v * 0.5 + 0.5 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    Ok(x)
}
