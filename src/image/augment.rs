//! SynthCLIP's image transforms (its `Training/main.py`), operation for operation as
//! torchvision 0.26 runs them on a PIL image:
//!
//! - **Training**: `RandomResizedCrop(224, scale=(0.5, 1.0))` with the default ratio
//!   range (3/4, 4/3) and bilinear interpolation — a random window
//!   ([`random_resized_crop_params`]) cut out and resized with Pillow's antialiased
//!   bilinear filter ([`resized_crop`]) — then `ToTensor` and `Normalize` with the
//!   ImageNet statistics ([`normalize_into`]).
//! - **Evaluation**: `Resize(224)` (short side to 224, long side truncated), then
//!   `CenterCrop(224)` ([`resize_short_center_crop`]), `ToTensor`, `Normalize`.
//!
//! [`ClipTransform`] bundles either with its output size; the output is planar
//! `[3, size, size]` f32. The resampling is Pillow's integer arithmetic (see
//! [`super::resize`]), so the 8-bit image before normalization matches torchvision
//! exactly; the normalization is the same f32 arithmetic as torchvision's
//! (`v / 255`, then `(x − mean) / std` with the constants rounded to f32).
//!
//! The random window cannot share torch's generator; it is drawn from the crate's [`Rng`]
//! with torchvision's algorithm (same draws in the same order, same rounding), so its
//! distribution — not its values — matches.

use super::resize::{resize_short_center_crop, resized_crop};
use super::ImageRgb;
use crate::{bail, ensure, Result, Rng};

/// ImageNet per-channel mean (R, G, B) of torchvision's `Normalize` in SynthCLIP, the
/// usual torchvision reference values; rounded to f32 as `torch.as_tensor` does.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];

/// ImageNet per-channel standard deviation (R, G, B), paired with [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// SynthCLIP's `RandomResizedCrop` area range: the window covers 50 % to 100 % of the
/// image area.
pub const SYNTHCLIP_SCALE: (f64, f64) = (0.5, 1.0);

/// torchvision's default `RandomResizedCrop` aspect-ratio range (width / height), which
/// SynthCLIP keeps: 3/4 to 4/3, drawn log-uniformly.
pub const SYNTHCLIP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// SynthCLIP's image size (ViT-B/16 input).
pub const SYNTHCLIP_SIZE: usize = 224;

/// A window of an image, as torchvision's `RandomResizedCrop.get_params` returns it
/// (`top`, `left`, `height`, `width`), with whether it came from the fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows in the window.
    pub height: usize,
    /// Columns in the window.
    pub width: usize,
    /// True when none of the 10 random tries fitted and the window is the central crop
    /// clamped to the ratio range (or the whole image).
    pub fallback: bool,
}

/// Python's `int(round(x))` for a non-negative finite `x` (half to even), saturating.
fn py_round(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

/// A random window of a `width × height` image, drawn as torchvision's
/// `RandomResizedCrop.get_params` draws it:
///
/// 1. up to 10 tries: an area `A · u(scale)` (A the image area, `u` uniform in the range)
///    and an aspect ratio `exp(u(ln ratio))`; the window is
///    `w = round(√(area · ratio))` by `h = round(√(area / ratio))` (half to even); if
///    `0 < w ≤ width` and `0 < h ≤ height` its top row is uniform in `0..=height − h`,
///    then its left column uniform in `0..=width − w`;
/// 2. otherwise the fallback: an image wider than the largest ratio keeps its height and
///    gets `w = round(height · max ratio)`, one narrower than the smallest keeps its width
///    and gets `h = round(width / min ratio)`, any other is taken whole; the window is
///    centred with offsets `(height − h) // 2`, `(width − w) // 2` (floor, unlike
///    `CenterCrop`).
///
/// The draws use [`Rng::uniform`] in f64 (torch draws f32 values, which only shifts the
/// edges of the ranges by an f32 rounding). Errors: an empty image, or a scale or ratio
/// range that is not `0 < lo ≤ hi` and finite (torchvision only warns).
pub fn random_resized_crop_params(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut Rng,
) -> Result<CropBox> {
    ensure!(width > 0 && height > 0, "random_resized_crop_params: the image {width}x{height} is empty");
    let valid = |(lo, hi): (f64, f64)| lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi;
    if !valid(scale) || !valid(ratio) {
        bail!("random_resized_crop_params: scale {scale:?} and ratio {ratio:?} must be finite with 0 < lo <= hi");
    }
    let area = (width * height) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    let uniform = |rng: &mut Rng, lo: f64, hi: f64| lo + (hi - lo) * rng.uniform();
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = py_round((target_area * aspect).sqrt());
        let h = py_round((target_area / aspect).sqrt());
        if w > 0 && w <= width && h > 0 && h <= height {
            let top = rng.below(height - h + 1);
            let left = rng.below(width - w + 1);
            return Ok(CropBox { top, left, height: h, width: w, fallback: false });
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (width, py_round(width as f64 / ratio.0).clamp(1, height))
    } else if in_ratio > ratio.1 {
        (py_round(height as f64 * ratio.1).clamp(1, width), height)
    } else {
        (width, height)
    };
    Ok(CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w, fallback: true })
}

