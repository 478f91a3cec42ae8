//! One memory-mapped weights file — safetensors, or a PyTorch `.pt` checkpoint read by
//! [`torch_pt`](super::torch_pt) — its tensor table validated at open.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::ErrorKind;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::Value;

use super::torch_pt;
use crate::{Error, Result};

/// Headers larger than this are rejected as corrupt (the reference implementation uses
/// the same bound); it keeps a random file from making us parse gigabytes as JSON.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The element type of a tensor as stored in a file (the format's dtype codes).
///
/// Every code of the format is recognised so that the offsets of any tensor can be
/// checked; only [`FileDType::is_float`] types can be loaded as tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileDType {
    /// Booleans, one byte each.
    Bool,
    /// Unsigned 8-bit integers.
    U8,
    /// Signed 8-bit integers.
    I8,
    /// Signed 16-bit integers.
    I16,
    /// Unsigned 16-bit integers.
    U16,
    /// Signed 32-bit integers.
    I32,
    /// Unsigned 32-bit integers.
    U32,
    /// Signed 64-bit integers.
    I64,
    /// Unsigned 64-bit integers.
    U64,
    /// MX FP4 (E2M1), two per byte.
    F4,
    /// MX FP6 E2M3.
    F6E2M3,
    /// MX FP6 E3M2.
    F6E3M2,
    /// FP8 E5M2.
    F8E5M2,
    /// FP8 E4M3.
    F8E4M3,
    /// FP8 E8M0 (MX scale).
    F8E8M0,
    /// FP8 E4M3, finite, no negative zero.
    F8E4M3Fnuz,
    /// FP8 E5M2, finite, no negative zero.
    F8E5M2Fnuz,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// Complex of two f32.
    C64,
}

/// Each dtype with its header code and its size in bits.
const CODES: [(FileDType, &str, usize); 22] = [
    (FileDType::Bool, "BOOL", 8),
    (FileDType::U8, "U8", 8),
    (FileDType::I8, "I8", 8),
    (FileDType::I16, "I16", 16),
    (FileDType::U16, "U16", 16),
    (FileDType::I32, "I32", 32),
    (FileDType::U32, "U32", 32),
    (FileDType::I64, "I64", 64),
    (FileDType::U64, "U64", 64),
    (FileDType::F4, "F4", 4),
    (FileDType::F6E2M3, "F6_E2M3", 6),
    (FileDType::F6E3M2, "F6_E3M2", 6),
    (FileDType::F8E5M2, "F8_E5M2", 8),
    (FileDType::F8E4M3, "F8_E4M3", 8),
    (FileDType::F8E8M0, "F8_E8M0", 8),
    (FileDType::F8E4M3Fnuz, "F8_E4M3FNUZ", 8),
    (FileDType::F8E5M2Fnuz, "F8_E5M2FNUZ", 8),
    (FileDType::F16, "F16", 16),
    (FileDType::BF16, "BF16", 16),
    (FileDType::F32, "F32", 32),
    (FileDType::F64, "F64", 64),
    (FileDType::C64, "C64", 64),
];

impl FileDType {
    /// The dtype with this header code (`"BF16"`, `"F32"`, ...), if the format defines it.
    pub fn from_code(code: &str) -> Option<FileDType> {
        CODES.iter().find(|c| c.1 == code).map(|c| c.0)
    }

    /// The header code.
    pub fn code(self) -> &'static str {
        CODES.iter().find(|c| c.0 == self).map_or("?", |c| c.1)
    }

    /// Size of one element in bits (sub-byte types are packed).
    pub fn bits(self) -> usize {
        CODES.iter().find(|c| c.0 == self).map_or(0, |c| c.2)
    }

    /// True for the types [`WeightFile::read_f32`] converts: BF16, F16, F32, F64.
    pub fn is_float(self) -> bool {
        matches!(self, FileDType::BF16 | FileDType::F16 | FileDType::F32 | FileDType::F64)
    }
}

impl fmt::Display for FileDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Header entry of one tensor.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Stored element type.
    pub dtype: FileDType,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Where the row-major little-endian bytes are.
    pub(super) data: Location,
}

/// Where a tensor's bytes are, already checked against the file size.
#[derive(Clone, Debug)]
pub(super) enum Location {
    /// A range of the mapped file.
    Mapped(Range<usize>),
    /// A range of the file's gathered copies (non-contiguous views of a `.pt` file).
    Copied(Range<usize>),
}

