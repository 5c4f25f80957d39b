//! Serving a connection on the express lane (see `proxy::express`) until a request needs hyper.
//!
//! The loop reads request heads straight from the socket, checks and parses each in one pass
//! by the framing guard's rules ([`HeadReader`]), and hands each HTTP/1.1 request, with its
//! body if it has one ([`ClientBody`]: `Content-Length` or chunked, read from the socket as it
//! is forwarded), to the role's [`Proxy::express`](super::Proxy::express). A request whose
//! body was not read to its end (refused, answered early, or cut off) closes the connection
//! after its answer. The first request the lane does not take (an upgrade, `Expect`, HTTP/1.0,
//! a refused head or chunk, or one the proxy declines) ends the loop: hyper, behind a framing
//! guard, serves the rest of the connection, starting with the bytes already read ([`Rewind`]),
//! so a refused head is answered exactly as without the express lane. A connection moves to
//! hyper at most once.

use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::{
    Answered, Conn, DRAIN_IDLE_GRACE, HEADER_READ_TIMEOUT, Handler, Recorder, access_line,
};
use crate::access::{AccessLog, Note};
use crate::http1::guard::{Body, HeadCheck, HeadProgress, HeadReader, Limits};
use crate::proxy::express::{
    BodyEnd, ClientBody, Head, Name, Verdict, connection_options, write_error,
};
use crate::proxy::request_id_bytes;

/// Header slots for a client's request head: the guard's limit, so every head it passes fits.
const MAX_HEADERS: usize = 100;

/// How the express lane left a connection.
pub(super) enum End {
    /// Finished: closed by either side, failed, or timed out.
    Closed,
    /// Hyper serves the rest (through a framing guard), starting with `rest`: bytes read and
    /// not used, from the first byte of a request head.
    Handoff { rest: Vec<u8> },
    /// The connection opened with HTTP/2's client preface (h2c with prior knowledge): hyper's
    /// HTTP/2 server serves it, starting with `rest` (the preface and what followed).
    Http2 { rest: Vec<u8> },
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
pub(super) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection say about HTTP/2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Preface {
    /// They are HTTP/2's client preface.
    Http2,
    /// They may still be: more bytes are needed to tell.
    Unsure,
    /// They are not (HTTP/1).
    No,
}

/// Tells HTTP/2 from HTTP/1 by the first bytes of a connection: one byte compared for nearly
/// every HTTP/1 request (only `P`, as in `POST` and `PUT`, looks further).
fn preface(buf: &[u8]) -> Preface {
    let n = buf.len().min(H2_PREFACE.len());
    if buf.first() != Some(&b'P') || buf[..n] != H2_PREFACE[..n] {
        Preface::No
    } else if n == H2_PREFACE.len() {
        Preface::Http2
    } else {
        Preface::Unsure
    }
}

/// What a connection's first bytes said, for a listener without the express lane.
pub(super) enum Sniffed {
    /// Closed (or the listener is shutting down) before a byte came.
    Closed,
    /// HTTP/1 (or bytes that are not HTTP/2's preface): the guard and hyper's HTTP/1 server
    /// take it, starting with `rest`.
    Http1 { rest: Vec<u8> },
    /// HTTP/2's client preface: hyper's HTTP/2 server takes it, starting with `rest`.
    Http2 { rest: Vec<u8> },
}

/// Reads a connection's first bytes until they tell HTTP/2's preface from HTTP/1, within
/// [`HEADER_READ_TIMEOUT`] (the express lane does the same as it reads the first head). A
/// connection silent until then is closed; on a timeout or a close after a few bytes, the
/// bytes go to HTTP/1, which answers or closes as it would have.
pub(super) async fn sniff<S: super::Io>(stream: &mut S, shutdown: &CancellationToken) -> Sniffed {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let timer = tokio::time::sleep(HEADER_READ_TIMEOUT);
    let mut timer = pin!(timer);
    loop {
        if !buf.is_empty() {
            match preface(&buf) {
                Preface::Http2 => return Sniffed::Http2 { rest: buf },
                Preface::No => return Sniffed::Http1 { rest: buf },
                Preface::Unsure => {}
            }
        }
        tokio::select! {
            biased;
            read = stream.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) if buf.is_empty() => return Sniffed::Closed,
                Ok(0) | Err(_) => return Sniffed::Http1 { rest: buf },
                Ok(_) => {}
            },
            () = shutdown.cancelled(), if buf.is_empty() => return Sniffed::Closed,
            () = timer.as_mut() => {
                // Silent all along: closed, as hyper's header read timeout would.
                if buf.is_empty() {
                    return Sniffed::Closed;
                }
                return Sniffed::Http1 { rest: buf };
            }
        }
    }
}

