//! The guided flow-matching Euler sampler (docs/MODELS.md, *Sampling*).

use super::SynthosPipeline;
use crate::image::ImageRgb;
use crate::schedule::{next_sigma, sample_sigmas};
use crate::{autograd, bail, ops, DType, Result, Rng, Tensor};

/// The reference images of a generation.
#[derive(Clone, Copy)]
enum References<'a> {
    None,
    /// One image guiding every prompt.
    Shared(&'a ImageRgb),
    /// One image per prompt.
    Each(&'a [&'a ImageRgb]),
}

/// The negative prompt of the Synthos sampler.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "ugly, deformed, blurry, low quality";

/// The most Euler steps a generation takes (the scheduler's training table has 1000).
pub const MAX_SAMPLE_STEPS: usize = 10_000;

/// Everything that determines a generated image besides the weights and the reference.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// What to draw ("" for none: the reference alone guides).
    pub prompt: String,
    /// The negative prompt of the unconditional branch.
    pub negative_prompt: String,
    /// Output height in pixels (multiple of 16 for the VAE, 8 for the demo).
    pub height: usize,
    /// Output width in pixels.
    pub width: usize,
    /// Euler steps.
    pub steps: usize,
    /// Guidance scale s: `v = v(neg) + s·(v(pos) − v(neg))`; 1 runs the positive branch only.
    pub cfg_scale: f32,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Sigma shift of the schedule (5).
    pub shift: f64,
}

impl Default for GenerateOptions {
    /// The Synthos defaults: 480×480, 25 steps, cfg 5, seed 42, shift 5.
    fn default() -> Self {
        GenerateOptions {
            prompt: String::new(),
            negative_prompt: DEFAULT_NEGATIVE_PROMPT.to_string(),
            height: 480,
            width: 480,
            steps: 25,
            cfg_scale: 5.0,
            seed: 42,
            shift: crate::schedule::SHIFT,
        }
    }
}

/// The initial noise of one image: N(0, 1) values drawn on the host from `seed`, so that a
/// seed gives the same start on every device.
pub fn initial_noise(seed: u64, channels: usize, h: usize, w: usize) -> Vec<f32> {
    Rng::new(seed).normal_vec(channels * h * w, 1.0)
}

impl SynthosPipeline {
    /// One image for `opts`, guided by `reference` when given (its CLIP tokens enter both
    /// guidance branches).
    pub fn generate(&self, opts: &GenerateOptions, reference: Option<&ImageRgb>) -> Result<ImageRgb> {
        let mut out = self.generate_batch(&[opts.prompt.as_str()], opts, reference, &mut |_, _| {})?;
        out.pop().ok_or_else(|| crate::Error::msg("generate: no image produced"))
    }

