#!/usr/bin/env python3
"""The demo training step on the CPU, ours against PyTorch, in alternating rounds.

One round runs `bench_torch.py --device cpu --only "train step demo"` (diffusers
WanTransformer3DModel at the demo config, fused and foreach AdamW, the faster taken) and
then `synthos-engine bench --device cpu --filter "train step demo"`, each timed for
--min-seconds. Alternating the two and reporting medians (and the median of the
per-round ratios) keeps a shared or throttled machine from favouring whichever side ran
in a quiet moment.

    cargo build --release
    python3 scripts/reference/compare_cpu_step.py --rounds 5 --threads 2 --out /tmp/cpu-step.json

Prints one line per round and a summary: ours ms, PyTorch ms, ratio (PyTorch time /
ours; above 1 means we are faster). Needs torch and diffusers (see README-bench.md).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CASE = "train step demo 64x64 b16"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def torch_round(threads, min_seconds, tmp):
    out = os.path.join(tmp, "torch.json")
    subprocess.run([sys.executable, os.path.join(HERE, "bench_torch.py"), "--device", "cpu", "--threads",
                    str(threads), "--only", "train step demo", "--min-seconds", str(min_seconds), "--out", out],
                   check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        cases = [c for c in json.load(f)["cases"] if c["name"] == CASE and c["seconds"]]
    if not cases:
        sys.exit("bench_torch.py timed no demo step (is diffusers installed?)")
    best = min(cases, key=lambda c: c["seconds"])
    return best["seconds"], best["variant"]


def ours_round(binary, threads, min_seconds, tmp):
    out = os.path.join(tmp, "ours.json")
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    subprocess.run([binary, "bench", "--device", "cpu", "--filter", "train step demo", "--min-seconds",
                    str(min_seconds), "--json", out], check=True, stdout=subprocess.DEVNULL, env=env)
    with open(out) as f:
        data = json.load(f)
    rows = data["results"] if isinstance(data, dict) else data
    for r in rows:
        if r["name"] == CASE and r.get("seconds"):
            return r["seconds"]
    sys.exit(f"synthos-engine bench did not time {CASE!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "synthos-engine"))
    ap.add_argument("--out", help="write the rounds and the summary as JSON here")
    args = ap.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} not found: run `cargo build --release` first (or pass --binary)")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            t, variant = torch_round(args.threads, args.min_seconds, tmp)
            o = ours_round(args.binary, args.threads, args.min_seconds, tmp)
            rounds.append({"ours_ms": o * 1e3, "torch_ms": t * 1e3, "torch_variant": variant, "ratio": t / o})
            print(f"round {i + 1}: ours {o * 1e3:.1f} ms, PyTorch {t * 1e3:.1f} ms ({variant}), ratio {t / o:.3f}",
                  flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in ("ours_ms", "torch_ms", "ratio")}
    print(f"median of {len(rounds)} rounds ({args.threads} threads): ours {med['ours_ms']:.1f} ms "
          f"({16e3 / med['ours_ms']:.1f} samples/s), PyTorch {med['torch_ms']:.1f} ms "
          f"({16e3 / med['torch_ms']:.1f} samples/s), ratio {med['ratio']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"case": CASE, "threads": args.threads, "min_seconds": args.min_seconds, "rounds": rounds,
                       "median": med}, f, indent=1)


if __name__ == "__main__":
    main()
