//! The text half of the synthetic-data flywheel (`synth`): concept banks, caption files and
//! templates, balancing against hand-computed counts and the documented keep rule (exactly
//! and statistically), the chat-completions client against a local mock server (retries,
//! budget, malformed replies, refused connections, resume after a stop or a torn line),
//! bad inputs, and the two CLI commands end to end.
mod common;
use common::temp_dir;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use synthos_engine::synth::balance::{
    balance, caption_rng, is_word_char, keep_probability, seed_spacing, BalanceOptions, ConceptMatcher, MatchMode,
};
use synthos_engine::synth::captions::{
    captions_from_rows, clean_caption, parse_caption_rows, parse_templates, read_caption_rows, read_templates,
    template_captions, template_choice, CaptionRow, MultiLine, Rejection, TemplatePick,
};
use synthos_engine::synth::concepts::ConceptBank;
use synthos_engine::synth::llm::{
    caption_with_llm, chat_completions_url, open_caption_output, parse_chat_reply, request_body, seed_prompt,
    LlmOptions,
};
use synthos_engine::synth::report::{count_summary, log_spaced_ranks, write_balance_outputs};
use synthos_engine::synth::text_key;
use synthos_engine::Result;

const BIN: &str = env!("CARGO_BIN_EXE_synthos-engine");

fn err_of<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn rows(captions: &[&str]) -> Vec<CaptionRow> {
    captions
        .iter()
        .enumerate()
        .map(|(i, c)| CaptionRow { concept: None, caption: c.to_string(), line: i + 1 })
        .collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

// ---------------------------------------------------------------------------------------
// Concepts, caption files, templates
// ---------------------------------------------------------------------------------------

#[test]
fn concept_bank_trims_skips_blanks_merges_duplicates() {
    let bank = ConceptBank::parse("\u{feff}  dog \r\n\ncat\n dog\nNew York\n\t\n", "bank.txt").unwrap();
    assert_eq!(bank.concepts(), ["dog", "cat", "New York"]);
    assert_eq!(bank.lines(), [1, 3, 5]);
    assert_eq!(bank.duplicates().len(), 1);
    assert_eq!((bank.duplicates()[0].line, bank.duplicates()[0].first_line), (4, 1));
    assert_eq!(bank.index_of(" cat "), Some(1));
    // SynthCLIP's metadata.json form.
    let bank = ConceptBank::parse("[\"a\", \" b \", \"\", \"a\"]", "metadata.json").unwrap();
    assert_eq!(bank.concepts(), ["a", "b"]);
    assert_eq!(bank.duplicates()[0].line, 4);
}

#[test]
fn bad_concept_files_name_file_and_line() {
    let dir = temp_dir("synth-bad-concepts");
    let e = err_of(ConceptBank::read(write(&dir, "empty.txt", "")));
    assert!(e.contains("empty.txt") && e.contains("no concepts"), "{e}");
    let e = err_of(ConceptBank::read(write(&dir, "blank.txt", "\n  \n\n")));
    assert!(e.contains("blank.txt") && e.contains("no concepts"), "{e}");
    let p = dir.join("latin1.txt");
    fs::write(&p, b"dog\ncat\ncaf\xe9\n").unwrap();
    let e = err_of(ConceptBank::read(&p));
    assert!(e.contains("latin1.txt line 3") && e.contains("UTF-8"), "{e}");
    let e = err_of(ConceptBank::read(dir.join("missing.txt")));
    assert!(e.contains("missing.txt"), "{e}");
    let e = err_of(ConceptBank::read(write(&dir, "bad.json", "[\"a\",\n 3]")));
    assert!(e.contains("bad.json line 2"), "{e}");
}

#[test]
fn caption_files_jsonl_and_tsv() {
    let jsonl = "{\"concept\": \"dog\", \"caption\": \"A dog.\"}\n\n{\"caption\": \"no concept\", \"x\": 1}\n";
    let r = parse_caption_rows(jsonl, "c.jsonl").unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].concept.as_deref(), r[0].caption.as_str(), r[0].line), (Some("dog"), "A dog.", 1));
    assert_eq!((r[1].concept.as_deref(), r[1].line), (None, 3));

    let tsv = "id\tconcept\tcaption\n1\tdog\tA dog\tin a park\n2\tcat\t\"A \"\"cat\"\"\"\n";
    let r = parse_caption_rows(tsv, "c.tsv").unwrap();
    assert_eq!(r[0].caption, "A dog");
    assert_eq!((r[1].concept.as_deref(), r[1].caption.as_str(), r[1].line), (Some("cat"), "A \"cat\"", 3));
    let csv = "caption,concept\n\"a, b\",x\n";
    assert_eq!(parse_caption_rows(csv, "c.csv").unwrap()[0].caption, "a, b");
}

