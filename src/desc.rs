//! Descriptions of one kernel call, shared by the CPU reference (`cpu/`) and the CUDA
//! launchers (`cuda/`): sizes, strides and constants that both compute from, so that one
//! definition serves both devices. The `#[repr(C)]` ones are passed by value to
//! `kernels/*.cu`, whose structs of the same name mirror their layout.

// ---- AdamW (`kernels/adamw.cu`) ----

/// The constants of one AdamW update of one parameter tensor, derived on the host.
/// Passed by value to `kernels/adamw.cu`, whose `struct AdamWStep` mirrors this layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step.
    pub lr: f32,
    /// First-moment decay β1.
    pub beta1: f32,
    /// Second-moment decay β2.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight-decay factor `1 − lr·wd` (1 for parameters without decay).
    pub decay: f32,
    /// `1 − β1^t`.
    pub bias_correction1: f32,
    /// `sqrt(1 − β2^t)`.
    pub bias_correction2_sqrt: f32,
    /// Multiplier applied to every gradient element (clipping, accumulation averaging).
    pub grad_scale: f32,
}

// ---- GEMM ----

/// One (possibly batched) row-major product `C[b] = op(A[b]) · op(B[b])`, where
/// `op(X)` is `X` or `Xᵀ`. Shared by the CPU reference and the cuBLASLt launcher.
///
/// Storage layouts (row-major, contiguous): `A[b]` is `[m, k]`, or `[k, m]` when
/// `trans_a`; `B[b]` is `[k, n]`, or `[n, k]` when `trans_b`; `C[b]` is `[m, n]`.
/// Consecutive batches are `m·k` elements apart in A, `k·n` in B and `m·n` in C.
/// (When one B serves every batch, the caller folds the batch into m instead.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    /// Number of products.
    pub batch: usize,
    /// Rows of `op(A)` and of C.
    pub m: usize,
    /// The contracted dimension.
    pub k: usize,
    /// Columns of `op(B)` and of C.
    pub n: usize,
    /// A is stored `[k, m]`.
    pub trans_a: bool,
    /// B is stored `[n, k]`.
    pub trans_b: bool,
}

impl Gemm {
    /// Elements between consecutive A matrices.
    pub fn stride_a(&self) -> usize {
        self.m * self.k
    }

    /// Elements between consecutive B matrices.
    pub fn stride_b(&self) -> usize {
        self.k * self.n
    }

    /// Elements between consecutive C matrices.
    pub fn stride_c(&self) -> usize {
        self.m * self.n
    }

    /// Elements of A, B and C in total.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.batch * self.stride_a(), self.batch * self.stride_b(), self.batch * self.stride_c())
    }
}

// ---- Attention (`kernels/attention.cu`) ----

/// Sizes and flags of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    /// Batch size B.
    pub batch: usize,
    /// Number of queries Nq.
    pub q_len: usize,
    /// Number of keys and values Nk.
    pub kv_len: usize,
    /// Number of heads H.
    pub heads: usize,
    /// Head dimension Dh.
    pub head_dim: usize,
    /// Leading dimension of the bias (1 or B), or 0 without a bias.
    pub bias_batch: usize,
    /// Softmax scale applied to `q·k` (not to the bias).
    pub scale: f32,
    /// Hide key j from query i when j > i.
    pub causal: bool,
}

impl AttentionParams {
    /// Element offset of token `n` of head `h` in batch `b` of a `[B, len, H, Dh]` tensor.
    pub(crate) fn token(&self, len: usize, b: usize, n: usize, h: usize) -> usize {
        ((b * len + n) * self.heads + h) * self.head_dim
    }

    /// Element offset of bias row `(b, h, i)` (the batch index folds to 0 when shared).
    pub(crate) fn bias_row(&self, b: usize, h: usize, i: usize) -> usize {
        let bb = if self.bias_batch == 1 { 0 } else { b };
        ((bb * self.heads + h) * self.q_len + i) * self.kv_len
    }
}

/// The inputs of one attention call: slices on the CPU, device buffers on a GPU.
pub struct AttentionInputs<'a, S: ?Sized> {
    /// Queries `[B, Nq, H, Dh]`.
    pub q: &'a S,
    /// Keys `[B, Nk, H, Dh]`.
    pub k: &'a S,
    /// Values `[B, Nk, H, Dh]`.
    pub v: &'a S,
    /// Key mask `[B, Nk]` (0 hides the key).
    pub key_mask: Option<&'a S>,
    /// Additive bias `[Bb, H, Nq, Nk]`.
    pub bias: Option<&'a S>,
}

