//! The CUDA side: device contexts, the embedded kernel modules, cuBLASLt, and the
//! launchers of our kernels (one submodule per kernel family, mirroring `kernels/*.cu`).
//!
//! Kernels are reached only through `ops/`, which dispatches on the device. Outside
//! `ops/`, the rest of the crate uses only the device registry: tensor storage (uploads,
//! downloads), `Device` (synchronisation, memory figures), the CLI's `info`, and the
//! bench (its fault-free profile, [`take_profile`]).
//! A missing driver, a missing GPU or a build without kernels is an [`Error`] that says
//! what to install, never a panic: the driver library's presence is checked before the
//! first driver call because cudarc's dynamic loader panics otherwise.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig};
use half::bf16;

use crate::{bail, DType, Error, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

pub use embedded::{KERNEL_ARCHS, KERNEL_MODULES};

/// A device buffer of one element type.
pub enum CudaBuf {
    /// fp32 elements.
    F32(CudaSlice<f32>),
    /// bf16 elements.
    BF16(CudaSlice<bf16>),
}

impl CudaBuf {
    /// Element type of the buffer.
    pub fn dtype(&self) -> DType {
        match self {
            CudaBuf::F32(_) => DType::F32,
            CudaBuf::BF16(_) => DType::BF16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            CudaBuf::F32(s) => s.len(),
            CudaBuf::BF16(s) => s.len(),
        }
    }

    /// True when the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device address of the first element (for tables a kernel reads, alignment
    /// checks). Event tracking is off, so the access record this takes is a no-op.
    pub fn device_addr(&self, stream: &Arc<cudarc::driver::CudaStream>) -> u64 {
        use cudarc::driver::DevicePtr;
        match self {
            CudaBuf::F32(s) => s.device_ptr(stream).0,
            CudaBuf::BF16(s) => s.device_ptr(stream).0,
        }
    }
}

/// A tensor's storage on a GPU: the buffer and the device that owns it.
pub struct CudaStorage {
    /// The owning device.
    pub dev: Arc<CudaDevice>,
    /// The elements.
    pub buf: CudaBuf,
}

/// One initialised GPU: context, the stream every op runs on, the loaded kernel
/// modules and a cuBLASLt handle.
pub struct CudaDevice {
    /// Device ordinal.
    pub ordinal: usize,
    /// The primary context.
    pub ctx: Arc<CudaContext>,
    /// The stream all work is issued on (in order, so no extra synchronisation is needed).
    pub stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    blaslt: OnceLock<std::result::Result<Arc<CudaBlasLT>, String>>,
    /// A one-element zero buffer for unused kernel arguments ([`CudaDevice::unused_f32`]).
    unused: OnceLock<std::result::Result<CudaSlice<f32>, String>>,
    /// The compute capability (major, minor), read once.
    capability: OnceLock<(i32, i32)>,
    /// The last kernel issued (named in fault reports).
    last_launch: Mutex<&'static str>,
    /// When the last kernel was issued (profile mode).
    launch_clock: Mutex<Option<std::time::Instant>>,
}

static POISON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// When on, every fresh device allocation is filled with NaN before a kernel writes it
/// (tests turn this on to catch unwritten output elements).
pub fn set_poison(on: bool) {
    POISON.store(on, std::sync::atomic::Ordering::Relaxed);
}

static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();

fn driver_present() -> bool {
    // SAFETY: only tries to open the driver library; no driver call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of usable GPUs (0 when no driver is installed).
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
}

/// True when `Cuda(ordinal)` can be opened and this build carries kernels.
pub fn is_usable(ordinal: usize) -> bool {
    !KERNEL_MODULES.is_empty() && ordinal < device_count()
}

/// Opens (once) and returns the GPU `ordinal`.
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    let devices = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = devices.lock().map_err(|_| Error::msg("CUDA device registry poisoned"))?;
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    if KERNEL_MODULES.is_empty() {
        bail!(
            "this synthos-engine was built without CUDA kernels (nvcc was not found at build time); \
             run scripts/install-cuda-toolchain.sh and rebuild, or use --device cpu"
        );
    }
    if !driver_present() {
        bail!("no NVIDIA driver found (libcuda.so could not be loaded): install the NVIDIA driver or use --device cpu");
    }
    let count = device_count();
    if ordinal >= count {
        bail!("CUDA device {ordinal} requested but {count} GPU(s) are visible");
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| Error::msg(format!("cannot open CUDA device {ordinal}: {e:?}")))?;
    // Stream-ordered allocation (cuMemAllocAsync) is what keeps frees from synchronising.
    if !ctx.has_async_alloc() {
        bail!(
            "CUDA device {ordinal} does not support stream-ordered allocation (memory pools): \
             synthos-engine needs CUDA 11.2+ and a GPU/driver with memory pools"
        );
    }
    // All work runs on one stream, so cudarc's per-allocation event tracking (meant for
    // several streams) only costs time. Turned off before the stream is created.
    // SAFETY: every buffer is allocated, used and freed on `stream` alone.
    unsafe { ctx.disable_event_tracking() };
    keep_pool_memory(&ctx)
        .map_err(|e| Error::msg(format!("CUDA device {ordinal}: cannot configure its memory pool: {e}")))?;
    // An engine-created stream, not the legacy NULL stream (graph capture needs one).
    let stream =
        ctx.new_stream().map_err(|e| Error::msg(format!("cannot create a stream on CUDA device {ordinal}: {e:?}")))?;
    let dev = Arc::new(CudaDevice {
        ordinal,
        ctx,
        stream,
        modules: Mutex::new(HashMap::new()),
        functions: Mutex::new(HashMap::new()),
        blaslt: OnceLock::new(),
        unused: OnceLock::new(),
        capability: OnceLock::new(),
        last_launch: Mutex::new("(none yet)"),
        launch_clock: Mutex::new(None),
    });
    map.insert(ordinal, dev.clone());
    Ok(dev)
}

