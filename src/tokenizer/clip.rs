//! Caption text → CLIP token ids, the same ids as OpenCLIP's `SimpleTokenizer` (OpenAI
//! CLIP's byte-level BPE) and as the SLIP copy of it that SynthCLIP trains with
//! (`Training/tokenizer.py` of SynthCLIP).
//!
//! The steps, for each caption:
//!
//! 1. clean: ftfy's fixes, HTML entities decoded twice, white space collapsed to single
//!    spaces and trimmed ([`clean_prompt`], shared with the umT5 side and with the same
//!    limits: no mojibake repair), then lower-cased;
//! 2. split into words with CLIP's pattern: the two special-token strings, the English
//!    contractions `'s 't 're 've 'm 'll 'd`, runs of letters (`\p{L}`), single digits
//!    (`\p{N}`), and runs of anything else but white space; the literal alternatives match
//!    case-insensitively (so `'ſ` counts as `'s`). The reference compiles the whole pattern
//!    case-insensitively, which makes the `regex` module drop U+0345 (combining Greek
//!    ypogegrammeni, whose case fold is a letter) from every class; it is dropped here too;
//! 3. each word's UTF-8 bytes become one symbol each (the last one marked end-of-word,
//!    `</w>`), and the adjacent pair with the lowest merge rank is merged, everywhere in
//!    the word from left to right, until no ranked pair is left. A word that is exactly a
//!    special-token string becomes that token's id.
//!
//! The vocabulary is CLIP's 49 408 entries: the 256 byte symbols, the same with `</w>`,
//! the first 48 894 merges of `bpe_simple_vocab_16e6.txt.gz` (embedded in the crate from
//! `assets/clip/`), then the start token ([`CLIP_START_ID`], 49 406) and the end token
//! ([`CLIP_END_ID`], 49 407).
//!
//! # Rows of the text tower, and the two truncations
//!
//! [`ClipTokenizer::tokenize`] gives `[start] + ids + [end]`, padded with 0 to the context
//! length (77). Captions of more than 75 word pieces do not fit; the two codebases cut them
//! differently ([`Truncation`]):
//!
//! - **OpenCLIP** (`open_clip.tokenize`, [`Truncation::KeepEnd`]): keep the first 77 ids
//!   and overwrite the last with the end token, so every row has its end token;
//! - **SynthCLIP** (SLIP's tokenizer, [`Truncation::DropEnd`]): keep the first 77 ids and
//!   nothing more, so a caption of 76 pieces or more has **no end token**.
//!
//! Both text towers pool the hidden state at `argmax(ids)` ([`ClipTokens::pool_index`]),
//! meant to be the end token, the largest id. Without one, the largest id of the row is
//! the start token at position 0 (every word piece is below it), so **SynthCLIP embeds
//! captions longer than 75 pieces from the start token's state**: that state sees no
//! caption token under the causal mask, and all such captions get the same embedding.
//! Use `DropEnd` to reproduce SynthCLIP's training and evaluation exactly, `KeepEnd` for
//! OpenCLIP checkpoints.
//!
//! The two codebases also spell the special tokens differently when they occur in a
//! caption ([`ClipDialect`]): OpenCLIP `<start_of_text>`/`<end_of_text>`, SLIP
//! `<|startoftext|>`/`<|endoftext|>`. Written in a caption, its dialect's spelling becomes
//! the special id; the other spelling is ordinary text. The ids are the same.
//!
//! Note that id 0 is both the padding and the byte `!` (when it is not the end of a word),
//! so a row's real length is kept in [`ClipTokens::lengths`] rather than read from zeros.
//!
//! ```
//! use synthos_engine::tokenizer::{ClipTokenizer, Truncation, CLIP_END_ID, CLIP_START_ID};
//! # fn main() -> synthos_engine::Result<()> {
//! let tok = ClipTokenizer::new()?;
//! let rows = tok.tokenize(&["a photo of a cat"], Truncation::KeepEnd);
//! assert_eq!(rows.row(0)[..7], [CLIP_START_ID, 320, 1125, 539, 320, 2368, CLIP_END_ID]);
//! assert_eq!(rows.pool_index(0), 6); // the end token
//! assert_eq!(tok.decode(&tok.encode_text("A photo of a cat!"))?, "a photo of a cat ! ");
//! # Ok(()) }
//! ```
//!
//! `tests/clip_tokenizer.rs` checks all of this against OpenCLIP 3.3.0 and a SLIP
//! reproduction (`tests/reference/make_clip_tokenizer_fixtures.py`).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;

