//! Generates one image with the library API from published weights.
//!
//! ```text
//! cargo run --release --example generate -- WAN_DIFFUSERS_DIR CLIP_DIR [SYNTHOS_CHECKPOINT] REFERENCE.jpg "prompt"
//! ```
//! e.g. `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`, a CLIP ViT-H/14 `CLIPVisionModel` folder and a
//! Synthos `epoch-N.safetensors`.

use std::path::PathBuf;

use synthos_engine::image::ImageRgb;
use synthos_engine::pipeline::{GenerateOptions, SynthosPipeline, WeightPaths};
use synthos_engine::{bail, DType, Device, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (wan, clip, checkpoint, reference, prompt) = match args.as_slice() {
        [w, c, r, p] => (w, c, None, r, p),
        [w, c, k, r, p] => (w, c, Some(k), r, p),
        _ => bail!("usage: generate WAN_DIR CLIP_DIR [CHECKPOINT] REFERENCE PROMPT"),
    };
    let paths = WeightPaths {
        wan: Some(PathBuf::from(wan)),
        clip: Some(PathBuf::from(clip)),
        checkpoints: checkpoint.map(PathBuf::from).into_iter().collect(),
        ..Default::default()
    };
    let device = Device::best_available();
    let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
    let pipe = SynthosPipeline::load(&paths, device, dtype)?;
    let reference = ImageRgb::open(reference)?;
    // Synthos defaults: 480×480, 25 steps, cfg 5, seed 42, negative prompt "ugly, deformed, blurry, low quality".
    let opts = GenerateOptions { prompt: prompt.clone(), ..Default::default() };
    let image = pipe.generate(&opts, Some(&reference))?;
    image.save_png("generated.png")?;
    println!("wrote generated.png");
    Ok(())
}
