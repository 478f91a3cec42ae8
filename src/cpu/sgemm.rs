//! Single-precision matrix product for the CPU reference:
//! `C = alpha·op(A)·op(B)` plus either a bias row (added to every row of C) or the
//! previous contents of C, with arbitrary element strides so that transposed operands
//! are read in place.
//!
//! On x86-64 CPUs with AVX-512F it runs the engine's own packed kernel; elsewhere it
//! calls the `matrixmultiply` crate.
//!
//! The AVX-512 path cuts C into one rectangle per thread (bands of rows × bands of
//! columns, the cut whose busiest task has least to do, counting its register tiles and
//! the floats it packs), so that one parallel hand-off covers the whole product. Each task packs its own columns of `op(B)`
//! into panels of [`NR`] columns and its own rows of `op(A)` into panels of [`MR`] rows,
//! [`KC`] deep at a time and zero-padded, so no packed data crosses between cores. A 12×32
//! register tile (24 accumulators) is updated by fused multiply-adds over the packed
//! panels; the bias, `alpha` and the previous C are applied when the tile is stored, with
//! masked stores at the edges. Packing reads contiguous runs with masked 16-lane copies and
//! transposes rows that are contiguous along the depth 16 × 16 at a time in registers.
//!
//! Determinism: element `(i, j)` is always computed by the same tile, at a position fixed
//! by `i` and `j` alone. Its sum runs over `k` in order, in blocks of [`KC`], and the
//! blocks are added to C in order. How the tiles are spread over the threads changes
//! nothing, so the result is bit-identical for any pool size.

// The packing helpers serve only the AVX-512 path.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use rayon::prelude::*;

/// Rows of the register tile (rows of `op(A)` per packed A panel).
pub const MR: usize = 12;
/// Columns of the register tile (columns of `op(B)` per packed B panel): two 16-lane
/// vectors.
pub const NR: usize = 32;
/// Depth of one pass over the packed panels: a B panel of `KC × NR` floats (32 KiB)
/// stays in the L1 cache while the A panels stream past it.
pub const KC: usize = 256;
/// A panels (of [`MR`] rows) packed at a time at most: 96 rows, a block of 96 KiB that
/// stays in the L2 cache while the B panels pass.
const A_BLOCK_PANELS: usize = 8;

/// A matrix operand read in place: element `(r, c)` is `data[r·rs + c·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    /// The storage the elements lie in.
    pub data: &'a [f32],
    /// Element stride between rows.
    pub rs: usize,
    /// Element stride between columns.
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Rows that start `stride` elements apart, their elements contiguous.
    pub fn rows(data: &'a [f32], stride: usize) -> Self {
        Mat { data, rs: stride, cs: 1 }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Mat { data: self.data, rs: self.cs, cs: self.rs }
    }

    /// True when a `rows × cols` matrix lies inside `data`.
    pub fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// What the product is added to.
#[derive(Clone, Copy, Debug)]
pub enum Init<'a> {
    /// C is overwritten (and not read): `C = alpha·AB`.
    Zero,
    /// `C = alpha·AB + bias` with `bias` (length `n`) added to every row.
    Bias(&'a [f32]),
    /// `C = alpha·AB + C`.
    Accumulate,
}

/// `C = alpha·op(A)·op(B)` combined with C as `init` says. `a` is `m × k`, `b` is
/// `k × n` and C is `m × n` stored in rows `ldc` apart inside `c`. With `parallel`,
/// a product large enough to pay for it is spread over the rayon pool.
///
/// # Panics
/// When an operand does not lie inside its slice or the bias is not `n` long: the callers
/// size every operand from their own validated descriptors, so this is a bug guard.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    init: Init,
    c: &mut [f32],
    ldc: usize,
    parallel: bool,
) {
    // SAFETY: `c` is an initialised slice of `c.len()` floats, borrowed uniquely.
    unsafe { sgemm_raw(m, k, n, alpha, a, b, init, SharedOut(c.as_mut_ptr()), c.len(), ldc, parallel) }
}

