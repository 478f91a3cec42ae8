//! Reporting: metrics lines, loss plots, image grids, the progress display's text, and the
//! bitmap font.
mod common;
use common::temp_dir;

use std::fs;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use synthos_engine::data::demo;
use synthos_engine::image::png::save_chw_png;
use synthos_engine::image::ImageRgb;
use synthos_engine::report::font::{draw_text, glyph, text_width, wrap_text, ADVANCE, GLYPH_H, LINE_HEIGHT};
use synthos_engine::report::{
    auto_smoothing, compose_grid, ema, eta_seconds, format_duration, format_loss, format_progress, format_rate,
    format_tick, grid_layout, image_grid, nice_ticks, plot_loss, plot_loss_with, read_metrics, render_loss_plot,
    series, MetricsRecord, MetricsWriter, PlotOptions, Progress, ProgressState, EMA_RGB, GRID_PAD, MIN_LABEL_CELL_W,
    RAW_RGB,
};

fn err_of<T: std::fmt::Debug>(r: synthos_engine::Result<T>) -> String {
    r.unwrap_err().to_string()
}

fn count_colour(img: &ImageRgb, rgb: [u8; 3]) -> usize {
    img.data().chunks_exact(3).filter(|p| *p == rgb).count()
}

// ---------------------------------------------------------------------------------------
// metrics.jsonl

#[test]
fn metrics_lines_parse_and_survive_reopen() {
    let dir = temp_dir("report-metrics");
    let path = dir.join("run/metrics.jsonl");
    {
        let mut w = MetricsWriter::open(&path).unwrap();
        for step in 1..=3u64 {
            let mut r = MetricsRecord::new(step, 0, 1.0 / step as f64, 1e-4);
            r.grad_norm = Some(0.5);
            r.samples_per_s = Some(12.5);
            r.mem_bytes = Some(1 << 30);
            w.write(&r.with("phase", "train")).unwrap();
        }
    }
    // Each line is complete on disk as soon as write returns (no buffering).
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 3);
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["step"], 1);
    assert_eq!(first["epoch"], 0);
    assert_eq!(first["loss"], 1.0);
    assert_eq!(first["lr"], 1e-4);
    assert_eq!(first["grad_norm"], 0.5);
    assert_eq!(first["samples_per_s"], 12.5);
    assert_eq!(first["mem_bytes"], 1u64 << 30);
    assert_eq!(first["phase"], "train");

    // Reopen and append; a NaN loss and unknown optional fields become null.
    let mut w = MetricsWriter::open(&path).unwrap();
    w.write(&MetricsRecord::new(4, 1, f64::NAN, 1e-4)).unwrap();
    w.write_json(json!({"event": "validation", "step": 4}).as_object().unwrap()).unwrap();
    let records = read_metrics(&path).unwrap();
    assert_eq!(records.len(), 5);
    assert_eq!(records[3]["step"], 4);
    assert!(records[3]["loss"].is_null() && records[3]["grad_norm"].is_null());
    assert_eq!(records[4]["event"], "validation");
    assert_eq!(series(&records, "loss"), vec![(1.0, 1.0), (2.0, 0.5), (3.0, 1.0 / 3.0)]);
}

#[test]
fn metrics_reopen_cuts_a_partial_line_and_resume_drops_later_steps() {
    let dir = temp_dir("report-metrics-resume");
    let path = dir.join("metrics.jsonl");
    let mut w = MetricsWriter::open(&path).unwrap();
    for step in 1..=6u64 {
        w.write(&MetricsRecord::new(step, 0, 0.1, 1e-4)).unwrap();
    }
    drop(w);
    // A crash mid-line leaves a fragment without a newline.
    fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"step\": 7, \"lo").unwrap();
    let mut w = MetricsWriter::open(&path).unwrap();
    w.write(&MetricsRecord::new(7, 0, 0.2, 1e-4)).unwrap();
    let steps: Vec<u64> = read_metrics(&path).unwrap().iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6, 7]);
    drop(w);

    // Resuming from the checkpoint of step 4: steps 5..7 will be redone, so they go.
    let mut w = MetricsWriter::resume(&path, 4).unwrap();
    w.write(&MetricsRecord::new(5, 0, 0.3, 1e-4)).unwrap();
    let records = read_metrics(&path).unwrap();
    let steps: Vec<u64> = records.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5]);
    assert_eq!(records[4]["loss"], 0.3);
    // Resuming a run that never wrote metrics creates the file.
    let fresh = dir.join("new/metrics.jsonl");
    MetricsWriter::resume(&fresh, 10).unwrap();
    assert!(fresh.exists());
}

