#!/usr/bin/env bash
# The h2c benchmark: h2load (HTTP/2 over cleartext, prior knowledge) against the two hops of
# Skyline and of NGINX, as mesh-bench.sh does with wrk for HTTP/1.1 (../shared/bench/README.md).
#
#   h2load ──h2c──► 127.0.0.1:5040 outbound hop ──► 127.0.0.1:5041 inbound hop ──HTTP/1.1──► backend :19000
#
# - skyline: two agent processes (bench/candidate-up.sh); the hop between them is h2c (one
#   multiplexed connection), the backend (registered without `protocol = "h2c"`) gets HTTP/1.1.
# - nginx: two nginx processes; the outbound hop listens for h2c (`listen ... http2`), the hop
#   between them is HTTP/1.1 with keep-alive (NGINX's proxy module speaks only HTTP/1.x to
#   upstreams), as is the hop to the backend.
# The backend is the same nginx (1 worker, fixed 64-byte body) for both. Like mesh-bench, load on
# CPU 1, system under test on CPU 0; modes interleaved, each run on freshly started proxies.
#
#   bench/h2c.sh [--repeat 3] [--duration 10] [--warmup 2] [--clients 16] [--streams 8]
#                [--modes nginx,skyline] [--workers 1] [--ports 5040,5041,19000]
# --ports: outbound, inbound and backend ports (mesh-bench's by default; pick others when another
# benchmark may be using those).
# Needs: nginx, h2load (nghttp2-client), curl, taskset (scripts/install-deps bench) and a release
# build (target/release/skyline, or SKYLINE_BIN). Prints one line per run and a median table;
# the per-run JSON lines go to stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPEAT=3 DURATION=10 WARMUP=2 CLIENTS=16 STREAMS=8 MODES=nginx,skyline WORKERS=1
LOAD_CPUS=1 SUT_CPUS=0 PORTS=5040,5041,19000
while [ $# -gt 0 ]; do
  case "$1" in
    --repeat) REPEAT="$2"; shift 2;;
    --duration) DURATION="$2"; shift 2;;
    --warmup) WARMUP="$2"; shift 2;;
    --clients) CLIENTS="$2"; shift 2;;
    --streams) STREAMS="$2"; shift 2;;
    --modes) MODES="$2"; shift 2;;
    --workers) WORKERS="$2"; shift 2;;
    --ports) PORTS="$2"; shift 2;;
    *) echo "unknown option: $1" >&2; exit 2;;
  esac
done
for bin in h2load curl taskset; do
  command -v "$bin" >/dev/null || { echo "missing $bin (scripts/install-deps bench)" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "missing nginx (scripts/install-deps bench)" >&2; exit 1; }
export SKYLINE_BIN="${SKYLINE_BIN:-$root/target/release/skyline}"
[ -x "$SKYLINE_BIN" ] || { echo "no $SKYLINE_BIN: cargo build --release" >&2; exit 1; }

IFS=, read -r OUT_PORT IN_PORT BACKEND_PORT <<<"$PORTS"
BACKEND="127.0.0.1:$BACKEND_PORT"
WORK=$(mktemp -d /tmp/h2c-bench.XXXXXX)
mkdir -p "$WORK/logs"
PIDS=()          # what the current run started (by PID)
BACKEND_PID=""

descendants() { local c; echo "$1"; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do descendants "$c"; done; }
kill_tree() { # pid: TERM it and its descendants, KILL after 5 s
  local p="$1" all q
  kill -0 "$p" 2>/dev/null || return 0
  all=$(descendants "$p" | tr '\n' ' ')
  kill -TERM $all 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  for q in $all; do kill -0 "$q" 2>/dev/null && kill -KILL "$q" 2>/dev/null || true; done
  wait "$p" 2>/dev/null || true
}
stop_run() { local p; for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill_tree "$p"; done; PIDS=(); }
cleanup() { stop_run; [ -n "$BACKEND_PID" ] && kill_tree "$BACKEND_PID"; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
rss_kib() { local t=0 p r; for p in $(for x in "$@"; do descendants "$x"; done | sort -u); do
  r=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null || true); t=$((t + ${r:-0})); done; echo "$t"; }
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_ok() { # url [h2]: wait (15 s) for a 200
  local flag=() ; [ "${2:-}" = h2 ] && flag=(--http2-prior-knowledge)
  for _ in $(seq 1 150); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "${flag[@]}" --max-time 1 "$1" || true)" = 200 ] && return 0
    sleep 0.1
  done
  echo "no 200 from $1" >&2; return 1
}
for port in "$BACKEND_PORT" "$OUT_PORT" "$IN_PORT"; do
  port_free "$port" || { echo "port $port is taken (another benchmark running?)" >&2; exit 1; }
done

