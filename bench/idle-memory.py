#!/usr/bin/env python3
"""Memory per client connection, as a user with many callers meets it.

Starts `skyline up` (the binary given by --skyline, default target/release/skyline: an agent
with the registry and the demo services in one process) and, for comparison, the same two hops
in NGINX (outbound, inbound, and an NGINX as the application), each on its own ports. For each, opens 1,000, 5,000 and 10,000 keep-alive connections and leaves them idle, then
sends one request on 2,000 of them, and reads the RSS (VmRSS of the process and its children)
after each step. Prints KiB per connection: (RSS with N open − RSS with none) / N.

Usage: bench/idle-memory.py [--skyline PATH] [--no-nginx] [--rounds N]
With --rounds N (default 3) the whole measurement is made N times, each server started afresh,
alternating Skyline and NGINX, and the medians of the figure after a request are printed last:
NGINX's own figure moves by about ±2 KiB from one run to the next.
Skyline closes a connection that sends no whole request head within 10 s (as hyper's
header_read_timeout does), so each step is measured within a few seconds of opening. The
reading after the requests waits until RSS has been still for 1.5 s (at most 4 s).
"""
import argparse, os, resource, shutil, socket, statistics, subprocess, sys, tempfile, time

STEPS = (1000, 5000, 10000)
AFTER = 2000


def rss_kib(pid):
    """VmRSS of `pid` (or of each of a list of pids) and its children, in KiB."""
    total = 0
    pids = list(pid) if isinstance(pid, list) else [pid]
    try:
        for parent in list(pids):
            out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True,
                                 text=True).stdout
            pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def settle(pid, quiet=0.1, limit=3.0):
    """RSS once it has not moved for `quiet` seconds (read every 0.1 s; bounded by `limit`)."""
    last, still = rss_kib(pid), 0.0
    for _ in range(int(limit * 10)):
        time.sleep(0.1)
        now = rss_kib(pid)
        still = still + 0.1 if now == last else 0.0
        last = now
        if still >= quiet - 1e-9:
            break
    return last


def wait_port(port, deadline=30):
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port}")


def measure(name, pid, port, path):
    conns = []
    base = settle(pid)
    rows = []
    for n in STEPS:
        while len(conns) < n:
            s = socket.create_connection(("127.0.0.1", port))
            conns.append(s)
        rss = settle(pid)
        rows.append((f"{n} idle", rss, (rss - base) / n))
    req = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    for s in conns[:AFTER]:
        s.sendall(req)
    for s in conns[:AFTER]:
        s.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    # Skyline drops a quiet connection's request state 1 s after its answer
    # (`serve::lane::REST_AFTER`); NGINX frees it at once. Read once RSS has been still for 1.5 s.
    rss = settle(pid, quiet=1.5, limit=4.0)
    n = len(conns)
    rows.append((f"{n} open, {AFTER} after a request", rss, (rss - base) / n))
    idle = rows[-2][1]
    extra = (rss - idle) / AFTER
    for s in conns:
        s.close()
    print(f"{name}: RSS with no client connection {base / 1024:.1f} MiB")
    for what, rss, per in rows:
        print(f"  {what:<32} RSS {rss / 1024:7.1f} MiB   {per:5.2f} KiB per connection")
    print(f"  each connection that made a request costs {extra:.1f} KiB more than an idle one "
          f"(with the upstream connections the {AFTER} concurrent requests opened)")
    return extra


def main():
    ap = argparse.ArgumentParser()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--skyline", default=os.path.join(root, "target/release/skyline"))
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for the clients' sockets and, in the proxy, theirs plus the upstream connections.
    want = hard if hard != resource.RLIM_INFINITY else 4 * max(STEPS)
    if want < 2 * max(STEPS):
        sys.exit(f"the open-file limit ({hard}) is too low for {max(STEPS)} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    figures = {"skyline up": [], "nginx": []}
    for n in range(args.rounds):
        print(f"round {n + 1} of {args.rounds}")
        sky, ng = one_round(args, want, hard)
        figures["skyline up"].append(sky)
        if ng is not None:
            figures["nginx"].append(ng)
    print("after a request, KiB more than an idle connection, per round and median:")
    for name, values in figures.items():
        if values:
            median = statistics.median(values)
            rounds = ", ".join(f"{v:.1f}" for v in values)
            print(f"  {name:<11} {rounds}  median {median:.1f}")


def one_round(args, want, hard):
    """Skyline, then NGINX (unless --no-nginx): each one's KiB after a request, or None."""
    nginx = None
    work = tempfile.mkdtemp(prefix="skyline-idle-")
    procs = []
    try:
        # The proxy process gets the file descriptors it needs, too.
        pre = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        sky = subprocess.Popen(
            [args.skyline, "up", "--dir", os.path.join(work, "up"), "--outbound",
             "127.0.0.1:15040", "--inbound", "127.0.0.1:15041", "--admin", "off",
             "--registry", "127.0.0.1:18500"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "up.log"), "w"),
            preexec_fn=pre)
        procs.append(sky)
        wait_port(15040)
        time.sleep(1)  # the demo services register
        skyline = measure("skyline up", sky.pid, 15040, "/service/hello/")
        if not args.no_nginx and shutil.which("nginx"):
            # The same two hops in NGINX: outbound :15140 -> inbound :15141 -> an application
            # (a third NGINX answering "hello"), as mesh-bench.sh sets them up; RSS of all three.
            hops = [("app", 15142, None), ("in", 15141, 15142), ("out", 15140, 15141)]
            pids = []
            for name, port, upstream in hops:
                conf = os.path.join(work, f"{name}.conf")
                if upstream:
                    where = (f"location / {{ proxy_pass http://up; proxy_http_version 1.1; "
                             f"proxy_set_header Connection \"\"; }}")
                    pool = f"upstream up {{ server 127.0.0.1:{upstream}; keepalive 1024; }}"
                else:
                    where, pool = 'location / { return 200 "hello"; }', ""
                with open(conf, "w") as f:
                    f.write(f"""worker_processes 1; daemon off; pid {work}/{name}.pid; error_log stderr error;
worker_rlimit_nofile {want};
events {{ worker_connections {want}; }}
http {{ access_log off; client_body_temp_path {work}/cb-{name}; proxy_temp_path {work}/pt-{name};
fastcgi_temp_path {work}/ft-{name}; uwsgi_temp_path {work}/ut-{name}; scgi_temp_path {work}/st-{name};
{pool} server {{ listen 127.0.0.1:{port}; {where} }} }}
""")
                ng = subprocess.Popen(["nginx", "-e", "stderr", "-p", work + "/", "-c", conf],
                                      stderr=subprocess.DEVNULL, preexec_fn=pre)
                procs.append(ng)
                pids.append(ng.pid)
                wait_port(port)
            nginx = measure("nginx, two hops and the application", pids, 15140, "/service/hello/")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    return skyline, nginx


if __name__ == "__main__":
    main()
