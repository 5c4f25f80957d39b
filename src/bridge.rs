//! `skyline bridge`, on each Kubernetes node (a DaemonSet on host port 5041), both directions:
//!
//! - Skyline → Kubernetes: `/service/<name>/<rest>?q` → `http://<name>.<ns>.svc.cluster.local:
//!   <port>/<rest>?q`, the name resolved through the cluster DNS (answers cached per TTL).
//!   A name the DNS does not know is `404 unknown-service`.
//! - Kubernetes → Skyline: a request whose `Host` is `<name>.<ns>.svc.cluster.local[:port]`
//!   (a Kubernetes Service that targets the bridge pods) → `/service/<name><path>` to the
//!   gateway pool, marked as coming from a bridge so it never comes back to one.

pub mod config;
pub mod explain;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::access::{AccessLog, Note, Tag};
use crate::catalog::CatalogSource;
use crate::catalog::{Health, ServiceName, Snapshot, Subscriber};
use crate::contract::X_SKYLINE_ORIGIN;
use crate::contract::{DEFAULT_CLUSTER_DOMAIN, GATEWAY_SERVICE, cluster_service, skyline_target};
use crate::metrics::{self, Metrics, Role, ServiceLabel};
use crate::proxy::inbound::strip_prefix;
use crate::proxy::outbound::split_service_path;
use crate::proxy::resilience::Resilience;
use crate::proxy::{Body, Destination, Forwarder, Host, MeshError, count_hop, is_grpc};
use crate::role::{self, StartError};
use crate::routing::{Endpoint, Protocol, Route};
use crate::serve::activation::Inherited;
use crate::serve::{self, Conn, Handler, Proxy, Recorder};

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
    /// Timeouts, retries, balancing and ejection of the bridge's calls.
    pub resilience: Resilience,
    /// Mesh TLS on the bridge's listeners (host port 5041; a Kubernetes Service port in
    /// permissive mode takes plain requests from pods) and toward the gateways; `None`: off.
    pub tls: Option<crate::tls::Settings>,
    /// Authorization policies of the file (`[authz]`, without callers), enforced on requests
    /// to Kubernetes Services.
    pub authz: crate::authz::Settings,
    /// Where `skyline/policies/` is watched (the registry or Consul); `None`: the file's only.
    pub kv: Option<SocketAddr>,
    /// How to read the config file again when it changes, for its `[authz]`; `None` when
    /// there is no config file.
    pub reload: Option<config::BridgeArgs>,
    /// The access log.
    pub access: crate::access::Settings,
    /// How requests travel to other Skyline proxies (read at start).
    pub peer_protocol: crate::proxy::h2::PeerProtocol,
    /// The admin listener's bearer token, and the registry token sent to the catalog.
    pub tokens: role::Tokens,
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
    /// What the Service speaks: `http1` or `h2c` (see [`Names::protocol`]).
    pub protocol: Option<Protocol>,
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

impl Names {
    /// How a request `req` for Skyline service `service` goes to its Kubernetes Service: as
    /// the service's override says (`protocol = "h2c"`: every request over HTTP/2, as to an
    /// instance registered with `h2c`; `"http1"`: every request over HTTP/1.1); without one,
    /// a gRPC call over h2c (gRPC servers speak HTTP/2, and the cluster DNS cannot say what a
    /// Service speaks) and anything else over HTTP/1.1.
    pub fn protocol<B>(&self, service: &str, req: &Request<B>) -> Protocol {
        if let Some(protocol) = self.overrides.get(service).and_then(|o| o.protocol) {
            return protocol;
        }
        // gRPC-Web (`application/grpc-web`) is meant for HTTP/1.1 servers too.
        let web = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc-web"));
        if is_grpc(req) && !web {
            Protocol::H2c
        } else {
            Protocol::Http1
        }
    }
}

// === Bridge ===

#[derive(Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

