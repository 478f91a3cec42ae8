//! Matrix products through cuBLASLt (cudarc's safe wrapper).
//!
//! Our tensors are row-major; cuBLASLt is column-major. A row-major `[r, c]` matrix
//! with row length `c` *is* the column-major `[c, r]` matrix with leading dimension `c`,
//! i.e. its transpose. So instead of the row-major product
//!
//! ```text
//!     C[m×n] = op(A)[m×k] · op(B)[k×n]
//! ```
//!
//! we ask cuBLASLt for the column-major product of the transposes,
//!
//! ```text
//!     Cᵀ[n×m] = op(B)ᵀ[n×k] · op(A)ᵀ[k×m],
//! ```
//!
//! with the operands swapped: cuBLASLt's "A" is our B buffer and its "B" is our A buffer,
//! and its (m, n, k) are our (n, m, k). The column-major result `Cᵀ` with leading
//! dimension n is exactly row-major C. For the transpose flags: our B buffer, read
//! column-major, already *is* `op(B)ᵀ` when B is stored `[k, n]` (no transpose, leading
//! dimension n); when B is stored `[n, k]` (`trans_b`) its column-major reading is `op(B)`
//! and cuBLASLt must transpose it (leading dimension k). The same holds for A. In both
//! cases the leading dimension is simply the row length of the stored matrix.
//!
//! Bias epilogue (`CUBLASLT_EPILOGUE_BIAS`): cuBLASLt adds a vector whose length is the
//! number of *rows* of its column-major output D, broadcast along D's columns: D[i, j] +=
//! `bias[i]`. Our D is `Cᵀ`, whose rows are our n output features, so `bias[i]` is added to
//! column i of every row of row-major C — `y = x·wᵀ + b` with b along `out`, as `linear`
//! needs. cudarc passes the bias with the element type of the matrices, which is also
//! cuBLASLt's default bias type for these (bf16 in, bf16 out; f32 in, f32 out) cases.
//!
//! GELU epilogue (`CUBLASLT_EPILOGUE_GELU[_BIAS]`, opt-in `SYNTHOS_CUDA_GELU_EPILOGUE=1`,
//! used by `ops::linear_gelu_tanh` outside the tape): GELU-tanh applied element-wise to
//! D after the bias, in fp32, before D is rounded to its type.
//!
//! Precision: bf16 products use fp32 compute (`CUBLAS_COMPUTE_32F`); cudarc runs f32
//! products as `CUBLAS_COMPUTE_32F_FAST_TF32` (inputs rounded to TF32 on tensor cores,
//! fp32 accumulation), so f32 GEMMs on the GPU carry ~2⁻¹¹ relative input rounding.

use cudarc::cublaslt::{CudaBlasLT, MatmulConfig};
use cudarc::driver::{CudaView, CudaViewMut};

use super::{CudaBuf, CudaStorage, Elem};
use crate::desc::Gemm;
use crate::{bail, Error, Result, ResultExt};

/// A row-major product `C[m, n] = op(A)·op(B)`, `batch` times, over stored matrices
/// with row lengths (leading dimensions) `lda`, `ldb`, `ldc`: A is stored `[m, k]`
/// (`[k, m]` when `trans_a`), B `[k, n]` (`[n, k]` when `trans_b`); batch `i` starts
/// `i·stride_*` elements into each operand. Every cuBLASLt call of the engine goes
/// through this one description and [`matmul`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowGemm {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// A is stored `[k, m]`.
    pub trans_a: bool,
    /// B is stored `[n, k]`.
    pub trans_b: bool,
    /// Row length of the stored A.
    pub lda: usize,
    /// Row length of the stored B.
    pub ldb: usize,
    /// Row length of C.
    pub ldc: usize,
    /// Number of products.
    pub batch: usize,
    /// Elements between consecutive batches of A, B and C.
    pub strides: [usize; 3],
}

impl RowGemm {
    /// One unbatched product of dense matrices with the given row lengths.
    pub fn strided(
        m: usize,
        n: usize,
        k: usize,
        (trans_a, trans_b): (bool, bool),
        [lda, ldb, ldc]: [usize; 3],
    ) -> Self {
        RowGemm { m, n, k, trans_a, trans_b, lda, ldb, ldc, batch: 1, strides: [0; 3] }
    }

    /// The dense (contiguous, packed) product a [`Gemm`] describes.
    pub fn dense(g: &Gemm) -> Self {
        RowGemm {
            m: g.m,
            n: g.n,
            k: g.k,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            lda: if g.trans_a { g.m } else { g.k },
            ldb: if g.trans_b { g.k } else { g.n },
            ldc: g.n,
            batch: g.batch,
            strides: [g.stride_a(), g.stride_b(), g.stride_c()],
        }
    }

