//! A progress display for long runs on stderr: step/total with a bar, loss, samples/s,
//! elapsed time and ETA. On a terminal the line is redrawn in place (`\r`); otherwise
//! (logs, CI) a plain line is printed every so often, so log files stay readable.
//!
//! The text comes from the pure [`format_progress`], so its layout is testable.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// What one progress line shows.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressState {
    /// Steps done.
    pub step: u64,
    /// Steps in the run (0 when unknown: no bar, percentage or ETA).
    pub total: u64,
    /// Latest loss, if any.
    pub loss: Option<f64>,
    /// Recent throughput, if known.
    pub samples_per_s: Option<f64>,
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// Estimated seconds left, if known.
    pub eta_s: Option<f64>,
}

/// A duration for humans: `42s`, `3m05s`, `2h03m`; `--` when not finite or negative.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "--".into();
    }
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// A rate with about three significant digits: `123`, `12.3`, `1.23`, `0.123`.
pub fn format_rate(rate: f64) -> String {
    if !rate.is_finite() {
        return "--".into();
    }
    let a = rate.abs();
    if a >= 100.0 {
        format!("{rate:.0}")
    } else if a >= 10.0 {
        format!("{rate:.1}")
    } else if a >= 1.0 {
        format!("{rate:.2}")
    } else {
        format!("{rate:.3}")
    }
}

/// A loss value: four decimals, or scientific notation below 0.01.
pub fn format_loss(loss: f64) -> String {
    if loss != 0.0 && loss.abs() < 0.01 && loss.is_finite() {
        format!("{loss:.3e}")
    } else {
        format!("{loss:.4}")
    }
}

/// Seconds left for `remaining` steps at the rate of `done` steps in `elapsed_s` seconds;
/// `None` before any step is done or time has passed.
pub fn eta_seconds(done: u64, remaining: u64, elapsed_s: f64) -> Option<f64> {
    if done == 0 || elapsed_s <= 0.0 || !elapsed_s.is_finite() {
        return None;
    }
    Some(elapsed_s / done as f64 * remaining as f64)
}

/// The progress line (no line ending), e.g.
/// `step 120/1000 [##------------------] 12.0% | loss 0.1234 | 3.21 samples/s | 1m05s | ETA 7m59s`.
/// A `bar_width` of 0 leaves the bar out.
pub fn format_progress(state: &ProgressState, bar_width: usize) -> String {
    let mut s = if state.total > 0 {
        let frac = (state.step as f64 / state.total as f64).clamp(0.0, 1.0);
        let mut line = format!("step {}/{}", state.step, state.total);
        if bar_width > 0 {
            let filled = ((frac * bar_width as f64).floor() as usize).min(bar_width);
            line.push_str(&format!(" [{}{}]", "#".repeat(filled), "-".repeat(bar_width - filled)));
        }
        line.push_str(&format!(" {:.1}%", frac * 100.0));
        line
    } else {
        format!("step {}", state.step)
    };
    if let Some(loss) = state.loss {
        s.push_str(&format!(" | loss {}", format_loss(loss)));
    }
    if let Some(rate) = state.samples_per_s {
        s.push_str(&format!(" | {} samples/s", format_rate(rate)));
    }
    s.push_str(&format!(" | {}", format_duration(state.elapsed_s)));
    if state.total > 0 {
        let eta = state.eta_s.map_or_else(|| "--".to_string(), format_duration);
        s.push_str(&format!(" | ETA {eta}"));
    }
    s
}

/// Updates seen recently: the window over which rates are measured.
const RATE_WINDOW: usize = 20;
/// Fastest in-place redraw on a terminal.
const TERMINAL_REFRESH: Duration = Duration::from_millis(100);
/// Default interval between plain lines when stderr is not a terminal.
pub const DEFAULT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Width of the bar.
const BAR_WIDTH: usize = 20;

