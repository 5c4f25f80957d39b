//! Accepting connections: the accept loop, HTTP/1.1 settings, the framing guard in front of
//! hyper, graceful drain on shutdown, and (for a role's proxy listeners) one metrics record per
//! response; [`activation`] serves on sockets a supervisor passed.
//!
//! A handler that takes the express lane (the agent's outbound and inbound proxies) first
//! serves each connection there: HTTP/1.1 requests, with or without a body, forwarded as bytes
//! (`proxy::express`).
//! The first request the lane does not take moves the connection to hyper for good.
//! A connection that opens with HTTP/2's client preface (h2c with prior knowledge, as gRPC
//! clients speak) is told apart on the lane's first read, at the cost of one byte compared for
//! HTTP/1, and served by hyper's HTTP/2 server with the same handler.
//!
//! A plain connection on the express lane holds the lane's state only while it is busy: quiet
//! for [`lane::REST_AFTER`] (or at once, in a crowd: [`lane::CROWD`]) it rests, waiting for its
//! next bytes with its socket, one timer and its drain signal, as a connection that has sent
//! nothing yet does.
//!
//! # Drain
//!
//! On shutdown the listener stops accepting at once. Each open connection then finishes what it
//! is doing: a request in flight gets its response, and every response from then on carries
//! `Connection: close`, so a keep-alive client opens its next connection elsewhere (on the new
//! process, after a restart on inherited sockets). A connection that stays idle is closed after
//! [`DRAIN_IDLE_GRACE`], not at once: closing an idle keep-alive connection races with a client
//! that is sending its next request on it (the request is lost), and a busy client's next
//! request, answered with `Connection: close`, ends the connection cleanly well within the
//! grace. This is what Envoy's drain does for HTTP/1.1; the whole drain is bounded by
//! [`DRAIN_TIMEOUT`].
//!
//! An upgraded connection (a WebSocket, after its `101`) is not a request in flight: it does
//! not hold the drain up, which would make every restart wait out [`DRAIN_TIMEOUT`] for
//! connections that may stay open for hours. It keeps working while the drain lasts and is
//! closed when the drain ends ([`Conn::drained`]), so its client reconnects, to the new process
//! after a restart on inherited sockets.

pub mod activation;
pub mod flood;
pub mod lane;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::access::{AccessLog, Entry, Note};
use crate::contract::{X_REQUEST_ID, X_SKYLINE_ERROR, request_id};
use crate::error::MeshError;
use crate::http1::guard::{Guarded, Limits, Verdicts};
use crate::metrics::{Metrics, Role, ServiceLabel};
use crate::tls::{Accepted, MeshTls};

/// How long a client may take to send a request head (slowloris protection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take to finish after shutdown starts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle keep-alive connection stays open after shutdown starts, so that a client
/// sending its next request on it gets an answer (with `Connection: close`) rather than a
/// closed connection. See the module docs.
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_millis(500);

/// What a listener does with each request. Errors are already responses here.
pub trait Handler: Clone + Send + Sync + 'static {
    /// The response body: the proxy streams an upstream's, an application may stream its own.
    type Body: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static;

    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Conn,
    ) -> impl Future<Output = Response<Self::Body>> + Send;

    /// [`handle`](Self::handle), with what the handler noted about the request: the service
    /// as a metrics label, and where it went, for the access log (a [`Proxy`]'s; other handlers
    /// note nothing). The note travels beside the response, not in its extensions, which would
    /// cost a map per response.
    fn handle_noted(
        &self,
        req: Request<Incoming>,
        conn: Conn,
    ) -> impl Future<Output = (Response<Self::Body>, Note)> + Send {
        async move { (self.handle(req, conn).await, Note::default()) }
    }

    /// Whether this handler takes requests on the express lane.
    const EXPRESS: bool = false;

    /// Whether this handler, an [`EXPRESS`](Self::EXPRESS) one, takes the express lane as
    /// configured (an outbound proxy whose peers get HTTP/2 does not).
    fn express_lane(&self) -> bool {
        Self::EXPRESS
    }

    /// Whether this handler's listener also takes h2c with prior knowledge (told by the
    /// connection preface). The express lane tells it too, so an [`EXPRESS`](Self::EXPRESS)
    /// handler takes it either way.
    const HTTP2: bool = false;

    /// Serves a connection on this handler's own HTTP/1.1 lane until it ends or hands the
    /// connection to hyper (see [`lane`]); only asked when [`EXPRESS`](Self::EXPRESS). The
    /// proxies' lane is the express lane, `proxy::express::connection`.
    fn lane<S: Io>(&self, lane: lane::Lane<'_, S>) -> impl Future<Output = lane::End> + Send {
        let _ = lane;
        async { lane::End::Handoff { rest: Vec::new() } }
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A handler that also notes the service each request was for (a metrics label) and where it
/// went (for the access log): the proxies. Every `Proxy` is a [`Handler`] whose notes reach the
/// serve layer's recorder.
pub trait Proxy: Clone + Send + Sync + 'static {
    type Body: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static;

    /// Answers `req`, setting `note.label` once the service is known.
    fn proxy(
        &self,
        req: Request<Incoming>,
        conn: Conn,
        note: &mut Note,
    ) -> impl Future<Output = Response<Self::Body>> + Send;

    /// Whether this proxy takes requests on the express lane.
    const EXPRESS: bool = false;

    /// Whether this proxy, an [`EXPRESS`](Self::EXPRESS) one, takes the express lane as
    /// configured.
    fn express_lane(&self) -> bool {
        Self::EXPRESS
    }

    /// Serves a connection on the proxy's express lane (see [`Handler::lane`]).
    fn lane<S: Io>(&self, lane: lane::Lane<'_, S>) -> impl Future<Output = lane::End> + Send {
        let _ = lane;
        async { lane::End::Handoff { rest: Vec::new() } }
    }
}

