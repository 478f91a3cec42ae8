//! Resize-to-cover and center crop, exactly as the Synthos training data pipeline does it.
//!
//! The Synthos runs load images with DiffSynth's `ImageCropAndResize` (diffsynth 2.1.12,
//! `diffsynth/core/data/operators.py`), which for a target `W_t × H_t` computes
//! `scale = max(W_t/W, H_t/H)`, resizes the PIL image to
//! `(round(H·scale), round(W·scale))` with `torchvision.transforms.functional.resize(…,
//! BILINEAR)`, then calls torchvision's `center_crop`. On a PIL image torchvision's resize
//! is PIL's `Image.resize(size, BILINEAR)`, which always antialiases. So this module
//! implements Pillow's bilinear resampling (`libImaging/Resample.c`):
//!
//! - Per axis, with `scale = in/out` and `fs = max(scale, 1)`, output sample `i` is
//!   centred at `c = (i + 0.5)·scale` in input coordinates and takes the inputs `j` in
//!   `[trunc(c − fs + 0.5), trunc(c + fs + 0.5))` (clipped to the image) with weights
//!   `tri((j − c + 0.5)/fs)`, `tri(x) = max(0, 1 − |x|)`, normalised to sum 1. When
//!   shrinking (`fs > 1`) the triangle widens to cover `fs` input pixels each side: this
//!   is the antialiasing; when enlarging it is plain bilinear interpolation with
//!   half-pixel centres (like `align_corners=False`).
//! - The weights become 22-bit fixed point (`trunc(0.5 + w·2²²)`); each pass sums
//!   `pixel · weight` in integers from `2²¹` (for rounding), shifts right by 22 and
//!   clamps to [0, 255].
//! - The horizontal pass runs first and its result is rounded to 8 bits before the
//!   vertical pass; a pass whose size does not change is skipped.
//! - Sizes round half to even (Python's `round`), and the crop offsets are
//!   `round((H' − H_t)/2)`, `round((W' − W_t)/2)`, also half to even, as in torchvision.
//!
//! With that, outputs match Pillow 13.0 + torchvision 0.29 byte for byte on decoded
//! pixels (checked against a fixture in `tests/data.rs`). JPEG decoding itself may differ
//! by a level here and there from PIL's libjpeg-turbo.

use super::rgb::ImageRgb;
use crate::{ensure, Result};

/// Fixed-point precision of the resampling weights (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 22;

/// The input span and fixed-point weights of every output sample along one axis.
struct AxisWeights {
    /// For output sample `i`: the first input index and the number of inputs used.
    bounds: Vec<(usize, usize)>,
    /// `taps` weights per output sample (unused ones are zero).
    weights: Vec<i32>,
    taps: usize,
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's bilinear weights for resampling `in_size` samples to `out_size`.
fn axis_weights(in_size: usize, out_size: usize) -> AxisWeights {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    let taps = support.ceil() as usize * 2 + 1;
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
            *wk = triangle(((lo + k) as f64 - center + 0.5) / filter_scale);
            sum += *wk;
        }
        for k in 0..n {
            let normalised = if sum != 0.0 { w[k] / sum } else { w[k] };
            // Bilinear weights are never negative, so Pillow's rounding is `trunc(0.5 + x)`.
            weights[i * taps + k] = (0.5 + normalised * (1u64 << PRECISION_BITS) as f64) as i32;
        }
        bounds.push((lo, n));
    }
    AxisWeights { bounds, weights, taps }
}

/// Rounds a fixed-point accumulator to 8 bits with clamping.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes to `out_w × out_h` with Pillow's antialiased bilinear filter (see the module
/// documentation for the exact arithmetic).
pub fn resize_bilinear(src: &ImageRgb, out_w: usize, out_h: usize) -> Result<ImageRgb> {
    ensure!(out_w > 0 && out_h > 0, "resize_bilinear: the target size {out_w}x{out_h} is empty");
    let (in_w, in_h) = (src.width(), src.height());
    let rounding = 1i64 << (PRECISION_BITS - 1);

    let horizontal = if out_w != in_w {
        let ax = axis_weights(in_w, out_w);
        let mut data = vec![0u8; out_w * in_h * 3];
        for y in 0..in_h {
            let row = &src.data()[y * in_w * 3..(y + 1) * in_w * 3];
            for (x, &(lo, n)) in ax.bounds.iter().enumerate() {
                let k = &ax.weights[x * ax.taps..x * ax.taps + n];
                let mut acc = [rounding; 3];
                for (t, &wt) in k.iter().enumerate() {
                    let p = (lo + t) * 3;
                    for c in 0..3 {
                        acc[c] += row[p + c] as i64 * wt as i64;
                    }
                }
                let o = (y * out_w + x) * 3;
                for c in 0..3 {
                    data[o + c] = clip8(acc[c]);
                }
            }
        }
        ImageRgb::new(out_w, in_h, data)?
    } else {
        src.clone()
    };

    if out_h == in_h {
        return Ok(horizontal);
    }
    let ax = axis_weights(in_h, out_h);
    let stride = out_w * 3;
    let mut data = vec![0u8; out_w * out_h * 3];
    for (y, &(lo, n)) in ax.bounds.iter().enumerate() {
        let k = &ax.weights[y * ax.taps..y * ax.taps + n];
        for i in 0..stride {
            let mut acc = rounding;
            for (t, &wt) in k.iter().enumerate() {
                acc += horizontal.data()[(lo + t) * stride + i] as i64 * wt as i64;
            }
            data[y * stride + i] = clip8(acc);
        }
    }
    ImageRgb::new(out_w, out_h, data)
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
    let mut data = Vec::with_capacity(crop_w * crop_h * 3);
    for y in top..top + crop_h {
        let start = (y * w + left) * 3;
        data.extend_from_slice(&src.data()[start..start + crop_w * 3]);
    }
    ImageRgb::new(crop_w, crop_h, data)
}

/// Resize-to-cover then center crop to exactly `target_w × target_h`, as Synthos'
/// `ImageCropAndResize` does (see the module documentation).
pub fn resize_cover_crop(src: &ImageRgb, target_w: usize, target_h: usize) -> Result<ImageRgb> {
    ensure!(target_w > 0 && target_h > 0, "resize_cover_crop: the target size {target_w}x{target_h} is empty");
    let (w, h) = cover_size(src.width(), src.height(), target_w, target_h);
    let resized = if (w, h) == (src.width(), src.height()) { src.clone() } else { resize_bilinear(src, w, h)? };
    center_crop(&resized, target_w, target_h)
}