/// [`sgemm`] into memory that need not be initialised (a fresh output buffer): every
/// element of the `m × n` window is written, the rest of `c` is left alone.
///
/// # Panics
/// As [`sgemm`], and for [`Init::Accumulate`], which would read C.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_uninit(
    m: usize,
    k: usize,
    n: usize,
    a: Mat,
    b: Mat,
    init: Init,
    c: &mut [std::mem::MaybeUninit<f32>],
    ldc: usize,
    parallel: bool,
) {
    assert!(!matches!(init, Init::Accumulate), "sgemm_uninit: C is not initialised, it cannot be accumulated onto");
    // SAFETY: `c` is `c.len()` floats borrowed uniquely; with Zero or Bias no element of
    // C is read before it is written (the kernels store without loading, matrixmultiply
    // with beta 0 does not read C, and the bias is written before a beta-1 product).
    unsafe { sgemm_raw(m, k, n, 1.0, a, b, init, SharedOut(c.as_mut_ptr().cast()), c.len(), ldc, parallel) }
}

/// The body of [`sgemm`] and [`sgemm_uninit`].
///
/// # Safety
/// `c` must be valid for writes (and, with [`Init::Accumulate`], reads) of `c_len`
/// floats that nothing else accesses during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_raw(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    init: Init,
    c: SharedOut,
    c_len: usize,
    ldc: usize,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.holds(m, k) && b.holds(k, n) && (m - 1) * ldc + n <= c_len && n <= ldc,
        "sgemm: a {m}x{k}x{n} operand does not lie inside its slice"
    );
    if let Init::Bias(bias) = init {
        assert_eq!(bias.len(), n, "sgemm: bias length");
    }
    if k == 0 || matches!(init, Init::Bias(_)) && !use_packed() {
        // No product (or matrixmultiply's beta-1 product onto the bias): C starts as
        // its init.
        for i in 0..m {
            let row = c.get().add(i * ldc);
            match init {
                Init::Zero => std::ptr::write_bytes(row, 0, n),
                Init::Bias(bias) => std::ptr::copy_nonoverlapping(bias.as_ptr(), row, n),
                Init::Accumulate => {}
            }
        }
        if k == 0 {
            return;
        }
    }
    let threads = if parallel && m * n * k >= PARALLEL_MACS { rayon::current_num_threads() } else { 1 };
    let job = Job { m, k, n, alpha, a, b, init, out: c, ldc, threads };
    #[cfg(target_arch = "x86_64")]
    if use_packed() {
        packed(&job);
        return;
    }
    fallback(&job);
}

/// One checked product, as the two paths receive it.
struct Job<'a> {
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: Mat<'a>,
    b: Mat<'a>,
    init: Init<'a>,
    /// C, `m` rows `ldc` apart.
    out: SharedOut,
    ldc: usize,
    /// Threads to spread the product over (1: the calling thread only).
    threads: usize,
}

/// True when the packed AVX-512 kernel runs (the CPU has AVX-512F and the fallback is not
/// forced).
fn use_packed() -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return !force_fallback();
    }
    false
}

/// True when `SYNTHOS_CPU_GEMM=fallback` asks for the `matrixmultiply` path on a CPU that
/// has AVX-512 (to compare the two, and to test the fallback on such a machine).
fn force_fallback() -> bool {
    static FORCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCE.get_or_init(|| std::env::var("SYNTHOS_CPU_GEMM").is_ok_and(|v| v == "fallback"))
}

/// The `matrixmultiply` path. With several threads, the product is cut into bands of
/// rows (or of columns, for short wide outputs) run on the rayon pool; each element is
/// still computed by one call whose depth loop does not depend on the cut.
fn fallback(job: &Job) {
    let &Job { m, k, n, alpha, a, b, init, out, ldc, threads } = job;
    // A bias was already written into C (`sgemm_raw`), so the product adds onto it.
    let beta = if matches!(init, Init::Zero) { 0.0 } else { 1.0 };
    let band = |(r0, r1): (usize, usize), (c0, c1): (usize, usize)| {
        // SAFETY: `sgemm` checked that every element read (A, B) or written (C) lies
        // inside its slice; C is a unique borrow, so it aliases neither A nor B; bands
        // write disjoint parts of C.
        unsafe {
            matrixmultiply::sgemm(
                r1 - r0,
                k,
                c1 - c0,
                alpha,
                a.data.as_ptr().add(r0 * a.rs),
                a.rs as isize,
                a.cs as isize,
                b.data.as_ptr().add(c0 * b.cs),
                b.rs as isize,
                b.cs as isize,
                beta,
                out.get().add(r0 * ldc + c0),
                ldc as isize,
                1,
            );
        }
    };
    let split = |len: usize| -> Vec<(usize, usize)> {
        let pieces = (4 * threads).min(len / 64).max(1);
        let step = len.div_ceil(pieces);
        (0..len).step_by(step).map(|s| (s, (s + step).min(len))).collect()
    };
    if threads == 1 {
        band((0, m), (0, n));
    } else if m >= n {
        split(m).into_par_iter().for_each(|rows| band(rows, (0, n)));
    } else {
        split(n).into_par_iter().for_each(|cols| band((0, m), cols));
    }
}

