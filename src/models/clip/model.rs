//! The contrastive CLIP model of SynthCLIP (SLIP's `CLIP`): an image tower, a text tower,
//! two bias-free projections into the joint space and the learned temperature.

use std::path::Path;

use super::config::{ClipAct, ClipConfig, ClipTrunk, VisionForm};
use crate::nn::{Init, LayerNorm, Linear, Module, NamedParam, ParamSource, RandomInit};
use crate::ops::{self, AttentionOptions, GeluApprox};
use crate::weights::{Loader, WeightSet};
use crate::{bail, DType, Device, Result, Tensor};

/// `logit_scale` at initialisation: ln(1/0.07).
pub const LOGIT_SCALE_INIT: f32 = 2.659_26;
/// The largest `logit_scale` training keeps: ln 100 (SLIP clamps to [0, 4.6052]).
pub const LOGIT_SCALE_MAX: f32 = 4.6052;

/// Parameter names of one pre-norm transformer block in a checkpoint layout.
struct BlockNames {
    ln1: String,
    qkv_weight: String,
    qkv_bias: String,
    out: String,
    ln2: String,
    fc1: String,
    fc2: String,
}

impl BlockNames {
    /// timm `blocks.N` names.
    fn timm(p: &str) -> BlockNames {
        BlockNames {
            ln1: format!("{p}.norm1"),
            qkv_weight: format!("{p}.attn.qkv.weight"),
            qkv_bias: format!("{p}.attn.qkv.bias"),
            out: format!("{p}.attn.proj"),
            ln2: format!("{p}.norm2"),
            fc1: format!("{p}.mlp.fc1"),
            fc2: format!("{p}.mlp.fc2"),
        }
    }

    /// OpenAI CLIP `resblocks.N` names (`nn.MultiheadAttention`'s fused input projection).
    fn openai(p: &str) -> BlockNames {
        BlockNames {
            ln1: format!("{p}.ln_1"),
            qkv_weight: format!("{p}.attn.in_proj_weight"),
            qkv_bias: format!("{p}.attn.in_proj_bias"),
            out: format!("{p}.attn.out_proj"),
            ln2: format!("{p}.ln_2"),
            fc1: format!("{p}.mlp.c_fc"),
            fc2: format!("{p}.mlp.c_proj"),
        }
    }
}

/// Standard deviations of a block's weights when created (zero biases).
#[derive(Clone, Copy)]
struct BlockInit {
    qkv: f32,
    out: f32,
    fc1: f32,
    fc2: f32,
}

/// A pre-norm transformer block: `x += out(attn(qkv(LN1 x)))`, `x += fc2(act(fc1(LN2 x)))`.
struct Block {
    names: BlockNames,
    ln1: LayerNorm,
    /// `[3W, W]`: q, k and v stacked along the output dimension.
    qkv: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: ClipAct,
    causal: bool,
}