    /// One image per prompt (image `i` starts from the noise of seed `opts.seed + i`), all
    /// denoised together: both guidance branches of every prompt run in one DiT forward
    /// per step. `opts.prompt` is ignored. `progress(step, steps)` is called after each
    /// step. Deterministic for a seed on a given device.
    pub fn generate_batch(
        &self,
        prompts: &[&str],
        opts: &GenerateOptions,
        reference: Option<&ImageRgb>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<ImageRgb>> {
        let seeds: Vec<u64> = (0..prompts.len()).map(|i| opts.seed.wrapping_add(i as u64)).collect();
        self.generate_seeded(prompts, &seeds, opts, reference, progress)
    }

    /// One image per prompt, image `i` starting from the noise of `seeds[i]`, all denoised
    /// together as in [`SynthosPipeline::generate_batch`] (`opts.prompt` and `opts.seed`
    /// are ignored). An image depends on its prompt and seed alone, not on the batch it
    /// shares (up to the last bits of float arithmetic on a GPU), so a set generated in
    /// batches and resumed part-way matches one generated in a single run.
    pub fn generate_seeded(
        &self,
        prompts: &[&str],
        seeds: &[u64],
        opts: &GenerateOptions,
        reference: Option<&ImageRgb>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<ImageRgb>> {
        self.check_options(prompts, seeds, opts)?;
        let references = match reference {
            Some(img) => References::Shared(img),
            None => References::None,
        };
        autograd::no_grad(|| self.sample(prompts, seeds, opts, references, progress))
    }

    /// [`SynthosPipeline::generate_seeded`] with a reference image of its own for each
    /// prompt (`references[i]` guides image `i`), all denoised together: the same images
    /// as one call per reference, in one batch.
    pub fn generate_with_references(
        &self,
        prompts: &[&str],
        seeds: &[u64],
        opts: &GenerateOptions,
        references: &[&ImageRgb],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<ImageRgb>> {
        self.check_options(prompts, seeds, opts)?;
        if references.len() != prompts.len() {
            bail!("generate: {} reference images for {} prompts", references.len(), prompts.len());
        }
        autograd::no_grad(|| self.sample(prompts, seeds, opts, References::Each(references), progress))
    }

    /// The arguments every generation checks before it starts.
    fn check_options(&self, prompts: &[&str], seeds: &[u64], opts: &GenerateOptions) -> Result<()> {
        if prompts.is_empty() {
            bail!("generate: no prompts given");
        }
        if seeds.len() != prompts.len() {
            bail!("generate: {} seeds for {} prompts", seeds.len(), prompts.len());
        }
        if !(1..=MAX_SAMPLE_STEPS).contains(&opts.steps) {
            bail!("generate: steps must be between 1 and {MAX_SAMPLE_STEPS}, got {}", opts.steps);
        }
        if !opts.cfg_scale.is_finite() {
            bail!("generate: cfg scale {} is not a finite number", opts.cfg_scale);
        }
        if !(opts.shift.is_finite() && opts.shift > 0.0) {
            bail!("generate: the sigma shift must be a positive number, got {}", opts.shift);
        }
        self.check_size(opts.width, opts.height)
    }

    fn sample(
        &self,
        prompts: &[&str],
        seeds: &[u64],
        opts: &GenerateOptions,
        references: References,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<ImageRgb>> {
        let b = prompts.len();
        let dev = self.device();
        let guided = opts.cfg_scale != 1.0;
        let clip = match references {
            References::Shared(img) => {
                let tokens = self.encode_reference(img, opts.width, opts.height)?;
                let s = tokens.shape().to_vec();
                Some(ops::broadcast_to(&tokens, &[b, s[1], s[2]])?)
            }
            References::Each(imgs) => {
                let tokens = imgs
                    .iter()
                    .map(|img| self.encode_reference(img, opts.width, opts.height))
                    .collect::<Result<Vec<_>>>()?;
                Some(ops::concat(&tokens.iter().collect::<Vec<_>>(), 0)?)
            }
            References::None => None,
        };
        let pos = self.pad_text(&self.encode_prompts(prompts)?)?;
        let mut context = self.dit.context(&pos, clip.as_ref())?;
        if guided {
            let negs = vec![opts.negative_prompt.as_str(); b];
            let neg = self.pad_text(&self.encode_prompts(&negs)?)?;
            let neg_ctx = self.dit.context(&neg, clip.as_ref())?;
            context = ops::concat(&[&context, &neg_ctx], 0)?;
        }

        let c = self.dit.config().in_channels;
        let f = self.codec.factor();
        let (h, w) = (opts.height / f, opts.width / f);
        let mut noise = Vec::with_capacity(b * c * h * w);
        for &seed in seeds {
            noise.extend(initial_noise(seed, c, h, w));
        }
        let mut x = Tensor::from_vec(noise, &[b, c, 1, h, w], dev)?;
        let sigmas = sample_sigmas(opts.steps, opts.shift);
        let branches = if guided { 2 * b } else { b };
        // The cross-attention keys and values of the context, the same at every step.
        let kv = self.dit.cross_kv(&context)?;
        // The guided velocity of latents x at time frequencies t: the same launches at
        // every step, so on a GPU it can be replayed as one CUDA graph (SYNTHOS_CUDA_GRAPHS).
        let velocity = |xt: &[Tensor]| -> Result<Vec<Tensor>> {
            let input = if guided { ops::concat(&[&xt[0], &xt[0]], 0)? } else { xt[0].clone() };
            let v = ops::cast(&self.dit.forward_with_cross_kv_at(&input, &xt[1], &kv)?, DType::F32)?;
            if !guided {
                return Ok(vec![v]);
            }
            let halves = ops::split(&v, 0, &[b, b])?;
            let diff = ops::sub(&halves[0], &halves[1])?;
            Ok(vec![ops::add(&halves[1], &ops::scale(&diff, opts.cfg_scale)?)?])
        };
        let mut graphs = ops::GraphRunner::new("the sampler's guided velocity", 1);
        for (i, &sigma) in sigmas.iter().enumerate() {
            let t = self.dit.time_frequencies(&vec![crate::schedule::timestep(sigma) as f32; branches])?;
            // (The runner's own buffer when replayed: used before the next step's call.)
            let v = graphs.call(&[&x, &t], velocity)?.swap_remove(0);
            let dt = (next_sigma(&sigmas, i) - sigma) as f32;
            x = ops::add(&x, &ops::scale(&v, dt)?)?;
            progress(i + 1, opts.steps);
        }
        let images = ops::cast(&self.codec.decode(&x)?, DType::F32)?;
        let images = images.to_device(crate::Device::Cpu, DType::F32)?;
        let per = 3 * opts.height * opts.width;
        let all = images.to_vec()?;
        all.chunks(per).map(|chw| ImageRgb::from_chw(chw, opts.height, opts.width)).collect()
    }
}
