#!/usr/bin/env python3
"""PyTorch reference benchmark for synthos-engine (Wan2.1 DiT).

Measures the PyTorch / diffusers stack on the same cases as our Rust bench
(same case names), and writes one JSON file:

  copy, gemm, SDPA attention (flash / cudnn / efficient, fwd and fwd+bwd),
  memory-bound DiT ops (rms_norm, layer_norm_modulate, rope, gated_residual;
  eager and torch.compile), fused / foreach AdamW, the training step of the
  built-in demo (`train step demo 64x64 b16`: diffusers WanTransformer3DModel at
  the demo's config, AdamW, flow-matching loss), the Wan2.1-1.3B DiT training
  step (diffusers WanTransformer3DModel, random init, activation checkpointing)
  in two precision set-ups, and 25-step CFG sampling (DiT only, and the whole
  pipeline: 1-layer umT5-XXL, 2-layer CLIP ViT-H/14, DiT, tiled Wan VAE decode),
  and the SynthCLIP training step in open_clip (`clip train step synthclip-vit-b16
  b256`: open_clip ViT-B-16, AMP bf16 with fp32 weights, fused AdamW with SynthCLIP's
  betas/decay groups, ClipLoss, the logit-scale clamp; `clip train step tiny b64` on
  the CPU, fp32).

Run (GPU, full sizes, ~150 s on an H200):
  PYTHONUNBUFFERED=1 python3 scripts/reference/bench_torch.py --out torch.json
CPU (the cases and sizes of our `bench --device cpu`, fp32, no 1.3B cases; the
demo training step in fp32 with fused and foreach AdamW), on N threads:
  python3 scripts/reference/bench_torch.py --device cpu --threads 2 --out torch_cpu.json
Quick CPU smoke test of every code path (seconds):
  python3 scripts/reference/bench_torch.py --tiny --out /tmp/torch-tiny.json
Options: --device auto|cuda|cpu, --threads N (CPU; default os.cpu_count()),
--min-seconds S (demo step timing, as our --min-seconds; 0.5), --only SUBSTR
(case-name filter), --skip-compile, --time-budget S (170).

Pinned versions it was written for: torch 2.11, transformers 5.17,
diffusers 0.42.1 (wheel carried in .whl/; install with
`pip install --no-deps .whl/diffusers-0.42.1-py3-none-any.whl`; it imports with
huggingface_hub 1.33, importlib_metadata is optional).
diffusers is imported lazily: without it the DiT / VAE cases are recorded as
skipped and everything else still runs; likewise open_clip_torch (3.3.0) for the CLIP
step.

JSON: {"tool","torch_version","diffusers_version","device","date","cases":[
  {"name","variant","seconds","tflops","gbps","peak_mem_gib","samples_per_s",
   "error","note"}]}.  A skipped case has seconds null and note "skipped: ...".
"""

import argparse
import datetime
import gc
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------
# globals / helpers
# --------------------------------------------------------------------------

ARGS = None
DEV = "cpu"
BF16 = torch.bfloat16
# dtype and element size of the kernel cases (copy, gemm, attention, memory-bound ops):
# bf16 on a GPU (and in --tiny), fp32 in the CPU mode (our CPU path computes in f32)
DT = BF16
ES = 2
RESULTS = []
META = {}
T_START = time.perf_counter()


def log(msg):
    print(msg, flush=True)


def is_cuda():
    return DEV == "cuda"


def sync():
    if is_cuda():
        torch.cuda.synchronize()


def write_json():
    doc = dict(META)
    doc["cases"] = RESULTS
    tmp = ARGS.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, ARGS.out)


def record(name, variant, seconds=None, tflops=None, gbps=None, peak_mem_gib=None,
           samples_per_s=None, error=None, note=None):
    r = dict(name=name, variant=variant, seconds=seconds, tflops=tflops, gbps=gbps,
             peak_mem_gib=peak_mem_gib, samples_per_s=samples_per_s, error=error, note=note)
    RESULTS.append(r)
    write_json()
    parts = [f"{name} [{variant}]"]
    if seconds is not None:
        parts.append(f"{seconds * 1e3:.3f} ms")
    if tflops is not None:
        parts.append(f"{tflops:.1f} TFLOP/s")
    if gbps is not None:
        parts.append(f"{gbps:.1f} GB/s")
    if samples_per_s is not None:
        parts.append(f"{samples_per_s:.3f} samples/s")
    if peak_mem_gib is not None:
        parts.append(f"peak {peak_mem_gib:.2f} GiB")
    if error is not None:
        parts.append(f"ERROR: {error}")
    if note:
        parts.append(f"({note})")
    log("  ".join(parts))


def skip(name, variant, reason):
    record(name, variant, note=f"skipped: {reason}")


def reset_peak():
    if is_cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    if is_cuda():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def free():
    gc.collect()
    if is_cuda():
        torch.cuda.empty_cache()


