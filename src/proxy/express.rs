//! The express lane: an HTTP/1.1 request forwarded as bytes.
//!
//! Most mesh traffic is small requests. For those, building `http` header maps on both sides
//! of both hops and running hyper's client and server machinery cost several times the proxy's
//! own work (see docs/benchmarks.md). Here the request head the framing guard already validated
//! is rewritten straight into the upstream's write buffer (hop-by-hop headers dropped, the
//! contract's headers added), sent over a pooled raw TCP (or mesh TLS) connection, and the
//! response head is checked and copied back the same way, its body passed through as it
//! arrives. This is what NGINX does.
//!
//! A request body ([`ClientBody`], `Content-Length` or chunked, on any method) follows its head
//! the same way: the bytes that came with the head go out in the head's write, the rest streams
//! from the client's socket to the upstream's through one fixed buffer, a chunked body
//! re-validated by the guard's chunk scanner as it passes (a bad chunk ends both connections)
//! and its trailers passed through. The retry rules are [`proxy::replayable`](super)'s: a body
//! of known length up to [`RETRY_BODY_LIMIT`] that a retry or a fallback may need is read whole
//! first and kept; any other body streams and is never sent twice once a byte of it was read
//! from the client (a refused connection is still tried elsewhere). A route's
//! `max_request_body` refuses a declared length over it before anything is forwarded and cuts a
//! chunked body off where it passes it.
//!
//! The rules are the forwarder's: the same attempt loop ([`Forwarder::attempts`]: endpoint
//! choice, deadlines, retries, budget, outlier ejection) and the same header contract as
//! [`Forwarder::forward`]. Anything else (an upgrade, `Expect`, HTTP/1.0, an error answer
//! before forwarding) is declined and goes to hyper, which serves the rest of the connection
//! (`serve::lane`, from the loop in [`connection`]).

pub mod connection;

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::StatusCode;
use memchr::memmem;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::either::Either;

use super::headers::{self, Hop, Rules};
pub use super::headers::{ConnectionOptions, Name, connection_options};
use super::pool::{Dialled, Idle, Limits, SendError, dial_within, is_idempotent_name, link_stream};
use super::resilience::RETRY_BODY_LIMIT;
use super::{
    AttemptHeaders, Destination, Exchange, Failed, Forwarder, MeshError, within_caller_deadline,
};
use crate::access::Trail;
pub use crate::error::write_error;
use crate::http1::guard::{ChunkedBody, Limits as GuardLimits, Rejection, parse_content_length};
use crate::http1::trim_ows;
use crate::http1::write_header as header;
use crate::mux;
use crate::routing::balance::ns_at;
use crate::serve::Conn;
use crate::tls::MeshTls;

/// Largest response head accepted from an upstream (as hyper's client allows by default).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Header slots for parsing an upstream's response head; more headers → 502.
const MAX_RESPONSE_HEADERS: usize = 100;
/// The read buffer an upstream connection starts with: an answer's head and a small body fit.
/// A read that fills it doubles it, up to [`READ_SIZE`], so only a connection that carries
/// large answers holds a large buffer (and its first large answer costs one more read).
const FIRST_READ: usize = 2048;
/// The most bytes read from an upstream at a time.
const READ_SIZE: usize = 16 * 1024;
/// The most bytes of a streamed request body read from the client at a time: the size of the
/// one buffer a body streams through.
const BODY_READ_SIZE: usize = 32 * 1024;
/// How many refused streams of a mesh link one attempt takes before it gives up on the peer:
/// a refusal (the peer was going away; it read nothing) sends the request again on another
/// stream, which a new link to the peer's next process carries. A peer has one link at a time
/// unless one filled up (`mux::MAX_STREAMS`); each of several can refuse one as the peer goes.
const MAX_REFUSALS: usize = 8;
/// How long the rest of a request body may take to reach an upstream that already began to
/// answer (see [`ClientBody::pump`]).
const EARLY_ANSWER_GRACE: Duration = Duration::from_secs(5);

/// Where the head at the start of `buf` ends (after its blank line), if it is all there.
fn head_end(buf: &[u8]) -> Option<usize> {
    // Built once: building a searcher costs more than a search.
    static BLANK_LINE: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\r\n\r\n"));
    BLANK_LINE.find(buf).map(|i| i + 4)
}

/// A client's request head, parsed (by httparse, over bytes the framing guard validated).
pub struct Head<'a> {
    /// The head's length as the client sent it, in bytes.
    pub len: usize,
    pub method: &'a str,
    /// The request target as the client sent it.
    pub target: &'a str,
    pub headers: &'a [httparse::Header<'a>],
    /// What each header is, in the order of `headers` (worked out once per request).
    pub names: &'a [Name],
    /// The request's `Connection` options.
    pub options: ConnectionOptions,
    /// Its `x-request-id`: the client's, or one made for it (sent on when the client sent none).
    pub request_id: &'a [u8],
}

impl Head<'_> {
    /// The first value of the header `name` is.
    pub fn get(&self, name: Name) -> Option<&[u8]> {
        self.names
            .iter()
            .position(|&n| n == name)
            .and_then(|i| self.headers.get(i))
            .map(|h| h.value)
    }
}

/// What the express lane makes of a request.
pub enum Verdict {
    /// Not for the express lane (or an error answered the way hyper's path answers it): hand
    /// the request to hyper unchanged.
    Decline,
    /// An upstream's answer, to relay to the client.
    Answer(Answer),
    /// The mesh's own error answer, for `service`.
    Error(MeshError, String),
}

impl Verdict {
    /// The verdict on a request the express lane forwarded to `service`.
    pub fn of(forwarded: Result<Answer, MeshError>, service: &str) -> Verdict {
        match forwarded {
            Ok(answer) => Verdict::Answer(answer),
            Err(e) => Verdict::Error(e, service.to_owned()),
        }
    }
}

// === Forwarder ===

