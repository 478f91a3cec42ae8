//! Evaluation of a contrastive CLIP (`synthos-engine clip-eval`, and the validation of
//! `clip-train`): zero-shot classification of an image folder, and image↔text retrieval
//! over a caption table, as SynthCLIP evaluates them.
//!
//! - **Zero-shot**: one sub-folder of images per class (sorted by name, as torchvision's
//!   `ImageFolder`), class names from the folder names or a list; every class's prompts
//!   (one per template) embedded, normalized, averaged and renormalized; each image's
//!   logits are the cosine similarities with those class rows; top-1 and top-5.
//! - **Retrieval**: the pairs of a caption table; recall@1/5/10 of the matching caption
//!   among all captions for each image (image→text) and of the matching image among all
//!   images for each caption (text→image).
//!
//! Images go through the evaluation transform (short side to the model's size, center
//! crop, ImageNet normalization), decoded in parallel.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::data::CaptionDataset;
use crate::image::augment::ClipTransform;
use crate::image::ImageRgb;
use crate::models::clip::{top_k_hits, zero_shot_classifier, zero_shot_logits, ClipModel};
use crate::tokenizer::{ClipTokenizer, Truncation};
use crate::{autograd, bail, ops, Device, Error, Result, ResultExt, Rng, Tensor};

/// Image file extensions an [`ImageFolder`] takes (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// A classification set on disk: `ROOT/<class>/<image>`.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    items: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// Lists `root`'s sub-folders (sorted by name; each a class) and the images in each
    /// (sorted). Errors name the folder: no sub-folders, or no images at all.
    pub fn open(root: impl AsRef<Path>) -> Result<ImageFolder> {
        let root = root.as_ref().to_path_buf();
        let ctx = || format!("image folder {}", root.display());
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
            .with_ctx(ctx)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        if dirs.is_empty() {
            bail!("{}: no class sub-folders (expected ROOT/<class>/<image>)", ctx());
        }
        let mut classes = Vec::new();
        let mut items = Vec::new();
        for (c, dir) in dirs.iter().enumerate() {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_ctx(|| format!("class folder {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                })
                .collect();
            files.sort();
            items.extend(files.into_iter().map(|f| (f, c)));
            classes.push(name);
        }
        if items.is_empty() {
            bail!("{}: the class folders hold no images ({})", ctx(), IMAGE_EXTENSIONS.join(", "));
        }
        Ok(ImageFolder { root, classes, items })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sub-folder names, sorted (class `i` is the `i`-th).
    pub fn class_names(&self) -> &[String] {
        &self.classes
    }

    /// Every image and its class index.
    pub fn items(&self) -> &[(PathBuf, usize)] {
        &self.items
    }

    /// Class names to use instead of the folder names (e.g. ImageNet's words for its
    /// `n01440764`-style folders), one per sub-folder in sorted order.
    pub fn check_class_names(&self, names: &[String]) -> Result<Vec<String>> {
        if names.len() != self.classes.len() {
            bail!(
                "{} class names for the {} class folders of {} (one name per sub-folder, in sorted order)",
                names.len(),
                self.classes.len(),
                self.root.display()
            );
        }
        Ok(names.to_vec())
    }
}

/// Reads a list file: one entry per line, blank lines and surrounding white space
/// ignored (class names, or templates with `{}`).
pub fn read_lines(path: impl AsRef<Path>) -> Result<Vec<String>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).with_ctx(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if lines.is_empty() {
        bail!("{}: no entries", path.display());
    }
    Ok(lines)
}

/// Zero-shot classification results.
#[derive(Clone, Debug, PartialEq)]
pub struct ZeroShotReport {
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent.
    pub top5: f64,
    /// Images evaluated.
    pub images: usize,
    /// The class names.
    pub classes: Vec<String>,
    /// Top-1 of each class, percent (`NaN` for a class without images).
    pub per_class_top1: Vec<f64>,
}

impl ZeroShotReport {
    /// Top-1 of guessing: 100 / classes.
    pub fn chance_top1(&self) -> f64 {
        100.0 / self.classes.len().max(1) as f64
    }

    /// Top-5 of guessing.
    pub fn chance_top5(&self) -> f64 {
        100.0 * 5f64.min(self.classes.len() as f64) / self.classes.len().max(1) as f64
    }

    /// One line: top-1, top-5 and chance.
    pub fn summary(&self) -> String {
        format!(
            "top-1 {:.2}% top-5 {:.2}% over {} images of {} classes (chance {:.2}% / {:.2}%)",
            self.top1,
            self.top5,
            self.images,
            self.classes.len(),
            self.chance_top1(),
            self.chance_top5()
        )
    }

    /// The JSON form ([`ZeroShotReport::read`] reads it back).
    pub fn to_json(&self) -> Value {
        json!({
            "top1": self.top1,
            "top5": self.top5,
            "chance_top1": self.chance_top1(),
            "chance_top5": self.chance_top5(),
            "images": self.images,
            "classes": self.classes,
            "per_class_top1": self.per_class_top1.iter().map(|v| if v.is_finite() { json!(v) } else { Value::Null }).collect::<Vec<_>>(),
        })
    }

    /// Reads a report written by [`ZeroShotReport::to_json`].
    pub fn read(path: impl AsRef<Path>) -> Result<ZeroShotReport> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).with_ctx(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_ctx(|| format!("{}: not JSON", path.display()))?;
        let num =
            |k: &str| v.get(k).and_then(Value::as_f64).ok_or_else(|| Error::msg(format!("{}: no {k}", path.display())));
        let classes: Vec<String> = v
            .get("classes")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let per_class_top1 = v
            .get("per_class_top1")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
            .unwrap_or_default();
        Ok(ZeroShotReport {
            top1: num("top1")?,
            top5: num("top5")?,
            images: num("images")? as usize,
            classes,
            per_class_top1,
        })
    }
}

