//! The VAE's middle block and its single-head attention over pixels.

use super::layers::*;
use crate::nn::{NamedParam, ParamSource};
use crate::ops::{self, Conv2dOptions, Padding2d};
use crate::{bail, Result, Tensor};

/// `WanAttentionBlock`: single-head self-attention over the pixels of a frame, with a
/// residual connection.
pub(super) struct AttnBlock {
    pub(super) norm: ChannelNorm,
    pub(super) to_qkv: Conv2d,
    pub(super) proj: Conv2d,
}

impl AttnBlock {
    pub(super) fn new(src: &mut dyn ParamSource, prefix: &str, c: usize) -> Result<Self> {
        let one = Conv2dOptions::new(1, Padding2d::same(0));
        Ok(AttnBlock {
            norm: ChannelNorm::new(src, &join(prefix, "norm"), c, true)?,
            to_qkv: Conv2d::new(src, &join(prefix, "to_qkv"), c, 3 * c, 1, one)?,
            proj: Conv2d::new(src, &join(prefix, "proj"), c, c, 1, one)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [b, c, h, w] = *x.shape() else {
            bail!("{}: expected [B, C, H, W], got {:?}", self.norm.name, x.shape());
        };
        let qkv = ops::reshape(&self.to_qkv.forward(&self.norm.forward(x)?)?, &[b, 3 * c, h * w])?;
        let parts = ops::split(&qkv, 1, &[c, c, c])?;
        let y = spatial_attention(&parts[0], &parts[1], &parts[2], DEFAULT_MAX_SCORE_ELEMS)?;
        ops::add(&self.proj.forward(&ops::reshape(&y, &[b, c, h, w])?)?, x)
    }

    pub(super) fn params(&self, out: &mut Vec<NamedParam>) {
        self.norm.params(out);
        self.to_qkv.params(out);
        self.proj.params(out);
    }
}

/// `WanMidBlock` with one attention layer: residual block, attention, residual block.
pub(super) struct MidBlock {
    pub(super) res0: ResBlock,
    pub(super) attn: AttnBlock,
    pub(super) res1: ResBlock,
}

impl MidBlock {
    pub(super) fn new(src: &mut dyn ParamSource, prefix: &str, c: usize) -> Result<Self> {
        Ok(MidBlock {
            res0: ResBlock::new(src, &join(prefix, "resnets.0"), c, c)?,
            attn: AttnBlock::new(src, &join(prefix, "attentions.0"), c)?,
            res1: ResBlock::new(src, &join(prefix, "resnets.1"), c, c)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.res1.forward(&self.attn.forward(&self.res0.forward(x)?)?)
    }

    pub(super) fn params(&self, out: &mut Vec<NamedParam>) {
        self.res0.params(out);
        self.attn.params(out);
        self.res1.params(out);
    }
}

/// Default cap on the elements of one chunk of attention scores in
/// [`spatial_attention`]: 64 Mi elements (a 1024×1024 image's 16384 latent pixels take
/// four chunks).
pub const DEFAULT_MAX_SCORE_ELEMS: usize = 1 << 26;

/// Single-head attention over pixels with channel-first operands, as the Wan VAE's
/// middle block computes it: `q`, `k`, `v` are `[B, C, N]` (C channels = the head
/// dimension, N pixels) and the result is `[B, C, N]` with
/// `out[:, :, i] = Σ_j softmax_j(q_i·k_j / √C) · v[:, :, j]`.
///
/// Query pixels are processed in chunks whose `[B, rows, N]` scores hold at most
/// `max_score_elems` elements, so memory stays bounded for large images. Built from
/// recorded ops, so it is differentiable; under recording, the backward keeps each
/// chunk's probabilities (N×N in all).
pub fn spatial_attention(q: &Tensor, k: &Tensor, v: &Tensor, max_score_elems: usize) -> Result<Tensor> {
    ops::same_device("spatial_attention", &[q, k, v])?;
    if q.rank() != 3 || k.shape() != q.shape() || v.shape() != q.shape() || q.numel() == 0 {
        bail!(
            "spatial_attention: q, k and v must share one non-empty [B, C, N] shape, got {:?}, {:?} and {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    let (b, c, n) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let rows = (max_score_elems / (b * n)).clamp(1, n);
    let s = 1.0 / (c as f32).sqrt();
    let mut outs = Vec::with_capacity(n.div_ceil(rows));
    for r0 in (0..n).step_by(rows) {
        let len = rows.min(n - r0);
        let qc = ops::scale(&ops::narrow(q, 2, r0, len)?, s)?;
        // scores[b, i, j] = q_i·k_j / √C, [B, len, N]
        let scores = ops::matmul_t(&qc, k, true, false)?;
        let p = ops::softmax_last_dim(&scores)?;
        // out[b, :, i] = Σ_j p[b, i, j]·v[b, :, j], [B, C, len]
        outs.push(ops::matmul_t(v, &p, false, true)?);
    }
    if outs.len() == 1 {
        return outs.pop().ok_or_else(|| crate::Error::msg("spatial_attention: no chunk"));
    }
    ops::concat(&outs.iter().collect::<Vec<_>>(), 2)
}
