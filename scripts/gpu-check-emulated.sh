#!/usr/bin/env bash
# Rehearses scripts/gpu-check.sh here, without a GPU, on the device emulation tier
# (tests/device_emu/): the bundle the GPU machine gets, its test executables with their
# GPU tests active on the emulated driver, cuBLASLt and kernels, the gates, the opt-in
# stage, the demos (stopped by their stage's timeout: the emulator runs a demo step in
# ~25 s) and summary.json. Speed means nothing here; what it shows is that every stage
# runs and every gate reads what it expects. About 25 minutes on 2 cores.
#
#   bash scripts/gpu-check-emulated.sh       # OUT (default /tmp/gpu-check-emulated)
#
# REUSE_BUNDLE=1 keeps an existing .gpu-bundle (else it is rebuilt, 10 minutes); the
# stages gpu-check.sh can leave out (SKIP_*) default to those that need a real device:
# the bench, PyTorch, the profile and compute-sanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${REUSE_BUNDLE:-0}" != 1 ] || [ ! -f .gpu-bundle/bundle.tar.xz ]; then
  bash scripts/gpu-bundle.sh
fi
info=$(cargo test -q --test device_emulation -- --ignored emulated_libraries --nocapture --test-threads=1)
libs=$(sed -n 's/^emulated libraries: //p' <<< "$info")
large=$(sed -n 's/^too large to emulate: //p' <<< "$info")
[ -d "$libs" ] || { echo "the emulated libraries were not built:"; echo "$info"; exit 1; }
skip=""
for t in $large; do skip+=" --skip $t"; done
export OUT="${OUT:-/tmp/gpu-check-emulated}" GPU_CHECK_BUDGET="${GPU_CHECK_BUDGET:-5000}"
export TEST_TIMEOUT="${TEST_TIMEOUT:-1500}" TEST_SKIP="${TEST_SKIP:-$skip}"
export SKIP_BENCH="${SKIP_BENCH:-1}" SKIP_TORCH="${SKIP_TORCH:-1}" SKIP_PROFILE="${SKIP_PROFILE:-1}"
export SKIP_SANITIZER="${SKIP_SANITIZER:-1}"
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
rm -rf "$OUT"
bash scripts/gpu-check.sh