/// Decodes `paths` in parallel through the evaluation transform at `size` into one CPU
/// tensor `[n, 3, size, size]`; errors name the file.
pub fn eval_pixels(paths: &[&Path], size: usize) -> Result<Tensor> {
    let transform = ClipTransform::eval(size);
    let per = 3 * size * size;
    let mut pixels = vec![0f32; paths.len() * per];
    pixels.par_chunks_mut(per.max(1)).zip(paths.par_iter()).try_for_each(|(out, p)| {
        let img = ImageRgb::open(p)?;
        transform.apply_into(&img, &mut Rng::new(0), out).with_ctx(|| format!("image {}", p.display()))
    })?;
    Tensor::from_vec(pixels, &[paths.len(), 3, size, size], Device::Cpu)
}

/// The image embeddings `[n, E]` (f32, not normalized) of `paths`, `batch` at a time,
/// without a tape.
pub fn embed_images(model: &ClipModel, paths: &[&Path], batch: usize) -> Result<Tensor> {
    let size = model.config().vision.image_size;
    let mut parts = Vec::new();
    for chunk in paths.chunks(batch.max(1)) {
        let px = eval_pixels(chunk, size)?.to_device(model.device(), model.dtype())?;
        let e = autograd::no_grad(|| model.encode_image(&px))?;
        parts.push(ops::cast(&e, crate::DType::F32)?);
    }
    concat_rows(parts)
}

/// The text embeddings `[n, E]` (f32, not normalized) of `texts`, `batch` at a time,
/// without a tape.
pub fn embed_texts(
    model: &ClipModel,
    tokenizer: &ClipTokenizer,
    texts: &[String],
    truncation: Truncation,
    batch: usize,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    for chunk in texts.chunks(batch.max(1)) {
        let tokens = tokenizer.tokenize(chunk, truncation);
        let e = autograd::no_grad(|| model.encode_text(&tokens.ids, chunk.len()))?;
        parts.push(ops::cast(&e, crate::DType::F32)?);
    }
    concat_rows(parts)
}

fn concat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    match parts.len() {
        0 => bail!("nothing to embed"),
        1 => Ok(parts.remove(0)),
        _ => ops::concat(&parts.iter().collect::<Vec<_>>(), 0),
    }
}

/// The prompts of every class under every template, class-major (`{}` → class name).
pub fn class_prompts(classes: &[String], templates: &[String]) -> Vec<String> {
    classes.iter().flat_map(|c| templates.iter().map(move |t| t.replace("{}", c))).collect()
}

/// The tokenizer must make rows as long as the model's text tower has positions.
fn check_context_length(model: &ClipModel, tokenizer: &ClipTokenizer) -> Result<()> {
    let (rows, positions) = (tokenizer.context_length(), model.config().text.context_length);
    if rows != positions {
        bail!(
            "the tokenizer makes rows of {rows} token ids, but the model's text tower has {positions} positions: \
             use ClipTokenizer::new()?.with_context_length({positions})"
        );
    }
    Ok(())
}

