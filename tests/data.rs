//! Data pipeline: the CSV reader's edge cases, dataset validation messages and policies,
//! resize-to-cover + center crop against Pillow/torchvision (via DiffSynth's operator) and
//! against the documented formula, image decoding, and the demo set.
mod common;
use common::temp_dir;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use synthos_engine::data::csv::{format_record, parse_csv, read_csv};
use synthos_engine::data::demo::{self, Colour, DemoAttrs, Shape, ShapeSize, Texture};
use synthos_engine::data::{epoch_order, BadRowPolicy, DatasetOptions, SynthosDataset};
use synthos_engine::image::resize::{center_crop, cover_size, resize_bilinear, resize_cover_crop};
use synthos_engine::image::ImageRgb;
use synthos_engine::Tensor;

fn err_of<T: std::fmt::Debug>(r: synthos_engine::Result<T>) -> String {
    r.unwrap_err().to_string()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

/// A test image with smooth gradients and a fine pattern (exercises interpolation and
/// antialiasing).
fn gradient_image(w: usize, h: usize) -> ImageRgb {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            data.push((x * 255 / (w - 1).max(1)) as u8);
            data.push((y * 255 / (h - 1).max(1)) as u8);
            data.push((((x * 7 + y * 13) % 17) * 15) as u8);
        }
    }
    ImageRgb::new(w, h, data).unwrap()
}

fn write_png(path: &Path, img: &ImageRgb) {
    img.save_png(path).unwrap();
}

// ---------------------------------------------------------------------------------------
// CSV

#[test]
fn csv_plain_quoted_and_doubled_quotes() {
    let t = parse_csv("video,prompt\na.png,hello\n\"b,c.png\",\"say \"\"hi\"\", then go\"\n", "m.csv").unwrap();
    assert_eq!(t.header, vec!["video", "prompt"]);
    assert_eq!(t.rows.len(), 2);
    assert_eq!(t.rows[0].fields, vec!["a.png", "hello"]);
    assert_eq!(t.rows[1].fields, vec!["b,c.png", "say \"hi\", then go"]);
    assert_eq!((t.rows[0].line, t.rows[1].line), (2, 3));
}

#[test]
fn csv_crlf_bom_blank_lines_and_no_final_newline() {
    let t = parse_csv("\u{feff}video,prompt\r\n\r\na.png,x\r\n\r\nb.png,y", "m.csv").unwrap();
    assert_eq!(t.header, vec!["video", "prompt"], "the BOM must not stick to the first column name");
    assert_eq!(t.rows.len(), 2);
    assert_eq!(t.rows[0].fields, vec!["a.png", "x"]);
    assert_eq!(t.rows[1].fields, vec!["b.png", "y"]);
    assert_eq!((t.rows[0].line, t.rows[1].line), (3, 5));
    // Lone CR line endings (old Mac) also end records.
    let t = parse_csv("a,b\r1,2\r", "m.csv").unwrap();
    assert_eq!(t.rows.len(), 1);
    assert_eq!(t.rows[0].fields, vec!["1", "2"]);
}

#[test]
fn csv_multiline_quoted_field_keeps_line_numbers() {
    let text = "video,prompt\na.png,\"two\nlines\"\nb.png,\"crlf\r\ninside\"\nc.png,z\n";
    let t = parse_csv(text, "m.csv").unwrap();
    assert_eq!(t.rows.len(), 3);
    assert_eq!(t.rows[0].fields[1], "two\nlines");
    assert_eq!(t.rows[1].fields[1], "crlf\r\ninside");
    assert_eq!(t.rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 4, 6]);
}

#[test]
fn csv_empty_fields_and_ragged_rows_are_kept() {
    let t = parse_csv("a,b,c\n1,,3\n,\n\"\"\n4,5,6,7\n", "m.csv").unwrap();
    assert_eq!(t.rows[0].fields, vec!["1", "", "3"]);
    assert_eq!(t.rows[1].fields, vec!["", ""]);
    assert_eq!(t.rows[2].fields, vec![""]);
    assert_eq!(t.rows[3].fields, vec!["4", "5", "6", "7"]);
    // A quote inside an unquoted field is literal (as pandas reads it).
    let t = parse_csv("a\nsay \"x\"\n", "m.csv").unwrap();
    assert_eq!(t.rows[0].fields, vec!["say \"x\""]);
}

