//! The built-in demo model: tiny versions of the four Synthos-I2I components that need
//! no downloaded file — a word-level tokenizer over the demo captions' vocabulary, a
//! 3-layer umT5 and a 3-block CLIP tower with fixed random weights (frozen, as in the
//! real recipe), the pixel codec, and a small DiT that trains from scratch on
//! [`crate::data::demo`] images in minutes on a CPU.

use serde_json::{json, Map, Value};

use crate::data::demo::{Colour, DemoAttrs, Shape, ShapeSize};
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
/// Sigma shift of the demo's schedule, in training and sampling. The Synthos value (5)
/// suits 480² latents; at the demo's 64² pixels it spends most steps at noise levels where
/// nothing of the image is left (docs/NOTES.md, *Demo quality*).
pub const SHIFT: f64 = 1.0;
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

/// The demo DiT: width 256 (each token carries 2×2 latent pixels of 48 channels, 192
/// values, and a narrower model cannot pass their noise through: samples stay grainy),
/// 4 blocks of 8 heads of 32, FFN 512, with the fixed absolute position embedding (the
/// shapes are centred, and RoPE alone tells a token where it sits only through edge
/// effects that a small model learns slowly), reading the tiny encoders' 64-wide outputs.
pub fn dit_config() -> WanConfig {
    let text = t5_config();
    let clip = clip_config();
    let channels = 3 * PIXEL_FACTOR * PIXEL_FACTOR;
    WanConfig {
        in_channels: channels,
        out_channels: channels,
        dim: 256,
        ffn_dim: 512,
        num_heads: 8,
        num_layers: 4,
        abs_pos_embed: true,
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

/// Attribute sets of the demo quality check: 36 of the 540, a seeded spread over every
/// shape, colour, background, size and texture.
pub fn quality_set() -> Vec<DemoAttrs> {
    let mut all = DemoAttrs::all();
    crate::Rng::new(0x0D3E_0A11).shuffle(&mut all);
    all.into_iter().step_by(15).collect()
}

/// How well a demo generator follows prompts and reference images, read with
/// [`crate::data::demo::read_image`] over [`quality_set`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DemoQuality {
    /// Text-only samples whose shape and background colours are those the prompt names.
    pub colour_match: f64,
    /// Mean IoU of the text-only samples' shape masks with the rendered target's.
    pub shape_iou: f64,
    /// Image-only samples (reference, empty prompt) whose colours are the reference's.
    pub image_only_colour_match: f64,
    /// Mean IoU of the image-only samples' shape masks with the reference's.
    pub image_only_iou: f64,
    /// Samples of each kind.
    pub samples: usize,
}

impl DemoQuality {
    /// The line the demo run ends with.
    pub fn line(&self) -> String {
        format!(
            "demo quality: colour match {:.1}%, shape IoU {:.3}, image-only IoU {:.3}",
            100.0 * self.colour_match,
            self.shape_iou,
            self.image_only_iou
        )
    }

    /// The measures as JSON (for `metrics.jsonl`).
    pub fn to_json(&self) -> Value {
        json!({
            "colour_match": self.colour_match,
            "shape_iou": self.shape_iou,
            "image_only_colour_match": self.image_only_colour_match,
            "image_only_iou": self.image_only_iou,
            "samples": self.samples,
        })
    }
}

/// Measures `pipe` (a demo pipeline) on [`quality_set`]: one text-only sample per
/// caption (with `opts`' steps, guidance, shift and negative prompt; sample `i` from
/// seed `opts.seed + i`) and one image-only sample per rendered reference (empty prompt;
/// both guidance branches would be equal, so it runs unguided), each read and compared
/// with the rendered target. Deterministic for `opts`.
pub fn quality(pipe: &super::SynthosPipeline, opts: &super::GenerateOptions) -> crate::Result<DemoQuality> {
    use crate::data::demo::{read_image, render};
    let set = quality_set();
    let opts = super::GenerateOptions { width: IMAGE_SIZE, height: IMAGE_SIZE, ..opts.clone() };
    let captions: Vec<String> = set.iter().map(DemoAttrs::caption).collect();
    let prompts: Vec<&str> = captions.iter().map(String::as_str).collect();
    let texts = pipe.generate_batch(&prompts, &opts, None, &mut |_, _| {})?;
    // The image-only samples in one batch, each from its own reference (the same images
    // as one generation per reference).
    let targets = set.iter().map(|a| render(a, IMAGE_SIZE)).collect::<crate::Result<Vec<_>>>()?;
    let unguided = super::GenerateOptions { cfg_scale: 1.0, ..opts.clone() };
    let empty = vec![""; set.len()];
    let seeds: Vec<u64> = (0..set.len()).map(|i| opts.seed.wrapping_add(i as u64)).collect();
    let refs: Vec<&crate::image::ImageRgb> = targets.iter().collect();
    let alone = pipe.generate_with_references(&empty, &seeds, &unguided, &refs, &mut |_, _| {})?;
    let (mut matched, mut iou, mut img_matched, mut img_iou) = (0usize, 0f64, 0usize, 0f64);
    for (((attrs, sample), target), only) in set.iter().zip(&texts).zip(&targets).zip(&alone) {
        let want = read_image(target)?;
        let got = read_image(sample)?;
        matched += usize::from(got.colours_match(attrs));
        iou += got.iou(&want);
        let got = read_image(only)?;
        img_matched += usize::from(got.colours_match(attrs));
        img_iou += got.iou(&want);
    }
    let n = set.len() as f64;
    Ok(DemoQuality {
        colour_match: matched as f64 / n,
        shape_iou: iou / n,
        image_only_colour_match: img_matched as f64 / n,
        image_only_iou: img_iou / n,
        samples: set.len(),
    })
}