#[test]
fn metrics_errors() {
    let dir = temp_dir("report-metrics-err");
    let path = dir.join("metrics.jsonl");
    let mut w = MetricsWriter::open(&path).unwrap();
    let e = err_of(w.write(&MetricsRecord::new(1, 0, 0.1, 1e-4).with("loss", 3)));
    assert!(e.contains("`loss` shadows"), "{e}");
    fs::write(&path, "{\"step\": 1}\nnot json\n").unwrap();
    let e = err_of(read_metrics(&path));
    assert!(e.contains("metrics.jsonl line 2") && e.contains("invalid JSON"), "{e}");
    fs::write(&path, "{\"step\": 1}\n[1, 2]\n").unwrap();
    assert!(err_of(read_metrics(&path)).contains("line 2: not a JSON object"));
}

// ---------------------------------------------------------------------------------------
// Loss plot

fn noisy_loss(n: usize) -> Vec<(f64, f64)> {
    let mut rng = synthos_engine::Rng::new(3);
    (0..n).map(|i| (i as f64, 2.0 * (-(i as f64) / 150.0).exp() + 0.05 + 0.1 * rng.uniform())).collect()
}

#[test]
fn loss_plot_png_has_curves_axes_and_text() {
    let dir = temp_dir("report-plot");
    let path = dir.join("loss.png");
    let pts = noisy_loss(500);
    plot_loss(&pts, &path, "training loss").unwrap();
    let img = ImageRgb::open(&path).unwrap();
    assert_eq!((img.width(), img.height()), (800, 480));
    let raw = count_colour(&img, RAW_RGB);
    let smooth = count_colour(&img, EMA_RGB);
    assert!(raw > 500, "raw curve pixels: {raw}");
    assert!(smooth > 500, "EMA curve pixels: {smooth}");
    let dark = img.data().chunks_exact(3).filter(|p| p.iter().all(|&v| v < 60)).count();
    assert!(dark > 1500, "axes and labels: {dark} dark pixels");
    // The curve descends: EMA pixels on the left half sit higher (smaller y) than on the right.
    let mean_y = |x0: usize, x1: usize| {
        let ys: Vec<usize> = (0..img.height())
            .flat_map(|y| (x0..x1).map(move |x| (x, y)))
            .filter(|&(x, y)| img.pixel(x, y) == EMA_RGB)
            .map(|p| p.1)
            .collect();
        ys.iter().sum::<usize>() as f64 / ys.len() as f64
    };
    assert!(mean_y(80, 300) < mean_y(500, 780));
    let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "atomic write leaves no temporary file: {names:?}");
}

#[test]
fn loss_plot_log_scale_and_edge_cases() {
    let mut pts = noisy_loss(200);
    pts.push((200.0, f64::NAN));
    pts.push((201.0, -1.0)); // dropped on a log axis
    let opts = PlotOptions { log_y: true, width: 400, height: 300, title: "log".into(), ..Default::default() };
    let img = render_loss_plot(&pts, &opts).unwrap();
    assert_eq!((img.width(), img.height()), (400, 300));
    assert!(count_colour(&img, EMA_RGB) > 100);
    // A single point and a flat curve still draw.
    let one = render_loss_plot(&[(5.0, 0.3)], &PlotOptions::default()).unwrap();
    assert!(count_colour(&one, EMA_RGB) > 0);
    let flat: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 1.0)).collect();
    assert!(count_colour(&render_loss_plot(&flat, &PlotOptions::default()).unwrap(), EMA_RGB) > 100);
    let dir = temp_dir("report-plot-log");
    plot_loss_with(&pts, dir.join("l.png"), &opts).unwrap();
    assert_eq!(ImageRgb::open(dir.join("l.png")).unwrap(), img);

    let e = err_of(render_loss_plot(&[(0.0, f64::NAN)], &PlotOptions::default()));
    assert!(e.contains("none of the 1 points is finite"), "{e}");
    let e = err_of(render_loss_plot(&[(0.0, -1.0)], &opts));
    assert!(e.contains("positive"), "{e}");
    assert!(err_of(render_loss_plot(&pts, &PlotOptions { width: 50, ..Default::default() })).contains("too small"));
}

