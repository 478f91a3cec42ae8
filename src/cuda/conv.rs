//! Launchers of `kernels/conv.cu`: the convolution as im2col + cuBLASLt GEMM (forward
//! and backward, through [`super::matmul::matmul`]), nearest 2× upsampling and the
//! channel RMS norm.
//!
//! The convolution walks one image and one band of output rows at a time (the bands of
//! [`ConvGeom::rows_per_chunk`], rounded so that bands start aligned), so the column matrix stays within a set number of
//! elements whatever the image size. Per band, in row-major terms:
//!
//! ```text
//!   forward   Y_band[O, npix]  = W[O, K] · cols[K, npix]
//!   weight    dW[O, K]        += dY_band[O, npix] · cols[K, npix]ᵀ   (fp32 accumulator)
//!   input     dcols[K, npix]   = W[O, K]ᵀ · dY_band[O, npix], then col2im into dX
//! ```
//!
//! `Y_band` and `dY_band` are strided views of the `[O, H·W]` output (row length H·W).
//! cuBLASLt's default heuristic preferences promise it 256-byte-aligned matrices, and
//! cudarc sets no other, so a view is handed to it only when it starts on such a
//! boundary; other bands go through a scratch buffer and a strided copy. A 1×1, stride-1,
//! unpadded convolution reads its input in place (the image *is* its column matrix) when
//! the image starts aligned — always the case for a batch of one.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::matmul::{matmul, RowGemm};
use super::{check_same, kernel_name, CudaBuf, CudaDevice, CudaStorage, Elem, PushBuf};
use crate::desc::{ChannelNorm, ConvGeom};
use crate::{bail, DType, Error, Result};

/// The alignment (bytes) cuBLASLt's heuristics assume for every matrix pointer.
const GEMM_ALIGN: usize = 256;
/// Threads per block of the 1-D kernels.
const THREADS: u32 = 256;
/// Cap on 1-D grids (the kernels grid-stride over the rest).
const MAX_BLOCKS: usize = 1 << 20;
/// Pixels per block of the channel RMS norm (`CRN_PIX`) and channel rows (`CRN_ROWS`).
const CRN_PIX: usize = 32;
const CRN_ROWS: usize = 8;
/// Cap on the channel-norm grid: enough blocks to fill any current GPU, while the
/// backward's partial dγ rows (one per block) stay small.
const CRN_MAX_BLOCKS: usize = 4096;

