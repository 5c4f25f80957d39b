#!/usr/bin/env bash
# The gRPC benchmark: unary calls sent by h2load (h2c, prior knowledge) through the two hops of
# Skyline and of NGINX to one tonic server, as bench/h2c.sh does for plain HTTP/2 requests.
#
#   h2load ──h2c──► 127.0.0.1:5040 outbound hop ──h2c──► 127.0.0.1:5041 inbound hop ──h2c──► tonic :19000
#
# - skyline: two agent processes (bench/candidate-up.sh with SKYLINE_BENCH_PROTOCOL=h2c: the
#   backend is registered with meta `protocol = "h2c"`); h2c on every hop, one multiplexed
#   connection between the hops and one to the backend.
# - nginx: two nginx processes with the gRPC module on both hops (`listen ... http2;`,
#   `grpc_pass grpc://...` to a keep-alive upstream; the inbound hop strips `/service/bench` with
#   `rewrite ... break`). NGINX sends one stream at a time on each upstream connection.
# The backend is `examples/grpc_echo.rs` (tonic, one thread, h2c only) for both. Each call is
# `skyline.test.Echo/Unary` with a 7-byte message (a 12-byte gRPC frame), `content-type:
# application/grpc` and `te: trailers`. Like mesh-bench: load on CPU 1, system under test (both
# hops and the backend) on CPU 0; modes interleaved, each run on freshly started proxies. Before
# each run one call is checked end to end for `grpc-status: 0` (h2load itself counts HTTP
# statuses only).
#
#   bench/grpc.sh [--repeat 3] [--duration 10] [--warmup 2] [--clients 16] [--streams 8]
#                 [--modes nginx,skyline] [--workers 1] [--ports 5040,5041,19000]
# Modes: nginx, skyline, and direct (h2load straight to the backend, for reference).
# Needs: nginx (with its HTTP/2 and gRPC modules, as Debian's), h2load (nghttp2-client), curl,
# taskset (scripts/install-deps bench) and release builds: `cargo build --release` and
# `cargo build --release --example grpc_echo` (or SKYLINE_BIN and GRPC_ECHO_BIN). Prints one line
# per run and a median table; the per-run JSON lines go to stderr.
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
GRPC_ECHO_BIN="${GRPC_ECHO_BIN:-$root/target/release/examples/grpc_echo}"
[ -x "$GRPC_ECHO_BIN" ] || { echo "no $GRPC_ECHO_BIN: cargo build --release --example grpc_echo" >&2; exit 1; }

IFS=, read -r OUT_PORT IN_PORT BACKEND_PORT <<<"$PORTS"
BACKEND="127.0.0.1:$BACKEND_PORT"
WORK=$(mktemp -d /tmp/grpc-bench.XXXXXX)
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
for port in "$BACKEND_PORT" "$OUT_PORT" "$IN_PORT"; do
  port_free "$port" || { echo "port $port is taken (another benchmark running?)" >&2; exit 1; }
done

# The call: EchoRequest { message: "hello" } (field 1, length 5) in a gRPC frame (uncompressed,
# 4-byte big-endian length 7).
printf '\x00\x00\x00\x00\x07\x0a\x05hello' >"$WORK/call.bin"
grpc_headers=(-H 'content-type: application/grpc' -H 'te: trailers')
wait_grpc() { # url: wait (15 s) for a call answered with grpc-status 0 (in the trailers)
  local out=""
  for _ in $(seq 1 150); do
    out=$(curl -s --http2-prior-knowledge --max-time 1 -D - -o /dev/null "${grpc_headers[@]}" \
      --data-binary @"$WORK/call.bin" "$1" 2>/dev/null || true)
    grep -qi '^grpc-status: 0' <<<"$out" && return 0
    sleep 0.1
  done
  echo "no grpc-status 0 from $1: $out" >&2; return 1
}

