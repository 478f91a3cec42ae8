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

/// The largest value a size field of a config file may take (the widest size of the
/// models here, umT5's vocabulary, is 256,384): far above any real model, and low enough
/// that a product of three sizes cannot overflow.
pub const MAX_CONFIG_SIZE: usize = 1 << 20;

/// A size field's value: a non-negative integer up to [`MAX_CONFIG_SIZE`]; errors name
/// the key.
pub(crate) fn config_size(v: &Value, key: &str) -> Result<usize> {
    match v.as_u64() {
        Some(n) if n as usize <= MAX_CONFIG_SIZE => Ok(n as usize),
        Some(n) => Err(Error::msg(format!("\"{key}\" = {n} is above {MAX_CONFIG_SIZE}, not a size of these models"))),
        None => Err(Error::msg(format!("\"{key}\" must be a non-negative integer, got {v}"))),
    }
}

/// A size field of a config object ([`config_size`]); the error names the key.
pub(crate) fn json_usize(obj: &Map<String, Value>, key: &str) -> Result<usize> {
    match obj.get(key) {
        Some(v) => config_size(v, key),
        None => Err(Error::msg(format!("missing \"{key}\""))),
    }
}
