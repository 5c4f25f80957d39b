//! HTTP/2 over cleartext (h2c, prior knowledge) toward the next hop: a few multiplexed
//! connections per endpoint address, shared by every HTTP/2 request to it.
//!
//! The forwarder sends a request this way by what the endpoint speaks (`routing::Protocol`): a
//! request the client made over HTTP/2 to another Skyline proxy (an agent's inbound, a gateway,
//! a bridge), and every request (an HTTP/1.1 caller's too) to an instance registered with meta
//! `protocol = "h2c"` or tag `h2c` (see `routing::protocol_of`), or to a Kubernetes Service the
//! bridge sends h2c (see `bridge::Names::protocol`). HTTP/2 keeps what HTTP/1.1 cannot carry
//! through a hop, trailers above all, which gRPC's status travels in.
//!
//! With `[mesh] peer_protocol = "h2"` ([`PeerProtocol::H2`]) every request to another Skyline
//! proxy goes this way, an HTTP/1.1 caller's too (as linkerd2-proxy does): the forwarder applies
//! the header contract as for HTTP/1.1, then [`as_h2`] moves `Host` to `:authority` and drops
//! what HTTP/2 does not carry; the answer goes back to the caller as HTTP/1.1 (hyper's server
//! frames it). Upgrades (WebSocket) stay on HTTP/1.1. To a mesh proxy there are
//! [`PEER_CONNECTIONS`] connections, taken in turn, with flow-control windows sized for large
//! bodies ([`PEER_STREAM_WINDOW`], [`PEER_CONNECTION_WINDOW`]). A stream the peer refused
//! (`REFUSED_STREAM`, or past the last stream its GOAWAY took) reached no application: it is
//! [`SendError::Refused`], as safe to send again as a refused connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Deserialize;
use toml::Spanned;

use super::pool::{Limits, PooledBody, RequestBody, SendError, SendFailure};
use crate::config::reference::{Section, Value};
use crate::config::{ConfigError, Source, key};
use crate::tls::MeshTls;

/// How often an open connection is pinged, so a dead peer is noticed without a request.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections to one mesh proxy (an inbound, a gateway, a bridge), each carrying up to the
/// peer's concurrent-stream limit (256 on a Skyline listener): requests take them in turn. Two
/// keep one slow connection (a large body filling its window) from holding every request up.
pub const PEER_CONNECTIONS: usize = 2;
/// The flow-control window of each stream on a connection to a mesh proxy: a large body flows
/// without waiting for a WINDOW_UPDATE every 64 KiB (HTTP/2's default).
pub const PEER_STREAM_WINDOW: u32 = 1024 * 1024;
/// The flow-control window of a whole connection to a mesh proxy (several large bodies at once).
pub const PEER_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Endpoints remembered past which those with no open connection are forgotten.
const MAX_REMEMBERED: usize = 1024;

// === PeerProtocol ===

/// How requests travel to other Skyline proxies (agent outbound → inbound, → gateway,
/// gateway → bridge, bridge → gateway).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerProtocol {
    /// In the version the caller spoke: HTTP/1.1 callers over pooled HTTP/1.1 connections
    /// (body-less requests on the express lane), HTTP/2 callers over HTTP/2.
    Http1,
    /// Every request but an upgrade over a few long-lived HTTP/2 connections per peer.
    H2,
    /// HTTP/1.1 callers' requests on the express lane as streams of one mesh link per peer
    /// (see [`crate::mux`]); the rest as with `http1`.
    #[default]
    Mux,
}

impl PeerProtocol {
    pub fn is_h2(self) -> bool {
        self == PeerProtocol::H2
    }
}

/// The flag of `[mesh] peer_protocol`, the same in the agent, the gateway and the bridge.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PeerArgs {
    /// How requests travel to other Skyline proxies: "http1" (in the caller's HTTP version),
    /// "h2" (every request but an upgrade over a few multiplexed HTTP/2 connections per peer)
    /// or "mux" (HTTP/1.1 requests as streams of one mesh link per peer) [default: mux]
    #[arg(long, env = "SKYLINE_PEER_PROTOCOL", value_name = "http1|h2|mux")]
    pub peer_protocol: Option<PeerProtocol>,
}

