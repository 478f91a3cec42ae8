#!/usr/bin/env python3
"""Makes tests/fixtures/clip_data/*, read by tests/clip_data.rs: SynthCLIP's image
transforms run by torchvision itself on small PNG images, and a caption table written by
pandas the way SynthCLIP's data files are.

SynthCLIP (Training/main.py) trains with
    RandomResizedCrop(224, scale=(0.5, 1.0)), ToTensor(), Normalize(IMAGENET mean, std)
and evaluates with
    Resize(224), CenterCrop(224), ToTensor(), Normalize(...)
on PIL images (`Image.open(path).convert("RGB")`). The output side is a parameter here
(24 and 17 instead of 224) so that the fixtures stay small; nothing in the transforms
depends on it being 224.

Pinned versions (tests/reference/requirements-clip-data.txt): torch==2.11.0,
torchvision==0.26.0 (the release paired with torch 2.11; `pip install --no-deps
torchvision==0.26.0`), pillow==13.0.0, numpy==2.4.6, pandas==3.1.1. Run from the
repository root:

    python3 tests/reference/make_clip_data_fixtures.py

Files:
- img_<name>.png: the source images (PNG, so the Rust test decodes exactly these pixels);
- eval_<name>_<size>.png: Resize(size) + CenterCrop(size), the 8-bit image before
  ToTensor (torchvision's PIL path ends in a PIL image there);
- crop_<name>_<k>.png: F.resized_crop(img, top, left, h, w, [size, size]) (bilinear, the
  call RandomResizedCrop makes with the window it drew);
- resize_<k>.png: plain `Image.resize` of the source images (bilinear and bicubic) where
  Pillow 13 runs the vertical pass first (the height shrinks by more than twice as many
  pixels as the width) and where it runs the horizontal pass first; the two orders round
  differently, so these pin the rule;
- normalize.json: ToTensor + Normalize of every level 0..255 in each channel (the
  pipeline after the 8-bit image is per value, so this table pins it completely), and the
  full normalized output of one eval case to check the composition end to end;
- pairs.tsv: a SynthCLIP-style table from `DataFrame.to_csv(sep="\\t", index=False)`
  with captions holding tabs, quotes, commas and line breaks;
- cases.json: versions, the sizes and boxes of every case, the captions of pairs.tsv.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

OUT = Path("tests/fixtures/clip_data")
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def pattern_image(w, h, seed):
    """Gradients (interpolation), a fine diagonal pattern and noise (antialiasing)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    r = x * 255.0 / max(w - 1, 1)
    g = y * 255.0 / max(h - 1, 1)
    b = ((x * 5 + y * 11) % 13) * 19.0
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 14, size=(h, w, 3))
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


# name, width, height, crop boxes (top, left, height, width) with the output side.
IMAGES = [
    # Portrait: eval at 17 has a half-pixel crop offset ((24 - 17) / 2 = 3.5 -> 4).
    ("portrait", 37, 53, [((5, 3, 30, 27), 24), ((0, 0, 53, 37), 24), ((10, 7, 24, 24), 24), ((2, 9, 11, 14), 24)]),
    # Landscape: a window wider than tall, one shrunk on one axis only.
    ("landscape", 64, 48, [((3, 1, 40, 50), 24), ((12, 20, 24, 44), 24), ((0, 0, 48, 64), 17)]),
    # Extreme aspect: eval upscales the short side (20 -> 24).
    ("wide", 90, 20, [((0, 30, 20, 26), 24), ((4, 0, 16, 90), 24)]),
]
EVAL_SIZES = [24, 17]

# Plain resizes: source, output (w, h), filter. Vertical first: 53 - 24 > 2 * (37 - 24);
# 48 - 20 > 2 * (64 - 70) (width grows). Horizontal first: 48 - 40 = 2 * (64 - 60);
# 90 - 30 vs a shrinking height of 0.
RESIZES = [
    ("portrait", (24, 24), "bilinear"),
    ("portrait", (24, 24), "bicubic"),
    ("landscape", (70, 20), "bilinear"),
    ("landscape", (60, 40), "bilinear"),
    ("landscape", (60, 40), "bicubic"),
    ("wide", (30, 11), "bicubic"),
]


def save_png(img, name):
    img.save(OUT / name, optimize=True)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "pandas": pd.__version__,
        },
        "mean": MEAN,
        "std": STD,
        "images": [],
    }
    for seed, (name, w, h, boxes) in enumerate(IMAGES):
        src_name = f"img_{name}.png"
        save_png(pattern_image(w, h, seed), src_name)
        img = Image.open(OUT / src_name).convert("RGB")
        entry = {"name": name, "file": src_name, "size": [w, h], "eval": [], "crops": []}
        for size in EVAL_SIZES:
            # SynthCLIP's val_transform up to the 8-bit image.
            out = T.Compose([T.Resize(size), T.CenterCrop(size)])(img)
            assert out.size == (size, size)
            resized = F.resize(img, size)
            out_name = f"eval_{name}_{size}.png"
            save_png(out, out_name)
            entry["eval"].append({"size": size, "file": out_name, "resized": list(resized.size)})
        for k, ((top, left, ch, cw), size) in enumerate(boxes):
            out = F.resized_crop(img, top, left, ch, cw, [size, size], T.InterpolationMode.BILINEAR, antialias=True)
            out_name = f"crop_{name}_{k}.png"
            save_png(out, out_name)
            entry["crops"].append({"box": [top, left, ch, cw], "size": size, "file": out_name})
        meta["images"].append(entry)

    meta["resizes"] = []
    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    for k, (name, (ow, oh), filt) in enumerate(RESIZES):
        src = Image.open(OUT / f"img_{name}.png").convert("RGB")
        out_name = f"resize_{k}.png"
        save_png(src.resize((ow, oh), filters[filt]), out_name)
        meta["resizes"].append({"source": f"img_{name}.png", "size": [ow, oh], "filter": filt, "file": out_name})

    # ToTensor + Normalize of every level in every channel.
    levels = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (1, 1, 3))
    table = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])(Image.fromarray(levels, "RGB"))
    normalize = {"table": table[:, 0, :].tolist()}
    # One whole eval pipeline, normalized.
    full = T.Compose([T.Resize(24), T.CenterCrop(24), T.ToTensor(), T.Normalize(MEAN, STD)])
    src = Image.open(OUT / "img_portrait.png").convert("RGB")
    normalize["eval_portrait_24"] = full(src).reshape(-1).tolist()
    (OUT / "normalize.json").write_text(json.dumps(normalize) + "\n")

    # A SynthCLIP-style table written by pandas.
    captions = [
        "a plain caption",
        "a caption with a\ttab",
        'a caption with "quotes" in it',
        "a caption over\ntwo lines",
        "commas, and a trailing space ",
        "unicode: caf\u00e9 \u2014 \u65e5\u672c",
    ]
    paths = ["img_portrait.png", "img_landscape.png", "img_wide.png"] * 2
    pd.DataFrame({"image_path": paths, "caption": captions}).to_csv(OUT / "pairs.tsv", sep="\t", index=False)
    # SynthCLIP's reader must give back the same captions.
    back = pd.read_csv(OUT / "pairs.tsv", sep="\t")
    assert back["caption"].tolist() == captions
    meta["pairs"] = {"file": "pairs.tsv", "image_path": paths, "caption": captions}

    (OUT / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
