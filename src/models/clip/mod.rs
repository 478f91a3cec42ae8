//! CLIP, in two roles:
//!
//! - [`ClipVisionEncoder`] (`vision`): the open-clip ViT-H/14 image tower that conditions
//!   Synthos-I2I on a reference image (frozen, penultimate hidden states).
//! - [`ClipModel`] (`model`): the contrastive CLIP that SynthCLIP trains (SLIP's `CLIP`,
//!   "SynthCLIP: Are We Ready for a Fully Synthetic CLIP Training?",
//!   <https://arxiv.org/abs/2402.01832>), facts in SPEC §8:
//!
//! ```text
//! pixels [B,3,224,224] ─ 16² patches, linear (+bias) ─ cat[cls] + pos ─ (OpenCLIP: ln_pre)
//!   ─ 12 pre-norm blocks (exact GELU) ─ norm(cls token) ─ @ image_projection ─► image [B,512]
//! ids [B,77] ─ token_embedding + positional_embedding ─ 12 causal pre-norm blocks (QuickGELU)
//!   ─ pick the end token (argmax id) ─ ln_final ─ @ text_projection ─► text [B,512]
//! loss = ½(CE(s·îtᵀ, i) + CE(s·tîᵀ, i)),  î, t̂ L2-normalized, s = exp(logit_scale)
//! ```
//!
//! The image tower comes in timm form (SLIP/SynthCLIP checkpoints: `visual.blocks.N`,
//! `image_projection`) or OpenCLIP form (`visual.conv1`, `visual.ln_pre`,
//! `visual.transformer.resblocks.N`, `visual.proj`), chosen by [`ClipConfig`]'s
//! [`VisionForm`]; the text tower has one naming (`token_embedding`,
//! `transformer.resblocks.N`, `ln_final`, `text_projection`, `logit_scale`).
//!
//! ```
//! use synthos_engine::models::clip::{ClipConfig, ClipModel};
//! use synthos_engine::{ops, DType, Device, Rng, Tensor};
//! # fn main() -> synthos_engine::Result<()> {
//! let cfg = ClipConfig::tiny();
//! let model = ClipModel::random(&cfg, 0, Device::Cpu, DType::F32)?;
//! let pixels = Tensor::randn(&[2, 3, 32, 32], 1.0, &mut Rng::new(1), Device::Cpu)?;
//! let mut ids = vec![0u32; 2 * cfg.text.context_length];
//! ids[..3].copy_from_slice(&[49406, 320, 49407]);
//! ids[16..20].copy_from_slice(&[49406, 320, 1125, 49407]);
//! let image = model.encode_image(&pixels)?; // [2, 32]
//! let text = model.encode_text(&ids, 2)?; // [2, 32]
//! let loss = ops::clip_loss(&image, &text, model.logit_scale())?;
//! assert_eq!(loss.shape(), &[] as &[usize]);
//! # Ok(()) }
//! ```

mod config;
mod model;
mod vision;
mod zero_shot;

pub use config::{ClipAct, ClipConfig, ClipTextTower, ClipTrunk, ClipVisionTower, VisionForm, CLIP_PRESETS};
pub use model::{weight_decay_applies, ClipModel, TextIndices, LOGIT_SCALE_INIT, LOGIT_SCALE_MAX};
pub use vision::{ClipVisionConfig, ClipVisionEncoder};
pub use zero_shot::{top_k_hits, zero_shot_classifier, zero_shot_logits};
