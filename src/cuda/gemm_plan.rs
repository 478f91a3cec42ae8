//! Cached cuBLASLt plans (opt-in, `SYNTHOS_CUDA_GEMM_PLANS=1`): the matrix layouts, the
//! matmul descriptor and the heuristic's algorithm of each product shape are built once per
//! cuBLASLt handle and reused, instead of being created, queried and destroyed on every
//! call (cudarc's `Matmul::matmul` does that: three layouts, a descriptor, a preference
//! and a heuristic query, tens of microseconds of host time per product and about a
//! thousand products per 1.3B training step).
//!
//! A plan holds exactly what cudarc would build for the same [`MatmulConfig`]: the same
//! layouts, compute type (fp32 for bf16, TF32 for f32), scale type, transposes, bias
//! epilogue and workspace size, and the heuristic sees no pointers, so it picks the same
//! algorithm: results are identical to the uncached path. Only the bias pointer changes
//! between calls; it is set on the cached descriptor just before each call, under the
//! cache's lock (cuBLASLt reads descriptor attributes when the call is made).
//!
//! The GELU training epilogues, which cudarc's wrapper does not offer, always run through
//! plans ([`matmul_gelu_aux`], [`matmul_dgelu`]): `GELU_AUX[_BIAS]` writes the GELU input
//! to an aux matrix beside the output, `DGELU[_BGRAD]` multiplies the product by the GELU
//! derivative at that aux matrix and writes its column sums as a bias gradient. The aux
//! matrix has the output's layout; its leading dimension is part of the plan.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use cudarc::cublaslt::result;
use cudarc::cublaslt::sys::{
    self, cublasComputeType_t, cublasLtEpilogue_t, cublasLtMatmulDescAttributes_t as DescAttr,
    cublasLtMatrixLayoutAttribute_t as LayoutAttr, cudaDataType_t,
};
use cudarc::cublaslt::{CudaBlasLT, MatmulConfig, MatmulShared};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::Elem;
use crate::{DType, Error, Result};

/// The variable that turns the plan cache on.
const PLANS_VAR: &str = "SYNTHOS_CUDA_GEMM_PLANS";

/// True when products go through cached plans on this thread (a [`with_plans`] override,
/// else `SYNTHOS_CUDA_GEMM_PLANS=1`).
pub fn plans_enabled() -> Result<bool> {
    Ok(super::choice::get(PLANS_VAR, &["0", "1"])? == 1)
}

/// Runs `f` with the plan cache on or off on this thread.
pub fn with_plans<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::choice::with(PLANS_VAR, on as usize, f)
}

/// What cuBLASLt applies after the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Epilogue {
    /// The product (+ bias).
    Plain,
    /// GELU-tanh of the product (+ bias).
    Gelu,
    /// GELU-tanh of the product (+ bias), its input written to the aux matrix.
    GeluAux,
    /// The product times GELU-tanh' at the aux matrix; with a bias pointer, the result's
    /// sums along the rows of our C (cuBLASLt's columns) written there.
    DGelu,
}

/// What determines a plan: the element type and every field of the configuration that
/// reaches a layout or the descriptor, and the epilogue: bias (or bias gradient), GELU-tanh
/// and its aux matrix's leading dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    dtype: DType,
    trans: (bool, bool, bool),
    mnk: (u64, u64, u64),
    ld: (i64, i64, i64),
    strides: (Option<i64>, Option<i64>, Option<i64>),
    batch: Option<i32>,
    bias: bool,
    epilogue: Epilogue,
}

impl Key {
    fn new<T: Elem>(cfg: &MatmulConfig, bias: bool, epilogue: Epilogue) -> Key {
        Key {
            dtype: T::DTYPE,
            trans: (cfg.transa, cfg.transb, cfg.transc),
            mnk: (cfg.m, cfg.n, cfg.k),
            ld: (cfg.lda, cfg.ldb, cfg.ldc),
            strides: (cfg.stride_a, cfg.stride_b, cfg.stride_c),
            batch: cfg.batch_size,
            bias,
            epilogue,
        }
    }

