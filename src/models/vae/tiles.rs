//! Tiled decoding: how a latent is split, and how decoded tiles are cropped and blended.

use crate::ops;
use crate::{Result, Tensor};

/// How [`Vae::decode_tiled`](super::Vae::decode_tiled) splits a latent: square tiles of `tile` latent pixels
/// starting every `stride` pixels; neighbouring decoded tiles overlap by
/// `(tile − stride)·8` image pixels, across which they are blended linearly. Latents of
/// at most `whole_up_to` pixels decode whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileOptions {
    /// Tile side in latent pixels.
    pub tile: usize,
    /// Distance between tile starts in latent pixels (≤ `tile`).
    pub stride: usize,
    /// Latents of at most this many pixels (h·w) decode whole, tiles or not. A whole
    /// decode is the model's exact output (diffusers decodes whole unless tiling is
    /// enabled), and it is faster: tiles recompute their overlaps (at 480×480, 9 tiles of
    /// diffusers' size decode 1.6× the pixels) and their products are smaller.
    pub whole_up_to: usize,
}

/// Latent pixels up to which the default decodes whole: 128×128, a 1024×1024 image, whose
/// largest decoder activation (96 channels at full size) is 400 MB in f32.
pub const WHOLE_DECODE_MAX_PIXELS: usize = 128 * 128;

impl Default for TileOptions {
    /// diffusers' tiles, 256 pixels every 192 (32 and 24 latent pixels), for latents above
    /// [`WHOLE_DECODE_MAX_PIXELS`].
    fn default() -> Self {
        TileOptions { tile: 32, stride: 24, whole_up_to: WHOLE_DECODE_MAX_PIXELS }
    }
}

/// A one-frame shape as `[B, C, H, W]`: 4-D, or 5-D with one frame.
pub(super) fn frame_shape(s: &[usize]) -> Option<[usize; 4]> {
    match *s {
        [b, c, h, w] | [b, c, 1, h, w] => Some([b, c, h, w]),
        _ => None,
    }
}

/// The first `cut` rows and columns of an image tile (fewer at the image's edge).
pub(super) fn crop(t: &Tensor, cut: usize) -> Result<Tensor> {
    let (h, w) = (t.shape()[2], t.shape()[3]);
    ops::narrow(&ops::narrow(t, 2, 0, cut.min(h))?, 3, 0, cut.min(w))
}

/// diffusers' `blend_v` (`dim` 2) / `blend_h` (`dim` 3): over the first `e = min(extent,
/// both sizes)` positions `y` of `b` along `dim`, `b[y] = a[len_a − e + y]·(1 − y/e) +
/// b[y]·(y/e)`; the rest of `b` is kept.
pub(super) fn blend_into(a: &Tensor, b: &Tensor, dim: usize, extent: usize) -> Result<Tensor> {
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
