//! The express lane's connection loop: serving a connection (see [`super`]) until a request
//! needs hyper.
//!
//! The loop reads request heads straight from the socket, checks and parses each in one pass
//! by the framing guard's rules ([`HeadReader`]), and hands each HTTP/1.1 request, with its
//! body if it has one ([`ClientBody`]: `Content-Length` or chunked, read from the socket as it
//! is forwarded), to the proxy's [`Express::express`]. A request whose
//! body was not read to its end (refused, answered early, or cut off) closes the connection
//! after its answer. The first request the lane does not take (an upgrade, `Expect`, HTTP/1.0,
//! a refused head or chunk, or one the proxy declines) ends the loop: hyper, behind a framing
//! guard, serves the rest of the connection, starting with the bytes already read (`serve::lane::Rewind`),
//! so a refused head is answered exactly as without the express lane. A connection moves to
//! hyper at most once.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{BodyEnd, ClientBody, Head, Name, Verdict, connection_options, write_error};
use crate::access::{AccessLog, Note};
use crate::contract::request_id_bytes;
use crate::http1::guard::{Body, HeadCheck, HeadProgress, HeadReader, HeaderSlots, Limits};
use crate::serve::lane::{CROWD, End, Lane, Preface, REST_AFTER, preface};
use crate::serve::{Answered, Conn, DRAIN_IDLE_GRACE, HEADER_READ_TIMEOUT, Io, access_line};

/// A proxy that takes requests on the express lane.
pub trait Express: Send + Sync {
    /// The answer to a request given as its head and its body, if it has one. Declining must
    /// come before anything with an effect, the body untouched: hyper's path then serves the
    /// request.
    fn express(
        &self,
        head: &Head<'_>,
        body: Option<&mut ClientBody<'_>>,
        conn: &Conn,
        note: &mut Note,
    ) -> impl Future<Output = Verdict> + Send;
}

/// The read buffer a connection starts with, and the least room a read is given: a request
/// head (and a small body that came with it) fits; a longer head doubles it. A connection holds
/// its buffer while a request is under way (a TLS one, which does not rest, for its life), so
/// it is kept to what a request needs.
const HEAD_READ: usize = 2048;

/// Names of a client's request headers: the guard's limit, so every head it passes fits.
const MAX_HEADERS: usize = 100;
/// Header slots held in the connection's state for the usual head (a browser sends about 15
/// headers, a service a few): a head with more parses into slots on the heap ([`HeaderSlots`]).
/// The lane's state holds these while a request is under way, so they are most of what it
/// weighs (a slot is 32 bytes).
const INLINE_HEADERS: usize = 32;

/// Serves `stream` on the express lane until it ends or a request needs hyper. The connection
/// was accepted at `opened`: its first head is due [`HEADER_READ_TIMEOUT`] after that.
pub async fn serve<P: Express, S: Io>(handler: &P, lane: Lane<'_, S>) -> End {
    let Lane {
        opened,
        first,
        held,
        stream,
        conn,
        recorder,
        draining,
        shutdown,
    } = lane;
    let limits = Limits::default();
    let mut buf: Vec<u8> = Vec::with_capacity(HEAD_READ);
    let mut cancelled = pin!(shutdown.cancelled());
    let mut drain_seen = false;
    // One timer for the lane's whole life, moved on lazily (see `read_head`).
    let mut deadline = opened + HEADER_READ_TIMEOUT;
    // When the connection rests if nothing of a request came by then.
    let may_rest = held.is_some();
    let mut rest_at = may_rest.then(|| opened + REST_AFTER);
    let mut timer = pin!(tokio::time::sleep_until(
        rest_at.map_or(deadline, |at| at.min(deadline))
    ));
    // Only a connection's first bytes can be HTTP/2's preface.
    let mut sniff = first;
    loop {
        let mut reader = HeadReader::new(limits);
        let wait = Wait {
            cancelled: cancelled.as_mut(),
            drain_seen: &mut drain_seen,
            timer: timer.as_mut(),
        };
        let due = Due { deadline, rest_at };
        let read = read_head(stream, &mut buf, &mut reader, wait, due, &mut sniff);
        let end = match read.await {
            Read::Head(end) => end,
            Read::Rest => {
                let since = rest_at.map_or(opened, |at| at - REST_AFTER);
                return End::Rest { since };
            }
            Read::Http2 => return End::Http2 { rest: buf },
            Read::Mux => return End::Mux { rest: buf },
            Read::Refused => return End::Handoff { rest: buf },
            Read::Closed => return End::Closed,
        };
        conn.arrived = Instant::now();
        let mut slots = HeaderSlots::<INLINE_HEADERS>::new(reader.header_lines());
        // Checked and parsed in one pass; a refused head goes to the guard, which answers it.
        let HeadCheck::Valid { request, body } = reader.parse(&buf[..end], slots.get()) else {
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
            len: end,
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
        let now = tokio::time::Instant::now();
        if buf.is_empty() && held.is_some_and(|held| held.load(Ordering::Relaxed) > CROWD) {
            return End::Rest { since: now };
        }
        deadline = now + HEADER_READ_TIMEOUT;
        rest_at = may_rest.then(|| now + REST_AFTER);
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
    /// Nothing was read by the time the connection may rest.
    Rest,
    /// `buf` starts with a head the framing guard refuses (it need not be whole).
    Refused,
    /// The connection ended first: closed, failed, or timed out.
    Closed,
    /// `buf` starts with HTTP/2's client preface.
    Http2,
    /// `buf` starts with the mesh link's preface.
    Mux,
}

/// When [`read_head`] stops waiting: the head is due by `deadline`; with nothing read by
/// `rest_at`, the connection rests.
#[derive(Clone, Copy)]
struct Due {
    deadline: tokio::time::Instant,
    rest_at: Option<tokio::time::Instant>,
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
/// not a timer. A lane that may rest has its timer fire at most once per [`REST_AFTER`] while
/// it is busy, and rests ([`Read::Rest`]) when it fires with nothing read since `rest_at`.
async fn read_head<S: Io>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    reader: &mut HeadReader,
    wait: Wait<'_, '_>,
    due: Due,
    sniff: &mut bool,
) -> Read {
    let Due {
        mut deadline,
        rest_at,
    } = due;
    let Wait {
        mut cancelled,
        drain_seen,
        mut timer,
    } = wait;
    loop {
        if *sniff && !buf.is_empty() {
            match preface(buf) {
                Preface::Http2 => return Read::Http2,
                Preface::Mux => return Read::Mux,
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
        if buf.capacity() - buf.len() < HEAD_READ / 4 {
            buf.reserve(buf.capacity().max(HEAD_READ));
        }
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
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    return Read::Closed;
                }
                // Set for an earlier wait: move it to this one's rest, or its deadline.
                let next = match rest_at {
                    Some(at) if buf.is_empty() && !*drain_seen => {
                        if now >= at {
                            return Read::Rest;
                        }
                        at.min(deadline)
                    }
                    _ => deadline,
                };
                timer.as_mut().reset(next);
            }
        }
    }
}