    /// cuBLASLt's epilogue for this key.
    fn cublaslt_epilogue(&self) -> cublasLtEpilogue_t {
        use cublasLtEpilogue_t as E;
        match (self.epilogue, self.bias) {
            (Epilogue::Plain, false) => E::CUBLASLT_EPILOGUE_DEFAULT,
            (Epilogue::Plain, true) => E::CUBLASLT_EPILOGUE_BIAS,
            (Epilogue::Gelu, false) => E::CUBLASLT_EPILOGUE_GELU,
            (Epilogue::Gelu, true) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
            (Epilogue::GeluAux, false) => E::CUBLASLT_EPILOGUE_GELU_AUX,
            (Epilogue::GeluAux, true) => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
            (Epilogue::DGelu, false) => E::CUBLASLT_EPILOGUE_DGELU,
            (Epilogue::DGelu, true) => E::CUBLASLT_EPILOGUE_DGELU_BGRAD,
        }
    }

    /// Whether the epilogue reads or writes an aux matrix (laid out as C).
    fn aux(&self) -> bool {
        matches!(self.epilogue, Epilogue::GeluAux | Epilogue::DGelu)
    }
}

/// The cuBLASLt objects of one product shape.
struct Plan {
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    desc: sys::cublasLtMatmulDesc_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by this plan and is destroyed once; failures
        // leak a descriptor at worst.
        unsafe {
            let _ = result::destroy_matrix_layout(self.a);
            let _ = result::destroy_matrix_layout(self.b);
            let _ = result::destroy_matrix_layout(self.c);
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

/// The plans of one cuBLASLt handle and the workspace its products use.
struct Plans {
    workspace: CudaSlice<u8>,
    plans: HashMap<Key, Plan>,
}

// SAFETY: the cuBLASLt objects are plain handles, used only while the cache's mutex is
// held, from whichever thread holds it (cuBLASLt allows that for distinct calls).
unsafe impl Send for Plans {}

/// Every handle's plans, keyed by the handle's address.
fn cache() -> &'static Mutex<HashMap<usize, Plans>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Plans>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// cuBLASLt's workspace size on this device, as cudarc chooses it (32 MiB on sm_90+,
/// 4 MiB otherwise).
fn workspace_bytes(blas: &CudaBlasLT) -> Result<usize> {
    let major = blas
        .stream()
        .context()
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    Ok(if major >= 9 { 33_554_432 } else { 4_194_304 })
}

fn types(dtype: DType) -> (cudaDataType_t, cublasComputeType_t) {
    match dtype {
        DType::F32 => (cudaDataType_t::CUDA_R_32F, cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32),
        DType::BF16 => (cudaDataType_t::CUDA_R_16BF, cublasComputeType_t::CUBLAS_COMPUTE_32F),
    }
}

fn layout(
    dtype: cudaDataType_t,
    rows: u64,
    cols: u64,
    ld: i64,
    batch: Option<(i32, i64)>,
) -> Result<sys::cublasLtMatrixLayout_t> {
    let l = result::create_matrix_layout(dtype, rows, cols, ld)?;
    if let Some((count, stride)) = batch {
        // SAFETY: `l` is a live layout; the attribute values are an i32 and an i64, as
        // cuBLASLt documents for these attributes.
        unsafe {
            result::set_matrix_layout_attribute(
                l,
                LayoutAttr::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count) as *const i32 as *const c_void,
                4,
            )?;
            result::set_matrix_layout_attribute(
                l,
                LayoutAttr::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                (&stride) as *const i64 as *const c_void,
                8,
            )?;
        }
    }
    Ok(l)
}

/// Sets a 4-byte descriptor attribute.
///
/// # Safety
/// `desc` must be live and `attr` an attribute whose value is 4 bytes.
unsafe fn set_desc_u32(desc: sys::cublasLtMatmulDesc_t, attr: DescAttr, value: u32) -> Result<()> {
    // SAFETY: per the contract.
    unsafe { result::set_matmul_desc_attribute(desc, attr, (&value) as *const u32 as *const c_void, 4) }?;
    Ok(())
}

/// Builds the plan of `key` for `cfg`: the objects cudarc's `Matmul::matmul` builds.
fn build(blas: &CudaBlasLT, key: &Key, cfg: &MatmulConfig, workspace: usize) -> Result<Plan> {
    let (dt, compute) = types(key.dtype);
    let (a_rows, a_cols) = if cfg.transa { (cfg.k, cfg.m) } else { (cfg.m, cfg.k) };
    let (b_rows, b_cols) = if cfg.transb { (cfg.n, cfg.k) } else { (cfg.k, cfg.n) };
    let batch = |stride: Option<i64>| cfg.batch_size.zip(stride);
    let mut plan = Plan {
        a: layout(dt, a_rows, a_cols, cfg.lda, batch(cfg.stride_a))?,
        b: std::ptr::null_mut(),
        c: std::ptr::null_mut(),
        desc: std::ptr::null_mut(),
        // SAFETY: an all-zero algorithm is a valid placeholder until the heuristic fills it.
        algo: unsafe { std::mem::zeroed() },
    };
    plan.b = layout(dt, b_rows, b_cols, cfg.ldb, batch(cfg.stride_b))?;
    plan.c = layout(dt, cfg.m, cfg.n, cfg.ldc, batch(cfg.stride_c))?;
    plan.desc = result::create_matmul_desc(compute, cudaDataType_t::CUDA_R_32F)?;
    // SAFETY: the descriptor is live; transposes and the epilogue are 4-byte values, the
    // aux leading dimension an i64.
    unsafe {
        set_desc_u32(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, cfg.transa as u32)?;
        set_desc_u32(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, cfg.transb as u32)?;
        set_desc_u32(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSC, cfg.transc as u32)?;
        set_desc_u32(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE, key.cublaslt_epilogue() as u32)?;
        if key.aux() {
            // The aux matrix is laid out as C: its leading dimension is C's.
            let ld: i64 = cfg.ldc;
            result::set_matmul_desc_attribute(
                plan.desc,
                DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                (&ld) as *const i64 as *const c_void,
                8,
            )?;
        }
    }
    let pref = result::create_matmul_pref()?;
    // SAFETY: `pref` is live and destroyed below; the workspace size is a usize, as the
    // attribute requires; every handle passed to the heuristic is live.
    let heuristic = unsafe {
        let r = result::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&workspace) as *const usize as *const c_void,
            std::mem::size_of::<usize>(),
        )
        .and_then(|_| {
            result::get_matmul_algo_heuristic(*blas.handle(), plan.desc, plan.a, plan.b, plan.c, plan.c, pref)
        });
        let _ = result::destroy_matmul_pref(pref);
        r?
    };
    plan.algo = heuristic.algo;
    Ok(plan)
}

