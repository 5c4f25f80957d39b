#!/usr/bin/env bash
# The ceiling of any proxy on the socket interface on this machine: mesh-bench's two hops run
# by bench/relay-floor.c (one read() and one write() per message, no HTTP, no routing; see its
# header) as the candidate, against NGINX in the same run. Skyline's ratio to NGINX cannot
# exceed the relay's by much: whatever the relay leaves is the kernel's share.
# Usage: bench/floor.sh [repeats, default 5] [seconds, default 10] [mesh-bench options, e.g. --post 1024]
#        bench/floor.sh cpu [seconds, default 6] [repeats, default 3]: bench/cpu-cost.sh's figures
#        (CPU per request split user/kernel, system calls, segments) for NGINX and the relay
# FLOOR=mux: bench/mux-floor.c instead, the same least hop with the link between the two hops
# multiplexed (every client connection a stream on one connection, frames written per batch).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cpu=""
if [ "${1:-}" = cpu ]; then cpu=1; shift; fi
first="${1:-}" second="${2:-}"
repeats="${first:-5}" secs="${second:-10}"
shift $(( $# > 2 ? 2 : $# ))
bench="${MESH_BENCH:-$root/../shared/bench/mesh-bench.sh}"
"$root/scripts/install-deps" bench
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
up="$work/relay-up.sh"
if [ "${FLOOR:-relay}" = mux ]; then
  cc -O2 -Wall -o "$work/mux-floor" "$root/bench/mux-floor.c"
  cat >"$up" <<UP
"$work/mux-floor" out \$BENCH_OUT_PORT \$BENCH_IN_PORT & echo \$! >>"\$BENCH_DIR/candidate.pids"
"$work/mux-floor" in \$BENCH_IN_PORT \${BENCH_BACKEND##*:} & echo \$! >>"\$BENCH_DIR/candidate.pids"
UP
else
  cc -O2 -Wall -o "$work/relay-floor" "$root/bench/relay-floor.c"
  cat >"$up" <<UP
"$work/relay-floor" \$BENCH_OUT_PORT \$BENCH_IN_PORT & echo \$! >>"\$BENCH_DIR/candidate.pids"
"$work/relay-floor" \$BENCH_IN_PORT \${BENCH_BACKEND##*:} & echo \$! >>"\$BENCH_DIR/candidate.pids"
UP
fi
if [ -n "$cpu" ]; then
  CANDIDATE_SCRIPT="$up" bash "$root/bench/cpu-cost.sh" "${first:-6}" "${second:-3}"
  exit
fi
CANDIDATE_UP="bash $up" bash "$bench" --modes nginx,candidate --repeat "$repeats" --duration "$secs" "$@" \
  >"$work/summary" 2>"$work/runs" || { cat "$work/runs" >&2; exit 1; }
python3 - "$work/summary" "$work/runs" "${FLOOR:-relay}" <<'PY'
import json, sys
label = f"{sys.argv[3]} floor"
medians = {r["mode"]: r for r in map(json.loads, open(sys.argv[1]))}
runs = [json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")]
by = lambda mode: {r["repeat"]: r["rps"] for r in runs if r["mode"] == mode}
nginx, floor = by("nginx"), by("candidate")
per = ", ".join(f"{floor[k] / nginx[k]:.2f}" for k in sorted(nginx) if nginx[k] and k in floor)
n, f = medians["nginx"], medians["candidate"]
print(f"NGINX {n['rps']:,.0f} rps p99 {n['p99_ms']} ms; {label} {f['rps']:,.0f} rps p99 {f['p99_ms']} ms;"
      f" {label}/NGINX {f['rps'] / n['rps']:.2f}x (per repeat: {per})")
PY
