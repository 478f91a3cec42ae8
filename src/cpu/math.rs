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