    /// Elements each operand spans (A, B, C), or `None` when a row length is shorter
    /// than its row or a size is zero.
    fn spans(&self) -> Option<[usize; 3]> {
        let (ar, ac) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        if self.m == 0 || self.n == 0 || self.k == 0 || self.batch == 0 {
            return None;
        }
        if ac > self.lda || bc > self.ldb || self.n > self.ldc {
            return None;
        }
        let span = |rows: usize, cols: usize, ld: usize, stride: usize| {
            (self.batch - 1).checked_mul(stride)?.checked_add((rows - 1).checked_mul(ld)?.checked_add(cols)?)
        };
        Some([
            span(ar, ac, self.lda, self.strides[0])?,
            span(br, bc, self.ldb, self.strides[1])?,
            span(self.m, self.n, self.ldc, self.strides[2])?,
        ])
    }

    /// cuBLASLt's description of the product. Row-major C is column-major
    /// `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so cuBLASLt's A is our B and vice versa, its (m, n) are our
    /// (n, m), and the leading dimensions are the stored row lengths (module comment).
    fn config(&self) -> Result<MatmulConfig> {
        let batched = self.batch > 1;
        let i = |x: usize| i64::try_from(x).map_err(|_| Error::msg(format!("gemm: {x} does not fit cuBLASLt's sizes")));
        Ok(MatmulConfig {
            transa: self.trans_b,
            transb: self.trans_a,
            transc: false,
            m: self.n as u64,
            n: self.m as u64,
            k: self.k as u64,
            alpha: 1.0,
            lda: i(self.ldb)?,
            ldb: i(self.lda)?,
            beta: 0.0,
            ldc: i(self.ldc)?,
            stride_a: if batched { Some(i(self.strides[1])?) } else { None },
            stride_b: if batched { Some(i(self.strides[0])?) } else { None },
            stride_c: if batched { Some(i(self.strides[2])?) } else { None },
            stride_bias: None,
            batch_size: if batched {
                Some(
                    i32::try_from(self.batch)
                        .map_err(|_| Error::msg(format!("gemm: batch {} too large", self.batch)))?,
                )
            } else {
                None
            },
        })
    }
}

/// The variable that moves GELU-tanh into the GEMM's epilogue where an op allows it
/// (`ops::linear_gelu_tanh` outside the tape).
const GELU_VAR: &str = "SYNTHOS_CUDA_GELU_EPILOGUE";

/// True when `ops::linear_gelu_tanh` may run its GELU in cuBLASLt's epilogue on this
/// thread (a [`with_gelu_epilogue`] override, else `SYNTHOS_CUDA_GELU_EPILOGUE=1`).
pub fn gelu_epilogue() -> Result<bool> {
    Ok(super::choice::get(GELU_VAR, &["0", "1"])? == 1)
}

/// Runs `f` with the GELU epilogue on or off on this thread.
pub fn with_gelu_epilogue<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::choice::with(GELU_VAR, on as usize, f)
}

/// Runs `g` through cuBLASLt on views of the stored operands, writing C (`beta` = 0),
/// with `bias` (length n, unbatched products only) added along every row of C. The
/// spans of the three matrices are checked against the views first.
pub fn matmul<T: Elem>(
    blas: &CudaBlasLT,
    g: &RowGemm,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    bias: Option<&CudaView<'_, T>>,
    c: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    matmul_epilogue(blas, g, a, b, bias, false, c)
}

/// [`matmul`], then GELU-tanh applied to every element of C when `gelu` (cuBLASLt's
/// `GELU` / `GELU_BIAS` epilogue: on the fp32 result, before it is rounded to C's type).
pub fn matmul_epilogue<T: Elem>(
    blas: &CudaBlasLT,
    g: &RowGemm,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    bias: Option<&CudaView<'_, T>>,
    gelu: bool,
    c: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let Some([na, nb, nc]) = g.spans() else {
        bail!("gemm: bad shape {g:?}");
    };
    if a.len() < na || b.len() < nb || c.len() < nc {
        bail!("gemm: views of {}, {} and {} elements are too short for {g:?}", a.len(), b.len(), c.len());
    }
    if let Some(bias) = bias {
        if g.batch != 1 || bias.len() < g.n {
            bail!("gemm: a bias of {} elements for {g:?} (unbatched products, n elements)", bias.len());
        }
    }
    if gelu && g.batch != 1 {
        bail!("gemm: the GELU epilogue is only used for unbatched products, not {g:?}");
    }
    let cfg = g.config()?;
    // SAFETY: `cfg` addresses exactly the spans of the stored operands described by `g`
    // (checked against the views above); the bias holds n elements.
    let run = if super::gemm_plan::plans_enabled()? {
        unsafe { super::gemm_plan::matmul(blas, &cfg, b, a, bias, gelu, c) }
    } else {
        unsafe { T::lt_matmul(blas, cfg, b, a, bias, gelu, c) }
    };
    let epilogue = if gelu { " with the GELU epilogue" } else { "" };
    run.with_ctx(|| format!("cuBLASLt {} gemm {g:?}{epilogue}", T::DTYPE))
}

