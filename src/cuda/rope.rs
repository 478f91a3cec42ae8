//! Launcher of `kernels/rope.cu`.

use cudarc::driver::PushKernelArg;

use super::{grid_1d, CudaBuf, CudaStorage, PushBuf};
use crate::{bail, Result};

/// Rotates the pairs of `x` (`[B, tokens, heads, head_dim]`, `n` elements) by
/// `sign`·angle, with `cos`/`sin` f32 tables of `[tokens, head_dim/2]`. Returns a buffer
/// of `x`'s dtype.
pub fn rope(
    x: &CudaStorage,
    cos: &CudaStorage,
    sin: &CudaStorage,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    sign: f32,
) -> Result<CudaBuf> {
    let dev = &x.dev;
    let half = head_dim / 2;
    if head_dim == 0 || !head_dim.is_multiple_of(2) || tokens == 0 || heads == 0 {
        bail!("rope: bad shape (tokens {tokens}, heads {heads}, head_dim {head_dim})");
    }
    let n = x.buf.len();
    if !n.is_multiple_of(tokens * heads * head_dim) {
        bail!("rope: {n} elements are not a whole number of [{tokens}, {heads}, {head_dim}] blocks");
    }
    let (cos_t, sin_t) = match (&cos.buf, &sin.buf) {
        (CudaBuf::F32(c), CudaBuf::F32(s)) if c.len() >= tokens * half && s.len() >= tokens * half => (c, s),
        _ => bail!("rope: cos/sin must be f32 tables of [{tokens}, {half}]"),
    };
    // Four pairs per thread (16-byte bf16 accesses) when a head's pairs split evenly.
    let pairs_per_thread = if half.is_multiple_of(4) { 4 } else { 1 };
    let name = super::intern(&format!("rope_{}_p{pairs_per_thread}", super::suffix(x.buf.dtype())));
    let f = dev.func("rope", name)?;
    let mut out = dev.alloc(n, x.buf.dtype())?;
    let n_chunks = (n / 2 / pairs_per_thread) as i64;
    let (tokens64, heads32, half32) = (tokens as i64, heads as i32, half as i32);
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf).arg(cos_t).arg(sin_t).buf_mut(&mut out);
    lb.arg(&n_chunks).arg(&tokens64).arg(&heads32).arg(&half32).arg(&sign);
    // SAFETY: thread chunk q covers elements [2·q·P, 2·(q+1)·P) of x and out (n elements)
    // and table entries n·half + j .. + P < tokens·half. With P = 4, half is a multiple of
    // 4, so those offsets are multiples of 8 elements (x) and 4 floats (tables): the
    // 16-byte accesses are aligned.
    unsafe { lb.launch(grid_1d(n_chunks as usize, 256)) }?;
    Ok(out)
}
