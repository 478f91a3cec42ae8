//! Launchers of `kernels/shape.cu`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{grid_1d, kernel_name, CudaBuf, CudaStorage, PushBuf};
use crate::desc::{self, Slab};
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

/// A tiled transpose with a batch; mirrors `struct TransposeDesc` in `shape.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct TransposeDesc {
    batch_rank: i32,
    batch_shape: [i64; 4],
    batch_in: [i64; 4],
    batch_out: [i64; 4],
    len_a: i64,
    len_b: i64,
    in_stride_b: i64,
    out_stride_a: i64,
    batches: i64,
}

// SAFETY: plain-old-data with the same C layout as the kernel-side struct.
unsafe impl cudarc::driver::DeviceRepr for TransposeDesc {}

/// Bytes per word of the 16-byte kernels.
const WORD: usize = 16;
/// Tile edge and block shape of `transpose_tiles` (`TT` in `shape.cu`).
const TILE: usize = 32;
/// The most blocks along a grid's y dimension (the kernels loop beyond it).
const MAX_GRID_Y: usize = 65_535;

/// Output dimension `d` walks input dimension `perm[d]` (rank ≤ 6). The permutation is
/// first simplified ([`desc::simplify_permutation`]); then rows that stay whole move as
/// 16-byte words, a moved last dimension goes through shared-memory tiles, and anything
/// else through the element-wise kernel (see `kernels/shape.cu`).
pub fn permute(x: &CudaStorage, shape: &[usize], perm: &[usize]) -> Result<CudaBuf> {
    if shape.len() > 6 || perm.len() != shape.len() {
        bail!("permute: unsupported shape {shape:?} / permutation {perm:?} (rank at most 6)");
    }
    let n: usize = shape.iter().product();
    let dev = &x.dev;
    let dtype = x.buf.dtype();
    if x.buf.len() < n {
        bail!("permute: a buffer of {} elements is too small for shape {shape:?}", x.buf.len());
    }
    let mut out = dev.alloc(n, dtype)?;
    if n == 0 {
        return Ok(out);
    }
    let (shape, perm) = desc::simplify_permutation(shape, perm);
    let rank = shape.len();
    let st = desc::strides(&shape);
    if rank <= 1 {
        // The identity: one contiguous copy.
        let run = [n, n, 0, n, 0, 1];
        launch_slab(dev, &x.buf, &mut out, dtype, run)?;
        return Ok(out);
    }
    let last = shape[rank - 1];
    if perm[rank - 1] == rank - 1 && (last * dtype.size()).is_multiple_of(WORD) {
        // Whole rows of `words` words: the row index walks the leading dimensions.
        let words = last * dtype.size() / WORD;
        let mut d = PermuteDesc { rank: rank as i32 - 1, ..Default::default() };
        for k in 0..rank - 1 {
            d.out_shape[k] = shape[perm[k]] as i64;
            d.src_stride[k] = (st[perm[k]] / last * words) as i64;
        }
        let (words64, total) = (words as i64, (n / last * words) as i64);
        let f = dev.func("shape", "permute_rows16")?;
        let mut lb = dev.stream.launch_builder(&f);
        lb.buf(&x.buf).buf_mut(&mut out).arg(&d).arg(&words64).arg(&total);
        // SAFETY: output word i = r·words + w reads input word Σ c_k·stride_k + w with
        // c_k < shape[perm[k]]: below n·size/16, the buffer's words (CudaSlice allocations
        // are at least 256-byte aligned, so the words are aligned).
        unsafe { lb.launch(grid_1d(total as usize, 256)) }?;
        return Ok(out);
    }
    if perm[rank - 1] != rank - 1 {
        // The input's last dimension a moves to output position q; b = perm[rank-1] becomes
        // the output's last.
        let ost = desc::strides(&perm.iter().map(|&p| shape[p]).collect::<Vec<_>>());
        let q = perm.iter().position(|&p| p == rank - 1).unwrap_or(0);
        let b = perm[rank - 1];
        let mut d = TransposeDesc {
            len_a: last as i64,
            len_b: shape[b] as i64,
            in_stride_b: st[b] as i64,
            out_stride_a: ost[q] as i64,
            batches: 1,
            ..Default::default()
        };
        for (k, &p) in perm.iter().enumerate().filter(|&(k, _)| k != q && k != rank - 1) {
            let i = d.batch_rank as usize;
            d.batch_shape[i] = shape[p] as i64;
            d.batch_in[i] = st[p] as i64;
            d.batch_out[i] = ost[k] as i64;
            d.batch_rank += 1;
            d.batches *= shape[p] as i64;
        }
        let tiles = last.div_ceil(TILE) * shape[b].div_ceil(TILE);
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, (d.batches as usize).min(MAX_GRID_Y) as u32, 1),
            block_dim: (TILE as u32, 8, 1),
            shared_mem_bytes: 0,
        };
        let f = dev.func("shape", kernel_name("transpose_tiles", dtype))?;
        let mut lb = dev.stream.launch_builder(&f);
        lb.buf(&x.buf).buf_mut(&mut out).arg(&d);
        // SAFETY: every (batch, a, b) with a < len_a, b < len_b reads input
        // Σ c·batch_in + b·in_stride_b + a and writes output Σ c·batch_out + a·out_stride_a
        // + b, both below n (row-major strides of the simplified shapes).
        unsafe { lb.launch(cfg) }?;
        return Ok(out);
    }
    let mut d = PermuteDesc { rank: rank as i32, ..Default::default() };
    for (k, &p) in perm.iter().enumerate() {
        d.out_shape[k] = shape[p] as i64;
        d.src_stride[k] = st[p] as i64;
    }
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
    if src.buf.dtype() != dst.dtype() {
        bail!("slab copy: dtype mismatch");
    }
    if s.outer * s.len * s.inner == 0 {
        return Ok(());
    }
    let run =
        [s.len * s.inner, s.src_dim * s.inner, s.src_off * s.inner, s.dst_dim * s.inner, s.dst_off * s.inner, s.outer];
    launch_slab(&src.dev, &src.buf, dst, src.buf.dtype(), run)
}

