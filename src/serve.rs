//! Accepting connections: the accept loop, HTTP/1.1 settings, the framing guard in front of
//! hyper, and graceful drain on shutdown.

pub mod guard;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::MeshError;
use guard::{Guarded, Limits, Verdicts};

/// How long a client may take to send a request head (slowloris protection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take to finish after shutdown starts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener does with each request. Errors are already responses here.
pub trait Handler: Clone + Send + Sync + 'static {
    /// The response body: the proxy streams an upstream's, an application may stream its own.
    type Body: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static;

    fn handle(
        &self,
        req: Request<Incoming>,
        conn: Conn,
    ) -> impl Future<Output = Response<Self::Body>> + Send;
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The connection a request arrived on.
#[derive(Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    /// The peer's IP as a header value, built once per connection (for `x-forwarded-for`).
    pub peer_ip: HeaderValue,
    /// The request's position on its connection (0-based).
    pub index: u64,
    verdicts: Verdicts,
}

impl Conn {
    /// Whether the framing guard refused this request (for example a bad chunk in its body).
    pub fn rejected(&self) -> bool {
        self.verdicts.rejection_for(self.index).is_some()
    }
}

/// Serves `listener` with `handler` until `shutdown`, then drains in-flight requests for at
/// most [`DRAIN_TIMEOUT`].
pub async fn serve<H: Handler>(listener: TcpListener, handler: H, shutdown: CancellationToken) {
    let limits = Limits::default();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Some(HEADER_READ_TIMEOUT))
        // Looser than the guard's limits, so the guard (which answers with our error format)
        // always speaks first.
        .max_buf_size(limits.max_head * 2)
        .max_headers(limits.max_headers * 2);
    let graceful = GracefulShutdown::new();
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
        let (io, verdicts) = Guarded::new(stream, limits);
        let handler = handler.clone();
        let next_index = AtomicU64::new(0);
        let peer_ip = HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let service = service_fn(move |req| {
            let conn = Conn {
                peer,
                peer_ip: peer_ip.clone(),
                index: next_index.fetch_add(1, Ordering::Relaxed),
                verdicts: verdicts.clone(),
            };
            let handler = handler.clone();
            async move {
                if let Some(rejection) = conn.verdicts.rejection_for(conn.index) {
                    tracing::debug!(%peer, reason = rejection.reason, "request refused");
                    let error = MeshError::BadRequest {
                        status: rejection.status,
                        detail: rejection.reason,
                    };
                    let response = error.into_response("").map(|body| match body {
                        Either::Left(_) => Either::Right(Full::default()),
                        Either::Right(full) => Either::Right(full),
                    });
                    return Ok::<_, Infallible>(response);
                }
                Ok(handler.handle(req, conn).await.map(Either::Left))
            }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timed out; closing the remaining connections");
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
