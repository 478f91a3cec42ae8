//! Shape ops: reshape (zero-copy), permute/transpose, concat, narrow, split, and row
//! gathers (embedding lookups, pooling one token per sequence).
//!
//! Every tensor is contiguous, so permutes and slices copy: one strided-copy kernel
//! (rank ≤ 6) and one slab-copy kernel cover them all on the GPU.

use super::elementwise::in_dtype;
use super::{cpu_tensor, cuda_tensor, result_dtype, same_device};
use crate::autograd::record;
use crate::desc::Slab;
use crate::tensor::numel;
use crate::{bail, cpu, cuda, DType, Device, Error, Result, Tensor};

/// The largest rank the permute kernel handles.
const MAX_RANK: usize = 6;

/// The same elements viewed with another shape of the same element count (no copy).
pub fn reshape(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if numel(shape) != x.numel() {
        bail!(
            "reshape: cannot reshape {:?} ({} elements) to {shape:?} ({} elements)",
            x.shape(),
            x.numel(),
            numel(shape)
        );
    }
    if x.shape() == shape {
        return Ok(x.clone());
    }
    let out = x.view_as(shape)?;
    let xs = x.shape().to_vec();
    Ok(record("reshape", out, &[x], Box::new(move |g| Ok(vec![Some(reshape(g, &xs)?)]))))
}

/// Reorders dimensions: output dimension `d` is input dimension `perm[d]`.
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let r = x.rank();
    let mut seen = vec![false; r];
    let valid = perm.len() == r && perm.iter().all(|&p| p < r && !std::mem::replace(&mut seen[p], true));
    if !valid {
        bail!("permute: {perm:?} is not a permutation of the {r} dimensions of shape {:?}", x.shape());
    }
    if r > MAX_RANK {
        bail!("permute: shape {:?} has rank {r}, at most {MAX_RANK} is supported", x.shape());
    }
    if perm.iter().enumerate().all(|(d, &p)| d == p) {
        return Ok(x.clone());
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let out = match x.device() {
        Device::Cpu => cpu_tensor(cpu::shape::permute(x.storage().as_cpu()?, x.shape(), perm), &out_shape)?,
        Device::Cuda(_) => {
            let s = x.storage();
            let c = s.as_cuda()?;
            cuda_tensor(&c.dev, cuda::shape::permute(c, x.shape(), perm)?, &out_shape)?
        }
    };
    let mut inverse = vec![0; r];
    for (d, &p) in perm.iter().enumerate() {
        inverse[p] = d;
    }
    Ok(record("permute", out, &[x], Box::new(move |g| Ok(vec![Some(permute(g, &inverse)?)]))))
}

/// Swaps dimensions `d0` and `d1`.
pub fn transpose(x: &Tensor, d0: usize, d1: usize) -> Result<Tensor> {
    let r = x.rank();
    if d0 >= r || d1 >= r {
        bail!("transpose: dimensions {d0} and {d1} out of range for shape {:?}", x.shape());
    }
    let mut perm: Vec<usize> = (0..r).collect();
    perm.swap(d0, d1);
    permute(x, &perm)
}

/// `(outer, inner)`: the products of the dimensions before and after `dim`.
fn around(shape: &[usize], dim: usize) -> (usize, usize) {
    (shape[..dim].iter().product(), shape[dim + 1..].iter().product())
}

/// A fresh tensor of `shape` and `dtype` on `device` filled by slab copies from
/// `sources` (each with the slab that places it). Zero-filled first when `zero` is set
/// (the slabs then need not cover everything).
fn assemble(device: Device, dtype: DType, shape: &[usize], zero: bool, sources: &[(&Tensor, Slab)]) -> Result<Tensor> {
    let n = numel(shape);
    match device {
        Device::Cpu => {
            let mut out = vec![0.0; n];
            for (t, slab) in sources {
                cpu::shape::copy_slab(t.storage().as_cpu()?, &mut out, slab);
            }
            cpu_tensor(out, shape)
        }
        Device::Cuda(i) => {
            let dev = cuda::device(i)?;
            let mut buf = if zero { dev.zeros(n, dtype)? } else { dev.alloc(n, dtype)? };
            for (t, slab) in sources {
                let t = in_dtype(t, dtype)?;
                let s = t.storage();
                cuda::shape::copy_slab(s.as_cuda()?, &mut buf, slab)?;
            }
            cuda_tensor(&dev, buf, shape)
        }
    }
}

