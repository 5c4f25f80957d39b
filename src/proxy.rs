//! The forwarder shared by every role: keep-alive pools to upstreams, the header rules of the
//! contract (hop-by-hop headers dropped, `x-request-id`, `x-forwarded-for`), and the one place
//! where mesh errors become responses.

pub mod authorize;
pub mod express;
pub mod h2;
pub mod headers;
pub mod inbound;
pub mod outbound;
pub mod pool;
pub mod probe;
pub mod resilience;
pub mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use crate::access::Trail;
pub use crate::contract::{
    X_REQUEST_ID, X_SKYLINE_ERROR, X_SKYLINE_UNSENT, request_id, request_id_bytes,
};
pub use crate::error::MeshError;
use crate::metrics::Metrics;
use crate::routing::balance::{Choice, Outcome, now_ns, ns_at};
use crate::routing::{Protocol, Route};
use crate::serve::Conn;
use crate::tls::MeshTls;
pub use headers::{Hop, strip_hop_by_hop};
use pool::{Buffered, Limits, Pool, PooledBody, Replay, RequestBody, SendError, SendFailure};
use resilience::{RETRY_BODY_LIMIT, Resilience};

/// Every response body the mesh sends: an upstream's, streamed, or one the mesh wrote itself.
pub type Body = Either<PooledBody, Full<Bytes>>;

/// A body-less or small response written by the mesh itself.
pub fn full(body: impl Into<Bytes>) -> Body {
    Either::Right(Full::new(body.into()))
}

/// How many endpoints one request may be sent to when connections are refused. A refused
/// connection means the request never left, so trying another endpoint is always safe.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;
/// How long an idle upstream connection is kept in the pool: below the idle timeouts of common
/// servers (Node.js closes after 5 s, our own inbound after 10 s), so the pool rarely reuses a
/// connection the upstream is about to close.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// How many Skyline hops (agent outbound, gateway, bridge) forwarded a request so far.
pub static X_SKYLINE_HOPS: HeaderName = HeaderName::from_static("x-skyline-hops");
/// The remaining time of the request, in milliseconds, so the next hop does not outlive its
/// caller. An application may set it on its own request too.
pub static X_SKYLINE_TIMEOUT_MS: HeaderName = HeaderName::from_static("x-skyline-timeout-ms");
/// The attempt number of a retried request (2, 3, ...), set by the one hop that retries: the
/// first. Later hops never retry an answer, so attempts do not multiply along the path; the
/// header tells them (and the application) that this is a repeat.
pub static X_SKYLINE_ATTEMPT: HeaderName = HeaderName::from_static("x-skyline-attempt");

/// A gRPC client's deadline for the call (`<digits><unit>`), honoured as the request's.
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The most Skyline hops a request may take before the mesh calls it a loop.
pub const DEFAULT_MAX_HOPS: u32 = 8;

// === MeshError as a response ===

impl MeshError {
    /// [`MeshError::response`] as a proxy's response.
    pub fn into_response(self, service: &str) -> Response<Body> {
        self.response(service).map(Either::Right)
    }
}

/// Whether a request is a gRPC call: over HTTP/2, with an `application/grpc*` content type.
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_2
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A mesh error answer (`x-skyline-error`) to a gRPC call, as gRPC's clients understand it: a
/// trailers-only response, HTTP 200 with `grpc-status` and `grpc-message`, `x-skyline-error`
/// kept. `unknown-service` is NOT_FOUND (5), `upstream-timeout` DEADLINE_EXCEEDED (4), no
/// endpoint or a failed connection UNAVAILABLE (14), a body too large RESOURCE_EXHAUSTED (8),
/// `forbidden` (authorization) PERMISSION_DENIED (7), anything else INTERNAL (13). Other responses are left alone.
pub fn as_grpc_status(response: &mut Response<Body>) {
    if response.status() == StatusCode::OK {
        return;
    }
    let Some(code) = response.headers().get(&X_SKYLINE_ERROR).cloned() else {
        return;
    };
    let status = match code.as_bytes() {
        b"unknown-service" => "5",
        b"upstream-timeout" => "4",
        b"no-healthy-endpoint" | b"upstream-connect" => "14",
        b"content-too-large" => "8",
        b"forbidden" => "7",
        _ => "13",
    };
    let message = format!("skyline: {}", code.to_str().unwrap_or("mesh error"));
    *response.status_mut() = StatusCode::OK;
    *response.body_mut() = full(Bytes::new());
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(&GRPC_STATUS, HeaderValue::from_static(status));
    if let Ok(message) = HeaderValue::try_from(message) {
        headers.insert(&GRPC_MESSAGE, message);
    }
}

/// Counts this hop in `x-skyline-hops`, or refuses the request when it already took `max` hops.
/// A missing or unreadable header counts as zero hops.
pub fn count_hop(headers: &mut HeaderMap, max: u32) -> Result<u32, MeshError> {
    let hops = next_hop(headers.get(&X_SKYLINE_HOPS).map(HeaderValue::as_bytes), max)?;
    headers.insert(&X_SKYLINE_HOPS, hop_count(hops));
    Ok(hops)
}

