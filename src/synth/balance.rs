//! MetaCLIP/SynthCLIP balancing: match every caption against the whole concept bank,
//! count the captions of each concept, and keep a caption with a probability that caps
//! each concept at about `t` captions.
//!
//! # Matching ([`ConceptMatcher`])
//!
//! One Aho–Corasick automaton holds every concept; all occurrences of all concepts in a
//! caption are found, overlapping ones included (a caption can match both "new york" and
//! "york"). A caption *matches* a concept when at least one occurrence passes the
//! boundary test of the [`MatchMode`]:
//! - [`MatchMode::Word`] (the default): case-insensitive (caption and concepts are
//!   lower-cased with Unicode rules, [`str::to_lowercase`]) and whole-word: the
//!   character just before the occurrence and the one just after must not be *word
//!   characters*, which are those of Unicode `\w` as the `regex` crate and Python's `re`
//!   define it (Alphabetic, Mark, Decimal_Number, Connector_Punctuation, Join_Control;
//!   [`is_word_char`]). This is `(?<!\w)concept(?!\w)`: the same as `\bconcept\b` for
//!   every concept that starts and ends with a word character, and for the others
//!   ("c++", "mr.") it still asks that the occurrence is not glued to a word.
//!   "dog" matches "Dog," "(dog)" "dog's" "hot-dog" but not "dogs" or "hotdog".
//! - [`MatchMode::Seed`]: exactly the rule of SynthCLIP's and MetaCLIP's
//!   `substr_matching.py`: case-sensitive; the caption is padded with a space on each
//!   side, each of `, . ; : ? ! `` ` gets a space on both sides, tab/CR/LF become spaces,
//!   and a concept matches when `" " + concept + " "` occurs in that text. So "dog" matches
//!   "dog," but not "dog's", "(dog)" or "Dog", and a concept holding one of those
//!   punctuation marks never matches.
//!
//! Concepts that are equal after lower-casing are one concept in [`MatchMode::Word`]: they
//! are counted together under the first spelling of the bank.
//!
//! # Balancing ([`balance`])
//!
//! As in SynthCLIP's `balancing.py` (MetaCLIP's algorithm): captions are deduplicated
//! (exact text; the first occurrence is kept), each concept's count `c` is the number of
//! distinct captions that match it, and its keep probability is `p = min(1, t / c)`. A
//! caption that matches no concept is dropped. A caption matching concepts `k₁ < k₂ < …`
//! (in bank order) draws one uniform `u` per concept in that order and is kept at the
//! first `u < p_k`, so it is kept with probability `1 − Π (1 − p_k)`: a caption of a rare
//! concept is always kept, whatever frequent concepts it also mentions.
//!
//! The draws of a caption come from `Rng::derive(seed, &[text_key(caption)])`
//! ([`caption_rng`]), keyed by the caption text: the kept set depends only on the seed
//! and the set of captions, not on the thread count or on the order of the input file.

use std::collections::HashMap;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use rayon::prelude::*;

use super::captions::CaptionRow;
use super::concepts::ConceptBank;
use super::text_key;
use crate::{ensure, Error, Result, Rng};

/// How captions are matched against concepts (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchMode {
    /// Case-insensitive, whole words by Unicode `\w`.
    Word,
    /// SynthCLIP/MetaCLIP `substr_matching.py`: case-sensitive, space-delimited after
    /// spacing out `, . ; : ? ! ``.
    Seed,
}

impl MatchMode {
    /// The name used in reports (`word`, `seed`).
    pub fn name(self) -> &'static str {
        match self {
            MatchMode::Word => "word",
            MatchMode::Seed => "seed",
        }
    }
}

/// Whether `c` is a word character: Unicode `\w` (Alphabetic, Mark, Decimal_Number,
/// Connector_Punctuation, Join_Control), as in the `regex` crate and Python's `re`.
pub fn is_word_char(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '_';
    }
    regex_syntax::try_is_word_character(c).unwrap_or_else(|_| c.is_alphanumeric())
}

/// The text SynthCLIP's `spacing()` makes of a caption before matching in
/// [`MatchMode::Seed`]: padded with spaces, `, . ; : ? ! `` ` spaced out, tab/CR/LF
/// turned into spaces.
pub fn seed_spacing(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    out.push(' ');
    for c in text.chars() {
        match c {
            ',' | '.' | ';' | ':' | '?' | '!' | '`' => {
                out.push(' ');
                out.push(c);
                out.push(' ');
            }
            '\t' | '\n' | '\r' => out.push(' '),
            _ => out.push(c),
        }
    }
    out.push(' ');
    out
}

/// Finds the concepts of a bank in captions (see the module documentation).
pub struct ConceptMatcher {
    /// One pattern per concept id (pattern id = concept id).
    automaton: AhoCorasick,
    /// The name of each concept id (first spelling in the bank).
    names: Vec<String>,
    /// For each bank entry, its concept id.
    bank_concept: Vec<u32>,
    mode: MatchMode,
}

