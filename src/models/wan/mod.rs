//! The Synthos-I2I diffusion transformer: Wan2.1's DiT ("Wan: Open and Advanced
//! Large-Scale Video Generative Models", <https://github.com/Wan-Video/Wan2.1>) with the
//! Synthos image projector `img_emb`, whose output is put in front of the text rows of
//! the cross-attention context.
//!
//! ```text
//! latents [B,16,F,H,W] ─patchify─ linear ─► x [B, F·H/2·W/2, D]
//! t ─sinusoid─ time_embedding ─► e [B,D] ─SiLU─ time_projection ─► t_mod [B,6,D]
//! text [B,L,4096] ─ text_embedding ─┐
//! clip [B,257,1280] ─ img_emb ──────┴─► context = cat[image, text]  (text only without an image)
//! x ─ 30 × block(x, context, t_mod, rope) ─ head(e) ─ unpatchify ─► velocity [B,16,F,H,W]
//! ```
//!
//! Every shape and formula is in `docs/MODELS.md`, *DiT*; parameters carry the original Wan names
//! (what DiffSynth and the Synthos trainer read and write). Checkpoints load in that
//! naming or in diffusers' (`WanTransformer3DModel`), sharded or not, with partial
//! checkpoints layered on top. Parity with diffusers and DiffSynth is tested in
//! `tests/wan.rs` (`cargo test --test wan`).
//!
//! ```no_run
//! use synthos_engine::models::wan::{Trainable, WanConfig, WanModel};
//! use synthos_engine::{DType, Device, Tensor};
//! # fn main() -> synthos_engine::Result<()> {
//! let cfg = WanConfig::preset("wan2.1-t2v-1.3b")?;
//! let dev = Device::Cuda(0);
//! let model = WanModel::load(&cfg, &["Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors", "epoch-9.safetensors"], dev, DType::BF16)?;
//! let params = model.trainable(Trainable::All); // for the optimizer
//! # let (latents, text, clip): (Tensor, Tensor, Tensor) = todo!();
//! let v = model.forward(&latents, &[937.5], &text, Some(&clip))?;
//! # Ok(()) }
//! ```

mod block;
mod config;
pub mod names;

use std::path::Path;
use std::sync::{Arc, Mutex};

pub use config::{WanConfig, CLIP_VIT_H_DIM};

use self::block::{CrossContext, Rope, WanBlock};
use self::names::NameMap;
use crate::autograd::{self, Keep};
use crate::nn::{Init, LayerNorm, Linear, Module, NamedParam, ParamSource, RandomInit};
use crate::ops::{self, GeluApprox};
use crate::weights::{self, Loader, SaveDType, WeightSet};
use crate::{bail, DType, Device, Result, Tensor};

/// Epsilon of the image projector's LayerNorms (PyTorch's default, as in DiffSynth's
/// `MLP` and diffusers' `WanImageEmbedding`).
const IMG_EMB_EPS: f32 = 1e-5;

/// Seed of the generator that creates `img_emb` when no checkpoint holds it.
const IMG_EMB_SEED: u64 = 0x1A9E_E3B0;

/// Which parameters train (and which a checkpoint saves).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Trainable {
    /// Every parameter (the full Synthos recipe).
    All,
    /// Only the image projector `img_emb.*` (the projector-only recipe).
    #[value(name = "img_emb")]
    ImgEmb,
    /// None (sampling).
    #[value(skip)]
    Nothing,
}

impl Trainable {
    fn selects(self, name: &str) -> bool {
        match self {
            Trainable::All => true,
            Trainable::ImgEmb => name.starts_with("img_emb."),
            Trainable::Nothing => false,
        }
    }
}

/// The image projector: LayerNorm → Linear → GELU(exact) → Linear → LayerNorm
/// (`img_emb.proj.{0,1,3,4}`).
struct ImageProjector {
    norm_in: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    norm_out: LayerNorm,
}