/// Sets the release threshold of the device's default memory pool to the maximum, so
/// that freed memory stays in the pool instead of going back to the OS at every
/// synchronisation.
fn keep_pool_memory(ctx: &Arc<CudaContext>) -> std::result::Result<(), String> {
    use cudarc::driver::{result, sys};
    ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
    // SAFETY: the context is current; the pool handle comes from the driver and the
    // attribute value is the u64 the driver expects for the release threshold.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(|e| format!("{e:?}"))?;
        let mut threshold: u64 = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(|e| format!("{e:?}"))?;
    }
    Ok(())
}

/// True when `SYNTHOS_CUDA_SYNC=1`: every kernel launch is followed (before the next one
/// is issued, and at every synchronisation) by a device synchronisation, and a fault is
/// reported with the name of the kernel that caused it. Slow; for finding faults.
pub fn sync_mode() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("SYNTHOS_CUDA_SYNC").is_ok_and(|v| v == "1") || profile_mode())
}

/// True when `SYNTHOS_CUDA_PROFILE=1`: sync mode (see [`sync_mode`]) plus, for every
/// kernel name, the number of launches and the wall time from its launch until the next
/// launch (or synchronisation) has waited for it: the kernel's GPU time plus its launch
/// cost and whatever host work ran before the next launch. A coarse profile that needs
/// no profiler; read it with [`take_profile`].
pub fn profile_mode() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("SYNTHOS_CUDA_PROFILE").is_ok_and(|v| v == "1"))
}

/// Per-kernel (launches, seconds) gathered in profile mode.
static PROFILE: Mutex<Option<HashMap<&'static str, (u64, f64)>>> = Mutex::new(None);

