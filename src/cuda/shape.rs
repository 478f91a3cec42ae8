//! Launchers of `kernels/shape.cu`.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{grid_1d, kernel_name, CudaBuf, CudaStorage, PushBuf};
use crate::desc::Slab;
use crate::{bail, Result};

/// Permutation description passed by value; mirrors `struct PermuteDesc` in `shape.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PermuteDesc {
    rank: i32,
    out_shape: [i64; 6],
    src_stride: [i64; 6],
}

// SAFETY: plain-old-data with the same C layout as the kernel-side struct.
unsafe impl cudarc::driver::DeviceRepr for PermuteDesc {}

/// Output dimension `d` walks input dimension `perm[d]` (rank ≤ 6).
pub fn permute(x: &CudaStorage, shape: &[usize], perm: &[usize]) -> Result<CudaBuf> {
    if shape.len() > 6 || perm.len() != shape.len() {
        bail!("permute: unsupported shape {shape:?} / permutation {perm:?} (rank at most 6)");
    }
    let st = crate::desc::strides(shape);
    let mut d = PermuteDesc { rank: shape.len() as i32, ..Default::default() };
    for (k, &p) in perm.iter().enumerate() {
        d.out_shape[k] = shape[p] as i64;
        d.src_stride[k] = st[p] as i64;
    }
    let n: usize = shape.iter().product();
    let dev = &x.dev;
    let dtype = x.buf.dtype();
    let mut out = dev.alloc(n, dtype)?;
    let n64 = n as i64;
    let f = dev.func("shape", kernel_name("permute", dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf).buf_mut(&mut out);
    lb.arg(&d).arg(&n64);
    // SAFETY: each of the n output elements reads one input offset Σ c_k·stride[perm[k]]
    // with c_k < shape[perm[k]], which is below the input's n elements.
    unsafe { lb.launch(grid_1d(n, 256)) }?;
    Ok(out)
}

/// Copies one slab of `src` into `dst` (same dtype), both viewed as
/// `[outer, channels, inner]` (see [`Slab`]).
pub fn copy_slab(src: &CudaStorage, dst: &mut CudaBuf, s: &Slab) -> Result<()> {
    if s.src_off + s.len > s.src_dim || s.dst_off + s.len > s.dst_dim {
        bail!("slab copy out of range: {s:?}");
    }
    if src.buf.len() < s.outer * s.src_dim * s.inner || dst.len() < s.outer * s.dst_dim * s.inner {
        bail!("slab copy: buffers of {} and {} elements are too small for {s:?}", src.buf.len(), dst.len());
    }
    let n = s.outer * s.len * s.inner;
    if n == 0 {
        return Ok(());
    }
    let dev = &src.dev;
    let dtype = src.buf.dtype();
    let args = [s.inner, s.src_dim, s.src_off, s.dst_dim, s.dst_off, s.len, n].map(|v| v as i64);
    if src.buf.dtype() != dst.dtype() {
        bail!("slab copy: dtype mismatch");
    }
    let f = dev.func("shape", kernel_name("slab_copy", dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&src.buf).buf_mut(dst);
    for a in &args {
        lb.arg(a);
    }
    // SAFETY: the ranges were checked above: every read index is below
    // outer·src_dim·inner and every write index below outer·dst_dim·inner.
    unsafe { lb.launch(grid_1d(n, 256)) }?;
    Ok(())
}

/// Rows `idx[i]` of `table` (`[_, d]`), as `[idx.len(), d]`; the op has checked every
/// index against the table's row count.
pub fn gather_rows(table: &CudaStorage, idx: &CudaSlice<i64>, d: usize) -> Result<CudaBuf> {
    let n = idx.len() * d;
    let dev = &table.dev;
    let dtype = table.buf.dtype();
    let mut out = dev.alloc(n, dtype)?;
    if n == 0 {
        return Ok(out);
    }
    let (d64, n64) = (d as i64, n as i64);
    let f = dev.func("shape", kernel_name("gather_rows", dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&table.buf).arg(idx).buf_mut(&mut out).arg(&d64).arg(&n64);
    // SAFETY: output element i reads table[idx[i / d]·d + i % d], in range because every
    // index is below the table's row count (checked by the op).
    unsafe { lb.launch(grid_1d(n, 256)) }?;
    Ok(out)
}

/// The gradient of [`gather_rows`]: `dtable[r] = Σ_{i: ids[i] = r} g[i]` for a table of
/// `rows` rows of `d` (zeros where no index points), summed in fp32 in increasing `i`,
/// without atomics: bit-identical from run to run.
pub fn scatter_rows(g: &CudaStorage, ids: &[usize], rows: usize, d: usize) -> Result<CudaBuf> {
    let dev = &g.dev;
    let dtype = g.buf.dtype();
    if g.buf.len() < ids.len() * d || ids.iter().any(|&r| r >= rows) {
        bail!(
            "scatter_rows: {} indices of rows of {d} do not fit a gradient of {} elements and {rows} rows",
            ids.len(),
            g.buf.len()
        );
    }
    let mut out = dev.zeros(rows * d, dtype)?;
    // CSR of the output rows by table row: a stable sort keeps each group in increasing order.
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i]);
    let (mut uniq, mut start) = (Vec::new(), Vec::new());
    for (k, &i) in order.iter().enumerate() {
        if uniq.last() != Some(&ids[i]) {
            uniq.push(ids[i]);
            start.push(k);
        }
    }
    start.push(order.len());
    let n = uniq.len() * d;
    if n == 0 {
        return Ok(out);
    }
    let (uniq, start, pos) = (dev.upload_indices(&uniq)?, dev.upload_indices(&start)?, dev.upload_indices(&order)?);
    let (d64, n64) = (d as i64, n as i64);
    let f = dev.func("shape", kernel_name("scatter_rows", dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&g.buf).arg(&uniq).arg(&start).arg(&pos).buf_mut(&mut out).arg(&d64).arg(&n64);
    // SAFETY: thread (u, c) reads g rows pos[start[u]..start[u+1]] (each < ids.len(), whose
    // rows g holds, checked above) and writes row uniq[u] < rows of the zeroed output.
    unsafe { lb.launch(grid_1d(n, 256)) }?;
    Ok(out)
}
