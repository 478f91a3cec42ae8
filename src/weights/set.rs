//! The tensors of one or more files: a single file, a sharded index, a directory, and
//! partial checkpoints layered on top.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::Value;

use super::file::{FileDType, TensorInfo, WeightFile};
use crate::{bail, DType, Device, Error, Result, ResultExt, Tensor};

/// Suffix of the index file that names the shards of a sharded checkpoint.
const INDEX_SUFFIX: &str = ".safetensors.index.json";

/// A name → tensor view over one or more weights files.
///
/// Opened from a `.safetensors` file or a PyTorch checkpoint (`.pt` and the like, see
/// [`WeightFile::open`]), a `*.safetensors.index.json` (whose `weight_map` names the shard
/// of every tensor, relative to the index), or a directory (its one index, else all its
/// `*.safetensors` files; `.pt` files in a directory are not picked up). [`WeightSet::overlay`]
/// layers more files on top.
#[derive(Debug)]
pub struct WeightSet {
    files: Vec<WeightFile>,
    /// Each tensor's file, an index into `files`; sorted by name.
    entries: BTreeMap<String, usize>,
    /// What was opened, for error messages ("the file(s) searched").
    sources: Vec<String>,
}

/// The tensors of one source (file, index or directory) before they join a set.
struct Source {
    files: Vec<WeightFile>,
    entries: Vec<(String, usize)>,
    description: String,
}

impl WeightSet {
    /// Opens a `.safetensors` file, a PyTorch checkpoint, a sharded
    /// `*.safetensors.index.json`, or a directory.
    pub fn open(path: impl AsRef<Path>) -> Result<WeightSet> {
        let mut set = WeightSet { files: Vec::new(), entries: BTreeMap::new(), sources: Vec::new() };
        set.overlay(path)?;
        Ok(set)
    }

    /// Layers the tensors of `path` (file, index or directory) over the current ones:
    /// tensors of the same name are replaced, new names are added. This is how a partial
    /// fine-tuned checkpoint is loaded on top of base weights.
    pub fn overlay(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let source = open_source(path.as_ref())?;
        let base = self.files.len();
        for (name, file) in source.entries {
            self.entries.insert(name, base + file);
        }
        self.files.extend(source.files);
        self.sources.push(source.description);
        Ok(())
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.lookup(name)?.1.shape)
    }

    /// The stored element type of `name`.
    pub fn dtype_of(&self, name: &str) -> Result<FileDType> {
        Ok(self.lookup(name)?.1.dtype)
    }

    /// The path of the file that provides `name` (after overlays).
    pub fn file_of(&self, name: &str) -> Result<&Path> {
        Ok(self.lookup(name)?.0.path())
    }

    /// The elements of `name` converted to host f32, whatever their stored float type.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.lookup(name)?.0.read_f32(name)
    }

    /// Loads `name` onto `device` as `dtype` (CPU tensors are always f32), converting
    /// BF16/F16/F32/F64 on the fly. The stored shape must equal `expected_shape`; the
    /// error otherwise names the file, the tensor and both shapes.
    pub fn get(&self, name: &str, expected_shape: &[usize], device: Device, dtype: DType) -> Result<Tensor> {
        let (file, info) = self.lookup(name)?;
        if info.shape != expected_shape {
            bail!(
                "weights file {}: tensor '{name}': expected shape {expected_shape:?}, found {:?}",
                file.path().display(),
                info.shape
            );
        }
        let data = file.read_f32(name)?;
        let dtype = if device == Device::Cpu { DType::F32 } else { dtype };
        Tensor::from_vec_dtype(data, expected_shape, device, dtype)
            .with_ctx(|| format!("loading tensor '{name}' from {} onto {device}", file.path().display()))
    }

    /// The file and header entry of `name`, or the missing-tensor error.
    pub(super) fn lookup(&self, name: &str) -> Result<(&WeightFile, &TensorInfo)> {
        match self.entries.get(name) {
            Some(&i) => {
                let file = &self.files[i];
                let info = file.info(name).ok_or_else(|| Error::msg(format!("internal: '{name}' left its file")))?;
                Ok((file, info))
            }
            None => {
                let mut msg = format!("tensor '{name}' not found in {}", self.sources_description());
                let close: Vec<String> = self.close_names(name).iter().map(|c| format!("'{c}'")).collect();
                if !close.is_empty() {
                    msg.push_str(&format!("; close names: {}", close.join(", ")));
                }
                Err(Error::msg(msg))
            }
        }
    }

    /// Up to three present names sharing a long prefix and/or suffix with `name` (a
    /// different prefix such as `model.`, or a renamed middle part, are the usual naming
    /// mismatches).
    pub(super) fn close_names(&self, name: &str) -> Vec<&str> {
        let len = name.chars().count();
        let needed = (len * 3 / 5).max(6);
        let mut scored: Vec<(usize, &str)> = self
            .names()
            .filter_map(|c| {
                let prefix = name.chars().zip(c.chars()).take_while(|(a, b)| a == b).count();
                let suffix = name.chars().rev().zip(c.chars().rev()).take_while(|(a, b)| a == b).count();
                let score = (prefix + suffix).min(len).min(c.chars().count());
                (score >= needed).then_some((score, c))
            })
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        scored.into_iter().take(3).map(|s| s.1).collect()
    }

    /// The opened sources, joined for messages.
    pub(super) fn sources_description(&self) -> String {
        self.sources.join(" + ")
    }
}