/// The profile gathered since the last call, slowest kernel first: (name, launches,
/// seconds). Empty unless `SYNTHOS_CUDA_PROFILE=1`.
pub fn take_profile() -> Vec<(&'static str, u64, f64)> {
    let map = PROFILE.lock().ok().and_then(|mut p| p.take()).unwrap_or_default();
    let mut v: Vec<_> = map.into_iter().map(|(k, (n, s))| (k, n, s)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}

impl CudaDevice {
    /// The kernel `name` of module `module` (the `.cu` file's stem), loaded once.
    ///
    /// Every launcher fetches its kernel here just before launching it, so this is also
    /// where the launch is recorded for fault reports (see [`sync_mode`]).
    pub fn func(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        self.note_launch(name)?;
        let mut fns = self.functions.lock().map_err(|_| Error::msg("CUDA function cache poisoned"))?;
        if let Some(f) = fns.get(&(module, name)) {
            return Ok(f.clone());
        }
        let m = {
            let mut mods = self.modules.lock().map_err(|_| Error::msg("CUDA module cache poisoned"))?;
            match mods.get(module) {
                Some(m) => m.clone(),
                None => {
                    let bytes =
                        KERNEL_MODULES.iter().find(|(n, _)| *n == module).map(|(_, b)| *b).ok_or_else(|| {
                            Error::msg(format!("kernel module {module:?} is not embedded in this build"))
                        })?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()))
                        .map_err(|e| Error::msg(format!("cannot load kernel module {module:?}: {e:?}")))?;
                    mods.insert(module, m.clone());
                    m
                }
            }
        };
        let f = m
            .load_function(name)
            .map_err(|e| Error::msg(format!("kernel {name:?} not found in module {module:?}: {e:?}")))?;
        fns.insert((module, name), f.clone());
        Ok(f)
    }

    /// Records that kernel `name` is about to be issued. With [`sync_mode`] on, first
    /// waits for the work already issued and reports a fault there with the name of the
    /// kernel issued last.
    pub fn note_launch(&self, name: &'static str) -> Result<()> {
        if sync_mode() {
            self.check_fault()?;
        }
        if let Ok(mut last) = self.last_launch.lock() {
            *last = name;
        }
        if profile_mode() {
            if let Ok(mut t) = self.launch_clock.lock() {
                *t = Some(std::time::Instant::now());
            }
        }
        Ok(())
    }

    /// Synchronises and turns a fault into an error naming the last kernel issued.
    fn check_fault(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| {
            let last = self.last_launch.lock().map(|l| *l).unwrap_or("(unknown)");
            Error::msg(format!("CUDA fault in or after kernel {last:?}: {e:?}"))
        })?;
        if profile_mode() {
            let started = self.launch_clock.lock().ok().and_then(|mut t| t.take());
            if let (Some(t0), Ok(last), Ok(mut prof)) = (started, self.last_launch.lock(), PROFILE.lock()) {
                let e = prof.get_or_insert_with(HashMap::new).entry(*last).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += t0.elapsed().as_secs_f64();
            }
        }
        Ok(())
    }

    /// The cuBLASLt handle of this device (created once). A missing libcublasLt is an
    /// error naming the library (cudarc would panic on it).
    pub fn blaslt(&self) -> Result<Arc<CudaBlasLT>> {
        self.note_launch("cublasLt matmul")?;
        self.blaslt
            .get_or_init(|| {
                // SAFETY: only tries to open the library; no cuBLASLt call is made.
                if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
                    return Err("libcublasLt.so (CUDA 13) could not be loaded: install the CUDA 13 cuBLAS \
                                library (e.g. the `nvidia-cublas` Python wheel) and put its lib/ folder on \
                                LD_LIBRARY_PATH"
                        .to_string());
                }
                CudaBlasLT::new(self.stream.clone()).map(Arc::new).map_err(|e| format!("{e:?}"))
            })
            .clone()
            .map_err(|e| Error::msg(format!("cannot create a cuBLASLt handle: {e}")))
    }

    /// A one-element zero f32 buffer, allocated once per device, for kernel arguments a
    /// launch does not use (their flag is off: the kernel neither reads nor writes them).
    pub fn unused_f32(&self) -> Result<&CudaSlice<f32>> {
        self.unused
            .get_or_init(|| self.stream.alloc_zeros::<f32>(1).map_err(|e| format!("{e:?}")))
            .as_ref()
            .map_err(|e| Error::msg(format!("cannot allocate a device scalar: {e}")))
    }

    /// The GPU's compute capability (major, minor), e.g. (9, 0) on H100 and H200.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        if let Some(c) = self.capability.get() {
            return Ok(*c);
        }
        let c = self.ctx.compute_capability()?;
        Ok(*self.capability.get_or_init(|| c))
    }

    /// Allocates `n` uninitialised elements of `dtype` (filled with NaN when
    /// [`set_poison`] is on, so that tests catch elements a kernel failed to write).
    pub fn alloc(&self, n: usize, dtype: DType) -> Result<CudaBuf> {
        // SAFETY: every kernel that receives a fresh buffer writes all of its elements
        // before anything reads them (tests poison outputs to check this).
        let mut buf = unsafe {
            match dtype {
                DType::F32 => CudaBuf::F32(self.stream.alloc::<f32>(n.max(1))?),
                DType::BF16 => CudaBuf::BF16(self.stream.alloc::<bf16>(n.max(1))?),
            }
        };
        if POISON.load(std::sync::atomic::Ordering::Relaxed) {
            self.poison(&mut buf)?;
        }
        Ok(buf)
    }

    /// [`CudaDevice::alloc`] as a typed slice (scratch buffers of a known element type).
    pub fn alloc_t<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>> {
        T::take(self.alloc(n, T::DTYPE)?)
    }

    /// Fills a buffer with 0xFF bytes (a NaN in both f32 and bf16).
    pub fn poison(&self, buf: &mut CudaBuf) -> Result<()> {
        use cudarc::driver::DevicePtrMut;
        let stream = &self.stream;
        let (ptr, bytes, _rec) = match buf {
            CudaBuf::F32(s) => {
                let b = s.num_bytes();
                let (p, r) = s.device_ptr_mut(stream);
                (p, b, r)
            }
            CudaBuf::BF16(s) => {
                let b = s.num_bytes();
                let (p, r) = s.device_ptr_mut(stream);
                (p, b, r)
            }
        };
        // SAFETY: the pointer and byte count come from a live allocation on this stream;
        // 0xFF bytes are a valid (NaN) pattern for f32 and bf16.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }?;
        Ok(())
    }

    /// Allocates `n` zeroed elements of `dtype`.
    pub fn zeros(&self, n: usize, dtype: DType) -> Result<CudaBuf> {
        Ok(match dtype {
            DType::F32 => CudaBuf::F32(self.stream.alloc_zeros::<f32>(n.max(1))?),
            DType::BF16 => CudaBuf::BF16(self.stream.alloc_zeros::<bf16>(n.max(1))?),
        })
    }

    /// Allocates `n` elements of `dtype`, each `value` (rounded to nearest for bf16), set by
    /// a device memset: no host copy, so that it can be recorded in a CUDA graph.
    pub fn filled(&self, n: usize, dtype: DType, value: f32) -> Result<CudaBuf> {
        use cudarc::driver::sys;
        let buf = self.alloc(n, dtype)?;
        let (addr, len, stream) = (buf.device_addr(&self.stream), buf.len(), self.stream.cu_stream());
        self.ctx.bind_to_thread()?;
        // SAFETY: `addr` is a live allocation of `len` elements of the memset's width on
        // this stream; the bits are a valid f32 / bf16 value.
        let r = unsafe {
            match dtype {
                DType::F32 => sys::cuMemsetD32Async(addr, value.to_bits(), len, stream),
                DType::BF16 => sys::cuMemsetD16Async(addr, bf16::from_f32(value).to_bits(), len, stream),
            }
        };
        r.result()?;
        Ok(buf)
    }

    /// Copies host f32 data to a new buffer of `dtype` (rounding to nearest for bf16).
    pub fn upload(&self, data: &[f32], dtype: DType) -> Result<CudaBuf> {
        let mut buf = self.alloc(data.len(), dtype)?;
        self.upload_into(data, &mut buf)?;
        Ok(buf)
    }

    /// Copies host f32 data into the first `data.len()` elements of `buf` (rounding to
    /// nearest for bf16), in place: the buffer keeps its address (a recorded CUDA graph
    /// that reads it sees the new values).
    pub fn upload_into(&self, data: &[f32], buf: &mut CudaBuf) -> Result<()> {
        if data.len() > buf.len() {
            bail!("upload of {} values into a device buffer of {}", data.len(), buf.len());
        }
        if data.is_empty() {
            return Ok(());
        }
        match buf {
            CudaBuf::F32(s) => self.stream.memcpy_htod(data, s)?,
            CudaBuf::BF16(s) => self.stream.memcpy_htod(&to_bf16(data), s)?,
        }
        Ok(())
    }

    /// Copies host indices to the device as `i64` (class targets, gathered rows).
    pub fn upload_indices(&self, idx: &[usize]) -> Result<CudaSlice<i64>> {
        let v: Vec<i64> = idx.iter().map(|&t| t as i64).collect();
        Ok(self.stream.clone_htod(&v)?)
    }

    /// Copies a buffer back to the host as f32 (the first `n` elements).
    pub fn download(&self, buf: &CudaBuf, n: usize) -> Result<Vec<f32>> {
        self.check_fault()?;
        let mut v = match buf {
            CudaBuf::F32(s) => self.stream.clone_dtoh(s)?,
            CudaBuf::BF16(s) => from_bf16(&self.stream.clone_dtoh(s)?),
        };
        v.truncate(n);
        Ok(v)
    }

    /// Blocks until all issued work is done.
    pub fn synchronize(&self) -> Result<()> {
        self.check_fault()
    }

    /// The GPU's name as the driver reports it (e.g. `NVIDIA H200`).
    pub fn name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// One line describing the GPU: name, compute capability, multiprocessors, memory,
    /// and a check that our kernels load on it.
    pub fn describe(&self) -> Result<String> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let name = self.ctx.name()?;
        let (major, minor) = self.ctx.compute_capability()?;
        let sms = self.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let l2 = self.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?;
        let (free, total) = self.mem_info()?;
        let kernels = match self.func("elementwise", "add_bf16") {
            Ok(_) => "kernels load".to_string(),
            Err(e) => format!("kernels do NOT load: {e}"),
        };
        Ok(format!(
            "{name}, sm_{major}{minor}, {sms} SMs, L2 {} MiB, {:.1}/{:.1} GiB free, {kernels}",
            l2 >> 20,
            free as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        ))
    }

    /// The most bytes allocated from the device's memory pool at once since the last
    /// [`reset_peak_memory`](Self::reset_peak_memory) (what `torch.cuda.max_memory_allocated` reports),
    /// plus the most the driver reserved for CUDA graphs in that time (0 unless a graph
    /// was recorded; the two peaks may fall at different moments, so the sum bounds the
    /// true peak from above).
    pub fn peak_memory(&self) -> Result<u64> {
        let pool = self.pool_attr(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)?;
        // A driver without graph memory attributes has no graph memory either.
        Ok(pool + self.graph_memory_peak().unwrap_or(0))
    }

    /// Restarts the peak of [`peak_memory`](Self::peak_memory) from the bytes in use now.
    pub fn reset_peak_memory(&self) -> Result<()> {
        self.pool_attr(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0))?;
        let _ = self.reset_graph_memory_peak();
        Ok(())
    }

    /// Reads (value `None`) or writes a u64 attribute of the default memory pool.
    fn pool_attr(&self, attr: cudarc::driver::sys::CUmemPool_attribute, value: Option<u64>) -> Result<u64> {
        use cudarc::driver::result;
        self.ctx.bind_to_thread()?;
        // SAFETY: the context is current, the pool comes from the driver, and these
        // attributes are u64 values.
        unsafe {
            let pool = result::device::get_default_mem_pool(self.ctx.cu_device())?;
            let mut v: u64 = value.unwrap_or(0);
            match value {
                Some(_) => result::mem_pool::set_attribute(pool, attr, (&mut v as *mut u64).cast())?,
                None => result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast())?,
            }
            Ok(v)
        }
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }
}