impl Forwarder {
    /// Forwards a request given as its parsed head and its body (if it has one): the express
    /// lane's [`Forwarder::forward`], with the same arguments and the same header contract
    /// ([`headers`](super::headers): `hop` says what this hop adds).
    // The same arguments as `forward`: the request (head and body), its destination, target,
    // hop and connection, the trail.
    #[allow(clippy::too_many_arguments)]
    pub async fn express(
        &self,
        head: &Head<'_>,
        body: Option<&mut ClientBody<'_>>,
        upstream: Destination<'_>,
        target: &str,
        hop: Hop<'_>,
        conn: &Conn,
        trail: &mut Trail,
    ) -> Result<Answer, MeshError> {
        let started = Instant::from_std(conn.arrived);
        let now = ns_at(conn.arrived);
        let policy = upstream.policy;
        // The client's head, with room for what this hop and each attempt add (a request id,
        // `x-forwarded-for`, the mesh's headers, `host`): sized to the request, since every
        // request in flight holds it.
        let mut request = Vec::with_capacity(head.len + 384);
        let rules = Rules {
            hop,
            first: upstream.first_hop,
            trusted: conn.mesh_peer.is_some(),
        };
        let peer = conn.peer_ip.as_bytes();
        let written = headers::write_request(&mut request, head, target, &rules, peer);
        let deadline = started + within_caller_deadline(policy.request_timeout, written.timeout_ms);
        let owns_retries = upstream.first_hop && policy.retries > 0;
        let idempotent = is_idempotent_name(head.method);
        // The body: kept whole (it came with the head, or a retry or a fallback may need it),
        // or streamed from the client after the bytes that came with the head.
        let (kept, stream) = match body {
            None => (Cow::Borrowed(&[][..]), None),
            Some(body) => {
                let fallback = upstream.fallback.is_some_and(|f| !f.routes.is_empty());
                let keep = upstream.first_hop && ((owns_retries && idempotent) || fallback);
                let limit = policy.max_request_body;
                match body.prepare(&mut request, limit, keep, deadline).await? {
                    Some(kept) => (kept, None),
                    None => (Cow::Borrowed(body.early), Some(body)),
                }
            }
        };
        if owns_retries {
            upstream.route.budget.deposit_at(now);
        }
        let attempt = super::Attempt {
            upstream,
            set_host: written.set_host,
            owns_retries,
            started,
            deadline,
        };
        let mut exchange = RawExchange {
            pool: &self.raw,
            head: request,
            caller_attempt: written.caller_attempt,
            // Only the first hop sends a request again after it may have arrived (see
            // `proxy::replayable`), and only an idempotent one whose body is kept.
            replayable: upstream.first_hop && idempotent && stream.is_none(),
            head_only: head.method == "HEAD",
            body: kept,
            stream,
        };
        let answered = self.attempts(&mut exchange, attempt, now, trail).await;
        // The client's side of the body failed while it streamed (its framing, its size, or
        // the client went away): that is the answer, unless the upstream's came first.
        match (answered, exchange.stream.and_then(|b| b.failed)) {
            (Err(_), Some(fault)) => Err(fault.error()),
            (answered, _) => answered,
        }
    }
}

// === Exchange ===

/// A request head and its body as bytes, sent over raw pooled connections.
struct RawExchange<'p, 'b, 'c> {
    pool: &'p RawPool,
    /// The head without the per-attempt headers and the final CRLF.
    head: Vec<u8>,
    caller_attempt: Option<Vec<u8>>,
    replayable: bool,
    /// A HEAD request: the answer has no body whatever its headers say.
    head_only: bool,
    /// The body's bytes sent in the head's write: the whole body when it is kept, else the
    /// part that came with the head.
    body: Cow<'b, [u8]>,
    /// The rest of a streamed body, still in the client's socket.
    stream: Option<&'b mut ClientBody<'c>>,
}

impl Exchange for RawExchange<'_, '_, '_> {
    type Response = Answer;

    fn status(response: &Answer) -> StatusCode {
        response.status
    }

    fn unsent(response: &Answer) -> bool {
        response.unsent
    }

    fn ready(&self) -> bool {
        // The head is kept: a request that never left can always go again, unless part of its
        // streamed body was read from the client (and so may have left).
        self.stream.as_ref().is_none_or(|body| !body.touched)
    }

    fn replayable(&self) -> bool {
        self.replayable
    }

    async fn send(
        &mut self,
        addr: SocketAddr,
        headers: AttemptHeaders<'_>,
        limits: Limits,
    ) -> Result<Answer, Failed> {
        // This attempt's headers go after the common ones, and are cut off again at the end.
        let common = self.head.len();
        let result = self.send_head(addr, &headers, limits).await;
        self.head.truncate(common);
        result
    }
}

