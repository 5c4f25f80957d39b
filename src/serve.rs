//! Accepting connections: the accept loop, HTTP/1.1 settings, the framing guard in front of
//! hyper, graceful drain on shutdown, and (for a role's proxy listeners) one metrics record per
//! response.

pub mod guard;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

use crate::metrics::{Metrics, Role, ServiceLabel};
use crate::proxy::{MeshError, X_SKYLINE_ERROR};
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

/// Where a proxy listener records its responses: the role it plays and the process's metrics.
#[derive(Clone, Debug)]
pub struct Recorder {
    pub role: Role,
    pub metrics: Arc<Metrics>,
}

impl Recorder {
    pub fn new(role: Role, metrics: Arc<Metrics>) -> Self {
        Self { role, metrics }
    }

    /// Records one response: its status, the mesh error it carries, the service its handler
    /// labelled it with (the label is taken out: it is not for the client), and the time
    /// since the request arrived.
    fn record<B>(&self, response: &mut Response<B>, started: Instant) {
        let label = response.extensions_mut().remove::<ServiceLabel>();
        let error = response
            .headers()
            .get(&X_SKYLINE_ERROR)
            .and_then(|v| v.to_str().ok());
        let service = label.as_ref().map_or("", |l| l.value(error));
        let status = response.status().as_u16();
        self.metrics
            .request(self.role, service, status, error, started.elapsed());
    }
}

/// Serves `listener` with `handler` until `shutdown`, then drains in-flight requests for at
/// most [`DRAIN_TIMEOUT`].
pub async fn serve<H: Handler>(listener: TcpListener, handler: H, shutdown: CancellationToken) {
    serve_with(listener, handler, None, shutdown).await;
}

/// [`serve`], recording every response (refusals of the framing guard included) in `recorder`.
pub async fn serve_recorded<H: Handler>(
    listener: TcpListener,
    handler: H,
    recorder: Recorder,
    shutdown: CancellationToken,
) {
    serve_with(listener, handler, Some(recorder), shutdown).await;
}

async fn serve_with<H: Handler>(
    listener: TcpListener,
    handler: H,
    recorder: Option<Recorder>,
    shutdown: CancellationToken,
) {
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
        let recorder = recorder.clone();
        let service = service_fn(move |req| {
            let started = recorder.is_some().then(Instant::now);
            let conn = Conn {
                peer,
                peer_ip: peer_ip.clone(),
                index: next_index.fetch_add(1, Ordering::Relaxed),
                verdicts: verdicts.clone(),
            };
            let handler = handler.clone();
            let recorder = recorder.clone();
            async move {
                let mut response = respond(&handler, req, conn).await;
                if let (Some(recorder), Some(started)) = (recorder, started) {
                    recorder.record(&mut response, started);
                }
                Ok::<_, Infallible>(response)
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

/// The handler's response, or the framing guard's refusal of the request.
async fn respond<H: Handler>(
    handler: &H,
    req: Request<Incoming>,
    conn: Conn,
) -> Response<Either<H::Body, Full<Bytes>>> {
    if let Some(rejection) = conn.verdicts.rejection_for(conn.index) {
        tracing::debug!(peer = %conn.peer, reason = rejection.reason, "request refused");
        let error = MeshError::BadRequest {
            status: rejection.status,
            detail: rejection.reason,
        };
        return error.into_response("").map(|body| match body {
            Either::Left(_) => Either::Right(Full::default()),
            Either::Right(full) => Either::Right(full),
        });
    }
    handler.handle(req, conn).await.map(Either::Left)
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
