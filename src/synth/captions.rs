//! Caption files and the caption sources that need no model: files written elsewhere
//! (`--from`) and templates (`--templates`), plus the clean-up every caption from a
//! language model goes through.
//!
//! # Caption files
//!
//! Two formats are read, told apart by their first non-blank character (a `{` means
//! JSONL), so the file name does not matter:
//! - **JSONL**: one JSON object per line with a string `"caption"` and, optionally, a
//!   string `"concept"` (the concept the caption was written for); other keys are
//!   ignored, blank lines skipped. This is what `synth captions` writes.
//! - **TSV** (or CSV; the separator is sniffed from the header as in
//!   [`crate::data::csv::sniff_separator`]): a header naming a `caption` column and,
//!   optionally, a `concept` column; quoting as in [`crate::data::csv`].
//!
//! Every error names the file and the line.
//!
//! # Clean-up of model replies ([`clean_caption`])
//!
//! SynthCLIP's `substr_matching.py` keeps a generated text only if it holds no line
//! break, then removes every `"` and strips surrounding spaces; it does not cut the text
//! to 15 words (the prompt asks for that). [`clean_caption`] does the same, except that
//! the surrounding white space is trimmed *before* the line-break test (a reply ending
//! in a newline is kept rather than dropped) and runs of white space inside are collapsed
//! to one space. A multi-line reply is dropped ([`MultiLine::Drop`], the seed's rule) or
//! cut to its first non-blank line ([`MultiLine::FirstLine`]).

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use super::concepts::{read_utf8, ConceptBank};
use crate::data::csv::{parse_delimited, sniff_separator};
use crate::fsutil::write_atomic_with;
use crate::{bail, ensure, Result, ResultExt, Rng};

/// The longest caption the seed's prompt asks for, in words.
pub const SEED_MAX_WORDS: usize = 15;

/// One caption of a caption file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptionRow {
    /// The concept it was written for, when the file says.
    pub concept: Option<String>,
    /// The caption text, as written in the file.
    pub caption: String,
    /// The line (1-based) of the file it was read from.
    pub line: usize,
}

/// A caption for a concept, as `synth captions` writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caption {
    /// The concept of the bank the caption was written for.
    pub concept: String,
    /// The caption.
    pub caption: String,
}

/// Reads a caption file (JSONL or TSV/CSV, see the module documentation).
pub fn read_caption_rows(path: impl AsRef<Path>) -> Result<Vec<CaptionRow>> {
    let path = path.as_ref();
    let text = read_utf8(path, "caption file")?;
    parse_caption_rows(&text, &path.display().to_string())
}

/// Parses caption-file text, JSONL or TSV/CSV by its first non-blank character;
/// `source` names the file in error messages. A file without any caption is an error.
pub fn parse_caption_rows(text: &str, source: &str) -> Result<Vec<CaptionRow>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rows = if text.trim_start().starts_with('{') {
        parse_caption_jsonl(text, source)?
    } else {
        parse_caption_table(text, source)?
    };
    ensure!(!rows.is_empty(), "{source}: no captions (the file has no caption line)");
    Ok(rows)
}

/// Parses JSONL caption records (`{"concept": …, "caption": …}` per line).
pub fn parse_caption_jsonl(text: &str, source: &str) -> Result<Vec<CaptionRow>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| crate::Error::msg(format!("{source} line {n}: not JSON: {e}")))?;
        let (concept, caption) = record_fields(&value).map_err(|e| e.context(format!("{source} line {n}")))?;
        rows.push(CaptionRow { concept, caption, line: n });
    }
    Ok(rows)
}

/// The `"concept"` (optional) and `"caption"` fields of one JSONL record.
pub(crate) fn record_fields(value: &Value) -> Result<(Option<String>, String)> {
    let Some(obj) = value.as_object() else {
        bail!("expected a JSON object with a \"caption\" string, found {}", kind(value));
    };
    let caption = match obj.get("caption") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => bail!("\"caption\" must be a string, found {}", kind(other)),
        None => bail!("no \"caption\" key"),
    };
    let concept = match obj.get("concept") {
        Some(Value::String(s)) => Some(s.clone()),
        None | Some(Value::Null) => None,
        Some(other) => bail!("\"concept\" must be a string, found {}", kind(other)),
    };
    Ok((concept, caption))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses a TSV/CSV caption table with a `caption` column and an optional `concept`
