//! Matrix-product reference: a strided GEMM through the `matrixmultiply` crate, whose
//! sgemm takes arbitrary row and column strides, so transposed operands cost nothing.

use crate::desc::Gemm;

use crate::{bail, Result};

/// `C = op(A)·op(B)` per batch, plus `bias` (length `n`) added to every row of C.
pub fn gemm(a: &[f32], b: &[f32], bias: Option<&[f32]>, g: &Gemm) -> Result<Vec<f32>> {
    let (na, nb, nc) = g.sizes();
    if a.len() != na || b.len() != nb {
        bail!("gemm: {g:?} needs {na} and {nb} elements, got {} and {}", a.len(), b.len());
    }
    let mut c = vec![0f32; nc];
    // The bias is pre-loaded into C and the product accumulated onto it (beta = 1).
    let beta = match bias {
        Some(bias) => {
            if bias.len() != g.n {
                bail!("gemm: bias of {} elements for {} output columns", bias.len(), g.n);
            }
            for row in c.chunks_exact_mut(g.n.max(1)) {
                row.copy_from_slice(bias);
            }
            1.0
        }
        None => 0.0,
    };
    if nc == 0 {
        return Ok(c);
    }
    // Element strides (row, column) of op(A) and op(B) inside their storage.
    let (rsa, csa) = if g.trans_a { (1, g.m) } else { (g.k, 1) };
    let (rsb, csb) = if g.trans_b { (1, g.k) } else { (g.n, 1) };
    for i in 0..g.batch {
        let (oa, ob, oc) = (i * g.stride_a(), i * g.stride_b(), i * g.stride_c());
        // SAFETY: the three regions lie inside `a`, `b` and `c` (their lengths were
        // checked against `g.sizes()` above and offsets are whole batches), the strides
        // describe the stated row-major layouts, and `c` is not aliased by `a` or `b`.
        unsafe {
            matrixmultiply::sgemm(
                g.m,
                g.k,
                g.n,
                1.0,
                a.as_ptr().add(oa),
                rsa as isize,
                csa as isize,
                b.as_ptr().add(ob),
                rsb as isize,
                csb as isize,
                beta,
                c.as_mut_ptr().add(oc),
                g.n as isize,
                1,
            );
        }
    }
    Ok(c)
}
