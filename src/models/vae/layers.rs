//! The VAE's building blocks for one frame: causal convs reduced to 2-D, plain convs,
//! the channel RMS norm, residual blocks and the 2× resampling layers.

use super::config::*;
use crate::nn::{Init, NamedParam, ParamSource};
use crate::ops::{self, Conv2dOptions, Padding2d};
use crate::{bail, Result, Tensor};

pub(super) fn join(prefix: &str, leaf: &str) -> String {
    format!("{prefix}.{leaf}")
}

/// PyTorch's default initialisation bound for a conv with this fan-in.
pub(super) fn fan_in_bound(fan_in: usize) -> Init {
    Init::Uniform(1.0 / (fan_in as f32).sqrt())
}

/// A causal 3-D convolution (`WanCausalConv3d`) applied to a single frame: the 2-D conv
/// with the last temporal slice of its kernel (see the module comment).
pub(super) struct CausalConv {
    pub(super) name: String,
    /// `[out, in, kt, k, k]`.
    pub(super) weight: Tensor,
    /// `[out]`.
    pub(super) bias: Tensor,
}

impl CausalConv {
    /// `prefix.weight` `[out, in, kt, k, k]` and `prefix.bias` `[out]`.
    pub(super) fn new(
        src: &mut dyn ParamSource,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        kt: usize,
        k: usize,
    ) -> Result<Self> {
        let init = fan_in_bound(c_in * kt * k * k);
        Ok(CausalConv {
            name: prefix.to_string(),
            weight: src.param(&join(prefix, "weight"), &[c_out, c_in, kt, k, k], init)?,
            bias: src.param(&join(prefix, "bias"), &[c_out], init)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [o, i, kt, kh, kw] = *self.weight.shape() else {
            bail!("{}: weight of shape {:?} is not 5-D", self.name, self.weight.shape());
        };
        let last = ops::reshape(&ops::narrow(&self.weight, 2, kt - 1, 1)?, &[o, i, kh, kw])?;
        ops::conv2d(x, &last, Some(&self.bias), 1, kh / 2).map_err(|e| e.context(&self.name))
    }

    pub(super) fn params(&self, out: &mut Vec<NamedParam>) {
        out.push((join(&self.name, "weight"), self.weight.clone()));
        out.push((join(&self.name, "bias"), self.bias.clone()));
    }
}

/// A plain 2-D convolution with bias.
pub(super) struct Conv2d {
    pub(super) name: String,
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) opts: Conv2dOptions,
}

impl Conv2d {
    pub(super) fn new(
        src: &mut dyn ParamSource,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        opts: Conv2dOptions,
    ) -> Result<Self> {
        let init = fan_in_bound(c_in * k * k);
        Ok(Conv2d {
            name: prefix.to_string(),
            weight: src.param(&join(prefix, "weight"), &[c_out, c_in, k, k], init)?,
            bias: src.param(&join(prefix, "bias"), &[c_out], init)?,
            opts,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d_opts(x, &self.weight, Some(&self.bias), &self.opts).map_err(|e| e.context(&self.name))
    }

    pub(super) fn params(&self, out: &mut Vec<NamedParam>) {
        out.push((join(&self.name, "weight"), self.weight.clone()));
        out.push((join(&self.name, "bias"), self.bias.clone()));
    }
}

/// `RMS_norm` over channels with a gain `gamma` stored `[C, 1, 1, 1]` (video layers) or
/// `[C, 1, 1]` (the attention's image layer).
pub(super) struct ChannelNorm {
    pub(super) name: String,
    pub(super) gamma: Tensor,
}

impl ChannelNorm {
    pub(super) fn new(src: &mut dyn ParamSource, prefix: &str, c: usize, image_layer: bool) -> Result<Self> {
        let shape: &[usize] = if image_layer { &[c, 1, 1] } else { &[c, 1, 1, 1] };
        Ok(ChannelNorm { name: prefix.to_string(), gamma: src.param(&join(prefix, "gamma"), shape, Init::Ones)? })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gamma = ops::reshape(&self.gamma, &[self.gamma.numel()])?;
        ops::channel_rms_norm(x, &gamma, NORM_EPS).map_err(|e| e.context(&self.name))
    }

    pub(super) fn params(&self, out: &mut Vec<NamedParam>) {
        out.push((join(&self.name, "gamma"), self.gamma.clone()));
    }
}

/// `WanResidualBlock`: `conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)`.
pub(super) struct ResBlock {
    pub(super) norm1: ChannelNorm,
    pub(super) conv1: CausalConv,
    pub(super) norm2: ChannelNorm,
    pub(super) conv2: CausalConv,
    /// A 1×1×1 conv when the channel count changes.
    pub(super) shortcut: Option<CausalConv>,
}

impl ResBlock {
    pub(super) fn new(src: &mut dyn ParamSource, prefix: &str, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(ResBlock {
            norm1: ChannelNorm::new(src, &join(prefix, "norm1"), c_in, false)?,
            conv1: CausalConv::new(src, &join(prefix, "conv1"), c_in, c_out, 3, 3)?,
            norm2: ChannelNorm::new(src, &join(prefix, "norm2"), c_out, false)?,
            conv2: CausalConv::new(src, &join(prefix, "conv2"), c_out, c_out, 3, 3)?,
            shortcut: if c_in != c_out {
                Some(CausalConv::new(src, &join(prefix, "conv_shortcut"), c_in, c_out, 1, 1)?)
            } else {
                None
            },
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&ops::silu(&self.norm1.forward(x)?)?)?;
        let h = self.conv2.forward(&ops::silu(&self.norm2.forward(&h)?)?)?;
        match &self.shortcut {
            Some(s) => ops::add(&h, &s.forward(x)?),
            None => ops::add(&h, x),
        }
    }

    pub(super) fn params(&self, out: &mut Vec<NamedParam>) {
        self.norm1.params(out);
        self.conv1.params(out);
        self.norm2.params(out);
        self.conv2.params(out);
        if let Some(s) = &self.shortcut {
            s.params(out);
        }
    }
}

/// `WanResample` on the first chunk: a 2× spatial down- or upsampling (the temporal
/// `time_conv`, when the mode has one, is loaded but idle for one frame).
pub(super) struct Resample {
    pub(super) up: bool,
    pub(super) conv: Conv2d,
    pub(super) time_conv: Option<CausalConv>,
}

impl Resample {
    /// Downsampling of `c` channels: zero row below and column right, 3×3 stride 2.
    pub(super) fn down(src: &mut dyn ParamSource, prefix: &str, c: usize, temporal: bool) -> Result<Self> {
        let opts = Conv2dOptions::new(2, Padding2d { top: 0, bottom: 1, left: 0, right: 1 });
        Ok(Resample {
            up: false,
            conv: Conv2d::new(src, &join(prefix, "resample.1"), c, c, 3, opts)?,
            time_conv: if temporal {
                Some(CausalConv::new(src, &join(prefix, "time_conv"), c, c, 3, 1)?)
            } else {
                None
            },
        })
    }

    /// Upsampling of `c` channels: nearest 2×, then 3×3 to `c / 2` channels.
    pub(super) fn up(src: &mut dyn ParamSource, prefix: &str, c: usize, temporal: bool) -> Result<Self> {
        Ok(Resample {
            up: true,
            conv: Conv2d::new(
                src,
                &join(prefix, "resample.1"),
                c,
                c / 2,
                3,
                Conv2dOptions::new(1, Padding2d::same(1)),
            )?,
            time_conv: if temporal {
                Some(CausalConv::new(src, &join(prefix, "time_conv"), c, 2 * c, 3, 1)?)
            } else {
                None
            },
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.up {
            self.conv.forward(&ops::upsample_nearest2x(x)?)
        } else {
            self.conv.forward(x)
        }
    }

    pub(super) fn params(&self, out: &mut Vec<NamedParam>) {
        self.conv.params(out);
        if let Some(t) = &self.time_conv {
            t.params(out);
        }
    }
}
