//! The umT5 text side: Wan's prompt cleaning against ftfy + html.unescape, token ids
//! against Python `tokenizers`, the relative-position buckets and the encoder against
//! transformers' `UMT5EncoderModel` (fixtures from tests/reference/make_encoder_fixtures.py),
//! the pipeline's zeroed rows, bad inputs, and the GPU against the CPU.
mod common;
use common::temp_dir;

use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;
use synthos_engine::models::t5::{relative_position_bucket, T5Config, T5Encoder, TextEncoder};
use synthos_engine::nn::Module;
use synthos_engine::tokenizer::{clean_prompt, html_unescape, T5Tokenizer, TokenBatch, UMT5_TEXT_LEN};
use synthos_engine::weights::WeightSet;
use synthos_engine::{DType, Device};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5").join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// (values, shape) of a tensor of the expected-output file.
fn expected(name: &str) -> (Vec<f32>, Vec<usize>) {
    let set = WeightSet::open(fixture("expected.safetensors")).unwrap();
    (set.read_f32(name).unwrap(), set.shape(name).unwrap().to_vec())
}

/// The token rows the reference encoded (ids and lengths from its attention mask).
fn expected_tokens() -> TokenBatch {
    let (ids, shape) = expected("ids");
    let (mask, _) = expected("mask");
    let lengths = mask.chunks(shape[1]).map(|row| row.iter().filter(|&&m| m > 0.5).count()).collect();
    TokenBatch { ids: ids.iter().map(|&v| v as u32).collect(), lengths, text_len: shape[1] }
}

