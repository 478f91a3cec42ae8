//! Training data: the Synthos dataset layout, image loading with the reference resize and
//! crop ([`crate::image::resize::resize_cover_crop`]), and the built-in demo set.
//!
//! - [`csv`]: an RFC 4180 reader (quoted fields, doubled quotes, CRLF, BOM) whose errors
//!   name the file and line, and a record formatter.
//! - [`SynthosDataset`]: `DIR/metadata.csv` (image column `video`, `path` or `image`;
//!   `prompt`), validated when opened, with per-row messages and a skip-or-stop policy;
//!   samples come out as `[3, H, W]` f32 in [−1, 1]; [`epoch_order`] is a seeded shuffle.
//! - [`CaptionDataset`] ([`pairs`]): image–caption pairs for CLIP — SynthCLIP's
//!   tab-separated `image_path`/`caption` tables or a Synthos folder — validated the same
//!   way, and [`ClipBatches`], normalized pixel batches through SynthCLIP's training or
//!   evaluation transform ([`crate::image::augment`]).
//! - [`loader`]: a prefetching [`loader::Loader`] that builds batches of a fixed plan on
//!   worker threads, deterministic for any number of workers.
//! - [`demo`]: procedurally generated captioned shapes for the built-in demo.

pub mod csv;
mod dataset;
pub mod demo;
pub mod loader;
pub mod pairs;

pub use dataset::{
    epoch_order, BadRow, BadRowPolicy, Batch, DatasetEntry, DatasetOptions, Sample, SynthosDataset, IMAGE_COLUMNS,
    PROMPT_COLUMN,
};
pub use pairs::{
    sample_rng, CaptionDataset, CaptionOptions, ClipBatch, ClipBatches, CAPTION_IMAGE_COLUMNS, CAPTION_TEXT_COLUMNS,
};
