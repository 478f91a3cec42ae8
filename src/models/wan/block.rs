//! One DiT block: modulated self-attention with 3D RoPE, cross-attention on the context,
//! modulated gated feed-forward network.

use crate::nn::{Init, LayerNorm, Linear, Module, NamedParam, ParamSource, RmsNorm};
use crate::ops::{self, AttentionOptions};
use crate::{Result, Tensor};

use super::WanConfig;

/// The rotation table of the current token grid: f32 `[tokens, head_dim/2]` each.
#[derive(Clone)]
pub(super) struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Linear q, k, v, o with optional full-width RMSNorms on q and k (`norm_q`, `norm_k`).
pub(super) struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    heads: usize,
}

impl Attention {
    fn new(src: &mut dyn ParamSource, prefix: &str, cfg: &WanConfig) -> Result<Attention> {
        let d = cfg.dim;
        let linear = |src: &mut dyn ParamSource, name: &str| Linear::new(src, &format!("{prefix}.{name}"), d, d, true);
        let q = linear(src, "q")?;
        let k = linear(src, "k")?;
        let v = linear(src, "v")?;
        let o = linear(src, "o")?;
        let (norm_q, norm_k) = if cfg.qk_norm {
            (
                Some(RmsNorm::new(src, &format!("{prefix}.norm_q"), d, cfg.eps)?),
                Some(RmsNorm::new(src, &format!("{prefix}.norm_k"), d, cfg.eps)?),
            )
        } else {
            (None, None)
        };
        Ok(Attention { q, k, v, o, norm_q, norm_k, heads: cfg.num_heads })
    }

    /// `norm(linear(x))` viewed as heads `[B, N, H, Dh]`: the RMSNorm runs over the full
    /// width first (Wan's `qk_norm`), and the linear layer's output needs no permute.
    fn project(&self, x: &Tensor, linear: &Linear, norm: Option<&RmsNorm>) -> Result<Tensor> {
        let mut y = linear.forward(x)?;
        if let Some(n) = norm {
            y = n.forward(&y)?;
        }
        let [b, n, d] = *y.shape() else {
            crate::bail!("Wan attention: expected [B, N, D] activations, got {:?}", y.shape());
        };
        ops::reshape(&y, &[b, n, self.heads, d / self.heads])
    }

    /// `o(attention(q, k, v))` over heads `[B, N, H, Dh]`, back to `[B, N, D]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let [b, n, h, dh] = *q.shape() else {
            crate::bail!("Wan attention: bad query shape {:?}", q.shape());
        };
        let a = ops::attention(q, k, v, &AttentionOptions::new(dh))?;
        self.o.forward(&ops::reshape(&a, &[b, n, h * dh])?)
    }

    /// `rope(norm(linear(x)))` as heads: one op when the norm is there (fused on a GPU
    /// where `ops::rms_norm_rope` can), else the projection and the rotation.
    fn project_rope(&self, x: &Tensor, linear: &Linear, norm: Option<&RmsNorm>, rope: &Rope) -> Result<Tensor> {
        match norm {
            Some(nm) => {
                let y = linear.forward(x)?;
                let head_dim = y.shape().last().copied().unwrap_or(0) / self.heads.max(1);
                ops::rms_norm_rope(&y, &nm.weight, &rope.cos, &rope.sin, head_dim, nm.eps)
            }
            None => ops::rope(&self.project(x, linear, None)?, &rope.cos, &rope.sin),
        }
    }

    /// Self-attention on `x [B, N, D]` with RoPE on q and k.
    fn self_attention(&self, x: &Tensor, rope: &Rope) -> Result<Tensor> {
        let q = self.project_rope(x, &self.q, self.norm_q.as_ref(), rope)?;
        let k = self.project_rope(x, &self.k, self.norm_k.as_ref(), rope)?;
        let v = self.project(x, &self.v, None)?;
        self.attend(&q, &k, &v)
    }

    /// The keys and values of a cross-attention on `context [B, L, D]`, as heads.
    fn context_kv(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.project(context, &self.k, self.norm_k.as_ref())?, self.project(context, &self.v, None)?))
    }

    /// Cross-attention of `x [B, N, D]` on the context (its keys and values made here, or
    /// given), no RoPE, no mask.
    fn cross_attention(&self, x: &Tensor, context: &CrossContext) -> Result<Tensor> {
        let q = self.project(x, &self.q, self.norm_q.as_ref())?;
        match context {
            CrossContext::Tokens(c) => {
                let (k, v) = self.context_kv(c)?;
                self.attend(&q, &k, &v)
            }
            CrossContext::KeysValues(k, v) => self.attend(&q, k, v),
        }
    }
}

