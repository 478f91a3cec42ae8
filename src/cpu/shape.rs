//! Shape reference ops: strided copies.

/// Row-major element strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * shape[d + 1];
    }
    st
}

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

/// One slab of a copy between tensors viewed as `[outer, channels, inner]`:
/// `dst[o, dst_off + c, i] = src[o, src_off + c, i]` for `c < len`.
#[derive(Clone, Copy, Debug)]
pub struct Slab {
    /// Product of the dimensions before the sliced one.
    pub outer: usize,
    /// Product of the dimensions after the sliced one.
    pub inner: usize,
    /// Size of the sliced dimension in the source.
    pub src_dim: usize,
    /// First source index along it.
    pub src_off: usize,
    /// Size of the sliced dimension in the destination.
    pub dst_dim: usize,
    /// First destination index along it.
    pub dst_off: usize,
    /// Number of indices copied.
    pub len: usize,
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
