//! The Synthos trainer: its data, encoders (cached) and flow-matching loss, plugged into
//! the shared [`RunLoop`] (steps, accumulation, AdamW with fp32 masters, checkpoints,
//! resume, metrics, validation).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::cache::{Encoded, EncoderCache};
use super::config::{CacheMode, TrainConfig};
use super::loss::{flow_matching_loss_sum_at, FlowMatchingTimes};
use crate::data::{demo as demo_data, DatasetOptions, SynthosDataset};
use crate::fsutil::write_atomic;
use crate::image::resize::resize_cover_crop;
use crate::image::ImageRgb;
use crate::nn::{Module, NamedParam};
use crate::pipeline::demo::{self, DemoQuality};
use crate::pipeline::{GenerateOptions, SynthosPipeline};
use crate::report::image_grid;
use crate::report::MetricsWriter;
use crate::schedule::{TrainSchedule, TRAIN_STEPS};
use crate::{bail, ops, Device, Error, Result, ResultExt, Rng, Tensor};

use super::run_loop::{check_run_folder, RunLoop, StepStats, TrainSummary, TrainTask};

/// Fine-tunes the DiT of a [`SynthosPipeline`].
///
/// ```no_run
/// use synthos_engine::pipeline::SynthosPipeline;
/// use synthos_engine::train::{TrainConfig, Trainer};
/// use synthos_engine::{DType, Device};
/// # fn main() -> synthos_engine::Result<()> {
/// let pipe = SynthosPipeline::demo(Device::Cpu, DType::F32, &[])?;
/// let cfg = TrainConfig { max_steps: Some(100), ..TrainConfig::demo() };
/// let mut trainer = Trainer::new(pipe, cfg)?;
/// let summary = trainer.run()?;
/// println!("loss {:?} → {:?}", summary.first_loss, summary.final_loss);
/// # Ok(()) }
/// ```
pub struct Trainer {
    task: SynthosTask,
    run: RunLoop,
    quality: Option<DemoQuality>,
}

/// The Synthos parts of a run: the pipeline, data, encoder cache and the flow-matching
/// loss; the [`RunLoop`] does the rest.
struct SynthosTask {
    pipe: SynthosPipeline,
    cfg: TrainConfig,
    data: SynthosDataset,
    schedule: TrainSchedule,
    cache: EncoderCache,
    /// Text rows of the empty prompt (what a dropped prompt becomes).
    empty_text: Encoded,
    /// Validation references: (file, CLIP input, grid thumbnail).
    references: Vec<(PathBuf, ImageRgb, ImageRgb)>,
}

/// A generator for one sample slot of one step, independent of every other, so that a
/// resumed run draws exactly what an uninterrupted one would.
fn slot_rng(seed: u64, step: u64, micro: usize, slot: usize) -> Rng {
    let mut h = DefaultHasher::new();
    (seed, step, micro as u64, slot as u64, 0x7EA1_u64).hash(&mut h);
    Rng::new(h.finish())
}

/// Device memory in use: the GPU's (total − free), or the process's resident memory
/// (see [`Device::memory_in_use`]).
pub fn memory_in_use(device: Device) -> Option<u64> {
    device.memory_in_use()
}

