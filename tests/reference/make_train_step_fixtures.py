"""Makes tests/fixtures/train/step.safetensors and step.json: one Synthos training step
(loss, gradients, one AdamW update) on the tiny Wan DiT of tests/fixtures/wan, read by
tests/train_step.rs.

Pinned versions (the "Wan DiT fixtures" section of tests/reference/requirements.txt):
    torch==2.15.0, safetensors==0.8.0, numpy==2.4.6, einops==0.8.2, diffusers==0.42.1
    (checked, not used here), and the diffsynth==2.1.12 wheel, of which
    tests/reference/diffsynth_files.py loads wan_video_dit.py, flow_match.py and loss.py.

Run from the repository root (after make_wan_fixtures.py, whose weights it reads):

    /work/venv-ref/bin/python tests/reference/make_train_step_fixtures.py

The step is the Synthos seed trainer's (somepago/Synthos, DiffSynth-based): for each sample
of the batch, DiffSynth's own `FlowMatchSFTLoss(pipe, ...)` — draw a timestep index, take
`timestep = scheduler.timesteps[index]`, `x_t = scheduler.add_noise(x0, noise, timestep)`,
`mse_loss(model(x_t, timestep), noise − x0) · scheduler.training_weight(timestep)` — with
the `FlowMatchScheduler("Wan")` training table (1000 steps, shift 5); the batch loss is the
mean of the per-sample losses (the seed's runner: `batch_loss += loss; loss =
batch_loss / len(data)`), then one `torch.optim.AdamW(lr=1e-3, weight_decay=0.01)` step
over every parameter. The two random draws inside `FlowMatchSFTLoss` (`torch.randint`
for the index, `torch.randn_like` for the noise) are replaced by fixed values, which the
fixture stores; everything else is DiffSynth's code. The model function is
`make_wan_fixtures.synthos_forward` (the lines of DiffSynth's `model_fn_wan_video` that
apply) on DiffSynth's `WanModel` in Synthos mode, with the committed bf16 weights
(`wan_original.safetensors` + `img_emb.safetensors`) run in float64.

The reference runs with `pipe.torch_dtype = float64`, so the timestep it passes on is the
float32 table value itself. The seed trained with `torch_dtype = bfloat16`: there
`timestep` is rounded to bf16 first, the model sees that rounded value, and `add_noise` /
`training_weight` use the row `argmin |timesteps − bf16(t)|`, which is not the drawn row
for 706 of the 1000 indices (294 distinct rows remain). The script prints that lookup for
the indices used; the engine, like this fixture, uses the drawn row exactly.

Case "a" (Synthos path): batch 2, one frame, 257 CLIP tokens per sample, indices 37, 912.
Case "b" (image dropped): the same model with clip absent (context = text only), indices
604, 250; `img_emb` then gets no gradient, and torch's AdamW leaves such a parameter
untouched (no weight decay either).

Stored per case `c` (float32): inputs `c.x0`, `c.noise`, `c.text` (and `a.clip`); the
per-sample `c.sigma`, `c.t`, `c.w` the scheduler used; `c.loss` (the batch mean) and
`c.loss_per_sample`; `c.grad.<name>` for the parameters in GRAD_PARAMS that got a
gradient; `c.update.<name>` = (value after the AdamW step) − (value before), computed in
float64, for every name in GRAD_PARAMS. step.json holds the indices and hyper-parameters.
"""

import json
import os

import safetensors.torch
import torch

import diffsynth_files
from make_wan_fixtures import CLIP_DIM, TEXT_LEN, CLIP_TOKENS, check_versions, save_f32, synthos_dit, synthos_forward

WAN = os.path.join("tests", "fixtures", "wan")
OUT = os.path.join("tests", "fixtures", "train")
LR = 1e-3
WEIGHT_DECAY = 0.01
CASES = {"a": {"indices": [37, 912], "clip": True}, "b": {"indices": [604, 250], "clip": False}}

# img_emb, a block's self-attention, cross-attention and FFN, the patch embedding, the
# head, a modulation table and a norm weight (original naming).
GRAD_PARAMS = [
    "img_emb.proj.0.weight",
    "img_emb.proj.1.weight",
    "img_emb.proj.3.weight",
    "img_emb.proj.4.weight",
    "patch_embedding.weight",
    "blocks.0.self_attn.q.weight",
    "blocks.0.self_attn.norm_k.weight",
    "blocks.1.cross_attn.k.weight",
    "blocks.1.cross_attn.v.bias",
    "blocks.1.ffn.2.weight",
    "blocks.1.modulation",
    "head.head.weight",
    "head.modulation",
]


class FixedDraws:
    """Stands in for the `torch` module inside DiffSynth's loss.py for one call, so that
    its timestep draw returns `index` and its noise draw returns `noise`; every other
    attribute is torch's."""

    def __init__(self, index, noise):
        self.index, self.noise = index, noise

    def randint(self, low, high, size):
        assert low <= self.index < high and tuple(size) == (1,), (low, high, size)
        return torch.tensor([self.index])

    def randn_like(self, x):
        assert x.shape == self.noise.shape, (x.shape, self.noise.shape)
        return self.noise.to(x.dtype)

    def __getattr__(self, name):
        return getattr(torch, name)


class Pipe:
    """The attributes of a DiffSynth pipeline that `FlowMatchSFTLoss` reads. `model_fn`
    also records the timestep and noisy latents it was given."""

    def __init__(self, ds, dit, scheduler):
        self.ds, self.dit, self.scheduler = ds, dit, scheduler
        self.torch_dtype = torch.float64
        self.device = "cpu"
        self.in_iteration_models = ("dit",)
        self.seen = None

    def model_fn(self, dit, latents, timestep, context, clip_feature=None, **_):
        self.seen = (timestep.detach().clone(), latents.detach().clone())
        return synthos_forward(self.ds, dit, latents, timestep, context, clip_feature)


