//! [`CaptionDataset`]: image–caption pairs for CLIP training and evaluation, and
//! [`ClipBatches`], the [`BatchSource`] that turns them into normalized pixel batches.
//!
//! **Layouts.** SynthCLIP reads its data with `pd.read_csv(file, sep="\t")` and takes the
//! columns `image_path` and `caption` (`--csv-img-key`, `--csv-caption-key` in its
//! `Training/main.py`); its files are tab-separated even when named `.csv`. Accepted here:
//! - a table file (`.tsv`, `.csv`, …): the separator is sniffed from the header (a tab
//!   anywhere in it means TSV, else comma) unless [`CaptionOptions::separator`] says;
//!   quoting follows pandas (see [`super::csv`]): fields holding a separator, a quote or a
//!   line break are quoted, quotes doubled;
//! - a folder holding `metadata.csv` in the Synthos layout (see [`super::SynthosDataset`]).
//!
//! Columns: the image column is the first present of [`CAPTION_IMAGE_COLUMNS`], the
//! caption column the first of [`CAPTION_TEXT_COLUMNS`], unless the options name them.
//! Other columns (pandas' unnamed index column, say) are ignored. Image paths are relative
//! to the folder of the table file (SynthCLIP opens them relative to its working
//! directory; absolute paths work either way).
//!
//! **Validation.** As for the Synthos dataset (the same code): at open every row needs a
//! non-blank caption (pandas would read an empty one as NaN and SynthCLIP would train on
//! the text "nan"), an image path naming an existing file, and no more fields than the
//! header; a bad row stops the open ([`BadRowPolicy::Stop`]) or is skipped with a count
//! and a message naming file and line ([`BadRowPolicy::Skip`]). Images are decoded when a
//! batch is built; one that does not decode follows the same policy (the error names the
//! table file, line, row and image; a skipped one is left out of its batch and listed in
//! [`ClipBatch::skipped`]). [`CaptionDataset::check_all`] decodes everything up front.
//!
//! **Randomness.** The training crop of sample `i` in epoch `e` is drawn from
//! [`sample_rng`]`(seed, e, i)`, so a batch depends only on its plan, never on the worker
//! that built it or on the order in which samples were built.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::csv::{parse_delimited, read_text, sniff_separator};
use super::dataset::{find_columns, Rows};
use super::loader::{epoch_plan, BatchPlan, BatchSource, Loader, LoaderOptions};
use super::{epoch_order, BadRow, BadRowPolicy, DatasetEntry};
use crate::image::augment::ClipTransform;
use crate::image::ImageRgb;
use crate::{bail, ensure, Device, Result, ResultExt, Rng, Tensor};

/// Names accepted for the image column, in order of preference: SynthCLIP's
/// `image_path`, open_clip's default `filepath`, then the Synthos names.
pub const CAPTION_IMAGE_COLUMNS: [&str; 5] = ["image_path", "filepath", "video", "path", "image"];

/// Names accepted for the caption column, in order of preference: SynthCLIP's `caption`,
/// the Synthos `prompt`, then `text` and open_clip's default `title`.
pub const CAPTION_TEXT_COLUMNS: [&str; 4] = ["caption", "prompt", "text", "title"];

/// The stream tag that [`sample_rng`] mixes in, so augmentation draws never coincide
/// with other uses of the same seed (such as [`epoch_order`]).
const AUGMENT_STREAM: u64 = 0x4155_474D_454E_5431; // "AUGMENT1"

/// The generator for the augmentation of sample `index` in `epoch` under `seed`:
/// [`Rng::derive`]`(seed, [tag, epoch, index])`.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> Rng {
    Rng::derive(seed, &[AUGMENT_STREAM, epoch, index as u64])
}

/// How [`CaptionDataset::open`] reads a table.
#[derive(Clone, Debug)]
pub struct CaptionOptions {
    /// What to do with bad rows and undecodable images. Default: [`BadRowPolicy::Stop`].
    pub bad_rows: BadRowPolicy,
    /// The field separator; `None` sniffs it from the header (tab if it holds one, else
    /// comma).
    pub separator: Option<char>,
    /// The image column; `None` takes the first of [`CAPTION_IMAGE_COLUMNS`] present.
    pub image_column: Option<String>,
    /// The caption column; `None` takes the first of [`CAPTION_TEXT_COLUMNS`] present.
    pub caption_column: Option<String>,
    /// How many bad-row messages a summary or error quotes before "and N more".
    pub report_limit: usize,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        CaptionOptions {
            bad_rows: BadRowPolicy::Stop,
            separator: None,
            image_column: None,
            caption_column: None,
            report_limit: 5,
        }
    }
}