impl Trainer {
    /// Prepares a run: opens (or, without `cfg.data`, generates) the dataset, marks the
    /// trainable tensors, builds the optimizer, and with `cfg.resume` restores the run in
    /// `cfg.output`. A fresh run refuses a folder that holds another run's resume state.
    pub fn new(mut pipe: SynthosPipeline, mut cfg: TrainConfig) -> Result<Trainer> {
        cfg.validate()?;
        pipe.check_size(cfg.width, cfg.height).ctx("training resolution")?;
        check_run_folder(&cfg.output, cfg.resume)?;

        let data_dir = match &cfg.data {
            Some(d) => d.clone(),
            None => {
                let dir = cfg.output.join("demo-data");
                ensure_demo_data(&dir, cfg.demo_images, cfg.seed)?;
                if cfg.validation_prompts.is_empty() {
                    cfg.validation_prompts = demo::validation_prompts();
                }
                if cfg.validation_images.is_empty() {
                    cfg.validation_images = demo_references(&dir)?;
                }
                dir
            }
        };
        let opts = DatasetOptions { bad_rows: cfg.bad_rows, ..Default::default() };
        let mut data = SynthosDataset::open(&data_dir, &opts)?;
        if cfg.check_images {
            data.check_all()?;
        }
        if let Some(report) = data.skip_report() {
            eprintln!("{report}");
        }

        pipe.dit.set_checkpointing(cfg.activation_checkpointing);
        if let (true, Some(n)) = (cfg.activation_checkpointing, cfg.checkpoint_blocks) {
            pipe.dit.set_checkpointed_blocks(n);
        }
        pipe.dit.set_checkpoint_keep(cfg.checkpoint_keep.keep());
        let params = pipe.dit.trainable(cfg.trainable);
        if params.is_empty() {
            bail!("the trainable set {:?} selects no parameters", cfg.trainable);
        }
        let dcfg = pipe.dit.config().clone();
        let f = pipe.codec.factor();
        let latent_shape = [dcfg.in_channels, 1, cfg.height / f, cfg.width / f];
        let clip_tokens = match &pipe.clip {
            Some(c) => c.config().tokens(),
            None => {
                bail!("training needs the CLIP image encoder (the reference image is the target itself): pass --clip")
            }
        };
        let clip_shape = [clip_tokens, dcfg.clip_dim];
        let (memory, disk) = match &cfg.cache {
            CacheMode::Off => (false, None),
            CacheMode::Memory => (true, None),
            CacheMode::Disk(d) => (false, Some(d.clone())),
        };
        let tag = encoder_fingerprint(&pipe, cfg.width, cfg.height)?;
        let cache = EncoderCache::new(memory, disk, tag, latent_shape, dcfg.text_dim, clip_shape)?;
        let empty_text = {
            let rows = pipe.encode_prompts(&[""])?;
            let len = pipe.text.tokenizer.encode(&[""])?.lengths[0];
            let text = ops::narrow(&rows, 1, 0, len)?.to_vec()?;
            Encoded { latent: Vec::new(), text, text_len: len, clip: Vec::new() }
        };

        let mut references = Vec::new();
        for p in &cfg.validation_images {
            let img = ImageRgb::open(p).with_ctx(|| format!("validation image {}", p.display()))?;
            let thumb = resize_cover_crop(&img, cfg.width, cfg.height)?;
            references.push((p.clone(), img, thumb));
        }

        let settings = cfg.loop_settings();
        let dataset_len = data.len();
        let schedule = TrainSchedule::new(cfg.shift);
        let task = SynthosTask { pipe, cfg, data, schedule, cache, empty_text, references };
        let mut run = RunLoop::new(settings, params, dataset_len)?;
        run.start(&task)?;
        Ok(Trainer { task, run, quality: None })
    }

    /// Silences the progress bar and notes (tests, library use).
    pub fn set_quiet(&mut self, quiet: bool) {
        self.run.set_quiet(quiet);
    }

    /// Optimizer steps done so far.
    pub fn step_count(&self) -> u64 {
        self.run.step_count()
    }

    /// Steps the run will have done when complete.
    pub fn total_steps(&self) -> u64 {
        self.run.total_steps()
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.run.steps_per_epoch()
    }

    /// The pipeline being trained.
    pub fn pipeline(&self) -> &SynthosPipeline {
        &self.task.pipe
    }

    /// The training data.
    pub fn dataset(&self) -> &SynthosDataset {
        &self.task.data
    }