#[test]
fn csv_errors_name_file_and_line() {
    let e = err_of(parse_csv("a,b\n1,2\n3,\"open\nstill open\n", "data/m.csv"));
    assert!(e.contains("data/m.csv line 3") && e.contains("never closed"), "{e}");
    let e = err_of(parse_csv("a,b\n1,2\n\"x\"y,2\n", "data/m.csv"));
    assert!(e.contains("data/m.csv line 3") && e.contains("after the closing quote"), "{e}");
    let e = err_of(parse_csv("\n\n", "data/m.csv"));
    assert!(e.contains("data/m.csv") && e.contains("empty"), "{e}");

    let dir = temp_dir("data-csv-utf8");
    let path = dir.join("bad.csv");
    fs::write(&path, b"video,prompt\na.png,ok\nb.png,\xff\xfe\n").unwrap();
    let e = err_of(read_csv(&path));
    assert!(e.contains("bad.csv line 3") && e.contains("UTF-8"), "{e}");
    let e = err_of(read_csv(dir.join("absent.csv")));
    assert!(e.contains("absent.csv"), "{e}");
}

#[test]
fn csv_format_record_round_trips() {
    let rows = [
        vec!["images/a.png".to_string(), "plain text".to_string()],
        vec!["b,c.png".to_string(), "with \"quotes\", commas\nand a newline".to_string()],
        vec![" padded ".to_string(), String::new()],
    ];
    let mut text = format_record(&["video", "prompt"]);
    for r in &rows {
        text.push_str(&format_record(r));
    }
    assert!(text.starts_with("video,prompt\nimages/a.png,plain text\n"), "{text}");
    let t = parse_csv(&text, "m.csv").unwrap();
    assert_eq!(t.rows.iter().map(|r| r.fields.clone()).collect::<Vec<_>>(), rows.to_vec());
}

// ---------------------------------------------------------------------------------------
// Dataset validation

/// A dataset folder with `metadata` as its CSV and a 20×10 PNG for each name in `images`.
fn dataset_dir(tag: &str, metadata: &str, images: &[&str]) -> PathBuf {
    let dir = temp_dir(tag);
    for name in images {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        write_png(&path, &gradient_image(20, 10));
    }
    fs::write(dir.join("metadata.csv"), metadata).unwrap();
    dir
}

fn skip() -> DatasetOptions {
    DatasetOptions { bad_rows: BadRowPolicy::Skip, ..Default::default() }
}

#[test]
fn dataset_opens_and_samples() {
    let dir = dataset_dir(
        "ok",
        "video,prompt\nimages/a.png,a red thing\nimages/b.png,\"a blue, round thing\"\n",
        &["images/a.png", "images/b.png"],
    );
    let ds = SynthosDataset::open(&dir, &DatasetOptions::default()).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.image_column(), "video");
    assert!(ds.skip_report().is_none());
    let s = ds.get(1, 8, 6).unwrap();
    assert_eq!((s.width, s.height, s.image.len()), (8, 6, 3 * 8 * 6));
    assert_eq!(s.prompt, "a blue, round thing");
    assert_eq!(s.path, dir.join("images/b.png"));
    assert!(s.image.iter().all(|v| (-1.0..=1.0).contains(v)));
    // The sample is exactly the documented pipeline: decode, cover, crop, scale.
    let expected = resize_cover_crop(&ImageRgb::open(dir.join("images/b.png")).unwrap(), 8, 6).unwrap().to_chw();
    assert_eq!(s.image, expected);
    assert_eq!(s.to_tensor().unwrap().shape(), &[3, 6, 8]);

    let b = ds.batch(&[1, 0, 1], 8, 6).unwrap();
    assert_eq!(b.images.shape(), &[3, 3, 6, 8]);
    assert_eq!(b.prompts, vec!["a blue, round thing", "a red thing", "a blue, round thing"]);
    assert_eq!(b.indices, vec![1, 0, 1]);
    assert_eq!(&b.images.to_vec().unwrap()[..3 * 48], &expected[..]);

    let e = err_of(ds.get(2, 8, 6));
    assert!(e.contains("index 2") && e.contains("2 samples"), "{e}");
}

