"""Makes the PyTorch checkpoint fixtures read by tests/torch_checkpoint.rs and by the unit
tests of src/weights/torch_pt.rs, all under tests/fixtures/weights/:

- torch_synthclip_checkpoint.pt: what SynthCLIP's Training/main.py saves (SLIP's layout),
  `{epoch, state_dict, optimizer, scaler, best_acc1, args}`, for a tiny SLIP-shaped CLIP
  wrapped like DistributedDataParallel (every name starts with `module.`): f32, f16 (the
  visual tower), bf16 (the token embedding), an f64 and an i64 buffer, a 0-d
  `logit_scale`, two views sharing one storage (one at an offset), a transposed and a
  column-sliced (non-contiguous) view, AdamW state after one step, and an
  argparse.Namespace holding numpy scalars.
- torch_bare_state_dict.pt: `torch.save(model.state_dict())` of a small module (bf16,
  f32, a 0-d tensor, a float8 tensor written through `_rebuild_tensor_v3`).
- torch_bare_state_dict_archive_folder.pt: the same archive re-packed by Python's zipfile
  with its entries under `archive/` (what torch.save writes to a buffer, e.g. in
  transformers' `pytorch_model.bin`) instead of the file's stem; torch.load reads it.
- torch_non_tensor_entry.pt: a checkpoint whose state dict holds a string.
- torch_legacy_format.pt: the bare state dict in the pre-1.6 non-ZIP format.
- torch_pt_expected.json: for each readable fixture, each tensor's name as the engine
  reports it (`module.` removed), dtype code, shape, row-major little-endian bytes (hex),
  the values as f64, and the checkpoint's scalar metadata.

Pinned versions (tests/reference/requirements-pt.txt): torch==2.11.0, numpy==2.4.6.
Run from the repository root:

    pip install -r tests/reference/requirements-pt.txt
    python3 tests/reference/make_torch_pt_fixtures.py
"""

import argparse
import io
import json
import math
import os
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

OUT = os.path.join("tests", "fixtures", "weights")

DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.float8_e4m3fn: "F8_E4M3",
}


class Block(nn.Module):
    """SLIP's ResidualAttentionBlock, tiny."""

    def __init__(self, d):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 2 * d)), ("c_proj", nn.Linear(2 * d, d))]))
        self.ln_2 = nn.LayerNorm(d)


class Visual(nn.Module):
    """A few timm ViT names."""

    def __init__(self, d):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 2, 2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.norm = nn.LayerNorm(d)


class TinySynthClip(nn.Module):
    """SLIP's CLIP module names with tiny sizes, plus buffers that exercise the reader."""

    def __init__(self, d=4, vocab=10, ctx=3, embed=3):
        super().__init__()
        self.visual = Visual(d)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(Block(d))
        self.token_embedding = nn.Embedding(vocab, d)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, d) * 0.01)
        self.ln_final = nn.LayerNorm(d)
        self.image_projection = nn.Parameter(torch.randn(d, embed))
        self.text_projection = nn.Parameter(torch.randn(d, embed))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))


def add_buffers(model):
    """Buffers sharing one storage (views at offsets 0, 4 and a column slice at 1), a
    transposed view, an f64 and an i64 buffer."""
    base = torch.arange(12, dtype=torch.float32) * 0.25 - 1.0
    model.register_buffer("shared_head", base[:4])
    model.register_buffer("shared_tail", base[4:].view(2, 4))
    model.register_buffer("shared_columns", base.view(3, 4)[:, 1:3])
    model.register_buffer("transposed", (torch.arange(6, dtype=torch.float32) - 2.5).view(2, 3).t())
    model.register_buffer("f64_buffer", torch.tensor([1.0 / 3.0, -2.0, 1e-300], dtype=torch.float64))
    model.register_buffer("position_ids", torch.arange(3, dtype=torch.int64).unsqueeze(0))


class Ddp(nn.Module):
    """Names like DistributedDataParallel's: `module.` + the model's."""

    def __init__(self, model):
        super().__init__()
        self.module = model


