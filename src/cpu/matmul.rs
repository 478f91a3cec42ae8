//! Matrix-product reference: a strided GEMM through the `matrixmultiply` crate, whose
//! sgemm takes arbitrary row and column strides, so transposed operands cost nothing.
//! Large products are cut into tiles run on the rayon pool (the crate's own threading
//! is off: a second pool beside rayon's made the two wake and wait on each other).

use rayon::prelude::*;

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
    let tiles = tiles(g);
    let out = SendPtr(c.as_mut_ptr());
    let run = |t: &Tile| {
        let (oa, ob, oc) = (t.batch * g.stride_a(), t.batch * g.stride_b(), t.batch * g.stride_c());
        // SAFETY: the three regions lie inside `a`, `b` and `c` (their lengths were
        // checked against `g.sizes()` above and offsets are whole batches plus a tile's
        // first row and column), the strides describe the stated row-major layouts, `c`
        // is not aliased by `a` or `b`, and tiles cover disjoint parts of `c`.
        unsafe {
            matrixmultiply::sgemm(
                t.rows.1 - t.rows.0,
                g.k,
                t.cols.1 - t.cols.0,
                1.0,
                a.as_ptr().add(oa + t.rows.0 * rsa),
                rsa as isize,
                csa as isize,
                b.as_ptr().add(ob + t.cols.0 * csb),
                rsb as isize,
                csb as isize,
                beta,
                out.get().add(oc + t.rows.0 * g.n + t.cols.0),
                g.n as isize,
                1,
            );
        }
    };
    if tiles.len() == 1 {
        run(&tiles[0]);
    } else {
        tiles.par_iter().for_each(run);
    }
    Ok(c)
}

/// The output pointer of [`gemm`], shared by the tasks that write its disjoint tiles.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tiles a pointer is shared between write disjoint elements.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One piece of a batched product: output rows `rows.0..rows.1` and columns
/// `cols.0..cols.1` of batch `batch`.
struct Tile {
    batch: usize,
    rows: (usize, usize),
    cols: (usize, usize),
}

/// Multiply-adds below which a product runs as one piece on the calling thread.
const PARALLEL_MACS: usize = 1 << 18;

/// Cuts the product into tiles for the rayon pool: whole batches when there are enough
/// of them, else bands of rows (or of columns, for short wide outputs) of at least 64,
/// about four per thread. Each output element is computed by one sgemm call whose K
/// loop does not depend on the cut, so the result is the same for any number of threads
/// (tests/cpu_threads.rs).
fn tiles(g: &Gemm) -> Vec<Tile> {
    let whole = |batch| Tile { batch, rows: (0, g.m), cols: (0, g.n) };
    let threads = rayon::current_num_threads();
    if threads <= 1 || g.batch * g.m * g.n * g.k < PARALLEL_MACS {
        return (0..g.batch).map(whole).collect();
    }
    let want = 4 * threads;
    if g.batch >= want {
        return (0..g.batch).map(whole).collect();
    }
    let per_batch = want.div_ceil(g.batch);
    let bands = |len: usize| -> Vec<(usize, usize)> {
        let n = per_batch.min(len / 64).max(1);
        let step = len.div_ceil(n);
        (0..len).step_by(step.max(1)).map(|s| (s, (s + step).min(len))).collect()
    };
    let mut out = Vec::new();
    for batch in 0..g.batch {
        if g.m >= g.n || g.m >= 64 * per_batch {
            out.extend(bands(g.m).into_iter().map(|rows| Tile { batch, rows, cols: (0, g.n) }));
        } else {
            out.extend(bands(g.n).into_iter().map(|cols| Tile { batch, rows: (0, g.m), cols }));
        }
    }
    out
}
