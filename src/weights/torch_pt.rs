//! PyTorch `.pt` checkpoints (`torch.save`, PyTorch ≥ 1.6), read without Python.
//!
//! Such a file is a ZIP archive whose entries are stored uncompressed: `<dir>/data.pkl`,
//! a pickle of the saved object, and `<dir>/data/<key>`, the raw bytes of each storage
//! (`<dir>` is the file's stem when saved to a path, `archive` when saved to a buffer;
//! `<dir>/byteorder` says `little` or `big` when present). In the pickle a tensor is
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` (`_v3` with an
//! explicit dtype for float8 and unsigned types) where the storage is a persistent id
//! `('storage', torch.FloatStorage, key, location, numel)`.
//!
//! [`read`] turns such a file into the same tensor table a safetensors header gives, so
//! [`WeightFile`](super::WeightFile) (and through it `WeightSet`, `Loader` and every
//! model) opens `.pt` files like safetensors files:
//!
//! - **Which dict.** The saved object must be a dict. It is the state dict itself when all
//!   its values are tensors; otherwise the first of its `state_dict`, `model`, `module`
//!   entries that exists is (SLIP/SynthCLIP save `{epoch, state_dict, optimizer, scaler,
//!   best_acc1, args}`); failing that, a dict holding some tensors is taken as the state
//!   dict. Every value of the chosen dict must be a tensor: anything else is refused with
//!   its key named. Other entries (optimizer state, an `argparse.Namespace`, numpy
//!   scalars) are parsed as opaque values and ignored; nothing in the file is executed.
//! - **Names.** When every name starts with `module.` (a model saved under
//!   DistributedDataParallel), that prefix is removed.
//! - **Metadata.** With a wrapping dict, its int, float, bool and string entries (`epoch`,
//!   `best_acc1`) become the file's metadata strings.
//! - **Dtypes.** Each tensor keeps its stored type (f32, f16, bf16, f64, the integer and
//!   bool types, float8); as for safetensors, only the float types load as weights, and
//!   integer buffers (e.g. `position_ids`) are listed with their dtype. Complex128 and
//!   quantized tensors are refused by name.
//! - **Views.** Tensors are views into storages: offsets and several tensors sharing one
//!   storage are resolved to byte ranges of the mapped file. A non-contiguous view (a
//!   transpose, a column slice, a broadcast) is gathered into a row-major copy at open;
//!   all copies together may not exceed the file's size.
//! - **Refused:** the legacy pre-1.6 format (re-save it), big-endian files, compressed or
//!   encrypted archive entries, storages missing from the archive or shorter than a view
//!   needs.

mod pickle;
mod zip;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;

use pickle::{Elem, Pickle, TensorView, Value};

use super::file::{Location, TensorInfo};

/// The dict entries tried, in order, when the saved dict is not itself a state dict.
const STATE_DICT_KEYS: [&str; 3] = ["state_dict", "model", "module"];
/// The prefix DistributedDataParallel adds to every parameter name.
const DDP_PREFIX: &str = "module.";
/// File extensions read as PyTorch checkpoints whatever their first bytes.
const TORCH_EXTENSIONS: [&str; 4] = ["pt", "pth", "ckpt", "bin"];

/// The start of a legacy (non-ZIP) `torch.save` file: a protocol-2 pickle of the magic
/// number 0x1950a86a20f9469cfc6c as LONG1.
const LEGACY_MAGIC: [u8; 14] = [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// A checkpoint's tensors, in the form [`WeightFile`](super::WeightFile) keeps.
pub(super) struct Parsed {
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: HashMap<String, String>,
    /// Row-major copies of the non-contiguous views ([`Location::Copied`] ranges).
    pub copied: Vec<u8>,
}

/// True when `path` should be read as a PyTorch checkpoint: a ZIP or legacy torch file,
/// or a `.pt`/`.pth`/`.ckpt`/`.bin` name; never a `.safetensors` name.
pub(super) fn is_torch_file(path: &Path, file: &[u8]) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "safetensors" {
        return false;
    }
    has_signature(file) || TORCH_EXTENSIONS.contains(&ext.as_str())
}

/// True when `file` starts like a `torch.save` file (a ZIP archive or the legacy format).
pub(super) fn has_signature(file: &[u8]) -> bool {
    zip::is_zip(file) || file.starts_with(&LEGACY_MAGIC)
}

/// Reads the checkpoint in the mapped `file`. The error text follows "weights file {path}: ".
pub(super) fn read(file: &[u8]) -> Result<Parsed, String> {
    if file.starts_with(&LEGACY_MAGIC) {
        return Err("a legacy (pre-1.6, non-ZIP) torch.save file, which is not supported: load it in PyTorch \
                    and save it again with torch.save (PyTorch 1.6 and later write the ZIP format), or \
                    convert it to safetensors"
            .into());
    }
    if !zip::is_zip(file) {
        return Err("not a PyTorch checkpoint: no ZIP signature at the start (torch.save writes a ZIP archive)".into());
    }
    let entries = zip::entries(file)?;
    let dir = archive_dir(&entries)?;
    if let Some(order) = entries.get(&format!("{dir}/byteorder")) {
        let order = String::from_utf8_lossy(&file[order.clone()]);
        if order.trim() != "little" {
            return Err(format!(
                "written on a '{}' byte-order machine; only little-endian checkpoints are supported",
                order.trim()
            ));
        }
    }
    let pkl = entries.get(&format!("{dir}/data.pkl")).ok_or("the archive lost its data.pkl")?;
    let pickle = pickle::load(&file[pkl.clone()]).map_err(|e| format!("{dir}/data.pkl: bad pickle: {e}"))?;
    let chosen = choose_state_dict(&pickle)?;
    let metadata = match chosen.wrapper {
        Some(_) => scalar_entries(&pickle),
        None => HashMap::new(),
    };
    let mut tensors = Vec::with_capacity(chosen.items.len());
    let mut copied = Vec::new();
    for &(key, value) in chosen.items {
        let Value::Str(name) = pickle.get(key) else {
            return Err(format!("{} has a key that is {}, not a string", chosen.describe(), pickle.get(key).kind()));
        };
        let Value::Tensor(view) = pickle.get(value) else {
            return Err(format!(
                "{}: entry '{name}' is {}, not a tensor (only plain tensors can be loaded)",
                chosen.describe(),
                pickle.get(value).kind()
            ));
        };
        let storage = entries.get(&format!("{dir}/data/{}", view.storage.key));
        let info = locate(file, storage, view, &mut copied).map_err(|e| format!("tensor '{name}': {e}"))?;
        tensors.push((name.clone(), info));
    }
    let strip = !tensors.is_empty() && tensors.iter().all(|(n, _)| n.starts_with(DDP_PREFIX));
    let tensors = tensors
        .into_iter()
        .map(|(name, info)| (if strip { name[DDP_PREFIX.len()..].to_string() } else { name }, info))
        .collect();
    Ok(Parsed { tensors, metadata, copied })
}

/// The folder holding `data.pkl`: the one entry named `<dir>/data.pkl`.
fn archive_dir(entries: &BTreeMap<String, Range<usize>>) -> Result<String, String> {
    let dirs: Vec<&str> = entries
        .keys()
        .filter_map(|n| n.strip_suffix("/data.pkl"))
        .filter(|d| !d.is_empty() && !d.contains('/'))
        .collect();
    match dirs.as_slice() {
        [dir] => Ok(dir.to_string()),
        [] => Err("not a PyTorch checkpoint: the ZIP archive has no <folder>/data.pkl".into()),
        _ => Err(format!("the ZIP archive holds several checkpoints ({})", dirs.join(", "))),
    }
}

/// The dict chosen as the state dict, and the entry of the saved dict it came from.
struct Chosen<'p> {
    items: &'p [(pickle::Id, pickle::Id)],
    wrapper: Option<&'static str>,
}

