//! Building blocks of the models: named parameters and the layers that own them.
//!
//! A model is built once against a [`ParamSource`]: either a [`Loader`] over checkpoint
//! files (real weights, in the checkpoint's own names) or [`RandomInit`] (tests, demo,
//! benchmarks). Each layer keeps the full names of its tensors, so a model can list its
//! parameters for the optimizer and for saving in the same naming.

use crate::weights::Loader;
use crate::{ops, DType, Device, Result, Rng, Tensor};

/// How a parameter is initialised when it is not loaded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal(f32),
    /// Uniform in [−a, a].
    Uniform(f32),
    /// Every element equal to this value.
    Constant(f32),
}

/// Where a model's parameters come from.
pub trait ParamSource {
    /// The tensor `name` of `shape`; `init` says how to create it when the source
    /// creates rather than loads.
    fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor>;
    /// The device parameters are placed on.
    fn device(&self) -> Device;
}

impl ParamSource for Loader<'_> {
    fn param(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Tensor> {
        self.get(name, shape)
    }
    fn device(&self) -> Device {
        Loader::device(self)
    }
}

/// Creates every parameter from its [`Init`] with a seeded generator (drawn on the host,
/// so the same seed gives the same weights on every device).
pub struct RandomInit {
    rng: Rng,
    device: Device,
    dtype: DType,
}

impl RandomInit {
    /// A source on `device` in `dtype` (CPU: f32) seeded with `seed`.
    pub fn new(seed: u64, device: Device, dtype: DType) -> Self {
        let dtype = if device == Device::Cpu { DType::F32 } else { dtype };
        RandomInit { rng: Rng::new(seed), device, dtype }
    }
}

impl ParamSource for RandomInit {
    fn param(&mut self, _name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let n = crate::numel(shape);
        let v = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Constant(c) => vec![c; n],
            Init::Normal(std) => self.rng.normal_vec(n, std),
            Init::Uniform(a) => self.rng.uniform_vec(n, -a, a),
        };
        Tensor::from_vec_dtype(v, shape, self.device, self.dtype)
    }
    fn device(&self) -> Device {
        self.device
    }
}

/// A named parameter.
pub type NamedParam = (String, Tensor);

/// Anything that owns parameters.
pub trait Module {
    /// Appends this module's parameters (full names) to `out`.
    fn params(&self, out: &mut Vec<NamedParam>);

    /// All parameters, by full name.
    fn named_params(&self) -> Vec<NamedParam> {
        let mut v = Vec::new();
        self.params(&mut v);
        v
    }
}

fn join(prefix: &str, leaf: &str) -> String {
    if prefix.is_empty() {
        leaf.to_string()
    } else {
        format!("{prefix}.{leaf}")
    }
}

/// `y = x·Wᵀ + b` with W `[out, in]` (PyTorch layout).
pub struct Linear {
    /// Name prefix (`<prefix>.weight`, `<prefix>.bias`).
    pub name: String,
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Builds `prefix.weight` `[out, in]` (+ `prefix.bias` `[out]`), initialised like
    /// PyTorch's `nn.Linear` (uniform ±1/√in) when created.
    pub fn new(src: &mut dyn ParamSource, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let a = 1.0 / (in_dim as f32).sqrt();
        Self::with_init(src, prefix, in_dim, out_dim, bias, Init::Uniform(a), Init::Uniform(a))
    }

    /// Builds with explicit initialisers for weight and bias.
    pub fn with_init(
        src: &mut dyn ParamSource,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        w_init: Init,
        b_init: Init,
    ) -> Result<Self> {
        let weight = src.param(&join(prefix, "weight"), &[out_dim, in_dim], w_init)?;
        let bias = if bias { Some(src.param(&join(prefix, "bias"), &[out_dim], b_init)?) } else { None };
        Ok(Linear { name: prefix.to_string(), weight, bias })
    }

    /// Applies the layer to `x [..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }

    /// Applies the layer, then GELU-tanh ([`ops::linear_gelu_tanh`]: one GEMM with the
    /// activation in its epilogue where that is allowed).
    pub fn forward_gelu_tanh(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear_gelu_tanh(x, &self.weight, self.bias.as_ref())
    }

    /// Applies this layer, GELU-tanh, then `second`: a transformer MLP
    /// ([`ops::mlp_gelu_tanh`]: the GELU in the GEMM epilogues, forward and backward, where
    /// that is allowed).
    pub fn forward_mlp_gelu_tanh(&self, second: &Linear, x: &Tensor) -> Result<Tensor> {
        ops::mlp_gelu_tanh(x, &self.weight, self.bias.as_ref(), &second.weight, second.bias.as_ref())
    }
}

impl Module for Linear {
    fn params(&self, out: &mut Vec<NamedParam>) {
        out.push((join(&self.name, "weight"), self.weight.clone()));
        if let Some(b) = &self.bias {
            out.push((join(&self.name, "bias"), b.clone()));
        }
    }
}

/// LayerNorm over the last dimension, with optional affine weight and bias.
pub struct LayerNorm {
    /// Name prefix.
    pub name: String,
    /// `[dim]` scale, if affine.
    pub weight: Option<Tensor>,
    /// `[dim]` shift, if affine.
    pub bias: Option<Tensor>,
    /// Variance epsilon.
    pub eps: f32,
}

impl LayerNorm {
    /// Builds `prefix.weight`/`prefix.bias` (ones/zeros when created) if `affine`.
    pub fn new(src: &mut dyn ParamSource, prefix: &str, dim: usize, eps: f32, affine: bool) -> Result<Self> {
        let (weight, bias) = if affine {
            (
                Some(src.param(&join(prefix, "weight"), &[dim], Init::Ones)?),
                Some(src.param(&join(prefix, "bias"), &[dim], Init::Zeros)?),
            )
        } else {
            (None, None)
        };
        Ok(LayerNorm { name: prefix.to_string(), weight, bias, eps })
    }

    /// Normalises `x [..., dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, self.weight.as_ref(), self.bias.as_ref(), self.eps)
    }
}

impl Module for LayerNorm {
    fn params(&self, out: &mut Vec<NamedParam>) {
        if let Some(w) = &self.weight {
            out.push((join(&self.name, "weight"), w.clone()));
        }
        if let Some(b) = &self.bias {
            out.push((join(&self.name, "bias"), b.clone()));
        }
    }
}

/// RMSNorm over the last dimension with a learned scale (computed in fp32).
pub struct RmsNorm {
    /// Name prefix.
    pub name: String,
    /// `[dim]` scale.
    pub weight: Tensor,
    /// Epsilon inside the root.
    pub eps: f32,
}

impl RmsNorm {
    /// Builds `prefix.weight` (ones when created).
    pub fn new(src: &mut dyn ParamSource, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm { name: prefix.to_string(), weight: src.param(&join(prefix, "weight"), &[dim], Init::Ones)?, eps })
    }

    /// Normalises `x [..., dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps)
    }
}

impl Module for RmsNorm {
    fn params(&self, out: &mut Vec<NamedParam>) {
        out.push((join(&self.name, "weight"), self.weight.clone()));
    }
}
