//! Launchers of `kernels/loss.cu`. Losses come out in f32 whatever the input dtype.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::reduce::blocks_per_row;
use super::{grid_1d, grid_rows, kernel_name, CudaBuf, CudaDevice, CudaStorage, Elem, PushBuf};
use crate::{bail, DType, Result, ResultExt};

/// Threads per block of the loss kernels.
const THREADS: u32 = 256;

fn f32_of<'a>(b: &'a CudaBuf, what: &str) -> Result<&'a CudaSlice<f32>> {
    f32::of(b).with_ctx(|| format!("{what} on the GPU"))
}

/// Adds each row of `partials` (`rows × per_row`) into `out[row]`, times `scale`.
fn rows_finish(
    dev: &CudaDevice,
    partials: &CudaSlice<f32>,
    rows: usize,
    per_row: usize,
    scale: f32,
) -> Result<CudaBuf> {
    let mut o = dev.alloc_t::<f32>(rows)?;
    let per_row64 = per_row as i64;
    let f = dev.func("loss", "rows_finish")?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(partials).arg(&mut o).arg(&per_row64).arg(&scale);
    // SAFETY: block r reads partials[r·per_row .. (r+1)·per_row] and writes out[r].
    unsafe { lb.launch(grid_rows(rows, THREADS)) }?;
    Ok(CudaBuf::F32(o))
}

/// Mean of `(p − t)²` over each of `rows` rows of `len` elements: f32 `[rows]`.
pub fn sq_err_rows(p: &CudaStorage, t: &CudaStorage, rows: usize, len: usize) -> Result<CudaBuf> {
    let dev = &p.dev;
    let dtype = p.buf.dtype();
    if rows == 0 {
        return dev.alloc(0, DType::F32);
    }
    let bpr = blocks_per_row(rows, len);
    if rows * bpr > i32::MAX as usize {
        bail!("mse: {rows} rows exceed one launch");
    }
    let mut part = dev.alloc_t::<f32>(rows * bpr)?;
    let (len64, bpr64) = (len as i64, bpr as i64);
    if p.buf.dtype() != t.buf.dtype() {
        bail!("mse: dtype mismatch");
    }
    let f = dev.func("loss", kernel_name("sq_err_partial", dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&p.buf).buf(&t.buf);
    lb.arg(&mut part).arg(&len64).arg(&bpr64);
    // SAFETY: block b reads row b / bpr of p and t (rows·len elements each) and writes
    // partials[b], b < rows·bpr.
    unsafe { lb.launch(grid_rows(rows * bpr, THREADS)) }?;
    rows_finish(dev, &part, rows, bpr, 1.0 / len.max(1) as f32)
}

/// Gradient of [`sq_err_rows`] with respect to `p`: `2·g[row]·(p − t)/len`, in `p`'s
/// dtype; `g` is f32 with one value per row.
pub fn sq_err_backward(p: &CudaStorage, t: &CudaStorage, g: &CudaStorage, len: usize, n: usize) -> Result<CudaBuf> {
    let dev = &p.dev;
    let dtype = p.buf.dtype();
    let g = f32_of(&g.buf, "mse: incoming gradient")?;
    if n > 0 && g.len() * len < n {
        bail!("mse backward: {} gradient rows for {n} elements in rows of {len}", g.len());
    }
    let mut out = dev.alloc(n, dtype)?;
    let (len64, n64) = (len.max(1) as i64, n as i64);
    let coef = 2.0 / len.max(1) as f32;
    if p.buf.dtype() != dtype || t.buf.dtype() != dtype {
        bail!("mse backward: dtype mismatch");
    }
    let f = dev.func("loss", kernel_name("sq_err_bwd", dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&p.buf).buf(&t.buf).arg(g).buf_mut(&mut out);
    lb.arg(&len64).arg(&coef).arg(&n64);
    // SAFETY: n elements of p, t and out; g[i / len] with i < n is below g's length
    // (checked above).
    unsafe { lb.launch(grid_1d(n, THREADS)) }?;
    Ok(out)
}

/// The targets of [`cross_entropy`]: one class per row, uploaded, or the row index itself
/// (CLIP's contrastive targets 0..N, with nothing uploaded).
#[derive(Clone, Copy)]
pub enum Targets<'a> {
    /// `targets[r]` is row r's class.
    Rows(&'a CudaSlice<i64>),
    /// Row r's class is r.
    Diagonal,
}

impl Targets<'_> {
    fn check(&self, rows: usize, classes: usize) -> Result<()> {
        let ok = match self {
            Targets::Rows(t) => t.len() == rows,
            Targets::Diagonal => rows <= classes,
        };
        if rows == 0 || classes == 0 || !ok {
            let given = match self {
                Targets::Rows(t) => format!("{} targets", t.len()),
                Targets::Diagonal => "diagonal targets".to_string(),
            };
            bail!("cross_entropy: {rows} rows of {classes} classes with {given}");
        }
        Ok(())
    }

    /// `rows` or `diagonal`: the kernel for these targets.
    fn pick(&self, rows: &'static str, diagonal: &'static str) -> &'static str {
        match self {
            Targets::Rows(_) => rows,
            Targets::Diagonal => diagonal,
        }
    }
}