/// Launches the slab kernel for `outer` runs, `[run, src_stride, src_base, dst_stride,
/// dst_base, outer]` in elements (checked in range by the caller): in 16-byte words when
/// all of them but `outer` are whole words.
fn launch_slab(
    dev: &super::CudaDevice,
    src: &CudaBuf,
    dst: &mut CudaBuf,
    dtype: crate::DType,
    run: [usize; 6],
) -> Result<()> {
    let per_word = WORD / dtype.size();
    let words = run[..5].iter().all(|v| v % per_word == 0);
    let (name, args) = if words {
        let mut a = run;
        a[..5].iter_mut().for_each(|v| *v /= per_word);
        ("slab_copy16", a)
    } else {
        (kernel_name("slab_copy", dtype), run)
    };
    let f = dev.func("shape", name)?;
    let args = args.map(|v| v as i64);
    let mut cfg = grid_1d(args[0] as usize, 256);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(1 << 16);
    cfg.grid_dim.1 = (args[5] as usize).min(MAX_GRID_Y) as u32;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(src).buf_mut(dst);
    for a in &args {
        lb.arg(a);
    }
    // SAFETY: the caller checked that every run lies inside both buffers: o·stride + base +
    // run ≤ outer·stride for o < outer; in words the same holds divided by the word size
    // (allocations are at least 256-byte aligned).
    unsafe { lb.launch(cfg) }?;
    Ok(())
}

/// Rows of `table` (`[rows, d]`) picked by the first `n` values of `ix`, exact integers in
/// f32 (the layout of `ops::RowIndices`), as `[n, d]`. The index tensor was checked when
/// it was made; an index outside the table reads zeros.
pub fn gather_rows(table: &CudaStorage, ix: &CudaStorage, n: usize, rows: usize, d: usize) -> Result<CudaBuf> {
    let dev = &table.dev;
    let dtype = table.buf.dtype();
    let ix = f32_indices(ix, n)?;
    if table.buf.len() < rows * d {
        bail!("gather_rows: a table of {} elements is not {rows} rows of {d}", table.buf.len());
    }
    let mut out = dev.alloc(n * d, dtype)?;
    if n * d == 0 {
        return Ok(out);
    }
    let (d64, n64, rows64) = (d as i64, (n * d) as i64, rows as i64);
    let f = dev.func("shape", kernel_name("gather_rows", dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    let ids = ix.slice(0..n);
    lb.buf(&table.buf).arg(&ids).buf_mut(&mut out).arg(&d64).arg(&n64).arg(&rows64);
    // SAFETY: output element i reads ids[i / d] (i < n·d) and, when that index is inside
    // [0, rows), table element index·d + i % d < rows·d ≤ the table's length.
    unsafe { lb.launch(grid_1d(n * d, 256)) }?;
    Ok(out)
}

/// The gradient of [`gather_rows`]: `dtable[r] = Σ_{i: ids[i] = r} g[i]` for a table
/// of `rows` rows of `d`, from the CSR that `ops::RowIndices` holds after its `n` ids
/// (positions, table rows padded to `n` groups with −1, starts padded with `n`). One
/// launch shape for any ids (a recorded step replays it); each row's gradients are summed
/// in fp32 in increasing position, without atomics: bit-identical from run to run.
pub fn scatter_rows(g: &CudaStorage, ix: &CudaStorage, n: usize, rows: usize, d: usize) -> Result<CudaBuf> {
    let dev = &g.dev;
    let dtype = g.buf.dtype();
    let ix = f32_indices(ix, n)?;
    if g.buf.len() < n * d {
        bail!("scatter_rows: a gradient of {} elements is not {n} rows of {d}", g.buf.len());
    }
    let mut out = dev.zeros(rows * d, dtype)?;
    if n * d == 0 {
        return Ok(out);
    }
    let (d64, m64, rows64, n64) = (d as i64, (n * d) as i64, rows as i64, n as i64);
    let (pos, uniq, start) = (ix.slice(n..2 * n), ix.slice(2 * n..3 * n), ix.slice(3 * n..4 * n + 1));
    let f = dev.func("shape", kernel_name("scatter_rows", dtype))?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&g.buf).arg(&uniq).arg(&start).arg(&pos).buf_mut(&mut out);
    lb.arg(&d64).arg(&m64).arg(&rows64).arg(&n64);
    // SAFETY: thread (u, c), u < n, reads uniq[u], start[u], start[u + 1] (≤ n + 1 values),
    // pos[k] for k clamped to [0, n), g rows pos[k] only inside [0, n) (g holds n rows,
    // checked above), and writes row uniq[u] only inside [0, rows) of the output.
    unsafe { lb.launch(grid_1d(n * d, 256)) }?;
    Ok(out)
}

/// The f32 buffer of an index tensor laid out as `ops::RowIndices` (4n + 1 values).
fn f32_indices(ix: &CudaStorage, n: usize) -> Result<&CudaSlice<f32>> {
    match &ix.buf {
        CudaBuf::F32(s) if s.len() > 4 * n => Ok(s),
        b => bail!("row indices: {} {} values, not the {} f32 values of {n} indices", b.len(), b.dtype(), 4 * n + 1),
    }
}
