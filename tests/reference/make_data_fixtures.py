"""Makes tests/fixtures/data/*, read by tests/data.rs: source images and the result of the
Synthos training pipeline's resize-to-cover + center crop on them, computed by the
reference code itself.

The reference is DiffSynth's `ImageCropAndResize.crop_and_resize` (diffsynth 2.1.12,
diffsynth/core/data/operators.py, the operator the Synthos `train.py` uses for image
files), loaded from the unpacked wheel with importlib; it calls
torchvision.transforms.functional.resize(BILINEAR) on a PIL image (= Pillow's antialiased
bilinear Image.resize) and torchvision's center_crop. The [-1, 1] scaling is DiffSynth's
`preprocess_image`: `float32(pixel) * (2/255) - 1`.

Pinned versions (tests/reference/requirements-data.txt): pillow==13.0.0,
torchvision==0.29.2 (installed with --no-deps next to torch==2.15.0; only its PIL code
path runs), numpy==2.4.6, diffsynth==2.1.12 (not installed: `pip download diffsynth==2.1.12
--no-deps -d /tmp/dsynth` and unzip into /tmp/dsynth/x). Run from the repository root:

    python3 tests/reference/make_data_fixtures.py [WHEEL_DIR]

Files:
- case_<name>_src.png / .jpg: the source image (PNG is lossless, so the Rust test decodes
  exactly these pixels; the JPEG case checks decoder agreement within a tolerance),
- case_<name>_out.png: the 8-bit RGB output of crop_and_resize at the target size,
- cases.json: versions, and per case the files, the source and target sizes, the
  intermediate resized size, and (for the "odd_fraction" case) the [-1, 1] float values as a
  flat [3, H, W] list.
"""
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image

root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/dsynth/x")
out_dir = Path("tests/fixtures/data")
out_dir.mkdir(parents=True, exist_ok=True)

# operators.py imports imageio for its video loaders, which are not used here.
for name in ("imageio", "imageio.v3"):
    sys.modules.setdefault(name, types.ModuleType(name))
sys.modules["imageio"].v3 = sys.modules["imageio.v3"]
spec = importlib.util.spec_from_file_location("operators", root / "diffsynth/core/data/operators.py")
ops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ops)


def source_image(w, h, seed):
    """A gradient with a fine diagonal pattern and noise: smooth regions test the
    interpolation, the pattern and noise test the antialiasing."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    r = x * 255.0 / max(w - 1, 1)
    g = y * 255.0 / max(h - 1, 1)
    b = ((x * 7 + y * 13) % 17) * 15.0
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, size=(h, w, 3))
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


# (name, source w, h, target w, h, format)
cases = [
    ("down_crop_w", 64, 48, 32, 32, "png"),
    ("odd_fraction", 37, 23, 16, 16, "png"),
    ("upscale", 13, 9, 40, 24, "png"),
    ("wide", 100, 30, 24, 24, "png"),
    ("identity", 31, 45, 31, 45, "png"),
    ("crop_only_half_offset", 45, 31, 30, 31, "png"),
    ("round_half_even", 2, 3, 5, 3, "png"),
    ("landscape_to_portrait", 200, 120, 48, 80, "png"),
    ("jpeg", 96, 64, 40, 40, "jpg"),
]

meta = {
    "versions": {
        "pillow": PIL.__version__,
        "torchvision": torchvision.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "diffsynth": "2.1.12",
    },
    "cases": [],
}
for i, (name, w, h, tw, th, fmt) in enumerate(cases):
    src_name = f"case_{name}_src.{fmt}"
    src = source_image(w, h, seed=i)
    if fmt == "png":
        src.save(out_dir / src_name)
    else:
        src.save(out_dir / src_name, quality=90)
    # Reload so that the JPEG case runs on PIL's own decode of the file.
    loaded = Image.open(out_dir / src_name).convert("RGB")
    op = ops.ImageCropAndResize(height=th, width=tw)
    result = op(loaded)
    assert result.size == (tw, th), (name, result.size)
    out_name = f"case_{name}_out.png"
    result.save(out_dir / out_name)
    scale = max(tw / w, th / h)
    case = {
        "name": name,
        "source": src_name,
        "expected": out_name,
        "source_size": [w, h],
        "target_size": [tw, th],
        "resized_size": [round(w * scale), round(h * scale)],
    }
    if name == "odd_fraction":
        t = torch.Tensor(np.array(result, dtype=np.float32))
        t = t * ((1 - (-1)) / 255) + (-1)
        case["chw_values"] = t.permute(2, 0, 1).reshape(-1).tolist()
    meta["cases"].append(case)

(out_dir / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
print(f"wrote {len(cases)} cases to {out_dir}")