#[test]
fn bad_caption_files_name_file_and_line() {
    let e =
        err_of(parse_caption_rows("{\"concept\":\"a\",\"caption\":\"b\"}\n{\"concept\": \"a\", caption}\n", "c.jsonl"));
    assert!(e.contains("c.jsonl line 2") && e.contains("not JSON"), "{e}");
    let e = err_of(parse_caption_rows("{\"caption\":\"b\"}\n[1, 2]\n", "c.jsonl"));
    assert!(e.contains("c.jsonl line 2") && e.contains("JSON object"), "{e}");
    let e = err_of(parse_caption_rows("{\"caption\": 5}\n", "c.jsonl"));
    assert!(e.contains("line 1") && e.contains("\"caption\" must be a string"), "{e}");
    let e = err_of(parse_caption_rows("{\"concept\": \"x\"}\n", "c.jsonl"));
    assert!(e.contains("line 1") && e.contains("no \"caption\""), "{e}");
    let e = err_of(parse_caption_rows("concept\ttext\ndog\ta dog\n", "c.tsv"));
    assert!(e.contains("c.tsv line 1") && e.contains("no \"caption\" column") && e.contains("concept, text"), "{e}");
    let e = err_of(parse_caption_rows("concept\tcaption\ndog\ta dog\ncat\n", "c.tsv"));
    assert!(e.contains("c.tsv line 3") && e.contains("1 fields"), "{e}");
    let e = err_of(parse_caption_rows("", "c.tsv"));
    assert!(e.contains("c.tsv"), "{e}");
    let dir = temp_dir("synth-bad-captions");
    let e = err_of(read_caption_rows(write(&dir, "only-header.tsv", "concept\tcaption\n")));
    assert!(e.contains("only-header.tsv") && e.contains("no captions"), "{e}");
    // --from needs the concept of each row.
    let bank = ConceptBank::from_concepts(&["dog"]).unwrap();
    let r = parse_caption_rows("caption\na dog\n", "nc.tsv").unwrap();
    let e = err_of(captions_from_rows(&bank, &r, MultiLine::Drop, "nc.tsv"));
    assert!(e.contains("nc.tsv line 2") && e.contains("names no concept"), "{e}");
}

#[test]
fn import_cleans_like_model_replies() {
    let bank = ConceptBank::from_concepts(&["dog", "cat", "owl"]).unwrap();
    let text = "concept\tcaption\ndog\t\" A   \"\"happy\"\" dog runs. \"\nzebra\tA zebra\ncat\t\"Line one\nline two\"\n\
                dog\tone two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen\n";
    let r = parse_caption_rows(text, "f.tsv").unwrap();
    let (caps, s) = captions_from_rows(&bank, &r, MultiLine::Drop, "f.tsv").unwrap();
    assert_eq!(caps[0].caption, "A happy dog runs.");
    assert_eq!((s.rows, s.kept, s.not_in_bank, s.rejected, s.over_max_words), (4, 2, 1, 1, 1));
    assert_eq!(s.concepts_without_caption, 2); // cat (rejected), owl
    let (caps, _) = captions_from_rows(&bank, &r, MultiLine::FirstLine, "f.tsv").unwrap();
    assert!(caps.iter().any(|c| c.concept == "cat" && c.caption == "Line one"));
}

#[test]
fn clean_caption_follows_the_seed() {
    assert_eq!(clean_caption("  \"A red fox at dawn.\"\n", MultiLine::Drop), Ok("A red fox at dawn.".into()));
    assert_eq!(clean_caption("A \"quoted\"\tword", MultiLine::Drop), Ok("A quoted word".into()));
    assert_eq!(clean_caption("Caption.\n\n(12 words)", MultiLine::Drop), Err(Rejection::MultiLine));
    assert_eq!(clean_caption("\n Caption.\r\nNote", MultiLine::FirstLine), Ok("Caption.".into()));
    assert_eq!(clean_caption(" \"\" ", MultiLine::Drop), Err(Rejection::Empty));
    // Not cut to 15 words (the seed does not cut).
    let long = "w ".repeat(20);
    assert_eq!(clean_caption(&long, MultiLine::Drop).unwrap().split(' ').count(), 20);
}

#[test]
fn templates_all_and_one() {
    let dir = temp_dir("synth-templates");
    let e = err_of(read_templates(write(&dir, "t.txt", "a photo of a {}\n\nno placeholder here\n")));
    assert!(e.contains("t.txt line 3") && e.contains("no {}"), "{e}");
    let e = err_of(read_templates(write(&dir, "empty.txt", "\n\n")));
    assert!(e.contains("empty.txt") && e.contains("no templates"), "{e}");
    let t = parse_templates("a photo of a {}\n{} next to another {}\n", "t").unwrap();
    let bank = ConceptBank::from_concepts(&["dog", "cat"]).unwrap();
    let all = template_captions(&bank, &t, TemplatePick::All, 0);
    let texts: Vec<&str> = all.iter().map(|c| c.caption.as_str()).collect();
    assert_eq!(texts, ["a photo of a dog", "dog next to another dog", "a photo of a cat", "cat next to another cat"]);
    let one = template_captions(&bank, &t, TemplatePick::One, 7);
    assert_eq!(one.len(), 2);
    for (i, c) in one.iter().enumerate() {
        let expect = t[template_choice(7, i, 2)].replace("{}", &bank.concepts()[i]);
        assert_eq!(c.caption, expect);
    }
    // The choice is the documented draw, and both templates get used over many concepts.
    let picks: HashSet<usize> = (0..64).map(|i| template_choice(3, i, 2)).collect();
    assert_eq!(picks.len(), 2);
    assert_eq!(template_choice(3, 5, 2), synthos_engine::Rng::derive(3, &[5]).below(2));
}

// ---------------------------------------------------------------------------------------
// Matching and balancing
// ---------------------------------------------------------------------------------------