use super::clean_prompt;
use crate::{bail, Error, Result};

/// CLIP's BPE merge list, `bpe_simple_vocab_16e6.txt.gz` (see `assets/clip/README.md`).
const BUILTIN_MERGES_GZ: &[u8] = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.txt.gz");

/// Token rows of the text towers: `[start] + ids + [end]` padded to this length.
pub const CLIP_CONTEXT_LENGTH: usize = 77;
/// Number of token ids (rows of the token embedding).
pub const CLIP_VOCAB_SIZE: usize = 49_408;
/// Id of the start-of-text token, first in every row.
pub const CLIP_START_ID: u32 = 49_406;
/// Id of the end-of-text token, the largest id: the text towers pool at its position.
pub const CLIP_END_ID: u32 = 49_407;
/// Id the rows are padded with (also the id of the byte `!` inside a word).
pub const CLIP_PAD_ID: u32 = 0;

/// Merges CLIP uses: lines 1 to 48 894 of the file (line 0 is a version header).
const NUM_MERGES: usize = 49_152 - 256 - 2;
/// First id of a merged symbol: after the 256 byte symbols and their 256 `</w>` forms.
const FIRST_MERGE_ID: u32 = 512;
/// Words whose pieces are cached; past this many the cache starts over.
const CACHE_LIMIT: usize = 1 << 20;

/// How captions longer than the context length are cut (module doc, *the two truncations*).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Truncation {
    /// OpenCLIP: the first `context_length` ids, the last one replaced by the end token.
    #[default]
    KeepEnd,
    /// SynthCLIP / SLIP: the first `context_length` ids, so a long caption has no end token.
    DropEnd,
}

/// Which codebase's special-token strings are recognised inside caption text. The ids
/// (49 406, 49 407) and everything else are the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ClipDialect {
    /// OpenCLIP's `SimpleTokenizer`: `<start_of_text>`, `<end_of_text>`.
    #[default]
    OpenClip,
    /// SLIP's tokenizer as SynthCLIP ships it: `<|startoftext|>`, `<|endoftext|>`.
    Slip,
}

impl ClipDialect {
    /// The start and end token strings.
    pub fn special_tokens(self) -> [&'static str; 2] {
        match self {
            ClipDialect::OpenClip => ["<start_of_text>", "<end_of_text>"],
            ClipDialect::Slip => ["<|startoftext|>", "<|endoftext|>"],
        }
    }

    /// The truncation the dialect's codebase applies: [`Truncation::KeepEnd`] for OpenCLIP,
    /// [`Truncation::DropEnd`] for SLIP / SynthCLIP.
    pub fn truncation(self) -> Truncation {
        match self {
            ClipDialect::OpenClip => Truncation::KeepEnd,
            ClipDialect::Slip => Truncation::DropEnd,
        }
    }
}

/// Token rows of a batch of captions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClipTokens {
    /// `[batch, context_length]` row-major token ids (`u32`; widen to `i64` for a
    /// PyTorch-style `LongTensor`), each row padded with [`CLIP_PAD_ID`].
    pub ids: Vec<u32>,
    /// Ids of each row before the padding, start and end tokens included
    /// (at most `context_length`).
    pub lengths: Vec<usize>,
    /// Length of every row.
    pub context_length: usize,
}

impl ClipTokens {
    /// Number of rows.
    pub fn batch(&self) -> usize {
        self.lengths.len()
    }

    /// The padded ids of row `b` (panics when `b` is not below [`ClipTokens::batch`], as
    /// slice indexing does).
    pub fn row(&self, b: usize) -> &[u32] {
        &self.ids[b * self.context_length..(b + 1) * self.context_length]
    }

