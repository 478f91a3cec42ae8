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
//! Precision: bf16 products use fp32 compute (`CUBLAS_COMPUTE_32F`); cudarc runs f32
//! products as `CUBLAS_COMPUTE_32F_FAST_TF32` (inputs rounded to TF32 on tensor cores,
//! fp32 accumulation), so f32 GEMMs on the GPU carry ~2⁻¹¹ relative input rounding.

use cudarc::cublaslt::{Matmul, MatmulConfig};

use super::{CudaBuf, CudaStorage};
use crate::desc::Gemm;
use crate::{bail, Result, ResultExt};

/// `C = op(A)·op(B)` per batch (+ `bias` of length n along every row of C) on the GPU.
/// A, B and the bias must share one dtype, which is also C's.
pub fn gemm(a: &CudaStorage, b: &CudaStorage, bias: Option<&CudaStorage>, g: &Gemm) -> Result<CudaBuf> {
    let dev = &a.dev;
    let dtype = a.buf.dtype();
    if b.buf.dtype() != dtype || bias.is_some_and(|c| c.buf.dtype() != dtype) {
        bail!("gemm: operands must share one dtype ({dtype} and {})", b.buf.dtype());
    }
    let (na, nb, nc) = g.sizes();
    if a.buf.len() < na || b.buf.len() < nb || bias.is_some_and(|c| c.buf.len() < g.n) {
        bail!("gemm: buffers too small for {g:?}");
    }
    if bias.is_some() && g.batch != 1 {
        bail!("gemm: the bias epilogue is only used for unbatched products");
    }
    let mut out = dev.alloc(nc, dtype)?;
    if nc == 0 {
        return Ok(out);
    }
    if g.k == 0 {
        bail!("gemm: empty contracted dimension");
    }
    let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
    let batched = g.batch > 1;
    let cfg = MatmulConfig {
        // cuBLASLt "A" = our B, "B" = our A (see the module comment).
        transa: g.trans_b,
        transb: g.trans_a,
        transc: false,
        m: n,
        n: m,
        k,
        alpha: 1.0,
        lda: if g.trans_b { k } else { n } as i64,
        ldb: if g.trans_a { m } else { k } as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: batched.then_some(g.stride_b() as i64),
        stride_b: batched.then_some(g.stride_a() as i64),
        stride_c: batched.then_some(g.stride_c() as i64),
        stride_bias: None,
        batch_size: if batched {
            Some(i32::try_from(g.batch).map_err(|_| crate::Error::msg(format!("gemm: batch {} too large", g.batch)))?)
        } else {
            None
        },
    };
    let blas = dev.blaslt()?;
    match (&a.buf, &b.buf, &mut out) {
        (CudaBuf::F32(x), CudaBuf::F32(y), CudaBuf::F32(o)) => {
            let bias = match bias.map(|c| &c.buf) {
                Some(CudaBuf::F32(s)) => Some(s),
                Some(_) => bail!("gemm: bias dtype mismatch"),
                None => None,
            };
            // SAFETY: the layouts in `cfg` address exactly the `sizes()` elements of the
            // row-major operands described by `g` (checked against the buffer lengths
            // above); the output is a fresh buffer of `nc` elements; the bias has n.
            unsafe { blas.matmul(cfg, y, x, o, bias, None) }
        }
        (CudaBuf::BF16(x), CudaBuf::BF16(y), CudaBuf::BF16(o)) => {
            let bias = match bias.map(|c| &c.buf) {
                Some(CudaBuf::BF16(s)) => Some(s),
                Some(_) => bail!("gemm: bias dtype mismatch"),
                None => None,
            };
            // SAFETY: as above.
            unsafe { blas.matmul(cfg, y, x, o, bias, None) }
        }
        _ => bail!("gemm: dtype mismatch"),
    }
    .map_err(crate::Error::from)
    .with_ctx(|| format!("cuBLASLt {dtype} gemm {g:?}"))?;
    Ok(out)
}
