//! Loss-curve plots as PNG: axes with "nice" ticks (linear or log), the raw curve, and an
//! exponential moving average on top, drawn with the built-in font.

use std::path::Path;

use super::font::{draw_text, text_width, GLYPH_H, LINE_HEIGHT};
use crate::image::ImageRgb;
use crate::{ensure, Result};

/// How to draw a loss plot.
#[derive(Clone, Debug)]
pub struct PlotOptions {
    /// Image width in pixels (at least 200).
    pub width: usize,
    /// Image height in pixels (at least 150).
    pub height: usize,
    /// The title drawn at the top.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// A logarithmic y axis (non-positive values are then left out).
    pub log_y: bool,
    /// EMA smoothing factor in [0, 1) (weight of the past); `None` picks one from the
    /// number of points ([`auto_smoothing`]).
    pub smoothing: Option<f64>,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions {
            width: 800,
            height: 480,
            title: String::new(),
            x_label: "step".into(),
            y_label: "loss".into(),
            log_y: false,
            smoothing: None,
        }
    }
}

/// Colour of the raw curve.
pub const RAW_RGB: [u8; 3] = [150, 185, 235];
/// Colour of the smoothed curve.
pub const EMA_RGB: [u8; 3] = [20, 70, 170];
const AXIS_RGB: [u8; 3] = [40, 40, 40];
const GRID_RGB: [u8; 3] = [225, 225, 225];
const TEXT_RGB: [u8; 3] = [30, 30, 30];

/// Writes a loss-curve PNG of `points` (x, y) to `path` (atomically) with default options
/// and `title`. Non-finite points are left out (the curve breaks there).
pub fn plot_loss(points: &[(f64, f64)], path: impl AsRef<Path>, title: &str) -> Result<()> {
    plot_loss_with(points, path, &PlotOptions { title: title.to_string(), ..Default::default() })
}

/// Writes a loss-curve PNG with explicit options (see [`render_loss_plot`]).
pub fn plot_loss_with(points: &[(f64, f64)], path: impl AsRef<Path>, options: &PlotOptions) -> Result<()> {
    render_loss_plot(points, options)?.save_png(path)
}

/// A smoothing factor suited to `n` points: `1 − 1/(n/50)`, clamped to [0, 0.99], so the
/// EMA averages over about 2 % of the run.
pub fn auto_smoothing(n: usize) -> f64 {
    let window = n as f64 / 50.0;
    if window <= 1.0 {
        0.0
    } else {
        (1.0 - 1.0 / window).min(0.99)
    }
}

/// The bias-corrected exponential moving average of `values`:
/// `m_t = s·m_{t−1} + (1 − s)·x_t` from `m_0 = 0`, reported as `m_t / (1 − s^t)` so the
/// start is not pulled toward zero. Non-finite values are passed over (their output is
/// the running average so far, or NaN before the first finite value).
pub fn ema(values: &[f64], smoothing: f64) -> Vec<f64> {
    let s = smoothing.clamp(0.0, 0.999_999);
    let mut m = 0.0;
    let mut weight = 0.0;
    values
        .iter()
        .map(|&x| {
            if x.is_finite() {
                m = s * m + (1.0 - s) * x;
                weight = s * weight + (1.0 - s);
            }
            if weight > 0.0 {
                m / weight
            } else {
                f64::NAN
            }
        })
        .collect()
}

/// "Nice" tick positions (1, 2 or 5 × 10^k apart) covering [`lo`, `hi`], about `target`
/// of them, and the spacing.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|&s| s >= raw).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks = (first..=last).map(|k| k as f64 * step).collect();
    (ticks, step)
}

/// Tick labels for a log axis spanning 10^`lo`..10^`hi` (exponents): powers of ten, plus
/// 2× and 5× when the range is under two decades.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mults: &[f64] = if hi - lo < 2.0 { &[1.0, 2.0, 5.0] } else { &[1.0] };
    let mut ticks = Vec::new();
    for e in (lo.floor() as i64)..=(hi.ceil() as i64) {
        for m in mults {
            let v = m * 10f64.powi(e as i32);
            let l = v.log10();
            if l >= lo - 1e-9 && l <= hi + 1e-9 {
                ticks.push(v);
            }
        }
    }
    ticks
}

