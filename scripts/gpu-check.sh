#!/usr/bin/env bash
# The GPU check: builds with `--features cuda`, runs the test suite (tests/devices.rs compares
# the GPU with the CPU on SmolLM2), and runs `bench generate`, `bench speculative` and
# `bench quant` with `--device cuda`, writing everything to OUT_DIR. Sized for an H100/H200
# (about 6 minutes there, most of it the build); needs cargo, nvcc (CUDA 12 or 13) and the
# models already pulled into $DYNEXEC_CACHE (`dynexec models pull smollm2-135m-instruct`).
#
# Usage: scripts/gpu-check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/gpu-check.sh OUT_DIR}"
mkdir -p "$out"
for tool in cargo nvcc nvidia-smi; do
  command -v "$tool" >/dev/null || { echo "gpu-check: $tool not found (needs a CUDA machine with Rust)" >&2; exit 2; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$out/gpu.csv"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}"
features=cuda,dynexec-cli/cuda,dynexec-server/cuda
status=0
step() { # name, command...
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/summary.txt"
  if "$@" >"$out/$name.log" 2>&1; then echo "   ok" | tee -a "$out/summary.txt"
  else echo "   FAILED (see $name.log)" | tee -a "$out/summary.txt"; status=1; fi
}
step build cargo test --workspace --features "$features" --no-run
step tests cargo test --workspace --features "$features"
dynexec() { cargo run --quiet --features "$features" -p dynexec-cli -- "$@"; }
step bench-generate dynexec --device cuda bench generate --runs 3 --json
step bench-speculative dynexec --device cuda bench speculative --draft ngram:3,10 --draft self-layers:8 --lookahead fixed:4 --lookahead heuristic --json
step bench-quant dynexec --device cuda bench quant --runs 3 --eval-tokens 512 --json
for name in bench-generate bench-speculative bench-quant; do
  # The JSON object is the one line of the log that starts with `{` (notes go to stderr).
  grep '^{' "$out/$name.log" | tail -n 1 > "$out/$name.json" || true
done
grep -h "test result" "$out/tests.log" | awk '{p+=$4; f+=$6} END {print p " passed, " f " failed"}' | tee -a "$out/summary.txt"
exit $status