impl<P: Proxy> Handler for P {
    type Body = P::Body;

    async fn handle(&self, req: Request<Incoming>, conn: Conn) -> Response<P::Body> {
        self.proxy(req, conn, &mut Note::default()).await
    }

    async fn handle_noted(&self, req: Request<Incoming>, conn: Conn) -> (Response<P::Body>, Note) {
        let mut note = Note::default();
        let response = self.proxy(req, conn, &mut note).await;
        (response, note)
    }

    const EXPRESS: bool = P::EXPRESS;

    fn express_lane(&self) -> bool {
        Proxy::express_lane(self)
    }

    /// Every proxy takes h2c next to HTTP/1.1 (a gateway's and a bridge's callers are other
    /// proxies, which send HTTP/2 requests on over HTTP/2).
    const HTTP2: bool = true;

    fn lane<S: Io>(&self, lane: lane::Lane<'_, S>) -> impl Future<Output = lane::End> + Send {
        Proxy::lane(self, lane)
    }
}

/// The connection a request arrived on.
#[derive(Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    /// The peer's IP as a header value, built once per connection (for `x-forwarded-for`).
    pub peer_ip: HeaderValue,
    /// The request's position among those the framing guard saw on its connection (0-based):
    /// how [`rejected`](Self::rejected) finds the guard's verdict.
    pub index: u64,
    /// When the request's head was read: the start of its deadline and of its recorded time.
    pub arrived: Instant,
    /// The SPIFFE ID of the mesh certificate the peer presented (a mesh listener's TLS
    /// connection); `None` on a plain connection. Only such a peer's `x-skyline-caller` is
    /// believed (see [`crate::authz`]).
    pub mesh_peer: Option<Arc<str>>,
    verdicts: Verdicts,
    /// Cancelled when the listener's drain has ended.
    drained: CancellationToken,
}

impl Conn {
    /// Whether the framing guard refused this request (for example a bad chunk in its body).
    pub fn rejected(&self) -> bool {
        self.verdicts.rejection_for(self.index).is_some()
    }

    /// Tells the framing guard that this request's answer switches protocols (a `101`): the
    /// connection's later bytes are not HTTP. Call it before the answer is returned.
    pub fn upgraded(&self) {
        self.verdicts.upgraded();
    }

    /// Cancelled when the listener's drain has ended: what an upgraded connection waits for
    /// to close (see the module docs).
    pub fn drained(&self) -> &CancellationToken {
        &self.drained
    }
}

/// Where a proxy listener records its responses: the role it plays, the process's metrics and
/// its access log.
#[derive(Clone, Debug)]
pub struct Recorder {
    pub role: Role,
    pub metrics: Arc<Metrics>,
    pub access: Option<AccessLog>,
}

impl Recorder {
    pub fn new(role: Role, metrics: Arc<Metrics>) -> Self {
        Self {
            role,
            metrics,
            access: None,
        }
    }

    /// The recorder, writing each response's line to `access` too (when there is one).
    pub fn with_access(self, access: Option<AccessLog>) -> Self {
        Self { access, ..self }
    }

    /// Records one response: its status, the mesh error it carries, the service its handler
    /// labelled it with, and the time since the request arrived.
    fn record<B>(&self, response: &Response<B>, label: Option<&ServiceLabel>, started: Instant) {
        let error = response
            .headers()
            .get(&X_SKYLINE_ERROR)
            .and_then(|v| v.to_str().ok());
        self.record_status(response.status().as_u16(), error, label, started);
    }

    /// [`record`](Self::record) from the parts of a response.
    pub fn record_status(
        &self,
        status: u16,
        error: Option<&str>,
        label: Option<&ServiceLabel>,
        started: Instant,
    ) {
        if !self.metrics.enabled() {
            return;
        }
        let service = label.map_or("", |l| l.value(error));
        self.metrics
            .request(self.role, service, status, error, started.elapsed());
    }
}

/// Serves `listener` with `handler` until `shutdown`, then drains in-flight requests for at
/// most [`DRAIN_TIMEOUT`].
pub async fn serve<H: Handler>(listener: TcpListener, handler: H, shutdown: CancellationToken) {
    serve_with(listener, handler, None, None, shutdown).await;
}

/// [`serve`], recording every response (refusals of the framing guard included) in `recorder`.
pub async fn serve_recorded<H: Handler>(
    listener: TcpListener,
    handler: H,
    recorder: Recorder,
    shutdown: CancellationToken,
) {
    serve_with(listener, handler, Some(recorder), None, shutdown).await;
}