impl Block {
    fn new(
        src: &mut dyn ParamSource,
        names: BlockNames,
        trunk: &ClipTrunk,
        causal: bool,
        init: BlockInit,
    ) -> Result<Block> {
        let (w, mlp, eps) = (trunk.width, trunk.mlp_dim, trunk.eps);
        let qkv = Linear {
            name: String::new(),
            weight: src.param(&names.qkv_weight, &[3 * w, w], Init::Normal(init.qkv))?,
            bias: Some(src.param(&names.qkv_bias, &[3 * w], Init::Zeros)?),
        };
        Ok(Block {
            ln1: LayerNorm::new(src, &names.ln1, w, eps, true)?,
            qkv,
            out: Linear::with_init(src, &names.out, w, w, true, Init::Normal(init.out), Init::Zeros)?,
            ln2: LayerNorm::new(src, &names.ln2, w, eps, true)?,
            fc1: Linear::with_init(src, &names.fc1, w, mlp, true, Init::Normal(init.fc1), Init::Zeros)?,
            fc2: Linear::with_init(src, &names.fc2, mlp, w, true, Init::Normal(init.fc2), Init::Zeros)?,
            names,
            heads: trunk.heads,
            act: trunk.act,
            causal,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, w) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let hd = w / self.heads;
        let qkv = self.qkv.forward(&self.ln1.forward(x)?)?;
        let parts = ops::split(&ops::reshape(&qkv, &[b, n, 3, self.heads, hd])?, 2, &[1, 1, 1])?;
        let heads = [b, n, self.heads, hd];
        let (q, k, v) =
            (ops::reshape(&parts[0], &heads)?, ops::reshape(&parts[1], &heads)?, ops::reshape(&parts[2], &heads)?);
        let opts = AttentionOptions { causal: self.causal, ..AttentionOptions::new(hd) };
        let a = ops::attention(&q, &k, &v, &opts)?;
        let x = ops::add(x, &self.out.forward(&ops::reshape(&a, &[b, n, w])?)?)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let h = match self.act {
            ClipAct::Gelu => ops::gelu(&h, GeluApprox::Exact)?,
            ClipAct::QuickGelu => ops::quick_gelu(&h)?,
        };
        ops::add(&x, &self.fc2.forward(&h)?)
    }
}

impl Module for Block {
    fn params(&self, out: &mut Vec<NamedParam>) {
        self.ln1.params(out);
        out.push((self.names.qkv_weight.clone(), self.qkv.weight.clone()));
        if let Some(b) = &self.qkv.bias {
            out.push((self.names.qkv_bias.clone(), b.clone()));
        }
        self.out.params(out);
        self.ln2.params(out);
        self.fc1.params(out);
        self.fc2.params(out);
    }
}

/// A named tensor of the model outside the blocks.
struct Named {
    name: String,
    t: Tensor,
}

impl Named {
    fn new(src: &mut dyn ParamSource, name: String, shape: &[usize], init: Init) -> Result<Named> {
        let t = src.param(&name, shape, init)?;
        Ok(Named { name, t })
    }
}

/// The image tower up to the projected embedding.
struct VisionTower {
    /// `[W, 3, p, p]`.
    patch_weight: Named,
    /// `[W]` (timm only).
    patch_bias: Option<Named>,
    /// `[1, 1, W]` (timm) or `[W]` (OpenCLIP).
    class_token: Named,
    /// `[1, T, W]` (timm) or `[T, W]` (OpenCLIP).
    pos: Named,
    ln_pre: Option<LayerNorm>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    /// `[W, E]`, applied as `x·P`.
    proj: Named,
}

/// The text tower up to the projected embedding.
struct TextTower {
    /// `[V, W]`.
    token_embedding: Named,
    /// `[C, W]`.
    pos: Named,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
    /// `[W, E]`, applied as `x·P`.
    proj: Named,
}

/// SynthCLIP's CLIP (see the module documentation of [`crate::models::clip`]).
pub struct ClipModel {
    cfg: ClipConfig,
    device: Device,
    prefix: String,
    vision: VisionTower,
    text: TextTower,
    /// `[]`: the log of the logit temperature.
    logit_scale: Named,
}

/// Token ids of a text batch as index tensors, made before the text tower runs so that
/// it uploads nothing ([`ClipModel::text_indices`], [`ClipModel::encode_text_at`]).
#[derive(Clone)]
pub struct TextIndices {
    /// The token-embedding rows, `B·C` of them.
    pub tokens: ops::RowIndices,
    /// Each row's end token among the `B·C` hidden states.
    pub pooled: ops::RowIndices,
}

impl TextIndices {
    /// The two tensors (tokens, end tokens), for a recorded step's inputs.
    pub fn tensors(&self) -> [&Tensor; 2] {
        [self.tokens.tensor(), self.pooled.tensor()]
    }
}

impl ClipModel {
    fn build(cfg: &ClipConfig, src: &mut dyn ParamSource, prefix: &str) -> Result<ClipModel> {
        cfg.validate()?;
        let (v, t) = (&cfg.vision, &cfg.text);
        let p = |s: &str| format!("{prefix}{s}");
        let (vw, p_sz) = (v.trunk.width, v.patch_size);
        // timm: Linear weights N(0, 0.02) with zero biases, the class token N(0, 1e-6), the
        // patch convolution as PyTorch creates it.
        let vinit = BlockInit { qkv: 0.02, out: 0.02, fc1: 0.02, fc2: 0.02 };
        let fan_in = (3 * p_sz * p_sz) as f32;
        let vision = match v.form {
            VisionForm::Timm => VisionTower {
                patch_weight: Named::new(
                    src,
                    p("visual.patch_embed.proj.weight"),
                    &[vw, 3, p_sz, p_sz],
                    Init::Uniform(1.0 / fan_in.sqrt()),
                )?,
                patch_bias: Some(Named::new(
                    src,
                    p("visual.patch_embed.proj.bias"),
                    &[vw],
                    Init::Uniform(1.0 / fan_in.sqrt()),
                )?),
                class_token: Named::new(src, p("visual.cls_token"), &[1, 1, vw], Init::Normal(1e-6))?,
                pos: Named::new(src, p("visual.pos_embed"), &[1, v.tokens(), vw], Init::Normal(0.02))?,
                ln_pre: None,
                blocks: (0..v.trunk.layers)
                    .map(|i| {
                        let names = BlockNames::timm(&p(&format!("visual.blocks.{i}")));
                        Block::new(src, names, &v.trunk, false, vinit)
                    })
                    .collect::<Result<_>>()?,
                norm: LayerNorm::new(src, &p("visual.norm"), vw, v.trunk.eps, true)?,
                proj: Named::new(
                    src,
                    p("image_projection"),
                    &[vw, cfg.embed_dim],
                    Init::Normal(1.0 / (vw as f32).sqrt()),
                )?,
            },
            VisionForm::OpenClip => {
                let scale = 1.0 / (vw as f32).sqrt();
                VisionTower {
                    patch_weight: Named::new(
                        src,
                        p("visual.conv1.weight"),
                        &[vw, 3, p_sz, p_sz],
                        Init::Uniform(1.0 / fan_in.sqrt()),
                    )?,
                    patch_bias: None,
                    class_token: Named::new(src, p("visual.class_embedding"), &[vw], Init::Normal(scale))?,
                    pos: Named::new(src, p("visual.positional_embedding"), &[v.tokens(), vw], Init::Normal(scale))?,
                    ln_pre: Some(LayerNorm::new(src, &p("visual.ln_pre"), vw, v.trunk.eps, true)?),
                    blocks: (0..v.trunk.layers)
                        .map(|i| {
                            let names = BlockNames::openai(&p(&format!("visual.transformer.resblocks.{i}")));
                            Block::new(src, names, &v.trunk, false, vinit)
                        })
                        .collect::<Result<_>>()?,
                    norm: LayerNorm::new(src, &p("visual.ln_post"), vw, v.trunk.eps, true)?,
                    proj: Named::new(src, p("visual.proj"), &[vw, cfg.embed_dim], Init::Normal(scale))?,
                }
            }
        };
        // SLIP's `initialize_parameters` for the text tower.
        let (tk, tw) = (&t.trunk, t.trunk.width as f32);
        let proj_std = tw.powf(-0.5) * (2.0 * tk.layers as f32).powf(-0.5);
        let tinit = BlockInit { qkv: tw.powf(-0.5), out: proj_std, fc1: (2.0 * tw).powf(-0.5), fc2: proj_std };
        let text = TextTower {
            token_embedding: Named::new(
                src,
                p("token_embedding.weight"),
                &[t.vocab_size, tk.width],
                Init::Normal(0.02),
            )?,
            pos: Named::new(src, p("positional_embedding"), &[t.context_length, tk.width], Init::Normal(0.01))?,
            blocks: (0..tk.layers)
                .map(|i| {
                    let names = BlockNames::openai(&p(&format!("transformer.resblocks.{i}")));
                    Block::new(src, names, tk, true, tinit)
                })
                .collect::<Result<_>>()?,
            ln_final: LayerNorm::new(src, &p("ln_final"), tk.width, tk.eps, true)?,
            proj: Named::new(src, p("text_projection"), &[tk.width, cfg.embed_dim], Init::Normal(tw.powf(-0.5)))?,
        };
        let logit_scale = src.param(&p("logit_scale"), &[], Init::Constant(LOGIT_SCALE_INIT))?;
        Ok(ClipModel {
            cfg: cfg.clone(),
            device: src.device(),
            prefix: prefix.to_string(),
            vision,
            text,
            logit_scale: Named { name: p("logit_scale"), t: logit_scale },
        })
    }