def now():
    sync()
    return time.perf_counter()


def bench(fn, warmup=2, min_iters=3, max_iters=50, target_s=0.25):
    """Mean seconds per call; iteration count adapts to reach ~target_s."""
    for _ in range(warmup):
        fn()
    t0 = now()
    fn()
    one = now() - t0
    iters = max(min_iters, min(max_iters, int(target_s / max(one, 1e-7))))
    if is_cuda():
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def over_budget():
    return time.perf_counter() - T_START > ARGS.time_budget


def run_case(name, variant, fn):
    """fn() returns a dict of result fields (or None if it recorded itself)."""
    if ARGS.only and ARGS.only not in name:
        return
    if over_budget():
        skip(name, variant, f"time budget {ARGS.time_budget:.0f} s exceeded")
        return
    torch.manual_seed(0)
    try:
        res = fn()
        if res is not None:
            record(name, variant, **res)
    except Exception as e:  # fail-soft
        msg = f"{type(e).__name__}: {e}".strip()
        if len(msg) > 600:
            msg = msg[:600] + "..."
        tb = traceback.format_exc().strip().splitlines()
        record(name, variant, error=msg, note=(tb[-3] if len(tb) >= 3 else None))
    finally:
        free()


def import_diffusers():
    try:
        import diffusers  # noqa: F401
        try:
            diffusers.utils.logging.set_verbosity_error()
        except Exception:
            pass
        return diffusers, None
    except Exception as e:
        return None, f"diffusers not importable ({type(e).__name__}: {e})"


# --------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------

# The built-in demo of `synthos-engine train` (no arguments), as the Rust source sets it:
# src/pipeline/demo.rs (dit_config, TEXT_LEN, PIXEL_FACTOR, IMAGE_SIZE, t5_config = the tiny
# umT5 with d_model 64, clip_config = the tiny CLIP: 42 px / patch 14 -> 3x3 + 1 = 10 tokens
# of width 64) and src/train/config.rs (TrainConfig::demo: batch 16, AdamW lr 1e-3 wd 0.01,
# text/image dropout 0.1, no activation checkpointing). The DiT takes the image tokens
# through img_emb and concatenates them before the text rows, with the text's k/v
# projections (diffusers: image_dim set, added_kv_proj_dim None).
# The demo DiT also adds a fixed 2-D sine/cosine position table to the patch embedding's
# output (WanConfig::abs_pos_embed, pos_embedding_2d); a forward hook adds the same here.
DEMO = dict(
    name="train step demo 64x64 b16",
    dit=dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=32,
             in_channels=48, out_channels=48, text_dim=64, freq_dim=256,
             ffn_dim=512, num_layers=4, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=64,
             added_kv_proj_dim=None, rope_max_seq_len=1024),
    image_size=64, pixel_factor=4, batch=16, text_len=16, img_tokens=10,
    lr=1e-3, weight_decay=0.01, text_dropout=0.1, image_dropout=0.1, shift=1.0,
)


def pos_embedding_2d(h, w, d):
    """[1, d, 1, h, w]: per token, sin/cos of its row then of its column times the
    frequencies 10000^(-k/(d/4)) (src/models/wan/mod.rs, pos_embedding_2d)."""
    q = d // 4
    freq = 10000.0 ** (-torch.arange(q, dtype=torch.float64) / q)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    a, b = ys.reshape(-1, 1) * freq, xs.reshape(-1, 1) * freq
    table = torch.zeros(h * w, d, dtype=torch.float64)
    table[:, :4 * q] = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)
    return table.t().reshape(1, d, 1, h, w).float()