/// Zero-shot classification of `folder` with class names `classes` and prompt
/// `templates` (see the module documentation), `batch` images or prompts at a time.
#[allow(clippy::too_many_arguments)]
pub fn zero_shot_eval(
    model: &ClipModel,
    tokenizer: &ClipTokenizer,
    folder: &ImageFolder,
    classes: &[String],
    templates: &[String],
    truncation: Truncation,
    batch: usize,
    _workers: usize,
) -> Result<ZeroShotReport> {
    if classes.len() != folder.class_names().len() {
        bail!("{} class names for {} class folders", classes.len(), folder.class_names().len());
    }
    check_context_length(model, tokenizer)?;
    if templates.is_empty() || templates.iter().any(|t| !t.contains("{}")) {
        bail!("zero-shot templates must be non-empty and each hold a {{}} for the class name");
    }
    let prompts = class_prompts(classes, templates);
    let tokens = tokenizer.tokenize(&prompts, truncation);
    let classifier = zero_shot_classifier(model, &tokens.ids, classes.len(), templates.len(), batch)?;
    let mut hits1 = vec![0usize; classes.len()];
    let mut counts = vec![0usize; classes.len()];
    let (mut top1, mut top5) = (0usize, 0usize);
    for chunk in folder.items().chunks(batch.max(1)) {
        let paths: Vec<&Path> = chunk.iter().map(|(p, _)| p.as_path()).collect();
        let labels: Vec<usize> = chunk.iter().map(|(_, c)| *c).collect();
        let img = embed_images(model, &paths, batch)?;
        let logits = zero_shot_logits(&img, &classifier)?;
        let h1 = top_k_hits(&logits, &labels, 1)?;
        let h5 = top_k_hits(&logits, &labels, 5)?;
        for ((&l, &a), &b) in labels.iter().zip(&h1).zip(&h5) {
            counts[l] += 1;
            hits1[l] += usize::from(a);
            top1 += usize::from(a);
            top5 += usize::from(b);
        }
    }
    let n = folder.items().len();
    Ok(ZeroShotReport {
        top1: 100.0 * top1 as f64 / n as f64,
        top5: 100.0 * top5 as f64 / n as f64,
        images: n,
        classes: classes.to_vec(),
        per_class_top1: hits1
            .iter()
            .zip(&counts)
            .map(|(&h, &c)| if c == 0 { f64::NAN } else { 100.0 * h as f64 / c as f64 })
            .collect(),
    })
}

/// Image↔text retrieval results.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrievalReport {
    /// Pairs evaluated.
    pub pairs: usize,
    /// Image→text recall@1, @5, @10, percent.
    pub image_to_text: [f64; 3],
    /// Text→image recall@1, @5, @10, percent.
    pub text_to_image: [f64; 3],
}

impl RetrievalReport {
    /// The JSON form.
    pub fn to_json(&self) -> Value {
        json!({
            "pairs": self.pairs,
            "image_to_text": {"r1": self.image_to_text[0], "r5": self.image_to_text[1], "r10": self.image_to_text[2]},
            "text_to_image": {"r1": self.text_to_image[0], "r5": self.text_to_image[1], "r10": self.text_to_image[2]},
        })
    }
}

/// Recall@1/5/10 of matching rows: entry (i, j) of `sim` `[n, n]` scores query i against
/// candidate j, and candidate i is query i's match. A tie with a lower index counts
/// against the match.
pub fn recall_at(sim: &[f32], n: usize) -> [f64; 3] {
    let mut hits = [0usize; 3];
    for i in 0..n {
        let row = &sim[i * n..(i + 1) * n];
        let rank = row.iter().enumerate().filter(|&(j, &v)| v > row[i] || (v == row[i] && j < i)).count();
        for (h, k) in hits.iter_mut().zip([1, 5, 10]) {
            *h += usize::from(rank < k);
        }
    }
    hits.map(|h| 100.0 * h as f64 / n.max(1) as f64)
}

/// Image↔text retrieval over the pairs of `dataset`.
pub fn retrieval_eval(
    model: &ClipModel,
    tokenizer: &ClipTokenizer,
    dataset: &CaptionDataset,
    truncation: Truncation,
    batch: usize,
) -> Result<RetrievalReport> {
    let n = dataset.len();
    if n < 2 {
        bail!("retrieval needs at least 2 pairs, found {n}");
    }
    check_context_length(model, tokenizer)?;
    let path_refs: Vec<&Path> = dataset.entries().iter().map(|e| e.path.as_path()).collect();
    let captions: Vec<String> = dataset.entries().iter().map(|e| e.prompt.clone()).collect();
    let img = ops::l2_normalize(&embed_images(model, &path_refs, batch)?)?;
    let txt = ops::l2_normalize(&embed_texts(model, tokenizer, &captions, truncation, batch)?)?;
    let i2t = autograd::no_grad(|| ops::matmul_t(&img, &txt, false, true))?.to_vec()?;
    let t2i = autograd::no_grad(|| ops::matmul_t(&txt, &img, false, true))?.to_vec()?;
    Ok(RetrievalReport { pairs: n, image_to_text: recall_at(&i2t, n), text_to_image: recall_at(&t2i, n) })
}
