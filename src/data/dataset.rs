//! [`SynthosDataset`]: a folder of captioned images in the Synthos layout
//! (`DIR/metadata.csv` with an image column and a `prompt` column), validated up front.

use std::fmt;
use std::path::{Path, PathBuf};

use super::csv::{read_csv, CsvTable};
use crate::image::resize::resize_cover_crop;
use crate::image::ImageRgb;
use crate::{bail, ensure, Device, Result, ResultExt, Rng, Tensor};

/// Names accepted for the image column, in order of preference: Synthos/DiffSynth write
/// `video` (its loader reads single images through the video path), other tools `path`
/// or `image`.
pub const IMAGE_COLUMNS: [&str; 3] = ["video", "path", "image"];

/// The prompt column.
pub const PROMPT_COLUMN: &str = "prompt";

/// What to do with a bad row (no prompt, no image path, missing or undecodable file,
/// extra fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BadRowPolicy {
    /// Drop the row and go on; the dataset keeps the list ([`SynthosDataset::skipped`])
    /// and a summary with a count and the first messages ([`SynthosDataset::skip_report`]).
    Skip,
    /// Fail with an error naming the first bad row.
    Stop,
}

/// How [`SynthosDataset::open`] reads a folder.
#[derive(Clone, Debug)]
pub struct DatasetOptions {
    /// What to do with bad rows. Default: [`BadRowPolicy::Stop`].
    pub bad_rows: BadRowPolicy,
    /// The metadata file; `None` means `DIR/metadata.csv`. Image paths are relative to
    /// `DIR` either way (absolute paths are used as they are).
    pub metadata: Option<PathBuf>,
    /// How many bad-row messages a summary or error quotes before "and N more".
    pub report_limit: usize,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions { bad_rows: BadRowPolicy::Stop, metadata: None, report_limit: 5 }
    }
}

/// A row that was rejected, with where it is and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRow {
    /// The metadata file.
    pub csv: PathBuf,
    /// 1-based line of the file where the row starts.
    pub line: usize,
    /// 1-based data row (the header is not counted).
    pub row: usize,
    /// What is wrong, naming the image file when there is one.
    pub problem: String,
}

impl BadRow {
    /// Where the row is: `FILE line L (row R)`.
    pub fn location(&self) -> String {
        format!("{} line {} (row {})", self.csv.display(), self.line, self.row)
    }
}

impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location(), self.problem)
    }
}

/// One usable row: the resolved image path and the prompt (or caption).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetEntry {
    /// The image file (the path in the metadata joined to the dataset folder).
    pub path: PathBuf,
    /// The prompt or caption, as written in the metadata file.
    pub prompt: String,
    /// 1-based line of the metadata file where the row starts.
    pub line: usize,
    /// 1-based data row.
    pub row: usize,
}

/// A decoded, resized and cropped training sample.
#[derive(Clone, Debug)]
pub struct Sample {
    /// The image, planar `[3, height, width]`, values `v·(2/255) − 1` in [−1, 1].
    pub image: Vec<f32>,
    /// Width of `image`.
    pub width: usize,
    /// Height of `image`.
    pub height: usize,
    /// The prompt.
    pub prompt: String,
    /// The image file it came from.
    pub path: PathBuf,
    /// Its index in the dataset.
    pub index: usize,
}

impl Sample {
    /// The image as a CPU f32 tensor `[3, H, W]`.
    pub fn to_tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(self.image.clone(), &[3, self.height, self.width], Device::Cpu)
    }
}

/// Several samples stacked for a training step.
#[derive(Debug)]
pub struct Batch {
    /// CPU f32 tensor `[B, 3, H, W]` in [−1, 1].
    pub images: Tensor,
    /// The B prompts, in order.
    pub prompts: Vec<String>,
    /// The B image files, in order.
    pub paths: Vec<PathBuf>,
    /// The B dataset indices, in order.
    pub indices: Vec<usize>,
}

/// A folder of captioned images in the Synthos layout, validated when opened.
///
/// ```no_run
/// use synthos_engine::data::{BadRowPolicy, DatasetOptions, SynthosDataset};
/// # fn main() -> synthos_engine::Result<()> {
/// let opts = DatasetOptions { bad_rows: BadRowPolicy::Skip, ..Default::default() };
/// let ds = SynthosDataset::open("my_data", &opts)?;
/// if let Some(report) = ds.skip_report() {
///     eprintln!("{report}");
/// }
/// for i in ds.epoch_order(0, 42) {
///     let sample = ds.get(i, 480, 480)?; // [3, 480, 480] in [-1, 1]
///     # let _ = sample;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct SynthosDataset {
    dir: PathBuf,
    image_column: String,
    rows: Rows,
}

