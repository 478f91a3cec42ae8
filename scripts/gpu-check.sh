#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with .gpu-bundle carried (built here
# by scripts/gpu-bundle.sh) and, for the PyTorch reference, .whl (the diffusers wheel):
#
#   bash scripts/gpu-check.sh
#
# Collects into $OUT (else /tmp/gpu-check), fail-soft (a failing stage never stops the
# next), within a deadline of $GPU_CHECK_BUDGET seconds (default 420), in this order:
# nvidia-smi, which libcublasLt is used, `synthos-engine info`, registers/spills of every
# kernel (ptxas -v from the build, cuobjdump here), every test executable's full output
# (GPU tests active), `synthos-engine bench --json` of the attention and whole-model
# cases (bench.json), the 1.3B training steps with each opt-in attention set, the other
# kernel cases (bench-rest.json), the README's first command (the demo) and `synth demo`
# timed on the GPU, the PyTorch reference (scripts/reference/bench_torch.py; or, with
# GPU_CHECK_TORCH_JSON=FILE, a stored output of it, and the stage does not run), a
# per-kernel profile of the 1.3B b4 training step (SYNTHOS_CUDA_PROFILE=1),
# compute-sanitizer memcheck/racecheck on the op tests where the machine supports it, and
# one summary.json (scripts/gpu-summary.py). Stages: set SKIP_TESTS, SKIP_DEMO, SKIP_SYNTH_DEMO, SKIP_TORCH,
# SKIP_BENCH, SKIP_PROFILE, SKIP_SANITIZER to 1 to leave one out; TEST_FILTER narrows the tests
# (and turns off the gates below); TEST_SKIP ("--skip NAME ...") leaves tests out and keeps
# the gates; SKIP_TEST_BINARIES (default: kernel_emulation device_emulation, the two CPU
# emulation tiers) lists executables not run.
# Opt-in kernels whose GPU parity test did not pass are left out of the timing stages.
set -uo pipefail
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-420}
left() { echo $((BUDGET - ($(date +%s) - T0))); }
stage() { echo; echo "=== [$(($(date +%s) - T0)) s] $*"; }
ROOT=$PWD
B=/tmp/synthos-bundle
OUTDIR="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/check.log"
exec > >(tee -a "$LOG") 2>&1
rm -rf "$B" && mkdir -p "$B" && xz -dc .gpu-bundle/bundle.tar.xz | tar -C "$B" -xf - || { echo "cannot unpack .gpu-bundle"; exit 1; }
# Test executables name their fixtures by the absolute checkout path they were built in,
# and the CLI tests run the binary at its build path.
built_in=$(cat "$B/built-in" 2>/dev/null || echo /work/main)
echo "bundle built from: $(cat "$B/commit" 2>/dev/null || echo "an unrecorded commit")"
if [ "$built_in" != "$ROOT" ] && [ ! -e "$built_in" ]; then mkdir -p "$(dirname "$built_in")" && ln -s "$ROOT" "$built_in"; fi
mkdir -p target/release && cp "$B/synthos-engine" target/release/
ENGINE="$B/synthos-engine"

stage "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm --format=csv | tee "$OUTDIR/nvidia-smi.txt"
nvidia-smi >> "$OUTDIR/nvidia-smi.txt" 2>&1

stage "cuBLASLt"
cublas=$(ldconfig -p 2>/dev/null | grep -o '/[^ ]*libcublasLt\.so\.13[^ ]*' | head -1)
if [ -n "$cublas" ]; then
  echo "libcublasLt from the system (ldconfig): $cublas"
else
  cublas=$(python3 - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
try:
    import torch
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
except Exception:
    pass
for r in roots:
    for p in sorted(glob.glob(os.path.join(r, "nvidia", "**", "libcublasLt.so.13*"), recursive=True)):
        print(p); sys.exit(0)
EOF
)
  if [ -n "$cublas" ]; then
    export LD_LIBRARY_PATH="$(dirname "$cublas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "libcublasLt from the PyTorch nvidia-cublas wheel: $cublas (its folder put on LD_LIBRARY_PATH)"
  else
    echo "libcublasLt.so.13 NOT FOUND (ldconfig and the Python nvidia wheels): matmuls will fail"
  fi
fi
echo "${cublas:-none}" > "$OUTDIR/cublas.txt"