#[test]
fn dataset_accepts_path_and_image_columns_and_prefers_video() {
    let dir = dataset_dir("cols", "prompt,path\nhello,x.png\n", &["x.png"]);
    assert_eq!(SynthosDataset::open(&dir, &DatasetOptions::default()).unwrap().image_column(), "path");
    fs::write(dir.join("metadata.csv"), " image , prompt \nx.png,hello\n").unwrap();
    assert_eq!(SynthosDataset::open(&dir, &DatasetOptions::default()).unwrap().image_column(), "image");
    fs::write(dir.join("metadata.csv"), "image,video,prompt\nnope.png,x.png,hello\n").unwrap();
    let ds = SynthosDataset::open(&dir, &DatasetOptions::default()).unwrap();
    assert_eq!(ds.image_column(), "video");
    assert_eq!(ds.entries()[0].path, dir.join("x.png"));
    // A metadata file elsewhere; paths stay relative to the dataset folder.
    let other = temp_dir("data-cols-meta").join("list.csv");
    fs::write(&other, "video,prompt\nx.png,hi\n").unwrap();
    let ds =
        SynthosDataset::open(&dir, &DatasetOptions { metadata: Some(other.clone()), ..Default::default() }).unwrap();
    assert_eq!((ds.len(), ds.metadata_path()), (1, other.as_path()));
}

#[test]
fn dataset_missing_columns_lists_the_columns_found() {
    let dir = dataset_dir("nocol", "file,caption\nx.png,hello\n", &["x.png"]);
    let e = err_of(SynthosDataset::open(&dir, &DatasetOptions::default()));
    assert!(e.contains("metadata.csv"), "{e}");
    assert!(e.contains("image column") && e.contains("`prompt` column"), "{e}");
    assert!(e.contains("`file`, `caption`"), "found columns must be listed: {e}");

    fs::write(dir.join("metadata.csv"), "video,caption\nx.png,hello\n").unwrap();
    let e = err_of(SynthosDataset::open(&dir, &DatasetOptions::default()));
    assert!(e.contains("missing a `prompt` column") && !e.contains("image column"), "{e}");

    fs::write(dir.join("metadata.csv"), "video,prompt,prompt\nx.png,a,b\n").unwrap();
    let e = err_of(SynthosDataset::open(&dir, &DatasetOptions::default()));
    assert!(e.contains("`prompt` appears twice"), "{e}");

    fs::write(dir.join("metadata.csv"), "video,prompt\n").unwrap();
    let e = err_of(SynthosDataset::open(&dir, &DatasetOptions::default()));
    assert!(e.contains("no data rows"), "{e}");

    fs::remove_file(dir.join("metadata.csv")).unwrap();
    let e = err_of(SynthosDataset::open(&dir, &DatasetOptions::default()));
    assert!(e.contains("metadata.csv") && e.contains("not found"), "{e}");
    let e = err_of(SynthosDataset::open(dir.join("nope"), &DatasetOptions::default()));
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
}

/// Rows: 1 good, 2 without prompt (after a two-line prompt, so line ≠ row + 1), 3 good,
/// 4 missing file, 5 blank prompt, 6 extra field, 7 no image path.
const MIXED: &str = "video,prompt\n\
a.png,\"a prompt\nover two lines\"\n\
a.png,\n\
b.png,fine\n\
images/missing.png,where is it\n\
b.png,   \n\
a.png,x,extra\n\
,orphan prompt\n";

#[test]
fn dataset_stop_names_the_first_bad_row() {
    let dir = dataset_dir("stop", MIXED, &["a.png", "b.png"]);
    let e = err_of(SynthosDataset::open(&dir, &DatasetOptions::default()));
    assert!(e.contains("metadata.csv line 4 (row 2): no prompt"), "{e}");
    assert!(e.contains("first of 5 bad rows of 7"), "{e}");
}

#[test]
fn dataset_skip_counts_and_reports() {
    let dir = dataset_dir("skip", MIXED, &["a.png", "b.png"]);
    let ds = SynthosDataset::open(&dir, &skip()).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.entries()[0].prompt, "a prompt\nover two lines");
    assert_eq!((ds.entries()[1].line, ds.entries()[1].row), (5, 3));
    let bad: Vec<(usize, usize)> = ds.skipped().iter().map(|b| (b.line, b.row)).collect();
    assert_eq!(bad, vec![(4, 2), (6, 4), (7, 5), (8, 6), (9, 7)]);
    let missing = &ds.skipped()[1];
    let missing_path = dir.join("images/missing.png");
    assert!(missing.problem.contains(&format!("image file {} not found", missing_path.display())), "{missing}");
    assert!(ds.skipped()[2].problem.contains("no prompt"));
    assert!(ds.skipped()[3].problem.contains("3 fields, but the header has 2"), "{}", ds.skipped()[3]);
    assert!(ds.skipped()[4].problem.contains("no image path in column `video`"), "{}", ds.skipped()[4]);

    let report = ds.skip_report().unwrap();
    assert!(report.starts_with("skipped 5 of 7 rows of "), "{report}");
    assert!(report.contains("line 6 (row 4): image file") && report.contains("missing.png not found"), "{report}");
    // Only the first few messages are quoted.
    let short = SynthosDataset::open(&dir, &DatasetOptions { report_limit: 2, ..skip() }).unwrap();
    let report = short.skip_report().unwrap();
    assert!(report.contains("line 4 (row 2)") && report.contains("line 6 (row 4)"), "{report}");
    assert!(!report.contains("line 7 (row 5)") && report.contains("and 3 more"), "{report}");
}