#[test]
fn plot_helpers() {
    let (ticks, step) = nice_ticks(0.0, 1000.0, 5);
    assert_eq!(step, 200.0);
    assert_eq!(ticks, vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
    let (ticks, step) = nice_ticks(0.013, 0.087, 4);
    assert_eq!(step, 0.02);
    assert_eq!(ticks.len(), 4);
    assert!((ticks[0] - 0.02).abs() < 1e-12);
    assert_eq!(format_tick(400.0, 200.0), "400");
    assert_eq!(format_tick(0.04, 0.02), "0.04");
    assert_eq!(format_tick(0.25, 0.05), "0.25");
    assert_eq!(format_tick(0.0, 1.0), "0");
    assert_eq!(format_tick(1e-4, 1e-4), "1e-4");
    assert_eq!(format_tick(2.5e-5, 1e-5), "2.5e-5");
    assert_eq!(format_tick(3e6, 1e6), "3e6");
    assert_eq!(format_tick(9.99e-4, 1e-4), "1e-3", "mantissa carry");

    // EMA: constant stays constant from the first step (bias-corrected); a step responds.
    assert_eq!(ema(&[2.0, 2.0, 2.0], 0.9), vec![2.0, 2.0, 2.0]);
    let e = ema(&[0.0, 0.0, 10.0, 10.0], 0.5);
    assert_eq!(e[1], 0.0);
    assert!(e[2] > 0.0 && e[2] < 10.0 && e[3] > e[2]);
    assert_eq!(ema(&[1.0, 5.0], 0.0), vec![1.0, 5.0]);
    let e = ema(&[f64::NAN, 4.0, f64::NAN], 0.5);
    assert!(e[0].is_nan() && e[1] == 4.0 && e[2] == 4.0);
    assert_eq!(auto_smoothing(10), 0.0);
    assert!((auto_smoothing(1000) - 0.95).abs() < 1e-12);
    assert_eq!(auto_smoothing(1_000_000), 0.99);
}

// ---------------------------------------------------------------------------------------
// Image grid

#[test]
fn grid_tiles_images_with_captions() {
    let attrs = demo::DemoAttrs::all();
    let picks = [0usize, 100, 200, 300, 400];
    let images: Vec<ImageRgb> = picks.iter().map(|&i| demo::render(&attrs[i], 64).unwrap()).collect();
    let labels: Vec<String> = picks.iter().map(|&i| attrs[i].caption()).collect();

    // Without captions: cells are the image size.
    let plain = compose_grid(&images, 3, None).unwrap();
    let (w, h) = (GRID_PAD + 3 * (64 + GRID_PAD), GRID_PAD + 2 * (64 + GRID_PAD));
    assert_eq!((plain.width(), plain.height()), (w, h));
    for (k, img) in images.iter().enumerate() {
        let (x0, y0) = (GRID_PAD + (k % 3) * (64 + GRID_PAD), GRID_PAD + (k / 3) * (64 + GRID_PAD));
        for (x, y) in [(0, 0), (31, 40), (63, 63)] {
            assert_eq!(plain.pixel(x0 + x, y0 + y), img.pixel(x, y), "tile {k} at ({x}, {y})");
        }
    }
    assert_eq!(plain.pixel(w - 1, h - 1), [255, 255, 255], "the empty sixth cell stays background");

    // With captions: cells widen for text and grow a caption area with dark text.
    let dir = temp_dir("report-grid");
    let path = dir.join("val/step_100.png");
    image_grid(&images, 5, Some(&labels), &path).unwrap();
    let grid = ImageRgb::open(&path).unwrap();
    let layout = grid_layout(&images, 5, Some(&labels)).unwrap();
    assert_eq!((layout.cols, layout.rows, layout.cell_w, layout.cell_h), (5, 1, MIN_LABEL_CELL_W, 64));
    assert!(layout.label_h >= 2 * LINE_HEIGHT);
    assert_eq!((grid.width(), grid.height()), (layout.width(), layout.height()));
    for (k, img) in images.iter().enumerate() {
        let (cx, cy) = layout.cell_origin(k);
        let ox = cx + (MIN_LABEL_CELL_W - 64) / 2;
        assert_eq!(grid.pixel(ox + 32, cy + 32), img.pixel(32, 32), "tile {k} centred in its cell");
        let text_pixels = (cy + 64..cy + 64 + layout.label_h)
            .flat_map(|y| (cx..cx + layout.cell_w).map(move |x| (x, y)))
            .filter(|&(x, y)| grid.pixel(x, y)[0] < 100)
            .count();
        assert!(text_pixels > 50, "caption {k} drawn: {text_pixels} dark pixels");
    }

    // Mixed sizes take the largest cell.
    let mixed = vec![ImageRgb::filled(10, 30, [0, 0, 0]).unwrap(), ImageRgb::filled(40, 5, [9, 9, 9]).unwrap()];
    let g = compose_grid(&mixed, 2, None).unwrap();
    assert_eq!((g.width(), g.height()), (GRID_PAD + 2 * (40 + GRID_PAD), GRID_PAD + 30 + GRID_PAD));

    assert!(err_of(compose_grid(&[], 2, None)).contains("no images"));
    assert!(err_of(compose_grid(&images, 0, None)).contains("cols"));
    assert!(err_of(compose_grid(&images, 2, Some(&labels[..2]))).contains("2 labels for 5 images"));
}

#[test]
fn chw_png_helper_writes_the_image() {
    let dir = temp_dir("report-chw");
    let values: Vec<f32> = (0..3 * 4 * 5).map(|i| (i as f32 / 59.0) * 2.0 - 1.0).collect();
    save_chw_png(&values, 4, 5, dir.join("x.png")).unwrap();
    let img = ImageRgb::open(dir.join("x.png")).unwrap();
    assert_eq!((img.width(), img.height()), (5, 4));
    assert_eq!(img.pixel(0, 0), [0, 86, 173]);
    assert!(err_of(save_chw_png(&values, 4, 4, dir.join("y.png"))).contains("[3, 4, 4]"));
}

// ---------------------------------------------------------------------------------------
// Progress

#[test]
fn progress_formatting() {
    assert_eq!(format_duration(0.4), "0s");
    assert_eq!(format_duration(42.0), "42s");
    assert_eq!(format_duration(185.0), "3m05s");
    assert_eq!(format_duration(7380.0), "2h03m");
    assert_eq!(format_duration(f64::NAN), "--");
    assert_eq!(format_duration(-1.0), "--");
    assert_eq!(format_rate(123.4), "123");
    assert_eq!(format_rate(12.34), "12.3");
    assert_eq!(format_rate(3.214), "3.21");
    assert_eq!(format_rate(0.1234), "0.123");
    assert_eq!(format_loss(0.12345), "0.1235");
    assert_eq!(format_loss(0.00123), "1.230e-3");
    assert_eq!(eta_seconds(10, 90, 20.0), Some(180.0));
    assert_eq!(eta_seconds(0, 90, 20.0), None);
    assert_eq!(eta_seconds(5, 0, 20.0), Some(0.0));

    let state = ProgressState {
        step: 120,
        total: 1000,
        loss: Some(0.1234),
        samples_per_s: Some(3.214),
        elapsed_s: 65.0,
        eta_s: eta_seconds(120, 880, 65.0),
    };
    assert_eq!(
        format_progress(&state, 20),
        "step 120/1000 [##------------------] 12.0% | loss 0.1234 | 3.21 samples/s | 1m05s | ETA 7m57s"
    );
    assert_eq!(format_progress(&state, 0), "step 120/1000 12.0% | loss 0.1234 | 3.21 samples/s | 1m05s | ETA 7m57s");
    let done = ProgressState { step: 1000, eta_s: Some(0.0), ..state.clone() };
    assert!(format_progress(&done, 10).starts_with("step 1000/1000 [##########] 100.0%"));
    let unknown = ProgressState { total: 0, loss: None, samples_per_s: None, eta_s: None, ..state };
    assert_eq!(format_progress(&unknown, 20), "step 120 | 1m05s");
}

/// A writer whose bytes the test can read after handing it to `Progress`.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[test]
fn progress_output_modes() {
    // Not a terminal: whole lines, throttled by the interval, plus the last step.
    let out = Shared::default();
    let mut p = Progress::with_writer(Box::new(out.clone()), false, Duration::from_secs(3600), 50, 0);
    for step in 1..=50u64 {
        p.update(step, Some(1.0 / step as f64), step * 2);
    }
    p.message("validation grid written");
    p.finish();
    let text = out.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "first update, the last step and the message: {text:?}");
    assert!(lines[0].starts_with("step 1/50 "), "{text}");
    assert!(lines[1].starts_with("step 50/50 ") && lines[1].contains("loss 0.0200"), "{text}");
    assert!(lines[1].contains("samples/s") && lines[1].contains("ETA 0s"), "{text}");
    assert_eq!(lines[2], "validation grid written");
    assert!(!text.contains('\r'));

    // Terminal: in-place redraws with \r and clear-to-end, a newline at the end.
    let out = Shared::default();
    let mut p = Progress::with_writer(Box::new(out.clone()), true, Duration::from_secs(1), 10, 4);
    p.update(5, None, 8);
    p.message("note");
    p.update(10, Some(0.5), 48);
    p.finish();
    let text = out.text();
    assert!(text.starts_with("\rstep 5/10 "), "{text:?}");
    assert!(text.contains("\r\x1b[Knote\n"), "{text:?}");
    assert!(text.contains("\rstep 10/10 ") && text.ends_with("\x1b[K\n"), "{text:?}");
}

