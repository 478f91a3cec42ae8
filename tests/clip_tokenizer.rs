//! The CLIP tokenizer against OpenCLIP 3.3.0's `SimpleTokenizer` and a SLIP (SynthCLIP)
//! reproduction (fixtures from tests/reference/make_clip_tokenizer_fixtures.py): ids
//! without specials, rows of 77 in both truncations, pooling positions, decoding, and
//! Python's lower-casing code point by code point; then properties of the rows on random
//! captions, the ASCII round trip, and bad merge files.
mod common;
use common::temp_dir;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;
use synthos_engine::tokenizer::{
    ClipDialect, ClipTokenizer, ClipTokens, Truncation, CLIP_CONTEXT_LENGTH, CLIP_END_ID, CLIP_PAD_ID, CLIP_START_ID,
    CLIP_VOCAB_SIZE,
};
use synthos_engine::Rng;

fn asset() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/clip/bpe_simple_vocab_16e6.txt.gz")
}

fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip/tokenizer.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

fn open_clip() -> &'static ClipTokenizer {
    static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
    TOK.get_or_init(|| ClipTokenizer::new().unwrap())
}

fn slip() -> &'static ClipTokenizer {
    static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
    TOK.get_or_init(|| ClipTokenizer::slip().unwrap())
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn cases() -> &'static [Value] {
    fixture()["cases"].as_array().unwrap()
}

fn texts() -> Vec<&'static str> {
    cases().iter().map(|c| c["text"].as_str().unwrap()).collect()
}

#[test]
fn constants_match_the_reference() {
    let f = fixture();
    assert_eq!(f["context_length"].as_u64(), Some(CLIP_CONTEXT_LENGTH as u64));
    assert_eq!(f["vocab_size"].as_u64(), Some(CLIP_VOCAB_SIZE as u64));
    assert_eq!(f["start_id"].as_u64(), Some(u64::from(CLIP_START_ID)));
    assert_eq!(f["end_id"].as_u64(), Some(u64::from(CLIP_END_ID)));
    for tok in [open_clip(), slip()] {
        assert_eq!(tok.vocab_size(), CLIP_VOCAB_SIZE);
        assert_eq!(tok.context_length(), CLIP_CONTEXT_LENGTH);
    }
    assert_eq!(open_clip().dialect(), ClipDialect::OpenClip);
    assert_eq!(slip().dialect(), ClipDialect::Slip);
    assert_eq!(ClipDialect::OpenClip.truncation(), Truncation::KeepEnd);
    assert_eq!(ClipDialect::Slip.truncation(), Truncation::DropEnd);
    assert_eq!(Truncation::default(), Truncation::KeepEnd);
}

/// The shipped merge file is OpenCLIP's (no sha256 crate here: size, line count, header,
/// first and last merge used; gzip's CRC-32 is checked while decompressing).
#[test]
fn shipped_merges_file_is_open_clips() {
    let gz = std::fs::read(asset()).unwrap();
    assert_eq!(gz.len(), 1_356_917);
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz.as_slice()).read_to_string(&mut text).unwrap();
    let lines: Vec<&str> = text.split('\n').collect();
    let f = &fixture()["merges_file"];
    assert_eq!(lines.len() as u64, f["lines"].as_u64().unwrap());
    assert_eq!(lines[0], f["header"].as_str().unwrap());
    assert_eq!(lines[1], f["first_merge"].as_str().unwrap());
    assert_eq!(lines[48_894], f["last_merge"].as_str().unwrap());
    // The file on disk and the embedded copy build the same tokenizer.
    let from_disk = ClipTokenizer::from_file(asset()).unwrap();
    let all = texts();
    assert_eq!(from_disk.tokenize(&all, Truncation::KeepEnd), open_clip().tokenize(&all, Truncation::KeepEnd));
}

#[test]
fn encode_matches_open_clip_and_slip() {
    let mut bad = Vec::new();
    for c in cases() {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["encode"]);
        let want_slip = c.get("encode_slip").map(ids).unwrap_or_else(|| want.clone());
        let (got, got_slip) = (open_clip().encode_text(text), slip().encode_text(text));
        if got != want {
            bad.push(format!("open_clip {text:?}:\n  got  {got:?}\n  want {want:?}"));
        }
        if got_slip != want_slip {
            bad.push(format!("slip {text:?}:\n  got  {got_slip:?}\n  want {want_slip:?}"));
        }
    }
    assert!(bad.is_empty(), "{} mismatches:\n{}", bad.len(), bad.join("\n"));
}

