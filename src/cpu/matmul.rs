//! Matrix-product reference: batched strided GEMM on [`super::sgemm`], whose operands
//! take arbitrary row and column strides, so transposed operands cost nothing.
//! A batch of products that are each too small to split runs one product per task on
//! the rayon pool; otherwise the products run in turn, each spread over the pool.

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::sgemm::{sgemm_uninit, Init, Mat, PARALLEL_MACS};
use crate::desc::Gemm;

use crate::{bail, Result};

/// `C = op(A)·op(B)` per batch, plus `bias` (length `n`) added to every row of C.
pub fn gemm(a: &[f32], b: &[f32], bias: Option<&[f32]>, g: &Gemm) -> Result<Vec<f32>> {
    let (na, nb, nc) = g.sizes();
    if a.len() != na || b.len() != nb {
        bail!("gemm: {g:?} needs {na} and {nb} elements, got {} and {}", a.len(), b.len());
    }
    if let Some(bias) = bias {
        if bias.len() != g.n {
            bail!("gemm: bias of {} elements for {} output columns", bias.len(), g.n);
        }
    }
    // Every output element is written (Zero or Bias), so the buffer starts uninitialised.
    let mut c: Vec<f32> = Vec::with_capacity(nc);
    let out = &mut c.spare_capacity_mut()[..nc];
    if nc > 0 {
        // Element strides (row, column) of op(A) and op(B) inside their storage.
        let (rsa, csa) = if g.trans_a { (1, g.m) } else { (g.k, 1) };
        let (rsb, csb) = if g.trans_b { (1, g.k) } else { (g.n, 1) };
        let init = bias.map_or(Init::Zero, Init::Bias);
        let (sa, sb) = (g.stride_a(), g.stride_b());
        let one = |batch: usize, c: &mut [MaybeUninit<f32>], parallel: bool| {
            let a = Mat { data: &a[batch * sa..][..sa], rs: rsa, cs: csa };
            let b = Mat { data: &b[batch * sb..][..sb], rs: rsb, cs: csb };
            sgemm_uninit(g.m, g.k, g.n, a, b, init, c, g.n, parallel);
        };
        let each = g.m * g.n * g.k;
        let threads = rayon::current_num_threads();
        let by_batch = g.batch > 1
            && threads > 1
            && g.batch * each >= PARALLEL_MACS
            && (each < PARALLEL_MACS || g.batch >= 2 * threads);
        if by_batch {
            out.par_chunks_mut(g.stride_c()).enumerate().for_each(|(i, c)| one(i, c, false));
        } else {
            out.chunks_mut(g.stride_c()).enumerate().for_each(|(i, c)| one(i, c, true));
        }
    }
    // SAFETY: the products above wrote all `nc` elements (`batch` whole `m × n` outputs
    // with ldc = n; `sgemm_uninit` writes every element of its window).
    unsafe { c.set_len(nc) };
    Ok(c)
}
