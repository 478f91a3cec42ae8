//! AdamW reference update and sum of squares (for the global gradient norm).

use rayon::prelude::*;

use super::math::dot_f64;
use super::par;
use crate::desc::AdamWStep;

use crate::{bail, Result};

/// One element: updates the moments in place and returns the new weight. The CUDA
/// kernel evaluates the same expression in the same order.
pub fn update(w: f32, m: &mut f32, v: &mut f32, grad: f32, s: &AdamWStep) -> f32 {
    let g = grad * s.grad_scale;
    *m = s.beta1 * *m + (1.0 - s.beta1) * g;
    *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
    let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
    s.decay * w - (s.lr / s.bias_correction1) * (*m / denom)
}

/// One chunk of the update: weights, gradients, first and second moments.
type Chunk<'a> = (((&'a mut [f32], &'a [f32]), &'a mut [f32]), &'a mut [f32]);

/// Updates the weights `w` and moments `m`, `v` of one tensor from its gradient.
pub fn step(w: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) -> Result<()> {
    let n = w.len();
    if grad.len() != n || m.len() != n || v.len() != n {
        bail!("adamw: {n} weights with {} gradients, {} and {} moments", grad.len(), m.len(), v.len());
    }
    // Elementwise, so chunks on the pool give the same bits as one pass.
    let chunk = |(((w, g), m), v): Chunk| {
        par::avx2(|| {
            for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *w = update(*w, m, v, *g, s);
            }
        })
    };
    if n <= par::CHUNK {
        chunk((((w, grad), m), v));
    } else {
        w.par_chunks_mut(par::CHUNK)
            .zip(grad.par_chunks(par::CHUNK))
            .zip(m.par_chunks_mut(par::CHUNK))
            .zip(v.par_chunks_mut(par::CHUNK))
            .for_each(chunk);
    }
    Ok(())
}

/// `Σ x²`, accumulated in f64: fixed chunks summed in eight lanes each (in parallel for a
/// large tensor), the chunk sums added in order, so the result does not depend on the
/// number of threads.
pub fn sum_squares(x: &[f32]) -> f64 {
    let part = |c: &[f32]| par::avx2(|| dot_f64(c, c));
    if x.len() <= par::CHUNK {
        return part(x);
    }
    let parts: Vec<f64> = x.par_chunks(par::CHUNK).map(part).collect();
    parts.iter().sum()
}
