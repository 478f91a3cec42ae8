//! Training: the shared [`RunLoop`] (steps, accumulation, AdamW, checkpoints, resume,
//! metrics, validation) that a trainer plugs into through [`TrainTask`], and the Synthos-I2I
//! DiT fine-tune by flow matching (docs/MODELS.md, *Training*): the loss of one batch, the
//! encoder-output cache and the [`Trainer`].

mod cache;
pub mod clip;
mod config;
mod loss;
mod run_loop;
mod trainer;

pub use cache::{Encoded, EncoderCache};
pub use config::{CacheMode, CheckpointKeep, LrSchedule, TrainConfig};
pub use loss::{flow_matching_loss, flow_matching_loss_sum, flow_matching_loss_sum_at, FlowMatchingTimes};
pub use run_loop::{check_run_folder, LoopSettings, RunLoop, StepStats, TrainSummary, TrainTask, RESUME_FILE};
pub use trainer::{memory_in_use, Trainer};