stage "info"
"$ENGINE" info 2>&1 | tee "$OUTDIR/info.txt"

stage "kernel registers and spills"
cp "$B/ptxas-sm90a.txt" "$OUTDIR/" 2>/dev/null && grep -c "Used" "$OUTDIR/ptxas-sm90a.txt" | sed 's/^/ptxas -v lines (build, sm_90a): /'
if command -v cuobjdump >/dev/null && ls "$B"/fatbin/*.fatbin >/dev/null 2>&1; then
  for f in "$B"/fatbin/*.fatbin; do echo "## $(basename "$f")"; cuobjdump --dump-resource-usage "$f" 2>&1; done > "$OUTDIR/cuobjdump-resources.txt"
  echo "cuobjdump: $(grep -c 'Function' "$OUTDIR/cuobjdump-resources.txt") functions"
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stage "tests (4 executables at a time, GPU tests active)"
  run_test() {
    local t=$1 name; name=$(basename "$t")
    local s0; s0=$(date +%s)
    # (SYNTHOS_REQUIRE_GPU=1: a GPU test that finds no usable device fails instead of
    # skipping, so an unusable driver cannot pass a gate)
    # shellcheck disable=SC2086
    SYNTHOS_REQUIRE_GPU=1 timeout "${TEST_TIMEOUT:-300}" "$t" ${TEST_FILTER:-} ${TEST_SKIP:-} --test-threads=1 \
      > "$OUTDIR/tests/$name.log" 2>&1
    echo "$? $(( $(date +%s) - s0 ))" > "$OUTDIR/tests/$name.rc"
  }
  export -f run_test; export OUTDIR TEST_FILTER TEST_SKIP TEST_TIMEOUT
  mkdir -p "$OUTDIR/tests"
  # kernel_emulation and device_emulation run the CPU emulation tiers (covered by CI; the
  # second would build g++ libraries and find no test executables beside it): skipped here.
  skip=" ${SKIP_TEST_BINARIES-kernel_emulation device_emulation} "
  for t in "$B"/tests/*; do case "$skip" in *" $(basename "$t") "*) ;; *) echo "$t";; esac; done \
    | xargs -P 4 -I{} bash -c 'run_test {}'
  for t in "$B"/tests/*; do
    [ -f "$OUTDIR/tests/$(basename "$t").rc" ] || continue
    name=$(basename "$t"); read -r rc secs < "$OUTDIR/tests/$name.rc"
    summary=$(grep -E "^test result" "$OUTDIR/tests/$name.log" | tail -1)
    [ "$rc" = 0 ] && st=PASS || st="FAIL(rc $rc)"
    printf '%-22s %-12s %4ss  %s\n' "$name" "$st" "$secs" "$summary"
    grep -E "^test .* FAILED$|panicked at" "$OUTDIR/tests/$name.log" | head -8 | sed 's/^/    /'
  done | tee "$OUTDIR/tests-summary.txt"
fi

# Opt-in kernels whose GPU parity test did not pass (failed, or its executable timed out)
# are left out of the timing runs below, so that a wrong or hanging kernel costs its own
# cases only (bench --skip, and the training-step loop). Not when the tests did not run
# or were narrowed by TEST_FILTER.
BENCH_SKIP=(); SKIP_ATTN=" "
gate() {  # gate <test executable> <test> <text of its bench cases> [attention sets]
  local exe=$1 test=$2 text=$3; shift 3
  [ "${SKIP_TESTS:-0}" = 1 ] || [ -n "${TEST_FILTER:-}" ] && return
  grep -q "^test $test \.\.\. ok$" "$OUTDIR/tests/$exe.log" 2>/dev/null && return
  echo "NOT PASSED: $test ($exe): bench cases containing \"$text\" and training steps with [$*] left out"
  BENCH_SKIP+=(--skip "$text"); SKIP_ATTN+="$* "
}
gate ops_attention gpu_mma_kernels_match_cpu "[mma" mma-det mma-r32
gate ops_attention gpu_wgmma_kernels_match_cpu "[wgmma" wgmma wgmma-det wgmma-ovl wgmma-ws
gate ops_attention gpu_wgmma_ws_matches_cpu "[wgmma-ws" wgmma-ws
gate ops_attention gpu_tma_probe_matches_the_wgmma_layout "[wgmma-ws" wgmma-ws
gate ops_norm gpu_warp_forward_norms_match_cpu "[warp]"
gate ops_norm gpu_warp_backward_is_deterministic "[warp]"
gate ops_reduce gpu_vector_column_sums_match_cpu "[vec]"
gate ops_reduce gpu_sum_of_products_matches_cpu "[vec]"
gate ops_matmul gpu_gelu_epilogue_matches_cpu "[epilogue]"
gate ops_matmul gpu_mlp_gelu_epilogue_matches_cpu "[epilogue]"
gate ops_conv gpu_im2col_by_rows_matches_the_element_kernel "[rows]"
gate optim gpu_split_masters_match_fp32_masters "SPLIT_MASTER"  # no bench case: the steps below (STEP_ENV)
gate pipeline gpu_graph_replays_match_plain_runs "[graphs]"
gate pipeline gpu_graph_recording_errors_are_clear "[graphs]"
gate train gpu_training_steps_replayed_as_graphs_match "[graphs]"
gate clip_train gpu_clip_steps_replayed_as_graphs_match "clip train step[graphs]"
# The demos run with CUDA graphs when their tests passed (the bench times both ways:
# "sample[graphs] demo ..." beside "sample demo ...", "train step[graphs] demo ..." beside
# "train step demo ...").
# The multi-tensor AdamW and gradient norm and the cached GEMM plans (host time, which the
# demo is made of outside its graphs) join them when their tests passed.
DEMO_ENV=()
passed() { grep -q "^test $2 \.\.\. ok$" "$OUTDIR/tests/$1.log" 2>/dev/null; }
if [ "${SKIP_TESTS:-0}" != 1 ] && [ -z "${TEST_FILTER:-}" ]; then
  [[ "${BENCH_SKIP[*]-}" != *"[graphs]"* ]] && DEMO_ENV+=(SYNTHOS_CUDA_GRAPHS=1)
  passed optim gpu_adamw_matches_cpu_multi_tensor && passed optim gpu_grad_norm_matches_cpu_multi_tensor \
    && DEMO_ENV+=(SYNTHOS_CUDA_MULTI_TENSOR=1)
  passed ops_matmul gpu_gemm_plans_are_bit_identical_to_uncached && passed ops_matmul gpu_gemm_plans_match_cpu \
    && DEMO_ENV+=(SYNTHOS_CUDA_GEMM_PLANS=1)
fi
# Every other opt-in whose parity tests passed, for the training steps with each attention
# set (all of them when the tests did not run, as the gates above).
STEP_ENV=()
tests_ran() { [ "${SKIP_TESTS:-0}" != 1 ] && [ -z "${TEST_FILTER:-}" ]; }
step_opt_in() {  # step_opt_in <VAR=value> <test executable> <test> ...
  local e=$1; shift
  if tests_ran; then
    while [ $# -gt 0 ]; do passed "$1" "$2" || return 0; shift 2; done
  fi
  STEP_ENV+=("$e")
}
step_opt_in SYNTHOS_CUDA_MULTI_TENSOR=1 optim gpu_adamw_matches_cpu_multi_tensor optim gpu_grad_norm_matches_cpu_multi_tensor
step_opt_in SYNTHOS_CUDA_GEMM_PLANS=1 ops_matmul gpu_gemm_plans_are_bit_identical_to_uncached ops_matmul gpu_gemm_plans_match_cpu
step_opt_in SYNTHOS_CUDA_NORM=warp ops_norm gpu_warp_forward_norms_match_cpu ops_norm gpu_warp_backward_is_deterministic
step_opt_in SYNTHOS_CUDA_COLSUM=vec ops_reduce gpu_vector_column_sums_match_cpu ops_reduce gpu_sum_of_products_matches_cpu
step_opt_in SYNTHOS_CUDA_GELU_EPILOGUE=1 ops_matmul gpu_gelu_epilogue_matches_cpu ops_matmul gpu_mlp_gelu_epilogue_matches_cpu
step_opt_in SYNTHOS_CUDA_SPLIT_MASTER=1 optim gpu_split_masters_match_fp32_masters
if [ -d "$OUTDIR/tests" ]; then
  # One archive of the logs ($OUT returns at most 8 files).
  tar -C "$OUTDIR" -czf "$OUTDIR/test-logs.tar.gz" tests && rm -rf "$OUTDIR/tests"
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stage "SYNTHOS_CUDA_SYNC=1 (synchronise after every launch) on the attention op tests"
  SYNTHOS_CUDA_SYNC=1 timeout 60 "$B/tests/ops_attention" gpu --test-threads=1 > "$OUTDIR/sync-mode.txt" 2>&1
  echo "rc $?: $(grep -E '^test result' "$OUTDIR/sync-mode.txt" | tail -1)"
fi

if [ "${SKIP_TESTS:-0}" != 1 ] && [ "$(left)" -gt 260 ]; then
  # The opt-in kernels and plans all on, in whole-model GPU tests: the tiny Wan forward and
  # backward, the bf16 training step against its reference, CLIP, the VAE and convs (the
  # bench times the one-warp-per-row norm forward alone: "rms_norm[warp]" ...).
  stage "whole-model GPU tests with every opt-in on (mma-det attention, multi-tensor, GEMM plans, GELU epilogue, warp norms, vector column sums, split masters, im2col by rows, CUDA graphs)"
  for t in wan train_step clip_model ops_conv pipeline; do
    SYNTHOS_CUDA_ATTENTION=mma-det SYNTHOS_CUDA_MULTI_TENSOR=1 SYNTHOS_CUDA_GEMM_PLANS=1 SYNTHOS_CUDA_NORM=warp \
      SYNTHOS_CUDA_GELU_EPILOGUE=1 \
      SYNTHOS_CUDA_COLSUM=vec SYNTHOS_CUDA_SPLIT_MASTER=1 SYNTHOS_CUDA_IM2COL=rows SYNTHOS_CUDA_GRAPHS=1 \
      timeout 60 "$B/tests/$t" gpu --skip full --skip 1_3b --test-threads=1 > "$OUTDIR/optin-$t.txt" 2>&1
    echo "$t: rc $?, $(grep -E '^test result' "$OUTDIR/optin-$t.txt" | tail -1)"
    grep -E "panicked at|FAILED" "$OUTDIR/optin-$t.txt" | head -4 | sed 's/^/    /'
  done
fi

# A stored PyTorch reference (GPU_CHECK_TORCH_JSON, a bench_torch.py output of an earlier
# run on the same kind of GPU) stands in for the PyTorch stage, which then does not run:
# that leaves its minutes to our own cases. The summary names the file it used.
# Only from the same GPU model: an H200's PyTorch times say nothing about an H100's.
if [ -n "${GPU_CHECK_TORCH_JSON:-}" ]; then
  stored_gpu=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("device",""))' "$GPU_CHECK_TORCH_JSON" 2>/dev/null)
  this_gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  if [ -z "$stored_gpu" ] || [[ "$this_gpu" != *"$stored_gpu"* ]]; then
    echo "GPU_CHECK_TORCH_JSON=$GPU_CHECK_TORCH_JSON was measured on \"${stored_gpu:-an unrecorded GPU}\", this is \"$this_gpu\": the PyTorch stage runs"
    GPU_CHECK_TORCH_JSON=
  fi
fi
if [ -n "${GPU_CHECK_TORCH_JSON:-}" ]; then
  if cp "$GPU_CHECK_TORCH_JSON" "$OUTDIR/torch.json"; then
    echo "$GPU_CHECK_TORCH_JSON" > "$OUTDIR/torch-source.txt"
    echo "PyTorch reference: the stored $GPU_CHECK_TORCH_JSON (not rerun)"
  else
    echo "GPU_CHECK_TORCH_JSON=$GPU_CHECK_TORCH_JSON cannot be read: the PyTorch stage runs"
  fi
fi
compare_args() { [ -s "$OUTDIR/torch.json" ] && echo "--compare $OUTDIR/torch.json"; }

# Our cases first, most decisive first: the attention kernels and the whole-model cases
# (training steps, sampling, CLIP), then the opt-in sets in the training steps, then every
# other kernel. Each stage leaves time to the ones after it.
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  stage "synthos-engine bench: attention kernels and whole-model cases"
  # shellcheck disable=SC2046
  timeout $(( $(left) > 260 ? $(left) - 200 : 60 )) "$ENGINE" bench --min-seconds 0.3 --filter attention --filter model \
    --json "$OUTDIR/bench.json" $(compare_args) ${BENCH_SKIP[@]+"${BENCH_SKIP[@]}"} 2>&1 | tee "$OUTDIR/bench.txt"
fi

if [ "${SKIP_BENCH:-0}" != 1 ] && [ "$(left)" -gt 190 ] && [[ "${BENCH_SKIP[*]-}" != *"[rows]"* ]]; then
  # The column matrix by rows (SYNTHOS_CUDA_IM2COL=rows) in the whole sampling pipeline,
  # whose VAE decode is all convolutions (the conv2d[rows] case times one alone).
  stage "the 480x480 sampling pipeline with im2col by rows"
  SYNTHOS_CUDA_IM2COL=rows timeout 45 "$ENGINE" bench --min-seconds 0.3 --filter "pipeline" \
    --json "$OUTDIR/bench-im2col-rows.json" > "$OUTDIR/bench-im2col-rows.txt" 2>&1
  echo "rc $?"; grep -E "pipeline" "$OUTDIR/bench-im2col-rows.txt" | head -2
fi

if [ "${SKIP_BENCH:-0}" != 1 ] && [ "$(left)" -gt 150 ]; then
  # The 1.3B training steps with each opt-in attention set (SYNTHOS_CUDA_ATTENTION: the
  # wgmma and mma kernels, forward and backward; the bench above timed each alone,
  # "attention fwd[wgmma]", "attention fwd+bwd[wgmma-det]" ...) and, with it, every other
  # opt-in whose GPU parity tests passed (STEP_ENV: multi-tensor AdamW and gradient norm,
  # cached cuBLASLt plans, norms by warps, vector column sums, the GELU epilogues, split
  # masters). Each row is then the step as it would run if this lease's proven opt-ins
  # became the defaults, peak memory included (split masters are the memory change; the
  # kernel pairs in bench-rest.json attribute the rest). Defaults: the bench above.
  echo "with: ${STEP_ENV[*]:-no other opt-in}"
  for attn in wgmma wgmma-ws wgmma-ovl wgmma-det mma-det mma-r32; do
    [ "$(left)" -gt 140 ] || break
    case "$SKIP_ATTN" in *" $attn "*) echo "training steps with $attn: left out (its parity test did not pass)"; continue;; esac
    stage "training steps with SYNTHOS_CUDA_ATTENTION=$attn and the passed opt-ins"
    env SYNTHOS_CUDA_ATTENTION=$attn ${STEP_ENV[@]+"${STEP_ENV[@]}"} timeout 100 "$ENGINE" bench \
      --min-seconds 0.3 --filter "train step 1.3b" --skip "optimizer after" --json "$OUTDIR/bench-$attn-all.json" > "$OUTDIR/bench-$attn-all.txt" 2>&1
    echo "rc $?"; grep -E "train step" "$OUTDIR/bench-$attn-all.txt" | head -4
  done
fi

if [ "${SKIP_BENCH:-0}" != 1 ] && [ "$(left)" -gt 120 ]; then
  stage "synthos-engine bench: the other kernels"
  # shellcheck disable=SC2046
  timeout $(( $(left) > 200 ? $(left) - 110 : 90 )) "$ENGINE" bench --min-seconds 0.3 --skip attention --skip model \
    --json "$OUTDIR/bench-rest.json" $(compare_args) ${BENCH_SKIP[@]+"${BENCH_SKIP[@]}"} 2>&1 | tee "$OUTDIR/bench-rest.txt"
fi

# The demo runs 2448 steps since it became width 256 (816 at the first light's 29.5 s).
if [ "${SKIP_DEMO:-0}" != 1 ] && [ "$(left)" -gt 170 ]; then
  stage "the README's first command (demo train) on the GPU"
  rm -rf /tmp/demo-run
  s0=$(date +%s%N)
  env ${DEMO_ENV[@]+"${DEMO_ENV[@]}"} timeout 150 "$ENGINE" train --output /tmp/demo-run > "$OUTDIR/demo.txt" 2>&1; rc=$?
  echo "demo train (${DEMO_ENV[*]:-no CUDA graphs}): rc $rc, $(( ($(date +%s%N) - s0) / 1000000 )) ms" | tee -a "$OUTDIR/demo.txt"
  tail -5 "$OUTDIR/demo.txt"
fi

if [ "${SKIP_SYNTH_DEMO:-0}" != 1 ] && [ "$(left)" -gt 170 ]; then
  stage "synth demo (the flywheel) on the GPU"
  # The flywheel also trains two CLIPs: graphs only when the CLIP step's graph test passed too.
  SYNTH_ENV=()
  for e in ${DEMO_ENV[@]+"${DEMO_ENV[@]}"}; do
    [ "$e" = SYNTHOS_CUDA_GRAPHS=1 ] && [[ "${BENCH_SKIP[*]-}" == *"clip train step[graphs]"* ]] && continue
    SYNTH_ENV+=("$e")
  done
  rm -rf /tmp/synth-demo
  s0=$(date +%s%N)
  env ${SYNTH_ENV[@]+"${SYNTH_ENV[@]}"} timeout 150 "$ENGINE" synth demo --output /tmp/synth-demo > "$OUTDIR/synth-demo.txt" 2>&1; rc=$?
  echo "synth demo (${SYNTH_ENV[*]:-no CUDA graphs}): rc $rc, $(( ($(date +%s%N) - s0) / 1000000 )) ms" | tee -a "$OUTDIR/synth-demo.txt"
  tail -5 "$OUTDIR/synth-demo.txt"
fi

if [ "${SKIP_TORCH:-0}" != 1 ] && [ ! -s "$OUTDIR/torch.json" ] && [ "$(left)" -gt 150 ]; then
  stage "PyTorch reference"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  budget=$(( $(left) - 110 )); [ "$budget" -gt 200 ] && budget=200
  PYTHONUNBUFFERED=1 timeout $((budget + 30)) python3 scripts/reference/bench_torch.py --out "$OUTDIR/torch.json" \
    --time-budget "$budget" 2>&1 | tee "$OUTDIR/torch.txt" | grep -vE "^\s*$" | tail -40
fi

if [ "${SKIP_PROFILE:-0}" != 1 ] && [ "$(left)" -gt 100 ]; then
  # (and of the demo's step: kernels and launches per step of the tiny model, whose GPU
  # time is launch-bound; issue 12 asks for the demo flywheel in seconds on a GPU)
  stage "per-kernel profile of the 832x480 b4 and the demo training steps (SYNTHOS_CUDA_PROFILE=1)"
  SYNTHOS_CUDA_PROFILE=1 timeout 60 "$ENGINE" bench --min-seconds 0.1 --filter "832x480" --filter "train step demo" \
    > "$OUTDIR/profile.txt" 2>&1
  grep -A26 "train step" "$OUTDIR/profile.txt" | head -56
fi

if [ "${SKIP_SANITIZER:-0}" != 1 ] && [ "$(left)" -gt 40 ] && command -v compute-sanitizer >/dev/null; then
  stage "compute-sanitizer"
  {
    probe=$(timeout 60 compute-sanitizer --tool memcheck "$B/tests/ops_elementwise" gpu_add --test-threads=1 2>&1)
    if echo "$probe" | grep -qiE "not supported|error 999|Unable to"; then
      echo "compute-sanitizer: NOT supported on this machine:"; echo "$probe" | head -5
    else
      echo "compute-sanitizer: supported"
      for tool in memcheck racecheck; do
        for t in "$B"/tests/ops_*; do
          [ "$(left)" -gt 15 ] || { echo "$tool $(basename "$t"): skipped (deadline)"; continue; }
          r=$(timeout $(( $(left) - 10 < 60 ? $(left) - 10 : 60 )) compute-sanitizer --tool "$tool" --error-exitcode 86 "$t" gpu --test-threads=1 2>&1)
          rc=$?
          echo "$tool $(basename "$t"): rc $rc, $(echo "$r" | grep -E "ERROR SUMMARY|RACECHECK SUMMARY" | tail -1)"
          [ $rc = 86 ] && echo "$r" | grep -E "^=========" | head -20
        done
      done
    fi
  } 2>&1 | tee "$OUTDIR/sanitizer.txt"
fi

stage "summary"
python3 scripts/gpu-summary.py "$OUTDIR" 2>&1 | tail -40
echo "total $(($(date +%s) - T0)) s"
# $OUT returns at most 8 files: keep summary.json, bench.json, bench-rest.json, torch.json and check.log
# apart, everything else in one archive.
( cd "$OUTDIR" && find . -maxdepth 1 -type f ! -name summary.json ! -name bench.json ! -name bench-rest.json ! -name torch.json \
    ! -name check.log ! -name logs.tar.gz -printf '%P\n' | tar -czf logs.tar.gz -T - --remove-files )
