#!/usr/bin/env bash
# Writes build/symbol-order.txt: the functions of the release binary that a hop runs, from start-up
# through GET, POST 1 KiB and POST 64 KiB loads on mesh-bench's two hops, hottest first. The
# release link (build.rs) hands the file to the linker (lld's --symbol-ordering-file), which puts
# these functions first and together in .text: the kernel maps a binary's code in 64 KiB windows
# around each page a process touches (fault-around), so code that runs, scattered over the 13 MB
# of .text, kept most of it resident in every hop (docs/benchmarks.md, "Resident memory").
#
# Usage: bench/symbol-order.sh [binary, default target/release/skyline] [out, default
# build/symbol-order.txt]. Run it on a release build and rebuild; names missing from a later
# build (the file goes stale as code changes) are skipped by the linker, so a stale file costs
# memory, never correctness. Needs valgrind, nginx, wrk, curl (scripts/install-deps bench).
# KEEP_PROFILES=<dir> keeps the callgrind files there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$(realpath "${1:-$root/target/release/skyline}")"
out="${2:-$root/build/symbol-order.txt}"
work="$(mktemp -d)"; pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; sleep 0.3; rm -rf "$work"; }
trap cleanup EXIT

source "$root/bench/backend.sh"
backend_up "$work" 64

# Mangled names (--demangle=no): the linker matches symbols, not what they demangle to.
cat >"$work/skyline" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --demangle=no --compress-strings=no --compress-pos=no --dump-instr=no --callgrind-out-file=$work/cg.%p "$bin" "\$@"
WRAP
chmod +x "$work/skyline"
BENCH_DIR="$work" BENCH_BACKEND=127.0.0.1:19000 BENCH_OUT_PORT=5040 BENCH_IN_PORT=5041 \
  SKYLINE_BIN="$work/skyline" taskset -c 0 bash "$root/bench/candidate-up.sh"
mapfile -t agents <"$work/candidate.pids"; pids+=("${agents[@]}")
for _ in $(seq 150); do curl -sf -o /dev/null http://127.0.0.1:5040/service/bench/ && break; sleep 0.2; done
url=http://127.0.0.1:5040/service/bench/
taskset -c 1 wrk -t1 -c64 -d3s "$url" >/dev/null
for size in 1024 65536; do
  post_script "$work/post.lua" "$size"
  taskset -c 1 wrk -t1 -c64 -d3s -s "$work/post.lua" "$url" >/dev/null
done
# SIGTERM: the agents stop cleanly and callgrind writes its files at exit.
kill -TERM "${agents[@]}"
for _ in $(seq 100); do
  alive=0; for p in "${agents[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break; sleep 0.2
done

[ -n "${KEEP_PROFILES:-}" ] && mkdir -p "$KEEP_PROFILES" && cp "$work"/cg.* "$KEEP_PROFILES"/
# Self cost per function, summed over both hops; only names the binary defines.
nm --defined-only "$bin" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u >"$work/defined"
python3 - "$work/defined" "$out" "$work"/cg.* <<'PY'
import collections, sys
defined = set(open(sys.argv[1]).read().split())
cost = collections.Counter()
for path in sys.argv[3:]:
    fn, skip = None, False
    for line in open(path, errors="replace"):
        if line.startswith("fn="):
            fn, skip = line[3:].strip(), False
        elif line.startswith("calls="):
            skip = True  # the next cost line is a call's inclusive cost, not fn's own
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
                continue
            parts = line.split()
            if fn and len(parts) >= 2 and parts[1].isdigit():
                cost[fn] += int(parts[1])
names = [n for n, _ in sorted(cost.items(), key=lambda kv: -kv[1]) if n in defined]
with open(sys.argv[2], "w") as f:
    f.write("".join(n + "\n" for n in names))
print(f"{len(names)} functions ran ({len(cost)} names in the profiles) -> {sys.argv[2]}")
PY
