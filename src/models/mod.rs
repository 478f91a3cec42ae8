//! The models, written once against `Tensor` and `ops`, with configs and named presets:
//! the Wan2.1 diffusion transformer with the Synthos image projector (`wan`), the umT5
//! text encoder (`t5`), the CLIP vision tower (`clip`) and the Wan VAE (`vae`).

pub mod clip;
pub mod t5;
pub mod vae;
pub mod wan;

use std::path::Path;

use serde_json::{Map, Value};

use crate::{Error, Result, ResultExt};

/// Reads a `config.json` and parses it with `parse`; every error names `what` and the file.
pub(crate) fn read_json_config<T>(path: &Path, what: &str, parse: impl FnOnce(&Value) -> Result<T>) -> Result<T> {
    let ctx = || format!("{what} {}", path.display());
    let text = std::fs::read_to_string(path).with_ctx(ctx)?;
    let json: Value = serde_json::from_str(&text).with_ctx(|| format!("{}: not valid JSON", ctx()))?;
    parse(&json).with_ctx(ctx)
}

/// A non-negative integer field of a config object; the error names the key.
pub(crate) fn json_usize(obj: &Map<String, Value>, key: &str) -> Result<usize> {
    obj.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| Error::msg(format!("missing or non-integer \"{key}\"")))
}
