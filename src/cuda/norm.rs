//! Launchers of `kernels/norm.cu`: row normalisations forward and backward, and the
//! second stage of the parameter-gradient reduction.

use cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};

use super::{suffix, CudaBuf, CudaStorage, PushBuf};
use crate::desc::RowNorm;
use crate::{bail, DType, Result};

/// Threads per block at most (`NORM_MAX_THREADS`, the kernels' launch bound).
const MAX_THREADS: usize = 256;
/// Vectors per thread kept in registers by the forward (`FWD_CACHE`).
const FWD_CACHE: usize = 4;
/// Vectors per thread kept in registers by the backward (`BWD_CACHE`).
const BWD_CACHE: usize = 2;
/// Blocks that share the rows when parameter gradients are reduced: enough to fill
/// an H100 (132 SMs) a few times over while keeping the partial buffers small
/// (512·D floats each).
const PARAM_GRAD_BLOCKS: usize = 512;
/// Cap on the grid size of the row loops (the kernels stride over the rest).
const MAX_GRID: usize = 1 << 20;
/// Vectors per lane the one-warp-per-row forward keeps in registers (`WARP_CACHE`).
const WARP_CACHE: usize = 8;

/// Whether a row of `d` values in vectors of `vec` fits the warp kernels' register cache
/// (32 lanes × [`WARP_CACHE`] vectors).
fn fits_warp(d: usize, vec: usize) -> bool {
    d / vec <= 32 * WARP_CACHE
}
/// Rows (warps) per block of the one-warp-per-row kernels.
const WARP_ROWS: usize = 8;
/// Blocks the warp backward's parameter-gradient partials (`norm_param_grad_*`) aim for:
/// with 64 registers per thread (bf16; 54 for f32) four of its 256-thread blocks fit an
/// SM, 528 on an H100's 132, so 1024 blocks fill it about twice over, while the partial
/// buffers stay near 1024 blocks × 32·8 columns ≈ 1 MiB of f32 each for bf16 rows (half
/// for f32), against the rows·d·4 bytes of x and dy the kernel reads (77 MiB for the DiT's
/// 12480 × 1536 bf16).
const PARAM_GRAD_TARGET_BLOCKS: usize = 1024;
/// Fewest rows of a group one block of `norm_param_grad_*` covers: each of its 8 rows of
/// threads then has at least one batch of four rows' loads in flight.
const PARAM_GRAD_MIN_ROWS: usize = 32;
/// Rows of threads of a `norm_param_grad_*` block (`PGRAD_ROWS`).
const PARAM_GRAD_THREAD_ROWS: u32 = 8;

const NORM_VAR: &str = "SYNTHOS_CUDA_NORM";

/// Whether the norms run by warps instead of one block per row, on this thread: a
/// [`with_warp_forward`] override, else `SYNTHOS_CUDA_NORM=warp` (`block`, the default,
/// until a GPU run has shown it faster). With it the forward uses one warp per row
/// (`norm_fwd_warp_*`, shuffles only), and the backward computes `dx` with one warp per
/// row (`norm_bwd_dx_warp_*`) and the parameter gradients by a separate column reduction
/// (`norm_param_grad_*`). Rows longer than 32·8 vectors always take the block kernels, and
/// so does the backward of rows that are not a whole number of 16-byte vectors.
pub fn warp_forward() -> Result<bool> {
    Ok(super::choice::get(NORM_VAR, &["block", "warp"])? == 1)
}

/// Runs `f` with the warp norms (forward and backward, see [`warp_forward`]) on or off on
/// this thread (tests, bench).
pub fn with_warp_forward<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::choice::with(NORM_VAR, on as usize, f)
}

/// Elements per vector: 16 bytes of `dtype` when `d` is a multiple of that, else 1.
fn vec_width(dtype: DType, d: usize) -> usize {
    let v = match dtype {
        DType::F32 => 4,
        DType::BF16 => 8,
    };
    if d.is_multiple_of(v) {
        v
    } else {
        1
    }
}