    /// Encoder outputs served from the cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.task.cache.hits()
    }

    /// Input layouts of the step recorded as CUDA graphs so far (0 unless
    /// `SYNTHOS_CUDA_GRAPHS=1` on a GPU; see [`crate::ops::GraphRunner`]).
    pub fn recorded_step_graphs(&self) -> usize {
        self.run.recorded_step_graphs()
    }

    /// The trainable parameters by name.
    pub fn params(&self) -> &[NamedParam] {
        self.run.params()
    }

    /// The dataset indices of micro-batch `micro` of optimizer step `step` (0-based), or
    /// `None` past the epoch's end (see [`RunLoop::micro_batch`]).
    pub fn micro_batch(&self, step: u64, micro: usize) -> Option<Vec<usize>> {
        self.run.micro_batch(&self.task, step, micro)
    }

    /// Runs one optimizer step (all its micro-batches). A non-finite loss or gradient is
    /// an error and leaves the weights untouched.
    pub fn train_step(&mut self) -> Result<StepStats> {
        self.run.train_step(&mut self.task)
    }

    /// Runs the remaining steps with progress, metrics, checkpoints (`step-N` every
    /// `save_every`, `epoch-N` after each epoch, 0-based as the seed names them, and the
    /// final step), validation grids and the loss plot.
    ///
    /// A demo run (no dataset, the demo's 64×64) with `demo_quality` set ends by measuring its samples
    /// ([`crate::pipeline::demo::quality`], with the validation steps, guidance and
    /// shift): the result is logged to `metrics.jsonl` (a `demo_quality` record),
    /// written to `demo-quality.json`, and kept for [`Trainer::demo_quality`].
    pub fn run(&mut self) -> Result<TrainSummary> {
        let summary = self.run.run(&mut self.task)?;
        let cfg = &self.task.cfg;
        let demo_size = cfg.width == demo::IMAGE_SIZE && cfg.height == demo::IMAGE_SIZE;
        if cfg.data.is_none() && cfg.demo_quality && demo_size && self.task.pipe.is_demo() {
            let q = demo::quality(&self.task.pipe, &self.task.sample_options())?;
            let record = json!({"step": self.run.step_count(), "demo_quality": q.to_json()});
            if cfg.log_metrics {
                let mut m = MetricsWriter::open(cfg.output.join("metrics.jsonl"))?;
                if let Value::Object(obj) = &record {
                    m.write_json(obj)?;
                }
            }
            let text = serde_json::to_string_pretty(&record).map_err(|e| Error::msg(e.to_string()))?;
            write_atomic(cfg.output.join("demo-quality.json"), text.as_bytes())?;
            self.quality = Some(q);
        }
        Ok(summary)
    }

    /// The demo quality measured at the end of [`Trainer::run`] (demo runs only).
    pub fn demo_quality(&self) -> Option<DemoQuality> {
        self.quality
    }

    /// Writes `<name>.safetensors` (the trainable tensors in the Synthos naming, bf16) and
    /// then the resume state, each atomically; returns the checkpoint's path.
    pub fn save_checkpoint(&mut self, name: &str) -> Result<PathBuf> {
        self.run.save_checkpoint(&self.task, name)
    }

    /// Samples the validation prompts (text only) and references (image only, and with
    /// the matching prompt) with the current weights; writes `samples/step-N-text.png`
    /// and `samples/step-N-reference.png`. Returns the grids written.
    pub fn validate(&self) -> Result<Vec<PathBuf>> {
        self.task.validate(self.run.step_count())
    }
}

impl SynthosTask {
    /// The sampler settings of validation: the run's size, steps, guidance, negative
    /// prompt, shift and seed.
    fn sample_options(&self) -> GenerateOptions {
        GenerateOptions {
            height: self.cfg.height,
            width: self.cfg.width,
            steps: self.cfg.validation_steps,
            cfg_scale: self.cfg.validation_cfg,
            seed: self.cfg.seed,
            negative_prompt: self.cfg.negative_prompt.clone(),
            shift: self.cfg.shift,
            ..Default::default()
        }
    }