impl ImageProjector {
    /// Built with the Synthos init when created: Linear weights N(0, 0.02), zero biases,
    /// LayerNorms ones/zeros.
    fn new(src: &mut dyn ParamSource, cfg: &WanConfig) -> Result<ImageProjector> {
        let c = cfg.clip_dim;
        let w = Init::Normal(0.02);
        Ok(ImageProjector {
            norm_in: LayerNorm::new(src, "img_emb.proj.0", c, IMG_EMB_EPS, true)?,
            fc1: Linear::with_init(src, "img_emb.proj.1", c, c, true, w, Init::Zeros)?,
            fc2: Linear::with_init(src, "img_emb.proj.3", c, cfg.dim, true, w, Init::Zeros)?,
            norm_out: LayerNorm::new(src, "img_emb.proj.4", cfg.dim, IMG_EMB_EPS, true)?,
        })
    }

    fn forward(&self, clip: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(&self.norm_in.forward(clip)?)?;
        self.norm_out.forward(&self.fc2.forward(&ops::gelu(&h, GeluApprox::Exact)?)?)
    }
}

impl Module for ImageProjector {
    fn params(&self, out: &mut Vec<NamedParam>) {
        self.norm_in.params(out);
        self.fc1.params(out);
        self.fc2.params(out);
        self.norm_out.params(out);
    }
}

/// Every block's cross-attention keys and values for one context ([`WanModel::cross_kv`]),
/// `[B, L, heads, head_dim]` each.
pub struct CrossKv {
    batch: usize,
    blocks: Vec<(Tensor, Tensor)>,
}

