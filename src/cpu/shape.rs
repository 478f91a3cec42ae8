//! Shape ops: strided copies.

use std::mem::MaybeUninit;

use crate::desc::{strides, Slab};

/// `out` with `out.shape[d] = shape[perm[d]]` and `out[.., i_d, ..] = x[.., i_perm⁻¹, ..]`,
/// i.e. output dimension `d` walks input dimension `perm[d]`.
pub fn permute(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let st = strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let src_stride: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let rank = shape.len();
    if rank > 0 && perm[rank - 1] == rank - 1 && shape[rank - 1] > 1 {
        // The last dim stays last: copy whole rows of it.
        let run = shape[rank - 1];
        let rows = &out_shape[..rank - 1];
        let rs = &src_stride[..rank - 1];
        // SAFETY: both branches write every element of each chunk.
        return unsafe {
            super::par::fill_new(x.len(), |i0, o| {
                // Chunks are multiples of `run` when run divides the chunk size; handle any
                // offset by walking element-wise otherwise.
                if i0 % run != 0 || o.len() % run != 0 {
                    let mut w = super::par::Walker::new(&out_shape, [&src_stride, &src_stride], i0);
                    for o in o.iter_mut() {
                        *o = MaybeUninit::new(x[w.off[0]]);
                        w.step();
                    }
                    return;
                }
                let mut w = super::par::Walker::new(rows, [rs, rs], i0 / run);
                for o in o.chunks_exact_mut(run) {
                    for (o, &v) in o.iter_mut().zip(&x[w.off[0]..w.off[0] + run]) {
                        *o = MaybeUninit::new(v);
                    }
                    w.step();
                }
            })
        };
    }
    // SAFETY: the loop writes every element of each chunk.
    unsafe {
        super::par::fill_new(x.len(), |i0, o| {
            let mut w = super::par::Walker::new(&out_shape, [&src_stride, &src_stride], i0);
            for o in o.iter_mut() {
                *o = MaybeUninit::new(x[w.off[0]]);
                w.step();
            }
        })
    }
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

/// Rows `ids[i]` of `table` (rows of `d`), as `ids.len()` rows (indices checked by the op).
pub fn gather_rows(table: &[f32], ids: &[usize], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; ids.len() * d];
    for (row, &r) in out.chunks_exact_mut(d.max(1)).zip(ids) {
        row.copy_from_slice(&table[r * d..(r + 1) * d]);
    }
    out
}

/// The gradient of [`gather_rows`]: `rows` rows of `d`, row `r` the sum of the rows `i` of
/// `g` with `ids[i] = r`, added in increasing `i` (as the GPU kernel adds them).
pub fn scatter_rows(g: &[f32], ids: &[usize], rows: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * d];
    for (i, &r) in ids.iter().enumerate() {
        for (o, v) in out[r * d..(r + 1) * d].iter_mut().zip(&g[i * d..(i + 1) * d]) {
            *o += v;
        }
    }
    out
}
