//! CLIP data pipeline: caption tables (SynthCLIP TSV, Synthos folder) and their
//! validation, SynthCLIP's transforms against torchvision fixtures, the statistics of the
//! random crop window, and the prefetching loader (determinism, coverage, errors,
//! bounded prefetch, shutdown).
mod common;
use common::temp_dir;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::Value;
use synthos_engine::data::loader::{epoch_plan, BatchPlan, BatchSource, Loader, LoaderOptions};
use synthos_engine::data::{sample_rng, BadRowPolicy, CaptionDataset, CaptionOptions, ClipBatch, ClipBatches};
use synthos_engine::image::augment::{
    eval_transform, normalize_into, normalized_chw, random_resized_crop_params, ClipTransform, CropBox, IMAGENET_MEAN,
    IMAGENET_STD, SYNTHCLIP_RATIO, SYNTHCLIP_SCALE,
};
use synthos_engine::image::resize::{
    resize_bicubic, resize_bilinear, resize_short_center_crop, resized_crop, short_side_size,
};
use synthos_engine::image::ImageRgb;
use synthos_engine::{Result, Rng};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip_data")
}

fn cases() -> Value {
    serde_json::from_str(&fs::read_to_string(fixtures().join("cases.json")).unwrap()).unwrap()
}

fn err_of<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// A `w × h` test image whose pixels depend on `seed`.
fn test_image(w: usize, h: usize, seed: u64) -> ImageRgb {
    let mut rng = Rng::new(seed);
    let data = (0..w * h * 3).map(|i| ((i * 7 + (rng.next_u64() % 64) as usize) % 256) as u8).collect();
    ImageRgb::new(w, h, data).unwrap()
}

/// A folder with `table` written to `table_name` and a PNG for each of `images` (sizes
/// vary with the position).
fn pairs_dir(tag: &str, table_name: &str, table: &str, images: &[&str]) -> PathBuf {
    let dir = temp_dir(&format!("clip-data-{tag}"));
    for (k, name) in images.iter().enumerate() {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        test_image(30 + 7 * (k % 4), 26 + 5 * (k % 3), k as u64).save_png(&path).unwrap();
    }
    fs::write(dir.join(table_name), table).unwrap();
    dir
}

fn skip() -> CaptionOptions {
    CaptionOptions { bad_rows: BadRowPolicy::Skip, ..Default::default() }
}

// ---------------------------------------------------------------------------------------
// Tables