    /// A model with random weights initialised as SLIP and timm do, seeded; on a GPU the
    /// weights are created in `dtype`.
    pub fn random(cfg: &ClipConfig, seed: u64, device: Device, dtype: DType) -> Result<ClipModel> {
        Self::build(cfg, &mut RandomInit::new(seed, device, dtype), "")
    }

    /// Loads a checkpoint in SLIP/SynthCLIP naming (timm `visual.*`, `image_projection`)
    /// or OpenCLIP naming (`visual.conv1`, `visual.ln_pre`, …, `visual.proj`), as
    /// `.safetensors` (file, sharded index or directory). Names may carry DDP's `module.`
    /// prefix. The checkpoint's layout must match `cfg.vision.form`; missing,
    /// mis-shaped and unexpected tensors are reported together.
    pub fn load(cfg: &ClipConfig, path: impl AsRef<Path>, device: Device, dtype: DType) -> Result<ClipModel> {
        let path = path.as_ref();
        let set = WeightSet::open(path)?;
        Self::from_set(cfg, &set, device, dtype).map_err(|e| e.context(format!("CLIP model {}", path.display())))
    }

    /// [`ClipModel::load`] from an open weight set.
    pub fn from_set(cfg: &ClipConfig, set: &WeightSet, device: Device, dtype: DType) -> Result<ClipModel> {
        let prefix = if set.contains("module.logit_scale") { "module." } else { "" };
        let timm = set.contains(&format!("{prefix}visual.blocks.0.norm1.weight"));
        let open = set.contains(&format!("{prefix}visual.transformer.resblocks.0.ln_1.weight"));
        match (cfg.vision.form, timm, open) {
            (VisionForm::Timm, false, true) => {
                bail!("the checkpoint is in OpenCLIP naming (visual.transformer.*): use an OpenCLIP config such as the openclip-vit-b16 preset")
            }
            (VisionForm::OpenClip, true, false) => {
                bail!("the checkpoint is in SLIP/SynthCLIP naming (visual.blocks.*): use a SynthCLIP config such as the synthclip-vit-b16 preset")
            }
            _ => {}
        }
        let mut loader = Loader::new(set, device, dtype);
        // Buffers some exporters keep: OpenCLIP's causal mask, timm's unused head.
        loader.ignore_where(|n| n.ends_with("attn_mask") || n.ends_with("position_ids"));
        let built = Self::build(cfg, &mut loader, prefix);
        let finished = loader.finish();
        match (built, finished) {
            (Ok(m), Ok(())) => Ok(m),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.logit_scale.t.dtype()
    }

    /// The learned log-temperature `[]` (the logits are scaled by its exponential).
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale.t
    }