/// A 1-D launch covering `n` elements with `block` threads per block.
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).max(1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// The launch of the chunked elementwise kernels: one thread per 8 elements, 256
/// threads per block (`EW` in `kernels/elementwise.cu`).
pub fn grid_chunks(n: usize) -> LaunchConfig {
    grid_1d(n.div_ceil(8), 256)
}

/// One block of `block` threads per row, `rows` rows.
pub fn grid_rows(rows: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// The entry point `<base>_<dtype>` (`f32` / `bf16`) of a kernel templated on one element
/// type, as a `&'static str` (the function cache's key). Each distinct name is allocated
/// once for the life of the process; there are a few hundred kernels at most.
pub fn kernel_name(base: &str, dtype: DType) -> &'static str {
    // One map per dtype, looked up by `&str`: no allocation once a name exists.
    static NAMES: Mutex<[Option<HashMap<String, &'static str>>; 2]> = Mutex::new([None, None]);
    let mut maps = match NAMES.lock() {
        Ok(m) => m,
        Err(poisoned) => poisoned.into_inner(),
    };
    let map = maps[usize::from(dtype == DType::BF16)].get_or_insert_with(HashMap::new);
    if let Some(&name) = map.get(base) {
        return name;
    }
    let name = intern(&format!("{base}_{}", suffix(dtype)));
    map.insert(base.to_string(), name);
    name
}

/// `name` as a `&'static str` (the function cache's key), allocated once per distinct
/// name: for entry points that [`kernel_name`]'s `<base>_<dtype>` pattern does not fit.
pub fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<Option<std::collections::HashSet<&'static str>>> = Mutex::new(None);
    let mut set = match NAMES.lock() {
        Ok(m) => m,
        Err(poisoned) => poisoned.into_inner(),
    };
    let set = set.get_or_insert_with(Default::default);
    if let Some(&n) = set.get(name) {
        return n;
    }
    let n: &'static str = Box::leak(name.to_string().into_boxed_str());
    set.insert(n);
    n
}

/// An element type device buffers hold (f32 or bf16): the typed-buffer side of
/// [`CudaBuf`], so that a launcher written once over `T` serves both dtypes.
pub trait Elem: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Unpin + 'static {
    /// The dtype of the element.
    const DTYPE: DType;
    /// The typed slice of `buf`, or an error when it holds the other dtype.
    fn of(buf: &CudaBuf) -> Result<&CudaSlice<Self>>;
    /// Mutable [`Elem::of`].
    fn of_mut(buf: &mut CudaBuf) -> Result<&mut CudaSlice<Self>>;
    /// The typed slice `buf` owns, or an error when it holds the other dtype.
    fn take(buf: CudaBuf) -> Result<CudaSlice<Self>>;
    /// The untyped buffer of a typed slice.
    fn wrap(s: CudaSlice<Self>) -> CudaBuf;
    /// cuBLASLt's `c = op(a)·op(b) (+ bias)`, then GELU-tanh when `gelu` (the
    /// `GELU[_BIAS]` epilogue), in its column-major terms (callers go through
    /// [`matmul::matmul`], which checks the spans).
    ///
    /// # Safety
    /// `cfg` must address only elements inside the views.
    unsafe fn lt_matmul(
        blas: &cudarc::cublaslt::CudaBlasLT,
        cfg: cudarc::cublaslt::MatmulConfig,
        a: &cudarc::driver::CudaView<'_, Self>,
        b: &cudarc::driver::CudaView<'_, Self>,
        bias: Option<&cudarc::driver::CudaView<'_, Self>>,
        gelu: bool,
        c: &mut cudarc::driver::CudaViewMut<'_, Self>,
    ) -> Result<()>;
}

