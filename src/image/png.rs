//! PNG output: encoding in memory and atomic PNG files.

use std::path::Path;

use ::image::codecs::png::PngEncoder;
use ::image::{ExtendedColorType, ImageEncoder};

use super::ImageRgb;
use crate::fsutil::write_atomic;
use crate::{Result, ResultExt};

impl ImageRgb {
    /// PNG-encodes the image in memory.
    pub fn to_png_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        PngEncoder::new(&mut bytes)
            .write_image(self.data(), self.width() as u32, self.height() as u32, ExtendedColorType::Rgb8)
            .ctx("encoding a PNG image")?;
        Ok(bytes)
    }

    /// Writes the image as a PNG file, atomically ([`write_atomic`]: temporary file in the
    /// same directory, then rename), creating missing parent directories.
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_png_bytes().with_ctx(|| format!("saving {}", path.display()))?;
        write_atomic(path, &bytes)
    }
}

/// Writes `[3, H, W]` f32 values in [−1, 1] as a PNG file ([`ImageRgb::from_chw`], then
/// the atomic [`ImageRgb::save_png`]).
pub fn save_chw_png(values: &[f32], height: usize, width: usize, path: impl AsRef<Path>) -> Result<()> {
    ImageRgb::from_chw(values, height, width)?.save_png(path)
}
