//! The built-in demo data: captioned images of simple shapes that a tiny model learns in
//! minutes on a CPU, so that `train` and `sample` can show prompt- and reference-following
//! without weights or downloads.
//!
//! An image is fully determined by five attributes ([`DemoAttrs`]): a shape (circle,
//! square, triangle) of a colour, on a background of another colour (six colours), large
//! or small, plain or filled with stripes or dots. Its caption names all five, e.g.
//! "a small green square with stripes on a yellow background". Shapes are centred and
//! rendered with 4×4 supersampling (antialiased edges).
//!
//! [`generate`] writes `DIR/images/NNNNN.png` and `DIR/metadata.csv` (columns `video`,
//! `prompt`) in the Synthos layout, going through all 540 attribute combinations in a
//! seeded random order before repeating any; [`render`] draws one image, e.g. a reference
//! image for the sampler. Both are deterministic: the same arguments give the same bytes.

use std::fs;
use std::path::Path;

use super::csv::format_record;
use crate::fsutil::write_atomic;
use crate::image::ImageRgb;
use crate::{ensure, Result, ResultExt, Rng};

/// The shape drawn in the middle of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An equilateral triangle pointing up.
    Triangle,
}

/// A colour of the shape or the background.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Colour {
    /// (220, 40, 40)
    Red,
    /// (40, 170, 60)
    Green,
    /// (40, 80, 220)
    Blue,
    /// (240, 210, 40)
    Yellow,
    /// (150, 60, 200)
    Purple,
    /// (245, 245, 245)
    White,
}

/// How large the shape is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShapeSize {
    /// About 40 % of the image width.
    Small,
    /// About 70 % of the image width.
    Large,
}

/// The fill pattern of the shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Texture {
    /// One flat colour.
    Plain,
    /// Horizontal bands of the shape colour and a contrasting shade.
    Stripes,
    /// A grid of dots of a contrasting shade on the shape colour.
    Dots,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The word used in captions.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

impl Colour {
    /// Every colour.
    pub const ALL: [Colour; 6] =
        [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow, Colour::Purple, Colour::White];

    /// The word used in captions.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::White => "white",
        }
    }

    /// The sRGB value drawn.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [240, 210, 40],
            Colour::Purple => [150, 60, 200],
            Colour::White => [245, 245, 245],
        }
    }

    /// The shade used for stripes and dots: darker for light colours, lighter for dark
    /// ones, so the pattern shows on every colour.
    pub fn pattern_rgb(self) -> [u8; 3] {
        let [r, g, b] = self.rgb();
        let luma = 0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32;
        let shade = |v: u8| -> u8 {
            if luma > 150.0 {
                (v as f32 * 0.45).round() as u8
            } else {
                (v as f32 + (255.0 - v as f32) * 0.6).round() as u8
            }
        };
        [shade(r), shade(g), shade(b)]
    }
}

impl ShapeSize {
    /// Both sizes.
    pub const ALL: [ShapeSize; 2] = [ShapeSize::Small, ShapeSize::Large];

    /// The word used in captions.
    pub fn name(self) -> &'static str {
        match self {
            ShapeSize::Small => "small",
            ShapeSize::Large => "large",
        }
    }
}

impl Texture {
    /// Every texture.
    pub const ALL: [Texture; 3] = [Texture::Plain, Texture::Stripes, Texture::Dots];

    /// The caption phrase after the shape ("" for plain).
    pub fn phrase(self) -> &'static str {
        match self {
            Texture::Plain => "",
            Texture::Stripes => " with stripes",
            Texture::Dots => " with dots",
        }
    }
}

/// Everything that determines a demo image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DemoAttrs {
    /// The shape.
    pub shape: Shape,
    /// The shape's colour.
    pub colour: Colour,
    /// The background colour (different from `colour` in generated sets).
    pub background: Colour,
    /// The shape's size.
    pub size: ShapeSize,
    /// The shape's fill pattern.
    pub texture: Texture,
}

impl DemoAttrs {
    /// The caption: `a {size} {colour} {shape}[ with stripes| with dots] on a {background}
    /// background`.
    pub fn caption(&self) -> String {
        format!(
            "a {} {} {}{} on a {} background",
            self.size.name(),
            self.colour.name(),
            self.shape.name(),
            self.texture.phrase(),
            self.background.name()
        )
    }

