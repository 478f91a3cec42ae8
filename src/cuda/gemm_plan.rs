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

/// What determines a plan: the element type and every field of the configuration that
/// reaches a layout or the descriptor, and the epilogue: bias, GELU-tanh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    dtype: DType,
    trans: (bool, bool, bool),
    mnk: (u64, u64, u64),
    ld: (i64, i64, i64),
    strides: (Option<i64>, Option<i64>, Option<i64>),
    batch: Option<i32>,
    bias: bool,
    gelu: bool,
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
    let epilogue = match (key.bias, key.gelu) {
        (true, false) => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
        (true, true) => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
        (false, true) => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU,
        (false, false) => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
    };
    // SAFETY: the descriptor is live; transposes and the epilogue are 4-byte values.
    unsafe {
        set_desc_u32(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, cfg.transa as u32)?;
        set_desc_u32(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, cfg.transb as u32)?;
        set_desc_u32(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_TRANSC, cfg.transc as u32)?;
        set_desc_u32(plan.desc, DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue as u32)?;
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
    let key = Key {
        dtype: T::DTYPE,
        trans: (cfg.transa, cfg.transb, cfg.transc),
        mnk: (cfg.m, cfg.n, cfg.k),
        ld: (cfg.lda, cfg.ldb, cfg.ldc),
        strides: (cfg.stride_a, cfg.stride_b, cfg.stride_c),
        batch: cfg.batch_size,
        bias: bias.is_some(),
        gelu,
    };
    if cfg.stride_bias.is_some() {
        return Err(Error::msg("gemm plans: batched bias strides are not used by the engine"));
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
    let plan = match entry.plans.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => v.insert(build(blas, &key, cfg, ws_bytes)?),
    };
    let stream = blas.stream();
    let (bias_ptr, _rb) = bias.map(|x| x.device_ptr(stream)).unzip();
    if let Some(ptr) = bias_ptr {
        // SAFETY: the descriptor is live and owned by this plan, used under the lock; the
        // value is a device address of the bias (n elements, checked by the caller).
        unsafe {
            result::set_matmul_desc_attribute(
                plan.desc,
                DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&ptr) as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
        }?;
    }
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
