//! The umT5 text encoder of Wan2.1 and Synthos: the encoder of umT5-XXL ("UniMax: Fairer
//! and More Effective Language Sampling for Large-Scale Multilingual Pretraining",
//! <https://arxiv.org/abs/2304.09151>), in Hugging Face's `UMT5EncoderModel` naming (the
//! `text_encoder/` folder of a diffusers-format Wan repository). Facts: docs/MODELS.md, *Text encoder*.
//!
//! ```text
//! prompts ─clean, tokenize, </s>, pad to 512─► ids [B,L]
//! ids ─ shared (embedding, kept on the host) ─► x [B,L,4096]
//! x ─ 24 × { x += o(attn(RMS(x); rel. bias of the layer, key mask, scale 1))
//!            x += wo(gelu_tanh(wi_0(RMS(x))) · wi_1(RMS(x))) } ─ RMS ─► [B,L,4096]
//! rows at and past the real length (</s> counted) set to 0
//! ```
//!
//! Each layer has its own relative position bias table `[32 buckets, heads]`
//! (bidirectional buckets, exact up to distance 8, logarithmic up to 128). The bias
//! `[1, H, L, L]` is the table gathered by the bucket of `key − query`; it is computed as
//! `tableᵀ · onehot(bucket)ᵀ` with a one-hot matrix built once per length on the host,
//! so the same ops run on the CPU and the GPU and nothing needs a gather kernel. The
//! token embedding (256384 × 4096, frozen) stays on the host, where the rows of a batch
//! are gathered and uploaded.
//!
//! The encoder is frozen in Synthos training: run it under [`crate::no_grad`] (the
//! entry points do).
//!
//! ```no_run
//! use synthos_engine::models::t5::{T5Config, TextEncoder};
//! use synthos_engine::{DType, Device};
//! # fn main() -> synthos_engine::Result<()> {
//! let cfg = T5Config::umt5_xxl();
//! let enc = TextEncoder::load(&cfg, "Wan2.1-T2V-1.3B-Diffusers/text_encoder",
//!     "Wan2.1-T2V-1.3B-Diffusers/tokenizer/tokenizer.json", Device::Cuda(0), DType::BF16)?;
//! let context = enc.encode_text(&["a cat on a mat", ""])?; // [2, 512, 4096]
//! # Ok(()) }
//! ```
//! Parity with transformers is tested in `tests/t5.rs` (`cargo test --test t5`).

use std::path::Path;
use std::sync::Mutex;

use serde_json::Value;

use crate::nn::{Init, Linear, Module, NamedParam, ParamSource, RandomInit, RmsNorm};
use crate::ops::{self, AttentionOptions};
use crate::tokenizer::{T5Tokenizer, TokenBatch, UMT5_TEXT_LEN};
use crate::weights::{Loader, WeightSet};
use crate::{autograd, bail, DType, Device, Error, Result, Tensor};

/// Hyper-parameters of a umT5 encoder.
#[derive(Clone, Debug, PartialEq)]
pub struct T5Config {
    /// Rows of the token embedding (umT5: 256384).
    pub vocab_size: usize,
    /// Model width (4096).
    pub d_model: usize,
    /// Width of one attention head (64).
    pub d_kv: usize,
    /// Hidden width of the gated-GELU feed-forward network (10240).
    pub d_ff: usize,
    /// Number of layers (24).
    pub num_layers: usize,
    /// Attention heads (64).
    pub num_heads: usize,
    /// Relative-position buckets per layer (32).
    pub num_buckets: usize,
    /// Distance from which all relative positions share a bucket (128).
    pub max_distance: usize,
    /// Epsilon of the RMS norms (1e-6).
    pub eps: f32,
    /// Length prompts are padded and truncated to (512).
    pub text_len: usize,
}

impl T5Config {
    /// umT5-XXL's encoder as Wan2.1 uses it (text length 512).
    pub fn umt5_xxl() -> T5Config {
        T5Config {
            vocab_size: 256_384,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10_240,
            num_layers: 24,
            num_heads: 64,
            num_buckets: 32,
            max_distance: 128,
            eps: 1e-6,
            text_len: UMT5_TEXT_LEN,
        }
    }

    /// A tiny encoder for tests: width 64, 2 heads of 32 (a head size the GPU attention
    /// supports), FFN 40, 3 layers, vocabulary 416, text length 160 (longer than the
    /// maximum distance, so the capped buckets occur). `tests/fixtures/t5/` has this shape.
    pub fn tiny() -> T5Config {
        T5Config {
            vocab_size: 416,
            d_model: 64,
            d_kv: 32,
            d_ff: 40,
            num_layers: 3,
            num_heads: 2,
            text_len: 160,
            ..Self::umt5_xxl()
        }
    }

