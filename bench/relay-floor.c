/*
 * relay-floor: the least a proxy hop on the socket interface can do, to measure the ceiling
 * of any such proxy on a machine (bench/floor.sh runs two of them as mesh-bench's candidate).
 *
 * One thread, one level-triggered epoll set. Each accepted connection gets its own upstream
 * connection (opened once; wrk keeps its connections), and every readable event is one
 * read() into a 64 KiB buffer and one write() of what came to the other side: no HTTP parsing,
 * no routing, no header rewrite, no pool, no timers, no allocation per message. It relies on
 * the backend answering any path (mesh-bench's does) since it does not strip /service/bench.
 *
 * Not a proxy: its sockets block, so a write waits until all is sent, and a closed side closes
 * both. Load it only with small messages over loopback, as mesh-bench does.
 *
 * usage: relay-floor LISTEN_PORT UPSTREAM_PORT   (both on 127.0.0.1)
 */
#include "floor.h"

static int peer[MAX_FDS];
static char buf[65536];

static void close_pair(int fd) {
  int other = peer[fd];
  close(fd);
  close(other);
  peer[fd] = peer[other] = -1;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s LISTEN_PORT UPSTREAM_PORT\n", argv[0]);
    return 2;
  }
  struct sockaddr_in upstream = loopback(atoi(argv[2]));
  int lfd = listen_on(atoi(argv[1]));
  if (lfd < 0) return 1;
  int ep = epoll_create1(0);
  watch(ep, lfd);
  struct epoll_event events[256];
  for (;;) {
    int n = epoll_wait(ep, events, 256, -1);
    for (int i = 0; i < n; i++) {
      int fd = events[i].data.fd;
      if (fd == lfd) {
        int c = accept4(lfd, NULL, NULL, 0);
        if (c < 0) continue;
        int u = socket(AF_INET, SOCK_STREAM, 0);
        if (c >= MAX_FDS || u < 0 || u >= MAX_FDS ||
            connect(u, (struct sockaddr *)&upstream, sizeof upstream)) {
          close(c);
          if (u >= 0) close(u);
          continue;
        }
        nodelay(c);
        nodelay(u);
        peer[c] = u;
        peer[u] = c;
        watch(ep, c);
        watch(ep, u);
        continue;
      }
      if (peer[fd] < 0) continue; /* closed earlier in this batch */
      ssize_t got = read(fd, buf, sizeof buf);
      if (got <= 0) {
        close_pair(fd);
        continue;
      }
      for (ssize_t sent = 0; sent < got;) {
        ssize_t w = write(peer[fd], buf + sent, got - sent);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        sent += w;
      }
    }
  }
}
