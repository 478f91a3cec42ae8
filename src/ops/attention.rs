//! Scaled dot-product attention in the layout linear layers produce: q `[B, Nq, H, Dh]`,
//! k and v `[B, Nk, H, Dh]`, output `[B, Nq, H, Dh]` — self- or cross-attention, with an
//! optional key mask, causal masking and an additive bias (T5 relative positions).
//!
//! CPU: blocked f32 attention on sgemm, spread over the rayon pool and deterministic
//! for any thread count ([`crate::cpu::attention`]). CUDA: flash attention
//! (`kernels/attention.cu`) on bf16 q, k, v (other dtypes are cast, and their gradients
//! cast back), fp32 softmax statistics, head dims 32, 64, 80, 96 and 128.

use super::{cast, cpu_tensor, cuda_tensor, same_device};
use crate::autograd::{self, record};
use crate::desc::{AttentionInputs, AttentionParams};
use crate::{bail, cpu, cuda, DType, Device, Result, Storage, Tensor};

/// Options of [`attention`].
#[derive(Clone, Copy, Debug)]
pub struct AttentionOptions<'a> {
    /// Softmax scale applied to `q·k` (usually `1/√Dh`; T5 uses 1).
    pub scale: f32,
    /// Key j is visible to query i only when j ≤ i.
    pub causal: bool,
    /// `[B, Nk]`: 1 keeps a key, 0 hides it from every query.
    pub key_mask: Option<&'a Tensor>,
    /// Additive bias `[Bb, H, Nq, Nk]` with `Bb` 1 or B; gets a gradient when tracked.
    pub bias: Option<&'a Tensor>,
}

impl AttentionOptions<'_> {
    /// Scale `1/√head_dim`, not causal, no mask, no bias.
    pub fn new(head_dim: usize) -> Self {
        AttentionOptions { scale: 1.0 / (head_dim.max(1) as f32).sqrt(), causal: false, key_mask: None, bias: None }
    }
}

/// Borrows the storages of q, k, v, the mask and the bias as `S` through `get` (host
/// slices on the CPU, device buffers on a GPU).
fn inputs_as<'a, S: ?Sized>(
    q: &'a Storage,
    k: &'a Storage,
    v: &'a Storage,
    key_mask: Option<&'a Storage>,
    bias: Option<&'a Storage>,
    get: impl Fn(&'a Storage) -> Result<&'a S>,
) -> Result<AttentionInputs<'a, S>> {
    Ok(AttentionInputs {
        q: get(q)?,
        k: get(k)?,
        v: get(v)?,
        key_mask: key_mask.map(&get).transpose()?,
        bias: bias.map(&get).transpose()?,
    })
}

/// Checks shapes and returns the sizes of the call; errors name the argument and shapes.
fn check(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOptions) -> Result<AttentionParams> {
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        bail!("attention: q, k, v must be [B, N, H, Dh], got q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape());
    }
    let (qs, ks) = (q.shape(), k.shape());
    if k.shape() != v.shape() {
        bail!("attention: k {:?} and v {:?} must have the same shape", ks, v.shape());
    }
    if qs[0] != ks[0] || qs[2] != ks[2] || qs[3] != ks[3] {
        bail!("attention: q {qs:?} and k {ks:?} disagree on batch, heads or head dim ([B, N, H, Dh])");
    }
    if qs.contains(&0) || ks.contains(&0) {
        bail!("attention: empty input (q {qs:?}, k {ks:?})");
    }
    if !opts.scale.is_finite() {
        bail!("attention: scale must be finite, got {}", opts.scale);
    }
    let (batch, q_len, heads, head_dim, kv_len) = (qs[0], qs[1], qs[2], qs[3], ks[1]);
    if let Some(m) = opts.key_mask {
        if m.shape() != [batch, kv_len] {
            bail!("attention: key_mask must be [B, Nk] = [{batch}, {kv_len}], got {:?}", m.shape());
        }
    }
    let mut bias_batch = 0;
    if let Some(b) = opts.bias {
        let s = b.shape();
        if s.len() != 4 || !(s[0] == 1 || s[0] == batch) || s[1..] != [heads, q_len, kv_len] {
            bail!(
                "attention: bias must be [1 or B, H, Nq, Nk] = [1 or {batch}, {heads}, {q_len}, {kv_len}], got {s:?}"
            );
        }
        bias_batch = s[0];
    }
    Ok(AttentionParams { batch, q_len, heads, head_dim, kv_len, bias_batch, scale: opts.scale, causal: opts.causal })
}

/// Softmax attention `softmax(scale·q·kᵀ + bias, masked) · v` per batch and head.
///
/// q: `[B, Nq, H, Dh]`, k and v: `[B, Nk, H, Dh]` (Nq and Nk may differ); returns
/// `[B, Nq, H, Dh]`. A query whose keys are all hidden (mask, causal) outputs zeros and
/// gets zero gradients. Differentiable in q, k, v and the bias (summed over the batch
/// when the bias has `Bb` = 1); the key mask gets no gradient. On a GPU the head dim must
/// be 32, 64, 80, 96 or 128; q, k, v run in bf16, the mask and bias in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
    let params = check(q, k, v, opts)?;
    let mut all = vec![q, k, v];
    all.extend(opts.key_mask);
    all.extend(opts.bias);
    match same_device("attention", &all)? {
        Device::Cpu => attention_recorded(q, k, v, opts.key_mask, opts.bias, params),
        Device::Cuda(_) => {
            cuda::attention::check_head_dim(params.head_dim)?;
            let (q, k, v) = (cast(q, DType::BF16)?, cast(k, DType::BF16)?, cast(v, DType::BF16)?);
            let mask = opts.key_mask.map(|m| cast(m, DType::F32)).transpose()?;
            let bias = opts.bias.map(|b| cast(b, DType::F32)).transpose()?;
            attention_recorded(&q, &k, &v, mask.as_ref(), bias.as_ref(), params)
        }
    }
}

