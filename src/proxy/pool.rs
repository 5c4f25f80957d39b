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
//! no response for (EOF or a reset) is replayed on another connection when that is safe: an
//! idempotent method and an empty body, as Go's HTTP transport does for reused connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

/// The most idle connections kept per endpoint.
pub const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// A forwarded request's body: the client's, streamed, or none (a replayed request).
pub type RequestBody = Either<Incoming, Empty<Bytes>>;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The connection failed after the request may have been (partly) sent.
    #[error("upstream {addr} failed")]
    Upstream {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

/// A request that got no response; `unsent` gives it back when it certainly never reached the
/// upstream (so it is safe to send elsewhere, whatever its method or body).
#[derive(Debug)]
pub struct SendFailure {
    pub error: SendError,
    pub unsent: Option<Request<RequestBody>>,
}

/// Idle connections by endpoint. Cheap to clone: one shared map.
#[derive(Clone, Debug)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

impl Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                idle: Mutex::new(HashMap::new()),
                connect_timeout,
                idle_timeout,
            }),
        }
    }

    /// Sends `req` (origin-form target, `Host` set) to `addr` and returns the response, whose
    /// body gives the connection back to the pool once read to its end.
    ///
    /// A pooled connection that turns out to be closed is dropped and the request goes on the
    /// next one (see the module docs for when that is safe); every attempt uses up a pooled
    /// connection, and at most one fresh connection is made.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, SendFailure> {
        let replayable = is_idempotent(req.method()) && req.body().is_end_stream();
        loop {
            let (mut sender, reused) = match self.take(addr) {
                Some(sender) => (sender, true),
                // Boxed: the rare connect path would otherwise size every request's future.
                None => match Box::pin(self.connect(addr)).await {
                    Ok(sender) => (sender, false),
                    Err(error) => {
                        return Err(SendFailure {
                            error,
                            unsent: Some(req),
                        });
                    }
                },
            };
            if reused && sender.ready().await.is_err() {
                continue;
            }
            let replay = (reused && replayable).then(|| head_copy(&req));
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let pool = self.clone();
                    return Ok(response.map(|body| PooledBody {
                        body,
                        done: false,
                        home: Some((pool, addr, sender)),
                    }));
                }
                Err(mut e) => match (e.take_message(), replay) {
                    (Some(unsent), _) if reused => req = unsent,
                    (_, Some(copy)) => {
                        tracing::debug!(%addr, "pooled connection closed under the request; replaying");
                        req = copy;
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

    /// The most recently used open connection to `addr`, if any.
    fn take(&self, addr: SocketAddr) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        while let Some(conn) = list.pop() {
            if !conn.sender.is_closed() && now.duration_since(conn.since) < self.inner.idle_timeout
            {
                return Some(conn.sender);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<RequestBody>, SendError> {
        let stream = tokio::time::timeout(
            self.inner.connect_timeout,
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| SendError::ConnectTimeout { addr })?
        .map_err(|source| SendError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| SendError::Upstream { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Idle connections held now, over every endpoint (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        let idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.values().map(Vec::len).sum()
    }
}

/// An upstream's response body. Read to its end, it returns its connection to the pool;
/// dropped early, the connection is closed (HTTP/1.1 cannot reuse it mid-response).
pub struct PooledBody {
    body: Incoming,
    done: bool,
    home: Option<(Pool, SocketAddr, SendRequest<RequestBody>)>,
}

/// Methods whose repetition has the same effect as one request (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The request again, for a replay: same head, empty body (only bodyless requests replay).
fn head_copy(req: &Request<RequestBody>) -> Request<RequestBody> {
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.done = true;
        }
        polled
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