/// The hop count after this hop, from the request's `x-skyline-hops` value, or
/// [`MeshError::LoopDetected`] when it already took `max` hops.
pub fn next_hop(current: Option<&[u8]>, max: u32) -> Result<u32, MeshError> {
    let hops = current
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(0);
    if hops >= max {
        return Err(MeshError::LoopDetected);
    }
    Ok(hops + 1)
}

/// `hops` as a header value; the usual counts without formatting or allocating.
fn hop_count(hops: u32) -> HeaderValue {
    const SMALL: [&str; 9] = ["0", "1", "2", "3", "4", "5", "6", "7", "8"];
    match SMALL.get(hops as usize) {
        Some(n) => HeaderValue::from_static(n),
        None => HeaderValue::from(hops),
    }
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

/// Where one request goes: a service's route and the policy of calls to it.
#[derive(Clone, Copy, Debug)]
pub struct Destination<'a> {
    /// The service, for logs.
    pub service: &'a str,
    /// The service as a metrics label: its name when the catalog knows it, else "" (a name
    /// from a request must not create a series of its own).
    pub label: &'a str,
    pub route: &'a Route,
    pub policy: &'a Resilience,
    /// This hop is the first Skyline hop of the request (an outbound proxy, or a bridge taking
    /// a Kubernetes request into the mesh): the only one that retries answers, timeouts and
    /// broken connections. Every hop retries a refused connection (the request never left).
    pub first_hop: bool,
    /// Where the request goes on when `route` cannot take it (see [`Fallback`]).
    pub fallback: Option<&'a Fallback<'a>>,
}

/// The routes a request goes on to, in order, within the same request, when every endpoint of
/// the one before is unreachable: it refused the connection, timed out connecting or is
/// ejected, or (a later hop's `x-skyline-unsent`) could send the request to no instance. Such
/// a request reached no application, so this is safe for every method; a body of known length
/// up to [`RETRY_BODY_LIMIT`] is kept for the purpose. Other failures follow the retry rules.
///
/// The agent's fallback is its catch-all (the gateway); the gateway's, the tiers below the one
/// it chose. A route found unreachable is marked so in its [`Observed`](crate::routing::reach::Observed)
/// state, and one that answers again recovers after `hold`.
#[derive(Debug)]
pub struct Fallback<'a> {
    pub routes: &'a [&'a Route],
    /// How long a route that answers again must stay reachable before requests use it again
    /// (zero: at once).
    pub hold: Duration,
    /// Which route answered: 0 the destination's own, `i` `routes[i - 1]`.
    served: AtomicUsize,
}

impl<'a> Fallback<'a> {
    pub fn new(routes: &'a [&'a Route], hold: Duration) -> Self {
        Self {
            routes,
            hold,
            served: AtomicUsize::new(0),
        }
    }

    /// Which route answered the request: 0 the destination's own, `i` `routes[i - 1]`.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }
}

impl<'a> Destination<'a> {
    /// `service` at the first hop; the catalog knows it (`known`) or its metrics label is "".
    pub fn first_hop(
        service: &'a str,
        known: bool,
        route: &'a Route,
        policy: &'a Resilience,
    ) -> Self {
        Destination {
            service,
            label: if known { service } else { "" },
            route,
            policy,
            first_hop: true,
            fallback: None,
        }
    }

    /// `service`, known to the catalog, at a hop after the first.
    pub fn last_hop(service: &'a str, route: &'a Route, policy: &'a Resilience) -> Self {
        Destination {
            service,
            label: service,
            route,
            policy,
            first_hop: false,
            fallback: None,
        }
    }
}

/// Why a request is sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// The connection was refused: the request never left. Always safe, never budgeted.
    Connect,
    /// A later hop answered that it sent the request to no instance (`x-skyline-unsent`): as
    /// safe as [`Retry::Connect`], and not budgeted either.
    Unsent,
    /// The connection broke after the request was sent.
    Reset,
    /// The endpoint answered 502, 503 or 504.
    Status,
    /// The attempt took longer than its timeout.
    Timeout,
}

impl Retry {
    /// The request reached no application: it may go anywhere else, whatever its method.
    fn never_sent(self) -> bool {
        matches!(self, Retry::Connect | Retry::Unsent)
    }

    fn as_str(self) -> &'static str {
        match self {
            Retry::Connect => "connect",
            Retry::Unsent => "unsent",
            Retry::Reset => "reset",
            Retry::Status => "status",
            Retry::Timeout => "timeout",
        }
    }
}

/// Sends requests to upstreams over pooled keep-alive HTTP/1.1 connections.
#[derive(Clone, Debug)]
pub struct Forwarder {
    pool: Pool,
    /// HTTP/2 connections, for requests that came over HTTP/2 to endpoints that speak h2c.
    h2: h2::H2Pool,
    /// The express lane's connections (see [`express`]).
    raw: express::RawPool,
    /// Hops to mesh proxies are mTLS (see [`Forwarder::with_tls`]).
    mesh_tls: bool,
    /// Every request but an upgrade goes to other Skyline proxies over HTTP/2 (see
    /// [`h2::PeerProtocol`]).
    peers_h2: bool,
    /// Where retries, spent budgets, ejections and panic routing are counted.
    metrics: Arc<Metrics>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new(Metrics::new())
    }
}

