//! A small RFC 4180 CSV reader and writer, enough for dataset metadata files, and the
//! same reader for tab-separated files ([`read_delimited`] with `'\t'`).
//!
//! Accepted input (a superset of RFC 4180, as spreadsheet programs and pandas write it):
//! - fields separated by `,` (or the separator given to [`read_delimited`] /
//!   [`parse_delimited`]); records ended by CRLF, LF or a lone CR; a final record
//!   without a line ending;
//! - quoted fields (`"…"`) that may hold separators, line breaks and doubled quotes (`""`
//!   is one `"`); pandas' `to_csv(sep="\t")` quotes exactly the fields holding a tab, a
//!   quote or a line break, the same rule with another separator;
//! - a UTF-8 byte-order mark at the start of the file (Excel writes one);
//! - blank lines, which are skipped (pandas' `skip_blank_lines`).
//!
//! Rejected, with the file and line named: text after a closing quote other than a
//! separator or a line ending, a quoted field still open at the end of the file, and
//! text that is not UTF-8. A `"` inside an unquoted field is kept as a literal character,
//! as pandas does.
//!
//! The first record is the header. Records are kept as written: rows with fewer or more
//! fields than the header are left for the caller to judge, with the line they start on.

use std::fs;
use std::path::Path;

use crate::{bail, Result, ResultExt};

/// One record: its fields and the 1-based line of the file where it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvRecord {
    /// The line (1-based) on which the record starts; quoted fields may span more lines.
    pub line: usize,
    /// The fields, unquoted.
    pub fields: Vec<String>,
}

/// A parsed CSV file: the header record and the data records after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvTable {
    /// The column names of the first record, as written (not trimmed).
    pub header: Vec<String>,
    /// The data records in file order.
    pub rows: Vec<CsvRecord>,
}

impl CsvTable {
    /// The index of the column whose name, with surrounding spaces trimmed, is `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h.trim() == name)
    }
}

/// Reads and parses the CSV file at `path`; errors name the file and line.
pub fn read_csv(path: impl AsRef<Path>) -> Result<CsvTable> {
    read_delimited(path, ',')
}

/// Reads and parses the file at `path` with fields separated by `separator` (`','` for
/// CSV, `'\t'` for TSV; not `"`, CR or LF); errors name the file and line.
pub fn read_delimited(path: impl AsRef<Path>, separator: char) -> Result<CsvTable> {
    let path = path.as_ref();
    let text = read_text(path)?;
    parse_delimited(&text, separator, &path.display().to_string())
}

/// The text of a table file: read, checked to be UTF-8 (an error names the line of the
/// first invalid byte).
pub fn read_text(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let bytes = fs::read(path).with_ctx(|| format!("cannot read table file {}", path.display()))?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
            bail!("{} line {line}: the file is not UTF-8 text (invalid byte at offset {at})", path.display());
        }
    }
}

/// The separator of a table from its header: `'\t'` when the first non-blank line holds a
/// tab, `','` otherwise. (SynthCLIP names its tab-separated files `.csv`, so the name
/// alone does not tell.)
pub fn sniff_separator(text: &str) -> char {
    let header = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if header.contains('\t') {
        '\t'
    } else {
        ','
    }
}

/// Parses CSV `text`; `source` names the file in error messages.
///
/// An empty text (or one with only blank lines) is an error: a CSV file needs a header.
pub fn parse_csv(text: &str, source: &str) -> Result<CsvTable> {
    parse_delimited(text, ',', source)
}

/// Parses `text` with fields separated by `separator` (see [`read_delimited`]); `source`
/// names the file in error messages. An empty text is an error, as in [`parse_csv`].
pub fn parse_delimited(text: &str, separator: char, source: &str) -> Result<CsvTable> {
    if matches!(separator, '"' | '\r' | '\n') {
        bail!("{source}: {separator:?} cannot separate fields");
    }
    let mut records = parse_records(text, separator, source)?.into_iter();
    let Some(header) = records.next() else {
        bail!("{source}: the CSV file is empty (expected a header line with the column names)");
    };
    Ok(CsvTable { header: header.fields, rows: records.collect() })
}

/// Where the parser is within the current field.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a field: a `"` here opens a quoted field.
    FieldStart,
    /// Inside an unquoted field.
    Unquoted,
    /// Inside a quoted field.
    Quoted,
    /// Just read a `"` inside a quoted field: either the first half of `""` or the end.
    QuoteInQuoted,
}

/// Splits `text` into records (including the header); blank lines are dropped.
fn parse_records(text: &str, separator: char, source: &str) -> Result<Vec<CsvRecord>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut state = State::FieldStart;
    let mut line = 1usize;
    let mut record_line = 1usize;
    let mut quote_line = 1usize;
    // Whether the current record has any content yet (a blank line has none).
    let mut started = false;
    let mut chars = text.chars().peekable();

    while let Some(c) = chars.next() {
        if state == State::Quoted {
            match c {
                '"' => state = State::QuoteInQuoted,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                '\r' => {
                    // A CRLF inside a quoted field is one line break; keep it as written.
                    field.push(c);
                    if chars.peek() == Some(&'\n') {
                        field.push(chars.next().unwrap_or('\n'));
                    }
                    line += 1;
                }
                _ => field.push(c),
            }
            continue;
        }
        if state == State::QuoteInQuoted {
            if c == '"' {
                field.push('"');
                state = State::Quoted;
                continue;
            }
            if c != separator && !matches!(c, '\n' | '\r') {
                bail!(
                    "{source} line {line}: unexpected character {c:?} after the closing quote of a field \
                     (a quote inside a quoted field must be doubled: \"\")"
                );
            }
            state = State::Unquoted;
        }
        match c {
            c if c == separator => {
                fields.push(std::mem::take(&mut field));
                state = State::FieldStart;
                started = true;
            }
            '\n' | '\r' => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                if started || state != State::FieldStart {
                    fields.push(std::mem::take(&mut field));
                    records.push(CsvRecord { line: record_line, fields: std::mem::take(&mut fields) });
                }
                line += 1;
                record_line = line;
                state = State::FieldStart;
                started = false;
            }
            '"' if state == State::FieldStart => {
                state = State::Quoted;
                quote_line = line;
                started = true;
            }
            _ => {
                field.push(c);
                state = State::Unquoted;
                started = true;
            }
        }
    }
    if state == State::Quoted {
        bail!("{source} line {quote_line}: a quoted field opened here is never closed (missing closing \")");
    }
    if started || state != State::FieldStart {
        fields.push(field);
        records.push(CsvRecord { line: record_line, fields });
    }
    Ok(records)
}

/// Formats one record as a CSV line ending in `\n`, quoting the fields that need it
/// (those holding a comma, a quote, a line break, or leading/trailing spaces).
pub fn format_record<S: AsRef<str>>(fields: &[S]) -> String {
    format_delimited(fields, ',')
}

/// Formats one record as a line of `separator`-separated fields ending in `\n` (a tab
/// for SynthCLIP's `.tsv`), quoting as [`format_record`] does the fields that hold the
/// separator, a quote, a line break, or leading/trailing spaces, so that the readers of
/// this module (and pandas) read the same fields back.
pub fn format_delimited<S: AsRef<str>>(fields: &[S], separator: char) -> String {
    let mut out = String::new();
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(separator);
        }
        let f = f.as_ref();
        let needs_quotes = f.contains([separator, '"', '\n', '\r'])
            || f.starts_with(char::is_whitespace)
            || f.ends_with(char::is_whitespace);
        if needs_quotes {
            out.push('"');
            out.push_str(&f.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(f);
        }
    }
    out.push('\n');
    out
}