    /// A preset by name: `umt5-xxl` or `tiny`.
    pub fn preset(name: &str) -> Result<T5Config> {
        Ok(match name {
            "umt5-xxl" => Self::umt5_xxl(),
            "tiny" => Self::tiny(),
            _ => bail!("unknown umT5 config preset {name:?} (known: umt5-xxl, tiny)"),
        })
    }

    /// Width of all heads together (`num_heads · d_kv`).
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// Checks that the sizes fit together; errors name the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("text_len", self.text_len),
        ] {
            if v == 0 {
                bail!("umT5 config: {name} must be positive");
            }
        }
        if self.num_buckets < 4 || !self.num_buckets.is_multiple_of(4) {
            bail!("umT5 config: num_buckets must be a positive multiple of 4, got {}", self.num_buckets);
        }
        if self.max_distance <= self.num_buckets / 4 {
            bail!(
                "umT5 config: max_distance {} must exceed the exact range {}",
                self.max_distance,
                self.num_buckets / 4
            );
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("umT5 config: eps must be positive, got {}", self.eps);
        }
        Ok(())
    }

    /// Reads a transformers `UMT5Config` / `T5Config` `config.json` (the text length, which
    /// is not in it, is 512).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<T5Config> {
        super::read_json_config(path.as_ref(), "umT5 config", Self::from_json)
    }

    /// [`T5Config::from_json_file`] on parsed JSON. Only the gated-GELU (tanh) feed-forward
    /// of umT5 / T5 v1.1 is supported.
    pub fn from_json(json: &Value) -> Result<T5Config> {
        let Some(obj) = json.as_object() else {
            bail!("expected a JSON object");
        };
        let size = |key: &str| super::json_usize(obj, key);
        let ffn = obj.get("feed_forward_proj").and_then(Value::as_str).unwrap_or("relu");
        if ffn != "gated-gelu" {
            bail!("\"feed_forward_proj\" is {ffn:?}; only umT5's \"gated-gelu\" is supported");
        }
        if let Some(act) = obj.get("dense_act_fn").and_then(Value::as_str) {
            if act != "gelu_new" && act != "gelu_pytorch_tanh" {
                bail!("\"dense_act_fn\" is {act:?}; only the tanh GELU (\"gelu_new\") is supported");
            }
        }
        let cfg = T5Config {
            vocab_size: size("vocab_size")?,
            d_model: size("d_model")?,
            d_kv: size("d_kv")?,
            d_ff: size("d_ff")?,
            num_layers: size("num_layers")?,
            num_heads: size("num_heads")?,
            num_buckets: size("relative_attention_num_buckets")?,
            max_distance: size("relative_attention_max_distance")?,
            eps: obj.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
            text_len: UMT5_TEXT_LEN,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// umT5's bucket of the relative position `rel = key − query` (bidirectional): half the
/// buckets for keys after the query; in each half, distances below `num_buckets/4` are
/// exact and larger ones share logarithmic buckets up to `max_distance`. Computed like
/// the reference, with an f32 logarithm truncated toward zero.
pub fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let base = if rel > 0 { half } else { 0 };
    let distance = rel.unsigned_abs() as usize;
    let max_exact = half / 2;
    if distance < max_exact {
        return base + distance;
    }
    // torch: log(d.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact),
    // the double divisor rounded to float as a scalar operand of a float tensor.
    let log_span = (max_distance as f64 / max_exact as f64).ln() as f32;
    let log_ratio = (distance as f32 / max_exact as f32).ln() / log_span * (half - max_exact) as f32;
    base + (max_exact + log_ratio as usize).min(half - 1)
}

/// One encoder layer (`encoder.block.{i}`).
struct T5Layer {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `[num_buckets, num_heads]`.
    rel_bias: Tensor,
    rel_bias_name: String,
    ffn_norm: RmsNorm,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

impl T5Layer {
    fn new(src: &mut dyn ParamSource, cfg: &T5Config, i: usize) -> Result<T5Layer> {
        let (d, inner) = (cfg.d_model, cfg.inner_dim());
        let p = format!("encoder.block.{i}");
        let attn = format!("{p}.layer.0.SelfAttention");
        let ffn = format!("{p}.layer.1.DenseReluDense");
        let rel_bias_name = format!("{attn}.relative_attention_bias.weight");
        Ok(T5Layer {
            attn_norm: RmsNorm::new(src, &format!("{p}.layer.0.layer_norm"), d, cfg.eps)?,
            q: Linear::new(src, &format!("{attn}.q"), d, inner, false)?,
            k: Linear::new(src, &format!("{attn}.k"), d, inner, false)?,
            v: Linear::new(src, &format!("{attn}.v"), d, inner, false)?,
            o: Linear::new(src, &format!("{attn}.o"), inner, d, false)?,
            rel_bias: src.param(&rel_bias_name, &[cfg.num_buckets, cfg.num_heads], Init::Uniform(3f32.sqrt()))?,
            rel_bias_name,
            ffn_norm: RmsNorm::new(src, &format!("{p}.layer.1.layer_norm"), d, cfg.eps)?,
            wi_0: Linear::new(src, &format!("{ffn}.wi_0"), d, cfg.d_ff, false)?,
            wi_1: Linear::new(src, &format!("{ffn}.wi_1"), d, cfg.d_ff, false)?,
            wo: Linear::new(src, &format!("{ffn}.wo"), cfg.d_ff, d, false)?,
        })
    }

    /// `x [B, L, D]` → `x` after the attention and feed-forward sublayers; `buckets` is the
    /// one-hot bucket matrix `[L·L, num_buckets]`, `mask` the key mask `[B, L]`.
    fn forward(&self, x: &Tensor, buckets: &Tensor, mask: &Tensor, cfg: &T5Config) -> Result<Tensor> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let heads = [b, l, cfg.num_heads, cfg.d_kv];
        let h = self.attn_norm.forward(x)?;
        let q = ops::reshape(&self.q.forward(&h)?, &heads)?;
        let k = ops::reshape(&self.k.forward(&h)?, &heads)?;
        let v = ops::reshape(&self.v.forward(&h)?, &heads)?;
        // bias[h, i, j] = table[bucket(j − i), h]: tableᵀ [H, NB] · onehotᵀ [NB, L·L]
        let bias = ops::matmul_t(&self.rel_bias, buckets, true, true)?;
        let bias = ops::reshape(&bias, &[1, cfg.num_heads, l, l])?;
        let opts = AttentionOptions { scale: 1.0, causal: false, key_mask: Some(mask), bias: Some(&bias) };
        let a = ops::attention(&q, &k, &v, &opts)?;
        let a = self.o.forward(&ops::reshape(&a, &[b, l, cfg.inner_dim()])?)?;
        let x = ops::add(x, &a)?;
        let h = self.ffn_norm.forward(&x)?;
        let gate = self.wi_0.forward_gelu_tanh(&h)?;
        let f = self.wo.forward(&ops::mul(&gate, &self.wi_1.forward(&h)?)?)?;
        ops::add(&x, &f)
    }
}

impl Module for T5Layer {
    fn params(&self, out: &mut Vec<NamedParam>) {
        self.attn_norm.params(out);
        for l in [&self.q, &self.k, &self.v, &self.o] {
            l.params(out);
        }
        out.push((self.rel_bias_name.clone(), self.rel_bias.clone()));
        self.ffn_norm.params(out);
        for l in [&self.wi_0, &self.wi_1, &self.wo] {
            l.params(out);
        }
    }
}

/// Name of the token embedding in `UMT5EncoderModel` checkpoints (some also or instead
/// hold it as `encoder.embed_tokens.weight`, the same tied tensor).
const EMBED_NAME: &str = "shared.weight";
const EMBED_ALIAS: &str = "encoder.embed_tokens.weight";

/// Seed offset of the randomly created token embedding (drawn on the host).
const EMBED_SEED: u64 = 0x7E5_EED;

/// The umT5 encoder stack (no tokenizer; see [`TextEncoder`]). Its parameters are on
/// the model's device except the token embedding `shared.weight`, a host (CPU, f32)
/// tensor: 4.2 GB of host memory for umT5-XXL instead of 2 GB on the GPU.
pub struct T5Encoder {
    cfg: T5Config,
    device: Device,
    /// `[vocab, d_model]` on the host (CPU, f32).
    embed: Tensor,
    layers: Vec<T5Layer>,
    final_norm: RmsNorm,
    /// One-hot bucket matrix `[L·L, num_buckets]` of the last length seen.
    buckets: Mutex<Option<(usize, Tensor)>>,
}

impl T5Encoder {
    /// Builds the encoder: the embedding from `host` (a CPU source), every other tensor
    /// from `src`.
    fn build(cfg: &T5Config, src: &mut dyn ParamSource, host: &mut dyn ParamSource) -> Result<T5Encoder> {
        cfg.validate()?;
        if host.device() != Device::Cpu {
            bail!("T5Encoder: the token embedding must come from a CPU source");
        }
        let embed = host.param(EMBED_NAME, &[cfg.vocab_size, cfg.d_model], Init::Uniform(3f32.sqrt()))?;
        let layers = (0..cfg.num_layers).map(|i| T5Layer::new(src, cfg, i)).collect::<Result<Vec<_>>>()?;
        let final_norm = RmsNorm::new(src, "encoder.final_layer_norm", cfg.d_model, cfg.eps)?;
        Ok(T5Encoder { cfg: cfg.clone(), device: src.device(), embed, layers, final_norm, buckets: Mutex::new(None) })
    }

    /// An encoder with random weights (tests, benchmarks), seeded; linear layers uniform
    /// ±1/√fan_in, embedding and bias tables uniform with unit variance, norms ones.
    pub fn random(cfg: &T5Config, seed: u64, device: Device, dtype: DType) -> Result<T5Encoder> {
        let mut host = RandomInit::new(seed ^ EMBED_SEED, Device::Cpu, DType::F32);
        Self::build(cfg, &mut RandomInit::new(seed, device, dtype), &mut host)
    }

    /// Loads `UMT5EncoderModel` weights (a `.safetensors` file, a sharded index json or a
    /// directory such as a diffusers repository's `text_encoder/`) onto `device` as `dtype`;
    /// the token embedding goes to the host. Missing, mis-shaped and unexpected tensors are
    /// reported together.
    pub fn load(cfg: &T5Config, path: impl AsRef<Path>, device: Device, dtype: DType) -> Result<T5Encoder> {
        let set = WeightSet::open(path.as_ref())?;
        let embed_name = if set.contains(EMBED_NAME) || !set.contains(EMBED_ALIAS) { EMBED_NAME } else { EMBED_ALIAS };
        let mut device_loader = Loader::new(&set, device, dtype);
        device_loader.ignore_where(|n| n == EMBED_NAME || n == EMBED_ALIAS);
        let mut host_loader = Loader::new(&set, Device::Cpu, DType::F32);
        host_loader.ignore_where(|n| n != embed_name);
        let mut host = Renamed { loader: host_loader, from: EMBED_NAME, to: embed_name };
        let built = Self::build(cfg, &mut device_loader, &mut host);
        let mut problems: Vec<String> = [device_loader.finish(), host.loader.finish()]
            .into_iter()
            .filter_map(|r| r.err())
            .map(|e| e.to_string())
            .collect();
        if let Err(e) = &built {
            problems.insert(0, e.to_string());
        }
        if !problems.is_empty() {
            bail!("umT5 encoder: {}", problems.join("\n"));
        }
        built
    }

    /// The configuration.
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The device of the layers (the embedding is on the host).
    pub fn device(&self) -> Device {
        self.device
    }

    /// The final-norm output `[B, L, d_model]` at every row (padded rows included) for the
    /// token rows of `tokens`, with padded keys masked out of every attention.
    pub fn forward(&self, tokens: &TokenBatch) -> Result<Tensor> {
        let (b, l) = (tokens.batch(), tokens.text_len);
        if b == 0 {
            bail!("T5Encoder: empty batch");
        }
        if tokens.ids.len() != b * l {
            bail!("T5Encoder: {} ids for {b} rows of {l}", tokens.ids.len());
        }
        if let Some((row, &n)) = tokens.lengths.iter().enumerate().find(|(_, &n)| n == 0 || n > l) {
            bail!("T5Encoder: row {row} has length {n}, outside 1..={l}");
        }
        let x = self.embed_rows(&tokens.ids, &[b, l])?;
        let mask: Vec<f32> =
            tokens.lengths.iter().flat_map(|&n| (0..l).map(move |j| f32::from(u8::from(j < n)))).collect();
        let mask = Tensor::from_vec_dtype(mask, &[b, l], self.device, DType::F32)?;
        let buckets = self.bucket_one_hot(l)?;
        let mut x = x;
        for layer in &self.layers {
            x = layer.forward(&x, &buckets, &mask, &self.cfg)?;
        }
        self.final_norm.forward(&x)
    }

    /// The text embedding the pipelines use: [`T5Encoder::forward`] with the rows at and
    /// after each prompt's real length (its `</s>` included) set to zero. Runs without
    /// recording gradients (the encoder is frozen).
    pub fn encode(&self, tokens: &TokenBatch) -> Result<Tensor> {
        autograd::no_grad(|| {
            let out = self.forward(tokens)?;
            let l = tokens.text_len;
            let keep: Vec<f32> =
                tokens.lengths.iter().flat_map(|&n| (0..l).map(move |j| f32::from(u8::from(j < n)))).collect();
            let keep = Tensor::from_vec_dtype(keep, &[tokens.batch(), l, 1], self.device, out.dtype())?;
            ops::mul(&out, &keep)
        })
    }

    /// Gathers the embedding rows of `ids` on the host and places them on the device.
    fn embed_rows(&self, ids: &[u32], shape: &[usize]) -> Result<Tensor> {
        let d = self.cfg.d_model;
        let ids: Vec<usize> = ids.iter().map(|&id| id as usize).collect();
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id >= self.cfg.vocab_size) {
            bail!("T5Encoder: token id {id} at position {i} is outside the vocabulary of {}", self.cfg.vocab_size);
        }
        // The lookup runs where the table lives (the host); only the rows travel.
        let rows = ops::gather_rows(&self.embed, &ids)?;
        let mut out_shape = shape.to_vec();
        out_shape.push(d);
        ops::reshape(&rows, &out_shape)?.to_device(self.device, self.layers[0].q.weight.dtype())
    }

    /// The one-hot matrix `[L·L, num_buckets]` whose row `i·L + j` selects the bucket of
    /// `j − i`, built on the host once per length, in the bias tables' dtype.
    fn bucket_one_hot(&self, l: usize) -> Result<Tensor> {
        let mut cache = self.buckets.lock().map_err(|_| Error::msg("T5Encoder: bucket cache poisoned"))?;
        if let Some((len, t)) = cache.as_ref() {
            if *len == l {
                return Ok(t.clone());
            }
        }
        let nb = self.cfg.num_buckets;
        let by_offset: Vec<usize> = (0..2 * l - 1)
            .map(|k| relative_position_bucket(k as i64 - (l as i64 - 1), nb, self.cfg.max_distance))
            .collect();
        let mut one_hot = vec![0f32; l * l * nb];
        for i in 0..l {
            for j in 0..l {
                one_hot[(i * l + j) * nb + by_offset[j + l - 1 - i]] = 1.0;
            }
        }
        let t = Tensor::from_vec_dtype(one_hot, &[l * l, nb], self.device, self.layers[0].rel_bias.dtype())?;
        *cache = Some((l, t.clone()));
        Ok(t)
    }
}

