//! Text → token ids. CLIP's byte-level BPE (SynthCLIP's text tower) is in [`clip`], its
//! items re-exported here; the rest of this module is the umT5 side.
//!
//! Prompt text → umT5 token ids, prepared exactly as the Wan2.1 / DiffSynth / Synthos
//! pipelines prepare them (docs/MODELS.md, *Text encoder*):
//!
//! 1. clean: `whitespace_clean(basic_clean(text))` of Wan's `tokenizers.py` (DiffSynth's
//!    `wan_video_text_encoder.py`): `ftfy.fix_text`, `html.unescape` twice, strip, collapse
//!    runs of white space to one space ([`clean_prompt`]);
//! 2. tokenize with the umT5 `tokenizer.json` (SentencePiece Unigram behind a
//!    Precompiled/Metaspace pipeline) through the `tokenizers` crate, built without C code
//!    (fancy-regex instead of Oniguruma), appending `</s>` and truncating to the text length
//!    (512) with the `</s>` kept, as `tokenizer(..., truncation=True, max_length=512)` does;
//! 3. pad with `<pad>` (id 0) to the text length; the real length counts the `</s>`.
//!
//! **Differences from ftfy** (ftfy is a large Python library; this is the part of it that
//! changes real prompts): every fixer that `ftfy.fix_text` runs by default is reproduced —
//! HTML entities when the line has no `<` (repeated to a fixed point, sticky across lines
//! as in ftfy), C1 controls read as Windows-1252, Latin ligatures, full/half-width forms,
//! curly quotes, line breaks, ANSI terminal escapes, control characters and NFC — except
//! **mojibake repair** (`fix_encoding`: text decoded with the wrong codec, e.g. "cafÃ©"),
//! which is a statistical heuristic and is left as is. Named HTML entities are the
//! HTML 4 set plus `&apos;` and the upper-case aliases HTML 5 defines for them (`&AMP;`,
//! `&TRADE;`, …) and those ftfy derives (`&EACUTE;` → É); the ~2000 other HTML 5 names
//! (`&starf;`, `&NewLine;`, …) stay as written. Numeric references follow Python's
//! `html.unescape` exactly. NFC/NFKC come from the `tokenizers` crate's Unicode tables,
//! whose version may lag Python's `unicodedata` for characters added recently. ANSI
//! escape parameters are ASCII digits (Python's `\d` also accepts other scripts' digits).
//! `tests/t5.rs` checks all of this against ftfy 6.3.1 on tricky strings.

use std::path::Path;

pub mod clip;

pub use clip::{
    ClipDialect, ClipTokenizer, ClipTokens, Truncation, CLIP_CONTEXT_LENGTH, CLIP_END_ID, CLIP_PAD_ID, CLIP_START_ID,
    CLIP_VOCAB_SIZE,
};