impl RawExchange<'_, '_, '_> {
    /// Sends the head with `headers` added, then the body, and reads the answer's head.
    async fn send_head(
        &mut self,
        addr: SocketAddr,
        headers: &AttemptHeaders<'_>,
        limits: Limits,
    ) -> Result<Answer, Failed> {
        let head = &mut self.head;
        if let Some(host) = headers.host {
            header(head, b"host", host.as_bytes());
        }
        header(head, b"x-skyline-timeout-ms", headers.timeout.as_bytes());
        match (headers.attempt, &self.caller_attempt) {
            (Some(n), _) => header(head, b"x-skyline-attempt", n.to_string().as_bytes()),
            (None, Some(value)) => header(head, b"x-skyline-attempt", value),
            (None, None) => {}
        }
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(&self.body);
        let mut fresh = false;
        // Streams of a mesh link refused so far (see `MAX_REFUSALS`).
        let mut refusals = 0;
        loop {
            let mut conn = match self.pool.take(addr) {
                Some(conn) => conn,
                None if fresh => {
                    return Err(Failed::Broken(SendError::Protocol {
                        addr,
                        reason: "connection closed before the response",
                    }));
                }
                None => {
                    fresh = true;
                    let tls = self.pool.tls_for(limits.mesh);
                    let links = self.pool.links_for(limits.mesh);
                    match RawConn::connect(addr, limits.connect, tls, links).await {
                        Ok(conn) => conn,
                        Err(error) => return Err(Failed::Unsent(error)),
                    }
                }
            };
            if let Err(source) = conn.send(&self.head).await {
                if mux::is_refused(&source) && refusals < MAX_REFUSALS {
                    refusals += 1;
                    fresh = false;
                    continue;
                }
                if fresh {
                    return Err(Failed::Broken(SendError::Io { addr, source }));
                }
                // A pooled connection the upstream had closed: the request did not arrive.
                continue;
            }
            // The rest of a streamed body, unless the upstream answers first.
            let mut answered_early = false;
            if let Some(body) = self.stream.as_deref_mut() {
                match body.pump(&mut conn).await {
                    Ok(Pumped::Whole) => {}
                    Ok(Pumped::Answered) => answered_early = true,
                    // A pooled connection closed under the head, before a byte of the rest
                    // was read from the client: as if the write had failed.
                    Err(Pump::Upstream(_)) if !fresh && !body.touched => continue,
                    Err(Pump::Upstream(source)) => {
                        return Err(Failed::Broken(SendError::Io { addr, source }));
                    }
                    Err(Pump::Client) => {
                        return Err(Failed::Broken(SendError::Protocol {
                            addr,
                            reason: "request body failed",
                        }));
                    }
                }
            }
            let home = Home {
                pool: self.pool.clone(),
                addr,
                idle: limits.idle,
            };
            match conn.read_response(self.head_only, home).await {
                // An answer before the whole body: the connection is not reused.
                Ok(Some(mut answer)) => {
                    answer.keep_alive &= !answered_early;
                    return Ok(answer);
                }
                // Closed with no byte of an answer. On a pooled connection the upstream most
                // likely closed it idle just as the request went out (its keep-alive timeout):
                // safe to send again when the request may be sent twice.
                Ok(None) if !fresh && self.replayable => continue,
                Ok(None) => {
                    return Err(Failed::Broken(SendError::Protocol {
                        addr,
                        reason: "connection closed before the response",
                    }));
                }
                // A stream of a mesh link the peer refused (it drains): the request reached
                // no application. Another stream, or a new link, may take it.
                Err(Broken::Io(source)) if mux::is_refused(&source) => {
                    // A body streamed from the client cannot go again.
                    let streamed = self.stream.as_ref().is_some_and(|body| body.touched);
                    if refusals == MAX_REFUSALS || streamed {
                        return Err(Failed::Unsent(SendError::Connect { addr, source }));
                    }
                    refusals += 1;
                    fresh = false;
                    continue;
                }
                Err(error) => return Err(Failed::Broken(error.at(addr))),
            }
        }
    }
}

// === ClientBody ===

/// A request body on the express lane: the bytes that came with its head, and the rest, still
/// in the client's socket, read through one fixed buffer as it streams to the upstream.
pub struct ClientBody<'a> {
    client: &'a mut (dyn AsyncRead + Unpin + Send),
    /// The body's bytes that came with the head.
    early: &'a [u8],
    left: Left,
    /// Read from the client past the body's end: the start of the next request.
    rest: Vec<u8>,
    /// The whole body has been read from the client.
    read_all: bool,
    /// Bytes past `early` were read from the client: the body cannot be sent again.
    touched: bool,
    /// The route's `max_request_body`, which a chunked body is cut off past.
    cap: Option<u64>,
    /// Why the body stopped short, when the client's side is to blame.
    failed: Option<BodyFault>,
}

/// What is left of a body.
enum Left {
    /// `Content-Length` `total` bytes, `left` of them still in the socket.
    Length { total: u64, left: u64 },
    /// Chunked, scanned so far by the guard's rules.
    Chunked(ChunkedBody),
}

/// Why a client's body stopped short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyFault {
    /// A chunk the framing guard refuses.
    Malformed,
    /// More than the route's `max_request_body`.
    TooLarge,
    /// The client closed (or failed) before the body's end.
    Incomplete,
}

impl BodyFault {
    fn error(self) -> MeshError {
        match self {
            BodyFault::Malformed => MeshError::bad_request("malformed request body"),
            BodyFault::TooLarge => MeshError::ContentTooLarge,
            BodyFault::Incomplete => MeshError::bad_request("incomplete request body"),
        }
    }
}

/// How far [`ClientBody::pump`] got.
enum Pumped {
    /// The whole body was sent (the upstream may have begun to answer before).
    Whole,
    /// The upstream began to answer, and the rest of the body did not follow.
    Answered,
}

/// Why [`ClientBody::pump`] stopped.
enum Pump {
    /// The upstream's connection failed or closed.
    Upstream(io::Error),
    /// The client's side failed (see [`ClientBody::failed`]).
    Client,
}

/// How a request that had a body left its client connection (see [`ClientBody::end`]).
pub struct BodyEnd {
    /// The whole body was read: the connection may serve the next request.
    pub finished: bool,
    /// Bytes of what came after the head that belonged to the body.
    pub early: usize,
    /// Bytes read past the body's end: the start of the next request.
    pub rest: Vec<u8>,
}

impl BodyEnd {
    /// A request without a body.
    pub fn none() -> Self {
        BodyEnd {
            finished: true,
            early: 0,
            rest: Vec::new(),
        }
    }
}

impl<'a> ClientBody<'a> {
    /// A `Content-Length` body of `n` bytes; `after_head` is what was read after the head.
    pub fn length(
        client: &'a mut (dyn AsyncRead + Unpin + Send),
        after_head: &'a [u8],
        n: u64,
    ) -> Self {
        let early = &after_head[..after_head
            .len()
            .min(usize::try_from(n).unwrap_or(usize::MAX))];
        let left = n - early.len() as u64;
        Self::new(client, early, Left::Length { total: n, left }, left == 0)
    }

