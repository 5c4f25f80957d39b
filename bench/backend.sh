# Sourced by bench/instructions.sh, bench/rss-breakdown.sh and bench/symbol-order.sh: the pieces
# they share around mesh-bench's two hops (bench/candidate-up.sh).
#
# backend_up WORK BODY: an NGINX on 127.0.0.1:19000 (CPU 1) answering every request with BODY
# bytes, its files in WORK; its pid is added to the caller's `pids`.
backend_up() {
  local work="$1" body="$2"
  printf 'worker_processes 1; daemon off; pid %s/b.pid; error_log stderr error;\nevents { worker_connections 1024; }\n' "$work" >"$work/backend.conf"
  printf 'http { access_log off; keepalive_requests 10000000; client_body_temp_path %s/cb; proxy_temp_path %s/pt; fastcgi_temp_path %s/ft; uwsgi_temp_path %s/ut; scgi_temp_path %s/st;\n' \
    "$work" "$work" "$work" "$work" "$work" >>"$work/backend.conf"
  echo "server { listen 127.0.0.1:19000; location / { return 200 \"$(head -c "$body" /dev/zero | tr '\0' x)\"; } } }" >>"$work/backend.conf"
  taskset -c 1 nginx -e stderr -p "$work/" -c "$work/backend.conf" 2>/dev/null & pids+=($!)
}

# post_script FILE SIZE: a wrk script that POSTs SIZE bytes.
post_script() {
  printf 'wrk.method = "POST"\nwrk.body = string.rep("x", %d)\nwrk.headers["Content-Type"] = "application/octet-stream"\n' \
    "$2" >"$1"
}