/// [`serve_recorded`] for a listener of the mesh's proxies (inbound, gateway, bridge): with
/// mesh TLS on (`tls`), each connection is taken by [`MeshTls::accept`] first (TLS, or plain
/// in permissive mode).
pub async fn serve_mesh<H: Handler>(
    listener: TcpListener,
    handler: H,
    recorder: Recorder,
    tls: Option<MeshTls>,
    shutdown: CancellationToken,
) {
    serve_with(listener, handler, Some(recorder), tls, shutdown).await;
}

async fn serve_with<H: Handler>(
    listener: TcpListener,
    handler: H,
    recorder: Option<Recorder>,
    tls: Option<MeshTls>,
    shutdown: CancellationToken,
) {
    // A mesh listener (one with a recorder: an inbound, a gateway, a bridge) serves the mesh
    // link other proxies dial (see `crate::mux`).
    let links = recorder.is_some();
    let limits = Limits::default();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Some(HEADER_READ_TIMEOUT))
        // Looser than the guard's limits, so the guard (which answers with our error format)
        // always speaks first.
        .max_buf_size(limits.max_head * 2)
        .max_headers(limits.max_headers * 2);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        // Windows sized for large bodies from the start: large gRPC messages (4 MiB by
        // default) and bodies from other proxies multiplexed on a few connections would crawl
        // through HTTP/2's 64 KiB default window. They also bound what a client that sends
        // and never has its body read can make the listener buffer.
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        // A peer that stops answering (gone, or a client that sent the preface and nothing
        // since) is pinged and its connection closed, rather than held until the next drain.
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    h2_limits(&mut h2, &limits);
    let shared = Arc::new(Shared {
        http,
        h2,
        lanes: AtomicUsize::new(0),
        links,
    });
    // Every connection task holds a sender; the drain ends when the last one is dropped.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    // Set when the drain starts; read by every response (an atomic load, where asking the
    // cancellation token would take its lock).
    let draining = Arc::new(AtomicBool::new(false));
    // Cancelled when the drain ends: upgraded connections close then.
    let drained = CancellationToken::new();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            peer,
            peer_ip: HeaderValue::try_from(peer.ip().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            index: 0,
            arrived: Instant::now(),
            mesh_peer: None,
            verdicts: Verdicts::default(),
            drained: drained.clone(),
        };
        let served = Served {
            shared: shared.clone(),
            recorder: recorder.clone(),
            draining: draining.clone(),
            cancelled: shutdown.clone(),
            limits,
            opened: tokio::time::Instant::now(),
            _open: open.clone(),
        };
        let handler = handler.clone();
        // The task is the serving future itself: one that wrapped it would hold each of these
        // values twice for the connection's life. A plain connection's state is not the size
        // of a TLS one's.
        match &tls {
            None => tokio::spawn(serve_plain(stream, conn, handler, served)),
            Some(tls) => tokio::spawn(serve_tls(stream, conn, handler, served, tls.clone())),
        };
    }
    draining.store(true, Ordering::Relaxed);
    drop(listener);
    drop(open);
    if tokio::time::timeout(DRAIN_TIMEOUT, all_closed.recv())
        .await
        .is_err()
    {
        tracing::warn!("drain timed out; closing the remaining connections");
    }
    drained.cancel();
}

/// What serving one connection needs besides its stream, its handler and its [`Conn`].
struct Served {
    shared: Arc<Shared>,
    recorder: Option<Recorder>,
    draining: Arc<AtomicBool>,
    cancelled: CancellationToken,
    limits: Limits,
    /// When the connection was accepted: its first head is due [`HEADER_READ_TIMEOUT`] after.
    opened: tokio::time::Instant,
    /// Held while the connection is served: the drain waits for every one to be dropped.
    _open: mpsc::Sender<()>,
}

/// One connection counted in a listener's [`Shared::lanes`] while it lives.
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn new(lanes: &'a AtomicUsize) -> Self {
        lanes.fetch_add(1, Ordering::Relaxed);
        Self(lanes)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a listener's connections share: hyper's servers as the listener configured them, and
/// how many of its plain connections hold a lane's state (see [`lane::CROWD`]).
struct Shared {
    http: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    lanes: AtomicUsize,
    /// The listener serves the mesh link ([`crate::mux`]).
    links: bool,
}

/// Serves a connection on a mesh listener: TLS when the peer starts a handshake (see
/// [`MeshTls::accept`]). On the express lane, a connection that has sent nothing yet costs a
/// small task: the handshake's state and the lanes' are allocated, boxed, once there are bytes
/// to read. Many callers open connections long before they use them.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn holds its arguments twice"
)]
fn serve_tls<H: Handler>(
    stream: tokio::net::TcpStream,
    conn: Conn,
    handler: H,
    served: Served,
    tls: MeshTls,
) -> impl Future<Output = ()> + Send {
    async move {
        if H::EXPRESS {
            let waits = pin!(Waits::new(served.opened, &served.cancelled));
            if !waits.until(served.opened, || peeked(&stream)).await {
                return;
            }
        }
        Box::pin(async move {
            match tls.accept(stream, conn.peer).await {
                Accepted::Tls(stream, id) => {
                    let conn = Conn {
                        mesh_peer: Some(id),
                        ..conn
                    };
                    serve_connection(*stream, conn, handler, served).await
                }
                Accepted::Plain(stream) => serve_connection(stream, conn, handler, served).await,
                Accepted::Refused => {}
            }
        })
        .await;
    }
}

