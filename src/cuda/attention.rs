//! Launchers of `kernels/attention.cu` and `kernels/attention_mma.cu`: flash attention
//! forward (output + row log-sum-exp) and backward (D = rowsum(dO∘O), then dq, dk, dv and
//! optionally dbias), bf16 tensors with fp32 statistics, for head dims 32, 64, 80, 96 and
//! 128.
//!
//! Three kinds of kernels exist (see [`AttentionKernel`]): the WMMA ones, the default, the
//! mma.sync ones with register-resident scores, and wgmma ones for sm_90 (Hopper); the
//! newer ones become the default once a GPU run has shown them correct and faster
//! (docs/PERF.md). `SYNTHOS_CUDA_ATTENTION=wmma|mma|mma128|mma-r32|mma-det|wgmma|wgmma-det|
//! wgmma-ovl|wgmma-ws` picks a set for a process, [`with_attention_kernel`] for a closure on
//! one thread.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{kernel_name, CudaBuf, CudaDevice, CudaStorage, Elem, PushBuf};
use crate::desc::{AttentionInputs, AttentionParams};
use crate::{bail, DType, Result, ResultExt};

/// Threads per block of both kernels (4 warps).
const THREADS: u32 = 128;
/// Query rows per forward block (`FWD_BQ` in the kernel).
const FWD_QUERIES: usize = 64;
/// Keys per backward block (`BWD_BK` in attention.cu, `MMA_BWD_BK` in attention_mma.cu;
/// both backward kernels run 128 threads).
const BWD_KEYS: usize = 64;

/// Head dims with a compiled kernel.
const HEAD_DIMS: [usize; 5] = [32, 64, 80, 96, 128];

/// Dynamic shared memory of the forward kernel (mirrors `FwdSmem<DH>::BYTES`, which the
/// kernel asserts at compile time and checks at run time).
fn fwd_smem_bytes(head_dim: usize) -> usize {
    384 * (head_dim + 8) + 27136
}

/// A set of attention kernels (forward and backward; the backward's `attn_bwd_dot` for D
/// is shared).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `attn_fwd_d<Dh>_bf16` and `attn_bwd_d<Dh>_bf16` (attention.cu): WMMA tiles, scores
    /// through shared memory.
    Wmma,
    /// `attn_fwd_mma_w4_d<Dh>_bf16` and `attn_bwd_mma_d<Dh>_bf16` (attention_mma.cu):
    /// mma.sync with scores in registers, cp.async double buffering; the forward with 64
    /// query rows per block of 4 warps.
    Mma,
    /// As [`AttentionKernel::Mma`] with the forward's `attn_fwd_mma_w8_d<Dh>_bf16`: 128
    /// query rows per block of 8 warps, for head dims 64 and 128 (others use 4 warps).
    Mma128,
    /// As [`AttentionKernel::Mma`] with the forward's `attn_fwd_mma_w4_m2_d<Dh>_bf16`: 128
    /// query rows per block of 4 warps, 32 rows each (every K and V operand serves two row
    /// tiles: half the shared-memory reads per product), key tiles of 32, for head dims
    /// 64 and 128 (others use the 16-row form).
    MmaRows32,
    /// As [`AttentionKernel::Mma`], with the deterministic backward: dk and dv from
    /// `attn_bwd_dkdv_mma_d<Dh>_bf16`, dq and dbias from `attn_bwd_dq_mma_d<Dh>_bf16`
    /// (scores recomputed per query block), no atomics: bit-identical results run to run.
    MmaDeterministic,
    /// On compute capability 9.0 (sm_90a code), for head dims 64 and 128, the kernels of
    /// attention_wgmma.cu on Hopper's warpgroup tensor-core instruction: the forward's
    /// `attn_fwd_wgmma_d<Dh>_bf16` (128 query rows per block of two warpgroups, key tiles of
    /// 128) and the backward's `attn_bwd_wgmma_d<Dh>_bf16` (128 keys per block, query tiles
    /// of 64, dq and dbias with atomics); other head dims and other GPUs as
    /// [`AttentionKernel::Mma`].
    Wgmma,
    /// As [`AttentionKernel::Wgmma`], with the deterministic backward: dk and dv from
    /// `attn_bwd_dkdv_wgmma_d<Dh>_bf16`, dq and dbias from `attn_bwd_dq_wgmma_d<Dh>_bf16`
    /// (128 query rows per block, key tiles of 64), no atomics (elsewhere as
    /// [`AttentionKernel::MmaDeterministic`]).
    WgmmaDeterministic,
    /// As [`AttentionKernel::Wgmma`], with the forward's `attn_fwd_wgmma_ovl_d<Dh>_bf16`:
    /// each warpgroup runs the softmax of key tile j while the products of tile j-1's P·V
    /// are in flight (three V stages; 1536·Dh + 1024 bytes of shared memory).
    WgmmaOverlap,
    /// As [`AttentionKernel::Wgmma`], with the forward's `attn_fwd_wgmma_ws_d<Dh>_bf16`
    /// (FlashAttention-3's schedule): a producer warpgroup loads Q, K and V with TMA into
    /// mbarrier-guarded stages, and two consumer warpgroups run the overlapped tile step in
    /// pingpong (one's softmax while the other's products run); 384 threads, 1280·Dh + 1152
    /// bytes of shared memory. Tensors whose base is not 16-byte aligned (a TMA rule) take
    /// the overlapped forward.
    WgmmaWarpSpecialized,
}