impl SynthosDataset {
    /// Opens the dataset in `dir`: reads the metadata CSV, finds the image column (the
    /// first of `video`, `path`, `image` present) and the `prompt` column, and checks
    /// every row: it must have a non-blank prompt, an image path, an existing image file,
    /// and no more fields than the header. Bad rows are skipped or stop the open, as
    /// `options.bad_rows` says. Images are not decoded here (see
    /// [`SynthosDataset::check_all`]).
    ///
    /// Errors: an unreadable or malformed CSV (file and line named), missing columns
    /// (the columns found are listed), duplicate column names, a file without data rows,
    /// a bad row under [`BadRowPolicy::Stop`], or no usable row left.
    pub fn open(dir: impl AsRef<Path>, options: &DatasetOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        ensure!(dir.is_dir(), "dataset folder {} does not exist or is not a folder", dir.display());
        let csv = options.metadata.clone().unwrap_or_else(|| dir.join("metadata.csv"));
        ensure!(
            csv.is_file(),
            "dataset folder {}: metadata file {} not found (expected a CSV with columns `video` and `prompt`)",
            dir.display(),
            csv.display()
        );
        let table = read_csv(&csv)?;
        let (image_col, prompt_col) = find_columns(&table, &csv, &IMAGE_COLUMNS, &[PROMPT_COLUMN])?;
        let rows = Rows::validate(
            &table,
            &csv,
            &dir,
            (image_col, prompt_col),
            PROMPT_COLUMN,
            options.bad_rows,
            options.report_limit,
        )?;
        Ok(SynthosDataset { dir, image_column: table.header[image_col].trim().to_string(), rows })
    }

    /// The dataset folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metadata file read.
    pub fn metadata_path(&self) -> &Path {
        &self.rows.table
    }

    /// The name of the image column used (`video`, `path` or `image`).
    pub fn image_column(&self) -> &str {
        &self.image_column
    }

    /// Number of usable samples.
    pub fn len(&self) -> usize {
        self.rows.entries.len()
    }

    /// Whether there are no usable samples (never true for an opened dataset).
    pub fn is_empty(&self) -> bool {
        self.rows.entries.is_empty()
    }

    /// The usable rows, in file order.
    pub fn entries(&self) -> &[DatasetEntry] {
        &self.rows.entries
    }

    /// The rows dropped under [`BadRowPolicy::Skip`], in file order.
    pub fn skipped(&self) -> &[BadRow] {
        &self.rows.skipped
    }

    /// A summary of the skipped rows (count and the first few messages), or `None` when
    /// none was skipped.
    pub fn skip_report(&self) -> Option<String> {
        self.rows.skip_report()
    }

    /// Decodes every image once, for users who want to fail before training rather than
    /// at the first bad file. Under [`BadRowPolicy::Stop`] the first undecodable image is
    /// an error naming it and its row; under [`BadRowPolicy::Skip`] such rows are moved to
    /// [`SynthosDataset::skipped`]. Returns the number of rows dropped.
    pub fn check_all(&mut self) -> Result<usize> {
        self.rows.check_all()
    }

    /// Sample `index`: the image decoded, resized to cover `width × height` and
    /// center-cropped (see [`crate::image::resize`]), with its prompt. An undecodable image
    /// is an error naming the file and its metadata row.
    pub fn get(&self, index: usize, width: usize, height: usize) -> Result<Sample> {
        let e = self.rows.entry(index, "SynthosDataset::get")?;
        let image = ImageRgb::open(&e.path)
            .and_then(|img| resize_cover_crop(&img, width, height))
            .with_ctx(|| self.rows.location(e))?;
        Ok(Sample { image: image.to_chw(), width, height, prompt: e.prompt.clone(), path: e.path.clone(), index })
    }

    /// The samples at `indices` stacked into one `[B, 3, H, W]` CPU tensor with their prompts.
    pub fn batch(&self, indices: &[usize], width: usize, height: usize) -> Result<Batch> {
        ensure!(!indices.is_empty(), "SynthosDataset::batch: no indices");
        let mut data = Vec::with_capacity(indices.len() * 3 * width * height);
        let mut prompts = Vec::with_capacity(indices.len());
        let mut paths = Vec::with_capacity(indices.len());
        for &i in indices {
            let s = self.get(i, width, height)?;
            data.extend_from_slice(&s.image);
            prompts.push(s.prompt);
            paths.push(s.path);
        }
        let images = Tensor::from_vec(data, &[indices.len(), 3, height, width], Device::Cpu)?;
        Ok(Batch { images, prompts, paths, indices: indices.to_vec() })
    }

