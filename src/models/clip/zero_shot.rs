//! Zero-shot classification with a contrastive CLIP, as SynthCLIP evaluates it: each
//! class's prompts (one per template) are embedded and L2-normalized, averaged and
//! renormalized into one classifier row; an image's logits are the plain cosine
//! similarities of its normalized embedding with those rows (no temperature).

use super::ClipModel;
use crate::{autograd, bail, ops, Result, Tensor};

/// The zero-shot classifier `[classes, E]` of a model from the token ids of every
/// class's prompts: `ids` holds `classes × templates` rows of the model's context length,
/// class-major (the templates of class 0, then of class 1, …). Computed without a tape
/// in f32, `batch` prompts at a time.
pub fn zero_shot_classifier(
    model: &ClipModel,
    ids: &[u32],
    classes: usize,
    templates: usize,
    batch: usize,
) -> Result<Tensor> {
    let c = model.config().text.context_length;
    if classes == 0 || templates == 0 || ids.len() != classes * templates * c {
        bail!(
            "zero_shot_classifier: {} token ids for {classes} classes × {templates} templates of {c} tokens",
            ids.len()
        );
    }
    let rows = classes * templates;
    let batch = batch.max(1);
    autograd::no_grad(|| {
        let mut parts = Vec::new();
        let mut start = 0;
        while start < rows {
            let n = batch.min(rows - start);
            let e = model.encode_text(&ids[start * c..(start + n) * c], n)?;
            parts.push(ops::l2_normalize(&ops::cast(&e, crate::DType::F32)?)?);
            start += n;
        }
        let all = if parts.len() == 1 { parts.remove(0) } else { ops::concat(&parts.iter().collect::<Vec<_>>(), 0)? };
        let e = all.shape()[1];
        let mean = ops::mean_dim(&ops::reshape(&all, &[classes, templates, e])?, 1, false)?;
        ops::l2_normalize(&mean)
    })
}

/// Cosine logits `[N, classes]` of image embeddings `[N, E]` against a classifier from
/// [`zero_shot_classifier`], in f32.
pub fn zero_shot_logits(image_embed: &Tensor, classifier: &Tensor) -> Result<Tensor> {
    let img = ops::l2_normalize(&ops::cast(image_embed, crate::DType::F32)?)?;
    ops::matmul_t(&img, classifier, false, true)
}

/// For each row of `logits` `[N, K]`, whether `labels[row]` is among its `k` largest
/// entries (ties broken towards the lower index, as `torch.topk` does in practice).
pub fn top_k_hits(logits: &Tensor, labels: &[usize], k: usize) -> Result<Vec<bool>> {
    let &[n, classes] = logits.shape() else {
        bail!("top_k_hits: logits must be [N, K], got {:?}", logits.shape());
    };
    if labels.len() != n {
        bail!("top_k_hits: {} labels for {n} rows", labels.len());
    }
    if let Some(l) = labels.iter().find(|&&l| l >= classes) {
        bail!("top_k_hits: label {l} out of range for {classes} classes");
    }
    let v = logits.to_vec()?;
    Ok(v.chunks(classes.max(1))
        .zip(labels)
        .map(|(row, &l)| {
            // Rank of the label: entries strictly larger, or equal at a lower index.
            let rank = row.iter().enumerate().filter(|&(j, &x)| x > row[l] || (x == row[l] && j < l)).count();
            rank < k
        })
        .collect())
}
