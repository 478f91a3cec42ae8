//! Run reporting: what a user watches and keeps from a training run.
//!
//! - [`MetricsWriter`]: `metrics.jsonl`, one JSON object per line (step, epoch, loss, lr,
//!   grad norm, samples/s, memory, extra fields), flushed per line, resumable.
//! - [`plot_loss`]: a loss-curve PNG (raw curve and EMA, linear or log axis);
//!   [`plot_log_log`]: curves on log-log axes (concept counts against rank).
//! - [`image_grid`]: validation samples tiled into one PNG with captions.
//! - [`Progress`]: a progress bar on stderr (redrawn on a terminal, periodic lines in logs).
//! - Images themselves ([`ImageRgb`](crate::image::ImageRgb), PNG writing) live in
//!   [`crate::image`].
//! - [`font`]: the small bitmap font the plots and grids use.
//!
//! Every PNG is written atomically (temporary file, then rename), so a viewer or a crash
//! never leaves a half-written image.

pub mod font;
mod grid;
mod metrics;
mod plot;
mod progress;

pub use grid::{compose_grid, grid_layout, image_grid, GridLayout, GRID_PAD, MAX_LABEL_LINES, MIN_LABEL_CELL_W};
pub use metrics::{read_metrics, series, MetricsRecord, MetricsWriter, STANDARD_KEYS};
pub use plot::{
    auto_smoothing, ema, format_tick, nice_ticks, plot_log_log, plot_loss, plot_loss_with, render_log_log_plot,
    render_loss_plot, PlotOptions, Series, EMA_RGB, RAW_RGB, REFERENCE_RGB,
};
pub use progress::{
    eta_seconds, format_duration, format_loss, format_progress, format_rate, Progress, ProgressState,
    DEFAULT_LOG_INTERVAL,
};
