//! `skyline bridge`, on each Kubernetes node (a DaemonSet on host port 5041), both directions:
//!
//! - Skyline → Kubernetes: `/service/<name>/<rest>?q` → `http://<name>.<ns>.svc.cluster.local:
//!   <port>/<rest>?q`, the name resolved through the cluster DNS (answers cached per TTL).
//!   A name the DNS does not know is `404 unknown-service`.
//! - Kubernetes → Skyline: a request whose `Host` is `<name>.<ns>.svc.cluster.local[:port]`
//!   (a Kubernetes Service that targets the bridge pods) → `/service/<name><path>` to the
//!   gateway pool, marked as coming from a bridge so it never comes back to one.

pub mod config;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentError, CatalogSource};
use crate::catalog::{Health, ServiceName, Subscriber};
use crate::gateway::X_SKYLINE_ORIGIN;
use crate::proxy::inbound::strip_prefix;
use crate::proxy::outbound::split_service_path;
use crate::proxy::{Body, Forwarder, Host, MeshError, count_hop};
use crate::routing::{Endpoint, Route};
use crate::serve::activation::Inherited;
use crate::serve::{self, Conn, Handler};

/// The catalog service of the gateway pool.
pub const GATEWAY_SERVICE: &str = "skyline-gateway";
/// The cluster domain of Kubernetes Service names.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Validated bridge settings (see [`config::BridgeArgs`]).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where requests arrive: host port 5041, and any Service port that targets the bridge.
    pub listen: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The cluster DNS server.
    pub dns: SocketAddr,
    pub names: Names,
    /// Fixed gateway addresses; empty: the catalog's `skyline-gateway` instances.
    pub gateways: Vec<SocketAddr>,
    /// Where the catalog comes from, to find the gateways; `None` with fixed gateways.
    pub catalog: Option<CatalogSource>,
    pub max_hops: u32,
}

/// How a Skyline service name becomes a Kubernetes Service name and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// With `{name}` and `{namespace}`; default `{name}.{namespace}.svc.cluster.local`.
    pub template: String,
    pub namespace: String,
    pub port: u16,
    pub cluster_domain: String,
    /// Per service: a different namespace, port or Kubernetes name.
    pub overrides: BTreeMap<String, Override>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Override {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub port: Option<u16>,
}

impl Default for Names {
    fn default() -> Self {
        Self {
            template: "{name}.{namespace}.svc.cluster.local".into(),
            namespace: "default".into(),
            port: 8080,
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            overrides: BTreeMap::new(),
        }
    }
}

impl Names {
    /// The DNS name (fully qualified, trailing dot) and port of Skyline service `service`.
    pub fn target(&self, service: &str) -> (String, u16) {
        let o = self.overrides.get(service);
        let name = o.and_then(|o| o.name.as_deref()).unwrap_or(service);
        let namespace = o
            .and_then(|o| o.namespace.as_deref())
            .unwrap_or(&self.namespace);
        let port = o.and_then(|o| o.port).unwrap_or(self.port);
        let host = self
            .template
            .replace("{name}", name)
            .replace("{namespace}", namespace);
        (host, port)
    }
}

/// The service name of a cluster-DNS `Host`: `<name>.<namespace>.svc.<domain>[:port]`
/// (a trailing dot allowed, case-insensitive), or `None`.
pub fn cluster_service<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let suffix_len = ".svc.".len() + domain.len();
    if host.len() <= suffix_len {
        return None;
    }
    let (head, tail) = host.split_at(host.len() - suffix_len);
    let tail = tail.strip_prefix(".svc.")?;
    if !tail.eq_ignore_ascii_case(domain) {
        return None;
    }
    let (name, namespace) = head.split_once('.')?;
    let label_ok = |l: &str| !l.is_empty() && l.len() <= 63 && !l.contains('.');
    (ServiceName::is_valid(name) && label_ok(namespace)).then_some(name)
}

/// The Skyline target for a cluster-DNS request: `/service/<name>` + path and query.
pub fn skyline_target(name: &str, pq: Option<&PathAndQuery>) -> Result<PathAndQuery, MeshError> {
    let rest = pq.map_or("/", |pq| pq.as_str());
    let rest = if rest.starts_with('/') { rest } else { "/" };
    PathAndQuery::from_maybe_shared(Bytes::from(format!("/service/{name}{rest}")))
        .map_err(|_| MeshError::bad_request("invalid request target"))
}

// === Bridge ===

#[derive(Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

struct Inner {
    resolver: TokioResolver,
    names: Names,
    gateways: Option<Route>,
    catalog: Option<Subscriber>,
    forwarder: Forwarder,
    max_hops: u32,
    next: AtomicUsize,
}

/// A resolver that asks only `dns`, with hickory's per-TTL cache.
pub fn resolver(dns: SocketAddr) -> Result<TokioResolver, String> {
    let mut server = NameServerConfig::udp_and_tcp(dns.ip());
    for connection in &mut server.connections {
        connection.port = dns.port();
    }
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    opts.ndots = 0;
    Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![server]),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .map_err(|e| e.to_string())
}

