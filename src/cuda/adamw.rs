//! Launchers of `kernels/adamw.cu`: the fused AdamW update (one tensor, or every
//! parameter of a step in one launch) and the deterministic sum of squares behind the
//! global gradient norm (one launch for all tensors).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, PushKernelArg};

use half::bf16;

use super::{grid_1d, kernel_name, CudaBuf, CudaStorage, Elem, PushBuf};
use crate::desc::AdamWStep;
use crate::{bail, Result, ResultExt};

// SAFETY: eight f32 fields with `#[repr(C)]`, the layout of `struct AdamWStep` in
// kernels/adamw.cu.
unsafe impl cudarc::driver::DeviceRepr for AdamWStep {}

/// Elements each thread updates per iteration (`VEC` in the kernel).
const VEC: usize = 8;
/// Threads per block of every kernel in the module.
const BLOCK: u32 = 256;

/// Where the weights of an update live (the kernels' three modes).
pub enum Weights<'a> {
    /// fp32 weights: an f32 parameter itself.
    Plain(&'a mut CudaStorage),
    /// An fp32 master `w` and the bf16 parameter `copy`, rewritten as the rounded master.
    Master {
        /// The fp32 master.
        w: &'a mut CudaStorage,
        /// The bf16 parameter.
        copy: &'a mut CudaStorage,
    },
    /// A split master: the bf16 parameter (the rounded high halves) and the low halves
    /// (raw 16-bit patterns in a bf16 buffer).
    Split {
        /// The bf16 parameter.
        param: &'a mut CudaStorage,
        /// The low halves.
        lo: &'a mut CudaStorage,
    },
}

impl Weights<'_> {
    /// Checks the buffers' dtypes and lengths against `n` elements; `what` names the tensor.
    fn check(&self, n: usize, what: &str) -> Result<()> {
        let want = |c: &CudaStorage, dtype: crate::DType, role: &str| -> Result<()> {
            if c.buf.dtype() != dtype {
                bail!("adamw: {role} of {what} are {:?}, not {dtype:?}", c.buf.dtype());
            }
            if c.buf.len() < n {
                bail!("adamw: {role} of {what} hold {} elements, fewer than the {n} to update", c.buf.len());
            }
            Ok(())
        };
        use crate::DType::{BF16, F32};
        match self {
            Weights::Plain(w) => want(w, F32, "the weights"),
            Weights::Master { w, copy } => want(w, F32, "the master").and(want(copy, BF16, "the compute copy")),
            Weights::Split { param, lo } => want(param, BF16, "the parameter").and(want(lo, BF16, "the low halves")),
        }
    }

    /// The buffers, for the device checks.
    fn storages(&self) -> Vec<&CudaStorage> {
        match self {
            Weights::Plain(w) => vec![w],
            Weights::Master { w, copy } => vec![w, copy],
            Weights::Split { param, lo } => vec![param, lo],
        }
    }
}

/// A step's gate ([`step_gate`]) as a launch argument: its buffer, checked, or null.
fn gate_arg<'a>(gate: Option<&'a CudaStorage>, dev: &Arc<super::CudaDevice>) -> Result<Option<&'a CudaSlice<f32>>> {
    let Some(g) = gate else { return Ok(None) };
    if !Arc::ptr_eq(&g.dev, dev) {
        bail!("adamw: the step's gate lives on another GPU");
    }
    Ok(Some(f32::of(&g.buf).ctx("adamw: the step's gate")?))
}

