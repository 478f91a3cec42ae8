"""Makes tests/fixtures/wan/*: tiny Wan2.1 DiT weights, inputs, reference outputs and
reference gradients, read by tests/wan.rs.

Pinned versions (the "Wan DiT fixtures" section of tests/reference/requirements.txt):
    torch==2.15.0 (CPU build), diffusers==0.42.1, safetensors==0.8.0, numpy==2.4.6,
    einops==0.8.2, and the diffsynth==2.1.12 wheel (not installed: its package
    __init__ needs torchvision and much more; only three of its files are loaded, by
    tests/reference/diffsynth_files.py).

Run from the repository root:

    pip install -r tests/reference/requirements.txt
    pip download diffsynth==2.1.12 --no-deps -d /tmp/dsynth
    python3 tests/reference/make_wan_fixtures.py --diffsynth-wheel /tmp/dsynth/diffsynth-2.1.12-py3-none-any.whl

Two references, one set of weights:

* Text-only path: diffusers `WanTransformer3DModel` (image_dim=None). Its weights are
  written in diffusers naming (two shards + `diffusion_pytorch_model.safetensors.index.json`
  + `config.json`, the layout of a Hugging Face `transformer/` folder) and, converted
  with DiffSynth's own `WanVideoDiTFromDiffusers` table, in the original Wan naming
  (`wan_original.safetensors`), so the Rust loader is tested on both namings.

* Synthos image path: DiffSynth's `WanModel` built with `has_image_input=False`, exactly
  as the Synthos trainer (`examples/wanvideo/model_training/train.py`, `--i2i_mode`)
  builds it: a T2V DiT to which an `img_emb = MLP(clip_dim, dim)` is attached. With
  `has_image_input=False` every `CrossAttention` treats its whole context as one key set
  (`ctx = y`), so `cat[img_emb(clip), text_embedding(text)]` goes through the shared
  k, v, norm_k with one softmax over all keys — Synthos mode. `WanModel.forward` itself
  cannot run in 2.1.12 (it unpacks `self.patchify(x)` into two values), and the pipeline
  file that holds the real forward (`model_fn_wan_video` in `pipelines/wan_video.py`)
  imports most of the package, so `synthos_forward` below repeats the lines of
  `model_fn_wan_video` that apply here (time embedding, text embedding, the
  `clip_feature is not None and dit.require_clip_embedding` concatenation, patchify,
  the freqs table, the blocks, the head, unpatchify) while every layer is DiffSynth's.
  The img_emb tensors go to their own file (`img_emb.safetensors`, original naming),
  like a Synthos `epoch-N.safetensors` that holds only trained tensors, so the Rust test
  loads it as an overlay on `wan_original.safetensors`.
  As a cross-check, diffusers with `image_dim` set and `added_kv_proj_dim=None` (which
  also concatenates the image tokens in front of the text and shares k/v) must give the
  same output; the script asserts it.

All weights are rounded to bfloat16 and stored as BF16 (what real checkpoints hold), then
the references run in float64 on those exact values, so the fixtures measure the Rust
f32 path. (Both references compute a few things in float32 even in a float64 model:
diffusers' timestep sinusoid, FP32LayerNorm and residual adds, DiffSynth's RMSNorm.)
The scalar loss whose gradients are stored is sum(out * R) with R a fixed random tensor.
Sizes: dim 64, 2 heads of 32 (the CUDA attention kernel supports 32; with 64, DiffSynth's
rope table of `dim // 3 = 21` channels is inconsistent with Wan's `2*(64//6) = 20`), ffn
128, 2 layers, text_dim 32, freq_dim 256, clip_dim 32, batch 2, latents 6x10 (3x5
patches), 2 frames for the text-only case and 1 for the image case, 9 text rows, 257
clip tokens.
"""

import argparse
import json
import os
import sys

import numpy as np
import safetensors
import safetensors.torch
import torch

import diffsynth_files

OUT = os.path.join("tests", "fixtures", "wan")
PINS = {"torch": "2.15.0", "safetensors": "0.8.0", "numpy": "2.4.6"}

TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=128,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
CLIP_DIM = 32
BATCH = 2
TEXT_LEN = 9
CLIP_TOKENS = 257
TIMESTEPS = [937.5, 212.25]

