#!/usr/bin/env bash
# Type-checks the CUDA build where there is no GPU and no CUDA install: NVIDIA's nvcc, headers
# and NVVM come from PyPI (scripts/cuda-toolkit-requirements.txt, pinned by hash), and
# `cargo check --features cuda` runs over every crate and target, build scripts included
# (cudarc asks nvcc for its version; candle-kernels compiles its kernels to PTX). Nothing runs
# on a GPU and nothing is linked: the GPU check itself is scripts/gpu-check.sh.
#
# Usage: scripts/check-cuda.sh   (toolkit cached in ~/.cache/dynexec-cuda; builds in
# target/cuda-check so the CPU build is left alone)
set -euo pipefail
cd "$(dirname "$0")/.."
toolkit="${DYNEXEC_CUDA_TOOLKIT:-$HOME/.cache/dynexec-cuda/13.0}"
if [ ! -x "$toolkit/bin/nvcc" ] || [ ! -x "$toolkit/nvvm/bin/cicc" ]; then
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  python3 -m pip download --quiet --no-deps --require-hashes \
    -r scripts/cuda-toolkit-requirements.txt -d "$wheels"
  for wheel in "$wheels"/*.whl; do
    python3 -m zipfile -e "$wheel" "$wheels/unpacked"
  done
  mkdir -p "$toolkit"
  cp -a "$wheels/unpacked/nvidia/cu13/." "$toolkit/"
  chmod +x "$toolkit"/bin/* "$toolkit"/nvvm/bin/* 2>/dev/null || true
fi
export PATH="$toolkit/bin:$PATH"
export CUDA_ROOT="$toolkit" CUDA_PATH="$toolkit" CUDA_HOME="$toolkit"
# No GPU to ask: compile the kernels for Hopper (H100/H200), the cards scripts/gpu-check.sh
# runs on.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda-check}"
nvcc --version | tail -1
cargo check --workspace --all-targets --features cuda,dynexec-cli/cuda,dynexec-server/cuda
echo "cuda build type-checks (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $CUDA_COMPUTE_CAP)"
