//! A small deterministic random number generator (SplitMix64 seeding a xoshiro256++
//! stream) so that every random draw in the engine is reproducible for a seed, on any
//! machine, without a dependency.

/// Deterministic pseudo-random generator.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
    spare_normal: Option<f64>,
}

/// Vectors of at least this many draws are turned into values on the thread pool.
const PARALLEL_DRAWS: usize = 1 << 16;

/// Raw draws taken at a time for a long vector (even, for the normal pairs).
const DRAW_CHUNK: usize = 1 << 20;

/// A raw draw as a uniform value in [0, 1) (its top 53 bits).
fn unit(r: u64) -> f64 {
    (r >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Two standard normal values from two raw draws (Box–Muller: u1 = 1 − unit(a) in (0, 1],
/// u2 = unit(b)): (r·cos, r·sin).
fn box_muller(a: u64, b: u64) -> (f64, f64) {
    let (u1, u2) = (1.0 - unit(a), unit(b));
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
    (r * c, r * s)
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator for this seed.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        Rng { s: [splitmix(&mut x), splitmix(&mut x), splitmix(&mut x), splitmix(&mut x)], spare_normal: None }
    }

    /// A generator for one stream among many, for example one sample of one epoch:
    /// `seed` mixed with each of `keys` in turn through SplitMix64 (`h ← mix(h ⊕ mix(k))`,
    /// a bijection in `h` for every key and in the key for every `h`). The same
    /// `(seed, keys)` give the same stream whatever thread asks, and in whatever order, so
    /// per-sample draws do not depend on how work is scheduled.
    pub fn derive(seed: u64, keys: &[u64]) -> Self {
        let mut h = seed;
        for &k in keys {
            let mut kx = k;
            let mut hx = h ^ splitmix(&mut kx);
            h = splitmix(&mut hx);
        }
        Rng::new(h)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// Uniform integer in [0, n). `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let (a, b) = (self.next_u64(), self.next_u64());
        let (c, s) = box_muller(a, b);
        self.spare_normal = Some(s);
        c
    }

    /// A vector of `n` standard normal draws scaled by `std`: the values of `n` calls of
    /// [`Rng::normal`], each as `f32` times `std`. Long vectors take the generator's raw
    /// draws in order and turn them into values on the thread pool (the same values).
    pub fn normal_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        if n < PARALLEL_DRAWS {
            return (0..n).map(|_| self.normal() as f32 * std).collect();
        }
        let mut out = vec![0f32; n];
        self.fill_normal(&mut out, std, DRAW_CHUNK);
        out
    }

    /// A vector of `n` uniform draws in [lo, hi): the values of `n` calls of
    /// [`Rng::uniform`], each as `lo + (hi − lo)·u` in `f32`. Long vectors are made as in
    /// [`Rng::normal_vec`] (the same values).
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        if n < PARALLEL_DRAWS {
            return (0..n).map(|_| lo + (hi - lo) * self.uniform() as f32).collect();
        }
        let mut out = vec![0f32; n];
        self.fill_uniform(&mut out, lo, hi, DRAW_CHUNK);
        out
    }

    /// `out` as [`Rng::uniform_vec`] makes it, `chunk` raw draws at a time.
    fn fill_uniform(&mut self, out: &mut [f32], lo: f32, hi: f32, chunk: usize) {
        use rayon::prelude::*;
        let mut raw = vec![0u64; chunk.min(out.len())];
        for piece in out.chunks_mut(chunk) {
            let raw = &mut raw[..piece.len()];
            raw.iter_mut().for_each(|r| *r = self.next_u64());
            piece.par_iter_mut().zip(raw.par_iter()).for_each(|(o, &r)| *o = lo + (hi - lo) * unit(r) as f32);
        }
    }

    /// `out` as [`Rng::normal_vec`] makes it (a spare value of the last [`Rng::normal`]
    /// first, and the spare of an odd count kept), `chunk` (even) raw draws at a time.
    fn fill_normal(&mut self, out: &mut [f32], std: f32, chunk: usize) {
        use rayon::prelude::*;
        debug_assert!(chunk.is_multiple_of(2));
        let out = match (self.spare_normal.take(), out.split_first_mut()) {
            (Some(z), Some((first, rest))) => {
                *first = z as f32 * std;
                rest
            }
            (spare, _) => {
                self.spare_normal = spare;
                out
            }
        };
        let mut raw = vec![0u64; chunk.min(out.len() + 1)];
        for piece in out.chunks_mut(chunk) {
            let raw = &mut raw[..piece.len().div_ceil(2) * 2];
            raw.iter_mut().for_each(|r| *r = self.next_u64());
            piece.par_chunks_mut(2).zip(raw.par_chunks(2)).for_each(|(o, r)| {
                let (c, s) = box_muller(r[0], r[1]);
                o[0] = c as f32 * std;
                if let Some(second) = o.get_mut(1) {
                    *second = s as f32 * std;
                }
            });
            if piece.len() % 2 == 1 {
                // (Only the last piece can be odd: `chunk` is even.)
                let last = raw.len() - 2;
                self.spare_normal = Some(box_muller(raw[last], raw[last + 1]).1);
            }
        }
    }

    /// Shuffles a slice in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors made on the thread pool, a few raw draws at a time, hold the values of the
    /// same number of single draws, and leave the generator where those would: for even
    /// and odd counts, pieces that end mid-vector, and a spare normal value before.
    #[test]
    fn long_vectors_equal_single_draws() {
        for n in [1usize, 2, 5, 6, 7, 12, 13, 31] {
            for spare in [false, true] {
                let mut one = Rng::new(11);
                let mut many = Rng::new(11);
                if spare {
                    one.normal();
                    many.normal();
                }
                let want: Vec<f32> = (0..n).map(|_| one.normal() as f32 * 0.5).collect();
                let mut got = vec![0f32; n];
                many.fill_normal(&mut got, 0.5, 6);
                assert_eq!(want, got, "normal n {n} spare {spare}");
                assert_eq!(one.normal(), many.normal(), "normal n {n} spare {spare}: the next draw");

                let want: Vec<f32> = (0..n).map(|_| -1.0 + 3.0 * one.uniform() as f32).collect();
                let mut got = vec![0f32; n];
                many.fill_uniform(&mut got, -1.0, 2.0, 4);
                assert_eq!(want, got, "uniform n {n}");
                assert_eq!(one.next_u64(), many.next_u64(), "uniform n {n}: the next draw");
            }
        }
        // Through the public entry points, above the parallel threshold.
        let n = PARALLEL_DRAWS + 3;
        let (mut one, mut many) = (Rng::new(5), Rng::new(5));
        let want: Vec<f32> = (0..n).map(|_| one.normal() as f32 * 0.02).collect();
        assert_eq!(many.normal_vec(n, 0.02), want);
        let want: Vec<f32> = (0..n).map(|_| -0.1 + 0.2 * one.uniform() as f32).collect();
        assert_eq!(many.uniform_vec(n, -0.1, 0.1), want);
    }
}