impl ConceptMatcher {
    /// Builds the automaton over every concept of `bank`.
    pub fn new(bank: &ConceptBank, mode: MatchMode) -> Result<ConceptMatcher> {
        ensure!(bank.len() < u32::MAX as usize, "the concept bank has too many concepts ({})", bank.len());
        let mut names = Vec::new();
        let mut patterns: Vec<String> = Vec::new();
        let mut bank_concept = Vec::with_capacity(bank.len());
        let mut by_key: HashMap<String, u32> = HashMap::new();
        for concept in bank.concepts() {
            let key = match mode {
                MatchMode::Word => lowercase(concept),
                MatchMode::Seed => concept.clone(),
            };
            let id = *by_key.entry(key.clone()).or_insert_with(|| {
                names.push(concept.clone());
                patterns.push(key);
                (names.len() - 1) as u32
            });
            bank_concept.push(id);
        }
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .kind(Some(AhoCorasickKind::ContiguousNFA))
            .build(&patterns)
            .map_err(|e| {
                Error::msg(format!("cannot build the concept matcher over {} concepts: {e}", patterns.len()))
            })?;
        Ok(ConceptMatcher { automaton, names, bank_concept, mode })
    }

    /// The matching mode.
    pub fn mode(&self) -> MatchMode {
        self.mode
    }

    /// The concepts matched on, by id: the first spelling in the bank of each (in
    /// [`MatchMode::Word`], spellings that differ only in case are one concept).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The concept id of each bank entry, parallel to [`ConceptBank::concepts`].
    pub fn bank_ids(&self) -> &[u32] {
        &self.bank_concept
    }

    /// The ids of the concepts `caption` matches, ascending, without repeats, appended to
    /// `out` after clearing it.
    pub fn matches_into(&self, caption: &str, out: &mut Vec<u32>) {
        out.clear();
        match self.mode {
            MatchMode::Word => {
                let hay = lowercase(caption);
                for m in self.automaton.find_overlapping_iter(hay.as_str()) {
                    let before = hay[..m.start()].chars().next_back();
                    let after = hay[m.end()..].chars().next();
                    if !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char) {
                        out.push(m.pattern().as_u32());
                    }
                }
            }
            MatchMode::Seed => {
                let hay = seed_spacing(caption);
                let bytes = hay.as_bytes();
                for m in self.automaton.find_overlapping_iter(hay.as_str()) {
                    let before = m.start().checked_sub(1).map(|i| bytes[i]);
                    let after = bytes.get(m.end()).copied();
                    if before == Some(b' ') && after == Some(b' ') {
                        out.push(m.pattern().as_u32());
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
    }

    /// The ids of the concepts `caption` matches (see [`matches_into`](Self::matches_into)).
    pub fn matches(&self, caption: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.matches_into(caption, &mut out);
        out
    }

    /// The names of the concepts `caption` matches, in bank order.
    pub fn matched_names(&self, caption: &str) -> Vec<&str> {
        self.matches(caption).into_iter().map(|id| self.names[id as usize].as_str()).collect()
    }
}

/// Lower-cases with Unicode rules (ASCII text on the fast path).
fn lowercase(s: &str) -> String {
    if s.is_ascii() {
        s.to_ascii_lowercase()
    } else {
        s.to_lowercase()
    }
}

/// The random stream of a caption's keep draws: `Rng::derive(seed, &[text_key(caption)])`.
pub fn caption_rng(seed: u64, caption: &str) -> Rng {
    Rng::derive(seed, &[text_key(caption)])
}

/// The keep probability of a concept with `count` matching captions: `min(1, t / count)`
/// (1 for a count of 0).
pub fn keep_probability(t: u64, count: u64) -> f64 {
    if count <= t {
        1.0
    } else {
        t as f64 / count as f64
    }
}

/// The keep decision for a caption matching concepts with keep probabilities `probs`
/// (in bank order): one uniform draw per concept from `rng`, kept at the first draw
/// below its probability; never kept without a concept.
pub fn keep_caption(probs: impl IntoIterator<Item = f64>, rng: &mut Rng) -> bool {
    probs.into_iter().any(|p| rng.uniform() < p)
}

/// Settings of [`balance`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceOptions {
    /// MetaCLIP's `t`: the captions a concept keeps on average when it has more (≥ 1).
    pub t: u64,
    /// Seed of the keep draws.
    pub seed: u64,
    /// How captions are matched.
    pub mode: MatchMode,
}

/// The result of [`balance`].
#[derive(Clone, Debug)]
pub struct Balanced {
    /// The concepts counted, by id ([`ConceptMatcher::names`]).
    pub names: Vec<String>,
    /// Rows read.
    pub rows: usize,
    /// Rows with an empty caption (after trimming), skipped.
    pub empty: usize,
    /// Rows whose caption repeats an earlier one exactly, skipped.
    pub duplicates: usize,
    /// The rows counted: distinct, non-empty captions, as indices into the input, in input order.
    pub unique: Vec<usize>,
    /// For each of `unique`, where its matched concept ids start in `matched_ids`
    /// (`len + 1` offsets).
    pub matched_offsets: Vec<usize>,
    /// The matched concept ids of all unique captions, back to back.
    pub matched_ids: Vec<u32>,
    /// Whether each of `unique` is kept.
    pub kept: Vec<bool>,
    /// Captions per concept before balancing.
    pub counts_before: Vec<u64>,
    /// Kept captions per concept.
    pub counts_after: Vec<u64>,
    /// Keep probability per concept.
    pub probs: Vec<f64>,
    /// The expected number of kept captions, `Σ (1 − Π (1 − p))`.
    pub expected_kept: f64,
}

impl Balanced {
    /// The concept ids matched by the `k`-th unique caption.
    pub fn matched(&self, k: usize) -> &[u32] {
        &self.matched_ids[self.matched_offsets[k]..self.matched_offsets[k + 1]]
    }

    /// The number of unique captions that match at least one concept.
    pub fn matched_captions(&self) -> usize {
        (0..self.unique.len()).filter(|&k| self.matched_offsets[k + 1] > self.matched_offsets[k]).count()
    }

    /// The number of kept captions.
    pub fn kept_count(&self) -> usize {
        self.kept.iter().filter(|k| **k).count()
    }

    /// The input indices of the kept captions, in input order.
    pub fn kept_rows(&self) -> impl Iterator<Item = usize> + '_ {
        self.unique.iter().zip(&self.kept).filter(|(_, k)| **k).map(|(&i, _)| i)
    }
}

/// Balances `rows` over `bank` (see the module documentation): deduplicate, match (in
/// parallel; the result does not depend on the thread count), count, draw.
pub fn balance(bank: &ConceptBank, rows: &[CaptionRow], options: &BalanceOptions) -> Result<Balanced> {
    let matcher = ConceptMatcher::new(bank, options.mode)?;
    balance_with(&matcher, rows, options)
}

/// [`balance`] with a matcher built beforehand.
pub fn balance_with(matcher: &ConceptMatcher, rows: &[CaptionRow], options: &BalanceOptions) -> Result<Balanced> {
    ensure!(options.t >= 1, "balance: t must be at least 1");
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::with_capacity(rows.len());
    let (mut empty, mut duplicates) = (0usize, 0usize);
    let mut unique = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let caption = row.caption.trim();
        if caption.is_empty() {
            empty += 1;
        } else if seen.insert(caption) {
            unique.push(i);
        } else {
            duplicates += 1;
        }
    }
    drop(seen);

