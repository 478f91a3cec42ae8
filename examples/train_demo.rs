//! Trains the built-in demo model through the library API and samples it.
//!
//! `cargo run --release --example train_demo -- [OUTPUT_DIR] [STEPS]`

use std::path::PathBuf;

use synthos_engine::pipeline::{GenerateOptions, SynthosPipeline};
use synthos_engine::train::{TrainConfig, Trainer};
use synthos_engine::{DType, Device, Result};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let output = PathBuf::from(args.next().unwrap_or_else(|| "runs/example".into()));
    let steps: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(200);
    let device = Device::best_available();
    let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };

    let pipe = SynthosPipeline::demo(device, dtype, &[])?;
    let resume = output.join("resume.safetensors").exists();
    let cfg = TrainConfig { output: output.clone(), max_steps: Some(steps), resume, ..TrainConfig::demo() };
    let mut trainer = Trainer::new(pipe, cfg)?;
    let summary = trainer.run()?;
    println!("{} steps, loss {:?} → {:?}", summary.steps, summary.first_loss, summary.final_loss);

    // The trained weights are live in the trainer's pipeline; a new process would load
    // the checkpoint instead: SynthosPipeline::demo(device, dtype, &[checkpoint]).
    let pipe = trainer.pipeline();
    let opts = GenerateOptions {
        prompt: "a large red circle on a blue background".into(),
        negative_prompt: String::new(),
        height: 64,
        width: 64,
        steps: 20,
        cfg_scale: 4.0,
        ..Default::default()
    };
    let image = pipe.generate(&opts, None)?;
    let path = output.join("example.png");
    image.save_png(&path)?;
    println!("wrote {}", path.display());
    Ok(())
}