def sizes(mode):
    """Case sizes: "full" (the GPU figures), "small" (the names and sizes of our
    `bench --size small`, the CPU default) or "tiny" (seconds-long smoke test)."""
    if mode == "small":
        return dict(
            # the shapes of the built-in demo's training step
            copy_n=2**22, gemm_n=512,
            att_b=16, att_h=8, att_d=32, att_self=[64], att_cross=(64, 26),
            act=(16, 64, 256), rope=(16, 64, 8, 32), adam=(512, 256),
            train=[], sample_hw=None, clip_train=("tiny", 64),
        )
    if mode == "full":
        return dict(
            copy_n=2**28, gemm_n=8192,
            att_h=12, att_d=128, att_self=[900, 1560, 3600, 8192], att_cross=(1560, 769),
            act=(8, 1560, 1536), rope=(8, 1560, 12, 128), adam=(8960, 1536),
            dit=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                     in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                     ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                     qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280,
                     added_kv_proj_dim=None, rope_max_seq_len=1024),
            text_len=512, img_tokens=257,
            train=[("train step 1.3b 480x480 b1", 480, 480, 1),
                   ("train step 1.3b 832x480 b4", 832, 480, 4)],
            train_warmup=1, train_iters=3,
            sample_hw=(480, 480), steps=25, sample_runs=2,
            umt5=dict(vocab_size=256384, d_model=4096, d_ff=10240, num_heads=64, d_kv=64,
                      num_layers=1, relative_attention_num_buckets=32,
                      feed_forward_proj="gated-gelu"),
            clip=dict(hidden_size=1280, num_attention_heads=16, intermediate_size=5120,
                      patch_size=14, image_size=224, num_hidden_layers=2, hidden_act="gelu"),
            vae=dict(), vae_tile=None, size_tag="1.3b", clip_train=("synthclip-vit-b16", 256),
        )
    return dict(
        copy_n=2**16, gemm_n=128,
        att_h=2, att_d=32, att_self=[64, 96], att_cross=(96, 40),
        act=(2, 64, 128), rope=(2, 64, 2, 32), adam=(256, 128),
        dit=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                 in_channels=16, out_channels=16, text_dim=64, freq_dim=256,
                 ffn_dim=128, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=32,
                 added_kv_proj_dim=None, rope_max_seq_len=1024),
        text_len=16, img_tokens=5,
        train=[("train step tiny 64x64 b1", 64, 64, 1),
               ("train step tiny 96x64 b2", 96, 64, 2)],
        train_warmup=1, train_iters=2,
        sample_hw=(64, 64), steps=25, sample_runs=1,
        umt5=dict(vocab_size=1000, d_model=64, d_ff=128, num_heads=2, d_kv=32,
                  num_layers=1, relative_attention_num_buckets=32,
                  feed_forward_proj="gated-gelu"),
        clip=dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                  patch_size=14, image_size=28, num_hidden_layers=2, hidden_act="gelu"),
        vae=dict(base_dim=16),
        # force the tiled-decode path at tiny sizes
        vae_tile=dict(tile_sample_min_height=32, tile_sample_min_width=32,
                      tile_sample_stride_height=24, tile_sample_stride_width=24),
        size_tag="tiny", clip_train=("tiny", 64),
    )


# --------------------------------------------------------------------------
# 1-2. copy, gemm
# --------------------------------------------------------------------------

def case_copy(S):
    n = S["copy_n"]
    name = f"copy {n}"

    def f():
        x = torch.randn(n, device=DEV, dtype=DT)
        y = torch.empty_like(x)
        s = bench(lambda: y.copy_(x), warmup=2, min_iters=5, max_iters=100)
        return dict(seconds=s, gbps=2 * n * ES / s / 1e9)
    run_case(name, "eager", f)


def case_gemm(S):
    n = S["gemm_n"]
    name = f"gemm {n}x{n}x{n}"

    def f():
        a = torch.randn(n, n, device=DEV, dtype=DT)
        b = torch.randn(n, n, device=DEV, dtype=DT)
        c = torch.empty(n, n, device=DEV, dtype=DT)
        s = bench(lambda: torch.matmul(a, b, out=c), warmup=2, min_iters=5, max_iters=50)
        return dict(seconds=s, tflops=2 * n**3 / s / 1e12)
    run_case(name, "eager", f)


# --------------------------------------------------------------------------
# 3. attention
# --------------------------------------------------------------------------