    /// A chunked body; `after_head` is what was read after the head. Refused as the guard
    /// refuses it when those bytes already break the framing.
    pub fn chunked(
        client: &'a mut (dyn AsyncRead + Unpin + Send),
        after_head: &'a [u8],
    ) -> Result<Self, Rejection> {
        let mut scan = ChunkedBody::new(GuardLimits::default());
        let end = scan.scan(after_head)?;
        let early = &after_head[..end.unwrap_or(after_head.len())];
        Ok(Self::new(client, early, Left::Chunked(scan), end.is_some()))
    }

    fn new(
        client: &'a mut (dyn AsyncRead + Unpin + Send),
        early: &'a [u8],
        left: Left,
        read_all: bool,
    ) -> Self {
        ClientBody {
            client,
            early,
            left,
            rest: Vec::new(),
            read_all,
            touched: false,
            cap: None,
            failed: None,
        }
    }

    /// The body's declared length, for the access log (a chunked body has none, as on
    /// hyper's lane).
    pub fn declared(&self) -> Option<u64> {
        match self.left {
            Left::Length { total, .. } => Some(total),
            Left::Chunked(_) => None,
        }
    }

    /// How the body left the connection.
    pub fn end(self) -> BodyEnd {
        BodyEnd {
            finished: self.read_all,
            early: self.early.len(),
            rest: self.rest,
        }
    }

    /// Readies the body to follow `head` (the forwarded head, still being written): refused
    /// when it is over `limit`; `transfer-encoding: chunked` added to a chunked one. Returns
    /// the whole body when it came with the head, or when it is to be kept (`keep`) and its
    /// length is known and at most [`RETRY_BODY_LIMIT`] (then read whole by `deadline`);
    /// `None` when it streams.
    async fn prepare(
        &mut self,
        head: &mut Vec<u8>,
        limit: Option<u64>,
        keep: bool,
        deadline: Instant,
    ) -> Result<Option<Cow<'a, [u8]>>, MeshError> {
        let total = match &self.left {
            Left::Chunked(scan) => {
                if limit.is_some_and(|limit| scan.data_len() > limit) {
                    return Err(MeshError::ContentTooLarge);
                }
                self.cap = limit;
                header(head, b"transfer-encoding", b"chunked");
                return Ok(self.read_all.then_some(Cow::Borrowed(self.early)));
            }
            Left::Length { total, .. } => *total,
        };
        if limit.is_some_and(|limit| total > limit) {
            return Err(MeshError::ContentTooLarge);
        }
        if self.read_all {
            return Ok(Some(Cow::Borrowed(self.early)));
        }
        if !keep || total > RETRY_BODY_LIMIT as u64 {
            return Ok(None);
        }
        let mut whole = Vec::with_capacity(total as usize);
        whole.extend_from_slice(self.early);
        whole.resize(total as usize, 0);
        let mut filled = self.early.len();
        self.touched = true;
        let read = async {
            while filled < whole.len() {
                match self.client.read(&mut whole[filled..]).await {
                    Ok(0) | Err(_) => {
                        return Err(MeshError::bad_request("incomplete request body"));
                    }
                    Ok(n) => filled += n,
                }
            }
            Ok(())
        };
        tokio::time::timeout_at(deadline, read)
            .await
            .map_err(|_| MeshError::UpstreamTimeout)??;
        self.read_all = true;
        Ok(Some(Cow::Owned(whole)))
    }

    /// How many bytes the next read from the client may take, at most `most`: no more than
    /// is left of a body of known length.
    fn wanted(&self, most: usize) -> usize {
        match self.left {
            Left::Length { left, .. } => left.min(most as u64) as usize,
            Left::Chunked(_) => most,
        }
    }

    /// Streams the rest of the body from the client to `upstream` through one buffer. A
    /// chunked body is checked as it passes; nothing past a bad chunk, or past the cap, is
    /// sent. An upstream that starts to answer first (NGINX's `return` does, and reads the
    /// body on to discard it) still gets the rest, within [`EARLY_ANSWER_GRACE`], so that both
    /// connections stay usable; past that, or when either side fails, the answer is relayed
    /// as it is and both connections end after it.
    async fn pump(&mut self, upstream: &mut RawConn) -> Result<Pumped, Pump> {
        let size = self.wanted(BODY_READ_SIZE);
        let mut buf = vec![0u8; size];
        // Once the upstream began to answer: by when the rest must have gone.
        let mut answered: Option<Instant> = None;
        while !self.read_all {
            let want = self.wanted(size);
            let read = match answered {
                Some(grace) => {
                    let read = self.client.read(&mut buf[..want]);
                    match tokio::time::timeout_at(grace, read).await {
                        Ok(read) => read,
                        Err(_) => return Ok(Pumped::Answered),
                    }
                }
                None => tokio::select! {
                    biased;
                    answer = upstream.fill() => {
                        match answer {
                            Ok(0) => return Err(Pump::Upstream(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "upstream closed during the request body",
                            ))),
                            Ok(_) => answered = Some(Instant::now() + EARLY_ANSWER_GRACE),
                            Err(Broken::Io(e)) => return Err(Pump::Upstream(e)),
                            Err(Broken::Protocol(reason)) => {
                                return Err(Pump::Upstream(io::Error::other(reason)));
                            }
                        }
                        continue;
                    }
                    read = self.client.read(&mut buf[..want]) => read,
                },
            };
            let n = match read {
                Ok(0) | Err(_) => return self.fault(BodyFault::Incomplete, answered),
                Ok(n) => n,
            };
            self.touched = true;
            let send = match &mut self.left {
                Left::Length { left, .. } => {
                    *left -= n as u64;
                    self.read_all = *left == 0;
                    n
                }
                Left::Chunked(scan) => {
                    let Ok(end) = scan.scan(&buf[..n]) else {
                        return self.fault(BodyFault::Malformed, answered);
                    };
                    if self.cap.is_some_and(|cap| scan.data_len() > cap) {
                        return self.fault(BodyFault::TooLarge, answered);
                    }
                    if let Some(end) = end {
                        self.rest.extend_from_slice(&buf[end..n]);
                        self.read_all = true;
                    }
                    end.unwrap_or(n)
                }
            };
            let sent = upstream.send(&buf[..send]);
            match answered {
                None => sent.await.map_err(Pump::Upstream)?,
                Some(grace) => {
                    if !matches!(tokio::time::timeout_at(grace, sent).await, Ok(Ok(()))) {
                        return Ok(Pumped::Answered);
                    }
                }
            }
        }
        Ok(Pumped::Whole)
    }

    /// Stops the body for the client's `fault`: an error, or the answer that already began.
    fn fault(&mut self, fault: BodyFault, answered: Option<Instant>) -> Result<Pumped, Pump> {
        self.failed = Some(fault);
        match answered {
            Some(_) => Ok(Pumped::Answered),
            None => Err(Pump::Client),
        }
    }
}