/// The `[mesh]` table of the agent's, gateway's and bridge's files.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct MeshSection {
    peer_protocol: Option<Spanned<String>>,
}

/// The `[mesh]` table, described (see [`crate::config::reference`]).
pub const FILE_SECTION: Section = Section {
    table: "mesh",
    sample: "",
    doc: "How the proxies talk to each other. Needs a restart.",
    defaults_from: None,
    keys: &[key(
        "peer_protocol",
        "peer_protocol",
        "`\"http1\"`, `\"h2\"` or `\"mux\"`",
        Value::Default("\"mux\""),
    )],
};

impl PeerArgs {
    /// The flag or variable over the file's `[mesh]` table.
    pub(crate) fn resolve(
        &self,
        src: &Source,
        file: &MeshSection,
    ) -> Result<PeerProtocol, ConfigError> {
        if let Some(flag) = self.peer_protocol {
            return Ok(flag);
        }
        let Some(text) = &file.peer_protocol else {
            return Ok(PeerProtocol::default());
        };
        <PeerProtocol as clap::ValueEnum>::from_str(text.get_ref(), false).map_err(|_| {
            src.at(
                Some(text.span().start),
                "mesh.peer_protocol",
                format!("{:?} is not \"http1\", \"h2\" or \"mux\"", text.get_ref()),
            )
        })
    }
}

// === H2Pool ===

/// A few HTTP/2 connections per endpoint (one to an instance, [`PEER_CONNECTIONS`] to a mesh
/// proxy). Cheap to clone: one shared map.
#[derive(Clone, Debug, Default)]
pub struct H2Pool {
    peers: Arc<Mutex<HashMap<SocketAddr, Arc<Peer>>>>,
    /// Mesh TLS, for connections to endpoints that are mesh proxies.
    tls: Option<MeshTls>,
}

/// The connections to one endpoint, each opened when first needed and again once closed.
#[derive(Debug)]
struct Peer {
    /// One connection per slot; a slot's lock is held while its connection opens, so requests
    /// that arrive meanwhile wait for that connection rather than open their own.
    slots: Box<[tokio::sync::Mutex<Option<Open>>]>,
    /// The slot the next request takes.
    next: AtomicUsize,
}

/// An open connection, numbered so a request that found it closed replaces only that one.
#[derive(Debug)]
struct Open {
    id: u64,
    sender: SendRequest<RequestBody>,
}

impl H2Pool {
    /// A pool that speaks mesh TLS (when `tls`) to the endpoints that are mesh proxies.
    pub fn with_tls(tls: Option<MeshTls>) -> Self {
        Self {
            peers: Arc::default(),
            tls,
        }
    }