    /// Reads a caption of the form [`DemoAttrs::caption`] writes, case-insensitively; the
    /// size may be left out (it then means large) and a final period is ignored, so "A red
    /// circle on a blue background." parses. `None` for anything else.
    pub fn from_caption(caption: &str) -> Option<DemoAttrs> {
        let lower = caption.trim().trim_end_matches('.').to_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        let mut w = words.as_slice();
        let mut take = |expected: &str| -> bool {
            if w.first() == Some(&expected) {
                w = &w[1..];
                true
            } else {
                false
            }
        };
        if !take("a") {
            return None;
        }
        let size = ShapeSize::ALL.into_iter().find(|s| take(s.name())).unwrap_or(ShapeSize::Large);
        let colour = Colour::ALL.into_iter().find(|c| take(c.name()))?;
        let shape = Shape::ALL.into_iter().find(|s| take(s.name()))?;
        let texture = if take("with") {
            if take("stripes") {
                Texture::Stripes
            } else if take("dots") {
                Texture::Dots
            } else {
                return None;
            }
        } else {
            Texture::Plain
        };
        if !(take("on") && take("a")) {
            return None;
        }
        let background = Colour::ALL.into_iter().find(|c| take(c.name()))?;
        if !take("background") || !w.is_empty() {
            return None;
        }
        Some(DemoAttrs { shape, colour, background, size, texture })
    }

    /// Every combination with a background different from the shape colour (540), in a
    /// fixed order.
    pub fn all() -> Vec<DemoAttrs> {
        let mut out = Vec::new();
        for shape in Shape::ALL {
            for colour in Colour::ALL {
                for background in Colour::ALL {
                    if background == colour {
                        continue;
                    }
                    for size in ShapeSize::ALL {
                        for texture in Texture::ALL {
                            out.push(DemoAttrs { shape, colour, background, size, texture });
                        }
                    }
                }
            }
        }
        out
    }
}

/// Subsamples per pixel side; 4×4 = 16 samples give smooth edges at 64×64.
const SUPERSAMPLE: usize = 4;
/// Stripe and dot period, in units of the image width.
const PATTERN_PERIOD: f64 = 1.0 / 8.0;

/// Whether the unit-square point (`u`, `v`) (origin top-left) lies inside the shape.
fn inside(attrs: &DemoAttrs, u: f64, v: f64) -> bool {
    let (dx, dy) = (u - 0.5, v - 0.5);
    let large = attrs.size == ShapeSize::Large;
    match attrs.shape {
        Shape::Circle => {
            let r = if large { 0.36 } else { 0.2 };
            dx * dx + dy * dy <= r * r
        }
        Shape::Square => {
            let h = if large { 0.31 } else { 0.17 };
            dx.abs() <= h && dy.abs() <= h
        }
        Shape::Triangle => {
            // Equilateral, centroid at the centre, circumradius r: apex up, base below.
            let r: f64 = if large { 0.42 } else { 0.24 };
            let half_base = r * 3f64.sqrt() / 2.0;
            let (top, base) = (-r, r / 2.0);
            if dy > base || dy < top {
                return false;
            }
            // The half-width grows linearly from 0 at the apex to half_base at the base.
            dx.abs() <= half_base * (dy - top) / (base - top)
        }
    }
}

/// The colour at a unit-square point.
fn colour_at(attrs: &DemoAttrs, u: f64, v: f64) -> [u8; 3] {
    if !inside(attrs, u, v) {
        return attrs.background.rgb();
    }
    let patterned = match attrs.texture {
        Texture::Plain => false,
        Texture::Stripes => (v / PATTERN_PERIOD).fract() < 0.5,
        Texture::Dots => {
            let (fu, fv) = ((u / PATTERN_PERIOD).fract() - 0.5, (v / PATTERN_PERIOD).fract() - 0.5);
            fu * fu + fv * fv <= 0.28 * 0.28
        }
    };
    if patterned {
        attrs.colour.pattern_rgb()
    } else {
        attrs.colour.rgb()
    }
}