/// Threads (a multiple of 32, at most [`MAX_THREADS`]) so that each thread holds at most
/// `cache` of the row's `nvec` vectors where the row fits.
fn threads_for(nvec: usize, cache: usize) -> u32 {
    (nvec.div_ceil(cache).div_ceil(32) * 32).clamp(32, MAX_THREADS) as u32
}

/// `norm_{fwd,fwd_warp,bwd,bwd_dx_warp,param_grad}_<tensor dtype>_<parameter dtype>_{v1,vec}`:
/// the norm kernels are templated on two element types and a vectorised (16-byte) or scalar
/// row walk (the warp backward's two kernels exist only with `vec`).
fn norm_kernel(dir: &str, t: DType, p: DType, vectorised: bool) -> &'static str {
    let walk = if vectorised { "vec" } else { "v1" };
    super::intern(&format!("norm_{dir}_{}_{}_{walk}", suffix(t), suffix(p)))
}

fn push_opt<'a>(lb: &mut LaunchArgs<'a>, buf: Option<&'a CudaBuf>) {
    match buf {
        Some(b) => lb.buf(b),
        None => lb.arg(&super::NULL_PTR),
    };
}

fn push_opt_mut<'a>(lb: &mut LaunchArgs<'a>, buf: Option<&'a mut CudaBuf>) {
    match buf {
        Some(b) => lb.buf_mut(b),
        None => lb.arg(&super::NULL_PTR),
    };
}

/// The kernels' parameter dtype: that of `w` and `b`, which must agree; with neither,
/// any (the activations' dtype).
fn param_dtype(t: DType, w: Option<&CudaStorage>, b: Option<&CudaStorage>) -> Result<DType> {
    match (w, b) {
        (Some(w), Some(b)) if w.buf.dtype() != b.buf.dtype() => {
            bail!("norm: weight and bias dtypes differ ({} vs {})", w.buf.dtype(), b.buf.dtype())
        }
        (Some(p), _) | (None, Some(p)) => Ok(p.buf.dtype()),
        (None, None) => Ok(t),
    }
}

/// The kernels index rows by `row / rows_per_group`, so groups must tile the rows.
fn check_spec(spec: &RowNorm) -> Result<()> {
    if spec.rows == 0 || spec.d == 0 || spec.rows_per_group == 0 || !spec.rows.is_multiple_of(spec.rows_per_group) {
        bail!("norm: bad launch shape {spec:?} (empty, or groups that do not tile the rows)");
    }
    if spec.d > i32::MAX as usize {
        bail!("norm: rows of {} elements exceed the kernels' 32-bit column index", spec.d);
    }
    Ok(())
}

fn check_stats(s: &CudaStorage, rows: usize) -> Result<()> {
    if s.buf.dtype() != DType::F32 || s.buf.len() < rows {
        bail!("norm: saved statistics must be {rows} f32 values, got {} {}", s.buf.len(), s.buf.dtype());
    }
    Ok(())
}

/// Checks that a buffer holds at least `n` elements (what the kernels will touch).
fn check_len(what: &str, s: Option<&CudaStorage>, n: usize) -> Result<()> {
    match s {
        Some(s) if s.buf.len() < n => {
            bail!("norm: {what} holds {} elements, {n} needed", s.buf.len())
        }
        _ => Ok(()),
    }
}