impl Forwarder {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_tls(metrics, None)
    }

    /// A forwarder that speaks mesh TLS (when `tls`) to endpoints that are mesh proxies
    /// ([`Endpoint::mesh`](crate::routing::Endpoint::mesh)); plain HTTP to the others.
    pub fn with_tls(metrics: Arc<Metrics>, tls: Option<MeshTls>) -> Self {
        Self {
            pool: Pool::with_tls(POOL_IDLE_TIMEOUT, tls.clone()),
            h2: h2::H2Pool::with_tls(tls.clone()),
            mesh_tls: tls.is_some(),
            peers_h2: false,
            raw: express::RawPool::with_tls(POOL_IDLE_TIMEOUT, tls),
            metrics,
        }
    }

    /// This forwarder, sending requests to other Skyline proxies as `peers` says.
    pub fn with_peer_protocol(mut self, peers: h2::PeerProtocol) -> Self {
        self.peers_h2 = peers.is_h2();
        if peers == h2::PeerProtocol::Mux {
            // One link per peer, whichever lane the request took.
            let links = crate::mux::Links::default();
            self.raw = self.raw.linked(links.clone());
            self.pool = self.pool.linked(links);
        }
        self
    }

    /// Whether requests to other Skyline proxies go over HTTP/2 whatever the caller spoke: the
    /// express lane (HTTP/1.1 bytes) declines them.
    pub fn peers_h2(&self) -> bool {
        self.peers_h2
    }

    /// Whether hops to mesh proxies are mTLS (a proxy asserts its caller only over them).
    pub fn mesh_tls(&self) -> bool {
        self.mesh_tls
    }

    /// Where this forwarder's counters go (a role may add its own there).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Forwards `req` to an endpoint of `upstream` with the request target `target`, applying
    /// the header rules of the contract and the upstream's policy, and returns the response with
    /// its body streaming.
    ///
    /// Retries, each to an endpoint not tried yet when there is one:
    /// - a refused connection (the request never left): always, up to [`MAX_CONNECT_ATTEMPTS`];
    /// - a 502/503/504 answer, a timed-out attempt or a connection broken after sending: only
    ///   at the first hop, for an idempotent request whose body is empty or small enough to
    ///   buffer, up to the policy's retries and within the route's retry budget.
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        upstream: Destination<'_>,
        target: PathAndQuery,
        hop: impl Into<Hop<'_>>,
        conn: &Conn,
        trail: &mut Trail,
    ) -> Result<Response<Body>, MeshError> {
        // The clock read when the request arrived serves its deadline, its first attempt and
        // the balancer.
        let started = Instant::from_std(conn.arrived);
        let now = ns_at(conn.arrived);
        // An upgrade request keeps `Upgrade` and `Connection: upgrade` (see [`upgrade`]).
        let protocols = upgrade::requested(req.version(), req.headers());
        // A request goes over HTTP/2 to an endpoint that speaks only h2c, and to one that
        // speaks both when it came over HTTP/2 (keeping its trailers); over HTTP/1.1 to any
        // other (see [`Protocol`]).
        let h2 = req.version() == Version::HTTP_2;
        *req.uri_mut() = Uri::from(target);
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        // `te: trailers` is hop-by-hop but the one value HTTP/2 allows; gRPC servers may ask for it.
        let te_trailers = h2 && te_has_trailers(headers);
        let rules = headers::Rules {
            hop: hop.into(),
            first: upstream.first_hop,
            trusted: conn.mesh_peer.is_some(),
        };
        let set_host = headers::rewrite_request(headers, &rules, &conn.peer_ip);
        if let Some(protocols) = &protocols {
            upgrade::keep(headers, protocols.clone());
        }
        let policy = upstream.policy;
        let deadline = started + caller_deadline(headers, policy.request_timeout);
        // An upgrade request is never sent again once it may have left.
        let owns_retries = upstream.first_hop && policy.retries > 0 && protocols.is_none();
        // A body over the route's limit: refused before anything is forwarded when its length
        // is declared, cut off where it passes the limit when it is chunked.
        let mut cap = None;
        if let Some(limit) = policy.max_request_body {
            let hint = req.body().size_hint();
            if hint.lower() > limit {
                return Err(MeshError::ContentTooLarge);
            }
            if hint.exact().is_none() {
                cap = Some(Cap::new(limit));
            }
        }
        let over = cap.as_ref().map(|c| c.over.clone());
        let client_side = protocols.is_some().then(|| hyper::upgrade::on(&mut req));
        // An upgrade request is neither replayed nor sent on to a fallback: once it may have
        // reached an application, its connection belongs to that application.
        let keep = Keep {
            first_hop: upstream.first_hop && protocols.is_none(),
            owns_retries,
            fallback: protocols.is_none()
                && upstream.fallback.is_some_and(|f| !f.routes.is_empty()),
        };
        let (req, replay, resend) = match replayable(req, keep, deadline, cap).await {
            Ok(prepared) => prepared,
            Err(e) if conn.rejected() => {
                tracing::debug!(error = %e, "request body refused by the framing guard");
                return Err(MeshError::bad_request("malformed request body"));
            }
            Err(e) => return Err(e),
        };
        if owns_retries {
            upstream.route.budget.deposit_at(now);
        }
        let attempt = Attempt {
            upstream,
            set_host,
            owns_retries,
            started,
            deadline,
        };
        let mut exchange = HyperExchange {
            pool: &self.pool,
            h2: H2Send {
                pool: &self.h2,
                http2: h2,
                peers: self.peers_h2,
                te_trailers,
            },
            next: Some(req),
            replay,
            resend,
            upgrade: protocols.is_some(),
        };
        // Boxed: the attempts' state (the send, its timeout, the connection it may open) then
        // sits in one place, rather than in each future above this one, which are moved
        // whole at every level of a request's call chain.
        let answered = Box::pin(self.attempts(&mut exchange, attempt, now, trail)).await;
        if over.is_some_and(|over| over.load(Ordering::Relaxed)) {
            // The body passed the limit while it streamed: the upstream's connection was
            // closed under it, so it never got a whole request. An answer that came first
            // stands.
            if answered.is_err() {
                return Err(MeshError::ContentTooLarge);
            }
        }
        match answered {
            Err(error) => {
                if conn.rejected() {
                    // The guard refused the request body's framing while it was streaming.
                    return Err(MeshError::bad_request("malformed request body"));
                }
                Err(error)
            }
            Ok(mut response) => {
                let switch = match client_side {
                    Some(client) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                        let agreed = response.headers().get(header::UPGRADE).cloned();
                        let upstream_side = hyper::upgrade::on(&mut response);
                        Some((client, upstream_side, agreed.or(protocols)))
                    }
                    _ => None,
                };
                let (mut parts, body) = response.into_parts();
                // hyper decoded a chunked body; the length an ambiguous answer also gave is
                // not the body's (RFC 9112 §6.3: an intermediary removes it).
                if parts.headers.contains_key(header::TRANSFER_ENCODING) {
                    parts.headers.remove(header::CONTENT_LENGTH);
                }
                strip_hop_by_hop(&mut parts.headers);
                if let Some((client, upstream_side, agreed)) = switch {
                    if let Some(agreed) = agreed {
                        upgrade::keep(&mut parts.headers, agreed);
                    }
                    conn.upgraded();
                    upgrade::spawn(upgrade::Switch {
                        client,
                        upstream: upstream_side,
                        idle: policy.idle_timeout,
                        drained: conn.drained().clone(),
                        service: upstream.service.to_owned(),
                    });
                }
                Ok(Response::from_parts(parts, Either::Left(body)))
            }
        }
    }

    /// Sends a request's attempts through `exchange` until one is answered or the policy says
    /// stop: the endpoint choice, deadlines, retries and the budget, the same for every way of
    /// sending. `trail` gets each attempt's endpoint and count (for the access log).
    async fn attempts<E: Exchange>(
        &self,
        exchange: &mut E,
        at: Attempt<'_>,
        started_ns: u64,
        trail: &mut Trail,
    ) -> Result<E::Response, MeshError> {
        let Attempt {
            upstream,
            set_host,
            started,
            deadline,
            ..
        } = at;
        let policy = upstream.policy;
        let limits = Limits {
            connect: policy.connect_timeout,
            idle: policy.idle_timeout,
            mesh: false,
        };
        let fallback = upstream.fallback.map_or(&[][..], |f| f.routes);
        let hold = upstream.fallback.map_or(Duration::ZERO, |f| f.hold);
        // The route in use: the destination's own (stage 0), then each fallback in turn.
        let (mut dest, mut stage) = (upstream, 0usize);
        // Every failure on this stage's route so far left the request unsent.
        let mut clean = true;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let (mut refused, mut retries) = (0, 0);
        let mut last: Option<(Retry, Option<MeshError>)> = None;
        // The last attempt's answer when a later hop sent the request to no instance: relayed
        // when no endpoint is left to try, as it says why (no healthy instance there, say).
        let mut unsent: Option<E::Response> = None;
        loop {
            let again = last.as_ref().is_some_and(|(why, _)| !why.never_sent());
            // The first attempt starts when the request did (one clock read less).
            let (now, now_ns) = if last.is_none() {
                (started, started_ns)
            } else {
                let now = Instant::now();
                (now, ns_at(now.into_std()))
            };
            if clean && stage < fallback.len() && exchange.ready() {
                // On to the next route when this one cannot take the request: each endpoint
                // refused (or enough of them), or every one is ejected.
                let route = dest.route;
                let unreachable =
                    refused >= MAX_CONNECT_ATTEMPTS || route.exhausted(&tried, now_ns);
                if unreachable || route.is_empty() {
                    if !route.is_empty() {
                        route.observed.unreachable(now);
                    }
                    tracing::debug!(
                        service = upstream.service,
                        stage,
                        "route unreachable, going on"
                    );
                    dest.route = fallback[stage];
                    stage += 1;
                    unsent = None;
                    (refused, clean) = (0, true);
                    tried.clear();
                    continue;
                }
            }
            let Some(choice) = self.choose(&dest, &tried, again, now_ns) else {
                if let Some(answer) = unsent {
                    return Ok(answer);
                }
                return Err(last
                    .and_then(|(_, e)| e)
                    .unwrap_or(MeshError::NoHealthyEndpoint));
            };
            if let Some((why, _)) = &last {
                self.metrics.retry(upstream.label, why.as_str());
            }
            let endpoint = choice.endpoint;
            if !exchange.ready() {
                return Err(last
                    .and_then(|(_, e)| e)
                    .unwrap_or(MeshError::NoHealthyEndpoint));
            }
            if now >= deadline {
                return Err(MeshError::UpstreamTimeout);
            }
            let attempt_deadline = policy
                .attempt_timeout
                .map_or(deadline, |t| deadline.min(now + t));
            let headers = AttemptHeaders {
                host: set_host.then_some(&endpoint.host),
                timeout: millis(attempt_deadline - now),
                attempt: (!tried.is_empty()).then_some(tried.len() + 1),
                protocol: endpoint.protocol,
            };
            let flight = endpoint.state.start_at(now_ns);
            let limits = Limits {
                mesh: endpoint.mesh,
                ..limits
            };
            trail.upstream = Some(endpoint.addr);
            trail.attempts += 1;
            unsent = None;
            let sent = exchange.send(endpoint.addr, headers, limits);
            let (retry, error) = match tokio::time::timeout_at(attempt_deadline, sent).await {
                // A later hop sent it to no instance: as good as refused, when it can go again.
                Ok(Ok(response)) if E::unsent(&response) && exchange.ready() => {
                    flight.finish(Outcome::Failure);
                    refused += 1;
                    let error = SendError::Unforwarded {
                        addr: endpoint.addr,
                    };
                    if refused >= MAX_CONNECT_ATTEMPTS && stage >= fallback.len() {
                        return Ok(response);
                    }
                    unsent = Some(response);
                    (Retry::Unsent, Some(MeshError::UpstreamConnect(error)))
                }
                Ok(Ok(response)) => {
                    let status = E::status(&response);
                    let failed = status.is_server_error();
                    flight.finish(if failed {
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    });
                    if let Some(f) = upstream.fallback {
                        dest.route.observed.reached(Instant::now(), hold);
                        f.served.store(stage, Ordering::Relaxed);
                    }
                    if !matches!(status.as_u16(), 502..=504) {
                        return Ok(response);
                    }
                    if !self.may_retry(&at, exchange.replayable(), retries, Retry::Status) {
                        return Ok(response);
                    }
                    // The answer is dropped unread, which closes its connection.
                    (Retry::Status, None)
                }
                Ok(Err(Failed::Unsent(error))) => {
                    flight.finish(Outcome::Failure);
                    refused += 1;
                    if refused >= MAX_CONNECT_ATTEMPTS && stage >= fallback.len() {
                        return Err(MeshError::UpstreamConnect(error));
                    }
                    (Retry::Connect, Some(MeshError::UpstreamConnect(error)))
                }
                Ok(Err(Failed::Broken(error))) => {
                    flight.finish(Outcome::Failure);
                    if !self.may_retry(&at, exchange.replayable(), retries, Retry::Reset) {
                        return Err(MeshError::UpstreamConnect(error));
                    }
                    (Retry::Reset, Some(MeshError::UpstreamConnect(error)))
                }
                Err(_elapsed) => {
                    flight.finish(Outcome::Failure);
                    let time_left = deadline > Instant::now();
                    if !time_left
                        || !self.may_retry(&at, exchange.replayable(), retries, Retry::Timeout)
                    {
                        return Err(MeshError::UpstreamTimeout);
                    }
                    (Retry::Timeout, Some(MeshError::UpstreamTimeout))
                }
            };
            if !retry.never_sent() {
                retries += 1;
                clean = false;
            }
            tracing::debug!(
                service = upstream.service,
                failed = %endpoint.addr,
                reason = retry.as_str(),
                "retrying"
            );
            if tried.contains(&endpoint.addr) {
                // The same endpoint again (it is the only one): give it a moment.
                let step = 25u64 << retries.min(4);
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=step))).await;
            }
            tried.push(endpoint.addr);
            last = Some((retry, error));
        }
    }

    /// An endpoint for the next attempt: one not tried yet, or when `again` (a retry that is
    /// not about a refused connection), the same one again when there is no other.
    fn choose(
        &self,
        up: &Destination<'_>,
        tried: &[SocketAddr],
        again: bool,
        now: u64,
    ) -> Option<Choice> {
        let (balance, outlier) = (up.policy.balance, &up.policy.outlier);
        let choice = up
            .route
            .choose_at(tried, balance, outlier, now)
            .or_else(|| again.then(|| up.route.choose_at(&[], balance, outlier, now))?)?;
        if let Some((addr, time)) = choice.ejected {
            tracing::warn!(service = up.service, endpoint = %addr, ejected_for = ?time, "endpoint ejected after consecutive failures");
            self.metrics.ejection(up.label);
        }
        if choice.panic {
            panic_warning(up.service);
            self.metrics.panic_routing(up.label);
        }
        Some(choice)
    }

    /// Whether a failed attempt may be retried: only by the hop that owns retries, for a
    /// request that can be sent again, within the policy's count and the route's budget.
    fn may_retry(&self, at: &Attempt<'_>, replayable: bool, retries: u32, why: Retry) -> bool {
        if !at.owns_retries || !replayable || retries >= at.upstream.policy.retries {
            return false;
        }
        if !at.upstream.route.budget.try_withdraw() {
            self.metrics.retry_budget_exhausted(at.upstream.label);
            tracing::debug!(
                service = at.upstream.service,
                reason = why.as_str(),
                "retry budget spent"
            );
            return false;
        }
        true
    }
}

