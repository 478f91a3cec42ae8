//! The frozen encoders' outputs per dataset sample — VAE latent, text embedding at its
//! real length, CLIP tokens — kept in memory or on disk so that epochs after the first
//! skip umT5, CLIP and the VAE.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use crate::weights::{self, SaveDType, WeightSet};
use crate::{bail, Device, Result, ResultExt, Tensor};

/// One sample's encoder outputs, on the host in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// Latent `[C, 1, h, w]`.
    pub latent: Vec<f32>,
    /// Text rows `[len, d]` (`len` ≥ 1: the prompt's tokens and `</s>`).
    pub text: Vec<f32>,
    /// Text rows.
    pub text_len: usize,
    /// CLIP tokens `[N, clip_dim]`.
    pub clip: Vec<f32>,
}

/// Memory and/or disk storage of [`Encoded`] samples.
pub struct EncoderCache {
    memory: Option<HashMap<usize, Encoded>>,
    disk: Option<PathBuf>,
    /// Identifies the encoders and the training size, so a disk cache is never reused
    /// across other weights or resolutions.
    tag: u64,
    /// Shapes: latent `[C, 1, h, w]`, text width, CLIP tokens `[N, clip_dim]`.
    latent_shape: [usize; 4],
    text_dim: usize,
    clip_shape: [usize; 2],
    hits: u64,
}

impl EncoderCache {
    /// A cache; `memory` keeps samples for the run, `disk` (a folder) across runs.
    pub fn new(
        memory: bool,
        disk: Option<PathBuf>,
        tag: u64,
        latent_shape: [usize; 4],
        text_dim: usize,
        clip_shape: [usize; 2],
    ) -> Result<EncoderCache> {
        if let Some(d) = &disk {
            fs::create_dir_all(d).with_ctx(|| format!("cannot create the cache folder {}", d.display()))?;
        }
        Ok(EncoderCache { memory: memory.then(HashMap::new), disk, tag, latent_shape, text_dim, clip_shape, hits: 0 })
    }

    /// Samples served from the cache so far.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// The disk file of a sample: its image file (path, size, modification time), prompt
    /// and the cache tag hashed.
    fn file_for(&self, dir: &Path, image: &Path, prompt: &str) -> PathBuf {
        let mut h = DefaultHasher::new();
        self.tag.hash(&mut h);
        image.hash(&mut h);
        if let Ok(m) = fs::metadata(image) {
            m.len().hash(&mut h);
            if let Ok(t) = m.modified() {
                t.hash(&mut h);
            }
        }
        prompt.hash(&mut h);
        dir.join(format!("{:016x}.safetensors", h.finish()))
    }

    /// The sample `index` (image file `image`, `prompt`), computed by `encode` when not
    /// cached.
    pub fn get_or_encode(
        &mut self,
        index: usize,
        image: &Path,
        prompt: &str,
        encode: impl FnOnce() -> Result<Encoded>,
    ) -> Result<Encoded> {
        if let Some(e) = self.memory.as_ref().and_then(|m| m.get(&index)) {
            self.hits += 1;
            return Ok(e.clone());
        }
        let file = self.disk.as_ref().map(|d| self.file_for(d, image, prompt));
        let from_disk = match &file {
            Some(f) if f.is_file() => Some(self.read(f)?),
            _ => None,
        };
        let enc = match from_disk {
            Some(e) => {
                self.hits += 1;
                e
            }
            None => {
                let e = encode()?;
                if let Some(f) = &file {
                    self.write(f, &e)?;
                }
                e
            }
        };
        if let Some(m) = self.memory.as_mut() {
            m.insert(index, enc.clone());
        }
        Ok(enc)
    }

    fn write(&self, file: &Path, e: &Encoded) -> Result<()> {
        let t = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, Device::Cpu);
        let tensors = vec![
            ("latent".to_string(), t(&e.latent, &self.latent_shape)?),
            ("text".to_string(), t(&e.text, &[e.text_len, self.text_dim])?),
            ("clip".to_string(), t(&e.clip, &self.clip_shape)?),
        ];
        weights::save(file, &tensors, SaveDType::F32, None)
    }

    fn read(&self, file: &Path) -> Result<Encoded> {
        let ctx = || format!("encoder cache file {} (delete it to recompute)", file.display());
        let set = WeightSet::open(file).with_ctx(ctx)?;
        let text_shape = set.shape("text").with_ctx(ctx)?.to_vec();
        if set.shape("latent").with_ctx(ctx)? != self.latent_shape
            || set.shape("clip").with_ctx(ctx)? != self.clip_shape
            || text_shape.len() != 2
            || text_shape[1] != self.text_dim
            || text_shape[0] == 0
        {
            bail!("{}: the stored shapes do not match this run", ctx());
        }
        Ok(Encoded {
            latent: set.read_f32("latent").with_ctx(ctx)?,
            text: set.read_f32("text").with_ctx(ctx)?,
            text_len: text_shape[0],
            clip: set.read_f32("clip").with_ctx(ctx)?,
        })
    }
}