/// Multiply-adds below which a product runs on the calling thread.
pub const PARALLEL_MACS: usize = 1 << 18;

/// The C pointer shared by the tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks sharing the pointer write disjoint elements (disjoint row or column
// ranges), and the owning `&mut` borrow outlives them.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Packing scratch of the tasks that run on this thread (A block, B block), reused
    /// from call to call.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// A 64-byte aligned window of `len` floats inside `buf`, which is grown as needed.
fn aligned(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len + 16 {
        buf.resize(len + 16, 0.0);
    }
    let start = align_start(buf);
    &mut buf[start..start + len]
}

/// Packs `lanes` lanes (rows of `op(A)` or columns of `op(B)`) over `depth` steps of
/// `k` into one panel of `depth × L` floats, lanes `valid..L` zero: lane `l` at depth
/// `p` is `data[base + l·ls + p·ps]` and goes to `dst[p·L + l]`.
///
/// # Safety
/// The CPU must have AVX-512F; every element named above for `l < valid` and
/// `p < depth` must lie inside `data`; `dst` must hold `depth·L` floats; `valid ≤ L` and
/// `L` a multiple of 4 no larger than 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_panel<const L: usize>(
    data: &[f32],
    base: usize,
    ls: usize,
    ps: usize,
    valid: usize,
    depth: usize,
    dst: &mut [f32],
) {
    let src = data.as_ptr().add(base);
    let out = dst.as_mut_ptr();
    if ls == 1 {
        // Each depth step is one contiguous run of lanes: masked 16-lane copies, which
        // also write the zero padding.
        use std::arch::x86_64::*;
        let lane_mask = |from: usize, to: usize| -> __mmask16 {
            let n = to.saturating_sub(from).min(16);
            if n == 16 {
                0xFFFF
            } else {
                ((1u32 << n) - 1) as __mmask16
            }
        };
        for g in (0..L).step_by(16) {
            let (load, store) = (lane_mask(g, valid), lane_mask(g, L));
            for p in 0..depth {
                let v = _mm512_maskz_loadu_ps(load, src.add(p * ps + g));
                _mm512_mask_storeu_ps(out.add(p * L + g), store, v);
            }
        }
        return;
    }
    let mut p0 = 0;
    if ps == 1 {
        // Each lane is contiguous along the depth: transpose 16 × 16 blocks in registers.
        while p0 + 16 <= depth {
            for g in (0..L).step_by(16) {
                let rows = valid.saturating_sub(g).min(16);
                let width = (L - g).min(16);
                transpose16(src.add(g * ls + p0), ls, rows, out.add(p0 * L + g), L, width);
            }
            p0 += 16;
        }
    }
    for p in p0..depth {
        let d = out.add(p * L);
        for l in 0..valid {
            *d.add(l) = *src.add(l * ls + p * ps);
        }
        for l in valid..L {
            *d.add(l) = 0.0;
        }
    }
}