/// Draws the image for `attrs` at `size × size` pixels (`size` ≥ 8).
pub fn render(attrs: &DemoAttrs, size: usize) -> Result<ImageRgb> {
    ensure!(size >= 8, "demo::render: size {size} is too small (at least 8 pixels)");
    ensure!(size <= 4096, "demo::render: size {size} is too large (at most 4096 pixels)");
    let mut data = Vec::with_capacity(size * size * 3);
    let n = (SUPERSAMPLE * SUPERSAMPLE) as u32;
    for y in 0..size {
        for x in 0..size {
            let mut sum = [0u32; 3];
            for sy in 0..SUPERSAMPLE {
                for sx in 0..SUPERSAMPLE {
                    let u = (x as f64 + (sx as f64 + 0.5) / SUPERSAMPLE as f64) / size as f64;
                    let v = (y as f64 + (sy as f64 + 0.5) / SUPERSAMPLE as f64) / size as f64;
                    let c = colour_at(attrs, u, v);
                    for k in 0..3 {
                        sum[k] += c[k] as u32;
                    }
                }
            }
            data.extend(sum.map(|s| ((s + n / 2) / n) as u8));
        }
    }
    ImageRgb::new(size, size, data)
}

/// The most images a demo set holds ([`generate`]).
pub const MAX_DEMO_IMAGES: usize = 1_000_000;

/// Writes a demo set of `n` images of `size × size` to `dir` in the Synthos layout
/// (`images/00000.png`, …, and `metadata.csv` with columns `video`, `prompt`) and returns
/// the attributes of each image in order. The attribute order is a seeded shuffle of all
/// combinations ([`DemoAttrs::all`]), reshuffled each time it is used up, so small sets
/// are varied and large ones balanced. Existing files of the same names are replaced.
pub fn generate(dir: impl AsRef<Path>, n: usize, size: usize, seed: u64) -> Result<Vec<DemoAttrs>> {
    let dir = dir.as_ref();
    ensure!(n > 0, "demo::generate: the number of images must be positive");
    ensure!(n <= MAX_DEMO_IMAGES, "demo::generate: {n} images is more than a demo set holds ({MAX_DEMO_IMAGES})");
    let mut rng = Rng::new(seed);
    let mut order = DemoAttrs::all();
    let mut attrs = Vec::with_capacity(n);
    for i in 0..n {
        if i % order.len() == 0 {
            rng.shuffle(&mut order);
        }
        attrs.push(order[i % order.len()]);
    }
    write_synthos_set(dir, &attrs, size)?;
    Ok(attrs)
}

/// Writes the images of `attrs` (in order) at `size × size` to `dir` in the Synthos
/// layout (`images/00000.png`, …, and `metadata.csv` with columns `video`, `prompt`).
/// Existing files of the same names are replaced.
pub fn write_synthos_set(dir: impl AsRef<Path>, attrs: &[DemoAttrs], size: usize) -> Result<()> {
    let dir = dir.as_ref();
    ensure!(!attrs.is_empty(), "demo::write_synthos_set: no images to write");
    let images = dir.join("images");
    fs::create_dir_all(&images).with_ctx(|| format!("cannot create demo folder {}", images.display()))?;
    let mut csv = format_record(&["video", "prompt"]);
    for (i, a) in attrs.iter().enumerate() {
        let rel = format!("images/{i:05}.png");
        render(a, size)?.save_png(dir.join(&rel))?;
        csv.push_str(&format_record(&[rel, a.caption()]));
    }
    write_atomic(dir.join("metadata.csv"), csv.as_bytes())
}

/// Image side of the CLIP demo set ([`generate_clip_demo`]): the tiny CLIP's input.
pub const CLIP_DEMO_IMAGE_SIZE: usize = 32;

/// Of each shape/colour class's 30 images (5 backgrounds × 2 sizes × 3 textures), the
/// CLIP demo holds out this many from training for the zero-shot evaluation.
pub const CLIP_DEMO_HELD_OUT_PER_CLASS: usize = 6;

/// What [`generate_clip_demo`] wrote.
#[derive(Clone, Debug)]
pub struct ClipDemoSet {
    /// The training pairs, SynthCLIP's format: `image_path<TAB>caption`, paths relative to
    /// the file.
    pub train_tsv: std::path::PathBuf,
    /// The zero-shot set: one sub-folder per shape/colour class (`red triangle`, …) with
    /// the images of attribute combinations training never saw.
    pub val_dir: std::path::PathBuf,
    /// Training pairs written.
    pub train_pairs: usize,
    /// Zero-shot images written.
    pub val_images: usize,
    /// The class names (every colour × shape, sorted as the folders are).
    pub classes: Vec<String>,
    /// The zero-shot prompt templates: `a {size} {} on a {background} background` for both
    /// sizes and the six backgrounds.
    pub templates: Vec<String>,
}

