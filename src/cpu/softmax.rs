//! The row softmax reference (sums in f64).

/// Softmax of each row of `n` elements (max-subtracted, sums in f64).
pub fn softmax_rows(x: &[f32], n: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let sum: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
        y.extend(row.iter().map(|&v| (((v - m) as f64).exp() / sum) as f32));
    }
    y
}

/// Backward of the row softmax from its output `y`: `dx = y·(g − Σ g·y)`.
pub fn softmax_rows_backward(y: &[f32], g: &[f32], n: usize) -> Vec<f32> {
    let mut dx = Vec::with_capacity(y.len());
    for (yr, gr) in y.chunks_exact(n).zip(g.chunks_exact(n)) {
        let dot: f64 = yr.iter().zip(gr).map(|(&a, &b)| a as f64 * b as f64).sum();
        dx.extend(yr.iter().zip(gr).map(|(&a, &b)| (a as f64 * (b as f64 - dot)) as f32));
    }
    dx
}