/// column (separator sniffed from the header).
pub fn parse_caption_table(text: &str, source: &str) -> Result<Vec<CaptionRow>> {
    let table = parse_delimited(text, sniff_separator(text), source)?;
    let header = table.header.iter().map(|h| h.trim()).collect::<Vec<_>>().join(", ");
    let Some(caption_col) = table.column("caption") else {
        bail!("{source} line 1: no \"caption\" column (the header names: {header})");
    };
    let concept_col = table.column("concept");
    let mut rows = Vec::with_capacity(table.rows.len());
    for record in &table.rows {
        let needed = caption_col.max(concept_col.unwrap_or(0)) + 1;
        ensure!(
            record.fields.len() >= needed,
            "{source} line {}: {} fields, the header has {} ({header})",
            record.line,
            record.fields.len(),
            table.header.len()
        );
        let concept = concept_col.map(|c| record.fields[c].clone());
        rows.push(CaptionRow { concept, caption: record.fields[caption_col].clone(), line: record.line });
    }
    Ok(rows)
}

/// What to do with a reply that spans several lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultiLine {
    /// Drop it, as SynthCLIP does.
    Drop,
    /// Keep its first non-blank line.
    FirstLine,
}

/// Why a reply gave no caption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Nothing left after the clean-up.
    Empty,
    /// Several lines, with [`MultiLine::Drop`].
    MultiLine,
    /// The model stopped at the token limit (`finish_reason` `length`).
    Truncated,
}

impl Rejection {
    /// A short name for reports (`empty`, `multi-line`, `truncated`).
    pub fn name(self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::MultiLine => "multi-line",
            Rejection::Truncated => "truncated",
        }
    }
}

/// Cleans a model reply into a caption (see the module documentation): trim, test for
/// line breaks (drop or first line), remove every `"`, collapse white space. Captions are
/// not cut to [`SEED_MAX_WORDS`] words.
pub fn clean_caption(reply: &str, multiline: MultiLine) -> std::result::Result<String, Rejection> {
    let trimmed = reply.trim();
    let text = if trimmed.contains(['\n', '\r']) {
        match multiline {
            MultiLine::Drop => return Err(Rejection::MultiLine),
            MultiLine::FirstLine => trimmed.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or(""),
        }
    } else {
        trimmed
    };
    let caption = text.replace('"', "").split_whitespace().collect::<Vec<_>>().join(" ");
    if caption.is_empty() {
        Err(Rejection::Empty)
    } else {
        Ok(caption)
    }
}

/// The number of white-space separated words of `text`.
pub fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

/// What [`captions_from_rows`] did with the rows of a caption file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Rows read.
    pub rows: usize,
    /// Captions kept.
    pub kept: usize,
    /// Rows whose concept is not in the bank (left out).
    pub not_in_bank: usize,
    /// Rows left out by the clean-up ([`clean_caption`]).
    pub rejected: usize,
    /// Kept captions longer than [`SEED_MAX_WORDS`] words (kept, as the seed does).
    pub over_max_words: usize,
    /// Concepts of the bank without any caption.
    pub concepts_without_caption: usize,
}