impl Module for T5Encoder {
    fn params(&self, out: &mut Vec<NamedParam>) {
        out.push((EMBED_NAME.to_string(), self.embed.clone()));
        for layer in &self.layers {
            layer.params(out);
        }
        self.final_norm.params(out);
    }
}

/// A loader that serves one requested name from another name of the checkpoint.
struct Renamed<'a> {
    loader: Loader<'a>,
    from: &'static str,
    to: &'static str,
}

impl ParamSource for Renamed<'_> {
    fn param(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Tensor> {
        self.loader.get(if name == self.from { self.to } else { name }, shape)
    }
    fn device(&self) -> Device {
        self.loader.device()
    }
}

/// The text side of the pipelines: the umT5 tokenizer and encoder together.
pub struct TextEncoder {
    /// Prompt preparation.
    pub tokenizer: T5Tokenizer,
    /// The encoder.
    pub model: T5Encoder,
}

impl TextEncoder {
    /// Pairs a tokenizer with an encoder; their text lengths must agree. (A token id past
    /// the embedding is an error when it occurs: umT5's embedding has more rows than its
    /// tokenizer has ids, and other pairs need not match exactly either.)
    pub fn new(tokenizer: T5Tokenizer, model: T5Encoder) -> Result<TextEncoder> {
        if tokenizer.text_len() != model.config().text_len {
            bail!(
                "TextEncoder: tokenizer text length {} differs from the model's {}",
                tokenizer.text_len(),
                model.config().text_len
            );
        }
        Ok(TextEncoder { tokenizer, model })
    }

    /// Loads the weights (see [`T5Encoder::load`]) and the `tokenizer.json`.
    pub fn load(
        cfg: &T5Config,
        weights: impl AsRef<Path>,
        tokenizer_json: impl AsRef<Path>,
        device: Device,
        dtype: DType,
    ) -> Result<TextEncoder> {
        let tokenizer = T5Tokenizer::from_file(tokenizer_json, cfg.text_len)?;
        Self::new(tokenizer, T5Encoder::load(cfg, weights, device, dtype)?)
    }

    /// The text embedding of each prompt, `[B, text_len, d_model]` (`[B, 512, 4096]` for
    /// umT5-XXL): cleaned, tokenized with `</s>`, padded, encoded, and zero from each
    /// prompt's real length on. The empty prompt is its `</s>` row, then zeros.
    pub fn encode_text<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor> {
        if prompts.is_empty() {
            bail!("encode_text: no prompts given");
        }
        self.model.encode(&self.tokenizer.encode(prompts)?)
    }
}