    /// The encoder outputs of dataset sample `index` (cached per the configuration).
    fn encoded(&mut self, index: usize) -> Result<Encoded> {
        let entry = self.data.entries()[index].clone();
        let (w, h) = (self.cfg.width, self.cfg.height);
        let pipe = &self.pipe;
        let data = &self.data;
        self.cache.get_or_encode(index, &entry.path, &entry.prompt, || {
            let sample = data.get(index, w, h)?;
            let img = Tensor::from_vec(sample.image.clone(), &[1, 3, h, w], Device::Cpu)?;
            let latent = pipe.encode_images(&img)?.to_vec()?;
            let len = pipe.text.tokenizer.encode(&[&sample.prompt])?.lengths[0];
            let rows = pipe.encode_prompts(&[&sample.prompt])?;
            let text = ops::narrow(&rows, 1, 0, len)?.to_vec()?;
            let rgb = ImageRgb::from_chw(&sample.image, h, w)?;
            let clip = pipe.encode_reference(&rgb, w, h)?.to_vec()?;
            Ok(Encoded { latent, text, text_len: len, clip })
        })
    }
}

impl TrainTask for SynthosTask {
    fn dataset_len(&self) -> usize {
        self.data.len()
    }

    fn epoch_order(&self, epoch: u64, seed: u64) -> Vec<usize> {
        self.data.epoch_order(epoch, seed)
    }

    fn micro_loss(&mut self, step: u64, micro: usize, indices: &[usize], n_step: usize) -> Result<Tensor> {
        let inputs = self.micro_inputs(step, micro, indices, n_step)?;
        Ok(self.loss_from_inputs(&inputs)?.0)
    }

    /// Per group (with the image, then without; an empty group is left out): x0, noise,
    /// σ, 1 − σ, the time frequencies, w(t), the text rows, and the CLIP tokens for the
    /// group with the image; then 1/`n_step` as a one-element tensor.
    fn micro_inputs(&mut self, step: u64, micro: usize, indices: &[usize], n_step: usize) -> Result<Vec<Tensor>> {
        let dev = self.pipe.device();
        let dcfg = self.pipe.dit.config().clone();
        let f = self.pipe.codec.factor();
        let (c, h, w) = (dcfg.in_channels, self.cfg.height / f, self.cfg.width / f);
        let (l, d) = (dcfg.text_len, dcfg.text_dim);
        // Per group (with / without the image): x0, noise, timestep indices, text, clip.
        #[derive(Default)]
        struct Group {
            x0: Vec<f32>,
            noise: Vec<f32>,
            idx: Vec<usize>,
            text: Vec<f32>,
            clip: Vec<f32>,
        }
        let mut groups: [Group; 2] = Default::default();
        for (slot, &index) in indices.iter().enumerate() {
            let enc = self.encoded(index)?;
            let mut rng = slot_rng(self.cfg.seed, step, micro, slot);
            let drop_text = rng.uniform() < self.cfg.text_dropout;
            let drop_image = rng.uniform() < self.cfg.image_dropout;
            let t_index = rng.below(TRAIN_STEPS);
            let noise = rng.normal_vec(c * h * w, 1.0);
            let g = &mut groups[usize::from(drop_image)];
            g.x0.extend_from_slice(&enc.latent);
            g.noise.extend(noise);
            g.idx.push(t_index);
            let (rows, len) =
                if drop_text { (&self.empty_text.text, self.empty_text.text_len) } else { (&enc.text, enc.text_len) };
            let len = len.min(l);
            g.text.extend_from_slice(&rows[..len * d]);
            g.text.extend(std::iter::repeat_n(0.0, (l - len) * d));
            if !drop_image {
                g.clip.extend_from_slice(&enc.clip);
            }
        }
        let mut inputs = Vec::new();
        for (dropped, g) in groups.into_iter().enumerate() {
            let b = g.idx.len();
            if b == 0 {
                continue;
            }
            inputs.push(Tensor::from_vec(g.x0, &[b, c, 1, h, w], dev)?);
            inputs.push(Tensor::from_vec(g.noise, &[b, c, 1, h, w], dev)?);
            let t = FlowMatchingTimes::new(&self.pipe.dit, &self.schedule, &g.idx, dev)?;
            inputs.extend([t.sigma, t.keep, t.frequencies, t.weight]);
            inputs.push(Tensor::from_vec(g.text, &[b, l, d], dev)?);
            if dropped == 0 {
                let n = g.clip.len() / (b * dcfg.clip_dim);
                inputs.push(Tensor::from_vec(g.clip, &[b, n, dcfg.clip_dim], dev)?);
            }
        }
        if inputs.is_empty() {
            bail!("empty micro-batch");
        }
        inputs.push(Tensor::from_vec(vec![1.0 / n_step as f32], &[1], dev)?);
        Ok(inputs)
    }