/// A short label for tick value `v` on an axis with tick spacing `step`: fixed-point with
/// just enough decimals, or scientific (`2.5e-5`) for very large or small magnitudes.
pub fn format_tick(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        let e = a.log10().floor() as i32;
        let mut mantissa = v / 10f64.powi(e);
        // Rounding may carry the mantissa to 10.
        let mut e = e;
        if (mantissa.abs() * 10.0).round() / 10.0 >= 10.0 {
            mantissa /= 10.0;
            e += 1;
        }
        let m = format!("{mantissa:.1}");
        let m = m.strip_suffix(".0").unwrap_or(&m);
        return format!("{m}e{e}");
    }
    let decimals = if step > 0.0 && step.is_finite() { (-step.log10().floor()).max(0.0) as usize } else { 2 };
    format!("{v:.decimals$}")
}

/// Draws a line of thickness `t` from (x0, y0) to (x1, y1) (Bresenham, square brush).
fn draw_line(img: &mut ImageRgb, (x0, y0): (i64, i64), (x1, y1): (i64, i64), rgb: [u8; 3], t: i64) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        for oy in 0..t {
            for ox in 0..t {
                img.set_pixel(x + ox - t / 2, y + oy - t / 2, rgb);
            }
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Renders the plot to an image: title on top, y ticks on the left, x ticks below, light
/// grid lines, the raw curve in [`RAW_RGB`] and the EMA in [`EMA_RGB`] with a legend.
/// Errors when no point is finite (or positive, on a log axis) or the size is too small.
pub fn render_loss_plot(points: &[(f64, f64)], options: &PlotOptions) -> Result<ImageRgb> {
    let (w, h) = (options.width, options.height);
    ensure!(w >= 200 && h >= 150, "render_loss_plot: {w}x{h} is too small (at least 200x150)");
    let usable = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!options.log_y || y > 0.0);
    let pts: Vec<(f64, f64)> = points.iter().copied().filter(usable).collect();
    ensure!(
        !pts.is_empty(),
        "render_loss_plot: none of the {} points is finite{}",
        points.len(),
        if options.log_y { " and positive (log axis)" } else { "" }
    );
    let fy = |y: f64| if options.log_y { y.log10() } else { y };

    let (mut x_lo, mut x_hi) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y_lo, mut y_hi) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(fy(p.1)), b.max(fy(p.1))));
    if x_hi <= x_lo {
        x_lo -= 1.0;
        x_hi += 1.0;
    }
    if y_hi <= y_lo {
        let pad = if y_lo.abs() > 0.0 { y_lo.abs() * 0.1 } else { 1.0 };
        y_lo -= pad;
        y_hi += pad;
    } else {
        let pad = (y_hi - y_lo) * 0.05;
        y_lo -= pad;
        y_hi += pad;
    }

    let mut img = ImageRgb::filled(w, h, [255, 255, 255])?;
    let (left, right, top, bottom) = (72i64, w as i64 - 16, 34i64, h as i64 - 40);
    let px = |x: f64| left + ((x - x_lo) / (x_hi - x_lo) * (right - left) as f64).round() as i64;
    let py = |v: f64| bottom - ((v - y_lo) / (y_hi - y_lo) * (bottom - top) as f64).round() as i64;

    // Grid and tick labels.
    let (x_ticks, x_step) = nice_ticks(x_lo, x_hi, ((right - left) / 90).max(2) as usize);
    for &t in &x_ticks {
        let x = px(t);
        draw_line(&mut img, (x, top), (x, bottom), GRID_RGB, 1);
        draw_line(&mut img, (x, bottom), (x, bottom + 4), AXIS_RGB, 1);
        let label = format_tick(t, x_step);
        draw_text(&mut img, x - text_width(&label, 1) as i64 / 2, bottom + 7, &label, TEXT_RGB, 1);
    }
    let y_ticks: Vec<(f64, String)> = if options.log_y {
        log_ticks(y_lo, y_hi).into_iter().map(|v| (v.log10(), format_tick(v, v))).collect()
    } else {
        let (ticks, step) = nice_ticks(y_lo, y_hi, ((bottom - top) / 50).max(2) as usize);
        ticks.into_iter().map(|v| (v, format_tick(v, step))).collect()
    };
    for (t, label) in &y_ticks {
        let y = py(*t);
        draw_line(&mut img, (left, y), (right, y), GRID_RGB, 1);
        draw_line(&mut img, (left - 4, y), (left, y), AXIS_RGB, 1);
        draw_text(&mut img, left - 7 - text_width(label, 1) as i64, y - GLYPH_H as i64 / 2, label, TEXT_RGB, 1);
    }

    // Curves: the raw one first so the EMA stays visible on top.
    let ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
    let smooth = ema(&ys, options.smoothing.unwrap_or_else(|| auto_smoothing(pts.len())));
    let raw_px: Vec<(i64, i64)> = pts.iter().map(|&(x, y)| (px(x), py(fy(y)))).collect();
    let ema_px: Vec<(i64, i64)> = pts.iter().zip(&smooth).map(|(&(x, _), &m)| (px(x), py(fy(m)))).collect();
    for seg in raw_px.windows(2) {
        draw_line(&mut img, seg[0], seg[1], RAW_RGB, 1);
    }
    for seg in ema_px.windows(2) {
        draw_line(&mut img, seg[0], seg[1], EMA_RGB, 2);
    }
    if pts.len() == 1 {
        draw_line(&mut img, ema_px[0], ema_px[0], EMA_RGB, 5);
    }

    // Axes, labels, title, legend.
    draw_line(&mut img, (left, top), (left, bottom), AXIS_RGB, 1);
    draw_line(&mut img, (left, bottom), (right, bottom), AXIS_RGB, 1);
    let x_label = &options.x_label;
    draw_text(&mut img, (left + right) / 2 - text_width(x_label, 1) as i64 / 2, bottom + 22, x_label, TEXT_RGB, 1);
    let y_label = if options.log_y { format!("{} (log)", options.y_label) } else { options.y_label.clone() };
    draw_text(&mut img, 8, top - LINE_HEIGHT as i64 - 2, &y_label, TEXT_RGB, 1);
    let title_w = text_width(&options.title, 2) as i64;
    draw_text(&mut img, (w as i64 - title_w) / 2, 6, &options.title, TEXT_RGB, 2);
    let legend_x = right - 110;
    for (i, (name, rgb)) in [("raw", RAW_RGB), ("EMA", EMA_RGB)].into_iter().enumerate() {
        let y = top + 8 + i as i64 * LINE_HEIGHT as i64 + GLYPH_H as i64 / 2;
        draw_line(&mut img, (legend_x, y), (legend_x + 24, y), rgb, 2);
        draw_text(&mut img, legend_x + 30, y - GLYPH_H as i64 / 2, name, TEXT_RGB, 1);
    }
    Ok(img)
}