/// Serves `stream` on the express lane until it ends or a request needs hyper. The connection
/// was accepted at `opened`: its first head is due [`HEADER_READ_TIMEOUT`] after that.
pub(super) async fn serve<H: Handler, S: super::Io>(
    opened: tokio::time::Instant,
    stream: &mut S,
    handler: &H,
    conn: &mut Conn,
    recorder: Option<&Recorder>,
    draining: &AtomicBool,
    shutdown: &CancellationToken,
) -> End {
    let limits = Limits::default();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut cancelled = pin!(shutdown.cancelled());
    let mut drain_seen = false;
    // One timer for the connection's whole life, moved on lazily (see `read_head`).
    let mut deadline = opened + HEADER_READ_TIMEOUT;
    let mut timer = pin!(tokio::time::sleep_until(deadline));
    // Only a connection's first bytes can be HTTP/2's preface.
    let mut sniff = true;
    loop {
        let mut reader = HeadReader::new(limits);
        let wait = Wait {
            cancelled: cancelled.as_mut(),
            drain_seen: &mut drain_seen,
            timer: timer.as_mut(),
        };
        let read = read_head(stream, &mut buf, &mut reader, wait, deadline, &mut sniff);
        let end = match read.await {
            Read::Head(end) => end,
            Read::Http2 => return End::Http2 { rest: buf },
            Read::Refused => return End::Handoff { rest: buf },
            Read::Closed => return End::Closed,
        };
        conn.arrived = Instant::now();
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        // Checked and parsed in one pass; a refused head goes to the guard, which answers it.
        let HeadCheck::Valid { request, body } = reader.parse(&buf[..end], &mut slots) else {
            return End::Handoff { rest: buf };
        };
        let (Some(method), Some(target)) = (request.method, request.path) else {
            return End::Handoff { rest: buf };
        };
        let mut names = [Name::Other; MAX_HEADERS];
        for (slot, h) in names.iter_mut().zip(request.headers.iter()) {
            *slot = Name::of(h.name);
        }
        let names = &names[..request.headers.len()];
        let values = request.headers.iter().map(|h| h.value);
        // The client's request id, or one made for it here, sent on and logged.
        let made: [u8; 32];
        let request_id = match names.iter().position(|&n| n == Name::RequestId) {
            Some(i) => request.headers[i].value,
            None => {
                made = request_id_bytes();
                &made
            }
        };
        let head = Head {
            method,
            target,
            headers: request.headers,
            names,
            options: connection_options(names.iter().copied().zip(values)),
            request_id,
        };
        if !takes(&head, request.version) {
            return End::Handoff { rest: buf };
        }
        // The body's bytes that came with the head, and the socket for the rest.
        let after = &buf[end..];
        let (mut body, bytes_in) = match body {
            Body::None => (None, Some(0)),
            Body::Length(n) => (Some(ClientBody::length(stream, after, n)), Some(n)),
            // A chunk the guard refuses already: it answers, as without the express lane.
            Body::Chunked => match ClientBody::chunked(stream, after) {
                Ok(body) => (Some(body), None),
                Err(_) => return End::Handoff { rest: buf },
            },
        };
        let mut note = Note::default();
        let verdict = handler.express(&head, body.as_mut(), conn, &mut note).await;
        let BodyEnd {
            finished,
            early,
            rest,
        } = body.map_or_else(BodyEnd::none, ClientBody::end);
        // A body not read to its end leaves the connection unusable for the next request.
        let mut close =
            head.options.close || !finished || drain_seen || draining.load(Ordering::Relaxed);
        let record = |status: u16, error: Option<&str>| {
            if let Some(recorder) = recorder {
                recorder.record_status(status, error, note.label.as_ref(), conn.arrived);
            }
        };
        // Drawn before the answer is sent; written once it was (bytes and time to the end).
        let access = recorder.and_then(|r| Some((r.access.as_ref()?, r.role)));
        let drawn = access.is_some_and(|(log, _)| log.sampled());
        let log = |status: u16, error: Option<&str>, bytes_out: u64| {
            if let Some((log, role)) = access
                && AccessLog::keeps(drawn, status, error)
            {
                let answer = Answered {
                    status,
                    error,
                    bytes_in,
                    bytes_out,
                };
                access_line(log, role, &note, request_id, answer, conn.arrived);
            }
        };
        match verdict {
            Verdict::Decline => return End::Handoff { rest: buf },
            Verdict::Answer(mut answer) => {
                let (status, error) = (answer.status.as_u16(), answer.mesh_error.take());
                record(status, error.as_deref());
                let relayed = answer.relay(stream, close).await;
                log(status, error.as_deref(), *relayed.as_ref().unwrap_or(&0));
                if let Err(error) = relayed {
                    tracing::debug!(peer = %conn.peer, %error, "relaying an answer failed");
                    return End::Closed;
                }
            }
            Verdict::Error(error, service) => {
                let mut out = Vec::with_capacity(256);
                let error = write_error(&mut out, error, &service, close);
                let (status, code) = (error.status().as_u16(), error.code());
                record(status, Some(code));
                close |= error.closes();
                let written = stream.write_all(&out).await;
                let body = memchr::memmem::find(&out, b"\r\n\r\n").map_or(0, |i| out.len() - i - 4);
                log(
                    status,
                    Some(code),
                    if written.is_ok() { body as u64 } else { 0 },
                );
                if written.is_err() {
                    return End::Closed;
                }
            }
        }
        if close {
            let _ = stream.shutdown().await;
            return End::Closed;
        }
        buf.drain(..end + early);
        buf.extend_from_slice(&rest);
        deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
    }
}

