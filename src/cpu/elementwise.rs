//! Elementwise ops.

use std::mem::MaybeUninit;

use super::math;
use super::par::{self, Walker};

/// Output shape of broadcasting `a` with `b` (NumPy rules), or `None` if incompatible.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        *o = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// Element strides of `s` broadcast (right-aligned) to `out` (0 along broadcast dims).
pub fn broadcast_strides(out: &[usize], s: &[usize]) -> Vec<usize> {
    let r = out.len();
    let mut st = vec![0; r];
    let mut acc = 1;
    for k in (0..s.len()).rev() {
        let d = r - s.len() + k;
        st[d] = if s[k] == 1 { 0 } else { acc };
        acc *= s[k];
    }
    st
}

/// `out[i] = f(a[ia], b[ib])` with broadcasting to `out_shape`.
pub fn binary(
    a: &[f32],
    sa: &[usize],
    b: &[f32],
    sb: &[usize],
    out_shape: &[usize],
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Vec<f32> {
    let n: usize = out_shape.iter().product();
    if sa == out_shape && sb == out_shape {
        return par::zip_map(a, b, f);
    }
    let (ta, tb) = (broadcast_strides(out_shape, sa), broadcast_strides(out_shape, sb));
    let r = out_shape.len();
    // Whole rows of the last dimension at a time when each operand runs along it
    // contiguously (stride 1) or repeats one value (stride 0): the common bias and
    // modulation broadcasts. Same expression per element, so the same bits.
    let last = out_shape.last().copied().unwrap_or(1);
    let by_rows = last > 1 && ta[r - 1] <= 1 && tb[r - 1] <= 1;
    // SAFETY: both paths write every element of each chunk.
    unsafe {
        par::fill_new(n, |i0, o| {
            if by_rows && i0 % last == 0 && o.len() % last == 0 {
                let mut w = Walker::new(&out_shape[..r - 1], [&ta[..r - 1], &tb[..r - 1]], i0 / last);
                for o in o.chunks_exact_mut(last) {
                    let (oa, ob) = (w.off[0], w.off[1]);
                    match (ta[r - 1], tb[r - 1]) {
                        (1, 1) => {
                            for (o, (&x, &y)) in o.iter_mut().zip(a[oa..oa + last].iter().zip(&b[ob..ob + last])) {
                                *o = MaybeUninit::new(f(x, y));
                            }
                        }
                        (1, _) => {
                            let y = b[ob];
                            for (o, &x) in o.iter_mut().zip(&a[oa..oa + last]) {
                                *o = MaybeUninit::new(f(x, y));
                            }
                        }
                        (_, 1) => {
                            let x = a[oa];
                            for (o, &y) in o.iter_mut().zip(&b[ob..ob + last]) {
                                *o = MaybeUninit::new(f(x, y));
                            }
                        }
                        _ => o.fill(MaybeUninit::new(f(a[oa], b[ob]))),
                    }
                    w.step();
                }
                return;
            }
            let mut w = Walker::new(out_shape, [&ta, &tb], i0);
            for o in o.iter_mut() {
                *o = MaybeUninit::new(f(a[w.off[0]], b[w.off[1]]));
                w.step();
            }
        })
    }
}

/// The error function in f64: Maclaurin series for |x| < 3.5 (the terms stay small
/// enough there that f64 cancellation costs under 1e-12), and the asymptotic expansion
/// of erfc beyond, where erfc < 1e-6 and a few terms are exact to f32 precision.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let v = if a < 3.5 {
        // erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1))
        let x2 = a * a;
        let (mut term, mut sum, mut n) = (a, a, 0.0f64);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(x) ≈ e^(-x²)/(x√π) Σ (-1)^n (2n-1)!! / (2x²)^n
        let inv = 1.0 / (2.0 * a * a);
        let (mut term, mut series) = (1.0f64, 1.0f64);
        for n in 1..6 {
            term *= -((2 * n - 1) as f64) * inv;
            series += term;
        }
        1.0 - (-a * a).exp() / (a * std::f64::consts::PI.sqrt()) * series
    };
    v.copysign(x)
}

