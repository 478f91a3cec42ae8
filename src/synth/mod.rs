//! SynthCLIP's synthetic-data pipeline: a concept bank, one short caption per concept,
//! MetaCLIP-style balancing of the captions over the concepts, and one image per kept
//! caption from the engine's own generator.
//!
//! - [`concepts`]: the concept bank ([`ConceptBank`]), one concept per line (or
//!   SynthCLIP's `metadata.json`).
//! - [`captions`]: caption files (JSONL or TSV), template captions, the clean-up of model
//!   replies.
//! - [`llm`]: captions from an OpenAI-compatible chat-completions server with SynthCLIP's
//!   prompt, retries, a request budget, a rate limit, worker threads and resume.
//! - [`balance`](mod@balance): whole-word matching of every caption against the whole bank
//!   (Aho–Corasick) and the keep draws, `min(1, t / count)` per concept.
//! - [`report`]: `balanced.jsonl`, the JSON report and the rank/count plot.
//! - [`images`]: one image per kept caption from the engine's text-to-image pipeline,
//!   resumable, with the `train.tsv` that `clip-train` reads.
//! - [`flywheel`]: the demo flywheel, the whole question at toy scale: a demo generator,
//!   a synthetic set from it, and CLIPs trained on synthetic and on real pairs, compared
//!   zero-shot on real held-out shapes.
//!
//! The same steps are the `synthos-engine synth captions`, `synth balance` and
//! `synth images` commands; `synth all` chains them, and `synth demo` runs the flywheel.
//!
//! ```
//! use synthos_engine::synth::balance::{balance, BalanceOptions, MatchMode};
//! use synthos_engine::synth::captions::CaptionRow;
//! use synthos_engine::synth::concepts::ConceptBank;
//! # fn main() -> synthos_engine::Result<()> {
//! let bank = ConceptBank::from_concepts(&["new york", "york", "dog"])?;
//! let rows: Vec<CaptionRow> = ["A dog in New York.", "York minster at dusk", "a cat"]
//!     .iter()
//!     .enumerate()
//!     .map(|(i, c)| CaptionRow { concept: None, caption: c.to_string(), line: i + 1 })
//!     .collect();
//! let b = balance(&bank, &rows, &BalanceOptions { t: 10, seed: 0, mode: MatchMode::Word })?;
//! assert_eq!(b.counts_before, vec![1, 2, 1]); // "new york", "york", "dog"
//! assert_eq!(b.kept_count(), 2); // every count is under t; "a cat" matches nothing
//! # Ok(())
//! # }
//! ```

pub mod balance;
pub mod captions;
pub mod concepts;
pub mod flywheel;
mod http;
pub mod images;
pub mod llm;
pub mod report;

pub use balance::{balance, BalanceOptions, Balanced, ConceptMatcher, MatchMode};
pub use captions::{Caption, CaptionRow, MultiLine, TemplatePick};
pub use concepts::ConceptBank;
pub use images::{generate_image_set, ImageSetOptions, ImageSetSummary};
pub use llm::{caption_with_llm, LlmOptions, LlmSummary};

/// A stable 64-bit key of a text (FNV-1a over its UTF-8 bytes), the same on every machine
/// and version; used to key random draws by caption or concept text.
pub fn text_key(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in text.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
