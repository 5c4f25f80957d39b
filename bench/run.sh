#!/usr/bin/env bash
# Builds Skyline in release mode and runs the shared two-hop benchmark against NGINX and HAProxy.
#   bench/run.sh                      # throughput: --repeat 5, 64 connections
#   bench/run.sh --latency            # light closed-loop load for latency
# Extra arguments go to mesh-bench.sh. Needs: nginx haproxy wrk curl (scripts/install-deps).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench="${MESH_BENCH:-$root/../shared/bench/mesh-bench.sh}"
[ -x "$bench" ] || [ -f "$bench" ] || { echo "mesh-bench.sh not found at $bench (set MESH_BENCH)" >&2; exit 2; }
"$root/scripts/install-deps" bench
cargo build --release --manifest-path "$root/Cargo.toml"
export CANDIDATE_UP="bash $root/bench/candidate-up.sh"
exec bash "$bench" --modes direct,nginx,haproxy,candidate --repeat 5 "$@"