/// A 1-D launch over `n` elements, grid capped at [`MAX_BLOCKS`].
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Convolution geometry passed by value; mirrors `struct ConvDesc` in `conv.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ConvDesc {
    c_in: i64,
    h: i64,
    w: i64,
    kh: i64,
    kw: i64,
    stride: i64,
    pad_top: i64,
    pad_left: i64,
    h_out: i64,
    w_out: i64,
}

// SAFETY: plain-old-data with the same C layout as the kernel-side struct.
unsafe impl DeviceRepr for ConvDesc {}

impl ConvDesc {
    fn new(g: &ConvGeom) -> Self {
        let v = |u: usize| u as i64;
        ConvDesc {
            c_in: v(g.c_in),
            h: v(g.h),
            w: v(g.w),
            kh: v(g.kh),
            kw: v(g.kw),
            stride: v(g.stride),
            pad_top: v(g.pad_top),
            pad_left: v(g.pad_left),
            h_out: v(g.h_out),
            w_out: v(g.w_out),
        }
    }
}

fn alloc_t<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    T::take(dev.alloc(n, T::DTYPE)?)
}

fn zeros_t<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    T::take(dev.zeros(n, T::DTYPE)?)
}

/// The scratch buffer in `slot`, allocated with `n` elements on first use.
fn scratch<'a, T: Elem>(
    slot: &'a mut Option<CudaSlice<T>>,
    dev: &CudaDevice,
    n: usize,
) -> Result<&'a mut CudaSlice<T>> {
    if slot.is_none() {
        *slot = Some(alloc_t(dev, n)?);
    }
    slot.as_mut().ok_or_else(|| Error::msg("conv: scratch buffer missing"))
}

/// Elements `range` of `s` as a view, or an error (never a panic) when out of bounds.
fn view<T>(s: &CudaSlice<T>, range: std::ops::Range<usize>) -> Result<CudaView<'_, T>> {
    let len = s.len();
    s.try_slice(range.clone()).ok_or_else(|| Error::msg(format!("conv: view {range:?} of a {len}-element buffer")))
}

/// Mutable [`view`].
fn view_mut<T>(s: &mut CudaSlice<T>, range: std::ops::Range<usize>) -> Result<CudaViewMut<'_, T>> {
    let len = s.len();
    s.try_slice_mut(range.clone()).ok_or_else(|| Error::msg(format!("conv: view {range:?} of a {len}-element buffer")))
}

/// True when element `off` of a (256-byte-aligned) allocation is aligned for cuBLASLt.
fn aligned<T>(off: usize) -> bool {
    (off * std::mem::size_of::<T>()).is_multiple_of(GEMM_ALIGN)
}

/// Output rows per band: [`ConvGeom::rows_per_chunk`], rounded down to a multiple of the
/// rows that keep every band's start [`GEMM_ALIGN`]-aligned (when at least one such
/// multiple fits), so that the products read and write each band of an aligned image in
/// place instead of through a scratch buffer and a strided copy. A 480-pixel bf16 row is
/// 960 bytes: bands of a multiple of 4 rows.
fn band_rows<T>(g: &ConvGeom, max_col_elems: usize) -> usize {
    let per = g.rows_per_chunk(max_col_elems);
    if per >= g.h_out {
        return per;
    }
    let row_bytes = g.w_out * std::mem::size_of::<T>();
    let (mut a, mut b) = (GEMM_ALIGN, row_bytes.max(1));
    while b != 0 {
        (a, b) = (b, a % b);
    }
    let step = GEMM_ALIGN / a;
    if per >= step {
        per / step * step
    } else {
        per
    }
}

/// Elements a row-major `[rows, cols]` matrix with row length `ld` spans.
fn span(rows: usize, cols: usize, ld: usize) -> usize {
    (rows - 1) * ld + cols
}

fn im2col<T: Elem>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    x_off: usize,
    cols: &mut CudaSlice<T>,
    g: &ConvGeom,
    r0: usize,
    rows: usize,
) -> Result<()> {
    let n = g.k() * rows * g.w_out;
    if x.len() < x_off + g.in_image() || cols.len() < n {
        bail!("im2col: buffers too short for {g:?}");
    }
    let by_rows = im2col_by_rows()?;
    let f = dev.func("conv", kernel_name(if by_rows { "im2col_rows" } else { "im2col" }, T::DTYPE))?;
    let (d, xo, r0_64, rows_64) = (ConvDesc::new(g), x_off as i64, r0 as i64, rows as i64);
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(x).arg(&xo).arg(cols).arg(&d).arg(&r0_64).arg(&rows_64);
    let cfg = if by_rows {
        // One warp per (tap, output row) pair, 8 pairs per block.
        let blocks = (g.k() * rows).div_ceil(IM2COL_ROWS_PAIRS).clamp(1, MAX_BLOCKS) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32, IM2COL_ROWS_PAIRS as u32, 1), shared_mem_bytes: 0 }
    } else {
        grid(n)
    };
    // SAFETY: reads stay in the image at x_off (checked above, taps are bounds-tested in
    // the kernel); the k·rows·w_out writes fit `cols`.
    unsafe { lb.launch(cfg) }?;
    Ok(())
}

/// (tap, output row) pairs per block of `im2col_rows`, and input rows per block of
/// `col2im_rows` (their blockDim.y: one warp each).
const IM2COL_ROWS_PAIRS: usize = 8;

const IM2COL_VAR: &str = "SYNTHOS_CUDA_IM2COL";

/// Whether the convolution's data movement runs by rows on this thread: the column
/// matrix by `im2col_rows_*` (one warp per row segment, the divisions once per segment),
/// its backward into the input by `col2im_rows_*` (one warp per input row, the divisions
/// once per row), and the band copies, bias adds and 2× upsampling and its backward by
/// `*_by_rows_*` (`upsample2x_bwd_by_rows_*` for the backward; 2-D grids, no per-element
/// division), instead of one thread per element. A [`with_im2col_by_rows`] override, else
/// `SYNTHOS_CUDA_IM2COL=rows` (`elements`, the default, until a GPU run has shown it
/// faster). The results are the same bit for bit.
pub fn im2col_by_rows() -> Result<bool> {
    Ok(super::choice::get(IM2COL_VAR, &["elements", "rows"])? == 1)
}

/// Runs `f` with `im2col_rows` on or off on this thread (tests, bench).
pub fn with_im2col_by_rows<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::choice::with(IM2COL_VAR, on as usize, f)
}

#[allow(clippy::too_many_arguments)]
fn col2im<T: Elem>(
    dev: &CudaDevice,
    dcols: &CudaSlice<T>,
    dx: &mut CudaSlice<T>,
    dx_off: usize,
    g: &ConvGeom,
    r0: usize,
    rows: usize,
    (iy0, iy1): (usize, usize),
) -> Result<()> {
    let n = g.c_in * (iy1 - iy0) * g.w;
    if n == 0 {
        return Ok(());
    }
    if dcols.len() < g.k() * rows * g.w_out || dx.len() < dx_off + g.in_image() || iy1 > g.h {
        bail!("col2im: buffers too short for {g:?}");
    }
    let by_rows = im2col_by_rows()?;
    let f = dev.func("conv", kernel_name(if by_rows { "col2im_rows" } else { "col2im" }, T::DTYPE))?;
    let d = ConvDesc::new(g);
    let args = [dx_off, r0, rows, iy0, iy1].map(|v| v as i64);
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(dcols).arg(dx).arg(&args[0]).arg(&d).arg(&args[1]).arg(&args[2]).arg(&args[3]).arg(&args[4]);
    let cfg = if by_rows {
        // One warp per input row (channel, iy), 8 rows per block.
        let blocks = (g.c_in * (iy1 - iy0)).div_ceil(IM2COL_ROWS_PAIRS).clamp(1, MAX_BLOCKS) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (32, IM2COL_ROWS_PAIRS as u32, 1), shared_mem_bytes: 0 }
    } else {
        grid(n)
    };
    // SAFETY: writes go to rows [iy0, iy1) of the image at dx_off (inside dx); reads are
    // taps of output rows [r0, r0 + rows), inside the k·rows·w_out column matrix.
    unsafe { lb.launch(cfg) }?;
    Ok(())
}

/// A strided `[rows, cols]` block of a buffer: element `(r, c)` at `off + r·ld + c`.
#[derive(Clone, Copy, Debug)]
struct Block {
    off: usize,
    ld: usize,
}

/// The entry point and launch of a `[rows, cols]` pass: `by_rows` on a 2-D grid
/// (rows along y, grid-stride past 65535; columns along x) with `SYNTHOS_CUDA_IM2COL=rows`,
/// else `base` with one thread per element.
fn row_pass(
    base: &str,
    by_rows: &str,
    dtype: crate::DType,
    rows: usize,
    cols: usize,
) -> Result<(&'static str, LaunchConfig)> {
    if im2col_by_rows()? {
        let x = cols.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
        let y = rows.clamp(1, 65535) as u32;
        let cfg = LaunchConfig { grid_dim: (x, y, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        Ok((kernel_name(by_rows, dtype), cfg))
    } else {
        Ok((kernel_name(base, dtype), grid(rows * cols)))
    }
}

/// `dst_block = src_block (+ bias[r] on row r)` for `[rows, cols]` blocks.
#[allow(clippy::too_many_arguments)]
fn rows_copy<T: Elem>(
    dev: &CudaDevice,
    src: &CudaSlice<T>,
    s: Block,
    dst: &mut CudaSlice<T>,
    d: Block,
    rows: usize,
    cols: usize,
    bias: Option<&CudaSlice<f32>>,
) -> Result<()> {
    if src.len() < s.off + span(rows, cols, s.ld) || dst.len() < d.off + span(rows, cols, d.ld) {
        bail!("rows_copy: [{rows}, {cols}] blocks {s:?} -> {d:?} out of range");
    }
    if bias.is_some_and(|b| b.len() < rows) {
        bail!("rows_copy: bias shorter than {rows} rows");
    }
    let (base, by_rows) =
        if bias.is_some() { ("rows_copy_bias", "rows_copy_bias_by_rows") } else { ("rows_copy", "rows_copy_by_rows") };
    let (name, cfg) = row_pass(base, by_rows, T::DTYPE, rows, cols)?;
    let f = dev.func("conv", name)?;
    let args = [s.off, s.ld, d.off, d.ld, rows, cols].map(|v| v as i64);
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(src).arg(&args[0]).arg(&args[1]).arg(dst).arg(&args[2]).arg(&args[3]).arg(&args[4]).arg(&args[5]);
    if let Some(b) = bias {
        lb.arg(b);
    }
    // SAFETY: both blocks were checked to lie inside their buffers; bias has ≥ rows values.
    unsafe { lb.launch(cfg) }?;
    Ok(())
}

/// `dst_block[r, c] += bias[r]` in place.
fn rows_bias_add<T: Elem>(
    dev: &CudaDevice,
    dst: &mut CudaSlice<T>,
    d: Block,
    rows: usize,
    cols: usize,
    bias: &CudaSlice<f32>,
) -> Result<()> {
    if dst.len() < d.off + span(rows, cols, d.ld) || bias.len() < rows {
        bail!("rows_bias_add: [{rows}, {cols}] block {d:?} out of range");
    }
    let (name, cfg) = row_pass("rows_bias_add", "rows_bias_add_by_rows", T::DTYPE, rows, cols)?;
    let f = dev.func("conv", name)?;
    let args = [d.off, d.ld, rows, cols].map(|v| v as i64);
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(dst).arg(&args[0]).arg(&args[1]).arg(&args[2]).arg(&args[3]).arg(bias);
    // SAFETY: the block lies inside dst (checked); bias has ≥ rows values.
    unsafe { lb.launch(cfg) }?;
    Ok(())
}

/// `acc[..n] += x[..n]` with an fp32 accumulator.
fn accumulate<T: Elem>(dev: &CudaDevice, acc: &mut CudaSlice<f32>, x: &CudaSlice<T>, n: usize) -> Result<()> {
    if acc.len() < n || x.len() < n {
        bail!("accumulate: buffers shorter than {n}");
    }
    let f = dev.func("conv", kernel_name("accumulate_f32_from", T::DTYPE))?;
    let n64 = n as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(acc).arg(x).arg(&n64);
    // SAFETY: both buffers hold at least n elements.
    unsafe { lb.launch(grid(n)) }?;
    Ok(())
}

/// The bands `(r0, rows)` of `per` output rows covering the image.
fn bands(g: &ConvGeom, per: usize) -> impl Iterator<Item = (usize, usize)> {
    let h_out = g.h_out;
    (0..h_out).step_by(per.max(1)).map(move |r0| (r0, per.min(h_out - r0)))
}

/// True when image `b` can use the in-place 1×1 path: input and output both aligned.
fn in_place<T>(g: &ConvGeom, b: usize) -> bool {
    g.is_identity() && aligned::<T>(b * g.in_image()) && aligned::<T>(b * g.out_image())
}

fn check_conv_bufs(x: &CudaStorage, w: &CudaStorage, g: &ConvGeom) -> Result<()> {
    if x.buf.dtype() != w.buf.dtype() {
        bail!("conv2d: input ({}) and weight ({}) dtypes differ", x.buf.dtype(), w.buf.dtype());
    }
    if x.buf.len() < g.batch * g.in_image() || w.buf.len() < g.c_out * g.k() {
        bail!("conv2d: buffers of {} and {} elements too short for {g:?}", x.buf.len(), w.buf.len());
    }
    if g.batch == 0 || g.c_out == 0 || g.k() == 0 || g.out_pixels() == 0 {
        bail!("conv2d: empty convolution {g:?}");
    }
    Ok(())
}

/// Convolution forward: `x` `[batch, c_in, h, w]` and `w` `[c_out, k]` of one dtype,
/// `bias` `[c_out]` in f32; the output `[batch, c_out, h_out, w_out]` in that dtype.
/// The column matrix holds at most `max_col_elems` elements (one band of rows).
pub fn conv2d_forward(
    x: &CudaStorage,
    w: &CudaStorage,
    bias: Option<&CudaStorage>,
    g: &ConvGeom,
    max_col_elems: usize,
) -> Result<CudaBuf> {
    check_conv_bufs(x, w, g)?;
    let bias = bias.map(|b| f32::of(&b.buf)).transpose()?;
    match x.buf.dtype() {
        DType::F32 => forward_t(&x.dev, f32::of(&x.buf)?, f32::of(&w.buf)?, bias, g, max_col_elems).map(f32::wrap),
        DType::BF16 => forward_t(&x.dev, bf16::of(&x.buf)?, bf16::of(&w.buf)?, bias, g, max_col_elems).map(bf16::wrap),
    }
}

fn forward_t<T: Elem>(
    dev: &Arc<CudaDevice>,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    g: &ConvGeom,
    max_col_elems: usize,
) -> Result<CudaSlice<T>> {
    let (k, opix, o) = (g.k(), g.out_pixels(), g.c_out);
    let blas = dev.blaslt()?;
    let per = band_rows::<T>(g, max_col_elems);
    let mut out = alloc_t::<T>(dev, g.batch * g.out_image())?;
    let (mut cols_slot, mut band_slot) = (None, None);
    for b in 0..g.batch {
        let (xo, oo) = (b * g.in_image(), b * g.out_image());
        if in_place::<T>(g, b) {
            let gm = RowGemm::strided(o, opix, k, (false, false), [k, opix, opix]);
            matmul(
                &blas,
                &gm,
                &view(w, 0..w.len())?,
                &view(x, xo..xo + g.in_image())?,
                None,
                &mut view_mut(&mut out, oo..oo + g.out_image())?,
            )?;
            if let Some(bias) = bias {
                rows_bias_add(dev, &mut out, Block { off: oo, ld: opix }, o, opix, bias)?;
            }
            continue;
        }
        for (r0, rows) in bands(g, per) {
            let npix = rows * g.w_out;
            let cols = scratch(&mut cols_slot, dev, k * per * g.w_out)?;
            im2col(dev, x, xo, cols, g, r0, rows)?;
            let dst = oo + r0 * g.w_out;
            let mut gm = RowGemm::strided(o, npix, k, (false, false), [k, npix, opix]);
            if aligned::<T>(dst) {
                // The product lands in place: rows of npix pixels, opix apart.
                let mut band_out = view_mut(&mut out, dst..dst + span(o, npix, opix))?;
                matmul(&blas, &gm, &view(w, 0..w.len())?, &view(cols, 0..k * npix)?, None, &mut band_out)?;
                if let Some(bias) = bias {
                    rows_bias_add(dev, &mut out, Block { off: dst, ld: opix }, o, npix, bias)?;
                }
            } else {
                let band = scratch(&mut band_slot, dev, o * per * g.w_out)?;
                gm.ldc = npix;
                matmul(
                    &blas,
                    &gm,
                    &view(w, 0..w.len())?,
                    &view(cols, 0..k * npix)?,
                    None,
                    &mut view_mut(band, 0..o * npix)?,
                )?;
                rows_copy(
                    dev,
                    band,
                    Block { off: 0, ld: npix },
                    &mut out,
                    Block { off: dst, ld: opix },
                    o,
                    npix,
                    bias,
                )?;
            }
        }
    }
    Ok(out)
}

/// Convolution backward: the input gradient (in the input's dtype) and the weight
/// gradient (`[c_out, k]`, f32, summed over bands in fp32), each when asked for.
/// `dy` must have the dtype of `x` and `w`.
pub fn conv2d_backward(
    x: &CudaStorage,
    w: &CudaStorage,
    dy: &CudaStorage,
    g: &ConvGeom,
    max_col_elems: usize,
    want_dx: bool,
    want_dw: bool,
) -> Result<(Option<CudaBuf>, Option<CudaBuf>)> {
    check_conv_bufs(x, w, g)?;
    if dy.buf.dtype() != x.buf.dtype() || dy.buf.len() < g.batch * g.out_image() {
        bail!("conv2d backward: output gradient ({} elements of {}) does not fit {g:?}", dy.buf.len(), dy.buf.dtype());
    }
    let dev = &x.dev;
    let (dx, dw) = match x.buf.dtype() {
        DType::F32 => {
            let (dx, dw) = backward_t(
                dev,
                f32::of(&x.buf)?,
                f32::of(&w.buf)?,
                f32::of(&dy.buf)?,
                g,
                max_col_elems,
                want_dx,
                want_dw,
            )?;
            (dx.map(f32::wrap), dw)
        }
        DType::BF16 => {
            let (dx, dw) = backward_t(
                dev,
                bf16::of(&x.buf)?,
                bf16::of(&w.buf)?,
                bf16::of(&dy.buf)?,
                g,
                max_col_elems,
                want_dx,
                want_dw,
            )?;
            (dx.map(bf16::wrap), dw)
        }
    };
    Ok((dx, dw.map(f32::wrap)))
}

/// Input gradient (in the compute dtype) and f32 weight gradient, each when asked for.
type Grads<T> = (Option<CudaSlice<T>>, Option<CudaSlice<f32>>);

#[allow(clippy::too_many_arguments)]
fn backward_t<T: Elem>(
    dev: &Arc<CudaDevice>,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    g: &ConvGeom,
    max_col_elems: usize,
    want_dx: bool,
    want_dw: bool,
) -> Result<Grads<T>> {
    let (k, opix, o) = (g.k(), g.out_pixels(), g.c_out);
    let blas = dev.blaslt()?;
    // dx accumulates over bands (col2im adds), so it starts at zero.
    let mut dx = if want_dx { Some(zeros_t::<T>(dev, g.batch * g.in_image())?) } else { None };
    let mut dw = if want_dw { Some(zeros_t::<f32>(dev, o * k)?) } else { None };
    let (mut cols_slot, mut dcols_slot, mut band_slot, mut part_slot) = (None, None, None, None);
    for b in 0..g.batch {
        let (xo, oo) = (b * g.in_image(), b * g.out_image());
        let direct = in_place::<T>(g, b);
        let per = if direct { g.h_out } else { band_rows::<T>(g, max_col_elems) };
        for (r0, rows) in bands(g, per) {
            let npix = rows * g.w_out;
            let src = oo + r0 * g.w_out;
            // This band of dY as an aligned [o, npix] matrix with row length `ld_dy`.
            let dy_in_place = aligned::<T>(src);
            if !dy_in_place {
                let band = scratch(&mut band_slot, dev, o * per * g.w_out)?;
                rows_copy(dev, dy, Block { off: src, ld: opix }, band, Block { off: 0, ld: npix }, o, npix, None)?;
            }
            if want_dw && !direct {
                im2col(dev, x, xo, scratch(&mut cols_slot, dev, k * per * g.w_out)?, g, r0, rows)?;
            }
            let (dy_view, ld_dy) = match (&band_slot, dy_in_place) {
                (_, true) => (view(dy, src..src + span(o, npix, opix))?, opix),
                (Some(band), false) => (view(band, 0..o * npix)?, npix),
                (None, false) => bail!("conv2d backward: gradient band missing"),
            };
            if let Some(dw) = dw.as_mut() {
                let cols_view = match (&cols_slot, direct) {
                    (_, true) => view(x, xo..xo + g.in_image())?,
                    (Some(cols), false) => view(cols, 0..k * npix)?,
                    (None, false) => bail!("conv2d backward: column buffer missing"),
                };
                let part = scratch(&mut part_slot, dev, o * k)?;
                // dW_band[o, k] = dY_band · colsᵀ
                let gm = RowGemm::strided(o, k, npix, (false, true), [ld_dy, npix, k]);
                matmul(&blas, &gm, &dy_view, &cols_view, None, &mut view_mut(part, 0..o * k)?)?;
                accumulate(dev, dw, part, o * k)?;
            }
            if let Some(dx) = dx.as_mut() {
                // dcols[k, npix] = Wᵀ · dY_band
                let gm = RowGemm::strided(k, npix, o, (true, false), [k, ld_dy, npix]);
                if direct {
                    matmul(
                        &blas,
                        &gm,
                        &view(w, 0..w.len())?,
                        &dy_view,
                        None,
                        &mut view_mut(dx, xo..xo + g.in_image())?,
                    )?;
                } else {
                    let dcols = scratch(&mut dcols_slot, dev, k * per * g.w_out)?;
                    matmul(&blas, &gm, &view(w, 0..w.len())?, &dy_view, None, &mut view_mut(dcols, 0..k * npix)?)?;
                    col2im(dev, dcols, dx, xo, g, r0, rows, g.input_rows(r0, rows))?;
                }
            }
        }
    }
    Ok((dx, dw))
}

/// Nearest 2× upsampling of `planes` planes of `h × w`.
pub fn upsample_nearest2x(x: &CudaStorage, planes: usize, h: usize, w: usize) -> Result<CudaBuf> {
    upsample_launch(x, ("upsample2x", "upsample2x_by_rows"), "upsample_nearest2x", planes, h, w, 4)
}

/// Backward of [`upsample_nearest2x`]: sums each 2×2 block of `g`.
pub fn upsample_nearest2x_backward(g: &CudaStorage, planes: usize, h: usize, w: usize) -> Result<CudaBuf> {
    upsample_launch(g, ("upsample2x_bwd", "upsample2x_bwd_by_rows"), "upsample_nearest2x backward", planes, h, w, 1)
}

/// Launches an upsampling pass over its `planes·h·w·out_factor` outputs, whose input
/// holds `planes·h·w·4 / out_factor` elements (the forward reads a quarter of what it
/// writes, the backward four times as much): the element `kernel`, or `by_rows` with
/// [`im2col_by_rows`] on.
fn upsample_launch(
    x: &CudaStorage,
    (kernel, by_rows): (&str, &str),
    op: &str,
    planes: usize,
    h: usize,
    w: usize,
    out_factor: usize,
) -> Result<CudaBuf> {
    let dev = &x.dev;
    let (n_in, n_out) = (planes * h * w * 4 / out_factor, planes * h * w * out_factor);
    if x.buf.len() < n_in {
        bail!("{op}: buffer of {} elements for {planes}×{h}×{w}", x.buf.len());
    }
    let mut out = dev.alloc(n_out, x.buf.dtype())?;
    if n_out == 0 {
        return Ok(out);
    }
    // By rows, one grid row per output row: the forward's rows of 2w pixels (planes·2h of
    // them), the backward's of w (planes·h).
    let (rows, cols) = if out_factor == 4 { (planes * 2 * h, 2 * w) } else { (planes * h, w) };
    let (name, cfg) = row_pass(kernel, by_rows, x.buf.dtype(), rows, cols)?;
    let f = dev.func("conv", name)?;
    let args = [h, w, n_out].map(|v| v as i64);
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf).buf_mut(&mut out).arg(&args[0]).arg(&args[1]).arg(&args[2]);
    // SAFETY: n_out writes into `out`; the forward reads x[(p·h + y/2)·w + x/2] <
    // planes·h·w, the backward reads the 2×2 block of each output below planes·2h·2w.
    unsafe { lb.launch(cfg) }?;
    Ok(out)
}

fn crn_launch(n: &ChannelNorm) -> (LaunchConfig, usize) {
    let blocks = (n.batch * n.s).div_ceil(CRN_PIX).clamp(1, CRN_MAX_BLOCKS);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (CRN_PIX as u32, CRN_ROWS as u32, 1),
        shared_mem_bytes: 0,
    };
    (cfg, blocks)
}

fn check_crn(x: &CudaBuf, gamma: &CudaStorage, n: &ChannelNorm) -> Result<()> {
    if x.len() < n.batch * n.c * n.s {
        bail!("channel_rms_norm: buffer of {} elements for {n:?}", x.len());
    }
    if gamma.buf.dtype() != DType::F32 || gamma.buf.len() < n.c {
        bail!("channel_rms_norm: gamma must be {} f32 values, got {} {}", n.c, gamma.buf.len(), gamma.buf.dtype());
    }
    if n.c == 0 || n.s == 0 || n.batch == 0 {
        bail!("channel_rms_norm: empty input {n:?}");
    }
    Ok(())
}

/// Channel RMS norm forward (`gamma` f32 `[c]`), output in `x`'s dtype.
pub fn channel_rms_norm(x: &CudaStorage, gamma: &CudaStorage, n: &ChannelNorm) -> Result<CudaBuf> {
    check_crn(&x.buf, gamma, n)?;
    let dev = &x.dev;
    let mut y = dev.alloc(x.buf.len(), x.buf.dtype())?;
    let f = dev.func("conv", kernel_name("channel_rms_norm", x.buf.dtype()))?;
    let (cfg, _) = crn_launch(n);
    let args = [n.c, n.s, n.batch * n.s].map(|v| v as i64);
    let scale = n.scale();
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf);
    lb.buf(&gamma.buf);
    lb.buf_mut(&mut y);
    lb.arg(&args[0]).arg(&args[1]).arg(&args[2]).arg(&n.eps).arg(&scale);
    // SAFETY: pixels p < batch·s read and write (p/s)·c·s + p%s + ch·s < batch·c·s
    // elements of x and y; gamma holds c values. The block shape is the kernel's 32×8.
    unsafe { lb.launch(cfg) }?;
    Ok(y)
}

/// Channel RMS norm backward: `dx` in `x`'s dtype and one partial dγ row per block,
/// `[blocks, c]` f32, to be summed over its first dimension. Returns `(dx, partials,
/// blocks)`. `dy` must have `x`'s dtype.
pub fn channel_rms_norm_backward(
    x: &CudaStorage,
    gamma: &CudaStorage,
    dy: &CudaStorage,
    n: &ChannelNorm,
) -> Result<(CudaBuf, CudaBuf, usize)> {
    check_crn(&x.buf, gamma, n)?;
    check_same("channel_rms_norm backward", &x.buf, &dy.buf, n.batch * n.c * n.s)?;
    let dev = &x.dev;
    let mut dx = dev.alloc(x.buf.len(), x.buf.dtype())?;
    let (cfg, blocks) = crn_launch(n);
    // Each block adds into its own row over its grid-stride iterations, so rows start at 0.
    let mut part = dev.zeros(blocks * n.c, DType::F32)?;
    let f = dev.func("conv", kernel_name("channel_rms_norm_bwd", x.buf.dtype()))?;
    let args = [n.c, n.s, n.batch * n.s].map(|v| v as i64);
    let scale = n.scale();
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf);
    lb.buf(&gamma.buf);
    lb.buf(&dy.buf);
    lb.buf_mut(&mut dx);
    lb.buf_mut(&mut part);
    lb.arg(&args[0]).arg(&args[1]).arg(&args[2]).arg(&n.eps).arg(&scale);
    // SAFETY: as in the forward for x, dy and dx; block b writes part[b·c + ch] with
    // b < blocks (the grid size) and ch < c.
    unsafe { lb.launch(cfg) }?;
    Ok((dx, part, blocks))
}

