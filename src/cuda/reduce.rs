//! Launchers of `kernels/reduce.cu`.

use cudarc::driver::PushKernelArg;

use cudarc::driver::LaunchConfig;

use super::{grid_1d, grid_rows, kernel_name, CudaBuf, CudaDevice, CudaStorage, PushBuf};
use crate::{bail, DType, Result};

/// Threads per block of the row kernels.
const ROW_THREADS: u32 = 256;
/// Elements a row-partial block should cover at least (8 per thread), so that small rows
/// take one block and the finish pass has little to add.
const MIN_PER_BLOCK: usize = 2048;
/// Upper bound on the partial blocks of one launch: enough to fill any current GPU
/// several times over while the finish pass stays one short block per row.
const MAX_PARTIAL_BLOCKS: usize = 4096;
/// The largest grid.x a launch may use.
const MAX_GRID: usize = i32::MAX as usize;

/// Reduction description passed by value; mirrors `struct ReduceDesc` in `reduce.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReduceDesc {
    rank: i32,
    keep_shape: [i64; 6],
    keep_stride: [i64; 6],
    red_shape: [i64; 6],
    red_stride: [i64; 6],
}

// SAFETY: plain-old-data with the same C layout as the kernel-side struct.
unsafe impl cudarc::driver::DeviceRepr for ReduceDesc {}

/// The runs of `in_shape` once size-1 dimensions are dropped and neighbours that are both
/// reduced (or both kept) are merged: `(reduced, size)` pairs, outermost first.
fn merged_runs(in_shape: &[usize], out_shape: &[usize]) -> Vec<(bool, usize)> {
    let mut runs: Vec<(bool, usize)> = Vec::new();
    for (&n, &m) in in_shape.iter().zip(out_shape) {
        if n == 1 {
            continue;
        }
        let reduced = m == 1;
        match runs.last_mut() {
            Some((r, size)) if *r == reduced => *size *= n,
            _ => runs.push((reduced, n)),
        }
    }
    runs
}

/// Sums `x` (shape `in_shape`) onto `out_shape` (same rank, each dim 1 or equal).
///
/// The shapes gradients produce go to the parallel reductions: a trailing reduced run
/// (`[K, R]`) to the row sums, a reduced run followed by a kept one (`[R, K]`,
/// `[K1, R, K2]`: bias and gate gradients) to the split column sums; anything else to
/// the general kernel.
pub fn sum_to(x: &CudaStorage, in_shape: &[usize], out_shape: &[usize]) -> Result<CudaBuf> {
    if in_shape.len() != out_shape.len() {
        bail!("sum_to: unsupported shapes {in_shape:?} -> {out_shape:?}");
    }
    let runs = merged_runs(in_shape, out_shape);
    if let Some((outer, len, inner)) = column_layout(&runs) {
        return col_sum_split(x, outer, len, inner, 1.0);
    }
    match runs.as_slice() {
        [(true, r)] => return row_sum(x, 1, *r, 1.0),
        [(false, k), (true, r)] => return row_sum(x, *k, *r, 1.0),
        _ => {}
    }
    if in_shape.len() > 6 {
        bail!("sum_to: unsupported shapes {in_shape:?} -> {out_shape:?}");
    }
    let mut d = ReduceDesc { rank: in_shape.len() as i32, ..Default::default() };
    let mut stride = 1i64;
    for k in (0..in_shape.len()).rev() {
        let reduced = out_shape[k] == 1 && in_shape[k] != 1;
        d.keep_shape[k] = if reduced { 1 } else { in_shape[k] as i64 };
        d.keep_stride[k] = if reduced { 0 } else { stride };
        d.red_shape[k] = if reduced { in_shape[k] as i64 } else { 1 };
        d.red_stride[k] = if reduced { stride } else { 0 };
        stride *= in_shape[k] as i64;
    }
    let n_out: usize = out_shape.iter().product();
    let n_red = (in_shape.iter().product::<usize>() / n_out.max(1)) as i64;
    let dev = &x.dev;
    let dtype = x.buf.dtype();
    let f = dev.func("reduce", kernel_name("sum_to", dtype))?;
    let mut out = dev.alloc(n_out, dtype)?;
    let n_out64 = n_out as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf).buf_mut(&mut out);
    lb.arg(&d).arg(&n_out64).arg(&n_red);
    // SAFETY: offsets stay inside `x` (strides from its contiguous shape); n_out writes.
    unsafe { lb.launch(grid_1d(n_out, 256)) }?;
    Ok(out)
}