/// The CLIP demo's class of a shape colour and shape: `"<colour> <shape>"`.
pub fn clip_demo_class(colour: Colour, shape: Shape) -> String {
    format!("{} {}", colour.name(), shape.name())
}

/// The CLIP demo's 18 class names (every colour × shape, [`clip_demo_class`]), sorted as
/// their zero-shot folders are.
pub fn clip_demo_classes() -> Vec<String> {
    let mut classes: Vec<String> =
        Colour::ALL.iter().flat_map(|&c| Shape::ALL.iter().map(move |&s| clip_demo_class(c, s))).collect();
    classes.sort();
    classes
}

/// The CLIP demo's split of every attribute combination ([`DemoAttrs::all`], 540) into the
/// training combinations (432) and the held-out zero-shot ones (108), both in
/// [`DemoAttrs::all`]'s order: of each shape/colour class's 30 combinations,
/// [`CLIP_DEMO_HELD_OUT_PER_CLASS`] (a fixed, spread-out choice of backgrounds, sizes and
/// textures) are held out.
pub fn clip_demo_split() -> (Vec<DemoAttrs>, Vec<DemoAttrs>) {
    let classes = clip_demo_classes();
    // Within a class, combination k (in `all()`'s order) is held out when k ≡ class (mod 5):
    // 6 of 30, a different background/size/texture mix for each class.
    let stride = 30 / CLIP_DEMO_HELD_OUT_PER_CLASS;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    let mut seen: std::collections::HashMap<(Colour, Shape), usize> = std::collections::HashMap::new();
    for a in DemoAttrs::all() {
        let class = classes.iter().position(|c| *c == clip_demo_class(a.colour, a.shape)).unwrap_or(0);
        let k = seen.entry((a.colour, a.shape)).or_insert(0);
        if *k % stride == class % stride {
            val.push(a);
        } else {
            train.push(a);
        }
        *k += 1;
    }
    (train, val)
}

/// Writes the CLIP demo set to `dir`. Every attribute combination ([`DemoAttrs::all`],
/// 540) is one image of `size`²; of each shape/colour class's 30 combinations,
/// [`CLIP_DEMO_HELD_OUT_PER_CLASS`] (a fixed, spread-out choice of backgrounds, sizes and
/// textures) go to the zero-shot set `zeroshot/<colour> <shape>/` and the other 432 to
/// training (`train/NNNNN.png` and `train.tsv`). So the evaluation shows a model images
/// (and combinations of words) it never saw, of classes named only through prompts.
/// Deterministic; `seed` orders the training rows. Existing files are replaced.
pub fn generate_clip_demo(dir: impl AsRef<Path>, size: usize, seed: u64) -> Result<ClipDemoSet> {
    let dir = dir.as_ref();
    let train_dir = dir.join("train");
    let val_dir = dir.join("zeroshot");
    let classes = clip_demo_classes();
    fs::create_dir_all(&train_dir).with_ctx(|| format!("cannot create {}", train_dir.display()))?;
    for c in &classes {
        let d = val_dir.join(c);
        fs::create_dir_all(&d).with_ctx(|| format!("cannot create {}", d.display()))?;
    }
    let (mut train, val) = clip_demo_split();
    Rng::new(seed).shuffle(&mut train);
    let mut tsv = String::from("image_path\tcaption\n");
    for (i, a) in train.iter().enumerate() {
        let rel = format!("train/{i:05}.png");
        render(a, size)?.save_png(dir.join(&rel))?;
        tsv.push_str(&format!("{rel}\t{}\n", a.caption()));
    }
    let train_tsv = dir.join("train.tsv");
    write_atomic(&train_tsv, tsv.as_bytes())?;
    for (i, a) in val.iter().enumerate() {
        let texture = a.texture.phrase().trim().replace(' ', "-");
        let texture = if texture.is_empty() { String::new() } else { format!("-{texture}") };
        let file = format!("{i:03}-{}{texture}-on-{}.png", a.size.name(), a.background.name());
        render(a, size)?.save_png(val_dir.join(clip_demo_class(a.colour, a.shape)).join(file))?;
    }
    let templates = ShapeSize::ALL
        .iter()
        .flat_map(|s| Colour::ALL.iter().map(move |b| format!("a {} {{}} on a {} background", s.name(), b.name())))
        .collect();
    Ok(ClipDemoSet { train_tsv, val_dir, train_pairs: train.len(), val_images: val.len(), classes, templates })
}

