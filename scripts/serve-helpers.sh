# Sourced by the serving benchmarks: build dynexec, start and stop a server on a free port.
# Expects $out (log folder), $threads and the array serve_args; sets $dynexec, and $url on start.
cargo build --quiet -p dynexec-cli
dynexec="${CARGO_TARGET_DIR:-target}/debug/dynexec"

server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT

# start_server NAME [SERVE FLAGS...]: logs to $out/serve-NAME.log; sets $url.
start_server() {
  local log="$out/serve-$1.log"
  shift
  "$dynexec" --threads "$threads" --quiet serve --port 0 "${serve_args[@]}" "$@" 2>"$log" &
  server_pid=$!
  for _ in $(seq 600); do
    url=$(grep -o 'http://[0-9.:]*' "$log" | head -1 || true)
    [ -n "$url" ] && return 0
    kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.2
  done
  echo "the server did not start" >&2
  exit 1
}