/// One AdamW update of `n` elements: the weights (see [`Weights`]) and the fp32 moments
/// `m`, `v` updated in place from `grad` (f32 or bf16). With a `gate` (a one-element
/// buffer from [`step_gate`]), the gradient scale is multiplied by it, and a non-finite
/// gate leaves everything as it is.
pub fn step(
    grad: &CudaStorage,
    weights: Weights<'_>,
    m: &mut CudaStorage,
    v: &mut CudaStorage,
    s: &AdamWStep,
    n: usize,
    gate: Option<&CudaStorage>,
) -> Result<()> {
    let dev = m.dev.clone();
    weights.check(n, "the parameter")?;
    let gate = gate_arg(gate, &dev)?;
    let short = |c: &CudaStorage| c.buf.len() < n;
    if short(grad) || short(m) || short(v) {
        bail!("adamw: buffers shorter than the {n} elements to update");
    }
    let base = match weights {
        Weights::Plain(_) => "adamw",
        Weights::Master { .. } => "adamw_master",
        Weights::Split { .. } => "adamw_split",
    };
    let f = dev.func("adamw", kernel_name(base, grad.buf.dtype()))?;
    // The entry points' orders: (grad, w, m, v[, copy], s, n) and (grad, param, lo, m, v, s, n).
    let (w, copy, split) = match weights {
        Weights::Plain(w) => (Some(w), None, None),
        Weights::Master { w, copy } => (Some(w), Some(copy), None),
        Weights::Split { param, lo } => (None, None, Some((param, lo))),
    };
    let n64 = n as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.buf(&grad.buf);
    if let Some(w) = w {
        lb.arg(f32::of_mut(&mut w.buf)?);
    }
    if let Some((param, lo)) = split {
        lb.arg(bf16::of_mut(&mut param.buf)?).arg(bf16::of_mut(&mut lo.buf)?);
    }
    lb.arg(f32::of_mut(&mut m.buf).ctx("adamw: first moment")?);
    lb.arg(f32::of_mut(&mut v.buf).ctx("adamw: second moment")?);
    if let Some(copy) = copy {
        lb.arg(bf16::of_mut(&mut copy.buf)?);
    }
    lb.arg(s).arg(&n64);
    match gate {
        Some(g) => lb.arg(g),
        None => lb.arg(&super::NULL_PTR),
    };
    // SAFETY: every buffer holds at least n elements (checked above) of the dtype the
    // entry point expects (the low halves are 16-bit patterns, read as uint16_t), the gate
    // (if any) at least one f32; each thread reads and writes only its own elements.
    unsafe { lb.launch(grid_1d(n.div_ceil(VEC), BLOCK)) }?;
    Ok(())
}

/// The fp32 masters of `n` split-master elements (`master_join`): a new f32 buffer.
pub fn master_join(param: &CudaStorage, lo: &CudaStorage, n: usize) -> Result<CudaBuf> {
    let dev = param.dev.clone();
    if !Arc::ptr_eq(&lo.dev, &dev) {
        bail!("master_join: the parameter and its low halves live on different GPUs");
    }
    if param.buf.len() < n || lo.buf.len() < n {
        bail!("master_join: buffers shorter than the {n} elements");
    }
    let mut out = dev.alloc_t::<f32>(n)?;
    let f = dev.func("adamw", "master_join")?;
    let n64 = n as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(bf16::of(&param.buf)?).arg(bf16::of(&lo.buf)?).arg(&mut out).arg(&n64);
    // SAFETY: reads n elements of both inputs and writes n of `out` (all long enough).
    unsafe { lb.launch(grid_1d(n, BLOCK)) }?;
    Ok(CudaBuf::F32(out))
}

/// Splits `n` fp32 masters into the bf16 parameter and the low halves (`master_split`).
pub fn master_split(w: &CudaStorage, param: &mut CudaStorage, lo: &mut CudaStorage, n: usize) -> Result<()> {
    let dev = w.dev.clone();
    if !Arc::ptr_eq(&param.dev, &dev) || !Arc::ptr_eq(&lo.dev, &dev) {
        bail!("master_split: buffers on different GPUs");
    }
    if w.buf.len() < n || param.buf.len() < n || lo.buf.len() < n {
        bail!("master_split: buffers shorter than the {n} elements");
    }
    let f = dev.func("adamw", "master_split")?;
    let n64 = n as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(f32::of(&w.buf)?).arg(bf16::of_mut(&mut param.buf)?).arg(bf16::of_mut(&mut lo.buf)?).arg(&n64);
    // SAFETY: reads n masters and writes n elements of each output (all long enough).
    unsafe { lb.launch(grid_1d(n, BLOCK)) }?;
    Ok(())
}

/// The variable that turns split masters on (`1`; `0`, the default, keeps fp32 masters).
const SPLIT_VAR: &str = "SYNTHOS_CUDA_SPLIT_MASTER";

/// True when new bf16 parameters get split masters: `SYNTHOS_CUDA_SPLIT_MASTER=1` (or a
/// [`with_split_masters`] override on this thread).
pub fn split_masters() -> Result<bool> {
    Ok(super::choice::get(SPLIT_VAR, &["0", "1"])? == 1)
}

/// Runs `f` with split masters on or off on this thread.
pub fn with_split_masters<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::choice::with(SPLIT_VAR, on as usize, f)
}