nginx_conf() { # name workers server-block
  cat <<EOF
worker_processes $2;
daemon off;
master_process on;
pid $WORK/logs/nginx-$1.pid;
error_log stderr error;
worker_rlimit_nofile 16384;
events { worker_connections 8192; multi_accept off; }
http {
  access_log off;
  default_type text/plain;
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  http2_max_concurrent_streams 256;
  client_body_temp_path $WORK/logs/cb-$1; proxy_temp_path $WORK/logs/pt-$1;
  fastcgi_temp_path $WORK/logs/ft-$1; uwsgi_temp_path $WORK/logs/ut-$1; scgi_temp_path $WORK/logs/st-$1;
$3
}
EOF
}
body=$(head -c 64 /dev/zero | tr '\0' 'x')
nginx_conf backend 1 "  server { listen $BACKEND backlog=4096; location / { return 200 \"$body\"; } }" >"$WORK/backend.conf"
proxy='proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host;'
upstream() { echo "  upstream up { server $1; keepalive 1024; keepalive_requests 10000000; keepalive_timeout 75s; }"; }
nginx_conf out "$WORKERS" "$(upstream 127.0.0.1:$IN_PORT)
  server { listen 127.0.0.1:$OUT_PORT http2 backlog=4096 reuseport;
    location /service/bench/ { proxy_pass http://up; $proxy } }" >"$WORK/nginx-out.conf"
nginx_conf in "$WORKERS" "$(upstream $BACKEND)
  server { listen 127.0.0.1:$IN_PORT backlog=4096 reuseport;
    location /service/bench/ { proxy_pass http://up/; $proxy } }" >"$WORK/nginx-in.conf"

taskset -c "$SUT_CPUS" "$NGINX" -e stderr -p "$WORK/" -c "$WORK/backend.conf" 2>>"$WORK/logs/nginx.stderr" &
BACKEND_PID=$!
wait_ok "http://$BACKEND/"

start_mode() {
  case "$1" in
    nginx)
      taskset -c "$SUT_CPUS" "$NGINX" -e stderr -p "$WORK/" -c "$WORK/nginx-in.conf" 2>>"$WORK/logs/nginx.stderr" &
      PIDS+=($!)
      taskset -c "$SUT_CPUS" "$NGINX" -e stderr -p "$WORK/" -c "$WORK/nginx-out.conf" 2>>"$WORK/logs/nginx.stderr" &
      PIDS+=($!);;
    skyline)
      : >"$WORK/candidate.pids"
      BENCH_DIR="$WORK" BENCH_BACKEND="$BACKEND" BENCH_WORKERS="$WORKERS" BENCH_OUT_PORT="$OUT_PORT" \
        BENCH_IN_PORT="$IN_PORT" taskset -c "$SUT_CPUS" bash "$root/bench/candidate-up.sh"
      wait_ok "http://127.0.0.1:$OUT_PORT/service/bench/" h2
      mapfile -t PIDS <"$WORK/candidate.pids";;
    *) echo "unknown mode $1" >&2; exit 2;;
  esac
  wait_ok "http://127.0.0.1:$OUT_PORT/service/bench/" h2
}

url="http://127.0.0.1:$OUT_PORT/service/bench/"
results="$WORK/results"
: >"$results"
for repeat in $(seq 1 "$REPEAT"); do
  for mode in ${MODES//,/ }; do
    start_mode "$mode"
    log="$WORK/h2load-$mode-$repeat.tsv"
    out=$(timeout $((DURATION + WARMUP + 30)) taskset -c "$LOAD_CPUS" h2load -t 1 -c "$CLIENTS" \
      -m "$STREAMS" -D "$DURATION" --warm-up-time "$WARMUP" --log-file "$log" "$url" 2>&1) || true
    rss=$(rss_kib "${PIDS[@]}")
    stop_run
    rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")
    read -r done ok failed errored timeouts < <(sed -n \
      's/^requests: [0-9]* total, [0-9]* started, \([0-9]*\) done, \([0-9]*\) succeeded, \([0-9]*\) failed, \([0-9]*\) errored, \([0-9]*\) timeout.*/\1 \2 \3 \4 \5/p' <<<"$out")
    non2xx=$(sed -n 's/^status codes: \([0-9]*\) 2xx.*/\1/p' <<<"$out")
    # p50/p99 of the per-request times h2load logged (microseconds, third column).
    read -r p50 p99 < <(cut -f3 "$log" | sort -n | awk '{v[NR]=$1} END {
      if (NR == 0) { print "null null"; exit }
      i50 = int(NR * 0.50); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
      printf "%.3f %.3f\n", v[i50] / 1000, v[i99] / 1000 }')
    line="{\"mode\":\"$mode\",\"repeat\":$repeat,\"rps\":${rps:-0},\"p50_ms\":$p50,\"p99_ms\":$p99,\"done\":${done:-0},\"succeeded\":${ok:-0},\"failed\":${failed:-0},\"errored\":${errored:-0},\"timeout\":${timeouts:-0},\"status_2xx\":${non2xx:-0},\"rss_kib\":$rss,\"clients\":$CLIENTS,\"streams\":$STREAMS,\"duration_s\":$DURATION}"
    echo "$line" >&2
    echo "$mode $repeat ${rps:-0} $p50 $p99 $rss ${failed:-0}" >>"$results"
  done
done

echo "h2load -t 1 -c $CLIENTS -m $STREAMS -D $DURATION --warm-up-time $WARMUP $url (load CPU $LOAD_CPUS, proxies + backend CPU $SUT_CPUS, $WORKERS worker per hop)"
printf '%-8s %-6s %10s %9s %9s %9s %7s\n' mode repeat rps p50_ms p99_ms rss_kib failed
sort -k1,1 -k2,2n "$results" | while read -r m r rps p50 p99 rss failed; do
  printf '%-8s %-6s %10s %9s %9s %9s %7s\n' "$m" "$r" "$rps" "$p50" "$p99" "$rss" "$failed"
done
echo "medians:"
median() { sort -n | awk '{v[NR]=$1} END { if (NR) print v[int((NR + 1) / 2)]; else print "null" }'; }
for mode in ${MODES//,/ }; do
  rps=$(awk -v m="$mode" '$1 == m {print $3}' "$results" | median)
  p99=$(awk -v m="$mode" '$1 == m {print $5}' "$results" | median)
  echo "$mode: median rps $rps, median p99_ms $p99"
done
