//! Loading a whole model: request every tensor, then report all problems at once.

use std::collections::HashSet;

use super::set::WeightSet;
use crate::{DType, Device, Error, Result, Tensor};

/// How many entries of each kind [`Loader::finish`] lists before summarising the rest (a
/// checkpoint in the wrong naming scheme misses every tensor).
const MAX_LISTED: usize = 20;

/// How many elements of zero stand-ins (for missing and mis-shaped tensors) a loader makes
/// before it stops construction and reports what it found so far: 1 GiB of f32. A config
/// that does not match its checkpoint would otherwise allocate the config's whole model
/// in zeros (or fail to, for absurd sizes) before the report.
const STAND_IN_LIMIT: usize = 1 << 28;

/// Loads a model's tensors from a [`WeightSet`] and collects what went wrong, so that a
/// model reports every missing, mis-shaped and unexpected tensor in one error.
///
/// A tensor that is missing, mis-shaped, of a non-float dtype or holding NaN/inf values
/// (counted as unloadable) is recorded and replaced by zeros of the expected shape so
/// that model construction can go on; the tensors a
/// loader returns are only meaningful once [`Loader::finish`] has returned `Ok`.
pub struct Loader<'a> {
    set: &'a WeightSet,
    device: Device,
    dtype: DType,
    /// Names requested, or declared ignorable with `ignore_where`.
    accounted: HashSet<String>,
    /// Requested names absent from the checkpoint, with their expected shapes.
    missing: Vec<(String, Vec<usize>)>,
    /// One line per mis-shaped or non-float tensor.
    mismatched: Vec<String>,
    /// Elements of the zero stand-ins returned so far.
    stand_ins: usize,
    /// Whether a request stopped loading (its error was the report).
    stopped: bool,
}

impl<'a> Loader<'a> {
    /// A loader placing tensors on `device` as `dtype` (CPU tensors are always f32).
    pub fn new(set: &'a WeightSet, device: Device, dtype: DType) -> Loader<'a> {
        Loader {
            set,
            device,
            dtype,
            accounted: HashSet::new(),
            missing: Vec::new(),
            mismatched: Vec::new(),
            stand_ins: 0,
            stopped: false,
        }
    }

    /// The weights being loaded.
    pub fn set(&self) -> &'a WeightSet {
        self.set
    }

    /// The target device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Loads `name`, which must have `shape`, in the loader's dtype. A missing or
    /// mis-shaped tensor is recorded for [`Loader::finish`] and zeros are returned; only
    /// failures unrelated to the checkpoint's contents (e.g. device memory) are errors
    /// here, and the report of [`Loader::finish`] when the zeros so far would pass 1 GiB
    /// (then the tensors not yet requested are not in it).
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// [`Loader::get`] with an explicit dtype (e.g. f32 for a parameter kept in full
    /// precision on the GPU).
    pub fn get_as(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.accounted.insert(name.to_string());
        let problem = match self.set.lookup(name) {
            Err(_) => {
                self.missing.push((name.to_string(), shape.to_vec()));
                true
            }
            Ok((file, info)) if info.shape != shape => {
                self.mismatched.push(format!(
                    "mis-shaped '{name}' in {}: expected {shape:?}, found {:?}",
                    file.path().display(),
                    info.shape
                ));
                true
            }
            Ok((file, info)) if !info.dtype.is_float() => {
                self.mismatched.push(format!(
                    "unloadable '{name}' in {}: dtype {} is not BF16, F16, F32 or F64",
                    file.path().display(),
                    info.dtype
                ));
                true
            }
            Ok(_) => false,
        };
        let dtype = if self.device == Device::Cpu { DType::F32 } else { dtype };
        if problem {
            let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            match n.and_then(|n| n.checked_add(self.stand_ins)) {
                Some(t) if t <= STAND_IN_LIMIT => self.stand_ins = t,
                _ => {
                    self.stopped = true;
                    return Err(self.report(Some(name)));
                }
            }
            return Tensor::zeros(shape, dtype, self.device);
        }
        let data = self.set.read_f32(name)?;
        // A diverged run can save NaN/inf weights; a model built from them would only
        // show it later, as a black or NaN sample.
        if let Some(first) = data.iter().position(|v| !v.is_finite()) {
            let count = data.iter().filter(|v| !v.is_finite()).count();
            let file = self.set.lookup(name).map(|(f, _)| f.path().display().to_string()).unwrap_or_default();
            self.mismatched.push(format!(
                "non-finite '{name}' in {file}: {count} NaN/inf value(s), the first at element {first} (a diverged run?)"
            ));
            return Tensor::zeros(shape, dtype, self.device);
        }
        Tensor::from_vec_dtype(data, shape, self.device, dtype)
    }

