#!/usr/bin/env python3
"""Reference fixtures for the contrastive CLIP model (SynthCLIP) tests.

Writes tests/fixtures/clip/slip_tiny.safetensors (and the same weights as a SynthCLIP
`checkpoint.pt`, slip_tiny_ddp.pt), slip_tiny_expected.safetensors,
openclip_tiny.safetensors and openclip_tiny_expected.safetensors (about 3 MB together).
Run from the repository root:

    python3 tests/reference/make_clip_fixtures.py --synthclip-training PATH/TO/SynthCLIP/Training

Pinned versions (tests/reference/requirements-clip.txt): torch 2.11.0, timm 1.0.31,
open_clip_torch 3.3.0, numpy 2.4.6, safetensors 0.8.0. The SynthCLIP model code is
imported as published, from a checkout of https://github.com/hammoudhasan/SynthCLIP at
commit 7e665b4 (its `Training/models.py`, `losses.py` and `utils.py`, which are SLIP's);
it is not copied here.

What the fixtures pin down:

- SLIP/SynthCLIP `models.CLIP` (its LayerNorm's float32 cast bypassed so that
  everything runs in float64) with a timm `VisionTransformer` image tower of
  `vit_base_patch16_224`'s form (class token, no pre-norm, LayerNorm eps 1e-6, exact
  GELU, class-token pooling after the final norm, `num_classes=0`) on a tiny config, run
  in float64 from float32 weights: both embeddings, `logit_scale.exp()`, the logits and
  the loss of `losses.CLIPLoss`, and the gradient of the loss for every weight and for
  the pixels.
- One `torch.optim.AdamW` step with SynthCLIP's parameter groups (no decay for
  `p.ndim < 2` or names containing `bias`, `ln`, `bn`), betas (0.9, 0.98), eps 1e-8,
  weight decay 0.5, followed by the `logit_scale` clamp to [0, 4.6052].
- SLIP's `utils.cosine_scheduler` (linear warm-up from `lr_start`, cosine to `lr_end`).
- A zero-shot classifier as `main.validate_zeroshot` builds it (per-template text
  embeddings normalized, averaged, renormalized) and the cosine logits of the images.
- OpenCLIP `open_clip.CLIP` (ln_pre, class embedding, `visual.proj`, exact GELU) on a
  tiny config: both embeddings, for loading OpenCLIP-named weights.

Head dims are 32 (1 image head of 32, 2 text heads of 32), the smallest the GPU
attention kernels take. Token ids are synthetic (a 64-word vocabulary; the end token is the largest id, 63, as
the pooling by `argmax` expects; one row has no end token, as SynthCLIP's tokenizer
leaves captions longer than the context).
"""

import argparse
import math
import sys

import numpy as np
import torch
from safetensors.torch import save_file

OUT = "tests/fixtures/clip"
VOCAB, CTX, START, END = 64, 16, 62, 63


def tokens(rng, lengths):
    rows = []
    for n in lengths:
        row = np.zeros(CTX, dtype=np.int64)
        if n is None:  # over-long caption cut without its end token
            row[0] = START
            row[1:] = rng.integers(1, START, CTX - 1)
        else:
            row[0] = START
            row[1 : n + 1] = rng.integers(1, START, n)
            row[n + 1] = END
        rows.append(row)
    return torch.tensor(np.stack(rows))


