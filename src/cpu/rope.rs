//! Rotary position embedding: the 3D angle table of Wan2.1 and the pairwise rotation.

use std::mem::MaybeUninit;

use super::par;

/// Number of complex pairs of a head of `head_dim` channels given to the (frame, row,
/// column) axes: Wan2.1 splits the `c = head_dim/2` pairs as `c − 2·(c/3), c/3, c/3`
/// (for `head_dim` = 128: 22, 21, 21 pairs = 44, 42, 42 channels).
pub fn axis_pairs(head_dim: usize) -> [usize; 3] {
    let c = head_dim / 2;
    [c - 2 * (c / 3), c / 3, c / 3]
}

/// cos and sin of the rotation angles, `[frames·height·width, head_dim/2]` each, tokens in
/// (frame, row, column) row-major order. Pair `j` of an axis with `p` pairs at position
/// `pos` turns by `pos·θ^(−2j/(2p))`; angles and their cos/sin are computed in f64 and
/// rounded once.
pub fn table_3d(frames: usize, height: usize, width: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let pairs = axis_pairs(head_dim);
    // Per axis, the inverse frequencies of its pairs.
    let inv_freq: Vec<Vec<f64>> =
        pairs.iter().map(|&p| (0..p).map(|j| 1.0 / theta.powf((2 * j) as f64 / (2 * p) as f64)).collect()).collect();
    let n = frames * height * width;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for f in 0..frames {
        for h in 0..height {
            for w in 0..width {
                for (pos, freqs) in [f, h, w].into_iter().zip(&inv_freq) {
                    for &fr in freqs {
                        let angle = pos as f64 * fr;
                        cos.push(angle.cos() as f32);
                        sin.push(angle.sin() as f32);
                    }
                }
            }
        }
    }
    (cos, sin)
}

/// Rotates each pair `(x[2j], x[2j+1])` of every head of `x` (`[B, tokens, heads,
/// head_dim]`) by `sign`·angle of its token and pair: `sign` = 1 applies the embedding,
/// −1 undoes it (and is its backward).
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], tokens: usize, heads: usize, head_dim: usize, sign: f32) -> Vec<f32> {
    let half = head_dim / 2;
    // Element e is channel e % head_dim of head vector e / head_dim; pairs never straddle
    // a chunk (chunks and head_dim are even), so chunks on the pool give the same bits.
    // SAFETY: every pair of each chunk is written (the chunk length is even).
    unsafe {
        par::fill_new(x.len(), |i0, o| {
            if i0 % head_dim == 0 && o.len() % head_dim == 0 {
                // Whole head vectors: the token's angles once per vector.
                for (k, oh) in o.chunks_exact_mut(head_dim).enumerate() {
                    let t = i0 / head_dim + k;
                    let n = (t / heads) % tokens;
                    let (cr, sr) = (&cos[n * half..(n + 1) * half], &sin[n * half..(n + 1) * half]);
                    let xh = &x[t * head_dim..(t + 1) * head_dim];
                    for ((o, xp), (&c, &s)) in oh.chunks_exact_mut(2).zip(xh.chunks_exact(2)).zip(cr.iter().zip(sr)) {
                        let (a, b, s) = (xp[0], xp[1], sign * s);
                        o[0] = MaybeUninit::new(a * c - b * s);
                        o[1] = MaybeUninit::new(a * s + b * c);
                    }
                }
                return;
            }
            for (k, o) in o.chunks_exact_mut(2).enumerate() {
                let e = i0 + 2 * k;
                let (t, j) = (e / head_dim, (e % head_dim) / 2);
                let n = (t / heads) % tokens;
                let (a, b) = (x[e], x[e + 1]);
                let (c, s) = (cos[n * half + j], sign * sin[n * half + j]);
                o[0] = MaybeUninit::new(a * c - b * s);
                o[1] = MaybeUninit::new(a * s + b * c);
            }
        })
    }
}