// === RawPool ===

/// Idle keep-alive connections to upstreams, per endpoint address: raw TCP streams, each with
/// what was read from it and not yet used (always nothing when idle).
/// Cheap to clone: one shared map.
#[derive(Clone, Debug)]
pub struct RawPool {
    inner: Arc<RawInner>,
}

#[derive(Debug)]
struct RawInner {
    idle: Idle<RawConn>,
    /// Mesh TLS for endpoints that are mesh proxies ([`Limits::mesh`]).
    tls: Option<MeshTls>,
    /// The mesh links to mesh proxies, when requests to them go on streams of one link
    /// (`[mesh] peer_protocol = "mux"`).
    links: Option<mux::Links>,
    /// How long an idle connection (and a link with no stream) is kept.
    idle_timeout: Duration,
}

impl RawPool {
    pub fn new(idle_timeout: Duration) -> Self {
        Self::with_tls(idle_timeout, None)
    }

    /// A pool whose connections to mesh proxies are mTLS (when `tls`).
    pub fn with_tls(idle_timeout: Duration, tls: Option<MeshTls>) -> Self {
        Self {
            inner: Arc::new(RawInner {
                idle: Idle::new(idle_timeout),
                tls,
                links: None,
                idle_timeout,
            }),
        }
    }

    /// This pool (its connections dropped), sending requests to mesh proxies on streams of
    /// `links` (see [`crate::mux`]).
    pub fn linked(&self, links: mux::Links) -> Self {
        Self {
            inner: Arc::new(RawInner {
                idle: Idle::new(self.inner.idle_timeout),
                tls: self.inner.tls.clone(),
                links: Some(links),
                idle_timeout: self.inner.idle_timeout,
            }),
        }
    }

    /// The TLS a new connection to an endpoint takes (`mesh`: the endpoint is a mesh proxy).
    fn tls_for(&self, mesh: bool) -> Option<&MeshTls> {
        self.inner.tls.as_ref().filter(|_| mesh)
    }

    /// The mesh links a new connection to an endpoint goes on, if any, and a link's idle
    /// timeout (`mesh`: the endpoint is a mesh proxy).
    fn links_for(&self, mesh: bool) -> Option<(&mux::Links, Duration)> {
        let links = self.inner.links.as_ref().filter(|_| mesh)?;
        Some((links, self.inner.idle_timeout))
    }

    /// The most recently used connection to `addr` that is still open, if any.
    fn take(&self, addr: SocketAddr) -> Option<RawConn> {
        // A stream of a link dialled before the certificate changed is not reused.
        let tag = self.inner.tls.as_ref().map_or(0, MeshTls::generation);
        self.inner.idle.take(addr, |conn| conn.is_open(tag))
    }

    fn put(&self, addr: SocketAddr, conn: RawConn) {
        self.inner.idle.put(addr, conn);
    }

    /// Idle connections held now, over every endpoint (for tests).
    pub fn idle_count(&self) -> usize {
        self.inner.idle.count()
    }
}

/// A connection to an upstream, or a stream of a mesh link to another Skyline proxy
/// (`[mesh] peer_protocol = "mux"`, see [`crate::mux`]).
type Upstream = Either<Dialled, mux::Stream>;

/// A raw connection to an upstream and the bytes read from it not yet relayed.
#[derive(Debug)]
struct RawConn {
    stream: Upstream,
    buf: Vec<u8>,
}

impl RawConn {
    /// Connects to `addr`, and over mesh mTLS when `tls` (the handshake within the same
    /// `timeout`). With `links` (a mesh proxy, and the pool speaks the mesh link) the request
    /// goes on a new stream of the link to `addr`, one dialled first when none can take it; a
    /// peer that does not speak the link gets a connection of its own.
    async fn connect(
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&MeshTls>,
        links: Option<(&mux::Links, Duration)>,
    ) -> Result<RawConn, SendError> {
        let on_link = match links {
            Some((links, idle)) => link_stream(addr, timeout, tls, links, idle).await?,
            None => None,
        };
        let stream = match on_link {
            Some(stream) => Either::Right(stream),
            None => Either::Left(dial_within(addr, timeout, tls).await?),
        };
        Ok(RawConn::over(stream))
    }

    fn over(stream: Upstream) -> RawConn {
        RawConn {
            stream,
            buf: Vec::with_capacity(FIRST_READ),
        }
    }