def f32_weights(model, seed):
    """Re-draws every floating tensor in float32 (so Rust reads exactly these values)."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for name, t in sd.items():
        if not t.is_floating_point():
            continue
        if name.endswith("logit_scale"):
            new = torch.tensor(math.log(1 / 0.07))
        elif t.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
            new = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            new = 0.1 * torch.randn(t.shape, generator=g)
        sd[name] = new.to(torch.float32)
    model.load_state_dict(sd)
    return {k: v.clone().contiguous() for k, v in sd.items() if v.is_floating_point()}


def slip_fixture(training_dir):
    sys.path.insert(0, training_dir)
    import models  # SynthCLIP Training/models.py
    import losses
    from timm.models.vision_transformer import VisionTransformer

    # SLIP's LayerNorm runs in float32 whatever the input (its fp16 handling); for a
    # float64 reference its cast is bypassed: the same LayerNorm, in float64.
    models.LayerNorm.forward = torch.nn.LayerNorm.forward

    torch.manual_seed(0)
    visual = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=1, mlp_ratio=4.0, num_classes=0, qkv_bias=True
    )
    model = models.CLIP(
        embed_dim=24,
        vision_width=32,
        vision_model=visual,
        context_length=CTX,
        vocab_size=VOCAB,
        transformer_width=64,
        transformer_heads=2,
        transformer_layers=2,
    )
    weights = f32_weights(model, 1)
    save_file(weights, f"{OUT}/slip_tiny.safetensors")
    # The same weights as SynthCLIP's main.py saves a checkpoint (DDP names, a wrapper
    # dict with the epoch and the argparse namespace).
    torch.save(
        {
            "epoch": 1,
            "state_dict": {f"module.{k}": v for k, v in weights.items()},
            "best_acc1": 0.0,
            "args": argparse.Namespace(model="CLIP_VITB16", lr=5e-4),
        },
        f"{OUT}/slip_tiny_ddp.pt",
    )
    model = model.double()

    rng = np.random.default_rng(2)
    pixels = torch.tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32)).double().requires_grad_(True)
    text = tokens(rng, [3, 9, None, 0])
    out = model(pixels, text)
    crit = losses.CLIPLoss()
    loss = crit(out)["loss"]
    img = torch.nn.functional.normalize(out["image_embed"], dim=-1)
    txt = torch.nn.functional.normalize(out["text_embed"], dim=-1)
    logits = out["logit_scale"] * img @ txt.t()
    loss.backward()

    exp = {
        "pixels": pixels.detach().float(),
        "text_ids": text.float(),  # ids < 64, exact in f32
        "image_embed": out["image_embed"].detach().float(),
        "text_embed": out["text_embed"].detach().float(),
        "logits": logits.detach().float(),
        "loss": loss.detach().float().reshape(()),
        "grad.pixels": pixels.grad.float(),
    }
    for name, p in model.named_parameters():
        exp[f"grad.{name}"] = p.grad.float()

    # One AdamW step with SynthCLIP's parameter groups and the clamp.
    p_wd, p_non_wd = [], []
    for n, p in model.named_parameters():
        if p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n:
            p_non_wd.append(p)
        else:
            p_wd.append(p)
    opt = torch.optim.AdamW(
        [{"params": p_wd, "weight_decay": 0.5}, {"params": p_non_wd, "weight_decay": 0}],
        lr=1e-3,
        betas=(0.9, 0.98),
        eps=1e-8,
        weight_decay=0.5,
    )
    opt.step()
    model.logit_scale.data.clamp_(0, 4.6052)
    for name, p in model.named_parameters():
        exp[f"step.{name}"] = p.detach().float()

    # Zero-shot classifier (3 classes x 2 templates) of the model before the step.
    cls_text = tokens(np.random.default_rng(3), [2, 4, 3, 5, 1, 6])
    model_pre = models.CLIP(
        embed_dim=24,
        vision_width=32,
        vision_model=VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=1, mlp_ratio=4.0, num_classes=0, qkv_bias=True
        ),
        context_length=CTX,
        vocab_size=VOCAB,
        transformer_width=64,
        transformer_heads=2,
        transformer_layers=2,
    )
    model_pre.load_state_dict(weights)
    model_pre = model_pre.double().eval()
    with torch.no_grad():
        feats = []
        for c in range(3):
            e = model_pre.encode_text(cls_text[2 * c : 2 * c + 2])
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(dim=0)
            feats.append(e / e.norm(dim=-1, keepdim=True))
        classifier = torch.stack(feats)
        im = model_pre.encode_image(pixels.detach())
        im = im / im.norm(dim=-1, keepdim=True)
        exp["zeroshot.class_ids"] = cls_text.float()
        exp["zeroshot.classifier"] = classifier.float()
        exp["zeroshot.logits"] = (im @ classifier.t()).float()

    # SLIP's learning-rate schedule: lr 5e-4, end 1e-5, 3 epochs of 7 steps, 1 warm-up
    # epoch from 1e-6.
    import utils

    exp["schedule"] = torch.tensor(utils.cosine_scheduler(5e-4, 1e-5, 3, 7, warmup_epochs=1, start_warmup_value=1e-6))
    save_file({k: v.contiguous() for k, v in exp.items()}, f"{OUT}/slip_tiny_expected.safetensors")
    print(f"slip: loss {loss.item():.6f}, {len(exp)} expected tensors")


def openclip_fixture():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=2, width=32, head_width=32, mlp_ratio=4.0, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=64, heads=2, layers=2)
    model = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text, quick_gelu=False)
    weights = f32_weights(model, 4)
    save_file(weights, f"{OUT}/openclip_tiny.safetensors")
    model = model.double().eval()
    rng = np.random.default_rng(5)
    pixels = torch.tensor(rng.standard_normal((3, 3, 32, 32)).astype(np.float32))
    ids = tokens(rng, [4, 0, 11])
    with torch.no_grad():
        exp = {
            "pixels": pixels,
            "text_ids": ids.float(),
            "image_embed": model.encode_image(pixels.double()).float(),
            "text_embed": model.encode_text(ids).float(),
        }
    save_file({k: v.contiguous() for k, v in exp.items()}, f"{OUT}/openclip_tiny_expected.safetensors")
    print(f"openclip: {sorted(weights)[:3]} ...")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synthclip-training", required=True, help="SynthCLIP's Training/ folder (commit 7e665b4)")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    slip_fixture(args.synthclip_training)
    openclip_fixture()


if __name__ == "__main__":
    main()
