//! The resamplers of the reference pipelines, reproduced bit for bit.
//!
//! **Training data.** The Synthos runs load images with DiffSynth's `ImageCropAndResize`
//! (diffsynth 2.1.12, `diffsynth/core/data/operators.py`), which for a target
//! `W_t × H_t` computes `scale = max(W_t/W, H_t/H)`, resizes the PIL image to
//! `(round(H·scale), round(W·scale))` with `torchvision.transforms.functional.resize(…,
//! BILINEAR)`, then calls torchvision's `center_crop`. On a PIL image torchvision's
//! resize is PIL's `Image.resize(size, BILINEAR)`, which always antialiases
//! ([`resize_bilinear`], [`cover_size`], [`center_crop`], [`resize_cover_crop`]).
//!
//! **SynthCLIP training and evaluation** ([`super::augment`]). torchvision's
//! `RandomResizedCrop` on a PIL image is `resized_crop`: PIL's `crop` of the window, then
//! the same bilinear `Image.resize` ([`crop`], [`resized_crop`]); `Resize(size)` with one
//! integer sets the short side to `size` and truncates the long one ([`short_side_size`]),
//! and `CenterCrop` is [`center_crop`] ([`resize_short_center_crop`] does both).
//!
//! **CLIP preprocessing** ([`super::clip`]). Pillow's `Image.resize((width, height))`
//! with its default filter, bicubic with a = −0.5 ([`resize_bicubic`]), and PyTorch's
//! `F.interpolate(mode="bicubic", align_corners=False)` with a = −0.75, not antialiased,
//! on f32 planes ([`resize_bicubic_chw`]).
//!
//! Both Pillow filters run the same fixed-point resampling (`libImaging/Resample.c`):
//!
//! - Per axis, with `scale = in/out` and `fs = max(scale, 1)`, output sample `i` is
//!   centred at `c = (i + 0.5)·scale` in input coordinates and takes the inputs `j` in
//!   `[trunc(c − s + 0.5), trunc(c + s + 0.5))` (clipped to the image), `s` the
//!   filter's support (1 bilinear, 2 bicubic) times `fs`, with weights
//!   `filter((j − c + 0.5)/fs)` normalised to sum 1. When shrinking (`fs > 1`) the filter
//!   widens to cover `fs` times more input pixels: this is the antialiasing; when
//!   enlarging it is plain interpolation with half-pixel centres (like
//!   `align_corners=False`). The bilinear filter is the triangle `max(0, 1 − |x|)`, the
//!   bicubic one the cubic convolution kernel with a = −0.5.
//! - The weights become 22-bit fixed point (rounded half away from zero); each pass sums
//!   `pixel · weight` in 32-bit integers from `2²¹` (for rounding), shifts right by 22
//!   and clamps to [0, 255].
//! - The first pass is rounded to 8 bits before the second; a pass whose size does not
//!   change is skipped. Pillow 13 runs the vertical pass first when the height shrinks by
//!   more than twice as many pixels as the width (`H − H' > 2·(W − W')`), else the
//!   horizontal pass first (Pillow 12 and older always went horizontal first; the order
//!   moves results by a level here and there).
//! - For the crop, sizes round half to even (Python's `round`), and the crop offsets are
//!   `round((H' − H_t)/2)`, `round((W' − W_t)/2)`, also half to even, as in torchvision.
//!
//! With that, outputs match Pillow 13.0 + torchvision 0.29 byte for byte on decoded
//! pixels (checked against fixtures in `tests/data.rs` and `tests/clip.rs`). JPEG
//! decoding itself may differ by a level here and there from PIL's libjpeg-turbo.

use super::ImageRgb;
use crate::{bail, ensure, Result};

/// Fixed-point precision of the resampling weights (Pillow's `PRECISION_BITS` for 8-bit
/// images, 32 − 8 − 2).
const PRECISION_BITS: u32 = 22;

/// A Pillow resampling filter.
#[derive(Clone, Copy, Debug)]
enum PilFilter {
    /// `BILINEAR`: the triangle, support 1.
    Bilinear,
    /// `BICUBIC`: cubic convolution with a = −0.5, support 2.
    Bicubic,
}

impl PilFilter {
    fn support(self) -> f64 {
        match self {
            PilFilter::Bilinear => 1.0,
            PilFilter::Bicubic => 2.0,
        }
    }

