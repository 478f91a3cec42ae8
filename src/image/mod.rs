//! Images: the one 8-bit RGB type [`ImageRgb`] of the crate and everything done to it.
//!
//! - [`ImageRgb`]: pixels in memory; [`ImageRgb::open`]/[`ImageRgb::decode`] read PNG,
//!   JPEG and WebP the way `PIL.Image.open(..).convert("RGB")` does for common images.
//! - The `[3, H, W]` f32 layout in [−1, 1] that the models take and give:
//!   [`ImageRgb::to_chw`]/[`ImageRgb::from_chw`] (and the tensor forms), built on the
//!   per-value [`to_signed`] and [`from_signed`].
//! - [`resize`]: the reference pipelines' resamplers reproduced exactly — Pillow's
//!   antialiased bilinear with resize-to-cover and torchvision's center crop (training
//!   data), Pillow's bicubic and PyTorch's bicubic `interpolate` (CLIP preprocessing).
//! - [`augment`]: SynthCLIP's training (`RandomResizedCrop`) and evaluation (`Resize` +
//!   `CenterCrop`) transforms with ImageNet normalization.
//! - [`clip`]: the CLIP image encoder's input from a reference image.
//! - [`png`]: PNG encoding and atomic PNG files ([`ImageRgb::save_png`], [`png::save_chw_png`]).

use std::path::Path;

use ::image::{ImageFormat, ImageReader};

use crate::{bail, ensure, Error, Result, Tensor};

pub mod augment;
pub mod clip;
pub mod png;
pub mod resize;

/// The scale of [`to_signed`]: DiffSynth's `preprocess_image` factor `(max − min)/255`,
/// here `2/255` in f32 (the same f32 as rounding the double quotient).
const TO_SIGNED: f32 = 2.0 / 255.0;

/// An 8-bit level as a value in [−1, 1]: `v · (2/255) − 1` in f32, the scaling of
/// DiffSynth's `preprocess_image` (0 → −1, 255 → 1).
pub fn to_signed(v: u8) -> f32 {
    f32::from(v) * TO_SIGNED - 1.0
}

/// A value in [−1, 1] as an 8-bit level: `round((clamp(x, −1, 1) + 1) · 127.5)`, half away
/// from zero; values beyond the range saturate and NaN becomes 0. (DiffSynth truncates
/// instead of rounding, at most one level lower.)
pub fn from_signed(x: f32) -> u8 {
    ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
}

/// An 8-bit RGB image: `data` holds `height` rows of `width` interleaved `[r, g, b]`
/// pixels, top row first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRgb {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl ImageRgb {
    /// An image from interleaved RGB bytes; `data.len()` must be `width * height * 3`.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        ensure!(width > 0 && height > 0, "ImageRgb::new: the size {width}x{height} is empty");
        ensure!(
            data.len() == width * height * 3,
            "ImageRgb::new: {width}x{height} RGB needs {} bytes, got {}",
            width * height * 3,
            data.len()
        );
        Ok(ImageRgb { width, height, data })
    }

    /// An image of one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Result<Self> {
        ensure!(width > 0 && height > 0, "ImageRgb::filled: the size {width}x{height} is empty");
        Ok(ImageRgb { width, height, data: rgb.repeat(width * height) })
    }

    /// Reads and decodes an image file (see [`ImageRgb::decode`]). Errors name the file:
    /// unreadable, unrecognised or unsupported format, corrupt data.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| Error::msg(format!("image file {}: cannot read it: {e}", path.display())))?;
        Self::decode(&bytes, &format!("image file {}", path.display()))
    }

    /// Decodes a PNG, JPEG or WebP image (the format is read from the content, not a
    /// name) and converts it to RGB the way PIL's `convert("RGB")` does for common images:
    /// grey is replicated, palettes are expanded, alpha is dropped (not blended). 16-bit
    /// images are reduced to 8 bits by the decoder's scaling (PIL would clip), and EXIF
    /// orientation is not applied (PIL's `Image.open` does not apply it either). `source`
    /// names the image in errors.
    pub fn decode(bytes: &[u8], source: &str) -> Result<Self> {
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

    /// The interleaved RGB bytes, mutable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// The pixel at column `x`, row `y`. Panics out of bounds, like slice indexing.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        assert!(x < self.width && y < self.height, "pixel ({x}, {y}) outside {}x{}", self.width, self.height);
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    /// Sets the pixel at column `x`, row `y`; coordinates outside the image are ignored,
    /// so drawing code can clip by simply writing.
    pub fn set_pixel(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            return;
        }
        let i = (y as usize * self.width + x as usize) * 3;
        self.data[i..i + 3].copy_from_slice(&rgb);
    }

    /// Copies `src` into this image with its top-left corner at (`x`, `y`), clipped.
    pub fn paste(&mut self, src: &ImageRgb, x: i64, y: i64) {
        for sy in 0..src.height {
            for sx in 0..src.width {
                self.set_pixel(x + sx as i64, y + sy as i64, src.pixel(sx, sy));
            }
        }
    }

    /// The image as `[3, H, W]` planar f32 in [−1, 1], each level mapped by [`to_signed`].
    pub fn to_chw(&self) -> Vec<f32> {
        let plane = self.width * self.height;
        let mut out = vec![0.0f32; 3 * plane];
        for (p, px) in self.data.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                out[c * plane + p] = to_signed(v);
            }
        }
        out
    }

    /// An image from `[3, H, W]` planar f32 values in [−1, 1], each mapped by
    /// [`from_signed`] (clamped, rounded; NaN becomes 0).
    pub fn from_chw(values: &[f32], height: usize, width: usize) -> Result<Self> {
        ensure!(width > 0 && height > 0, "ImageRgb::from_chw: the size {height}x{width} is empty");
        let plane = height * width;
        ensure!(
            values.len() == 3 * plane,
            "ImageRgb::from_chw: [3, {height}, {width}] needs {} values, got {}",
            3 * plane,
            values.len()
        );
        let mut data = vec![0u8; 3 * plane];
        for (p, px) in data.chunks_exact_mut(3).enumerate() {
            for (c, v) in px.iter_mut().enumerate() {
                *v = from_signed(values[c * plane + p]);
            }
        }
        Ok(ImageRgb { width, height, data })
    }

    /// An image from a tensor `[3, H, W]` or `[1, 3, H, W]` (any device or dtype) with
    /// values in [−1, 1], converted as in [`ImageRgb::from_chw`].
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (h, w) = match *t.shape() {
            [3, h, w] | [1, 3, h, w] => (h, w),
            _ => bail!("ImageRgb::from_tensor: expected an image [3, H, W] or [1, 3, H, W], got {:?}", t.shape()),
        };
        ImageRgb::from_chw(&t.to_vec()?, h, w)
    }

    /// The image as a CPU f32 tensor `[3, H, W]` in [−1, 1] (see [`ImageRgb::to_chw`]).
    pub fn to_tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(self.to_chw(), &[3, self.height, self.width], crate::Device::Cpu)
    }
}