/// `ToTensor` then `Normalize(mean, std)` of an image into `out`, planar `[3, H, W]`:
/// each level becomes `(v / 255 − mean[c]) / std[c]` in f32, the operations and order
/// of torchvision. `out` must hold `3 · W · H` values.
pub fn normalize_into(img: &ImageRgb, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) -> Result<()> {
    let plane = img.width() * img.height();
    ensure!(
        out.len() == 3 * plane,
        "normalize_into: a {}x{} image needs {} values, the output holds {}",
        img.width(),
        img.height(),
        3 * plane,
        out.len()
    );
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (p, px) in img.data().chunks_exact(3).enumerate() {
        r[p] = (f32::from(px[0]) / 255.0 - mean[0]) / std[0];
        g[p] = (f32::from(px[1]) / 255.0 - mean[1]) / std[1];
        b[p] = (f32::from(px[2]) / 255.0 - mean[2]) / std[2];
    }
    Ok(())
}

/// [`normalize_into`] into a new `[3, H, W]` vector.
pub fn normalized_chw(img: &ImageRgb, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let mut out = vec![0f32; 3 * img.width() * img.height()];
    // The length is right by construction, so this cannot fail.
    let _ = normalize_into(img, mean, std, &mut out);
    out
}

/// One of SynthCLIP's two image pipelines, with its output size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClipTransform {
    /// `RandomResizedCrop(size, scale, ratio)` (bilinear), `ToTensor`, ImageNet
    /// `Normalize`.
    Train {
        /// Output side.
        size: usize,
        /// Area range of the window, as a fraction of the image area.
        scale: (f64, f64),
        /// Aspect-ratio range (width / height) of the window.
        ratio: (f64, f64),
    },
    /// `Resize(size)` (bilinear, short side), `CenterCrop(size)`, `ToTensor`, ImageNet
    /// `Normalize`.
    Eval {
        /// Output side.
        size: usize,
    },
}

impl ClipTransform {
    /// SynthCLIP's training transform at output side `size` (224 in SynthCLIP):
    /// [`SYNTHCLIP_SCALE`], [`SYNTHCLIP_RATIO`].
    pub fn train(size: usize) -> Self {
        ClipTransform::Train { size, scale: SYNTHCLIP_SCALE, ratio: SYNTHCLIP_RATIO }
    }

    /// SynthCLIP's evaluation transform at output side `size`.
    pub fn eval(size: usize) -> Self {
        ClipTransform::Eval { size }
    }

    /// The output side.
    pub fn size(&self) -> usize {
        match *self {
            ClipTransform::Train { size, .. } | ClipTransform::Eval { size } => size,
        }
    }

    /// Whether the transform draws random numbers (only [`ClipTransform::Train`]).
    pub fn is_random(&self) -> bool {
        matches!(self, ClipTransform::Train { .. })
    }

    /// The transformed 8-bit image before `ToTensor`/`Normalize`: `size × size`.
    /// [`ClipTransform::Eval`] does not touch `rng`.
    pub fn apply_u8(&self, img: &ImageRgb, rng: &mut Rng) -> Result<ImageRgb> {
        match *self {
            ClipTransform::Train { size, scale, ratio } => {
                ensure!(size > 0, "ClipTransform: the output size must be positive");
                let b = random_resized_crop_params(img.width(), img.height(), scale, ratio, rng)?;
                resized_crop(img, b.left, b.top, b.width, b.height, size, size)
            }
            ClipTransform::Eval { size } => resize_short_center_crop(img, size),
        }
    }

    /// The whole pipeline into `out` (`3 · size²` values, planar `[3, size, size]`).
    pub fn apply_into(&self, img: &ImageRgb, rng: &mut Rng, out: &mut [f32]) -> Result<()> {
        let small = self.apply_u8(img, rng)?;
        normalize_into(&small, IMAGENET_MEAN, IMAGENET_STD, out)
    }

    /// The whole pipeline: `[3, size, size]` f32.
    pub fn apply(&self, img: &ImageRgb, rng: &mut Rng) -> Result<Vec<f32>> {
        let small = self.apply_u8(img, rng)?;
        Ok(normalized_chw(&small, IMAGENET_MEAN, IMAGENET_STD))
    }
}

/// SynthCLIP's training transform of one image at output side `size`: see
/// [`ClipTransform::train`]. Returns `[3, size, size]`.
pub fn train_transform(img: &ImageRgb, size: usize, rng: &mut Rng) -> Result<Vec<f32>> {
    ClipTransform::train(size).apply(img, rng)
}

/// SynthCLIP's evaluation transform of one image at output side `size`: short side to
/// `size`, central `size × size`, normalized. Returns `[3, size, size]`.
pub fn eval_transform(img: &ImageRgb, size: usize) -> Result<Vec<f32>> {
    ClipTransform::eval(size).apply(img, &mut Rng::new(0))
}
