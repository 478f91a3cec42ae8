#!/usr/bin/env python3
"""Synthetic input for timing `synthos-engine synth balance` at MetaCLIP scale.

Writes OUT/concepts.txt (N random concepts of 1-3 made-up words) and OUT/captions.jsonl
(M captions of about 12 words: each names one concept, drawn with a Zipf-like skew so
that balancing has heads to cut, among filler words from the same vocabulary, so that
captions also match one-word concepts by chance, as real captions do).

    python3 scripts/synth-bench-data.py OUT [N=500000] [M=1000000] [SEED=0]
    synthos-engine synth balance --captions OUT/captions.jsonl --concepts OUT/concepts.txt \
        --t 10 --output OUT/balanced
"""
import json
import os
import random
import sys


def main():
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 500_000
    m = int(sys.argv[3]) if len(sys.argv) > 3 else 1_000_000
    rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else 0)
    os.makedirs(out, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(60_000)})
    concepts, seen = [], set()
    while len(concepts) < n:
        c = " ".join(rng.choice(vocab) for _ in range(rng.choice((1, 1, 2, 2, 3))))
        if c not in seen:
            seen.add(c)
            concepts.append(c)
    with open(os.path.join(out, "concepts.txt"), "w") as f:
        f.write("\n".join(concepts) + "\n")
    # Zipf-like: concept k drawn with weight 1/(k+10).
    weights = [1.0 / (k + 10) for k in range(n)]
    picks = rng.choices(range(n), weights=weights, k=m)
    fillers = ("a", "the", "with", "on", "in", "near", "and", "of")
    with open(os.path.join(out, "captions.jsonl"), "w") as f:
        for i, k in enumerate(picks):
            words = [rng.choice(fillers) if rng.random() < 0.4 else rng.choice(vocab) for _ in range(9)]
            words.insert(rng.randint(0, 9), concepts[k])
            caption = "A " + " ".join(words) + f" {i}."
            f.write(json.dumps({"concept": concepts[k], "caption": caption}) + "\n")


if __name__ == "__main__":
    main()
