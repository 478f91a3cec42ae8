//! PyTorch `.pt` checkpoints read without Python: every tensor of the fixtures made by
//! `tests/reference/make_torch_pt_fixtures.py` (torch 2.11.0) compared element by element
//! with what torch saved, the state-dict rule, and every refusal naming its file and cause.
mod common;
use common::temp_dir;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use synthos_engine::weights::{FileDType, Loader, WeightFile, WeightSet};
use synthos_engine::{DType, Device};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights").join(name)
}

fn expected() -> Value {
    serde_json::from_str(&fs::read_to_string(fixture("torch_pt_expected.json")).unwrap()).unwrap()
}

fn err_of<T: std::fmt::Debug>(r: synthos_engine::Result<T>) -> String {
    r.unwrap_err().to_string()
}

/// `bytes` written to a fresh file called `name`.
fn write_temp(tag: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let path = temp_dir(tag).join(name);
    fs::write(&path, bytes).unwrap();
    path
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

/// Compares every tensor of `file` with the script's record: names, dtype, shape, the raw
/// bytes, and the values through `read_f32` for the float types (exact: the recorded f64
/// values are the stored values, and f64 rounds to f32 as the reader does).
fn check_fixture(file: &str, expected: &Value) {
    let wf = WeightFile::open(fixture(file)).unwrap();
    let tensors = expected["tensors"].as_array().unwrap();
    let mut want_names: Vec<&str> = tensors.iter().map(|t| t["name"].as_str().unwrap()).collect();
    want_names.sort();
    assert_eq!(wf.names().collect::<Vec<_>>(), want_names, "{file}: names");
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let info = wf.info(name).unwrap();
        assert_eq!(info.dtype, FileDType::from_code(t["dtype"].as_str().unwrap()).unwrap(), "{file}: {name}");
        let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(info.shape, shape, "{file}: {name}: shape");
        assert_eq!(wf.bytes(name).unwrap(), unhex(t["hex"].as_str().unwrap()), "{file}: {name}: bytes");
        let values: Vec<f64> = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{file}: {name}: element count");
        if info.dtype.is_float() {
            let got = wf.read_f32(name).unwrap();
            let want: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{file}: {name}: values {got:?} vs {want:?}"
            );
        } else if info.dtype == FileDType::I64 {
            let got: Vec<f64> = wf
                .bytes(name)
                .unwrap()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect();
            assert_eq!(got, values, "{file}: {name}: values");
        }
    }
    let metadata: HashMap<String, String> = expected["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    assert_eq!(wf.metadata(), &metadata, "{file}: metadata");
}

#[test]
fn every_tensor_matches_what_torch_saved() {
    let expected = expected();
    let files = expected.as_object().unwrap();
    assert_eq!(files.len(), 3);
    for (file, record) in files {
        check_fixture(file, record);
    }
}