/// The captions of a caption file for the concepts of `bank`, cleaned like model replies
/// ([`clean_caption`]), in file order. Every row must name its concept (an error names
/// the file and line otherwise); rows for concepts outside the bank are left out and
/// counted. `source` names the file in errors.
pub fn captions_from_rows(
    bank: &ConceptBank,
    rows: &[CaptionRow],
    multiline: MultiLine,
    source: &str,
) -> Result<(Vec<Caption>, ImportSummary)> {
    let mut summary = ImportSummary { rows: rows.len(), ..Default::default() };
    let mut covered = vec![false; bank.len()];
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(concept) = &row.concept else {
            bail!("{source} line {}: the caption names no concept (a \"concept\" key or column is needed)", row.line);
        };
        let Some(index) = bank.index_of(concept) else {
            summary.not_in_bank += 1;
            continue;
        };
        match clean_caption(&row.caption, multiline) {
            Ok(caption) => {
                if word_count(&caption) > SEED_MAX_WORDS {
                    summary.over_max_words += 1;
                }
                covered[index] = true;
                out.push(Caption { concept: bank.concepts()[index].clone(), caption });
            }
            Err(_) => summary.rejected += 1,
        }
    }
    summary.kept = out.len();
    summary.concepts_without_caption = covered.iter().filter(|c| !**c).count();
    Ok((out, summary))
}

/// Reads a templates file: one template per line holding `{}` where the concept goes
/// (every `{}` of a line is replaced), trimmed, blank lines skipped. Errors name the file
/// and the line of a template without `{}`, and an empty file.
pub fn read_templates(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let path = path.as_ref();
    let text = read_utf8(path, "templates file")?;
    parse_templates(&text, &path.display().to_string())
}

/// Parses the text of a templates file (see [`read_templates`]).
pub fn parse_templates(text: &str, source: &str) -> Result<Vec<String>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut templates = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        ensure!(t.contains("{}"), "{source} line {}: the template {t:?} has no {{}} for the concept", i + 1);
        templates.push(t.to_string());
    }
    ensure!(!templates.is_empty(), "{source}: no templates (the file is empty or holds only blank lines)");
    Ok(templates)
}

/// How many template captions each concept gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplatePick {
    /// One per template, in template order.
    All,
    /// One template per concept, drawn with [`template_choice`].
    One,
}

/// The template drawn for concept `index` with `seed` under [`TemplatePick::One`]:
/// `Rng::derive(seed, &[index]).below(templates)`, so the choice of one concept does not
/// depend on the others.
pub fn template_choice(seed: u64, index: usize, templates: usize) -> usize {
    Rng::derive(seed, &[index as u64]).below(templates)
}

/// Captions from templates: for each concept of `bank` in order, every template
/// ([`TemplatePick::All`]) or the one of [`template_choice`] ([`TemplatePick::One`]),
/// with each `{}` replaced by the concept.
pub fn template_captions(bank: &ConceptBank, templates: &[String], pick: TemplatePick, seed: u64) -> Vec<Caption> {
    let fill = |t: &str, c: &str| Caption { concept: c.to_string(), caption: t.replace("{}", c) };
    let mut out = Vec::new();
    if templates.is_empty() {
        return out;
    }
    for (i, concept) in bank.concepts().iter().enumerate() {
        match pick {
            TemplatePick::All => out.extend(templates.iter().map(|t| fill(t, concept))),
            TemplatePick::One => out.push(fill(&templates[template_choice(seed, i, templates.len())], concept)),
        }
    }
    out
}

/// One JSONL line (with its `\n`) for a caption: `{"concept": …, "caption": …}`.
pub fn caption_line(concept: &str, caption: &str) -> String {
    let mut map = serde_json::Map::new();
    map.insert("concept".into(), Value::String(concept.to_string()));
    map.insert("caption".into(), Value::String(caption.to_string()));
    let mut line = Value::Object(map).to_string();
    line.push('\n');
    line
}

/// Writes captions as JSONL ([`caption_line`]) to `path`, atomically, creating missing
/// parent directories.
pub fn write_captions(path: impl AsRef<Path>, captions: &[Caption]) -> Result<()> {
    use std::io::Write;
    let path = path.as_ref();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_ctx(|| format!("cannot create directory {}", dir.display()))?;
    }
    write_atomic_with(path, |w| {
        for c in captions {
            w.write_all(caption_line(&c.concept, &c.caption).as_bytes()).ctx("writing")?;
        }
        Ok(())
    })
    .map_err(|e| e.context(format!("cannot write {}", path.display())))
}

/// The distinct concepts of `captions`, for reports.
pub fn concepts_of(captions: &[Caption]) -> HashSet<&str> {
    captions.iter().map(|c| c.concept.as_str()).collect()
}