/// What one attempt adds to the request head.
struct AttemptHeaders<'a> {
    /// The endpoint's address as `Host`, when the request's own is not kept.
    host: Option<&'a HeaderValue>,
    /// `x-skyline-timeout-ms`: the time this attempt has.
    timeout: HeaderValue,
    /// `x-skyline-attempt`, from the second attempt on.
    attempt: Option<usize>,
    /// What the endpoint speaks (see [`h2`]).
    protocol: Protocol,
}

/// How a request is sent to an endpoint over HTTP/2 (see [`Protocol::sends_h2`]).
#[derive(Clone, Copy)]
struct H2Send<'p> {
    pool: &'p h2::H2Pool,
    /// The request came over HTTP/2.
    http2: bool,
    /// Every request but an upgrade goes to another Skyline proxy over HTTP/2.
    peers: bool,
    /// The client sent `te: trailers`, which HTTP/2 forwards.
    te_trailers: bool,
}

impl H2Send<'_> {
    /// Adds one attempt's headers to `req`; `h2`: it goes over HTTP/2.
    fn stamp(&self, req: &mut Request<RequestBody>, headers: &AttemptHeaders<'_>, h2: bool) {
        let h = req.headers_mut();
        if let Some(host) = headers.host {
            h.insert(header::HOST, host.clone());
        }
        if h.contains_key(&GRPC_TIMEOUT) {
            // The gRPC server's deadline is what is left of the caller's.
            h.insert(&GRPC_TIMEOUT, grpc_timeout_value(&headers.timeout));
        }
        h.insert(&X_SKYLINE_TIMEOUT_MS, headers.timeout.clone());
        if let Some(n) = headers.attempt {
            h.insert(&X_SKYLINE_ATTEMPT, HeaderValue::from(n));
        }
        if h2 && self.te_trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// Whether the `te` header asks for trailers.
fn te_has_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    })
}