/// Whether the express lane takes a request: HTTP/1.1, no upgrade, no `Expect`.
fn takes(head: &Head<'_>, version: Option<u8>) -> bool {
    if version != Some(1) || head.method == "CONNECT" {
        return false;
    }
    let mut names = head.names.iter();
    names.all(|name| !matches!(name, Name::Upgrade | Name::Expect))
}

/// What [`read_head`] got.
enum Read {
    /// `buf` starts with a whole head of this many bytes.
    Head(usize),
    /// `buf` starts with a head the framing guard refuses (it need not be whole).
    Refused,
    /// The connection ended first: closed, failed, or timed out.
    Closed,
    /// `buf` starts with HTTP/2's client preface.
    Http2,
}

/// How long [`read_head`] waits: the connection's shutdown signal and its timer.
struct Wait<'a, 'c> {
    cancelled: Pin<&'a mut tokio_util::sync::WaitForCancellationFuture<'c>>,
    drain_seen: &'a mut bool,
    timer: Pin<&'a mut tokio::time::Sleep>,
}

/// Reads until `buf` starts with a whole request head, checking each piece once as it arrives
/// (a client sending its head a byte at a time costs linear work, not quadratic).
///
/// The next head must be whole by `deadline` ([`HEADER_READ_TIMEOUT`] after the last answer, or
/// after the accept for the connection's first head), idle time included, as hyper's
/// `header_read_timeout` does: a client may not hold a connection open
/// without sending. Once the drain starts, an idle connection has [`DRAIN_IDLE_GRACE`]. The
/// connection's one timer is only moved when it fires early, so a request costs a clock read,
/// not a timer.
async fn read_head<S: super::Io>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    reader: &mut HeadReader,
    wait: Wait<'_, '_>,
    mut deadline: tokio::time::Instant,
    sniff: &mut bool,
) -> Read {
    let Wait {
        mut cancelled,
        drain_seen,
        mut timer,
    } = wait;
    loop {
        if *sniff && !buf.is_empty() {
            match preface(buf) {
                Preface::Http2 => return Read::Http2,
                Preface::No => *sniff = false,
                Preface::Unsure => {}
            }
        }
        if !*sniff && !buf.is_empty() {
            match reader.scan(buf) {
                HeadProgress::Ended(end) => return Read::Head(end),
                // Refused as soon as the guard would (a bare LF, say, or a head past the
                // limits), rather than after a blank line that may never come.
                HeadProgress::Refused(_) => return Read::Refused,
                HeadProgress::Incomplete => {}
            }
        }
        buf.reserve(4096);
        tokio::select! {
            biased;
            read = stream.read_buf(buf) => match read {
                Ok(0) | Err(_) => return Read::Closed,
                Ok(_) => {}
            },
            () = cancelled.as_mut(), if !*drain_seen => {
                *drain_seen = true;
                if buf.is_empty() {
                    deadline = deadline.min(tokio::time::Instant::now() + DRAIN_IDLE_GRACE);
                    timer.as_mut().reset(deadline);
                }
            }
            () = timer.as_mut() => {
                if tokio::time::Instant::now() >= deadline {
                    return Read::Closed;
                }
                // Set for an earlier wait: move it to this one's deadline.
                timer.as_mut().reset(deadline);
            }
        }
    }
}

/// A stream that first yields bytes already read from it: how hyper takes over a connection
/// from the express lane.
pub(super) struct Rewind<T> {
    rest: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Rewind<T> {
    pub(super) fn new(inner: T, rest: Vec<u8>) -> Self {
        Rewind {
            rest,
            pos: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.rest.len() {
            let n = (this.rest.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.rest[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.rest.len() {
                this.rest = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http2_preface_is_told_from_http1_requests_by_its_first_bytes() {
        assert_eq!(preface(H2_PREFACE), Preface::Http2);
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(b"\x00\x00\x12\x04");
        assert_eq!(preface(&more), Preface::Http2);
        for n in 1..H2_PREFACE.len() {
            assert_eq!(preface(&H2_PREFACE[..n]), Preface::Unsure, "{n} bytes");
        }
        for http1 in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\n",
            b"PUT",
            b"PRI * HTTP/1.1\r\n\r\n",
            b"PATCH / HTTP/1.1\r\n",
        ] {
            assert_eq!(preface(http1), Preface::No, "{http1:?}");
        }
    }
}