    /// The order in which to visit the samples in `epoch`: see [`epoch_order`].
    pub fn epoch_order(&self, epoch: u64, seed: u64) -> Vec<usize> {
        epoch_order(self.rows.entries.len(), epoch, seed)
    }
}

/// The validated rows of a metadata table, shared by [`SynthosDataset`] and
/// [`super::CaptionDataset`]: the usable entries, the rejected rows, and the policy and
/// report settings that say what to do with more bad rows found later.
#[derive(Clone, Debug)]
pub(crate) struct Rows {
    /// The metadata file the rows come from.
    pub(crate) table: PathBuf,
    /// The usable rows, in file order.
    pub(crate) entries: Vec<DatasetEntry>,
    /// The rejected rows, in file order.
    pub(crate) skipped: Vec<BadRow>,
    /// Data rows in the file.
    pub(crate) rows_in_file: usize,
    /// What to do with a bad row.
    pub(crate) policy: BadRowPolicy,
    /// How many messages a summary quotes.
    report_limit: usize,
}

impl Rows {
    /// Checks every data row of `table` (read from `path`): no more fields than the
    /// header, a non-blank text in column `cols.1` (called `text_label` in messages), an
    /// image path in column `cols.0` naming an existing file under `dir` (absolute paths
    /// are kept). Under [`BadRowPolicy::Stop`] the first bad row is the error; under
    /// [`BadRowPolicy::Skip`] bad rows are kept aside. No usable row left, or no data row
    /// at all, is an error either way.
    pub(crate) fn validate(
        table: &CsvTable,
        path: &Path,
        dir: &Path,
        cols: (usize, usize),
        text_label: &str,
        policy: BadRowPolicy,
        report_limit: usize,
    ) -> Result<Rows> {
        let (image_col, text_col) = cols;
        ensure!(!table.rows.is_empty(), "{}: the file has a header but no data rows", path.display());
        let mut entries = Vec::with_capacity(table.rows.len());
        let mut bad = Vec::new();
        for (i, record) in table.rows.iter().enumerate() {
            let field = |c: usize| record.fields.get(c).map(String::as_str).unwrap_or("");
            let mut problems = Vec::new();
            if record.fields.len() > table.header.len() {
                problems.push(format!(
                    "{} fields, but the header has {} columns (a separator in an unquoted field?)",
                    record.fields.len(),
                    table.header.len()
                ));
            }
            let text = field(text_col);
            if text.trim().is_empty() {
                problems.push(format!("no {text_label}"));
            }
            let rel = field(image_col).trim();
            let image = dir.join(rel);
            if rel.is_empty() {
                problems.push(format!("no image path in column `{}`", table.header[image_col].trim()));
            } else if !image.is_file() {
                let what = if image.exists() { "is not a file" } else { "not found" };
                problems.push(format!("image file {} {what}", image.display()));
            }
            if problems.is_empty() {
                entries.push(DatasetEntry { path: image, prompt: text.to_string(), line: record.line, row: i + 1 });
            } else {
                bad.push(BadRow {
                    csv: path.to_path_buf(),
                    line: record.line,
                    row: i + 1,
                    problem: problems.join("; "),
                });
            }
        }
        let rows_in_file = table.rows.len();
        if policy == BadRowPolicy::Stop && !bad.is_empty() {
            bail!(
                "{} (the first of {} bad rows of {rows_in_file}; fix them, or choose to skip bad rows)",
                bad[0],
                bad.len()
            );
        }
        let rows = Rows { table: path.to_path_buf(), entries, skipped: bad, rows_in_file, policy, report_limit };
        ensure!(!rows.entries.is_empty(), "{}", rows.nothing_left());
        Ok(rows)
    }

    /// Entry `index`, or an error from `what` when it is out of range.
    pub(crate) fn entry(&self, index: usize, what: &str) -> Result<&DatasetEntry> {
        match self.entries.get(index) {
            Some(e) => Ok(e),
            None => bail!("{what}: index {index} out of range for {} samples", self.entries.len()),
        }
    }

    /// A [`BadRow`] for entry `e` with `problem`.
    pub(crate) fn bad_row(&self, e: &DatasetEntry, problem: String) -> BadRow {
        BadRow { csv: self.table.clone(), line: e.line, row: e.row, problem }
    }

