//! Safetensors I/O: round trips, the Python-made fixture, sharded indexes, overlays, the
//! loader's combined report, atomic saves, and every error naming its file/tensor/shape.
mod common;
use common::temp_dir;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use synthos_engine::models::wan::{WanConfig, WanModel};
use synthos_engine::weights::{save, FileDType, Loader, SaveDType, WeightFile, WeightSet};
use synthos_engine::{DType, Device, Rng, Tensor};

fn cpu(values: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(values, shape, Device::Cpu).unwrap()
}

fn named(name: &str, t: Tensor) -> (String, Tensor) {
    (name.to_string(), t)
}

/// Writes a file by hand: length prefix, header text, data bytes.
fn raw_file(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    fs::write(path, bytes).unwrap();
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights/tiny_bf16_f16_f32.safetensors")
}

fn err_of<T: std::fmt::Debug>(r: synthos_engine::Result<T>) -> String {
    r.unwrap_err().to_string()
}

/// Every file name in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn f32_round_trip_is_exact_with_aligned_header() {
    let dir = temp_dir("weights-f32");
    let path = dir.join("model.safetensors");
    let mut rng = Rng::new(11);
    let tensors = vec![
        named("blocks.0.weight", Tensor::randn(&[3, 5], 1.0, &mut rng, Device::Cpu).unwrap()),
        named("blocks.0.bias", Tensor::randn(&[7], 1e3, &mut rng, Device::Cpu).unwrap()),
        named("scale", cpu(vec![-0.0], &[])),
        named("empty", cpu(vec![], &[2, 0, 3])),
    ];
    let meta = HashMap::from([("format".to_string(), "pt".to_string()), ("epoch".to_string(), "3".to_string())]);
    save(&path, &tensors, SaveDType::F32, Some(&meta)).unwrap();

    let bytes = fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "header padded to 8 bytes");
    assert_eq!(bytes.len(), 8 + n + 4 * (15 + 7 + 1), "no bytes beyond the tensors");
    assert!(bytes[8 + n - 1] == b'}' || bytes[8 + n - 1] == b' ');

    let file = WeightFile::open(&path).unwrap();
    assert_eq!(file.metadata(), &meta);
    let set = WeightSet::open(&path).unwrap();
    assert_eq!(set.names().collect::<Vec<_>>(), ["blocks.0.bias", "blocks.0.weight", "empty", "scale"]);
    for (name, t) in &tensors {
        assert_eq!(set.dtype_of(name).unwrap(), FileDType::F32);
        assert_eq!(set.shape(name).unwrap(), t.shape());
        let back = set.get(name, t.shape(), Device::Cpu, DType::F32).unwrap();
        let (a, b) = (back.to_vec().unwrap(), t.to_vec().unwrap());
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bf16_round_trip_exact_and_rounds_to_nearest_even() {
    let dir = temp_dir("weights-bf16");
    let path = dir.join("m.safetensors");
    // Exactly representable in bf16 (8 significant bits), incl. a subnormal and -0.
    let exact = vec![1.0, -2.5, 0.15625, 65280.0, -0.0, 2f32.powi(-130), -384.0];
    // Halfway cases go to the even mantissa; others to the nearest.
    let one = 1.0f32;
    let rounding = vec![
        one + 2f32.powi(-8),                  // tie between 1 and 1+2^-7 → 1 (even)
        one + 3.0 * 2f32.powi(-8),            // tie between 1+2^-7 and 1+2^-6 → 1+2^-6 (even)
        one + 2f32.powi(-8) + 2f32.powi(-20), // just above the tie → 1+2^-7
        0.1,                                  // 0x3DCCCCCD → 0x3DCD
    ];
    let expected_rounded = [1.0, 1.015625, 1.0078125, f32::from_bits(0x3DCD_0000)];
    save(
        &path,
        &[named("exact", cpu(exact.clone(), &[7])), named("rounded", cpu(rounding, &[2, 2]))],
        SaveDType::BF16,
        None,
    )
    .unwrap();
    let set = WeightSet::open(&path).unwrap();
    assert_eq!(set.dtype_of("exact").unwrap(), FileDType::BF16);
    let back = set.get("exact", &[7], Device::Cpu, DType::BF16).unwrap();
    assert_eq!(back.dtype(), DType::F32, "CPU tensors are f32 whatever was asked");
    let back = back.to_vec().unwrap();
    assert_eq!(
        back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        exact.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(set.read_f32("rounded").unwrap(), expected_rounded);
    let file = WeightFile::open(&path).unwrap();
    assert_eq!(file.bytes("rounded").unwrap()[6..8], [0xCD, 0x3D], "0.1 stored as bf16 0x3DCD, little-endian");
    assert!(file.metadata().is_empty());
    fs::remove_dir_all(dir).unwrap();
}

/// Large tensors (read on the thread pool) hold the values of their bytes element by
/// element, in bf16, f16 and f32, with an odd count.
#[test]
fn large_tensors_read_element_by_element() {
    let dir = temp_dir("weights-large");
    let path = dir.join("large.safetensors");
    let n = 200_003usize;
    let values = Rng::new(9).normal_vec(n, 3.0);
    let mut data = Vec::new();
    for x in &values {
        data.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes());
    }
    for x in &values {
        data.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes());
    }
    for x in &values {
        data.extend_from_slice(&x.to_le_bytes());
    }
    let (b, h) = (2 * n, 4 * n);
    let header = format!(
        r#"{{"b":{{"dtype":"BF16","shape":[{n}],"data_offsets":[0,{b}]}},"h":{{"dtype":"F16","shape":[{n}],"data_offsets":[{b},{h}]}},"f":{{"dtype":"F32","shape":[{n}],"data_offsets":[{h},{}]}}}}"#,
        h + 4 * n
    );
    let pad = (8 - header.len() % 8) % 8;
    raw_file(&path, &format!("{header}{}", " ".repeat(pad)), &data);
    let file = WeightFile::open(&path).unwrap();
    let bf: Vec<f32> = values.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
    let hf: Vec<f32> = values.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
    assert_eq!(file.read_f32("b").unwrap(), bf);
    assert_eq!(file.read_f32("h").unwrap(), hf);
    assert_eq!(file.read_f32("f").unwrap(), values);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn reads_python_fixture_in_bf16_f16_f32() {
    let file = WeightFile::open(fixture()).unwrap();
    assert_eq!(file.metadata().get("made_by").map(String::as_str), Some("make_weight_fixture.py"));
    assert_eq!(file.names().collect::<Vec<_>>(), ["bf16.weight", "f16.weight", "f32.scalar", "f32.weight"]);
    let set = WeightSet::open(fixture()).unwrap();

    assert_eq!(set.dtype_of("bf16.weight").unwrap(), FileDType::BF16);
    let bf = set.get("bf16.weight", &[2, 3], Device::Cpu, DType::F32).unwrap().to_vec().unwrap();
    assert_eq!(bf[..4], [1.0, -2.5, 0.15625, f32::from_bits(0x3DCD_0000)]);
    assert_eq!(bf[4].to_bits(), 0x8000_0000, "negative zero");
    assert_eq!(bf[5].to_bits(), 0x7F7F_0000, "largest finite bf16");

    assert_eq!(set.dtype_of("f16.weight").unwrap(), FileDType::F16);
    let h = set.get("f16.weight", &[5], Device::Cpu, DType::F32).unwrap().to_vec().unwrap();
    assert_eq!(h, [0.5, -1.75, f32::from_bits(0x3DCC_C000), 2f32.powi(-24), 65504.0]);

    assert_eq!(set.dtype_of("f32.weight").unwrap(), FileDType::F32);
    let f = set.get("f32.weight", &[2, 2, 2], Device::Cpu, DType::F32).unwrap().to_vec().unwrap();
    assert_eq!(f, [0.0, 1.0, -1.0, std::f32::consts::PI, 1e-30, -7.5, 123_456.79, f32::INFINITY]);
    let s = set.get("f32.scalar", &[], Device::Cpu, DType::F32).unwrap();
    assert_eq!((s.shape(), s.item().unwrap()), (&[][..], 42.0));
}

#[test]
fn f64_tensors_load_as_f32() {
    let dir = temp_dir("weights-f64");
    let path = dir.join("d.safetensors");
    let values = [1.5f64, -1e-3, 1e300];
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw_file(&path, r#"{"x":{"dtype":"F64","shape":[3],"data_offsets":[0,24]}}"#, &data);
    let set = WeightSet::open(&path).unwrap();
    assert_eq!(set.dtype_of("x").unwrap(), FileDType::F64);
    assert_eq!(set.read_f32("x").unwrap(), [1.5, -1e-3, f32::INFINITY]);
    fs::remove_dir_all(dir).unwrap();
}

/// Two shards and their index, as a sharded published checkpoint is laid out.
fn write_shards(dir: &Path) -> (Tensor, Tensor, Tensor) {
    let mut rng = Rng::new(5);
    let a = Tensor::randn(&[3, 4], 1.0, &mut rng, Device::Cpu).unwrap();
    let b = Tensor::randn(&[5], 1.0, &mut rng, Device::Cpu).unwrap();
    let c = Tensor::randn(&[2, 3], 1.0, &mut rng, Device::Cpu).unwrap();
    save(
        dir.join("model-00001-of-00002.safetensors"),
        &[named("enc.a", a.clone()), named("enc.b", b.clone())],
        SaveDType::F32,
        None,
    )
    .unwrap();
    save(dir.join("model-00002-of-00002.safetensors"), &[named("dec.c", c.clone())], SaveDType::BF16, None).unwrap();
    let index = r#"{"metadata": {"total_size": 80}, "weight_map": {
        "enc.a": "model-00001-of-00002.safetensors",
        "enc.b": "model-00001-of-00002.safetensors",
        "dec.c": "model-00002-of-00002.safetensors"}}"#;
    fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    (a, b, c)
}

