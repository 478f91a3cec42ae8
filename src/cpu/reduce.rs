//! Reduction reference ops (f64 accumulation, so the reference is more exact than any
//! kernel it checks).

/// Sums `x` (shape `in_shape`) onto `out_shape` (same rank; each dim 1 or equal).
pub fn sum_to(x: &[f32], in_shape: &[usize], out_shape: &[usize]) -> Vec<f32> {
    let n_out: usize = out_shape.iter().product();
    let mut out = vec![0f64; n_out];
    let ostr = super::elementwise::broadcast_strides(in_shape, out_shape);
    for (i, &v) in x.iter().enumerate() {
        let (mut rem, mut o) = (i, 0);
        for d in (0..in_shape.len()).rev() {
            let c = rem % in_shape[d];
            rem /= in_shape[d];
            o += c * ostr[d];
        }
        out[o] += v as f64;
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// `scale · Σ x`.
pub fn sum_all(x: &[f32], scale: f64) -> f32 {
    (x.iter().map(|&v| v as f64).sum::<f64>() * scale) as f32
}

/// `x` viewed as `[outer, len, inner]` summed over the middle dimension and multiplied
/// by `scale`: returns `[outer, inner]`.
pub fn sum_dim(x: &[f32], outer: usize, len: usize, inner: usize, scale: f64) -> Vec<f32> {
    let mut out = vec![0f64; outer * inner];
    for o in 0..outer {
        let acc = &mut out[o * inner..(o + 1) * inner];
        for r in 0..len {
            let row = &x[(o * len + r) * inner..(o * len + r + 1) * inner];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
    }
    out.into_iter().map(|v| (v * scale) as f32).collect()
}