    fn loss_from_inputs(&self, inputs: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        // Groups of 8 tensors (with the image) or 7 (without), in that order, then 1/n.
        let (groups, inv_n) = inputs.split_at(inputs.len().saturating_sub(1));
        let parts: Vec<(&[Tensor], bool)> = match groups.len() {
            15 => vec![(&groups[..8], true), (&groups[8..], false)],
            8 => vec![(groups, true)],
            7 => vec![(groups, false)],
            n => bail!("the Synthos loss takes 7, 8 or 15 group inputs, got {n}"),
        };
        let mut total: Option<Tensor> = None;
        for (g, with_image) in parts {
            let t = FlowMatchingTimes {
                sigma: g[2].clone(),
                keep: g[3].clone(),
                frequencies: g[4].clone(),
                weight: g[5].clone(),
            };
            let clip = if with_image { Some(&g[7]) } else { None };
            let s = flow_matching_loss_sum_at(&self.pipe.dit, &g[0], &g[1], &t, &g[6], clip)?;
            total = Some(match total {
                Some(t) => ops::add(&t, &s)?,
                None => s,
            });
        }
        let total = total.ok_or_else(|| Error::msg("empty micro-batch"))?;
        Ok((ops::mul(&total, &ops::reshape(&inv_n[0], &[])?)?, Vec::new()))
    }

    fn save_weights(&self, path: &Path) -> Result<()> {
        self.pipe.dit.save(path, self.cfg.trainable)
    }