/// `C = op(A)·op(B)` per batch (+ `bias` of length n along every row of C) on the GPU.
/// A, B and the bias must share one dtype, which is also C's.
pub fn gemm(a: &CudaStorage, b: &CudaStorage, bias: Option<&CudaStorage>, g: &Gemm) -> Result<CudaBuf> {
    gemm_epilogue(a, b, bias, false, g)
}

/// [`gemm`], then GELU-tanh on every element of C when `gelu` (in cuBLASLt's epilogue;
/// unbatched products only).
pub fn gemm_epilogue(
    a: &CudaStorage,
    b: &CudaStorage,
    bias: Option<&CudaStorage>,
    gelu: bool,
    g: &Gemm,
) -> Result<CudaBuf> {
    let dtype = a.buf.dtype();
    if b.buf.dtype() != dtype || bias.is_some_and(|c| c.buf.dtype() != dtype) {
        bail!("gemm: operands must share one dtype ({dtype} and {})", b.buf.dtype());
    }
    let (na, nb, _) = g.sizes();
    if a.buf.len() < na || b.buf.len() < nb || bias.is_some_and(|c| c.buf.len() < g.n) {
        bail!("gemm: buffers too small for {g:?}");
    }
    if (bias.is_some() || gelu) && g.batch != 1 {
        bail!("gemm: the bias and GELU epilogues are only used for unbatched products");
    }
    match dtype {
        crate::DType::F32 => gemm_t::<f32>(a, b, bias, gelu, g),
        crate::DType::BF16 => gemm_t::<half::bf16>(a, b, bias, gelu, g),
    }
}

fn gemm_t<T: Elem>(
    a: &CudaStorage,
    b: &CudaStorage,
    bias: Option<&CudaStorage>,
    gelu: bool,
    g: &Gemm,
) -> Result<CudaBuf> {
    let dev = &a.dev;
    let (_, _, nc) = g.sizes();
    let mut out = T::take(dev.alloc(nc, T::DTYPE)?)?;
    if nc == 0 {
        return Ok(T::wrap(out));
    }
    if g.k == 0 {
        bail!("gemm: empty contracted dimension");
    }
    let bias = bias.map(|c| T::of(&c.buf).map(|s| s.as_view())).transpose()?;
    let blas = dev.blaslt()?;
    matmul_epilogue(
        &blas,
        &RowGemm::dense(g),
        &T::of(&a.buf)?.as_view(),
        &T::of(&b.buf)?.as_view(),
        bias.as_ref(),
        gelu,
        &mut out.as_view_mut(),
    )?;
    Ok(T::wrap(out))
}

/// Whether the GELU training epilogues ([`gemm_gelu_aux`], [`gemm_dgelu`]) can run `g`:
/// an unbatched product whose output rows (our `n`, the aux matrix's leading dimension)
/// are a multiple of 8, as cuBLASLt requires of the aux matrix.
pub fn gelu_aux_fits(g: &Gemm) -> bool {
    g.batch == 1 && g.n.is_multiple_of(8) && g.m > 0 && g.n > 0 && g.k > 0
}

/// Checks the operands of a GELU training epilogue and returns the product's description.
fn aux_operands(what: &str, a: &CudaStorage, b: &CudaStorage, more: &[&CudaStorage], g: &Gemm) -> Result<RowGemm> {
    let dtype = a.buf.dtype();
    if b.buf.dtype() != dtype || more.iter().any(|c| c.buf.dtype() != dtype) {
        bail!("{what}: operands must share one dtype ({dtype} and {})", b.buf.dtype());
    }
    if !gelu_aux_fits(g) {
        bail!("{what}: {g:?} is not an unbatched product with a multiple of 8 output columns");
    }
    let (na, nb, _) = g.sizes();
    if a.buf.len() < na || b.buf.len() < nb {
        bail!("{what}: buffers too small for {g:?}");
    }
    Ok(RowGemm::dense(g))
}

