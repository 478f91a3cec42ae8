//! The image half of SynthCLIP's synthetic-data pipeline: one image per caption from the
//! engine's own text-to-image pipeline, written as a set that `clip-train` reads.
//!
//! **Layout** of an output folder:
//! - `images/SSSS/NNNNNNN.png`: the image of caption `N` (0-based, in the order of the
//!   caption list), in shard folders of [`SHARD_SIZE`] files (`SSSS = N / 1000`), so that
//!   no folder grows past a thousand entries at millions of captions;
//! - `train.tsv`: SynthCLIP's pair table (`image_path<TAB>caption`, paths relative to the
//!   folder), one row per image present, in caption order;
//! - `synth-images.json`: the caption list's fingerprint and the generation settings.
//!
//! **Resume.** Image `N` starts from the noise of seed `seed + N`, so it depends on its
//! caption and that seed alone (not on the batch it shared or on the run that made it),
//! and every image file is written atomically (a temporary file renamed into place). A
//! rerun on the same folder therefore skips the images present, makes the others, and
//! ends with the set an uninterrupted run makes: a kill loses at most the batch in
//! flight, never leaves a half-written image, and no image is made twice. A rerun with a
//! different caption list or different settings is refused, naming what differs, instead
//! of mixing two sets in one folder.
//!
//! **Sizes.** Images are generated at `width × height` and, as SynthCLIP did (generated
//! 512², stored 256²), stored as a smaller copy whose short side is `store_size` (Pillow's
//! bicubic, antialiased).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::data::csv::format_delimited;
use crate::fsutil::write_atomic;
use crate::image::resize::{resize_bicubic, short_side_size};
use crate::pipeline::{GenerateOptions, SynthosPipeline};
use crate::report::Progress;
use crate::{bail, ensure, Error, Result, ResultExt};

/// Image files per shard folder.
pub const SHARD_SIZE: usize = 1000;
/// The settings file of an image set.
pub const MANIFEST: &str = "synth-images.json";
/// The pair table of an image set.
pub const TRAIN_TSV: &str = "train.tsv";

/// How a set of images is generated.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSetOptions {
    /// Generated width in pixels.
    pub width: usize,
    /// Generated height in pixels.
    pub height: usize,
    /// Euler steps.
    pub steps: usize,
    /// Guidance scale (1: no guidance).
    pub cfg_scale: f32,
    /// Sigma shift of the sampling schedule.
    pub shift: f64,
    /// Negative prompt of the guidance's unconditional branch.
    pub negative_prompt: String,
    /// Image `N` starts from the noise of `seed + N`.
    pub seed: u64,
    /// Short side of the stored copy; `None` stores images as generated.
    pub store_size: Option<usize>,
    /// Captions denoised together in one batch.
    pub batch_size: usize,
    /// Make at most this many images in this call (the rest stay for a rerun).
    pub max_new: Option<usize>,
    /// Draw a progress bar (with ETA) on stderr.
    pub progress: bool,
}

impl ImageSetOptions {
    /// SynthCLIP's settings on the Wan2.1 pipeline: 512×512, 25 steps, guidance 5, shift
    /// 5, the Synthos negative prompt, stored at 256, batch 4, seed 0.
    pub fn wan() -> ImageSetOptions {
        let g = GenerateOptions::default();
        ImageSetOptions {
            width: 512,
            height: 512,
            steps: g.steps,
            cfg_scale: g.cfg_scale,
            shift: g.shift,
            negative_prompt: g.negative_prompt,
            seed: 0,
            store_size: Some(256),
            batch_size: 4,
            max_new: None,
            progress: false,
        }
    }

    /// The built-in demo generator's settings: 64×64, the demo's validation sampling (20
    /// steps, guidance 4, shift 1, empty negative prompt), stored at the CLIP demo's 32,
    /// batch 16.
    pub fn demo() -> ImageSetOptions {
        let t = crate::train::TrainConfig::demo();
        ImageSetOptions {
            width: crate::pipeline::demo::IMAGE_SIZE,
            height: crate::pipeline::demo::IMAGE_SIZE,
            steps: t.validation_steps,
            cfg_scale: t.validation_cfg,
            shift: t.shift,
            negative_prompt: t.negative_prompt,
            seed: 0,
            store_size: Some(crate::data::demo::CLIP_DEMO_IMAGE_SIZE),
            batch_size: 16,
            max_new: None,
            progress: false,
        }
    }