#[test]
fn dataset_with_no_usable_row_is_an_error() {
    let dir = dataset_dir("allbad", "video,prompt\nx.png,\ny.png,hello\n", &[]);
    let e = err_of(SynthosDataset::open(&dir, &skip()));
    assert!(e.contains("no usable rows") && e.contains("line 2 (row 1): no prompt"), "{e}");
    assert!(e.contains("y.png not found"), "{e}");
}

#[test]
fn dataset_undecodable_images() {
    let dir = dataset_dir("decode", "video,prompt\na.png,good\nbroken.png,bad\nb.png,good too\n", &["a.png", "b.png"]);
    fs::write(dir.join("broken.png"), b"this is not a PNG").unwrap();
    // Existence is checked at open; decoding at get-time names the file and row.
    let ds = SynthosDataset::open(&dir, &DatasetOptions::default()).unwrap();
    assert_eq!(ds.len(), 3);
    let e = err_of(ds.get(1, 8, 8));
    assert!(e.contains("broken.png") && e.contains("line 3 (row 2)"), "{e}");

    let mut stop = ds.clone();
    let e = err_of(stop.check_all());
    assert!(e.contains("line 3 (row 2)") && e.contains("broken.png"), "{e}");
    assert_eq!(stop.len(), 3, "a failed check leaves the dataset as it was");

    let mut skipping = SynthosDataset::open(&dir, &skip()).unwrap();
    assert_eq!(skipping.check_all().unwrap(), 1);
    assert_eq!(skipping.len(), 2);
    assert_eq!(skipping.entries()[1].prompt, "good too");
    assert!(skipping.skip_report().unwrap().contains("broken.png"));
}

#[test]
fn epoch_order_is_a_seeded_permutation() {
    let a = epoch_order(100, 0, 42);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    assert_eq!(a, epoch_order(100, 0, 42), "same epoch and seed give the same order");
    assert_ne!(a, epoch_order(100, 1, 42), "epochs differ");
    assert_ne!(a, epoch_order(100, 0, 43), "seeds differ");
    assert_ne!(a, (0..100).collect::<Vec<_>>(), "the order is shuffled");
    assert!(epoch_order(0, 3, 1).is_empty());
    let dir = dataset_dir("order", "video,prompt\na.png,x\na.png,y\na.png,z\n", &["a.png"]);
    let ds = SynthosDataset::open(&dir, &DatasetOptions::default()).unwrap();
    assert_eq!(ds.epoch_order(5, 9), epoch_order(3, 5, 9));
}

// ---------------------------------------------------------------------------------------
// Resize-to-cover and center crop

/// One pass of the documented formula in plain f64: triangle weights of half-width
/// max(in/out, 1) centred at (i + 0.5)·in/out, normalised. Returns unrounded values.
fn reference_pass(values: &[f64], n_out: usize) -> Vec<f64> {
    let n_in = values.len();
    let scale = n_in as f64 / n_out as f64;
    let fs = scale.max(1.0);
    (0..n_out)
        .map(|i| {
            let c = (i as f64 + 0.5) * scale;
            let (mut num, mut den) = (0.0, 0.0);
            for (j, v) in values.iter().enumerate() {
                let w = (1.0 - ((j as f64 + 0.5 - c) / fs).abs()).max(0.0);
                num += w * v;
                den += w;
            }
            num / den
        })
        .collect()
}

