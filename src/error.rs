//! The mesh's own errors: [`MeshError`], what the mesh answers instead of an application (its
//! `x-skyline-error` code, status and JSON body), and [`SendError`], why an upstream gave no
//! response. Rendered as a hyper response by `proxy` and as bytes by the express lane, from the
//! same code, status and body.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::contract::{X_SKYLINE_ERROR, X_SKYLINE_UNSENT};
use crate::http1::write_header;

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
    /// `unknown-service` from a hop that is itself the catch-all or looked further than the
    /// catalog (the gateway, a bridge's cluster DNS); `0` says where it looked.
    #[error("unknown service")]
    UnknownBeyond(&'static str),
    #[error("no healthy endpoint")]
    NoHealthyEndpoint,
    /// No catalog has been read yet (an agent started while its Consul or etcd did not
    /// answer): the service may well exist, so not `unknown-service`.
    #[error("no catalog read yet")]
    NoCatalog,
    #[error("upstream connection failed")]
    UpstreamConnect(#[source] SendError),
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    /// The request went through more Skyline hops than allowed: a routing loop.
    #[error("routing loop detected")]
    LoopDetected,
    /// The request body is larger than the route's `max_request_body`.
    #[error("request body too large")]
    ContentTooLarge,
    /// An authorization policy denies the request (see [`crate::authz`]).
    #[error("forbidden by an authorization policy")]
    Forbidden,
}

impl MeshError {
    pub fn bad_request(detail: &'static str) -> Self {
        MeshError::BadRequest {
            status: StatusCode::BAD_REQUEST,
            detail,
        }
    }

    /// Whether the request was sent to no application: every connection was refused or timed
    /// out, a later hop said so, or there was no endpoint. Answered with `x-skyline-unsent`.
    pub fn unsent(&self) -> bool {
        matches!(
            self,
            MeshError::NoHealthyEndpoint
                | MeshError::NoCatalog
                | MeshError::UpstreamConnect(
                    SendError::Connect { .. }
                        | SendError::ConnectTimeout { .. }
                        | SendError::Unforwarded { .. }
                        | SendError::Refused { .. }
                )
        )
    }

    /// Whether the answer ends the connection: after a bad request nothing pipelined behind it
    /// is read, and after a body too large the rest of the body is not read.
    pub fn closes(&self) -> bool {
        matches!(
            self,
            MeshError::BadRequest { .. } | MeshError::ContentTooLarge
        )
    }

    /// The contract's error code, sent in `x-skyline-error`.
    pub fn code(&self) -> &'static str {
        match self {
            MeshError::BadRequest { .. } => "bad-request",
            MeshError::UnknownService | MeshError::UnknownBeyond(_) => "unknown-service",
            MeshError::NoHealthyEndpoint | MeshError::NoCatalog => "no-healthy-endpoint",
            MeshError::UpstreamConnect(_) => "upstream-connect",
            MeshError::UpstreamTimeout => "upstream-timeout",
            MeshError::LoopDetected => "loop-detected",
            MeshError::ContentTooLarge => "content-too-large",
            MeshError::Forbidden => "forbidden",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            MeshError::BadRequest { status, .. } => *status,
            MeshError::UnknownService | MeshError::UnknownBeyond(_) => StatusCode::NOT_FOUND,
            MeshError::NoHealthyEndpoint | MeshError::NoCatalog => StatusCode::SERVICE_UNAVAILABLE,
            MeshError::UpstreamConnect(_) => StatusCode::BAD_GATEWAY,
            MeshError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            MeshError::LoopDetected => StatusCode::LOOP_DETECTED,
            MeshError::ContentTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            MeshError::Forbidden => StatusCode::FORBIDDEN,
        }
    }

    /// What the client is told; never internals (those go to the log).
    pub fn detail(&self) -> &'static str {
        match self {
            MeshError::BadRequest { detail, .. } => detail,
            MeshError::UnknownService => "no such service in the catalog and no catch-all",
            MeshError::UnknownBeyond(detail) => detail,
            MeshError::NoHealthyEndpoint => "the service has no healthy instance",
            MeshError::NoCatalog => "this proxy has not read its catalog yet",
            MeshError::UpstreamConnect(_) => "could not get a response from the upstream",
            MeshError::UpstreamTimeout => "the upstream did not answer in time",
            MeshError::LoopDetected => "the request went through too many mesh hops",
            MeshError::ContentTooLarge => "the request body is larger than the route allows",
            MeshError::Forbidden => "an authorization policy does not allow this call",
        }
    }

    /// The JSON body of the error's response.
    pub fn json(&self, service: &str) -> String {
        let body = serde_json::json!({
            "error": self.code(),
            "service": service,
            "detail": self.detail(),
        });
        format!("{body}\n")
    }

    /// Logs the error as the mesh answers it, the same on every lane: a failed connection to
    /// an upstream as a warning with its cause, anything else at debug level.
    pub fn log(&self, service: &str) {
        match self {
            MeshError::UpstreamConnect(cause) => {
                tracing::warn!(%service, error = %self, cause = %crate::error_chain(cause), "mesh error")
            }
            _ => tracing::debug!(%service, error = %self, "mesh error"),
        }
    }

    /// The headers of the mesh's answer for this error, besides its length: `x-skyline-error`,
    /// the JSON content type, `x-skyline-unsent` when it is [`unsent`](Self::unsent), and
    /// `Connection: close` when it [`closes`](Self::closes) the connection or `close`. Both
    /// renderings, [`response`](Self::response) and the express lane's bytes
    /// (`proxy::express::write_error`), write these.
    pub fn answer_headers(&self, close: bool) -> [Option<(&'static str, &'static str)>; 4] {
        [
            Some((X_SKYLINE_ERROR.as_str(), self.code())),
            Some(("content-type", "application/json")),
            self.unsent().then_some((X_SKYLINE_UNSENT.as_str(), "1")),
            (close || self.closes()).then_some(("connection", "close")),
        ]
    }

    /// The response the mesh sends for this error: [`answer_headers`](Self::answer_headers)
    /// and a small JSON body. The error is [logged](Self::log).
    pub fn response(self, service: &str) -> Response<Full<Bytes>> {
        self.log(service);
        let mut response = Response::new(Full::new(Bytes::from(self.json(service))));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        for (name, value) in self.answer_headers(false).into_iter().flatten() {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        response
    }
}

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
    /// An I/O error on a connection the request may have been (partly) sent on.
    #[error("upstream {addr} failed")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The upstream broke the protocol (or closed) before a whole response head.
    #[error("upstream {addr} failed: {reason}")]
    Protocol {
        addr: SocketAddr,
        reason: &'static str,
    },
    /// The request was already consumed by an earlier attempt and cannot be sent again.
    #[error("no request left to send to {addr}")]
    Spent { addr: SocketAddr },
    /// The next hop at `addr` answered that it could not send the request on to any instance
    /// (its `x-skyline-unsent`): the request reached no application.
    #[error("{addr} could not forward the request")]
    Unforwarded { addr: SocketAddr },
    /// The HTTP/2 peer refused the request's stream (`REFUSED_STREAM`, or past its GOAWAY):
    /// it processed none of it, though the request was sent and is spent (see `proxy::h2`).
    #[error("upstream {addr} refused the request's stream")]
    Refused {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// The connection failed after the request may have been (partly) sent.
    #[error("upstream {addr} failed")]
    Upstream {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

/// Writes the mesh's own error answer: the same status, headers and JSON body as
/// [`MeshError::response`], and the error logged the same way.
pub fn write_error(out: &mut Vec<u8>, error: MeshError, service: &str, close: bool) -> MeshError {
    error.log(service);
    let status = error.status();
    let body = error.json(service);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in error.answer_headers(close).into_iter().flatten() {
        write_header(out, name.as_bytes(), value.as_bytes());
    }
    write_header(out, b"content-length", body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    error
}