#[test]
fn tsv_written_by_pandas_reads_back_the_same_captions() {
    let meta = cases();
    let ds = CaptionDataset::open(fixtures().join("pairs.tsv"), &CaptionOptions::default()).unwrap();
    assert_eq!(ds.separator(), '\t');
    assert_eq!((ds.image_column(), ds.caption_column()), ("image_path", "caption"));
    assert_eq!(ds.dir(), fixtures().as_path());
    let want_caps: Vec<&str> =
        meta["pairs"]["caption"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let want_paths: Vec<&str> =
        meta["pairs"]["image_path"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(ds.len(), want_caps.len());
    for (i, e) in ds.entries().iter().enumerate() {
        assert_eq!(e.prompt, want_caps[i], "caption {i}");
        assert_eq!(ds.caption(i), Some(want_caps[i]));
        assert_eq!(e.path, fixtures().join(want_paths[i]));
    }
    // The caption over two lines moves the later rows down a line.
    let lines: Vec<usize> = ds.entries().iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![2, 3, 4, 5, 7, 8]);
    assert!(ds.skip_report().is_none());
}

#[test]
fn tsv_with_bom_crlf_index_column_and_quotes() {
    // pandas' default to_csv writes an unnamed index column first; Excel adds a BOM and CRLF.
    let table = "\u{feff}\timage_path\tcaption\r\n0\ta.png\t\"tab\there\"\r\n1\t\"b \"\"q\"\".png\"\tsay \"hi\"\r\n\r\n2\tsub/c.png\t\"two\r\nlines\"";
    let dir = pairs_dir("crlf", "list.csv", table, &["a.png", "b \"q\".png", "sub/c.png"]);
    let ds = CaptionDataset::open(dir.join("list.csv"), &CaptionOptions::default()).unwrap();
    assert_eq!(ds.separator(), '\t', "a .csv name with tabs in the header is tab-separated, as SynthCLIP's files are");
    let caps: Vec<&str> = ds.entries().iter().map(|e| e.prompt.as_str()).collect();
    assert_eq!(caps, vec!["tab\there", "say \"hi\"", "two\r\nlines"]);
    assert_eq!(ds.entries()[1].path, dir.join("b \"q\".png"));
    assert_eq!(ds.entries()[2].path, dir.join("sub/c.png"));
    assert_eq!(ds.entries().iter().map(|e| e.line).collect::<Vec<_>>(), vec![2, 3, 5]);
}

#[test]
fn metadata_folder_with_synthos_or_caption_columns() {
    let dir =
        pairs_dir("folder", "metadata.csv", "video,prompt\na.png,\"red, round\"\nb.png,blue\n", &["a.png", "b.png"]);
    let ds = CaptionDataset::open(&dir, &CaptionOptions::default()).unwrap();
    assert_eq!((ds.separator(), ds.image_column(), ds.caption_column()), (',', "video", "prompt"));
    assert_eq!(ds.table_path(), dir.join("metadata.csv").as_path());
    assert_eq!(ds.caption(0), Some("red, round"));
    for (header, img, cap) in [("image,caption", "image", "caption"), ("path,text", "path", "text")] {
        fs::write(dir.join("metadata.csv"), format!("{header}\na.png,hello\n")).unwrap();
        let ds = CaptionDataset::open(&dir, &CaptionOptions::default()).unwrap();
        assert_eq!((ds.image_column(), ds.caption_column(), ds.caption(0)), (img, cap, Some("hello")));
    }
    // Both caption names: SynthCLIP's `caption` wins over `prompt`.
    fs::write(dir.join("metadata.csv"), "video,prompt,caption\na.png,p,c\n").unwrap();
    assert_eq!(CaptionDataset::open(&dir, &CaptionOptions::default()).unwrap().caption(0), Some("c"));
}

#[test]
fn explicit_columns_separator_and_missing_columns() {
    let dir = pairs_dir("cols", "t.tsv", "file\tdesc\tcaption\na.png\tmine\ttheirs\n", &["a.png"]);
    let opts =
        CaptionOptions { image_column: Some("file".into()), caption_column: Some("desc".into()), ..Default::default() };
    let ds = CaptionDataset::open(dir.join("t.tsv"), &opts).unwrap();
    assert_eq!(ds.caption(0), Some("mine"));

    // Without the options, no image column is known: the error names the file and lists
    // what it found.
    let e = err_of(CaptionDataset::open(dir.join("t.tsv"), &CaptionOptions::default()));
    assert!(e.contains("t.tsv") && e.contains("image column") && e.contains("`image_path`"), "{e}");
    assert!(e.contains("`file`, `desc`, `caption`") && !e.contains("caption column"), "{e}");
    let opts = CaptionOptions { caption_column: Some("title".into()), ..Default::default() };
    let e = err_of(CaptionDataset::open(dir.join("t.tsv"), &opts));
    assert!(e.contains("a `title` column"), "{e}");

    // A forced separator that is wrong for the file finds one column only.
    let opts = CaptionOptions { separator: Some(','), ..Default::default() };
    let e = err_of(CaptionDataset::open(dir.join("t.tsv"), &opts));
    assert!(e.contains("missing"), "{e}");

    let e = err_of(CaptionDataset::open(dir.join("nope.tsv"), &CaptionOptions::default()));
    assert!(e.contains("nope.tsv") && e.contains("does not exist"), "{e}");
    let empty = temp_dir("clip-data-empty-folder");
    let e = err_of(CaptionDataset::open(&empty, &CaptionOptions::default()));
    assert!(e.contains("metadata.csv") && e.contains("not found"), "{e}");
    fs::write(dir.join("open.tsv"), "image_path\tcaption\na.png\t\"never closed\n").unwrap();
    let e = err_of(CaptionDataset::open(dir.join("open.tsv"), &CaptionOptions::default()));
    assert!(e.contains("open.tsv line 2") && e.contains("never closed"), "{e}");
}

/// Rows: 1 good, 2 no caption, 3 missing file, 4 good (after a two-line caption? no: one
/// line), 5 extra field, 6 no image path.
const MIXED: &str = "image_path\tcaption\n\
a.png\t\"fine\nover two lines\"\n\
a.png\t\n\
gone.png\twhere is it\n\
b.png\tgood\n\
b.png\tx\textra\n\
\torphan caption\n";

#[test]
fn bad_rows_stop_or_skip_with_file_and_line() {
    let dir = pairs_dir("bad", "pairs.tsv", MIXED, &["a.png", "b.png"]);
    let table = dir.join("pairs.tsv");
    let e = err_of(CaptionDataset::open(&table, &CaptionOptions::default()));
    assert!(e.contains(&format!("{} line 4 (row 2): no caption", table.display())), "{e}");
    assert!(e.contains("first of 4 bad rows of 6"), "{e}");

    let ds = CaptionDataset::open(&table, &skip()).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.caption(1), Some("good"));
    let bad: Vec<(usize, usize)> = ds.skipped().iter().map(|b| (b.line, b.row)).collect();
    assert_eq!(bad, vec![(4, 2), (5, 3), (7, 5), (8, 6)]);
    assert!(ds.skipped()[1].problem.contains(&format!("image file {} not found", dir.join("gone.png").display())));
    assert!(ds.skipped()[2].problem.contains("3 fields, but the header has 2"), "{}", ds.skipped()[2]);
    assert!(ds.skipped()[3].problem.contains("no image path in column `image_path`"), "{}", ds.skipped()[3]);
    assert!(ds.skipped()[0].to_string().starts_with(&format!("{} line 4 (row 2)", table.display())));
    let report = ds.skip_report().unwrap();
    assert!(report.starts_with("skipped 4 of 6 rows of ") && report.contains("pairs.tsv"), "{report}");
    assert!(report.contains("line 5 (row 3): image file"), "{report}");

    fs::write(&table, "image_path\tcaption\nnone.png\tx\n").unwrap();
    let e = err_of(CaptionDataset::open(&table, &skip()));
    assert!(e.contains("no usable rows"), "{e}");
    fs::write(&table, "image_path\tcaption\n").unwrap();
    assert!(err_of(CaptionDataset::open(&table, &skip())).contains("no data rows"));
}

