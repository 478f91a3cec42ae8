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
use crate::{bail, cpu, cuda, DType, Device, Result, Tensor};

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
pub fn gather_rows(table: &Tensor, ids: &[usize]) -> Result<Tensor> {
    let &[rows, d] = table.shape() else {
        bail!("gather_rows: the table must be 2-D [rows, dim], got {:?}", table.shape());
    };
    if let Some((i, r)) = ids.iter().enumerate().find(|(_, &r)| r >= rows) {
        bail!(
            "gather_rows: index {r} (position {i}) out of range for a table of {rows} rows (shape {:?})",
            table.shape()
        );
    }
    let shape = [ids.len(), d];
    let out = match table.device() {
        Device::Cpu => cpu_tensor(cpu::shape::gather_rows(table.storage().as_cpu()?, ids, d), &shape)?,
        Device::Cuda(_) => {
            let st = table.storage();
            let c = st.as_cuda()?;
            let idx = c.dev.upload_indices(ids)?;
            cuda_tensor(&c.dev, cuda::shape::gather_rows(c, &idx, d)?, &shape)?
        }
    };
    let (ids, tdt) = (ids.to_vec(), table.dtype());
    Ok(record(
        "gather_rows",
        out,
        &[table],
        Box::new(move |g| {
            let dt = match g.device() {
                Device::Cpu => cpu_tensor(cpu::shape::scatter_rows(g.storage().as_cpu()?, &ids, rows, d), &[rows, d])?,
                Device::Cuda(_) => {
                    let g = in_dtype(g, tdt)?;
                    let st = g.storage();
                    let c = st.as_cuda()?;
                    cuda_tensor(&c.dev, cuda::shape::scatter_rows(c, &ids, rows, d)?, &[rows, d])?
                }
            };
            Ok(vec![Some(dt)])
        }),
    ))
}
