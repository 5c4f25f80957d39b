//! Keep-alive connections to upstreams, per endpoint address.
//!
//! Written over `hyper::client::conn::http1` rather than hyper-util's general-purpose client:
//! in profiles of the two-hop benchmark that client's checkout, key hashing and future layering
//! cost more than the proxy's own work. This pool does only what a proxy needs: take the most
//! recently used connection to an address, send, and give the connection back when the
//! response body has been read to its end.
//!
//! A pooled connection can be closed by the upstream just as a request goes out on it (its idle
//! timeout fired). hyper hands back a request it had not started to write; one it wrote but got
//! no response for (EOF or a reset) is replayed on another connection when the caller gave a
//! [`Replay`] (an idempotent method with an empty or buffered body), as Go's HTTP transport does
//! for reused connections. The forwarder gives one at the first hop only (see
//! `proxy::replayable`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashMap;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::Either;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::Sleep;

use crate::mux;
use crate::tls::{MeshStream, MeshTls};

/// The most idle connections kept per endpoint.
pub const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// A forwarded request's body: the client's, streamed, or one held in memory (a body-less or
/// buffered request, which can be sent again).
pub type RequestBody = Either<super::Streamed, Buffered>;

/// A request body held in memory: its bytes and the trailers that followed them (an HTTP/2
/// client, gRPC's for one, may send trailers after a small body too).
#[derive(Clone, Debug, Default)]
pub struct Buffered {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Buffered {
    pub fn new(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self { data, trailers }
    }

    /// No bytes, no trailers.
    pub fn empty() -> Self {
        Self::default()
    }
}

impl Body for Buffered {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if !self.data.is_empty() {
            let data = std::mem::take(&mut self.data);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.len() as u64)
    }
}

/// A request kept so it can be sent again: its head and its whole (small) body.
#[derive(Debug)]
pub struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Buffered,
}

