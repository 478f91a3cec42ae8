//! Command-line arguments shared by `train` and `sample`: where the weights are and
//! which device runs them.

use std::path::PathBuf;

use clap::Args;
use synthos_engine::pipeline::{SynthosPipeline, WeightPaths};
use synthos_engine::{DType, Device, Result};

/// Weights and device.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A diffusers-format Wan2.1 folder (transformer/, text_encoder/, tokenizer/, vae/),
    /// e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers. Without it (and without --dit) the built-in
    /// tiny demo model is used.
    #[arg(long, value_name = "DIR")]
    pub wan: Option<PathBuf>,
    /// DiT weights instead of WAN/transformer: a .safetensors file, a sharded index or a
    /// folder, in the original Wan/DiffSynth naming or diffusers'.
    #[arg(long, value_name = "PATH")]
    pub dit: Option<PathBuf>,
    /// DiT configuration: a config.json or a preset (wan2.1-t2v-1.3b, wan2.1-t2v-14b, tiny).
    /// Default: config.json beside the DiT weights, else wan2.1-t2v-1.3b.
    #[arg(long, value_name = "JSON|PRESET")]
    pub dit_config: Option<String>,
    /// umT5 encoder weights (UMT5EncoderModel naming) instead of WAN/text_encoder.
    #[arg(long, value_name = "PATH")]
    pub text_encoder: Option<PathBuf>,
    /// umT5 tokenizer.json instead of WAN/tokenizer/tokenizer.json.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Wan VAE weights (AutoencoderKLWan naming) instead of WAN/vae.
    #[arg(long, value_name = "PATH")]
    pub vae: Option<PathBuf>,
    /// CLIP ViT-H/14 vision tower (CLIPVisionModel naming: a folder with config.json, or
    /// a .safetensors file). Needed for reference images and for training.
    #[arg(long, value_name = "PATH")]
    pub clip: Option<PathBuf>,
    /// Synthos checkpoint(s) laid over the DiT, in order (repeatable), e.g.
    /// runs/synthos/epoch-9.safetensors.
    #[arg(long = "checkpoint", value_name = "FILE")]
    pub checkpoints: Vec<PathBuf>,
    /// Device: auto (a GPU if usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl ModelArgs {
    /// The weight paths.
    pub fn paths(&self) -> WeightPaths {
        WeightPaths {
            wan: self.wan.clone(),
            dit: self.dit.clone(),
            dit_config: self.dit_config.clone(),
            text_encoder: self.text_encoder.clone(),
            tokenizer: self.tokenizer.clone(),
            vae: self.vae.clone(),
            clip: self.clip.clone(),
            checkpoints: self.checkpoints.clone(),
        }
    }

    /// True when no base weights are given (the demo).
    pub fn is_demo(&self) -> bool {
        self.paths().is_demo()
    }

    /// The device and compute type: bf16 on a GPU, f32 on the CPU.
    pub fn device(&self) -> Result<(Device, DType)> {
        let d = Device::parse(&self.device)?;
        Ok((d, if d.is_cuda() { DType::BF16 } else { DType::F32 }))
    }

    /// Loads the pipeline, saying what it loads.
    pub fn load(&self, paths: &WeightPaths) -> Result<SynthosPipeline> {
        let (device, dtype) = self.device()?;
        if paths.is_demo() {
            eprintln!("model: built-in tiny demo on {device}");
        } else {
            eprintln!("model: loading weights onto {device} as {dtype:?}…");
        }
        SynthosPipeline::load(paths, device, dtype)
    }
}