/// Joins tensors along `dim`; all other dimensions must agree. On the GPU mixed dtypes
/// join in bf16.
pub fn concat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let Some(first) = xs.first() else {
        bail!("concat: no tensors given");
    };
    let device = same_device("concat", xs)?;
    let shapes: Vec<&[usize]> = xs.iter().map(|t| t.shape()).collect();
    let r = first.rank();
    if dim >= r {
        bail!("concat: dimension {dim} out of range for shape {:?}", first.shape());
    }
    let compatible =
        |s: &[usize]| s.len() == r && s.iter().zip(first.shape()).enumerate().all(|(d, (a, b))| d == dim || a == b);
    if !shapes.iter().all(|s| compatible(s)) {
        bail!("concat: shapes {shapes:?} differ outside dimension {dim}");
    }
    let total: usize = shapes.iter().map(|s| s[dim]).sum();
    let mut out_shape = first.shape().to_vec();
    out_shape[dim] = total;
    let (outer, inner) = around(&out_shape, dim);
    let mut sources = Vec::with_capacity(xs.len());
    let mut offsets = Vec::with_capacity(xs.len());
    let mut off = 0;
    for t in xs {
        let len = t.shape()[dim];
        let slab = Slab { outer, inner, src_dim: len, src_off: 0, dst_dim: total, dst_off: off, len };
        sources.push((*t, slab));
        offsets.push((off, len, t.dtype()));
        off += len;
    }
    let out = assemble(device, result_dtype(device, xs), &out_shape, false, &sources)?;
    Ok(record(
        "concat",
        out,
        xs,
        Box::new(move |g| {
            offsets.iter().map(|&(off, len, dt)| Ok(Some(in_dtype(&narrow(g, dim, off, len)?, dt)?))).collect()
        }),
    ))
}

/// Elements `start .. start + len` of dimension `dim`.
pub fn narrow(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let shape = x.shape();
    if dim >= shape.len() {
        bail!("narrow: dimension {dim} out of range for shape {shape:?}");
    }
    if start.checked_add(len).is_none_or(|end| end > shape[dim]) {
        bail!(
            "narrow: range {start}..{} out of bounds for dimension {dim} (size {}) of shape {shape:?}",
            start.saturating_add(len),
            shape[dim]
        );
    }
    if start == 0 && len == shape[dim] {
        return Ok(x.clone());
    }
    let (outer, inner) = around(shape, dim);
    let mut out_shape = shape.to_vec();
    out_shape[dim] = len;
    let slab = Slab { outer, inner, src_dim: shape[dim], src_off: start, dst_dim: len, dst_off: 0, len };
    let out = assemble(x.device(), x.dtype(), &out_shape, false, &[(x, slab)])?;
    let (xs, xdt, device) = (shape.to_vec(), x.dtype(), x.device());
    Ok(record(
        "narrow",
        out,
        &[x],
        Box::new(move |g| {
            // The gradient is g placed at `start` in zeros of the input's shape.
            let back = Slab { outer, inner, src_dim: len, src_off: 0, dst_dim: xs[dim], dst_off: start, len };
            Ok(vec![Some(assemble(device, xdt, &xs, true, &[(g, back)])?)])
        }),
    ))
}

/// Cuts dimension `dim` into consecutive pieces of the given sizes (which must add up
/// to its size); each piece is its own [`narrow`].
pub fn split(x: &Tensor, dim: usize, sizes: &[usize]) -> Result<Vec<Tensor>> {
    let shape = x.shape();
    if dim >= shape.len() {
        bail!("split: dimension {dim} out of range for shape {shape:?}");
    }
    let total: usize = sizes.iter().sum();
    if total != shape[dim] {
        bail!(
            "split: sizes {sizes:?} add up to {total}, but dimension {dim} of shape {shape:?} has size {}",
            shape[dim]
        );
    }
    let mut start = 0;
    sizes
        .iter()
        .map(|&len| {
            let piece = narrow(x, dim, start, len);
            start += len;
            piece
        })
        .collect()
}