    /// The image embeddings `[B, E]` (not normalized) of normalized pixels
    /// `[B, 3, S, S]`.
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        let v = &self.cfg.vision;
        let (s, p, w) = (v.image_size, v.patch_size, v.trunk.width);
        let ps = pixels.shape();
        if ps.len() != 4 || ps[1] != 3 || ps[2] != s || ps[3] != s || ps[0] == 0 {
            bail!("ClipModel::encode_image: pixels must be [B, 3, {s}, {s}], got {ps:?}");
        }
        let (b, g) = (ps[0], v.grid());
        let t = &self.vision;
        // The stride-p convolution is a linear map of each patch flattened as (c, y, x).
        let patches = ops::reshape(pixels, &[b, 3, g, p, g, p])?;
        let patches = ops::permute(&patches, &[0, 2, 4, 1, 3, 5])?;
        let patches = ops::reshape(&patches, &[b, g * g, 3 * p * p])?;
        let weight = ops::reshape(&t.patch_weight.t, &[w, 3 * p * p])?;
        let x = ops::linear(&patches, &weight, t.patch_bias.as_ref().map(|n| &n.t))?;
        let class = ops::broadcast_to(&ops::reshape(&t.class_token.t, &[1, 1, w])?, &[b, 1, w])?;
        let x = ops::concat(&[&class, &x], 1)?;
        let mut x = ops::add(&x, &ops::reshape(&t.pos.t, &[v.tokens(), w])?)?;
        if let Some(ln) = &t.ln_pre {
            x = ln.forward(&x)?;
        }
        for block in &t.blocks {
            x = block.forward(&x)?;
        }
        // The class token after the final norm (a per-token norm: pool first).
        let cls = ops::reshape(&ops::narrow(&x, 1, 0, 1)?, &[b, w])?;
        ops::matmul(&t.norm.forward(&cls)?, &t.proj.t)
    }

