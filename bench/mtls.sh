#!/usr/bin/env bash
# The cost of mutual TLS on the proxy-to-proxy hop (issue 17): mesh-bench's two hops with
# keep-alive, plain and with mTLS, for Skyline (`[tls] mode = "strict"`) and for NGINX
# (proxy_ssl with a client certificate, ssl_verify_client), interleaved; then the rate of new
# mTLS handshakes each inbound listener takes (`openssl s_time -new` with the client
# certificate, so each connection is a full handshake with a client certificate).
# Usage: bench/mtls.sh [repeats, default 3] [seconds, default 10]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$(realpath "${SKYLINE_BIN:-$root/target/release/skyline}")"
repeat="${1:-3}" secs="${2:-10}"
bench="${MESH_BENCH:-$root/../shared/bench/mesh-bench.sh}"
"$root/scripts/install-deps" bench
export SKYLINE_BIN="$bin"

run() { # label, mode, then the environment for the candidate
  local label="$1" mode="$2"; shift 2
  env "$@" bash "$bench" --modes "$mode" --repeat 1 --duration "$secs" 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        r = json.loads(line)
        r["rss_mib"] = r["rss_kib"] // 1024
        print("{0}: {rps:>9,.0f} rps  p50 {p50_ms:.2f} ms  p99 {p99_ms:.2f} ms  errors {errors}  rss {rss_mib} MiB".format(sys.argv[1], **r))' "$label"
}
echo "== keep-alive throughput, 64 connections, both hops (mesh-bench candidate rows)"
for i in $(seq "$repeat"); do
  run "skyline plain" candidate CANDIDATE_UP="bash $root/bench/candidate-up.sh"
  run "skyline mTLS " candidate CANDIDATE_UP="bash $root/bench/candidate-up.sh" SKYLINE_BENCH_TLS=strict
  run "nginx plain  " nginx
  run "nginx mTLS   " candidate CANDIDATE_UP="bash $root/bench/nginx-mtls-up.sh"
done

echo "== new mTLS handshakes per second at the inbound listener (openssl s_time -new, ${secs}s)"
work="$(mktemp -d)"; pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
"$bin" ca init --dir "$work/ca" >/dev/null
for n in client server; do
  "$bin" ca issue --dir "$work/ca" --kind node --name "$n" --ttl 2h --out "$work/$n" >/dev/null
done
handshakes() { # port
  openssl s_time -connect "127.0.0.1:$1" -new -time "$secs" -cert "$work/client.crt" \
    -key "$work/client.key" -CAfile "$work/ca/ca.crt" 2>/dev/null | awk '/connections in .* real seconds/ {print}' | tail -1
}
printf '[tls]\nmode = "strict"\nca = "ca/ca.crt"\ncert = "server.crt"\nkey = "server.key"\n' >"$work/server.toml"
SKYLINE_LOG=warn "$bin" agent --config "$work/server.toml" --node-name server --outbound off \
  --inbound 127.0.0.1:15241 --admin off --catalog file --catalog-file /dev/null --workers 1 \
  >"$work/skyline.log" 2>&1 & pids+=($!)
cat >"$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/n.pid; error_log stderr error;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $work/cb; proxy_temp_path $work/pt;
  fastcgi_temp_path $work/ft; uwsgi_temp_path $work/ut; scgi_temp_path $work/st;
  server { listen 127.0.0.1:15242 ssl; ssl_certificate $work/server.crt;
    ssl_certificate_key $work/server.key; ssl_client_certificate $work/ca/ca.crt;
    ssl_verify_client on; ssl_protocols TLSv1.3; ssl_session_tickets off;
    location / { return 200 ok; } } }
CONF
nginx -e stderr -p "$work/" -c "$work/nginx.conf" >"$work/nginx.log" 2>&1 & pids+=($!)
sleep 1
for i in $(seq "$repeat"); do
  echo "skyline inbound: $(handshakes 15241)"
  echo "nginx inbound:   $(handshakes 15242)"
done