/// The documented two-pass resize in f64 (horizontal pass rounded to 8 bits, then the
/// vertical pass); only the fixed-point quantisation of the weights is left out. Also
/// returns, per output byte, whether its last pass landed within 1e-6 of a rounding tie.
fn reference_resize(src: &ImageRgb, out_w: usize, out_h: usize) -> (Vec<u8>, Vec<bool>) {
    let round = |v: f64| (v + 0.5).floor().clamp(0.0, 255.0);
    let near_tie = |v: f64| (v - v.floor() - 0.5).abs() < 1e-6;
    let (w, h) = (src.width(), src.height());
    let mut mid = vec![0.0; out_w * h * 3];
    let mut tie = vec![false; out_w * h * 3];
    for y in 0..h {
        for c in 0..3 {
            let row: Vec<f64> = (0..w).map(|x| src.pixel(x, y)[c] as f64).collect();
            let r = if out_w == w { row } else { reference_pass(&row, out_w) };
            for (x, v) in r.into_iter().enumerate() {
                mid[(y * out_w + x) * 3 + c] = round(v);
                tie[(y * out_w + x) * 3 + c] = near_tie(v);
            }
        }
    }
    if out_h == h {
        return (mid.iter().map(|&v| v as u8).collect(), tie);
    }
    let mut out = vec![0u8; out_w * out_h * 3];
    let mut out_tie = vec![false; out_w * out_h * 3];
    for x in 0..out_w {
        for c in 0..3 {
            let col: Vec<f64> = (0..h).map(|y| mid[(y * out_w + x) * 3 + c]).collect();
            for (y, v) in reference_pass(&col, out_h).into_iter().enumerate() {
                out[(y * out_w + x) * 3 + c] = round(v) as u8;
                out_tie[(y * out_w + x) * 3 + c] = near_tie(v);
            }
        }
    }
    (out, out_tie)
}

#[test]
fn resize_matches_the_documented_formula() {
    let sizes = [(64, 48, 43, 32), (37, 23, 26, 16), (13, 9, 40, 28), (17, 11, 5, 3), (9, 31, 9, 7), (200, 3, 7, 3)];
    for &(w, h, ow, oh) in &sizes {
        let src = gradient_image(w, h);
        // One axis at a time the formula is exact, except at rounding ties that the
        // 22-bit fixed-point weights may break either way.
        for (tw, th) in [(ow, h), (w, oh)] {
            let got = resize_bilinear(&src, tw, th).unwrap();
            let (want, tie) = reference_resize(&src, tw, th);
            assert_eq!((got.width(), got.height()), (tw, th));
            for (k, (&a, &b)) in got.data().iter().zip(&want).enumerate() {
                let ok = a == b || (tie[k] && (a as i32 - b as i32).abs() == 1);
                assert!(ok, "{w}x{h} -> {tw}x{th}: byte {k}: {a} vs formula {b}");
            }
        }
        // Both axes: a tie flipped in the first pass can move the second by one level.
        let got = resize_bilinear(&src, ow, oh).unwrap();
        let (want, _) = reference_resize(&src, ow, oh);
        let diffs: Vec<i32> = got.data().iter().zip(&want).map(|(&a, &b)| (a as i32 - b as i32).abs()).collect();
        let max = diffs.iter().max().copied().unwrap_or(0);
        let off = diffs.iter().filter(|&&d| d != 0).count();
        assert!(max <= 1, "{w}x{h} -> {ow}x{oh}: max difference {max}");
        assert!(off * 20 <= diffs.len(), "{w}x{h} -> {ow}x{oh}: {off} of {} values differ", diffs.len());
    }
}

#[test]
fn resize_same_size_is_identity_and_sizes_round_half_even() {
    let src = gradient_image(11, 7);
    assert_eq!(resize_bilinear(&src, 11, 7).unwrap(), src);
    assert_eq!(cover_size(2, 3, 5, 3), (5, 8), "3 x 2.5 = 7.5 rounds to 8");
    assert_eq!(cover_size(2, 5, 5, 3), (5, 12), "5 x 2.5 = 12.5 rounds to 12");
    assert_eq!(cover_size(640, 427, 480, 480), (719, 480));
    assert_eq!(cover_size(1000, 1000, 832, 480), (832, 832));
    // Crop offsets: (45 - 30) / 2 = 7.5 rounds to 8, (8 - 3) / 2 = 2.5 to 2.
    let src = gradient_image(45, 31);
    let c = center_crop(&src, 30, 31).unwrap();
    assert_eq!(c.pixel(0, 0), src.pixel(8, 0));
    let src = gradient_image(5, 8);
    assert_eq!(center_crop(&src, 5, 3).unwrap().pixel(0, 0), src.pixel(0, 2));
    let e = err_of(center_crop(&src, 6, 3));
    assert!(e.contains("6x3") && e.contains("5x8"), "{e}");
    assert!(err_of(resize_bilinear(&src, 0, 3)).contains("empty"));
}

