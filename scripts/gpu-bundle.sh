#!/usr/bin/env bash
# Builds everything the GPU machine needs (it has no Rust toolchain): the release binary,
# every test executable and the criterion bench executable, built here with the kernels
# compiled for sm_80/sm_90a, stripped and packed into .gpu-bundle/bundle.tar.xz. Each
# executable embeds the same fatbins, so xz packs them with a window that spans the whole
# archive (768 MiB: ~8 GB of memory here, 768 MiB to unpack there): on 2026-12-06 the 686 MB
# staged became 14 MB (33 MB with -9e's 64 MiB window), well under the device tool's 64 MiB
# carry limit. Then run there, through the device tool with carry [".gpu-bundle"] (and
# ".whl" without a stored PyTorch reference):   bash scripts/gpu-check.sh
#
# The bundle records the commit it was built from (.gpu-bundle/commit). When it was built
# from a clean tree and nothing it is built from has changed since (every tracked file but
# the documentation and the scripts that run from the checkout on the device), the script
# says so and builds nothing (FORCE=1 rebuilds): a bundle built at the end of one session
# serves the next one's lease at once, whatever notes were committed after it.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp() { echo "$(git rev-parse HEAD) $(git status --porcelain --untracked-files=no | grep -q . && echo changed || echo clean)"; }
inputs=(. ':!docs' ':!*.md' ':!scripts/gpu-check.sh' ':!scripts/gpu-check-emulated.sh' ':!scripts/gpu-summary.py'
  ':!scripts/reference')
up_to_date() {
  [ -s .gpu-bundle/bundle.tar.xz ] && [ -f .gpu-bundle/commit ] || return 1
  local commit state
  read -r commit state < .gpu-bundle/commit
  # Against the working tree: uncommitted changes to the inputs count too.
  [ "$state" = clean ] && git diff --quiet "$commit" -- "${inputs[@]}" 2>/dev/null
}
if [ "${FORCE:-0}" != 1 ] && up_to_date; then
  echo "gpu-bundle: .gpu-bundle is up to date (built from $(cut -d' ' -f1 .gpu-bundle/commit); nothing it is" \
    "built from has changed since); FORCE=1 rebuilds"
  exit 0
fi
built_from=$(stamp)
bash scripts/install-cuda-toolchain.sh >/dev/null
export SYNTHOS_REQUIRE_NVCC=1
stage=target/gpu-bundle-stage
# The old bundle stays in place until the new one is complete (an interrupted build
# leaves it as it was).
rm -rf "$stage" && mkdir -p .gpu-bundle "$stage/tests"
cargo build --release --bin synthos-engine
cp target/release/synthos-engine "$stage/"
# Test and bench executables (release, so timings in benches are meaningful).
cargo test --release --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    kind = m.get("target", {}).get("kind", [])
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] and "test" in kind:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$stage/tests/$name"; done
cargo bench --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["executable"])
' | while read -r exe; do cp "$exe" "$stage/bench-kernels"; done
# Registers and spills of every kernel for sm_90a (ptxas -v), and the fatbins themselves
# (for cuobjdump --dump-resource-usage there).
nvcc=.cuda-toolchain/nvidia/cu13/bin/nvcc
mkdir -p "$stage/fatbin"
for f in kernels/*.cu; do
  "$nvcc" -cubin -O3 -std=c++17 -I kernels -gencode=arch=compute_90a,code=sm_90a -Xptxas -v "$f" \
    -o /tmp/synthos-ptxas.cubin 2>&1
done > "$stage/ptxas-sm90a.txt"
cp target/release/build/synthos-engine-*/out/*.fatbin "$stage/fatbin/" 2>/dev/null || true
# Test executables find their fixtures by the absolute path they were built in.
pwd > "$stage/built-in"
strip "$stage"/synthos-engine "$stage"/bench-kernels "$stage"/tests/*
echo "$built_from" > "$stage/commit"
tar -C "$stage" -cf - . | xz -T1 --lzma2=preset=6,dict=768MiB > .gpu-bundle/bundle.tar.xz.part
mv .gpu-bundle/bundle.tar.xz.part .gpu-bundle/bundle.tar.xz
cp "$stage/commit" .gpu-bundle/commit
ls "$stage/tests"
du -sh "$stage" .gpu-bundle/bundle.tar.xz
# The PyTorch reference's packages the GPU image lacks (pure-Python wheels; it has torch,
# timm and regex): diffusers for the DiT cases, open_clip_torch with ftfy/wcwidth for the
# CLIP step. Fail-soft: without them those reference cases are recorded as skipped.
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 \
  || echo "warning: could not download the reference wheels into .whl/"
ls .whl