/// The SynthCLIP layout: `state_dict` chosen out of `{epoch, state_dict, optimizer,
/// scaler, best_acc1, args}`, `module.` removed, the views resolved.
#[test]
fn synthclip_checkpoint_loads_through_weight_set_and_loader() {
    let path = fixture("torch_synthclip_checkpoint.pt");
    let set = WeightSet::open(&path).unwrap();
    assert!(set.contains("logit_scale") && !set.names().any(|n| n.starts_with("module.")));
    assert_eq!(set.dtype_of("visual.patch_embed.proj.weight").unwrap(), FileDType::F16);
    assert_eq!(set.dtype_of("token_embedding.weight").unwrap(), FileDType::BF16);
    assert_eq!(set.dtype_of("position_ids").unwrap(), FileDType::I64);
    assert_eq!(set.shape("transformer.resblocks.0.attn.in_proj_weight").unwrap(), &[12, 4]);

    // Two views of one storage (the second at element offset 4) and a column slice of it.
    assert_eq!(set.read_f32("shared_head").unwrap(), [-1.0, -0.75, -0.5, -0.25]);
    assert_eq!(set.read_f32("shared_tail").unwrap(), [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]);
    assert_eq!(set.shape("shared_columns").unwrap(), &[3, 2]);
    assert_eq!(set.read_f32("shared_columns").unwrap(), [-0.75, -0.5, 0.25, 0.5, 1.25, 1.5]);
    // The transpose of [[-2.5, -1.5, -0.5], [0.5, 1.5, 2.5]], gathered row-major.
    assert_eq!(set.shape("transposed").unwrap(), &[3, 2]);
    assert_eq!(set.read_f32("transposed").unwrap(), [-2.5, 0.5, -1.5, 1.5, -0.5, 2.5]);

    let mut loader = Loader::new(&set, Device::Cpu, DType::F32);
    let scale = loader.get("logit_scale", &[]).unwrap();
    // ln(1/0.07) after one AdamW step of lr 1e-3.
    assert_eq!(scale.shape(), &[] as &[usize]);
    assert!((scale.to_vec().unwrap()[0] - (1.0f32 / 0.07).ln()).abs() < 2e-3);
    let cls = loader.get("visual.cls_token", &[1, 1, 4]).unwrap();
    assert_eq!(cls.shape(), &[1, 1, 4]);
    loader.get("position_ids", &[1, 3]).unwrap();
    loader.get("ln_final.weight", &[5]).unwrap();
    loader.ignore_where(|_| true);
    let e = err_of(loader.finish());
    assert!(e.contains("torch_synthclip_checkpoint.pt"), "{e}");
    assert!(e.contains("unloadable 'position_ids'") && e.contains("I64"), "{e}");
    assert!(e.contains("mis-shaped 'ln_final.weight'") && e.contains("expected [5], found [4]"), "{e}");
}

#[test]
fn a_bare_state_dict_keeps_its_names() {
    let wf = WeightFile::open(fixture("torch_bare_state_dict.pt")).unwrap();
    assert_eq!(wf.names().collect::<Vec<_>>(), ["fp8", "proj.bias", "proj.weight", "scale"]);
    assert_eq!(wf.info("fp8").unwrap().dtype, FileDType::F8E4M3);
    assert_eq!(wf.info("scale").unwrap().shape, Vec::<usize>::new());
    assert_eq!(wf.read_f32("scale").unwrap()[0].to_bits(), (-0.0f32).to_bits());
    assert!(wf.metadata().is_empty());
}

#[test]
fn a_non_tensor_in_the_state_dict_is_refused_by_name() {
    let e = err_of(WeightFile::open(fixture("torch_non_tensor_entry.pt")));
    assert!(e.contains("torch_non_tensor_entry.pt"), "{e}");
    assert!(e.contains("'state_dict'") && e.contains("'module.note'") && e.contains("a string, not a tensor"), "{e}");
}

#[test]
fn the_legacy_format_is_refused_with_how_to_resave() {
    let e = err_of(WeightSet::open(fixture("torch_legacy_format.pt")));
    assert!(e.contains("torch_legacy_format.pt") && e.contains("legacy"), "{e}");
    assert!(e.contains("save it again with torch.save"), "{e}");
}

/// Every cut of a checkpoint is an error naming the file, never a panic or a partial
/// result.
#[test]
fn truncated_files_are_clear_errors() {
    let bytes = fs::read(fixture("torch_synthclip_checkpoint.pt")).unwrap();
    let dir = temp_dir("torch-pt-cut");
    let cuts = [0, 3, 7, 100, bytes.len() / 3, bytes.len() / 2, bytes.len() - 100, bytes.len() - 22, bytes.len() - 1];
    for cut in cuts {
        let path = dir.join(format!("cut{cut}.pt"));
        fs::write(&path, &bytes[..cut]).unwrap();
        let e = err_of(WeightFile::open(&path));
        assert!(e.contains(&format!("cut{cut}.pt")), "{e}");
        let clear = ["too short", "truncated", "not a PyTorch checkpoint", "corrupt"];
        assert!(clear.iter().any(|c| e.contains(c)), "cut at {cut}: {e}");
    }
}

