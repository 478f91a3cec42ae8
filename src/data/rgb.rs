//! [`ImageRgb`]: an 8-bit RGB image in memory, with decoding (PNG, JPEG, WebP), atomic
//! PNG writing, and conversions to and from the `[3, H, W]` f32 layout in [−1, 1] that
//! the models take.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ::image::codecs::png::PngEncoder;
use ::image::{ExtendedColorType, ImageEncoder, ImageReader};

use crate::{bail, ensure, Error, Result, ResultExt, Tensor};

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

    /// Decodes a PNG, JPEG or WebP file (the format is read from the content, not the
    /// name) and converts it to RGB the way PIL's `convert("RGB")` does for common
    /// images: grey is replicated, palettes are expanded, alpha is dropped (not blended).
    /// 16-bit images are reduced to 8 bits by the decoder's scaling (PIL would clip), and
    /// EXIF orientation is not applied (PIL's `Image.open` does not apply it either).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let reader = ImageReader::open(path)
            .with_ctx(|| format!("cannot open image file {}", path.display()))?
            .with_guessed_format()
            .with_ctx(|| format!("cannot read image file {}", path.display()))?;
        let decoded = reader.decode().with_ctx(|| format!("cannot decode image file {}", path.display()))?;
        let rgb = decoded.to_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        ensure!(w > 0 && h > 0, "image file {} has no pixels ({w}x{h})", path.display());
        Ok(ImageRgb { width: w, height: h, data: rgb.into_raw() })
    }

    /// PNG-encodes the image in memory.
    pub fn to_png_bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        PngEncoder::new(&mut bytes)
            .write_image(&self.data, self.width as u32, self.height as u32, ExtendedColorType::Rgb8)
            .ctx("encoding a PNG image")?;
        Ok(bytes)
    }

    /// Writes the image as a PNG file, atomically (temporary file in the same directory,
    /// then rename), creating missing parent directories.
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_png_bytes().with_ctx(|| format!("saving {}", path.display()))?;
        write_atomic(path, &bytes)
    }

    /// The image as `[3, H, W]` planar f32 in [−1, 1]: `v · (2/255) − 1`, the scaling
    /// of DiffSynth's `preprocess_image` (computed here in f32).
    pub fn to_chw(&self) -> Vec<f32> {
        let plane = self.width * self.height;
        let mut out = vec![0.0f32; 3 * plane];
        let scale = 2.0f32 / 255.0;
        for (p, px) in self.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = px[c] as f32 * scale - 1.0;
            }
        }
        out
    }

    /// An image from `[3, H, W]` planar f32 values in [−1, 1]:
    /// `round((clamp(v, −1, 1) + 1) · 127.5)`, as the engine's VAE helper does (DiffSynth
    /// truncates instead of rounding, at most one level lower). NaN becomes 0.
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
        for p in 0..plane {
            for c in 0..3 {
                data[p * 3 + c] = ((values[c * plane + p].clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
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

/// Writes `[3, H, W]` f32 values in [−1, 1] as a PNG file (atomic, see
/// [`ImageRgb::save_png`]).
pub fn save_chw_png(values: &[f32], height: usize, width: usize, path: impl AsRef<Path>) -> Result<()> {
    ImageRgb::from_chw(values, height, width)?.save_png(path)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory is written,
/// flushed and renamed over `path`, so readers never see a half-written file. Missing
/// parent directories are created. On error the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let Some(name) = path.file_name() else {
        bail!("cannot write {}: the path has no file name", path.display());
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).with_ctx(|| format!("cannot create directory {}", dir.display()))?;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!(".{}.{}-{n}.tmp", name.to_string_lossy(), std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut w = BufWriter::new(File::create(&temp)?);
        w.write_all(bytes)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&temp, path)
    })();
    if let Err(e) = written {
        // The temporary file may not exist (creation failed); nothing else to clean.
        let _ = fs::remove_file(&temp);
        return Err(Error::msg(format!("cannot write {}: {e}", path.display())));
    }
    Ok(())
}
