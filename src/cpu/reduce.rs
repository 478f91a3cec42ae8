//! Reductions (f64 accumulation, so the CPU result is more exact than any kernel it
//! checks).

/// Sums `x` (shape `in_shape`) onto `out_shape` (same rank; each dim 1 or equal).
///
/// Adjacent dims that are both kept or both summed merge; when one run of summed dims
/// remains (a bias or gate gradient: `[B, N, D] → [1, 1, D]` or `[B, 1, D]`), this is
/// [`sum_dim`] over `[outer, len, inner]`. Either way each output is accumulated in f64 in
/// increasing input order.
pub fn sum_to(x: &[f32], in_shape: &[usize], out_shape: &[usize]) -> Vec<f32> {
    // Runs of (summed?, size), dims of size 1 dropped.
    let mut runs: Vec<(bool, usize)> = Vec::new();
    for (&n, &o) in in_shape.iter().zip(out_shape) {
        if n == 1 {
            continue;
        }
        let summed = o == 1;
        match runs.last_mut() {
            Some(last) if last.0 == summed => last.1 *= n,
            _ => runs.push((summed, n)),
        }
    }
    let kept = |r: &[(bool, usize)]| r.iter().all(|(s, _)| !s);
    let size = |r: &[(bool, usize)]| r.iter().map(|(_, n)| n).product::<usize>();
    if let Some(at) = runs.iter().position(|(s, _)| *s) {
        if kept(&runs[..at]) && kept(&runs[at + 1..]) {
            return sum_dim(x, size(&runs[..at]), runs[at].1, size(&runs[at + 1..]), 1.0);
        }
    } else {
        return x.to_vec();
    }
    let n_out: usize = out_shape.iter().product();
    let mut out = vec![0f64; n_out];
    let ostr = super::elementwise::broadcast_strides(in_shape, out_shape);
    let mut w = super::par::Walker::new(in_shape, [&ostr, &ostr], 0);
    for &v in x {
        out[w.off[0]] += v as f64;
        w.step();
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// `scale · Σ x`.
pub fn sum_all(x: &[f32], scale: f64) -> f32 {
    (x.iter().map(|&v| v as f64).sum::<f64>() * scale) as f32
}

/// `x` viewed as `[outer, len, inner]` summed over the middle dimension and multiplied
/// by `scale`: returns `[outer, inner]`. Rows of the output and blocks of its columns
/// are spread over the rayon pool; each output sums its `len` inputs in order, in f64.
pub fn sum_dim(x: &[f32], outer: usize, len: usize, inner: usize, scale: f64) -> Vec<f32> {
    use rayon::prelude::*;
    /// Output columns per task.
    const COLS: usize = 512;
    let mut out = vec![0f32; outer * inner];
    if inner == 0 {
        return out;
    }
    out.par_chunks_mut(inner).enumerate().for_each(|(o, row)| {
        row.par_chunks_mut(COLS).enumerate().for_each(|(c, cols)| {
            let c0 = c * COLS;
            let mut acc = vec![0f64; cols.len()];
            for r in 0..len {
                let src = &x[(o * len + r) * inner + c0..][..cols.len()];
                acc.iter_mut().zip(src).for_each(|(a, &v)| *a += v as f64);
            }
            cols.iter_mut().zip(&acc).for_each(|(o, a)| *o = (a * scale) as f32);
        });
    });
    out
}