    /// Whether the idle connection is still open: nothing to read (tokio answers from its
    /// readiness state, without a system call, when no event came), not end-of-stream, and no
    /// stray bytes. Over TLS the socket is peeked (a byte read would be a TLS record's): any
    /// byte waiting on an idle connection is the peer closing it (`close_notify`) or junk.
    /// A stream of a mesh link: the link is up, takes streams, and was dialled with `tag`
    /// (the certificate in use now).
    fn is_open(&self, tag: u64) -> bool {
        match &self.stream {
            Either::Left(Either::Left(stream)) => {
                let mut probe = [0u8; 1];
                matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Either::Right(stream) => stream.is_open() && stream.tag() == tag,
            Either::Left(Either::Right(stream)) => {
                let mut probe = [0u8; 1];
                let mut probe = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                stream.reusable()
                    && matches!(
                        stream.get_ref().poll_peek(&mut cx, &mut probe),
                        Poll::Pending
                    )
            }
        }
    }

    /// Writes `bytes` whole and pushes them out (TLS may hold a record until flushed).
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        if let Either::Left(Either::Right(_)) = self.stream {
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// Reads the response head, skipping interim (1xx) answers. `Ok(None)`: the connection
    /// closed before any byte of it.
    /// `buf` holds what was read so far (nothing, or the start of an answer that came while
    /// the body streamed).
    async fn read_response(
        mut self,
        head_only: bool,
        home: Home,
    ) -> Result<Option<Answer>, Broken> {
        // Where the search for the blank line goes on: a head that arrives in pieces is
        // searched once, not again from its start at every piece.
        let mut searched = 0;
        loop {
            let Some(end) = head_end(&self.buf[searched..]).map(|end| searched + end) else {
                searched = self.buf.len().saturating_sub(3);
                if self.buf.len() > MAX_RESPONSE_HEAD {
                    return Err(Broken::Protocol("response head too large"));
                }
                if self.fill().await? == 0 {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(Broken::Protocol(
                        "connection closed inside the response head",
                    ));
                }
                continue;
            };
            // Room for the head and the body bytes already read, sent in one write.
            let room = self.buf.len() + 64;
            let parsed = parse_response(&self.buf[..end], head_only, room)?;
            self.buf.drain(..end);
            searched = 0;
            if parsed.status.is_informational() {
                if parsed.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Broken::Protocol("unrequested protocol switch"));
                }
                continue;
            }
            return Ok(Some(Answer {
                status: parsed.status,
                mesh_error: parsed.mesh_error,
                unsent: parsed.unsent,
                head: parsed.client_head,
                body: parsed.body,
                keep_alive: parsed.keep_alive,
                conn: self,
                home,
            }));
        }
    }

    /// Reads more into `buf`; 0 at end of stream.
    async fn fill(&mut self) -> Result<usize, Broken> {
        if self.buf.capacity() - self.buf.len() < FIRST_READ / 4 {
            self.buf
                .reserve(self.buf.capacity().clamp(FIRST_READ, READ_SIZE));
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = self.stream.read_buf(&mut self.buf).await?;
        // The upstream sent at least as much as there was room for: more room next time.
        if n == room && self.buf.capacity() < READ_SIZE {
            self.buf.reserve(self.buf.capacity());
        }
        Ok(n)
    }
}

/// Why an upstream's answer could not be read.
#[derive(Debug)]
enum Broken {
    Io(io::Error),
    Protocol(&'static str),
}

impl From<io::Error> for Broken {
    fn from(e: io::Error) -> Self {
        Broken::Io(e)
    }
}

impl Broken {
    fn at(self, addr: SocketAddr) -> SendError {
        match self {
            Broken::Io(source) => SendError::Io { addr, source },
            Broken::Protocol(reason) => SendError::Protocol { addr, reason },
        }
    }
}

// === Answer ===

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection (re-framed as chunked for the client).
    Close,
}

struct ParsedHead {
    status: StatusCode,
    body: BodyFraming,
    keep_alive: bool,
    mesh_error: Option<Box<str>>,
    /// A mesh error that says the request reached no instance.
    unsent: bool,
    /// The status line and end-to-end headers, for the client.
    client_head: Vec<u8>,
}

/// Reads the status and the framing of a response head (RFC 9112 §6.3), refusing ambiguous
/// framing (a proxy must not guess where a message ends), and writes the head the client gets:
/// the same status line and headers, without the hop-by-hop ones.
fn parse_response(head: &[u8], head_only: bool, room: usize) -> Result<ParsedHead, Broken> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    match response.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        _ => return Err(Broken::Protocol("malformed response head")),
    }
    let code = response.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| Broken::Protocol("invalid response status"))?;
    let http11 = response.version == Some(1);
    let (mut te, mut chunked, mut length) = (0, false, None);
    let mut names = [Name::Other; MAX_RESPONSE_HEADERS];
    for (slot, h) in names.iter_mut().zip(response.headers.iter()) {
        *slot = Name::of(h.name);
    }
    let names = &names[..response.headers.len()];
    for (h, &kind) in response.headers.iter().zip(names) {
        match kind {
            Name::TransferEncoding => {
                te += 1;
                chunked = trim_ows(h.value).eq_ignore_ascii_case(b"chunked");
            }
            Name::ContentLength => {
                let n = parse_content_length(h.value)
                    .ok_or(Broken::Protocol("invalid content-length"))?;
                if length.is_some_and(|m| m != n) {
                    return Err(Broken::Protocol("conflicting content-length"));
                }
                length = Some(n);
            }
            _ => {}
        }
    }
    let options = connection_options(
        names
            .iter()
            .copied()
            .zip(response.headers.iter().map(|h| h.value)),
    );
    let body = if head_only || status.is_informational() || matches!(code, 204 | 304) {
        BodyFraming::None
    } else if te > 0 {
        if length.is_some() {
            return Err(Broken::Protocol("content-length with transfer-encoding"));
        }
        if te > 1 || !chunked {
            return Err(Broken::Protocol("unsupported transfer-encoding"));
        }
        BodyFraming::Chunked
    } else if let Some(n) = length {
        BodyFraming::Length(n)
    } else {
        BodyFraming::Close
    };
    let mut client_head = Vec::with_capacity(room);
    client_head.extend_from_slice(b"HTTP/1.1 ");
    client_head.extend_from_slice(status.as_str().as_bytes());
    client_head.push(b' ');
    client_head.extend_from_slice(response.reason.unwrap_or_default().as_bytes());
    client_head.extend_from_slice(b"\r\n");
    let (mut mesh_error, mut unsent) = (None, false);
    for (h, &kind) in response.headers.iter().zip(names) {
        match kind {
            kind if kind.is_hop_by_hop() => continue,
            _ if options.names(h.name) => continue,
            Name::MeshError => mesh_error = Some(String::from_utf8_lossy(h.value).into()),
            Name::Unsent => unsent = true,
            _ => {}
        }
        header(&mut client_head, h.name.as_bytes(), h.value);
    }
    Ok(ParsedHead {
        status,
        body,
        keep_alive: http11 && !options.close && body != BodyFraming::Close,
        unsent: unsent && mesh_error.is_some() && matches!(code, 502 | 503),
        mesh_error,
        client_head,
    })
}

