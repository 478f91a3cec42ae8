//! AdamW reference update and sum of squares (for the global gradient norm).

use crate::{bail, Result};

/// The constants of one AdamW update of one parameter tensor, derived on the host.
/// Passed by value to `kernels/adamw.cu`, whose `struct AdamWStep` mirrors this layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step.
    pub lr: f32,
    /// First-moment decay β1.
    pub beta1: f32,
    /// Second-moment decay β2.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight-decay factor `1 − lr·wd` (1 for parameters without decay).
    pub decay: f32,
    /// `1 − β1^t`.
    pub bias_correction1: f32,
    /// `sqrt(1 − β2^t)`.
    pub bias_correction2_sqrt: f32,
    /// Multiplier applied to every gradient element (clipping, accumulation averaging).
    pub grad_scale: f32,
}

/// One element: updates the moments in place and returns the new weight. The CUDA
/// kernel evaluates the same expression in the same order.
pub fn update(w: f32, m: &mut f32, v: &mut f32, grad: f32, s: &AdamWStep) -> f32 {
    let g = grad * s.grad_scale;
    *m = s.beta1 * *m + (1.0 - s.beta1) * g;
    *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
    let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
    s.decay * w - (s.lr / s.bias_correction1) * (*m / denom)
}

/// Updates the weights `w` and moments `m`, `v` of one tensor from its gradient.
pub fn step(w: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) -> Result<()> {
    let n = w.len();
    if grad.len() != n || m.len() != n || v.len() != n {
        bail!("adamw: {n} weights with {} gradients, {} and {} moments", grad.len(), m.len(), v.len());
    }
    for (((w, g), m), v) in w.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
        *w = update(*w, m, v, *g, s);
    }
    Ok(())
}

/// `Σ x²`, accumulated in f64.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64) * (v as f64)).sum()
}