impl Bridge {
    pub fn new(
        resolver: TokioResolver,
        names: Names,
        gateways: Vec<SocketAddr>,
        catalog: Option<Subscriber>,
        max_hops: u32,
    ) -> Self {
        let gateways = (!gateways.is_empty())
            .then(|| Route::new(gateways.iter().map(|&a| Endpoint::new(a, 1)).collect()));
        Self {
            inner: Arc::new(Inner {
                resolver,
                names,
                gateways,
                catalog,
                forwarder: Forwarder::new(),
                max_hops,
                next: AtomicUsize::new(0),
            }),
        }
    }

    /// A gateway: a fixed one, or a passing `skyline-gateway` instance of the catalog.
    fn gateway(&self) -> Option<Endpoint> {
        if let Some(route) = &self.inner.gateways {
            return route.pick().cloned();
        }
        let state = self.inner.catalog.as_ref()?.borrow().clone();
        let snapshot = state.snapshot?;
        let instances = snapshot.services.get(GATEWAY_SERVICE)?;
        let up: Vec<_> = instances
            .iter()
            .filter(|i| i.health == Health::Passing)
            .collect();
        if up.is_empty() {
            return None;
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % up.len();
        Some(Endpoint::new(up[i].addr(), 1))
    }

    /// Kubernetes → Skyline: to the gateway pool, marked as coming from a bridge.
    async fn to_gateway(
        &self,
        mut req: Request<Incoming>,
        name: String,
        conn: Conn,
    ) -> Response<Body> {
        let target = match skyline_target(&name, req.uri().path_and_query()) {
            Ok(t) => t,
            Err(e) => return e.into_response(&name),
        };
        let Some(gateway) = self.gateway() else {
            return MeshError::NoHealthyEndpoint.into_response(&name);
        };
        req.headers_mut()
            .insert(&X_SKYLINE_ORIGIN, HeaderValue::from_static("bridge"));
        self.inner
            .forwarder
            .forward(
                req,
                gateway,
                |tried: &[SocketAddr]| self.gateway().filter(|g| !tried.contains(&g.addr)),
                target,
                Host::Keep,
                &conn,
            )
            .await
            .unwrap_or_else(|e| e.into_response(&name))
    }

    /// Skyline → Kubernetes: through the cluster DNS to the Service.
    async fn to_cluster(&self, mut req: Request<Incoming>, conn: Conn) -> Response<Body> {
        let uri = req.uri().clone();
        let (name, target) = match split_service_path(uri.path()) {
            Ok((name, rest)) => (name, strip_prefix(rest, uri.query())),
            Err(e) => return e.into_response(""),
        };
        let target = match target {
            Ok(t) => t,
            Err(e) => return e.into_response(name),
        };
        let (host, port) = self.inner.names.target(name);
        let fqdn = format!("{host}.");
        let ips: Vec<IpAddr> = match self.inner.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(found) => found.iter().collect(),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Vec::new(),
            Err(error) => {
                tracing::warn!(service = %name, %host, %error, "cluster dns lookup failed");
                return MeshError::NoHealthyEndpoint.into_response(name);
            }
        };
        if ips.is_empty() {
            tracing::debug!(service = %name, %host, "no such kubernetes service");
            return MeshError::UnknownService.into_response(name);
        }
        let ip = ips[self.inner.next.fetch_add(1, Ordering::Relaxed) % ips.len()];
        let endpoint = Endpoint::new(SocketAddr::new(ip, port), 1);
        if let Ok(value) = HeaderValue::try_from(format!("{host}:{port}")) {
            req.headers_mut().insert(header::HOST, value);
        }
        let name = name.to_owned();
        self.inner
            .forwarder
            .forward(
                req,
                endpoint,
                |tried: &[SocketAddr]| {
                    ips.iter()
                        .map(|&ip| SocketAddr::new(ip, port))
                        .find(|a| !tried.contains(a))
                        .map(|a| Endpoint::new(a, 1))
                },
                target,
                Host::Keep,
                &conn,
            )
            .await
            .unwrap_or_else(|e| e.into_response(&name))
    }
}

impl Handler for Bridge {
    type Body = Body;

    async fn handle(&self, mut req: Request<Incoming>, conn: Conn) -> Response<Body> {
        let skyline_path = req.uri().path().starts_with("/service/");
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let cluster = cluster_service(host, &self.inner.names.cluster_domain).map(str::to_owned);
        let name = cluster.clone().unwrap_or_default();
        if let Err(e) = count_hop(req.headers_mut(), self.inner.max_hops) {
            return e.into_response(&name);
        }
        match cluster {
            Some(name) if !skyline_path => self.to_gateway(req, name, conn).await,
            _ => self.to_cluster(req, conn).await,
        }
    }
}

/// The bridge's admin listener: `/healthz`.
#[derive(Clone, Copy, Debug)]
pub struct BridgeAdmin;

