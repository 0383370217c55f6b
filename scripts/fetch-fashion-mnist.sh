#!/usr/bin/env bash
# Fetches Fashion-MNIST (28x28 grey images, 10 classes) for the early-exit CNN from the Debian
# package dataset-fashion-mnist (pinned by sha256) into $DYNEXEC_CACHE/data/fashion-mnist
# (default ~/.cache/dynexec), as the original idx files, uncompressed:
#   train-images-idx3-ubyte, train-labels-idx1-ubyte (60000), t10k-images-idx3-ubyte,
#   t10k-labels-idx1-ubyte (10000)
# The fixed splits: the first 55000 training images train, the last 5000 validate, t10k tests.
# Usage: scripts/fetch-fashion-mnist.sh [OUT_DIR]
set -euo pipefail
PACKAGE="dataset-fashion-mnist=0.0~git20200523.55506a9-1"
SHA256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
OUT="${1:-${DYNEXEC_CACHE:-$HOME/.cache/dynexec}/data/fashion-mnist}"
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

done_already=1
for f in $FILES; do [ -s "$OUT/$f" ] || done_already=0; done
if [ "$done_already" = 1 ]; then
  echo "$OUT already holds the four idx files" >&2
  exit 0
fi
work="$(mktemp -d)"
chmod 755 "$work"  # apt's download user must be able to write here
trap 'rm -rf "$work"' EXIT
# A fresh machine may have no package lists yet: update them once if the first try fails.
(cd "$work" && { apt-get download -qq "$PACKAGE" 2>/dev/null \
  || { apt-get update -qq && apt-get download "$PACKAGE"; }; })
deb="$(ls "$work"/*.deb)"
echo "$SHA256  $deb" | sha256sum --check --quiet - || { echo "sha256 mismatch for $PACKAGE" >&2; exit 1; }
dpkg-deb -x "$deb" "$work/root"
mkdir -p "$OUT"
for f in $FILES; do
  gunzip -c "$work/root/usr/share/datasets/fashion-mnist/$f.gz" > "$OUT/$f"
done
echo "wrote $OUT/{$(echo $FILES | tr ' ' ',')}" >&2