struct Inner {
    resolver: TokioResolver,
    names: Names,
    /// The configured gateways, if any.
    gateways: Option<Arc<Route>>,
    catalog: Option<Subscriber>,
    /// The route to the catalog's gateways, and the snapshot it was built from.
    catalog_gateways: Mutex<Option<(Arc<Snapshot>, Arc<Route>)>>,
    forwarder: Forwarder,
    resilience: Arc<Resilience>,
    max_hops: u32,
    /// The authorization policies in force (see [`crate::authz`]).
    authz: crate::authz::Authz,
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
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        resolver: TokioResolver,
        names: Names,
        gateways: Vec<SocketAddr>,
        catalog: Option<Subscriber>,
        max_hops: u32,
        resilience: Resilience,
        forwarder: Forwarder,
        authz: crate::authz::Authz,
    ) -> Self {
        let gateways = (!gateways.is_empty()).then(|| {
            Arc::new(Route::new(
                gateways
                    .iter()
                    .map(|&a| Endpoint::new(a, 1).speaking(Protocol::Both).with_mesh(true))
                    .collect(),
            ))
        });
        Self {
            inner: Arc::new(Inner {
                resolver,
                names,
                gateways,
                catalog,
                catalog_gateways: Mutex::new(None),
                forwarder,
                resilience: Arc::new(resilience),
                max_hops,
                authz,
            }),
        }
    }

    /// The gateways: the fixed ones, or the routable `skyline-gateway` instances of the catalog
    /// (rebuilt when the catalog changed, keeping what was learnt about each gateway).
    fn gateways(&self) -> Option<Arc<Route>> {
        if let Some(route) = &self.inner.gateways {
            return Some(route.clone());
        }
        let snapshot = self.inner.catalog.as_ref()?.borrow().snapshot.clone()?;
        let mut cached = self
            .inner
            .catalog_gateways
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((seen, route)) = cached.as_ref() {
            if Arc::ptr_eq(seen, &snapshot) {
                return Some(route.clone());
            }
        }
        // The agents' gateway pool, built by the same rules.
        let mut route = crate::routing::gateway_pool(&snapshot, crate::routing::Policy::default());
        if let Some((_, old)) = cached.as_ref() {
            route = route.inherit(old);
        }
        let route = Arc::new(route);
        *cached = Some((snapshot, route.clone()));
        Some(route)
    }

    /// The catalog's name for `name`, when the bridge follows a catalog that knows it.
    fn known_service(&self, name: &str) -> Option<ServiceName> {
        let catalog = self.inner.catalog.as_ref()?.borrow();
        let snapshot = catalog.snapshot.as_ref()?;
        snapshot
            .services
            .get_key_value(name)
            .map(|(k, _)| k.clone())
    }

    /// Kubernetes → Skyline: to the gateway pool, marked as coming from a bridge. Labelled for
    /// the metrics as known when the bridge's catalog knows the service.
    async fn to_gateway(
        &self,
        mut req: Request<Incoming>,
        name: String,
        conn: Conn,
        note: &mut Note,
    ) -> Response<Body> {
        let known = self.known_service(&name);
        let counted = known.is_some();
        note.tier = Tag::Static("gateway");
        note.label = match known {
            Some(service) => Some(ServiceLabel::known(service)),
            None => metrics::unverified(&name),
        };
        let target = match skyline_target(&name, req.uri().path_and_query()) {
            Ok(t) => t,
            Err(e) => return MeshError::bad_request(e).into_response(&name),
        };
        let gateways = match self.gateways() {
            Some(gateways) if !gateways.is_empty() => gateways,
            Some(_) => return MeshError::NoHealthyEndpoint.into_response(&name),
            // The gateways come from a catalog that has not answered yet.
            None => return MeshError::NoCatalog.into_response(&name),
        };
        req.headers_mut()
            .insert(&X_SKYLINE_ORIGIN, HeaderValue::from_static("bridge"));
        // A Kubernetes application's request enters the mesh here: this hop retries.
        let upstream = Destination {
            service: &name,
            label: if counted { &name } else { "" },
            route: &gateways,
            policy: &self.inner.resilience,
            first_hop: true,
            fallback: None,
        };
        self.inner
            .forwarder
            .forward(req, upstream, target, Host::Keep, &conn, &mut note.trail)
            .await
            .unwrap_or_else(|e| e.into_response(&name))
    }

    /// Skyline → Kubernetes: through the cluster DNS to the Service. Labelled for the metrics
    /// when the cluster DNS knows the Service.
    async fn to_cluster(
        &self,
        mut req: Request<Incoming>,
        conn: Conn,
        note: &mut Note,
    ) -> Response<Body> {
        let uri = req.uri().clone();
        let (name, rest) = match split_service_path(uri.path()) {
            Ok(split) => split,
            Err(e) => return e.into_response(""),
        };
        // The bridge is the destination's side for Kubernetes Services: it checks the
        // policies, and the Service receives the path they judged.
        let target =
            match crate::proxy::authorize::enforce(&self.inner.authz, &req, &conn, name, rest) {
                Ok(None) => strip_prefix(rest, uri.query()),
                Ok(Some(normal)) => strip_prefix(&normal, uri.query()),
                Err(e) => {
                    note.label = metrics::unverified(name);
                    return crate::proxy::authorize::refusal(&req, e, name);
                }
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
            return MeshError::UnknownBeyond(
                "no such service in the catalog, nor in the kubernetes cluster dns",
            )
            .into_response(name);
        }
        note.label = ServiceName::parse(name).ok().map(ServiceLabel::known);
        note.tier = Tag::Static("cluster-dns");
        note.platform = Tag::Static(crate::contract::KUBERNETES);
        // Usually one address (the Service's cluster IP; kube-proxy balances behind it).
        let protocol = self.inner.names.protocol(name, &req);
        let route = Route::new(
            ips.iter()
                .map(|&ip| Endpoint::new(SocketAddr::new(ip, port), 1).speaking(protocol))
                .collect(),
        );
        if let Ok(value) = HeaderValue::try_from(format!("{host}:{port}")) {
            req.headers_mut().insert(header::HOST, value);
        }
        let name = name.to_owned();
        let upstream = Destination {
            service: &name,
            label: &name,
            route: &route,
            policy: &self.inner.resilience,
            first_hop: false,
            fallback: None,
        };
        self.inner
            .forwarder
            .forward(req, upstream, target, Host::Keep, &conn, &mut note.trail)
            .await
            .unwrap_or_else(|e| e.into_response(&name))
    }
}