/// Image–caption pairs from a SynthCLIP table or a Synthos folder, validated when opened
/// (see the module documentation).
///
/// ```no_run
/// use std::sync::Arc;
/// use synthos_engine::data::loader::LoaderOptions;
/// use synthos_engine::data::{CaptionDataset, CaptionOptions, ClipBatches};
/// use synthos_engine::image::augment::ClipTransform;
/// # fn main() -> synthos_engine::Result<()> {
/// let ds = Arc::new(CaptionDataset::open("synthclip/captions.tsv", &CaptionOptions::default())?);
/// let source = ClipBatches::new(ds, ClipTransform::train(224), 42);
/// for batch in source.loader(0..1, 256, LoaderOptions::default())? {
///     let batch = batch?; // pixels [B, 3, 224, 224], captions, indices
///     # let _ = batch;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct CaptionDataset {
    dir: PathBuf,
    separator: char,
    image_column: String,
    caption_column: String,
    rows: Rows,
}

impl CaptionDataset {
    /// Opens a table file, or a folder holding `metadata.csv`, and validates its rows
    /// (see the module documentation).
    ///
    /// Errors: a path that does not exist, a folder without `metadata.csv`, an
    /// unreadable or malformed table (file and line named), missing columns (the file and
    /// the columns found are named), duplicate column names, no data rows, a bad row
    /// under [`BadRowPolicy::Stop`], or no usable row left.
    pub fn open(path: impl AsRef<Path>, options: &CaptionOptions) -> Result<Self> {
        let path = path.as_ref();
        let (table_path, dir) = if path.is_dir() {
            let meta = path.join("metadata.csv");
            ensure!(
                meta.is_file(),
                "caption dataset folder {}: {} not found (expected a table with an image and a caption column)",
                path.display(),
                meta.display()
            );
            (meta, path.to_path_buf())
        } else if path.is_file() {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (path.to_path_buf(), dir)
        } else {
            bail!(
                "caption dataset {} does not exist (expected a .tsv/.csv file or a folder with metadata.csv)",
                path.display()
            );
        };
        let text = read_text(&table_path)?;
        let separator = options.separator.unwrap_or_else(|| sniff_separator(&text));
        let table = parse_delimited(&text, separator, &table_path.display().to_string())?;
        let image_names: Vec<&str> = match &options.image_column {
            Some(c) => vec![c.as_str()],
            None => CAPTION_IMAGE_COLUMNS.to_vec(),
        };
        let text_names: Vec<&str> = match &options.caption_column {
            Some(c) => vec![c.as_str()],
            None => CAPTION_TEXT_COLUMNS.to_vec(),
        };
        let (image_col, text_col) = find_columns(&table, &table_path, &image_names, &text_names)?;
        let rows = Rows::validate(
            &table,
            &table_path,
            &dir,
            (image_col, text_col),
            "caption",
            options.bad_rows,
            options.report_limit,
        )?;
        Ok(CaptionDataset {
            dir,
            separator,
            image_column: table.header[image_col].trim().to_string(),
            caption_column: table.header[text_col].trim().to_string(),
            rows,
        })
    }

    /// The table file read (`metadata.csv` for a folder).
    pub fn table_path(&self) -> &Path {
        &self.rows.table
    }

    /// The folder image paths are relative to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The field separator used.
    pub fn separator(&self) -> char {
        self.separator
    }

    /// The name of the image column used.
    pub fn image_column(&self) -> &str {
        &self.image_column
    }

    /// The name of the caption column used.
    pub fn caption_column(&self) -> &str {
        &self.caption_column
    }

    /// The policy for bad rows and undecodable images.
    pub fn bad_rows(&self) -> BadRowPolicy {
        self.rows.policy
    }

    /// Number of usable pairs.
    pub fn len(&self) -> usize {
        self.rows.entries.len()
    }

    /// Whether there are no usable pairs (never true for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.rows.entries.is_empty()
    }

    /// The usable rows, in file order (`prompt` holds the caption).
    pub fn entries(&self) -> &[DatasetEntry] {
        &self.rows.entries
    }

    /// The caption of pair `index` (None out of range).
    pub fn caption(&self, index: usize) -> Option<&str> {
        self.rows.entries.get(index).map(|e| e.prompt.as_str())
    }

    /// The rows dropped at open (and by [`CaptionDataset::check_all`]), in file order.
    pub fn skipped(&self) -> &[BadRow] {
        &self.rows.skipped
    }

    /// A summary of the skipped rows (count and the first few messages), or `None`.
    pub fn skip_report(&self) -> Option<String> {
        self.rows.skip_report()
    }

    /// Decodes every image once: under [`BadRowPolicy::Stop`] the first undecodable one
    /// is an error naming it and its row (the dataset is left as it was); under
    /// [`BadRowPolicy::Skip`] such rows move to [`CaptionDataset::skipped`]. Returns the
    /// number of rows dropped.
    pub fn check_all(&mut self) -> Result<usize> {
        self.rows.check_all()
    }

    /// The decoded image of pair `index`; an error names the table file, line and row,
    /// then the image file and what is wrong with it.
    pub fn image(&self, index: usize) -> Result<ImageRgb> {
        let e = self.rows.entry(index, "CaptionDataset::image")?;
        ImageRgb::open(&e.path).with_ctx(|| self.rows.location(e))
    }

    /// Pair `index` through `transform` as in epoch `epoch` under `seed` (the draws of
    /// [`sample_rng`]): `[3, size, size]` f32. Errors name the row and image.
    pub fn sample(&self, index: usize, transform: &ClipTransform, epoch: u64, seed: u64) -> Result<Vec<f32>> {
        let img = self.image(index)?;
        let e = self.rows.entry(index, "CaptionDataset::sample")?;
        transform.apply(&img, &mut sample_rng(seed, epoch, index)).with_ctx(|| self.rows.location(e))
    }

    /// The order in which to visit the pairs in `epoch`: see [`epoch_order`].
    pub fn epoch_order(&self, epoch: u64, seed: u64) -> Vec<usize> {
        epoch_order(self.rows.entries.len(), epoch, seed)
    }
}

