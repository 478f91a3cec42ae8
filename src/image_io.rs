//! Reference images: decoding (PNG, JPEG, WebP) and the CLIP preprocessing of the
//! Synthos/DiffSynth pipeline (docs/MODELS.md, *Image encoder*), reproduced operation by operation:
//!
//! 1. `Image.resize((width, height))` of Pillow to the output size — its default filter,
//!    bicubic (a = −0.5) with the support widened by the downscaling factor
//!    (antialiasing), horizontal pass then vertical pass, each rounded to 8 bits with
//!    Pillow's 22-bit fixed-point weights ([`RgbImage::resize`]);
//! 2. `x·(2/255) − 1` to [−1, 1];
//! 3. `F.interpolate(mode="bicubic", align_corners=False)` of PyTorch to the encoder size
//!    (a = −0.75, no antialiasing, edge samples clamped) ([`resize_bicubic_chw`]);
//! 4. `x·0.5 + 0.5`, then `(x − mean)/std` with CLIP's mean and std.
//!
//! Decoding does not apply EXIF orientation and drops alpha without compositing, as
//! `PIL.Image.open(..).convert("RGB")` does.

use std::path::Path;

use image::{ImageFormat, ImageReader};

use crate::{bail, Error, Result};

/// CLIP's per-channel normalization mean (OpenAI CLIP, used by open-clip ViT-H/14).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel normalization standard deviation.
// The digits as published (OpenAI CLIP, open_clip, Wan); the compiler rounds them to f32.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// An 8-bit RGB image: rows top to bottom, each pixel R, G, B.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl RgbImage {
    /// Wraps `width·height·3` interleaved RGB bytes.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<RgbImage> {
        if width == 0 || height == 0 {
            bail!("RgbImage: empty size {width}x{height}");
        }
        if data.len() != width * height * 3 {
            bail!("RgbImage: {} bytes given for {width}x{height} RGB ({} expected)", data.len(), width * height * 3);
        }
        Ok(RgbImage { width, height, data })
    }

    /// Reads and decodes an image file (PNG, JPEG or WebP, recognised by its contents).
    /// Errors name the file: unreadable, unrecognised or unsupported format, corrupt data.
    pub fn open(path: impl AsRef<Path>) -> Result<RgbImage> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| Error::msg(format!("image file {}: cannot read it: {e}", path.display())))?;
        Self::decode(&bytes, &format!("image file {}", path.display()))
    }

    /// Decodes an encoded image; `source` names it in errors.
    pub fn decode(bytes: &[u8], source: &str) -> Result<RgbImage> {
        let reader = ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::msg(format!("{source}: cannot read the image header: {e}")))?;
        let Some(format) = reader.format() else {
            bail!("{source}: unrecognised image format (supported: PNG, JPEG, WebP)");
        };
        if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) {
            bail!("{source}: {format:?} images are not supported (supported: PNG, JPEG, WebP)");
        }
        let decoded =
            reader.decode().map_err(|e| Error::msg(format!("{source}: cannot decode the {format:?} image: {e}")))?;
        let rgb = decoded.into_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        Self::new(w, h, rgb.into_raw()).map_err(|e| e.context(source))
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The interleaved RGB bytes, row-major.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Pillow's `Image.resize((width, height))` with its default bicubic filter,
    /// reproduced bit for bit (see the module doc). The same size returns a copy, as
    /// Pillow does.
    pub fn resize(&self, width: usize, height: usize) -> Result<RgbImage> {
        if width == 0 || height == 0 {
            bail!("resize: target size {width}x{height} is empty");
        }
        let mut out = self.clone();
        if width != self.width {
            let taps = PilTaps::new(self.width, width);
            let mut data = vec![0u8; width * self.height * 3];
            for y in 0..self.height {
                let src = &self.data[y * self.width * 3..(y + 1) * self.width * 3];
                let dst = &mut data[y * width * 3..(y + 1) * width * 3];
                for (x, px) in dst.chunks_exact_mut(3).enumerate() {
                    for (c, v) in px.iter_mut().enumerate() {
                        *v = taps.apply(x, |i| src[i * 3 + c]);
                    }
                }
            }
            out = RgbImage { width, height: self.height, data };
        }
        if height != self.height {
            let taps = PilTaps::new(self.height, height);
            let w = out.width;
            let mut data = vec![0u8; w * height * 3];
            for y in 0..height {
                for x in 0..w {
                    for c in 0..3 {
                        data[(y * w + x) * 3 + c] = taps.apply(y, |i| out.data[(i * w + x) * 3 + c]);
                    }
                }
            }
            out = RgbImage { width: w, height, data };
        }
        Ok(out)
    }
}

