#!/usr/bin/env bash
# Builds everything the GPU machine needs (it has no Rust toolchain) into .gpu-bundle/:
# the release binary, every test executable and the criterion bench executable, built
# here with the kernels compiled for sm_80/sm_90a. Then run there, through the device
# tool with carry [".gpu-bundle"]:   bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-cuda-toolchain.sh >/dev/null
export SYNTHOS_REQUIRE_NVCC=1
rm -rf .gpu-bundle && mkdir -p .gpu-bundle/tests
cargo build --release --bin synthos-engine
cp target/release/synthos-engine .gpu-bundle/
# Test and bench executables (release, so timings in benches are meaningful).
cargo test --release --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" ".gpu-bundle/tests/$name"; done
cargo bench --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["executable"])
' | while read -r exe; do cp "$exe" .gpu-bundle/bench-kernels; done
du -sh .gpu-bundle
ls .gpu-bundle .gpu-bundle/tests
