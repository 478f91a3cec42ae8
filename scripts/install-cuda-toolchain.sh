#!/usr/bin/env bash
# Installs a pinned CUDA 13.0 nvcc (with its nvvm, crt headers, runtime headers and CCCL)
# from the Python package registry into .cuda-toolchain/, where build.rs finds it.
# The GPU machines run CUDA 13.0 with driver 580: a newer nvvm would emit PTX their
# ptxas rejects, so every package is pinned to the 13.0 release.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cuda-toolchain"
nvcc="$dest/nvidia/cu13/bin/nvcc"
if [ -x "$nvcc" ] && "$nvcc" --version 2>/dev/null | grep -q "release 13.0"; then
  echo "CUDA toolchain already installed: $nvcc"
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$dest" \
  nvidia-cuda-nvcc==13.0.88 \
  nvidia-nvvm==13.0.88 \
  nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 \
  nvidia-cuda-cccl==13.0.85
"$nvcc" --version | tail -n 2
echo "installed: $nvcc"