    /// Loads `name` when the checkpoint has it (checked like [`Loader::get`]); `None`
    /// when it does not, which is not a problem (e.g. an optional bias).
    pub fn get_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if !self.set.contains(name) {
            return Ok(None);
        }
        self.get(name, shape).map(Some)
    }

    /// Declares every tensor whose name satisfies `pred` as expected but unused (e.g. the
    /// text tower when loading only CLIP's vision tower), so it is not reported as
    /// unexpected.
    pub fn ignore_where(&mut self, pred: impl Fn(&str) -> bool) {
        for name in self.set.names() {
            if pred(name) {
                self.accounted.insert(name.to_string());
            }
        }
    }

    /// Tensors of the checkpoint that were neither requested nor ignored, sorted.
    pub fn unused(&self) -> Vec<&'a str> {
        self.set.names().filter(|n| !self.accounted.contains(*n)).collect()
    }

    /// `Ok` when every requested tensor was present with its expected shape and every
    /// tensor of the checkpoint was requested or ignored; otherwise one error listing all
    /// missing (with close names), mis-shaped and unexpected tensors. `Ok` too after a
    /// request that stopped loading ([`Loader::get`]): its error was the report.
    pub fn finish(self) -> Result<()> {
        if self.stopped || self.missing.is_empty() && self.mismatched.is_empty() && self.unused().is_empty() {
            return Ok(());
        }
        Err(self.report(None))
    }

    /// The error listing every problem found; `stopped_at` names the tensor at which
    /// construction stopped early (then tensors not yet requested are not called
    /// unexpected).
    fn report(&self, stopped_at: Option<&str>) -> Error {
        let unused = if stopped_at.is_some() { Vec::new() } else { self.unused() };
        let counts: Vec<String> = [
            (self.missing.len(), "missing"),
            (self.mismatched.len(), "mis-shaped or unloadable"),
            (unused.len(), "unexpected"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, kind)| format!("{n} {kind}"))
        .collect();
        let mut msg = format!("loading weights from {}: {} tensors", self.set.sources_description(), counts.join(", "));
        let missing = self.missing.iter().take(MAX_LISTED).map(|(name, shape)| {
            let close: Vec<String> = self.set.close_names(name).iter().map(|c| format!("'{c}'")).collect();
            let hint = if close.is_empty() { String::new() } else { format!("; close names: {}", close.join(", ")) };
            format!("missing '{name}' (expected shape {shape:?}){hint}")
        });
        list(&mut msg, missing, self.missing.len(), "missing");
        list(&mut msg, self.mismatched.iter().take(MAX_LISTED).cloned(), self.mismatched.len(), "mis-shaped");
        let unexpected = unused.iter().take(MAX_LISTED).map(|name| {
            let shape = self.set.shape(name).map(|s| format!("{s:?}")).unwrap_or_default();
            format!("unexpected '{name}' {shape}")
        });
        list(&mut msg, unexpected, unused.len(), "unexpected");
        if let Some(name) = stopped_at {
            msg.push_str(&format!(
                "\n  loading stopped at '{name}': zeros standing in for the tensors above would pass {} GiB (does \
                 the model's config match the checkpoint?)",
                (STAND_IN_LIMIT * 4) >> 30
            ));
        }
        Error::msg(msg)
    }
}

/// Appends one line per item, then "... and N more <kind>" past `MAX_LISTED`.
fn list(msg: &mut String, lines: impl Iterator<Item = String>, total: usize, kind: &str) {
    for line in lines {
        msg.push_str("\n  ");
        msg.push_str(&line);
    }
    if total > MAX_LISTED {
        msg.push_str(&format!("\n  ... and {} more {kind}", total - MAX_LISTED));
    }
}
