//! The outputs of `synth balance`: the kept captions, a JSON report and a rank/count plot.
//!
//! - `balanced.jsonl`: one line per kept caption, in input order:
//!   `{"caption": …, "concept": …, "matched": [ … ]}` — the concept the caption was
//!   written for (when the input says) and the names of every concept it matches.
//! - `balance-report.json`: the settings, caption and concept totals, and for the
//!   per-concept counts before and after balancing a [`CountSummary`] (power-of-two
//!   buckets, log-spaced samples of the counts sorted in descending order) plus the most
//!   frequent concepts.
//! - `balance-histogram.png`: count against rank (descending) on log-log axes, before and
//!   after, with the line `t`.
//!
//! Every file is written atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::balance::{BalanceOptions, Balanced};
use super::captions::CaptionRow;
use super::concepts::ConceptBank;
use crate::fsutil::{write_atomic, write_atomic_with};
use crate::report::{plot_log_log, PlotOptions, Series};
use crate::{Result, ResultExt};

/// How many of the most frequent concepts the report lists.
pub const TOP_CONCEPTS: usize = 25;

/// A summary of per-concept counts.
#[derive(Clone, Debug, PartialEq)]
pub struct CountSummary {
    /// Concepts with a count of at least 1.
    pub covered: usize,
    /// The sum of the counts.
    pub total: u64,
    /// The largest count.
    pub max: u64,
    /// The mean count of the covered concepts (0 when none).
    pub mean_covered: f64,
    /// The median count of the covered concepts (0 when none).
    pub median_covered: u64,
    /// `(lo, hi, concepts)`: how many concepts have a count in `lo..=hi`; the first
    /// bucket is `(0, 0)`, then `(1, 1)`, `(2, 3)`, `(4, 7)`, … up to the largest count.
    pub buckets: Vec<(u64, u64, usize)>,
    /// `(rank, count)` at log-spaced ranks (1-based) of the non-zero counts sorted in
    /// descending order: every rank up to 10, then every ~5 %, and the last.
    pub rank_counts: Vec<(usize, u64)>,
}

/// The ranks (1-based) sampled from `n` sorted counts: all up to 10, then a geometric
/// progression of ratio 1.05 (rounded, without repeats), and `n`.
pub fn log_spaced_ranks(n: usize) -> Vec<usize> {
    let mut ranks: Vec<usize> = (1..=n.min(10)).collect();
    let mut r = 10.0f64;
    while (r as usize) < n {
        r *= 1.05;
        let k = (r.round() as usize).min(n);
        if ranks.last().is_none_or(|&l| k > l) {
            ranks.push(k);
        }
    }
    if n > 0 && ranks.last() != Some(&n) {
        ranks.push(n);
    }
    ranks
}

/// Summarises per-concept counts.
pub fn count_summary(counts: &[u64]) -> CountSummary {
    let mut sorted: Vec<u64> = counts.iter().copied().filter(|&c| c > 0).collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let covered = sorted.len();
    let total: u64 = sorted.iter().sum();
    let max = sorted.first().copied().unwrap_or(0);
    let mut buckets = vec![(0, 0, counts.len() - covered)];
    let mut lo = 1u64;
    while lo <= max {
        let hi = lo.saturating_mul(2) - 1;
        let n = sorted.iter().filter(|&&c| c >= lo && c <= hi).count();
        buckets.push((lo, hi, n));
        lo = lo.saturating_mul(2);
    }
    let rank_counts = log_spaced_ranks(covered).into_iter().map(|r| (r, sorted[r - 1])).collect();
    CountSummary {
        covered,
        total,
        max,
        mean_covered: if covered > 0 { total as f64 / covered as f64 } else { 0.0 },
        median_covered: if covered > 0 { sorted[covered / 2] } else { 0 },
        buckets,
        rank_counts,
    }
}

impl CountSummary {
    /// The summary as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "concepts_covered": self.covered,
            "total": self.total,
            "max": self.max,
            "mean_covered": self.mean_covered,
            "median_covered": self.median_covered,
            "buckets": self.buckets.iter().map(|&(lo, hi, n)| json!({"min": lo, "max": hi, "concepts": n})).collect::<Vec<_>>(),
            "rank_counts": self.rank_counts.iter().map(|&(r, c)| json!([r, c])).collect::<Vec<_>>(),
        })
    }
}