/// Elements per chunk of the multi-tensor kernels (`chunk`; a multiple of `VEC`): one
/// block of 256 threads per chunk.
pub const MULTI_CHUNK: usize = 65536;

/// One tensor of a multi-tensor launch (`struct MultiTensor` in kernels/adamw.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct MultiTensor {
    grad: u64,
    w: u64,
    m: u64,
    v: u64,
    copy: u64,
    lo: u64,
    n: i64,
    s: AdamWStep,
    grad_bf16: i32,
    pad: i32,
}

/// One chunk of a multi-tensor launch (`struct MultiChunk`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct MultiChunk {
    tensor: i32,
    chunk: i32,
}

// SAFETY: plain `#[repr(C)]` data with the layouts of the kernel's structs (u64 device
// addresses for its pointers).
unsafe impl cudarc::driver::DeviceRepr for MultiTensor {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for MultiChunk {}

/// The chunk table of tensors with `sizes` elements, in tensor order.
fn chunks(sizes: &[usize]) -> Result<Vec<MultiChunk>> {
    let mut out = Vec::new();
    for (t, &n) in sizes.iter().enumerate() {
        for c in 0..n.div_ceil(MULTI_CHUNK) {
            let (Ok(tensor), Ok(chunk)) = (i32::try_from(t), i32::try_from(c)) else {
                bail!("multi-tensor launch: tensor {t} chunk {c} beyond 32-bit indices");
            };
            out.push(MultiChunk { tensor, chunk });
        }
    }
    if out.len() > i32::MAX as usize {
        bail!("multi-tensor launch: {} chunks exceed the grid", out.len());
    }
    Ok(out)
}

/// One parameter of [`step_many`]: the same buffers as [`step`].
pub struct AdamWEntry<'a> {
    /// The gradient (f32 or bf16).
    pub grad: &'a CudaStorage,
    /// The weights.
    pub weights: Weights<'a>,
    /// First moment (fp32).
    pub m: &'a mut CudaStorage,
    /// Second moment (fp32).
    pub v: &'a mut CudaStorage,
    /// This parameter's hyper-parameters of the step.
    pub s: AdamWStep,
    /// Elements to update.
    pub n: usize,
}

/// [`step`] for many parameters in one launch (`adamw_multi`): the same arithmetic per
/// element, so the results equal one [`step`] per parameter bit for bit, with the same
/// `gate` for all. All buffers must live on one GPU.
pub fn step_many(entries: &mut [AdamWEntry<'_>], gate: Option<&CudaStorage>) -> Result<()> {
    let Some(first) = entries.first() else {
        return Ok(());
    };
    let dev = first.m.dev.clone();
    let gate = gate_arg(gate, &dev)?;
    let mut table = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let n = e.n;
        let what = format!("tensor {i}");
        e.weights.check(n, &what)?;
        let short = |c: &CudaStorage| c.buf.len() < n;
        if short(e.grad) || short(e.m) || short(e.v) {
            bail!("adamw: buffers of {what} shorter than the {n} elements to update");
        }
        let same = |c: &CudaStorage| Arc::ptr_eq(&c.dev, &dev);
        if !(same(e.grad) && same(e.m) && same(e.v) && e.weights.storages().into_iter().all(same)) {
            bail!("adamw: {what} lives on another GPU");
        }
        for (role, b) in [("exp_avg", &e.m.buf), ("exp_avg_sq", &e.v.buf)] {
            if b.dtype() != crate::DType::F32 {
                bail!("adamw: {role} of {what} are {:?}, not f32", b.dtype());
            }
        }
        let a = |c: &CudaStorage| c.buf.device_addr(&dev.stream);
        let (w, copy, lo) = match &e.weights {
            Weights::Plain(w) => (a(w), 0, 0),
            Weights::Master { w, copy } => (a(w), a(copy), 0),
            Weights::Split { param, lo } => (0, a(param), a(lo)),
        };
        table.push(MultiTensor {
            grad: a(e.grad),
            w,
            m: a(e.m),
            v: a(e.v),
            copy,
            lo,
            n: n as i64,
            s: e.s,
            grad_bf16: (e.grad.buf.dtype() == crate::DType::BF16) as i32,
            pad: 0,
        });
    }
    let Some((tensors, chunks_dev, count)) = upload_tables(&dev, &table)? else {
        return Ok(());
    };
    let f = dev.func("adamw", "adamw_multi")?;
    let chunk = MULTI_CHUNK as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(&tensors).arg(&chunks_dev).arg(&chunk);
    match gate {
        Some(g) => lb.arg(g),
        None => lb.arg(&super::NULL_PTR),
    };
    // SAFETY: every table entry holds live device addresses of buffers with at least n
    // elements of the dtypes it names (checked above; the caller's borrows keep them alive
    // and unaliased until the launch is queued, and frees are stream-ordered after it);
    // the gate (if any) is one f32; block b updates only elements of chunk b, and chunks
    // do not overlap.
    unsafe { lb.launch(super::grid_rows(count, BLOCK)) }?;
    Ok(())
}

