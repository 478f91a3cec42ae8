"""Makes tests/fixtures/vae/*, read by tests/vae.rs: a tiny random-weight Wan VAE in
diffusers' AutoencoderKLWan naming, and its single-frame encode/decode outputs and
gradients computed by diffusers in f32 on the CPU.

Pinned versions (tests/reference/requirements-vae.txt): torch==2.15.0, diffusers==0.42.1,
safetensors==0.8.0, numpy==2.4.6. Run from the repository root:

    pip install -r tests/reference/requirements-vae.txt
    python3 tests/reference/make_vae_fixtures.py

Files:
- tiny_weights.safetensors: every tensor of the model's state dict, in bf16. The weights
  are drawn in f32 and rounded to bf16 *before* the reference runs, so the f32 values the
  Rust test reads are exactly the ones diffusers used.
- tiny_io.safetensors (f32):
    image        [1, 3, 1, 40, 56] in [-1, 1]
    latent       [1, 16, 1, 5, 7]  encode mean, normalised: (mu - mean) / std
    z            [1, 16, 1, 5, 7]  a normalised latent to decode
    decoded_raw  [1, 3, 1, 40, 56] decoder output for z before the clamp
    decoded      [1, 3, 1, 40, 56] AutoencoderKLWan.decode (clamped to [-1, 1])
    proj         [1, 3, 1, 40, 56] fixed random projection R
    grad_z, grad.<param name>      gradients of sum(decoded_raw * R)
    z_tiled      [1, 16, 1, 13, 11] another normalised latent
    decoded_tiled [1, 3, 1, 104, 88] its tiled decode (enable_tiling with 64-pixel tiles
                 every 40 pixels: 8-pixel latent tiles every 5)
  where decoding z means decode(z * std + mean).

The tiny config keeps the real structure (z_dim 16, dim_mult [1, 2, 4, 4], two residual
blocks per encoder stage, temporal down/upsampling flags [False, True, True]) with a base
of 6 channels. Gammas are randomised around 1 so that the norms' scales are exercised.
"""

import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

OUT = os.path.join("tests", "fixtures", "vae")

LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]

# Parameters whose gradients are stored: a causal 3x3x3 conv inside an up block (only its
# last temporal slice acts on a single frame), the middle attention's qkv projection, a
# norm gain and the latent-side 1x1x1 conv.
GRAD_PARAMS = [
    "decoder.up_blocks.1.resnets.0.conv1.weight",
    "decoder.mid_block.attentions.0.to_qkv.weight",
    "decoder.up_blocks.2.resnets.1.norm2.gamma",
    "post_quant_conv.weight",
]


def check_versions():
    import diffusers
    import safetensors

    want = {"torch": "2.15.0", "diffusers": "0.42.1", "safetensors": "0.8.0", "numpy": "2.4.6"}
    got = {
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }
    bad = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    if bad:
        sys.exit(f"version mismatch (expected, found): {bad}")


def main():
    check_versions()
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=6,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    ).eval()

    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name == "decoder.conv_out.weight":
                # Larger outputs, so that some decoded values leave [-1, 1] and the clamp acts.
                p.mul_(8.0)
            # Other conv weights keep PyTorch's default (Kaiming-uniform) initialisation.
            p.copy_(p.to(torch.bfloat16).to(torch.float32))

    mean = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 16, 1, 1, 1)

    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 1, 40, 56, generator=g) * 2 - 1
    z = torch.randn(1, 16, 1, 5, 7, generator=g)
    proj = torch.randn(1, 3, 1, 40, 56, generator=g)
    z_tiled = torch.randn(1, 16, 1, 13, 11, generator=g)

    with torch.no_grad():
        mu = vae.encode(image).latent_dist.mean
        latent = (mu - mean) / std
        decoded = vae.decode(z * std + mean).sample

    # The decoder's raw output for one frame, exactly as AutoencoderKLWan._decode computes
    # it (post_quant_conv, then the decoder on frame 0 as the first chunk), without the clamp.
    z_leaf = z.clone().requires_grad_(True)
    vae.clear_cache()
    x = vae.post_quant_conv(z_leaf * std + mean)
    raw = vae.decoder(x[:, :, 0:1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=True)
    vae.clear_cache()
    assert torch.equal(raw.detach().clamp(-1, 1), decoded), "raw decoder output disagrees with decode()"
    loss = (raw * proj).sum()
    params = dict(vae.named_parameters())
    grads = torch.autograd.grad(loss, [z_leaf] + [params[n] for n in GRAD_PARAMS])

    vae.enable_tiling(
        tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=40, tile_sample_stride_width=40
    )
    with torch.no_grad():
        decoded_tiled = vae.decode(z_tiled * std + mean).sample
    vae.disable_tiling()

    os.makedirs(OUT, exist_ok=True)
    weights = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}
    save_file(weights, os.path.join(OUT, "tiny_weights.safetensors"))
    io = {
        "image": image,
        "latent": latent,
        "z": z,
        "decoded_raw": raw.detach(),
        "decoded": decoded,
        "proj": proj,
        "grad_z": grads[0],
        "z_tiled": z_tiled,
        "decoded_tiled": decoded_tiled,
    }
    for n, gr in zip(GRAD_PARAMS, grads[1:]):
        io["grad." + n] = gr
    save_file({k: v.float().contiguous() for k, v in io.items()}, os.path.join(OUT, "tiny_io.safetensors"))
    nparams = sum(v.numel() for v in weights.values())
    clamped = (decoded.abs() == 1).float().mean().item()
    print(f"{len(weights)} tensors, {nparams} parameters; {clamped:.1%} of decoded values clamped")


if __name__ == "__main__":
    main()