impl Proxy for Bridge {
    type Body = Body;

    async fn proxy(
        &self,
        mut req: Request<Incoming>,
        conn: Conn,
        note: &mut Note,
    ) -> Response<Body> {
        crate::proxy::authorize::strip_untrusted(req.headers_mut(), &conn);
        let skyline_path = req.uri().path().starts_with("/service/");
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let cluster =
            cluster_service(host, &self.inner.names.cluster_domain).map(|n| n.into_owned());
        let name = cluster.clone().unwrap_or_default();
        if let Err(e) = count_hop(req.headers_mut(), self.inner.max_hops) {
            return e.into_response(&name);
        }
        match cluster {
            Some(name) if !skyline_path => self.to_gateway(req, name, conn, note).await,
            _ => self.to_cluster(req, conn, note).await,
        }
    }
}

/// The bridge's admin listener: `/healthz`, `/readyz`, `/explain`, `/metrics` (with the catalog gauges when
/// the bridge follows a catalog to find the gateways).
#[derive(Clone)]
pub struct BridgeAdmin {
    /// For `/explain` (see [`explain`]).
    bridge: Bridge,
    metrics: Arc<Metrics>,
    catalog: Option<Subscriber>,
    token: Option<crate::config::token::Token>,
    /// The dashboard at `/ui`: requests per service over the last minutes (the bridge's
    /// own counters), and the catalog's services when the bridge follows one.
    dashboard: Arc<crate::admin::ui::Dashboard>,
}