def slip_args():
    """A subset of SynthCLIP's argparse options, plus numpy scalars as some scripts leave."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="CLIP_VITB16")
    parser.add_argument("--epochs", default=40, type=int)
    parser.add_argument("--lr", default=3e-3, type=float)
    parser.add_argument("--betas", default=(0.9, 0.98), nargs=2, type=float)
    parser.add_argument("--gpu", default=None, type=int)
    parser.add_argument("--disable-amp", action="store_true")
    parser.add_argument("--output-dir", default="vitb16-synthclip")
    args = parser.parse_args([])
    args.np_float = np.float64(0.5)
    args.np_int = np.int64(7)
    args.distributed = True
    return args


def describe(state_dict, strip):
    tensors = []
    for name, t in state_dict.items():
        t = t.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        values = [float(v) for v in t.to(torch.float64).reshape(-1).tolist()]
        assert all(math.isfinite(v) for v in values), name
        tensors.append(
            {
                "name": name[len("module.") :] if strip else name,
                "dtype": DTYPE_CODES[t.dtype],
                "shape": list(t.shape),
                "hex": raw.hex(),
                "values": values,
            }
        )
    return tensors


def save(obj, name, **kwargs):
    path = os.path.join(OUT, name)
    torch.save(obj, path, **kwargs)
    return path


def synthclip_checkpoint():
    torch.manual_seed(0)
    model = TinySynthClip()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    loss = sum((p * p).sum() for p in model.parameters())
    loss.backward()
    optimizer.step()
    # Mixed precision as a run might leave it: the visual tower in f16, the embedding in bf16.
    model.visual.half()
    model.token_embedding.to(torch.bfloat16)
    add_buffers(model)
    ddp = Ddp(model)
    state = {
        "epoch": 3,
        "state_dict": ddp.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0},
        "best_acc1": 12.5,
        "args": slip_args(),
    }
    sd = state["state_dict"]
    assert sd["module.shared_head"].untyped_storage().data_ptr() == sd["module.shared_tail"].untyped_storage().data_ptr()
    assert not sd["module.transposed"].is_contiguous() and not sd["module.shared_columns"].is_contiguous()
    assert sd["module.shared_tail"].storage_offset() == 4
    path = save(state, "torch_synthclip_checkpoint.pt")
    back = torch.load(path, weights_only=False)
    assert all(torch.equal(back["state_dict"][k], v) for k, v in sd.items())
    metadata = {"epoch": "3", "best_acc1": "12.5"}
    return {"tensors": describe(sd, strip=True), "metadata": metadata}


class Bare(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor(-0.0))
        self.register_buffer("fp8", torch.tensor([0.5, -1.0, 448.0, 0.0], dtype=torch.float8_e4m3fn))


def bare_state_dict():
    torch.manual_seed(1)
    model = Bare()
    model.proj.to(torch.bfloat16)
    sd = model.state_dict()
    path = save(sd, "torch_bare_state_dict.pt")
    back = torch.load(path)
    assert all(torch.equal(back[k].float(), v.float()) for k, v in sd.items())
    # The legacy format cannot hold float8 (torch.load fails on it): that tensor is left out.
    legacy_sd = OrderedDict((k, v) for k, v in sd.items() if k != "fp8")
    legacy = save(legacy_sd, "torch_legacy_format.pt", _use_new_zipfile_serialization=False)
    back = torch.load(legacy)
    assert all(torch.equal(back[k], v) for k, v in legacy_sd.items())
    archive_folder(path)
    return {"tensors": describe(sd, strip=False), "metadata": {}}


def archive_folder(path):
    """Re-packs `<stem>/...` as `archive/...`, stored, and checks torch still reads it."""
    stem = "archive"
    out = os.path.join(OUT, "torch_bare_state_dict_archive_folder.pt")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            name = stem + info.filename[info.filename.index("/") :]
            dst.writestr(name, src.read(info.filename))
    back = torch.load(out)
    orig = torch.load(path)
    assert all(torch.equal(back[k].float(), v.float()) for k, v in orig.items())


def non_tensor_entry():
    sd = OrderedDict([("module.weight", torch.ones(2)), ("module.note", "not a tensor")])
    save({"epoch": 1, "state_dict": sd}, "torch_non_tensor_entry.pt")


def main():
    if not torch.__version__.startswith("2.11.0"):
        sys.exit(f"expected torch 2.11.0 (tests/reference/requirements-pt.txt), found {torch.__version__}")
    expected = {
        "torch_synthclip_checkpoint.pt": synthclip_checkpoint(),
        "torch_bare_state_dict.pt": bare_state_dict(),
    }
    expected["torch_bare_state_dict_archive_folder.pt"] = expected["torch_bare_state_dict.pt"]
    non_tensor_entry()
    with open(os.path.join(OUT, "torch_pt_expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT) if n.startswith("torch_"))
    print(f"wrote the torch fixtures to {OUT}: {total} bytes")


if __name__ == "__main__":
    main()