/// Rows `ids[i]` of a 2-D `table` `[R, D]`, as `[ids.len(), D]`: an embedding lookup
/// (token ids into a vocabulary table) or the pick of one row per sequence (CLIP's
/// end-token pooling of `[B·T, D]` hidden states). The gradient adds each output row's
/// gradient into the table row it came from, in a fixed order on both devices (no atomics:
/// bit-identical from run to run); it comes back in the table's dtype.
///
/// The indices are host values (uploaded on a GPU), so the op may not run inside a function
/// recorded as a CUDA graph: [`gather_rows_at`] takes them as a tensor made beforehand
/// (this op is that one with the tensor made here).
pub fn gather_rows(table: &Tensor, ids: &[usize]) -> Result<Tensor> {
    let &[rows, _] = table.shape() else {
        bail!("gather_rows: the table must be 2-D [rows, dim], got {:?}", table.shape());
    };
    crate::tensor::check_host_transfer("gather_rows's indices given from the host (use gather_rows_at)")?;
    let idx = RowIndices::new(ids, rows, table.device())
        .map_err(|e| Error::msg(format!("gather_rows: {e} (table shape {:?})", table.shape())))?;
    gather_rows_at(table, &idx)
}

/// Row indices for [`gather_rows_at`], made on the host ahead of use as one f32 tensor
/// (`[4n + 1]`, on the device that will gather), together with the grouping its gradient
/// needs, so that neither the gather nor its backward pass uploads anything: a training
/// step recorded as a CUDA graph takes the tensor as one of its inputs
/// ([`RowIndices::tensor`], [`RowIndices::from_tensor`]).
///
/// Layout (exact integers in f32): the `n` ids; the positions `0..n` stably sorted by id;
/// the distinct ids in that order, padded to `n` with −1; the start of each id's run of
/// positions, padded to `n + 1` with `n`. Every id and position is below 2²⁴, where f32
/// holds integers exactly.
///
/// ```
/// use synthos_engine::{ops, Device, Tensor};
/// let table = Tensor::from_vec((0..8).map(|v| v as f32).collect(), &[4, 2], Device::Cpu)?;
/// let idx = ops::RowIndices::new(&[3, 0, 3], 4, Device::Cpu)?;
/// assert_eq!(ops::gather_rows_at(&table, &idx)?.to_vec()?, vec![6.0, 7.0, 0.0, 1.0, 6.0, 7.0]);
/// # Ok::<(), synthos_engine::Error>(())
/// ```
#[derive(Clone)]
pub struct RowIndices {
    tensor: Tensor,
    n: usize,
    rows: usize,
}

impl RowIndices {
    /// The largest table (rows) and number of indices: f32 holds integers exactly up to 2²⁴.
    pub const MAX: usize = 1 << 24;