/// A forward's conditioning: the context tokens, or their cached keys and values.
#[derive(Clone, Copy)]
enum Context<'a> {
    Tokens(&'a Tensor),
    KeysValues(&'a CrossKv),
}

/// A forward's timesteps: values on the host, or their sinusoidal frequencies on the device.
#[derive(Clone, Copy)]
enum Time<'a> {
    Steps(&'a [f32]),
    Frequencies(&'a Tensor),
}

/// The Wan2.1 DiT with the Synthos image projector, on one device.
pub struct WanModel {
    cfg: WanConfig,
    device: Device,
    dtype: DType,
    /// The Conv3d as a linear map per patch: weight `[D, C·pt·ph·pw]`, inputs in
    /// (c, kt, kh, kw) order (the conv weight's own memory order).
    patch_embedding: Linear,
    text_embedding: [Linear; 2],
    time_embedding: [Linear; 2],
    time_projection: Linear,
    img_emb: ImageProjector,
    blocks: Vec<Arc<WanBlock>>,
    head: Linear,
    /// `[1, 2, D]`: learned offsets of the head's shift and scale.
    head_modulation: Tensor,
    /// Blocks (the first ones) recomputed in the backward pass; 0 keeps every activation.
    checkpoint_blocks: usize,
    /// What a checkpointed block keeps from its first pass for the recompute to reuse.
    checkpoint_keep: Keep,
    notes: Vec<String>,
    /// The RoPE table of the last token grid (frames, rows, columns).
    rope: Mutex<Option<([usize; 3], Rope)>>,
    /// The absolute position table of the last grid (with `abs_pos_embed`).
    pos_table: Mutex<Option<([usize; 3], Tensor)>>,
}

impl WanModel {
    /// Builds every parameter from `src` in the original naming.
    fn build(cfg: &WanConfig, src: &mut dyn ParamSource) -> Result<WanModel> {
        cfg.validate()?;
        let d = cfg.dim;
        let [pt, ph, pw] = cfg.patch_size;
        let conv_fan_in = cfg.patch_inputs() as f32;
        let conv_init = Init::Uniform(1.0 / conv_fan_in.sqrt());
        let conv_w = src.param("patch_embedding.weight", &[d, cfg.in_channels, pt, ph, pw], conv_init)?;
        let patch_embedding = Linear {
            name: "patch_embedding".into(),
            // A view of the same storage: the conv weight's memory order is (c, kt, kh, kw).
            weight: ops::reshape(&conv_w, &[d, cfg.patch_inputs()])?,
            bias: Some(src.param("patch_embedding.bias", &[d], conv_init)?),
        };
        let text_embedding = [
            Linear::new(src, "text_embedding.0", cfg.text_dim, d, true)?,
            Linear::new(src, "text_embedding.2", d, d, true)?,
        ];
        let time_embedding = [
            Linear::new(src, "time_embedding.0", cfg.freq_dim, d, true)?,
            Linear::new(src, "time_embedding.2", d, d, true)?,
        ];
        let time_projection = Linear::new(src, "time_projection.1", d, 6 * d, true)?;
        let blocks = (0..cfg.num_layers).map(|i| WanBlock::new(src, i, cfg).map(Arc::new)).collect::<Result<_>>()?;
        let head = Linear::new(src, "head.head", d, cfg.out_channels * pt * ph * pw, true)?;
        let head_modulation = src.param("head.modulation", &[1, 2, d], Init::Normal(1.0 / (d as f32).sqrt()))?;
        // Last, so that random models that differ only in clip_dim share the other weights.
        let img_emb = ImageProjector::new(src, cfg)?;
        let dtype = head.weight.dtype();
        Ok(WanModel {
            cfg: cfg.clone(),
            device: src.device(),
            dtype,
            patch_embedding,
            text_embedding,
            time_embedding,
            time_projection,
            img_emb,
            blocks,
            head,
            head_modulation,
            checkpoint_blocks: 0,
            checkpoint_keep: Keep::NOTHING,
            notes: Vec::new(),
            rope: Mutex::new(None),
            pos_table: Mutex::new(None),
        })
    }

    /// A model with random weights (tests, demo, benchmarks), seeded: PyTorch-like
    /// uniform ±1/√fan_in for linear layers and the patch embedding, N(0, 1/√D) for the
    /// modulation tables, ones/zeros for norms, and the Synthos init for `img_emb`.
    pub fn random(cfg: &WanConfig, seed: u64, device: Device, dtype: DType) -> Result<WanModel> {
        Self::build(cfg, &mut RandomInit::new(seed, device, dtype))
    }

    /// Loads a DiT from safetensors onto `device` as `dtype` (CPU: f32).
    ///
    /// `paths[0]` holds the base weights: a `.safetensors` file, a sharded
    /// `*.safetensors.index.json` or a directory of either. Each further path is layered
    /// on top in order, replacing the tensors it holds (a Synthos `epoch-N.safetensors`).
    /// The naming of each source — original Wan/DiffSynth (with or without a `model.`
    /// prefix) or diffusers — is detected from its keys; sources may differ.
    ///
    /// When no source holds `img_emb.*` (a plain Wan2.1-T2V checkpoint) the projector is
    /// created with the Synthos init and a line says so on stderr (also in
    /// [`WanModel::load_notes`]). Missing, mis-shaped and unexpected tensors are
    /// reported together in one error.
    pub fn load<P: AsRef<Path>>(cfg: &WanConfig, paths: &[P], device: Device, dtype: DType) -> Result<WanModel> {
        let Some((base, overlays)) = paths.split_first() else {
            bail!("WanModel::load: no weight files given");
        };
        let sources = paths.iter().map(WeightSet::open).collect::<Result<Vec<_>>>()?;
        let map = NameMap::new(&sources);
        let mut set = WeightSet::open(base)?;
        for p in overlays {
            set.overlay(p)?;
        }
        let mut loader = Loader::new(&set, device, dtype);
        loader.ignore_where(|k| map.is_shadowed(k));
        let create_img_emb = !map.provides_prefix("img_emb.");
        let mut src = Resolved {
            loader,
            map: &map,
            created: create_img_emb.then(|| RandomInit::new(IMG_EMB_SEED, device, dtype)),
        };
        let mut model = Self::build(cfg, &mut src)?;
        src.loader.finish()?;
        if create_img_emb {
            let names: Vec<String> = paths.iter().map(|p| p.as_ref().display().to_string()).collect();
            let note = format!(
                "img_emb: no image projector in {}; created {}→{} with the Synthos init \
                 (Linear weights N(0, 0.02), zero biases, LayerNorms ones/zeros)",
                names.join(" + "),
                cfg.clip_dim,
                cfg.dim
            );
            eprintln!("{note}");
            model.notes.push(note);
        }
        Ok(model)
    }

    /// Lays the tensors of a partial or full checkpoint (a Synthos `epoch-N.safetensors`,
    /// any naming [`WanModel::load`] reads) over the current parameters, in place, and
    /// returns how many it replaced. Nothing changes unless every tensor of the file is a
    /// parameter of this model with the right shape; the error lists all that are not.
    pub fn apply_checkpoint(&self, path: impl AsRef<Path>) -> Result<usize> {
        let path = path.as_ref();
        let set = WeightSet::open(path)?;
        let map = NameMap::new(std::slice::from_ref(&set));
        let conv_shape = {
            let [pt, ph, pw] = self.cfg.patch_size;
            vec![self.cfg.dim, self.cfg.in_channels, pt, ph, pw]
        };
        let mut used = std::collections::HashSet::new();
        let mut updates = Vec::new();
        let mut problems = Vec::new();
        for (name, param) in self.params() {
            let key = map.key(&name);
            if !set.contains(&key) {
                continue;
            }
            used.insert(key.clone());
            let stored = set.shape(&key)?.to_vec();
            let ok = stored == param.shape() || (name == "patch_embedding.weight" && stored == conv_shape);
            if !ok {
                problems.push(format!("'{key}': shape {stored:?}, the model's is {:?}", param.shape()));
                continue;
            }
            let data = set.read_f32(&key)?;
            if let Some(first) = data.iter().position(|v| !v.is_finite()) {
                let count = data.iter().filter(|v| !v.is_finite()).count();
                problems
                    .push(format!("'{key}': {count} NaN/inf value(s), the first at element {first} (a diverged run?)"));
                continue;
            }
            updates.push((param, data));
        }
        for name in set.names() {
            if !used.contains(name) {
                problems.push(format!("'{name}': not a parameter of this model"));
            }
        }
        if !problems.is_empty() {
            bail!("checkpoint {}: {}", path.display(), problems.join("; "));
        }
        let n = updates.len();
        for (param, data) in updates {
            param.copy_from_slice(&data)?;
        }
        Ok(n)
    }

    /// The configuration.
    pub fn config(&self) -> &WanConfig {
        &self.cfg
    }

    /// The device the parameters are on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The parameters' element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// What loading did beyond reading tensors (e.g. creating `img_emb`).
    pub fn load_notes(&self) -> &[String] {
        &self.notes
    }

    /// Switches per-block activation checkpointing for every block: each block keeps only
    /// its inputs and is recomputed during the backward pass.
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpoint_blocks = if on { self.blocks.len() } else { 0 };
    }

    /// Checkpoints only the first `n` blocks (at most all of them); the others keep their
    /// activations. Memory falls and recompute time rises with `n`: a run that fits with
    /// fewer checkpointed blocks recomputes less. Gradients are the same for any `n`.
    pub fn set_checkpointed_blocks(&mut self, n: usize) {
        self.checkpoint_blocks = n.min(self.blocks.len());
    }

    /// Selective checkpointing: the op outputs a checkpointed block keeps from its first
    /// pass, which its recompute then reuses (attention outputs, linear outputs; see
    /// [`Keep`]). Memory rises and recompute time falls with what is kept; gradients are
    /// the same for any choice.
    pub fn set_checkpoint_keep(&mut self, keep: Keep) {
        self.checkpoint_keep = keep;
    }

    /// What checkpointed blocks keep (see [`WanModel::set_checkpoint_keep`]).
    pub fn checkpoint_keep(&self) -> Keep {
        self.checkpoint_keep
    }

    /// How many (leading) blocks are checkpointed.
    pub fn checkpointed_blocks(&self) -> usize {
        self.checkpoint_blocks
    }

    /// Every parameter by original name (what the optimizer and checkpoints use). The
    /// patch embedding's weight is the `[D, C·pt·ph·pw]` view used in the forward pass;
    /// [`WanModel::save`] writes it in the conv shape `[D, C, pt, ph, pw]`.
    pub fn params(&self) -> Vec<NamedParam> {
        self.named_params()
    }

    /// Marks the parameters of `which` as trainable (and every other one as frozen), and
    /// returns them by name, for the optimizer.
    pub fn trainable(&self, which: Trainable) -> Vec<NamedParam> {
        let mut chosen = Vec::new();
        for (name, t) in self.params() {
            let on = which.selects(&name);
            t.set_requires_grad(on);
            if on {
                chosen.push((name, t));
            }
        }
        chosen
    }

    /// Writes the parameters of `which` to `path` (safetensors, bf16, original naming —
    /// what DiffSynth and the Synthos code load), atomically.
    pub fn save(&self, path: impl AsRef<Path>, which: Trainable) -> Result<()> {
        let conv_shape = {
            let [pt, ph, pw] = self.cfg.patch_size;
            [self.cfg.dim, self.cfg.in_channels, pt, ph, pw]
        };
        let tensors = autograd::no_grad(|| {
            self.params()
                .into_iter()
                .filter(|(name, _)| which.selects(name))
                .map(|(name, t)| {
                    let t = if name == "patch_embedding.weight" { ops::reshape(&t, &conv_shape)? } else { t };
                    Ok((name, t))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        if tensors.is_empty() {
            bail!("WanModel::save: {which:?} selects no parameters");
        }
        let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
        weights::save(path, &tensors, SaveDType::BF16, Some(&meta))
    }

    /// The cross-attention context: `text_embedding(text)` (`text [B, L, text_dim]`),
    /// preceded by `img_emb(clip_tokens)` (`[B, Nc, clip_dim]`, 257 tokens for ViT-H/14)
    /// when a reference image is given → `[B, Nc + L, D]` or `[B, L, D]`.
    pub fn context(&self, text: &Tensor, clip_tokens: Option<&Tensor>) -> Result<Tensor> {
        let [b, _, td] = *text.shape() else {
            bail!("WanModel: text must be [B, L, {}], got {:?}", self.cfg.text_dim, text.shape());
        };
        if td != self.cfg.text_dim || text.shape()[1] == 0 {
            bail!("WanModel: text must be [B, L, {}] with L > 0, got {:?}", self.cfg.text_dim, text.shape());
        }
        let text = ops::cast(text, self.dtype)?;
        let h = self.text_embedding[0].forward_gelu_tanh(&text)?;
        let text_ctx = self.text_embedding[1].forward(&h)?;
        let Some(clip) = clip_tokens else {
            return Ok(text_ctx);
        };
        match *clip.shape() {
            [cb, n, cd] if cb == b && n > 0 && cd == self.cfg.clip_dim => {}
            _ => bail!(
                "WanModel: clip_tokens must be [{b}, N, {}] (N = 257 for ViT-H/14), got {:?}",
                self.cfg.clip_dim,
                clip.shape()
            ),
        }
        let image_ctx = self.img_emb.forward(&ops::cast(clip, self.dtype)?)?;
        ops::concat(&[&image_ctx, &text_ctx], 1)
    }

    /// The velocity prediction `[B, out_channels, F, H, W]` for `latents
    /// [B, in_channels, F, H, W]` (H and W multiples of the patch size; an image is
    /// F = 1) at `timesteps` (one per sample, t = σ·1000), conditioned on `text
    /// [B, L, text_dim]` and, when given, the CLIP tokens of a reference image
    /// `[B, 257, clip_dim]`. Differentiable in every input and parameter.
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &[f32],
        text: &Tensor,
        clip_tokens: Option<&Tensor>,
    ) -> Result<Tensor> {
        let context = self.context(text, clip_tokens)?;
        self.forward_with_context(latents, timesteps, &context)
    }

    /// [`WanModel::forward`] with the timesteps given as their frequencies
    /// ([`WanModel::time_frequencies`]): the same result, with no host data entering the
    /// forward (a training step recorded as a CUDA graph).
    pub fn forward_at(
        &self,
        latents: &Tensor,
        time_freq: &Tensor,
        text: &Tensor,
        clip_tokens: Option<&Tensor>,
    ) -> Result<Tensor> {
        let context = self.context(text, clip_tokens)?;
        self.forward_impl(latents, Time::Frequencies(time_freq), Context::Tokens(&context))
    }

    /// [`WanModel::forward`] with a context made by [`WanModel::context`] (which the
    /// sampler reuses across steps).
    pub fn forward_with_context(&self, latents: &Tensor, timesteps: &[f32], context: &Tensor) -> Result<Tensor> {
        self.forward_impl(latents, Time::Steps(timesteps), Context::Tokens(context))
    }

    /// The keys and values every block's cross-attention computes from `context` (made by
    /// [`WanModel::context`]): constant over a sampler's steps, so computed once for all of
    /// them ([`WanModel::forward_with_cross_kv`]). For the 1.3B model at 480×480 with
    /// guidance, this saves two 1536-wide products over the 769 context tokens of both
    /// branches per block and step.
    pub fn cross_kv(&self, context: &Tensor) -> Result<CrossKv> {
        let batch = self.check_context(context, None)?;
        let context = ops::cast(context, self.dtype)?;
        let blocks = self.blocks.iter().map(|b| b.context_kv(&context)).collect::<Result<Vec<_>>>()?;
        Ok(CrossKv { batch, blocks })
    }

    /// [`WanModel::forward_with_context`] with the context's keys and values from
    /// [`WanModel::cross_kv`]: the same result. Blocks run without activation checkpointing
    /// (this is the sampler's forward; gradients still flow, through the cached keys and
    /// values too).
    pub fn forward_with_cross_kv(&self, latents: &Tensor, timesteps: &[f32], kv: &CrossKv) -> Result<Tensor> {
        self.forward_impl(latents, Time::Steps(timesteps), Context::KeysValues(kv))
    }

    /// The sinusoidal frequencies `[B, freq_dim]` of `timesteps` (t = σ·1000, one per
    /// sample, finite), on the model's device in its dtype: the forward's first input
    /// besides the latents, made on the host.
    pub fn time_frequencies(&self, timesteps: &[f32]) -> Result<Tensor> {
        if timesteps.is_empty() || timesteps.iter().any(|t| !t.is_finite()) {
            bail!("WanModel: timesteps must be finite values t = σ·1000, one per sample, got {timesteps:?}");
        }
        let dim = self.cfg.freq_dim;
        Tensor::from_vec_dtype(sinusoid(timesteps, dim), &[timesteps.len(), dim], self.device, self.dtype)
    }

    /// [`WanModel::forward_with_cross_kv`] with the timesteps given as their frequencies
    /// ([`WanModel::time_frequencies`]): the same result, and no host data enters the
    /// forward, so that it can be recorded once and replayed as a CUDA graph
    /// (`ops::GraphRunner`).
    pub fn forward_with_cross_kv_at(&self, latents: &Tensor, time_freq: &Tensor, kv: &CrossKv) -> Result<Tensor> {
        self.forward_impl(latents, Time::Frequencies(time_freq), Context::KeysValues(kv))
    }

    /// The batch of a context `[B, L, dim]`, checked (against `b` when given).
    fn check_context(&self, context: &Tensor, b: Option<usize>) -> Result<usize> {
        match *context.shape() {
            [cb, n, d] if b.is_none_or(|b| cb == b) && cb > 0 && n > 0 && d == self.cfg.dim => Ok(cb),
            _ => bail!(
                "WanModel: context must be [{}, L, {}], got {:?}",
                b.map_or("B".to_string(), |b| b.to_string()),
                self.cfg.dim,
                context.shape()
            ),
        }
    }

    fn forward_impl(&self, latents: &Tensor, time: Time, context: Context) -> Result<Tensor> {
        let cfg = &self.cfg;
        let [b, c, f, h, w] = *latents.shape() else {
            bail!("WanModel: latents must be [B, {}, F, H, W], got {:?}", cfg.in_channels, latents.shape());
        };
        let [_, ph, pw] = cfg.patch_size;
        if c != cfg.in_channels || b == 0 || f == 0 || h == 0 || w == 0 || h % ph != 0 || w % pw != 0 {
            bail!(
                "WanModel: latents must be [B, {}, F, H, W] with H a multiple of {ph} and W of {pw}, got {:?}",
                cfg.in_channels,
                latents.shape()
            );
        }
        match time {
            Time::Steps(t) if t.len() != b || t.iter().any(|t| !t.is_finite()) => {
                bail!("WanModel: {} timesteps given for a batch of {b} (one finite t = σ·1000 each)", t.len())
            }
            Time::Frequencies(t) if t.shape() != [b, cfg.freq_dim] => bail!(
                "WanModel: time frequencies must be [{b}, {}] for a batch of {b}, got {:?}",
                cfg.freq_dim,
                t.shape()
            ),
            _ => {}
        }
        match context {
            Context::Tokens(c) => {
                self.check_context(c, Some(b))?;
            }
            Context::KeysValues(kv) if kv.batch != b || kv.blocks.len() != self.blocks.len() => bail!(
                "WanModel: cached cross-attention keys and values for a batch of {} and {} blocks, used with a batch \
                 of {b} and {} blocks",
                kv.batch,
                kv.blocks.len(),
                self.blocks.len()
            ),
            Context::KeysValues(_) => {}
        }
        let (hp, wp) = (h / ph, w / pw);
        let tokens = f * hp * wp;

        // Patchify: [B, C, F·hp, ph, wp, pw] → [B, F·hp, wp, C, ph, pw] → [B, N, C·ph·pw].
        let x = ops::cast(latents, self.dtype)?;
        let x = ops::reshape(&x, &[b, c, f * hp, ph, wp, pw])?;
        let x = ops::permute(&x, &[0, 2, 4, 1, 3, 5])?;
        let x = ops::reshape(&x, &[b, tokens, cfg.patch_inputs()])?;
        let mut x = self.patch_embedding.forward(&x)?;
        if cfg.abs_pos_embed {
            x = ops::add(&x, &self.pos_table_for([f, hp, wp])?)?;
        }

        // Time: e [B, D] and its six-way projection [B, 6, D].
        let t_freq = match time {
            Time::Steps(t) => self.time_frequencies(t)?,
            Time::Frequencies(t) => ops::cast(t, self.dtype)?,
        };
        let e = self.time_embedding[1].forward(&ops::silu(&self.time_embedding[0].forward(&t_freq)?)?)?;
        let t_mod = ops::reshape(&self.time_projection.forward(&ops::silu(&e)?)?, &[b, 6, cfg.dim])?;

        let rope = self.rope_for([f, hp, wp])?;
        // The context tokens in the model's dtype (or the cached keys and values).
        let cast;
        let context = match context {
            Context::Tokens(c) => {
                cast = ops::cast(c, self.dtype)?;
                Context::Tokens(&cast)
            }
            kv => kv,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            x = match context {
                Context::Tokens(context) if i < self.checkpoint_blocks => {
                    let (blk, rp) = (block.clone(), rope.clone());
                    let inputs = [x, context.clone(), t_mod.clone()];
                    autograd::checkpoint_keeping(&inputs, &block.tensors(), self.checkpoint_keep, move |xs| {
                        blk.forward(&xs[0], &xs[1], &xs[2], &rp)
                    })?
                }
                Context::Tokens(context) => block.forward(&x, context, &t_mod, &rope)?,
                Context::KeysValues(kv) => {
                    let (k, v) = &kv.blocks[i];
                    block.forward_on(&x, &CrossContext::KeysValues(k, v), &t_mod, &rope)?
                }
            };
        }

        // Head: shift and scale from e, LayerNorm-modulate, project to patches.
        let m = ops::add(&self.head_modulation, &ops::reshape(&e, &[b, 1, cfg.dim])?)?;
        let m = ops::split(&m, 1, &[1, 1])?;
        let y = self.head.forward(&ops::layer_norm_modulate(&x, &m[0], &m[1], cfg.eps)?)?;

        // Unpatchify: [B, F·hp, wp, ph, pw, C] → [B, C, F·hp, ph, wp, pw] = [B, C, F, H, W].
        let co = cfg.out_channels;
        let y = ops::reshape(&y, &[b, f * hp, wp, ph, pw, co])?;
        let y = ops::permute(&y, &[0, 5, 1, 3, 2, 4])?;
        ops::reshape(&y, &[b, co, f, h, w])
    }

    /// `[1, N, D]`: the fixed 2-D sine/cosine embedding of every token of a grid (see
    /// [`pos_embedding_2d`]), cached for the last grid.
    fn pos_table_for(&self, grid: [usize; 3]) -> Result<Tensor> {
        let mut cache = self.pos_table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, t)) = cache.as_ref() {
            if *g == grid {
                return Ok(t.clone());
            }
        }
        let values = pos_embedding_2d(grid, self.cfg.dim);
        let t = Tensor::from_vec_dtype(values, &[1, grid.iter().product(), self.cfg.dim], self.device, self.dtype)?;
        *cache = Some((grid, t.clone()));
        Ok(t)
    }

    /// The RoPE table of a `frames × rows × columns` token grid, cached for the last grid.
    fn rope_for(&self, grid: [usize; 3]) -> Result<Rope> {
        let mut cache = self.rope.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, r)) = cache.as_ref() {
            if *g == grid {
                return Ok(r.clone());
            }
        }
        if let Some(&n) = grid.iter().find(|&&n| n > self.cfg.rope_max_seq_len) {
            bail!(
                "WanModel: token grid {grid:?} has an axis of {n} positions, more than rope_max_seq_len {}",
                self.cfg.rope_max_seq_len
            );
        }
        let table = ops::rope_table_3d(grid[0], grid[1], grid[2], self.cfg.head_dim(), self.cfg.rope_theta)?;
        let (cos, sin) = table.to_tensors(self.device)?;
        let rope = Rope { cos, sin };
        *cache = Some((grid, rope.clone()));
        Ok(rope)
    }
}