#[test]
fn resize_cover_crop_matches_pillow_and_torchvision() {
    let meta: Value = serde_json::from_str(&fs::read_to_string(fixtures().join("cases.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let src = ImageRgb::open(fixtures().join(case["source"].as_str().unwrap())).unwrap();
        let expected = ImageRgb::open(fixtures().join(case["expected"].as_str().unwrap())).unwrap();
        let size = |k: &str| (case[k][0].as_u64().unwrap() as usize, case[k][1].as_u64().unwrap() as usize);
        let (tw, th) = size("target_size");
        assert_eq!((src.width(), src.height()), size("source_size"), "{name}");
        assert_eq!(cover_size(src.width(), src.height(), tw, th), size("resized_size"), "{name}");
        let got = resize_cover_crop(&src, tw, th).unwrap();
        assert_eq!((got.width(), got.height()), (tw, th), "{name}");
        if name == "jpeg" {
            // PIL decodes with libjpeg-turbo, we with zune-jpeg: a level or two apart.
            let max = got.data().iter().zip(expected.data()).map(|(&a, &b)| (a as i32 - b as i32).abs()).max();
            assert!(max.unwrap() <= 3, "{name}: JPEG path differs by up to {max:?} levels");
        } else {
            let first = got.data().iter().zip(expected.data()).position(|(a, b)| a != b);
            assert!(first.is_none(), "{name}: first byte that differs from Pillow: {first:?}");
        }
        if let Some(values) = case.get("chw_values") {
            let want: Vec<f32> = values.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(expected.to_chw(), want, "{name}: [-1, 1] scaling must match DiffSynth's preprocess_image");
        }
        checked += 1;
    }
    assert_eq!(checked, 9);
}

// ---------------------------------------------------------------------------------------
// Image decoding and conversion

#[test]
fn decoding_drops_alpha_and_expands_grey() {
    let dir = temp_dir("data-decode-formats");
    let rgba = image::RgbaImage::from_raw(2, 1, vec![200, 10, 20, 0, 1, 2, 3, 255]).unwrap();
    rgba.save(dir.join("rgba.png")).unwrap();
    let img = ImageRgb::open(dir.join("rgba.png")).unwrap();
    assert_eq!((img.pixel(0, 0), img.pixel(1, 0)), ([200, 10, 20], [1, 2, 3]), "alpha is dropped, not blended");
    let grey = image::GrayImage::from_raw(2, 1, vec![7, 250]).unwrap();
    // A misleading extension: the format is read from the content.
    grey.save_with_format(dir.join("grey.jpg"), image::ImageFormat::Png).unwrap();
    let img = ImageRgb::open(dir.join("grey.jpg")).unwrap();
    assert_eq!((img.pixel(0, 0), img.pixel(1, 0)), ([7, 7, 7], [250, 250, 250]));
    let e = err_of(ImageRgb::open(dir.join("absent.png")));
    assert!(e.contains("absent.png"), "{e}");
}

#[test]
fn chw_conversions_round_trip() {
    let img = gradient_image(7, 5);
    let chw = img.to_chw();
    assert_eq!(chw.len(), 3 * 35);
    assert_eq!(chw[0], -1.0, "red of pixel (0,0) is 0 -> -1");
    assert_eq!(chw[34], 1.0, "red of the last pixel is 255 -> 1");
    assert_eq!(ImageRgb::from_chw(&chw, 5, 7).unwrap(), img);
    let t = img.to_tensor().unwrap();
    assert_eq!(t.shape(), &[3, 5, 7]);
    assert_eq!(ImageRgb::from_tensor(&t).unwrap(), img);
    let batched = Tensor::from_vec(chw.clone(), &[1, 3, 5, 7], synthos_engine::Device::Cpu).unwrap();
    assert_eq!(ImageRgb::from_tensor(&batched).unwrap(), img);
    // Clamping and rounding: beyond the range saturates, 0 maps to 127.5 -> 128.
    let odd = ImageRgb::from_chw(&[-3.0, 0.0, 7.0], 1, 1).unwrap();
    assert_eq!(odd.pixel(0, 0), [0, 128, 255]);
    assert!(err_of(ImageRgb::from_chw(&chw, 5, 6)).contains("[3, 5, 6]"));
    let bad = Tensor::from_vec(vec![0.0; 8], &[2, 2, 2], synthos_engine::Device::Cpu).unwrap();
    assert!(err_of(ImageRgb::from_tensor(&bad)).contains("[2, 2, 2]"));
    assert!(err_of(ImageRgb::new(2, 2, vec![0; 11])).contains("12 bytes"));
}

#[test]
fn png_save_is_atomic_and_lossless() {
    let dir = temp_dir("data-png");
    let img = gradient_image(13, 6);
    let path = dir.join("sub/dir/out.png");
    img.save_png(&path).unwrap();
    img.save_png(&path).unwrap(); // replacing works too
    assert_eq!(ImageRgb::open(&path).unwrap(), img);
    let names: Vec<String> =
        fs::read_dir(dir.join("sub/dir")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names, vec!["out.png"], "no temporary files are left behind");
}

// ---------------------------------------------------------------------------------------
// Demo set

#[test]
fn demo_captions_parse_back() {
    let all = DemoAttrs::all();
    assert_eq!(all.len(), 3 * 6 * 5 * 2 * 3);
    for a in &all {
        assert_eq!(DemoAttrs::from_caption(&a.caption()), Some(*a), "{}", a.caption());
        assert_ne!(a.colour, a.background);
    }
    let a = DemoAttrs {
        shape: Shape::Square,
        colour: Colour::Green,
        background: Colour::Yellow,
        size: ShapeSize::Small,
        texture: Texture::Stripes,
    };
    assert_eq!(a.caption(), "a small green square with stripes on a yellow background");
    let plain = DemoAttrs::from_caption("A red circle on a blue background.").unwrap();
    assert_eq!((plain.shape, plain.colour, plain.background), (Shape::Circle, Colour::Red, Colour::Blue));
    assert_eq!((plain.size, plain.texture), (ShapeSize::Large, Texture::Plain));
    for bad in ["a red circle", "a red hexagon on a blue background", "a red circle on a blue background now", ""] {
        assert_eq!(DemoAttrs::from_caption(bad), None, "{bad:?}");
    }
}

#[test]
fn demo_images_show_their_captions() {
    for a in DemoAttrs::all() {
        let img = demo::render(&a, 64).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
        assert_eq!(img.pixel(0, 0), a.background.rgb(), "{}: corner is background", a.caption());
        assert_eq!(img.pixel(63, 63), a.background.rgb());
        let centre = img.pixel(32, 32);
        let shape_colours = [a.colour.rgb(), a.colour.pattern_rgb()];
        if a.texture == Texture::Plain {
            assert_eq!(centre, a.colour.rgb(), "{}: centre is the shape colour", a.caption());
        } else {
            // Centre may sit on a stripe/dot edge: it is a blend of the two shades.
            for c in 0..3 {
                let (lo, hi) =
                    (shape_colours[0][c].min(shape_colours[1][c]), shape_colours[0][c].max(shape_colours[1][c]));
                assert!((lo..=hi).contains(&centre[c]), "{}: centre {centre:?}", a.caption());
            }
        }
        let count = |rgb: [u8; 3]| (0..64 * 64).filter(|&p| img.pixel(p % 64, p / 64) == rgb).count();
        let pattern = count(a.colour.pattern_rgb());
        match a.texture {
            Texture::Plain => assert_eq!(pattern, 0, "{}", a.caption()),
            _ => assert!(pattern > 20, "{}: only {pattern} pattern pixels", a.caption()),
        }
        // Antialiased edges: some pixels are neither background nor shape colours (the
        // square's edges may fall on pixel boundaries).
        if a.shape == Shape::Square {
            continue;
        }
        let mixed = (0..64 * 64)
            .map(|p| img.pixel(p % 64, p / 64))
            .filter(|c| *c != a.background.rgb() && !shape_colours.contains(c))
            .count();
        assert!(mixed > 0, "{}: no antialiased pixels", a.caption());
    }
    // Large shapes cover more than small ones.
    let mut a = DemoAttrs::from_caption("a small red triangle on a white background").unwrap();
    let covered = |a: &DemoAttrs| {
        let img = demo::render(a, 64).unwrap();
        (0..64 * 64).filter(|&p| img.pixel(p % 64, p / 64) != a.background.rgb()).count()
    };
    let small = covered(&a);
    a.size = ShapeSize::Large;
    assert!(covered(&a) > 2 * small);
    assert!(err_of(demo::render(&a, 4)).contains("too small"));
}

#[test]
fn demo_set_is_deterministic_and_opens_as_a_dataset() {
    let (d1, d2, d3) = (temp_dir("data-demo1"), temp_dir("data-demo2"), temp_dir("data-demo3"));
    let a1 = demo::generate(&d1, 25, 32, 7).unwrap();
    let a2 = demo::generate(&d2, 25, 32, 7).unwrap();
    let a3 = demo::generate(&d3, 25, 32, 8).unwrap();
    assert_eq!(a1, a2);
    assert_ne!(a1, a3, "another seed gives another set");
    let distinct: std::collections::HashSet<_> = a1.iter().collect();
    assert_eq!(distinct.len(), 25, "no combination repeats before all are used");
    let mut files: Vec<String> = vec!["metadata.csv".into()];
    files.extend((0..25).map(|i| format!("images/{i:05}.png")));
    for f in &files {
        assert_eq!(fs::read(d1.join(f)).unwrap(), fs::read(d2.join(f)).unwrap(), "{f} differs between runs");
    }

    let ds = SynthosDataset::open(&d1, &DatasetOptions::default()).unwrap();
    assert_eq!(ds.len(), 25);
    for (i, a) in a1.iter().enumerate() {
        assert_eq!(ds.entries()[i].prompt, a.caption());
        assert_eq!(ds.entries()[i].path, d1.join(format!("images/{i:05}.png")));
    }
    // Caption/content agreement through the whole pipeline: a plain shape's centre pixel.
    let i = a1.iter().position(|a| a.texture == Texture::Plain).unwrap();
    let s = ds.get(i, 32, 32).unwrap();
    let rgb = ImageRgb::from_chw(&s.image, 32, 32).unwrap();
    assert_eq!(rgb.pixel(16, 16), a1[i].colour.rgb(), "{}", s.prompt);
    assert_eq!(rgb.pixel(0, 0), a1[i].background.rgb(), "{}", s.prompt);
    assert!(err_of(demo::generate(&d1, 0, 32, 1)).contains("positive"));
}

#[test]
fn demo_image_reading_finds_colours_and_shapes() {
    let all = DemoAttrs::all();
    let mut checked = 0;
    for a in &all {
        let img = demo::render(a, 64).unwrap();
        let r = demo::read_image(&img).unwrap();
        assert!(r.colours_match(a), "{}: read {:?} on {:?}", a.caption(), r.shape_colour, r.background);
        assert_eq!(r.iou(&r), 1.0);
        // The mask covers the drawn area: within 20% of the analytic one (antialiased
        // edges and, for patterns, shades nearer another colour are what differ).
        let area = r.mask.iter().filter(|&&m| m).count() as f64 / (64.0 * 64.0);
        let large = a.size == ShapeSize::Large;
        let want = match a.shape {
            Shape::Circle => std::f64::consts::PI * if large { 0.36f64 } else { 0.2 }.powi(2),
            Shape::Square => (2.0 * if large { 0.31f64 } else { 0.17 }).powi(2),
            Shape::Triangle => {
                let r: f64 = if large { 0.42 } else { 0.24 };
                0.75 * 3f64.sqrt() * r * r
            }
        };
        let tol = 0.2;
        assert!((area - want).abs() < tol * want, "{}: area {area:.3} vs {want:.3}", a.caption());
        checked += 1;
    }
    assert_eq!(checked, 540);
    let base = DemoAttrs {
        shape: Shape::Circle,
        colour: Colour::Red,
        background: Colour::Blue,
        size: ShapeSize::Large,
        texture: Texture::Plain,
    };
    let read = |a: DemoAttrs| demo::read_image(&demo::render(&a, 64).unwrap()).unwrap();
    // The same shape in other colours and patterns has the same mask; other shapes and
    // sizes overlap less.
    let recoloured =
        read(DemoAttrs { colour: Colour::White, background: Colour::Green, texture: Texture::Dots, ..base });
    assert!(read(base).iou(&recoloured) > 0.9);
    assert!(!recoloured.colours_match(&base));
    assert!(read(base).iou(&read(DemoAttrs { size: ShapeSize::Small, ..base })) < 0.35);
    assert!(read(base).iou(&read(DemoAttrs { shape: Shape::Triangle, ..base })) < 0.75);
    // Noise: its pixels scatter over the palette, so it is far from any shape.
    let mut rng = synthos_engine::Rng::new(3);
    let noise: Vec<u8> = (0..64 * 64 * 3).map(|_| (rng.uniform() * 255.0) as u8).collect();
    let noisy = demo::read_image(&ImageRgb::new(64, 64, noise).unwrap()).unwrap();
    assert!(noisy.iou(&read(base)) < 0.25, "noise IoU {}", noisy.iou(&read(base)));
    assert!(demo::read_image(&ImageRgb::filled(4, 4, [0, 0, 0]).unwrap()).is_err());
}
