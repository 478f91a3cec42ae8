//! The models, written once against `Tensor` and `ops`, with configs and named presets:
//! the Wan2.1 diffusion transformer with the Synthos image projector (`wan`), the umT5
//! text encoder (`t5`), the CLIP vision tower (`clip`) and the Wan VAE (`vae`).

pub mod clip;
pub mod t5;
pub mod vae;
pub mod wan;