/// Pillow's fixed-point precision for 8-bit resampling (`PRECISION_BITS` = 32 − 8 − 2).
const PIL_PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel (a = −0.5) with support 2.
fn pil_bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of one resampling pass of Pillow (`precompute_coeffs` +
/// `normalize_coeffs_8bpc`): for each output index, the first input index, the number of
/// taps and their fixed-point weights.
struct PilTaps {
    ksize: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i64>,
}

impl PilTaps {
    fn new(in_size: usize, out_size: usize) -> PilTaps {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 2.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut taps = PilTaps {
            ksize,
            first: Vec::with_capacity(out_size),
            count: Vec::with_capacity(out_size),
            weights: vec![0; out_size * ksize],
        };
        let unit = f64::from(1u32 << PIL_PRECISION_BITS);
        let inv_filterscale = 1.0 / filterscale;
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) conversion truncates toward zero before the clamp
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let w: Vec<f64> =
                (0..xmax).map(|x| pil_bicubic((x as f64 + xmin as f64 - center + 0.5) * inv_filterscale)).collect();
            let total: f64 = w.iter().sum();
            for (x, &wx) in w.iter().enumerate() {
                let k = if total != 0.0 { wx / total } else { wx };
                taps.weights[xx * ksize + x] = if k < 0.0 { (-0.5 + k * unit) as i64 } else { (0.5 + k * unit) as i64 };
            }
            taps.first.push(xmin);
            taps.count.push(xmax);
        }
        taps
    }

    /// Output sample `i` from the inputs `at(j)`, rounded and clipped to 8 bits.
    fn apply(&self, i: usize, at: impl Fn(usize) -> u8) -> u8 {
        let k = &self.weights[i * self.ksize..i * self.ksize + self.count[i]];
        let mut acc: i64 = 1 << (PIL_PRECISION_BITS - 1);
        for (j, &kj) in k.iter().enumerate() {
            acc += i64::from(at(self.first[i] + j)) * kj;
        }
        (acc >> PIL_PRECISION_BITS).clamp(0, 255) as u8
    }
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
/// of a `[channels, in_h, in_w]` array (no antialiasing: edge samples are clamped, values
/// may overshoot). Accumulates in f32 in PyTorch's order (rows of taps outside, columns
/// inside).
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

/// The CLIP input of a reference image for an output of `width`×`height`: resized to the
/// output size, mapped to [−1, 1], resized bicubically to `size`×`size`, mapped back to
/// [0, 1] and normalized with [`CLIP_MEAN`]/[`CLIP_STD`]. Returns `[3, size, size]`.
pub fn clip_pixels(image: &RgbImage, width: usize, height: usize, size: usize) -> Result<Vec<f32>> {
    if size == 0 {
        bail!("clip_pixels: the encoder size must be positive");
    }
    let resized = image.resize(width, height)?;
    // DiffSynth's preprocess_image: `x * ((max - min) / 255) + min` with a double factor
    let to_signed = (2.0f64 / 255.0) as f32;
    let plane = width * height;
    let mut chw = vec![0f32; 3 * plane];
    for (p, px) in resized.data().chunks_exact(3).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            chw[c * plane + p] = f32::from(v) * to_signed - 1.0;
        }
    }
    let mut x = resize_bicubic_chw(&chw, 3, height, width, size, size)?;
    for (c, channel) in x.chunks_exact_mut(size * size).enumerate() {
        for v in channel {
            *v = (*v * 0.5 + 0.5 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    Ok(x)
}
