//! Fine-tuning the Synthos-I2I DiT by flow matching (docs/MODELS.md, *Training*): the loss of one batch, the
//! encoder-output cache, and the [`Trainer`] that runs, checkpoints and resumes a run.

mod cache;
mod config;
mod loss;
mod trainer;

pub use cache::{Encoded, EncoderCache};
pub use config::{CacheMode, LrSchedule, TrainConfig};
pub use loss::{flow_matching_loss, flow_matching_loss_sum};
pub use trainer::{memory_in_use, StepStats, TrainSummary, Trainer, RESUME_FILE};