#[test]
fn sharded_index_loads_each_tensor_from_its_shard() {
    let dir = temp_dir("weights-shards");
    let (a, b, c) = write_shards(&dir);
    for set in [WeightSet::open(dir.join("model.safetensors.index.json")).unwrap(), WeightSet::open(&dir).unwrap()] {
        assert_eq!(set.names().collect::<Vec<_>>(), ["dec.c", "enc.a", "enc.b"]);
        assert_eq!(set.get("enc.a", &[3, 4], Device::Cpu, DType::F32).unwrap().to_vec().unwrap(), a.to_vec().unwrap());
        assert_eq!(set.read_f32("enc.b").unwrap(), b.to_vec().unwrap());
        let c_bf16: Vec<f32> = c.to_vec().unwrap().iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        assert_eq!(set.read_f32("dec.c").unwrap(), c_bf16);
        assert!(set.file_of("dec.c").unwrap().ends_with("model-00002-of-00002.safetensors"));
        assert!(set.file_of("enc.a").unwrap().ends_with("model-00001-of-00002.safetensors"));
    }
    // Without the index, a directory means all of its .safetensors files.
    fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    let set = WeightSet::open(&dir).unwrap();
    assert_eq!(set.len(), 3);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sharded_index_errors_name_index_shard_and_tensor() {
    let dir = temp_dir("weights-badindex");
    write_shards(&dir);
    let index = dir.join("bad.safetensors.index.json");
    fs::write(&index, r#"{"weight_map": {"enc.a": "model-00002-of-00002.safetensors"}}"#).unwrap();
    let e = err_of(WeightSet::open(&index));
    assert!(
        e.contains("bad.safetensors.index.json") && e.contains("'enc.a'") && e.contains("model-00002-of-00002"),
        "{e}"
    );

    fs::write(&index, r#"{"weight_map": {"enc.a": "gone.safetensors"}}"#).unwrap();
    let e = err_of(WeightSet::open(&index));
    assert!(
        e.contains("bad.safetensors.index.json") && e.contains("gone.safetensors") && e.contains("does not exist"),
        "{e}"
    );

    fs::write(&index, r#"{"metadata": {}}"#).unwrap();
    let e = err_of(WeightSet::open(&index));
    assert!(e.contains("bad.safetensors.index.json") && e.contains("weight_map"), "{e}");

    fs::write(&index, "{not json").unwrap();
    let e = err_of(WeightSet::open(&index));
    assert!(e.contains("bad.safetensors.index.json") && e.contains("not valid JSON"), "{e}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn directory_errors_name_the_directory() {
    let dir = temp_dir("weights-dirs");
    let e = err_of(WeightSet::open(&dir));
    assert!(e.contains(&dir.display().to_string()) && e.contains("no .safetensors"), "{e}");
    let t = cpu(vec![1.0, 2.0], &[2]);
    save(dir.join("a.safetensors"), &[named("w", t.clone())], SaveDType::F32, None).unwrap();
    save(dir.join("b.safetensors"), &[named("w", t)], SaveDType::F32, None).unwrap();
    let e = err_of(WeightSet::open(&dir));
    assert!(e.contains("'w'") && e.contains("a.safetensors") && e.contains("b.safetensors"), "{e}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn overlay_replaces_tensors_of_the_same_name() {
    let dir = temp_dir("weights-overlay");
    let base = dir.join("base.safetensors");
    let tuned = dir.join("epoch-1.safetensors");
    save(&base, &[named("x", cpu(vec![1.0, 2.0], &[2])), named("y", cpu(vec![3.0], &[1]))], SaveDType::F32, None)
        .unwrap();
    save(
        &tuned,
        &[named("y", cpu(vec![30.0], &[1])), named("z", cpu(vec![5.0, 6.0, 7.0], &[3]))],
        SaveDType::BF16,
        None,
    )
    .unwrap();
    let mut set = WeightSet::open(&base).unwrap();
    set.overlay(&tuned).unwrap();
    assert_eq!(set.names().collect::<Vec<_>>(), ["x", "y", "z"]);
    assert_eq!(set.read_f32("x").unwrap(), [1.0, 2.0]);
    assert_eq!(set.read_f32("y").unwrap(), [30.0]);
    assert_eq!(set.dtype_of("y").unwrap(), FileDType::BF16);
    assert_eq!(set.file_of("y").unwrap(), tuned);
    assert_eq!(set.file_of("x").unwrap(), base);
    assert_eq!(set.read_f32("z").unwrap(), [5.0, 6.0, 7.0]);
    // The missing-tensor error names every layer searched.
    let e = err_of(set.read_f32("w"));
    assert!(e.contains("'w'") && e.contains("base.safetensors") && e.contains("epoch-1.safetensors"), "{e}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn open_errors_say_what_is_wrong_with_which_file() {
    let dir = temp_dir("weights-openerr");
    let p = |n: &str| dir.join(n);
    let shown = |n: &str| p(n).display().to_string();

    let e = err_of(WeightFile::open(p("absent.safetensors")));
    assert!(e.contains(&shown("absent.safetensors")) && e.contains("does not exist"), "{e}");
    let e = err_of(WeightSet::open(p("absent.safetensors")));
    assert!(e.contains(&shown("absent.safetensors")) && e.contains("does not exist"), "{e}");

    fs::write(p("short.safetensors"), b"abc").unwrap();
    let e = err_of(WeightFile::open(p("short.safetensors")));
    assert!(e.contains(&shown("short.safetensors")) && e.contains("not a safetensors file"), "{e}");

    let mut long = 1000u64.to_le_bytes().to_vec();
    long.extend_from_slice(b"{}");
    fs::write(p("long.safetensors"), long).unwrap();
    let e = err_of(WeightFile::open(p("long.safetensors")));
    assert!(e.contains(&shown("long.safetensors")) && e.contains("header length 1000"), "{e}");

    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&[0; 64]);
    fs::write(p("huge.safetensors"), huge).unwrap();
    let e = err_of(WeightFile::open(p("huge.safetensors")));
    assert!(e.contains(&shown("huge.safetensors")) && e.contains("not a safetensors file"), "{e}");

    raw_file(&p("json.safetensors"), r#"{"x": {"dtype": "F32", "#, &[0; 4]);
    let e = err_of(WeightFile::open(p("json.safetensors")));
    assert!(e.contains(&shown("json.safetensors")) && e.contains("not valid JSON"), "{e}");

    raw_file(&p("offs.safetensors"), r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, &[0; 8]);
    let e = err_of(WeightFile::open(p("offs.safetensors")));
    assert!(e.contains(&shown("offs.safetensors")) && e.contains("'x'") && e.contains("needs 8 bytes"), "{e}");

    raw_file(&p("q4.safetensors"), r#"{"x":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,1]}}"#, &[0; 1]);
    let e = err_of(WeightFile::open(p("q4.safetensors")));
    assert!(e.contains(&shown("q4.safetensors")) && e.contains("'x'") && e.contains("unsupported dtype 'Q4_K'"), "{e}");

    // Truncated: a valid file losing its last bytes, as an interrupted download does.
    let path = p("cut.safetensors");
    save(
        &path,
        &[named("first", cpu(vec![1.0; 4], &[4])), named("last", cpu(vec![2.0; 6], &[2, 3]))],
        SaveDType::F32,
        None,
    )
    .unwrap();
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
    let e = err_of(WeightFile::open(&path));
    assert!(e.contains(&shown("cut.safetensors")) && e.contains("truncated") && e.contains("'last'"), "{e}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn get_errors_name_file_tensor_shapes_and_dtype() {
    let dir = temp_dir("weights-geterr");
    let path = dir.join("m.safetensors");
    save(
        &path,
        &[
            named("blocks.0.attn.q.weight", cpu(vec![0.0; 12], &[3, 4])),
            named("blocks.0.attn.k.weight", cpu(vec![0.0; 12], &[3, 4])),
            named("head.bias", cpu(vec![0.0; 2], &[2])),
        ],
        SaveDType::BF16,
        None,
    )
    .unwrap();
    let set = WeightSet::open(&path).unwrap();
    let shown = path.display().to_string();

    let e = err_of(set.get("blocks.0.attn.q.weight", &[4, 3], Device::Cpu, DType::F32));
    assert!(
        e.contains(&shown) && e.contains("'blocks.0.attn.q.weight'") && e.contains("[4, 3]") && e.contains("[3, 4]"),
        "{e}"
    );

    let e = err_of(set.get("model.blocks.0.attn.q.weight", &[3, 4], Device::Cpu, DType::F32));
    assert!(e.contains("'model.blocks.0.attn.q.weight'") && e.contains(&shown), "{e}");
    let hint = e.split("close names:").nth(1).unwrap_or_else(|| panic!("no suggestion in: {e}"));
    assert!(hint.trim_start().starts_with("'blocks.0.attn.q.weight'"), "best suggestion first: {e}");
    assert!(!hint.contains("head.bias"), "{e}");

    let e = err_of(set.get("unrelated", &[1], Device::Cpu, DType::F32));
    assert!(e.contains("'unrelated'") && !e.contains("close names"), "{e}");
    assert!(err_of(set.shape("nope")).contains("'nope'"));
    assert!(err_of(set.dtype_of("nope")).contains("'nope'"));

    let ipath = dir.join("ints.safetensors");
    let ids: Vec<u8> = [0i64, 1, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
    raw_file(&ipath, r#"{"position_ids":{"dtype":"I64","shape":[1,3],"data_offsets":[0,24]}}"#, &ids);
    let set = WeightSet::open(&ipath).unwrap();
    assert_eq!(set.dtype_of("position_ids").unwrap(), FileDType::I64);
    let e = err_of(set.get("position_ids", &[1, 3], Device::Cpu, DType::F32));
    assert!(e.contains(&ipath.display().to_string()) && e.contains("'position_ids'") && e.contains("I64"), "{e}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn non_finite_tensors_are_reported_when_a_model_loads() {
    let dir = temp_dir("weights-nan");
    let path = dir.join("diverged.safetensors");
    let bad = vec![0.5, f32::NAN, 1.0, f32::INFINITY, 2.0, 3.0];
    save(
        &path,
        &[named("ok", cpu(vec![1.0; 2], &[2])), named("blocks.3.ffn.0.weight", cpu(bad, &[2, 3]))],
        SaveDType::BF16,
        None,
    )
    .unwrap();
    let set = WeightSet::open(&path).unwrap();
    let mut loader = Loader::new(&set, Device::Cpu, DType::F32);
    assert_eq!(loader.get("ok", &[2]).unwrap().to_vec().unwrap(), vec![1.0, 1.0]);
    loader.get("blocks.3.ffn.0.weight", &[2, 3]).unwrap();
    let e = err_of(loader.finish());
    assert!(
        e.contains(&path.display().to_string())
            && e.contains("non-finite 'blocks.3.ffn.0.weight'")
            && e.contains("2 NaN/inf")
            && e.contains("element 1"),
        "{e}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn loader_reports_missing_misshaped_and_unexpected_together() {
    let dir = temp_dir("weights-loader");
    let path = dir.join("clip.safetensors");
    let ids: Vec<u8> = [0i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
    let w: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let bias: Vec<u8> = [7.0f32, 8.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut data = w.clone();
    data.extend(&bias);
    data.extend(&ids);
    data.extend(&w);
    data.extend(&w);
    raw_file(
        &path,
        r#"{"vision.proj.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},
            "vision.proj.bias":{"dtype":"F32","shape":[2],"data_offsets":[24,32]},
            "vision.position_ids":{"dtype":"I64","shape":[2],"data_offsets":[32,48]},
            "vision.norm.weight":{"dtype":"F32","shape":[6],"data_offsets":[48,72]},
            "text.proj.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[72,96]}}"#,
        &data,
    );
    let set = WeightSet::open(&path).unwrap();

    let mut ok = Loader::new(&set, Device::Cpu, DType::BF16);
    let proj = ok.get("vision.proj.weight", &[2, 3]).unwrap();
    assert_eq!(proj.to_vec().unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(proj.dtype(), DType::F32);
    assert!(ok.get_opt("vision.proj.bias", &[2]).unwrap().is_some());
    assert!(ok.get_opt("vision.extra.bias", &[2]).unwrap().is_none());
    ok.get("vision.norm.weight", &[6]).unwrap();
    assert_eq!(ok.unused(), ["text.proj.weight", "vision.position_ids"]);
    ok.ignore_where(|n| n.starts_with("text.") || n.ends_with("position_ids"));
    assert!(ok.unused().is_empty());
    ok.finish().unwrap();

    let mut bad = Loader::new(&set, Device::Cpu, DType::F32);
    bad.get("vision.proj.weight", &[2, 3]).unwrap();
    let wrong = bad.get("vision.norm.weight", &[3, 2]).unwrap();
    assert_eq!((wrong.shape(), wrong.to_vec().unwrap()), (&[3, 2][..], vec![0.0; 6]), "placeholder zeros");
    bad.get("vision.proj.bias_", &[2]).unwrap();
    bad.get("vision.position_ids", &[2]).unwrap();
    bad.get("vision.final.weight", &[4]).unwrap();
    let e = err_of(bad.finish());
    for part in [
        "clip.safetensors",
        "2 missing, 2 mis-shaped or unloadable, 2 unexpected",
        "missing 'vision.proj.bias_' (expected shape [2]); close names: 'vision.proj.bias'",
        "missing 'vision.final.weight' (expected shape [4])",
        "mis-shaped 'vision.norm.weight'",
        "expected [3, 2], found [6]",
        "unloadable 'vision.position_ids'",
        "I64",
        // `vision.proj.bias` was never requested (a misspelt name was), so it is unexpected.
        "unexpected 'vision.proj.bias' [2]",
        "unexpected 'text.proj.weight' [2, 3]",
    ] {
        assert!(e.contains(part), "missing {part:?} in:\n{e}");
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn loader_stops_before_zeros_for_a_config_far_larger_than_the_checkpoint() {
    let dir = temp_dir("weights-standins");
    let path = dir.join("small.safetensors");
    save(&path, &[named("a.weight", cpu(vec![1.0; 6], &[2, 3]))], SaveDType::F32, None).unwrap();
    let set = WeightSet::open(&path).unwrap();
    // Stand-ins up to 2^28 elements (1 GiB of f32) are zeros; the request that passes it
    // is the report, with the tensors so far.
    let mut loader = Loader::new(&set, Device::Cpu, DType::F32);
    let zeros = loader.get("a.weight", &[1 << 13, 1 << 13]).unwrap();
    assert_eq!(zeros.numel(), 1 << 26);
    drop(zeros);
    let e = err_of(loader.get("b.weight", &[1 << 16, 1 << 13]));
    for part in [
        "small.safetensors",
        "1 missing, 1 mis-shaped",
        "mis-shaped 'a.weight'",
        "missing 'b.weight' (expected shape [65536, 8192])",
        "loading stopped at 'b.weight'",
        "config",
    ] {
        assert!(e.contains(part), "missing {part:?} in:\n{e}");
    }
    assert!(!e.contains("unexpected"), "tensors not yet requested are not unexpected:\n{e}");
    loader.finish().expect("the request's error was the report");
    // A shape whose element count overflows stops at once.
    let mut loader = Loader::new(&set, Device::Cpu, DType::F32);
    let e = err_of(loader.get("c", &[usize::MAX, 2]));
    assert!(e.contains("missing 'c'") && e.contains("loading stopped at 'c'"), "{e}");
    // Through a model: a Wan config 2048 times the checkpoint's width is an error listing
    // the tensors, not an allocation failure.
    let mut cfg = WanConfig::from_json_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan/diffusers/config.json"),
    )
    .unwrap();
    cfg.dim *= 2048;
    let wan = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan/diffusers");
    let e = err_of(WanModel::load(&cfg, &[wan], Device::Cpu, DType::F32).map(|_| ()));
    assert!(e.contains("mis-shaped") && e.contains("loading stopped at"), "{e}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn loader_caps_long_lists() {
    let dir = temp_dir("weights-cap");
    let path = dir.join("many.safetensors");
    let tensors: Vec<(String, Tensor)> = (0..30).map(|i| named(&format!("t{i}"), cpu(vec![i as f32], &[1]))).collect();
    save(&path, &tensors, SaveDType::F32, None).unwrap();
    let set = WeightSet::open(&path).unwrap();
    let e = err_of(Loader::new(&set, Device::Cpu, DType::F32).finish());
    assert!(e.contains("30 unexpected") && e.contains("... and 10 more unexpected"), "{e}");
    assert_eq!(e.lines().count(), 1 + 20 + 1, "{e}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn save_rejects_bad_names_and_missing_parent() {
    let dir = temp_dir("weights-savebad");
    let t = cpu(vec![1.0], &[1]);
    let path = dir.join("dup.safetensors");
    let e = err_of(save(&path, &[named("a", t.clone()), named("a", t.clone())], SaveDType::F32, None));
    assert!(e.contains(&path.display().to_string()) && e.contains("'a'") && e.contains("twice"), "{e}");
    let e = err_of(save(&path, &[named("__metadata__", t.clone())], SaveDType::F32, None));
    assert!(e.contains("__metadata__"), "{e}");
    let nested = dir.join("no/such/dir/x.safetensors");
    let e = err_of(save(&nested, &[named("a", t)], SaveDType::F32, None));
    assert!(e.contains(&nested.display().to_string()), "{e}");
    assert!(listing(&dir).is_empty(), "nothing written: {:?}", listing(&dir));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn save_replaces_atomically_and_cleans_up_on_failure() {
    let dir = temp_dir("weights-atomic");
    let path = dir.join("ckpt.safetensors");
    save(&path, &[named("w", cpu(vec![1.0, 2.0], &[2]))], SaveDType::F32, None).unwrap();
    // A reader holding the old file keeps its data across the replacement.
    let old = WeightFile::open(&path).unwrap();
    save(&path, &[named("w", cpu(vec![3.0, 4.0, 5.0], &[3]))], SaveDType::BF16, None).unwrap();
    assert_eq!(old.read_f32("w").unwrap(), [1.0, 2.0]);
    assert_eq!(WeightSet::open(&path).unwrap().read_f32("w").unwrap(), [3.0, 4.0, 5.0]);
    assert_eq!(listing(&dir), ["ckpt.safetensors"], "no temporary file left");

    // The rename fails when the target is a directory: the fully written temporary file
    // must be removed and the directory left as it was.
    let blocker = dir.join("blocked.safetensors");
    fs::create_dir(&blocker).unwrap();
    fs::write(blocker.join("keep"), b"keep").unwrap();
    let e = err_of(save(&blocker, &[named("w", cpu(vec![1.0], &[1]))], SaveDType::F32, None));
    assert!(e.contains(&blocker.display().to_string()) && e.contains("rename"), "{e}");
    assert_eq!(listing(&dir), ["blocked.safetensors", "ckpt.safetensors"]);
    assert_eq!(fs::read(blocker.join("keep")).unwrap(), b"keep");
    fs::remove_dir_all(dir).unwrap();
}

/// Env var that turns `save_failing_mid_write_keeps_the_old_file` into its child half.
const CHILD_TARGET: &str = "SYNTHOS_WEIGHTS_TEST_CHILD_TARGET";

/// A write failing halfway through the data (the file-size limit, like a full disk) must
/// leave the old checkpoint byte for byte and no temporary file. The limit is set by a
/// shell around a second run of this test binary, so only that child is constrained.
#[cfg(unix)]
#[test]
fn save_failing_mid_write_keeps_the_old_file() {
    let big = || cpu((0..100_000).map(|i| i as f32).collect(), &[100, 1000]);
    if let Ok(target) = std::env::var(CHILD_TARGET) {
        let e =
            err_of(save(&target, &[named("small", cpu(vec![1.0], &[1])), named("big", big())], SaveDType::F32, None));
        assert!(e.contains(&target) && e.contains("'big'"), "{e}");
        return;
    }
    let dir = temp_dir("weights-midwrite");
    let path = dir.join("ckpt.safetensors");
    save(&path, &[named("w", cpu(vec![1.0, 2.0], &[2]))], SaveDType::F32, None).unwrap();
    let before = fs::read(&path).unwrap();
    let exe = std::env::current_exe().unwrap();
    // Ignoring SIGXFSZ turns the limit into an EFBIG write error, inherited across exec.
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 16 && trap '' XFSZ && exec \"$0\" --exact save_failing_mid_write_keeps_the_old_file --test-threads=1 --nocapture")
        .arg(&exe)
        .env(CHILD_TARGET, &path)
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child failed:\n{log}");
    assert!(log.contains("1 passed"), "child ran the test:\n{log}");
    assert_eq!(fs::read(&path).unwrap(), before, "old file intact");
    assert_eq!(listing(&dir), ["ckpt.safetensors"], "temporary file removed");
    // Without the limit the same save succeeds.
    save(&path, &[named("small", cpu(vec![1.0], &[1])), named("big", big())], SaveDType::F32, None).unwrap();
    assert_eq!(WeightSet::open(&path).unwrap().read_f32("big").unwrap(), big().to_vec().unwrap());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn python_reads_and_writes_our_files() {
    let python_ok =
        Command::new("python3").args(["-c", "import safetensors, numpy"]).output().is_ok_and(|o| o.status.success());
    if !python_ok {
        eprintln!("python3 with safetensors and numpy not available: Python round trip skipped");
        return;
    }
    let dir = temp_dir("weights-python");
    let ours = dir.join("ours.safetensors");
    let theirs = dir.join("theirs.safetensors");
    let mut rng = Rng::new(9);
    let f = Tensor::randn(&[3, 7], 1.0, &mut rng, Device::Cpu).unwrap();
    let halves = cpu(vec![0.5, -1.25, 3.0, 7.5, 0.0], &[5]);
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save(&ours, &[named("b.f32", f.clone())], SaveDType::F32, Some(&meta)).unwrap();
    let ours_bf16 = dir.join("ours_bf16.safetensors");
    save(&ours_bf16, &[named("a.bf16", halves)], SaveDType::BF16, Some(&meta)).unwrap();
    for (src, dst) in [(&ours, &theirs), (&ours_bf16, &dir.join("theirs_bf16.safetensors"))] {
        let out = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/weights_roundtrip.py"))
            .args([src, dst])
            .output()
            .unwrap();
        assert!(out.status.success(), "python failed on {}:\n{}", src.display(), String::from_utf8_lossy(&out.stderr));
    }
    let back = WeightFile::open(&theirs).unwrap();
    assert_eq!(back.metadata().get("format").map(String::as_str), Some("pt"));
    assert!(back.metadata().get("python").is_some_and(|v| v.starts_with("safetensors ")));
    assert_eq!(back.info("py.b.f32").unwrap().shape, [3, 7]);
    let expected: Vec<f32> = f.to_vec().unwrap().iter().map(|x| 2.0 * x + 1.0).collect();
    assert_eq!(back.read_f32("py.b.f32").unwrap(), expected);
    let back = WeightSet::open(dir.join("theirs_bf16.safetensors")).unwrap();
    assert_eq!(back.dtype_of("py.a.bf16").unwrap(), FileDType::BF16);
    assert_eq!(back.read_f32("py.a.bf16").unwrap(), [2.0, -1.5, 7.0, 16.0, 1.0]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn gpu_load_and_save() {
    let Some(dev) = common::gpu() else { return };
    let set = WeightSet::open(fixture()).unwrap();
    for dtype in [DType::BF16, DType::F32] {
        let t = set.get("f32.weight", &[2, 2, 2], dev, dtype).unwrap();
        assert_eq!((t.device(), t.dtype()), (dev, dtype));
        let expected: Vec<f32> = set.read_f32("f32.weight").unwrap();
        let expected: Vec<f32> = match dtype {
            DType::BF16 => expected.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
            DType::F32 => expected,
        };
        assert_eq!(t.to_vec().unwrap(), expected);
    }
    let h = set.get("f16.weight", &[5], dev, DType::F32).unwrap();
    assert_eq!(h.to_vec().unwrap(), set.read_f32("f16.weight").unwrap());

    let dir = temp_dir("weights-gpu");
    let path = dir.join("gpu.safetensors");
    let mut rng = Rng::new(3);
    let host = Tensor::randn(&[5, 3], 1.0, &mut rng, Device::Cpu).unwrap();
    let on_gpu = host.to_device(dev, DType::BF16).unwrap();
    save(&path, &[named("w", on_gpu.clone())], SaveDType::BF16, None).unwrap();
    assert_eq!(WeightSet::open(&path).unwrap().read_f32("w").unwrap(), on_gpu.to_vec().unwrap());
    fs::remove_dir_all(dir).unwrap();
}