const BANK: [&str; 9] = ["new york", "york", "dog", "hot dog", "C++", "café", "cat", "Dog", "mr."];
// Hand-computed matches in word mode (concept ids: 0 new york, 1 york, 2 dog (also "Dog"),
// 3 hot dog, 4 C++, 5 café, 6 cat, 7 mr.).
const CAPTIONS: [(&str, &[&str], &[&str]); 16] = [
    // (caption, word-mode matches, seed-mode matches)
    ("A DOG in New York.", &["new york", "york", "dog"], &[]),
    ("my dog, sleeping", &["dog"], &["dog"]),
    ("two dogs and a hotdog", &[], &[]),
    ("a hot dog stand", &["dog", "hot dog"], &["dog", "hot dog"]),
    ("the dog's bone (dog)", &["dog"], &[]),
    ("hot-dog", &["dog"], &[]),
    ("Yorkshire terrier", &[], &[]),
    ("learning c++ today", &["C++"], &[]),
    ("learning C++ today", &["C++"], &["C++"]),
    ("C++x", &[], &[]),
    ("Café au lait", &["café"], &[]),
    ("a cafébar", &[], &[]),
    ("cat_food", &[], &[]),
    ("Mr. Smith and his cat", &["cat", "mr."], &["cat"]),
    ("a cat\tnamed york!", &["york", "cat"], &["york", "cat"]),
    ("Dog", &["dog"], &["Dog"]),
];

#[test]
fn matching_word_mode_by_hand() {
    let bank = ConceptBank::from_concepts(&BANK).unwrap();
    let m = ConceptMatcher::new(&bank, MatchMode::Word).unwrap();
    // "Dog" and "dog" are one concept (first spelling "dog").
    assert_eq!(m.names().len(), 8);
    assert_eq!(m.bank_ids()[7], m.bank_ids()[2]);
    for (caption, word, _) in CAPTIONS {
        let mut got = m.matched_names(caption);
        got.sort();
        let mut want: Vec<&str> = word.to_vec();
        want.sort();
        assert_eq!(got, want, "word matches of {caption:?}");
    }
}

#[test]
fn matching_seed_mode_by_hand() {
    let bank = ConceptBank::from_concepts(&BANK).unwrap();
    let m = ConceptMatcher::new(&bank, MatchMode::Seed).unwrap();
    assert_eq!(m.names().len(), 9);
    for (caption, _, seed) in CAPTIONS {
        let mut got = m.matched_names(caption);
        got.sort();
        let mut want: Vec<&str> = seed.to_vec();
        want.sort();
        assert_eq!(got, want, "seed matches of {caption:?}");
    }
    assert_eq!(seed_spacing("a,b.\tc"), " a , b .  c ");
}

#[test]
fn word_characters_are_unicode_w() {
    for c in ['a', 'Z', '7', '_', 'é', 'ß', '中', '\u{0301}', '٣'] {
        assert!(is_word_char(c), "{c:?}");
    }
    for c in [' ', '-', '\'', '.', '(', '+', '\u{00a0}', '€'] {
        assert!(!is_word_char(c), "{c:?}");
    }
    // A combining accent glues to the word before it.
    let bank = ConceptBank::from_concepts(&["cafe"]).unwrap();
    let m = ConceptMatcher::new(&bank, MatchMode::Word).unwrap();
    assert!(m.matches("cafe\u{0301} noir").is_empty());
    assert_eq!(m.matches("cafe noir"), [0]);
}

#[test]
fn balance_counts_by_hand_and_keeps_all_when_t_covers_counts() {
    let bank = ConceptBank::from_concepts(&BANK).unwrap();
    let mut caps: Vec<&str> = CAPTIONS.iter().map(|c| c.0).collect();
    caps.push("my dog, sleeping"); // exact duplicate
    caps.push("   "); // empty
    let r = rows(&caps);
    let b = balance(&bank, &r, &BalanceOptions { t: 100, seed: 1, mode: MatchMode::Word }).unwrap();
    assert_eq!((b.rows, b.empty, b.duplicates, b.unique.len()), (18, 1, 1, 16));
    // Counts by hand from the table above (dog: captions 0,1,3,4,5,15).
    let mut want = HashMap::new();
    for (_, word, _) in CAPTIONS {
        for w in word.iter() {
            *want.entry(*w).or_insert(0u64) += 1;
        }
    }
    for (i, name) in b.names.iter().enumerate() {
        assert_eq!(b.counts_before[i], want.get(name.as_str()).copied().unwrap_or(0), "count of {name}");
    }
    assert_eq!(want["dog"], 6);
    // t ≥ every count: every matched caption is kept, unmatched ones never.
    let matched: Vec<bool> = CAPTIONS.iter().map(|c| !c.1.is_empty()).collect();
    assert_eq!(b.kept, matched);
    assert_eq!(b.counts_after, b.counts_before);
    assert_eq!(b.kept_count(), b.matched_captions());
    assert_eq!(b.expected_kept, b.kept_count() as f64);
}

/// The documented keep rule, recomputed here: draws from `Rng::derive(seed,
/// &[text_key(caption)])`, one per matched concept in bank order, kept at the first
/// `u < min(1, t / count)`.
fn keep_by_formula(caption: &str, matched_counts: &[u64], t: u64, seed: u64) -> bool {
    let mut rng = synthos_engine::Rng::derive(seed, &[text_key(caption)]);
    for &c in matched_counts {
        let p = if c <= t { 1.0 } else { t as f64 / c as f64 };
        if rng.uniform() < p {
            return true;
        }
    }
    false
}

