//! Fine-tuning the Synthos-I2I DiT by flow matching (SPEC §6).

mod loss;

pub use loss::{flow_matching_loss, flow_matching_loss_sum};