    /// Where the text tower pools row `b`: the position of its largest id, the first one
    /// on ties (`torch.argmax` over the row). That is the end token when the row has one,
    /// position 0 (the start token) when [`Truncation::DropEnd`] cut it off.
    pub fn pool_index(&self, b: usize) -> usize {
        first_argmax(self.row(b))
    }

    /// [`ClipTokens::pool_index`] of every row.
    pub fn pool_indices(&self) -> Vec<usize> {
        (0..self.batch()).map(|b| self.pool_index(b)).collect()
    }

    /// The ids as `i64`, the dtype of the reference tokenizers' tensors.
    pub fn ids_i64(&self) -> Vec<i64> {
        self.ids.iter().map(|&id| i64::from(id)).collect()
    }
}

/// Index of the first maximal value (0 for an empty slice).
fn first_argmax(values: &[u32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// OpenAI CLIP's byte-level BPE tokenizer (module doc). Cheap to share: it is `Send` and
/// `Sync`, and the per-word cache sits behind a mutex.
pub struct ClipTokenizer {
    dialect: ClipDialect,
    context_length: usize,
    /// Word splitter of the dialect.
    pattern: Regex,
    /// Id of the symbol of each byte (add 256 for its `</w>` form).
    byte_ids: [u32; 256],
    /// Rank of each mergeable pair of ids; the merged symbol's id is `FIRST_MERGE_ID + rank`.
    ranks: HashMap<(u32, u32), u32>,
    /// Bytes each id stands for, `</w>` written out (as the reference's decoder has it).
    pieces: Vec<Vec<u8>>,
    /// Word pieces of the words seen so far.
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("dialect", &self.dialect)
            .field("context_length", &self.context_length)
            .field("vocab_size", &self.vocab_size())
            .finish_non_exhaustive()
    }
}

/// Bytes CLIP's merge file writes as themselves: printable Latin-1 (`!`..`~`, `¡`..`¬`,
/// `®`..`ÿ`).
fn printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The bytes in the order of CLIP's byte-to-symbol table: the [`printable`] ones first, then
/// the others, each group in increasing order. A byte's position in this list is its id.
fn byte_order() -> Vec<u8> {
    let mut order: Vec<u8> = (0..=255u8).filter(|&b| printable(b)).collect();
    order.extend((0..=255u8).filter(|&b| !printable(b)));
    order
}

/// The character CLIP's merge file writes for each byte: printable Latin-1 bytes as
/// themselves, the others as U+0100 onwards in increasing byte order.
fn byte_symbols(order: &[u8]) -> [char; 256] {
    let mut symbols = ['\0'; 256];
    let mut next = 0x100u32;
    for &b in order {
        symbols[usize::from(b)] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\u{FFFD}')
        };
    }
    symbols
}

impl ClipTokenizer {
    /// The tokenizer with the built-in merge file, OpenCLIP's dialect and a context length
    /// of 77. Errors only if the embedded file were damaged.
    pub fn new() -> Result<ClipTokenizer> {
        Self::from_merges_gz(BUILTIN_MERGES_GZ).map_err(|e| e.context("built-in bpe_simple_vocab_16e6.txt.gz"))
    }

    /// SynthCLIP's tokenizer: the built-in merges in SLIP's dialect. Tokenize with
    /// [`Truncation::DropEnd`] to get SynthCLIP's rows.
    pub fn slip() -> Result<ClipTokenizer> {
        Self::new()?.with_dialect(ClipDialect::Slip)
    }