#[cfg(test)]
mod tests {
    use super::band_rows;
    use crate::desc::ConvGeom;

    /// A 3×3, stride-1, same-padded convolution of one image.
    fn geom(c_in: usize, h: usize, w: usize) -> ConvGeom {
        ConvGeom {
            batch: 1,
            c_in,
            h,
            w,
            c_out: 4,
            kh: 3,
            kw: 3,
            stride: 1,
            pad_top: 1,
            pad_left: 1,
            h_out: h,
            w_out: w,
        }
    }

    #[test]
    fn bands_start_aligned_when_they_can() {
        // 96 channels × 9 taps × 480 pixels per row: 161 rows fit 2^26 elements; bf16 rows
        // of 960 bytes start aligned every 4 rows.
        let g = geom(96, 480, 480);
        assert_eq!(g.rows_per_chunk(1 << 26), 161);
        assert_eq!(band_rows::<half::bf16>(&g, 1 << 26), 160);
        assert_eq!(band_rows::<f32>(&g, 1 << 26), 160, "1920-byte rows: every 2 rows");
        // One band for the whole image stays one band; fewer rows than a step stay as they are.
        assert_eq!(band_rows::<half::bf16>(&geom(4, 10, 480), 1 << 26), 10);
        assert_eq!(band_rows::<half::bf16>(&geom(96, 480, 480), 864 * 480 * 3), 3);
        // 120-pixel bf16 rows (240 bytes): every 16 rows.
        let g = geom(384, 120, 120);
        assert_eq!((g.rows_per_chunk(1 << 24), band_rows::<half::bf16>(&g, 1 << 24)), (40, 32));
    }
}