/// Mean cross-entropy of `logits` (`[rows, classes]`) against `targets`: the f32 scalar
/// loss and each row's log-sum-exp (f32 `[rows]`, for the backward pass).
pub fn cross_entropy(
    logits: &CudaStorage,
    targets: Targets<'_>,
    rows: usize,
    classes: usize,
) -> Result<(CudaBuf, CudaBuf)> {
    let dev = &logits.dev;
    let dtype = logits.buf.dtype();
    targets.check(rows, classes)?;
    let mut loss_rows = dev.alloc_t::<f32>(rows)?;
    let mut lse = dev.alloc(rows, DType::F32)?;
    let classes64 = classes as i64;
    let f = dev.func("loss", kernel_name(targets.pick("ce_fwd", "ce_fwd_diag"), dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&logits.buf);
    if let Targets::Rows(t) = targets {
        lb.arg(t);
    }
    lb.arg(&mut loss_rows).buf_mut(&mut lse).arg(&classes64);
    // SAFETY: block r reads row r of logits (classes elements) and its target (targets[r]
    // < classes, checked by the op, or r < classes, checked above), and writes
    // loss_rows[r] and lse[r], r < rows.
    unsafe { lb.launch(grid_rows(rows, THREADS)) }?;
    let loss = rows_finish(dev, &loss_rows, 1, rows, 1.0 / rows as f32)?;
    Ok((loss, lse))
}

/// Gradient of [`cross_entropy`] with respect to the logits: `g·(softmax − onehot)/rows`
/// in the logits' dtype; `g` is the f32 scalar incoming gradient.
pub fn cross_entropy_backward(
    logits: &CudaStorage,
    targets: Targets<'_>,
    lse: &CudaStorage,
    g: &CudaStorage,
    rows: usize,
    classes: usize,
) -> Result<CudaBuf> {
    let dev = &logits.dev;
    let dtype = logits.buf.dtype();
    let lse = f32_of(&lse.buf, "cross_entropy: saved log-sum-exp")?;
    let g = f32_of(&g.buf, "cross_entropy: incoming gradient")?;
    targets.check(rows, classes)?;
    if lse.len() < rows {
        bail!("cross_entropy backward: {rows} rows with {} saved rows", lse.len());
    }
    let mut out = dev.alloc(rows * classes, dtype)?;
    let classes64 = classes as i64;
    let inv_rows = 1.0 / rows as f32;
    let f = dev.func("loss", kernel_name(targets.pick("ce_bwd", "ce_bwd_diag"), dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&logits.buf);
    if let Targets::Rows(t) = targets {
        lb.arg(t);
    }
    lb.arg(lse).arg(g).buf_mut(&mut out);
    lb.arg(&classes64).arg(&inv_rows);
    // SAFETY: block r reads and writes row r (classes elements) of logits and out, and
    // reads targets[r], lse[r] and g[0].
    unsafe { lb.launch(grid_rows(rows, THREADS)) }?;
    Ok(out)
}