    /// Reads a gzip-compressed CLIP merge file (`bpe_simple_vocab_16e6.txt.gz`); errors
    /// name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ClipTokenizer> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| Error::msg(format!("CLIP merges file {}: cannot read it: {e}", path.display())))?;
        Self::from_merges_gz(&bytes).map_err(|e| e.context(format!("CLIP merges file {}", path.display())))
    }

    /// Builds the tokenizer from the bytes of a gzip-compressed merge file, OpenCLIP's
    /// dialect, context length 77. The file must hold a header line and at least 48 894
    /// merges of two symbols each, every symbol known by the time its merge is read (as in
    /// CLIP's file), and no merge may repeat an earlier symbol: then the vocabulary is
    /// CLIP's 49 408 ids.
    pub fn from_merges_gz(gz: &[u8]) -> Result<ClipTokenizer> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .map_err(|e| Error::msg(format!("not a gzip-compressed UTF-8 text file: {e}")))?;
        let lines: Vec<&str> = text.split('\n').skip(1).take(NUM_MERGES).collect();
        if lines.len() < NUM_MERGES {
            bail!("{} merge lines after the header, CLIP needs {NUM_MERGES}", lines.len());
        }

        let order = byte_order();
        let symbols = byte_symbols(&order);
        let mut byte_ids = [0u32; 256];
        let mut pieces: Vec<Vec<u8>> = Vec::with_capacity(CLIP_VOCAB_SIZE);
        let mut ids: HashMap<String, u32> = HashMap::with_capacity(CLIP_VOCAB_SIZE);
        for (suffix, end_of_word) in [("", false), ("</w>", true)] {
            for (i, &b) in order.iter().enumerate() {
                let id = pieces.len() as u32;
                if !end_of_word {
                    byte_ids[usize::from(b)] = i as u32;
                }
                let mut piece = vec![b];
                piece.extend_from_slice(suffix.as_bytes());
                pieces.push(piece);
                ids.insert(format!("{}{suffix}", symbols[usize::from(b)]), id);
            }
        }

        let mut ranks = HashMap::with_capacity(NUM_MERGES);
        for (rank, line) in lines.iter().enumerate() {
            let line_no = rank + 2;
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [left, right] = parts[..] else {
                bail!("line {line_no}: {line:?} is not two symbols separated by a space");
            };
            let id_of = |s: &str| {
                ids.get(s).copied().ok_or_else(|| Error::msg(format!("line {line_no}: unknown symbol {s:?}")))
            };
            let (a, b) = (id_of(left)?, id_of(right)?);
            let merged = format!("{left}{right}");
            let id = FIRST_MERGE_ID + rank as u32;
            if ids.insert(merged.clone(), id).is_some() {
                bail!("line {line_no}: the merge {line:?} makes {merged:?}, already in the vocabulary");
            }
            if ranks.insert((a, b), rank as u32).is_some() {
                bail!("line {line_no}: the merge {line:?} repeats an earlier one");
            }
            let piece = [pieces[a as usize].as_slice(), pieces[b as usize].as_slice()].concat();
            pieces.push(piece);
        }
        let dialect = ClipDialect::OpenClip;
        for special in dialect.special_tokens() {
            pieces.push(special.as_bytes().to_vec());
        }
        debug_assert_eq!(pieces.len(), CLIP_VOCAB_SIZE);

        Ok(ClipTokenizer {
            dialect,
            context_length: CLIP_CONTEXT_LENGTH,
            pattern: word_pattern(dialect)?,
            byte_ids,
            ranks,
            pieces,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The same tokenizer recognising `dialect`'s special-token strings in captions (and
    /// decoding the special ids to them).
    pub fn with_dialect(mut self, dialect: ClipDialect) -> Result<ClipTokenizer> {
        self.pattern = word_pattern(dialect)?;
        for (id, special) in [CLIP_START_ID, CLIP_END_ID].into_iter().zip(dialect.special_tokens()) {
            self.pieces[id as usize] = special.as_bytes().to_vec();
        }
        self.dialect = dialect;
        self.cache_lock().clear();
        Ok(self)
    }

    /// The same tokenizer making rows of `context_length` ids (at least 1; CLIP's towers
    /// have 77 positions).
    pub fn with_context_length(mut self, context_length: usize) -> Result<ClipTokenizer> {
        if context_length == 0 {
            bail!("the CLIP context length must be at least 1");
        }
        self.context_length = context_length;
        Ok(self)
    }

    /// Which special-token strings are recognised.
    pub fn dialect(&self) -> ClipDialect {
        self.dialect
    }

    /// Length of the rows [`ClipTokenizer::tokenize`] makes.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Number of ids, [`CLIP_VOCAB_SIZE`].
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The word-piece ids of a caption: cleaned, lower-cased, split into words and
    /// byte-pair encoded; no start or end token, no truncation (the reference's `encode`).
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        let cleaned = clean_prompt(text).to_lowercase();
        let specials = self.dialect.special_tokens();
        let mut out = Vec::new();
        for word in self.pattern.find_iter(&cleaned).map(|m| m.as_str()) {
            if word == specials[0] {
                out.push(CLIP_START_ID);
            } else if word == specials[1] {
                out.push(CLIP_END_ID);
            } else {
                out.extend(self.word_pieces(word));
            }
        }
        out
    }

    /// Rows of `context_length` ids for a batch of captions: `[start] + encode_text + [end]`,
    /// cut as `truncation` says when longer, then padded with [`CLIP_PAD_ID`].
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S], truncation: Truncation) -> ClipTokens {
        let len = self.context_length;
        let mut ids = vec![CLIP_PAD_ID; texts.len() * len];
        let mut lengths = Vec::with_capacity(texts.len());
        for (b, text) in texts.iter().enumerate() {
            let mut row = Vec::with_capacity(len + 1);
            row.push(CLIP_START_ID);
            row.extend(self.encode_text(text.as_ref()));
            row.push(CLIP_END_ID);
            if row.len() > len {
                row.truncate(len);
                if truncation == Truncation::KeepEnd {
                    row[len - 1] = CLIP_END_ID;
                }
            }
            ids[b * len..b * len + row.len()].copy_from_slice(&row);
            lengths.push(row.len());
        }
        ClipTokens { ids, lengths, context_length: len }
    }

    /// Text of a sequence of ids as the reference's `decode` gives it: the bytes of every
    /// piece, read as UTF-8 (invalid sequences become U+FFFD), with each `</w>` turned into
    /// a space. Special ids decode to the dialect's strings and padding zeros to `!`, so
    /// pass only a row's real ids. Errors on an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            match self.pieces.get(id as usize) {
                Some(piece) => bytes.extend_from_slice(piece),
                None => bail!("cannot decode token id {id}: the CLIP vocabulary has {} ids", self.pieces.len()),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).replace("</w>", " "))
    }

    /// The ids of one word (not a special token), cached.
    fn word_pieces(&self, word: &str) -> Vec<u32> {
        if let Some(ids) = self.cache_lock().get(word) {
            return ids.clone();
        }
        let ids = self.byte_pair_encode(word.as_bytes());
        let mut cache = self.cache_lock();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(word.to_string(), ids.clone());
        ids
    }

    /// The cache, also after a panic elsewhere poisoned the lock (it only holds finished
    /// entries).
    fn cache_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u32>>> {
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One symbol per byte, the last in its `</w>` form; then, while some adjacent pair
    /// has a rank, merge every occurrence (left to right) of the lowest-ranked pair.
    fn byte_pair_encode(&self, word: &[u8]) -> Vec<u32> {
        let mut symbols: Vec<u32> = word.iter().map(|&b| self.byte_ids[usize::from(b)]).collect();
        if let Some(last) = symbols.last_mut() {
            *last += 256;
        }
        let mut merged = Vec::with_capacity(symbols.len());
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .filter_map(|pair| self.ranks.get(&(pair[0], pair[1])).map(|&rank| (rank, pair[0], pair[1])))
                .min();
            let Some((rank, left, right)) = best else { break };
            merged.clear();
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == left && symbols[i + 1] == right {
                    merged.push(FIRST_MERGE_ID + rank);
                    i += 2;
                } else {
                    merged.push(symbols[i]);
                    i += 1;
                }
            }
            std::mem::swap(&mut symbols, &mut merged);
        }
        symbols
    }
}

