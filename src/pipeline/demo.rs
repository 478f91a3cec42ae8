//! The built-in demo model: tiny versions of the four Synthos-I2I components that need
//! no downloaded file — a word-level tokenizer over the demo captions' vocabulary, a
//! 3-layer umT5 and a 3-block CLIP tower with fixed random weights (frozen, as in the
//! real recipe), the pixel codec, and a small DiT that trains from scratch on
//! [`crate::data::demo`] images in minutes on a CPU.

use serde_json::{json, Map, Value};

use crate::data::demo::{Colour, Shape, ShapeSize};
use crate::models::clip::ClipVisionConfig;
use crate::models::t5::T5Config;
use crate::models::wan::WanConfig;

/// Side of the demo images in pixels.
pub const IMAGE_SIZE: usize = 64;
/// Spatial factor of the demo's pixel codec (latents 48 × 16 × 16 for 64² images).
pub const PIXEL_FACTOR: usize = 4;
/// Seed of the frozen demo text encoder's weights.
pub const TEXT_SEED: u64 = 0x5EED_0007;
/// Seed of the frozen demo CLIP tower's weights.
pub const CLIP_SEED: u64 = 0x5EED_0C11;
/// Seed of the demo DiT's initial weights.
pub const DIT_SEED: u64 = 0x5EED_0D17;
/// Tokens per demo prompt (the longest caption has 12 words, `</s>` included).
pub const TEXT_LEN: usize = 16;

/// The demo text encoder: [`T5Config::tiny`] with the demo vocabulary and 16 tokens.
pub fn t5_config() -> T5Config {
    T5Config { vocab_size: vocabulary().len(), text_len: TEXT_LEN, ..T5Config::tiny() }
}

/// The demo image encoder: [`ClipVisionConfig::tiny`] (42² pixels, 10 tokens of 64).
pub fn clip_config() -> ClipVisionConfig {
    ClipVisionConfig::tiny()
}

/// The demo DiT: width 128, 4 blocks of 4 heads of 32, on the pixel codec's 48 channels,
/// reading the tiny encoders' 64-wide outputs.
pub fn dit_config() -> WanConfig {
    let text = t5_config();
    let clip = clip_config();
    let channels = 3 * PIXEL_FACTOR * PIXEL_FACTOR;
    WanConfig {
        in_channels: channels,
        out_channels: channels,
        dim: 128,
        ffn_dim: 384,
        num_heads: 4,
        num_layers: 4,
        text_dim: text.d_model,
        text_len: TEXT_LEN,
        clip_dim: clip.hidden_size,
        ..WanConfig::wan21_t2v_1_3b()
    }
}

/// The tokens of the demo vocabulary in id order: `<pad>`, `</s>`, `<unk>`, then every
/// word the demo captions use.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = ["<pad>", "</s>", "<unk>"].iter().map(|s| s.to_string()).collect();
    let fixed = ["a", "on", "with", "background", "stripes", "dots"];
    words.extend(fixed.iter().map(|s| s.to_string()));
    words.extend(ShapeSize::ALL.iter().map(|s| s.name().to_string()));
    words.extend(Colour::ALL.iter().map(|c| c.name().to_string()));
    words.extend(Shape::ALL.iter().map(|s| s.name().to_string()));
    words
}

/// A Hugging Face `tokenizer.json` for the demo: lower-casing, whitespace and
/// punctuation splitting, one id per known word (`<unk>` otherwise), `</s>` appended —
/// the T5 conventions [`crate::tokenizer::T5Tokenizer`] checks for.
pub fn tokenizer_json() -> String {
    let words = vocabulary();
    let mut vocab = Map::new();
    for (i, w) in words.iter().enumerate() {
        vocab.insert(w.clone(), Value::from(i));
    }
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": Value::Object(vocab), "unk_token": "<unk>"}
    });
    doc.to_string()
}

/// Default validation prompts of the demo (one per shape, varied colours and textures).
pub fn validation_prompts() -> Vec<String> {
    [
        "a large red circle on a blue background",
        "a large yellow square with stripes on a purple background",
        "a small white triangle on a green background",
        "a large green circle with dots on a white background",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
