#!/usr/bin/env bash
# NGINX as mesh-bench's candidate with mutual TLS on the hop between its two proxies, the same
# hop Skyline's `[tls] mode = "strict"` protects (bench/candidate-up.sh with SKYLINE_BENCH_TLS):
#   outbound NGINX 127.0.0.1:$BENCH_OUT_PORT --(proxy_ssl, client certificate, kept alive)-->
#   inbound NGINX 127.0.0.1:$BENCH_IN_PORT (ssl_verify_client on) --> $BENCH_BACKEND
# The certificates come from `skyline ca` (ECDSA P-256, as Skyline's), so both meshes do the
# same cryptography. Configured like mesh-bench's own NGINX hops otherwise. One difference: the
# outbound NGINX does not verify the inbound's certificate (`proxy_ssl_verify` checks DNS or IP
# names, and mesh certificates carry only a SPIFFE URI); the inbound verifies the client's, as
# Skyline's does. With connections kept alive, this costs nothing per request either way.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${SKYLINE_BIN:-$root/target/release/skyline}"
: "${BENCH_DIR:?}" "${BENCH_BACKEND:?}" "${BENCH_OUT_PORT:=5040}" "${BENCH_IN_PORT:=5041}"
workers="${BENCH_WORKERS:-1}"
nginx=$(command -v nginx || echo /usr/sbin/nginx)
d="$BENCH_DIR/ngx-tls"
mkdir -p "$d/logs"
"$bin" ca init --dir "$d/ca" >/dev/null
for node in client server; do
  "$bin" ca issue --dir "$d/ca" --kind node --name "$node" --ttl 2h --out "$d/$node" >/dev/null
done

hop() { # name listen upstream server-extra location-extra
  cat >"$d/$1.conf" <<CONF
worker_processes $workers; daemon off; master_process on;
pid $d/logs/$1.pid; error_log stderr error; worker_rlimit_nofile 16384;
events { worker_connections 8192; multi_accept off; }
http {
  access_log off; keepalive_requests 10000000; keepalive_timeout 75s;
  client_body_temp_path $d/logs/cb-$1; proxy_temp_path $d/logs/pt-$1;
  fastcgi_temp_path $d/logs/ft-$1; uwsgi_temp_path $d/logs/ut-$1; scgi_temp_path $d/logs/st-$1;
  upstream up { server $3; keepalive 1024; keepalive_requests 10000000; keepalive_timeout 75s; }
  server {
    listen 127.0.0.1:$2 backlog=4096 reuseport $4
  }
}
CONF
}
proxy='proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host;'
hop out "$BENCH_OUT_PORT" "127.0.0.1:$BENCH_IN_PORT" ";
    location /service/bench/ { proxy_pass https://up; $proxy
      proxy_ssl_certificate $d/client.crt; proxy_ssl_certificate_key $d/client.key;
      proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on; }"
hop in "$BENCH_IN_PORT" "$BENCH_BACKEND" "ssl;
    ssl_certificate $d/server.crt; ssl_certificate_key $d/server.key;
    ssl_client_certificate $d/ca/ca.crt; ssl_verify_client on; ssl_protocols TLSv1.3;
    location /service/bench/ { proxy_pass http://up/; $proxy }"
"$nginx" -e stderr -p "$d/" -c "$d/in.conf" >>"$d/logs/stderr" 2>&1 &
echo $! >>"$BENCH_DIR/candidate.pids"
"$nginx" -e stderr -p "$d/" -c "$d/out.conf" >>"$d/logs/stderr" 2>&1 &
echo $! >>"$BENCH_DIR/candidate.pids"
