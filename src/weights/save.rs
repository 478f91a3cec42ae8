//! Writing safetensors files atomically.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use half::bf16;
use serde_json::{json, Map, Value};

use crate::fsutil::write_atomic_with;
use crate::{bail, Result, ResultExt, Storage, Tensor};

/// Elements converted per write, so a multi-GB tensor is streamed through a bounded buffer.
const CHUNK: usize = 1 << 20;

/// Element type of a saved file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDType {
    /// bfloat16, rounded to nearest even (what the Python reference reads and writes).
    BF16,
    /// Full f32.
    F32,
}

impl SaveDType {
    fn code(self) -> &'static str {
        match self {
            SaveDType::BF16 => "BF16",
            SaveDType::F32 => "F32",
        }
    }

    fn size(self) -> usize {
        match self {
            SaveDType::BF16 => 2,
            SaveDType::F32 => 4,
        }
    }
}

/// Writes `tensors` (from any device) to the safetensors file `path`, every tensor in
/// `dtype`, with optional `__metadata__` strings.
///
/// The write is atomic ([`write_atomic_with`]): the data go to a temporary file in the
/// same directory, which is flushed, fsynced and renamed over `path`. On any error the
/// temporary file is removed and an existing file at `path` is left untouched; readers
/// that mapped the old file keep seeing it. The parent directory must exist. Names must be unique and not `__metadata__`.
pub fn save(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    dtype: SaveDType,
    metadata: Option<&HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let ctx = || format!("saving weights to {}", path.display());
    let header = header_bytes(tensors, dtype, metadata).with_ctx(ctx)?;
    write_atomic_with(path, |out| write_data(out, &header, tensors, dtype)).with_ctx(ctx)
}

/// The length prefix and JSON header, padded with spaces to a multiple of 8 bytes so the
/// data start aligned.
fn header_bytes(
    tensors: &[(String, Tensor)],
    dtype: SaveDType,
    metadata: Option<&HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut header = Map::new();
    let mut names = HashSet::new();
    let mut offset = 0usize;
    for (name, t) in tensors {
        if name == "__metadata__" {
            bail!("a tensor may not be named '__metadata__' (the format reserves it)");
        }
        if !names.insert(name.as_str()) {
            bail!("tensor name '{name}' appears twice");
        }
        let end = offset + t.numel() * dtype.size();
        header
            .insert(name.clone(), json!({ "dtype": dtype.code(), "shape": t.shape(), "data_offsets": [offset, end] }));
        offset = end;
    }
    if let Some(meta) = metadata {
        let meta: Map<String, Value> = meta.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        header.insert("__metadata__".into(), Value::Object(meta));
    }
    let mut json = serde_json::to_vec(&Value::Object(header)).ctx("encoding the header")?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    Ok(bytes)
}

/// The header, then every tensor's data in order, converted to `dtype` through a bounded
/// buffer.
fn write_data(out: &mut impl Write, header: &[u8], tensors: &[(String, Tensor)], dtype: SaveDType) -> Result<()> {
    out.write_all(header).ctx("cannot write the header")?;
    let mut buf = Vec::with_capacity(CHUNK * dtype.size());
    for (name, t) in tensors {
        let storage = t.storage();
        // Host tensors are written straight from their storage; device ones are copied
        // to the host first.
        let downloaded;
        let values = match &*storage {
            Storage::Cpu(v) => v.as_slice(),
            Storage::Cuda(c) => {
                downloaded = c.dev.download(&c.buf, t.numel()).with_ctx(|| format!("reading tensor '{name}'"))?;
                downloaded.as_slice()
            }
        };
        for chunk in values.chunks(CHUNK) {
            buf.resize(chunk.len() * dtype.size(), 0);
            match dtype {
                SaveDType::BF16 => {
                    for (dst, &x) in buf.chunks_exact_mut(2).zip(chunk) {
                        dst.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
                    }
                }
                SaveDType::F32 => {
                    for (dst, &x) in buf.chunks_exact_mut(4).zip(chunk) {
                        dst.copy_from_slice(&x.to_le_bytes());
                    }
                }
            }
            out.write_all(&buf).with_ctx(|| format!("cannot write tensor '{name}'"))?;
        }
    }
    Ok(())
}
