//! The flow-matching schedule of the Synthos runs (docs/MODELS.md, *Training* and *Sampling*): the 1000-step training
//! table with shift 5 and its timestep weights, the sampling sigmas, and the Euler step.
//!
//! `shift(s) = k·s / (1 + (k−1)·s)` maps a uniform grid `s` to sigmas; a timestep is
//! `t = 1000·σ`. Training draws an index uniformly, noises `x_t = (1−σ)·x₀ + σ·ε` and
//! regresses the velocity `ε − x₀`, weighted by `w(t)`. Sampling walks
//! `σ = shift(linspace(1, 0, N+1)[:-1])` and then 0 with `x ← x + v·(σ_next − σ)`.
//! Values are computed in f64 and match DiffSynth's `FlowMatchScheduler("Wan")` (float32)
//! to float32 rounding (tests/fixtures/schedule).

/// Number of training timesteps of the scheduler.
pub const TRAIN_STEPS: usize = 1000;

/// The sigma shift of the Synthos runs, in training and sampling.
pub const SHIFT: f64 = 5.0;

/// The timestep the DiT is given for a sigma: `t = 1000·σ`.
pub fn timestep(sigma: f64) -> f64 {
    sigma * TRAIN_STEPS as f64
}

/// `k·s / (1 + (k−1)·s)`.
pub fn shift_sigma(s: f64, shift: f64) -> f64 {
    shift * s / (1.0 + (shift - 1.0) * s)
}

/// The training table: sigmas, timesteps and loss weights of the 1000 scheduler steps.
#[derive(Clone, Debug)]
pub struct TrainSchedule {
    /// σ_i = shift(1 − i/1000), i = 0..1000 (σ_0 = 1, decreasing).
    pub sigmas: Vec<f64>,
    /// t_i = 1000·σ_i.
    pub timesteps: Vec<f64>,
    /// w_i = (y_i − min y)·1000 / Σ(y − min y), y = exp(−2((t − 500)/1000)²): mean 1.
    pub weights: Vec<f64>,
}

impl TrainSchedule {
    /// The table for `shift` (5 in the Synthos runs).
    pub fn new(shift: f64) -> Self {
        let n = TRAIN_STEPS;
        let sigmas: Vec<f64> = (0..n).map(|i| shift_sigma(1.0 - i as f64 / n as f64, shift)).collect();
        let timesteps: Vec<f64> = sigmas.iter().map(|s| s * n as f64).collect();
        let y: Vec<f64> = timesteps.iter().map(|t| (-2.0 * ((t - n as f64 / 2.0) / n as f64).powi(2)).exp()).collect();
        let min = y.iter().cloned().fold(f64::INFINITY, f64::min);
        let total: f64 = y.iter().map(|v| v - min).sum();
        let weights = y.iter().map(|v| (v - min) * n as f64 / total).collect();
        TrainSchedule { sigmas, timesteps, weights }
    }

    /// (σ, t, w) of step `i` (`i < 1000`).
    pub fn at(&self, i: usize) -> (f64, f64, f64) {
        (self.sigmas[i], self.timesteps[i], self.weights[i])
    }
}

/// Sampling sigmas for `steps` Euler steps: `shift(linspace(1, 0, steps+1)[:-1])`
/// (the step after the last goes to σ = 0).
pub fn sample_sigmas(steps: usize, shift: f64) -> Vec<f64> {
    (0..steps).map(|i| shift_sigma(1.0 - i as f64 / steps as f64, shift)).collect()
}

/// The σ the sampler moves to after step `i`: the next sigma, or 0 after the last.
pub fn next_sigma(sigmas: &[f64], i: usize) -> f64 {
    sigmas.get(i + 1).copied().unwrap_or(0.0)
}