/// CLIP's word pattern for a dialect. The literal alternatives match case-insensitively as
/// in the reference; the classes are matched as the reference's case-insensitive `regex`
/// module matches them, which excludes U+0345 from all three.
fn word_pattern(dialect: ClipDialect) -> Result<Regex> {
    let [start, end] = dialect.special_tokens().map(regex::escape);
    let pattern = format!(r"(?i:{start}|{end}|'s|'t|'re|'ve|'m|'ll|'d)|\p{{L}}+|\p{{N}}|[^\s\p{{L}}\p{{N}}\x{{345}}]+");
    Regex::new(&pattern).map_err(|e| Error::msg(format!("cannot compile the CLIP word pattern: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_clips() {
        let order = byte_order();
        assert_eq!(order.len(), 256);
        assert_eq!((order[0], order[93], order[94], order[187], order[188]), (b'!', b'~', 0xA1, 0xFF, 0));
        let symbols = byte_symbols(&order);
        assert_eq!(symbols[usize::from(b'a')], 'a');
        assert_eq!(symbols[0], '\u{100}');
        assert_eq!(symbols[usize::from(b' ')], '\u{120}');
        assert_eq!(symbols[0xAD], '\u{143}');
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ClipTokenizer>();
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(first_argmax(&[3, 7, 1, 7]), 1);
        assert_eq!(first_argmax(&[]), 0);
    }

    #[test]
    fn merges_rank_in_file_order() {
        let tok = ClipTokenizer::new().unwrap();
        // "i n" is the first merge: "in" is id 512.
        assert_eq!(tok.pieces[512], b"in");
        let ids = tok.byte_pair_encode(b"in");
        assert_eq!(ids.len(), 1);
        assert_eq!(tok.pieces[ids[0] as usize], b"in</w>");
        assert_eq!(tok.byte_pair_encode(b"x"), [256 + tok.byte_ids[usize::from(b'x')]]);
        assert_eq!(tok.vocab_size(), CLIP_VOCAB_SIZE);
    }

    /// The class of CLIP's word pattern each code point falls in alone, against the
    /// reference's `regex` module (tests/fixtures/clip/tokenizer.json, `word_classes`):
    /// 'L' letter runs, 'N' single digits, 'P' runs of the rest, '-' no match. Checked on
    /// the code points assigned in Unicode 14 (the fixture's Python): `regex` 2026.11.15
    /// knows Unicode 17, the `regex` crate Unicode 16, so code points assigned later are
    /// letters to one and unassigned (class 'P') to the other, as they differ between
    /// Python setups too.
    #[test]
    fn word_pattern_classes_match_the_reference_everywhere() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/clip/tokenizer.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let runs: Vec<(u32, char)> = fixture["word_classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_u64().unwrap() as u32, r[1].as_str().unwrap().chars().next().unwrap()))
            .collect();
        let unassigned: Vec<(u32, u32)> = fixture["unassigned"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_u64().unwrap() as u32, r[1].as_u64().unwrap() as u32))
            .collect();
        let assigned = |cp: u32| !unassigned.iter().any(|&(a, b)| (a..=b).contains(&cp));
        for dialect in [ClipDialect::OpenClip, ClipDialect::Slip] {
            let pattern = word_pattern(dialect).unwrap();
            let class = |c: char| {
                let count = |s: String| pattern.find_iter(&s).count();
                match pattern.find(&c.to_string()) {
                    None => '-',
                    Some(_) if count(format!("{c}{c}")) == 2 => 'N',
                    Some(_) if count(format!("{c}a")) == 1 => 'L',
                    Some(_) => 'P',
                }
            };
            let mut bad = Vec::new();
            for (i, &(start, want)) in runs.iter().enumerate() {
                let end = runs.get(i + 1).map_or(0x11_0000, |r| r.0);
                for c in (start..end).filter(|&cp| assigned(cp)).filter_map(char::from_u32) {
                    let got = class(c);
                    if got != want {
                        bad.push(format!("U+{:04X} {got} (want {want})", u32::from(c)));
                    }
                }
            }
            assert!(bad.is_empty(), "{dialect:?}: {} code points differ: {}", bad.len(), bad.join(", "));
        }
    }
}
