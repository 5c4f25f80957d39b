//! A connection's lanes. A handler may serve a connection on its own HTTP/1.1 lane first
//! ([`Handler::lane`](super::Handler::lane); the proxies' express lane is
//! `proxy::express::connection`) until it ends ([`End::Closed`]) or hands the connection to
//! hyper ([`End::Handoff`]), behind a framing guard, starting with the bytes already read
//! ([`Rewind`]), so a refused head is answered exactly as without the lane. A connection that
//! opens with HTTP/2's preface goes to hyper's HTTP/2 server ([`End::Http2`], [`sniff`]).
//!
//! On a plain TCP connection the lane also stops between requests ([`End::Rest`]) once the
//! connection has waited [`REST_AFTER`] with nothing read (at once in a crowd, [`CROWD`]): the
//! serve layer waits for the next request's bytes holding only the socket and its timers, and
//! then serves the connection on the lane again. The lane's state (its read buffer, the
//! request's parse and the proxy's exchange, several KiB) is held by busy connections only, so
//! a keep-alive connection that made requests and went quiet weighs what one that made none
//! does, and a busy one pays no allocation per request for it.

use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::{Conn, HEADER_READ_TIMEOUT, Recorder};

/// What a handler's own lane is given to serve a connection with: the stream (accepted at
/// `opened`), the connection's facts, what records requests, and the drain's signals.
pub struct Lane<'a, S> {
    /// When the connection was accepted, or (after [`End::Rest`]) when its last answer went:
    /// the next request head is due [`HEADER_READ_TIMEOUT`] after.
    pub opened: tokio::time::Instant,
    /// Whether these are the connection's first bytes (only those can be HTTP/2's preface).
    pub first: bool,
    /// When the lane may stop between requests ([`End::Rest`]): how many of the listener's
    /// connections hold a lane's state now (this one included).
    pub held: Option<&'a AtomicUsize>,
    pub stream: &'a mut S,
    pub conn: &'a mut Conn,
    pub recorder: Option<&'a Recorder>,
    pub draining: &'a AtomicBool,
    pub shutdown: &'a CancellationToken,
}

/// How long a connection waits for its next request on the lane, its state kept, before it
/// rests ([`End::Rest`]). A connection busier than this pays nothing for resting; its lane
/// looks at the time once per this period.
pub const REST_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Past this many connections holding a lane's state on one listener, a connection rests right
/// after an answer that leaves nothing of a next request read. A burst of callers then reuses
/// the memory of the requests before it instead of holding one state each until
/// [`REST_AFTER`] (and the allocator keeps a peak's heap resident after it); below it, busy
/// connections keep their state and pay nothing per request.
pub const CROWD: usize = 256;

/// How a handler's lane left a connection.
pub enum End {
    /// Finished: closed by either side, failed, or timed out.
    Closed,
    /// Nothing of a next request came within [`REST_AFTER`] of the last answer (at `since`),
    /// or at once when more than [`CROWD`] connections hold a lane's state: the caller waits
    /// for the next bytes, then serves the connection on the lane again (only when
    /// [`Lane::held`] is given).
    Rest { since: tokio::time::Instant },
    /// Hyper serves the rest (through a framing guard), starting with `rest`: bytes read and
    /// not used, from the first byte of a request head.
    Handoff { rest: Vec<u8> },
    /// The connection opened with HTTP/2's client preface (h2c with prior knowledge): hyper's
    /// HTTP/2 server serves it, starting with `rest` (the preface and what followed).
    Http2 { rest: Vec<u8> },
    /// The connection opened with the preface of Skyline's multiplexed peer link
    /// ([`crate::mux`]): a mesh listener serves its streams, starting with `rest` (the preface
    /// and what followed).
    Mux { rest: Vec<u8> },
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection say about HTTP/2 and the mesh link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preface {
    /// They are HTTP/2's client preface.
    Http2,
    /// They are the preface of Skyline's multiplexed peer link ([`crate::mux::PREFACE`]).
    Mux,
    /// They may still be either: more bytes are needed to tell.
    Unsure,
    /// They are neither (HTTP/1).
    No,
}

/// Tells HTTP/2 and the mesh link from HTTP/1 by the first bytes of a connection: one byte
/// compared for nearly every HTTP/1 request (only `P`, as in `POST` and `PUT`, looks further).
pub fn preface(buf: &[u8]) -> Preface {
    if buf.first() != Some(&b'P') {
        return Preface::No;
    }
    for (known, found) in [
        (&H2_PREFACE[..], Preface::Http2),
        (crate::mux::PREFACE, Preface::Mux),
    ] {
        let n = buf.len().min(known.len());
        if buf[..n] == known[..n] {
            return if n == known.len() {
                found
            } else {
                Preface::Unsure
            };
        }
    }
    Preface::No
}

/// What a connection's first bytes said, for a listener without the express lane.
pub enum Sniffed {
    /// Closed (or the listener is shutting down) before a byte came.
    Closed,
    /// HTTP/1 (or bytes that are not HTTP/2's preface): the guard and hyper's HTTP/1 server
    /// take it, starting with `rest`.
    Http1 { rest: Vec<u8> },
    /// HTTP/2's client preface: hyper's HTTP/2 server takes it, starting with `rest`.
    Http2 { rest: Vec<u8> },
    /// The mesh link's preface: a mesh listener serves the link, starting with `rest`.
    Mux { rest: Vec<u8> },
}

/// Reads a connection's first bytes until they tell HTTP/2's preface from HTTP/1, within
/// [`HEADER_READ_TIMEOUT`] (the express lane does the same as it reads the first head). A
/// connection silent until then is closed; on a timeout or a close after a few bytes, the
/// bytes go to HTTP/1, which answers or closes as it would have.
pub async fn sniff<S: super::Io>(stream: &mut S, shutdown: &CancellationToken) -> Sniffed {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let timer = tokio::time::sleep(HEADER_READ_TIMEOUT);
    let mut timer = pin!(timer);
    loop {
        if !buf.is_empty() {
            match preface(&buf) {
                Preface::Http2 => return Sniffed::Http2 { rest: buf },
                Preface::Mux => return Sniffed::Mux { rest: buf },
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

/// A stream that first yields bytes already read from it: how hyper takes over a connection
/// from the express lane.
pub struct Rewind<T> {
    rest: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(inner: T, rest: Vec<u8>) -> Self {
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