fn prompts() -> Vec<String> {
    json("prompts.json")["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
}

fn tiny_text_encoder(device: Device) -> TextEncoder {
    TextEncoder::load(&T5Config::tiny(), fixture("text_encoder"), fixture("tokenizer.json"), device, DType::BF16)
        .unwrap()
}

/// `hidden` with rows at and past each length zeroed (the pipelines' text embedding).
fn zero_past_lengths(hidden: &[f32], lengths: &[usize], l: usize, d: usize) -> Vec<f32> {
    let mut out = hidden.to_vec();
    for (b, &n) in lengths.iter().enumerate() {
        out[(b * l + n) * d..(b + 1) * l * d].iter_mut().for_each(|v| *v = 0.0);
    }
    out
}

#[test]
fn tiny_preset_is_the_fixture_config() {
    let from_json = T5Config::from_json_file(fixture("text_encoder/config.json")).unwrap();
    assert_eq!(from_json.text_len, UMT5_TEXT_LEN, "config.json carries no text length: the pipelines' 512");
    assert_eq!(T5Config { text_len: 160, ..from_json }, T5Config::tiny());
    assert_eq!(T5Config::preset("umt5-xxl").unwrap(), T5Config::umt5_xxl());
    let xxl = T5Config::umt5_xxl();
    assert_eq!(
        (xxl.vocab_size, xxl.d_model, xxl.num_layers, xxl.inner_dim(), xxl.d_ff),
        (256_384, 4096, 24, 4096, 10_240)
    );
    let e = T5Config::preset("t5-small").unwrap_err().to_string();
    assert!(e.contains("t5-small") && e.contains("umt5-xxl"), "{e}");
}

#[test]
fn relative_buckets_match_transformers() {
    let b = json("buckets.json");
    let first = b["first_relative_position"].as_i64().unwrap();
    let buckets = b["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 2 * UMT5_TEXT_LEN - 1);
    for (k, want) in buckets.iter().enumerate() {
        let rel = first + k as i64;
        assert_eq!(relative_position_bucket(rel, 32, 128), want.as_u64().unwrap() as usize, "relative position {rel}");
    }
    // the boundaries that make the layout: exact below 8, log buckets, both halves capped
    assert_eq!(relative_position_bucket(7, 32, 128), 16 + 7);
    assert_eq!(relative_position_bucket(-7, 32, 128), 7);
    assert_eq!(relative_position_bucket(-511, 32, 128), 15);
    assert_eq!(relative_position_bucket(511, 32, 128), 31);
}

#[test]
fn prompt_cleaning_matches_wan_reference() {
    let cases = json("tokenizer_cases.json");
    let mut mojibake_cases = 0;
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let reference = case["cleaned"].as_str().unwrap();
        let without_encoding_fix = case["cleaned_without_fix_encoding"].as_str().unwrap();
        let ours = clean_prompt(text);
        // ftfy's mojibake repair is the one fixer not reproduced (module doc of `tokenizer`)
        assert_eq!(ours, without_encoding_fix, "cleaning {text:?}");
        if reference != without_encoding_fix {
            mojibake_cases += 1;
            assert!(text.contains('\u{c3}'), "only mojibake may differ: {text:?}");
        }
    }
    assert_eq!(mojibake_cases, 1, "the fixture's one mojibake case documents the difference");
}

#[test]
fn html_unescape_follows_python() {
    // cases worked out from CPython's html.unescape
    for (input, want) in [
        ("&amp;amp;", "&amp;"),
        ("&lt;b&gt; &#60; &#x3c; &#X3C;", "<b> < < <"),
        ("&ampx &amp &copy2024 &notit; &notin; &not", "&x & ©2024 ¬it; ∉ ¬"),
        (
            "&#0; &#13; &#128; &#x9d; &#xD800; &#1114112; &#99999999999999999999",
            "\u{FFFD} \r € \u{9d} \u{FFFD} \u{FFFD} \u{FFFD}",
        ),
        ("&#1;&#11;&#x7f;&#xFDD0;&#xFFFE;&#x10FFFF;end", "end"),
        ("&#65&#66; &#x; &#; &; & &unknown; &AMP &TRADE &TRADE;", "AB &#x; &#; &; & &unknown; & &TRADE ™"),
        ("&lang;&rang; &apos; &Eacute;&eacute", "\u{27E8}\u{27E9} ' Éé"),
    ] {
        assert_eq!(html_unescape(input), want, "html_unescape({input:?})");
    }
}

#[test]
fn token_ids_match_python_tokenizers() {
    let tok = T5Tokenizer::from_file(fixture("tokenizer.json"), UMT5_TEXT_LEN).unwrap();
    assert_eq!((tok.pad_id(), tok.eos_id(), tok.text_len()), (0, 1, 512));
    let cases = json("tokenizer_cases.json");
    let cases = cases.as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let batch = tok.encode(&texts).unwrap();
    assert_eq!(batch.batch(), cases.len());
    let mut truncated = 0;
    for (b, case) in cases.iter().enumerate() {
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let cleaned = case["cleaned_without_fix_encoding"].as_str().unwrap();
        assert_eq!(tok.encode_cleaned(cleaned).unwrap(), want, "ids of {cleaned:?}");
        let row = batch.row(b);
        assert_eq!(batch.lengths[b], want.len(), "length of {:?}", texts[b]);
        assert_eq!(&row[..want.len()], &want[..], "ids of {:?}", texts[b]);
        assert!(row[want.len()..].iter().all(|&id| id == 0), "padding of {:?}", texts[b]);
        assert_eq!(*want.last().unwrap(), 1, "</s> ends every row");
        truncated += usize::from(want.len() == UMT5_TEXT_LEN);
    }
    assert!(truncated >= 1, "a prompt past 512 tokens is truncated to 511 + </s>");
    // the empty prompt is its </s> alone
    assert_eq!(tok.encode(&[""]).unwrap().lengths, vec![1]);
}

#[test]
fn encoder_matches_transformers_on_cpu() {
    let tokens = expected_tokens();
    let (hidden, shape) = expected("hidden");
    let (l, d) = (shape[1], shape[2]);
    // the sharded index json and the directory name the same weights
    for source in [fixture("text_encoder/model.safetensors.index.json"), fixture("text_encoder")] {
        let model = T5Encoder::load(&T5Config::tiny(), &source, Device::Cpu, DType::F32).unwrap();
        let out = model.forward(&tokens).unwrap();
        assert_eq!(out.shape(), &shape[..]);
        let got = out.to_vec().unwrap();
        let err = common::rel_err(&got, &hidden);
        assert!(err <= 1e-4, "forward vs UMT5EncoderModel: relative error {err:e} ({})", source.display());
        common::assert_close(&got, &hidden, 1e-4, 1e-4, "umT5 hidden states");
        let encoded = model.encode(&tokens).unwrap().to_vec().unwrap();
        let want = zero_past_lengths(&hidden, &tokens.lengths, l, d);
        common::assert_close(&encoded, &want, 1e-4, 1e-4, "umT5 text embedding");
        // rows past the length are exactly zero; the </s> row is not
        for (b, &n) in tokens.lengths.iter().enumerate() {
            let row = |i: usize| &encoded[(b * l + i) * d..(b * l + i + 1) * d];
            assert!(row(n - 1).iter().any(|&v| v != 0.0), "row {b}: the </s> row is kept");
            assert!((n..l).all(|i| row(i).iter().all(|&v| v == 0.0)), "row {b}: rows past {n} are zero");
        }
    }
}

#[test]
fn encode_text_is_the_reference_pipeline() {
    let enc = tiny_text_encoder(Device::Cpu);
    let prompts = prompts();
    let tokens = enc.tokenizer.encode(&prompts).unwrap();
    assert_eq!(tokens, expected_tokens(), "cleaning + tokenizing at the tiny text length");
    let (hidden, shape) = expected("hidden");
    let out = enc.encode_text(&prompts).unwrap();
    assert_eq!(out.shape(), &[prompts.len(), 160, 64]);
    let want = zero_past_lengths(&hidden, &tokens.lengths, shape[1], shape[2]);
    common::assert_close(&out.to_vec().unwrap(), &want, 1e-4, 1e-4, "encode_text");
    // the empty prompt (fixture row 1) is "</s> then zeros", not all zeros
    assert_eq!(tokens.lengths[1], 1);
    let empty = enc.encode_text(&[""]).unwrap().to_vec().unwrap();
    assert!(empty[..64].iter().any(|&v| v != 0.0) && empty[64..].iter().all(|&v| v == 0.0));
}

#[test]
fn padding_does_not_leak_into_real_rows() {
    // a prompt's rows do not depend on what else is in the batch (keys past its length
    // are masked), so alone and next to a longer prompt it encodes the same
    let enc = tiny_text_encoder(Device::Cpu);
    let short = "a red bird";
    let alone = enc.encode_text(&[short]).unwrap().to_vec().unwrap();
    let batched = enc.encode_text(&[short, &prompts()[3]]).unwrap().to_vec().unwrap();
    common::assert_close(&batched[..alone.len()], &alone, 1e-5, 1e-5, "short prompt in a batch");
}

#[test]
fn random_encoder_lists_its_parameters_in_hf_naming() {
    let model = T5Encoder::random(&T5Config::tiny(), 3, Device::Cpu, DType::F32).unwrap();
    let names: Vec<String> = model.named_params().into_iter().map(|(n, _)| n).collect();
    let set = WeightSet::open(fixture("text_encoder")).unwrap();
    let mut want: Vec<&str> = set.names().collect();
    want.sort_unstable();
    let mut got: Vec<&str> = names.iter().map(String::as_str).collect();
    got.sort_unstable();
    assert_eq!(got, want);
}

#[test]
fn bad_tokenizer_files_are_named_errors() {
    let dir = temp_dir("t5-tok");
    let missing = dir.join("missing.json");
    let e = T5Tokenizer::from_file(&missing, 512).err().unwrap().to_string();
    assert!(e.contains("missing.json") && e.contains("cannot read"), "{e}");

    let malformed = dir.join("malformed.json");
    std::fs::write(&malformed, b"{\"model\": {\"type\": \"Unigram\", \"vocab\": [[").unwrap();
    let e = T5Tokenizer::from_file(&malformed, 512).err().unwrap().to_string();
    assert!(e.contains("malformed.json") && e.contains("not a valid tokenizer.json"), "{e}");

    let mut tok: Value = json("tokenizer.json");
    tok["post_processor"] = Value::Null;
    let no_eos = dir.join("no_eos.json");
    std::fs::write(&no_eos, serde_json::to_vec(&tok).unwrap()).unwrap();
    let e = T5Tokenizer::from_file(&no_eos, 512).err().unwrap().to_string();
    assert!(e.contains("no_eos.json") && e.contains("</s>"), "{e}");

    // A corrupt precompiled character map (the tokenizers library panics on it).
    let mut tok: Value = json("tokenizer.json");
    let charsmap = tok["normalizer"]["normalizers"][0]["precompiled_charsmap"]
        .as_str()
        .expect("the fixture's charsmap")
        .to_string();
    tok["normalizer"]["normalizers"][0]["precompiled_charsmap"] =
        Value::String(format!("{}=", &charsmap[..charsmap.len() - 3]));
    let corrupt = dir.join("corrupt_charsmap.json");
    std::fs::write(&corrupt, serde_json::to_vec(&tok).unwrap()).unwrap();
    let e = T5Tokenizer::from_file(&corrupt, 512).err().unwrap().to_string();
    assert!(e.contains("corrupt_charsmap.json") && e.contains("not a valid tokenizer.json"), "{e}");

    let e = T5Tokenizer::from_file(fixture("tokenizer.json"), 0).err().unwrap().to_string();
    assert!(e.contains("text length"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_weights_and_inputs_are_named_errors() {
    // wrong FFN width: every wi/wo tensor is reported mis-shaped, with file and shapes
    let wrong = T5Config { d_ff: 48, ..T5Config::tiny() };
    let e = T5Encoder::load(&wrong, fixture("text_encoder"), Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("mis-shaped") && e.contains("encoder.block.0.layer.1.DenseReluDense.wi_0.weight"), "{e}");
    assert!(e.contains("[48, 64]") && e.contains("[40, 64]"), "{e}");
    // one layer too many: its tensors are missing; too few: the last layer is unexpected
    let deeper = T5Config { num_layers: 4, ..T5Config::tiny() };
    let e = T5Encoder::load(&deeper, fixture("text_encoder"), Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("missing 'encoder.block.3.layer.0.SelfAttention.q.weight'"), "{e}");
    let shallower = T5Config { num_layers: 2, ..T5Config::tiny() };
    let e = T5Encoder::load(&shallower, fixture("text_encoder"), Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("unexpected 'encoder.block.2."), "{e}");
    let wrong_vocab = T5Config { vocab_size: 500, ..T5Config::tiny() };
    let e = T5Encoder::load(&wrong_vocab, fixture("text_encoder"), Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(e.contains("shared.weight") && e.contains("[500, 64]"), "{e}");

    let model = T5Encoder::load(&T5Config::tiny(), fixture("text_encoder"), Device::Cpu, DType::F32).unwrap();
    let mut tokens = expected_tokens();
    tokens.ids[5] = 416;
    let e = model.forward(&tokens).err().unwrap().to_string();
    assert!(e.contains("token id 416") && e.contains("416"), "{e}");
    let mut tokens = expected_tokens();
    tokens.lengths[2] = 0;
    let e = model.forward(&tokens).err().unwrap().to_string();
    assert!(e.contains("row 2") && e.contains("length 0"), "{e}");

    // tokenizer and model must agree on the text length
    let tok = T5Tokenizer::from_file(fixture("tokenizer.json"), 512).unwrap();
    let e = TextEncoder::new(tok, model).err().unwrap().to_string();
    assert!(e.contains("512") && e.contains("160"), "{e}");
    let e = tiny_text_encoder(Device::Cpu).encode_text::<&str>(&[]).err().unwrap().to_string();
    assert!(e.contains("no prompts"), "{e}");
}

/// bf16 tolerance for a whole encoder: relative L2 error and elementwise bounds.
#[test]
fn gpu_matches_cpu_on_the_fixture_model() {
    let Some(dev) = common::gpu() else { return };
    let prompts = prompts();
    let cpu = tiny_text_encoder(Device::Cpu).encode_text(&prompts).unwrap().to_vec().unwrap();
    let out = tiny_text_encoder(dev).encode_text(&prompts).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    let got = out.to_vec().unwrap();
    common::assert_bf16_close(&got, &cpu, "tiny umT5 on the GPU");
    // zeroed rows stay exactly zero on the GPU
    assert!(cpu.iter().zip(&got).all(|(c, g)| *c != 0.0 || *g == 0.0));
}

#[test]
fn gpu_matches_cpu_with_64_wide_heads() {
    let Some(dev) = common::gpu() else { return };
    // head dim 64 as in umT5-XXL, an odd text length, several layers
    let cfg = T5Config {
        vocab_size: 301,
        d_model: 192,
        d_kv: 64,
        d_ff: 200,
        num_layers: 4,
        num_heads: 3,
        text_len: 77,
        ..T5Config::umt5_xxl()
    };
    let mut ids = Vec::new();
    let lengths = vec![77, 1, 40];
    for (b, &n) in lengths.iter().enumerate() {
        ids.extend((0..77).map(|j| {
            if j + 1 < n {
                ((b * 131 + j * 17) % 299 + 2) as u32
            } else if j + 1 == n {
                1
            } else {
                0
            }
        }));
    }
    let tokens = TokenBatch { ids, lengths, text_len: 77 };
    let cpu = T5Encoder::random(&cfg, 11, Device::Cpu, DType::F32).unwrap().encode(&tokens).unwrap().to_vec().unwrap();
    let gpu = T5Encoder::random(&cfg, 11, dev, DType::BF16).unwrap().encode(&tokens).unwrap().to_vec().unwrap();
    common::assert_bf16_close(&gpu, &cpu, "umT5 (head dim 64) on the GPU");
}

#[test]
fn gpu_umt5_xxl_encodes_a_batch_of_8() {
    let Some(dev) = common::gpu() else { return };
    let cuda = synthos_engine::cuda::device(0).unwrap();
    let free_before = cuda.mem_info().unwrap().0;
    let t0 = Instant::now();
    let model = T5Encoder::random(&T5Config::umt5_xxl(), 5, dev, DType::BF16).unwrap();
    cuda.synchronize().unwrap();
    let init = t0.elapsed();
    let weights = free_before - cuda.mem_info().unwrap().0;
    let tokenizer = T5Tokenizer::from_file(fixture("tokenizer.json"), UMT5_TEXT_LEN).unwrap();
    let enc = TextEncoder::new(tokenizer, model).unwrap();
    let prompts: Vec<String> =
        (0..8).map(|i| format!("{} {}", prompts()[i % 4], "a detailed painting ".repeat(i * 9))).collect();
    let mut times = Vec::new();
    let mut out = None;
    for _ in 0..3 {
        let t = Instant::now();
        let o = enc.encode_text(&prompts).unwrap();
        cuda.synchronize().unwrap();
        times.push(t.elapsed().as_secs_f64());
        out = Some(o);
    }
    let out = out.unwrap();
    assert_eq!(out.shape(), &[8, 512, 4096]);
    let v = out.to_vec().unwrap();
    assert!(v.iter().all(|x| x.is_finite()), "umT5-XXL output is finite");
    let lengths = enc.tokenizer.encode(&prompts).unwrap().lengths;
    for (b, &n) in lengths.iter().enumerate() {
        let rows = &v[b * 512 * 4096..(b + 1) * 512 * 4096];
        assert!(rows[(n - 1) * 4096..n * 4096].iter().any(|&x| x != 0.0) && rows[n * 4096..].iter().all(|&x| x == 0.0));
    }
    let peak_used = free_before - cuda.mem_info().unwrap().0;
    eprintln!(
        "umT5-XXL on {}: random init {:.1} s, weights {:.2} GiB on the GPU (+ {:.2} GiB embedding on the host), \
         encode_text(8 prompts × 512): {:?} s (first includes warm-up), GPU memory in use after: {:.2} GiB",
        cuda.describe().unwrap_or_default(),
        init.as_secs_f64(),
        weights as f64 / (1u64 << 30) as f64,
        (256_384.0 * 4096.0 * 4.0) / (1u64 << 30) as f64,
        times.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>(),
        peak_used as f64 / (1u64 << 30) as f64,
    );
}