    /// The text embeddings `[B, E]` (not normalized) of token ids `[B, C]` (row-major,
    /// `C` = the context length), pooled at each row's end token: the position of the
    /// largest id (the first one if several), as `text.argmax(dim=-1)`.
    pub fn encode_text(&self, ids: &[u32], batch: usize) -> Result<Tensor> {
        self.encode_text_at(&self.text_indices(ids, batch)?)
    }

    /// The index tensors of token ids `[B, C]` for [`ClipModel::encode_text_at`]: the
    /// token-embedding rows and each row's end-token position (see
    /// [`ClipModel::encode_text`]), checked against the vocabulary and placed on the
    /// model's device.
    pub fn text_indices(&self, ids: &[u32], batch: usize) -> Result<TextIndices> {
        let t = &self.cfg.text;
        let c = t.context_length;
        if batch == 0 || ids.len() != batch * c {
            bail!("ClipModel::encode_text: {} token ids for a batch of {batch} rows of {c}", ids.len());
        }
        let flat: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        if let Some((i, id)) = flat.iter().enumerate().find(|(_, &id)| id >= t.vocab_size) {
            bail!(
                "ClipModel::encode_text: token id {id} (row {}, position {}) is outside the vocabulary of {}",
                i / c,
                i % c,
                t.vocab_size
            );
        }
        let pooled: Vec<usize> = flat.chunks(c).enumerate().map(|(r, row)| r * c + argmax_first(row)).collect();
        Ok(TextIndices {
            tokens: ops::RowIndices::new(&flat, t.vocab_size, self.device)?,
            pooled: ops::RowIndices::new(&pooled, batch * c, self.device)?,
        })
    }

    /// [`TextIndices`] from their two tensors ([`TextIndices::tensors`], or copies of
    /// them: the inputs of a recorded training step).
    pub fn text_indices_from(&self, tokens: &Tensor, pooled: &Tensor) -> Result<TextIndices> {
        let c = self.cfg.text.context_length;
        let pooled_rows = (pooled.numel() / 4) * c;
        let idx = TextIndices {
            tokens: ops::RowIndices::from_tensor(tokens, self.cfg.text.vocab_size)?,
            pooled: ops::RowIndices::from_tensor(pooled, pooled_rows)?,
        };
        if idx.tokens.len() != idx.pooled.len() * c {
            bail!(
                "ClipModel::text_indices_from: {} token indices for {} rows of {c}",
                idx.tokens.len(),
                idx.pooled.len()
            );
        }
        Ok(idx)
    }