/// Serves a plain TCP connection. On the express lane it rests when idle: the lane's state is
/// boxed while the connection is busy and dropped once it went [`lane::REST_AFTER`] without a
/// request, and the connection then waits for its next bytes holding only the socket, its
/// timer and its drain signal (see [`lane::End::Rest`]). A connection that has sent nothing
/// yet rests the same way.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn holds its arguments twice"
)]
fn serve_plain<H: Handler>(
    mut stream: tokio::net::TcpStream,
    mut conn: Conn,
    handler: H,
    served: Served,
) -> impl Future<Output = ()> + Send {
    async move {
        if !H::EXPRESS {
            return Box::pin(serve_connection(stream, conn, handler, served)).await;
        }
        let lane_end = 'lane: {
            let mut waits = pin!(Waits::new(served.opened, &served.cancelled));
            // A peek first: tokio takes an accepted stream as readable until a read says
            // otherwise, and a peek is that read (it leaves the bytes for the lane).
            if !waits
                .as_mut()
                .until(served.opened, || peeked(&stream))
                .await
            {
                return;
            }
            if !handler.express_lane() {
                break 'lane None;
            }
            match resting_lanes(&mut stream, &mut conn, &handler, &served, waits).await {
                Some(end) => Some(end),
                None => return,
            }
        };
        match lane_end {
            Some(end) => Box::pin(after_lane(stream, conn, handler, served, end)).await,
            None => Box::pin(serve_connection(stream, conn, handler, served)).await,
        }
    }
}

/// Serves a connection (a plain TCP one, or a stream of a mesh link) on the express lane,
/// resting between requests: the lane's state is boxed while the connection is busy and
/// dropped once it rests (see [`lane::End::Rest`]), and the connection waits in `waits` for its
/// next bytes. How the lane ended, or `None`: it closed, or timed out, while resting.
async fn resting_lanes<H: Handler, S: Io + Resting>(
    stream: &mut S,
    conn: &mut Conn,
    handler: &H,
    served: &Served,
    mut waits: Pin<&mut Waits<'_>>,
) -> Option<lane::End> {
    let mut since = served.opened;
    let mut first = true;
    loop {
        let lane = handler.lane(lane::Lane {
            opened: since,
            first,
            held: Some(&served.shared.lanes),
            stream: &mut *stream,
            conn: &mut *conn,
            recorder: served.recorder.as_ref(),
            draining: &served.draining,
            shutdown: &served.cancelled,
        });
        let held = Held::new(&served.shared.lanes);
        let end = Box::pin(lane).await;
        drop(held);
        match end {
            lane::End::Rest { since: idle } => since = idle,
            end => return Some(end),
        }
        first = false;
        let resting: &S = stream;
        if !waits
            .as_mut()
            .until(since, move || resting.has_bytes())
            .await
        {
            return None;
        }
    }
}

/// A connection that can wait for its next bytes without reading them.
trait Resting {
    /// Resolves when a read would not wait (`false`: the connection failed).
    fn has_bytes(&self) -> impl Future<Output = bool> + Send + '_;
}

impl Resting for tokio::net::TcpStream {
    /// The reactor's word, after a read that emptied the socket.
    async fn has_bytes(&self) -> bool {
        std::future::poll_fn(|cx| self.poll_read_ready(cx))
            .await
            .is_ok()
    }
}

impl Resting for crate::mux::Stream {
    /// A stream's end or failure is read as a socket's is: it is ready then too.
    async fn has_bytes(&self) -> bool {
        self.readable().await;
        true
    }
}

/// Whether a stream no read was made on yet has bytes: a peek (tokio takes a new stream as
/// readable until a read says otherwise, and a peek is that read; it leaves the bytes).
async fn peeked(stream: &tokio::net::TcpStream) -> bool {
    stream.peek(&mut [0u8; 1]).await.is_ok()
}

pin_project_lite::pin_project! {
    /// The waits of a connection between requests: one timer and one drain signal for its
    /// life, so that a rest costs neither a timer nor a new waiter (the timer is moved on only
    /// when it fires early).
    struct Waits<'c> {
        #[pin]
        timer: tokio::time::Sleep,
        #[pin]
        cancelled: tokio_util::sync::WaitForCancellationFuture<'c>,
        drain_seen: bool,
    }
}

impl<'c> Waits<'c> {
    /// For a connection accepted at `opened` that drains on `cancelled`.
    fn new(opened: tokio::time::Instant, cancelled: &'c CancellationToken) -> Self {
        Self {
            timer: tokio::time::sleep_until(opened + HEADER_READ_TIMEOUT),
            cancelled: cancelled.cancelled(),
            drain_seen: false,
        }
    }