#[test]
fn undecodable_images_follow_the_policy() {
    let dir = pairs_dir(
        "decode",
        "p.tsv",
        "image_path\tcaption\na.png\tone\nbroken.png\ttwo\nb.png\tthree\n",
        &["a.png", "b.png"],
    );
    fs::write(dir.join("broken.png"), b"not an image at all").unwrap();
    let table = dir.join("p.tsv");
    let ds = CaptionDataset::open(&table, &CaptionOptions::default()).unwrap();
    assert_eq!(ds.len(), 3, "existence is checked at open, decoding later");
    let e = err_of(ds.image(1));
    assert!(e.contains(&format!("{} line 3 (row 2)", table.display())) && e.contains("broken.png"), "{e}");
    let mut stop = ds.clone();
    let e = err_of(stop.check_all());
    assert!(e.contains("line 3 (row 2)") && e.contains("broken.png"), "{e}");
    assert_eq!(stop.len(), 3);
    let mut skipping = CaptionDataset::open(&table, &skip()).unwrap();
    assert_eq!(skipping.check_all().unwrap(), 1);
    assert_eq!((skipping.len(), skipping.caption(1)), (2, Some("three")));
    assert!(skipping.skip_report().unwrap().contains("broken.png"));
}

// ---------------------------------------------------------------------------------------
// Transforms against torchvision

fn fixture_image(name: &str) -> ImageRgb {
    ImageRgb::open(fixtures().join(name)).unwrap()
}

fn assert_same_pixels(got: &ImageRgb, want: &ImageRgb, what: &str) {
    assert_eq!((got.width(), got.height()), (want.width(), want.height()), "{what}: size");
    let diffs = got.data().iter().zip(want.data()).filter(|(a, b)| a != b).count();
    assert_eq!(diffs, 0, "{what}: {diffs} of {} bytes differ", want.data().len());
}

