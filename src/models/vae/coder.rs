//! The encoder and decoder stacks (one frame).

use super::attention::*;
use super::config::*;
use super::layers::*;
use crate::nn::{NamedParam, ParamSource};
use crate::ops;
use crate::{Result, Tensor};

/// One entry of the encoder's `down_blocks` list.
pub(super) enum DownLayer {
    Res(ResBlock),
    Down(Resample),
}

/// `WanEncoder3d` (single frame).
pub(super) struct Encoder {
    pub(super) conv_in: CausalConv,
    pub(super) layers: Vec<DownLayer>,
    pub(super) mid: MidBlock,
    pub(super) norm_out: ChannelNorm,
    pub(super) conv_out: CausalConv,
}

impl Encoder {
    pub(super) fn new(src: &mut dyn ParamSource, cfg: &VaeConfig) -> Result<Self> {
        let dims: Vec<usize> =
            std::iter::once(1).chain(cfg.dim_mult.iter().copied()).map(|m| cfg.base_dim * m).collect();
        let conv_in = CausalConv::new(src, "encoder.conv_in", 3, dims[0], 3, 3)?;
        let mut layers = Vec::new();
        let stages = cfg.dim_mult.len();
        for i in 0..stages {
            let (mut c_in, c_out) = (dims[i], dims[i + 1]);
            for _ in 0..cfg.num_res_blocks {
                let prefix = format!("encoder.down_blocks.{}", layers.len());
                layers.push(DownLayer::Res(ResBlock::new(src, &prefix, c_in, c_out)?));
                c_in = c_out;
            }
            if i + 1 != stages {
                let prefix = format!("encoder.down_blocks.{}", layers.len());
                layers.push(DownLayer::Down(Resample::down(src, &prefix, c_out, cfg.temperal_downsample[i])?));
            }
        }
        let top = dims[stages];
        Ok(Encoder {
            conv_in,
            layers,
            mid: MidBlock::new(src, "encoder.mid_block", top)?,
            norm_out: ChannelNorm::new(src, "encoder.norm_out", top, false)?,
            conv_out: CausalConv::new(src, "encoder.conv_out", top, 2 * cfg.z_dim, 3, 3)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for layer in &self.layers {
            h = match layer {
                DownLayer::Res(r) => r.forward(&h)?,
                DownLayer::Down(d) => d.forward(&h)?,
            };
        }
        h = self.mid.forward(&h)?;
        self.conv_out.forward(&ops::silu(&self.norm_out.forward(&h)?)?)
    }

    pub(super) fn params(&self, out: &mut Vec<NamedParam>) {
        self.conv_in.params(out);
        for layer in &self.layers {
            match layer {
                DownLayer::Res(r) => r.params(out),
                DownLayer::Down(d) => d.params(out),
            }
        }
        self.mid.params(out);
        self.norm_out.params(out);
        self.conv_out.params(out);
    }
}

/// `WanUpBlock`: residual blocks, then an optional upsampling.
pub(super) struct UpBlock {
    pub(super) resnets: Vec<ResBlock>,
    pub(super) upsampler: Option<Resample>,
}

/// `WanDecoder3d` (single frame).
pub(super) struct Decoder {
    pub(super) conv_in: CausalConv,
    pub(super) mid: MidBlock,
    pub(super) up_blocks: Vec<UpBlock>,
    pub(super) norm_out: ChannelNorm,
    pub(super) conv_out: CausalConv,
}

impl Decoder {
    pub(super) fn new(src: &mut dyn ParamSource, cfg: &VaeConfig) -> Result<Self> {
        let stages = cfg.dim_mult.len();
        let dims: Vec<usize> = std::iter::once(cfg.dim_mult[stages - 1])
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|m| cfg.base_dim * m)
            .collect();
        let temporal_up: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let conv_in = CausalConv::new(src, "decoder.conv_in", cfg.z_dim, dims[0], 3, 3)?;
        let mid = MidBlock::new(src, "decoder.mid_block", dims[0])?;
        let mut up_blocks = Vec::with_capacity(stages);
        for i in 0..stages {
            // Every stage after the first receives the halved channels of an upsampling.
            let mut c_in = if i > 0 { dims[i] / 2 } else { dims[i] };
            let c_out = dims[i + 1];
            let mut resnets = Vec::with_capacity(cfg.num_res_blocks + 1);
            for j in 0..=cfg.num_res_blocks {
                resnets.push(ResBlock::new(src, &format!("decoder.up_blocks.{i}.resnets.{j}"), c_in, c_out)?);
                c_in = c_out;
            }
            let upsampler = if i + 1 != stages {
                Some(Resample::up(src, &format!("decoder.up_blocks.{i}.upsamplers.0"), c_out, temporal_up[i])?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let last = dims[stages];
        Ok(Decoder {
            conv_in,
            mid,
            up_blocks,
            norm_out: ChannelNorm::new(src, "decoder.norm_out", last, false)?,
            conv_out: CausalConv::new(src, "decoder.conv_out", last, 3, 3, 3)?,
        })
    }

    pub(super) fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                h = r.forward(&h)?;
            }
            if let Some(u) = &block.upsampler {
                h = u.forward(&h)?;
            }
        }
        self.conv_out.forward(&ops::silu(&self.norm_out.forward(&h)?)?)
    }

    pub(super) fn params(&self, out: &mut Vec<NamedParam>) {
        self.conv_in.params(out);
        self.mid.params(out);
        for block in &self.up_blocks {
            for r in &block.resnets {
                r.params(out);
            }
            if let Some(u) = &block.upsampler {
                u.params(out);
            }
        }
        self.norm_out.params(out);
        self.conv_out.params(out);
    }
}