/// The error of an [`Elem`] accessor handed a buffer of the other dtype.
fn wrong_dtype(want: DType, got: &CudaBuf) -> crate::Error {
    crate::Error::msg(format!("expected a {want} device buffer, found {}", got.dtype()))
}

macro_rules! impl_elem {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$variant;
            fn of(buf: &CudaBuf) -> Result<&CudaSlice<Self>> {
                match buf {
                    CudaBuf::$variant(s) => Ok(s),
                    other => Err(wrong_dtype(Self::DTYPE, other)),
                }
            }
            fn of_mut(buf: &mut CudaBuf) -> Result<&mut CudaSlice<Self>> {
                match buf {
                    CudaBuf::$variant(s) => Ok(s),
                    other => Err(wrong_dtype(Self::DTYPE, other)),
                }
            }
            fn take(buf: CudaBuf) -> Result<CudaSlice<Self>> {
                match buf {
                    CudaBuf::$variant(s) => Ok(s),
                    other => Err(wrong_dtype(Self::DTYPE, &other)),
                }
            }
            fn wrap(s: CudaSlice<Self>) -> CudaBuf {
                CudaBuf::$variant(s)
            }
            unsafe fn lt_matmul(
                blas: &cudarc::cublaslt::CudaBlasLT,
                cfg: cudarc::cublaslt::MatmulConfig,
                a: &cudarc::driver::CudaView<'_, Self>,
                b: &cudarc::driver::CudaView<'_, Self>,
                bias: Option<&cudarc::driver::CudaView<'_, Self>>,
                gelu: bool,
                c: &mut cudarc::driver::CudaViewMut<'_, Self>,
            ) -> Result<()> {
                use cudarc::cublaslt::{Activation, Matmul};
                let act = gelu.then_some(Activation::Gelu);
                // SAFETY: forwarded from the caller's contract.
                unsafe { blas.matmul(cfg, a, b, c, bias, act.as_ref()) }.map_err(crate::Error::from)
            }
        }
    };
}

