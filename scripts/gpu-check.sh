#!/usr/bin/env bash
# Runs on the GPU machine (from the repository root, with .gpu-bundle carried):
# device info, every test executable (the GPU tests are active there), the criterion
# kernel benches, and prints a short table last. Logs go to $OUT when set.
set -uo pipefail
B=/tmp/synthos-bundle
rm -rf "$B" && mkdir -p "$B" && xz -dc .gpu-bundle/bundle.tar.xz | tar -C "$B" -xf - || exit 1
OUTDIR="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUTDIR"
# Test executables name their fixtures by the absolute checkout path they were built in.
built_in=/work/main
if [ ! -e "$built_in" ]; then mkdir -p "$(dirname "$built_in")" && ln -s "$PWD" "$built_in"; fi
# ... and the CLI tests run the binary at its build path.
mkdir -p target/release && cp "$B/synthos-engine" target/release/
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUTDIR/nvidia-smi.txt"
"$B/synthos-engine" info | tee "$OUTDIR/info.txt"
declare -a rows
for t in "$B"/tests/*; do
  name=$(basename "$t")
  if "$t" --test-threads=1 >"$OUTDIR/test-$name.log" 2>&1; then status=PASS; else status=FAIL; fi
  summary=$(grep -E "^test result" "$OUTDIR/test-$name.log" | tail -1)
  rows+=("$(printf '%-24s %s  %s' "$name" "$status" "$summary")")
done
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  "$B/synthos-engine" bench --json "$OUTDIR/bench.json" 2>&1 | tee "$OUTDIR/bench-cli.txt"
fi
if [ "${SKIP_CRITERION:-0}" != 1 ] && [ -x "$B/bench-kernels" ]; then
  "$B/bench-kernels" --bench 2>&1 | tee "$OUTDIR/bench.txt" | grep -E "^(GPU|CPU)|thrpt|time:" | tail -80
fi
echo "=== GPU test summary ==="
printf '%s\n' "${rows[@]}"
