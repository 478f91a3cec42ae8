//! Launchers of `kernels/elementwise.cu`.

use cudarc::driver::PushKernelArg;

use super::{check_same, grid_1d, grid_chunks, suffix, Bcast, CudaBuf, CudaStorage, PushBuf};
use crate::{bail, Result};

/// The dtype all of `bufs` share, or an error naming `op`.
fn one_dtype(op: &str, bufs: &[&CudaBuf]) -> Result<crate::DType> {
    let dtype = bufs.first().map_or(crate::DType::F32, |b| b.dtype());
    if let Some(other) = bufs.iter().find(|b| b.dtype() != dtype) {
        bail!("{op}: dtype mismatch {dtype} vs {}", other.dtype());
    }
    Ok(dtype)
}

/// Binary elementwise op with broadcasting: `kernel` is `add`, `sub` or `mul`.
/// Both inputs must have the output's dtype.
pub fn binary(
    kernel: &'static str,
    a: &CudaStorage,
    b: &CudaStorage,
    bc: &Bcast,
    n: usize,
    same: bool,
) -> Result<CudaBuf> {
    let dev = &a.dev;
    let dtype = one_dtype(kernel, &[&a.buf, &b.buf])?;
    if !matches!(kernel, "add" | "sub" | "mul") {
        bail!("unknown binary kernel {kernel}");
    }
    let f = dev.func("elementwise", super::kernel_name(kernel, dtype))?;
    let mut out = dev.alloc(n, dtype)?;
    let (n64, same32) = (n as i64, same as i32);
    let cfg = grid_chunks(n);
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&a.buf).buf(&b.buf).buf_mut(&mut out).arg(bc).arg(&n64).arg(&same32);
    // SAFETY: the kernel reads n elements through the broadcast offsets (in range of
    // both inputs by construction of `bc`) and writes n elements of `out`.
    unsafe { lb.launch(cfg) }?;
    Ok(out)
}

/// Launches a unary kernel of signature `(const T* x, U* out, [float extra,] int64 n)`.
fn unary_launch(
    x: &CudaStorage,
    base: &'static str,
    out_dtype: crate::DType,
    n: usize,
    extra: Option<f32>,
) -> Result<CudaBuf> {
    let dev = &x.dev;
    let name = kernel_name_io(base, x.buf.dtype(), out_dtype)?;
    let f = dev.func("elementwise", name)?;
    let mut out = dev.alloc(n, out_dtype)?;
    let n64 = n as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf).buf_mut(&mut out);
    if let Some(e) = extra.as_ref() {
        lb.arg(e);
    }
    lb.arg(&n64);
    // SAFETY: the kernels read and write exactly n elements of their buffers.
    unsafe { lb.launch(grid_chunks(n)) }?;
    Ok(out)
}

/// The entry point of an elementwise kernel from `input` to `output`: `cast_<in>_<out>`
/// for the casts, `<base>_<dtype>` (see [`super::kernel_name`]) for the others, which
/// keep their dtype.
fn kernel_name_io(base: &str, input: crate::DType, output: crate::DType) -> Result<&'static str> {
    match (base, input == output) {
        ("cast", false) => Ok(super::kernel_name(&format!("cast_{}", suffix(input)), output)),
        ("cast", true) => bail!("no cast kernel from {input} to itself"),
        (_, true) => Ok(super::kernel_name(base, input)),
        (_, false) => bail!("no kernel {base} for {input} -> {output}"),
    }
}

/// `s · x`.
pub fn scale(x: &CudaStorage, s: f32, n: usize) -> Result<CudaBuf> {
    unary_launch(x, "scale", x.buf.dtype(), n, Some(s))
}

/// Materialises the broadcast of `x` to the output of `bc` (uses `bc.sa`).
pub fn broadcast(x: &CudaStorage, bc: &Bcast, n: usize) -> Result<CudaBuf> {
    let bc = *bc;
    let dev = &x.dev;
    let dtype = x.buf.dtype();
    let f = dev.func("elementwise", kernel_name_io("bcast_copy", dtype, dtype)?)?;
    let mut out = dev.alloc(n, dtype)?;
    let n64 = n as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf).buf_mut(&mut out).arg(&bc).arg(&n64);
    // SAFETY: offsets computed from `bc` stay inside `x`; n writes into `out`.
    unsafe { lb.launch(grid_chunks(n)) }?;
    Ok(out)
}

/// Converts between f32 and bf16.
pub fn cast(x: &CudaStorage, to: crate::DType, n: usize) -> Result<CudaBuf> {
    unary_launch(x, "cast", to, n, None)
}

