//! Scalar functions the CPU ops share, written so that loops over them vectorise.

/// `e^x` for `x ≤ 0` (and −∞) in f32, in plain arithmetic the compiler vectorises:
/// range reduction by `ln 2` (split in two constants), a degree-5 polynomial for
/// `e^r − 1 − r` on `|r| ≤ ln2/2` (Cephes' `expf` coefficients, about 1 ulp), and the
/// power of two built in the exponent bits. Below −87 the result is 0.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let xc = if x < -87.0 { -87.0 } else { x }; // NaN stays NaN
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let poly = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = poly * r * r + r + 1.0;
    // t's low mantissa bits hold n (|n| ≤ 126), the exponent of 2ⁿ.
    let e = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32).wrapping_add(127).wrapping_shl(23);
    let y = y * f32::from_bits(e as u32);
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// `tanh(u)` in f32 from [`exp_nonpositive`]: `(1 − e)/(1 + e)` with `e = e^(−2|u|)`,
/// signed. Absolute error about 2⁻²⁴ (relative error grows only as |u| → 0, where
/// `tanh(u)` is itself tiny).
#[inline(always)]
pub fn tanh(u: f32) -> f32 {
    let e = exp_nonpositive(-2.0 * u.abs());
    ((1.0 - e) / (1.0 + e)).copysign(u)
}

/// The logistic sigmoid `1/(1 + e^(−x))` in f32, from [`exp_nonpositive`] on either side.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// Lanes of the f64 sums below: eight running sums, combined pairwise in a fixed order at
/// the end, so the loop vectorises (a single running sum is one long chain of dependent
/// adds) and the result depends only on the data, never on threads or timing.
const LANES: usize = 8;

/// Adds the eight lanes pairwise in a fixed order.
#[inline(always)]
fn combine(l: [f64; LANES]) -> f64 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// `Σ f(a_i, b_i)` in f64 over two slices of one length, element `i` in lane `i mod 8`.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            lanes[l] += f(x[l] as f64, y[l] as f64);
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        lanes[l] += f(x as f64, y as f64);
    }
    combine(lanes)
}

/// `Σ x_i` in f64 (eight lanes of partial sums, added in a fixed order).
#[inline(always)]
pub fn sum_f64(x: &[f32]) -> f64 {
    lane_sum(x, x, |v, _| v)
}

/// `Σ (x_i − c)²` in f64 (eight lanes).
#[inline(always)]
pub fn sum_sq_dev_f64(x: &[f32], c: f64) -> f64 {
    lane_sum(x, x, |v, _| (v - c) * (v - c))
}

/// `Σ a_i·b_i` in f64 (eight lanes).
#[inline(always)]
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    lane_sum(a, b, |x, y| x * y)
}
