//! Trains the small demo CLIP through the library API (`ClipTrainer`) on the built-in shape
//! captions, then classifies the held-out shape images zero-shot (`zero_shot_eval`): the
//! library form of `synthos-engine clip-train` without `--data`.
//!
//! `cargo run --release --example clip_zero_shot -- [OUTPUT_DIR] [STEPS]`

use std::path::PathBuf;

use synthos_engine::data::demo::{generate_clip_demo, CLIP_DEMO_IMAGE_SIZE};
use synthos_engine::eval::{zero_shot_eval, ImageFolder};
use synthos_engine::models::clip::{ClipConfig, ClipModel};
use synthos_engine::tokenizer::{ClipTokenizer, Truncation};
use synthos_engine::train::clip::{ClipTrainConfig, ClipTrainer};
use synthos_engine::{Device, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let output = PathBuf::from(args.next().unwrap_or_else(|| "runs/clip-example".into()));
    let steps: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(300);
    let device = Device::best_available();

    // The data: captioned shape images for training, and a folder per colour/shape class of
    // attribute combinations training never shows, for the zero-shot test.
    let cfg = ClipConfig::tiny();
    let set = generate_clip_demo(output.join("demo-data"), cfg.vision.image_size.max(CLIP_DEMO_IMAGE_SIZE), 0)?;
    println!("{} training pairs, {} held-out images of {} classes", set.train_pairs, set.val_images, set.classes.len());

    // Training: the demo recipe (SynthCLIP's loss, AdamW and schedule at a small scale),
    // stopped after `steps`; the zero-shot check is done below instead of in the run.
    let model = ClipModel::random(&cfg, 0, device, device.default_dtype())?;
    let train_cfg =
        ClipTrainConfig { max_steps: Some(steps), val_folder: None, ..ClipTrainConfig::demo(&set, &output) };
    let mut trainer = ClipTrainer::new(model, train_cfg)?;
    let summary = trainer.train()?;
    println!("{} steps, loss {:?} → {:?}", summary.run.steps, summary.run.first_loss, summary.run.final_loss);

    // Zero-shot: class embeddings from the prompt templates, cosine logits per image.
    let folder = ImageFolder::open(&set.val_dir)?;
    // (The tokenizer's rows must be as long as the text tower's positions: 16 in the tiny
    // CLIP, 77 in ViT-B/16.)
    let tokenizer = ClipTokenizer::new()?.with_context_length(cfg.text.context_length)?;
    let report =
        zero_shot_eval(trainer.model(), &tokenizer, &folder, &set.classes, &set.templates, Truncation::KeepEnd, 64, 1)?;
    println!("zero-shot: {}", report.summary());
    Ok(())
}
