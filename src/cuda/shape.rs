//! Launchers of `kernels/shape.cu`.

use cudarc::driver::PushKernelArg;

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