/// The fixed absolute position embedding of a `frames × rows × columns` token grid, row
/// major (`[N·D]`): the first half of each token's `d` channels holds `sin` then `cos` of
/// its row times the frequencies `10000^(−k/(d/4))`, k = 0..d/4, the second half the same
/// of its column (frames share the table); an odd remainder of channels is 0.
pub fn pos_embedding_2d(grid: [usize; 3], d: usize) -> Vec<f32> {
    let [f, h, w] = grid;
    let q = d / 4;
    let freq: Vec<f64> = (0..q).map(|k| 10000f64.powf(-(k as f64) / q.max(1) as f64)).collect();
    let mut out = vec![0f32; f * h * w * d];
    for (n, row) in out.chunks_mut(d).enumerate() {
        let (y, x) = ((n / w) % h, n % w);
        for k in 0..q {
            let (a, b) = (y as f64 * freq[k], x as f64 * freq[k]);
            row[k] = a.sin() as f32;
            row[q + k] = a.cos() as f32;
            row[2 * q + k] = b.sin() as f32;
            row[3 * q + k] = b.cos() as f32;
        }
    }
    out
}

impl Module for WanModel {
    fn params(&self, out: &mut Vec<NamedParam>) {
        self.patch_embedding.params(out);
        for l in self.text_embedding.iter().chain(&self.time_embedding) {
            l.params(out);
        }
        self.time_projection.params(out);
        self.img_emb.params(out);
        for b in &self.blocks {
            b.params(out);
        }
        self.head.params(out);
        out.push(("head.modulation".into(), self.head_modulation.clone()));
    }
}

/// Wan's timestep embedding `cat[cos(t·ω_k), sin(t·ω_k)]`, ω_k = 10000^(−k/(dim/2)),
/// computed in f64 (as DiffSynth does) → `[B, dim]` row-major.
fn sinusoid(timesteps: &[f32], dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let mut out = vec![0f32; timesteps.len() * dim];
    for (row, &t) in out.chunks_exact_mut(dim).zip(timesteps) {
        for k in 0..half {
            let angle = t as f64 * 10000f64.powf(-(k as f64) / half as f64);
            row[k] = angle.cos() as f32;
            row[half + k] = angle.sin() as f32;
        }
    }
    out
}

/// A [`ParamSource`] over a [`Loader`] that asks for each parameter under the key that
/// provides it, and creates `img_emb` when no source holds it.
struct Resolved<'a, 'm> {
    loader: Loader<'a>,
    map: &'m NameMap,
    created: Option<RandomInit>,
}

impl ParamSource for Resolved<'_, '_> {
    fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        if let (Some(r), true) = (self.created.as_mut(), name.starts_with("img_emb.")) {
            return r.param(name, shape, init);
        }
        self.loader.get(&self.map.key(name), shape)
    }

    fn device(&self) -> Device {
        self.loader.device()
    }
}