/// Why an attempt got no response.
enum Failed {
    /// The request never left (a refused connection): it may go anywhere else.
    Unsent(SendError),
    /// The request may have reached the upstream.
    Broken(SendError),
}

/// How a request's attempts go out: hyper's client with `http` types ([`HyperExchange`]), or the
/// express lane's bytes. [`Forwarder::attempts`] decides where and when, the same for both.
trait Exchange {
    type Response;

    fn status(response: &Self::Response) -> StatusCode;

    /// Whether the response is a later hop's mesh error saying it sent the request to no
    /// instance (`x-skyline-unsent`).
    fn unsent(response: &Self::Response) -> bool;

    /// Whether there is a request to send: the first, one handed back unsent, or a replay.
    fn ready(&self) -> bool;

    /// Whether the request may be sent again after it may have reached an upstream.
    fn replayable(&self) -> bool;

    /// Sends the request to `addr` with this attempt's headers. Only called when
    /// [`ready`](Self::ready).
    fn send(
        &mut self,
        addr: SocketAddr,
        headers: AttemptHeaders<'_>,
        limits: Limits,
    ) -> impl Future<Output = Result<Self::Response, Failed>>;
}

/// A request with `http` types, sent over hyper client connections from [`Pool`].
struct HyperExchange<'p> {
    pool: &'p Pool,
    /// How the request goes to an endpoint over HTTP/2.
    h2: H2Send<'p>,
    /// The request to send next: the first, or one a refused connection handed back.
    next: Option<Request<RequestBody>>,
    replay: Option<Replay>,
    /// A copy of a request that may not be replayed, to send on only when a later hop answers
    /// that it never forwarded it (see [`Fallback`]).
    resend: Option<Replay>,
    /// An upgrade request: sent on a connection of its own (see [`upgrade`]).
    upgrade: bool,
}

