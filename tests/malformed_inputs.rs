//! Damaged input files give errors, never panics or allocation failures: every reader of
//! user files is run on seeded mutations (truncations, overwritten bytes, inserted
//! tokens, cut-out spans, size fields set to extremes) of the repository's fixtures.
//! Each case counts the inputs that panicked and keeps the first few in the message.
//!
//! Found this way and fixed: a corrupt `precompiled_charsmap` in a `tokenizer.json` (the
//! tokenizers library panics on it), Wan config sizes whose product overflowed, and a
//! config far wider than its checkpoint, whose zero stand-ins failed to allocate before
//! the mismatch was reported.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use serde_json::Value;
use synthos_engine::models::{clip::ClipVisionConfig, clip::ClipVisionEncoder, t5, vae, wan};
use synthos_engine::synth::{captions, llm, ConceptBank};
use synthos_engine::tokenizer::{ClipTokenizer, T5Tokenizer};
use synthos_engine::weights::WeightSet;
use synthos_engine::{data, image::ImageRgb, DType, Device, Rng};

mod common;
use common::temp_dir;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// One seeded mutation of `orig`. Byte edits land in the first `head` bytes half of the
/// time (where headers and structure are).
fn mutate(orig: &[u8], head: usize, rng: &mut Rng) -> Vec<u8> {
    const TOKENS: [&str; 14] =
        ["9", "-", "\"", "}", "[", "0", "99999999999999999999", ",", "\t", "\n", "\u{e9}", "\r\n", "{\"a\":", "\\u12"];
    let mut b = orig.to_vec();
    if b.is_empty() {
        return b;
    }
    let span = if rng.next_u64().is_multiple_of(2) { b.len().min(head) } else { b.len() };
    match rng.next_u64() % 5 {
        0 => b.truncate(below(rng, b.len())),
        1 | 2 => {
            for _ in 0..1 + below(rng, 6) {
                let i = below(rng, span);
                b[i] = rng.next_u64() as u8;
            }
        }
        3 => {
            let i = below(rng, span);
            let token = TOKENS[below(rng, TOKENS.len())].as_bytes();
            b.splice(i..i, token.iter().copied());
        }
        _ => {
            let i = below(rng, b.len());
            let j = (i + 1 + below(rng, 64)).min(b.len());
            b.drain(i..j);
        }
    }
    b
}

/// Runs `read` on `n` mutations of each seed input; fails listing the inputs that panicked.
fn no_panics(what: &str, seeds: &[Vec<u8>], head: usize, n: usize, seed: u64, read: impl Fn(&[u8])) {
    let mut rng = Rng::new(seed);
    let mut panicked = Vec::new();
    for input in seeds {
        for _ in 0..n {
            let b = mutate(input, head, &mut rng);
            if catch_unwind(AssertUnwindSafe(|| read(&b))).is_err() {
                panicked.push(String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned());
            }
        }
    }
    assert!(panicked.is_empty(), "{what}: {} inputs panicked, the first: {:?}", panicked.len(), &panicked[..1]);
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixture(rel)).unwrap()
}

#[test]
fn damaged_weight_files_are_errors() {
    let dir = temp_dir("malformed-weights");
    for (rel, ext) in [
        ("weights/tiny_bf16_f16_f32.safetensors", "safetensors"),
        ("wan/img_emb.safetensors", "safetensors"),
        ("weights/torch_synthclip_checkpoint.pt", "pt"),
        ("clip/slip_tiny_ddp.pt", "pt"),
    ] {
        let path = dir.join(format!("damaged.{ext}"));
        no_panics(rel, &[read(rel)], 4096, 400, 1, |b| {
            std::fs::write(&path, b).unwrap();
            if let Ok(set) = WeightSet::open(&path) {
                let names: Vec<String> = set.names().map(str::to_string).collect();
                for name in names {
                    let _ = set.shape(&name);
                    let _ = set.read_f32(&name);
                }
            }
        });
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn damaged_images_are_errors() {
    let seeds: Vec<Vec<u8>> =
        ["clip/ref.jpg", "clip/ref.png", "clip/ref.webp", "data/case_jpeg_src.jpg"].iter().map(|r| read(r)).collect();
    no_panics("images", &seeds, 512, 200, 2, |b| {
        let _ = ImageRgb::decode(b, "image");
    });
}

#[test]
fn damaged_text_inputs_are_errors() {
    let concepts = b"dog\ncat\n# comment\nred car\n  spaces  \n\nNew York\n".to_vec();
    let jsonl = br#"{"concept": "dog", "caption": "a dog on grass"}
{"concept": "cat", "caption": "a \"cat\" \u00e9"}
"#
    .to_vec();
    let tsv = b"concept\tcaption\ndog\ta dog on grass\ncat\ta cat\n".to_vec();
    let templates = b"a photo of a {concept}\n{concept} in the wild\n".to_vec();
    let csv = b"video,prompt\na.png,\"a red, \"\"quoted\"\" circle\"\nb.png,plain\n".to_vec();
    let reply =
        br#"{"choices":[{"message":{"role":"assistant","content":"A dog runs."},"finish_reason":"stop"}]}"#.to_vec();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    no_panics("concepts", &[concepts], 256, 1000, 3, |b| {
        let _ = ConceptBank::parse(&text(b), "concepts");
    });
    no_panics("captions", &[jsonl, tsv.clone()], 256, 1000, 4, |b| {
        let _ = captions::parse_caption_rows(&text(b), "captions");
    });
    no_panics("templates", &[templates], 256, 1000, 5, |b| {
        let _ = captions::parse_templates(&text(b), "templates");
    });
    no_panics("tables", &[csv, tsv], 256, 1000, 6, |b| {
        let _ = data::csv::parse_csv(&text(b), "table");
        let _ = data::csv::parse_delimited(&text(b), '\t', "table");
    });
    no_panics("chat replies", &[reply], 256, 1000, 7, |b| {
        let _ = llm::parse_chat_reply(b);
    });
}

