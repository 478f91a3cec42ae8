//! Image grids for validation samples: images in rows of `cols` cells with padding and an
//! optional caption under each, written as PNG.

use std::path::Path;

use super::font::{draw_text, wrap_text, ADVANCE, LINE_HEIGHT};
use crate::image::ImageRgb;
use crate::{ensure, Result};

/// Space around and between cells, in pixels.
pub const GRID_PAD: usize = 4;
/// Cells are at least this wide when captions are drawn, so a caption has room for
/// about 16 characters per line even under small images.
pub const MIN_LABEL_CELL_W: usize = 96;
/// Caption lines per cell at most; longer captions end in "...".
pub const MAX_LABEL_LINES: usize = 5;
const BACKGROUND: [u8; 3] = [255, 255, 255];
const LABEL_RGB: [u8; 3] = [30, 30, 30];

/// The pixel layout of a grid, as [`compose_grid`] draws it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridLayout {
    /// Columns used (`min(cols, n)`).
    pub cols: usize,
    /// Rows.
    pub rows: usize,
    /// Cell width: the widest image, or [`MIN_LABEL_CELL_W`] with captions if larger.
    pub cell_w: usize,
    /// Image area height per cell: the tallest image.
    pub cell_h: usize,
    /// Caption area height per cell (0 without captions).
    pub label_h: usize,
}

impl GridLayout {
    /// Total width: `pad + cols·(cell_w + pad)`.
    pub fn width(&self) -> usize {
        GRID_PAD + self.cols * (self.cell_w + GRID_PAD)
    }

    /// Total height: `pad + rows·(cell_h + label_h + pad)`.
    pub fn height(&self) -> usize {
        GRID_PAD + self.rows * (self.cell_h + self.label_h + GRID_PAD)
    }

    /// Top-left corner of cell `i` (row-major).
    pub fn cell_origin(&self, i: usize) -> (usize, usize) {
        let (r, c) = (i / self.cols, i % self.cols);
        (GRID_PAD + c * (self.cell_w + GRID_PAD), GRID_PAD + r * (self.cell_h + self.label_h + GRID_PAD))
    }
}

/// Lays out `images` in `cols` columns, with room for the wrapped `labels` if given.
pub fn grid_layout(images: &[ImageRgb], cols: usize, labels: Option<&[String]>) -> Result<GridLayout> {
    ensure!(!images.is_empty(), "image grid: no images");
    ensure!(cols > 0, "image grid: cols must be positive");
    if let Some(labels) = labels {
        ensure!(
            labels.len() == images.len(),
            "image grid: {} labels for {} images (give one per image)",
            labels.len(),
            images.len()
        );
    }
    let cols = cols.min(images.len());
    let rows = images.len().div_ceil(cols);
    let mut cell_w = images.iter().map(ImageRgb::width).max().unwrap_or(1);
    let cell_h = images.iter().map(ImageRgb::height).max().unwrap_or(1);
    let mut label_h = 0;
    if let Some(labels) = labels {
        cell_w = cell_w.max(MIN_LABEL_CELL_W);
        let chars = (cell_w + 1) / ADVANCE;
        let lines = labels.iter().map(|l| wrap_text(l, chars, MAX_LABEL_LINES).len()).max().unwrap_or(0);
        label_h = if lines > 0 { 2 + lines * LINE_HEIGHT } else { 0 };
    }
    Ok(GridLayout { cols, rows, cell_w, cell_h, label_h })
}

/// Composes the grid image: white background, each image centred horizontally at the top
/// of its cell, its caption (wrapped to the cell width, at most [`MAX_LABEL_LINES`] lines)
/// below. Images may differ in size.
pub fn compose_grid(images: &[ImageRgb], cols: usize, labels: Option<&[String]>) -> Result<ImageRgb> {
    let layout = grid_layout(images, cols, labels)?;
    let mut out = ImageRgb::filled(layout.width(), layout.height(), BACKGROUND)?;
    let chars = (layout.cell_w + 1) / ADVANCE;
    for (i, img) in images.iter().enumerate() {
        let (x, y) = layout.cell_origin(i);
        let ox = x + (layout.cell_w - img.width()) / 2;
        out.paste(img, ox as i64, y as i64);
        if let Some(labels) = labels {
            for (k, line) in wrap_text(&labels[i], chars, MAX_LABEL_LINES).iter().enumerate() {
                let ty = y + layout.cell_h + 2 + k * LINE_HEIGHT;
                draw_text(&mut out, x as i64, ty as i64, line, LABEL_RGB, 1);
            }
        }
    }
    Ok(out)
}

/// Writes the grid of [`compose_grid`] to `path` as a PNG, atomically.
pub fn image_grid(images: &[ImageRgb], cols: usize, labels: Option<&[String]>, path: impl AsRef<Path>) -> Result<()> {
    compose_grid(images, cols, labels)?.save_png(path)
}