impl Exchange for HyperExchange<'_> {
    type Response = Response<PooledBody>;

    fn status(response: &Self::Response) -> StatusCode {
        response.status()
    }

    fn unsent(response: &Self::Response) -> bool {
        let headers = response.headers();
        matches!(response.status().as_u16(), 502 | 503)
            && headers.contains_key(&X_SKYLINE_UNSENT)
            && headers.contains_key(&X_SKYLINE_ERROR)
    }

    fn ready(&self) -> bool {
        self.next.is_some() || self.replay.is_some() || self.resend.is_some()
    }

    fn replayable(&self) -> bool {
        self.replay.is_some()
    }

    async fn send(
        &mut self,
        addr: SocketAddr,
        headers: AttemptHeaders<'_>,
        limits: Limits,
    ) -> Result<Self::Response, Failed> {
        let next = self.next.take();
        let again = self.replay.as_ref().or(self.resend.as_ref());
        let Some(mut req) = next.or_else(|| again.map(Replay::request)) else {
            return Err(Failed::Broken(SendError::Spent { addr }));
        };
        let h2 = headers
            .protocol
            .sends_h2(self.h2.http2, self.upgrade, self.h2.peers);
        self.h2.stamp(&mut req, &headers, h2);
        let sent = if h2 {
            match (self.h2.pool.send(addr, req, limits).await, again) {
                // The peer refused the stream (it was going away): it processed nothing, so a
                // kept copy goes once more, on a fresh connection to the same peer (a
                // restarted one takes it).
                (
                    Err(SendFailure {
                        error: SendError::Refused { .. },
                        unsent: None,
                    }),
                    Some(again),
                ) => {
                    let mut req = again.request();
                    self.h2.stamp(&mut req, &headers, h2);
                    self.h2.pool.send(addr, req, limits).await
                }
                (sent, _) => sent,
            }
        } else if self.upgrade {
            // Boxed: its dial and handshake would otherwise size every request's future (5 KiB
            // more, copied at each of the await points above it) for a rare request.
            Box::pin(self.pool.send_upgrade(addr, req, limits)).await
        } else {
            self.pool
                .send(addr, req, self.replay.as_ref(), limits)
                .await
        };
        match sent {
            Ok(response)
                if response.status() == StatusCode::SWITCHING_PROTOCOLS && !self.upgrade =>
            {
                Err(Failed::Broken(SendError::Protocol {
                    addr,
                    reason: "unrequested protocol switch",
                }))
            }
            Ok(response) => Ok(response),
            Err(SendFailure {
                error,
                unsent: Some(req),
            }) => {
                self.next = Some(req);
                Err(Failed::Unsent(error))
            }
            // Spent, but unprocessed: a kept copy may go anywhere.
            Err(SendFailure {
                error: error @ SendError::Refused { .. },
                unsent: None,
            }) => Err(Failed::Unsent(error)),
            Err(SendFailure {
                error,
                unsent: None,
            }) => Err(Failed::Broken(error)),
        }
    }
}