#[test]
fn damaged_tokenizer_files_are_errors() {
    let t5 = read("t5/tokenizer.json");
    no_panics("tokenizer.json", std::slice::from_ref(&t5), t5.len(), 200, 8, |b| {
        if let Ok(tok) = T5Tokenizer::from_bytes(b, 16) {
            let _ = tok.encode(&["hello world \u{e9} \u{65e5}\u{672c}"]);
        }
    });
    // The CLIP merges, damaged after gzip decompression would reject them: recompressed.
    let merges = {
        use std::io::Read;
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(&include_bytes!("../assets/clip/bpe_simple_vocab_16e6.txt.gz")[..])
            .read_to_end(&mut text)
            .unwrap();
        text
    };
    no_panics("CLIP merges", &[merges], 4096, 20, 9, |b| {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b).unwrap();
        if let Ok(tok) = ClipTokenizer::from_merges_gz(&gz.finish().unwrap()) {
            let _ = tok.encode_text("a photo of a dog");
        }
    });
}

/// Sets one or two integer fields of a config to extremes, then parses it and loads the
/// fixture weights with it (which must then report the mismatch).
#[test]
fn extreme_config_sizes_are_errors() {
    const VALUES: [&str; 12] = [
        "18446744073709551615",
        "9223372036854775807",
        "4294967296",
        "1048577",
        "1048576",
        "65536",
        "64",
        "16",
        "7",
        "3",
        "1",
        "0",
    ];
    let cases: [(&str, &str); 4] = [
        ("wan/diffusers/config.json", "wan/diffusers"),
        ("t5/text_encoder/config.json", "t5/text_encoder"),
        ("clip/image_encoder/config.json", "clip/image_encoder"),
        ("wan/synthos_config/config.json", ""),
    ];
    let mut rng = Rng::new(10);
    let mut panicked = Vec::new();
    for (config, weights) in cases {
        let base: Value = serde_json::from_slice(&read(config)).unwrap();
        let keys: Vec<String> =
            base.as_object().unwrap().iter().filter(|(_, v)| v.is_u64()).map(|(k, _)| k.clone()).collect();
        for _ in 0..60 {
            let mut json = base.clone();
            for _ in 0..1 + below(&mut rng, 2) {
                let key = &keys[below(&mut rng, keys.len())];
                json[key] = serde_json::from_str(VALUES[below(&mut rng, VALUES.len())]).unwrap();
            }
            // Every parser reads every config; a config that parses loads its own weights.
            let run = || {
                let _ = vae::VaeConfig::from_json(&json);
                if let (Ok(cfg), true) = (wan::WanConfig::from_json(&json), weights.starts_with("wan")) {
                    let _ = wan::WanModel::load(&cfg, &[fixture(weights)], Device::Cpu, DType::F32);
                }
                if let (Ok(cfg), true) = (t5::T5Config::from_json(&json), weights.starts_with("t5")) {
                    let _ = t5::T5Encoder::load(&cfg, fixture(weights), Device::Cpu, DType::F32);
                }
                if let (Ok(cfg), true) = (ClipVisionConfig::from_json(&json), weights.starts_with("clip")) {
                    let _ = ClipVisionEncoder::load(&cfg, fixture(weights), Device::Cpu, DType::F32);
                }
            };
            if catch_unwind(AssertUnwindSafe(run)).is_err() {
                panicked.push(json.to_string());
            }
        }
    }
    assert!(panicked.is_empty(), "{} configs panicked, the first: {}", panicked.len(), panicked[0]);
}

#[test]
fn damaged_dataset_tables_are_errors() {
    let dir = temp_dir("malformed-datasets");
    std::fs::copy(fixture("clip/ref.png"), dir.join("a.png")).unwrap();
    std::fs::copy(fixture("clip/ref.jpg"), dir.join("b b.jpg")).unwrap();
    let csv = b"video,prompt\na.png,\"a red, \"\"quoted\"\" circle\"\n\"b b.jpg\",plain\n".to_vec();
    let tsv = b"filepath\ttitle\na.png\ta red circle\nb b.jpg\tplain words\n".to_vec();
    no_panics("metadata.csv", &[csv], 256, 400, 11, |b| {
        std::fs::write(dir.join("metadata.csv"), b).unwrap();
        let _ = data::SynthosDataset::open(&dir, &data::DatasetOptions::default());
    });
    let table = dir.join("train.tsv");
    no_panics("train.tsv", &[tsv], 256, 400, 12, |b| {
        std::fs::write(&table, b).unwrap();
        if let Ok(set) = data::CaptionDataset::open(&table, &data::CaptionOptions::default()) {
            for i in 0..set.len() + 1 {
                let _ = set.caption(i);
            }
        }
    });
    std::fs::remove_dir_all(dir).unwrap();
}