/// One weights file, memory-mapped, with its tensor table parsed and every tensor's
/// byte range checked against the file size: a `.safetensors` file, or a PyTorch
/// checkpoint written by `torch.save` (a ZIP archive; chosen by that signature or a
/// `.pt`/`.pth`/`.ckpt`/`.bin` name — see [`crate::weights`] for what is read from it).
pub struct WeightFile {
    path: PathBuf,
    map: Mmap,
    /// Row-major copies of a `.pt` file's non-contiguous tensors (empty otherwise).
    copied: Vec<u8>,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WeightFile({}, {} tensors)", self.path.display(), self.tensors.len())
    }
}

/// An error about `path`: "weights file {path}: {msg}".
fn file_error(path: &Path, msg: impl fmt::Display) -> Error {
    Error::msg(format!("weights file {}: {msg}", path.display()))
}

impl WeightFile {
    /// Maps `path` and validates its header: errors say whether the file does not exist,
    /// is not a safetensors file (bad header length, invalid JSON, malformed entries), is
    /// truncated (a tensor's data lies past the end), or uses a dtype the format does not
    /// define (naming the tensor). A PyTorch checkpoint is read instead when the file is a
    /// ZIP archive or a legacy torch file, or is named `*.pt`, `*.pth`, `*.ckpt` or
    /// `*.bin` (never when named `*.safetensors`); its errors name the entry, tensor or
    /// state-dict key at fault.
    pub fn open(path: impl AsRef<Path>) -> Result<WeightFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => file_error(path, "does not exist"),
            _ => file_error(path, format_args!("cannot open: {e}")),
        })?;
        let meta = file.metadata().map_err(|e| file_error(path, format_args!("cannot stat: {e}")))?;
        if meta.is_dir() {
            return Err(file_error(path, "is a directory, not a weights file"));
        }
        let len = meta.len();
        if len < 8 && torch_pt::is_torch_file(path, &[]) {
            return Err(file_error(
                path,
                format_args!("not a PyTorch checkpoint: {len} bytes, too short for a ZIP archive"),
            ));
        }
        if len < 8 {
            return Err(file_error(
                path,
                format_args!("not a safetensors file: {len} bytes, too short to hold the 8-byte header length"),
            ));
        }
        // SAFETY: the map is read-only and lives as long as `self`. Another process that
        // truncates or rewrites the file while it is mapped could change the bytes under
        // us; checkpoints are replaced by rename (see `save`), which leaves this mapping
        // on the old inode, so that does not happen through this crate.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| file_error(path, format_args!("cannot map: {e}")))?;
        if torch_pt::is_torch_file(path, &map) {
            match torch_pt::read(&map) {
                Ok(torch_pt::Parsed { tensors, metadata, copied }) => {
                    return Ok(WeightFile { path: path.to_path_buf(), map, copied, tensors, metadata })
                }
                // Chosen by its name alone: a safetensors file called `*.pt` still opens.
                Err(msg) if !torch_pt::has_signature(&map) => {
                    let (tensors, metadata) = parse_header(&map).map_err(|_| file_error(path, msg))?;
                    return Ok(WeightFile { path: path.to_path_buf(), map, copied: Vec::new(), tensors, metadata });
                }
                Err(msg) => return Err(file_error(path, msg)),
            }
        }
        let (tensors, metadata) = parse_header(&map).map_err(|msg| file_error(path, msg))?;
        Ok(WeightFile { path: path.to_path_buf(), map, copied: Vec::new(), tensors, metadata })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The header entry of `name`, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The `__metadata__` strings of a safetensors header, or the scalar entries of a
    /// checkpoint dict around a `.pt` state dict (`epoch`, `best_acc1`); empty when absent.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The raw little-endian bytes of `name` in row-major order, if present.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensors.get(name).map(|t| self.data(t))
    }

    fn data(&self, info: &TensorInfo) -> &[u8] {
        match &info.data {
            Location::Mapped(range) => &self.map[range.clone()],
            Location::Copied(range) => &self.copied[range.clone()],
        }
    }

    /// The elements of `name` converted to f32 (from BF16, F16, F32 or F64); errors name
    /// the file and the tensor when it is absent or of another dtype.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info =
            self.tensors.get(name).ok_or_else(|| file_error(&self.path, format_args!("has no tensor '{name}'")))?;
        let bytes = self.data(info);
        Ok(match info.dtype {
            FileDType::BF16 => convert(bytes, |b: [u8; 2]| bf16::from_le_bytes(b).to_f32()),
            FileDType::F16 => convert(bytes, |b: [u8; 2]| f16::from_le_bytes(b).to_f32()),
            FileDType::F32 => convert(bytes, f32::from_le_bytes),
            FileDType::F64 => convert(bytes, |b: [u8; 8]| f64::from_le_bytes(b) as f32),
            other => {
                return Err(file_error(
                    &self.path,
                    format_args!(
                        "tensor '{name}' has unsupported dtype {other} (only BF16, F16, F32 and F64 load as floats)"
                    ),
                ))
            }
        })
    }
}