/// Forward of `spec` on `x` with optional parameters `w` (multiplicative) and `b`
/// (additive), `[groups, d]` each. Returns the output (in `x`'s dtype) and, when
/// `keep_stats`, each row's mean and rstd (f32) for the backward.
pub fn forward(
    x: &CudaStorage,
    w: Option<&CudaStorage>,
    b: Option<&CudaStorage>,
    spec: &RowNorm,
    keep_stats: bool,
) -> Result<(CudaBuf, Option<(CudaBuf, CudaBuf)>)> {
    check_spec(spec)?;
    let dev = &x.dev;
    let t = x.buf.dtype();
    let p = param_dtype(t, w, b)?;
    check_len("x", Some(x), spec.rows * spec.d)?;
    check_len("weight", w, spec.groups() * spec.d)?;
    check_len("bias", b, spec.groups() * spec.d)?;
    let vec = vec_width(t, spec.d);
    let warp = fits_warp(spec.d, vec) && warp_forward()?;
    let f = dev.func("norm", norm_kernel(if warp { "fwd_warp" } else { "fwd" }, t, p, vec > 1))?;
    let mut y = dev.alloc(spec.rows * spec.d, t)?;
    let mut stats =
        if keep_stats { Some((dev.alloc(spec.rows, DType::F32)?, dev.alloc(spec.rows, DType::F32)?)) } else { None };
    let cfg = if warp {
        warp_rows_config(spec.rows)
    } else {
        LaunchConfig {
            grid_dim: (spec.rows.min(MAX_GRID) as u32, 1, 1),
            block_dim: (threads_for(spec.d / vec, FWD_CACHE), 1, 1),
            shared_mem_bytes: 0,
        }
    };
    let (rows, d, rpg, rms) = (spec.rows as i64, spec.d as i32, spec.rows_per_group as i64, spec.rms as i32);
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf);
    lb.buf_mut(&mut y);
    push_opt(&mut lb, w.map(|s| &s.buf));
    push_opt(&mut lb, b.map(|s| &s.buf));
    match &mut stats {
        Some((m, r)) => {
            lb.buf_mut(m);
            lb.buf_mut(r);
        }
        None => {
            lb.arg(&super::NULL_PTR).arg(&super::NULL_PTR);
        }
    }
    lb.arg(&rows).arg(&d).arg(&rpg).arg(&spec.w_offset).arg(&spec.eps).arg(&rms);
    // SAFETY: x and y hold rows·d elements of their dtypes; w and b (when present) hold
    // groups·d elements of `p` and are read at row/rows_per_group < groups; mean and rstd
    // hold `rows` f32 values. With a vector width > 1, d is a multiple of it, so every
    // vector access is 16-byte aligned (allocations are 256-byte aligned).
    unsafe { lb.launch(cfg) }?;
    Ok((y, stats))
}

/// Whether [`forward_rope`] takes `x` (dtype `t`, rows of `d`) with an RMSNorm weight of
/// dtype `p` and heads of `head_dim`: with the one-warp-per-row forward switched on
/// ([`warp_forward`]), rows in 16-byte vectors that fit its register cache, heads a whole
/// number of vectors, and a kernel for the dtype pair.
pub fn rope_fusable(t: DType, p: DType, d: usize, head_dim: usize) -> Result<bool> {
    Ok(rope_kernel_takes(t, p, d, head_dim) && warp_forward()?)
}

/// The shapes and dtypes `norm_rope_fwd_warp_*` handles (see [`rope_fusable`]).
fn rope_kernel_takes(t: DType, p: DType, d: usize, head_dim: usize) -> bool {
    let vec = vec_width(t, d);
    let pair = matches!((t, p), (DType::F32, DType::F32) | (DType::BF16, _));
    vec > 1 && head_dim > 0 && head_dim.is_multiple_of(vec) && fits_warp(d, vec) && pair
}