/// The JSON report of a balancing run (see the module documentation).
pub fn balance_report(bank: &ConceptBank, balanced: &Balanced, options: &BalanceOptions) -> Value {
    let before = count_summary(&balanced.counts_before);
    let after = count_summary(&balanced.counts_after);
    let mut order: Vec<usize> = (0..balanced.names.len()).collect();
    order.sort_by(|&a, &b| balanced.counts_before[b].cmp(&balanced.counts_before[a]).then(a.cmp(&b)));
    let top: Vec<Value> = order
        .iter()
        .take(TOP_CONCEPTS)
        .filter(|&&i| balanced.counts_before[i] > 0)
        .map(|&i| {
            json!({
                "concept": balanced.names[i],
                "before": balanced.counts_before[i],
                "after": balanced.counts_after[i],
                "keep_probability": balanced.probs[i],
            })
        })
        .collect();
    let matched = balanced.matched_captions();
    json!({
        "t": options.t,
        "seed": options.seed,
        "matching": options.mode.name(),
        "concepts": {
            "bank": bank.len(),
            "duplicates_merged": bank.duplicates().len(),
            "counted": balanced.names.len(),
            "covered_before": before.covered,
            "covered_after": after.covered,
            "over_t_before": balanced.counts_before.iter().filter(|&&c| c > options.t).count(),
            "over_t_after": balanced.counts_after.iter().filter(|&&c| c > options.t).count(),
        },
        "captions": {
            "read": balanced.rows,
            "empty": balanced.empty,
            "duplicates": balanced.duplicates,
            "unique": balanced.unique.len(),
            "matched": matched,
            "unmatched": balanced.unique.len() - matched,
            "kept": balanced.kept_count(),
            "expected_kept": balanced.expected_kept,
        },
        "counts_before": before.to_json(),
        "counts_after": after.to_json(),
        "top_concepts": top,
    })
}

/// The paths [`write_balance_outputs`] wrote.
#[derive(Clone, Debug)]
pub struct BalanceFiles {
    /// `balanced.jsonl`.
    pub captions: PathBuf,
    /// `balance-report.json`.
    pub report: PathBuf,
    /// `balance-histogram.png`.
    pub plot: PathBuf,
}

/// Writes `balanced.jsonl`, `balance-report.json` and `balance-histogram.png` into `dir`
/// (created if missing), each atomically; returns the report too.
pub fn write_balance_outputs(
    dir: impl AsRef<Path>,
    bank: &ConceptBank,
    rows: &[CaptionRow],
    balanced: &Balanced,
    options: &BalanceOptions,
) -> Result<(BalanceFiles, Value)> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).with_ctx(|| format!("cannot create directory {}", dir.display()))?;
    let files = BalanceFiles {
        captions: dir.join("balanced.jsonl"),
        report: dir.join("balance-report.json"),
        plot: dir.join("balance-histogram.png"),
    };
    write_atomic_with(&files.captions, |w| {
        for (k, (&row, &keep)) in balanced.unique.iter().zip(&balanced.kept).enumerate() {
            if !keep {
                continue;
            }
            let r = &rows[row];
            let mut obj = serde_json::Map::new();
            obj.insert("caption".into(), Value::String(r.caption.trim().to_string()));
            if let Some(c) = &r.concept {
                obj.insert("concept".into(), Value::String(c.clone()));
            }
            let names = balanced.matched(k).iter().map(|&id| Value::String(balanced.names[id as usize].clone()));
            obj.insert("matched".into(), Value::Array(names.collect()));
            let mut line = Value::Object(obj).to_string();
            line.push('\n');
            w.write_all(line.as_bytes()).ctx("writing")?;
        }
        Ok(())
    })
    .map_err(|e| e.context(format!("cannot write {}", files.captions.display())))?;

    let report = balance_report(bank, balanced, options);
    let text = serde_json::to_string_pretty(&report).ctx("cannot format the balance report")?;
    write_atomic(&files.report, format!("{text}\n").as_bytes())?;

    let series = |label: &str, rgb: [u8; 3], counts: &[u64]| {
        let s = count_summary(counts);
        Series { label: label.into(), rgb, points: s.rank_counts.iter().map(|&(r, c)| (r as f64, c as f64)).collect() }
    };
    let all = [
        series("before", [150, 185, 235], &balanced.counts_before),
        series("after", [20, 70, 170], &balanced.counts_after),
    ];
    let drawn: Vec<Series> = all.into_iter().filter(|s| !s.points.is_empty()).collect();
    let t_label = format!("t = {}", options.t);
    let plot_options = PlotOptions {
        title: "captions per concept".into(),
        x_label: "concept rank".into(),
        y_label: "captions".into(),
        ..Default::default()
    };
    if drawn.is_empty() {
        // No caption matched anything: still write the plot, with the line t only.
        let placeholder = Series { label: "no matches".into(), rgb: [150, 150, 150], points: vec![(1.0, 1.0)] };
        plot_log_log(&[placeholder], Some((options.t as f64, &t_label)), &files.plot, &plot_options)?;
    } else {
        plot_log_log(&drawn, Some((options.t as f64, &t_label)), &files.plot, &plot_options)?;
    }
    Ok((files, report))
}