use tokenizers::{NormalizedString, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::{bail, Error, Result};

/// Text length the Wan pipelines pad and truncate prompts to.
pub const UMT5_TEXT_LEN: usize = 512;

// ---------------------------------------------------------------------------------------
// Cleaning
// ---------------------------------------------------------------------------------------

/// Wan's prompt cleaning, `whitespace_clean(basic_clean(text))`: the ftfy fixes (see the
/// module doc for what differs), HTML entities decoded twice, white space collapsed to
/// single spaces and trimmed.
pub fn clean_prompt(text: &str) -> String {
    let fixed = fix_text(text);
    let unescaped = html_unescape(&html_unescape(&fixed));
    // `regex.sub(r"\s+", " ", text).strip()`: the `regex` module's \s is Unicode White_Space,
    // the same set as `char::is_whitespace`. (Python's `str.strip` also strips U+001C–U+001F,
    // which ftfy has removed already and no entity produces.)
    unescaped.split(char::is_whitespace).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Python's `html.unescape`: numeric references (decimal or hex, `;` optional) with the
/// HTML 5 rules for invalid code points, and named references (`;` optional only for the
/// legacy names, which also match as the longest prefix of a longer name: `&ampx` → `&x`).
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        match char_reference(after) {
            Some((consumed, replacement)) => {
                out.push_str(&replacement);
                rest = &after[consumed..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The reference starting right after an `&` as `html.unescape` reads it: the bytes it
/// consumes and its replacement; `None` when the text stays as written.
fn char_reference(after: &str) -> Option<(usize, String)> {
    let bytes = after.as_bytes();
    if bytes.first() == Some(&b'#') {
        let hex = matches!(bytes.get(1), Some(b'x' | b'X'));
        let start = if hex { 2 } else { 1 };
        let digits =
            bytes[start..].iter().take_while(|b| if hex { b.is_ascii_hexdigit() } else { b.is_ascii_digit() }).count();
        if digits == 0 {
            return None;
        }
        let radix = if hex { 16 } else { 10 };
        // Saturate: any value past U+10FFFF decodes to U+FFFD, however long.
        let value = after[start..start + digits]
            .chars()
            .fold(0u64, |acc, c| (acc * radix + u64::from(c.to_digit(radix as u32).unwrap_or(0))).min(0x11_0000));
        let end = start + digits + usize::from(bytes.get(start + digits) == Some(&b';'));
        return Some((end, numeric_reference(value)));
    }
    // A name: up to 32 characters other than tab, newline, form feed, space, < & # ;,
    // then an optional ';'.
    let mut end = 0;
    for (count, (i, c)) in after.char_indices().enumerate() {
        if count == 32 || matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        end = i + c.len_utf8();
    }
    if end == 0 {
        return None;
    }
    let with_semicolon = after[end..].starts_with(';');
    let name = &after[..end];
    if let Some(c) = named_entity(name, with_semicolon) {
        return Some((end + usize::from(with_semicolon), c.to_string()));
    }
    // The longest legacy name of at least 2 characters that the reference starts with
    // (shorter than the reference: the whole name counts when a ';' follows it).
    let mut cuts: Vec<usize> = name.char_indices().map(|(i, _)| i).skip(2).collect();
    if with_semicolon {
        cuts.push(name.len());
    }
    for &cut in cuts.iter().rev() {
        if let Some(c) = named_entity(&name[..cut], false) {
            return Some((cut, c.to_string()));
        }
    }
    None
}

/// A numeric reference's replacement under the HTML 5 rules `html.unescape` follows.
fn numeric_reference(value: u64) -> String {
    match value {
        0 => "\u{FFFD}".to_string(),
        0x0D => "\r".to_string(),
        0x80..=0x9F => windows_1252_c1(value as u32).to_string(),
        0xD800..=0xDFFF => "\u{FFFD}".to_string(),
        v if v > 0x10_FFFF => "\u{FFFD}".to_string(),
        v if is_invalid_code_point(v as u32) => String::new(),
        v => char::from_u32(v as u32).map(String::from).unwrap_or_else(|| "\u{FFFD}".to_string()),
    }
}

/// Code points `html.unescape` drops: most C0/C1 controls and the noncharacters.
fn is_invalid_code_point(v: u32) -> bool {
    matches!(v, 0x1..=0x8 | 0xB | 0xE..=0x1F | 0x7F..=0x9F | 0xFDD0..=0xFDEF) || v & 0xFFFE == 0xFFFE
}

/// The Windows-1252 character of a C1 byte (0x80–0x9F); the five bytes that code page
/// leaves undefined map to themselves (Python's charref table, ftfy's sloppy codec).
fn windows_1252_c1(byte: u32) -> char {
    const TABLE: [u32; 32] = [
        0x20AC, 0x81, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039, 0x0152, 0x8D,
        0x017D, 0x8F, 0x90, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A,
        0x0153, 0x9D, 0x017E, 0x0178,
    ];
    char::from_u32(TABLE[(byte - 0x80) as usize]).unwrap_or('\u{FFFD}')
}

/// The character of entity `name` (without `&`); with `semicolon` false only the legacy
/// names that HTML allows without one match.
fn named_entity(name: &str, semicolon: bool) -> Option<char> {
    if let Some(&(_, cp)) = HTML4_ENTITIES.iter().find(|(n, _)| *n == name) {
        let legacy = (0xA0..=0xFF).contains(&cp) || matches!(name, "quot" | "amp" | "lt" | "gt");
        return (semicolon || legacy).then(|| char::from_u32(cp)).flatten();
    }
    let &(_, cp) = UPPER_CASE_ALIASES.iter().find(|(n, _)| *n == name)?;
    (semicolon || name != "TRADE").then(|| char::from_u32(cp)).flatten()
}

/// Upper-case names HTML 5 defines for HTML 4 entities (all but `TRADE` also without `;`).
const UPPER_CASE_ALIASES: [(&str, u32); 7] =
    [("AMP", 0x26), ("COPY", 0xA9), ("GT", 0x3E), ("LT", 0x3C), ("QUOT", 0x22), ("REG", 0xAE), ("TRADE", 0x2122)];

/// The HTML 4 named character references (plus XHTML's `apos`), with the code points
/// HTML 5 gives them (it moved `lang`/`rang` to U+27E8/U+27E9).
#[rustfmt::skip]
const HTML4_ENTITIES: [(&str, u32); 253] = [
    ("quot", 0x0022), ("amp", 0x0026), ("apos", 0x0027), ("lt", 0x003C), ("gt", 0x003E), ("nbsp", 0x00A0),
    ("iexcl", 0x00A1), ("cent", 0x00A2), ("pound", 0x00A3), ("curren", 0x00A4), ("yen", 0x00A5), ("brvbar", 0x00A6),
    ("sect", 0x00A7), ("uml", 0x00A8), ("copy", 0x00A9), ("ordf", 0x00AA), ("laquo", 0x00AB), ("not", 0x00AC),
    ("shy", 0x00AD), ("reg", 0x00AE), ("macr", 0x00AF), ("deg", 0x00B0), ("plusmn", 0x00B1), ("sup2", 0x00B2),
    ("sup3", 0x00B3), ("acute", 0x00B4), ("micro", 0x00B5), ("para", 0x00B6), ("middot", 0x00B7), ("cedil", 0x00B8),
    ("sup1", 0x00B9), ("ordm", 0x00BA), ("raquo", 0x00BB), ("frac14", 0x00BC), ("frac12", 0x00BD),
    ("frac34", 0x00BE), ("iquest", 0x00BF), ("Agrave", 0x00C0), ("Aacute", 0x00C1), ("Acirc", 0x00C2),
    ("Atilde", 0x00C3), ("Auml", 0x00C4), ("Aring", 0x00C5), ("AElig", 0x00C6), ("Ccedil", 0x00C7),
    ("Egrave", 0x00C8), ("Eacute", 0x00C9), ("Ecirc", 0x00CA), ("Euml", 0x00CB), ("Igrave", 0x00CC),
    ("Iacute", 0x00CD), ("Icirc", 0x00CE), ("Iuml", 0x00CF), ("ETH", 0x00D0), ("Ntilde", 0x00D1), ("Ograve", 0x00D2),
    ("Oacute", 0x00D3), ("Ocirc", 0x00D4), ("Otilde", 0x00D5), ("Ouml", 0x00D6), ("times", 0x00D7),
    ("Oslash", 0x00D8), ("Ugrave", 0x00D9), ("Uacute", 0x00DA), ("Ucirc", 0x00DB), ("Uuml", 0x00DC),
    ("Yacute", 0x00DD), ("THORN", 0x00DE), ("szlig", 0x00DF), ("agrave", 0x00E0), ("aacute", 0x00E1),
    ("acirc", 0x00E2), ("atilde", 0x00E3), ("auml", 0x00E4), ("aring", 0x00E5), ("aelig", 0x00E6),
    ("ccedil", 0x00E7), ("egrave", 0x00E8), ("eacute", 0x00E9), ("ecirc", 0x00EA), ("euml", 0x00EB),
    ("igrave", 0x00EC), ("iacute", 0x00ED), ("icirc", 0x00EE), ("iuml", 0x00EF), ("eth", 0x00F0), ("ntilde", 0x00F1),
    ("ograve", 0x00F2), ("oacute", 0x00F3), ("ocirc", 0x00F4), ("otilde", 0x00F5), ("ouml", 0x00F6),
    ("divide", 0x00F7), ("oslash", 0x00F8), ("ugrave", 0x00F9), ("uacute", 0x00FA), ("ucirc", 0x00FB),
    ("uuml", 0x00FC), ("yacute", 0x00FD), ("thorn", 0x00FE), ("yuml", 0x00FF), ("OElig", 0x0152), ("oelig", 0x0153),
    ("Scaron", 0x0160), ("scaron", 0x0161), ("Yuml", 0x0178), ("fnof", 0x0192), ("circ", 0x02C6), ("tilde", 0x02DC),
    ("Alpha", 0x0391), ("Beta", 0x0392), ("Gamma", 0x0393), ("Delta", 0x0394), ("Epsilon", 0x0395), ("Zeta", 0x0396),
    ("Eta", 0x0397), ("Theta", 0x0398), ("Iota", 0x0399), ("Kappa", 0x039A), ("Lambda", 0x039B), ("Mu", 0x039C),
    ("Nu", 0x039D), ("Xi", 0x039E), ("Omicron", 0x039F), ("Pi", 0x03A0), ("Rho", 0x03A1), ("Sigma", 0x03A3),
    ("Tau", 0x03A4), ("Upsilon", 0x03A5), ("Phi", 0x03A6), ("Chi", 0x03A7), ("Psi", 0x03A8), ("Omega", 0x03A9),
    ("alpha", 0x03B1), ("beta", 0x03B2), ("gamma", 0x03B3), ("delta", 0x03B4), ("epsilon", 0x03B5), ("zeta", 0x03B6),
    ("eta", 0x03B7), ("theta", 0x03B8), ("iota", 0x03B9), ("kappa", 0x03BA), ("lambda", 0x03BB), ("mu", 0x03BC),
    ("nu", 0x03BD), ("xi", 0x03BE), ("omicron", 0x03BF), ("pi", 0x03C0), ("rho", 0x03C1), ("sigmaf", 0x03C2),
    ("sigma", 0x03C3), ("tau", 0x03C4), ("upsilon", 0x03C5), ("phi", 0x03C6), ("chi", 0x03C7), ("psi", 0x03C8),
    ("omega", 0x03C9), ("thetasym", 0x03D1), ("upsih", 0x03D2), ("piv", 0x03D6), ("ensp", 0x2002), ("emsp", 0x2003),
    ("thinsp", 0x2009), ("zwnj", 0x200C), ("zwj", 0x200D), ("lrm", 0x200E), ("rlm", 0x200F), ("ndash", 0x2013),
    ("mdash", 0x2014), ("lsquo", 0x2018), ("rsquo", 0x2019), ("sbquo", 0x201A), ("ldquo", 0x201C), ("rdquo", 0x201D),
    ("bdquo", 0x201E), ("dagger", 0x2020), ("Dagger", 0x2021), ("bull", 0x2022), ("hellip", 0x2026),
    ("permil", 0x2030), ("prime", 0x2032), ("Prime", 0x2033), ("lsaquo", 0x2039), ("rsaquo", 0x203A),
    ("oline", 0x203E), ("frasl", 0x2044), ("euro", 0x20AC), ("image", 0x2111), ("weierp", 0x2118), ("real", 0x211C),
    ("trade", 0x2122), ("alefsym", 0x2135), ("larr", 0x2190), ("uarr", 0x2191), ("rarr", 0x2192), ("darr", 0x2193),
    ("harr", 0x2194), ("crarr", 0x21B5), ("lArr", 0x21D0), ("uArr", 0x21D1), ("rArr", 0x21D2), ("dArr", 0x21D3),
    ("hArr", 0x21D4), ("forall", 0x2200), ("part", 0x2202), ("exist", 0x2203), ("empty", 0x2205), ("nabla", 0x2207),
    ("isin", 0x2208), ("notin", 0x2209), ("ni", 0x220B), ("prod", 0x220F), ("sum", 0x2211), ("minus", 0x2212),
    ("lowast", 0x2217), ("radic", 0x221A), ("prop", 0x221D), ("infin", 0x221E), ("ang", 0x2220), ("and", 0x2227),
    ("or", 0x2228), ("cap", 0x2229), ("cup", 0x222A), ("int", 0x222B), ("there4", 0x2234), ("sim", 0x223C),
    ("cong", 0x2245), ("asymp", 0x2248), ("ne", 0x2260), ("equiv", 0x2261), ("le", 0x2264), ("ge", 0x2265),
    ("sub", 0x2282), ("sup", 0x2283), ("nsub", 0x2284), ("sube", 0x2286), ("supe", 0x2287), ("oplus", 0x2295),
    ("otimes", 0x2297), ("perp", 0x22A5), ("sdot", 0x22C5), ("lceil", 0x2308), ("rceil", 0x2309), ("lfloor", 0x230A),
    ("rfloor", 0x230B), ("lang", 0x27E8), ("rang", 0x27E9), ("loz", 0x25CA), ("spades", 0x2660), ("clubs", 0x2663),
    ("hearts", 0x2665), ("diams", 0x2666),];

/// ftfy's `fix_text` without mojibake repair: each line is fixed on its own; HTML entities
/// are decoded until the first line that contains a `<` (and not after it).
fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for line in text.split_inclusive('\n') {
        unescape &= !line.contains('<');
        out.push_str(&fix_line(line, unescape));
    }
    out
}

/// ftfy's `fix_and_explain` loop on one line: apply every fixer in ftfy's order until
/// nothing changes. (It ends: the entity and escape passes only shorten the text, and
/// the other fixers' outputs are already fixed, so each further round shortens it.)
fn fix_line(line: &str, unescape: bool) -> String {
    let mut text = line.to_string();
    loop {
        let before = text.clone();
        if unescape {
            text = ftfy_unescape_html(&text);
        }
        text = text
            .chars()
            .map(|c| if ('\u{80}'..='\u{9F}').contains(&c) { windows_1252_c1(c as u32) } else { c })
            .collect();
        text = fix_latin_ligatures(&text);
        text = fix_character_width(&text);
        text = text
            .chars()
            .map(|c| match c {
                '\u{02BC}' | '\u{2018}'..='\u{201B}' => '\'',
                '\u{201C}'..='\u{201F}' => '"',
                c => c,
            })
            .collect();
        text = text.replace("\r\n", "\n").replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
        text = remove_terminal_escapes(&text);
        text.retain(|c| {
            !matches!(c, '\0'..='\u{8}' | '\u{B}' | '\u{E}'..='\u{1F}' | '\u{7F}' | '\u{206A}'..='\u{206F}'
                | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFC}')
        });
        let mut normalized = NormalizedString::from(text.as_str());
        normalized.nfc();
        text = normalized.get().to_string();
        if text == before {
            return text;
        }
    }
}

/// ftfy's own entity pass: only `&name;` / `&#…;` of 1–24 ASCII letters and digits, with
/// the `;`, are decoded (names also in the upper-case spelling ftfy accepts, `&EACUTE;`).
fn ftfy_unescape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let hash = usize::from(after.starts_with('#'));
        let run = after.as_bytes()[hash..].iter().take_while(|b| b.is_ascii_alphanumeric()).count();
        if (1..=24).contains(&run) && after.as_bytes().get(hash + run) == Some(&b';') {
            let entity = &rest[pos..pos + 1 + hash + run + 1];
            out.push_str(&ftfy_entity(entity, &after[hash..hash + run], hash == 1));
            rest = &after[hash + run + 1..];
        } else {
            out.push('&');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// ftfy's replacement of one matched `&…;` (`body` is what lies between `&`/`&#` and `;`).
fn ftfy_entity(entity: &str, body: &str, numeric: bool) -> String {
    if numeric {
        // decoded only when html.unescape consumes the whole reference, ';' included
        let decoded = html_unescape(entity);
        return if decoded.contains(';') { entity.to_string() } else { decoded };
    }
    if let Some(c) = named_entity(body, true) {
        return c.to_string();
    }
    // ftfy's upper-case spelling of a lower-case name, when HTML itself leaves it alone
    let lower = body.to_ascii_lowercase();
    let is_upper_spelling = body == lower.to_ascii_uppercase() && body != lower;
    if is_upper_spelling && html_unescape(entity) == entity {
        if let Some(c) = named_entity(&lower, true) {
            return c.to_uppercase().collect();
        }
    }
    entity.to_string()
}

/// ftfy's `fix_latin_ligatures`: Latin ligatures and digraph letters spelled out.
fn fix_latin_ligatures(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let expanded = match c {
            '\u{0132}' => "IJ",
            '\u{0133}' => "ij",
            '\u{0149}' => "\u{02BC}n",
            '\u{01F1}' => "DZ",
            '\u{01F2}' => "Dz",
            '\u{01F3}' => "dz",
            '\u{01C4}' => "D\u{017D}",
            '\u{01C5}' => "D\u{017E}",
            '\u{01C6}' => "d\u{017E}",
            '\u{01C7}' => "LJ",
            '\u{01C8}' => "Lj",
            '\u{01C9}' => "lj",
            '\u{01CA}' => "NJ",
            '\u{01CB}' => "Nj",
            '\u{01CC}' => "nj",
            '\u{FB00}' => "ff",
            '\u{FB01}' => "fi",
            '\u{FB02}' => "fl",
            '\u{FB03}' => "ffi",
            '\u{FB04}' => "ffl",
            '\u{FB05}' => "\u{017F}t",
            '\u{FB06}' => "st",
            c => {
                out.push(c);
                continue;
            }
        };
        out.push_str(expanded);
    }
    out
}

/// ftfy's `fix_character_width`: the ideographic space becomes a space, and each
/// half-/full-width form (U+FF01–U+FFEF) its NFKC equivalent.
fn fix_character_width(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{3000}' => out.push(' '),
            '\u{FF01}'..='\u{FFEF}' => {
                let mut n = NormalizedString::from(c.to_string().as_str());
                n.nfkc();
                out.push_str(n.get());
            }
            c => out.push(c),
        }
    }
    out
}

/// ftfy's `remove_terminal_escapes`: ANSI sequences `ESC [ (digits | ;)* letter`.
fn remove_terminal_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("\u{1B}[") {
        out.push_str(&rest[..pos]);
        let params = &rest[pos + 2..];
        let run = params.bytes().take_while(|b| b.is_ascii_digit() || *b == b';').count();
        if params.as_bytes().get(run).is_some_and(|b| b.is_ascii_alphabetic()) {
            rest = &params[run + 1..];
        } else {
            out.push('\u{1B}');
            rest = &rest[pos + 1..];
        }
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------
// Tokenization
// ---------------------------------------------------------------------------------------

/// Token ids of a batch of prompts, padded to one length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    /// `[batch, text_len]` row-major; rows are padded with the pad id.
    pub ids: Vec<u32>,
    /// Real length of each row, the `</s>` included (at least 1).
    pub lengths: Vec<usize>,
    /// Padded length of every row.
    pub text_len: usize,
}

impl TokenBatch {
    /// Number of rows.
    pub fn batch(&self) -> usize {
        self.lengths.len()
    }

    /// The padded ids of row `b`.
    pub fn row(&self, b: usize) -> &[u32] {
        &self.ids[b * self.text_len..(b + 1) * self.text_len]
    }
}

/// The umT5 tokenizer: a Hugging Face `tokenizer.json` plus the Wan pipelines' cleaning,
/// truncation and padding.
pub struct T5Tokenizer {
    inner: Tokenizer,
    text_len: usize,
    pad_id: u32,
    eos_id: u32,
}

impl T5Tokenizer {
    /// Reads `tokenizer.json` (the `tokenizer/` folder of a diffusers-format Wan repository,
    /// or google/umt5-xxl's). Prompts are truncated and padded to `text_len` tokens (512 in
    /// the pipelines). Errors name the file: unreadable, not a tokenizer, no `<pad>` or
    /// `</s>` token, or a post-processor that does not append `</s>` as T5 needs.
    pub fn from_file(path: impl AsRef<Path>, text_len: usize) -> Result<T5Tokenizer> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|e| Error::msg(format!("tokenizer file {}: cannot read it: {e}", path.display())))?;
        Self::from_bytes(&bytes, text_len).map_err(|e| e.context(format!("tokenizer file {}", path.display())))
    }

    /// [`T5Tokenizer::from_file`] on the contents of a `tokenizer.json`.
    pub fn from_bytes(json: &[u8], text_len: usize) -> Result<T5Tokenizer> {
        if text_len == 0 {
            bail!("the text length must be at least 1 (the </s> token)");
        }
        // The tokenizers library panics instead of failing on some malformed contents (a
        // corrupt `precompiled_charsmap` in the normalizer): that becomes this error too.
        let parsed = std::panic::catch_unwind(|| Tokenizer::from_bytes(json)).map_err(|p| {
            Error::msg(format!(
                "not a valid tokenizer.json: the tokenizers library could not read it ({})",
                crate::error::panic_message(p.as_ref())
            ))
        })?;
        let mut inner = parsed.map_err(|e| Error::msg(format!("not a valid tokenizer.json: {e}")))?;
        let id_of = |token: &str| {
            inner.token_to_id(token).ok_or_else(|| Error::msg(format!("no {token} token in the vocabulary")))
        };
        let (pad_id, eos_id) = (id_of("<pad>")?, id_of("</s>")?);
        let truncation = TruncationParams {
            direction: TruncationDirection::Right,
            max_length: text_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        };
        inner.with_truncation(Some(truncation)).map_err(|e| Error::msg(format!("cannot set truncation: {e}")))?;
        inner.with_padding(None);
        let tok = T5Tokenizer { inner, text_len, pad_id, eos_id };
        let empty = tok.encode_cleaned("")?;
        if empty != [eos_id] {
            bail!("the empty prompt encodes to {empty:?}, not [{eos_id}] (</s>): not a T5 tokenizer (its post-processor must append </s>)");
        }
        Ok(tok)
    }

    /// Padded length of every encoded prompt.
    pub fn text_len(&self) -> usize {
        self.text_len
    }

    /// Id of `<pad>`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Number of ids the tokenizer can produce (pieces and added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of `text` taken as already cleaned, with `</s>` appended, truncated to the text
    /// length (the `</s>` kept); not padded.
    pub fn encode_cleaned(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| Error::msg(format!("cannot tokenize {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Cleans ([`clean_prompt`]), tokenizes and pads each prompt.
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TokenBatch> {
        let len = self.text_len;
        let mut ids = vec![self.pad_id; prompts.len() * len];
        let mut lengths = Vec::with_capacity(prompts.len());
        for (b, prompt) in prompts.iter().enumerate() {
            let row = self.encode_cleaned(&clean_prompt(prompt.as_ref()))?;
            if row.is_empty() || row.len() > len {
                bail!("prompt {b} encodes to {} tokens, outside 1..={len}", row.len());
            }
            ids[b * len..b * len + row.len()].copy_from_slice(&row);
            lengths.push(row.len());
        }
        Ok(TokenBatch { ids, lengths, text_len: len })
    }
}