// ---------------------------------------------------------------------------------------
// Font

#[test]
fn font_glyphs_and_wrapping() {
    // Every printable ASCII character used in reports has its own glyph (not the box).
    let boxed = glyph('\u{2603}');
    for c in ('0'..='9').chain('A'..='Z').chain('a'..='z').chain(".,:;-+=_/()[]%'\"!?#*<>|&@$^~\\".chars()) {
        assert_ne!(glyph(c), boxed, "{c:?} has no glyph");
    }
    assert_eq!(glyph(' '), [0; GLYPH_H]);
    // Distinct glyphs for look-alike pairs.
    assert_ne!(glyph('0'), glyph('O'));
    assert_ne!(glyph('1'), glyph('l'));
    assert_ne!(glyph('5'), glyph('S'));
    assert_eq!(text_width("", 1), 0);
    assert_eq!(text_width("abc", 2), (3 * ADVANCE - 1) * 2);

    let mut img = ImageRgb::filled(40, 12, [255, 255, 255]).unwrap();
    draw_text(&mut img, 1, 1, "L", [0, 0, 0], 1);
    // 'L': a vertical bar in column 0 and a full bottom row (row 6).
    for y in 1..8 {
        assert_eq!(img.pixel(1, y), [0, 0, 0]);
    }
    for x in 1..6 {
        assert_eq!(img.pixel(x, 7), [0, 0, 0]);
    }
    assert_eq!(img.pixel(3, 3), [255, 255, 255]);
    draw_text(&mut img, 35, 8, "clipped text", [0, 0, 0], 2); // no panic off the edge

    assert_eq!(wrap_text("a red circle on a blue background", 16, 4), vec!["a red circle on", "a blue", "background"]);
    assert_eq!(wrap_text("a red circle on a blue background", 16, 2), vec!["a red circle on", "a blue..."]);
    assert_eq!(wrap_text("supercalifragilistic", 8, 5), vec!["supercal", "ifragili", "stic"]);
    assert_eq!(wrap_text("abcdefghij klm", 4, 2), vec!["abcd", "e..."]);
    assert!(wrap_text("", 10, 2).is_empty());
    assert!(wrap_text("text", 0, 2).is_empty());
    for line in wrap_text("one two three four five six seven", 7, 3) {
        assert!(line.chars().count() <= 7, "{line}");
    }
}