/// The launch of the one-warp-per-row kernels: blocks of [`WARP_ROWS`] warps, one row each.
fn warp_rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(WARP_ROWS).clamp(1, MAX_GRID) as u32, 1, 1),
        block_dim: (32 * WARP_ROWS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The split of the warp backward's parameter gradients over the `rows_per_group` rows
/// of each of `groups` groups, for rows of `nvec` 16-byte vectors: `(splits, chunk)`, block
/// (tile, s, g) of `norm_param_grad_*` summing rows [s·chunk, (s+1)·chunk) of group g, with
/// every split non-empty (the last may be short). Depends only on the sizes, so results are
/// reproducible run to run.
fn param_grad_splits(groups: usize, rows_per_group: usize, nvec: usize) -> (usize, usize) {
    let base = groups * nvec.div_ceil(32);
    let splits = PARAM_GRAD_TARGET_BLOCKS.div_ceil(base).clamp(1, rows_per_group.div_ceil(PARAM_GRAD_MIN_ROWS));
    let chunk = rows_per_group.div_ceil(splits);
    (rows_per_group.div_ceil(chunk), chunk)
}

/// RMSNorm (weight `w`, no bias) followed by RoPE in one pass, for rows that are tokens
/// `row % tokens` of a `[B, N, H·head_dim]` tensor, with `cos`/`sin` `[N, head_dim/2]` f32
/// (the `rope` kernel's table). Returns the output and each row's mean (0) and rstd for
/// the backward. Shapes or dtypes the kernel does not take are an error.
pub fn forward_rope(
    x: &CudaStorage,
    w: &CudaStorage,
    cos: &CudaStorage,
    sin: &CudaStorage,
    spec: &RowNorm,
    tokens: usize,
    head_dim: usize,
) -> Result<(CudaBuf, (CudaBuf, CudaBuf))> {
    check_spec(spec)?;
    let dev = &x.dev;
    let (t, p) = (x.buf.dtype(), w.buf.dtype());
    if !spec.rms || spec.rows_per_group != spec.rows || spec.w_offset != 0.0 {
        bail!("norm_rope: only an RMSNorm with one weight row fuses with RoPE, got {spec:?}");
    }
    if tokens == 0
        || !spec.rows.is_multiple_of(tokens)
        || !spec.d.is_multiple_of(head_dim)
        || !head_dim.is_multiple_of(2)
    {
        bail!(
            "norm_rope: {} rows of {} do not split into tokens of {tokens} and heads of {head_dim}",
            spec.rows,
            spec.d
        );
    }
    check_len("x", Some(x), spec.rows * spec.d)?;
    check_len("weight", Some(w), spec.d)?;
    check_len("cos", Some(cos), tokens * head_dim / 2)?;
    check_len("sin", Some(sin), tokens * head_dim / 2)?;
    if cos.buf.dtype() != DType::F32 || sin.buf.dtype() != DType::F32 {
        bail!("norm_rope: the angle table must be f32");
    }
    if !rope_kernel_takes(t, p, spec.d, head_dim) {
        bail!("norm_rope: no fused kernel for rows of {} {t} with {p} weights and heads of {head_dim}", spec.d);
    }
    let f = dev.func("norm", super::intern(&format!("norm_rope_fwd_warp_{}_{}_vec", suffix(t), suffix(p))))?;
    let mut y = dev.alloc(spec.rows * spec.d, t)?;
    let (mut mean, mut rstd) = (dev.alloc(spec.rows, DType::F32)?, dev.alloc(spec.rows, DType::F32)?);
    let cfg = warp_rows_config(spec.rows);
    let (rows, d, tokens64, hd) = (spec.rows as i64, spec.d as i32, tokens as i64, head_dim as i32);
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf).buf_mut(&mut y).buf(&w.buf).buf_mut(&mut mean).buf_mut(&mut rstd);
    lb.arg(&rows).arg(&d).arg(&spec.eps).buf(&cos.buf).buf(&sin.buf).arg(&tokens64).arg(&hd);
    // SAFETY: x and y hold rows·d elements, w d; row r reads table row r % tokens of
    // head_dim/2 values (tokens rows checked); mean and rstd hold `rows` values; vector
    // accesses are aligned as in `forward` (d and head_dim are multiples of the width).
    unsafe { lb.launch(cfg) }?;
    Ok((y, (mean, rstd)))
}

/// Gradients computed by [`backward`]; `None` where not asked for.
pub struct NormGrads {
    /// Gradient of the input, in its dtype.
    pub dx: Option<CudaBuf>,
    /// Gradient of the multiplicative parameter, `[groups, d]`.
    pub dw: Option<CudaBuf>,
    /// Gradient of the additive parameter, `[groups, d]`.
    pub db: Option<CudaBuf>,
}

/// What [`backward`] computes: the input gradient, and the parameter gradients in the
/// given dtypes.
#[derive(Clone, Copy, Debug)]
pub struct Wanted {
    /// Compute `dx`.
    pub dx: bool,
    /// Compute `dw` in this dtype.
    pub dw: Option<DType>,
    /// Compute `db` in this dtype.
    pub db: Option<DType>,
}