/// Transposes a 16 × 16 block: row `r < rows` of the source is the 16 floats at
/// `src + r·rs` (rows from `rows` on read as zeros); column `c` of the block is written as
/// the first `width` floats at `dst + c·ds`.
///
/// # Safety
/// The CPU must have AVX-512F; the rows read and the `16` runs written must be valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(src: *const f32, rs: usize, rows: usize, dst: *mut f32, ds: usize, width: usize) {
    use std::arch::x86_64::*;
    // A fixed trip count keeps the sixteen rows in registers.
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, r) in r.iter_mut().enumerate() {
        if i < rows {
            *r = _mm512_loadu_ps(src.add(i * rs));
        }
    }
    // Interleave pairs of rows (32-bit), then pairs of pairs (64-bit), then 128-bit lanes
    // across groups of four and of eight rows.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in (0..16).step_by(2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for i in (0..16).step_by(4) {
        r[i] = _mm512_shuffle_ps::<0x44>(t[i], t[i + 2]);
        r[i + 1] = _mm512_shuffle_ps::<0xEE>(t[i], t[i + 2]);
        r[i + 2] = _mm512_shuffle_ps::<0x44>(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_shuffle_ps::<0xEE>(t[i + 1], t[i + 3]);
    }
    for h in [0, 8] {
        for i in 0..4 {
            t[h + i] = _mm512_shuffle_f32x4::<0x88>(r[h + i], r[h + i + 4]);
            t[h + i + 4] = _mm512_shuffle_f32x4::<0xDD>(r[h + i], r[h + i + 4]);
        }
    }
    for i in 0..8 {
        r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]);
        r[i + 8] = _mm512_shuffle_f32x4::<0xDD>(t[i], t[i + 8]);
    }
    let mask: __mmask16 = if width >= 16 { 0xFFFF } else { ((1u32 << width) - 1) as __mmask16 };
    for (c, v) in r.iter().enumerate() {
        _mm512_mask_storeu_ps(dst.add(c * ds), mask, *v);
    }
}

/// Output columns per packed B block at most: `KC × NC_MAX` floats (1 MiB) stay in the
/// L2 cache while the A blocks pass.
const NC_MAX: usize = 1024;

/// The packed AVX-512 product (see the module docs). The output is cut into one
/// rectangle per thread (bands of A panels × bands of B panels, see `cost`); each task
/// packs its own rows of A and columns of B, so no packed data crosses between cores.
#[cfg(target_arch = "x86_64")]
fn packed(job: &Job) {
    let &Job { m, k, n, threads, .. } = job;
    let (m_panels, n_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    // Cycles of the busiest task, roughly: 12 per depth step of a register tile (24 FMAs
    // at two a cycle) and about one per packed float (its rows of A and columns of B).
    let cost = |rb: usize, cb: usize| {
        let (pr, pc) = (m_panels.div_ceil(rb), n_panels.div_ceil(cb));
        k * (12 * pr * pc + pr * MR + pc * NR)
    };
    let (rb, cb) = (1..=threads)
        .filter(|rb| threads % rb == 0)
        .map(|rb| (rb.min(m_panels), (threads / rb).min(n_panels)))
        .min_by_key(|&(rb, cb)| cost(rb, cb))
        .unwrap_or((1, 1));
    let (per_r, per_c) = (m_panels.div_ceil(rb), n_panels.div_ceil(cb));
    let (rb, cb) = (m_panels.div_ceil(per_r), n_panels.div_ceil(per_c));
    let task = |t: usize| {
        let rows = ((t / cb) * per_r * MR, ((t / cb + 1) * per_r * MR).min(m));
        let cols = ((t % cb) * per_c * NR, ((t % cb + 1) * per_c * NR).min(n));
        let mut own = (Vec::new(), Vec::new());
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut bufs) => tile_block(job, rows, cols, &mut bufs),
            // A task that started inside another one on this thread (work stealing).
            Err(_) => tile_block(job, rows, cols, &mut own),
        });
    };
    if rb * cb > 1 {
        (0..rb * cb).into_par_iter().for_each(task);
    } else {
        task(0);
    }
}

