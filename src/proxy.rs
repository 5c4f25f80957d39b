//! The forwarder shared by every role: keep-alive pools to upstreams, the header rules of the
//! contract (hop-by-hop headers dropped, `x-request-id`, `x-forwarded-for`), and the one place
//! where mesh errors become responses.

pub mod inbound;
pub mod outbound;
pub mod pool;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::routing::Endpoint;
use crate::serve::Conn;
use pool::{Pool, PooledBody, SendError, SendFailure};

/// Every response body the mesh sends: an upstream's, streamed, or one the mesh wrote itself.
pub type Body = Either<PooledBody, Full<Bytes>>;

/// A body-less or small response written by the mesh itself.
pub fn full(body: impl Into<Bytes>) -> Body {
    Either::Right(Full::new(body.into()))
}

/// How long to wait for an upstream connection before trying no more.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for an upstream's response head. Bodies may stream for longer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How many endpoints one request may be sent to when connections are refused. A refused
/// connection means the request never left, so trying another endpoint is always safe.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;
/// How long an idle upstream connection is kept in the pool: below the idle timeouts of common
/// servers (Node.js closes after 5 s, our own inbound after 10 s), so the pool rarely reuses a
/// connection the upstream is about to close.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub static X_SKYLINE_ERROR: HeaderName = HeaderName::from_static("x-skyline-error");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// How many Skyline hops (agent outbound, gateway, bridge) forwarded a request so far.
pub static X_SKYLINE_HOPS: HeaderName = HeaderName::from_static("x-skyline-hops");

/// The most Skyline hops a request may take before the mesh calls it a loop.
pub const DEFAULT_MAX_HOPS: u32 = 8;

// === MeshError ===

/// An error the mesh itself answers for, as opposed to a response of the peer application.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The request is malformed; `status` is 400, 414 or 431.
    #[error("bad request: {detail}")]
    BadRequest {
        status: StatusCode,
        detail: &'static str,
    },
    #[error("unknown service")]
    UnknownService,
    #[error("no healthy endpoint")]
    NoHealthyEndpoint,
    #[error("upstream connection failed")]
    UpstreamConnect(#[source] SendError),
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    /// The request went through more Skyline hops than allowed: a routing loop.
    #[error("routing loop detected")]
    LoopDetected,
}

impl MeshError {
    pub fn bad_request(detail: &'static str) -> Self {
        MeshError::BadRequest {
            status: StatusCode::BAD_REQUEST,
            detail,
        }
    }

