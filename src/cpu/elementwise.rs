//! Elementwise reference ops.

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
pub fn binary(a: &[f32], sa: &[usize], b: &[f32], sb: &[usize], out_shape: &[usize], f: impl Fn(f32, f32) -> f32) -> Vec<f32> {
    let n: usize = out_shape.iter().product();
    if sa == out_shape && sb == out_shape {
        return a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
    }
    let (ta, tb) = (broadcast_strides(out_shape, sa), broadcast_strides(out_shape, sb));
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (mut rem, mut ia, mut ib) = (i, 0, 0);
        for d in (0..out_shape.len()).rev() {
            let c = rem % out_shape[d];
            rem /= out_shape[d];
            ia += c * ta[d];
            ib += c * tb[d];
        }
        out.push(f(a[ia], b[ib]));
    }
    out
}