/// What a block's cross-attention attends to: the context tokens `[B, L, D]`, or their
/// keys and values already projected (`[B, L, H, Dh]` each, from [`WanBlock::context_kv`]).
pub(super) enum CrossContext<'a> {
    Tokens(&'a Tensor),
    KeysValues(&'a Tensor, &'a Tensor),
}

impl Module for Attention {
    fn params(&self, out: &mut Vec<NamedParam>) {
        for l in [&self.q, &self.k, &self.v, &self.o] {
            l.params(out);
        }
        for n in [&self.norm_q, &self.norm_k].into_iter().flatten() {
            n.params(out);
        }
    }
}

/// Block `blocks.N` of the DiT.
pub(super) struct WanBlock {
    self_attn: Attention,
    cross_attn: Attention,
    /// LayerNorm with affine before the cross-attention (`cross_attn_norm`).
    norm3: Option<LayerNorm>,
    ffn_in: Linear,
    ffn_out: Linear,
    /// `[1, 6, D]`: learned offsets of shift/scale/gate (attention), shift/scale/gate (FFN).
    modulation: Tensor,
    name: String,
    eps: f32,
}

impl WanBlock {
    pub fn new(src: &mut dyn ParamSource, index: usize, cfg: &WanConfig) -> Result<WanBlock> {
        let p = format!("blocks.{index}");
        let d = cfg.dim;
        let self_attn = Attention::new(src, &format!("{p}.self_attn"), cfg)?;
        let cross_attn = Attention::new(src, &format!("{p}.cross_attn"), cfg)?;
        let norm3 = if cfg.cross_attn_norm {
            Some(LayerNorm::new(src, &format!("{p}.norm3"), d, cfg.eps, true)?)
        } else {
            None
        };
        let ffn_in = Linear::new(src, &format!("{p}.ffn.0"), d, cfg.ffn_dim, true)?;
        let ffn_out = Linear::new(src, &format!("{p}.ffn.2"), cfg.ffn_dim, d, true)?;
        let modulation = src.param(&format!("{p}.modulation"), &[1, 6, d], Init::Normal(1.0 / (d as f32).sqrt()))?;
        Ok(WanBlock { self_attn, cross_attn, norm3, ffn_in, ffn_out, modulation, name: p, eps: cfg.eps })
    }

    /// The keys and values this block's cross-attention computes from `context [B, L, D]`
    /// (constant over a sampler's steps).
    pub fn context_kv(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        self.cross_attn.context_kv(context)
    }

    /// `x [B, N, D]` → `x [B, N, D]`, with `context [B, L, D]` and the time projection
    /// `t_mod [B, 6, D]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor, t_mod: &Tensor, rope: &Rope) -> Result<Tensor> {
        self.forward_on(x, &CrossContext::Tokens(context), t_mod, rope)
    }

    /// [`WanBlock::forward`] with the cross-attention's context as tokens or as their
    /// keys and values.
    pub fn forward_on(&self, x: &Tensor, context: &CrossContext, t_mod: &Tensor, rope: &Rope) -> Result<Tensor> {
        // The six modulation vectors, once per block: [B, 6, D] → six [B, 1, D].
        let m = ops::add(&self.modulation, t_mod)?;
        let m = ops::split(&m, 1, &[1; 6])?;
        let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) =
            (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);

        let h = ops::layer_norm_modulate(x, shift_msa, scale_msa, self.eps)?;
        let x = ops::gated_residual(x, gate_msa, &self.self_attn.self_attention(&h, rope)?)?;

        let h = match &self.norm3 {
            Some(n) => n.forward(&x)?,
            None => x.clone(),
        };
        let x = ops::add(&x, &self.cross_attn.cross_attention(&h, context)?)?;

        let h = ops::layer_norm_modulate(&x, shift_mlp, scale_mlp, self.eps)?;
        let f = self.ffn_in.forward_mlp_gelu_tanh(&self.ffn_out, &h)?;
        ops::gated_residual(&x, gate_mlp, &f)
    }

    /// The parameter tensors, for `autograd::checkpoint`.
    pub fn tensors(&self) -> Vec<Tensor> {
        self.named_params().into_iter().map(|(_, t)| t).collect()
    }
}

impl Module for WanBlock {
    fn params(&self, out: &mut Vec<NamedParam>) {
        self.self_attn.params(out);
        self.cross_attn.params(out);
        if let Some(n) = &self.norm3 {
            n.params(out);
        }
        self.ffn_in.params(out);
        self.ffn_out.params(out);
        out.push((format!("{}.modulation", self.name), self.modulation.clone()));
    }
}