/// An upstream's answer: its head read and rewritten for the client, its body still to relay.
/// Relayed to its end, its connection goes back to the pool; dropped, the connection is closed.
pub struct Answer {
    pub status: StatusCode,
    /// The upstream's `x-skyline-error` (a later hop's mesh error), for the metrics.
    pub mesh_error: Option<Box<str>>,
    /// A later hop's mesh error says the request reached no instance (`x-skyline-unsent`).
    pub unsent: bool,
    /// Status line and end-to-end headers for the client, without the final CRLF.
    head: Vec<u8>,
    body: BodyFraming,
    /// The upstream keeps the connection open after this answer.
    keep_alive: bool,
    /// The connection, its buffer starting with the body's first bytes.
    conn: RawConn,
    home: Home,
}

/// Where a relayed answer's connection goes back to, and how long its body may stall.
struct Home {
    pool: RawPool,
    addr: SocketAddr,
    idle: Duration,
}

impl Answer {
    /// Relays the answer to `client`: the head (with `Connection: close` when `close`), then
    /// the body as it arrives. `Ok` with the body's bytes as sent (a chunked body with its
    /// framing) when the whole answer was sent; an error leaves the client connection unusable
    /// (part of an answer may have been sent).
    pub async fn relay<W: AsyncWrite + Unpin>(
        mut self,
        client: &mut W,
        close: bool,
    ) -> io::Result<u64> {
        let mut out = std::mem::take(&mut self.head);
        if matches!(self.body, BodyFraming::Chunked | BodyFraming::Close) {
            header(&mut out, b"transfer-encoding", b"chunked");
        }
        if close {
            header(&mut out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        let (reusable, sent) = match self.body {
            BodyFraming::None => {
                client.write_all(&out).await?;
                (self.conn.buf.is_empty(), 0)
            }
            BodyFraming::Length(n) => (self.relay_length(client, out, n).await?, n),
            BodyFraming::Chunked => self.relay_chunked(client, out).await?,
            BodyFraming::Close => (false, self.relay_until_close(client, out).await?),
        };
        if reusable && self.keep_alive {
            self.conn.buf.clear();
            self.home.pool.put(self.home.addr, self.conn);
        }
        Ok(sent)
    }

    /// A body of `n` bytes; `Ok(true)` when nothing followed it.
    async fn relay_length<W: AsyncWrite + Unpin>(
        &mut self,
        client: &mut W,
        mut out: Vec<u8>,
        n: u64,
    ) -> io::Result<bool> {
        let have = self.conn.buf.len() as u64;
        let first = have.min(n) as usize;
        out.extend_from_slice(&self.conn.buf[..first]);
        client.write_all(&out).await?;
        let mut left = n - first as u64;
        let clean = have <= n;
        while left > 0 {
            self.conn.buf.clear();
            let read = self.read_more().await?;
            let take = (read as u64).min(left) as usize;
            client.write_all(&self.conn.buf[..take]).await?;
            left -= take as u64;
            if take < read {
                return Ok(false);
            }
        }
        Ok(clean)
    }

    /// A chunked body, passed through as it is; `Ok(true)` when nothing followed it, with the
    /// body's bytes.
    async fn relay_chunked<W: AsyncWrite + Unpin>(
        &mut self,
        client: &mut W,
        mut out: Vec<u8>,
    ) -> io::Result<(bool, u64)> {
        let mut scan = ChunkedBody::new(GuardLimits::default());
        let mut end = scan.scan(&self.conn.buf).map_err(invalid_chunk)?;
        let first = end.unwrap_or(self.conn.buf.len());
        out.extend_from_slice(&self.conn.buf[..first]);
        client.write_all(&out).await?;
        let mut sent = first as u64;
        let mut clean = first == self.conn.buf.len();
        while end.is_none() {
            self.conn.buf.clear();
            self.read_more().await?;
            end = scan.scan(&self.conn.buf).map_err(invalid_chunk)?;
            let take = end.unwrap_or(self.conn.buf.len());
            client.write_all(&self.conn.buf[..take]).await?;
            sent += take as u64;
            clean = take == self.conn.buf.len();
        }
        Ok((clean, sent))
    }

    /// A body that ends when the upstream closes, sent to the client as chunks; `Ok` with the
    /// body's bytes (without the chunk framing).
    async fn relay_until_close<W: AsyncWrite + Unpin>(
        &mut self,
        client: &mut W,
        mut out: Vec<u8>,
    ) -> io::Result<u64> {
        let mut sent = 0u64;
        loop {
            if !self.conn.buf.is_empty() {
                sent += self.conn.buf.len() as u64;
                out.extend_from_slice(format!("{:x}\r\n", self.conn.buf.len()).as_bytes());
                out.extend_from_slice(&self.conn.buf);
                out.extend_from_slice(b"\r\n");
            }
            client.write_all(&out).await?;
            out.clear();
            self.conn.buf.clear();
            if self.read_more_or_end().await? == 0 {
                client.write_all(b"0\r\n\r\n").await?;
                return Ok(sent);
            }
        }
    }

    /// Reads the body's next bytes into the (empty) buffer; the end of the stream is an error.
    async fn read_more(&mut self) -> io::Result<usize> {
        match self.read_more_or_end().await? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed inside the body",
            )),
            n => Ok(n),
        }
    }

    /// Reads the body's next bytes, giving up when the upstream stalls for the idle timeout.
    async fn read_more_or_end(&mut self) -> io::Result<usize> {
        let idle = self.home.idle;
        match tokio::time::timeout(idle, self.conn.fill()).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(Broken::Io(e))) => Err(e),
            Ok(Err(Broken::Protocol(reason))) => Err(io::Error::other(reason)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("upstream body stalled for {idle:?}"),
            )),
        }
    }
}

