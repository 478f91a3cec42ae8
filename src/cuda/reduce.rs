//! Launchers of `kernels/reduce.cu`.

use cudarc::driver::PushKernelArg;

use super::{grid_1d, CudaBuf, CudaStorage};
use crate::{bail, DType, Result};

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

/// Sums `x` (shape `in_shape`) onto `out_shape` (same rank, each dim 1 or equal).
pub fn sum_to(x: &CudaStorage, in_shape: &[usize], out_shape: &[usize]) -> Result<CudaBuf> {
    if in_shape.len() > 6 || in_shape.len() != out_shape.len() {
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
    let f = dev.func("reduce", if dtype == DType::F32 { "sum_to_f32" } else { "sum_to_bf16" })?;
    let mut out = dev.alloc(n_out, dtype)?;
    let n_out64 = n_out as i64;
    let mut lb = dev.stream.launch_builder(&f);
    match (&x.buf, &mut out) {
        (CudaBuf::F32(a), CudaBuf::F32(o)) => {
            lb.arg(a).arg(o);
        }
        (CudaBuf::BF16(a), CudaBuf::BF16(o)) => {
            lb.arg(a).arg(o);
        }
        _ => bail!("sum_to: dtype mismatch"),
    }
    lb.arg(&d).arg(&n_out64).arg(&n_red);
    // SAFETY: offsets stay inside `x` (strides from its contiguous shape); n_out writes.
    unsafe { lb.launch(grid_1d(n_out, 256)) }?;
    Ok(out)
}