    /// [`ClipModel::encode_text`] of token ids given as [`TextIndices`]: nothing is
    /// uploaded, so it runs inside a training step recorded as a CUDA graph.
    pub fn encode_text_at(&self, idx: &TextIndices) -> Result<Tensor> {
        let t = &self.cfg.text;
        let (c, batch) = (t.context_length, idx.pooled.len());
        if batch == 0 || idx.tokens.len() != batch * c || idx.pooled.rows() != batch * c {
            bail!(
                "ClipModel::encode_text: {} token indices and {} end tokens into {} rows, for rows of {c}",
                idx.tokens.len(),
                batch,
                idx.pooled.rows()
            );
        }
        let tower = &self.text;
        let x = ops::gather_rows_at(&tower.token_embedding.t, &idx.tokens)?;
        let mut x = ops::add(&ops::reshape(&x, &[batch, c, t.trunk.width])?, &tower.pos.t)?;
        for block in &tower.blocks {
            x = block.forward(&x)?;
        }
        let x = ops::gather_rows_at(&ops::reshape(&x, &[batch * c, t.trunk.width])?, &idx.pooled)?;
        ops::matmul(&tower.ln_final.forward(&x)?, &tower.proj.t)
    }

    /// Writes the weights in f32 as one safetensors file in this model's naming
    /// (SLIP/SynthCLIP for the timm form), atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::weights::save(path.as_ref(), &self.named_params(), crate::weights::SaveDType::F32, None)
    }

    /// Switches gradient recording on or off for every weight (on to train).
    pub fn set_trainable(&self, on: bool) {
        for (_, t) in self.named_params() {
            t.set_requires_grad(on);
        }
    }

    /// Clamps `logit_scale` into [0, [`LOGIT_SCALE_MAX`]] in place, as SLIP does after
    /// every optimizer step.
    pub fn clamp_logit_scale(&self) -> Result<()> {
        let v = self.logit_scale.t.item()?;
        let c = v.clamp(0.0, LOGIT_SCALE_MAX);
        if c != v {
            self.logit_scale.t.copy_from_slice(&[c])?;
        }
        Ok(())
    }

    /// The name prefix the weights were loaded with (`module.` for DDP checkpoints).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// The index of the first largest element of a non-empty row.
fn argmax_first(row: &[usize]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

impl Module for ClipModel {
    fn params(&self, out: &mut Vec<NamedParam>) {
        let push = |out: &mut Vec<NamedParam>, n: &Named| out.push((n.name.clone(), n.t.clone()));
        let v = &self.vision;
        push(out, &v.patch_weight);
        if let Some(b) = &v.patch_bias {
            push(out, b);
        }
        push(out, &v.class_token);
        push(out, &v.pos);
        if let Some(ln) = &v.ln_pre {
            ln.params(out);
        }
        for b in &v.blocks {
            b.params(out);
        }
        v.norm.params(out);
        push(out, &v.proj);
        let t = &self.text;
        push(out, &t.token_embedding);
        push(out, &t.pos);
        for b in &t.blocks {
            b.params(out);
        }
        t.ln_final.params(out);
        push(out, &t.proj);
        push(out, &self.logit_scale);
    }
}

/// SLIP's weight-decay rule: no decay for tensors of fewer than 2 dimensions or whose
/// name contains `bias`, `ln` or `bn`; everything else (including `cls_token`,
/// `pos_embed`, `positional_embedding` and `token_embedding.weight`) is decayed.
pub fn weight_decay_applies(name: &str, shape: &[usize]) -> bool {
    !(shape.len() < 2 || name.contains("bias") || name.contains("ln") || name.contains("bn"))
}