// ---- Convolution and channel norms (`kernels/conv.cu`) ----

/// Everything about one 2-D convolution that the kernels need: input `[batch, c_in, h,
/// w]`, weight `[c_out, c_in, kh, kw]`, output `[batch, c_out, h_out, w_out]`. Padding
/// below and to the right only shows in `h_out`/`w_out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride along both spatial dimensions.
    pub stride: usize,
    /// Zero rows above the input.
    pub pad_top: usize,
    /// Zero columns left of the input.
    pub pad_left: usize,
    /// Output height.
    pub h_out: usize,
    /// Output width.
    pub w_out: usize,
}

impl ConvGeom {
    /// Rows of the column matrix (`c_in·kh·kw`), the GEMM's contracted dimension.
    pub fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// Pixels of one output image.
    pub fn out_pixels(&self) -> usize {
        self.h_out * self.w_out
    }

    /// Elements of one input image.
    pub fn in_image(&self) -> usize {
        self.c_in * self.h * self.w
    }

    /// Elements of one output image.
    pub fn out_image(&self) -> usize {
        self.c_out * self.out_pixels()
    }

    /// True when the column matrix of an image is the image itself (1×1 kernel, stride
    /// 1, no padding), so the GEMM can read the input in place.
    pub fn is_identity(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.h_out == self.h && self.w_out == self.w
    }

    /// Output rows per band so that a band's column matrix (`k · rows · w_out`) stays
    /// within `max_col_elems` (at least one row, at most all).
    pub fn rows_per_chunk(&self, max_col_elems: usize) -> usize {
        (max_col_elems / (self.k() * self.w_out).max(1)).clamp(1, self.h_out.max(1))
    }

    /// The input rows `[first, end)` that the output rows `[r0, r0 + rows)` read
    /// (clipped to the image; empty when they only see padding).
    pub fn input_rows(&self, r0: usize, rows: usize) -> (usize, usize) {
        let first = (r0 * self.stride).saturating_sub(self.pad_top);
        let end = ((r0 + rows - 1) * self.stride + self.kh).saturating_sub(self.pad_top).min(self.h);
        (first.min(end), end)
    }
}

/// One channel RMS norm: `x` viewed as `[batch, c, s]` (s = pixels per image), every
/// pixel's channel vector normalised to unit L2 norm and scaled by `√c · gamma[c]`:
/// `y = x / max(‖x‖₂, eps) · √c · γ` (PyTorch's `F.normalize` over dim 1, as Wan's
/// `RMS_norm` uses it). Norms in f64.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChannelNorm {
    /// Images.
    pub batch: usize,
    /// Channels (the normalised dimension).
    pub c: usize,
    /// Pixels per channel plane.
    pub s: usize,
    /// Lower bound of the norm (F.normalize's `eps`, 1e-12).
    pub eps: f32,
}

impl ChannelNorm {
    /// Element offset of channel 0 of pixel `p` (of `batch · s`); channel `c` is `c · s`
    /// further.
    pub(crate) fn base(&self, p: usize) -> usize {
        (p / self.s) * self.c * self.s + p % self.s
    }

    /// The `√c` factor.
    pub fn scale(&self) -> f32 {
        (self.c as f32).sqrt()
    }
}

// ---- Shape copies (`kernels/shape.cu`) ----

/// Row-major element strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * shape[d + 1];
    }
    st
}

/// The same permutation in its fewest dimensions: `(shape, perm)` such that permuting the
/// same data by them gives the same output. Dimensions of size 1 are dropped and input
/// dimensions `d, d+1` that stay adjacent and in order in the output are merged, so that
/// e.g. `[B, C, H, W]` by `[0, 2, 3, 1]` becomes `[B, C, H·W]` by `[0, 2, 1]`. An identity
/// comes back as one dimension (or none for a shape with no dimension of size above 1).
pub fn simplify_permutation(shape: &[usize], perm: &[usize]) -> (Vec<usize>, Vec<usize>) {
    // Output order of the input dimensions that are not 1.
    let kept: Vec<usize> = perm.iter().copied().filter(|&d| shape[d] != 1).collect();
    // Runs of consecutive input dimensions along the output order.
    let mut runs: Vec<(usize, usize)> = Vec::new(); // (first input dim, last input dim)
    for &d in &kept {
        match runs.last_mut() {
            Some(run) if run.1 + 1 == d || (run.1 < d && (run.1 + 1..d).all(|e| shape[e] == 1)) => run.1 = d,
            _ => runs.push((d, d)),
        }
    }
    // Input order of the runs gives the new input dimensions.
    let mut by_input: Vec<usize> = (0..runs.len()).collect();
    by_input.sort_by_key(|&r| runs[r].0);
    let new_shape: Vec<usize> = by_input.iter().map(|&r| (runs[r].0..=runs[r].1).map(|d| shape[d]).product()).collect();
    let mut new_perm = vec![0; runs.len()];
    for (new_dim, &r) in by_input.iter().enumerate() {
        new_perm[r] = new_dim;
    }
    (new_shape, new_perm)
}

