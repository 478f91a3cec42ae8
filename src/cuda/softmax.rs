//! Launchers of `kernels/softmax.cu`: the row softmax (forward and backward) of the
//! attention whose scores are materialised (the VAE's spatial attention).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{check_same, kernel_name, CudaBuf, CudaStorage, PushBuf};
use crate::{bail, Result};

/// Threads per block (`SOFTMAX_THREADS` in the kernel).
const THREADS: u32 = 256;
/// Largest grid; blocks then take several rows.
const MAX_BLOCKS: usize = 1 << 20;

/// Launch of the row softmax kernels: one block of `THREADS` per row, grid capped.
fn softmax_launch(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.clamp(1, MAX_BLOCKS) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Softmax of each of `rows` rows of `n` elements.
pub fn softmax(x: &CudaStorage, rows: usize, n: usize) -> Result<CudaBuf> {
    let dev = &x.dev;
    if x.buf.len() < rows * n {
        bail!("softmax: buffer of {} elements for {rows} rows of {n}", x.buf.len());
    }
    let mut y = dev.alloc(rows * n, x.buf.dtype())?;
    if rows * n == 0 {
        return Ok(y);
    }
    let f = dev.func("softmax", kernel_name("softmax", x.buf.dtype()))?;
    let (r64, n64) = (rows as i64, n as i64);
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf);
    lb.buf_mut(&mut y);
    lb.arg(&r64).arg(&n64);
    // SAFETY: block r reads and writes row r (n elements) of x and y, r < rows.
    unsafe { lb.launch(softmax_launch(rows)) }?;
    Ok(y)
}

/// Softmax backward from the forward output `y` and the gradient `g` (same dtype).
pub fn softmax_backward(y: &CudaStorage, g: &CudaStorage, rows: usize, n: usize) -> Result<CudaBuf> {
    check_same("softmax backward", &y.buf, &g.buf, rows * n)?;
    let dev = &y.dev;
    let mut dx = dev.alloc(rows * n, y.buf.dtype())?;
    if rows * n == 0 {
        return Ok(dx);
    }
    let f = dev.func("softmax", kernel_name("softmax_bwd", y.buf.dtype()))?;
    let (r64, n64) = (rows as i64, n as i64);
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&y.buf);
    lb.buf(&g.buf);
    lb.buf_mut(&mut dx);
    lb.arg(&r64).arg(&n64);
    // SAFETY: block r reads row r of y and g and writes row r of dx, r < rows.
    unsafe { lb.launch(softmax_launch(rows)) }?;
    Ok(dx)
}