impl AttentionKernel {
    /// The name `SYNTHOS_CUDA_ATTENTION` takes.
    pub fn name(self) -> &'static str {
        match self {
            AttentionKernel::Wmma => "wmma",
            AttentionKernel::Mma => "mma",
            AttentionKernel::Mma128 => "mma128",
            AttentionKernel::MmaRows32 => "mma-r32",
            AttentionKernel::MmaDeterministic => "mma-det",
            AttentionKernel::Wgmma => "wgmma",
            AttentionKernel::WgmmaDeterministic => "wgmma-det",
            AttentionKernel::WgmmaOverlap => "wgmma-ovl",
            AttentionKernel::WgmmaWarpSpecialized => "wgmma-ws",
        }
    }

    /// Every set (the first is the default).
    pub const ALL: [AttentionKernel; 9] = [
        AttentionKernel::Wmma,
        AttentionKernel::Mma,
        AttentionKernel::Mma128,
        AttentionKernel::MmaRows32,
        AttentionKernel::MmaDeterministic,
        AttentionKernel::Wgmma,
        AttentionKernel::WgmmaDeterministic,
        AttentionKernel::WgmmaOverlap,
        AttentionKernel::WgmmaWarpSpecialized,
    ];

    /// True for the set whose backward uses no atomics.
    pub fn deterministic_backward(self) -> bool {
        matches!(self, AttentionKernel::MmaDeterministic | AttentionKernel::WgmmaDeterministic)
    }

    /// True when this set runs its wgmma kernels for `head_dim` on `dev`: a wgmma set, head
    /// dim 64 or 128, compute capability 9.0 (the sm_90a code).
    fn hopper(self, head_dim: usize, dev: &CudaDevice) -> Result<bool> {
        Ok(matches!(
            self,
            AttentionKernel::Wgmma
                | AttentionKernel::WgmmaDeterministic
                | AttentionKernel::WgmmaOverlap
                | AttentionKernel::WgmmaWarpSpecialized
        ) && WGMMA_HEAD_DIMS.contains(&head_dim)
            && dev.compute_capability()? == (9, 0))
    }

    /// The mma forward kernel's shape at `head_dim` (None for WMMA).
    fn mma_forward(self, head_dim: usize) -> Option<MmaForward> {
        let wide = head_dim == 64 || head_dim == 128;
        let (warps, row_tiles, key_tile) = match self {
            AttentionKernel::Wmma => return None,
            AttentionKernel::Mma
            | AttentionKernel::MmaDeterministic
            | AttentionKernel::Wgmma
            | AttentionKernel::WgmmaDeterministic
            | AttentionKernel::WgmmaOverlap
            | AttentionKernel::WgmmaWarpSpecialized => (4, 1, 64),
            AttentionKernel::Mma128 if wide => (8, 1, 64),
            AttentionKernel::MmaRows32 if wide => (4, 2, 32),
            AttentionKernel::Mma128 | AttentionKernel::MmaRows32 => (4, 1, 64),
        };
        Some(MmaForward { warps, row_tiles, key_tile })
    }
}

/// The variable that picks the attention kernels.
const ATTENTION_VAR: &str = "SYNTHOS_CUDA_ATTENTION";

/// The attention kernels in use on this thread: a [`with_attention_kernel`] override, else
/// `SYNTHOS_CUDA_ATTENTION` (read once), else WMMA. An unknown value is an error naming
/// the variable.
pub fn attention_kernel() -> Result<AttentionKernel> {
    let names = AttentionKernel::ALL.map(AttentionKernel::name);
    Ok(AttentionKernel::ALL[super::choice::get(ATTENTION_VAR, &names)?])
}

/// Runs `f` with `kernel` as this thread's attention kernels.
pub fn with_attention_kernel<R>(kernel: AttentionKernel, f: impl FnOnce() -> R) -> R {
    let index = AttentionKernel::ALL.iter().position(|k| *k == kernel).unwrap_or(0);
    super::choice::with(ATTENTION_VAR, index, f)
}

/// The shape of an mma forward kernel (`MmaFwd<DH, W, MT, BK>`).
#[derive(Clone, Copy, Debug)]
struct MmaForward {
    /// Warps per block (W).
    warps: usize,
    /// 16-row query tiles per warp (MT).
    row_tiles: usize,
    /// Keys per tile (BK).
    key_tile: usize,
}

impl MmaForward {
    /// Query rows per block.
    fn rows(&self) -> usize {
        16 * self.row_tiles * self.warps
    }

    /// Entry point: `attn_fwd_mma_w<W>[_m<MT>]_d<Dh>_bf16`.
    fn name(&self, head_dim: usize) -> &'static str {
        let m = if self.row_tiles > 1 { format!("_m{}", self.row_tiles) } else { String::new() };
        kernel_name(&format!("attn_fwd_mma_w{}{m}_d{head_dim}", self.warps), DType::BF16)
    }

    /// Dynamic shared memory (mirrors `MmaFwd::BYTES`: Q for the block's rows and two
    /// stages of K and V tiles, Dh+8 bf16 per row).
    fn smem_bytes(&self, head_dim: usize) -> usize {
        (self.rows() + 4 * self.key_tile) * (head_dim + 8) * 2
    }
}

/// Head dims of the wgmma forward.
const WGMMA_HEAD_DIMS: [usize; 2] = [64, 128];
/// Query rows per block (and threads) of the wgmma forward (`WgFwd::BQ`, `THREADS`).
const WGMMA_QUERIES: usize = 128;
const WGMMA_THREADS: u32 = 256;

/// Dynamic shared memory of the wgmma forward (mirrors `WgFwd<DH, false>::BYTES`: Q 128 rows and
/// two stages of K and V 128 rows, Dh bf16 each, and 1024 bytes to align the tiles).
fn wgmma_fwd_smem_bytes(head_dim: usize) -> usize {
    1280 * head_dim + 1024
}

