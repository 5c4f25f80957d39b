//! Serving a connection on the express lane (see `proxy::express`) until a request needs hyper.
//!
//! The loop reads request heads through the framing guard, so it sees only bytes the guard
//! validated, and hands each body-less HTTP/1.1 request to the role's [`Proxy::express`](super::Proxy::express). The
//! first request it does not take (a body, an upgrade, `Expect`, HTTP/1.0, a refused head, or
//! one the proxy declines) ends the loop: hyper serves the rest of the connection, starting
//! with the bytes already read ([`Rewind`]). A connection moves to hyper at most once.

use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::guard::Guarded;
use super::{Conn, DRAIN_IDLE_GRACE, HEADER_READ_TIMEOUT, Handler, Recorder};
use crate::proxy::express::{Head, Name, Verdict, connection_options, head_end, write_error};

/// Header slots for a client's request head: the guard's limit, so every head it passes fits.
const MAX_HEADERS: usize = 100;

/// How the express lane left a connection.
pub(super) enum End {
    /// Finished: closed by either side, failed, or timed out.
    Closed,
    /// Hyper serves the rest, starting with `rest` (read and not used); its first request is
    /// request number `index` of the connection.
    Handoff { rest: Vec<u8>, index: u64 },
}

/// Serves `io` on the express lane until it ends or a request needs hyper.
pub(super) async fn serve<H: Handler>(
    io: &mut Guarded<TcpStream>,
    handler: &H,
    conn: &mut Conn,
    recorder: Option<&Recorder>,
    draining: &AtomicBool,
    shutdown: &CancellationToken,
) -> End {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut index = 0u64;
    let mut cancelled = pin!(shutdown.cancelled());
    let mut drain_seen = false;
    loop {
        let end = match read_head(io, &mut buf, cancelled.as_mut(), &mut drain_seen).await {
            Some(end) => end,
            None => return End::Closed,
        };
        conn.arrived = Instant::now();
        conn.index = index;
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut slots);
        let parsed =
            matches!(req.parse(&buf[..end]), Ok(httparse::Status::Complete(n)) if n == end);
        let (Some(method), Some(target), true) = (req.method, req.path, parsed) else {
            return End::Handoff { rest: buf, index };
        };
        let mut names = [Name::Other; MAX_HEADERS];
        for (slot, h) in names.iter_mut().zip(req.headers.iter()) {
            *slot = Name::of(h.name);
        }
        let names = &names[..req.headers.len()];
        let values = req.headers.iter().map(|h| h.value);
        let head = Head {
            method,
            target,
            headers: req.headers,
            names,
            options: connection_options(names.iter().copied().zip(values)),
        };
        if !takes(&head, req.version) || conn.verdicts.rejection_for(index).is_some() {
            return End::Handoff { rest: buf, index };
        }
        let mut label = None;
        let verdict = handler.express(&head, conn, &mut label).await;
        let mut close = head.options.close || drain_seen || draining.load(Ordering::Relaxed);
        let record = |status: u16, error: Option<&str>| {
            if let Some(recorder) = recorder {
                recorder.record_status(status, error, label.as_ref(), conn.arrived);
            }
        };
        match verdict {
            Verdict::Decline => return End::Handoff { rest: buf, index },
            Verdict::Answer(answer) => {
                record(answer.status.as_u16(), answer.mesh_error.as_deref());
                if let Err(error) = answer.relay(io, close).await {
                    tracing::debug!(peer = %conn.peer, %error, "relaying an answer failed");
                    return End::Closed;
                }
            }
            Verdict::Error(error, service) => {
                let mut out = Vec::with_capacity(256);
                let error = write_error(&mut out, error, &service, close);
                record(error.status().as_u16(), Some(error.code()));
                close |= matches!(error, crate::proxy::MeshError::BadRequest { .. });
                if io.write_all(&out).await.is_err() {
                    return End::Closed;
                }
            }
        }
        if close {
            let _ = io.shutdown().await;
            return End::Closed;
        }
        buf.drain(..end);
        index += 1;
    }
}

/// Whether the express lane takes a request: HTTP/1.1, no body, no upgrade, no `Expect`.
fn takes(head: &Head<'_>, version: Option<u8>) -> bool {
    if version != Some(1) || head.method == "CONNECT" {
        return false;
    }
    let mut headers = head.headers.iter().zip(head.names);
    headers.all(|(h, name)| match name {
        Name::ContentLength => h.value == b"0",
        Name::TransferEncoding | Name::Upgrade | Name::Expect => false,
        _ => true,
    })
}

/// Reads until `buf` holds a whole head and returns its length; `None` when the connection
/// ends first: closed, failed, slow (a started head has [`HEADER_READ_TIMEOUT`]), or idle after
/// the drain started (for [`DRAIN_IDLE_GRACE`]).
async fn read_head(
    io: &mut Guarded<TcpStream>,
    buf: &mut Vec<u8>,
    mut cancelled: Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    drain_seen: &mut bool,
) -> Option<usize> {
    // Armed at the first byte of a head (an idle keep-alive connection may wait), or when the
    // drain starts.
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        if let Some(end) = head_end(buf) {
            return Some(end);
        }
        if !buf.is_empty() && timer.is_none() {
            timer = Some(Box::pin(tokio::time::sleep(HEADER_READ_TIMEOUT)));
        }
        buf.reserve(4096);
        let expired = async {
            match timer.as_mut() {
                Some(t) => t.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            read = io.read_buf(buf) => match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
            () = cancelled.as_mut(), if !*drain_seen => {
                *drain_seen = true;
                if buf.is_empty() {
                    timer = Some(Box::pin(tokio::time::sleep(DRAIN_IDLE_GRACE)));
                }
            }
            () = expired => return None,
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