    fn validate(&self, step: u64) -> Result<Vec<PathBuf>> {
        let dir = self.cfg.output.join("samples");
        std::fs::create_dir_all(&dir).with_ctx(|| format!("cannot create {}", dir.display()))?;
        let opts = self.sample_options();
        let mut written = Vec::new();
        let prompts: Vec<&str> = self.cfg.validation_prompts.iter().map(String::as_str).collect();
        if !prompts.is_empty() {
            let images = self.pipe.generate_batch(&prompts, &opts, None, &mut |_, _| {})?;
            let labels: Vec<String> = prompts.iter().map(|p| p.to_string()).collect();
            let path = dir.join(format!("step-{:06}-text.png", step));
            image_grid(&images, images.len().min(4), Some(&labels), &path)?;
            written.push(path);
        }
        if !self.references.is_empty() {
            // Every reference's image-only sample in one batch, then every reference with
            // its prompt in another (each image as if generated alone, from the run's seed).
            let n = self.references.len();
            let imgs: Vec<&ImageRgb> = self.references.iter().map(|(_, img, _)| img).collect();
            let seeds = vec![opts.seed; n];
            let alone = self.pipe.generate_with_references(&vec![""; n], &seeds, &opts, &imgs, &mut |_, _| {})?;
            let paired: Vec<&str> = (0..n).filter_map(|i| prompts.get(i % prompts.len().max(1)).copied()).collect();
            let both = if paired.is_empty() {
                Vec::new()
            } else {
                self.pipe.generate_with_references(&paired, &seeds, &opts, &imgs, &mut |_, _| {})?
            };
            let mut cells = Vec::new();
            let mut labels = Vec::new();
            for (i, (file, _, thumb)) in self.references.iter().enumerate() {
                cells.push(thumb.clone());
                labels.push(format!("reference {}", file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
                cells.push(alone[i].clone());
                labels.push("image only".to_string());
                if let (Some(p), Some(img)) = (paired.get(i), both.get(i)) {
                    cells.push(img.clone());
                    labels.push(format!("+ {p}"));
                }
            }
            let cols = if prompts.is_empty() { 2 } else { 3 };
            let path = dir.join(format!("step-{:06}-reference.png", step));
            image_grid(&cells, cols, Some(&labels), &path)?;
            written.push(path);
        }
        Ok(written)
    }

    fn resume_settings(&self) -> Value {
        json!({
            "trainable": format!("{:?}", self.cfg.trainable),
            "width": self.cfg.width,
            "height": self.cfg.height,
        })
    }

    fn device(&self) -> Device {
        self.pipe.device()
    }
}

/// A hash of what makes encoder outputs valid: the pipeline's configurations, every
/// small encoder tensor's values, and the training size.
fn encoder_fingerprint(pipe: &SynthosPipeline, width: usize, height: usize) -> Result<u64> {
    let mut h = DefaultHasher::new();
    (width, height, pipe.is_demo()).hash(&mut h);
    format!("{:?}", pipe.text.model.config()).hash(&mut h);
    if let Some(c) = &pipe.clip {
        format!("{:?}", c.config()).hash(&mut h);
    }
    let mut params = pipe.text.model.named_params();
    if let Some(c) = &pipe.clip {
        params.extend(c.named_params());
    }
    if let crate::pipeline::Codec::Vae { vae, .. } = &pipe.codec {
        params.extend(vae.named_params());
    }
    for (name, t) in params {
        name.hash(&mut h);
        t.shape().hash(&mut h);
        if t.numel() <= 4096 {
            for v in t.to_vec()? {
                v.to_bits().hash(&mut h);
            }
        }
    }
    Ok(h.finish())
}

/// Generates the demo set in `dir` unless it already holds `n` images for this seed.
fn ensure_demo_data(dir: &Path, n: usize, seed: u64) -> Result<()> {
    let stamp = dir.join("demo.json");
    let want = json!({"images": n, "size": demo::IMAGE_SIZE, "seed": seed}).to_string();
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    demo_data::generate(dir, n, demo::IMAGE_SIZE, seed)?;
    write_atomic(&stamp, want.as_bytes())
}

/// Renders the demo's validation references (attribute sets also drawn in training, so
/// the grid shows whether the model follows an image it knows) into `dir/validation`.
fn demo_references(dir: &Path) -> Result<Vec<PathBuf>> {
    use crate::data::demo::{Colour, DemoAttrs, Shape, ShapeSize, Texture};
    let out = dir.join("validation");
    std::fs::create_dir_all(&out).with_ctx(|| format!("cannot create {}", out.display()))?;
    let picks = [
        DemoAttrs {
            shape: Shape::Triangle,
            colour: Colour::Yellow,
            background: Colour::Blue,
            size: ShapeSize::Large,
            texture: Texture::Plain,
        },
        DemoAttrs {
            shape: Shape::Square,
            colour: Colour::Red,
            background: Colour::White,
            size: ShapeSize::Large,
            texture: Texture::Stripes,
        },
        DemoAttrs {
            shape: Shape::Circle,
            colour: Colour::Purple,
            background: Colour::Green,
            size: ShapeSize::Small,
            texture: Texture::Plain,
        },
    ];
    let mut paths = Vec::new();
    for (i, a) in picks.iter().enumerate() {
        let p = out.join(format!("reference-{i}.png"));
        demo_data::render(a, demo::IMAGE_SIZE)?.save_png(&p)?;
        paths.push(p);
    }
    Ok(paths)
}
