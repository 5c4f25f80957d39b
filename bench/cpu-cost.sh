#!/usr/bin/env bash
# CPU time per request of the two proxy hops, NGINX vs Skyline, on the same two-hop setup as
# mesh-bench.sh (backend nginx on :19000, outbound :5040 → inbound :5041 → backend).
#
# Throughput needs a quiet machine; CPU time per request (utime+stime of the proxy processes /
# requests served) is much less sensitive to other load, so it can guide work on a busy one.
# Printed split into user space (the proxy's own code and libc) and the kernel (the socket
# system calls, loopback TCP for both ends of each send, wake-ups): the kernel's share says how
# much a faster proxy can gain at all. Beside it, what the kernel is asked to do per request:
# the system calls of both hops (counted by `perf stat` on the raw_syscalls tracepoint, when
# perf is installed: `apt-get install linux-perf`) and the TCP segments the whole machine sent
# (`nstat`'s TcpOutSegs: 6 is the least for three connections carrying a request and an answer,
# so anything more is a pure ACK or a split message).
# Usage: bench/cpu-cost.sh [seconds per run, default 6] [repeats, default 3]
# CANDIDATE_SCRIPT=<file> runs another candidate (mesh-bench's contract; bench/floor.sh cpu uses it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs="${1:-6}"; repeats="${2:-3}"
work="$(mktemp -d)"; pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; sleep 0.3; pkill -f "$work" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
hz=$(getconf CLK_TCK)

common() { printf 'worker_processes 1; daemon off; pid %s/%s.pid; error_log stderr error;\nevents { worker_connections 8192; }\n' "$work" "$1"; }
temps() { printf 'client_body_temp_path %s/cb-%s; proxy_temp_path %s/pt-%s; fastcgi_temp_path %s/ft-%s; uwsgi_temp_path %s/ut-%s; scgi_temp_path %s/st-%s;\n' "$work" "$1" "$work" "$1" "$work" "$1" "$work" "$1" "$work" "$1"; }
{ common backend; echo "http { access_log off; keepalive_requests 10000000; $(temps b)"
  echo "server { listen 127.0.0.1:19000; location / { return 200 \"$(head -c 64 /dev/zero | tr '\0' x)\"; } } }"; } >"$work/backend.conf"
hop() { # name port upstream slash
  { common "$1"; echo "http { access_log off; keepalive_requests 10000000; $(temps "$1")"
    echo "upstream up { server $3; keepalive 1024; keepalive_requests 10000000; }"
    echo "server { listen 127.0.0.1:$2 reuseport; location /service/bench/ { proxy_pass http://up$4; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host \$host; } } }"
  } >"$work/$1.conf"; }
hop out 5040 127.0.0.1:5041 ""; hop in 5041 127.0.0.1:19000 "/"

taskset -c 0 nginx -e stderr -p "$work/" -c "$work/backend.conf" 2>/dev/null & pids+=($!)
sleep 0.3

# "user system" clock ticks of the processes and their children.
ticks() { local u=0 s=0 p q; for p in "$@"; do for q in $p $(pgrep -P "$p"); do
  read -r pu pk < <(awk '{print $14, $15}' "/proc/$q/stat" 2>/dev/null || echo 0 0)
  u=$((u + pu)); s=$((s + pk)); done; done; echo "$u $s"; }

ports_free() { for _ in $(seq 100); do
  ss -ltn | grep -qE '127\.0\.0\.1:504[01] ' || return 0; sleep 0.1; done
  echo "ports 5040/5041 still busy" >&2; return 1; }

run() { # mode → prints "mode µs/request rps"
  local mode=$1 mp=()
  ports_free
  rm -f "$work/candidate.pids"
  if [ "$mode" = nginx ]; then
    taskset -c 0 nginx -e stderr -p "$work/" -c "$work/in.conf" 2>/dev/null & mp+=($!)
    taskset -c 0 nginx -e stderr -p "$work/" -c "$work/out.conf" 2>/dev/null & mp+=($!)
  else
    BENCH_DIR="$work" BENCH_BACKEND=127.0.0.1:19000 BENCH_OUT_PORT=5040 BENCH_IN_PORT=5041 \
      taskset -c 0 bash "${CANDIDATE_SCRIPT:-$root/bench/candidate-up.sh}"
    mapfile -t mp <"$work/candidate.pids"
  fi
  for _ in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:5040/service/bench/ && break; sleep 0.1; done
  local p; for p in "${mp[@]}"; do [ -e "/proc/$p" ] || { echo "$mode: process $p is not running" >&2; exit 1; }; done
  taskset -c 1 wrk -t1 -c64 -d1s http://127.0.0.1:5040/service/bench/ >/dev/null
  local counting=()
  if command -v perf >/dev/null; then
    local all; all=$(for p in "${mp[@]}"; do echo "$p"; pgrep -P "$p" || true; done | paste -sd,)
    perf stat -x, -e raw_syscalls:sys_enter -p "$all" -o "$work/syscalls" &
    counting=($!)
  fi
  nstat -n
  local u0 s0 u1 s1; read -r u0 s0 < <(ticks "${mp[@]}")
  local out; out=$(taskset -c 1 timeout $((secs + 20)) wrk -t1 -c64 -d"${secs}s" http://127.0.0.1:5040/service/bench/)
  read -r u1 s1 < <(ticks "${mp[@]}")
  local segs; segs=$(nstat TcpOutSegs | awk '/TcpOutSegs/ {print $2}')
  local calls=-
  if [ ${#counting[@]} -gt 0 ]; then
    kill -INT "${counting[@]}"; wait "${counting[@]}" 2>/dev/null || true
    calls=$(awk -F, '/raw_syscalls/ {print $1}' "$work/syscalls")
  fi
  local reqs; reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  local rps; rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  awk -v m="$mode" -v u=$((u1 - u0)) -v k=$((s1 - s0)) -v hz="$hz" -v r="$reqs" -v rps="$rps" \
    -v c="$calls" -v g="${segs:-0}" 'BEGIN {
      us = u * 1e6 / hz / r; ks = k * 1e6 / hz / r
      printf "%s %.1f %.1f %.1f %s %s %.2f\n", m, us + ks, us, ks, rps,
        (c == "-" ? "-" : sprintf("%.2f", c / r)), g / r }'
  kill "${mp[@]}" 2>/dev/null || true; wait "${mp[@]}" 2>/dev/null || true
}
echo "mode cpu_us_per_request user_us kernel_us rps syscalls_per_request tcp_segments_per_request"
for _ in $(seq "$repeats"); do for mode in ${MODES:-nginx candidate}; do run "$mode"; done; done