impl Handler for BridgeAdmin {
    type Body = Body;

    async fn handle(&self, req: Request<Incoming>, _conn: Conn) -> Response<Body> {
        let found = req.uri().path() == "/healthz";
        let mut response = Response::new(crate::proxy::full(if found {
            "{\"ok\":true}\n"
        } else {
            "{\"error\":\"not-found\",\"paths\":[\"/healthz\"]}\n"
        }));
        if !found {
            *response.status_mut() = http::StatusCode::NOT_FOUND;
        }
        response
    }
}

// === Running ===

pub struct BridgeHandle {
    pub addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl BridgeHandle {
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn join(mut self) {
        crate::serve::join_all(&mut self.tasks).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("cannot set up the dns resolver: {0}")]
    Resolver(String),
}

/// The names of the bridge's listeners, as inherited sockets are named (see
/// [`serve::activation`]). Sockets named `bridge`, if any, replace every `--listen` address.
pub const LISTENER_NAMES: [&str; 2] = ["bridge", "admin"];

pub async fn spawn(
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<BridgeHandle, BridgeError> {
    spawn_on(settings, Inherited::none(), shutdown).await
}

/// [`spawn`], serving on the sockets a supervisor passed where it passed some.
pub async fn spawn_on(
    settings: Settings,
    mut inherited: Inherited,
    shutdown: CancellationToken,
) -> Result<BridgeHandle, BridgeError> {
    let mut listeners = Vec::new();
    let passed = inherited.take_all("bridge");
    if passed.is_empty() {
        for &addr in &settings.listen {
            listeners.push(agent::bind("bridge", addr)?);
        }
    } else {
        for socket in passed {
            listeners.push(agent::adopt("bridge", socket)?);
        }
    }
    let admin = agent::listen(&mut inherited, "admin", settings.admin)?;
    inherited
        .finish(&LISTENER_NAMES)
        .map_err(AgentError::from)?;
    let mut tasks = JoinSet::new();
    let catalog = match &settings.catalog {
        Some(source) if settings.gateways.is_empty() => {
            let (source_name, subscriber) = agent::follow_catalog(source, &mut tasks, &shutdown);
            if let Err(error) = agent::first_snapshot(subscriber.clone()).await {
                shutdown.cancel();
                return Err(AgentError::Catalog { source_name, error }.into());
            }
            Some(subscriber)
        }
        _ => None,
    };
    let resolver = resolver(settings.dns).map_err(BridgeError::Resolver)?;
    let bridge = Bridge::new(
        resolver,
        settings.names.clone(),
        settings.gateways.clone(),
        catalog,
        settings.max_hops,
    );
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    for listener in listeners {
        tasks.spawn(serve::serve(listener, bridge.clone(), shutdown.clone()));
    }
    if let Some(admin) = admin {
        tasks.spawn(serve::serve(admin, BridgeAdmin, shutdown.clone()));
    }
    let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    tracing::info!(listen = %shown.join(","), dns = %settings.dns, "bridge started");
    Ok(BridgeHandle {
        addrs,
        shutdown,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn recognises_cluster_dns_hosts() {
        let d = DEFAULT_CLUSTER_DOMAIN;
        assert_eq!(
            cluster_service("organization.default.svc.cluster.local:8080", d),
            Some("organization")
        );
        assert_eq!(
            cluster_service("giphy.prod.svc.cluster.local", d),
            Some("giphy")
        );
        assert_eq!(
            cluster_service("giphy.prod.svc.cluster.local.", d),
            Some("giphy")
        );
        for other in [
            "localhost:5040",
            "giphy",
            "giphy.svc.cluster.local",
            "a.b.svc.example.com",
            "A.b.svc.cluster.local",
            ".b.svc.cluster.local",
        ] {
            assert_eq!(cluster_service(other, d), None, "{other}");
        }
    }

    #[test]
    fn names_follow_the_template_and_overrides() {
        let mut names = Names::default();
        assert_eq!(
            names.target("giphy"),
            ("giphy.default.svc.cluster.local".into(), 8080)
        );
        names.overrides.insert(
            "giphy".into(),
            Override {
                name: Some("giphy-v2".into()),
                namespace: Some("media".into()),
                port: Some(80),
            },
        );
        assert_eq!(
            names.target("giphy"),
            ("giphy-v2.media.svc.cluster.local".into(), 80)
        );
    }

    proptest! {
        #[test]
        fn a_cluster_request_keeps_its_path_and_query_under_the_service_prefix(
            path in "(/[a-z0-9._~%-]{0,8}){1,3}",
            query in proptest::option::of("[a-z0-9=&%]{0,12}"),
        ) {
            let text = match &query { Some(q) => format!("{path}?{q}"), None => path.clone() };
            let pq: PathAndQuery = text.parse().unwrap();
            let target = skyline_target("organization", Some(&pq)).unwrap();
            prop_assert_eq!(target.path(), format!("/service/organization{path}"));
            prop_assert_eq!(target.query(), query.as_deref());
        }
    }
}