/// Rows of both truncations and their pooling positions, as a batch and one by one.
#[test]
fn rows_match_open_clip_and_slip() {
    let all = texts();
    for (tok, truncation, key) in
        [(open_clip(), Truncation::KeepEnd, "open_clip"), (slip(), Truncation::DropEnd, "slip")]
    {
        let rows = tok.tokenize(&all, truncation);
        assert_eq!(rows.batch(), all.len());
        assert_eq!(rows.ids.len(), all.len() * CLIP_CONTEXT_LENGTH);
        for (b, c) in cases().iter().enumerate() {
            let text = c["text"].as_str().unwrap();
            assert_eq!(rows.row(b), ids(&c[key]).as_slice(), "{key} row of {text:?}");
            let pool = c[format!("{key}_pool")].as_u64().unwrap() as usize;
            assert_eq!(rows.pool_index(b), pool, "{key} pooling position of {text:?}");
            assert_eq!(tok.tokenize(&[text], truncation).row(0), rows.row(b), "{key}: {text:?} alone");
        }
        let pools: Vec<usize> = cases().iter().map(|c| c[format!("{key}_pool")].as_u64().unwrap() as usize).collect();
        assert_eq!(rows.pool_indices(), pools);
        assert_eq!(rows.ids_i64(), rows.ids.iter().map(|&i| i as i64).collect::<Vec<_>>());
    }
}

/// Which rows the truncations cut, in the fixtures: the 75-piece caption fits exactly, the
/// 76-piece one is the first without an end token under SynthCLIP's truncation.
#[test]
fn truncation_boundary_in_the_fixtures() {
    let cat_rows = |n: usize| {
        let text = "cat ".repeat(n);
        let c = cases().iter().find(|c| c["text"].as_str() == Some(text.as_str())).unwrap();
        (ids(&c["open_clip"]), ids(&c["slip"]))
    };
    let (keep, drop) = cat_rows(75);
    assert_eq!(keep, drop);
    assert_eq!(keep[76], CLIP_END_ID);
    for n in [76, 77, 100] {
        let (keep, drop) = cat_rows(n);
        assert_eq!(keep[..76], drop[..76]);
        assert_eq!((keep[76], drop[76]), (CLIP_END_ID, 2368), "{n} cats");
        assert!(!drop.contains(&CLIP_END_ID));
    }
}

#[test]
fn decode_matches_open_clip_and_slip() {
    for c in cases() {
        let text = c["text"].as_str().unwrap();
        let want = c["decode"].as_str().unwrap();
        assert_eq!(open_clip().decode(&ids(&c["encode"])).unwrap(), want, "decode of {text:?}");
        if let Some(enc) = c.get("encode_slip") {
            assert_eq!(
                slip().decode(&ids(enc)).unwrap(),
                c["decode_slip"].as_str().unwrap(),
                "slip decode of {text:?}"
            );
        }
    }
    for d in fixture()["decodes"].as_array().unwrap() {
        let seq = ids(&d["ids"]);
        assert_eq!(open_clip().decode(&seq).unwrap(), d["open_clip"].as_str().unwrap(), "decode of {seq:?}");
        assert_eq!(slip().decode(&seq).unwrap(), d["slip"].as_str().unwrap(), "slip decode of {seq:?}");
    }
    let err = open_clip().decode(&[320, CLIP_VOCAB_SIZE as u32]).unwrap_err().to_string();
    assert!(err.contains("49408"), "{err}");
}

