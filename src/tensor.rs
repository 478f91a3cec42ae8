//! `Tensor`: a shape, an element type and a storage on a device.
//!
//! Tensors are contiguous and row-major; a clone is a cheap handle to the same data.
//! CPU storage is always f32 (the reference path); CUDA storage is bf16 or f32.
//! Storage sits behind a lock so that the optimizer can update parameters in place;
//! every op reads its inputs and allocates a fresh output.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::cuda::{CudaBuf, CudaStorage};
use crate::rng::Rng;
use crate::{bail, DType, Device, Error, Result};

thread_local! {
    /// While set, the function being run as a CUDA graph recording (see
    /// [`forbid_host_transfers`]).
    static NO_HOST_TRANSFERS: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every copy of tensor data between the host and a device refused on this
/// thread, with an error naming `what`: the rule of a function recorded as a CUDA graph
/// (`ops::GraphRunner`). Applied on every device, the CPU included, where nothing is
/// recorded, so that a function breaking the rule fails the CPU tests too: making a tensor
/// from host values, reading one on the host, or waiting for a device.
pub fn forbid_host_transfers<R>(what: &'static str, f: impl FnOnce() -> R) -> R {
    with_transfer_rule(Some(what), f)
}

/// Runs `f` with host transfers allowed on this thread, whatever the job it runs inside
/// forbids (a pool thread waiting inside one job may run another: see
/// [`crate::autograd::isolated`]).
pub(crate) fn allow_host_transfers<R>(f: impl FnOnce() -> R) -> R {
    with_transfer_rule(None, f)
}

/// Runs `f` with the thread's host-transfer rule set to `rule`, restored after.
fn with_transfer_rule<R>(rule: Option<&'static str>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<&'static str>);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_HOST_TRANSFERS.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(NO_HOST_TRANSFERS.with(|c| c.replace(rule)));
    f()
}

/// An error when `op` (a host transfer) runs inside [`forbid_host_transfers`].
pub(crate) fn check_host_transfer(op: &str) -> Result<()> {
    match NO_HOST_TRANSFERS.with(|c| c.get()) {
        Some(what) => bail!(
            "{op} inside {what}, which runs as a recorded CUDA graph: a recorded function must not copy to or from \
             the host or wait for the device (make such values inputs of the function)"
        ),
        None => Ok(()),
    }
}

/// The identity of a tensor on the autograd tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Where the elements are.
pub enum Storage {
    /// Host f32 elements.
    Cpu(Vec<f32>),
    /// Device elements.
    Cuda(CudaStorage),
}

impl Storage {
    /// The host elements, or an error naming `what` when the storage is on a GPU.
    pub fn as_cpu(&self) -> Result<&[f32]> {
        match self {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda(_) => bail!("expected a CPU tensor, found a CUDA one"),
        }
    }

    /// Mutable host elements.
    pub fn as_cpu_mut(&mut self) -> Result<&mut Vec<f32>> {
        match self {
            Storage::Cpu(v) => Ok(v),
            Storage::Cuda(_) => bail!("expected a CPU tensor, found a CUDA one"),
        }
    }

    /// The device storage.
    pub fn as_cuda(&self) -> Result<&CudaStorage> {
        match self {
            Storage::Cuda(c) => Ok(c),
            Storage::Cpu(_) => bail!("expected a CUDA tensor, found a CPU one"),
        }
    }

    /// Mutable device storage.
    pub fn as_cuda_mut(&mut self) -> Result<&mut CudaStorage> {
        match self {
            Storage::Cuda(c) => Ok(c),
            Storage::Cpu(_) => bail!("expected a CUDA tensor, found a CPU one"),
        }
    }
}

struct Inner {
    id: TensorId,
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
    storage: Arc<RwLock<Storage>>,
    tracked: AtomicBool,
}

