#!/usr/bin/env bash
# Proxy-to-proxy HTTP/2 (`[mesh] peer_protocol`, issue 16): mesh-bench's two hops with the
# agents' SKYLINE_PEER_PROTOCOL=http1 and =h2, in both orders (http1 h2 h2 http1 ...), for GET
# and for POST 1 KiB: rps, p99, and the most TCP connections from the outbound to the inbound
# seen during the run (`ss -tn`, sampled every 0.5 s). Then connection churn: wrk sending
# `Connection: close` (a new client connection per request) to the same two hops.
# Usage: bench/peer-protocol.sh [pairs, default 2] [seconds, default 10]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$(realpath "${SKYLINE_BIN:-$root/target/release/skyline}")"
pairs="${1:-2}" secs="${2:-10}"
bench="${MESH_BENCH:-$root/../shared/bench/mesh-bench.sh}"
"$root/scripts/install-deps" bench
export SKYLINE_BIN="$bin"
work="$(mktemp -d)"; pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The most established connections to port $1 until $2 exists (bounded: 120 s).
peak_conns() {
  local port="$1" until="$2" peak=0 n
  for _ in $(seq 240); do
    [ -e "$until" ] && break
    n="$(ss -tnH state established "( dport = :$port )" | wc -l)"
    [ "$n" -gt "$peak" ] && peak="$n"
    sleep 0.5
  done
  echo "$peak"
}

run() { # protocol, then mesh-bench's options
  local protocol="$1"; shift
  rm -f "$work/done"
  peak_conns 5041 "$work/done" >"$work/peak" &
  local sampler=$!
  local out
  out="$(SKYLINE_PEER_PROTOCOL="$protocol" CANDIDATE_UP="bash $root/bench/candidate-up.sh" \
    bash "$bench" --modes candidate --repeat 1 --duration "$secs" "$@" 2>>"$work/mesh-bench.log")" || { cat "$work/mesh-bench.log" >&2; exit 1; }
  touch "$work/done"; wait "$sampler"
  echo "$out" | python3 -c 'import json, sys
peak = sys.argv[2]
for line in sys.stdin:
    if line.startswith("{"):
        r = json.loads(line)
        print("{0:5}: {rps:>9,.0f} rps  p50 {p50_ms:.2f} ms  p99 {p99_ms:.2f} ms  errors {errors}  conns to inbound {1}".format(sys.argv[1], peak, **r))' "$protocol" "$(cat "$work/peak")"
}

for load in "GET" "POST 1 KiB"; do
  opts=(); [ "$load" = GET ] || opts=(--post 1024)
  echo "== $load, 64 keep-alive connections, both hops"
  for i in $(seq "$pairs"); do
    if [ $((i % 2)) = 1 ]; then order=(http1 h2); else order=(h2 http1); fi
    for p in "${order[@]}"; do run "$p" "${opts[@]}"; done
  done
done

echo "== churn: wrk -c64 with Connection: close (a new client connection per request), GET"
cat >"$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/n.pid; error_log stderr error;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $work/cb; proxy_temp_path $work/pt;
  fastcgi_temp_path $work/ft; uwsgi_temp_path $work/ut; scgi_temp_path $work/st;
  server { listen 127.0.0.1:15390; location / { return 200 "0123456789012345678901234567890123456789012345678901234567890123"; } } }
CONF
taskset -c 0 nginx -e stderr -p "$work/" -c "$work/nginx.conf" >"$work/nginx.log" 2>&1 & pids+=($!)
churn() { # protocol
  local dir="$work/$1-$RANDOM"; mkdir -p "$dir"
  BENCH_DIR="$dir" BENCH_BACKEND=127.0.0.1:15390 BENCH_OUT_PORT=15340 BENCH_IN_PORT=15341 \
    SKYLINE_PEER_PROTOCOL="$1" taskset -c 0 bash "$root/bench/candidate-up.sh"
  local up=0
  for _ in $(seq 100); do
    if curl -fsS -o /dev/null http://127.0.0.1:15340/service/bench/; then up=1; break; fi
    sleep 0.1
  done
  [ "$up" = 1 ] || { echo "$1: the mesh did not answer"; return; }
  rm -f "$dir/done"
  peak_conns 15341 "$dir/done" >"$dir/peak" &
  local sampler=$!
  timeout $((secs + 20)) taskset -c 1 wrk -t1 -c64 -d"${secs}s" --latency -H "Connection: close" \
    http://127.0.0.1:15340/service/bench/ >"$dir/wrk.txt" 2>&1 || true
  touch "$dir/done"; wait "$sampler"
  printf '%-5s: %s rps  p99 %s  socket errors: %s  conns to inbound %s\n' "$1" \
    "$(awk '/Requests\/sec/ {print $2}' "$dir/wrk.txt")" \
    "$(awk '$1 == "99%" {print $2}' "$dir/wrk.txt")" \
    "$(grep -o 'Socket errors.*' "$dir/wrk.txt" || echo none)" "$(cat "$dir/peak")"
  while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$dir/candidate.pids"
  sleep 1
}
for i in $(seq "$pairs"); do
  if [ $((i % 2)) = 1 ]; then order=(http1 h2); else order=(h2 http1); fi
  for p in "${order[@]}"; do churn "$p"; done
done