/// `str.to_lowercase` against Python's `str.lower`, code point by code point, on every
/// code point Python's Unicode tables assign (newer ones may differ by Unicode version).
#[test]
fn lowercase_matches_python_on_assigned_code_points() {
    let f = fixture();
    let changes: HashMap<u32, &str> = f["lower_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_u64().unwrap() as u32, e[1].as_str().unwrap()))
        .collect();
    let unassigned: Vec<(u32, u32)> = f["unassigned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap() as u32, r[1].as_u64().unwrap() as u32))
        .collect();
    let assigned = |cp: u32| !unassigned.iter().any(|&(a, b)| (a..=b).contains(&cp));
    let mut bad = Vec::new();
    let mut checked = 0;
    for c in (0..=0x10_FFFFu32).filter_map(char::from_u32) {
        let cp = u32::from(c);
        if !assigned(cp) {
            continue;
        }
        checked += 1;
        let ours = c.to_string().to_lowercase();
        let python = changes.get(&cp).map(|s| s.to_string()).unwrap_or_else(|| c.to_string());
        if ours != python {
            bad.push(format!("U+{cp:04X}: ours {ours:?}, python {python:?}"));
        }
    }
    assert!(checked > 280_000, "only {checked} code points checked");
    assert!(bad.is_empty(), "{} differences: {}", bad.len(), bad.join("; "));
}

/// A word list mixing plain words, accents, CJK, digits, punctuation and contractions.
const WORDS: &[&str] = &[
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "dog",
    "Running",
    "über",
    "naïve",
    "東京",
    "写真",
    "42",
    "3.5",
    "!",
    "?!",
    "!;",
    "don't",
    "it's",
    "—",
    "(big)",
    "#tag",
    "e-mail",
    "x86_64",
    "ÉCOLE",
    "😀",
    "🇫🇷",
    "supercalifragilistic",
];

fn random_caption(rng: &mut Rng, max_words: usize) -> String {
    let n = rng.below(max_words + 1);
    (0..n).map(|_| WORDS[rng.below(WORDS.len())]).collect::<Vec<_>>().join(if rng.below(4) == 0 { "  " } else { " " })
}

/// What every row must satisfy whatever the caption (none of these words spells a special
/// token, so the only start and end ids are the ones the tokenizer adds).
fn check_rows(tok: &ClipTokenizer, texts: &[String], keep: &ClipTokens, drop: &ClipTokens) {
    let len = tok.context_length();
    for (b, text) in texts.iter().enumerate() {
        let enc = tok.encode_text(text);
        assert!(enc.iter().all(|&id| id < CLIP_START_ID), "{text:?}");
        let (k, d) = (keep.row(b), drop.row(b));
        assert_eq!((k.len(), d.len()), (len, len));
        let n = (enc.len() + 2).min(len);
        assert_eq!((keep.lengths[b], drop.lengths[b]), (n, n), "{text:?}");
        assert!(k[n..].iter().chain(&d[n..]).all(|&id| id == CLIP_PAD_ID), "padding of {text:?}");
        let mut full = vec![CLIP_START_ID];
        full.extend(&enc);
        full.push(CLIP_END_ID);
        assert_eq!(d[..n], full[..n], "DropEnd row of {text:?}");
        if enc.len() + 2 <= len {
            assert_eq!(k, d, "{text:?} fits: both truncations agree");
            assert_eq!(keep.pool_index(b), n - 1);
        } else {
            assert_eq!(k[..len - 1], full[..len - 1], "KeepEnd row of {text:?}");
            assert_eq!(k[len - 1], CLIP_END_ID, "KeepEnd keeps the end token: {text:?}");
            assert!(!d.contains(&CLIP_END_ID), "DropEnd has no end token: {text:?}");
            assert_eq!(keep.pool_index(b), len - 1);
            assert_eq!(drop.pool_index(b), 0, "SynthCLIP pools a long caption at the start token");
        }
    }
}

#[test]
fn rows_have_the_context_length_padding_and_end_token() {
    let mut rng = Rng::new(7);
    let texts: Vec<String> = (0..64).map(|_| random_caption(&mut rng, 90)).collect();
    let tok = open_clip();
    let (keep, drop) = (tok.tokenize(&texts, Truncation::KeepEnd), tok.tokenize(&texts, Truncation::DropEnd));
    assert_eq!(keep.context_length, CLIP_CONTEXT_LENGTH);
    assert!(keep.lengths.iter().any(|&n| n < CLIP_CONTEXT_LENGTH) && keep.lengths.contains(&CLIP_CONTEXT_LENGTH));
    check_rows(tok, &texts, &keep, &drop);

    // Other context lengths, down to a single id.
    for len in [1, 2, 3, 16] {
        let tok = ClipTokenizer::new().unwrap().with_context_length(len).unwrap();
        let (keep, drop) = (tok.tokenize(&texts, Truncation::KeepEnd), tok.tokenize(&texts, Truncation::DropEnd));
        assert_eq!(keep.ids.len(), texts.len() * len);
        check_rows(&tok, &texts, &keep, &drop);
    }
    assert!(ClipTokenizer::new().unwrap().with_context_length(0).is_err());

    let empty = tok.tokenize::<&str>(&[], Truncation::KeepEnd);
    assert_eq!((empty.batch(), empty.ids.len()), (0, 0));
}

/// Decoding gives the cleaned, lower-cased text back with spaces only moved around, and
/// encoding that again gives the same ids (ASCII captions).
#[test]
fn ascii_round_trip() {
    let mut rng = Rng::new(11);
    let printable: Vec<char> = (0x20u8..0x7f).map(char::from).collect();
    let tok = open_clip();
    for i in 0..300 {
        let text: String = if i % 2 == 0 {
            random_caption(&mut rng, 12).chars().filter(char::is_ascii).collect()
        } else {
            (0..rng.below(40)).map(|_| printable[rng.below(printable.len())]).collect()
        };
        let enc = tok.encode_text(&text);
        let decoded = tok.decode(&enc).unwrap();
        let squeeze = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
        assert_eq!(squeeze(&decoded), squeeze(&text.to_lowercase()), "{text:?}");
        assert_eq!(tok.encode_text(&decoded), enc, "{text:?} re-encoded from {decoded:?}");
    }
}

/// The cache gives the same ids as a fresh tokenizer, from several threads at once.
#[test]
fn shared_between_threads() {
    let all = texts();
    let want = ClipTokenizer::new().unwrap().tokenize(&all, Truncation::KeepEnd);
    let tok = ClipTokenizer::new().unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| tok.tokenize(&all, Truncation::KeepEnd))).collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), want);
        }
    });
    assert_eq!(tok.tokenize(&all, Truncation::KeepEnd), want);
}