    /// Where entry `e` is: `FILE line L (row R)`.
    pub(crate) fn location(&self, e: &DatasetEntry) -> String {
        format!("{} line {} (row {})", self.table.display(), e.line, e.row)
    }

    /// A summary of the skipped rows (count and the first few messages), or `None` when
    /// none was skipped.
    pub(crate) fn skip_report(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        Some(format!(
            "skipped {} of {} rows of {}:{}",
            self.skipped.len(),
            self.rows_in_file,
            self.table.display(),
            self.listing()
        ))
    }

    /// The first `report_limit` skipped rows, one per line, then "and N more".
    fn listing(&self) -> String {
        let mut s = String::new();
        for b in self.skipped.iter().take(self.report_limit) {
            s.push_str(&format!("\n  line {} (row {}): {}", b.line, b.row, b.problem));
        }
        if self.skipped.len() > self.report_limit {
            s.push_str(&format!("\n  … and {} more", self.skipped.len() - self.report_limit));
        }
        s
    }

    /// The error when every row was rejected.
    fn nothing_left(&self) -> String {
        format!("{}: no usable rows, all {} were rejected:{}", self.table.display(), self.rows_in_file, self.listing())
    }

    /// Decodes every image once: the first undecodable one is an error under
    /// [`BadRowPolicy::Stop`] (the rows are left as they were), or its row moves to the
    /// skipped ones under [`BadRowPolicy::Skip`]. Returns the number of rows dropped.
    pub(crate) fn check_all(&mut self) -> Result<usize> {
        let mut keep = vec![true; self.entries.len()];
        for (k, e) in self.entries.iter().enumerate() {
            if let Err(err) = ImageRgb::open(&e.path) {
                let bad = self.bad_row(e, err.to_string());
                if self.policy == BadRowPolicy::Stop {
                    bail!("{bad} (checking every image; fix it, or choose to skip bad rows)");
                }
                self.skipped.push(bad);
                keep[k] = false;
            }
        }
        let mut flags = keep.iter();
        self.entries.retain(|_| *flags.next().unwrap_or(&true));
        self.skipped.sort_by_key(|b| b.row);
        let dropped = keep.iter().filter(|&&k| !k).count();
        ensure!(!self.entries.is_empty(), "{}", self.nothing_left());
        Ok(dropped)
    }
}

/// A permutation of `0..len` for `epoch`, the same on every machine for a `(seed, epoch)`
/// pair and different between epochs: a Fisher–Yates shuffle driven by
/// [`Rng`] seeded with `seed` mixed with `epoch`.
pub fn epoch_order(len: usize, epoch: u64, seed: u64) -> Vec<usize> {
    // Rng::new runs the seed through SplitMix64, so nearby seeds give unrelated streams;
    // the odd multiplier keeps (seed, epoch) pairs from colliding for small epochs.
    let mut rng = Rng::new(seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..len).collect();
    rng.shuffle(&mut order);
    order
}

/// `` `a` ``, `` `a` or `b` ``, `` `a`, `b` or `c` ``: the names for a message.
fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

/// Finds the image column (the first of `image_names` present) and the text column (the
/// first of `text_names`), or explains which are missing and lists the columns found.
/// A column name given twice in the header is an error.
pub(crate) fn find_columns(
    table: &CsvTable,
    csv: &Path,
    image_names: &[&str],
    text_names: &[&str],
) -> Result<(usize, usize)> {
    let mut seen = std::collections::HashSet::new();
    for name in &table.header {
        ensure!(
            seen.insert(name.trim()),
            "{} line 1: the column `{}` appears twice in the header",
            csv.display(),
            name.trim()
        );
    }
    let image = image_names.iter().find_map(|c| table.column(c));
    let text = text_names.iter().find_map(|c| table.column(c));
    match (image, text) {
        (Some(i), Some(t)) => Ok((i, t)),
        _ => {
            let mut missing = Vec::new();
            if image.is_none() {
                missing.push(match image_names {
                    [one] => format!("an image column `{one}`"),
                    _ => format!("an image column ({})", one_of(image_names)),
                });
            }
            if text.is_none() {
                missing.push(match text_names {
                    [one] => format!("a `{one}` column"),
                    _ => format!("a caption column ({})", one_of(text_names)),
                });
            }
            let found: Vec<String> = table.header.iter().map(|h| format!("`{h}`")).collect();
            bail!("{}: missing {}; the columns found are: {}", csv.display(), missing.join(" and "), found.join(", "))
        }
    }
}