impl Chosen<'_> {
    fn describe(&self) -> String {
        match self.wrapper {
            Some(key) => format!("the state dict (entry '{key}')"),
            None => "the state dict".into(),
        }
    }
}

/// Applies the rule of the module documentation.
fn choose_state_dict(pickle: &Pickle) -> Result<Chosen<'_>, String> {
    let root = pickle.root();
    let Value::Dict(items) = root else {
        let hint = match root {
            Value::Object(_) => " (a whole pickled model, from torch.save(model)? save model.state_dict() instead)",
            _ => "",
        };
        return Err(format!("the checkpoint holds {} at the top level, not a dict of tensors{hint}", root.kind()));
    };
    let is_tensor = |id| matches!(pickle.get(id), Value::Tensor(_));
    if items.iter().all(|&(_, v)| is_tensor(v)) {
        return Ok(Chosen { items, wrapper: None });
    }
    for key in STATE_DICT_KEYS {
        let found = items.iter().rev().find(|&&(k, _)| matches!(pickle.get(k), Value::Str(s) if s == key));
        if let Some(&(_, value)) = found {
            return match pickle.get(value) {
                Value::Dict(inner) => Ok(Chosen { items: inner, wrapper: Some(key) }),
                other => Err(format!("entry '{key}' of the checkpoint is {}, not a state dict", other.kind())),
            };
        }
    }
    if items.iter().any(|&(_, v)| is_tensor(v)) {
        return Ok(Chosen { items, wrapper: None });
    }
    let keys: Vec<String> = items
        .iter()
        .take(12)
        .map(|&(k, _)| match pickle.get(k) {
            Value::Str(s) => format!("'{s}'"),
            other => other.kind(),
        })
        .collect();
    Err(format!(
        "no state dict: the saved dict holds no tensors and no '{}' entry (its keys: {})",
        STATE_DICT_KEYS.join("', '"),
        keys.join(", ")
    ))
}