/// Backward of `spec`: `dy` has `x`'s dtype; `mean`/`rstd` are the forward's statistics.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &CudaStorage,
    dy: &CudaStorage,
    w: Option<&CudaStorage>,
    mean: &CudaStorage,
    rstd: &CudaStorage,
    spec: &RowNorm,
    want: Wanted,
) -> Result<NormGrads> {
    check_spec(spec)?;
    let dev = &x.dev;
    let t = x.buf.dtype();
    if dy.buf.dtype() != t {
        bail!("norm backward: gradient dtype {} differs from the input's {t}", dy.buf.dtype());
    }
    check_stats(mean, spec.rows)?;
    check_stats(rstd, spec.rows)?;
    check_len("x", Some(x), spec.rows * spec.d)?;
    check_len("dy", Some(dy), spec.rows * spec.d)?;
    check_len("weight", w, spec.groups() * spec.d)?;
    let p = param_dtype(t, w, None)?;
    let groups = spec.groups();
    if groups > 65535 {
        bail!("norm backward: {groups} parameter groups exceed the grid limit of 65535");
    }
    let params = want.dw.is_some() || want.db.is_some();
    let rpg = spec.rows_per_group;
    let vec = vec_width(t, spec.d);
    if vec > 1 && fits_warp(spec.d, vec) && warp_forward()? {
        return backward_warp(x, dy, w, mean, rstd, spec, want, (t, p));
    }
    let nblk = if params { PARAM_GRAD_BLOCKS.div_ceil(groups).clamp(1, rpg) } else { rpg.min(MAX_GRID) };
    let n_part = groups * nblk * spec.d;
    let mut dx = if want.dx { Some(dev.alloc(spec.rows * spec.d, t)?) } else { None };
    let mut part_w = if want.dw.is_some() { Some(dev.alloc(n_part, DType::F32)?) } else { None };
    let mut part_b = if want.db.is_some() { Some(dev.alloc(n_part, DType::F32)?) } else { None };

    if want.dx || params {
        let f = dev.func("norm", norm_kernel("bwd", t, p, vec > 1))?;
        let cfg = LaunchConfig {
            grid_dim: (nblk as u32, groups as u32, 1),
            block_dim: (threads_for(spec.d / vec, BWD_CACHE), 1, 1),
            shared_mem_bytes: 0,
        };
        let (rpg64, d, rms) = (rpg as i64, spec.d as i32, spec.rms as i32);
        let mut lb = dev.stream.launch_builder(&f);
        lb.buf(&x.buf);
        lb.buf(&dy.buf);
        push_opt(&mut lb, w.map(|s| &s.buf));
        lb.buf(&mean.buf);
        lb.buf(&rstd.buf);
        push_opt_mut(&mut lb, dx.as_mut());
        push_opt_mut(&mut lb, part_w.as_mut());
        push_opt_mut(&mut lb, part_b.as_mut());
        lb.arg(&rpg64).arg(&d).arg(&spec.w_offset).arg(&rms);
        // SAFETY: block (j, g) reads rows g·rows_per_group + j + k·nblk < rows of x and dy
        // (rows·d elements each) and of mean/rstd (rows values), parameter row g < groups
        // of w, and writes those rows of dx and its own partial rows (g·nblk + j)·d of
        // the partial buffers (groups·nblk·d floats). Vector accesses are aligned as in
        // the forward.
        unsafe { lb.launch(cfg) }?;
    }

    // The partial rows of each group, [groups, nblk, d], summed over the blocks.
    let dw = finish_partials(dev, part_w, want.dw, groups, nblk, spec.d)?;
    let db = finish_partials(dev, part_b, want.db, groups, nblk, spec.d)?;
    Ok(NormGrads { dx, dw, db })
}

/// A parameter gradient from its partial rows `[groups, parts, d]` (f32), summed over the
/// parts in a fixed order (`col_finish`) into `dtype`; `None` where it is not wanted.
fn finish_partials(
    dev: &super::CudaDevice,
    part: Option<CudaBuf>,
    dtype: Option<DType>,
    groups: usize,
    parts: usize,
    d: usize,
) -> Result<Option<CudaBuf>> {
    let (Some(part), Some(dtype)) = (part, dtype) else {
        return Ok(None);
    };
    super::reduce::col_finish(dev, &part, groups, parts, d, 1.0, dtype).map(Some)
}

