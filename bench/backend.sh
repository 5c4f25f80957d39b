# Sourced by bench/instructions.sh, bench/rss-breakdown.sh and bench/symbol-order.sh: the pieces
# they share around mesh-bench's two hops (bench/candidate-up.sh).
#
# backend_up WORK BODY: an NGINX on 127.0.0.1:19000 (CPU 1) answering every request with BODY
# bytes, its files in WORK; its pid is added to the caller's `pids`. The body is a `return`
# string, as in mesh-bench.sh, and NGINX refuses a configuration token of 4 KiB or more: BODY is
# at most 4080 (mesh-bench's `--body 4080`). The backend is checked to answer with BODY bytes
# before anything is measured (a backend that did not start would be measured as errors).
backend_up() {
  local work="$1" body="$2"
  if [ "$body" -gt 4080 ]; then
    echo "backend_up: a body of $body bytes is over NGINX's 4080 for a 'return' string" >&2
    return 1
  fi
  printf 'worker_processes 1; daemon off; pid %s/b.pid; error_log stderr error;\nevents { worker_connections 1024; }\n' "$work" >"$work/backend.conf"
  printf 'http { access_log off; keepalive_requests 10000000; client_body_temp_path %s/cb; proxy_temp_path %s/pt; fastcgi_temp_path %s/ft; uwsgi_temp_path %s/ut; scgi_temp_path %s/st;\n' \
    "$work" "$work" "$work" "$work" "$work" >>"$work/backend.conf"
  echo "server { listen 127.0.0.1:19000; location / { return 200 \"$(head -c "$body" /dev/zero | tr '\0' x)\"; } } }" >>"$work/backend.conf"
  taskset -c 1 nginx -e stderr -p "$work/" -c "$work/backend.conf" 2>/dev/null & pids+=($!)
  local got=""
  for _ in $(seq 50); do
    got="$(curl -s http://127.0.0.1:19000/ | wc -c)" && [ "$got" = "$body" ] && return 0
    sleep 0.1
  done
  echo "backend_up: the backend on 127.0.0.1:19000 answered $got bytes, not $body" >&2
  return 1
}

# post_script FILE SIZE: a wrk script that POSTs SIZE bytes.
post_script() {
  printf 'wrk.method = "POST"\nwrk.body = string.rep("x", %d)\nwrk.headers["Content-Type"] = "application/octet-stream"\n' \
    "$2" >"$1"
}