fn open_source(path: &Path) -> Result<Source> {
    if !path.exists() {
        bail!("weights {}: does not exist", path.display());
    }
    if path.is_dir() {
        return open_dir(path);
    }
    if path.to_string_lossy().ends_with(".json") {
        return open_index(path);
    }
    let file = WeightFile::open(path)?;
    let entries = file.names().map(|n| (n.to_string(), 0)).collect();
    Ok(Source { description: path.display().to_string(), files: vec![file], entries })
}

/// A directory: its index when it has exactly one, else every `*.safetensors` in it.
fn open_dir(dir: &Path) -> Result<Source> {
    let mut indexes = Vec::new();
    let mut shards = Vec::new();
    for entry in fs::read_dir(dir).with_ctx(|| format!("weights directory {}: cannot list", dir.display()))? {
        let path = entry.with_ctx(|| format!("weights directory {}: cannot list", dir.display()))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.ends_with(INDEX_SUFFIX) {
            indexes.push(path);
        } else if name.ends_with(".safetensors") && path.is_file() {
            shards.push(path);
        }
    }
    if indexes.len() == 1 {
        return open_index(&indexes[0]);
    }
    if shards.is_empty() {
        bail!("weights directory {}: holds no .safetensors files", dir.display());
    }
    shards.sort();
    let mut source = Source { files: Vec::new(), entries: Vec::new(), description: String::new() };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for path in &shards {
        let file = WeightFile::open(path)?;
        let i = source.files.len();
        for name in file.names() {
            if let Some(&j) = seen.get(name) {
                bail!(
                    "weights directory {}: tensor '{name}' is in both {} and {} (open one file, or overlay one on the other)",
                    dir.display(),
                    source.files[j].path().display(),
                    path.display()
                );
            }
            seen.insert(name.to_string(), i);
        }
        source.files.push(file);
    }
    source.entries = seen.into_iter().collect();
    source.description = describe_files(&dir.display().to_string(), &source.files);
    Ok(source)
}

/// A sharded checkpoint: `weight_map` maps each tensor to its shard file, relative to the
/// index. The map is authoritative: each named tensor must be in its shard, and tensors a
/// shard holds beyond the map are not part of the set.
fn open_index(index: &Path) -> Result<Source> {
    let ctx = || format!("weights index {}", index.display());
    let text = fs::read_to_string(index).with_ctx(ctx)?;
    let json: Value = serde_json::from_str(&text).with_ctx(|| format!("{}: not valid JSON", ctx()))?;
    let Some(map) = json.get("weight_map").and_then(Value::as_object) else {
        bail!("{}: has no 'weight_map' object", ctx());
    };
    let dir = index.parent().unwrap_or(Path::new(""));
    let mut shard_of: BTreeMap<&str, usize> = BTreeMap::new();
    let mut files: Vec<WeightFile> = Vec::new();
    let mut entries = Vec::with_capacity(map.len());
    for (name, shard) in map {
        let Some(shard) = shard.as_str() else {
            bail!("{}: weight_map entry '{name}' is not a file name", ctx());
        };
        let i = match shard_of.get(shard) {
            Some(&i) => i,
            None => {
                let file = WeightFile::open(dir.join(shard)).with_ctx(ctx)?;
                files.push(file);
                shard_of.insert(shard, files.len() - 1);
                files.len() - 1
            }
        };
        if files[i].info(name).is_none() {
            bail!("{}: maps tensor '{name}' to {}, which does not contain it", ctx(), files[i].path().display());
        }
        entries.push((name.clone(), i));
    }
    let description = describe_files(&index.display().to_string(), &files);
    Ok(Source { files, entries, description })
}

/// "<what> (a.safetensors, b.safetensors)": a directory or index with the files it read.
fn describe_files(what: &str, files: &[WeightFile]) -> String {
    let names: Vec<String> = files
        .iter()
        .map(|f| f.path().file_name().map_or_else(|| f.path().display().to_string(), |n| n.to_string_lossy().into()))
        .collect();
    format!("{what} ({})", names.join(", "))
}