/// The fixed part of every attempt of one request.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    upstream: Destination<'a>,
    /// `Host` is set to the endpoint's address (last hop, or a request that came without one).
    set_host: bool,
    owns_retries: bool,
    started: Instant,
    deadline: Instant,
}

/// What a hop keeps of a request to send it again.
#[derive(Clone, Copy)]
struct Keep {
    first_hop: bool,
    owns_retries: bool,
    /// The request has a [`Fallback`] to go on to.
    fallback: bool,
}

/// Turns the client's request into one the forwarder can send, and a [`Replay`] of it when it
/// may be sent again: an idempotent request with no body, or with a body of at most
/// [`RETRY_BODY_LIMIT`] bytes that is buffered first (only when this hop owns retries). With a
/// fallback, any request with no body or a body of known length up to that limit is kept too
/// (the third value), to go on when a later hop answers that it never forwarded it.
///
/// Only the first hop keeps a replay. A later hop whose pooled connection closes under a
/// request it already wrote answers 502, and the first hop, which keeps the request anyway,
/// sends it again; so the common path of a later hop copies no request head.
///
/// A body that streams is capped by `cap` when given, and said to be chunked when its length
/// is not known: hyper's client would otherwise send a GET's or HEAD's body as no body at all.
async fn replayable(
    req: Request<Incoming>,
    keep: Keep,
    deadline: Instant,
    cap: Option<Cap>,
) -> Result<(Request<RequestBody>, Option<Replay>, Option<Replay>), MeshError> {
    let (mut parts, body) = req.into_parts();
    if body.is_end_stream() {
        let req = Request::from_parts(parts, Either::Right(Buffered::empty()));
        let replay = if keep.first_hop {
            Replay::of(&req, Buffered::empty())
        } else {
            None
        };
        let resend = (keep.fallback && replay.is_none())
            .then(|| Replay::unsent_copy(&req, Buffered::empty()));
        return Ok((req, replay, resend));
    }
    let small = body
        .size_hint()
        .exact()
        .is_some_and(|n| n <= RETRY_BODY_LIMIT as u64);
    let idempotent = pool::is_idempotent(&parts.method);
    let retried = keep.owns_retries && idempotent;
    if !(small && (retried || keep.fallback)) {
        if body.size_hint().exact().is_none() {
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let body = Streamed { body, cap };
        return Ok((Request::from_parts(parts, Either::Left(body)), None, None));
    }
    let collected =
        tokio::time::timeout_at(deadline, Limited::new(body, RETRY_BODY_LIMIT).collect())
            .await
            .map_err(|_| MeshError::UpstreamTimeout)?
            .map_err(|_| MeshError::bad_request("incomplete request body"))?;
    // The trailers that followed the body (HTTP/2) go with it.
    let trailers = collected.trailers().cloned();
    let collected = Buffered::new(collected.to_bytes(), trailers);
    let req = Request::from_parts(parts, Either::Right(collected.clone()));
    let replay = if retried {
        Replay::of(&req, collected.clone())
    } else {
        None
    };
    let resend = replay
        .is_none()
        .then(|| Replay::unsent_copy(&req, collected));
    Ok((req, replay, resend))
}

// === Streamed ===

/// A client's request body as it streams to the upstream, cut off with an error once it grows
/// past the route's `max_request_body` (when it has a cap).
#[derive(Debug)]
pub struct Streamed {
    body: Incoming,
    cap: Option<Cap>,
}

/// What is left of a body's size limit, and where passing it is noted for the forwarder.
#[derive(Debug)]
struct Cap {
    limit: u64,
    left: u64,
    over: Arc<AtomicBool>,
}

impl Cap {
    fn new(limit: u64) -> Self {
        Cap {
            limit,
            left: limit,
            over: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Why a streamed request body ended early.
#[derive(Debug, thiserror::Error)]
pub enum StreamedError {
    #[error("request body failed")]
    Client(#[from] hyper::Error),
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = StreamedError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamedError>>> {
        let this = &mut *self;
        let polled = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let (Some(Ok(frame)), Some(cap)) = (&polled, &mut this.cap) {
            let len = frame.data_ref().map_or(0, |d| d.len() as u64);
            if len > cap.left {
                cap.over.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(StreamedError::TooLarge(cap.limit))));
            }
            cap.left -= len;
        }
        Poll::Ready(polled.map(|frame| frame.map_err(StreamedError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The time the request may take: the policy's, or less when the caller's
/// `x-skyline-timeout-ms` or a gRPC client's `grpc-timeout` says so (a value that does not
/// parse is ignored).
fn caller_deadline(headers: &HeaderMap, policy: Duration) -> Duration {
    let caller = headers.get(&X_SKYLINE_TIMEOUT_MS);
    let limit = within_caller_deadline(policy, caller.and_then(|v| parse_millis(v.as_bytes())));
    match headers.get(&GRPC_TIMEOUT) {
        Some(grpc) => grpc_timeout(grpc.as_bytes()).map_or(limit, |t| limit.min(t)),
        None => limit,
    }
}

/// `grpc-timeout` for a time left given as `x-skyline-timeout-ms`'s milliseconds: in
/// milliseconds, or whole seconds past gRPC's 8 digits.
fn grpc_timeout_value(ms: &HeaderValue) -> HeaderValue {
    let ms: u64 = std::str::from_utf8(ms.as_bytes())
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let text = if ms <= 99_999_999 {
        format!("{ms}m")
    } else {
        format!("{}S", (ms / 1000).min(99_999_999))
    };
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("0m"))
}

/// A `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `policy`, or the caller's `x-skyline-timeout-ms` when that is less.
fn within_caller_deadline(policy: Duration, caller_ms: Option<u64>) -> Duration {
    caller_ms.map_or(policy, |ms| policy.min(Duration::from_millis(ms)))
}

/// A header value of whole milliseconds (surrounding whitespace allowed).
fn parse_millis(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// `d` in whole milliseconds as a header value. Nearly every request sends its route's full
/// timeout (only retries and callers' deadlines send less), so the last value is kept per
/// thread and shared instead of formatted and allocated again.
fn millis(d: Duration) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<(u64, HeaderValue)> =
            const { std::cell::RefCell::new((0, HeaderValue::from_static("0"))) };
    }
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    LAST.with_borrow_mut(|(last, value)| {
        if *last != ms {
            *value = HeaderValue::from(ms);
            *last = ms;
        }
        value.clone()
    })
}

/// Logs panic routing at most once a second for the whole process: loud, not a flood.
fn panic_warning(service: &str) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ns();
    let last = LAST.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 1_000_000_000
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(%service, "panic routing: no endpoint is healthy, using all of them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_counts_are_decimal() {
        for n in [1, 8, 9, 123] {
            assert_eq!(hop_count(n), n.to_string().as_str());
        }
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
    fn the_grpc_timeout_passed_on_is_the_time_left_in_at_most_8_digits() {
        let passed = |ms: u64| grpc_timeout_value(&HeaderValue::from(ms));
        assert_eq!(passed(0), "0m");
        assert_eq!(passed(4_321), "4321m");
        assert_eq!(passed(99_999_999), "99999999m");
        assert_eq!(passed(100_000_000), "100000S");
        assert_eq!(passed(u64::MAX), "99999999S");
        for ms in [0, 1, 4_321, 99_999_999, 100_000_000] {
            let back = grpc_timeout(passed(ms).as_bytes()).unwrap();
            assert!(back <= Duration::from_millis(ms), "{ms}");
        }
    }

    #[test]
    fn grpc_timeouts_parse_with_their_units_and_bad_ones_are_ignored() {
        assert_eq!(grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(b"5u"), Some(Duration::from_micros(5)));
        for bad in [&b""[..], b"m", b"123456789m", b"10x", b"-1S", b"1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(&GRPC_TIMEOUT, HeaderValue::from_static("250m"));
        h.insert(&X_SKYLINE_TIMEOUT_MS, HeaderValue::from_static("900"));
        assert_eq!(
            caller_deadline(&h, Duration::from_secs(5)),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn mesh_errors_to_grpc_calls_become_grpc_statuses_with_the_error_code_kept() {
        for (error, status) in [
            (MeshError::UnknownService, "5"),
            (MeshError::NoHealthyEndpoint, "14"),
            (MeshError::NoCatalog, "14"),
            (MeshError::UpstreamTimeout, "4"),
            (MeshError::LoopDetected, "13"),
        ] {
            let code = error.code();
            let mut r = error.into_response("svc");
            as_grpc_status(&mut r);
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()[&GRPC_STATUS], status, "{code}");
            assert_eq!(r.headers()[&X_SKYLINE_ERROR], code);
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/grpc");
            assert!(r.body().is_end_stream());
        }
        let mut ok = Response::new(full("x"));
        as_grpc_status(&mut ok);
        assert!(!ok.headers().contains_key(&GRPC_STATUS));
    }
}