# Parameters whose gradients are stored (original naming), besides the inputs'.
GRAD_PARAMS = [
    "patch_embedding.weight",
    "time_embedding.0.bias",
    "blocks.0.self_attn.q.weight",
    "blocks.1.cross_attn.k.weight",
    "blocks.1.modulation",
    "head.head.weight",
]
GRAD_PARAMS_IMG = ["img_emb.proj.1.weight", "img_emb.proj.0.weight"]


def check_versions():
    import diffusers
    import einops

    found = {
        "torch": torch.__version__.split("+")[0],
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "diffusers": diffusers.__version__,
        "einops": einops.__version__,
    }
    want = dict(PINS, diffusers="0.42.1", einops="0.8.2")
    bad = {k: (found[k], v) for k, v in want.items() if found[k] != v}
    if bad:
        sys.exit(f"version mismatch (found, pinned): {bad}")


def synthos_dit(ds):
    """DiffSynth's `WanModel` in the tiny config, built as the Synthos trainer builds it
    (`has_image_input=False`); the caller attaches `img_emb`."""
    return ds.WanModel(
        dim=64, in_dim=16, ffn_dim=128, out_dim=16, text_dim=32, freq_dim=256, eps=1e-6,
        patch_size=(1, 2, 2), num_heads=2, num_layers=2, has_image_input=False,
    )