/// The values of little-endian elements of `N` bytes, each converted by `f`, in chunks on
/// the thread pool (a mapped file's pages are then also read in parallel).
fn convert<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32 + Sync + Send) -> Vec<f32> {
    use std::mem::MaybeUninit;
    // SAFETY: each chunk's elements are all written, element i from bytes [N·i, N·i + N),
    // which lie inside `bytes` for every i below its length / N.
    unsafe {
        crate::cpu::par::fill_new(bytes.len() / N, |i0, o| {
            for (i, o) in (i0..).zip(o.iter_mut()) {
                *o = MaybeUninit::new(f(std::array::from_fn(|j| bytes[N * i + j])));
            }
        })
    }
}

type Header = (BTreeMap<String, TensorInfo>, HashMap<String, String>);

/// Parses and checks the header of a whole mapped file; the error text follows
/// "weights file {path}: ".
fn parse_header(file: &[u8]) -> std::result::Result<Header, String> {
    let after_len = (file.len() - 8) as u64;
    let n = u64::from_le_bytes(file[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return Err(format!("not a safetensors file: header length {n} bytes is over the 100 MiB limit"));
    }
    if n > after_len {
        return Err(format!(
            "not a safetensors file (or truncated in its header): header length {n} bytes, but only {after_len} bytes follow"
        ));
    }
    let data_start = 8 + n as usize;
    let data_len = file.len() - data_start;
    let json: Value = serde_json::from_slice(&file[8..data_start])
        .map_err(|e| format!("not a safetensors file: the header is not valid JSON ({e})"))?;
    let Value::Object(entries) = json else {
        return Err("not a safetensors file: the header is not a JSON object".into());
    };
    let mut tensors = BTreeMap::new();
    let mut metadata = HashMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            metadata = parse_metadata(&entry)?;
            continue;
        }
        let info = parse_entry(&name, &entry, data_start, data_len)?;
        tensors.insert(name, info);
    }
    Ok((tensors, metadata))
}

fn parse_metadata(entry: &Value) -> std::result::Result<HashMap<String, String>, String> {
    let bad = || "not a safetensors file: '__metadata__' is not an object of strings".to_string();
    let Value::Object(map) = entry else {
        return Err(bad());
    };
    map.iter().map(|(k, v)| Ok((k.clone(), v.as_str().ok_or_else(bad)?.to_string()))).collect()
}

fn parse_entry(
    name: &str,
    entry: &Value,
    data_start: usize,
    data_len: usize,
) -> std::result::Result<TensorInfo, String> {
    let malformed = |what: &str| format!("not a safetensors file: tensor '{name}' has {what}");
    let code = entry.get("dtype").and_then(Value::as_str).ok_or_else(|| malformed("no string 'dtype'"))?;
    let dtype = FileDType::from_code(code).ok_or_else(|| format!("tensor '{name}' has unsupported dtype '{code}'"))?;
    let shape = entry
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|dims| {
            dims.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| malformed("no 'shape' list of non-negative integers"))?;
    let offsets = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|o| o.len() == 2)
        .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
        .ok_or_else(|| malformed("no 'data_offsets' pair of non-negative integers"))?;
    let bits = shape
        .iter()
        .try_fold(dtype.bits() as u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| malformed(&format!("shape {shape:?}, too large to address")))?;
    if bits % 8 != 0 {
        return Err(malformed(&format!("shape {shape:?} of {dtype} ({bits} bits), not a whole number of bytes")));
    }
    let (begin, end) = offsets;
    if end < begin || end - begin != bits / 8 {
        return Err(malformed(&format!(
            "data_offsets [{begin}, {end}] ({} bytes) but shape {shape:?} of {dtype} needs {} bytes",
            end as i128 - begin as i128,
            bits / 8
        )));
    }
    if end > data_len as u64 {
        return Err(format!(
            "truncated: tensor '{name}' needs data bytes up to {end}, but the file holds only {data_len} bytes of data"
        ));
    }
    let bytes = data_start + begin as usize..data_start + end as usize;
    Ok(TensorInfo { dtype, shape, data: Location::Mapped(bytes) })
}