    /// Sends `req` (origin-form target, `Host` set, as for the HTTP/1.1 pool) to `addr` over
    /// HTTP/2. A request the connection did not take (it had closed) is sent once more on a
    /// fresh connection; one a fresh connection did not take is handed back as unsent. A
    /// stream the peer refused is [`SendError::Refused`] (the request is spent: hyper sent it).
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<RequestBody>,
        limits: Limits,
    ) -> Result<Response<PooledBody>, SendFailure> {
        let mut req = as_h2(req, addr);
        let peer = self.peer(addr, if limits.mesh { PEER_CONNECTIONS } else { 1 });
        let slot = peer.next.fetch_add(1, Ordering::Relaxed) % peer.slots.len();
        // The connection found closed, to be replaced.
        let mut stale = None;
        loop {
            let (id, fresh, mut sender) = match self.sender(&peer, slot, stale, addr, limits).await
            {
                Ok(open) => open,
                Err(error) => {
                    return Err(SendFailure {
                        error,
                        unsent: Some(as_h1(req)),
                    });
                }
            };
            if sender.ready().await.is_err() {
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
                stale = Some(id);
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(response.map(|b| PooledBody::unpooled(b, limits.idle))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        req = unsent;
                        stale = Some(id);
                    }
                    unsent => {
                        let source = e.into_error();
                        let error = if refused(&source) {
                            SendError::Refused { addr, source }
                        } else {
                            SendError::Upstream { addr, source }
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

    /// The connections to `addr`, `slots` of them when first asked for.
    fn peer(&self, addr: SocketAddr, slots: usize) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(peer) = peers.get(&addr) {
            return peer.clone();
        }
        if peers.len() >= MAX_REMEMBERED {
            // Endpoints come and go with the catalog: forget those with nothing open.
            peers.retain(|_, p| {
                p.slots
                    .iter()
                    .any(|s| s.try_lock().map_or(true, |o| o.is_some()))
            });
        }
        let peer = Arc::new(Peer {
            slots: (0..slots).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        });
        peers.insert(addr, peer.clone());
        peer
    }

    /// The open connection of `peer`'s slot `slot`, or a new one when it has none, it closed,
    /// or it is `stale`; whether it is new.
    async fn sender(
        &self,
        peer: &Peer,
        slot: usize,
        stale: Option<u64>,
        addr: SocketAddr,
        limits: Limits,
    ) -> Result<(u64, bool, SendRequest<RequestBody>), SendError> {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let Some(slot) = peer.slots.get(slot) else {
            return Err(SendError::Protocol {
                addr,
                reason: "no connection slot",
            });
        };
        let mut open = slot.lock().await;
        if let Some(o) = open.as_ref() {
            if !o.sender.is_closed() && Some(o.id) != stale {
                return Ok((o.id, false, o.sender.clone()));
            }
        }
        *open = None;
        let tls = self.tls.as_ref().filter(|_| limits.mesh);
        let sender = Box::pin(connect(addr, limits.connect, tls, limits.mesh)).await?;
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        *open = Some(Open {
            id,
            sender: sender.clone(),
        });
        Ok((id, true, sender))
    }
}

/// Whether an HTTP/2 request failed because the peer refused its stream: `REFUSED_STREAM`
/// (RFC 9113 §8.7: not processed), or a graceful GOAWAY whose last stream is below it. Either
/// way no application saw it.
fn refused(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<::h2::Error>() {
            let reason = h2.reason();
            return (h2.is_reset()
                && h2.is_remote()
                && reason == Some(::h2::Reason::REFUSED_STREAM))
                || (h2.is_go_away() && h2.is_remote() && reason == Some(::h2::Reason::NO_ERROR));
        }
        source = e.source();
    }
    false
}

/// A new HTTP/2 connection to `addr`, driven in a task of its own.
/// `mesh`: the endpoint is a mesh proxy, whose connection gets the peer windows.
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&MeshTls>,
    mesh: bool,
) -> Result<SendRequest<RequestBody>, SendError> {
    match tls {
        None => handshake(addr, super::pool::dial_tcp(addr, timeout).await?, mesh).await,
        Some(tls) => {
            handshake(
                addr,
                super::pool::dial_mesh(addr, timeout, tls).await?,
                mesh,
            )
            .await
        }
    }
}

async fn handshake<S: crate::serve::Io>(
    addr: SocketAddr,
    stream: S,
    mesh: bool,
) -> Result<SendRequest<RequestBody>, SendError> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    if mesh {
        // Many callers' bodies share a few connections: windows sized for them from the start.
        builder
            .initial_stream_window_size(PEER_STREAM_WINDOW)
            .initial_connection_window_size(PEER_CONNECTION_WINDOW);
    } else {
        // Large messages (gRPC's are up to 4 MiB by default) need windows that grow with the
        // bandwidth-delay product, not HTTP/2's 64 KiB default.
        builder.adaptive_window(true);
    }
    let (sender, conn) = builder
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

/// The request in HTTP/2 form (see [`PeerProtocol::H2`]): an absolute URI whose authority is the `Host` (removed: HTTP/2
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