/// Dynamic shared memory of the overlapped wgmma forward (mirrors `WgFwd<DH, true>::BYTES`: Q
/// 128 rows, two stages of K and three of V 128 rows, Dh bf16 each, and 1024 bytes to align
/// the tiles).
fn wgmma_fwd_ovl_smem_bytes(head_dim: usize) -> usize {
    1536 * head_dim + 1024
}

/// Threads of the warp-specialised wgmma forward (`WgWs::THREADS`: a producer and two
/// consumer warpgroups; 128 query rows per block).
const WGMMA_WS_THREADS: u32 = 384;

/// Dynamic shared memory of the warp-specialised wgmma forward (mirrors `WgWs<DH>::BYTES`:
/// Q 128 rows, two stages of K and V 128 rows, Dh bf16 each, 9 mbarriers in 128 bytes, and
/// 1024 bytes to align the tiles).
fn wgmma_fwd_ws_smem_bytes(head_dim: usize) -> usize {
    1280 * head_dim + 1152
}

/// A TMA tensor map (`CUtensorMap`), passed to a kernel by value (`const __grid_constant__
/// ptx::TmaMap` in kernels/tma.cuh). 128-byte aligned, as CUDA 13's `CUtensorMap` is
/// declared (the hardware needs 64).
#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct TmaMap([u64; 16]);

// SAFETY: a plain 128-byte, 128-byte-aligned value, as the kernel parameter is declared.
unsafe impl DeviceRepr for TmaMap {}

/// The tensor map of a `[B, N, H, Dh]` bf16 tensor at device address `ptr` for the
/// warp-specialised forward: a 4-d map (Dh innermost), boxes of 64 head dims × 1 head × 128
/// tokens in the 128-byte swizzle (each box lands as one 64-column panel of the kernel's
/// tiles), tokens past N zero-filled. None when `ptr` is not 16-byte aligned; an error
/// names the tensor when the driver refuses the map.
fn bhnd_tensor_map(
    dev: &CudaDevice,
    what: &str,
    ptr: u64,
    batch: usize,
    n: usize,
    heads: usize,
    head_dim: usize,
) -> Result<Option<TmaMap>> {
    if !ptr.is_multiple_of(16) {
        return Ok(None);
    }
    let row = (head_dim * 2) as u64;
    let dims: [u64; 4] = [head_dim as u64, heads as u64, n as u64, batch as u64];
    let strides: [u64; 3] = [row, row * heads as u64, row * (heads * n) as u64];
    let boxes: [u32; 4] = [64, 1, WGMMA_QUERIES as u32, 1];
    let element_strides: [u32; 4] = [1; 4];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
    // The encoding is a driver call: it needs the device's context current on this thread.
    dev.ctx.bind_to_thread()?;
    // SAFETY: every array has the rank's length; the driver writes the 128-byte map and reads
    // nothing else.
    let status = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            4,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        bail!("attention: the driver refused the TMA tensor map of {what} ([{batch}, {n}, {heads}, {head_dim}] bf16): {status:?}");
    }
    // SAFETY: initialised by the successful call.
    Ok(Some(TmaMap(unsafe { map.assume_init() }.opaque)))
}

/// Keys per block (and threads) of the wgmma backward kernels (`WgBwd::BK`, `THREADS`).
const WGMMA_BWD_KEYS: usize = 128;

/// Dynamic shared memory of the wgmma backward kernels (mirrors `WgBwd<DH>::BYTES`: K, V
/// 128 rows and two stages of Q, dO 64 rows, Dh bf16 each, dS^T 128 × 64 bf16, L and D
/// 2 × 64 fp32 each, and 1024 bytes to align the tiles).
fn wgmma_bwd_smem_bytes(head_dim: usize) -> usize {
    1024 * head_dim + 18432
}

/// Query rows per block of the wgmma dq kernel (`WgDq::BQ`; 256 threads).
const WGMMA_DQ_QUERIES: usize = 128;

/// Dynamic shared memory of the wgmma dq kernel (mirrors `WgDq<DH>::BYTES`: Q, dO 128 rows
/// and two stages of K, V 64 rows, Dh bf16 each, and 1024 bytes to align the tiles).
fn wgmma_dq_smem_bytes(head_dim: usize) -> usize {
    1024 * head_dim + 1024
}

/// Dynamic shared memory of the mma backward kernel (mirrors `MmaBwd<DH>::BYTES`: K, V
/// 64 rows and two stages of Q, dO 32 rows of Dh+8 bf16, dS^T 64 × 40 bf16, L and D 2 × 32
/// fp32 each).
fn mma_bwd_smem_bytes(head_dim: usize) -> usize {
    512 * (head_dim + 8) + 5632
}

/// Query rows per block of the deterministic backward's dq kernel (`MMA_DQ_BQ`).
const DQ_QUERIES: usize = 64;

/// Dynamic shared memory of the dq kernel (mirrors `MmaDq<DH>::BYTES`: Q, dO 64 rows and
/// two stages of K, V 32 rows of Dh+8 bf16).
fn mma_dq_smem_bytes(head_dim: usize) -> usize {
    512 * (head_dim + 8)
}

/// Dynamic shared memory of the backward kernel (mirrors `BwdSmem<DH>::BYTES`).
fn bwd_smem_bytes(head_dim: usize) -> usize {
    384 * (head_dim + 8) + 33280
}

