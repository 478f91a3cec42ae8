"""Writes tests/fixtures/schedule/flow_match_wan.json: the flow-matching schedule the
Synthos runs use, computed by DiffSynth's own scheduler (the reference).

Pinned: diffsynth==2.1.12 (only diffsynth/diffusion/flow_match.py is loaded, by
tests/reference/diffsynth_files.py, because the package __init__ needs torchvision),
torch==2.15.0 (CPU). Run from the repository root:

    pip download diffsynth==2.1.12 --no-deps -d /tmp/dsynth
    python3 tests/reference/make_schedule_fixtures.py [WHEEL]

WHEEL defaults to /tmp/dsynth/diffsynth-2.1.12-py3-none-any.whl.
"""
import json
import sys
from pathlib import Path

import torch

import diffsynth_files

fm = diffsynth_files.load_flow_match(sys.argv[1] if len(sys.argv) > 1 else diffsynth_files.WHEEL)

out = {"versions": {"diffsynth": "2.1.12", "torch": torch.__version__}}

train = fm.FlowMatchScheduler("Wan")
train.set_timesteps(1000, training=True)
out["train"] = {
    "sigmas": train.sigmas.tolist(),
    "timesteps": train.timesteps.tolist(),
    "weights": train.linear_timesteps_weights.tolist(),
}

for steps in (25, 50):
    s = fm.FlowMatchScheduler("Wan")
    s.set_timesteps(steps)
    # One Euler update per step on a fixed sample/velocity, to pin the step rule.
    x = torch.tensor([0.5, -1.25, 2.0])
    v = torch.tensor([1.0, 0.25, -0.5])
    xs = []
    for t in s.timesteps:
        x = s.step(v, t, x)
        xs.append(x.tolist())
    out[f"sample_{steps}"] = {"sigmas": s.sigmas.tolist(), "timesteps": s.timesteps.tolist(), "euler_path": xs}

dest = Path("tests/fixtures/schedule/flow_match_wan.json")
dest.parent.mkdir(parents=True, exist_ok=True)
dest.write_text(json.dumps(out))
print("wrote", dest)