    /// The contract's error code, sent in `x-skyline-error`.
    pub fn code(&self) -> &'static str {
        match self {
            MeshError::BadRequest { .. } => "bad-request",
            MeshError::UnknownService => "unknown-service",
            MeshError::NoHealthyEndpoint => "no-healthy-endpoint",
            MeshError::UpstreamConnect(_) => "upstream-connect",
            MeshError::UpstreamTimeout => "upstream-timeout",
            MeshError::LoopDetected => "loop-detected",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            MeshError::BadRequest { status, .. } => *status,
            MeshError::UnknownService => StatusCode::NOT_FOUND,
            MeshError::NoHealthyEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            MeshError::UpstreamConnect(_) => StatusCode::BAD_GATEWAY,
            MeshError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            MeshError::LoopDetected => StatusCode::LOOP_DETECTED,
        }
    }

    /// What the client is told; never internals (those go to the log).
    fn detail(&self) -> &'static str {
        match self {
            MeshError::BadRequest { detail, .. } => detail,
            MeshError::UnknownService => "no such service in the catalog and no catch-all",
            MeshError::NoHealthyEndpoint => "the service has no healthy instance",
            MeshError::UpstreamConnect(_) => "could not get a response from the upstream",
            MeshError::UpstreamTimeout => "the upstream did not answer in time",
            MeshError::LoopDetected => "the request went through too many mesh hops",
        }
    }

    /// The response the mesh sends for this error: `x-skyline-error` and a small JSON body.
    /// A bad request also closes the connection, so nothing pipelined behind it is read.
    pub fn into_response(self, service: &str) -> Response<Body> {
        match &self {
            MeshError::UpstreamConnect(cause) => {
                tracing::warn!(%service, error = %self, cause = %crate::error_chain(cause), "mesh error")
            }
            _ => tracing::debug!(%service, error = %self, "mesh error"),
        }
        let body = serde_json::json!({
            "error": self.code(),
            "service": service,
            "detail": self.detail(),
        });
        let mut response = Response::new(full(format!("{body}\n")));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(&X_SKYLINE_ERROR, HeaderValue::from_static(self.code()));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if matches!(self, MeshError::BadRequest { .. }) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// Counts this hop in `x-skyline-hops`, or refuses the request when it already took `max` hops.
/// A missing or unreadable header counts as zero hops.
pub fn count_hop(headers: &mut HeaderMap, max: u32) -> Result<u32, MeshError> {
    let hops = headers
        .get(&X_SKYLINE_HOPS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(0);
    if hops >= max {
        return Err(MeshError::LoopDetected);
    }
    let hops = hops + 1;
    headers.insert(&X_SKYLINE_HOPS, HeaderValue::from(hops));
    Ok(hops)
}

// === Forwarder ===

/// How the `Host` header is set on the forwarded request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// Keep the client's `Host` (mesh hops, so the far side sees what the caller asked for).
    Keep,
    /// Set it to the upstream's address and keep the original in `x-forwarded-host` (last hop).
    Upstream,
}

/// Sends requests to upstreams over pooled keep-alive HTTP/1.1 connections.
#[derive(Clone, Debug)]
pub struct Forwarder {
    pool: Pool,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl Forwarder {
    pub fn new() -> Self {
        Self {
            pool: Pool::new(CONNECT_TIMEOUT, POOL_IDLE_TIMEOUT),
        }
    }

    /// Forwards `req` to `endpoint` with the request target `target`, applying the header rules
    /// of the contract, and returns the upstream's response with its body streaming.
    ///
    /// When the connection to an endpoint is refused (the request never left), `next` is asked
    /// for another endpoint, given those tried so far, up to [`MAX_CONNECT_ATTEMPTS`] in all.
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        endpoint: Endpoint,
        next: impl FnMut(&[SocketAddr]) -> Option<Endpoint>,
        target: PathAndQuery,
        host: Host,
        conn: &Conn,
    ) -> Result<Response<Body>, MeshError> {
        let original_host = req.headers().get(header::HOST).cloned();
        *req.uri_mut() = Uri::from(target);
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        if !headers.contains_key(&X_REQUEST_ID) {
            headers.insert(&X_REQUEST_ID, request_id());
        }
        append_forwarded_for(headers, &conn.peer_ip);
        match (host, original_host) {
            (Host::Keep, Some(h)) => {
                headers.insert(header::HOST, h);
            }
            (Host::Keep, None) => {
                headers.insert(header::HOST, endpoint.host.clone());
            }
            (Host::Upstream, original) => {
                if let Some(h) = original.filter(|_| !headers.contains_key(&X_FORWARDED_HOST)) {
                    headers.insert(&X_FORWARDED_HOST, h);
                }
            }
        }
        let attempts = self.attempts(req.map(Either::Left), endpoint, next, host);
        match tokio::time::timeout(RESPONSE_TIMEOUT, attempts).await {
            Err(_) => Err(MeshError::UpstreamTimeout),
            Ok(Err(error)) => {
                if conn.rejected() {
                    // The guard refused the request body's framing while it was streaming.
                    return Err(MeshError::bad_request("malformed request body"));
                }
                Err(MeshError::UpstreamConnect(error))
            }
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, Either::Left(body)))
            }
        }
    }

    async fn attempts(
        &self,
        mut req: Request<pool::RequestBody>,
        mut endpoint: Endpoint,
        mut next: impl FnMut(&[SocketAddr]) -> Option<Endpoint>,
        host: Host,
    ) -> Result<Response<PooledBody>, SendError> {
        let mut tried = Vec::new();
        loop {
            if host == Host::Upstream {
                req.headers_mut()
                    .insert(header::HOST, endpoint.host.clone());
            }
            let failure = match self.pool.send(endpoint.addr, req).await {
                Ok(response) => return Ok(response),
                Err(failure) => failure,
            };
            let SendFailure {
                error,
                unsent: Some(unsent),
            } = failure
            else {
                return Err(failure.error);
            };
            tried.push(endpoint.addr);
            let another = (tried.len() < MAX_CONNECT_ATTEMPTS)
                .then(|| next(&tried))
                .flatten();
            let Some(another) = another else {
                return Err(error);
            };
            tracing::debug!(failed = %endpoint.addr, next = %another.addr, %error, "trying another endpoint");
            (req, endpoint) = (unsent, another);
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers and every header the `Connection` header names.
///
/// Most messages carry none: one pass over their few headers decides, instead of a hashed
/// removal per hop-by-hop name.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if let header::Entry::Occupied(connection) = headers.entry(header::CONNECTION) {
        let named: Vec<HeaderName> = connection
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        connection.remove();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP[1..] {
        headers.remove(name);
    }
}

/// Appends the previous hop's address (`peer`, already a header value) to `x-forwarded-for`,
/// folding earlier values into one.
fn append_forwarded_for(headers: &mut HeaderMap, peer: &HeaderValue) {
    if !headers.contains_key(&X_FORWARDED_FOR) {
        headers.insert(&X_FORWARDED_FOR, peer.clone());
        return;
    }
    let mut value = Vec::new();
    for earlier in headers.get_all(&X_FORWARDED_FOR) {
        value.extend_from_slice(earlier.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(peer.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&value) {
        headers.insert(&X_FORWARDED_FOR, v);
    }
}

/// A random 128-bit id in hex. Unique, not secret: a fast thread-local generator suffices.
fn request_id() -> HeaderValue {
    let id = format!("{:032x}", fastrand::u128(..));
    HeaderValue::try_from(id).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-connection", "close"),
            ("x-end-to-end", "kept"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["traceparent", "x-end-to-end"]);
    }

    #[test]
    fn forwarded_for_starts_with_the_peer() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &HeaderValue::from_static("127.0.0.3"));
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.3");
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        append_forwarded_for(&mut h, &HeaderValue::from_static("127.0.0.3"));
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, 127.0.0.3");
    }

    #[test]
    fn error_responses_carry_code_header_and_json() {
        let r = MeshError::NoHealthyEndpoint.into_response("giphy");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[&X_SKYLINE_ERROR], "no-healthy-endpoint");
        let r = MeshError::bad_request("x").into_response("");
        assert_eq!(r.headers()[header::CONNECTION], "close");
    }

    #[test]
    fn each_hop_is_counted_and_a_request_past_the_limit_is_a_loop() {
        let mut h = HeaderMap::new();
        assert_eq!(count_hop(&mut h, 2).unwrap(), 1);
        assert_eq!(count_hop(&mut h, 2).unwrap(), 2);
        let e = count_hop(&mut h, 2).unwrap_err();
        assert_eq!(e.code(), "loop-detected");
        assert_eq!(e.status(), 508);
        h.insert(&X_SKYLINE_HOPS, HeaderValue::from_static("garbage"));
        assert_eq!(count_hop(&mut h, 2).unwrap(), 1);
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (request_id(), request_id());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