/// The `[outer, len, inner]` view of a sum whose merged runs are a reduced run followed by
/// a kept one (bias and gate gradients): the split column sums' layout.
fn column_layout(runs: &[(bool, usize)]) -> Option<(usize, usize, usize)> {
    match runs {
        [(true, r), (false, k)] => Some((1, *r, *k)),
        [(false, k1), (true, r), (false, k2)] => Some((*k1, *r, *k2)),
        _ => None,
    }
}

/// Blocks per row of the two-pass row sums (depends only on the sizes, so results are
/// reproducible run to run). Shared with the loss kernels, which use the same split.
pub fn blocks_per_row(rows: usize, len: usize) -> usize {
    len.div_ceil(MIN_PER_BLOCK).clamp(1, (MAX_PARTIAL_BLOCKS / rows.max(1)).max(1))
}

/// [`blocks_per_row`] of the 16-byte row kernel: four times the elements per block, so
/// that each thread has several words in flight.
pub fn blocks_per_row_vec(rows: usize, len: usize) -> usize {
    len.div_ceil(4 * MIN_PER_BLOCK).clamp(1, (MAX_PARTIAL_BLOCKS / rows.max(1)).max(1))
}

/// `x` viewed as `[rows, len]`: `out[r] = scale · Σ x[r, :]`, in `x`'s dtype (with
/// `SYNTHOS_CUDA_COLSUM=vec`, through 16-byte reads where the rows allow).
pub fn row_sum(x: &CudaStorage, rows: usize, len: usize, scale: f32) -> Result<CudaBuf> {
    let dev = &x.dev;
    let dtype = x.buf.dtype();
    if rows == 0 {
        return dev.alloc(0, dtype);
    }
    // 16-byte reads need every row to start on a 16-byte boundary: one row (the buffer
    // is aligned), or rows of whole words.
    let vector = vector_columns()?
        && (rows == 1 || len.is_multiple_of(16 / dtype.size()))
        && x.buf.device_addr(&dev.stream).is_multiple_of(16);
    let bpr = if vector { blocks_per_row_vec(rows, len) } else { blocks_per_row(rows, len) };
    if rows * bpr > MAX_GRID {
        bail!("sum: {rows} rows exceed one launch");
    }
    let mut part = dev.alloc_t::<f32>(rows * bpr)?;
    let (len64, bpr64) = (len as i64, bpr as i64);
    let f = dev.func("reduce", kernel_name(if vector { "row_partial_vec" } else { "row_partial" }, dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf);
    lb.arg(&mut part).arg(&len64).arg(&bpr64);
    // SAFETY: block b reads row b / bpr (len elements, inside x's rows·len; the vector
    // kernel's words lie inside the row and are aligned, as checked above) and writes
    // partials[b], b < rows·bpr.
    unsafe { lb.launch(grid_rows(rows * bpr, ROW_THREADS)) }?;

    let mut out = dev.alloc(rows, dtype)?;
    let f = dev.func("reduce", kernel_name("row_finish", dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(&part);
    lb.buf_mut(&mut out);
    lb.arg(&bpr64).arg(&scale);
    // SAFETY: block r reads partials[r·bpr .. (r+1)·bpr] and writes out[r], r < rows.
    unsafe { lb.launch(grid_rows(rows, ROW_THREADS)) }?;
    Ok(out)
}

/// `x` viewed as `[outer, len, inner]` (inner > 1): `out[o, i] = scale · Σ_r x[o, r, i]`,
/// in `x`'s dtype.
pub fn col_sum(x: &CudaStorage, outer: usize, len: usize, inner: usize, scale: f32) -> Result<CudaBuf> {
    let dev = &x.dev;
    let dtype = x.buf.dtype();
    if outer * inner == 0 {
        return dev.alloc(0, dtype);
    }
    let blocks = outer * inner.div_ceil(32);
    if blocks > MAX_GRID {
        bail!("sum_dim: {outer}x{inner} outputs exceed one launch");
    }
    let mut out = dev.alloc(outer * inner, dtype)?;
    let (len64, inner64) = (len as i64, inner as i64);
    let f = dev.func("reduce", kernel_name("col_sum", dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf).buf_mut(&mut out);
    lb.arg(&len64).arg(&inner64).arg(&scale);
    // The kernel's shared tile is sized for exactly 32×8 threads.
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    // SAFETY: block b covers o = b / tiles and 32 columns of tile b % tiles; reads stay
    // in row o (len·inner elements), writes go to out[o·inner + i] with i < inner.
    unsafe { lb.launch(cfg) }?;
    Ok(out)
}

const COLSUM_VAR: &str = "SYNTHOS_CUDA_COLSUM";

/// Whether the split column sums (bias and gate gradients) read 16-byte vectors
/// (`col_partial_vec_*`, 32 × 8 bf16 columns per block), and the row sums too
/// (`row_partial_vec_*`: `sum_all`, `mean_all`, sums over the last dimension), on this
/// thread: a [`with_vector_columns`] override, else `SYNTHOS_CUDA_COLSUM=vec` (`scalar`,
/// the default, until a GPU run has shown it faster). Shapes whose rows do not start on
/// 16-byte boundaries keep the scalar kernels.
pub fn vector_columns() -> Result<bool> {
    Ok(super::choice::get(COLSUM_VAR, &["scalar", "vec"])? == 1)
}

/// Runs `f` with the vector column sums on or off on this thread (tests, bench).
pub fn with_vector_columns<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::choice::with(COLSUM_VAR, on as usize, f)
}

/// Blocks the split column sums aim for (several per SM on current GPUs).
const COL_TARGET_BLOCKS: usize = 1024;
/// Fewest rows one split covers, so that the finish pass stays small.
const COL_MIN_ROWS: usize = 64;

/// The split of [`col_sum_split`] with the scalar kernel: `(splits, chunk)` rows per
/// split. Depends only on the sizes, so results are reproducible run to run.
pub fn col_splits(outer: usize, len: usize, inner: usize) -> (usize, usize) {
    col_splits_for(outer, len, inner, 32)
}

/// [`col_splits`] for blocks that cover `cols` columns each (32 for `col_partial`,
/// 32 × the vector width for `col_partial_vec`).
pub fn col_splits_for(outer: usize, len: usize, inner: usize, cols: usize) -> (usize, usize) {
    let base = (outer * inner.div_ceil(cols)).max(1);
    let splits = COL_TARGET_BLOCKS.div_ceil(base).clamp(1, len.div_ceil(COL_MIN_ROWS).max(1));
    let chunk = len.div_ceil(splits).max(1);
    (len.div_ceil(chunk).max(1), chunk)
}

/// `x` viewed as `[outer, len, inner]`: `out[o, i] = scale · Σ_r x[o, r, i]`, in `x`'s
/// dtype, with the rows split across blocks (fp32 partials, then a finish pass).
pub fn col_sum_split(x: &CudaStorage, outer: usize, len: usize, inner: usize, scale: f32) -> Result<CudaBuf> {
    col_split(x, None, outer, len, inner, scale)
}

/// [`col_sum_split`] of the element-wise product `x·y` (same shape and dtype) without
/// writing it: `out[o, i] = scale · Σ_r x[o, r, i]·y[o, r, i]`, each product in fp32 (not
/// rounded to the dtype), in one pass over x and y (`col_partial_mul`, or
/// `col_partial_vec_mul` under the same conditions as the vector column sums). A gate's
/// gradient, `Σ g·y` over the tokens.
pub fn col_sum_split_product(
    x: &CudaStorage,
    y: &CudaStorage,
    outer: usize,
    len: usize,
    inner: usize,
    scale: f32,
) -> Result<CudaBuf> {
    let n = outer * len * inner;
    if y.buf.dtype() != x.buf.dtype() || x.buf.len() < n || y.buf.len() < n {
        bail!(
            "sum of a product: x ({} of {}) and y ({} of {}) must be two {outer}x{len}x{inner} tensors of one dtype",
            x.buf.dtype(),
            x.buf.len(),
            y.buf.dtype(),
            y.buf.len()
        );
    }
    col_split(x, Some(y), outer, len, inner, scale)
}

/// The split column sums of `x`, or of `x·y` when `y` is given.
fn col_split(
    x: &CudaStorage,
    y: Option<&CudaStorage>,
    outer: usize,
    len: usize,
    inner: usize,
    scale: f32,
) -> Result<CudaBuf> {
    let dev = &x.dev;
    let dtype = x.buf.dtype();
    if outer * inner == 0 {
        return dev.alloc(0, dtype);
    }
    // The vector kernel reads whole 16-byte words of each row.
    let width = 16 / dtype.size();
    let aligned = |s: &CudaStorage| s.buf.device_addr(&dev.stream).is_multiple_of(16);
    let vector = vector_columns()? && inner.is_multiple_of(width) && aligned(x) && y.is_none_or(aligned);
    let cols = if vector { 32 * width } else { 32 };
    let (splits, chunk) = col_splits_for(outer, len, inner, cols);
    if splits == 1 && y.is_none() {
        return col_sum(x, outer, len, inner, scale);
    }
    let blocks = outer * splits * inner.div_ceil(cols);
    if blocks > MAX_GRID {
        bail!("sum_to: {outer}x{inner} outputs exceed one launch");
    }
    let mut part = dev.alloc(outer * splits * inner, DType::F32)?;
    let (len64, inner64, splits64, chunk64) = (len as i64, inner as i64, splits as i64, chunk as i64);
    let name = match (vector, y.is_some()) {
        (false, false) => "col_partial",
        (true, false) => "col_partial_vec",
        (false, true) => "col_partial_mul",
        (true, true) => "col_partial_vec_mul",
    };
    let f = dev.func("reduce", kernel_name(name, dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf);
    if let Some(y) = y {
        lb.buf(&y.buf);
    }
    lb.buf_mut(&mut part);
    lb.arg(&len64).arg(&inner64).arg(&splits64).arg(&chunk64);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    // SAFETY: block (o, s, tile) reads rows [s·chunk, min((s+1)·chunk, len)) of slab o
    // (inside x's, and y's, outer·len·inner elements; the vector kernel's 16-byte words
    // lie inside a row since inner is a multiple of the width, and are aligned since the
    // buffers and every row start are) and writes partials[(o·splits + s)·inner + i] for
    // i < inner.
    unsafe { lb.launch(cfg) }?;

    col_finish(dev, &part, outer, splits, inner, scale, dtype)
}

/// [`sum_to`] of the product `x·y` (same shape and dtype) in one pass, where the sum is
/// a split column sum (a reduced run of dimensions followed by a kept one: bias and gate
/// gradient layouts); `None` for other layouts.
pub fn sum_to_product(
    x: &CudaStorage,
    y: &CudaStorage,
    in_shape: &[usize],
    out_shape: &[usize],
) -> Result<Option<CudaBuf>> {
    if in_shape.len() != out_shape.len() {
        return Ok(None);
    }
    column_layout(&merged_runs(in_shape, out_shape))
        .map(|(outer, len, inner)| col_sum_split_product(x, y, outer, len, inner, 1.0))
        .transpose()
}

/// `part` (fp32) viewed as `[outer, splits, inner]`: `out[o, i] = scale · Σ_s part[o, s, i]`
/// in `dtype`. The second pass of [`col_sum_split`], and of the norms' parameter
/// gradients (one partial row per block).
pub(crate) fn col_finish(
    dev: &CudaDevice,
    part: &CudaBuf,
    outer: usize,
    splits: usize,
    inner: usize,
    scale: f32,
    dtype: DType,
) -> Result<CudaBuf> {
    if part.dtype() != DType::F32 || part.len() < outer * splits * inner {
        bail!("col_finish: the partials must be {outer}x{splits}x{inner} fp32 values");
    }
    let blocks = outer * inner.div_ceil(32);
    if blocks > MAX_GRID {
        bail!("col_finish: {outer}x{inner} outputs exceed one launch");
    }
    let mut out = dev.alloc(outer * inner, dtype)?;
    let (splits64, inner64) = (splits as i64, inner as i64);
    let f = dev.func("reduce", kernel_name("col_finish", dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(part);
    lb.buf_mut(&mut out);
    lb.arg(&splits64).arg(&inner64).arg(&scale);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    // SAFETY: as `col_sum` over the partials viewed as [outer, splits, inner] (checked
    // above to lie inside `part`); writes outer·inner outputs.
    unsafe { lb.launch(cfg) }?;
    Ok(out)
}