/// A multi-tensor launch's tables on the device: the tensors, their chunks (in tensor
/// order) and the chunk count, which is the grid; `None` when there is no element.
#[allow(clippy::type_complexity)]
fn upload_tables(
    dev: &super::CudaDevice,
    table: &[MultiTensor],
) -> Result<Option<(CudaSlice<MultiTensor>, CudaSlice<MultiChunk>, usize)>> {
    let chunk_table = chunks(&table.iter().map(|t| t.n as usize).collect::<Vec<_>>())?;
    if chunk_table.is_empty() {
        return Ok(None);
    }
    Ok(Some((dev.stream.clone_htod(table)?, dev.stream.clone_htod(&chunk_table)?, chunk_table.len())))
}

/// The variable that turns the multi-tensor launches on (`1`; `0`, the default, launches
/// per tensor).
const MULTI_VAR: &str = "SYNTHOS_CUDA_MULTI_TENSOR";

/// True when the optimizer's updates and the gradient norm use the multi-tensor launches
/// on this thread: a [`with_multi_tensor`] override, else `SYNTHOS_CUDA_MULTI_TENSOR=1`.
pub fn multi_tensor() -> Result<bool> {
    Ok(super::choice::get(MULTI_VAR, &["0", "1"])? == 1)
}

/// Runs `f` with the multi-tensor launches on or off on this thread.
pub fn with_multi_tensor<R>(on: bool, f: impl FnOnce() -> R) -> R {
    super::choice::with(MULTI_VAR, on as usize, f)
}

/// The gate of a step whose update is queued before the host reads its loss and gradient
/// norm (`step_gate`): a new one-element buffer holding the gradient factor (the clip
/// coefficient `min(1, max_norm / (sqrt(sumsq) + 1e-6))` when `max_norm` is given, else 1),
/// or NaN when `loss` or the norm is not finite, which makes every update given the gate
/// leave its tensors untouched. `sumsq` and `loss` are one-element f32 buffers; the
/// caller (`ops::step_gate`) has checked that `max_norm` is positive.
pub fn step_gate(sumsq: &CudaStorage, loss: &CudaStorage, max_norm: Option<f32>) -> Result<CudaBuf> {
    let dev = sumsq.dev.clone();
    if !Arc::ptr_eq(&loss.dev, &dev) {
        bail!("step_gate: the loss and the sum of squares live on different GPUs");
    }
    // (The kernel's "no clipping".)
    let max_norm = max_norm.unwrap_or(0.0);
    let mut out = dev.alloc_t::<f32>(1)?;
    let f = dev.func("adamw", "step_gate")?;
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(f32::of(&sumsq.buf).ctx("step_gate: the sum of squares")?);
    lb.arg(f32::of(&loss.buf).ctx("step_gate: the loss")?);
    lb.arg(&max_norm).arg(&mut out);
    // SAFETY: reads one f32 of each input (every buffer has at least one element) and
    // writes out[0], from one thread.
    unsafe { lb.launch(super::grid_rows(1, 32)) }?;
    Ok(CudaBuf::F32(out))
}

/// Most blocks one tensor's per-tensor sum of squares uses (beyond this, threads loop).
const MAX_SUMSQ_BLOCKS: usize = 1024;

/// `Σ x²` over every element of every tensor (each given with its element count), in
/// fp32 with a fixed reduction order: one `sum_squares_multi` launch (see
/// [`multi_tensor`]) or one `sum_squares_<dtype>` per tensor, then `sum_partials`. All
/// tensors must live on one device.
pub fn sum_squares(xs: &[(&CudaStorage, usize)]) -> Result<f32> {
    let Some((first, _)) = xs.first() else {
        return Ok(0.0);
    };
    let o = sum_squares_on_device(xs)?;
    Ok(first.dev.stream.clone_dtoh(&o)?[0])
}