    /// Checks the values; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.width > 0 && self.height > 0, "image size {}×{} is empty", self.width, self.height);
        ensure!(self.steps > 0, "--steps must be at least 1");
        ensure!(self.cfg_scale.is_finite(), "--cfg must be a finite number, got {}", self.cfg_scale);
        ensure!(self.shift.is_finite() && self.shift > 0.0, "--shift must be a positive number, got {}", self.shift);
        ensure!(self.batch_size > 0, "--batch-size must be at least 1");
        if let Some(s) = self.store_size {
            ensure!(s > 0, "--store-size must be at least 1 pixel (0 is not a size)");
            ensure!(
                s <= self.width.min(self.height),
                "--store-size {s} is larger than the generated image's short side {} (the stored copy is a \
                 smaller one)",
                self.width.min(self.height)
            );
        }
        Ok(())
    }

    /// The size of the stored images.
    pub fn stored_size(&self) -> (usize, usize) {
        match self.store_size {
            Some(s) => short_side_size(self.width, self.height, s),
            None => (self.width, self.height),
        }
    }

    fn generate_options(&self) -> GenerateOptions {
        GenerateOptions {
            prompt: String::new(),
            negative_prompt: self.negative_prompt.clone(),
            height: self.height,
            width: self.width,
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            seed: self.seed,
            shift: self.shift,
        }
    }

    /// The settings that determine the images, as the manifest records them.
    fn manifest(&self, captions: &[String], model: &str) -> Map<String, Value> {
        let mut key = String::new();
        for c in captions {
            key.push_str(c);
            key.push('\n');
        }
        let (sw, sh) = self.stored_size();
        let v = json!({
            "captions": captions.len(),
            "captions_fnv1a": format!("{:016x}", super::text_key(&key)),
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "cfg": self.cfg_scale,
            "shift": self.shift,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "stored_width": sw,
            "stored_height": sh,
            "model": model,
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
}

/// What [`generate_image_set`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSetSummary {
    /// Captions in the list.
    pub captions: usize,
    /// Images made in this call.
    pub made: usize,
    /// Images found already made (by an earlier, interrupted or finished, run).
    pub already_done: usize,
    /// Images still missing (a `max_new` limit stopped the run).
    pub remaining: usize,
    /// Seconds spent generating in this call.
    pub seconds: f64,
    /// The pair table, with one row per image present.
    pub train_tsv: PathBuf,
}

/// The path of image `index` relative to the set's folder: `images/SSSS/NNNNNNN.png`.
pub fn image_path(index: usize) -> String {
    format!("images/{:04}/{index:07}.png", index / SHARD_SIZE)
}

/// Generates one image per caption into `dir` with `pipe` (see the module documentation
/// for the layout and for resuming): the images already present are skipped, the others
/// are made in batches of `opts.batch_size` and written atomically, and `train.tsv` is
/// rewritten at the end. `model` names the generator in the manifest (a rerun with another
/// name is allowed, with a warning).
pub fn generate_image_set(
    pipe: &SynthosPipeline,
    captions: &[String],
    dir: &Path,
    opts: &ImageSetOptions,
    model: &str,
) -> Result<ImageSetSummary> {
    opts.validate()?;
    ensure!(!captions.is_empty(), "synth images: the caption list is empty");
    if let Some(i) = captions.iter().position(|c| c.trim().is_empty()) {
        bail!("synth images: caption {} (0-based) is empty", i);
    }
    pipe.check_size(opts.width, opts.height).ctx("synth images")?;
    fs::create_dir_all(dir).with_ctx(|| format!("cannot create output folder {}", dir.display()))?;
    check_manifest(dir, &opts.manifest(captions, model))?;
    remove_stale_temporaries(dir)?;

    let todo: Vec<usize> = (0..captions.len()).filter(|&i| !dir.join(image_path(i)).is_file()).collect();
    let already_done = captions.len() - todo.len();
    let todo = &todo[..opts.max_new.map_or(todo.len(), |m| m.min(todo.len()))];
    let gen = opts.generate_options();
    let (sw, sh) = opts.stored_size();
    let start = Instant::now();
    let mut progress = opts.progress.then(|| Progress::new(todo.len() as u64, 0));
    let mut made = 0usize;
    for batch in todo.chunks(opts.batch_size) {
        let prompts: Vec<&str> = batch.iter().map(|&i| captions[i].as_str()).collect();
        let seeds: Vec<u64> = batch.iter().map(|&i| opts.seed.wrapping_add(i as u64)).collect();
        let images = pipe.generate_seeded(&prompts, &seeds, &gen, None, &mut |_, _| {})?;
        for (&i, img) in batch.iter().zip(&images) {
            let path = dir.join(image_path(i));
            if (sw, sh) == (img.width(), img.height()) {
                img.save_png(path)?;
            } else {
                resize_bicubic(img, sw, sh)?.save_png(path)?;
            }
        }
        made += batch.len();
        if let Some(p) = progress.as_mut() {
            p.update(made as u64, None, made as u64);
        }
    }
    if let Some(p) = progress.as_mut() {
        p.finish();
    }
    let seconds = start.elapsed().as_secs_f64();
    let train_tsv = write_train_tsv(dir, captions)?;
    Ok(ImageSetSummary {
        captions: captions.len(),
        made,
        already_done,
        remaining: captions.len() - already_done - made,
        seconds,
        train_tsv,
    })
}

/// Writes `train.tsv` for the images of `captions` present in `dir` (caption order) and
/// returns its path.
pub fn write_train_tsv(dir: &Path, captions: &[String]) -> Result<PathBuf> {
    let mut tsv = format_delimited(&["image_path", "caption"], '\t');
    for (i, c) in captions.iter().enumerate() {
        let rel = image_path(i);
        if dir.join(&rel).is_file() {
            // One caption per line: line breaks inside a caption become spaces.
            let c = c.split_whitespace().collect::<Vec<_>>().join(" ");
            tsv.push_str(&format_delimited(&[rel.as_str(), c.as_str()], '\t'));
        }
    }
    let path = dir.join(TRAIN_TSV);
    write_atomic(&path, tsv.as_bytes())?;
    Ok(path)
}

/// Refuses a folder made with other captions or settings; writes the manifest into a
/// fresh one.
fn check_manifest(dir: &Path, want: &Map<String, Value>) -> Result<()> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        if dir.join("images").exists() {
            bail!(
                "{}: the folder holds an images/ folder but no {MANIFEST}; it was not made by synth images (use an \
                 empty --output folder)",
                dir.display()
            );
        }
        let text = serde_json::to_string_pretty(&Value::Object(want.clone())).map_err(|e| Error::msg(e.to_string()))?;
        return write_atomic(&path, text.as_bytes());
    }
    let text = fs::read_to_string(&path).with_ctx(|| format!("cannot read {}", path.display()))?;
    let have: Map<String, Value> = serde_json::from_str(&text)
        .map_err(|e| Error::msg(format!("{}: not a settings file of synth images: {e}", path.display())))?;
    let mut differ = Vec::new();
    for (k, v) in want {
        let old = have.get(k).unwrap_or(&Value::Null);
        if old != v && k != "model" {
            let what = if k == "captions_fnv1a" { "the caption list".to_string() } else { k.clone() };
            differ.push(format!("{what}: {old} there, {v} now"));
        }
    }
    if !differ.is_empty() {
        bail!(
            "{} holds images made with other settings ({}); to resume, use the same captions and settings, or \
             choose another --output",
            dir.display(),
            differ.join("; ")
        );
    }
    if have.get("model") != want.get("model") {
        eprintln!(
            "note: {} was begun with the generator {}; now {}",
            dir.display(),
            have.get("model").unwrap_or(&Value::Null),
            want.get("model").unwrap_or(&Value::Null)
        );
    }
    Ok(())
}

/// Removes the temporary files a killed run left in the shard folders (a write that did
/// not finish its rename).
fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    let images = dir.join("images");
    let Ok(shards) = fs::read_dir(&images) else { return Ok(()) };
    for shard in shards.flatten() {
        let Ok(files) = fs::read_dir(shard.path()) else { continue };
        for f in files.flatten() {
            let name = f.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                fs::remove_file(f.path()).with_ctx(|| format!("cannot remove {}", f.path().display()))?;
            }
        }
    }
    Ok(())
}