fn invalid_chunk(rejection: crate::http1::guard::Rejection) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, rejection.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &str, head_only: bool) -> Result<ParsedHead, Broken> {
        parse_response(head.as_bytes(), head_only, 64)
    }

    #[test]
    fn a_response_head_is_framed_as_rfc_9112_says() {
        let framing = |head: &str| parsed(head, false).map(|p| p.body);
        let ok = "HTTP/1.1 200 OK\r\n";
        assert_eq!(
            framing(&format!("{ok}Content-Length: 5\r\n\r\n")).unwrap(),
            BodyFraming::Length(5)
        );
        assert_eq!(
            framing(&format!(
                "{ok}Content-Length: 5\r\ncontent-length: 5\r\n\r\n"
            ))
            .unwrap(),
            BodyFraming::Length(5)
        );
        assert_eq!(
            framing(&format!("{ok}Transfer-Encoding: chunked\r\n\r\n")).unwrap(),
            BodyFraming::Chunked
        );
        assert_eq!(framing(&format!("{ok}\r\n")).unwrap(), BodyFraming::Close);
        for no_body in [
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
        ] {
            assert_eq!(framing(no_body).unwrap(), BodyFraming::None, "{no_body}");
        }
        let head = parsed(&format!("{ok}Content-Length: 9\r\n\r\n"), true).unwrap();
        assert_eq!(head.body, BodyFraming::None, "the answer to HEAD");
        for refused in [
            format!("{ok}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            format!("{ok}Content-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            format!("{ok}Content-Length: -1\r\n\r\n"),
            format!("{ok}Transfer-Encoding: gzip\r\n\r\n"),
            "HTTP/1.1 999999 Huh\r\n\r\n".to_owned(),
            "NOT HTTP\r\n\r\n".to_owned(),
        ] {
            assert!(framing(&refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn the_client_gets_end_to_end_headers_and_the_connection_is_kept_only_when_it_may_be() {
        let head = parsed(
            "HTTP/1.1 503 Service Unavailable\r\nConnection: keep-alive, x-private\r\n\
             X-Private: 1\r\nKeep-Alive: timeout=5\r\nX-End: 1\r\nx-skyline-error: no-healthy-endpoint\r\n\
             Content-Length: 0\r\n\r\n",
            false,
        )
        .unwrap();
        let text = String::from_utf8(head.client_head).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 503 Service Unavailable\r\nX-End: 1\r\nx-skyline-error: no-healthy-endpoint\r\nContent-Length: 0\r\n"
        );
        assert_eq!(head.mesh_error.as_deref(), Some("no-healthy-endpoint"));
        assert!(head.keep_alive);
        let close = parsed(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(!close.unwrap().keep_alive);
        let old = parsed("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!old.unwrap().keep_alive);
        let until_close = parsed("HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(!until_close.unwrap().keep_alive);
    }

    #[test]
    fn mesh_errors_written_as_bytes_match_the_hyper_lane() {
        let mut out = Vec::new();
        write_error(&mut out, MeshError::UpstreamTimeout, "web", false);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"),
            "{head}"
        );
        assert!(head.contains("x-skyline-error: upstream-timeout\r\n"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(!head.contains("connection: close"));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "upstream-timeout");
        assert_eq!(json["service"], "web");
        let mut out = Vec::new();
        write_error(&mut out, MeshError::bad_request("x"), "", false);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("connection: close\r\n")
        );
    }

    #[test]
    fn every_mesh_error_is_the_same_answer_as_bytes_and_as_a_response() {
        use http_body_util::BodyExt;
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let refused = || SendError::Connect {
            addr,
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        let errors = || {
            vec![
                MeshError::bad_request("bad"),
                MeshError::UnknownService,
                MeshError::UnknownBeyond("looked further"),
                MeshError::NoHealthyEndpoint,
                MeshError::NoCatalog,
                MeshError::UpstreamConnect(refused()),
                MeshError::UpstreamConnect(SendError::Protocol {
                    addr,
                    reason: "broken",
                }),
                MeshError::UpstreamTimeout,
                MeshError::LoopDetected,
                MeshError::ContentTooLarge,
                MeshError::Forbidden,
            ]
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for (bytes_error, map_error) in errors().into_iter().zip(errors()) {
            let code = map_error.code();
            let mut out = Vec::new();
            write_error(&mut out, bytes_error, "web", false);
            let text = String::from_utf8(out).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap();
            let mut from_bytes: Vec<String> = lines.map(str::to_owned).collect();
            from_bytes.sort();

            let response = map_error.into_response("web");
            assert_eq!(
                status_line,
                format!(
                    "HTTP/1.1 {} {}",
                    response.status().as_str(),
                    response.status().canonical_reason().unwrap_or("")
                ),
                "{code}"
            );
            let mut from_map: Vec<String> = response
                .headers()
                .iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                .collect();
            let full = runtime
                .block_on(response.into_body().collect())
                .unwrap()
                .to_bytes();
            // hyper writes the length of a full body itself.
            from_map.push(format!("content-length: {}", full.len()));
            from_map.sort();
            assert_eq!(from_bytes, from_map, "{code}");
            assert_eq!(body.as_bytes(), &full[..], "{code}");
        }
    }
}
