//! Checkpoint key names: the original Wan naming (also DiffSynth's and Synthos's), which
//! the model uses for its parameters, and diffusers' `WanTransformer3DModel` naming.
//!
//! Each source (file, index or directory) is read in the naming its keys show, so a
//! Synthos `epoch-N.safetensors` in original naming may be layered over diffusers base
//! weights: [`NameMap`] knows, for every parameter, the stored key that provides it
//! after the overlays.

use std::collections::{HashMap, HashSet};

use crate::weights::WeightSet;

/// (original, diffusers) pairs of names.
type NamePairs = [(&'static str, &'static str)];

/// A checkpoint naming scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// Wan2.1's own names (`blocks.0.self_attn.q.weight`), as DiffSynth and Synthos write
    /// them; possibly under a `model.` or `model.diffusion_model.` prefix.
    Original,
    /// diffusers' `WanTransformer3DModel` names (`blocks.0.attn1.to_q.weight`).
    Diffusers,
}

/// Module paths outside the blocks: (original, diffusers). Parameters are
/// `<path>.weight` / `<path>.bias`.
const TOP_MODULES: [(&str, &str); 11] = [
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("head.head", "proj_out"),
];

/// Bare parameters outside the blocks.
const TOP_PARAMS: [(&str, &str); 1] = [("head.modulation", "scale_shift_table")];

/// Module paths inside `blocks.N.` (the I2V image keys included, so that an I2V
/// checkpoint is reported in one naming).
const BLOCK_MODULES: [(&str, &str); 18] = [
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("norm3", "norm2"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
];

/// Bare parameters inside `blocks.N.`.
const BLOCK_PARAMS: [(&str, &str); 1] = [("modulation", "scale_shift_table")];

/// Prefixes some exports put in front of original names (DiffSynth strips `model.`;
/// ComfyUI files use `model.diffusion_model.`), longest first.
const ORIGINAL_PREFIXES: [&str; 2] = ["model.diffusion_model.", "model."];

/// Translates `name` between namings, `to_diffusers` choosing the direction; `None`
/// when the name is not a Wan DiT parameter in the source naming.
fn translate(name: &str, to_diffusers: bool) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str)| if to_diffusers { (pair.0, pair.1) } else { (pair.1, pair.0) };
    let (scope, rest) = match name.strip_prefix("blocks.") {
        Some(rest) => {
            let (index, rest) = rest.split_once('.')?;
            index.parse::<usize>().ok()?;
            (format!("blocks.{index}."), rest)
        }
        None => (String::new(), name),
    };
    let (modules, params): (&NamePairs, &NamePairs) =
        if scope.is_empty() { (&TOP_MODULES, &TOP_PARAMS) } else { (&BLOCK_MODULES, &BLOCK_PARAMS) };
    if let Some((_, to)) = params.iter().map(pick).find(|(from, _)| *from == rest) {
        return Some(format!("{scope}{to}"));
    }
    let (module, leaf) = rest.rsplit_once('.')?;
    if leaf != "weight" && leaf != "bias" {
        return None;
    }
    modules.iter().map(pick).find(|(from, _)| *from == module).map(|(_, to)| format!("{scope}{to}.{leaf}"))
}

/// The diffusers name of an original-naming parameter, if it has one.
pub fn to_diffusers(original: &str) -> Option<String> {
    translate(original, true)
}

/// The original name of a diffusers-naming parameter, if it has one.
pub fn from_diffusers(diffusers: &str) -> Option<String> {
    translate(diffusers, false)
}

/// The naming of a set of keys: diffusers when any key is one of its module paths
/// (`condition_embedder.*`, `proj_out.*`, `scale_shift_table`, `blocks.N.attn1.*`...),
/// original otherwise.
pub fn detect<'a>(names: impl IntoIterator<Item = &'a str>) -> Naming {
    let diffusers_only = |n: &str| from_diffusers(n).is_some_and(|o| o != n) && to_diffusers(n).is_none_or(|d| d == n);
    if names.into_iter().any(diffusers_only) {
        Naming::Diffusers
    } else {
        Naming::Original
    }
}

/// The prefix shared by every key of an original-naming source, if it is a known one.
fn original_prefix(names: &[&str]) -> &'static str {
    ORIGINAL_PREFIXES
        .iter()
        .find(|p| !names.is_empty() && names.iter().all(|n| n.starts_with(**p)))
        .copied()
        .unwrap_or("")
}

/// How one source names its tensors.
#[derive(Clone, Copy, Debug)]
struct SourceNaming {
    naming: Naming,
    prefix: &'static str,
}

impl SourceNaming {
    /// The original (model) name of stored key `name`, if it names a DiT parameter.
    fn canonical(&self, name: &str) -> Option<String> {
        match self.naming {
            Naming::Diffusers => from_diffusers(name),
            Naming::Original => name.strip_prefix(self.prefix).map(str::to_string),
        }
    }

    /// The key this source would use for parameter `original`.
    fn stored(&self, original: &str) -> String {
        match self.naming {
            Naming::Diffusers => to_diffusers(original).unwrap_or_else(|| original.to_string()),
            Naming::Original => format!("{}{original}", self.prefix),
        }
    }
}

/// For each model parameter (original name), the stored key that provides it once all
/// sources are layered in order, and the keys that a later source shadowed under another
/// name.
#[derive(Debug)]
pub struct NameMap {
    base: SourceNaming,
    stored: HashMap<String, String>,
    shadowed: HashSet<String>,
    namings: Vec<Naming>,
}

impl NameMap {
    /// Reads the keys of each source (opened separately, in overlay order).
    pub fn new(sources: &[WeightSet]) -> NameMap {
        let mut map = NameMap {
            base: SourceNaming { naming: Naming::Original, prefix: "" },
            stored: HashMap::new(),
            shadowed: HashSet::new(),
            namings: Vec::new(),
        };
        for (i, set) in sources.iter().enumerate() {
            let names: Vec<&str> = set.names().collect();
            let naming = detect(names.iter().copied());
            let prefix = if naming == Naming::Original { original_prefix(&names) } else { "" };
            let source = SourceNaming { naming, prefix };
            if i == 0 {
                map.base = source;
            }
            map.namings.push(naming);
            for name in names {
                if let Some(original) = source.canonical(name) {
                    if let Some(previous) = map.stored.insert(original, name.to_string()) {
                        if previous != name {
                            map.shadowed.insert(previous);
                        }
                    }
                }
            }
        }
        map
    }

    /// The key to request for parameter `original`: the one that provides it, else the
    /// name the base source would use (so a missing tensor is reported in its naming).
    pub fn key(&self, original: &str) -> String {
        self.stored.get(original).cloned().unwrap_or_else(|| self.base.stored(original))
    }

    /// True when some source provides a parameter whose original name starts with `prefix`.
    pub fn provides_prefix(&self, prefix: &str) -> bool {
        self.stored.keys().any(|k| k.starts_with(prefix))
    }

    /// Keys replaced by a later source under another name (not "unexpected").
    pub fn is_shadowed(&self, key: &str) -> bool {
        self.shadowed.contains(key)
    }

    /// The naming detected for each source, in order.
    pub fn namings(&self) -> &[Naming] {
        &self.namings
    }
}
