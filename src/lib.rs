//! synthos-engine: a hand-written CUDA kernel engine with a thin Rust host that trains and
//! samples Synthos-I2I (Wan2.1 DiT + umT5 + CLIP ViT-H/14 + Wan VAE) and trains CLIP on
//! synthetic data, in bf16 on NVIDIA GPUs, with a plain f32 CPU reference path.
//!
//! The layers, bottom up:
//! - [`Tensor`] on a [`Device`] (`Cpu` f32 reference or `Cuda(i)` bf16),
//! - [`ops`]: every differentiable op once, dispatching to `cpu` or `cuda`,
//! - [`autograd`]: the tape, `backward`, `no_grad`, per-block `checkpoint`,
//! - [`optim`]: fused AdamW with fp32 master weights, gradient-norm clipping,
//! - [`weights`]: safetensors in and out, PyTorch `.pt` checkpoints in,
//! - [`nn`]: parameters and layers (Linear, LayerNorm, RmsNorm) built from checkpoints or
//!   random init,
//! - [`image`]: the one RGB image type [`image::ImageRgb`] with decoding, the reference
//!   resizes, CLIP preprocessing, SynthCLIP's augmentations and PNG output; [`data`]: the
//!   Synthos and CLIP datasets and a prefetching batch loader; [`fsutil`]: atomic file
//!   writes,
//! - [`synth`]: the text half of the synthetic-data flywheel: concept banks, captions
//!   from files, templates or a chat-completions server, MetaCLIP-style balancing,
//! - [`bench`](mod@bench): the kernel benchmarks behind `synthos-engine bench` and `cargo bench`.
//!
//! ```
//! use synthos_engine::{autograd, ops, Device, Rng, Tensor};
//! # fn main() -> synthos_engine::Result<()> {
//! let dev = Device::Cpu; // or Device::best_available()
//! let mut rng = Rng::new(42);
//! let x = Tensor::randn(&[2, 16, 64], 1.0, &mut rng, dev)?;
//! let w = Tensor::randn(&[32, 64], 0.05, &mut rng, dev)?.requires_grad();
//! let y = ops::gelu(&ops::linear(&x, &w, None)?, ops::GeluApprox::Tanh)?;
//! let loss = ops::mean_all(&ops::mul(&y, &y)?)?;
//! let grads = autograd::backward(&loss)?;
//! assert_eq!(grads.get(&w).unwrap().shape(), &[32, 64]);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod autograd;
pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod desc;
mod device;
mod error;
pub mod eval;
pub mod fsutil;
pub mod image;
pub mod models;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod pipeline;
pub mod report;
pub mod rng;
pub mod schedule;
pub mod synth;
mod tensor;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use autograd::{backward, no_grad, Gradients, Keep};
pub use device::{DType, Device};
pub use error::{Error, Result, ResultExt};
pub use rng::Rng;
pub use tensor::{forbid_host_transfers, numel, Storage, Tensor, TensorId};
