//! `metrics.jsonl`: one JSON object per training step (or per logging interval), appended
//! and flushed line by line so a crash loses at most the line being written, and safe to
//! reopen when a run resumes.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::fsutil::write_atomic;
use crate::{bail, ensure, Result, ResultExt};

/// The keys a [`MetricsRecord`] always writes; extra fields may not reuse them.
pub const STANDARD_KEYS: [&str; 7] = ["step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "mem_bytes"];

/// One line of `metrics.jsonl`.
///
/// Written keys: `step`, `epoch`, `loss`, `lr`, `grad_norm`, `samples_per_s`, `mem_bytes`
/// (the optional ones as `null` when unknown), then the `extra` fields. Non-finite
/// numbers are written as `null` (JSON has no NaN).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsRecord {
    /// Optimizer step (1-based after the first update, as the trainer counts).
    pub step: u64,
    /// Epoch the step belongs to.
    pub epoch: u64,
    /// Training loss of the step.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping, if measured.
    pub grad_norm: Option<f64>,
    /// Throughput, if measured.
    pub samples_per_s: Option<f64>,
    /// Device memory in use (or peak), in bytes, if measured.
    pub mem_bytes: Option<u64>,
    /// Any other fields (timings, validation scores, …).
    pub extra: Map<String, Value>,
}

impl MetricsRecord {
    /// A record with the required fields; the optional ones empty.
    pub fn new(step: u64, epoch: u64, loss: f64, lr: f64) -> Self {
        MetricsRecord {
            step,
            epoch,
            loss,
            lr,
            grad_norm: None,
            samples_per_s: None,
            mem_bytes: None,
            extra: Map::new(),
        }
    }

    /// Adds an extra field (builder style).
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    /// The record as a JSON object. Errors when an extra field reuses a standard key.
    pub fn to_json(&self) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        m.insert("step".into(), self.step.into());
        m.insert("epoch".into(), self.epoch.into());
        m.insert("loss".into(), self.loss.into());
        m.insert("lr".into(), self.lr.into());
        m.insert("grad_norm".into(), self.grad_norm.into());
        m.insert("samples_per_s".into(), self.samples_per_s.into());
        m.insert("mem_bytes".into(), self.mem_bytes.into());
        for (k, v) in &self.extra {
            ensure!(!STANDARD_KEYS.contains(&k.as_str()), "metrics record: extra field `{k}` shadows a standard field");
            m.insert(k.clone(), v.clone());
        }
        Ok(m)
    }
}

/// Appends JSON lines to a metrics file.
#[derive(Debug)]
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Opens `path` for appending, creating it and its parent folders if needed. If the
    /// file ends in a partial line (a crash mid-write), that fragment is cut off first so
    /// every line stays valid JSON.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let ctx = || format!("opening metrics file {}", path.display());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_ctx(ctx)?;
        }
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(&path).with_ctx(ctx)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).with_ctx(ctx)?;
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            file.set_len(keep as u64).with_ctx(ctx)?;
        }
        file.seek(SeekFrom::End(0)).with_ctx(ctx)?;
        Ok(MetricsWriter { file, path })
    }

    /// Opens `path` for a run resumed after step `last_step`: lines with a larger `step`
    /// (logged after the checkpoint the run restarts from) are removed, atomically, so
    /// the steps are not logged twice. Lines without a `step` are kept.
    pub fn resume(path: impl AsRef<Path>, last_step: u64) -> Result<Self> {
        let path = path.as_ref();
        if path.exists() {
            let records = read_metrics(path)?;
            let kept: Vec<&Map<String, Value>> = records
                .iter()
                .filter(|r| r.get("step").and_then(Value::as_u64).is_none_or(|s| s <= last_step))
                .collect();
            if kept.len() != records.len() {
                let mut text = String::new();
                for r in kept {
                    text.push_str(&Value::Object(r.clone()).to_string());
                    text.push('\n');
                }
                write_atomic(path, text.as_bytes())?;
            }
        }
        MetricsWriter::open(path)
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` as one line and hands it to the OS at once.
    pub fn write(&mut self, record: &MetricsRecord) -> Result<()> {
        let obj = record.to_json().with_ctx(|| format!("writing {}", self.path.display()))?;
        self.write_json(&obj)
    }

    /// Appends an arbitrary JSON object as one line (for events such as validation runs).
    pub fn write_json(&mut self, obj: &Map<String, Value>) -> Result<()> {
        let mut line = Value::Object(obj.clone()).to_string();
        line.push('\n');
        // One write call per line: concurrent readers see whole lines or nothing new.
        self.file.write_all(line.as_bytes()).with_ctx(|| format!("writing metrics file {}", self.path.display()))?;
        self.file.flush().with_ctx(|| format!("flushing metrics file {}", self.path.display()))
    }
}

/// Reads every line of a metrics file as a JSON object; a line that is not a JSON object
/// is an error naming the file and line. Blank lines are skipped.
pub fn read_metrics(path: impl AsRef<Path>) -> Result<Vec<Map<String, Value>>> {
    let path = path.as_ref();
    let text = fs::read_to_string(path).with_ctx(|| format!("cannot read metrics file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => out.push(m),
            Ok(_) => bail!("{} line {}: not a JSON object", path.display(), i + 1),
            Err(e) => bail!("{} line {}: invalid JSON: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// The `(step, value)` pairs of field `key` over the records that have both as numbers,
/// e.g. `series(&records, "loss")` for [`crate::report::plot_loss`].
pub fn series(records: &[Map<String, Value>], key: &str) -> Vec<(f64, f64)> {
    records.iter().filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?))).collect()
}