/// An n-dimensional array on a device. Cloning is cheap (shared handle).
#[derive(Clone)]
pub struct Tensor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {}, {})", self.shape(), self.dtype(), self.device())
    }
}

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// Wraps a storage. `shape` must match the storage's element count.
    pub fn from_storage(storage: Storage, shape: &[usize]) -> Result<Tensor> {
        let (dtype, device, len) = match &storage {
            Storage::Cpu(v) => (DType::F32, Device::Cpu, v.len()),
            Storage::Cuda(c) => (c.buf.dtype(), Device::Cuda(c.dev.ordinal), c.buf.len()),
        };
        let n = numel(shape);
        // Device buffers are allocated with at least one element.
        if !(len == n || (device.is_cuda() && n == 0 && len == 1)) {
            bail!("storage of {len} elements does not fit shape {shape:?} ({n} elements)");
        }
        Ok(Tensor {
            inner: Arc::new(Inner {
                id: TensorId::fresh(),
                shape: shape.to_vec(),
                dtype,
                device,
                storage: Arc::new(RwLock::new(storage)),
                tracked: AtomicBool::new(false),
            }),
        })
    }

    /// A tensor from host f32 values, placed on `device` in the device's default dtype.
    pub fn from_vec(data: Vec<f32>, shape: &[usize], device: Device) -> Result<Tensor> {
        Self::from_vec_dtype(data, shape, device, device.default_dtype())
    }

    /// A tensor from host f32 values with an explicit element type (CPU tensors are f32).
    pub fn from_vec_dtype(data: Vec<f32>, shape: &[usize], device: Device, dtype: DType) -> Result<Tensor> {
        if data.len() != numel(shape) {
            bail!("{} values given for shape {shape:?} ({} elements)", data.len(), numel(shape));
        }
        check_host_transfer("a tensor made from host values")?;
        match device {
            Device::Cpu => {
                if dtype != DType::F32 {
                    bail!("CPU tensors are f32 (asked for {dtype})");
                }
                Tensor::from_storage(Storage::Cpu(data), shape)
            }
            Device::Cuda(i) => {
                let dev = crate::cuda::device(i)?;
                let buf = dev.upload(&data, dtype)?;
                Tensor::from_storage(Storage::Cuda(CudaStorage { dev, buf }), shape)
            }
        }
    }

    /// All zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(shape, 0.0, dtype, device)
    }

    /// A tensor filled with `value`.
    pub fn full(shape: &[usize], value: f32, dtype: DType, device: Device) -> Result<Tensor> {
        match device {
            // (Not a host transfer: the GPU's is a memset.)
            Device::Cpu if dtype == DType::F32 => Tensor::from_storage(Storage::Cpu(vec![value; numel(shape)]), shape),
            Device::Cpu => bail!("CPU tensors are f32 (asked for {dtype})"),
            // Set on the device (no host copy: the backward pass's seed inside a
            // training step recorded as a CUDA graph).
            Device::Cuda(i) => {
                let dev = crate::cuda::device(i)?;
                let buf = dev.filled(numel(shape), dtype, value)?;
                Tensor::from_storage(Storage::Cuda(CudaStorage { dev, buf }), shape)
            }
        }
    }

    /// Standard normal values scaled by `std`, from a seeded generator (identical on every
    /// device: drawn on the host, then copied).
    pub fn randn(shape: &[usize], std: f32, rng: &mut Rng, device: Device) -> Result<Tensor> {
        let v = rng.normal_vec(numel(shape), std);
        Tensor::from_vec(v, shape, device)
    }

    /// Uniform values in [lo, hi) from a seeded generator.
    pub fn rand_uniform(shape: &[usize], lo: f32, hi: f32, rng: &mut Rng, device: Device) -> Result<Tensor> {
        let v = rng.uniform_vec(numel(shape), lo, hi);
        Tensor::from_vec(v, shape, device)
    }

    /// A scalar (shape `[]`).
    pub fn scalar(value: f32, device: Device) -> Result<Tensor> {
        Tensor::from_vec(vec![value], &[], device)
    }

    /// The tape identity of this tensor.
    pub fn id(&self) -> TensorId {
        self.inner.id
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.inner.shape
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.inner.shape.len()
    }

    /// Size of dimension `d` (negative counts from the end), with an error naming `d`.
    pub fn dim(&self, d: isize) -> Result<usize> {
        let r = self.rank() as isize;
        let i = if d < 0 { r + d } else { d };
        if i < 0 || i >= r {
            bail!("dimension {d} out of range for shape {:?}", self.shape());
        }
        Ok(self.inner.shape[i as usize])
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.inner.shape)
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }

    /// Device.
    pub fn device(&self) -> Device {
        self.inner.device
    }

    /// Read access to the storage.
    pub fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        // A poisoned lock only means a panic elsewhere while writing; the data are
        // still the last complete write, so reading them is fine.
        self.inner.storage.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Write access to the storage (used by in-place updates such as the optimizer).
    pub fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.inner.storage.write().unwrap_or_else(|e| e.into_inner())
    }

    /// An identity of the storage, equal for handles that share it (for duplicate checks).
    pub(crate) fn storage_id(&self) -> usize {
        Arc::as_ptr(&self.inner.storage) as *const () as usize
    }

    /// True when both handles share one storage.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.inner.storage, &other.inner.storage)
    }

    /// Copies the elements to the host as f32.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        check_host_transfer("a tensor read on the host")?;
        let s = self.storage();
        match &*s {
            Storage::Cpu(v) => Ok(v.clone()),
            Storage::Cuda(c) => c.dev.download(&c.buf, self.numel()),
        }
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            bail!("item() on a tensor of shape {:?}", self.shape());
        }
        Ok(self.to_vec()?[0])
    }

    /// A copy on `device` in `dtype` (CPU: f32). Not recorded on the tape.
    pub fn to_device(&self, device: Device, dtype: DType) -> Result<Tensor> {
        if device == self.device() && dtype == self.dtype() {
            return self.deep_copy();
        }
        let v = self.to_vec()?;
        Tensor::from_vec_dtype(v, self.shape(), device, if device == Device::Cpu { DType::F32 } else { dtype })
    }

    /// A copy with its own storage.
    pub fn deep_copy(&self) -> Result<Tensor> {
        let s = self.storage();
        let storage = match &*s {
            Storage::Cpu(v) => Storage::Cpu(crate::cpu::par::copied(v)),
            Storage::Cuda(c) => {
                let buf = match &c.buf {
                    CudaBuf::F32(b) => CudaBuf::F32(c.dev.stream.clone_dtod(b)?),
                    CudaBuf::BF16(b) => CudaBuf::BF16(c.dev.stream.clone_dtod(b)?),
                };
                Storage::Cuda(CudaStorage { dev: c.dev.clone(), buf })
            }
        };
        Tensor::from_storage(storage, self.shape())
    }

    /// A new handle to the same storage with a new identity and no gradient tracking.
    pub fn detach(&self) -> Tensor {
        Tensor {
            inner: Arc::new(Inner {
                id: TensorId::fresh(),
                shape: self.inner.shape.clone(),
                dtype: self.inner.dtype,
                device: self.inner.device,
                storage: self.inner.storage.clone(),
                tracked: AtomicBool::new(false),
            }),
        }
    }

    /// Same storage viewed with another shape of the same element count (not recorded;
    /// use `ops::reshape` inside differentiated code).
    pub(crate) fn view_as(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            bail!("cannot view shape {:?} as {shape:?}", self.shape());
        }
        let t = self.detach();
        Ok(Tensor {
            inner: Arc::new(Inner {
                id: t.inner.id,
                shape: shape.to_vec(),
                dtype: t.inner.dtype,
                device: t.inner.device,
                storage: t.inner.storage.clone(),
                tracked: AtomicBool::new(false),
            }),
        })
    }

    /// Marks this tensor as a leaf whose gradient `backward` computes (a parameter or an
    /// input under test). Returns the same handle.
    pub fn requires_grad(self) -> Tensor {
        self.inner.tracked.store(true, Ordering::Relaxed);
        self
    }

    /// Stops tracking this tensor (e.g. a frozen parameter).
    pub fn set_requires_grad(&self, on: bool) {
        self.inner.tracked.store(on, Ordering::Relaxed);
    }

    /// True when gradients flow to or through this tensor.
    pub fn is_tracked(&self) -> bool {
        self.inner.tracked.load(Ordering::Relaxed)
    }

    /// Replaces the elements in place with host values (same count); on a GPU the
    /// buffer keeps its address.
    pub fn copy_from_slice(&self, data: &[f32]) -> Result<()> {
        if data.len() != self.numel() {
            bail!("copy of {} values into a tensor of shape {:?}", data.len(), self.shape());
        }
        check_host_transfer("a copy of host values into a tensor")?;
        let mut s = self.storage_mut();
        match &mut *s {
            Storage::Cpu(v) => v.copy_from_slice(data),
            // In place: the buffer keeps its address (see `ops::GraphRunner`).
            Storage::Cuda(c) => c.dev.upload_into(data, &mut c.buf)?,
        }
        Ok(())
    }

    /// Replaces the elements in place with those of `src` (same shape; any device/dtype).
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        if src.shape() != self.shape() {
            bail!("assign of shape {:?} into shape {:?}", src.shape(), self.shape());
        }
        if self.same_storage(src) {
            return Ok(());
        }
        // On one GPU in one element type: a device copy, queued like any op (this is
        // also how inputs reach a recorded CUDA graph).
        if self.device().is_cuda() && self.device() == src.device() && self.dtype() == src.dtype() {
            let from = src.storage();
            let mut to = self.storage_mut();
            let (Storage::Cuda(a), Storage::Cuda(b)) = (&*from, &mut *to) else {
                bail!("assign: CUDA tensors without device storage");
            };
            return a.dev.copy_buf(&a.buf, &mut b.buf);
        }
        let v = src.to_vec()?;
        self.copy_from_slice(&v)
    }

    /// Checks the shape, with an error that names `what`.
    pub fn expect_shape(&self, what: &str, shape: &[usize]) -> Result<()> {
        if self.shape() != shape {
            return Err(Error::msg(format!("{what}: expected shape {shape:?}, got {:?}", self.shape())));
        }
        Ok(())
    }
}