/// One curve of a [`render_log_log_plot`].
#[derive(Clone, Debug)]
pub struct Series {
    /// The legend text.
    pub label: String,
    /// The colour.
    pub rgb: [u8; 3],
    /// The (x, y) points; those with a non-positive or non-finite coordinate are left out.
    pub points: Vec<(f64, f64)>,
}

/// Colour of the reference line of [`render_log_log_plot`].
pub const REFERENCE_RGB: [u8; 3] = [200, 60, 40];

/// Writes a log-log plot PNG (see [`render_log_log_plot`]) to `path`, atomically.
pub fn plot_log_log(
    series: &[Series],
    reference_y: Option<(f64, &str)>,
    path: impl AsRef<Path>,
    options: &PlotOptions,
) -> Result<()> {
    render_log_log_plot(series, reference_y, options)?.save_png(path)
}

/// Renders curves on logarithmic x and y axes (for example concept counts against their
/// rank): title, power-of-ten ticks on both axes, each series as a line in its colour
/// with a legend, and an optional dashed horizontal reference line (value and label, in
/// [`REFERENCE_RGB`]). `options.log_y` and `options.smoothing` are not used. Errors when
/// no point is positive and finite, or the size is too small.
pub fn render_log_log_plot(
    series: &[Series],
    reference_y: Option<(f64, &str)>,
    options: &PlotOptions,
) -> Result<ImageRgb> {
    let (w, h) = (options.width, options.height);
    ensure!(w >= 200 && h >= 150, "render_log_log_plot: {w}x{h} is too small (at least 200x150)");
    let usable = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && x > 0.0 && y > 0.0;
    let curves: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| s.points.iter().copied().filter(usable).map(|(x, y)| (x.log10(), y.log10())).collect())
        .collect();
    ensure!(curves.iter().any(|c| !c.is_empty()), "render_log_log_plot: no point is positive and finite");
    let all = curves.iter().flatten();
    let (mut x_lo, mut x_hi) = all.clone().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y_lo, mut y_hi) = all.fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let reference = reference_y.filter(|(v, _)| v.is_finite() && *v > 0.0).map(|(v, l)| (v.log10(), l));
    if let Some((r, _)) = reference {
        y_lo = y_lo.min(r);
        y_hi = y_hi.max(r);
    }
    // Whole decades at least, and some room.
    x_lo = x_lo.floor();
    x_hi = x_hi.ceil().max(x_lo + 1.0);
    y_lo = y_lo.floor();
    y_hi = y_hi.ceil().max(y_lo + 1.0);

    let mut img = ImageRgb::filled(w, h, [255, 255, 255])?;
    let (left, right, top, bottom) = (72i64, w as i64 - 16, 34i64, h as i64 - 40);
    let px = |x: f64| left + ((x - x_lo) / (x_hi - x_lo) * (right - left) as f64).round() as i64;
    let py = |v: f64| bottom - ((v - y_lo) / (y_hi - y_lo) * (bottom - top) as f64).round() as i64;

    for v in log_ticks(x_lo, x_hi) {
        let x = px(v.log10());
        draw_line(&mut img, (x, top), (x, bottom), GRID_RGB, 1);
        draw_line(&mut img, (x, bottom), (x, bottom + 4), AXIS_RGB, 1);
        let label = format_tick(v, v);
        draw_text(&mut img, x - text_width(&label, 1) as i64 / 2, bottom + 7, &label, TEXT_RGB, 1);
    }
    for v in log_ticks(y_lo, y_hi) {
        let y = py(v.log10());
        draw_line(&mut img, (left, y), (right, y), GRID_RGB, 1);
        draw_line(&mut img, (left - 4, y), (left, y), AXIS_RGB, 1);
        let label = format_tick(v, v);
        draw_text(&mut img, left - 7 - text_width(&label, 1) as i64, y - GLYPH_H as i64 / 2, &label, TEXT_RGB, 1);
    }
    if let Some((r, label)) = reference {
        let y = py(r);
        let mut x = left;
        while x < right {
            draw_line(&mut img, (x, y), ((x + 8).min(right), y), REFERENCE_RGB, 1);
            x += 14;
        }
        draw_text(&mut img, right - 6 - text_width(label, 1) as i64, y - LINE_HEIGHT as i64, label, REFERENCE_RGB, 1);
    }
    for (s, pts) in series.iter().zip(&curves) {
        let pixels: Vec<(i64, i64)> = pts.iter().map(|&(x, y)| (px(x), py(y))).collect();
        for seg in pixels.windows(2) {
            draw_line(&mut img, seg[0], seg[1], s.rgb, 2);
        }
        if let [only] = pixels.as_slice() {
            draw_line(&mut img, *only, *only, s.rgb, 5);
        }
    }

    draw_line(&mut img, (left, top), (left, bottom), AXIS_RGB, 1);
    draw_line(&mut img, (left, bottom), (right, bottom), AXIS_RGB, 1);
    let x_label = format!("{} (log)", options.x_label);
    draw_text(&mut img, (left + right) / 2 - text_width(&x_label, 1) as i64 / 2, bottom + 22, &x_label, TEXT_RGB, 1);
    let y_label = format!("{} (log)", options.y_label);
    draw_text(&mut img, 8, top - LINE_HEIGHT as i64 - 2, &y_label, TEXT_RGB, 1);
    let title_w = text_width(&options.title, 2) as i64;
    draw_text(&mut img, (w as i64 - title_w) / 2, 6, &options.title, TEXT_RGB, 2);
    let legend_w = series.iter().map(|s| text_width(&s.label, 1)).max().unwrap_or(0) as i64 + 34;
    let legend_x = right - 8 - legend_w;
    for (i, s) in series.iter().enumerate() {
        let y = top + 8 + i as i64 * LINE_HEIGHT as i64 + GLYPH_H as i64 / 2;
        draw_line(&mut img, (legend_x, y), (legend_x + 24, y), s.rgb, 2);
        draw_text(&mut img, legend_x + 30, y - GLYPH_H as i64 / 2, &s.label, TEXT_RGB, 1);
    }
    Ok(img)
}