/// The int, float, bool and string entries of the saved dict, as strings.
fn scalar_entries(pickle: &Pickle) -> HashMap<String, String> {
    let Value::Dict(items) = pickle.root() else {
        return HashMap::new();
    };
    items
        .iter()
        .filter_map(|&(k, v)| {
            let Value::Str(key) = pickle.get(k) else { return None };
            let text = match pickle.get(v) {
                Value::Int(i) => i.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Str(s) => s.clone(),
                _ => return None,
            };
            Some((key.clone(), text))
        })
        .collect()
}

/// Where the elements of `view` are: a range of `file` when the view is contiguous, else
/// a row-major copy appended to `copied`.
fn locate(
    file: &[u8],
    storage: Option<&Range<usize>>,
    view: &TensorView,
    copied: &mut Vec<u8>,
) -> Result<TensorInfo, String> {
    let dtype = match &view.elem {
        Elem::Known(d) if d.bits() % 8 == 0 => *d,
        Elem::Known(d) => return Err(format!("dtype {d} is not a whole number of bytes")),
        Elem::Unsupported(name) => return Err(format!("type {name} is not supported")),
    };
    let Some(storage) = storage else {
        return Err(format!("its storage 'data/{}' is missing from the archive", view.storage.key));
    };
    let declared =
        view.storage.nbytes.ok_or_else(|| format!("storage type {:?} is not supported", view.storage.elem))?;
    if declared > storage.len() as u64 {
        return Err(format!(
            "truncated: storage 'data/{}' holds {} bytes but declares {declared}",
            view.storage.key,
            storage.len()
        ));
    }
    let elem = (dtype.bits() / 8) as u64;
    let too_large = || format!("size {:?} is too large", view.size);
    let numel = view.size.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or_else(too_large)?;
    let shape = view.size.iter().map(|&d| usize::try_from(d).map_err(|_| too_large())).collect::<Result<_, _>>()?;
    if numel == 0 {
        return Ok(TensorInfo { dtype, shape, data: Location::Mapped(storage.start..storage.start) });
    }
    // Last element's index: offset + Σ (size_i − 1)·stride_i.
    let last = view
        .size
        .iter()
        .zip(&view.stride)
        .try_fold(view.offset, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|x| x.checked_add(acc)))
        .ok_or_else(too_large)?;
    let end = last.checked_add(1).and_then(|n| n.checked_mul(elem)).ok_or_else(too_large)?;
    if end > declared {
        return Err(format!(
            "the view (offset {}, size {:?}, stride {:?}) reaches byte {end} of a {declared}-byte storage",
            view.offset, view.size, view.stride
        ));
    }
    // Both fit in the storage, hence in usize.
    let (elem, offset) = (elem as usize, view.offset as usize);
    let nbytes = numel.checked_mul(elem as u64).ok_or_else(too_large)?;
    if is_contiguous(&view.size, &view.stride) {
        let start = storage.start + offset * elem;
        return Ok(TensorInfo { dtype, shape, data: Location::Mapped(start..start + nbytes as usize) });
    }
    if (copied.len() as u64).saturating_add(nbytes) > file.len() as u64 {
        return Err(format!(
            "gathering the non-contiguous view (size {:?}, stride {:?}) would copy more than the file's size",
            view.size, view.stride
        ));
    }
    let start = copied.len();
    gather(&file[storage.clone()], view, elem, copied);
    Ok(TensorInfo { dtype, shape, data: Location::Copied(start..copied.len()) })
}