/// [`backward`] with `SYNTHOS_CUDA_NORM=warp`, for rows of at most 32·[`WARP_CACHE`]
/// 16-byte vectors (checked by the caller, as the spec, dtypes and lengths are): `dx` by
/// `norm_bwd_dx_warp_*` (one warp per row), the parameter gradients by
/// `norm_param_grad_*` (partial rows of a fixed split, [`param_grad_splits`]) finished by
/// `col_finish`. Each kernel runs only where its results are wanted.
#[allow(clippy::too_many_arguments)]
fn backward_warp(
    x: &CudaStorage,
    dy: &CudaStorage,
    w: Option<&CudaStorage>,
    mean: &CudaStorage,
    rstd: &CudaStorage,
    spec: &RowNorm,
    want: Wanted,
    (t, p): (DType, DType),
) -> Result<NormGrads> {
    let dev = &x.dev;
    let (groups, rpg) = (spec.groups(), spec.rows_per_group);
    let (rows64, d, rpg64, rms) = (spec.rows as i64, spec.d as i32, rpg as i64, spec.rms as i32);
    let mut dx = None;
    if want.dx {
        let mut out = dev.alloc(spec.rows * spec.d, t)?;
        let f = dev.func("norm", norm_kernel("bwd_dx_warp", t, p, true))?;
        let mut lb = dev.stream.launch_builder(&f);
        lb.buf(&x.buf).buf(&dy.buf);
        push_opt(&mut lb, w.map(|s| &s.buf));
        lb.buf(&mean.buf).buf(&rstd.buf).buf_mut(&mut out);
        lb.arg(&rows64).arg(&d).arg(&rpg64).arg(&spec.w_offset).arg(&rms);
        // SAFETY: warp k of the grid reads rows k, k + warps, ... < rows of x and dy (rows·d
        // elements each) and of mean/rstd (rows values), parameter row row/rows_per_group <
        // groups of w, and writes those rows of dx. d is a multiple of the vector width, so
        // every 16-byte access is aligned (allocations are 256-byte aligned).
        unsafe { lb.launch(warp_rows_config(spec.rows)) }?;
        dx = Some(out);
    }
    if want.dw.is_none() && want.db.is_none() {
        return Ok(NormGrads { dx, dw: None, db: None });
    }

    let vec = vec_width(t, spec.d);
    let (splits, chunk) = param_grad_splits(groups, rpg, spec.d / vec);
    let n_part = groups * splits * spec.d;
    let mut part_w = if want.dw.is_some() { Some(dev.alloc(n_part, DType::F32)?) } else { None };
    let mut part_b = if want.db.is_some() { Some(dev.alloc(n_part, DType::F32)?) } else { None };
    let f = dev.func("norm", norm_kernel("param_grad", t, p, true))?;
    let cfg = LaunchConfig {
        grid_dim: ((spec.d / vec).div_ceil(32) as u32, splits as u32, groups as u32),
        block_dim: (32, PARAM_GRAD_THREAD_ROWS, 1),
        shared_mem_bytes: 0,
    };
    let (splits64, chunk64) = (splits as i64, chunk as i64);
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&x.buf).buf(&dy.buf).buf(&mean.buf).buf(&rstd.buf);
    push_opt_mut(&mut lb, part_w.as_mut());
    push_opt_mut(&mut lb, part_b.as_mut());
    lb.arg(&rpg64).arg(&d).arg(&splits64).arg(&chunk64);
    // SAFETY: block (tile, s, g) reads the 16-byte vectors of columns below d of rows
    // g·rows_per_group + [s·chunk, min((s+1)·chunk, rows_per_group)) of x and dy (inside
    // rows·d elements; aligned as above) and those rows of mean/rstd, and writes
    // part[(g·splits + s)·d + c] for c < d, inside the groups·splits·d floats (splits ≤
    // 1024 and groups ≤ 65535 fit the grid's y and z).
    unsafe { lb.launch(cfg) }?;

    // The partial rows of each group, [groups, splits, d], summed over the splits.
    let dw = finish_partials(dev, part_w, want.dw, groups, splits, spec.d)?;
    let db = finish_partials(dev, part_b, want.db, groups, splits, spec.d)?;
    Ok(NormGrads { dx, dw, db })
}