/// One slab of a copy between tensors viewed as `[outer, channels, inner]`:
/// `dst[o, dst_off + c, i] = src[o, src_off + c, i]` for `c < len`.
#[derive(Clone, Copy, Debug)]
pub struct Slab {
    /// Product of the dimensions before the sliced one.
    pub outer: usize,
    /// Product of the dimensions after the sliced one.
    pub inner: usize,
    /// Size of the sliced dimension in the source.
    pub src_dim: usize,
    /// First source index along it.
    pub src_off: usize,
    /// Size of the sliced dimension in the destination.
    pub dst_dim: usize,
    /// First destination index along it.
    pub dst_off: usize,
    /// Number of indices copied.
    pub len: usize,
}

// ---- Row norms (`kernels/norm.cu`) ----

/// How one row normalisation maps a `[rows, d]` input to its output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowNorm {
    /// Number of rows.
    pub rows: usize,
    /// Length of each row (the normalised last dimension).
    pub d: usize,
    /// Consecutive rows that share one parameter row: `rows` for LayerNorm/RMSNorm weights
    /// of shape `[d]`, `N` for per-sample modulation vectors `[B, 1, d]`.
    pub rows_per_group: usize,
    /// Added to the weight: 1 for `LN(x)·(1 + scale)` and for LayerNorm without weight.
    pub w_offset: f32,
    /// Added to the variance (or mean square) before the reciprocal square root.
    pub eps: f32,
    /// RMSNorm: no mean subtraction.
    pub rms: bool,
}

impl RowNorm {
    /// Number of parameter rows (`rows / rows_per_group`).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(self.rows_per_group.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::simplify_permutation;

    #[test]
    fn simplified_permutations_move_the_same_elements() {
        assert_eq!(simplify_permutation(&[2, 3, 4, 5], &[0, 2, 3, 1]), (vec![2, 3, 20], vec![0, 2, 1]));
        assert_eq!(simplify_permutation(&[2, 3, 4, 5], &[0, 2, 1, 3]), (vec![2, 3, 4, 5], vec![0, 2, 1, 3]));
        assert_eq!(simplify_permutation(&[2, 3, 4], &[0, 1, 2]), (vec![24], vec![0]));
        assert_eq!(simplify_permutation(&[2, 1, 3], &[2, 1, 0]), (vec![2, 3], vec![1, 0]));
        assert_eq!(simplify_permutation(&[1, 1], &[1, 0]), (vec![], vec![]));
        // [B, C, h, 2, w, 2] -> [B, h, w, C, 2, 2] (patchify): C and its 2 are not adjacent.
        assert_eq!(simplify_permutation(&[1, 4, 3, 2, 5, 2], &[0, 2, 4, 1, 3, 5]).1, vec![1, 3, 0, 2, 4]);

        // Random shapes with dimensions of 1 and 2: the CPU permutation agrees.
        let mut rng = crate::Rng::new(5);
        for _ in 0..400 {
            let rank = 1 + rng.below(6);
            let shape: Vec<usize> = (0..rank).map(|_| 1 + rng.below(3)).collect();
            let mut perm: Vec<usize> = (0..rank).collect();
            rng.shuffle(&mut perm);
            let n: usize = shape.iter().product();
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let (s2, p2) = simplify_permutation(&shape, &perm);
            assert_eq!(s2.iter().product::<usize>(), n);
            assert!(s2.iter().all(|&d| d > 1), "{shape:?} {perm:?} -> {s2:?}");
            let want = crate::cpu::shape::permute(&x, &shape, &perm);
            let got = if s2.is_empty() { x.clone() } else { crate::cpu::shape::permute(&x, &s2, &p2) };
            assert_eq!(got, want, "{shape:?} by {perm:?} simplified to {s2:?} by {p2:?}");
            // Nothing left to merge: no two output-adjacent dimensions are input-adjacent.
            assert!(p2.windows(2).all(|w| w[1] != w[0] + 1), "{s2:?} {p2:?}");
        }
    }
}