/// What [`read_image`] sees in a demo-style image: the background colour, the shape's
/// colour and which pixels belong to the shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageReading {
    /// The palette colour most of the border ring (two pixels wide) is nearest to.
    pub background: Colour,
    /// The palette colour most shape pixels are nearest to (a pattern shade counts as
    /// its colour); `None` when no pixel differs from the background.
    pub shape_colour: Option<Colour>,
    /// Row-major, one entry per pixel: true where the pixel is of the shape colour (a
    /// speckle of other colours is not part of the shape).
    pub mask: Vec<bool>,
}

impl ImageReading {
    /// True when the background and shape colours are those `attrs` name.
    pub fn colours_match(&self, attrs: &DemoAttrs) -> bool {
        self.background == attrs.background && self.shape_colour == Some(attrs.colour)
    }

    /// Intersection over union of the two shape masks (0 when both are empty; the masks
    /// must come from images of the same size).
    pub fn iou(&self, other: &ImageReading) -> f64 {
        let (mut inter, mut union) = (0usize, 0usize);
        for (&a, &b) in self.mask.iter().zip(&other.mask) {
            inter += usize::from(a && b);
            union += usize::from(a || b);
        }
        if union == 0 {
            0.0
        } else {
            inter as f64 / union as f64
        }
    }
}

/// The palette colour (flat or pattern shade) nearest to `rgb`, as the colour it belongs to.
fn nearest_colour(rgb: [u8; 3]) -> Colour {
    let dist = |p: [u8; 3]| -> i32 { (0..3).map(|k| (p[k] as i32 - rgb[k] as i32).pow(2)).sum() };
    let mut best = (i32::MAX, Colour::Red);
    for c in Colour::ALL {
        for p in [c.rgb(), c.pattern_rgb()] {
            let d = dist(p);
            if d < best.0 {
                best = (d, c);
            }
        }
    }
    best.1
}

/// The most frequent colour of `colours` (ties go to the earlier in [`Colour::ALL`]).
fn mode(colours: impl Iterator<Item = Colour>) -> Option<Colour> {
    let mut counts = [0usize; 6];
    for c in colours {
        counts[Colour::ALL.iter().position(|&k| k == c).unwrap_or(0)] += 1;
    }
    let (i, &n) = counts.iter().enumerate().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))?;
    (n > 0).then_some(Colour::ALL[i])
}

/// Reads a demo-style image (a generated sample or a rendered one): every pixel is
/// given the palette colour it is nearest to (the six colours and their pattern shades);
/// the background is the most common colour of the two-pixel border ring (no demo shape
/// reaches it), the shape colour is the most common of the other colours, and the shape
/// is every pixel of that colour. So a noisy image, whose pixels scatter over the
/// palette, reads as a thin shape that overlaps little with any target. Images smaller
/// than 8×8 are refused.
pub fn read_image(img: &ImageRgb) -> Result<ImageReading> {
    let (w, h) = (img.width(), img.height());
    ensure!(w >= 8 && h >= 8, "demo::read_image: a {w}×{h} image is too small (at least 8×8)");
    let colours: Vec<Colour> = img.data().chunks_exact(3).map(|p| nearest_colour([p[0], p[1], p[2]])).collect();
    let in_ring = |i: usize| {
        let (x, y) = (i % w, i / w);
        x < 2 || y < 2 || x + 2 >= w || y + 2 >= h
    };
    let ring = colours.iter().enumerate().filter(|&(i, _)| in_ring(i)).map(|(_, &c)| c);
    let background = mode(ring).unwrap_or(Colour::White);
    let shape_colour = mode(colours.iter().copied().filter(|&c| c != background));
    let mask: Vec<bool> = colours.iter().map(|&c| Some(c) == shape_colour).collect();
    Ok(ImageReading { background, shape_colour, mask })
}