impl Replay {
    /// Keeps `req`'s head and `body`, when resending is safe: an idempotent method
    /// (RFC 9110 §9.2.2).
    pub fn of(req: &Request<RequestBody>, body: Buffered) -> Option<Self> {
        is_idempotent(req.method()).then(|| Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
        })
    }

    /// Keeps `req`'s head and `body` whatever its method: a copy to send on only when a later
    /// hop answers that it never forwarded the request (never handed to [`Pool::send`], which
    /// replays on its own).
    pub fn unsent_copy(req: &Request<RequestBody>, body: Buffered) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
        }
    }

    /// The request again.
    pub fn request(&self) -> Request<RequestBody> {
        let mut req = Request::new(Either::Right(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

pub use crate::error::SendError;

/// A request that got no response; `unsent` gives it back when it certainly never reached the
/// upstream (so it is safe to send elsewhere, whatever its method or body).
#[derive(Debug)]
pub struct SendFailure {
    pub error: SendError,
    pub unsent: Option<Request<RequestBody>>,
}

// === Idle ===

/// Idle keep-alive connections per endpoint address: the one keep-alive policy of both pools
/// ([`Pool`]'s hyper senders, the express lane's raw connections in `express::RawPool`).
///
/// Per endpoint, oldest first, each with the moment it expires. [`take`](Self::take) hands
/// out the most recently used connection that has not expired and is still open, closing the
/// others it passes; [`put`](Self::put) closes the expired ones first (so an endpoint no
/// longer used does not keep them) and keeps at most [`MAX_IDLE_PER_ENDPOINT`].
#[derive(Debug)]
pub(crate) struct Idle<C> {
    conns: Mutex<HashMap<SocketAddr, Vec<(C, Instant)>>>,
    timeout: Duration,
}

impl<C> Idle<C> {
    /// Connections kept for `timeout` after their last use.
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    /// The most recently used connection to `addr` that has not expired and is `open`.
    pub(crate) fn take(&self, addr: SocketAddr, open: impl Fn(&C) -> bool) -> Option<C> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(&addr)?;
        let now = Instant::now();
        while let Some((conn, expires)) = list.pop() {
            if now < expires && open(&conn) {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn`, just used, for the next request to `addr`.
    pub(crate) fn put(&self, addr: SocketAddr, conn: C) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.entry(addr).or_default();
        let now = Instant::now();
        // Oldest first: nothing to drop unless the first one expired.
        if list.first().is_some_and(|&(_, expires)| expires <= now) {
            list.retain(|&(_, expires)| now < expires);
        }
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push((conn, now + self.timeout));
        }
    }

    /// Idle connections held now, over every endpoint (for tests).
    pub(crate) fn count(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.values().map(Vec::len).sum()
    }
}

// === Pool ===

/// Idle connections by endpoint. Cheap to clone: one shared map.
#[derive(Clone, Debug)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    idle: Idle<Sender>,
    /// Mesh TLS, for connections to endpoints that are mesh proxies ([`Limits::mesh`]).
    tls: Option<MeshTls>,
    /// The mesh links to mesh proxies, when requests to them go on streams of one link
    /// (`[mesh] peer_protocol = "mux"`).
    links: Option<mux::Links>,
    idle_timeout: Duration,
}

impl Pool {
    /// A pool keeping idle connections for `idle_timeout`.
    pub fn new(idle_timeout: Duration) -> Self {
        Self::with_tls(idle_timeout, None)
    }

    /// A pool that speaks mesh TLS (when `tls`) to the endpoints that are mesh proxies.
    pub fn with_tls(idle_timeout: Duration, tls: Option<MeshTls>) -> Self {
        Self {
            inner: Arc::new(Inner {
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
            inner: Arc::new(Inner {
                idle: Idle::new(self.inner.idle_timeout),
                tls: self.inner.tls.clone(),
                links: Some(links),
                idle_timeout: self.inner.idle_timeout,
            }),
        }
    }

    /// The mesh TLS a connection to an endpoint with these `limits` speaks.
    fn tls_for(&self, limits: &Limits) -> Option<&MeshTls> {
        self.inner.tls.as_ref().filter(|_| limits.mesh)
    }

    /// The mesh links a connection to an endpoint with these `limits` goes on, if any.
    fn links_for(&self, limits: &Limits) -> Option<(&mux::Links, Duration)> {
        let links = self.inner.links.as_ref().filter(|_| limits.mesh)?;
        Some((links, self.inner.idle_timeout))
    }

    /// Sends `req` (origin-form target, `Host` set) to `addr` and returns the response, whose
    /// body gives the connection back to the pool once read to its end.
    ///
    /// A pooled connection that turns out to be closed is dropped and the request goes on the
    /// next one (see the module docs for when that is safe); every attempt uses up a pooled
    /// connection, and at most one fresh connection is made. The response body gives up when
    /// it stalls for `limits.idle`.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<RequestBody>,
        replay: Option<&Replay>,
        limits: Limits,
    ) -> Result<Response<PooledBody>, SendFailure> {
        let mut refusals = 0;
        loop {
            let (sender, reused) = match self.take(addr) {
                Some(sender) => (sender, true),
                // Boxed: the rare connect path would otherwise size every request's future.
                None => match Box::pin(connect(
                    addr,
                    limits.connect,
                    false,
                    self.tls_for(&limits),
                    self.links_for(&limits),
                ))
                .await
                {
                    Ok(sender) => (sender, false),
                    Err(error) => {
                        return Err(SendFailure {
                            error,
                            unsent: Some(req),
                        });
                    }
                },
            };
            let Sender {
                requests: mut sender,
                link,
            } = sender;
            if reused && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let pool = self.clone();
                    return Ok(response.map(|body| PooledBody {
                        body,
                        done: false,
                        home: Some((
                            pool,
                            addr,
                            Sender {
                                requests: sender,
                                link,
                            },
                        )),
                        idle: limits.idle,
                        stalled: None,
                    }));
                }
                Err(mut e) => match (e.take_message(), replay.filter(|_| reused)) {
                    // A stream of a mesh link the peer refused (it was going away): it read
                    // nothing, so the request goes again on a new stream (a new link), once.
                    (unsent, _) if refusals == 0 && mux::refused_in(e.error()) => {
                        refusals += 1;
                        match (unsent, replay) {
                            (Some(unsent), _) => req = unsent,
                            (None, Some(replay)) => req = replay.request(),
                            (None, None) => {
                                let error = SendError::Refused {
                                    addr,
                                    source: e.into_error(),
                                };
                                return Err(SendFailure {
                                    error,
                                    unsent: None,
                                });
                            }
                        }
                    }
                    (Some(unsent), _) if reused => req = unsent,
                    (_, Some(replay)) => {
                        tracing::debug!(%addr, "pooled connection closed under the request; replaying");
                        req = replay.request();
                    }
                    (unsent, _) => {
                        let error = SendError::Upstream {
                            addr,
                            source: e.into_error(),
                        };
                        return Err(SendFailure { error, unsent });
                    }
                },
            }
        }
    }

    /// The most recently used open connection to `addr`, if any. A stream of a link dialled
    /// before the certificate changed is not reused (the link takes no new stream either).
    fn take(&self, addr: SocketAddr) -> Option<Sender> {
        let tag = self.inner.tls.as_ref().map_or(0, MeshTls::generation);
        self.inner.idle.take(addr, |sender| {
            !sender.requests.is_closed() && sender.link.is_none_or(|link| link == tag)
        })
    }

    fn put(&self, addr: SocketAddr, sender: Sender) {
        if !sender.requests.is_closed() {
            self.inner.idle.put(addr, sender);
        }
    }

    /// Sends an upgrade request (see `proxy::upgrade`) to `addr` on a connection of its own,
    /// which is never pooled: after a `101`, `hyper::upgrade::on` of the response gives it
    /// over. Only a refused connection gives the request back.
    pub async fn send_upgrade(
        &self,
        addr: SocketAddr,
        req: Request<RequestBody>,
        limits: Limits,
    ) -> Result<Response<PooledBody>, SendFailure> {
        let mut sender =
            match connect(addr, limits.connect, true, self.tls_for(&limits), None).await {
                Ok(sender) => sender.requests,
                Err(error) => {
                    return Err(SendFailure {
                        error,
                        unsent: Some(req),
                    });
                }
            };
        match sender.send_request(req).await {
            Ok(response) => Ok(response.map(|body| PooledBody {
                body,
                done: false,
                home: None,
                idle: limits.idle,
                stalled: None,
            })),
            Err(source) => Err(SendFailure {
                error: SendError::Upstream { addr, source },
                unsent: None,
            }),
        }
    }

    /// Idle connections held now, over every endpoint (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.inner.idle.count()
    }
}

/// A TCP connection to `addr` within `timeout`, with Nagle off: the start of every upstream
/// connection, HTTP/1 or HTTP/2.
pub(crate) async fn dial_tcp(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, SendError> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| SendError::ConnectTimeout { addr })?
        .map_err(|source| SendError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A connection to an upstream: plain TCP, or mesh mTLS to another Skyline proxy.
pub(crate) type Dialled = tokio_util::either::Either<tokio::net::TcpStream, Box<MeshStream>>;

/// Connects to `addr` (Nagle off), and over mesh mTLS when `tls` (a refused handshake is a
/// refused connection: nothing was sent); no time limit of its own.
pub(crate) async fn dial(addr: SocketAddr, tls: Option<&MeshTls>) -> std::io::Result<Dialled> {
    use tokio_util::either::Either;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    // A peer whose host vanished without a word is noticed on an idle connection within
    // ~25 s: a mesh link carries every request to its peer, and is never dialled again while
    // it seems up.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    Ok(match tls {
        None => Either::Left(stream),
        // Boxed: the handshake's state would weigh on every exchange's.
        Some(tls) => Either::Right(Box::new(Box::pin(tls.connect(addr, stream)).await?)),
    })
}

/// [`dial_tcp`], then the TLS handshake within the same `timeout` when `tls` (a hop to a mesh
/// proxy). A refused handshake is a refused connection: nothing was sent.
pub(crate) async fn dial_mesh(
    addr: SocketAddr,
    timeout: Duration,
    tls: &MeshTls,
) -> Result<crate::tls::MeshStream, SendError> {
    let started = tokio::time::Instant::now();
    let stream = dial_tcp(addr, timeout).await?;
    tokio::time::timeout_at(started + timeout, tls.connect(addr, stream))
        .await
        .map_err(|_| SendError::ConnectTimeout { addr })?
        .map_err(|source| SendError::Connect { addr, source })
}

/// A new connection to `addr`, driven in a task of its own; `upgrades`: it may switch
/// protocols; `tls`: over mesh TLS; `links`: on a stream of a mesh link (not an upgrade).
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    upgrades: bool,
    tls: Option<&MeshTls>,
    links: Option<(&mux::Links, Duration)>,
) -> Result<Sender, SendError> {
    if let Some((links, idle)) = links.filter(|_| !upgrades)
        && let Some(stream) = link_stream(addr, timeout, tls, links, idle).await?
    {
        return Sender::on_link(addr, stream).await;
    }
    let requests = match tls {
        None => handshake(addr, dial_tcp(addr, timeout).await?, upgrades).await?,
        Some(tls) => handshake(addr, dial_mesh(addr, timeout, tls).await?, upgrades).await?,
    };
    Ok(Sender {
        requests,
        link: None,
    })
}

/// A new stream to `addr` on a mesh link of `links` (see [`mux::Links::reach`]): on a link with
/// room, or on one this request dials (within `timeout`, over mesh TLS when `tls`; the
/// listener's preface is waited for as long as the request is). `Ok(None)`: the peer does not
/// speak the link, and the request takes a connection of its own.
pub(crate) async fn link_stream(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&MeshTls>,
    links: &mux::Links,
    idle: Duration,
) -> Result<Option<mux::Stream>, SendError> {
    let tag = tls.map_or(0, MeshTls::generation);
    match links.reach(addr, tag).await {
        mux::Reach::Stream(stream) => Ok(Some(stream)),
        mux::Reach::Dial(link) => link
            .join(dial_within(addr, timeout, tls).await?, idle)
            .await
            // Closed before its preface was answered: nothing was sent.
            .map_err(|source| SendError::Connect { addr, source }),
        mux::Reach::Plain => Ok(None),
    }
}

/// [`dial`] within `timeout`, the TLS handshake included.
pub(crate) async fn dial_within(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&MeshTls>,
) -> Result<Dialled, SendError> {
    tokio::time::timeout(timeout, dial(addr, tls))
        .await
        .map_err(|_| SendError::ConnectTimeout { addr })?
        .map_err(|source| SendError::Connect { addr, source })
}

/// A connection's request sender, pooled between requests.
#[derive(Debug)]
struct Sender {
    requests: SendRequest<RequestBody>,
    /// When the connection is a stream of a mesh link: the link's tag (see `mux::Link::dial`).
    link: Option<u64>,
}

impl Sender {
    async fn on_link(addr: SocketAddr, stream: mux::Stream) -> Result<Sender, SendError> {
        let link = Some(stream.tag());
        let requests = handshake(addr, stream, false).await?;
        Ok(Sender { requests, link })
    }
}

async fn handshake<S: crate::serve::Io>(
    addr: SocketAddr,
    stream: S,
    upgrades: bool,
) -> Result<SendRequest<RequestBody>, SendError> {
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| SendError::Upstream { addr, source })?;
    tokio::spawn(async move {
        let ended = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(error) = ended {
            tracing::debug!(%addr, %error, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// The time limits of one send.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// To open a new connection.
    pub connect: Duration,
    /// The longest the response body may stall.
    pub idle: Duration,
    /// The endpoint is a mesh proxy: with mesh TLS on, the connection is mTLS.
    pub mesh: bool,
}

/// An upstream's response body. Read to its end, it returns its connection to the pool;
/// dropped early, the connection is closed (HTTP/1.1 cannot reuse it mid-response).
pub struct PooledBody {
    body: Incoming,
    done: bool,
    home: Option<(Pool, SocketAddr, Sender)>,
    idle: Duration,
    /// Armed when the body first waits for the upstream, reset by each frame; a body that
    /// arrives whole never allocates one.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl PooledBody {
    /// A body whose connection is not pooled per request (an HTTP/2 stream's).
    pub(super) fn unpooled(body: Incoming, idle: Duration) -> Self {
        PooledBody {
            body,
            done: false,
            home: None,
            idle,
            stalled: None,
        }
    }
}

/// Why a response body ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream body failed")]
    Upstream(#[from] hyper::Error),
    #[error("upstream body stalled for {0:?}")]
    Stalled(Duration),
}

/// Methods whose repetition has the same effect as one request (RFC 9110 §9.2.2).
pub(crate) fn is_idempotent(method: &Method) -> bool {
    is_idempotent_name(method.as_str())
}

/// [`is_idempotent`] for a method name as sent.
pub(crate) fn is_idempotent_name(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(polled) => {
                if polled.is_none() {
                    this.done = true;
                }
                if let Some(timer) = &mut this.stalled {
                    timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + this.idle);
                }
                Poll::Ready(polled.map(|frame| frame.map_err(BodyError::from)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Stalled(idle)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if self.done || self.body.is_end_stream() {
            if let Some((pool, addr, sender)) = self.home.take() {
                pool.put(addr, sender);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{Accepted, Mode, Settings, ca};
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Mesh TLS for node `name`, its certificate and key (one hour) written to `dir/<name>`.
    fn node_tls(authority: &ca::Ca, dir: &std::path::Path, name: &str) -> MeshTls {
        let spec = ca::LeafSpec::for_ttl(ca::Kind::Node, name, Duration::from_secs(3600));
        ca::write_leaf(&ca::issue(authority, &spec).unwrap(), &dir.join(name)).unwrap();
        let settings = Settings {
            mode: Mode::Strict,
            ca: dir.join("ca").join(ca::CA_CERT),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        MeshTls::load(&settings, crate::metrics::Metrics::new())
            .unwrap()
            .unwrap()
    }

    /// A peer proxy's mesh listener as far as the link goes: mTLS, the link's preface, and
    /// `200 ok` to each request on each stream. Counts the TLS connections it accepts.
    async fn link_peer(tls: MeshTls) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let Accepted::Tls(mut io, _) = tls.accept(tcp, peer).await else {
                    continue;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut first = vec![0u8; mux::PREFACE.len()];
                    io.read_exact(&mut first).await.unwrap();
                    let link = mux::Link::listen(io, first, Duration::from_secs(30))
                        .await
                        .unwrap();
                    while let Some(mut stream) = link.accept().await {
                        tokio::spawn(async move {
                            let mut head = vec![0u8; 4096];
                            // One small request per read, as the test sends them.
                            while stream.read(&mut head).await.is_ok_and(|n| n > 0) {
                                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                                if stream.write_all(ok).await.is_err() {
                                    break;
                                }
                            }
                        });
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn after_a_certificate_change_a_pooled_stream_of_the_old_link_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let authority = ca::init(&dir.path().join("ca"), "mesh.test").unwrap();
        let (addr, accepted) = link_peer(node_tls(&authority, dir.path(), "b")).await;
        let tls = node_tls(&authority, dir.path(), "a");
        let pool = Pool::with_tls(Duration::from_secs(30), Some(tls.clone()))
            .linked(mux::Links::default());
        let limits = Limits {
            connect: Duration::from_secs(5),
            idle: Duration::from_secs(5),
            mesh: true,
        };
        let get = || async {
            let req = Request::get("/")
                .header("host", "b")
                .body(Either::Right(Buffered::empty()))
                .unwrap();
            let answer = pool.send(addr, req, None, limits).await.unwrap();
            let body = answer.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        };
        get().await;
        get().await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one link, its stream reused"
        );
        assert_eq!(pool.idle_count(), 1);

        // Node a's certificate changes: the next request goes on a link with the new one.
        let spec = ca::LeafSpec::for_ttl(ca::Kind::Node, "a", Duration::from_secs(3600));
        ca::write_leaf(
            &ca::issue(&authority, &spec).unwrap(),
            &dir.path().join("a"),
        )
        .unwrap();
        assert!(tls.reload().unwrap());
        get().await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new link");
        get().await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "whose stream is reused");
    }
}