/// `c = op(a)·op(b)` (+ bias, then GELU-tanh when `gelu`) as cudarc's
/// `Matmul::matmul(cfg, a, b, c, bias, act)` computes it (`act` = `Activation::Gelu` when
/// `gelu`), through the cached plan of its shape.
///
/// # Safety
/// `cfg` must address only elements inside the views (as for cudarc's `matmul`).
pub unsafe fn matmul<T: Elem>(
    blas: &CudaBlasLT,
    cfg: &MatmulConfig,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    bias: Option<&CudaView<'_, T>>,
    gelu: bool,
    c: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let epilogue = if gelu { Epilogue::Gelu } else { Epilogue::Plain };
    let key = Key::new::<T>(cfg, bias.is_some(), epilogue);
    let stream = blas.stream();
    let (bias_ptr, _rb) = bias.map(|x| x.device_ptr(stream)).unzip();
    // SAFETY: per the contract; the bias holds n elements (checked by the caller).
    unsafe { launch(blas, &key, cfg, bias_ptr, None, a, b, c) }
}

/// `c = GELU-tanh(op(a)·op(b) + bias)` with the GELU input (the product + bias) written
/// to `aux`, laid out as `c` (cuBLASLt's `GELU_AUX[_BIAS]` epilogue), through the cached
/// plan of its shape. Unbatched products only; C's leading dimension (the aux matrix's)
/// must be a multiple of 8, as cuBLASLt requires.
///
/// # Safety
/// `cfg` must address only elements inside the views; `aux` must hold as many elements as
/// `c` spans and the bias (when given) `cfg.m`.
pub unsafe fn matmul_gelu_aux<T: Elem>(
    blas: &CudaBlasLT,
    cfg: &MatmulConfig,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    bias: Option<&CudaView<'_, T>>,
    aux: &mut CudaViewMut<'_, T>,
    c: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let key = Key::new::<T>(cfg, bias.is_some(), Epilogue::GeluAux);
    let stream = blas.stream();
    let (bias_ptr, _rb) = bias.map(|x| x.device_ptr(stream)).unzip();
    let (aux_ptr, _rx) = aux.device_ptr_mut(stream);
    // SAFETY: per the contract.
    unsafe { launch(blas, &key, cfg, bias_ptr, Some(aux_ptr), a, b, c) }
}

