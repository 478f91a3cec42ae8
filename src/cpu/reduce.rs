//! Reduction reference ops.

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
