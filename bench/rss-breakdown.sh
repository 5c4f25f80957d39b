#!/usr/bin/env bash
# Where a hop's memory goes under mesh-bench's load: the two hops of bench/candidate-up.sh (one
# worker each) behind a backend NGINX on :19000, loaded by wrk (-t1 -c64, as mesh-bench.sh) for a
# few seconds; then, per hop, VmRSS, the threads, and the resident KiB of each kind of mapping
# from /proc/<pid>/smaps (the binary's file pages, [heap], anonymous mappings such as thread
# stacks and glibc's per-thread malloc arenas, other files), read while the connections are still
# open (wrk's keep-alive connections and the pooled upstream ones).
#
# Usage: bench/rss-breakdown.sh [binary, default target/release/skyline] [seconds, default 5]
# With POST=<bytes>, the load is POSTs with a body of that many bytes (as mesh-bench's --post);
# with BODY=<bytes>, the backend answers that many bytes (as --body).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$(realpath "${1:-$root/target/release/skyline}")"
secs="${2:-5}"
body="${BODY:-64}"
work="$(mktemp -d)"; pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; sleep 0.3; rm -rf "$work"; }
trap cleanup EXIT

source "$root/bench/backend.sh"
backend_up "$work" "$body"

load=()
if [ "${POST:-0}" -gt 0 ]; then
  post_script "$work/post.lua" "$POST"
  load=(-s "$work/post.lua")
fi

BENCH_DIR="$work" BENCH_BACKEND=127.0.0.1:19000 BENCH_OUT_PORT=5040 BENCH_IN_PORT=5041 \
  SKYLINE_BIN="$bin" taskset -c 0 bash "$root/bench/candidate-up.sh"
mapfile -t agents <"$work/candidate.pids"; pids+=("${agents[@]}")
for _ in $(seq 150); do curl -sf -o /dev/null http://127.0.0.1:5040/service/bench/ && break; sleep 0.2; done
for p in "${agents[@]}"; do echo "hop $p at start: $(awk '/^VmRSS/ {print $2" "$3}' "/proc/$p/status")"; done

# The breakdown is read from a second wrk connection set kept open: a wrk run of $secs seconds,
# sampled one second before it ends.
taskset -c 1 wrk -t1 -c64 -d"${secs}s" "${load[@]}" http://127.0.0.1:5040/service/bench/ >"$work/wrk.out" &
wrk_pid=$!; pids+=("$wrk_pid")
sleep "$((secs - 1))"
for p in "${agents[@]}"; do
  echo "== hop $p: $(tr '\0' ' ' <"/proc/$p/cmdline" | grep -o -- '--\(out\|in\)bound 127[^ ]*')"
  grep -E '^(VmRSS|RssAnon|RssFile|Threads|VmHWM)' "/proc/$p/status" | tr -s ' \t' ' ' | paste -sd ' '
  # Pss: the binary's and the libraries' file pages shared by the two hops count half in each.
  grep -E '^(Pss|Pss_Anon|Pss_File):' "/proc/$p/smaps_rollup" | tr -s ' \t' ' ' | paste -sd ' '
  printf 'threads:'; for t in /proc/"$p"/task/*; do printf ' %s' "$(cat "$t/comm")"; done; echo
  # smaps: sum Rss by kind of mapping (the binary, libraries, anonymous by size and permissions).
  python3 - "$p" <<'PY'
import collections, re, sys
rss, size, kind = collections.Counter(), collections.Counter(), None
for line in open(f"/proc/{sys.argv[1]}/smaps"):
    m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
    if m:
        lo, hi, perm, name = m.groups()
        kib = (int(hi, 16) - int(lo, 16)) // 1024
        if "skyline" in name:
            kind = "binary " + perm
        elif name == "":
            kind = "anon %s %s" % (perm, "64 MiB arena" if kib >= 60000 else "2 MiB (stack)" if 2000 <= kib <= 2100 else "other")
        else:
            kind = name.split("/")[-1] + " " + perm
        size[kind] += kib
    elif line.startswith("Rss:"):
        rss[kind] += int(line.split()[1])
for k, v in sorted(rss.items(), key=lambda kv: -kv[1]):
    if v:
        print("  %-34s %7d KiB resident of %8d KiB" % (k, v, size[k]))
PY
done
wait "$wrk_pid" || true
grep -E 'Requests/sec|Socket errors|Non-2xx' "$work/wrk.out" || true
for p in "${agents[@]}"; do echo "hop $p after load: $(awk '/^VmRSS/ {print $2" "$3}' "/proc/$p/status")"; done