/// `C = GELU-tanh(op(A)·op(B) + bias)` and the GELU input `op(A)·op(B) + bias` beside it
/// (cuBLASLt's `GELU_AUX[_BIAS]` epilogue), both `[m, n]` in A's dtype: the forward of an
/// MLP's first layer on the tape, which keeps the GELU input for the backward. Needs
/// [`gelu_aux_fits`]. Returns `(C, GELU input)`.
pub fn gemm_gelu_aux(
    a: &CudaStorage,
    b: &CudaStorage,
    bias: Option<&CudaStorage>,
    g: &Gemm,
) -> Result<(CudaBuf, CudaBuf)> {
    let rg = aux_operands("gemm with GELU aux", a, b, bias.as_slice(), g)?;
    if bias.is_some_and(|c| c.buf.len() < g.n) {
        bail!("gemm with GELU aux: a bias shorter than {} for {g:?}", g.n);
    }
    match a.buf.dtype() {
        crate::DType::F32 => gelu_aux_t::<f32>(a, b, bias, &rg),
        crate::DType::BF16 => gelu_aux_t::<half::bf16>(a, b, bias, &rg),
    }
}

fn gelu_aux_t<T: Elem>(
    a: &CudaStorage,
    b: &CudaStorage,
    bias: Option<&CudaStorage>,
    rg: &RowGemm,
) -> Result<(CudaBuf, CudaBuf)> {
    let dev = &a.dev;
    let nc = rg.m * rg.n;
    let mut out = T::take(dev.alloc(nc, T::DTYPE)?)?;
    let mut aux = T::take(dev.alloc(nc, T::DTYPE)?)?;
    let bias = bias.map(|c| T::of(&c.buf).map(|s| s.as_view())).transpose()?;
    let blas = dev.blaslt()?;
    let cfg = rg.config()?;
    // SAFETY: `cfg` describes dense `[m, k]`/`[k, m]` and `[k, n]`/`[n, k]` operands whose
    // buffers were checked to hold them, and C and the aux matrix of m·n elements each;
    // the bias holds n elements.
    unsafe {
        super::gemm_plan::matmul_gelu_aux(
            &blas,
            &cfg,
            &T::of(&b.buf)?.as_view(),
            &T::of(&a.buf)?.as_view(),
            bias.as_ref(),
            &mut aux.as_view_mut(),
            &mut out.as_view_mut(),
        )
    }
    .with_ctx(|| format!("cuBLASLt {} gemm {rg:?} with the GELU aux epilogue", T::DTYPE))?;
    Ok((T::wrap(out), T::wrap(aux)))
}

/// `C = (op(A)·op(B)) · GELU-tanh'(pre)` element-wise, `pre` (the GELU input) `[m, n]` like
/// C (cuBLASLt's `DGELU` epilogue), and with `bias_grad` also C's sums over its m rows, the
/// gradient of the bias added before the GELU (`DGELU_BGRAD`): the backward of an MLP's
/// GELU and first-layer bias, fused into the product that gives the gradient of the GELU
/// output. Needs [`gelu_aux_fits`]. Returns `(C, bias gradient)`.
pub fn gemm_dgelu(
    a: &CudaStorage,
    b: &CudaStorage,
    pre: &CudaStorage,
    bias_grad: bool,
    g: &Gemm,
) -> Result<(CudaBuf, Option<CudaBuf>)> {
    let rg = aux_operands("gemm with GELU gradient", a, b, &[pre], g)?;
    if pre.buf.len() < g.m * g.n {
        bail!("gemm with GELU gradient: a GELU input of {} elements for {g:?}", pre.buf.len());
    }
    match a.buf.dtype() {
        crate::DType::F32 => dgelu_t::<f32>(a, b, pre, bias_grad, &rg),
        crate::DType::BF16 => dgelu_t::<half::bf16>(a, b, pre, bias_grad, &rg),
    }
}

fn dgelu_t<T: Elem>(
    a: &CudaStorage,
    b: &CudaStorage,
    pre: &CudaStorage,
    bias_grad: bool,
    rg: &RowGemm,
) -> Result<(CudaBuf, Option<CudaBuf>)> {
    let dev = &a.dev;
    let mut out = T::take(dev.alloc(rg.m * rg.n, T::DTYPE)?)?;
    let mut grad = if bias_grad { Some(T::take(dev.alloc(rg.n, T::DTYPE)?)?) } else { None };
    let blas = dev.blaslt()?;
    let cfg = rg.config()?;
    let mut grad_view = grad.as_mut().map(|s| s.as_view_mut());
    // SAFETY: as in `gelu_aux_t`; the GELU input holds m·n elements laid out as C, the
    // bias gradient n.
    unsafe {
        super::gemm_plan::matmul_dgelu(
            &blas,
            &cfg,
            &T::of(&b.buf)?.as_view(),
            &T::of(&a.buf)?.as_view(),
            &T::of(&pre.buf)?.as_view(),
            grad_view.as_mut(),
            &mut out.as_view_mut(),
        )
    }
    .with_ctx(|| format!("cuBLASLt {} gemm {rg:?} with the GELU gradient epilogue", T::DTYPE))?;
    Ok((T::wrap(out), grad.map(T::wrap)))
}