nginx_conf() { # name workers server-block
  cat <<CONF
worker_processes $2;
daemon off;
master_process on;
pid $WORK/logs/nginx-$1.pid;
error_log stderr error;
worker_rlimit_nofile 16384;
events { worker_connections 8192; multi_accept off; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  http2_max_concurrent_streams 256;
  client_body_temp_path $WORK/logs/cb-$1; proxy_temp_path $WORK/logs/pt-$1;
  fastcgi_temp_path $WORK/logs/ft-$1; uwsgi_temp_path $WORK/logs/ut-$1; scgi_temp_path $WORK/logs/st-$1;
$3
}
CONF
}
upstream() { echo "  upstream up { server $1; keepalive 1024; keepalive_requests 10000000; keepalive_timeout 75s; }"; }
nginx_conf out "$WORKERS" "$(upstream 127.0.0.1:$IN_PORT)
  server { listen 127.0.0.1:$OUT_PORT http2 backlog=4096 reuseport;
    location /service/bench/ { grpc_pass grpc://up; } }" >"$WORK/nginx-out.conf"
nginx_conf in "$WORKERS" "$(upstream $BACKEND)
  server { listen 127.0.0.1:$IN_PORT http2 backlog=4096 reuseport;
    location /service/bench/ { rewrite ^/service/bench(/.*)\$ \$1 break; grpc_pass grpc://up; } }" >"$WORK/nginx-in.conf"

taskset -c "$SUT_CPUS" "$GRPC_ECHO_BIN" "$BACKEND" 2>>"$WORK/logs/backend.stderr" &
BACKEND_PID=$!
url_path="/skyline.test.Echo/Unary"
wait_grpc "http://$BACKEND$url_path"

start_mode() {
  case "$1" in
    direct) ;; # h2load straight to the backend: what the backend alone costs
    nginx)
      taskset -c "$SUT_CPUS" "$NGINX" -e stderr -p "$WORK/" -c "$WORK/nginx-in.conf" 2>>"$WORK/logs/nginx.stderr" &
      PIDS+=($!)
      taskset -c "$SUT_CPUS" "$NGINX" -e stderr -p "$WORK/" -c "$WORK/nginx-out.conf" 2>>"$WORK/logs/nginx.stderr" &
      PIDS+=($!);;
    skyline)
      : >"$WORK/candidate.pids"
      SKYLINE_BENCH_PROTOCOL=h2c BENCH_DIR="$WORK" BENCH_BACKEND="$BACKEND" BENCH_WORKERS="$WORKERS" \
        BENCH_OUT_PORT="$OUT_PORT" BENCH_IN_PORT="$IN_PORT" taskset -c "$SUT_CPUS" bash "$root/bench/candidate-up.sh"
      wait_grpc "$url"
      mapfile -t PIDS <"$WORK/candidate.pids";;
    *) echo "unknown mode $1" >&2; exit 2;;
  esac
  wait_grpc "$(url_of "$1")"
}

url="http://127.0.0.1:$OUT_PORT/service/bench$url_path"
url_of() { if [ "$1" = direct ]; then echo "http://$BACKEND$url_path"; else echo "$url"; fi; }
results="$WORK/results"
: >"$results"
for repeat in $(seq 1 "$REPEAT"); do
  for mode in ${MODES//,/ }; do
    start_mode "$mode"
    log="$WORK/h2load-$mode-$repeat.tsv"
    out=$(timeout $((DURATION + WARMUP + 30)) taskset -c "$LOAD_CPUS" h2load -t 1 -c "$CLIENTS" \
      -m "$STREAMS" -D "$DURATION" --warm-up-time "$WARMUP" -d "$WORK/call.bin" "${grpc_headers[@]}" \
      --log-file "$log" "$(url_of "$mode")" 2>&1) || true
    # Still answering with grpc-status 0 after the load.
    wait_grpc "$(url_of "$mode")"
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

echo "h2load -t 1 -c $CLIENTS -m $STREAMS -D $DURATION --warm-up-time $WARMUP -d <12-byte gRPC frame> $url (direct: the backend) (load CPU $LOAD_CPUS, proxies + backend CPU $SUT_CPUS, $WORKERS worker per hop)"
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
if [[ ",$MODES," == *,nginx,* && ",$MODES," == *,skyline,* ]]; then
  echo "per repeat, skyline / nginx (rps, p99):"
  for repeat in $(seq 1 "$REPEAT"); do
    awk -v r="$repeat" '$2 == r { rps[$1] = $3; p99[$1] = $5 } END {
      if (rps["nginx"] > 0 && p99["nginx"] > 0)
        printf "  repeat %d: rps %.2f, p99 %.2f\n", r, rps["skyline"] / rps["nginx"], p99["skyline"] / p99["nginx"] }' "$results"
  done
fi