/// Entry points (forward, backward) for a head dim: `attn_{fwd,bwd}_d<Dh>_bf16`.
fn kernel_names(head_dim: usize) -> Result<(&'static str, &'static str)> {
    if !HEAD_DIMS.contains(&head_dim) {
        bail!(
            "attention: head dim {head_dim} has no CUDA kernel (supported: {HEAD_DIMS:?}); the CPU path supports any head dim"
        );
    }
    Ok((
        kernel_name(&format!("attn_fwd_d{head_dim}"), DType::BF16),
        kernel_name(&format!("attn_bwd_d{head_dim}"), DType::BF16),
    ))
}

/// Errors (naming the supported sizes) unless `head_dim` has a compiled kernel.
pub fn check_head_dim(head_dim: usize) -> Result<()> {
    kernel_names(head_dim).map(|_| ())
}

/// Loads `name` and allows it `bytes` of dynamic shared memory (above the default 48 KB
/// a kernel must opt in), with an error when the GPU has less. The check and the
/// attribute are done once per (device, kernel): each kernel always asks for the same
/// size, and the attribute stays with the loaded function.
fn kernel_with_smem(dev: &CudaDevice, module: &'static str, name: &'static str, bytes: usize) -> Result<CudaFunction> {
    static CONFIGURED: OnceLock<Mutex<HashSet<(usize, &'static str)>>> = OnceLock::new();
    let f = dev.func(module, name)?;
    let mut done = CONFIGURED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if !done.contains(&(dev.ordinal, name)) {
        let limit =
            dev.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        if bytes > limit {
            bail!("attention: kernel {name} needs {bytes} bytes of shared memory per block, this GPU allows {limit}");
        }
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)?;
        done.insert((dev.ordinal, name));
    }
    Ok(f)
}

/// The bf16 buffer of tensor `what`, or an error naming it.
fn bf16_slice<'a>(what: &str, s: &'a CudaStorage) -> Result<&'a CudaSlice<bf16>> {
    bf16::of(&s.buf).with_ctx(|| format!("attention: {what}"))
}

/// The f32 buffer of tensor `what`, or an error naming it.
fn f32_slice<'a>(what: &str, s: &'a CudaStorage) -> Result<&'a CudaSlice<f32>> {
    f32::of(&s.buf).with_ctx(|| format!("attention: {what}"))
}

/// The sizes as the kernels take them (i32), checked against the grid limits.
struct KernelDims {
    q_len: i32,
    kv_len: i32,
    heads: i32,
    bias_batch: i32,
}

fn kernel_dims(p: &AttentionParams) -> Result<KernelDims> {
    let fits = |x: usize| i32::try_from(x).ok();
    if p.heads > 65535 || p.batch > 65535 {
        bail!("attention: {} heads × batch {} exceeds the CUDA grid (at most 65535 each)", p.heads, p.batch);
    }
    match (fits(p.q_len), fits(p.kv_len), fits(p.heads), fits(p.bias_batch)) {
        (Some(q_len), Some(kv_len), Some(heads), Some(bias_batch)) => {
            Ok(KernelDims { q_len, kv_len, heads, bias_batch })
        }
        _ => bail!("attention: sequence lengths {} / {} exceed the kernels' 32-bit indices", p.q_len, p.kv_len),
    }
}

/// Optional f32 inputs (key mask, bias): the buffer, or a one-element stand-in the
/// kernel never reads (its flag is 0).
fn optional_f32<'a>(what: &str, s: Option<&'a CudaStorage>, dummy: &'a CudaSlice<f32>) -> Result<&'a CudaSlice<f32>> {
    s.map_or(Ok(dummy), |s| f32_slice(what, s))
}