/// A batch of image–caption pairs.
#[derive(Clone, Debug)]
pub struct ClipBatch {
    /// Normalized pixels `[B, 3, size, size]`, planar per image.
    pub pixels: Vec<f32>,
    /// The image side.
    pub size: usize,
    /// The B captions, in batch order.
    pub captions: Vec<String>,
    /// The B dataset indices, in batch order.
    pub indices: Vec<usize>,
    /// Pairs of the plan left out because their image did not decode (only under
    /// [`BadRowPolicy::Skip`]); B is then smaller than planned, possibly 0.
    pub skipped: Vec<BadRow>,
    /// The epoch of the plan.
    pub epoch: u64,
    /// The position of the plan within its epoch.
    pub position: usize,
}

impl ClipBatch {
    /// B, the number of pairs.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether every pair of the plan was skipped.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The pixels as a CPU f32 tensor `[B, 3, size, size]` (the batch must not be empty).
    pub fn pixels_tensor(&self) -> Result<Tensor> {
        ensure!(!self.is_empty(), "ClipBatch::pixels_tensor: every pair of the batch was skipped");
        Tensor::from_vec(self.pixels.clone(), &[self.len(), 3, self.size, self.size], Device::Cpu)
    }
}

/// The [`BatchSource`] of CLIP training or evaluation: each pair of a plan decoded,
/// transformed with its own [`sample_rng`] and written into the batch.
#[derive(Clone, Debug)]
pub struct ClipBatches {
    dataset: Arc<CaptionDataset>,
    transform: ClipTransform,
    seed: u64,
}

impl ClipBatches {
    /// Batches of `dataset` through `transform`; `seed` drives the shuffle of
    /// [`ClipBatches::plan`] and the per-sample draws.
    pub fn new(dataset: Arc<CaptionDataset>, transform: ClipTransform, seed: u64) -> Self {
        ClipBatches { dataset, transform, seed }
    }

    /// The dataset.
    pub fn dataset(&self) -> &CaptionDataset {
        &self.dataset
    }

    /// The transform.
    pub fn transform(&self) -> &ClipTransform {
        &self.transform
    }

    /// The plan of `epoch` as SynthCLIP's loaders cut it: a random transform (training)
    /// shuffles and drops the last partial batch, the evaluation transform keeps file
    /// order and every pair.
    pub fn plan(&self, epoch: u64, batch_size: usize) -> Result<Vec<BatchPlan>> {
        let train = self.transform.is_random();
        epoch_plan(self.dataset.len(), epoch, self.seed, batch_size, train, train)
    }

    /// A [`Loader`] over the epochs `epochs`, each planned by [`ClipBatches::plan`].
    pub fn loader(
        self,
        epochs: std::ops::Range<u64>,
        batch_size: usize,
        options: LoaderOptions,
    ) -> Result<Loader<ClipBatch>> {
        let mut plans = Vec::new();
        for epoch in epochs {
            plans.extend(self.plan(epoch, batch_size)?);
        }
        Loader::new(Arc::new(self), plans, options)
    }
}

impl BatchSource for ClipBatches {
    type Batch = ClipBatch;

    fn make_batch(&self, plan: &BatchPlan) -> Result<ClipBatch> {
        let size = self.transform.size();
        let per = 3 * size * size;
        let n = plan.indices.len();
        let mut batch = ClipBatch {
            pixels: vec![0f32; n * per],
            size,
            captions: Vec::with_capacity(n),
            indices: Vec::with_capacity(n),
            skipped: Vec::new(),
            epoch: plan.epoch,
            position: plan.position,
        };
        let rows = &self.dataset.rows;
        for &index in &plan.indices {
            let e = rows.entry(index, "ClipBatches")?;
            let slot = batch.indices.len();
            let mut rng = sample_rng(self.seed, plan.epoch, index);
            let out = &mut batch.pixels[slot * per..(slot + 1) * per];
            let done = ImageRgb::open(&e.path).and_then(|img| self.transform.apply_into(&img, &mut rng, out));
            match done {
                Ok(()) => {
                    batch.captions.push(e.prompt.clone());
                    batch.indices.push(index);
                }
                Err(err) if rows.policy == BadRowPolicy::Skip => batch.skipped.push(rows.bad_row(e, err.to_string())),
                Err(err) => bail!(
                    "{}: {err} (epoch {} batch {}; fix the image, or choose to skip bad rows)",
                    rows.location(e),
                    plan.epoch,
                    plan.position
                ),
            }
        }
        batch.pixels.truncate(batch.indices.len() * per);
        Ok(batch)
    }
}