/// Computes the output rows `rows` × columns `cols` (see [`packed`]) on this thread:
/// per depth block of [`KC`] and column block of at most [`NC_MAX`], packs the B block,
/// then for every block of at most [`A_BLOCK_PANELS`] A panels packs it and runs
/// the register tiles.
#[cfg(target_arch = "x86_64")]
fn tile_block(job: &Job, rows: (usize, usize), cols: (usize, usize), bufs: &mut (Vec<f32>, Vec<f32>)) {
    let &Job { k, alpha, a, b, init, out, ldc, .. } = job;
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        let (load_c, bias) = match init {
            _ if p0 > 0 => (true, None),
            Init::Zero => (false, None),
            Init::Accumulate => (true, None),
            Init::Bias(bias) => (false, Some(bias)),
        };
        for j0 in (cols.0..cols.1).step_by(NC_MAX) {
            let j1 = (j0 + NC_MAX).min(cols.1);
            let pb = aligned(&mut bufs.1, (j1 - j0).div_ceil(NR) * kc * NR);
            for (s, dst) in pb.chunks_exact_mut(kc * NR).enumerate() {
                let c0 = j0 + s * NR;
                // SAFETY: AVX-512F is present (checked by `sgemm`); lanes are columns
                // c0..min(c0 + NR, j1) of op(B) and depths p0..p0 + kc, inside `b`
                // (checked by `sgemm`); `dst` is one panel of kc·NR floats.
                unsafe { pack_panel::<NR>(b.data, c0 * b.cs + p0 * b.rs, b.cs, b.rs, NR.min(j1 - c0), kc, dst) }
            }
            for i0 in (rows.0..rows.1).step_by(A_BLOCK_PANELS * MR) {
                let i1 = (i0 + A_BLOCK_PANELS * MR).min(rows.1);
                let pa = aligned(&mut bufs.0, (i1 - i0).div_ceil(MR) * kc * MR);
                for (r, dst) in pa.chunks_exact_mut(kc * MR).enumerate() {
                    let r0 = i0 + r * MR;
                    // SAFETY: as for B, with rows r0..min(r0 + MR, i1) of op(A).
                    unsafe { pack_panel::<MR>(a.data, r0 * a.rs + p0 * a.cs, a.rs, a.cs, MR.min(i1 - r0), kc, dst) }
                }
                let pb = &bufs.1[align_start(&bufs.1)..];
                for (s, bp) in pb.chunks_exact(kc * NR).take((j1 - j0).div_ceil(NR)).enumerate() {
                    let c0 = j0 + s * NR;
                    let w = NR.min(j1 - c0);
                    let bias = bias.map_or(std::ptr::null(), |bias| bias[c0..].as_ptr());
                    let pa = &bufs.0[align_start(&bufs.0)..];
                    for (r, ap) in pa.chunks_exact(kc * MR).take((i1 - i0).div_ceil(MR)).enumerate() {
                        let r0 = i0 + r * MR;
                        // SAFETY: the CPU has AVX-512F; `ap` and `bp` hold kc depth steps
                        // of one panel each; the tile's rows r0..r0 + h and columns
                        // c0..c0 + w of C lie inside `c` (checked by `sgemm`), and no
                        // other task writes them (tasks own disjoint rectangles); `bias`,
                        // when set, holds w floats from column c0.
                        unsafe {
                            kernel_avx512(
                                kc,
                                ap.as_ptr(),
                                bp.as_ptr(),
                                out.get().add(r0 * ldc + c0),
                                ldc,
                                MR.min(i1 - r0),
                                w,
                                alpha,
                                load_c,
                                bias,
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Where [`aligned`] starts its window in `buf`: the first 64-byte boundary.
fn align_start(buf: &[f32]) -> usize {
    buf.as_ptr().align_offset(64).min(16)
}

/// One `MR × NR` tile: `C = alpha·Σ_p a_p b_pᵀ (+ C if load_c) (+ bias if non-null)` over
/// `kc` depth steps of the packed panels `a` (`kc × MR`) and `b` (`kc × NR`), storing only
/// the first `h` rows and `w` columns.
///
/// # Safety
/// The CPU must have AVX-512F; `a` and `b` must hold `kc·MR` and `kc·NR` floats; `c`
/// must be valid for reads and writes of `h` rows of `w` floats, `ldc` apart; `bias`,
/// when non-null, must hold `w` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx512(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    h: usize,
    w: usize,
    alpha: f32,
    load_c: bool,
    bias: *const f32,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for (i, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*a.add(i));
            acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    let mask = |lo: usize| -> __mmask16 {
        let cols = w.saturating_sub(lo).min(16);
        if cols == 16 {
            0xFFFF
        } else {
            ((1u32 << cols) - 1) as __mmask16
        }
    };
    let masks = [mask(0), mask(16)];
    let scale = _mm512_set1_ps(alpha);
    let bias_v = if bias.is_null() {
        None
    } else {
        Some([_mm512_maskz_loadu_ps(masks[0], bias), _mm512_maskz_loadu_ps(masks[1], bias.add(16))])
    };
    for (i, acc) in acc.iter().enumerate().take(h) {
        let row = c.add(i * ldc);
        for half in 0..2 {
            let dst = row.add(16 * half);
            let mut v = if alpha == 1.0 { acc[half] } else { _mm512_mul_ps(acc[half], scale) };
            if let Some(bias_v) = bias_v {
                v = _mm512_add_ps(v, bias_v[half]);
            }
            if load_c {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[half], dst));
            }
            _mm512_mask_storeu_ps(dst, masks[half], v);
        }
    }
}
