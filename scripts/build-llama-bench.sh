#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-tokenize and llama-speculative-simple (CPU only) from the
# llama.cpp vendored in the llama-cpp-python 0.3.36 source distribution on PyPI, outside the
# repository: the peers of `dynexec bench generate --compare-llama-cpp` (llama-bench) and of
# `dynexec bench speculative --compare-llama-cpp` (llama-speculative-simple, in the same
# folder). Prints llama-bench's path.
#   scripts/build-llama-bench.sh [DIR]      (default: ~/.cache/dynexec/llama.cpp)
# LLAMA_CPU_ISA=avx512 builds the AVX-512 (VNNI, VBMI, BF16) variant instead, in its own build
# folder: the fair peer where dynexec's kernels run on AVX-512 VNNI (`--max-cpu-isa`).
# Needs a C++ compiler and cmake (`pip install cmake` provides one).
set -euo pipefail
dir="${1:-${DYNEXEC_CACHE:-$HOME/.cache/dynexec}/llama.cpp}"
sdist_sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
mkdir -p "$dir"
cd "$dir"
sdist=llama_cpp_python-0.3.36.tar.gz
# pip's metadata step for the sdist runs CMake, so it must be there before the download.
command -v cmake >/dev/null || python3 -m pip install --quiet cmake >&2
if [ ! -f "$sdist" ]; then
  # --no-build-isolation keeps pip from installing a build backend just to read metadata.
  python3 -m pip install --quiet scikit-build-core >&2
  python3 -m pip download --no-deps --no-binary :all: --no-build-isolation --quiet -d . \
    llama-cpp-python==0.3.36 >&2
fi
echo "$sdist_sha256  $sdist" | sha256sum --check --quiet - >&2 || {
  echo "sha256 mismatch for $sdist" >&2
  exit 1
}
[ -d llama_cpp_python-0.3.36 ] || tar xzf "$sdist"
src=llama_cpp_python-0.3.36/vendor/llama.cpp
# Not -march=native: some VMs report AVX-512 that the hypervisor does not enable (SIGILL).
case "${LLAMA_CPU_ISA:-avx2}" in
  avx2) build=build; avx512=OFF ;;
  avx512) build=build-avx512; avx512=ON ;;
  *) echo "LLAMA_CPU_ISA must be avx2 or avx512, not ${LLAMA_CPU_ISA}" >&2; exit 2 ;;
esac
cmake -S "$src" -B "$src/$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON \
  -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=$avx512 -DGGML_AVX512_VNNI=$avx512 \
  -DGGML_AVX512_VBMI=$avx512 -DGGML_AVX512_BF16=$avx512 -DGGML_AVX_VNNI=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$src/$build" --target llama-bench llama-tokenize llama-speculative-simple -j "$(nproc)" >&2
echo "$dir/$src/$build/bin/llama-bench"
