#!/usr/bin/env bash
# Starts Skyline as mesh-bench's candidate (see ../shared/bench/README.md, "Candidate contract"):
# two agent processes, one per "node", so the outbound → inbound hop is a real TCP hop.
#   outbound agent (node "client"): 127.0.0.1:$BENCH_OUT_PORT, inbound off
#   inbound agent  (node "server"): 127.0.0.1:$BENCH_IN_PORT,  outbound off → $BENCH_BACKEND
# SKYLINE_BENCH_TLS=strict (or permissive) runs the hop between them over mesh mTLS: a CA and
# the two nodes' certificates are made in $BENCH_DIR first (docs/security.md).
# SKYLINE_BENCH_PROTOCOL=h2c registers the backend with meta `protocol = "h2c"` (an HTTP/2-only
# backend, as a gRPC server: bench/grpc.sh).
# The agents inherit the environment: the outbound → inbound hop is one mesh link by default
# (`[mesh] peer_protocol = "mux"`); SKYLINE_PEER_PROTOCOL=http1 gives each request in flight a
# connection of its own, =h2 sends it over HTTP/2 whatever wrk speaks (bench/peer-protocol.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${SKYLINE_BIN:-$root/target/release/skyline}"
: "${BENCH_DIR:?}" "${BENCH_BACKEND:?}" "${BENCH_OUT_PORT:=5040}" "${BENCH_IN_PORT:=5041}"
workers="${BENCH_WORKERS:-1}"

cat >"$BENCH_DIR/catalog.toml" <<CATALOG
[[node]]
name = "server"
address = "127.0.0.1"
inbound_port = $BENCH_IN_PORT

[[service]]
name = "bench"
node = "server"
address = "${BENCH_BACKEND%:*}"
port = ${BENCH_BACKEND##*:}
CATALOG
if [ -n "${SKYLINE_BENCH_PROTOCOL:-}" ]; then
  printf 'meta = { protocol = "%s" }\n' "$SKYLINE_BENCH_PROTOCOL" >>"$BENCH_DIR/catalog.toml"
fi

tls_config() { :; }
if [ -n "${SKYLINE_BENCH_TLS:-}" ]; then
  "$bin" ca init --dir "$BENCH_DIR/ca" >/dev/null
  for node in client server; do
    "$bin" ca issue --dir "$BENCH_DIR/ca" --kind node --name "$node" --ttl 2h --out "$BENCH_DIR/$node" >/dev/null
    printf '[tls]\nmode = "%s"\nca = "ca/ca.crt"\ncert = "%s.crt"\nkey = "%s.key"\n' \
      "$SKYLINE_BENCH_TLS" "$node" "$node" >"$BENCH_DIR/$node.toml"
  done
  tls_config() { echo --config "$BENCH_DIR/$1.toml"; }
fi

common=(--admin off --catalog file --catalog-file "$BENCH_DIR/catalog.toml" --workers "$workers")
SKYLINE_LOG=warn "$bin" agent $(tls_config client) --node-name client --outbound "127.0.0.1:$BENCH_OUT_PORT" --inbound off \
  "${common[@]}" >"$BENCH_DIR/skyline-outbound.log" 2>&1 &
echo $! >>"$BENCH_DIR/candidate.pids"
SKYLINE_LOG=warn "$bin" agent $(tls_config server) --node-name server --outbound off --inbound "127.0.0.1:$BENCH_IN_PORT" \
  "${common[@]}" >"$BENCH_DIR/skyline-inbound.log" 2>&1 &
echo $! >>"$BENCH_DIR/candidate.pids"