def load_model(ds):
    dit = synthos_dit(ds)
    dit.load_state_dict(safetensors.torch.load_file(os.path.join(WAN, "wan_original.safetensors")), strict=True)
    dit.img_emb = ds.MLP(CLIP_DIM, dit.dim, has_pos_emb=False)
    img = safetensors.torch.load_file(os.path.join(WAN, "img_emb.safetensors"))
    dit.img_emb.load_state_dict({k.removeprefix("img_emb."): v for k, v in img.items()}, strict=True)
    return dit.double().train()


def sample_loss(loss_mod, pipe, index, x0, noise, text, clip):
    """DiffSynth's FlowMatchSFTLoss on one sample (batch 1), with the fixed draws; returns
    the loss and the (σ, t, w) the scheduler used."""
    inputs = {"input_latents": x0, "context": text}
    if clip is not None:
        inputs["clip_feature"] = clip
    loss_mod.torch = FixedDraws(index, noise)
    try:
        loss = loss_mod.FlowMatchSFTLoss(pipe, **inputs)
    finally:
        loss_mod.torch = torch
    sched = pipe.scheduler
    t, x_t = pipe.seen
    row = torch.argmin((sched.timesteps - t).abs())
    sigma = sched.sigmas[row].double()
    assert row.item() == index and t.item() == sched.timesteps[index].item(), (row, t)
    assert torch.equal(x_t, (1 - sched.sigmas[row]) * x0 + sched.sigmas[row] * noise), "x_t is (1−σ)x0 + σ·noise"
    w = sched.training_weight(t).double()
    return loss, (sigma.item(), t.item(), w.item())


def seed_bf16_lookup(sched, index):
    """What the seed (torch_dtype = bf16) does with a drawn index: the rounded timestep
    the model sees and the table row its σ and weight come from."""
    t = sched.timesteps[index:index + 1].to(torch.bfloat16)
    row = torch.argmin((sched.timesteps - t).abs()).item()
    return t.item(), row


def run_case(ds, loss_mod, fm, name, case, rnd):
    dit = load_model(ds)
    sched = fm.FlowMatchScheduler("Wan")
    sched.set_timesteps(1000, training=True)
    pipe = Pipe(ds, dit, sched)
    b = len(case["indices"])
    x0, noise = rnd(b, 16, 1, 6, 10), rnd(b, 16, 1, 6, 10)
    text = rnd(b, TEXT_LEN, 32)
    clip = rnd(b, CLIP_TOKENS, CLIP_DIM) if case["clip"] else None

    losses, used = [], []
    for i, index in enumerate(case["indices"]):
        c = None if clip is None else clip[i:i + 1]
        loss, u = sample_loss(loss_mod, pipe, index, x0[i:i + 1], noise[i:i + 1], text[i:i + 1], c)
        losses.append(loss)
        used.append(u)
    batch_loss = 0.0
    for loss in losses:
        batch_loss += loss
    loss = batch_loss / len(losses)

    params = dict(dit.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.AdamW(dit.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    opt.zero_grad()
    loss.backward()
    out = {f"{name}.x0": x0, f"{name}.noise": noise, f"{name}.text": text}
    if clip is not None:
        out[f"{name}.clip"] = clip
        assert all(p.grad is not None for p in params.values()), "with an image every parameter has a gradient"
    for k in GRAD_PARAMS:
        if params[k].grad is not None:
            out[f"{name}.grad.{k}"] = params[k].grad
        else:
            assert clip is None and k.startswith("img_emb."), k
    opt.step()
    for k in GRAD_PARAMS:
        out[f"{name}.update.{k}"] = params[k].detach() - before[k]
        if params[k].grad is None:
            assert torch.equal(params[k].detach(), before[k]), f"{k} without a gradient is not updated"
    out[f"{name}.loss"] = loss.detach().reshape(1)
    out[f"{name}.loss_per_sample"] = torch.stack([v.detach() for v in losses])
    for j, key in enumerate(["sigma", "t", "w"]):
        out[f"{name}.{key}"] = torch.tensor([u[j] for u in used], dtype=torch.float64)

    print(f"case {name}: loss {loss.item():.8f} (per sample {[round(v.item(), 8) for v in losses]})")
    for index, (sigma, t, w) in zip(case["indices"], used):
        t_seed, row = seed_bf16_lookup(sched, index)
        print(f"  index {index}: sigma {sigma:.8f} t {t:.5f} w {w:.8f}; seed in bf16: model t {t_seed}, "
              f"sigma/w of row {row} (sigma {sched.sigmas[row].item():.8f}, w "
              f"{sched.linear_timesteps_weights[row].item():.8f})")
    return out


def main():
    check_versions()
    ds, _ = diffsynth_files.load_dit()
    fm = diffsynth_files.load_flow_match()
    loss_mod = diffsynth_files.load_loss()
    gen = torch.Generator().manual_seed(20261124)
    # float32 values held in float64, so the fixture stores the inputs exactly.
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).float().double()  # noqa: E731

    os.makedirs(OUT, exist_ok=True)
    tensors = {}
    for name, case in CASES.items():
        tensors.update(run_case(ds, loss_mod, fm, name, case, rnd))
    save_f32(tensors, os.path.join(OUT, "step.safetensors"))
    meta = {
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "cases": CASES,
        "params": GRAD_PARAMS,
        "versions": {"torch": torch.__version__.split("+")[0], "diffsynth": "2.1.12"},
    }
    with open(os.path.join(OUT, "step.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
