//! Loss reference ops (f64 accumulation).

/// Mean squared error of each of `rows` equal rows of `pred` against `target`.
pub fn sq_err_rows(pred: &[f32], target: &[f32], rows: usize) -> Vec<f32> {
    let len = pred.len() / rows.max(1);
    (0..rows)
        .map(|r| {
            let s: f64 = pred[r * len..(r + 1) * len]
                .iter()
                .zip(&target[r * len..(r + 1) * len])
                .map(|(&p, &t)| (p as f64 - t as f64).powi(2))
                .sum();
            (s / len as f64) as f32
        })
        .collect()
}

/// Gradient of [`sq_err_rows`] with respect to `pred`, given the gradient `g` of each
/// row's mean: `2·g[row]·(pred − target)/len`.
pub fn sq_err_rows_grad(pred: &[f32], target: &[f32], g: &[f32]) -> Vec<f32> {
    let len = pred.len() / g.len().max(1);
    pred.iter().zip(target).enumerate().map(|(i, (&p, &t))| 2.0 * g[i / len] * (p - t) / len as f32).collect()
}

/// Per-row cross-entropy of `logits` (`[rows, classes]`) against class indices, with
/// each row's log-sum-exp (kept for the backward pass): `(loss, lse)`.
pub fn cross_entropy_rows(logits: &[f32], classes: usize, targets: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let mut loss = Vec::with_capacity(targets.len());
    let mut lse = Vec::with_capacity(targets.len());
    for (row, &t) in logits.chunks(classes).zip(targets) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
        let l = m + s.ln();
        lse.push(l as f32);
        loss.push((l - row[t] as f64) as f32);
    }
    (loss, lse)
}

/// Gradient of the mean cross-entropy with respect to the logits, scaled by `g`:
/// `g·(softmax − onehot)/rows`.
pub fn cross_entropy_grad(logits: &[f32], classes: usize, targets: &[usize], lse: &[f32], g: f32) -> Vec<f32> {
    let k = g as f64 / targets.len() as f64;
    let mut out = Vec::with_capacity(logits.len());
    for ((row, &t), &l) in logits.chunks(classes).zip(targets).zip(lse) {
        for (c, &v) in row.iter().enumerate() {
            let p = (v as f64 - l as f64).exp();
            let onehot = if c == t { 1.0 } else { 0.0 };
            out.push((k * (p - onehot)) as f32);
        }
    }
    out
}