impl BridgeAdmin {
    /// Ready once the bridge knows where its gateways are: fixed addresses, or a catalog in
    /// force (even a stale one, as the agent's `/readyz`); `gateways` is how many it would use.
    fn readiness(&self) -> (StatusCode, serde_json::Value) {
        let (ready, error, gateways) = match &self.catalog {
            None => (true, None, None),
            Some(catalog) => {
                let state = catalog.borrow().clone();
                let gateways = state.snapshot.as_ref().map(|s| {
                    s.services.get(GATEWAY_SERVICE).map_or(0, |instances| {
                        instances
                            .iter()
                            .filter(|i| i.health == Health::Passing)
                            .count()
                    })
                });
                (state.snapshot.is_some(), state.error, gateways)
            }
        };
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = serde_json::json!({"ready": ready, "catalog_error": error, "catalog_gateways": gateways});
        (status, body)
    }
}

impl Handler for BridgeAdmin {
    type Body = Body;

    async fn handle(&self, req: Request<Incoming>, _conn: Conn) -> Response<Body> {
        if let Some(refusal) = crate::admin::unauthorized(self.token.as_ref(), &req) {
            return refusal;
        }
        if let Some(asset) = crate::admin::ui::asset(req.uri().path()) {
            return asset;
        }
        let (status, body) = match req.uri().path() {
            "/healthz" => (StatusCode::OK, serde_json::json!({"ok": true})),
            "/readyz" => self.readiness(),
            crate::admin::ui::DATA_PATH => {
                let snapshot = self
                    .catalog
                    .as_ref()
                    .and_then(|c| c.borrow().snapshot.clone());
                let readings = crate::admin::agent_readings(&self.metrics);
                let body = self
                    .dashboard
                    .data(snapshot.as_deref(), Default::default(), &readings)
                    .await;
                return crate::admin::ui::data_response(&body);
            }
            "/explain" => match crate::admin::explain_url(req.uri().query()) {
                Ok(url) => crate::admin::explained(self.bridge.explain(&url).await),
                Err(refusal) => refusal,
            },
            "/metrics" => {
                let catalog = self.catalog.as_ref().map(|c| c.borrow().clone());
                return crate::admin::metrics_response(&self.metrics, catalog.as_ref());
            }
            _ => (
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not-found", "paths": ["/healthz", "/readyz", "/explain", "/metrics", "/ui"]}),
            ),
        };
        crate::admin::json_response(status, &body)
    }
}

/// Why the bridge is not ready, for its convergence report: the catalog's reasons, and no
/// passing `skyline-gateway` instance (requests from pods would have nowhere to go).
fn readiness_reasons(state: &crate::catalog::CatalogState) -> Vec<String> {
    let mut reasons = crate::status::catalog_reasons(state);
    let gateways = state.snapshot.as_ref().map_or(0, |s| passing_gateways(s));
    if state.snapshot.is_some() && gateways == 0 {
        reasons.push(format!(
            "no passing {GATEWAY_SERVICE} instance in the catalog"
        ));
    }
    reasons
}

fn passing_gateways(snapshot: &Snapshot) -> usize {
    snapshot
        .services
        .get(GATEWAY_SERVICE)
        .map_or(0, |instances| {
            instances
                .iter()
                .filter(|i| i.health == Health::Passing)
                .count()
        })
}

/// Marks every catalog state applied as it arrives: the bridge reads the state in force on
/// each request.
async fn follow_applied(mut catalog: Subscriber, applied: crate::catalog::Applied) {
    loop {
        let state = catalog.borrow_and_update().clone();
        if state.snapshot.is_some() {
            crate::catalog::mark_applied(&applied, &state);
        }
        if catalog.changed().await.is_err() {
            return;
        }
    }
}