impl_elem!(f32, F32);
impl_elem!(half::bf16, BF16);

/// Pushing typed device buffers as kernel arguments, whatever their element type.
pub trait PushBuf<'a> {
    /// Pushes a buffer read by the kernel.
    fn buf(&mut self, b: &'a CudaBuf) -> &mut Self;
    /// Pushes a buffer the kernel writes.
    fn buf_mut(&mut self, b: &'a mut CudaBuf) -> &mut Self;
}

impl<'a> PushBuf<'a> for cudarc::driver::LaunchArgs<'a> {
    fn buf(&mut self, b: &'a CudaBuf) -> &mut Self {
        use cudarc::driver::PushKernelArg;
        match b {
            CudaBuf::F32(s) => self.arg(s),
            CudaBuf::BF16(s) => self.arg(s),
        }
    }

    fn buf_mut(&mut self, b: &'a mut CudaBuf) -> &mut Self {
        use cudarc::driver::PushKernelArg;
        match b {
            CudaBuf::F32(s) => self.arg(s),
            CudaBuf::BF16(s) => self.arg(s),
        }
    }
}

/// Checks that two buffers share one dtype and both hold at least `n` elements.
pub fn check_same(op: &str, a: &CudaBuf, b: &CudaBuf, n: usize) -> Result<()> {
    if a.dtype() != b.dtype() || a.len() < n || b.len() < n {
        bail!(
            "{op}: buffers ({} {}, {} {}) do not both hold {n} elements of one dtype",
            a.len(),
            a.dtype(),
            b.len(),
            b.dtype()
        );
    }
    Ok(())
}

/// The kernel-name suffix of a dtype (`f32` / `bf16`), for `<op>_<dtype>` entry points.
pub fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
    }
}

/// The opt-in kernel choices in effect on this thread (see [`choice`]), as
/// `VARIABLE=value` lines for `synthos-engine info` and run logs; a variable holding an
/// unknown value gives its error.
pub fn kernel_choices() -> Result<Vec<String>> {
    let on = |b: bool| if b { "1" } else { "0" };
    Ok(vec![
        format!("SYNTHOS_CUDA_ATTENTION={}", attention::attention_kernel()?.name()),
        format!("SYNTHOS_CUDA_MULTI_TENSOR={}", on(adamw::multi_tensor()?)),
        format!("SYNTHOS_CUDA_GEMM_PLANS={}", on(gemm_plan::plans_enabled()?)),
        format!("SYNTHOS_CUDA_GELU_EPILOGUE={}", on(matmul::gelu_epilogue()?)),
        format!("SYNTHOS_CUDA_NORM={}", if norm::warp_forward()? { "warp" } else { "block" }),
        format!("SYNTHOS_CUDA_COLSUM={}", if reduce::vector_columns()? { "vec" } else { "scalar" }),
        format!("SYNTHOS_CUDA_IM2COL={}", if conv::im2col_by_rows()? { "rows" } else { "elements" }),
        format!("SYNTHOS_CUDA_SPLIT_MASTER={}", on(adamw::split_masters()?)),
        format!("SYNTHOS_CUDA_GRAPHS={}", on(graph::graphs_enabled()?)),
    ])
}

/// Kernel choices that stay opt-in until a GPU run has shown the new kernel correct and
/// faster: one environment variable each (read once per process), overridable per thread.
pub mod choice {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use crate::{Error, Result};

    thread_local! {
        static OVERRIDES: RefCell<HashMap<&'static str, usize>> = RefCell::new(HashMap::new());
    }

