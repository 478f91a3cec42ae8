//! The Wan VAE's configuration and its latent normalisation constants.

use crate::{bail, Error, Result};

/// F.normalize's lower bound on the norm in `RMS_norm`.
pub(super) const NORM_EPS: f32 = 1e-12;

/// The per-channel latent means of the Wan2.1 VAE (z = 16).
pub const WAN21_LATENTS_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922,
    -0.9497, 0.2503, -0.2921,
];

/// The per-channel latent standard deviations of the Wan2.1 VAE (z = 16).
pub const WAN21_LATENTS_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253,
    2.8251, 1.9160,
];

/// The architecture of a Wan VAE (diffusers' `AutoencoderKLWan` config, `is_residual`
/// false, no attention outside the middle blocks).
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Channels of the first stage (`base_dim`).
    pub base_dim: usize,
    /// Latent channels (`z_dim`).
    pub z_dim: usize,
    /// Channel multiplier of each stage; one 2× spatial downsampling between stages.
    pub dim_mult: Vec<usize>,
    /// Residual blocks per encoder stage (decoder stages have one more).
    pub num_res_blocks: usize,
    /// Per downsampling step, whether it is temporal too (`temperal_downsample`, as the
    /// references spell it); it selects `downsample3d`/`upsample3d` and with them the
    /// presence of `time_conv` weights. The decoder uses it reversed.
    pub temperal_downsample: Vec<bool>,
    /// Per-channel latent means (`latents_mean`).
    pub latents_mean: Vec<f32>,
    /// Per-channel latent standard deviations (`latents_std`).
    pub latents_std: Vec<f32>,
}

impl VaeConfig {
    /// The published Wan2.1 VAE: base 96, z 16, multipliers [1, 2, 4, 4], 2 residual
    /// blocks, temporal downsampling [false, true, true].
    pub fn wan21() -> Self {
        VaeConfig {
            base_dim: 96,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            temperal_downsample: vec![false, true, true],
            latents_mean: WAN21_LATENTS_MEAN.to_vec(),
            latents_std: WAN21_LATENTS_STD.to_vec(),
        }
    }

    /// The real structure with 6 base channels (≈0.5 M parameters), for tests; the
    /// configuration of `tests/fixtures/vae`.
    pub fn tiny() -> Self {
        VaeConfig { base_dim: 6, ..Self::wan21() }
    }

    /// Reads a diffusers `AutoencoderKLWan` `config.json`: `base_dim`, `z_dim`, `dim_mult`,
    /// `num_res_blocks`, `temperal_downsample`, `latents_mean`, `latents_std`; absent keys
    /// keep the Wan2.1 values.
    pub fn from_json_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        crate::models::read_json_config(path.as_ref(), "Wan VAE config", Self::from_json)
    }

    /// [`VaeConfig::from_json_file`] on parsed JSON.
    pub fn from_json(json: &serde_json::Value) -> Result<Self> {
        use serde_json::Value;
        let Some(obj) = json.as_object() else {
            bail!("expected a JSON object");
        };
        let mut cfg = Self::wan21();
        let uint = |k: &str| -> Result<Option<usize>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => crate::models::json_usize(obj, k).map(Some),
            }
        };
        let list = |k: &str| -> Result<Option<&Vec<Value>>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(a)) => Ok(Some(a)),
                Some(_) => bail!("\"{k}\" must be a list"),
            }
        };
        if let Some(v) = uint("base_dim")? {
            cfg.base_dim = v;
        }
        if let Some(v) = uint("z_dim")? {
            cfg.z_dim = v;
        }
        if let Some(v) = uint("num_res_blocks")? {
            cfg.num_res_blocks = v;
        }
        if let Some(a) = list("dim_mult")? {
            cfg.dim_mult = a.iter().map(|v| crate::models::config_size(v, "dim_mult")).collect::<Result<_>>()?;
        }
        if let Some(a) = list("temperal_downsample")? {
            cfg.temperal_downsample = a
                .iter()
                .map(Value::as_bool)
                .collect::<Option<_>>()
                .ok_or_else(|| Error::msg("\"temperal_downsample\" must hold booleans"))?;
        }
        for (k, dst) in [("latents_mean", &mut cfg.latents_mean), ("latents_std", &mut cfg.latents_std)] {
            if let Some(a) = list(k)? {
                *dst = a
                    .iter()
                    .map(|v| v.as_f64().map(|x| x as f32))
                    .collect::<Option<_>>()
                    .ok_or_else(|| Error::msg(format!("\"{k}\" must hold numbers")))?;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The spatial compression factor, 2^(stages − 1) (8 for Wan2.1).
    pub fn spatial_factor(&self) -> usize {
        1 << self.dim_mult.len().saturating_sub(1)
    }

    /// Checks that the fields fit together.
    pub fn validate(&self) -> Result<()> {
        let stages = self.dim_mult.len();
        if self.base_dim == 0 || self.z_dim == 0 || stages == 0 || self.dim_mult.contains(&0) {
            bail!("VaeConfig: base_dim, z_dim and every dim_mult must be positive, got {self:?}");
        }
        if self.temperal_downsample.len() != stages - 1 {
            bail!(
                "VaeConfig: temperal_downsample has {} entries, expected one per downsampling step ({})",
                self.temperal_downsample.len(),
                stages - 1
            );
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            bail!(
                "VaeConfig: latents_mean ({}) and latents_std ({}) need z_dim = {} entries",
                self.latents_mean.len(),
                self.latents_std.len(),
                self.z_dim
            );
        }
        if self.latents_std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail!("VaeConfig: latents_std must be positive, got {:?}", self.latents_std);
        }
        // The decoder halves the channels at each upsampling and feeds them to the next
        // stage, whose width must then be even.
        if (1..stages).any(|i| !(self.base_dim * self.dim_mult[stages - i]).is_multiple_of(2)) {
            bail!("VaeConfig: decoder stages before an upsampling need an even channel count, got {self:?}");
        }
        Ok(())
    }
}