    /// The indices `ids` into a table of `rows` rows, on `device`. An id outside the table
    /// is an error naming its position.
    pub fn new(ids: &[usize], rows: usize, device: Device) -> Result<RowIndices> {
        if rows > Self::MAX || ids.len() > Self::MAX {
            bail!("row indices: {} indices into {rows} rows; at most {} of each (exact in f32)", ids.len(), Self::MAX);
        }
        if let Some((i, r)) = ids.iter().enumerate().find(|(_, &r)| r >= rows) {
            bail!("row indices: index {r} (position {i}) out of range for a table of {rows} rows");
        }
        let n = ids.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| ids[i]);
        let (mut uniq, mut start) = (Vec::with_capacity(n), Vec::with_capacity(n + 1));
        for (k, &i) in order.iter().enumerate() {
            if uniq.last() != Some(&(ids[i] as f32)) {
                uniq.push(ids[i] as f32);
                start.push(k as f32);
            }
        }
        uniq.resize(n, -1.0);
        start.resize(n + 1, n as f32);
        let mut v = Vec::with_capacity(4 * n + 1);
        v.extend(ids.iter().map(|&r| r as f32));
        v.extend(order.iter().map(|&i| i as f32));
        v.extend(uniq);
        v.extend(start);
        let tensor = Tensor::from_vec_dtype(v, &[4 * n + 1], device, DType::F32)?;
        Ok(RowIndices { tensor, n, rows })
    }

    /// The indices held in `tensor`, a [`RowIndices::tensor`] (or a copy of one, such as a
    /// recorded step's input), into a table of `rows` rows. Only the shape and type are
    /// checked here (the values were checked when they were made); a gather from a tensor
    /// that was not made by [`RowIndices::new`] reads zeros for indices outside the table.
    pub fn from_tensor(tensor: &Tensor, rows: usize) -> Result<RowIndices> {
        let len = tensor.numel();
        if tensor.rank() != 1 || tensor.dtype() != DType::F32 || len % 4 != 1 || rows > Self::MAX {
            bail!(
                "row indices: a tensor of shape {:?} ({}) into {rows} rows is not an index tensor ([4n + 1] f32 values, \
                 at most {} rows)",
                tensor.shape(),
                tensor.dtype(),
                Self::MAX
            );
        }
        Ok(RowIndices { tensor: tensor.clone(), n: len / 4, rows })
    }

    /// The tensor holding the indices and their grouping.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// Number of indices.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when there are no indices.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Rows of the table the indices point into.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The ids, read from CPU storage.
    fn cpu_ids(&self) -> Result<Vec<usize>> {
        Ok(self.tensor.storage().as_cpu()?[..self.n].iter().map(|&v| v as usize).collect())
    }
}

/// [`gather_rows`] with indices made beforehand ([`RowIndices`]): rows `idx[i]` of a 2-D
/// `table` `[rows, D]` (`rows` = [`RowIndices::rows`]), as `[idx.len(), D]`, and its
/// gradient, without uploading anything. So it runs inside a function recorded as a CUDA
/// graph.
pub fn gather_rows_at(table: &Tensor, idx: &RowIndices) -> Result<Tensor> {
    let &[rows, d] = table.shape() else {
        bail!("gather_rows_at: the table must be 2-D [rows, dim], got {:?}", table.shape());
    };
    if rows != idx.rows {
        bail!("gather_rows_at: indices into {} rows given a table of shape {:?}", idx.rows, table.shape());
    }
    super::same_device("gather_rows_at", &[table, &idx.tensor])?;
    let (n, shape) = (idx.n, [idx.n, d]);
    let out = match table.device() {
        Device::Cpu => cpu_tensor(cpu::shape::gather_rows(table.storage().as_cpu()?, &idx.cpu_ids()?, d), &shape)?,
        Device::Cuda(_) => {
            let (st, si) = (table.storage(), idx.tensor.storage());
            let (c, ci) = (st.as_cuda()?, si.as_cuda()?);
            cuda_tensor(&c.dev, cuda::shape::gather_rows(c, ci, n, rows, d)?, &shape)?
        }
    };
    let (idx, tdt) = (idx.clone(), table.dtype());
    Ok(record(
        "gather_rows_at",
        out,
        &[table],
        Box::new(move |g| {
            let dt = match g.device() {
                Device::Cpu => {
                    let ids = idx.cpu_ids()?;
                    cpu_tensor(cpu::shape::scatter_rows(g.storage().as_cpu()?, &ids, rows, d), &[rows, d])?
                }
                Device::Cuda(_) => {
                    let g = in_dtype(g, tdt)?;
                    let (st, si) = (g.storage(), idx.tensor.storage());
                    let (c, ci) = (st.as_cuda()?, si.as_cuda()?);
                    cuda_tensor(&c.dev, cuda::shape::scatter_rows(c, ci, n, rows, d)?, &[rows, d])?
                }
            };
            Ok(vec![Some(dt)])
        }),
    ))
}