    /// The index into `names` chosen for `var`: this thread's [`with`] override, else the
    /// environment variable's value (read once), else 0. A value not in `names` is an
    /// error naming the variable and the choices.
    pub fn get(var: &'static str, names: &[&str]) -> Result<usize> {
        if let Some(i) = OVERRIDES.with(|o| o.borrow().get(var).copied()) {
            return Ok(i);
        }
        static FROM_ENV: OnceLock<Mutex<HashMap<&'static str, std::result::Result<usize, String>>>> = OnceLock::new();
        let mut cache = FROM_ENV.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(var)
            .or_insert_with(|| match std::env::var(var) {
                Err(_) => Ok(0),
                Ok(v) => names
                    .iter()
                    .position(|n| *n == v)
                    .ok_or_else(|| format!("{var}={v:?} is not one of {}", names.join(", "))),
            })
            .clone()
            .map_err(Error::msg)
    }

    /// Runs `f` with choice `index` for `var` on this thread.
    pub fn with<R>(var: &'static str, index: usize, f: impl FnOnce() -> R) -> R {
        struct Restore(&'static str, Option<usize>);
        impl Drop for Restore {
            fn drop(&mut self) {
                OVERRIDES.with(|o| match self.1 {
                    Some(i) => o.borrow_mut().insert(self.0, i),
                    None => o.borrow_mut().remove(self.0),
                });
            }
        }
        let _restore = Restore(var, OVERRIDES.with(|o| o.borrow_mut().insert(var, index)));
        f()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn environment_overrides_and_errors() {
            // Variables of this test only (the values are cached per process).
            std::env::set_var("SYNTHOS_TEST_CHOICE_B", "b");
            std::env::set_var("SYNTHOS_TEST_CHOICE_BAD", "z");
            assert_eq!(super::get("SYNTHOS_TEST_CHOICE_UNSET", &["a", "b"]).unwrap(), 0);
            assert_eq!(super::get("SYNTHOS_TEST_CHOICE_B", &["a", "b"]).unwrap(), 1);
            let e = super::get("SYNTHOS_TEST_CHOICE_BAD", &["a", "b"]).unwrap_err().to_string();
            assert!(e.contains("SYNTHOS_TEST_CHOICE_BAD") && e.contains("\"z\"") && e.contains("a, b"), "{e}");
            let inner = super::with("SYNTHOS_TEST_CHOICE_B", 0, || {
                let nested =
                    super::with("SYNTHOS_TEST_CHOICE_B", 1, || super::get("SYNTHOS_TEST_CHOICE_B", &["a", "b"]));
                (nested.unwrap(), super::get("SYNTHOS_TEST_CHOICE_B", &["a", "b"]).unwrap())
            });
            assert_eq!(inner, (1, 0), "overrides nest and restore");
            assert_eq!(super::get("SYNTHOS_TEST_CHOICE_B", &["a", "b"]).unwrap(), 1, "back to the environment");
        }
    }
}

pub mod adamw;
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gemm_plan;
pub mod graph;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod rope;
pub mod shape;
pub mod softmax;

/// Broadcast description of a binary op (rank ≤ 6), passed by value to kernels;
/// mirrors `struct Bcast` in `kernels/common.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Bcast {
    /// Number of dimensions used.
    pub rank: i32,
    /// Output shape.
    pub shape: [i64; 6],
    /// Element strides of input a (0 along broadcast dimensions).
    pub sa: [i64; 6],
    /// Element strides of input b (0 along broadcast dimensions).
    pub sb: [i64; 6],
}

// SAFETY: plain-old-data with the same C layout as the kernel-side struct.
unsafe impl cudarc::driver::DeviceRepr for Bcast {}

impl Bcast {
    /// Describes broadcasting `a` and `b` (each right-aligned) to `out`, in the fewest
    /// dimensions: output dimensions of size 1 are dropped and neighbours that both inputs
    /// walk as one (contiguous, or broadcast along both) are merged, so that e.g.
    /// `[B, N, D] + [1, N, D]` is described as `[B, N·D]` with strides `(N·D, 1)` and
    /// `(0, 1)`. The kernels then index once per row chunk (see `kernels/elementwise.cu`).
    pub fn new(out: &[usize], a: &[usize], b: &[usize]) -> Result<Bcast> {
        if out.len() > 6 {
            bail!("broadcasting supports at most 6 dimensions, got shape {out:?}");
        }
        let mut bc = Bcast { rank: out.len() as i32, ..Default::default() };
        let strides = |s: &[usize]| -> Vec<i64> {
            let r = out.len();
            let mut st = vec![0i64; r];
            let mut acc = 1i64;
            for k in (0..s.len()).rev() {
                let d = r - s.len() + k;
                st[d] = if s[k] == 1 { 0 } else { acc };
                acc *= s[k] as i64;
            }
            st
        };
        let (sa, sb) = (strides(a), strides(b));
        // (size, stride in a, stride in b) of the simplified dimensions.
        let mut dims: Vec<(i64, i64, i64)> = Vec::with_capacity(out.len());
        for d in (0..out.len()).filter(|&d| out[d] != 1) {
            let size = out[d] as i64;
            match dims.last_mut() {
                // Index c·size + c' with strides (s·size, s) is the merged index times s.
                Some(prev) if prev.1 == sa[d] * size && prev.2 == sb[d] * size => *prev = (prev.0 * size, sa[d], sb[d]),
                _ => dims.push((size, sa[d], sb[d])),
            }
        }
        bc.rank = dims.len() as i32;
        for (d, &(size, a_stride, b_stride)) in dims.iter().enumerate() {
            bc.shape[d] = size;
            bc.sa[d] = a_stride;
            bc.sb[d] = b_stride;
        }
        Ok(bc)
    }
}