def case_attention(S):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, D, B = S["att_h"], S["att_d"], S.get("att_b", 1)
    shapes = [(n, n, f"b{B} n{n} h{H} d{D}") for n in S["att_self"]]
    nq, nk = S["att_cross"]
    shapes.append((nq, nk, f"b{B} n{nq} k{nk} h{H} d{D}"))
    if is_cuda():
        backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                    ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    else:
        backends = [("math", None)]

    for nq, nk, tag in shapes:
        fwd_flops = 4 * B * H * nq * nk * D
        for mode in ("fwd", "fwd+bwd"):
            name = f"attention {mode} {tag}"
            for vname, be in backends:
                def f(nq=nq, nk=nk, mode=mode, be=be, fwd_flops=fwd_flops):
                    # DiT layout [B, N, H, D]; SDPA wants [B, H, N, D] -> transpose views
                    q = torch.randn(B, nq, H, D, device=DEV, dtype=DT)
                    k = torch.randn(B, nk, H, D, device=DEV, dtype=DT)
                    v = torch.randn(B, nk, H, D, device=DEV, dtype=DT)
                    if mode == "fwd":
                        def step():
                            return F.scaled_dot_product_attention(
                                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                        flops = fwd_flops
                    else:
                        q.requires_grad_(True)
                        k.requires_grad_(True)
                        v.requires_grad_(True)
                        gout = torch.randn(B, H, nq, D, device=DEV, dtype=DT)

                        def step():
                            o = F.scaled_dot_product_attention(
                                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                            return torch.autograd.grad(o, (q, k, v), gout)
                        flops = 3.5 * fwd_flops
                    if be is None:
                        s = bench(step, warmup=2, min_iters=3, max_iters=100)
                    else:
                        with sdpa_kernel(be):
                            s = bench(step, warmup=2, min_iters=3, max_iters=100)
                    return dict(seconds=s, tflops=flops / s / 1e12)
                run_case(name, vname, f)


# --------------------------------------------------------------------------
# 4. memory-bound ops
# --------------------------------------------------------------------------

def rms_norm(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def ln_modulate(x, shift, scale, eps=1e-6):
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * (1 + scale) + shift).type_as(x)


def rope(x, freqs):
    b, n, h, d = x.shape
    xc = torch.view_as_complex(x.float().reshape(b, n, h, d // 2, 2))
    return torch.view_as_real(xc * freqs).flatten(3).type_as(x)


def gated_residual(x, y, gate):
    return x + y * gate


def case_memops(S, variants=("eager", "compile"), adam=True):
    B, N, C = S["act"]
    rb, rn, rh, rd = S["rope"]
    nact = B * N * C
    nrope = rb * rn * rh * rd

    def make_rms():
        x = torch.randn(B, N, C, device=DEV, dtype=DT)
        w = torch.randn(C, device=DEV, dtype=DT)
        return rms_norm, (x, w)

    def make_ln():
        x = torch.randn(B, N, C, device=DEV, dtype=DT)
        sh = torch.randn(B, 1, C, device=DEV, dtype=DT)
        sc = torch.randn(B, 1, C, device=DEV, dtype=DT)
        return ln_modulate, (x, sh, sc)

    def make_rope():
        x = torch.randn(rb, rn, rh, rd, device=DEV, dtype=DT)
        ang = torch.rand(rn, 1, rd // 2, device=DEV) * 6.28
        freqs = torch.polar(torch.ones_like(ang), ang)  # complex64 [N,1,D/2]
        return rope, (x, freqs)

    def make_gr():
        x = torch.randn(B, N, C, device=DEV, dtype=DT)
        y = torch.randn(B, N, C, device=DEV, dtype=DT)
        g = torch.randn(B, 1, C, device=DEV, dtype=DT)
        return gated_residual, (x, y, g)

    ops = [
        (f"rms_norm {B}x{N}x{C}", make_rms, 2 * nact * ES),
        (f"layer_norm_modulate {B}x{N}x{C}", make_ln, 2 * nact * ES),
        (f"rope {rb}x{rn}x{rh}x{rd}", make_rope, 2 * nrope * ES),
        (f"gated_residual {B}x{N}x{C}", make_gr, 3 * nact * ES),
    ]
    for name, make, nbytes in ops:
        for variant in variants:
            if variant == "compile" and ARGS.skip_compile:
                if not ARGS.only or ARGS.only in name:
                    skip(name, variant, "--skip-compile")
                continue

            def f(make=make, nbytes=nbytes, variant=variant):
                fn, args = make()
                note = None
                if variant == "compile":
                    torch._dynamo.reset()
                    cfn = torch.compile(fn, dynamic=False)
                    t0 = now()
                    cfn(*args)
                    note = f"torch.compile default mode; compile {now() - t0:.1f} s not counted"
                else:
                    cfn = fn
                s = bench(lambda: cfn(*args), warmup=2, min_iters=5, max_iters=100)
                return dict(seconds=s, gbps=nbytes / s / 1e9, note=note)
            run_case(name, variant, f)

    if not adam:
        return
    # AdamW
    r, c = S["adam"]
    n = r * c
    name = f"adamw {r}x{c}"
    for variant in ("fused", "foreach"):
        def f(variant=variant):
            p = torch.nn.Parameter(torch.randn(r, c, device=DEV))
            p.grad = torch.randn(r, c, device=DEV)
            kw = {"fused": True} if variant == "fused" else {"foreach": True}
            opt = torch.optim.AdamW([p], lr=1e-5, weight_decay=0.01, **kw)
            s = bench(opt.step, warmup=2, min_iters=5, max_iters=100)
            return dict(seconds=s, gbps=n * (4 + 6 * 4) / s / 1e9)
        run_case(name, variant, f)


# --------------------------------------------------------------------------
# 5. DiT training step
# --------------------------------------------------------------------------

def dit_fwd_flops(cfg, B, N, nctx):
    """Forward FLOPs of the transformer blocks (2 flops / MAC) + attention."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ffn = cfg["ffn_dim"]
    per_tok = 2 * (4 * d * d + 2 * d * d + 2 * d * ffn)  # self qkvo, cross q/o, ffn
    per_ctx = 2 * (2 * d * d)                            # cross k/v on context rows
    attn = 4 * N * N * d + 4 * N * nctx * d              # self + cross (H*D = d)
    return B * cfg["num_layers"] * (N * per_tok + nctx * per_ctx + attn)


FLOPS_NOTE = ("model flops = blocks only: linears 2/MAC (self qkvo, cross q/o/k/v on ctx rows, "
              "ffn) + attention 4*N*Nk*H*D; train = 3x fwd, no recompute counted")


def build_dit(S, dtype, cfg=None):
    from diffusers import WanTransformer3DModel
    with torch.device(DEV):
        m = WanTransformer3DModel(**(cfg or S["dit"]))
    m = m.to(dtype)
    if dtype != torch.float32:
        # what from_pretrained(torch_dtype=bf16) does: keep these modules in fp32
        keep = getattr(m, "_keep_in_fp32_modules", None) or []
        for pname, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.is_floating_point() and any(k in pname.split(".") for k in keep):
                t.data = t.data.float()
    return m


def dit_inputs(S, B, w, h, dtype):
    lat = torch.randn(B, 16, 1, h // 8, w // 8, device=DEV, dtype=dtype)
    ctx = torch.randn(B, S["text_len"], S["dit"]["text_dim"], device=DEV, dtype=dtype)
    img = torch.randn(B, S["img_tokens"], S["dit"]["image_dim"], device=DEV, dtype=dtype)
    return lat, ctx, img


def case_clip_train(S):
    """One SynthCLIP training step in open_clip, as our `clip train step` case times it:
    random images and captions, both towers, ClipLoss over the whole batch, backward,
    AdamW (betas 0.9/0.98, eps 1e-8, weight decay 0.5 except 1-D / bias / ln / bn
    parameters), and the logit_scale clamp to [0, ln 100]."""
    preset, B = S["clip_train"]
    name = f"clip train step {preset} b{B}"
    if ARGS.only and ARGS.only not in name:
        return
    try:
        import open_clip
        from open_clip.loss import ClipLoss
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    except Exception as e:  # noqa: BLE001
        skip(name, "open_clip", f"skipped: open_clip_torch not importable ({e})")
        return
    variant = "amp-bf16 fused" if is_cuda() else "fp32 foreach"

    def f():
        if preset == "synthclip-vit-b16":
            model = open_clip.create_model("ViT-B-16", pretrained=None)
            side, ctx = 224, 77
        else:  # our `tiny` preset
            vision = CLIPVisionCfg(layers=2, width=64, head_width=32, mlp_ratio=2.0, patch_size=8, image_size=32)
            text = CLIPTextCfg(context_length=16, vocab_size=49408, width=64, heads=2, layers=2, mlp_ratio=2.0)
            model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)
            side, ctx = 32, 16
        model = model.to(DEV).train()
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n else decay).append(p)
        impl = dict(fused=True) if is_cuda() else dict(foreach=True)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.5}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=5e-4, betas=(0.9, 0.98), eps=1e-8, **impl)
        loss_fn = ClipLoss()
        images = torch.randn(B, 3, side, side, device=DEV)
        g = torch.Generator().manual_seed(0)
        text = torch.zeros(B, ctx, dtype=torch.long)
        for i in range(B):
            n = 2 + int(torch.randint(0, ctx - 1, (1,), generator=g))
            text[i, 0] = 49406
            text[i, 1:n - 1] = torch.randint(1, 49000, (n - 2,), generator=g)
            text[i, n - 1] = 49407
        text = text.to(DEV)
        dev_type = "cuda" if is_cuda() else "cpu"

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev_type, dtype=BF16, enabled=is_cuda()):
                img, txt, scale = model(images, text)
                loss = loss_fn(img, txt, scale)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            return loss

        reset_peak()
        sec = time_like_engine(step, ARGS.min_seconds)
        pk = peak_gib()
        nparams = sum(p.numel() for p in model.parameters())
        del model, opt
        return dict(seconds=sec, peak_mem_gib=pk, samples_per_s=B / sec,
                    note=f"{nparams / 1e6:.1f}M params, {side}px, context {ctx}")
    run_case(name, variant, f)


def case_train(S):
    _, why = import_diffusers()
    for name, w, h, B in S["train"]:
        for variant in ("autocast-fp32-params", "bf16-params-fp32-master"):
            if why:
                if not ARGS.only or ARGS.only in name:
                    skip(name, variant, why)
                continue

            def f(name=name, w=w, h=h, B=B, variant=variant):
                cfg = S["dit"]
                master = variant == "bf16-params-fp32-master"
                model = build_dit(S, BF16 if master else torch.float32)
                model.train()
                model.enable_gradient_checkpointing()
                params = [p for p in model.parameters() if p.requires_grad]
                fused = dict(fused=True)
                if master:
                    masters = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
                    for m in masters:
                        m.grad = torch.zeros_like(m)
                    opt = torch.optim.AdamW(masters, lr=1e-5, weight_decay=0.01, **fused)
                else:
                    masters = None
                    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **fused)
                x0, ctx, img = dit_inputs(S, B, w, h, BF16)
                eps = torch.randn_like(x0)
                t = torch.rand(B, device=DEV) * 1000.0
                s_ = (t / 1000.0).view(B, 1, 1, 1, 1)
                noisy = ((1 - s_) * x0.float() + s_ * eps.float()).to(BF16)
                target = (eps.float() - x0.float())
                dev_type = "cuda" if is_cuda() else "cpu"

                def step():
                    if master:
                        model.zero_grad(set_to_none=True)
                    else:
                        opt.zero_grad(set_to_none=True)
                    if master:
                        pred = model(noisy, t, ctx, encoder_hidden_states_image=img,
                                     return_dict=False)[0]
                    else:
                        with torch.autocast(dev_type, dtype=BF16):
                            pred = model(noisy, t, ctx, encoder_hidden_states_image=img,
                                         return_dict=False)[0]
                    loss = F.mse_loss(pred.float(), target)
                    loss.backward()
                    if master:
                        with torch.no_grad():
                            torch._foreach_copy_([m.grad for m in masters], [p.grad for p in params])
                            opt.step()
                            torch._foreach_copy_([p.data for p in params], [m.data for m in masters])
                    else:
                        opt.step()
                    return loss

                reset_peak()
                for _ in range(S["train_warmup"]):
                    step()
                t0 = now()
                for _ in range(S["train_iters"]):
                    step()
                sec = (now() - t0) / S["train_iters"]
                pk = peak_gib()
                N = (h // 16) * (w // 16)
                nctx = S["text_len"] + S["img_tokens"]
                flops = 3 * dit_fwd_flops(cfg, B, N, nctx)
                nparams = sum(p.numel() for p in params)
                del model, opt, masters, params
                return dict(seconds=sec, tflops=flops / sec / 1e12, peak_mem_gib=pk,
                            samples_per_s=B / sec,
                            note=f"{nparams / 1e9:.3f}B params, N={N}, ctx={nctx}; {FLOPS_NOTE}")
            run_case(name, variant, f)


def time_like_engine(fn, min_seconds):
    """Mean seconds per call, timed as our `bench::time`: one untimed warm-up call, then
    calls until at least 3 and `min_seconds` have passed."""
    fn()
    sync()
    iters = 0
    t0 = time.perf_counter()
    while True:
        fn()
        iters += 1
        if iters >= 3:
            sync()
            t = time.perf_counter() - t0
            if t >= min_seconds:
                return t / iters


def train_schedule(n=1000, shift=5.0):
    """Our TrainSchedule (src/schedule.rs, = DiffSynth's): sigmas, timesteps, weights."""
    s = 1.0 - torch.arange(n, dtype=torch.float64) / n
    sig = shift * s / (1 + (shift - 1) * s)
    t = sig * n
    y = torch.exp(-2 * ((t - n / 2) / n) ** 2)
    w = (y - y.min()) * n / (y - y.min()).sum()
    return sig.float(), t.float(), w.float()


def case_demo_train(S):
    """One optimizer step of the built-in demo, as our `train step demo 64x64 b16` times
    it (Trainer::train_step after the cache-filling warm-up step): per step, fresh noise,
    timestep indices and dropout draws for a fixed batch of 16 encoded samples; the
    samples whose image is dropped (p 0.1) run as a second forward without image tokens;
    loss = mean of w(t) * MSE(v, noise - x0); backward; global grad norm; AdamW."""
    D = DEMO
    name = D["name"]
    _, why = import_diffusers()
    if is_cuda():
        # our GPU path: bf16 compute, fp32 master weights and moments
        variants = [("autocast-bf16 fused", "fused"), ("autocast-bf16 foreach", "foreach")]
    else:
        variants = [("fp32 fused", "fused"), ("fp32 foreach", "foreach")]
    for variant, impl in variants:
        if why:
            if not ARGS.only or ARGS.only in name:
                skip(name, variant, why)
            continue

        def f(variant=variant, impl=impl):
            cfg = D["dit"]
            B, L, N_img = D["batch"], D["text_len"], D["img_tokens"]
            C = cfg["in_channels"]
            side = D["image_size"] // D["pixel_factor"]
            model = build_dit(S, torch.float32, cfg)
            d_model = cfg["num_attention_heads"] * cfg["attention_head_dim"]
            pos = pos_embedding_2d(side // 2, side // 2, d_model).to(DEV)
            model.patch_embedding.register_forward_hook(lambda _m, _i, out: out + pos.to(out.dtype))
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=D["lr"], weight_decay=D["weight_decay"],
                                    **{impl: True})
            # the cached encoder outputs of the 16 samples (fixed across steps)
            x0 = torch.randn(B, C, 1, side, side, device=DEV)
            text = torch.randn(B, L, cfg["text_dim"], device=DEV)
            empty_text = torch.zeros(1, L, cfg["text_dim"], device=DEV)
            empty_text[:, :1] = torch.randn(1, 1, cfg["text_dim"], device=DEV)
            img = torch.randn(B, N_img, cfg["image_dim"], device=DEV)
            sig_tab, t_tab, w_tab = (v.to(DEV) for v in train_schedule(shift=D["shift"]))

            def forward(*a, **k):
                if not is_cuda():
                    return model(*a, **k, return_dict=False)[0]
                with torch.autocast("cuda", dtype=BF16):
                    return model(*a, **k, return_dict=False)[0]

            def step():
                opt.zero_grad(set_to_none=True)
                drop_text = torch.rand(B) < D["text_dropout"]
                drop_img = torch.rand(B) < D["image_dropout"]
                idx = torch.randint(0, 1000, (B,), device=DEV)
                noise = torch.randn_like(x0)
                sig = sig_tab[idx].view(B, 1, 1, 1, 1)
                x_t = (1 - sig) * x0 + sig * noise
                target = noise - x0
                ctx = torch.where(drop_text.to(DEV).view(B, 1, 1), empty_text, text)
                total = None
                for dropped in (False, True):
                    g = (drop_img == dropped).nonzero().flatten().to(DEV)
                    if g.numel() == 0:
                        continue
                    pred = forward(x_t[g], t_tab[idx[g]], ctx[g],
                                   encoder_hidden_states_image=None if dropped else img[g])
                    per = (pred.float() - target[g]).pow(2).mean(dim=(1, 2, 3, 4))
                    s_ = (per * w_tab[idx[g]]).sum()
                    total = s_ if total is None else total + s_
                loss = total / B
                loss.backward()
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                opt.step()
                return loss.item(), grad_norm.item()

            sec = time_like_engine(step, ARGS.min_seconds)
            tokens = (side // cfg["patch_size"][1]) * (side // cfg["patch_size"][2])
            flops = 3 * dit_fwd_flops(cfg, B, tokens, L + N_img)
            nparams = sum(p.numel() for p in params)
            del model, opt, params
            threads = f", {torch.get_num_threads()} threads" if not is_cuda() else ""
            return dict(seconds=sec, tflops=flops / sec / 1e12, samples_per_s=B / sec,
                        note=f"{nparams / 1e6:.3f}M params, N={tokens}, ctx={L}+{N_img}{threads}; "
                             f"timed as our bench (1 warm-up, >= 3 steps and "
                             f"{ARGS.min_seconds} s); {FLOPS_NOTE}")
        run_case(name, variant, f)


# --------------------------------------------------------------------------
# 6. sampling
# --------------------------------------------------------------------------

def shifted_sigmas(steps, shift=5.0):
    s = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return s.tolist() + [0.0]


def euler_cfg(model, lat, ctx2, img2, steps, guidance=5.0):
    """lat [1,16,1,h,w]; ctx2 [2,L,text_dim] (cond, uncond); img2 [2,257,1280]."""
    sig = shifted_sigmas(steps)
    x = lat
    for i in range(steps):
        t = torch.full((2,), sig[i] * 1000.0, device=DEV)
        v = model(torch.cat([x, x]), t, ctx2, encoder_hidden_states_image=img2,
                  return_dict=False)[0]
        vc, vu = v.float().chunk(2)
        v = vu + guidance * (vc - vu)
        x = (x.float() + (sig[i + 1] - sig[i]) * v).to(lat.dtype)
    return x


def case_sample(S):
    if not S["sample_hw"]:
        return
    _, why = import_diffusers()
    w, h = S["sample_hw"]
    steps = S["steps"]
    tag = S["size_tag"]
    name_dit = f"sample {tag} {w}x{h} {steps} steps dit"
    name_pipe = f"sample {tag} {w}x{h} {steps} steps pipeline"
    if why:
        for n in (name_dit, name_pipe):
            if not ARGS.only or ARGS.only in n:
                skip(n, "eager", why)
        return
    cfg = S["dit"]
    N = (h // 16) * (w // 16)
    nctx = S["text_len"] + S["img_tokens"]
    fwd = dit_fwd_flops(cfg, 2, N, nctx) * steps

    def f_dit():
        model = build_dit(S, BF16).eval()
        lat, ctx, img = dit_inputs(S, 1, w, h, BF16)
        ctx2 = torch.cat([ctx, torch.randn_like(ctx)])
        img2 = img.expand(2, -1, -1).contiguous()
        with torch.inference_mode():
            reset_peak()
            euler_cfg(model, lat, ctx2, img2, steps)          # warm-up
            t0 = now()
            for _ in range(S["sample_runs"]):
                euler_cfg(model, lat, ctx2, img2, steps)
            sec = (now() - t0) / S["sample_runs"]
        pk = peak_gib()
        del model
        return dict(seconds=sec, tflops=fwd / sec / 1e12, peak_mem_gib=pk, samples_per_s=1 / sec,
                    note=f"bf16 eval, CFG 5 batch-2, shift 5, N={N}; tflops = fwd model flops "
                         f"x 2 x {steps} steps / s; {FLOPS_NOTE.split('; train')[0]}")
    run_case(name_dit, "eager", f_dit)

    def f_pipe():
        from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel
        from diffusers import AutoencoderKLWan
        notes = []
        with torch.device(DEV):
            te = UMT5EncoderModel(UMT5Config(**S["umt5"])).to(BF16).eval()
            clip = CLIPVisionModel(CLIPVisionConfig(**S["clip"])).to(BF16).eval()
            vae = AutoencoderKLWan(**S["vae"]).to(BF16).eval()
        model = build_dit(S, BF16).eval()
        if S["vae_tile"]:
            vae.enable_tiling(**S["vae_tile"])
        else:
            vae.enable_tiling()
        vae_dtype = [BF16]
        L = S["text_len"]
        ids = torch.randint(2, S["umt5"]["vocab_size"], (2, L), device=DEV)  # prompt, negative
        pix = torch.randn(1, 3, S["clip"]["image_size"], S["clip"]["image_size"], device=DEV,
                          dtype=BF16)
        mean = torch.tensor(vae.config.latents_mean, device=DEV).view(1, 16, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=DEV).view(1, 16, 1, 1, 1)

        def run():
            ctx2 = te(input_ids=ids).last_hidden_state                      # [2, L, 4096]
            img = clip(pixel_values=pix, output_hidden_states=True).hidden_states[-2]
            img2 = img.expand(2, -1, -1)
            lat = torch.randn(1, 16, 1, h // 8, w // 8, device=DEV, dtype=BF16)
            x = euler_cfg(model, lat, ctx2, img2, steps)
            z = (x.float() * std + mean).to(vae_dtype[0])
            try:
                return vae.decode(z, return_dict=False)[0]
            except Exception as e:
                if vae_dtype[0] is BF16:
                    notes.append(f"VAE bf16 failed ({type(e).__name__}), fp32 used")
                    vae.to(torch.float32)
                    vae_dtype[0] = torch.float32
                    return vae.decode(z.float(), return_dict=False)[0]
                raise

        with torch.inference_mode():
            reset_peak()
            img_out = run()                                              # warm-up
            shape = tuple(img_out.shape)
            t0 = now()
            for _ in range(S["sample_runs"]):
                run()
            sec = (now() - t0) / S["sample_runs"]
        pk = peak_gib()
        del te, clip, vae, model
        notes.append(f"umT5-XXL 1 layer + CLIP ViT-H/14 2 layers + DiT 25 steps CFG + "
                     f"tiled VAE ({'bf16' if vae_dtype[0] is BF16 else 'fp32'}) -> {shape}")
        return dict(seconds=sec, peak_mem_gib=pk, samples_per_s=1 / sec, note="; ".join(notes))
    run_case(name_pipe, "eager", f_pipe)


# --------------------------------------------------------------------------

def main():
    global ARGS, DEV, DT, ES, T_START
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda if available, else cpu. cpu: only the CPU-sized cases, "
                         "named and sized as our `bench --device cpu` (--size small), fp32, "
                         "and the demo training step")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch.set_num_threads on the CPU (default: os.cpu_count())")
    ap.add_argument("--min-seconds", type=float, default=0.5,
                    help="timing of the demo training step, as our bench's --min-seconds")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--only", default=None, help="run only cases whose name contains SUBSTR")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--time-budget", type=float, default=170.0)
    ARGS = ap.parse_args()
    T_START = time.perf_counter()

    if ARGS.device == "auto":
        DEV = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        DEV = ARGS.device
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    mode = "tiny" if ARGS.tiny else ("full" if is_cuda() else "small")
    if mode == "small":
        DT, ES = torch.float32, 4
    if not is_cuda():
        torch.set_num_threads(max(1, ARGS.threads))
    torch.manual_seed(0)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    except Exception:
        pass
    diffusers, why = import_diffusers()
    META.update(
        tool="torch",
        torch_version=torch.__version__,
        diffusers_version=getattr(diffusers, "__version__", None) if diffusers else None,
        device=torch.cuda.get_device_name() if is_cuda() else "cpu",
        sizes=mode,
        threads=None if is_cuda() else torch.get_num_threads(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    threads = "" if is_cuda() else f", {torch.get_num_threads()} threads"
    log(f"# torch {torch.__version__}, diffusers {META['diffusers_version']}"
        f"{' (' + why + ')' if why else ''}, device {META['device']}{threads}, sizes {mode}, "
        f"kernel dtype {str(DT).replace('torch.', '')}")
    S = sizes(mode)
    write_json()
    case_copy(S)
    case_gemm(S)
    case_attention(S)
    case_memops(S, variants=("eager",))
    case_demo_train(S)
    case_clip_train(S)
    case_train(S)
    case_sample(S)
    # compile variants last: their compile time must not starve the DiT cases
    case_memops(S, variants=("compile",), adam=False)
    log(f"# done in {time.perf_counter() - T_START:.1f} s -> {ARGS.out}")


if __name__ == "__main__":
    main()
