//! The concept bank: the list of concepts that captions are written for and balanced
//! over (SynthCLIP and MetaCLIP use MetaCLIP's ~500k entries).
//!
//! Accepted files:
//! - text, one concept per line (UTF-8, an optional byte-order mark, LF or CRLF line
//!   endings); each line is trimmed of surrounding white space and blank lines are
//!   skipped;
//! - a JSON array of strings (SynthCLIP's and MetaCLIP's `metadata.json`), recognised by a
//!   first non-blank character `[`; entries are trimmed and blank entries skipped alike.
//!
//! Duplicates (the same text after trimming) are merged into their first occurrence and
//! listed in [`ConceptBank::duplicates`] with both line numbers, so a caller can report
//! them; they are not an error (MetaCLIP's list is deduplicated, hand-made lists often
//! are not). A file without any concept, text that is not UTF-8 and malformed JSON are
//! errors naming the file and line.

use std::collections::HashMap;
use std::path::Path;

use crate::{bail, Result, ResultExt};

/// A concept that appeared again after its first occurrence (merged into the first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DuplicateConcept {
    /// The concept text (trimmed).
    pub concept: String,
    /// The line (1-based; for a JSON array, the entry's 1-based position) of the repeat.
    pub line: usize,
    /// The line of the first occurrence, the one kept.
    pub first_line: usize,
}

/// The concepts of a bank, in file order, without duplicates.
#[derive(Clone, Debug)]
pub struct ConceptBank {
    source: String,
    concepts: Vec<String>,
    lines: Vec<usize>,
    duplicates: Vec<DuplicateConcept>,
    index: HashMap<String, usize>,
}

impl ConceptBank {
    /// Reads a concepts file (see the module documentation); errors name the file and line.
    pub fn read(path: impl AsRef<Path>) -> Result<ConceptBank> {
        let path = path.as_ref();
        let text = read_utf8(path, "concepts file")?;
        ConceptBank::parse(&text, &path.display().to_string())
    }

    /// Parses the text of a concepts file; `source` names it in error messages.
    pub fn parse(text: &str, source: &str) -> Result<ConceptBank> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let entries: Vec<(usize, String)> = if text.trim_start().starts_with('[') {
            let list: Vec<String> = serde_json::from_str(text).map_err(|e| {
                crate::Error::msg(format!(
                    "{source} line {}: not a JSON array of concept strings: {e}",
                    e.line().max(1)
                ))
            })?;
            list.into_iter().enumerate().map(|(i, c)| (i + 1, c)).collect()
        } else {
            text.lines().enumerate().map(|(i, l)| (i + 1, l.to_string())).collect()
        };
        let mut bank = ConceptBank {
            source: source.to_string(),
            concepts: Vec::new(),
            lines: Vec::new(),
            duplicates: Vec::new(),
            index: HashMap::new(),
        };
        for (line, raw) in entries {
            bank.push(raw.trim(), line);
        }
        if bank.concepts.is_empty() {
            bail!("{source}: no concepts (the file is empty or holds only blank lines; expected one concept per line)");
        }
        Ok(bank)
    }

    /// A bank from concepts given in code (trimmed, blanks skipped, duplicates merged as
    /// in a file; "lines" are 1-based positions). Errors when none is left.
    pub fn from_concepts<S: AsRef<str>>(concepts: &[S]) -> Result<ConceptBank> {
        let text: Vec<String> = concepts.iter().map(|c| c.as_ref().replace(['\n', '\r'], " ")).collect();
        ConceptBank::parse(&text.join("\n"), "<concepts>")
    }

    fn push(&mut self, concept: &str, line: usize) {
        if concept.is_empty() {
            return;
        }
        if let Some(&first) = self.index.get(concept) {
            self.duplicates.push(DuplicateConcept {
                concept: concept.to_string(),
                line,
                first_line: self.lines[first],
            });
            return;
        }
        self.index.insert(concept.to_string(), self.concepts.len());
        self.concepts.push(concept.to_string());
        self.lines.push(line);
    }

    /// Where the bank was read from (the path, or `<concepts>`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The concepts in file order (first occurrences).
    pub fn concepts(&self) -> &[String] {
        &self.concepts
    }

    /// The number of distinct concepts.
    pub fn len(&self) -> usize {
        self.concepts.len()
    }

    /// Whether the bank is empty (never true for a bank that was read or parsed).
    pub fn is_empty(&self) -> bool {
        self.concepts.is_empty()
    }

    /// The line (1-based) each concept was read from, parallel to [`concepts`](Self::concepts).
    pub fn lines(&self) -> &[usize] {
        &self.lines
    }

    /// The repeats that were merged into an earlier occurrence, in file order.
    pub fn duplicates(&self) -> &[DuplicateConcept] {
        &self.duplicates
    }

    /// The position of `concept` (compared after trimming), if it is in the bank.
    pub fn index_of(&self, concept: &str) -> Option<usize> {
        self.index.get(concept.trim()).copied()
    }
}

/// Reads `path` as UTF-8 text; errors name the file (`what` says what it is) and the line
/// of the first invalid byte.
pub(crate) fn read_utf8(path: &Path, what: &str) -> Result<String> {
    let bytes = std::fs::read(path).with_ctx(|| format!("cannot read {what} {}", path.display()))?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
            bail!("{} line {line}: the {what} is not UTF-8 text (invalid byte at offset {at})", path.display());
        }
    }
}