fn stat_rows() -> Vec<CaptionRow> {
    let mut caps = Vec::new();
    for i in 0..6000 {
        caps.push(format!("a common thing number {i}"));
    }
    for i in 0..40 {
        caps.push(format!("a rare thing number {i}"));
    }
    for i in 0..1000 {
        caps.push(format!("common and other, number {i}"));
    }
    for i in 0..300 {
        caps.push(format!("just other, number {i}"));
    }
    for i in 0..100 {
        caps.push(format!("nothing at all {i}"));
    }
    caps.iter().enumerate().map(|(i, c)| CaptionRow { concept: None, caption: c.clone(), line: i + 1 }).collect()
}

#[test]
fn balance_keep_rule_exact_and_statistical() {
    let bank = ConceptBank::from_concepts(&["common", "rare", "other"]).unwrap();
    let r = stat_rows();
    let (t, seed) = (200u64, 11u64);
    let b = balance(&bank, &r, &BalanceOptions { t, seed, mode: MatchMode::Word }).unwrap();
    assert_eq!(b.counts_before, vec![7000, 40, 1300]);
    let p = [t as f64 / 7000.0, 1.0, t as f64 / 1300.0];
    for (i, &pi) in p.iter().enumerate() {
        assert!((b.probs[i] - pi).abs() < 1e-12);
        assert_eq!(keep_probability(t, b.counts_before[i]), b.probs[i]);
    }
    // Exact: every decision follows the formula.
    for (k, &row) in b.unique.iter().enumerate() {
        let counts: Vec<u64> = b.matched(k).iter().map(|&id| b.counts_before[id as usize]).collect();
        assert_eq!(b.kept[k], keep_by_formula(&r[row].caption, &counts, t, seed), "caption {}", r[row].caption);
    }
    let _ = caption_rng(seed, "x"); // the public form of the same stream
                                    // Statistical: kept fractions per group within 4.5 sigma of the formula.
    let group = |prefix: &str| -> (usize, usize) {
        let idx: Vec<usize> = (0..b.unique.len()).filter(|&k| r[b.unique[k]].caption.starts_with(prefix)).collect();
        (idx.len(), idx.iter().filter(|&&k| b.kept[k]).count())
    };
    let check = |prefix: &str, prob: f64| {
        let (n, kept) = group(prefix);
        let mean = n as f64 * prob;
        let sd = (n as f64 * prob * (1.0 - prob)).sqrt().max(1e-9);
        assert!(((kept as f64) - mean).abs() <= 4.5 * sd, "{prefix}: kept {kept} of {n}, expected {mean:.1} ± {sd:.1}");
    };
    check("a common thing", p[0]);
    check("a rare thing", 1.0);
    check("common and other", 1.0 - (1.0 - p[0]) * (1.0 - p[2]));
    check("just other", p[2]);
    assert_eq!(group("nothing at all").1, 0);
    assert_eq!(group("a rare thing").1, 40);
    // Per concept: "common" keeps about t (plus what "other" brings along).
    let expected_common = 6000.0 * p[0] + 1000.0 * (1.0 - (1.0 - p[0]) * (1.0 - p[2]));
    assert!((b.counts_after[0] as f64 - expected_common).abs() < 4.5 * expected_common.sqrt());
    assert!((b.kept_count() as f64 - b.expected_kept).abs() < 4.5 * b.expected_kept.sqrt());
}

#[test]
fn balance_is_deterministic_across_threads_and_input_order() {
    let bank = ConceptBank::from_concepts(&["common", "rare", "other"]).unwrap();
    let r = stat_rows();
    let opts = BalanceOptions { t: 50, seed: 5, mode: MatchMode::Word };
    let run = |threads: usize, rows: &[CaptionRow]| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let b = pool.install(|| balance(&bank, rows, &opts).unwrap());
        let kept: HashSet<String> = b.kept_rows().map(|i| rows[i].caption.clone()).collect();
        (kept, b.counts_after)
    };
    let (k1, c1) = run(1, &r);
    let (k3, c3) = run(3, &r);
    assert_eq!((&k1, &c1), (&k3, &c3));
    let mut reversed = r.clone();
    reversed.reverse();
    assert_eq!(run(2, &reversed), (k1.clone(), c1));
    let other = balance(&bank, &r, &BalanceOptions { seed: 6, ..opts }).unwrap();
    let k_other: HashSet<String> = other.kept_rows().map(|i| r[i].caption.clone()).collect();
    assert_ne!(k1, k_other);
}

