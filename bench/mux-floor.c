/*
 * mux-floor: relay-floor.c's least hop, with the link between the two hops multiplexed: every
 * client connection of the outbound hop is a stream on one connection to the inbound hop, as
 * HTTP/2 between the proxies would carry it. It measures what a multiplexed peer link could
 * give a proxy at best (bench/floor.sh mux runs a pair as mesh-bench's candidate).
 *
 * One thread, one level-triggered epoll set per hop. A message is framed as an 8-byte header
 * (stream id, length; host byte order: both hops are on this machine) and its bytes; a frame of
 * length 0 closes the stream. Frames bound for the peer gather in one buffer while a batch of
 * epoll events is handled and go in one write() at its end; the peer's reads take whatever
 * frames have arrived. So the middle connection costs a read and a write per batch, not per
 * message. The ends are relay-floor's: one read() and one write() per message, each client (at
 * the outbound) and each stream (at the inbound, to the backend) with its own connection. No
 * HTTP, no routing, no flow control, no allocation per message.
 *
 * Not a proxy: its sockets block, a write waits until all is sent, and a closed side closes its
 * stream. Load it only with small messages over loopback, as mesh-bench does.
 *
 * usage: mux-floor out LISTEN_PORT INBOUND_PORT   (the outbound hop)
 *        mux-floor in LISTEN_PORT BACKEND_PORT    (the inbound hop; one outbound at a time)
 */
#include "floor.h"

#include <stdint.h>
#include <string.h>

#define HEAD 8

/* Outbound: a client fd is its stream id. Inbound: the backend fd of a stream, and back. */
static int stream_fd[MAX_FDS], stream_of[MAX_FDS];
static char buf[65536];
/* Frames for the peer, written at the end of each batch; bytes read from it, not yet framed. */
static char *out_q, *in_q;
static size_t out_len, out_cap, in_len, in_cap;

static void reserve(char **q, size_t *cap, size_t need) {
  if (need <= *cap) return;
  *cap = need * 2;
  *q = realloc(*q, *cap);
  if (!*q) abort();
}

static void write_all(int fd, const char *p, size_t len) {
  while (len > 0) {
    ssize_t w = write(fd, p, len);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    p += w;
    len -= (size_t)w;
  }
}

static void frame(uint32_t id, const char *p, uint32_t len) {
  reserve(&out_q, &out_cap, out_len + HEAD + len);
  memcpy(out_q + out_len, &id, 4);
  memcpy(out_q + out_len + 4, &len, 4);
  if (len > 0) memcpy(out_q + out_len + HEAD, p, len);
  out_len += HEAD + len;
}

static int dial(int port) {
  struct sockaddr_in to = loopback(port);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0 || fd >= MAX_FDS || connect(fd, (struct sockaddr *)&to, sizeof to)) {
    if (fd >= 0) close(fd);
    return -1;
  }
  nodelay(fd);
  return fd;
}

int main(int argc, char **argv) {
  if (argc != 4 || (strcmp(argv[1], "out") && strcmp(argv[1], "in"))) {
    fprintf(stderr, "usage: %s out|in LISTEN_PORT UPSTREAM_PORT\n", argv[0]);
    return 2;
  }
  int outbound = !strcmp(argv[1], "out"), upstream = atoi(argv[3]);
  int lfd = listen_on(atoi(argv[2]));
  if (lfd < 0) return 1;
  for (int i = 0; i < MAX_FDS; i++) stream_fd[i] = stream_of[i] = -1;
  int ep = epoll_create1(0), mux = -1;
  watch(ep, lfd);
  struct epoll_event events[256];
  for (;;) {
    int n = epoll_wait(ep, events, 256, -1);
    for (int i = 0; i < n; i++) {
      int fd = events[i].data.fd;
      if (fd == lfd) {
        int c = accept4(lfd, NULL, NULL, 0);
        if (c < 0) continue;
        if (c >= MAX_FDS) {
          close(c);
          continue;
        }
        nodelay(c);
        if (outbound) {
          /* The link to the inbound hop, opened with the first client (it may start later). */
          if (mux < 0 && (mux = dial(upstream)) >= 0) watch(ep, mux);
          if (mux < 0) {
            close(c);
            continue;
          }
          stream_fd[c] = c;
        } else {
          if (mux >= 0) close(mux); /* a new outbound: the old one is gone */
          mux = c;
          in_len = 0;
        }
        watch(ep, c);
        continue;
      }
      if (fd == mux) {
        reserve(&in_q, &in_cap, in_len + sizeof buf);
        ssize_t got = read(mux, in_q + in_len, sizeof buf);
        if (got <= 0) { /* the link is gone, and its streams with it */
          close(mux);
          mux = -1;
          in_len = 0;
          for (int s = 0; s < MAX_FDS; s++) {
            if (stream_fd[s] >= 0) close(stream_fd[s]);
            stream_fd[s] = stream_of[s] = -1;
          }
          continue;
        }
        in_len += (size_t)got;
        size_t at = 0;
        while (in_len - at >= HEAD) {
          uint32_t id, len;
          memcpy(&id, in_q + at, 4);
          memcpy(&len, in_q + at + 4, 4);
          if (in_len - at < HEAD + len) break;
          const char *p = in_q + at + HEAD;
          at += HEAD + len;
          if (id >= MAX_FDS) continue;
          int to = stream_fd[id];
          if (len == 0) { /* the stream closed */
            if (to >= 0) {
              close(to);
              stream_fd[id] = -1;
              if (!outbound) stream_of[to] = -1;
            }
            continue;
          }
          if (to < 0 && !outbound) { /* a new stream: its own backend connection */
            if ((to = dial(upstream)) < 0) continue;
            stream_fd[id] = to;
            stream_of[to] = (int)id;
            watch(ep, to);
          }
          if (to >= 0) write_all(to, p, len);
        }
        memmove(in_q, in_q + at, in_len - at);
        in_len -= at;
        continue;
      }
      /* A client (outbound) or a backend (inbound) connection: frame what it sent. */
      int id = outbound ? fd : stream_of[fd];
      if (id < 0 || stream_fd[id] != fd) continue; /* closed earlier in this batch */
      ssize_t got = read(fd, buf, sizeof buf);
      if (got <= 0) {
        close(fd);
        stream_fd[id] = -1;
        if (!outbound) stream_of[fd] = -1;
        frame((uint32_t)id, NULL, 0);
        continue;
      }
      frame((uint32_t)id, buf, (uint32_t)got);
    }
    /* The batch's frames for the peer, in one write. */
    if (out_len > 0 && mux >= 0) write_all(mux, out_q, out_len);
    out_len = 0;
  }
}