/// `x + c`.
pub fn add_scalar(x: &CudaStorage, c: f32, n: usize) -> Result<CudaBuf> {
    unary_launch(x, "add_scalar", x.buf.dtype(), n, Some(c))
}

/// An activation: `kernel` is `gelu_tanh`, `gelu_exact`, `silu`, `quick_gelu` or `exp`.
pub fn activation(x: &CudaStorage, kernel: &'static str, n: usize) -> Result<CudaBuf> {
    unary_launch(x, kernel, x.buf.dtype(), n, None)
}

/// The gradient `g·f'(x)` of the activation `kernel` (`x` and `g` of one dtype).
pub fn activation_backward(x: &CudaStorage, g: &CudaStorage, kernel: &'static str, n: usize) -> Result<CudaBuf> {
    let bwd = match kernel {
        "gelu_tanh" | "gelu_exact" | "silu" | "quick_gelu" | "exp" => super::intern(&format!("{kernel}_bwd")),
        _ => bail!("no backward kernel for activation {kernel}"),
    };
    let dev = &x.dev;
    let dtype = one_dtype(bwd, &[&x.buf, &g.buf])?;
    let f = dev.func("elementwise", super::kernel_name(bwd, dtype))?;
    let mut out = dev.alloc(n, dtype)?;
    let n64 = n as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf).buf(&g.buf).buf_mut(&mut out).arg(&n64);
    // SAFETY: the kernel reads n elements of x and g and writes n elements of `out`.
    unsafe { lb.launch(grid_chunks(n)) }?;
    Ok(out)
}

/// `x + gate·y` over `n` elements, the gate read at `(i / period)·inner + i % inner`
/// (both at least 1). All three inputs must have one dtype.
pub fn gated_residual(
    x: &CudaStorage,
    gate: &CudaStorage,
    y: &CudaStorage,
    period: usize,
    inner: usize,
    n: usize,
) -> Result<CudaBuf> {
    let dev = &x.dev;
    let dtype = one_dtype("gated_residual", &[&x.buf, &gate.buf, &y.buf])?;
    if n == 0 {
        return dev.alloc(0, dtype);
    }
    if period == 0 || inner == 0 {
        bail!("gated_residual: bad gate layout (period {period}, inner {inner})");
    }
    let f = dev.func("elementwise", kernel_name_io("gated_residual", dtype, dtype)?)?;
    let mut out = dev.alloc(n, dtype)?;
    let (p64, i64_, n64) = (period as i64, inner as i64, n as i64);
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf).buf(&gate.buf).buf(&y.buf).buf_mut(&mut out).arg(&p64).arg(&i64_).arg(&n64);
    // SAFETY: x, y and out hold n elements; the gate index (i / period)·inner + i % inner
    // is below the gate's element count because the op checked that the gate collapses
    // to [n / period, 1, inner] over x.
    unsafe { lb.launch(grid_chunks(n)) }?;
    Ok(out)
}

/// `min(max(x, lo), hi)` over `n` elements.
pub fn clamp(x: &CudaStorage, lo: f32, hi: f32, n: usize) -> Result<CudaBuf> {
    let dev = &x.dev;
    if x.buf.len() < n {
        bail!("clamp: buffer shorter than {n}");
    }
    let mut y = dev.alloc(n, x.buf.dtype())?;
    if n == 0 {
        return Ok(y);
    }
    let f = dev.func("elementwise", super::kernel_name("clamp", x.buf.dtype()))?;
    let n64 = n as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf);
    lb.buf_mut(&mut y);
    lb.arg(&lo).arg(&hi).arg(&n64);
    // SAFETY: n reads of x and n writes of y.
    unsafe { lb.launch(grid_1d(n, 256)) }?;
    Ok(y)
}

/// Backward of [`clamp`]: `g` where `lo ≤ x ≤ hi`, else 0 (`g` in `x`'s dtype).
pub fn clamp_backward(x: &CudaStorage, g: &CudaStorage, lo: f32, hi: f32, n: usize) -> Result<CudaBuf> {
    check_same("clamp backward", &x.buf, &g.buf, n)?;
    let dev = &x.dev;
    let mut dx = dev.alloc(n, x.buf.dtype())?;
    if n == 0 {
        return Ok(dx);
    }
    let f = dev.func("elementwise", super::kernel_name("clamp_bwd", x.buf.dtype()))?;
    let n64 = n as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf);
    lb.buf(&g.buf);
    lb.buf_mut(&mut dx);
    lb.arg(&lo).arg(&hi).arg(&n64);
    // SAFETY: n reads of x and g, n writes of dx.
    unsafe { lb.launch(grid_1d(n, 256)) }?;
    Ok(dx)
}