/// [`sum_squares`] left on the device: a one-element fp32 buffer, with no host
/// synchronisation (`xs` must not be empty).
pub fn sum_squares_on_device(xs: &[(&CudaStorage, usize)]) -> Result<CudaSlice<f32>> {
    let Some((first, _)) = xs.first() else {
        bail!("sum_squares: no tensors");
    };
    let dev = first.dev.clone();
    if xs.iter().any(|(x, _)| !Arc::ptr_eq(&x.dev, &dev)) {
        bail!("sum_squares: tensors on different GPUs");
    }
    if let Some((x, n)) = xs.iter().find(|(x, n)| x.buf.len() < *n) {
        bail!("sum_squares: buffer of {} elements for {n}", x.buf.len());
    }
    if multi_tensor()? {
        sum_squares_multi(&dev, xs)
    } else {
        sum_squares_per_tensor(&dev, xs)
    }
}

/// [`sum_squares_on_device`] in one `sum_squares_multi` launch (one partial per chunk).
fn sum_squares_multi(dev: &super::CudaDevice, xs: &[(&CudaStorage, usize)]) -> Result<CudaSlice<f32>> {
    let table: Vec<MultiTensor> = xs
        .iter()
        .map(|(x, n)| MultiTensor {
            grad: x.buf.device_addr(&dev.stream),
            w: 0,
            m: 0,
            v: 0,
            copy: 0,
            lo: 0,
            n: *n as i64,
            s: AdamWStep::default(),
            grad_bf16: (x.buf.dtype() == crate::DType::BF16) as i32,
            pad: 0,
        })
        .collect();
    let Some((tensors, chunks_dev, total)) = upload_tables(dev, &table)? else {
        return f32::take(dev.zeros(1, crate::DType::F32)?);
    };
    let mut parts = dev.alloc_t::<f32>(total)?;
    {
        let f = dev.func("adamw", "sum_squares_multi")?;
        let chunk = MULTI_CHUNK as i64;
        let mut lb = dev.stream.launch_builder(&f);
        lb.arg(&tensors).arg(&chunks_dev).arg(&chunk).arg(&mut parts);
        // SAFETY: the table's addresses are live buffers of at least n elements of the
        // dtype it names (checked by the caller, which borrows them); block b reads chunk
        // b and writes partials[b], b < total.
        unsafe { lb.launch(super::grid_rows(total, BLOCK)) }?;
    }
    sum_partials(dev, &parts, total)
}

/// [`sum_squares_on_device`] with one `sum_squares_<dtype>` launch per tensor.
fn sum_squares_per_tensor(dev: &super::CudaDevice, xs: &[(&CudaStorage, usize)]) -> Result<CudaSlice<f32>> {
    let blocks: Vec<usize> = xs.iter().map(|(_, n)| n.div_ceil(BLOCK as usize).clamp(1, MAX_SUMSQ_BLOCKS)).collect();
    let total: usize = blocks.iter().sum();
    let mut parts = dev.alloc_t::<f32>(total)?;
    let mut offset = 0i64;
    for ((x, n), nb) in xs.iter().zip(&blocks) {
        let f = dev.func("adamw", kernel_name("sum_squares", x.buf.dtype()))?;
        let n64 = *n as i64;
        let mut lb = dev.stream.launch_builder(&f);
        lb.buf(&x.buf);
        lb.arg(&n64).arg(&mut parts).arg(&offset);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (*nb as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads n elements of x (checked by the caller); block b writes
        // partials[offset + b] with b < nb, and offset + nb ≤ total.
        unsafe { lb.launch(cfg) }?;
        offset += *nb as i64;
    }
    sum_partials(dev, &parts, total)
}

/// `Σ partials[0..total)` in a fixed order (`sum_partials`, one block), into a
/// one-element buffer.
fn sum_partials(dev: &super::CudaDevice, parts: &CudaSlice<f32>, total: usize) -> Result<CudaSlice<f32>> {
    let mut o = dev.alloc_t::<f32>(1)?;
    let f = dev.func("adamw", "sum_partials")?;
    let count = total as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(parts).arg(&count).arg(&mut o);
    // SAFETY: reads `total` partials, all written earlier on this stream; writes out[0].
    unsafe { lb.launch(super::grid_rows(1, BLOCK)) }?;
    Ok(o)
}