    /// Waits until a connection idle since `since` has bytes to read (or has ended), as
    /// `ready()` tells: whether it does within [`HEADER_READ_TIMEOUT`] of `since`, or within
    /// [`DRAIN_IDLE_GRACE`] of the drain's start, as the express lane allows a connection that
    /// has not sent a whole head.
    async fn until<F: Future<Output = bool>>(
        self: Pin<&mut Self>,
        since: tokio::time::Instant,
        mut ready: impl FnMut() -> F,
    ) -> bool {
        let mut this = self.project();
        let mut deadline = since + HEADER_READ_TIMEOUT;
        if *this.drain_seen {
            deadline = deadline.min(tokio::time::Instant::now() + DRAIN_IDLE_GRACE);
            this.timer.as_mut().reset(deadline);
        }
        loop {
            let ready = ready();
            let drain_seen = *this.drain_seen;
            tokio::select! {
                biased;
                ready = ready => return ready,
                () = this.cancelled.as_mut(), if !drain_seen => {
                    *this.drain_seen = true;
                    deadline = deadline.min(tokio::time::Instant::now() + DRAIN_IDLE_GRACE);
                    this.timer.as_mut().reset(deadline);
                }
                () = this.timer.as_mut() => {
                    if tokio::time::Instant::now() >= deadline {
                        return false;
                    }
                    // Set for an earlier wait: move it to this one's deadline.
                    this.timer.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// Serves one accepted connection (a TCP one, or TLS over it on a mesh listener): on the
/// express lane first when the handler takes it (or, on a listener without it that speaks
/// HTTP/2, after a look at its first bytes for HTTP/2's preface), then with hyper.
async fn serve_connection<H: Handler, S: Io>(
    mut stream: S,
    mut conn: Conn,
    handler: H,
    served: Served,
) {
    let end = first_lane(&mut stream, &mut conn, &handler, &served).await;
    after_lane(stream, conn, handler, served, end).await;
}

/// Serves a stream of a mesh link as a connection: as [`serve_connection`] does, except that a
/// stream cannot carry a link of its own.
async fn serve_stream<H: Handler>(
    mut stream: crate::mux::Stream,
    mut conn: Conn,
    handler: H,
    served: Served,
) {
    let end = if H::EXPRESS && handler.express_lane() {
        // On the express lane a stream rests between requests as a plain connection does:
        // a pooled stream's task holds no lane state, and a burst of requests on new streams
        // reuses the memory of those before it.
        let waits = pin!(Waits::new(served.opened, &served.cancelled));
        match resting_lanes(&mut stream, &mut conn, &handler, &served, waits).await {
            Some(end) => end,
            None => return,
        }
    } else {
        Box::pin(first_lane(&mut stream, &mut conn, &handler, &served)).await
    };
    let end = match end {
        lane::End::Mux { rest } => lane::End::Handoff { rest },
        end => end,
    };
    // Boxed, as the lane: a stream's task weighs only what waits between requests.
    Box::pin(serve_rest(stream, conn, handler, served, end)).await;
}

/// A connection's first lane: the express lane when the handler takes it, else a look at its
/// first bytes for HTTP/2's preface on a listener that speaks HTTP/2.
async fn first_lane<H: Handler, S: Io>(
    stream: &mut S,
    conn: &mut Conn,
    handler: &H,
    served: &Served,
) -> lane::End {
    if H::EXPRESS && handler.express_lane() {
        let lane = handler.lane(lane::Lane {
            opened: served.opened,
            first: true,
            held: None,
            stream,
            conn,
            recorder: served.recorder.as_ref(),
            draining: &served.draining,
            shutdown: &served.cancelled,
        });
        lane.await
    } else if H::HTTP2 {
        match lane::sniff(stream, &served.cancelled).await {
            lane::Sniffed::Closed => lane::End::Closed,
            lane::Sniffed::Http1 { rest } => lane::End::Handoff { rest },
            lane::Sniffed::Http2 { rest } => lane::End::Http2 { rest },
            lane::Sniffed::Mux { rest } => lane::End::Mux { rest },
        }
    } else {
        lane::End::Handoff { rest: Vec::new() }
    }
}

/// Serves what is left of a connection once its lane ended (`end`): with hyper's HTTP/1.1
/// server behind the framing guard, or its HTTP/2 server.
async fn after_lane<H: Handler, S: Io>(
    stream: S,
    conn: Conn,
    handler: H,
    served: Served,
    end: lane::End,
) {
    match end {
        lane::End::Mux { rest } if served.shared.links => {
            Box::pin(serve_link(stream, rest, conn, handler, served)).await;
        }
        end => serve_rest(stream, conn, handler, served, end).await,
    }
}

/// Serves what is left of a connection once its lane ended (`end`) and it is not a mesh
/// link: with hyper's HTTP/1.1 server behind the framing guard, or its HTTP/2 server.
async fn serve_rest<H: Handler, S: Io>(
    stream: S,
    conn: Conn,
    handler: H,
    served: Served,
    end: lane::End,
) {
    let Served {
        shared,
        recorder,
        draining,
        cancelled,
        limits,
        ..
    } = served;
    let rest = match end {
        // A lane that may not rest does not; a lane that closed is done.
        lane::End::Closed | lane::End::Rest { .. } => return,
        // Not a mesh listener: HTTP/1.1's answer to a request line it cannot read.
        lane::End::Handoff { rest } | lane::End::Mux { rest } => rest,
        lane::End::Http2 { rest } => {
            let io = lane::Rewind::new(stream, rest);
            // Boxed: every connection task would otherwise carry its size.
            Box::pin(serve_h2(&shared.h2, io, conn, handler, recorder, cancelled)).await;
            return;
        }
    };
    // The guard numbers the requests it sees from 0.
    let (io, verdicts) = Guarded::new(lane::Rewind::new(stream, rest), limits);
    let conn = Conn { verdicts, ..conn };
    serve_hyper(
        &shared.http,
        io,
        conn,
        handler,
        recorder,
        draining,
        cancelled,
    )
    .await;
}

/// Serves a mesh link another proxy dialled (see [`crate::mux`]): each stream it opens as a
/// connection of its own, from the link's peer and with its mesh identity. Once the drain has
/// started, the link takes new streams for half of [`DRAIN_IDLE_GRACE`] (each answer says
/// `Connection: close`, as on a connection of its own, so requests already on their way are
/// served: the dialler may be this process's own outbound, whose new link would wait for the
/// next process), then goes away: the dialler opens no more streams on it and reuses none of
/// its idle ones before the streams' own drain closes them (the frames are in order, so no
/// request goes out on a stream as it closes), and the link closes once its streams have.
async fn serve_link<H: Handler, S: Io>(
    stream: S,
    rest: Vec<u8>,
    conn: Conn,
    handler: H,
    served: Served,
) {
    // A link with no stream for as long as a connection may wait for a request is closed.
    let Ok(link) = crate::mux::Link::listen(stream, rest, HEADER_READ_TIMEOUT).await else {
        return;
    };
    let shutdown = served.cancelled.clone();
    let mut cancelled = pin!(shutdown.cancelled());
    // Set when the drain starts: the link goes away half a [`DRAIN_IDLE_GRACE`] later.
    let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut gone = false;
    loop {
        let accepted = tokio::select! {
            biased;
            () = cancelled.as_mut(), if grace.is_none() => {
                grace = Some(Box::pin(tokio::time::sleep(DRAIN_IDLE_GRACE / 2)));
                continue;
            }
            () = async {
                match grace.as_mut() {
                    Some(grace) => grace.await,
                    None => std::future::pending().await,
                }
            }, if grace.is_some() && !gone => {
                link.go_away();
                gone = true;
                continue;
            }
            accepted = link.accept() => accepted,
        };
        let Some(stream) = accepted else { break };
        let conn = Conn {
            peer: conn.peer,
            peer_ip: conn.peer_ip.clone(),
            index: 0,
            arrived: Instant::now(),
            mesh_peer: conn.mesh_peer.clone(),
            verdicts: Verdicts::default(),
            drained: conn.drained.clone(),
        };
        let served = Served {
            shared: served.shared.clone(),
            recorder: served.recorder.clone(),
            draining: served.draining.clone(),
            cancelled: served.cancelled.clone(),
            limits: served.limits,
            opened: tokio::time::Instant::now(),
            _open: served._open.clone(),
        };
        tokio::spawn(serve_stream(stream, conn, handler.clone(), served));
    }
}

/// A connection's byte stream: TCP, or TLS over TCP.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for S {}

/// Serves a connection with hyper until it ends, draining on `cancelled`. `first` is the
/// connection as the first request hyper serves will see it (the express lane may have served
/// some before).
async fn serve_hyper<H: Handler, S: Io>(
    http: &http1::Builder,
    io: Guarded<lane::Rewind<S>>,
    first: Conn,
    handler: H,
    recorder: Option<Recorder>,
    draining: Arc<AtomicBool>,
    cancelled: CancellationToken,
) {
    let peer = first.peer;
    let next_index = AtomicU64::new(first.index);
    let service = service_fn(move |mut req: Request<Incoming>| {
        let arrived = Instant::now();
        let conn = Conn {
            index: next_index.fetch_add(1, Ordering::Relaxed),
            arrived,
            ..first.clone()
        };
        let seen = recorder.as_ref().and_then(|r| Seen::of(r, &mut req));
        let handler = handler.clone();
        let recorder = recorder.clone();
        let draining = draining.clone();
        async move {
            let (mut response, note) = respond(&handler, req, conn).await;
            if let Some(recorder) = recorder {
                recorder.record(&response, note.label.as_ref(), arrived);
            }
            if draining.load(Ordering::Relaxed) {
                close_after(&mut response);
            }
            Ok::<_, Infallible>(logged(response, seen, note, arrived))
        }
    });
    // With upgrades: after a `101`, hyper hands the connection to the proxy's tunnel.
    let connection = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = cancelled.cancelled() => {
            // Draining: answers now say `Connection: close`; give an idle connection its
            // grace, then close it (after the response in flight, if any).
            tokio::select! {
                result = connection.as_mut() => result,
                () = tokio::time::sleep(DRAIN_IDLE_GRACE) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// How often an HTTP/2 connection is pinged (when idle), and how long a ping may go unanswered
/// before the connection is closed.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams one HTTP/2 connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`);
/// a client that opens more has them refused (`RST_STREAM` with `REFUSED_STREAM`). hyper's
/// default is 200, NGINX's 128, Go's 250; RFC 9113 advises no less than 100. The inbound
/// listener carries a whole peer node's HTTP/2 requests on one connection, so the limit is
/// the number of concurrent gRPC calls between two nodes before the next wait for a slot.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// The flow-control window an HTTP/2 listener gives each stream (HTTP/2's default: 64 KiB).
pub const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// The flow-control window an HTTP/2 listener gives a whole connection.
pub const H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Bytes of response data queued per stream ahead of the socket (hyper's default is ~400
/// KiB). With [`H2_MAX_CONCURRENT_STREAMS`] this bounds what a client that stops reading can
/// make one connection hold: 256 × 128 KiB = 32 MiB.
pub const H2_MAX_SEND_BUF_SIZE: usize = 128 * 1024;
/// Streams the client may reset before hyper has accepted them; one more and the connection
/// ends with GOAWAY (`ENHANCE_YOUR_CALM`). h2's default, the rapid-reset (CVE-2023-44487)
/// mitigation of hyper; resets of accepted streams are charged by [`flood`].
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset because of the client's errors (a malformed request, a
/// stream over the concurrency limit) before the connection ends with GOAWAY
/// (RUSTSEC-2024-0003). hyper's default.
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// How long the streams in flight on a connection that overdrew its control-frame budget
/// ([`flood`]) have to finish after its GOAWAY, as in a drain.
pub const H2_FLOOD_GRACE: Duration = DRAIN_TIMEOUT;
/// How long a connection that flooded on after its GOAWAY (a second budget of debt) stays open
/// before it is closed: time for the GOAWAY to be written.
const H2_FLOOD_CLOSE: Duration = Duration::from_secs(1);

/// The HTTP/2 abuse limits of every listener that speaks HTTP/2 (the README's "Limits on HTTP/2
/// connections"). The header limit is the HTTP/1 head's, so both protocols take the same requests;
/// h2 ends a connection with GOAWAY when a header block runs far over it or its CONTINUATION
/// frames outnumber what the limit needs (CVE-2024-27316's flood).
fn h2_limits(h2: &mut http2::Builder<TokioExecutor>, limits: &Limits) {
    h2.max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(u32::try_from(limits.max_head).unwrap_or(u32::MAX))
        .max_send_buf_size(H2_MAX_SEND_BUF_SIZE)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        // HTTP/2's defaults, stated: a 4 KiB HPACK table and 16 KiB frames.
        .header_table_size(4096)
        .max_frame_size(16 * 1024);
}

/// Serves an HTTP/2 connection (h2c with prior knowledge; the express lane saw its preface)
/// with hyper until it ends. Each request is the handler's as an HTTP/1.1 one would be, its
/// `:authority` given as `Host`; there is no framing guard (HTTP/2 frames carry no ambiguous
/// lengths). On drain the connection is told to go away (GOAWAY) and its streams in flight
/// finish. A connection that overdraws its control-frame budget ([`flood`]) is told to go
/// away as well, its streams in flight given [`H2_FLOOD_GRACE`]; one that floods on is read no
/// further and closed after [`H2_FLOOD_CLOSE`].
async fn serve_h2<H: Handler, S: Io>(
    http: &http2::Builder<TokioExecutor>,
    io: lane::Rewind<S>,
    first: Conn,
    handler: H,
    recorder: Option<Recorder>,
    cancelled: CancellationToken,
) {
    let peer = first.peer;
    let service = service_fn(move |mut req: Request<Incoming>| {
        let arrived = Instant::now();
        let conn = Conn {
            arrived,
            ..first.clone()
        };
        authority_as_host(&mut req);
        let seen = recorder.as_ref().and_then(|r| Seen::of(r, &mut req));
        let handler = handler.clone();
        let recorder = recorder.clone();
        async move {
            let (response, note) = handler.handle_noted(req, conn).await;
            if let Some(recorder) = recorder {
                recorder.record(&response, note.label.as_ref(), arrived);
            }
            Ok::<_, Infallible>(logged(response, seen, note, arrived))
        }
    });
    let (io, tripwire) = flood::Metered::new(io);
    let connection = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = cancelled.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = tripwire.overdrawn() => {
            tracing::warn!(%peer, "HTTP/2 control-frame budget overdrawn; sending GOAWAY");
            connection.as_mut().graceful_shutdown();
            let flooding_on = async {
                tripwire.exhausted().await;
                tracing::warn!(%peer, "HTTP/2 control-frame flood after GOAWAY; closing");
                tokio::time::sleep(H2_FLOOD_CLOSE).await;
            };
            tokio::select! {
                result = connection.as_mut() => result,
                () = flooding_on => return,
                () = tokio::time::sleep(H2_FLOOD_GRACE) => return,
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "HTTP/2 connection ended with an error");
    }
}

/// An HTTP/2 request's `:authority` as its `Host` header (when it has none), so the header
/// rules read it as they read an HTTP/1.1 request's.
fn authority_as_host<B>(req: &mut Request<B>) {
    if req.headers().contains_key(http::header::HOST) {
        return;
    }
    let host = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    if let Some(host) = host {
        req.headers_mut().insert(http::header::HOST, host);
    }
}

/// The handler's response and note, or the framing guard's refusal of the request.
async fn respond<H: Handler>(
    handler: &H,
    req: Request<Incoming>,
    conn: Conn,
) -> (Response<Either<H::Body, Full<Bytes>>>, Note) {
    if let Some(rejection) = conn.verdicts.rejection_for(conn.index) {
        tracing::debug!(peer = %conn.peer, reason = rejection.reason, "request refused");
        let error = MeshError::BadRequest {
            status: rejection.status,
            detail: rejection.reason,
        };
        let response = error.response("").map(Either::Right);
        return (response, Note::default());
    }
    let (response, note) = handler.handle_noted(req, conn).await;
    (response.map(Either::Left), note)
}

// === Access log ===

/// What the access log takes from a request before its handler consumes it: its id, the
/// declared length of its body and the sampling draw.
struct Seen {
    log: AccessLog,
    role: Role,
    request_id: HeaderValue,
    bytes_in: Option<u64>,
    drawn: bool,
}

impl Seen {
    /// `None` when there is no access log. A request without an `x-request-id` gets its id
    /// here, which the forwarder sends on.
    fn of(recorder: &Recorder, req: &mut Request<Incoming>) -> Option<Seen> {
        let log = recorder.access.as_ref()?.clone();
        let drawn = log.sampled();
        let request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = request_id();
                req.headers_mut().insert(&X_REQUEST_ID, id.clone());
                id
            }
        };
        let bytes_in = http_body::Body::size_hint(req.body()).exact();
        Some(Seen {
            log,
            role: recorder.role,
            request_id,
            bytes_in,
            drawn,
        })
    }
}

/// `response` with a body that writes the request's access log line when it ends.
fn logged<B>(
    response: Response<B>,
    seen: Option<Seen>,
    note: Note,
    arrived: Instant,
) -> Response<Logged<B>> {
    let pending = seen.map(|seen| Pending {
        status: response.status().as_u16(),
        error: response.headers().get(&X_SKYLINE_ERROR).cloned(),
        seen,
        note,
        arrived,
        bytes_out: 0,
    });
    response.map(|inner| Logged { inner, pending })
}

/// A request's access log line, waiting for the end of its response body.
struct Pending {
    seen: Seen,
    note: Note,
    status: u16,
    error: Option<HeaderValue>,
    arrived: Instant,
    bytes_out: u64,
}

impl Pending {
    fn write(&self) {
        let error = self.error.as_ref().and_then(|e| e.to_str().ok());
        if !AccessLog::keeps(self.seen.drawn, self.status, error) {
            return;
        }
        let answer = Answered {
            status: self.status,
            error,
            bytes_in: self.seen.bytes_in,
            bytes_out: self.bytes_out,
        };
        let id = self.seen.request_id.as_bytes();
        access_line(
            &self.seen.log,
            self.seen.role,
            &self.note,
            id,
            answer,
            self.arrived,
        );
    }
}

/// How a request was answered, for its access log line.
pub struct Answered<'a> {
    pub status: u16,
    pub error: Option<&'a str>,
    pub bytes_in: Option<u64>,
    pub bytes_out: u64,
}

/// Writes one request's access log line: the one place every listener's lines are made (the
/// express lane's and hyper's, HTTP/1 and HTTP/2).
pub fn access_line(
    log: &AccessLog,
    role: Role,
    note: &Note,
    request_id: &[u8],
    answer: Answered<'_>,
    arrived: Instant,
) {
    let mut entry = Entry::noted(role, note, request_id);
    entry.status = answer.status;
    entry.error = answer.error;
    entry.bytes_in = answer.bytes_in;
    entry.bytes_out = answer.bytes_out;
    entry.duration = arrived.elapsed();
    log.write(&entry);
}

pin_project_lite::pin_project! {
    /// A response body that writes its request's access log line when it ends, or when it is
    /// dropped before (the client went away): with the body bytes sent and the time until then.
    pub struct Logged<B> {
        #[pin]
        inner: B,
        pending: Option<Pending>,
    }

    impl<B> PinnedDrop for Logged<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(pending) = this.project().pending.take() {
                pending.write();
            }
        }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for Logged<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(pending), Some(data)) = (this.pending.as_mut(), frame.data_ref()) {
                    pending.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(pending) = this.pending.take() {
                    pending.write();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Marks a response sent while draining as the connection's last (hyper closes the connection
/// once it is written). A protocol switch keeps its connection: that is what it asked for.
fn close_after<B>(response: &mut Response<B>) {
    if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Waits for every task in `tasks`, re-raising a panic of any of them (so a test sees it).
pub async fn join_all(tasks: &mut tokio::task::JoinSet<()>) {
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

/// Serves a listening socket a supervisor passed (see [`activation`]) with tokio. Needs a
/// running tokio runtime.
pub fn adopt(listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Binds a TCP listener with `SO_REUSEADDR`, so a restarted process can bind at once.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