/// What the backward pass needs (on a GPU: bf16 q, k, v, out; f32 mask, bias, lse).
struct Saved {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Option<Tensor>,
    bias: Option<Tensor>,
    out: Tensor,
    /// Row log-sum-exp `[B, H, Nq]` (GPU only; the CPU recomputes rows).
    lse: Option<Tensor>,
    params: AttentionParams,
}

/// Runs the forward on tensors already in the dtypes of the device path and records it.
fn attention_recorded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Option<&Tensor>,
    bias: Option<&Tensor>,
    params: AttentionParams,
) -> Result<Tensor> {
    let out_shape = [params.batch, params.q_len, params.heads, params.head_dim];
    let lse_shape = [params.batch, params.heads, params.q_len];
    // Inside a checkpointed block that keeps attention outputs, the recompute reuses them.
    let cpu = q.device() == Device::Cpu;
    let shapes: &[&[usize]] = if cpu { &[&out_shape] } else { &[&out_shape, &lse_shape] };
    let mut kept = autograd::kept_or_compute(autograd::Kept::Attention, shapes, || {
        let (sq, sk, sv) = (q.storage(), k.storage(), v.storage());
        let (sm, sb) = (key_mask.map(|m| m.storage()), bias.map(|b| b.storage()));
        match q.device() {
            Device::Cpu => {
                let x = inputs_as(&sq, &sk, &sv, sm.as_deref(), sb.as_deref(), Storage::as_cpu)?;
                Ok(vec![cpu_tensor(cpu::attention::forward(&params, &x), &out_shape)?])
            }
            Device::Cuda(_) => {
                let x = inputs_as(&sq, &sk, &sv, sm.as_deref(), sb.as_deref(), Storage::as_cuda)?;
                let (out, lse) = cuda::attention::forward(&params, &x)?;
                let dev = &x.q.dev;
                Ok(vec![cuda_tensor(dev, out, &out_shape)?, cuda_tensor(dev, lse, &lse_shape)?])
            }
        }
    })?;
    let lse = if cpu { None } else { kept.pop() };
    let out = kept.remove(0);
    let mut inputs = vec![q, k, v];
    inputs.extend(bias);
    let saved = Saved {
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        key_mask: key_mask.cloned(),
        bias: bias.cloned(),
        out: out.clone(),
        lse,
        params,
    };
    Ok(record("attention", out, &inputs, Box::new(move |g| saved.backward(g))))
}

impl Saved {
    /// Gradients for (q, k, v[, bias]); `None` for inputs that are not tracked.
    fn backward(&self, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let p = &self.params;
        let want_dbias = self.bias.as_ref().is_some_and(|b| b.is_tracked());
        let q_shape = [p.batch, p.q_len, p.heads, p.head_dim];
        let kv_shape = [p.batch, p.kv_len, p.heads, p.head_dim];
        let bias_shape = [p.bias_batch, p.heads, p.q_len, p.kv_len];
        let (sq, sk, sv, so) = (self.q.storage(), self.k.storage(), self.v.storage(), self.out.storage());
        let (sm, sb) = (self.key_mask.as_ref().map(|m| m.storage()), self.bias.as_ref().map(|b| b.storage()));
        let (dq, dk, dv, dbias) = match g.device() {
            Device::Cpu => {
                let x = inputs_as(&sq, &sk, &sv, sm.as_deref(), sb.as_deref(), Storage::as_cpu)?;
                let sg = g.storage();
                let r = cpu::attention::backward(p, &x, so.as_cpu()?, sg.as_cpu()?, want_dbias);
                let dbias = r.dbias.map(|d| cpu_tensor(d, &bias_shape)).transpose()?;
                (cpu_tensor(r.dq, &q_shape)?, cpu_tensor(r.dk, &kv_shape)?, cpu_tensor(r.dv, &kv_shape)?, dbias)
            }
            Device::Cuda(_) => {
                let x = inputs_as(&sq, &sk, &sv, sm.as_deref(), sb.as_deref(), Storage::as_cuda)?;
                let Some(lse) = &self.lse else {
                    bail!("attention: the forward's log-sum-exp was not kept");
                };
                let g = cast(g, DType::BF16)?;
                let (sl, sg) = (lse.storage(), g.storage());
                let r = cuda::attention::backward(p, &x, so.as_cuda()?, sl.as_cuda()?, sg.as_cuda()?, want_dbias)?;
                let dev = &x.q.dev;
                let dbias = r.dbias.map(|d| cuda_tensor(dev, d, &bias_shape)).transpose()?;
                (
                    cuda_tensor(dev, r.dq, &q_shape)?,
                    cuda_tensor(dev, r.dk, &kv_shape)?,
                    cuda_tensor(dev, r.dv, &kv_shape)?,
                    dbias,
                )
            }
        };
        let keep = |t: &Tensor, grad: Tensor| t.is_tracked().then_some(grad);
        let mut grads = vec![keep(&self.q, dq), keep(&self.k, dk), keep(&self.v, dv)];
        if self.bias.is_some() {
            grads.push(dbias);
        }
        Ok(grads)
    }
}