#[test]
fn eval_transform_matches_torchvision() {
    let meta = cases();
    let mut checked = 0;
    for img in meta["images"].as_array().unwrap() {
        let src = fixture_image(img["file"].as_str().unwrap());
        for case in img["eval"].as_array().unwrap() {
            let size = case["size"].as_u64().unwrap() as usize;
            let resized: Vec<usize> =
                case["resized"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(short_side_size(src.width(), src.height(), size), (resized[0], resized[1]));
            let got = resize_short_center_crop(&src, size).unwrap();
            let what = format!("Resize({size}) + CenterCrop({size}) of {}", img["name"]);
            assert_same_pixels(&got, &fixture_image(case["file"].as_str().unwrap()), &what);
            assert_eq!(ClipTransform::eval(size).apply_u8(&src, &mut Rng::new(1)).unwrap(), got);
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

#[test]
fn resized_crop_matches_torchvision() {
    let meta = cases();
    let mut checked = 0;
    for img in meta["images"].as_array().unwrap() {
        let src = fixture_image(img["file"].as_str().unwrap());
        for case in img["crops"].as_array().unwrap() {
            let b: Vec<usize> = case["box"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let size = case["size"].as_u64().unwrap() as usize;
            let (top, left, h, w) = (b[0], b[1], b[2], b[3]);
            let got = resized_crop(&src, left, top, w, h, size, size).unwrap();
            let what = format!("resized_crop({top}, {left}, {h}, {w}) -> {size} of {}", img["name"]);
            assert_same_pixels(&got, &fixture_image(case["file"].as_str().unwrap()), &what);
            checked += 1;
        }
    }
    assert_eq!(checked, 9);
    let src = fixture_image("img_portrait.png");
    let e = err_of(resized_crop(&src, 30, 0, 10, 10, 24, 24));
    assert!(e.contains("does not fit") && e.contains("37x53"), "{e}");
}

#[test]
fn resize_pass_order_matches_pillow_13() {
    let meta = cases();
    let resizes = meta["resizes"].as_array().unwrap();
    assert_eq!(resizes.len(), 6);
    for case in resizes {
        let src = fixture_image(case["source"].as_str().unwrap());
        let (w, h) = (case["size"][0].as_u64().unwrap() as usize, case["size"][1].as_u64().unwrap() as usize);
        let got = match case["filter"].as_str().unwrap() {
            "bilinear" => resize_bilinear(&src, w, h).unwrap(),
            _ => resize_bicubic(&src, w, h).unwrap(),
        };
        let what = format!("{} resize of {} to {w}x{h}", case["filter"], case["source"]);
        assert_same_pixels(&got, &fixture_image(case["file"].as_str().unwrap()), &what);
    }
}

fn as_f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn normalization_matches_torchvision_for_every_level() {
    let norm: Value = serde_json::from_str(&fs::read_to_string(fixtures().join("normalize.json")).unwrap()).unwrap();
    // An image holding every level in every channel.
    let levels: Vec<u8> = (0..=255u8).flat_map(|v| [v, v, v]).collect();
    let img = ImageRgb::new(256, 1, levels).unwrap();
    let got = normalized_chw(&img, IMAGENET_MEAN, IMAGENET_STD);
    for c in 0..3 {
        let want = as_f32s(&norm["table"][c]);
        for v in 0..256 {
            let (a, b) = (got[c * 256 + v], want[v]);
            assert!((a - b).abs() <= 1e-6, "channel {c} level {v}: {a} vs torchvision {b}");
        }
    }
    let exact = (0..3).all(|c| as_f32s(&norm["table"][c]).iter().enumerate().all(|(v, b)| got[c * 256 + v] == *b));
    assert!(exact, "the same f32 operations should agree to the bit");

    // The whole eval pipeline end to end.
    let want = as_f32s(&norm["eval_portrait_24"]);
    let got = eval_transform(&fixture_image("img_portrait.png"), 24).unwrap();
    assert_eq!(got.len(), want.len());
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-6, "eval pipeline differs by {worst}");

    let mut short = vec![0f32; 10];
    assert!(err_of(normalize_into(&img, IMAGENET_MEAN, IMAGENET_STD, &mut short)).contains("768"));
}

// ---------------------------------------------------------------------------------------
// The random window

/// Checks one box against the image and the exact consequences of torchvision's
/// algorithm: inside the image; when not the fallback, the unrounded area lay in
/// `scale · A` and the unrounded ratio in `ratio` (each side is within 0.5 of its
/// unrounded value).
fn check_box(b: &CropBox, w: usize, h: usize, scale: (f64, f64), ratio: (f64, f64)) {
    assert!(b.width >= 1 && b.height >= 1, "{b:?}");
    assert!(b.left + b.width <= w && b.top + b.height <= h, "{b:?} outside {w}x{h}");
    if b.fallback {
        return;
    }
    let (bw, bh, area) = (b.width as f64, b.height as f64, (w * h) as f64);
    assert!((bw + 0.5) * (bh + 0.5) >= scale.0 * area, "{b:?}: area below {} of {w}x{h}", scale.0);
    assert!((bw - 0.5) * (bh - 0.5) <= scale.1 * area, "{b:?}: area above {} of {w}x{h}", scale.1);
    assert!((bw + 0.5) / (bh - 0.5) >= ratio.0, "{b:?}: ratio below {}", ratio.0);
    assert!((bw - 0.5) / (bh + 0.5) <= ratio.1, "{b:?}: ratio above {}", ratio.1);
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

#[test]
fn random_crop_boxes_stay_inside_and_within_scale_and_ratio() {
    let mut rng = Rng::new(7);
    for &(w, h) in &[(256, 256), (37, 53), (64, 48), (300, 200), (224, 400), (5, 4), (1, 1), (3, 1)] {
        for _ in 0..2000 {
            let b = random_resized_crop_params(w, h, SYNTHCLIP_SCALE, SYNTHCLIP_RATIO, &mut rng).unwrap();
            check_box(&b, w, h, SYNTHCLIP_SCALE, SYNTHCLIP_RATIO);
        }
    }
}

#[test]
fn random_crop_falls_back_after_ten_failed_tries() {
    // 300×200 is wider than 4/3, so large windows often do not fit. The chance p that one
    // try fails, integrated over the (area, log ratio) square with torchvision's rounding,
    // gives the fallback rate p¹⁰ (about 1.3 %); 5 tries would give 11 %, 20 almost none.
    let (w, h) = (300usize, 200usize);
    let grid = 600;
    let mut fails = 0usize;
    let (lo, hi) = (SYNTHCLIP_RATIO.0.ln(), SYNTHCLIP_RATIO.1.ln());
    for i in 0..grid {
        let f = 0.5 + 0.5 * (i as f64 + 0.5) / grid as f64;
        for j in 0..grid {
            let a = (lo + (hi - lo) * (j as f64 + 0.5) / grid as f64).exp();
            let area = f * (w * h) as f64;
            let (cw, ch) = ((area * a).sqrt().round_ties_even(), (area / a).sqrt().round_ties_even());
            fails += (cw > w as f64 || ch > h as f64) as usize;
        }
    }
    let p = fails as f64 / (grid * grid) as f64;
    let expected = p.powi(10);
    let n = 40000;
    let mut rng = Rng::new(5);
    let got = (0..n)
        .filter(|_| random_resized_crop_params(w, h, SYNTHCLIP_SCALE, SYNTHCLIP_RATIO, &mut rng).unwrap().fallback)
        .count() as f64
        / n as f64;
    let sd = (expected * (1.0 - expected) / n as f64).sqrt();
    assert!((got - expected).abs() < 4.0 * sd, "fallback rate {got}, expected {expected} (p = {p}, sd {sd})");
    // The fallback window of this image: full height, width round(200 · 4/3) = 267.
    let b = (0..)
        .map(|_| random_resized_crop_params(w, h, SYNTHCLIP_SCALE, SYNTHCLIP_RATIO, &mut rng).unwrap())
        .find(|b| b.fallback)
        .unwrap();
    assert_eq!(b, CropBox { top: 0, left: 16, height: 200, width: 267, fallback: true });
}

#[test]
fn random_crop_laws_area_uniform_and_ratio_log_uniform() {
    let n = 20000;
    let mut rng = Rng::new(11);
    // Ratio fixed at 1 on a large square image: every try fits and the area fraction is
    // uniform in [0.5, 1] (mean 0.75, sd 0.5/√12 ≈ 0.1443); the side rounding is < 0.1 %.
    let fr: Vec<f64> = (0..n)
        .map(|_| {
            let b = random_resized_crop_params(2000, 2000, (0.5, 1.0), (1.0, 1.0), &mut rng).unwrap();
            assert!(!b.fallback);
            (b.width * b.height) as f64 / 4e6
        })
        .collect();
    let (mean, sd) = mean_sd(&fr);
    assert!((mean - 0.75).abs() < 0.004, "area fraction mean {mean}");
    assert!((sd - 0.5 / 12f64.sqrt()).abs() < 0.005, "area fraction sd {sd}");
    let below = fr.iter().filter(|&&f| f < 0.625).count() as f64 / n as f64;
    assert!((below - 0.25).abs() < 0.015, "P(area < 0.625) = {below}");

    // Area fixed at half: every try fits (the widest window is √(2/3) of the side), and
    // ln(w/h) is uniform in [ln 3/4, ln 4/3]: mean 0, sd ln(16/9)/√12 ≈ 0.1661. A ratio
    // uniform in [3/4, 4/3] instead would give a mean log ratio of about 0.015.
    let lr: Vec<f64> = (0..n)
        .map(|_| {
            let b = random_resized_crop_params(2000, 2000, (0.5, 0.5), SYNTHCLIP_RATIO, &mut rng).unwrap();
            assert!(!b.fallback);
            (b.width as f64 / b.height as f64).ln()
        })
        .collect();
    let (mean, sd) = mean_sd(&lr);
    assert!(mean.abs() < 0.005, "log ratio mean {mean}");
    assert!((sd - (16.0f64 / 9.0).ln() / 12f64.sqrt()).abs() < 0.005, "log ratio sd {sd}");
    let lo = (3.0f64 / 4.0).ln();
    let first_quarter = lr.iter().filter(|&&x| x < lo / 2.0).count() as f64 / n as f64;
    assert!((first_quarter - 0.25).abs() < 0.015, "P(log ratio < ln(3/4)/2) = {first_quarter}");

    // The offsets of the drawn windows are uniform over the free room, top and left alike.
    let mut tops = Vec::new();
    let mut lefts = Vec::new();
    for _ in 0..n {
        let b = random_resized_crop_params(300, 200, SYNTHCLIP_SCALE, SYNTHCLIP_RATIO, &mut rng).unwrap();
        if b.fallback {
            continue;
        }
        if b.height < 200 {
            tops.push(b.top as f64 / (200 - b.height) as f64);
        }
        if b.width < 300 {
            lefts.push(b.left as f64 / (300 - b.width) as f64);
        }
    }
    for (what, v) in [("top", &tops), ("left", &lefts)] {
        let (mean, _) = mean_sd(v);
        assert!((mean - 0.5).abs() < 0.01, "{what} position mean {mean}");
        let low = v.iter().filter(|&&x| x < 0.25).count() as f64 / v.len() as f64;
        assert!((low - 0.25).abs() < 0.02, "{what}: P(< 1/4 of the room) = {low}");
    }
}

#[test]
fn random_crop_fallback_for_extreme_aspect_ratios() {
    let mut rng = Rng::new(3);
    // 1000×10: every try needs a window taller than the image, so the fallback keeps the
    // height and takes width round(10 · 4/3) = 13, centred with floor offsets.
    for _ in 0..50 {
        let b = random_resized_crop_params(1000, 10, SYNTHCLIP_SCALE, SYNTHCLIP_RATIO, &mut rng).unwrap();
        assert_eq!(b, CropBox { top: 0, left: 493, height: 10, width: 13, fallback: true });
        let b = random_resized_crop_params(10, 1000, SYNTHCLIP_SCALE, SYNTHCLIP_RATIO, &mut rng).unwrap();
        assert_eq!(b, CropBox { top: 493, left: 0, height: 13, width: 10, fallback: true });
    }
    // An in-range image whose tries never fit (scale above 1) is taken whole.
    let b = random_resized_crop_params(40, 30, (2.0, 3.0), SYNTHCLIP_RATIO, &mut rng).unwrap();
    assert_eq!(b, CropBox { top: 0, left: 0, height: 30, width: 40, fallback: true });
    // Invalid ranges and empty images are errors, not panics.
    assert!(random_resized_crop_params(10, 10, (0.0, 1.0), SYNTHCLIP_RATIO, &mut rng).is_err());
    assert!(random_resized_crop_params(10, 10, SYNTHCLIP_SCALE, (2.0, 1.0), &mut rng).is_err());
    assert!(random_resized_crop_params(0, 10, SYNTHCLIP_SCALE, SYNTHCLIP_RATIO, &mut rng).is_err());
}

#[test]
fn train_transform_is_the_resized_crop_of_its_drawn_window() {
    let src = fixture_image("img_landscape.png");
    let t = ClipTransform::train(24);
    for seed in 0..20 {
        let mut a = Rng::new(seed);
        let mut b = a.clone();
        let got = t.apply_u8(&src, &mut a).unwrap();
        let bx = random_resized_crop_params(64, 48, SYNTHCLIP_SCALE, SYNTHCLIP_RATIO, &mut b).unwrap();
        assert_eq!(got, resized_crop(&src, bx.left, bx.top, bx.width, bx.height, 24, 24).unwrap());
        let full = t.apply(&src, &mut Rng::new(seed)).unwrap();
        assert_eq!(full, normalized_chw(&got, IMAGENET_MEAN, IMAGENET_STD));
    }
    // Different draws give different crops.
    let x = t.apply_u8(&src, &mut Rng::new(1)).unwrap();
    let y = t.apply_u8(&src, &mut Rng::new(2)).unwrap();
    assert_ne!(x, y);
}

#[test]
fn sample_rng_depends_on_seed_epoch_and_index_only() {
    let draw = |s, e, i| sample_rng(s, e, i).next_u64();
    assert_eq!(draw(1, 2, 3), draw(1, 2, 3));
    let all = [draw(1, 2, 3), draw(2, 2, 3), draw(1, 3, 3), draw(1, 2, 4), draw(1, 3, 2), draw(0, 0, 0)];
    for i in 0..all.len() {
        for j in 0..i {
            assert_ne!(all[i], all[j], "streams {i} and {j} coincide");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The loader

/// A tab-separated dataset of `n` images named `i{k}.png` with captions `caption {k}`.
fn numbered_dataset(tag: &str, n: usize, policy: BadRowPolicy) -> (PathBuf, Arc<CaptionDataset>) {
    let names: Vec<String> = (0..n).map(|k| format!("i{k}.png")).collect();
    let mut table = String::from("image_path\tcaption\n");
    for (k, name) in names.iter().enumerate() {
        table.push_str(&format!("{name}\tcaption {k}\n"));
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let dir = pairs_dir(tag, "pairs.tsv", &table, &refs);
    let opts = CaptionOptions { bad_rows: policy, ..Default::default() };
    let ds = Arc::new(CaptionDataset::open(dir.join("pairs.tsv"), &opts).unwrap());
    (dir, ds)
}

fn collect(loader: Loader<ClipBatch>) -> Vec<ClipBatch> {
    loader.map(|b| b.unwrap()).collect()
}

#[test]
fn loader_batches_are_the_same_for_any_number_of_workers() {
    let (_dir, ds) = numbered_dataset("workers", 11, BadRowPolicy::Stop);
    let run = |workers: usize| {
        let source = ClipBatches::new(ds.clone(), ClipTransform::train(16), 5);
        collect(source.loader(0..2, 3, LoaderOptions { workers, prefetch: 3 }).unwrap())
    };
    let one = run(1);
    assert_eq!(one.len(), 2 * 3, "11 pairs in batches of 3 with the last dropped, two epochs");
    for other in [run(4), run(0), run(2)] {
        assert_eq!(other.len(), one.len());
        for (a, b) in one.iter().zip(&other) {
            assert_eq!((a.epoch, a.position, &a.indices, &a.captions), (b.epoch, b.position, &b.indices, &b.captions));
            assert!(a.pixels == b.pixels, "epoch {} batch {}: pixels differ", a.epoch, a.position);
        }
    }
    // The batch holds exactly the per-sample pipeline.
    let b = &one[4];
    assert_eq!((b.len(), b.size, b.pixels.len()), (3, 16, 3 * 3 * 16 * 16));
    for (slot, &i) in b.indices.iter().enumerate() {
        let want = ds.sample(i, &ClipTransform::train(16), b.epoch, 5).unwrap();
        assert!(b.pixels[slot * 768..(slot + 1) * 768] == want[..], "sample {i}");
        assert_eq!(b.captions[slot], format!("caption {i}"));
    }
    assert_eq!(b.pixels_tensor().unwrap().shape(), &[3, 3, 16, 16]);
    // Epochs differ in order and crops.
    assert_ne!(one[0].indices, one[3].indices);
}

#[test]
fn loader_visits_every_index_once_per_epoch() {
    let (_dir, ds) = numbered_dataset("cover", 10, BadRowPolicy::Stop);
    // Evaluation: file order, every pair, a short last batch.
    let source = ClipBatches::new(ds.clone(), ClipTransform::eval(12), 0);
    let batches = collect(source.loader(0..1, 4, LoaderOptions { workers: 3, prefetch: 2 }).unwrap());
    assert_eq!(batches.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
    let all: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(all, (0..10).collect::<Vec<_>>());
    // Training: shuffled, each index at most once per epoch, all but the dropped remainder.
    let source = ClipBatches::new(ds, ClipTransform::train(12), 9);
    let batches = collect(source.loader(3..6, 4, LoaderOptions::default()).unwrap());
    for epoch in 3..6 {
        let mut seen: Vec<usize> =
            batches.iter().filter(|b| b.epoch == epoch).flat_map(|b| b.indices.clone()).collect();
        assert_eq!(seen.len(), 8);
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 8, "epoch {epoch}: an index repeats");
    }
    // Plans without drop_last cover everything exactly once.
    let plans = epoch_plan(10, 4, 9, 3, true, false).unwrap();
    let mut seen: Vec<usize> = plans.iter().flat_map(|p| p.indices.clone()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    assert!(epoch_plan(10, 0, 0, 0, true, false).is_err());
}

#[test]
fn loader_hands_a_decode_error_to_the_consumer_under_stop() {
    let (dir, ds) = numbered_dataset("stop", 9, BadRowPolicy::Stop);
    fs::write(dir.join("i4.png"), b"\x89PNG but broken").unwrap();
    for workers in [0, 1, 3] {
        let source = ClipBatches::new(ds.clone(), ClipTransform::eval(8), 0);
        let mut loader = source.loader(0..1, 2, LoaderOptions { workers, prefetch: 2 }).unwrap();
        let mut good = 0;
        let err = loop {
            match loader.next() {
                Some(Ok(_)) => good += 1,
                Some(Err(e)) => break e.to_string(),
                None => panic!("the loader ended without reporting the broken image"),
            }
        };
        assert_eq!(good, 2, "batches before the broken one come out first");
        let table = dir.join("pairs.tsv");
        assert!(err.contains(&format!("{} line 6 (row 5)", table.display())), "{err}");
        assert!(err.contains("i4.png") && err.contains("epoch 0 batch 2"), "{err}");
        assert!(loader.next().is_none(), "the loader ends after an error");
        assert_eq!(loader.remaining(), 0);
    }
}

#[test]
fn loader_skips_an_undecodable_image_under_skip() {
    let (dir, ds) = numbered_dataset("skip", 6, BadRowPolicy::Skip);
    fs::write(dir.join("i1.png"), b"garbage").unwrap();
    let source = ClipBatches::new(ds, ClipTransform::eval(8), 0);
    let batches = collect(source.loader(0..1, 3, LoaderOptions { workers: 2, prefetch: 2 }).unwrap());
    assert_eq!(batches[0].indices, vec![0, 2]);
    assert_eq!(batches[0].captions, vec!["caption 0", "caption 2"]);
    assert_eq!(batches[0].pixels.len(), 2 * 3 * 64);
    assert_eq!(batches[0].skipped.len(), 1);
    let bad = batches[0].skipped[0].to_string();
    assert!(bad.contains("pairs.tsv line 3 (row 2)") && bad.contains("i1.png"), "{bad}");
    assert_eq!(batches[1].indices, vec![3, 4, 5]);
    assert!(batches[1].skipped.is_empty());
}

/// A source that counts the batches it has built and can panic or fail on one plan.
struct Counting {
    built: AtomicUsize,
    panic_at: Option<usize>,
    fail_at: Option<usize>,
}

impl BatchSource for Counting {
    type Batch = usize;
    fn make_batch(&self, plan: &BatchPlan) -> Result<usize> {
        self.built.fetch_add(1, Ordering::SeqCst);
        if self.panic_at == Some(plan.position) {
            panic!("boom at {}", plan.position);
        }
        if self.fail_at == Some(plan.position) {
            synthos_engine::bail!("failed at {}", plan.position);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        Ok(plan.position)
    }
}

fn counting(panic_at: Option<usize>, fail_at: Option<usize>) -> Arc<Counting> {
    Arc::new(Counting { built: AtomicUsize::new(0), panic_at, fail_at })
}

#[test]
fn loader_prefetch_is_bounded_and_drop_is_clean() {
    let plans = epoch_plan(1000, 0, 0, 1, false, false).unwrap();
    let source = counting(None, None);
    let mut loader = Loader::new(source.clone(), plans.clone(), LoaderOptions { workers: 4, prefetch: 3 }).unwrap();
    assert_eq!(loader.next().unwrap().unwrap(), 0);
    std::thread::sleep(std::time::Duration::from_millis(100));
    // One batch handed out, at most `prefetch` claimed beyond it.
    let built = source.built.load(Ordering::SeqCst);
    assert!((2..=4).contains(&built), "{built} batches built with one consumed and prefetch 3");
    for k in 1..10 {
        assert_eq!(loader.next().unwrap().unwrap(), k);
    }
    drop(loader);
    let after = source.built.load(Ordering::SeqCst);
    assert!(after <= 13, "{after} built; the workers must stop when the loader is dropped");
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(source.built.load(Ordering::SeqCst), after, "no worker is left running");
    assert_eq!(Arc::strong_count(&source), 1, "the workers released the source");

    assert!(Loader::new(counting(None, None), plans.clone(), LoaderOptions { workers: 1, prefetch: 0 }).is_err());
    // Sizes a user can type that would try to start 2^32 threads or a 2^40-slot channel.
    for (options, want) in [
        (LoaderOptions { workers: 1 << 32, prefetch: 4 }, "at most 256 worker threads"),
        (LoaderOptions { workers: 1, prefetch: 1 << 40 }, "prefetch must be 1 to 4096"),
    ] {
        let e = Loader::new(counting(None, None), plans.clone(), options).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains(want)), "{want}: {e:?}");
    }
}

#[test]
fn loader_turns_failures_and_panics_into_errors_in_order() {
    let plans = epoch_plan(8, 0, 0, 1, false, false).unwrap();
    for (source, what) in [(counting(Some(5), None), "panicked: boom at 5"), (counting(None, Some(5)), "failed at 5")] {
        for workers in [0, 3] {
            let mut loader =
                Loader::new(source.clone(), plans.clone(), LoaderOptions { workers, prefetch: 4 }).unwrap();
            let got: Vec<Result<usize>> = loader.by_ref().collect();
            assert_eq!(got.len(), 6, "five batches, then the error, then the end");
            for (k, r) in got.iter().take(5).enumerate() {
                assert_eq!(*r.as_ref().unwrap(), k);
            }
            let e = got[5].as_ref().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
    }
}
