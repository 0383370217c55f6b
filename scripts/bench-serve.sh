#!/usr/bin/env bash
# The serving benchmark of the README: `dynexec bench serve` against a batched server
# (--max-batch 16) at 1, 4 and 16 clients, speculative decoding (prompt lookup) off and on,
# then against a one-at-a-time server (--max-batch 1) at 16 clients.
#   scripts/bench-serve.sh [OUT_DIR]     (env: THREADS=2 REQUESTS=32 MAX_TOKENS=64,
#                                         SERVE_ARGS="--draft ngram": the model and its draft)
# The Qwen2.5-Coder pair of the README, with speculation never switched off by batch size:
#   SERVE_ARGS="qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct --draft-quant q4_0
#     --draft-vocab 32768 --lookahead fixed:2 --spec-max-batch 16" REQUESTS=16 scripts/bench-serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-serve}"
threads="${THREADS:-2}"
requests="${REQUESTS:-32}"
max_tokens="${MAX_TOKENS:-64}"
read -r -a serve_args <<<"${SERVE_ARGS:---draft ngram}"
mkdir -p "$out"
source scripts/serve-helpers.sh

bench() {
  "$dynexec" bench serve --url "$url" --requests "$requests" --max-tokens "$max_tokens" "$@"
}

start_server batched --max-batch 16
bench --concurrency 1,4,16 --speculative both --json >"$out/batched.json"
stop_server

start_server one-at-a-time --max-batch 1
bench --concurrency 16 --speculative off --json >"$out/one-at-a-time.json"
stop_server

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
batched = json.load(open(f"{out}/batched.json"))["rows"]
single = json.load(open(f"{out}/one-at-a-time.json"))["rows"][0]
print("| server | clients | speculative | tok/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms | mean batch | acceptance | errors |")
print("|---|---|---|---|---|---|---|---|---|")
for name, rows in (("batch 16", batched), ("batch 1", [single])):
    for r in rows:
        acc = f"{r['acceptance_rate']:.0%}" if r.get("acceptance_rate") is not None else "—"
        print(f"| {name} | {r['concurrency']} | {'on' if r['speculative'] else 'off'} | "
              f"{r['throughput_tokens_per_s']:.1f} | {r['ttft_ms_p50']:.0f} / {r['ttft_ms_p95']:.0f} | "
              f"{r['tpot_ms_p50']:.1f} / {r['tpot_ms_p95']:.1f} | {r['mean_batch_size']:.1f} | {acc} | {r['errors']} |")
b16 = next(r for r in batched if r["concurrency"] == 16 and not r["speculative"])
print(f"\n16 clients, speculative off: batched {b16['throughput_tokens_per_s']:.1f} tok/s, "
      f"one at a time {single['throughput_tokens_per_s']:.1f} tok/s: "
      f"{b16['throughput_tokens_per_s'] / single['throughput_tokens_per_s']:.2f}x "
      f"(TTFT p50 {b16['ttft_ms_p50']:.0f} vs {single['ttft_ms_p50']:.0f} ms)")
PY