/// A null device pointer for absent optional arguments (the kernels test for it).
pub(crate) static NULL_PTR: u64 = 0;

/// `data` rounded to bf16 (to nearest even); a long slice on the thread pool (model
/// weights on their way to the device).
fn to_bf16(data: &[f32]) -> Vec<bf16> {
    use rayon::prelude::*;
    if data.len() <= crate::cpu::par::CHUNK {
        return data.iter().map(|&x| bf16::from_f32(x)).collect();
    }
    data.par_iter().map(|&x| bf16::from_f32(x)).collect()
}

/// `data` as f32 (exact), in chunks on the thread pool.
fn from_bf16(data: &[bf16]) -> Vec<f32> {
    use std::mem::MaybeUninit;
    // SAFETY: each chunk's elements are all written, from the elements of `data` at the
    // same indices (the output has `data.len()` elements).
    unsafe {
        crate::cpu::par::fill_new(data.len(), |i0, o| {
            o.iter_mut().zip(&data[i0..]).for_each(|(o, x)| *o = MaybeUninit::new(x.to_f32()))
        })
    }
}

#[cfg(test)]
mod bcast_tests {
    use super::Bcast;

    /// Offsets of output element `i` in a and b, from the description.
    fn offsets(bc: &Bcast, mut i: i64) -> (i64, i64) {
        let (mut ia, mut ib) = (0, 0);
        for d in (0..bc.rank as usize).rev() {
            let c = i % bc.shape[d];
            i /= bc.shape[d];
            ia += c * bc.sa[d];
            ib += c * bc.sb[d];
        }
        (ia, ib)
    }

    /// Offset of output element `i` in an input of shape `s` right-aligned against `out`.
    fn naive(out: &[usize], s: &[usize], mut i: usize) -> i64 {
        let mut coord = vec![0; out.len()];
        for d in (0..out.len()).rev() {
            coord[d] = i % out[d];
            i /= out[d];
        }
        let mut idx = 0;
        for (k, &size) in s.iter().enumerate() {
            idx = idx * size + if size == 1 { 0 } else { coord[out.len() - s.len() + k] };
        }
        idx as i64
    }

    #[test]
    fn simplified_broadcasts_address_the_same_elements() {
        let bc = Bcast::new(&[4, 6, 16], &[1, 6, 16], &[4, 6, 16]).unwrap();
        assert_eq!((bc.rank, &bc.shape[..2], &bc.sa[..2], &bc.sb[..2]), (2, &[4, 96][..], &[0, 1][..], &[96, 1][..]));
        let bc = Bcast::new(&[3, 1, 8], &[3, 1, 8], &[3, 1, 1]).unwrap();
        assert_eq!((bc.rank, &bc.shape[..2], &bc.sa[..2], &bc.sb[..2]), (2, &[3, 8][..], &[8, 1][..], &[1, 0][..]));
        assert_eq!(Bcast::new(&[1, 1], &[1], &[1, 1]).unwrap().rank, 0);

        let mut rng = crate::Rng::new(6);
        for _ in 0..300 {
            let rank = 1 + rng.below(6);
            let out: Vec<usize> = (0..rank).map(|_| 1 + rng.below(4)).collect();
            // Each input: a suffix of the output's dimensions, some of them 1.
            let mut input = || -> Vec<usize> {
                let keep = rng.below(rank + 1);
                out[rank - keep..].iter().map(|&d| if rng.below(3) == 0 { 1 } else { d }).collect()
            };
            let (a, b) = (input(), input());
            let bc = Bcast::new(&out, &a, &b).unwrap();
            let n: usize = out.iter().product();
            assert_eq!(bc.shape[..bc.rank as usize].iter().product::<i64>(), n as i64);
            for i in 0..n {
                assert_eq!(
                    offsets(&bc, i as i64),
                    (naive(&out, &a, i), naive(&out, &b, i)),
                    "{out:?} {a:?} {b:?} at {i}"
                );
            }
        }
    }
}