    let per_caption: Vec<Vec<u32>> = unique
        .par_iter()
        .with_min_len(256)
        .map_init(Vec::new, |scratch, &i| {
            matcher.matches_into(rows[i].caption.trim(), scratch);
            scratch.clone()
        })
        .collect();
    let mut matched_offsets = Vec::with_capacity(unique.len() + 1);
    matched_offsets.push(0);
    let mut matched_ids = Vec::with_capacity(per_caption.iter().map(Vec::len).sum());
    for ids in per_caption {
        matched_ids.extend_from_slice(&ids);
        matched_offsets.push(matched_ids.len());
    }

    let n = matcher.names().len();
    let mut counts_before = vec![0u64; n];
    for &id in &matched_ids {
        counts_before[id as usize] += 1;
    }
    let probs: Vec<f64> = counts_before.iter().map(|&c| keep_probability(options.t, c)).collect();
    let ids_of = |k: usize| &matched_ids[matched_offsets[k]..matched_offsets[k + 1]];
    let kept: Vec<bool> = (0..unique.len())
        .into_par_iter()
        .with_min_len(1024)
        .map(|k| {
            let ids = ids_of(k);
            !ids.is_empty() && {
                let mut rng = caption_rng(options.seed, rows[unique[k]].caption.trim());
                keep_caption(ids.iter().map(|&id| probs[id as usize]), &mut rng)
            }
        })
        .collect();
    let mut counts_after = vec![0u64; n];
    let mut expected_kept = 0.0;
    for (k, &keep) in kept.iter().enumerate() {
        let ids = ids_of(k);
        if !ids.is_empty() {
            expected_kept += 1.0 - ids.iter().map(|&id| 1.0 - probs[id as usize]).product::<f64>();
        }
        if keep {
            for &id in ids {
                counts_after[id as usize] += 1;
            }
        }
    }
    Ok(Balanced {
        names: matcher.names().to_vec(),
        rows: rows.len(),
        empty,
        duplicates,
        unique,
        matched_offsets,
        matched_ids,
        kept,
        counts_before,
        counts_after,
        probs,
        expected_kept,
    })
}