#[test]
fn balance_outputs_report_and_plot() {
    let dir = temp_dir("synth-balance-out");
    let bank = ConceptBank::from_concepts(&["common", "rare", "other", "unused"]).unwrap();
    let mut r = stat_rows();
    r[0].concept = Some("common".into());
    let opts = BalanceOptions { t: 100, seed: 2, mode: MatchMode::Word };
    let b = balance(&bank, &r, &opts).unwrap();
    let (files, report) = write_balance_outputs(dir.join("out"), &bank, &r, &b, &opts).unwrap();
    let lines: Vec<Value> =
        fs::read_to_string(&files.captions).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), b.kept_count());
    for l in &lines {
        assert!(!l["matched"].as_array().unwrap().is_empty());
    }
    let on_disk: Value = serde_json::from_str(&fs::read_to_string(&files.report).unwrap()).unwrap();
    // (Floats are compared loosely: serde_json's default parsing may differ by an ulp.)
    assert_eq!(on_disk["concepts"], report["concepts"]);
    assert_eq!(on_disk["counts_after"]["rank_counts"], report["counts_after"]["rank_counts"]);
    let ek = |v: &Value| v["captions"]["expected_kept"].as_f64().unwrap();
    assert!((ek(&on_disk) - ek(&report)).abs() < 1e-9);
    assert_eq!(report["t"], 100);
    assert_eq!(report["concepts"]["covered_before"], 3);
    assert_eq!(report["concepts"]["bank"], 4);
    assert_eq!(report["captions"]["unmatched"], 100);
    assert_eq!(report["captions"]["kept"], b.kept_count());
    assert_eq!(report["counts_before"]["max"], 7000);
    assert_eq!(report["top_concepts"][0]["concept"], "common");
    assert_eq!(report["counts_before"]["rank_counts"][0], serde_json::json!([1, 7000]));
    let png = image::open(&files.plot).unwrap();
    assert_eq!((png.width(), png.height()), (800, 480));
}

#[test]
fn count_summaries() {
    let s = count_summary(&[0, 5, 1, 0, 2, 9]);
    assert_eq!((s.covered, s.total, s.max, s.median_covered), (4, 17, 9, 2));
    assert_eq!(s.buckets, vec![(0, 0, 2), (1, 1, 1), (2, 3, 1), (4, 7, 1), (8, 15, 1)]);
    assert_eq!(s.rank_counts, vec![(1, 9), (2, 5), (3, 2), (4, 1)]);
    let ranks = log_spaced_ranks(500_000);
    assert!(ranks.len() < 300 && ranks.windows(2).all(|w| w[0] < w[1]));
    assert_eq!((ranks[0], ranks[9], *ranks.last().unwrap()), (1, 10, 500_000));
    assert!(log_spaced_ranks(0).is_empty());
}

// ---------------------------------------------------------------------------------------
// The chat-completions client against a mock server
// ---------------------------------------------------------------------------------------

/// What the mock server answers to the `n`-th request (0-based) for `concept`.
enum Reply {
    /// 200 with this message content.
    Content(String),
    /// This status and body.
    Status(u16, &'static str),
    /// 200 with this raw body.
    Raw(&'static str),
}

struct Mock {
    url: String,
    /// Concepts requested, in arrival order, and the request bodies.
    log: Arc<Mutex<Vec<(String, Value)>>>,
    handle: Option<JoinHandle<()>>,
}

impl Mock {
    /// Starts a server on 127.0.0.1 answering with `reply(n, concept)`; it stops
    /// listening after `answers` successful (200) answers when given.
    fn start(answers: Option<usize>, reply: impl Fn(usize, &str) -> Reply + Send + 'static) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let handle = std::thread::spawn(move || {
            let mut ok = 0usize;
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { continue };
                match serve(stream, n, &reply, &log2) {
                    Served::Quit => break,
                    Served::Bad => {}
                    Served::Answered(success) => ok += success as usize,
                }
                if answers.is_some_and(|a| ok >= a) {
                    break; // the listener is dropped: later connections are refused
                }
            }
        });
        Mock { url, log, handle: Some(handle) }
    }

    fn concepts(&self) -> Vec<String> {
        self.log.lock().unwrap().iter().map(|(c, _)| c.clone()).collect()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        // Wake a server still waiting in accept, then join it.
        if let Some(h) = self.handle.take() {
            if !h.is_finished() {
                let addr = self.url.trim_start_matches("http://").to_string();
                if let Ok(mut s) = TcpStream::connect(&addr) {
                    let _ = s.write_all(b"QUIT / HTTP/1.1\r\n\r\n");
                }
            }
            let _ = h.join();
        }
    }
}

enum Served {
    /// Not a chat request (the wake-up of [`Mock::drop`]): stop.
    Quit,
    /// A request that could not be read.
    Bad,
    /// Answered; whether with a 200.
    Answered(bool),
}

type Log = Arc<Mutex<Vec<(String, Value)>>>;

/// Reads one request, logs its concept and body, answers it.
fn serve(stream: TcpStream, n: usize, reply: &impl Fn(usize, &str) -> Reply, log: &Log) -> Served {
    let mut request_line = String::new();
    let reader = stream.set_read_timeout(Some(Duration::from_secs(10))).and_then(|_| stream.try_clone());
    let Ok(mut reader) = reader.map(BufReader::new) else { return Served::Bad };
    if reader.read_line(&mut request_line).is_err() {
        return Served::Bad;
    }
    if !request_line.starts_with("POST /v1/chat/completions HTTP/1.1") {
        return Served::Quit;
    }
    match answer(reader, stream, n, reply, log) {
        Some(ok) => Served::Answered(ok),
        None => Served::Bad,
    }
}

fn answer(
    mut reader: BufReader<TcpStream>,
    stream: TcpStream,
    n: usize,
    reply: &impl Fn(usize, &str) -> Reply,
    log: &Log,
) -> Option<bool> {
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    let body: Value = serde_json::from_slice(&body).ok()?;
    let prompt = body["messages"][0]["content"].as_str()?.to_string();
    let concept = prompt.split("Your concept is: ").nth(1)?.split(". Output one single").next()?.to_string();
    // Logged before answering, so the log is complete when the client has its answer.
    log.lock().unwrap().push((concept.clone(), body));
    let (status, text) = match reply(n, &concept) {
        Reply::Content(c) => {
            let v = serde_json::json!({
                "id": "x", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}]
            });
            (200, v.to_string())
        }
        Reply::Status(s, b) => (s, b.to_string()),
        Reply::Raw(b) => (200, b.to_string()),
    };
    let mut out = stream;
    let head =
        format!("HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", text.len());
    out.write_all(head.as_bytes()).ok()?;
    out.write_all(text.as_bytes()).ok()?;
    Some(status == 200)
}

