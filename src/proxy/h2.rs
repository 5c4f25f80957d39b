//! HTTP/2 over cleartext (h2c, prior knowledge) toward the next hop: one multiplexed connection
//! per endpoint address, shared by every HTTP/2 request to it.
//!
//! The forwarder sends a request this way by what the endpoint speaks (`routing::Protocol`): a
//! request the client made over HTTP/2 to another Skyline proxy (an agent's inbound, a gateway,
//! a bridge), and every request (an HTTP/1.1 caller's too) to an instance registered with meta
//! `protocol = "h2c"` or tag `h2c` (see `routing::protocol_of`), or to a Kubernetes Service the
//! bridge sends h2c (see `bridge::Names::protocol`). HTTP/2 keeps what HTTP/1.1 cannot carry
//! through a hop, trailers above all, which gRPC's status travels in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::pool::{Limits, PooledBody, RequestBody, SendError, SendFailure};
use crate::tls::MeshTls;

/// How often an open connection is pinged, so a dead peer is noticed without a request.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/2 connection per endpoint. Cheap to clone: one shared map.
#[derive(Clone, Debug, Default)]
pub struct H2Pool {
    conns: Arc<Mutex<HashMap<SocketAddr, SendRequest<RequestBody>>>>,
    /// Mesh TLS, for connections to endpoints that are mesh proxies.
    tls: Option<MeshTls>,
}

impl H2Pool {
    /// A pool that speaks mesh TLS (when `tls`) to the endpoints that are mesh proxies.
    pub fn with_tls(tls: Option<MeshTls>) -> Self {
        Self {
            conns: Arc::default(),
            tls,
        }
    }

    /// Sends `req` (origin-form target, `Host` set, as for the HTTP/1.1 pool) to `addr` over
    /// HTTP/2. A request the connection did not take (it had closed) is sent once more on a
    /// fresh connection; one a fresh connection did not take is handed back as unsent.
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<RequestBody>,
        limits: Limits,
    ) -> Result<Response<PooledBody>, SendFailure> {
        let mut req = as_h2(req, addr);
        let mut fresh = false;
        loop {
            let mut sender = match self.open(addr) {
                Some(sender) if !fresh => sender,
                _ => {
                    fresh = true;
                    let tls = self.tls.as_ref().filter(|_| limits.mesh);
                    match Box::pin(connect(addr, limits.connect, tls)).await {
                        Ok(sender) => {
                            self.lock().insert(addr, sender.clone());
                            sender
                        }
                        Err(error) => {
                            return Err(SendFailure {
                                error,
                                unsent: Some(as_h1(req)),
                            });
                        }
                    }
                }
            };
            if sender.ready().await.is_err() {
                self.forget(addr, &sender);
                if fresh {
                    let error = SendError::Protocol {
                        addr,
                        reason: "HTTP/2 connection closed before the request",
                    };
                    return Err(SendFailure {
                        error,
                        unsent: Some(as_h1(req)),
                    });
                }
                fresh = true;
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(response.map(|b| PooledBody::unpooled(b, limits.idle))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        self.forget(addr, &sender);
                        req = unsent;
                        fresh = true;
                    }
                    unsent => {
                        let error = SendError::Upstream {
                            addr,
                            source: e.into_error(),
                        };
                        return Err(SendFailure {
                            error,
                            unsent: unsent.map(as_h1),
                        });
                    }
                },
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, SendRequest<RequestBody>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open connection to `addr`, if any.
    fn open(&self, addr: SocketAddr) -> Option<SendRequest<RequestBody>> {
        let mut conns = self.lock();
        match conns.get(&addr) {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                conns.remove(&addr);
                None
            }
            None => None,
        }
    }

    /// Drops the connection to `addr` when it is still `sender`'s (closed, or not taking more).
    fn forget(&self, addr: SocketAddr, sender: &SendRequest<RequestBody>) {
        let mut conns = self.lock();
        if conns
            .get(&addr)
            .is_some_and(|s| s.is_closed() || sender.is_closed())
        {
            conns.remove(&addr);
        }
    }
}

/// A new HTTP/2 connection to `addr`, driven in a task of its own.
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&MeshTls>,
) -> Result<SendRequest<RequestBody>, SendError> {
    match tls {
        None => handshake(addr, super::pool::dial(addr, timeout).await?).await,
        Some(tls) => handshake(addr, super::pool::dial_mesh(addr, timeout, tls).await?).await,
    }
}

async fn handshake<S: crate::serve::Io>(
    addr: SocketAddr,
    stream: S,
) -> Result<SendRequest<RequestBody>, SendError> {
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Large messages (gRPC's are up to 4 MiB by default) need windows that grow with the
        // bandwidth-delay product, not HTTP/2's 64 KiB default.
        .adaptive_window(true)
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| SendError::Upstream { addr, source })?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%addr, %error, "HTTP/2 upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// The request in HTTP/2 form: an absolute URI whose authority is the `Host` (removed: HTTP/2
/// carries it as `:authority`), no connection-specific header, HTTP/2 as its version.
fn as_h2(mut req: Request<RequestBody>, addr: SocketAddr) -> Request<RequestBody> {
    let headers = req.headers_mut();
    headers.remove(header::TRANSFER_ENCODING);
    let host = headers.remove(header::HOST);
    let authority = host
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| Authority::try_from(addr.to_string()).ok());
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = authority;
    parts.path_and_query = Some(path);
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_2;
    req
}

/// A request handed back unsent, in the HTTP/1.1 form the forwarder keeps: origin-form
/// target and `Host` (it may go on to an endpoint that speaks only HTTP/1.1).
pub fn as_h1(mut req: Request<RequestBody>) -> Request<RequestBody> {
    if req.version() != Version::HTTP_2 {
        return req;
    }
    if let Some(authority) = req.uri().authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    if let Some(path) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = Uri::from(path);
    }
    req.headers_mut().remove(header::TE);
    *req.version_mut() = Version::HTTP_11;
    req
}
