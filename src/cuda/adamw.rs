//! Launchers of `kernels/adamw.cu`: the fused AdamW update and the deterministic sum of
//! squares behind the global gradient norm.

use std::sync::Arc;

use cudarc::driver::PushKernelArg;

use half::bf16;

use super::{grid_1d, kernel_name, CudaStorage, Elem, PushBuf};
use crate::desc::AdamWStep;
use crate::{bail, Result, ResultExt};

// SAFETY: eight f32 fields with `#[repr(C)]`, the layout of `struct AdamWStep` in
// kernels/adamw.cu.
unsafe impl cudarc::driver::DeviceRepr for AdamWStep {}

/// Elements each thread updates per iteration (`VEC` in the kernel).
const VEC: usize = 8;
/// Threads per block of every kernel in the module.
const BLOCK: u32 = 256;
/// Most blocks one tensor's sum of squares uses (beyond this, threads loop).
const MAX_SUMSQ_BLOCKS: usize = 1024;

/// One AdamW update of `n` elements: fp32 weights `w` (a master copy or an f32 parameter
/// itself) and moments `m`, `v` updated in place from `grad` (f32 or bf16); when `copy`
/// is given (the bf16 parameter of the master `w`) it receives the rounded new weights.
pub fn step(
    grad: &CudaStorage,
    w: &mut CudaStorage,
    m: &mut CudaStorage,
    v: &mut CudaStorage,
    copy: Option<&mut CudaStorage>,
    s: &AdamWStep,
    n: usize,
) -> Result<()> {
    let dev = w.dev.clone();
    let short = |c: &CudaStorage| c.buf.len() < n;
    if short(grad) || short(w) || short(m) || short(v) || copy.as_ref().is_some_and(|c| short(c)) {
        bail!("adamw: buffers shorter than the {n} elements to update");
    }
    let name = kernel_name(if copy.is_some() { "adamw_master" } else { "adamw" }, grad.buf.dtype());
    let f = dev.func("adamw", name)?;
    let n64 = n as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&grad.buf);
    for state in [&mut w.buf, &mut m.buf, &mut v.buf] {
        lb.arg(f32::of_mut(state).ctx("adamw: weights and moments")?);
    }
    if let Some(c) = copy {
        lb.arg(bf16::of_mut(&mut c.buf).ctx("adamw: the compute copy of a master")?);
    }
    lb.arg(s).arg(&n64);
    // SAFETY: every buffer holds at least n elements (checked above) of the dtype the
    // entry point expects; each thread reads and writes only its own elements.
    unsafe { lb.launch(grid_1d(n.div_ceil(VEC), BLOCK)) }?;
    Ok(())
}

/// `Σ x²` over every element of every tensor (each given with its element count), in
/// fp32 with a fixed reduction order. All tensors must live on one device.
pub fn sum_squares(xs: &[(&CudaStorage, usize)]) -> Result<f32> {
    let Some((first, _)) = xs.first() else {
        return Ok(0.0);
    };
    let dev = first.dev.clone();
    if xs.iter().any(|(x, _)| !Arc::ptr_eq(&x.dev, &dev)) {
        bail!("sum_squares: tensors on different GPUs");
    }
    let blocks: Vec<usize> = xs.iter().map(|(_, n)| n.div_ceil(BLOCK as usize).clamp(1, MAX_SUMSQ_BLOCKS)).collect();
    let total: usize = blocks.iter().sum();
    let mut parts = dev.alloc_t::<f32>(total)?;
    let mut offset = 0i64;
    for ((x, n), nb) in xs.iter().zip(&blocks) {
        if x.buf.len() < *n {
            bail!("sum_squares: buffer of {} elements for {n}", x.buf.len());
        }
        let f = dev.func("adamw", kernel_name("sum_squares", x.buf.dtype()))?;
        let n64 = *n as i64;
        let mut lb = dev.stream.launch_builder(&f);
        lb.buf(&x.buf);
        lb.arg(&n64).arg(&mut parts).arg(&offset);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (*nb as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads n elements of x; block b writes partials[offset + b] with
        // b < nb, and offset + nb ≤ total.
        unsafe { lb.launch(cfg) }?;
        offset += *nb as i64;
    }
    let mut o = dev.alloc_t::<f32>(1)?;
    let f = dev.func("adamw", "sum_partials")?;
    let count = total as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(&parts).arg(&count).arg(&mut o);
    // SAFETY: reads `total` partials, all written above on this stream; writes out[0].
    unsafe { lb.launch(super::grid_rows(1, BLOCK)) }?;
    Ok(dev.stream.clone_dtoh(&o)?[0])
}
