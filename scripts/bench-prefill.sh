#!/usr/bin/env bash
# Chunked prefill, before and after, in one run: a server that prefills a prompt in one piece
# (--batch-size larger than any prompt: how dynexec served before chunked prefill) against
# one that prefills in pieces within a step budget of BATCH (the default). For each: short
# requests' time to first token while a LONG-token prompt is prefilled (`bench serve
# --long-prompt`), then `bench serve` throughput at 1, 4 and 16 clients. The two servers
# take turns ROUNDS times.
#   scripts/bench-prefill.sh [OUT_DIR]   (env: THREADS=2 LONG=8000 BATCH=256 REQUESTS=32
#                                          MAX_TOKENS=64 ROUNDS=1 SERVE_ARGS="": the model)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-prefill}"
threads="${THREADS:-2}"
long="${LONG:-8000}"
batch="${BATCH:-256}"
requests="${REQUESTS:-32}"
max_tokens="${MAX_TOKENS:-64}"
rounds="${ROUNDS:-1}"
read -r -a serve_args <<<"${SERVE_ARGS:-}"
mkdir -p "$out"
source scripts/serve-helpers.sh

for round in $(seq "$rounds"); do
  for mode in one-piece chunked; do
    if [ "$mode" = one-piece ]; then size=1000000; else size="$batch"; fi
    start_server "$mode" --batch-size "$size"
    "$dynexec" --json bench serve --url "$url" --long-prompt "$long" >"$out/$mode-$round-interference.json"
    "$dynexec" --json bench serve --url "$url" --requests "$requests" --max-tokens "$max_tokens" \
      --concurrency 1,4,16 --speculative off >"$out/$mode-$round-load.json"
    stop_server
  done
done

python3 - "$out" "$rounds" "$batch" <<'PY'
import json, sys
out, rounds, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print(f"| server | round | long prompt TTFT s | short requests meanwhile | short TTFT p50 / p95 / max ms | 1 client tok/s | 4 clients tok/s | 16 clients tok/s |")
print("|---|---|---|---|---|---|---|---|")
for r in range(1, rounds + 1):
    for mode, name in (("one-piece", "one piece"), ("chunked", f"budget {batch}")):
        i = json.load(open(f"{out}/{mode}-{r}-interference.json"))
        rows = {row["concurrency"]: row for row in json.load(open(f"{out}/{mode}-{r}-load.json"))["rows"]}
        print(f"| {name} | {r} | {i['long_ttft_ms'] / 1000:.1f} | {i['short_requests']} | "
              f"{i['short_ttft_ms_p50']:.0f} / {i['short_ttft_ms_p95']:.0f} / {i['short_ttft_ms_max']:.0f} | "
              + " | ".join(f"{rows[c]['throughput_tokens_per_s']:.1f}" for c in (1, 4, 16)) + " |")
PY
