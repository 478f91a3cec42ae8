//! Shape reference ops: strided copies.

use crate::desc::{strides, Slab};

/// `out` with `out.shape[d] = shape[perm[d]]` and `out[.., i_d, ..] = x[.., i_perm⁻¹, ..]`,
/// i.e. output dimension `d` walks input dimension `perm[d]`.
pub fn permute(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let st = strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let src_stride: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let mut out = Vec::with_capacity(x.len());
    for i in 0..x.len() {
        let (mut rem, mut off) = (i, 0);
        for d in (0..out_shape.len()).rev() {
            off += (rem % out_shape[d]) * src_stride[d];
            rem /= out_shape[d];
        }
        out.push(x[off]);
    }
    out
}

/// Copies one [`Slab`] from `src` into `dst`.
pub fn copy_slab(src: &[f32], dst: &mut [f32], s: &Slab) {
    let run = s.len * s.inner;
    for o in 0..s.outer {
        let from = (o * s.src_dim + s.src_off) * s.inner;
        let to = (o * s.dst_dim + s.dst_off) * s.inner;
        dst[to..to + run].copy_from_slice(&src[from..from + run]);
    }
}
