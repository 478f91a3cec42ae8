//! Safetensors in and out (and PyTorch `.pt` checkpoints in): how models load the published checkpoints (Wan2.1 DiT, umT5-XXL,
//! CLIP ViT-H/14, Wan VAE — single files up to ~11 GB, or sharded behind an index) and
//! how the engine writes its own.
//!
//! The format (<https://github.com/huggingface/safetensors>): an 8-byte little-endian
//! header length `N`, `N` bytes of JSON mapping each tensor name to
//! `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data that
//! follows the header; an optional `"__metadata__"` object of strings), then the raw
//! little-endian tensor bytes.
//!
//! - [`WeightFile`] maps one file and validates its header up front, so a corrupt or
//!   truncated download fails at open with the file named, not later with a fault.
//!   PyTorch checkpoints (`torch.save` ZIP archives: `.pt`, `.pth`, `.ckpt`, `.bin`, such
//!   as the SynthCLIP/SLIP releases) open the same way, read without Python: the state
//!   dict is found in the saved dict, a DDP `module.` prefix is removed, and nothing in
//!   the file is executed (the rules are in `torch_pt.rs`'s module documentation).
//! - [`WeightSet`] gathers the tensors of a file, a sharded index or a directory, with
//!   [`WeightSet::overlay`] layering a partial checkpoint (a fine-tune) over base weights;
//!   [`WeightSet::get`] converts bf16/f16/f32/f64 to the requested device and dtype.
//! - [`Loader`] lets a model request its tensors one by one and then report every
//!   missing, unexpected or mis-shaped tensor in a single error.
//! - [`save`] writes a file atomically (temporary file, fsync, rename), in bf16 or f32.

mod file;
mod loader;
mod save;
mod set;
mod torch_pt;

pub use file::{FileDType, TensorInfo, WeightFile};
pub use loader::Loader;
pub use save::{save, SaveDType};
pub use set::WeightSet;