/// `c = (op(a)·op(b)) · GELU-tanh'(aux)` element-wise, `aux` laid out as `c` (cuBLASLt's
/// `DGELU` epilogue); with `bias_grad`, also the sums of `c` along its rows' direction
/// (one per column of our row-major C, `cfg.m` of them: `DGELU_BGRAD`) written there.
/// Unbatched products only; C's leading dimension must be a multiple of 8.
///
/// # Safety
/// `cfg` must address only elements inside the views; `aux` must hold as many elements as
/// `c` spans and `bias_grad` (when given) `cfg.m`.
pub unsafe fn matmul_dgelu<T: Elem>(
    blas: &CudaBlasLT,
    cfg: &MatmulConfig,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    aux: &CudaView<'_, T>,
    bias_grad: Option<&mut CudaViewMut<'_, T>>,
    c: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let key = Key::new::<T>(cfg, bias_grad.is_some(), Epilogue::DGelu);
    let stream = blas.stream();
    let (grad_ptr, _rg) = bias_grad.map(|x| x.device_ptr_mut(stream)).unzip();
    let (aux_ptr, _rx) = aux.device_ptr(stream);
    // SAFETY: per the contract.
    unsafe { launch(blas, &key, cfg, grad_ptr, Some(aux_ptr), a, b, c) }
}

/// Sets a device pointer attribute of a descriptor.
///
/// # Safety
/// `desc` must be live and `attr` a pointer attribute.
unsafe fn set_desc_ptr(desc: sys::cublasLtMatmulDesc_t, attr: DescAttr, ptr: u64) -> Result<()> {
    // SAFETY: per the contract; the value is a device address.
    unsafe {
        result::set_matmul_desc_attribute(desc, attr, (&ptr) as *const u64 as *const c_void, std::mem::size_of::<u64>())
    }?;
    Ok(())
}

/// Runs the product of `key` through its cached plan (built on first use), with the bias
/// (or bias gradient) and aux pointers set on the descriptor just before the call.
///
/// # Safety
/// `cfg` must address only elements inside the views; the pointers must address what the
/// key's epilogue reads or writes.
#[allow(clippy::too_many_arguments)]
unsafe fn launch<T: Elem>(
    blas: &CudaBlasLT,
    key: &Key,
    cfg: &MatmulConfig,
    bias_ptr: Option<u64>,
    aux_ptr: Option<u64>,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    c: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    if cfg.stride_bias.is_some() {
        return Err(Error::msg("gemm plans: batched bias strides are not used by the engine"));
    }
    if key.aux() && (cfg.batch_size.is_some() || aux_ptr.is_none()) {
        return Err(Error::msg("gemm plans: a GELU aux epilogue needs an unbatched product and an aux matrix"));
    }
    let handle_id = *blas.handle() as usize;
    let mut all = cache().lock().unwrap_or_else(|e| e.into_inner());
    let entry = match all.entry(handle_id) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            let bytes = workspace_bytes(blas)?;
            // SAFETY: the workspace is scratch memory cuBLASLt writes before reading.
            let workspace = unsafe { blas.stream().alloc::<u8>(bytes) }?;
            v.insert(Plans { workspace, plans: HashMap::new() })
        }
    };
    let ws_bytes = entry.workspace.len();
    let plan = match entry.plans.entry(*key) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => v.insert(build(blas, key, cfg, ws_bytes)?),
    };
    // SAFETY: the descriptor is live and owned by this plan, used under the lock; the
    // values are device addresses of what the epilogue reads or writes (the caller's
    // contract).
    unsafe {
        if let Some(ptr) = bias_ptr {
            set_desc_ptr(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, ptr)?;
        }
        if let Some(ptr) = aux_ptr {
            set_desc_ptr(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, ptr)?;
        }
    }
    let stream = blas.stream();
    let (pa, _ra) = a.device_ptr(stream);
    let (pb, _rb2) = b.device_ptr(stream);
    let (pc, _rc) = c.device_ptr_mut(stream);
    let (pw, _rw) = entry.workspace.device_ptr_mut(stream);
    let (alpha, beta) = (cfg.alpha, cfg.beta);
    // SAFETY: the plan describes `cfg`, which addresses only elements inside the views
    // (the caller's contract); the workspace holds `ws_bytes`; everything is issued on
    // the handle's stream.
    unsafe {
        result::matmul(
            *blas.handle(),
            plan.desc,
            (&alpha) as *const f32 as *const c_void,
            (&beta) as *const f32 as *const c_void,
            pa as *const c_void,
            plan.a,
            pb as *const c_void,
            plan.b,
            pc as *const c_void,
            plan.c,
            pc as *mut c_void,
            plan.c,
            (&plan.algo) as *const sys::cublasLtMatmulAlgo_t,
            pw as *mut c_void,
            ws_bytes,
            stream.cu_stream() as *mut _,
        )
    }?;
    Ok(())
}