/// Offset of the first occurrence of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn corrupt_archives_are_clear_errors() {
    let bytes = fs::read(fixture("torch_bare_state_dict.pt")).unwrap();

    // A compressed entry (the method of the first central entry, data.pkl, set to deflate).
    let mut compressed = bytes.clone();
    let central = find(&compressed, b"PK\x01\x02");
    compressed[central + 10] = 8;
    let e = err_of(WeightFile::open(write_temp("torch-pt-deflate", "deflated.pt", &compressed)));
    assert!(e.contains("deflated.pt") && e.contains("'torch_bare_state_dict/data.pkl' is compressed"), "{e}");

    // A big-endian byte-order record.
    let mut big = bytes.clone();
    let at = find(&big, b"little");
    big[at..at + 6].copy_from_slice(b"bigend");
    let e = err_of(WeightFile::open(write_temp("torch-pt-big", "big.pt", &big)));
    assert!(e.contains("big.pt") && e.contains("'bigend'") && e.contains("little-endian"), "{e}");

    // A pickle whose opcodes are garbage (same length, so the archive stays valid).
    let mut garbage = bytes.clone();
    let pkl = find(&garbage, b"\x80\x02");
    garbage[pkl + 2..pkl + 8].copy_from_slice(b"\xff\xff\xff\xff\xff\xff");
    let e = err_of(WeightFile::open(write_temp("torch-pt-pickle", "garbage.pt", &garbage)));
    assert!(e.contains("garbage.pt") && e.contains("data.pkl: bad pickle") && e.contains("0xff"), "{e}");

    // A storage entry renamed away: the tensor that needs it is named.
    let mut missing = bytes.clone();
    while let Some(at) = missing.windows(7).position(|w| w == b"/data/0") {
        missing[at + 6] = b'9';
    }
    let e = err_of(WeightFile::open(write_temp("torch-pt-missing", "missing.pt", &missing)));
    assert!(e.contains("missing.pt") && e.contains("storage 'data/0' is missing"), "{e}");
}

#[test]
fn the_extension_and_signature_choose_the_reader() {
    // A safetensors file renamed `.pt` still opens (the name alone does not force torch).
    let st = fs::read(fixture("tiny_bf16_f16_f32.safetensors")).unwrap();
    let wf = WeightFile::open(write_temp("torch-pt-st", "renamed.pt", &st)).unwrap();
    assert_eq!(wf.len(), 4);
    // A checkpoint renamed `.safetensors` is read as safetensors, and refused as such.
    let pt = fs::read(fixture("torch_bare_state_dict.pt")).unwrap();
    let e = err_of(WeightFile::open(write_temp("torch-pt-as-st", "ckpt.safetensors", &pt)));
    assert!(e.contains("not a safetensors file"), "{e}");
    // Junk named `.pt` gets the checkpoint message.
    let e = err_of(WeightFile::open(write_temp("torch-pt-junk", "junk.pt", b"this is not a checkpoint at all")));
    assert!(e.contains("junk.pt") && e.contains("not a PyTorch checkpoint"), "{e}");
    let e = err_of(WeightFile::open(write_temp("torch-pt-tiny", "tiny.pth", b"PK")));
    assert!(e.contains("tiny.pth") && e.contains("too short"), "{e}");
}

/// A `.pt` fine-tune layers over safetensors base weights like any other file.
#[test]
fn a_checkpoint_overlays_safetensors() {
    let mut set = WeightSet::open(fixture("tiny_bf16_f16_f32.safetensors")).unwrap();
    set.overlay(fixture("torch_bare_state_dict.pt")).unwrap();
    let by_file: BTreeMap<&str, String> =
        set.names().map(|n| (n, set.file_of(n).unwrap().file_name().unwrap().to_string_lossy().into())).collect();
    assert_eq!(by_file["proj.weight"], "torch_bare_state_dict.pt");
    assert_eq!(by_file["f32.scalar"], "tiny_bf16_f16_f32.safetensors");
}