/// A live progress display (see the module documentation).
///
/// ```
/// use synthos_engine::report::Progress;
/// let mut p = Progress::new(100, 0);
/// for step in 1..=100u64 {
///     // ... one training step of batch 4 ...
///     p.update(step, Some(0.5), step * 4);
/// }
/// p.finish();
/// ```
pub struct Progress {
    out: Box<dyn Write + Send>,
    terminal: bool,
    log_interval: Duration,
    total: u64,
    start: Instant,
    /// (time, step, samples) of recent updates, oldest first.
    window: VecDeque<(Instant, u64, u64)>,
    last_draw: Option<Instant>,
    last_line_len: usize,
    latest: Option<ProgressState>,
    drawn_latest: bool,
}

impl Progress {
    /// A display on stderr for a run of `total` steps resuming after `start_step` (0 for a
    /// fresh run), redrawn in place when stderr is a terminal.
    pub fn new(total: u64, start_step: u64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        Progress::with_writer(Box::new(std::io::stderr()), terminal, DEFAULT_LOG_INTERVAL, total, start_step)
    }

    /// A display writing to `out`; `terminal` picks in-place redraws, otherwise a line is
    /// printed at most every `log_interval` (and at the last step).
    pub fn with_writer(
        out: Box<dyn Write + Send>,
        terminal: bool,
        log_interval: Duration,
        total: u64,
        start_step: u64,
    ) -> Self {
        let start = Instant::now();
        let mut window = VecDeque::with_capacity(RATE_WINDOW + 1);
        window.push_back((start, start_step, 0));
        Progress {
            out,
            terminal,
            log_interval,
            total,
            start,
            window,
            last_draw: None,
            last_line_len: 0,
            latest: None,
            drawn_latest: false,
        }
    }

    /// Records that `step` is done with `loss`, after `samples` samples in total since this
    /// display started, and redraws when due. Rates and the ETA come from the last few
    /// updates, so they follow the current speed rather than include warm-up.
    pub fn update(&mut self, step: u64, loss: Option<f64>, samples: u64) {
        let now = Instant::now();
        self.window.push_back((now, step, samples));
        if self.window.len() > RATE_WINDOW {
            self.window.pop_front();
        }
        let (t0, step0, samples0) = self.window[0];
        let dt = now.duration_since(t0).as_secs_f64();
        let samples_per_s = (dt > 0.0).then(|| samples.saturating_sub(samples0) as f64 / dt);
        let eta_s = eta_seconds(step.saturating_sub(step0), self.total.saturating_sub(step), dt);
        self.latest = Some(ProgressState {
            step,
            total: self.total,
            loss,
            samples_per_s,
            elapsed_s: now.duration_since(self.start).as_secs_f64(),
            eta_s,
        });
        self.drawn_latest = false;
        let due = match self.last_draw {
            None => true,
            Some(t) => {
                let interval = if self.terminal { TERMINAL_REFRESH } else { self.log_interval };
                now.duration_since(t) >= interval
            }
        };
        if due || (self.total > 0 && step >= self.total) {
            self.draw(now);
        }
    }

    /// Prints `text` on its own line without garbling the bar (which is redrawn after it
    /// on a terminal).
    pub fn message(&mut self, text: &str) {
        if self.terminal && self.last_line_len > 0 {
            let _ = write!(self.out, "\r\x1b[K");
        }
        let _ = writeln!(self.out, "{text}");
        if self.terminal {
            if let Some(state) = &self.latest {
                let line = format_progress(state, BAR_WIDTH);
                let _ = write!(self.out, "{line}");
                self.last_line_len = line.len();
            }
        } else {
            self.last_line_len = 0;
        }
        let _ = self.out.flush();
    }

    /// Draws the latest state if not yet shown and ends the line.
    pub fn finish(&mut self) {
        if !self.drawn_latest && self.latest.is_some() {
            self.draw(Instant::now());
        }
        if self.terminal && self.last_line_len > 0 {
            let _ = writeln!(self.out);
            self.last_line_len = 0;
        }
        let _ = self.out.flush();
    }

    fn draw(&mut self, now: Instant) {
        let Some(state) = &self.latest else { return };
        let line = format_progress(state, BAR_WIDTH);
        // Progress output is best effort: a closed stderr must not stop training.
        if self.terminal {
            let _ = write!(self.out, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(self.out, "{line}");
        }
        let _ = self.out.flush();
        self.last_line_len = line.len();
        self.last_draw = Some(now);
        self.drawn_latest = true;
    }
}