fn gzip(text: &str) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(text.as_bytes()).unwrap();
    enc.finish().unwrap()
}

/// The real file's text with line `line` (1 = first merge) replaced.
fn merges_with(line: usize, replacement: &str) -> Vec<u8> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::read(asset()).unwrap().as_slice()).read_to_string(&mut text).unwrap();
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines[line] = replacement;
    gzip(&lines.join("\n"))
}

#[test]
fn bad_merge_files_are_clear_errors() {
    let err = |bytes: &[u8]| ClipTokenizer::from_merges_gz(bytes).unwrap_err().to_string();

    let e = err(b"i n\nt h\n");
    assert!(e.contains("gzip"), "{e}");
    let e = err(&gzip("#version: 0.2\ni n\nt h\n"));
    assert!(e.contains("3 merge lines") && e.contains("48894"), "{e}"); // the empty last line counts, as in Python
    let e = err(&merges_with(3, "a b c"));
    assert!(e.contains("line 4") && e.contains("two symbols"), "{e}");
    let e = err(&merges_with(3, "a"));
    assert!(e.contains("line 4"), "{e}");
    let e = err(&merges_with(3, "zz q"));
    assert!(e.contains("line 4") && e.contains("unknown symbol \"zz\""), "{e}");
    let e = err(&merges_with(3, "i n"));
    assert!(e.contains("line 4") && e.contains("already in the vocabulary"), "{e}");
    let mut truncated = std::fs::read(asset()).unwrap();
    truncated.truncate(truncated.len() / 2);
    let e = err(&truncated);
    assert!(e.contains("gzip"), "{e}");

    let dir = temp_dir("clip_tok_bad");
    let path = dir.join("merges.txt.gz");
    std::fs::write(&path, b"not gzip").unwrap();
    let e = ClipTokenizer::from_file(&path).unwrap_err().to_string();
    assert!(e.contains("merges.txt.gz") && e.contains("gzip"), "{e}");
    let missing = dir.join("missing.txt.gz");
    let e = ClipTokenizer::from_file(&missing).unwrap_err().to_string();
    assert!(e.contains("missing.txt.gz") && e.contains("cannot read"), "{e}");
}