    /// The weight of the input at offset `d = j − c + 0.5` from an output centre, the
    /// filter widened by `filter_scale`.
    fn weight(self, d: f64, filter_scale: f64) -> f64 {
        match self {
            PilFilter::Bilinear => {
                let x = (d / filter_scale).abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            PilFilter::Bicubic => {
                const A: f64 = -0.5;
                let x = (d * (1.0 / filter_scale)).abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// The input span and fixed-point weights of every output sample along one axis
/// (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`).
struct AxisWeights {
    /// For output sample `i`: the first input index and the number of inputs used.
    bounds: Vec<(usize, usize)>,
    /// `taps` weights per output sample (unused ones are zero).
    weights: Vec<i32>,
    taps: usize,
}

impl AxisWeights {
    fn new(filter: PilFilter, in_size: usize, out_size: usize) -> AxisWeights {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = filter.support() * filter_scale;
        let taps = support.ceil() as usize * 2 + 1;
        let unit = (1u64 << PRECISION_BITS) as f64;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * taps];
        let mut w = vec![0f64; taps];
        for i in 0..out_size {
            let center = (i as f64 + 0.5) * scale;
            // Truncation toward zero, then clipping, as Pillow's `(int)` casts do.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = hi - lo;
            let mut sum = 0.0;
            for (k, wk) in w.iter_mut().enumerate().take(n) {
                *wk = filter.weight((lo + k) as f64 - center + 0.5, filter_scale);
                sum += *wk;
            }
            for k in 0..n {
                let normalised = if sum != 0.0 { w[k] / sum } else { w[k] };
                weights[i * taps + k] =
                    if normalised < 0.0 { (-0.5 + normalised * unit) as i32 } else { (0.5 + normalised * unit) as i32 };
            }
            bounds.push((lo, n));
        }
        AxisWeights { bounds, weights, taps }
    }

    /// The weights of output sample `i` with its first input index.
    fn of(&self, i: usize) -> (usize, &[i32]) {
        let (lo, n) = self.bounds[i];
        (lo, &self.weights[i * self.taps..i * self.taps + n])
    }
}

/// Rounds a fixed-point accumulator to 8 bits with clamping.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The accumulator's start: one half in fixed point, so that the shift rounds.
const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);

/// Pillow's horizontal pass: every row resampled to `out_w` pixels.
fn horizontal_pass(src: &ImageRgb, out_w: usize, filter: PilFilter) -> Result<ImageRgb> {
    let (in_w, in_h) = (src.width(), src.height());
    let ax = AxisWeights::new(filter, in_w, out_w);
    let mut data = vec![0u8; out_w * in_h * 3];
    for (row, out) in src.data().chunks_exact(in_w * 3).zip(data.chunks_exact_mut(out_w * 3)) {
        for (x, px) in out.chunks_exact_mut(3).enumerate() {
            let (lo, k) = ax.of(x);
            let mut acc = [ROUNDING; 3];
            for (p, &wt) in row[lo * 3..].chunks_exact(3).zip(k) {
                for c in 0..3 {
                    acc[c] += i32::from(p[c]) * wt;
                }
            }
            for c in 0..3 {
                px[c] = clip8(acc[c]);
            }
        }
    }
    ImageRgb::new(out_w, in_h, data)
}

/// Pillow's vertical pass: every column resampled to `out_h` pixels.
fn vertical_pass(src: &ImageRgb, out_h: usize, filter: PilFilter) -> Result<ImageRgb> {
    let (w, in_h) = (src.width(), src.height());
    let ax = AxisWeights::new(filter, in_h, out_h);
    let stride = w * 3;
    let mut data = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for (y, out) in data.chunks_exact_mut(stride).enumerate() {
        let (lo, k) = ax.of(y);
        acc.fill(ROUNDING);
        // Row by row, so that the inner loop runs over contiguous bytes; the sum per
        // output byte is the same as Pillow's tap-by-tap loop (integer addition).
        for (t, &wt) in k.iter().enumerate() {
            let row = &src.data()[(lo + t) * stride..(lo + t + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += i32::from(v) * wt;
            }
        }
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    ImageRgb::new(w, out_h, data)
}

/// Pillow's `Image.resize((out_w, out_h), filter)` of an RGB image (Pillow 13's
/// `ImagingResampleInner`): two passes, each rounded to 8 bits; a pass whose size does
/// not change is skipped. The vertical pass runs first when the height shrinks by more
/// than twice as many pixels as the width does (`in_h − out_h > 2·(in_w − out_w)`,
/// signed), the horizontal pass first otherwise.
fn resample(src: &ImageRgb, out_w: usize, out_h: usize, filter: PilFilter) -> Result<ImageRgb> {
    let (in_w, in_h) = (src.width(), src.height());
    let shrink_h = in_h as i64 - out_h as i64;
    let shrink_w = in_w as i64 - out_w as i64;
    let vertical_first = shrink_h > 0 && shrink_h > 2 * shrink_w;
    let pass = |img: &ImageRgb, horizontal: bool| -> Result<Option<ImageRgb>> {
        Ok(if horizontal {
            (img.width() != out_w).then(|| horizontal_pass(img, out_w, filter)).transpose()?
        } else {
            (img.height() != out_h).then(|| vertical_pass(img, out_h, filter)).transpose()?
        })
    };
    let first = pass(src, !vertical_first)?;
    let mid = first.as_ref().unwrap_or(src);
    match pass(mid, vertical_first)? {
        Some(out) => Ok(out),
        None => Ok(first.unwrap_or_else(|| src.clone())),
    }
}

/// Resizes to `out_w × out_h` with Pillow's antialiased bilinear filter,
/// `Image.resize(size, BILINEAR)` (see the module documentation for the exact
/// arithmetic).
pub fn resize_bilinear(src: &ImageRgb, out_w: usize, out_h: usize) -> Result<ImageRgb> {
    ensure!(out_w > 0 && out_h > 0, "resize_bilinear: the target size {out_w}x{out_h} is empty");
    resample(src, out_w, out_h, PilFilter::Bilinear)
}

/// Resizes to `out_w × out_h` as Pillow's `Image.resize((out_w, out_h))` does with its
/// default filter, bicubic (a = −0.5, antialiased), bit for bit. The same size returns a
/// copy, as Pillow does.
pub fn resize_bicubic(src: &ImageRgb, out_w: usize, out_h: usize) -> Result<ImageRgb> {
    ensure!(out_w > 0 && out_h > 0, "resize_bicubic: the target size {out_w}x{out_h} is empty");
    resample(src, out_w, out_h, PilFilter::Bicubic)
}

/// The size `(W', H')` an image of `width × height` is resized to so that it covers
/// `target_w × target_h`: `scale = max(W_t/W, H_t/H)`, `W' = round(W·scale)`,
/// `H' = round(H·scale)`, rounding half to even (Python's `round`). Neither falls below
/// the target: `x·fl(t/x)` is within an ulp of `t` and rounds to it.
pub fn cover_size(width: usize, height: usize, target_w: usize, target_h: usize) -> (usize, usize) {
    let scale = (target_w as f64 / width as f64).max(target_h as f64 / height as f64);
    let w = (width as f64 * scale).round_ties_even() as usize;
    let h = (height as f64 * scale).round_ties_even() as usize;
    (w, h)
}

/// The `crop_w × crop_h` window at the centre of the image, with torchvision's offsets
/// `round((H − h)/2)`, `round((W − w)/2)` (half to even). The crop must fit.
pub fn center_crop(src: &ImageRgb, crop_w: usize, crop_h: usize) -> Result<ImageRgb> {
    let (w, h) = (src.width(), src.height());
    ensure!(
        crop_w > 0 && crop_h > 0 && crop_w <= w && crop_h <= h,
        "center_crop: cannot crop {crop_w}x{crop_h} from an image of {w}x{h}"
    );
    let top = ((h - crop_h) as f64 / 2.0).round_ties_even() as usize;
    let left = ((w - crop_w) as f64 / 2.0).round_ties_even() as usize;
    crop(src, left, top, crop_w, crop_h)
}

/// The `crop_w × crop_h` window whose top-left pixel is (`left`, `top`), as PIL's
/// `Image.crop((left, top, left + w, top + h))` inside the image. The window must fit.
pub fn crop(src: &ImageRgb, left: usize, top: usize, crop_w: usize, crop_h: usize) -> Result<ImageRgb> {
    let (w, h) = (src.width(), src.height());
    ensure!(
        crop_w > 0 && crop_h > 0 && left + crop_w <= w && top + crop_h <= h,
        "crop: the window {crop_w}x{crop_h} at ({left}, {top}) does not fit in an image of {w}x{h}"
    );
    let mut data = Vec::with_capacity(crop_w * crop_h * 3);
    for y in top..top + crop_h {
        let start = (y * w + left) * 3;
        data.extend_from_slice(&src.data()[start..start + crop_w * 3]);
    }
    ImageRgb::new(crop_w, crop_h, data)
}

/// torchvision's `resized_crop` on a PIL image: the window at (`left`, `top`) of
/// `crop_w × crop_h` is cut out ([`crop`]), then resized to `out_w × out_h` with
/// Pillow's antialiased bilinear filter ([`resize_bilinear`]); a window already of the
/// output size is returned as cut. (Cutting first matters: Pillow's `resize(box=…)`
/// would let the filter reach pixels outside the window.)
#[allow(clippy::too_many_arguments)]
pub fn resized_crop(
    src: &ImageRgb,
    left: usize,
    top: usize,
    crop_w: usize,
    crop_h: usize,
    out_w: usize,
    out_h: usize,
) -> Result<ImageRgb> {
    ensure!(out_w > 0 && out_h > 0, "resized_crop: the output size {out_w}x{out_h} is empty");
    let window = crop(src, left, top, crop_w, crop_h)?;
    if (crop_w, crop_h) == (out_w, out_h) {
        return Ok(window);
    }
    resize_bilinear(&window, out_w, out_h)
}

/// The size `(W', H')` torchvision's `Resize(size)` with one integer gives an image of
/// `width × height`: the short side becomes `size`, the long side
/// `int(size · long / short)`, truncated (the f64 quotient of two exact integers, whose
/// truncation is the integer quotient for any image size). A square stays square.
pub fn short_side_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let new_long = (size * long).checked_div(short).unwrap_or(0);
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision's `Resize(size)` then `CenterCrop(size)` on a PIL image: the short side
/// is resized to `size` ([`short_side_size`], Pillow's bilinear, skipped when the size
/// does not change), then the central `size × size` window is cut ([`center_crop`]).
pub fn resize_short_center_crop(src: &ImageRgb, size: usize) -> Result<ImageRgb> {
    ensure!(size > 0, "resize_short_center_crop: the size must be positive");
    // Both sides come out at least `size` (long ≥ short), so the crop always fits.
    let (w, h) = short_side_size(src.width(), src.height(), size);
    let resized = if (w, h) == (src.width(), src.height()) { src.clone() } else { resize_bilinear(src, w, h)? };
    center_crop(&resized, size, size)
}

/// Resize-to-cover then center crop to exactly `target_w × target_h`, as Synthos'
/// `ImageCropAndResize` does (see the module documentation).
pub fn resize_cover_crop(src: &ImageRgb, target_w: usize, target_h: usize) -> Result<ImageRgb> {
    ensure!(target_w > 0 && target_h > 0, "resize_cover_crop: the target size {target_w}x{target_h} is empty");
    let (w, h) = cover_size(src.width(), src.height(), target_w, target_h);
    let resized = if (w, h) == (src.width(), src.height()) { src.clone() } else { resize_bilinear(src, w, h)? };
    center_crop(&resized, target_w, target_h)
}

/// PyTorch's cubic convolution weights of the 4 taps around fractional offset `t`
/// (`get_cubic_upsample_coefficients`, a = −0.75), in f32 as on the CPU.
fn torch_cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// For each output index: the 4 clamped input indices and their weights of PyTorch's
/// bicubic resampling from `in_size` to `out_size` with `align_corners=False`.
fn torch_cubic_taps(in_size: usize, out_size: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|o| {
            let real = scale * (o as f32 + 0.5) - 0.5;
            let index = (real.floor() as i64).min(in_size as i64 - 1);
            let t = (real - index as f32).clamp(0.0, 1.0);
            let clamp = |i: i64| i.clamp(0, in_size as i64 - 1) as usize;
            ([clamp(index - 1), clamp(index), clamp(index + 1), clamp(index + 2)], torch_cubic_weights(t))
        })
        .collect()
}

/// PyTorch's `F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False)`
/// of a `[channels, in_h, in_w]` f32 array (a = −0.75, no antialiasing: edge samples are
/// clamped, values may overshoot). Accumulates in f32 in PyTorch's order (rows of taps
/// outside, columns inside).
pub fn resize_bicubic_chw(
    src: &[f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
) -> Result<Vec<f32>> {
    if src.len() != channels * in_h * in_w || in_h == 0 || in_w == 0 || out_h == 0 || out_w == 0 {
        bail!("resize_bicubic_chw: {} values for [{channels}, {in_h}, {in_w}] resized to {out_h}x{out_w}", src.len());
    }
    let rows = torch_cubic_taps(in_h, out_h);
    let cols = torch_cubic_taps(in_w, out_w);
    let mut out = Vec::with_capacity(channels * out_h * out_w);
    for plane in src.chunks_exact(in_h * in_w) {
        for (ys, wy) in &rows {
            for (xs, wx) in &cols {
                let mut acc = 0f32;
                for (k, &y) in ys.iter().enumerate() {
                    let row = &plane[y * in_w..(y + 1) * in_w];
                    let mut inner = row[xs[0]] * wx[0];
                    for j in 1..4 {
                        inner += row[xs[j]] * wx[j];
                    }
                    if k == 0 {
                        acc = inner * wy[0];
                    } else {
                        acc += inner * wy[k];
                    }
                }
                out.push(acc);
            }
        }
    }
    Ok(out)
}