/// √(2/π), the slope of the tanh argument in GELU's tanh form.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of GELU's tanh form.
const GELU_CUBIC: f32 = 0.044_715;

/// GELU in PyTorch's `approximate='tanh'` form: ½x(1 + tanh(√(2/π)(x + 0.044715x³))),
/// in f32 as PyTorch computes it (tanh from [`math::tanh`]).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    let t = math::tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
    0.5 * x * (1.0 + t)
}

/// d/dx of [`gelu_tanh`].
#[inline]
pub fn gelu_tanh_grad(x: f32) -> f32 {
    let t = math::tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
}

/// Exact GELU: x·Φ(x) = ½x(1 + erf(x/√2)).
pub fn gelu_exact(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// d/dx of [`gelu_exact`]: Φ(x) + x·φ(x).
pub fn gelu_exact_grad(x: f32) -> f32 {
    let x = x as f64;
    let cdf = 0.5 * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (cdf + x * pdf) as f32
}

/// SiLU (swish): x·σ(x).
#[inline]
pub fn silu(x: f32) -> f32 {
    x * math::sigmoid(x)
}

/// d/dx of [`silu`]: σ(x)(1 + x(1 − σ(x))).
#[inline]
pub fn silu_grad(x: f32) -> f32 {
    let s = math::sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// The slope of OpenAI CLIP's QuickGELU.
pub const QUICK_GELU_ALPHA: f32 = 1.702;

/// QuickGELU (OpenAI CLIP): x·σ(1.702x).
#[inline]
pub fn quick_gelu(x: f32) -> f32 {
    x * math::sigmoid(QUICK_GELU_ALPHA * x)
}

/// d/dx of [`quick_gelu`]: s(1 + 1.702x(1 − s)) with s = σ(1.702x).
#[inline]
pub fn quick_gelu_grad(x: f32) -> f32 {
    let s = math::sigmoid(QUICK_GELU_ALPHA * x);
    s * (1.0 + QUICK_GELU_ALPHA * x * (1.0 - s))
}

/// `x + gate·y` where `x` and `y` have `shape` and `gate` (shape `gate_shape`)
/// broadcasts to it.
pub fn gated_residual(x: &[f32], gate: &[f32], gate_shape: &[usize], y: &[f32], shape: &[usize]) -> Vec<f32> {
    let strides = broadcast_strides(shape, gate_shape);
    let zero = vec![0; shape.len()];
    let r = shape.len();
    let last = shape.last().copied().unwrap_or(1);
    // Whole rows of the last dimension when the gate runs along it (the [B, 1, D] gate).
    let by_rows = last > 1 && strides[r - 1] == 1;
    // SAFETY: both paths write every element of each chunk.
    unsafe {
        par::fill_new(x.len().min(y.len()), |i0, o| {
            if by_rows && i0 % last == 0 && o.len() % last == 0 {
                let mut w = Walker::new(&shape[..r - 1], [&strides[..r - 1], &zero[..r - 1]], i0 / last);
                for (k, o) in o.chunks_exact_mut(last).enumerate() {
                    let base = i0 + k * last;
                    let g = &gate[w.off[0]..w.off[0] + last];
                    for (o, ((&xv, &yv), &gv)) in
                        o.iter_mut().zip(x[base..base + last].iter().zip(&y[base..base + last]).zip(g))
                    {
                        *o = MaybeUninit::new(xv + gv * yv);
                    }
                    w.step();
                }
                return;
            }
            let mut w = Walker::new(shape, [&strides, &zero], i0);
            for (i, o) in o.iter_mut().enumerate() {
                *o = MaybeUninit::new(x[i0 + i] + gate[w.off[0]] * y[i0 + i]);
                w.step();
            }
        })
    }
}