def bf16_round_(module, gen):
    """Gives every parameter fresh random values (norm weights near 1 so they matter
    without dominating), rounded to bfloat16."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # every 1-D weight is a norm's
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            elif p.dim() == 1:
                v = 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            else:
                # Linear/conv weights by fan-in; modulation tables like their PyTorch init.
                fan_in = p.shape[-1] if ("scale_shift_table" in name or "modulation" in name) else p[0].numel()
                v = torch.randn(p.shape, generator=gen, dtype=torch.float64) / fan_in**0.5
            p.copy_(v.to(torch.bfloat16).to(p.dtype))


def save_bf16(tensors, path):
    safetensors.torch.save_file(
        {k: v.detach().to(torch.bfloat16).contiguous() for k, v in tensors.items()},
        path,
        metadata={"format": "pt"},
    )


def save_f32(tensors, path):
    safetensors.torch.save_file(
        {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()},
        path,
        metadata={"format": "pt"},
    )


def write_diffusers_dir(model, directory):
    """config.json plus two shards and their index, as diffusers writes a sharded model."""
    os.makedirs(directory, exist_ok=True)
    for f in os.listdir(directory):
        os.remove(os.path.join(directory, f))
    model.save_config(directory)
    sd = model.state_dict()
    names = sorted(sd)
    half = len(names) // 2
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": names[:half],
        "diffusion_pytorch_model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_bf16({k: sd[k] for k in keys}, os.path.join(directory, shard))
        weight_map.update({k: shard for k in keys})
    total = sum(sd[k].numel() * 2 for k in names)
    with open(os.path.join(directory, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def synthos_forward(ds, dit, latents, timestep, text, clip):
    """The lines of DiffSynth's `model_fn_wan_video` (pipelines/wan_video.py, 2.1.12) on
    the path Synthos uses: no VAE embedding, CLIP tokens through `dit.img_emb`."""
    t = dit.time_embedding(ds.sinusoidal_embedding_1d(dit.freq_dim, timestep))
    t_mod = dit.time_projection(t).unflatten(1, (6, dit.dim))
    context = dit.text_embedding(text)
    if clip is not None:
        context = torch.cat([dit.img_emb(clip), context], dim=1)
    x = dit.patchify(latents)
    f, h, w = x.shape[2:]
    x = x.flatten(2).transpose(1, 2).contiguous()  # 'b c f h w -> b (f h w) c'
    freqs = torch.cat([
        dit.freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        dit.freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        dit.freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    for block in dit.blocks:
        x = block(x, context, t_mod, freqs)
    x = dit.head(x, t)
    return dit.unpatchify(x, (f, h, w))


def run_with_grads(forward, inputs, params, proj):
    """Forward, then d(sum(out*proj)) w.r.t. the named inputs and parameters."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    for p in params.values():
        p.grad = None
    out = forward(leaves)
    (out * proj).sum().backward()
    grads = {f"grad.{k}": v.grad for k, v in leaves.items()}
    grads.update({f"grad.param.{k}": p.grad for k, p in params.items()})
    return out.detach(), grads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffsynth-wheel", default=diffsynth_files.WHEEL)
    args = ap.parse_args()
    check_versions()
    from diffusers import WanTransformer3DModel

    ds, ds_conv = diffsynth_files.load_dit(args.diffsynth_wheel)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(20261123)
    os.makedirs(OUT, exist_ok=True)

    # ---- weights: diffusers T2V model, then the same tensors in original naming ----
    ref = WanTransformer3DModel(**TINY, image_dim=None)
    bf16_round_(ref, gen)
    write_diffusers_dir(ref, os.path.join(OUT, "diffusers"))
    diffusers_sd = ref.state_dict()
    original_sd = ds_conv.WanVideoDiTFromDiffusers(diffusers_sd)
    assert len(original_sd) == len(diffusers_sd), "every diffusers tensor has an original name"
    save_bf16(original_sd, os.path.join(OUT, "wan_original.safetensors"))

    # ---- DiffSynth model in Synthos mode, same weights + a random img_emb ----
    dit = synthos_dit(ds)
    dit.load_state_dict(original_sd, strict=True)
    dit.img_emb = ds.MLP(CLIP_DIM, 64, has_pos_emb=False)
    bf16_round_(dit.img_emb, gen)
    img_sd = {f"img_emb.{k}": v for k, v in dit.img_emb.state_dict().items()}
    save_bf16(img_sd, os.path.join(OUT, "img_emb.safetensors"))

    # diffusers config of the Synthos model (image_dim = CLIP width), for the JSON reader.
    synthos_ref = WanTransformer3DModel(**TINY, image_dim=CLIP_DIM)
    synthos_ref.save_config(os.path.join(OUT, "synthos_config"))
    # original name -> diffusers name, from DiffSynth's table (values are the names).
    conv_back = ds_conv.WanVideoDiTFromDiffusers({k: k for k in synthos_ref.state_dict()})
    synthos_ref.load_state_dict(
        {conv_back[k]: v for k, v in {**original_sd, **img_sd}.items()}, strict=True)

    ref.double().eval()
    dit.double().eval()
    synthos_ref.double().eval()

    gen_in = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=gen_in, dtype=torch.float64).float().double()  # noqa: E731
    t = torch.tensor(TIMESTEPS, dtype=torch.float64)

    # ---- text-only case: diffusers ----
    t2v_in = {"latents": rnd(BATCH, 16, 2, 6, 10), "text": rnd(BATCH, TEXT_LEN, TINY["text_dim"])}
    t2v_proj = rnd(BATCH, 16, 2, 6, 10)
    dparams = dict(ref.named_parameters())
    t2v_params = {k: dparams[conv_back[k]] for k in GRAD_PARAMS}
    out, grads = run_with_grads(
        lambda x: ref(x["latents"], t, x["text"], return_dict=False)[0], t2v_in, t2v_params, t2v_proj)
    # The same weights through DiffSynth's layers agree (text-only context).
    with torch.no_grad():
        ds_out = synthos_forward(ds, dit, t2v_in["latents"], t, t2v_in["text"], None)
    print(f"text-only: diffusers vs DiffSynth rel {((out - ds_out).norm() / out.norm()).item():.3e}")
    save_f32({**t2v_in, "timesteps": t, "proj": t2v_proj, "out": out, **grads},
             os.path.join(OUT, "t2v_io.safetensors"))

    # ---- Synthos image case: DiffSynth ----
    img_in = {
        "latents": rnd(BATCH, 16, 1, 6, 10),
        "text": rnd(BATCH, TEXT_LEN, TINY["text_dim"]),
        "clip": rnd(BATCH, CLIP_TOKENS, CLIP_DIM),
    }
    img_proj = rnd(BATCH, 16, 1, 6, 10)
    sparams = dict(dit.named_parameters())
    img_params = {k: sparams[k] for k in GRAD_PARAMS + GRAD_PARAMS_IMG}
    out, grads = run_with_grads(
        lambda x: synthos_forward(ds, dit, x["latents"], t, x["text"], x["clip"]), img_in, img_params, img_proj)
    with torch.no_grad():
        cross = synthos_ref(img_in["latents"], t, img_in["text"], img_in["clip"], return_dict=False)[0]
    rel = ((out - cross).norm() / out.norm()).item()
    print(f"Synthos mode: DiffSynth vs diffusers(image_dim, no added k/v) rel {rel:.3e}")
    assert rel < 1e-5, "the two references disagree on Synthos mode"
    save_f32({**img_in, "timesteps": t, "proj": img_proj, "out": out, **grads},
             os.path.join(OUT, "synthos_io.safetensors"))

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