/// Row-major strides, ignoring the stride of size-1 dimensions (torch leaves those free).
fn is_contiguous(size: &[u64], stride: &[u64]) -> bool {
    let mut expected = 1u64;
    for (&n, &s) in size.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    true
}

/// Appends the elements of `view` in row-major order (the caller checked every index
/// against `storage`).
fn gather(storage: &[u8], view: &TensorView, elem: usize, out: &mut Vec<u8>) {
    let size: Vec<usize> = view.size.iter().map(|&d| d as usize).collect();
    let stride: Vec<usize> = view.stride.iter().map(|&d| d as usize).collect();
    let Some((&inner_n, outer)) = size.split_last() else {
        out.extend_from_slice(&storage[view.offset as usize * elem..][..elem]);
        return;
    };
    let inner_s = stride[stride.len() - 1];
    let mut index = vec![0usize; outer.len()];
    loop {
        let base = view.offset as usize + index.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
        if inner_s == 1 {
            out.extend_from_slice(&storage[base * elem..(base + inner_n) * elem]);
        } else {
            for j in 0..inner_n {
                let at = (base + j * inner_s) * elem;
                out.extend_from_slice(&storage[at..at + elem]);
            }
        }
        // Odometer over the outer dimensions, last fastest.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < outer[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::FileDType;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/weights");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
    }

    #[test]
    fn contiguity_ignores_unit_dimensions() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[2, 1, 3], &[3, 99, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(!is_contiguous(&[3, 2], &[4, 1]));
    }

    #[test]
    fn gather_follows_strides() {
        let storage: Vec<u8> = (0..12).collect();
        let storage_ref = pickle::Storage { key: "0".into(), elem: Elem::Known(FileDType::U8), nbytes: Some(12) };
        // The transpose of a 3×4 matrix, and its columns 1..3.
        let t = TensorView {
            storage: storage_ref.clone(),
            elem: Elem::Known(FileDType::U8),
            offset: 0,
            size: vec![4, 3],
            stride: vec![1, 4],
        };
        let mut out = Vec::new();
        gather(&storage, &t, 1, &mut out);
        assert_eq!(out, [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
        let cols = TensorView { offset: 1, size: vec![3, 2], stride: vec![4, 1], ..t };
        out.clear();
        gather(&storage, &cols, 1, &mut out);
        assert_eq!(out, [1, 2, 5, 6, 9, 10]);
    }

    /// Prefixes of real checkpoints, and their bytes set to a few values (every byte of
    /// the small file, a spread of the pickle of the large one), read as a result or an
    /// error, never a panic; every strict prefix is an error.
    #[test]
    fn truncated_and_corrupted_checkpoints_never_panic() {
        let small = fixture("torch_bare_state_dict.pt");
        let large = fixture("torch_synthclip_checkpoint.pt");
        let pkl = zip::entries(&large).unwrap()["torch_synthclip_checkpoint/data.pkl"].clone();
        let cases = [
            (
                small.clone(),
                (0..small.len()).step_by(1),
                0..small.len(),
                1,
                &[0u8, 0xFF, 0x80, b'X', b'K', b'h', b'Q'][..],
            ),
            (large.clone(), (0..large.len()).step_by(61), pkl.clone(), 3, &[0u8, 0xFF, b'h'][..]),
        ];
        for (file, cuts, flips, step, values) in cases {
            assert!(read(&file).is_ok());
            for cut in cuts.chain(file.len() - 100..file.len()) {
                assert!(read(&file[..cut]).is_err(), "cut at {cut}");
            }
            let mut bad = file.clone();
            for i in flips.step_by(step) {
                for &v in values {
                    let keep = bad[i];
                    bad[i] = v;
                    let _ = read(&bad);
                    bad[i] = keep;
                }
            }
        }
    }
}