fn fast(url: &str) -> LlmOptions {
    let mut o = LlmOptions::new(url, "test-model");
    o.retry_delay = Duration::from_millis(5);
    o.max_retry_delay = Duration::from_millis(50);
    o.timeout = Duration::from_secs(10);
    o.workers = 3;
    o
}

fn output_lines(path: &Path) -> Vec<(String, String)> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["concept"].as_str().unwrap().to_string(), v["caption"].as_str().unwrap().to_string())
        })
        .collect()
}

fn bank_n(n: usize) -> ConceptBank {
    let c: Vec<String> = (0..n).map(|i| format!("concept {i}")).collect();
    ConceptBank::from_concepts(&c).unwrap()
}

#[test]
fn endpoint_urls_and_prompt() {
    assert_eq!(chat_completions_url("http://h:1").unwrap(), "http://h:1/v1/chat/completions");
    assert_eq!(chat_completions_url("http://h:1/v1/").unwrap(), "http://h:1/v1/chat/completions");
    assert_eq!(chat_completions_url("http://h:1/v1/chat/completions").unwrap(), "http://h:1/v1/chat/completions");
    assert_eq!(chat_completions_url("http://h/api").unwrap(), "http://h/api/v1/chat/completions");
    let e = err_of(chat_completions_url("https://api.example.com"));
    assert!(e.contains("https") && e.contains("local"), "{e}");
    let p = seed_prompt("red fox");
    assert!(p.contains("Your concept is: red fox.") && p.contains("no longer than 15 words"), "{p}");
    let mut o = LlmOptions::new("http://h", "m");
    let b = request_body(&o, "fox", 0);
    assert_eq!(
        (b["model"].as_str(), b["temperature"].as_f64(), b["top_p"].as_f64()),
        (Some("m"), Some(0.7), Some(0.95))
    );
    assert_eq!((b["presence_penalty"].as_f64(), b["frequency_penalty"].as_f64()), (Some(1.0), Some(1.0)));
    assert_eq!(b["messages"][0]["role"], "user");
    assert!(b.get("seed").is_none());
    o.seed = Some(3);
    assert_eq!(request_body(&o, "fox", 0)["seed"], request_body(&o, "fox", 0)["seed"]);
    assert_ne!(request_body(&o, "fox", 0)["seed"], request_body(&o, "fox", 1)["seed"]);
    let (c, f) = parse_chat_reply(br#"{"choices":[{"message":{"content":"hi"},"finish_reason":"length"}]}"#).unwrap();
    assert_eq!((c.as_str(), f.as_deref()), ("hi", Some("length")));
    let e = err_of(parse_chat_reply(br#"{"error":{"message":"model not loaded"}}"#));
    assert!(e.contains("model not loaded"), "{e}");
}

#[test]
fn llm_captions_in_bank_order_with_a_retry_after_429() {
    let dir = temp_dir("synth-llm-ok");
    let out = dir.join("caps.jsonl");
    let bank = bank_n(12);
    let mock = Mock::start(None, |n, concept| {
        if n == 1 {
            Reply::Status(429, "{\"error\":{\"message\":\"slow down\"}}")
        } else if n == 2 {
            Reply::Status(503, "busy")
        } else {
            Reply::Content(format!("  \"A photo with {concept} in it.\"\n"))
        }
    });
    let s = caption_with_llm(&bank, &fast(&mock.url), &out).unwrap();
    assert_eq!((s.captioned, s.already_done, s.requests, s.retries), (12, 0, 14, 2));
    let lines = output_lines(&out);
    let concepts: Vec<&str> = lines.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(concepts, bank.concepts().iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(lines[3].1, "A photo with concept 3 in it.");
    let log = mock.log.lock().unwrap();
    assert_eq!(log.len(), 14);
    assert_eq!(log[0].1["model"], "test-model");
    drop(log);
    // A rerun has nothing left to do and sends nothing.
    let s = caption_with_llm(&bank, &fast(&mock.url), &out).unwrap();
    assert_eq!((s.captioned, s.already_done, s.requests), (0, 12, 0));
}

#[test]
fn llm_reasks_rejected_replies() {
    let dir = temp_dir("synth-llm-reask");
    let out = dir.join("caps.jsonl");
    let bank = bank_n(3);
    let mock = Mock::start(None, |_, concept| match concept {
        "concept 0" => Reply::Content("Line one.\nLine two.".into()),
        "concept 1" => Reply::Raw(r#"{"choices":[{"message":{"content":"cut"},"finish_reason":"length"}]}"#),
        _ => Reply::Content("fine caption".into()),
    });
    let mut o = fast(&mock.url);
    o.reask = 1;
    let s = caption_with_llm(&bank, &o, &out).unwrap();
    assert_eq!(s.captioned, 1);
    assert_eq!((s.rejected.get("multi-line"), s.rejected.get("truncated")), (Some(&1), Some(&1)));
    assert_eq!(s.requests, 5); // 2 + 2 + 1
    assert_eq!(mock.concepts().iter().filter(|c| *c == "concept 0").count(), 2);
}

#[test]
fn llm_server_errors_exhaust_retries_or_budget() {
    let dir = temp_dir("synth-llm-500");
    let bank = bank_n(4);
    let mock = Mock::start(None, |_, _| Reply::Status(500, "{\"error\": \"boom\"}"));
    let mut o = fast(&mock.url);
    o.workers = 1;
    o.max_retries = 2;
    let e = err_of(caption_with_llm(&bank, &o, dir.join("a.jsonl")));
    assert!(e.contains("concept \"concept 0\"") && e.contains("3 attempts") && e.contains("500"), "{e}");
    assert!(e.contains("rerun"), "{e}");
    assert_eq!(mock.concepts().len(), 3);
    // A budget smaller than the retries: the budget error.
    let mock = Mock::start(None, |_, _| Reply::Status(500, "boom"));
    let mut o = fast(&mock.url);
    o.max_requests = Some(4);
    o.max_retries = 10;
    let e = err_of(caption_with_llm(&bank, &o, dir.join("b.jsonl")));
    assert!(e.contains("request budget is spent") && e.contains("4 requests"), "{e}");
    assert_eq!(mock.concepts().len(), 4);
    // A budget that ends a healthy run part way: what was answered is kept, a rerun goes on.
    let mock = Mock::start(None, |_, c| Reply::Content(format!("about {c}")));
    let mut o = fast(&mock.url);
    o.max_requests = Some(3);
    let out = dir.join("c.jsonl");
    let e = err_of(caption_with_llm(&bank, &o, &out));
    assert!(e.contains("budget") && e.contains("3 concepts captioned"), "{e}");
    assert_eq!(output_lines(&out).len(), 3);
    o.max_requests = None;
    let s = caption_with_llm(&bank, &o, &out).unwrap();
    assert_eq!((s.captioned, s.already_done), (1, 3));
    // A client error (4xx other than 429) is not retried.
    let mock = Mock::start(None, |_, _| Reply::Status(404, "{\"error\":{\"message\":\"no such model\"}}"));
    let mut o = fast(&mock.url);
    o.workers = 1;
    let e = err_of(caption_with_llm(&bank, &o, dir.join("d.jsonl")));
    assert!(e.contains("404") && e.contains("no such model"), "{e}");
    assert_eq!(mock.concepts().len(), 1);
}

#[test]
fn llm_malformed_reply_names_the_concept() {
    let dir = temp_dir("synth-llm-malformed");
    let bank = bank_n(3);
    let mock =
        Mock::start(
            None,
            |_, c| if c == "concept 1" { Reply::Raw("{\"choices\": [") } else { Reply::Content("ok".into()) },
        );
    let mut o = fast(&mock.url);
    o.workers = 1;
    let out = dir.join("m.jsonl");
    let e = err_of(caption_with_llm(&bank, &o, &out));
    assert!(e.contains("concept \"concept 1\"") && e.contains("not JSON"), "{e}");
    assert_eq!(output_lines(&out), vec![("concept 0".to_string(), "ok".to_string())]);
    let mock = Mock::start(None, |_, _| Reply::Raw("{\"choices\": []}"));
    let e = err_of(caption_with_llm(&bank, &fast(&mock.url), dir.join("n.jsonl")));
    assert!(e.contains("choices[0].message.content"), "{e}");
}

#[test]
fn llm_unreachable_endpoint_is_a_clear_error() {
    let dir = temp_dir("synth-llm-refused");
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let o = fast(&format!("http://127.0.0.1:{port}"));
    let e = err_of(caption_with_llm(&bank_n(2), &o, dir.join("r.jsonl")));
    assert!(e.contains("connection refused") && e.contains(&port.to_string()), "{e}");
    let e = err_of(caption_with_llm(&bank_n(2), &fast("https://example.com"), dir.join("s.jsonl")));
    assert!(e.contains("https"), "{e}");
}

#[test]
fn llm_resume_after_the_server_stops_and_after_a_torn_line() {
    let dir = temp_dir("synth-llm-resume");
    let out = dir.join("caps.jsonl");
    let bank = bank_n(20);
    // The server answers 7 requests, then stops listening: the run fails part way.
    let mock = Mock::start(Some(7), |_, c| Reply::Content(format!("first run: {c}")));
    let mut o = fast(&mock.url);
    o.max_retries = 1;
    let e = err_of(caption_with_llm(&bank, &o, &out));
    assert!(e.contains("rerun"), "{e}");
    let first = output_lines(&out);
    assert_eq!(first.len(), 7, "{first:?}");
    drop(mock);
    // A kill in the middle of a write: cut the file inside its last line.
    let text = fs::read(&out).unwrap();
    let cut = text.len() - 9;
    fs::write(&out, &text[..cut]).unwrap();
    let (_, existing) = open_caption_output(&out).unwrap();
    assert_eq!(existing.lines, 6);
    assert!(existing.repaired.as_deref().unwrap_or("").contains("incomplete last line"), "{:?}", existing.repaired);
    assert!(fs::read(&out).unwrap().ends_with(b"\n"));
    // The rerun (fresh server) captions exactly the missing concepts.
    let mock = Mock::start(None, |_, c| Reply::Content(format!("second run: {c}")));
    let s = caption_with_llm(&bank, &fast(&mock.url), &out).unwrap();
    assert_eq!((s.already_done, s.captioned), (6, 14));
    let asked: HashSet<String> = mock.concepts().into_iter().collect();
    assert_eq!(asked.len(), 14);
    let lines = output_lines(&out);
    assert_eq!(lines.len(), 20);
    let unique: HashSet<&str> = lines.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(unique.len(), 20, "a concept captioned twice or lost");
    assert!(unique.iter().all(|c| bank.index_of(c).is_some()));
    assert_eq!(lines.iter().filter(|(_, cap)| cap.starts_with("first run")).count(), 6);
    // A complete last line without its line break is kept and completed.
    let mut f = fs::OpenOptions::new().append(true).open(&out).unwrap();
    f.write_all(b"{\"concept\": \"extra\", \"caption\": \"x\"}").unwrap();
    drop(f);
    let (_, existing) = open_caption_output(&out).unwrap();
    assert_eq!(existing.lines, 21);
    assert!(fs::read_to_string(&out).unwrap().ends_with("\"x\"}\n"));
    // A damaged line that is not the last is an error naming the file and line.
    let mut text = fs::read_to_string(&out).unwrap();
    text.insert_str(0, "garbage\n");
    fs::write(&out, text).unwrap();
    let e = err_of(open_caption_output(&out));
    assert!(e.contains("caps.jsonl line 1"), "{e}");
}

#[test]
fn llm_rate_limit_spaces_requests() {
    let dir = temp_dir("synth-llm-rate");
    let mock = Mock::start(None, |_, c| Reply::Content(c.to_string()));
    let mut o = fast(&mock.url);
    o.requests_per_second = Some(20.0);
    o.workers = 4;
    let start = std::time::Instant::now();
    caption_with_llm(&bank_n(6), &o, dir.join("r.jsonl")).unwrap();
    // Six requests at 20/s: the last starts at least 5 × 50 ms after the first.
    assert!(start.elapsed() >= Duration::from_millis(240), "{:?}", start.elapsed());
}

// ---------------------------------------------------------------------------------------
// The CLI
// ---------------------------------------------------------------------------------------

fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run synthos-engine");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn cli_captions_then_balance() {
    let dir = temp_dir("synth-cli");
    let d = |p: &str| dir.join(p).display().to_string();
    write(&dir, "concepts.txt", "dog\ncat\nnew york\nyork\n");
    write(&dir, "templates.txt", "a photo of a {}\n{} on a sunny day\na {} and a dog\n");
    let (ok, stdout, stderr) = run_cli(&[
        "synth",
        "captions",
        "--concepts",
        &d("concepts.txt"),
        "--templates",
        &d("templates.txt"),
        "--output",
        &d("caps.jsonl"),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("captions: 12 from 3 templates"), "{stdout}");
    let (ok, stdout, stderr) = run_cli(&[
        "synth",
        "balance",
        "--captions",
        &d("caps.jsonl"),
        "--concepts",
        &d("concepts.txt"),
        "--t",
        "2",
        "--seed",
        "3",
        "--output",
        &d("out"),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("12 read") && stdout.contains("12 match a concept"), "{stdout}");
    for f in ["balanced.jsonl", "balance-report.json", "balance-histogram.png"] {
        assert!(dir.join("out").join(f).is_file(), "{f}");
    }
    let report: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("out/balance-report.json")).unwrap()).unwrap();
    // dog: its 3 captions + "a {} and a dog" for the other 3 concepts = 6; york: 3 + 3 from "new york".
    assert_eq!(report["counts_before"]["max"], 6);
    assert_eq!(report["matching"], "word");
    // --from with the file just written, and errors through the CLI.
    let (ok, stdout, _) = run_cli(&[
        "synth",
        "captions",
        "--concepts",
        &d("concepts.txt"),
        "--from",
        &d("caps.jsonl"),
        "--output",
        &d("c2.jsonl"),
    ]);
    assert!(ok && stdout.contains("12 of 12 rows kept"), "{stdout}");
    write(&dir, "bad.tsv", "concept\ttext\ndog\tx\n");
    let (ok, _, stderr) = run_cli(&[
        "synth",
        "captions",
        "--concepts",
        &d("concepts.txt"),
        "--from",
        &d("bad.tsv"),
        "--output",
        &d("c3.jsonl"),
    ]);
    assert!(!ok && stderr.contains("bad.tsv line 1") && stderr.contains("caption"), "{stderr}");
    let (ok, _, stderr) = run_cli(&["synth", "captions", "--concepts", &d("concepts.txt"), "--output", &d("x.jsonl")]);
    assert!(!ok && stderr.contains("--from"), "{stderr}");
    let (ok, _, stderr) = run_cli(&[
        "synth",
        "captions",
        "--concepts",
        &d("concepts.txt"),
        "--endpoint",
        "http://127.0.0.1:9",
        "--output",
        &d("x.jsonl"),
    ]);
    assert!(!ok && stderr.contains("--model"), "{stderr}");
    let (ok, _, stderr) = run_cli(&[
        "synth",
        "captions",
        "--concepts",
        &d("concepts.txt"),
        "--endpoint",
        "http://127.0.0.1:9",
        "--model",
        "m",
        "--api-key-env",
        "SYNTHOS_TEST_SURELY_UNSET_VAR",
        "--output",
        &d("x.jsonl"),
    ]);
    assert!(!ok && stderr.contains("SYNTHOS_TEST_SURELY_UNSET_VAR"), "{stderr}");
}
