//! Data-parallel loops for the CPU ops, on the rayon pool, with results independent of
//! the number of threads: work is split into fixed chunks by element index, each output
//! element is computed by one closure call, and nothing is combined in completion order.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Elements per parallel chunk: below this, a loop runs on the calling thread (the
/// pool's hand-off costs more than the work).
pub const CHUNK: usize = 1 << 14;

/// A new vector of `len` elements filled in chunks of [`CHUNK`] spread over the pool:
/// `f` receives a chunk's first index and the chunk, and writes every element of it. The
/// buffer is not zeroed first (a fresh output is written once, not twice).
///
/// # Safety
/// `f` must write every element of each chunk it is handed (the vector is returned as
/// initialised). A panic in `f` is safe: nothing is returned then.
pub unsafe fn fill_new(len: usize, f: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync + Send) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    let spare = &mut out.spare_capacity_mut()[..len];
    if len <= CHUNK {
        run(0, spare, &f);
    } else {
        spare.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| run(c * CHUNK, chunk, &f));
    }
    // SAFETY: the caller's `f` wrote all `len` elements.
    unsafe { out.set_len(len) };
    out
}

/// Runs one chunk through [`avx2`].
#[inline(always)]
fn run<T, F: Fn(usize, &mut [T])>(i0: usize, out: &mut [T], f: &F) {
    avx2(|| f(i0, out))
}

/// Runs `f` compiled for AVX2 where the CPU has it (eight f32 lanes instead of SSE2's
/// four; `f` is inlined into an AVX2 function). FMA stays off, so both builds round
/// identically.
#[inline(always)]
pub fn avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { run_avx2(f) };
    }
    f()
}

/// [`avx2`]'s AVX2 body.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `f(x)` for every element of `x`.
pub fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    // SAFETY: every element of each chunk is written (the chunk is as long as the slice of
    // `x` it is zipped with, since the output has `x.len()` elements).
    unsafe { fill_new(x.len(), |i0, o| o.iter_mut().zip(&x[i0..]).for_each(|(o, &v)| *o = MaybeUninit::new(f(v)))) }
}

/// A copy of `x`, in chunks on the pool (a large copy is faster on several cores).
pub fn copied(x: &[f32]) -> Vec<f32> {
    map(x, |v| v)
}

/// `f(a, b)` for every pair of elements (`a` and `b` of one length).
pub fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    let n = a.len().min(b.len());
    // SAFETY: as in `map`: the output has `n` elements and both inputs at least `n`.
    unsafe {
        fill_new(n, |i0, o| {
            o.iter_mut().zip(a[i0..].iter().zip(&b[i0..])).for_each(|(o, (&x, &y))| *o = MaybeUninit::new(f(x, y)))
        })
    }
}

/// A row-major multi-index that steps through a shape one element at a time, carrying
/// the matching offsets into up to two broadcast operands (strides 0 along broadcast
/// dims): the div/mod of a flat index is paid once per chunk, not once per element.
pub struct Walker<'a> {
    shape: &'a [usize],
    strides: [&'a [usize]; 2],
    idx: Vec<usize>,
    /// The current offsets into the two operands.
    pub off: [usize; 2],
}

impl<'a> Walker<'a> {
    /// A walker over `shape` positioned at flat index `start`.
    pub fn new(shape: &'a [usize], strides: [&'a [usize]; 2], start: usize) -> Self {
        let mut idx = vec![0; shape.len()];
        let (mut rem, mut off) = (start, [0usize; 2]);
        for d in (0..shape.len()).rev() {
            let c = rem % shape[d].max(1);
            rem /= shape[d].max(1);
            idx[d] = c;
            off[0] += c * strides[0][d];
            off[1] += c * strides[1][d];
        }
        Walker { shape, strides, idx, off }
    }

    /// Moves to the next element.
    #[inline]
    pub fn step(&mut self) {
        for d in (0..self.shape.len()).rev() {
            self.idx[d] += 1;
            self.off[0] += self.strides[0][d];
            self.off[1] += self.strides[1][d];
            if self.idx[d] < self.shape[d] {
                return;
            }
            self.off[0] -= self.idx[d] * self.strides[0][d];
            self.off[1] -= self.idx[d] * self.strides[1][d];
            self.idx[d] = 0;
        }
    }
}

/// Defines a function whose body is compiled twice, for AVX2 and for the baseline, and
/// picks the AVX2 copy at run time where the CPU has it. Unlike [`avx2`] (which relies
/// on the compiler inlining a closure), the body is always inlined into both copies, so
/// large loop nests get the wider vectors too. FMA stays off, so both copies round
/// identically. Functions only (no generic parameters).
macro_rules! avx2_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            /// The AVX2 copy.
            ///
            /// # Safety
            /// The CPU must support AVX2.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn with_avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                return unsafe { with_avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
pub(crate) use avx2_fn;
