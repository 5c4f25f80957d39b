#!/usr/bin/env bash
# User-space instructions per request of the two proxy hops, counted by callgrind: the same
# two-hop setup as mesh-bench.sh (backend nginx on :19000, outbound :5040 -> inbound :5041).
#
# Throughput and even CPU time per request swing by 20-40% between runs on a shared VM;
# instruction counts do not (two runs of one binary agree within about 1%), so this is the
# measure to compare two builds of one change. It does not see the kernel (about 45% of the
# CPU time of a request) or cache misses, so confirm a real gain with mesh-bench.
#
# Usage: bench/instructions.sh [binary, default target/release/skyline] [seconds, default 8]
# Installs what it needs (valgrind, nginx, wrk, curl) with scripts/install-deps.
# With POST=<bytes>, every request is a POST with a body of that many bytes (as mesh-bench's
# --post); with BODY=<bytes>, the backend answers that many bytes (as --body; default 64). The
# agents inherit the environment: SKYLINE_ACCESS_LOG=off SKYLINE_METRICS=off measures the same
# build with the access log and metrics off (docs/benchmarks.md, "Observability").
# With PROFILE=<prefix>, the callgrind files are kept as <prefix>.<pid>.1 for callgrind_annotate
# (build with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only for per-line costs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$(realpath "${1:-$root/target/release/skyline}")"
secs="${2:-8}"
"$root/scripts/install-deps" bench
work="$(mktemp -d)"; pids=()
out="${PROFILE:-$work/callgrind}"
cleanup() { kill "${pids[@]}" 2>/dev/null || true; sleep 0.3; pkill -f "$work" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

source "$root/bench/backend.sh"
backend_up "$work" "${BODY:-64}"

load=()
if [ "${POST:-0}" -gt 0 ]; then
  post_script "$work/post.lua" "$POST"
  load=(-s "$work/post.lua")
fi

# Each agent runs under callgrind; counting starts after start-up and warm-up (-z), and the
# counts of the measured window are dumped (-d) as <out>.<pid>.1.
cat >"$work/skyline" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --compress-strings=no --compress-pos=no --callgrind-out-file=$out.%p "$bin" "\$@"
WRAP
chmod +x "$work/skyline"
BENCH_DIR="$work" BENCH_BACKEND=127.0.0.1:19000 BENCH_OUT_PORT=5040 BENCH_IN_PORT=5041 \
  SKYLINE_BIN="$work/skyline" taskset -c 0 bash "$root/bench/candidate-up.sh"
mapfile -t agents <"$work/candidate.pids"; pids+=("${agents[@]}")
for _ in $(seq 150); do curl -sf -o /dev/null http://127.0.0.1:5040/service/bench/ && break; sleep 0.2; done
taskset -c 1 wrk -t1 -c16 -d2s "${load[@]}" http://127.0.0.1:5040/service/bench/ >/dev/null
for p in "${agents[@]}"; do callgrind_control -z "$p" >/dev/null 2>&1; done
requests=$(taskset -c 1 wrk -t1 -c16 -d"${secs}s" "${load[@]}" http://127.0.0.1:5040/service/bench/ | awk '/requests in/ {print $1}')
for p in "${agents[@]}"; do callgrind_control -d "$p" >/dev/null 2>&1; done
total=0
for p in "${agents[@]}"; do
  ir=$(awk '/^summary:/ {print $2}' "$out.$p.1")
  total=$((total + ir))
done
echo "requests $requests  instructions/request $((total / requests)) (user space, both hops)"
