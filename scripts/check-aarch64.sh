#!/usr/bin/env bash
# Runs the CPU kernel tests as aarch64 code under qemu, so the NEON kernels are checked on an
# x86 machine: they must match candle's dequantized matmul, give a row the same bits alone
# or in a batch, and agree to the bit with the portable reference.
# Needs (Debian): apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
# and: rustup target add aarch64-unknown-linux-gnu
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test -p dynexec-models --target aarch64-unknown-linux-gnu --lib cpu_kernels