/// Re-reads the config file when it changes (checked every
/// [`FILE_ROUTES_POLL`](crate::catalog::file::FILE_ROUTES_POLL), as the gateway does) and puts its
/// `[authz]` in force. A file that does not validate is refused with file, key and reason, and
/// the policies in force are kept. Each reload counts in `metrics` as accepted or refused.
async fn watch_file_authz(
    args: config::BridgeArgs,
    authz: crate::authz::Authz,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let Some(path) = args.config.clone() else {
        return;
    };
    let mut file = crate::catalog::file::Watched::new(&path);
    while file
        .changed(crate::catalog::file::FILE_ROUTES_POLL, &shutdown)
        .await
    {
        match args.clone().resolve() {
            Ok(settings) => {
                metrics.config_reload(true);
                if !authz.file_is(&settings.authz) {
                    tracing::info!(path = %path.display(), rules = settings.authz.policy.rules.len(), "authorization policies reloaded");
                    authz.set_file(settings.authz);
                }
            }
            Err(error) => {
                tracing::error!(%error, "config file refused; keeping the authorization policies in force");
                metrics.config_reload(false);
            }
        }
    }
}

// === Running ===

pub struct BridgeHandle {
    pub addrs: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// What the bridge listeners record, served at the admin's `/metrics`.
    pub metrics: Arc<Metrics>,
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
    Agent(#[from] StartError),
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
            listeners.push(role::bind("bridge", addr)?);
        }
    } else {
        for socket in passed {
            listeners.push(role::adopt("bridge", socket)?);
        }
    }
    let admin = role::listen(&mut inherited, "admin", settings.admin)?;
    inherited
        .finish(&LISTENER_NAMES)
        .map_err(StartError::from)?;
    let mut tasks = JoinSet::new();
    let metrics = Metrics::when(settings.access.metrics);
    let tls = role::mesh_tls(settings.tls.as_ref(), &metrics, &mut tasks, &shutdown)?;
    let mut catalog_name = String::new();
    let catalog = match &settings.catalog {
        Some(source) if settings.gateways.is_empty() => {
            let (source_name, subscriber) = crate::catalog::follow_catalog(
                source,
                settings.tokens.registry.as_ref(),
                &mut tasks,
                &shutdown,
            );
            // A registry or Consul that has not answered yet: the bridge serves without it
            // (Kubernetes services need none; the gateways are found once it answers).
            let remote = !matches!(source, CatalogSource::File(_));
            let first = crate::catalog::first_read(
                &subscriber,
                remote,
                &source_name,
                &mut tasks,
                &shutdown,
            )
            .await;
            if let Err(first) = first {
                shutdown.cancel();
                let error = StartError::Catalog {
                    source_name,
                    error: first.error,
                };
                return Err(error.into());
            }
            catalog_name = source_name;
            Some(subscriber)
        }
        _ => None,
    };
    let resolver = resolver(settings.dns).map_err(BridgeError::Resolver)?;
    let authz = crate::authz::Authz::new(settings.authz.clone());
    if let Some(address) = settings.kv {
        tasks.spawn(crate::authz::kv::watch(
            address,
            settings.tokens.registry.clone(),
            authz.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(args) = settings.reload.clone() {
        tasks.spawn(watch_file_authz(
            args,
            authz.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    let bridge = Bridge::new(
        resolver,
        settings.names.clone(),
        settings.gateways.clone(),
        catalog.clone(),
        settings.max_hops,
        settings.resilience.clone(),
        // Over mesh TLS (when on) to the gateways; plain HTTP to Kubernetes Services.
        Forwarder::with_tls(metrics.clone(), tls.clone())
            .with_peer_protocol(settings.peer_protocol),
        authz.clone(),
    );
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    // Mesh TLS on the first listener only, the host port where gateways connect; the others
    // are Kubernetes Service ports, where pods speak plain HTTP (the application contract).
    let mut tls = tls;
    // One access log (and its writer thread) for every listener.
    let access = AccessLog::stderr(&settings.access);
    for listener in listeners {
        let recorder = Recorder::new(Role::Bridge, metrics.clone()).with_access(access.clone());
        tasks.spawn(serve::serve_mesh(
            listener,
            bridge.clone(),
            recorder,
            tls.take(),
            shutdown.clone(),
        ));
    }
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    // The admin listener in the registry (`skyline-admin`), so Prometheus finds it.
    if let (Some(admin), Some(CatalogSource::Consul(registry))) = (admin_addr, &settings.catalog) {
        let client = crate::registry::client::RegistryClient::new(*registry);
        let register = crate::registration::run_admin(client, "bridge", admin, shutdown.clone());
        tasks.spawn(register);
    }
    // The convergence report (`skyline status`) in the registry the bridge follows: the bridge
    // routes with the catalog state in force (its gateways are rebuilt from it on use).
    if let (Some(source), Some(subscriber)) = (&settings.catalog, catalog.clone()) {
        let port = addrs.first().map_or(0, SocketAddr::port);
        let node = crate::registration::hostname();
        let identity = crate::status::Identity {
            role: "bridge",
            name: format!("{node}-{port}"),
            node,
            admin: admin_addr,
            catalog: catalog_name,
        };
        let (applied, applied_rx) = tokio::sync::watch::channel(None);
        tasks.spawn(follow_applied(subscriber.clone(), applied));
        if let Some(report) = crate::status::reporter(
            source,
            settings.tokens.registry.as_ref(),
            identity,
            applied_rx,
            subscriber,
            Arc::new(readiness_reasons),
            shutdown.clone(),
        ) {
            tasks.spawn(report);
        }
    }
    if let Some(admin) = admin {
        let dashboard = crate::admin::ui::Dashboard::new("bridge", "listener", None);
        let counters = metrics.clone();
        tasks.spawn(crate::admin::ui::sample_every(
            dashboard.clone(),
            move || crate::admin::agent_readings(&counters),
            shutdown.clone(),
        ));
        let handler = BridgeAdmin {
            dashboard,
            bridge: bridge.clone(),
            metrics: metrics.clone(),
            catalog,
            token: settings.tokens.admin.clone(),
        };
        tasks.spawn(serve::serve(admin, handler, shutdown.clone()));
    }
    let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    tracing::info!(listen = %shown.join(","), dns = %settings.dns, "bridge started");
    Ok(BridgeHandle {
        addrs,
        admin: admin_addr,
        metrics,
        shutdown,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
                protocol: None,
            },
        );
        assert_eq!(
            names.target("giphy"),
            ("giphy-v2.media.svc.cluster.local".into(), 80)
        );
    }

    #[test]
    fn grpc_calls_go_to_a_cluster_service_over_h2c_unless_its_override_says_otherwise() {
        let request = |version, content_type: &str| {
            Request::post("/")
                .version(version)
                .header(header::CONTENT_TYPE, content_type)
                .body(())
                .unwrap()
        };
        let grpc = request(http::Version::HTTP_2, "application/grpc+proto");
        let web = request(http::Version::HTTP_2, "application/grpc-web");
        let json = request(http::Version::HTTP_2, "application/json");
        let mut names = Names::default();
        assert_eq!(names.protocol("giphy", &grpc), Protocol::H2c);
        assert_eq!(names.protocol("giphy", &web), Protocol::Http1);
        assert_eq!(names.protocol("giphy", &json), Protocol::Http1);
        let old = request(http::Version::HTTP_11, "application/grpc");
        assert_eq!(names.protocol("giphy", &old), Protocol::Http1);
        for (protocol, expected) in [
            (Protocol::H2c, Protocol::H2c),
            (Protocol::Http1, Protocol::Http1),
        ] {
            let o = Override {
                protocol: Some(protocol),
                ..Override::default()
            };
            names.overrides.insert("giphy".into(), o);
            assert_eq!(names.protocol("giphy", &json), expected);
            assert_eq!(names.protocol("giphy", &grpc), expected);
        }
    }
}
