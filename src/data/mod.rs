//! Training data: the Synthos dataset layout, image loading with the reference resize and
//! crop, and the built-in demo set.
//!
//! - [`csv`]: an RFC 4180 reader (quoted fields, doubled quotes, CRLF, BOM) whose errors
//!   name the file and line, and a record formatter.
//! - [`SynthosDataset`]: `DIR/metadata.csv` (image column `video`, `path` or `image`;
//!   `prompt`), validated when opened, with per-row messages and a skip-or-stop policy;
//!   samples come out as `[3, H, W]` f32 in [−1, 1]; [`epoch_order`] is a seeded shuffle.
//! - [`resize`]: resize-to-cover (Pillow's antialiased bilinear, as torchvision applies it
//!   to PIL images in the Synthos pipeline) and torchvision's center crop.
//! - [`ImageRgb`]: an 8-bit RGB image with PNG/JPEG/WebP decoding, atomic PNG writing and
//!   conversions to and from `[3, H, W]` f32.
//! - [`demo`]: procedurally generated captioned shapes for the built-in demo.

pub mod csv;
mod dataset;
pub mod demo;
pub mod resize;
mod rgb;

pub use dataset::{
    epoch_order, BadRow, BadRowPolicy, Batch, DatasetEntry, DatasetOptions, Sample, SynthosDataset, IMAGE_COLUMNS,
    PROMPT_COLUMN,
};
pub use rgb::{save_chw_png, write_atomic, ImageRgb};