/// Forward: returns the output `[B, Nq, H, Dh]` (bf16) and the row log-sum-exp
/// `[B, H, Nq]` (f32, +inf for rows whose keys are all hidden). q, k, v must be bf16,
/// the key mask and bias f32.
pub fn forward(p: &AttentionParams, x: &AttentionInputs<CudaStorage>) -> Result<(CudaBuf, CudaBuf)> {
    let dev = &x.q.dev;
    let (wmma_name, _) = kernel_names(p.head_dim)?;
    let kd = kernel_dims(p)?;
    let kernel = attention_kernel()?;
    let hopper = kernel.hopper(p.head_dim, dev)?;
    let (q, k, v) = (bf16_slice("q", x.q)?, bf16_slice("k", x.k)?, bf16_slice("v", x.v)?);
    // The warp-specialised forward reads q, k and v through TMA tensor maps (the guards
    // record those reads for cudarc's stream tracking when dropped, after the launch).
    let pointers = (hopper && kernel == AttentionKernel::WgmmaWarpSpecialized)
        .then(|| (q.device_ptr(&dev.stream), k.device_ptr(&dev.stream), v.device_ptr(&dev.stream)));
    let maps = match &pointers {
        Some(((qp, _), (kp, _), (vp, _))) => match (
            bhnd_tensor_map(dev, "q", *qp, p.batch, p.q_len, p.heads, p.head_dim)?,
            bhnd_tensor_map(dev, "k", *kp, p.batch, p.kv_len, p.heads, p.head_dim)?,
            bhnd_tensor_map(dev, "v", *vp, p.batch, p.kv_len, p.heads, p.head_dim)?,
        ) {
            (Some(qm), Some(km), Some(vm)) => Some([qm, km, vm]),
            _ => None,
        },
        None => None,
    };
    let (module, name, smem, rows, threads) = match kernel.mma_forward(p.head_dim) {
        _ if maps.is_some() => (
            "attention_wgmma",
            kernel_name(&format!("attn_fwd_wgmma_ws_d{}", p.head_dim), DType::BF16),
            wgmma_fwd_ws_smem_bytes(p.head_dim),
            WGMMA_QUERIES,
            WGMMA_WS_THREADS,
        ),
        // (also the warp-specialised set's forward when a tensor is not 16-byte aligned)
        _ if hopper && matches!(kernel, AttentionKernel::WgmmaOverlap | AttentionKernel::WgmmaWarpSpecialized) => (
            "attention_wgmma",
            kernel_name(&format!("attn_fwd_wgmma_ovl_d{}", p.head_dim), DType::BF16),
            wgmma_fwd_ovl_smem_bytes(p.head_dim),
            WGMMA_QUERIES,
            WGMMA_THREADS,
        ),
        _ if hopper => (
            "attention_wgmma",
            kernel_name(&format!("attn_fwd_wgmma_d{}", p.head_dim), DType::BF16),
            wgmma_fwd_smem_bytes(p.head_dim),
            WGMMA_QUERIES,
            WGMMA_THREADS,
        ),
        None => ("attention", wmma_name, fwd_smem_bytes(p.head_dim), FWD_QUERIES, THREADS),
        Some(m) => ("attention_mma", m.name(p.head_dim), m.smem_bytes(p.head_dim), m.rows(), 32 * m.warps as u32),
    };
    let f = kernel_with_smem(dev, module, name, smem)?;
    let dummy = dev.unused_f32()?;
    let mask = optional_f32("key_mask", x.key_mask, dummy)?;
    let bias = optional_f32("bias", x.bias, dummy)?;
    let mut out = dev.alloc(p.batch * p.q_len * p.heads * p.head_dim, DType::BF16)?;
    let mut lse = dev.alloc(p.batch * p.heads * p.q_len, DType::F32)?;
    let (has_mask, causal) = (x.key_mask.is_some() as i32, p.causal as i32);
    let cfg = LaunchConfig {
        grid_dim: (p.q_len.div_ceil(rows) as u32, p.heads as u32, p.batch as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut lb = dev.stream.launch_builder(&f);
    match &maps {
        Some([qm, km, vm]) => lb.arg(qm).arg(km).arg(vm),
        None => lb.arg(q).arg(k).arg(v),
    };
    lb.arg(mask).arg(bias).buf_mut(&mut out).buf_mut(&mut lse);
    lb.arg(&kd.q_len).arg(&kd.kv_len).arg(&kd.heads).arg(&kd.bias_batch);
    lb.arg(&has_mask).arg(&causal).arg(&p.scale);
    // SAFETY: q is [B, Nq, H, Dh] and k, v [B, Nk, H, Dh] bf16 (passed as pointers, or as
    // tensor maps of exactly those shapes over the same buffers); the mask ([B, Nk]) and
    // bias ([bias_batch, H, Nq, Nk]) are read only when their flags are set; the kernel
    // writes out rows < Nq and lse [B, H, Nq], all in range, and the grid covers
    // ceil(Nq/rows) × H × B blocks of the kernel's thread count, with the shared memory
    // it was built for (checked by the kernel).
    unsafe { lb.launch(cfg) }?;
    Ok((out, lse))
}

/// Gradients computed on the GPU: dq, dk, dv bf16 (like q, k, v) and dbias f32.
pub struct CudaAttentionGrads {
    /// Gradient of q, `[B, Nq, H, Dh]`.
    pub dq: CudaBuf,
    /// Gradient of k, `[B, Nk, H, Dh]`.
    pub dk: CudaBuf,
    /// Gradient of v, `[B, Nk, H, Dh]`.
    pub dv: CudaBuf,
    /// Gradient of the bias, `[Bb, H, Nq, Nk]`, when asked for.
    pub dbias: Option<CudaBuf>,
}

/// Backward from the forward's output `out` and log-sum-exp `lse` and the output
/// gradient `dout` (bf16). dq and dbias are accumulated in fp32 with atomics; dq is then
/// cast to bf16.
pub fn backward(
    p: &AttentionParams,
    x: &AttentionInputs<CudaStorage>,
    out: &CudaStorage,
    lse: &CudaStorage,
    dout: &CudaStorage,
    want_dbias: bool,
) -> Result<CudaAttentionGrads> {
    let dev = &x.q.dev;
    let (_, bwd) = kernel_names(p.head_dim)?;
    let kd = kernel_dims(p)?;
    let (q, k, v) = (bf16_slice("q", x.q)?, bf16_slice("k", x.k)?, bf16_slice("v", x.v)?);
    let (o, g, l) = (bf16_slice("output", out)?, bf16_slice("output gradient", dout)?, f32_slice("lse", lse)?);
    let dummy = dev.unused_f32()?;
    let mask = optional_f32("key_mask", x.key_mask, dummy)?;
    let bias = optional_f32("bias", x.bias, dummy)?;
    let want_dbias = want_dbias && x.bias.is_some();

    // D = rowsum(dO ∘ O), one warp per (b, i, h) row.
    let rows = p.batch * p.q_len * p.heads;
    let mut drow = dev.stream.alloc_zeros::<f32>(rows.max(1))?;
    {
        let f = dev.func("attention", "attn_bwd_dot_bf16")?;
        let (rows64, dh) = (rows as i64, p.head_dim as i32);
        let mut lb = dev.stream.launch_builder(&f);
        lb.arg(o).arg(g).arg(&mut drow).arg(&kd.q_len).arg(&kd.heads).arg(&dh).arg(&rows64);
        // SAFETY: o and dout hold `rows` rows of Dh bf16; drow holds `rows` floats; one
        // warp per row, warps past the end return.
        unsafe { lb.launch(super::grid_1d(rows * 32, 256)) }?;
    }

    let kernel = attention_kernel()?;
    let hopper = kernel.hopper(p.head_dim, dev)?;
    if kernel.deterministic_backward() {
        return deterministic_backward(p, x, &drow, lse, dout, want_dbias, &kd, hopper);
    }
    let (module, name, smem, keys, threads) = match kernel {
        _ if hopper => (
            "attention_wgmma",
            kernel_name(&format!("attn_bwd_wgmma_d{}", p.head_dim), DType::BF16),
            wgmma_bwd_smem_bytes(p.head_dim),
            WGMMA_BWD_KEYS,
            WGMMA_THREADS,
        ),
        AttentionKernel::Wmma => ("attention", bwd, bwd_smem_bytes(p.head_dim), BWD_KEYS, THREADS),
        _ => (
            "attention_mma",
            kernel_name(&format!("attn_bwd_mma_d{}", p.head_dim), DType::BF16),
            mma_bwd_smem_bytes(p.head_dim),
            BWD_KEYS,
            THREADS,
        ),
    };
    let f = kernel_with_smem(dev, module, name, smem)?;
    let mut dq32 = dev.stream.alloc_zeros::<f32>(p.batch * p.q_len * p.heads * p.head_dim)?;
    let kv_elems = p.batch * p.kv_len * p.heads * p.head_dim;
    let mut dk = dev.alloc(kv_elems, DType::BF16)?;
    let mut dv = dev.alloc(kv_elems, DType::BF16)?;
    let mut dbias = if want_dbias {
        Some(dev.stream.alloc_zeros::<f32>(p.bias_batch * p.heads * p.q_len * p.kv_len)?)
    } else {
        None
    };
    let (has_mask, causal, want) = (x.key_mask.is_some() as i32, p.causal as i32, want_dbias as i32);
    let cfg = LaunchConfig {
        grid_dim: (p.kv_len.div_ceil(keys) as u32, p.heads as u32, p.batch as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(q).arg(k).arg(v).arg(g).arg(l).arg(&drow).arg(mask).arg(bias);
    lb.arg(&mut dq32).buf_mut(&mut dk).buf_mut(&mut dv);
    match dbias.as_mut() {
        Some(db) => lb.arg(db),
        None => lb.arg(dev.unused_f32()?),
    };
    lb.arg(&kd.q_len).arg(&kd.kv_len).arg(&kd.heads).arg(&kd.bias_batch);
    lb.arg(&has_mask).arg(&causal).arg(&want).arg(&p.scale);
    // SAFETY: inputs as in `forward`, plus dout [B, Nq, H, Dh] bf16 and lse, drow
    // [B, H, Nq] f32; dq32 (zeroed, [B, Nq, H, Dh]) and dbias (zeroed,
    // [bias_batch, H, Nq, Nk], only when `want`) receive atomic adds at in-range
    // positions; dk, dv rows < Nk are each written by exactly one warp of the
    // ceil(Nk/keys) × H × B grid of `threads`-thread blocks, with the shared memory the
    // kernel was built for (checked by the kernel).
    unsafe { lb.launch(cfg) }?;

    let n_q = p.batch * p.q_len * p.heads * p.head_dim;
    let dq = super::elementwise::cast(&CudaStorage { dev: dev.clone(), buf: CudaBuf::F32(dq32) }, DType::BF16, n_q)?;
    Ok(CudaAttentionGrads { dq, dk, dv, dbias: dbias.map(CudaBuf::F32) })
}

/// The two kernels of [`deterministic_backward`].
#[derive(Clone, Copy)]
enum BwdPart {
    /// dk and dv: blocks along the keys.
    DkDv,
    /// dq (and dbias): blocks along the queries.
    Dq,
}

/// The function and launch shape of one kernel of the deterministic backward,
/// `attn_bwd_{dkdv|dq}_{mma|wgmma}_d{Dh}`: one block per tile of keys (dk, dv) or queries
/// (dq) of each head and batch element, with the kernel's shared memory.
fn deterministic_kernel(
    dev: &CudaDevice,
    p: &AttentionParams,
    part: BwdPart,
    hopper: bool,
) -> Result<(CudaFunction, LaunchConfig)> {
    let dh = p.head_dim;
    let (module, kind, threads) =
        if hopper { ("attention_wgmma", "wgmma", WGMMA_THREADS) } else { ("attention_mma", "mma", THREADS) };
    let (what, len, smem, tile) = match (part, hopper) {
        (BwdPart::DkDv, true) => ("dkdv", p.kv_len, wgmma_bwd_smem_bytes(dh), WGMMA_BWD_KEYS),
        (BwdPart::DkDv, false) => ("dkdv", p.kv_len, mma_bwd_smem_bytes(dh), BWD_KEYS),
        (BwdPart::Dq, true) => ("dq", p.q_len, wgmma_dq_smem_bytes(dh), WGMMA_DQ_QUERIES),
        (BwdPart::Dq, false) => ("dq", p.q_len, mma_dq_smem_bytes(dh), DQ_QUERIES),
    };
    let name = kernel_name(&format!("attn_bwd_{what}_{kind}_d{dh}"), DType::BF16);
    let f = kernel_with_smem(dev, module, name, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (len.div_ceil(tile) as u32, p.heads as u32, p.batch as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    Ok((f, cfg))
}

/// The deterministic backward (no atomics): `attn_bwd_dkdv_mma` (dk, dv; one block per 64
/// keys) and `attn_bwd_dq_mma` (dq in bf16 and dbias per batch element; one block per 64
/// queries), or with `hopper` `attn_bwd_dkdv_wgmma` (one block per 128 keys) and
/// `attn_bwd_dq_wgmma` (one block per 128 queries), then a shared bias's gradient summed
/// over the batch by the column-sum kernel (a fixed split, so also reproducible).
#[allow(clippy::too_many_arguments)]
fn deterministic_backward(
    p: &AttentionParams,
    x: &AttentionInputs<CudaStorage>,
    drow: &CudaSlice<f32>,
    lse: &CudaStorage,
    dout: &CudaStorage,
    want_dbias: bool,
    kd: &KernelDims,
    hopper: bool,
) -> Result<CudaAttentionGrads> {
    let dev = &x.q.dev;
    let (q, k, v) = (bf16_slice("q", x.q)?, bf16_slice("k", x.k)?, bf16_slice("v", x.v)?);
    let (g, l) = (bf16_slice("output gradient", dout)?, f32_slice("lse", lse)?);
    let dummy = dev.unused_f32()?;
    let mask = optional_f32("key_mask", x.key_mask, dummy)?;
    let bias = optional_f32("bias", x.bias, dummy)?;
    let (has_mask, causal, want) = (x.key_mask.is_some() as i32, p.causal as i32, want_dbias as i32);

    let kv_elems = p.batch * p.kv_len * p.heads * p.head_dim;
    let mut dk = dev.alloc(kv_elems, DType::BF16)?;
    let mut dv = dev.alloc(kv_elems, DType::BF16)?;
    {
        let (f, cfg) = deterministic_kernel(dev, p, BwdPart::DkDv, hopper)?;
        let mut lb = dev.stream.launch_builder(&f);
        lb.arg(q).arg(k).arg(v).arg(g).arg(l).arg(drow).arg(mask).arg(bias);
        lb.buf_mut(&mut dk).buf_mut(&mut dv);
        lb.arg(&kd.q_len).arg(&kd.kv_len).arg(&kd.heads).arg(&kd.bias_batch);
        lb.arg(&has_mask).arg(&causal).arg(&p.scale);
        // SAFETY: inputs as in `backward`; dk, dv rows < Nk are each written by exactly
        // one warp of the ceil(Nk/keys) × H × B grid, with the shared memory the kernel was
        // built for (checked by the kernel).
        unsafe { lb.launch(cfg) }?;
    }

    let mut dq = dev.alloc(p.batch * p.q_len * p.heads * p.head_dim, DType::BF16)?;
    // dbias of every batch element ([B, H, Nq, Nk]), every element written once.
    let per_batch = p.batch * p.heads * p.q_len * p.kv_len;
    let mut dbias_full = if want_dbias { Some(dev.stream.alloc_zeros::<f32>(per_batch)?) } else { None };
    {
        let (f, cfg) = deterministic_kernel(dev, p, BwdPart::Dq, hopper)?;
        let mut lb = dev.stream.launch_builder(&f);
        lb.arg(q).arg(k).arg(v).arg(g).arg(l).arg(drow).arg(mask).arg(bias);
        lb.buf_mut(&mut dq);
        match dbias_full.as_mut() {
            Some(db) => lb.arg(db),
            None => lb.arg(dev.unused_f32()?),
        };
        lb.arg(&kd.q_len).arg(&kd.kv_len).arg(&kd.heads).arg(&kd.bias_batch);
        lb.arg(&has_mask).arg(&causal).arg(&want).arg(&p.scale);
        // SAFETY: inputs as in `backward`; dq rows < Nq are each written by exactly one
        // warp of the ceil(Nq/rows) × H × B grid, and with `want` every element of the
        // [B, H, Nq, Nk] dbias buffer by exactly one lane; the shared memory is the
        // kernel's (checked by the kernel).
        unsafe { lb.launch(cfg) }?;
    }
    let dbias = match dbias_full {
        None => None,
        Some(full) if p.bias_batch == p.batch => Some(CudaBuf::F32(full)),
        Some(full) => {
            let len = p.heads * p.q_len * p.kv_len;
            let storage = CudaStorage { dev: dev.clone(), buf: CudaBuf::F32(full) };
            Some(super::reduce::sum_to(&storage, &[p.batch, len], &[1, len])?)
        }
    };
    Ok(CudaAttentionGrads { dq, dk, dv, dbias })
}

/// Elements of one box of the TMA probe (128 tokens × 64 head dims).
pub const TMA_PROBE_BOX: usize = 128 * 64;

/// The cases of [`tma_layout_mismatches`]: tokens in the tensor and the first token of the
/// box (a box running past a longer tensor, and a tensor shorter than the box, as the
/// 77 keys of a text encoder's context are).
const TMA_PROBE_CASES: [(usize, i32); 2] = [(150, 100), (77, 0)];

/// The TMA path of the warp-specialised forward on its own (`kernels/tma_probe.cu`): one
/// box of a `[2, N, 3, 128]` bf16 tensor, its map encoded as the forward's
/// (`bhnd_tensor_map`), at head dims 64.., head 2 and 128 tokens of batch element 1, loaded
/// into shared memory and copied out as it lies there; twice: N = 150 from token 100 (the
/// last 78 tokens past the tensor), and N = 77 from token 0 (a tensor shorter than the
/// box). Returns how many of the 2 × [`TMA_PROBE_BOX`] elements differ (bit for bit) from
/// the layout the wgmma descriptors read (token r's 16-byte chunk c at chunk c ^ (r % 8),
/// zeros past the tensor), or `None` when the device is not compute capability 9.0.
pub fn tma_layout_mismatches(dev: &CudaDevice) -> Result<Option<usize>> {
    const PROBE_SMEM: u32 = 16384 + 1024 + 8;
    if dev.compute_capability()? != (9, 0) {
        return Ok(None);
    }
    let (batch, heads, head_dim) = (2usize, 3usize, 128usize);
    let (c0, c1, c3) = (64i32, 2i32, 1i32);
    let mut rng = crate::Rng::new(0x7a3a);
    let f = dev.func("tma_probe", "tma_probe_bf16")?;
    let mut bad = 0;
    for (n, c2) in TMA_PROBE_CASES {
        let x: Vec<bf16> = rng.normal_vec(batch * n * heads * head_dim, 1.0).into_iter().map(bf16::from_f32).collect();
        let mut want = vec![bf16::ZERO; TMA_PROBE_BOX];
        for r in 0..128 {
            let token = c2 as usize + r;
            if token >= n {
                continue;
            }
            for c in 0..64 {
                let src = ((c3 as usize * n + token) * heads + c1 as usize) * head_dim + c0 as usize + c;
                want[r * 64 + ((c / 8) ^ (r % 8)) * 8 + c % 8] = x[src];
            }
        }
        let dx = dev.stream.clone_htod(&x)?;
        let (ptr, _read) = dx.device_ptr(&dev.stream);
        let Some(map) = bhnd_tensor_map(dev, "the TMA probe's tensor", ptr, batch, n, heads, head_dim)? else {
            bail!("TMA probe: the device allocation is not 16-byte aligned");
        };
        let mut out = dev.stream.alloc_zeros::<bf16>(TMA_PROBE_BOX)?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: PROBE_SMEM };
        let mut lb = dev.stream.launch_builder(&f);
        lb.arg(&map).arg(&mut out).arg(&c0).arg(&c1).arg(&c2).arg(&c3);
        // SAFETY: the map describes dx ([2, n, 3, 128] bf16, alive until after the copy
        // back); out holds the box's 128 × 64 bf16; one block of 32 threads with the shared
        // memory the kernel checks for.
        unsafe { lb.launch(cfg) }?;
        let got = dev.stream.clone_dtoh(&out)?;
        bad += got.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
    }
    Ok(Some(bad))
}

/// The largest error of [`wgmma_layout_errors`], relative to the product, that a correct
/// layout stays under (fp32 rounding of 16 to 64 bf16 products is about 1e-7; a wrong
/// layout gives errors of order 1).
pub const WGMMA_LAYOUT_TOLERANCE: f64 = 1e-5;

/// The forms of the wgmma layout probe (`kernels/wgmma_probe.cu`), in its order: the
/// product's K and N (A is 64 × K, B is N × K, D = A·Bᵀ is 64 × N).
const WGMMA_PROBE_FORMS: [(usize, usize); 6] = [(16, 64), (16, 64), (16, 64), (64, 64), (16, 128), (16, 128)];

/// The wgmma operand layouts on their own (`kernels/wgmma_probe.cu`): `D = A·Bᵀ` of a
/// 64 × K and an N × K bf16 operand in each form the wgmma attention kernels use
/// (0: both K-major in shared memory, as S = Q·Kᵀ; 1: A in registers and B N-major, as
/// O += P·V; 2: A M-major and B N-major, as dQ = dS·K; all three at K = 16, N = 64;
/// 3: form 0 at K = 64 in four k-steps whose descriptors start 32 bytes further into the
/// swizzled rows, as Q·Kᵀ's steps through a 64-dim panel; 4: form 1 at N = 128, B in two
/// 64-column panels a leading byte offset apart, as P·V at head dim 128; 5: form 0 at
/// N = 128, as S = Q·Kᵀ of a 128-key tile), each against the product computed here.
/// Returns the largest absolute error of each form, relative to the largest magnitude of
/// its product (a correct layout gives fp32 rounding, about 1e-7), or `None` when the
/// device is not compute capability 9.0 (the probe is sm_90a code). When the attention
/// kernels disagree with the CPU on a GPU, this tells whether the layouts themselves are
/// at fault.
pub fn wgmma_layout_errors(dev: &CudaDevice) -> Result<Option<[f64; 6]>> {
    // The probe's shared memory: its four tiles (30 KB) and 1024 bytes to align them.
    const PROBE_SMEM: u32 = 30720 + 1024;
    if dev.compute_capability()? != (9, 0) {
        return Ok(None);
    }
    let mut rng = crate::Rng::new(0x5eed);
    let to_bf16 = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
    let f = dev.func("wgmma_probe", "wgmma_probe_bf16")?;
    let mut errors = [0.0f64; 6];
    for (form, (err, &(k, n))) in errors.iter_mut().zip(&WGMMA_PROBE_FORMS).enumerate() {
        let (a, b) = (to_bf16(rng.normal_vec(64 * k, 1.0)), to_bf16(rng.normal_vec(n * k, 1.0)));
        let mut want = vec![0.0f64; 64 * n];
        for i in 0..64 {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|kk| a[i * k + kk].to_f64() * b[j * k + kk].to_f64()).sum();
            }
        }
        let scale = want.iter().fold(0.0f64, |s, w| s.max(w.abs())).max(1e-30);
        let (da, db) = (dev.stream.clone_htod(&a)?, dev.stream.clone_htod(&b)?);
        let mut out = dev.stream.alloc_zeros::<f32>(64 * n)?;
        let form_arg = form as i32;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: PROBE_SMEM };
        let mut lb = dev.stream.launch_builder(&f);
        lb.arg(&da).arg(&db).arg(&mut out).arg(&form_arg);
        // SAFETY: a holds 64 × k bf16, b n × k bf16 and out 64 × n f32, the form's shapes;
        // one block of 128 threads (one warpgroup) with the shared memory the kernel checks
        // for.
        unsafe { lb.launch(cfg) }?;
        let got = dev.stream.clone_dtoh(&out)?;
        *err = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max) / scale;
    }
    Ok(Some(errors))
}
