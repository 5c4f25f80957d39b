//! `skyline gateway`, the seed's service discovery bridge (SDB): `/service/<name>/<rest>` goes,
//! full path kept, to the first eligible tier of the service's route policy — by default the
//! nodes with a passing `platform=mesos` instance, then the Kubernetes bridges.
//!
//! - [`policy`]: route policies (TOML file and registry KV), validated.
//! - [`tiers`]: the tier choice, a state machine with fail-back hysteresis.
//! - [`config`]: `skyline gateway` flags, variables and file.
//! - [`answers`]: each tier's answers (outcome, latency) as the gateway saw them, published to
//!   the KV while `skyline migrate` moves a service.
//!
//! The table of tiers is rebuilt on every catalog or policy change and swapped atomically; the
//! tier state of each service (since when each tier is eligible, which one is in use) lives
//! next to it and survives swaps.

pub mod answers;
pub mod config;
pub mod explain;
pub mod policy;
pub mod tiers;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access::{AccessLog, Note, Tag};
use crate::catalog::CatalogSource;
use crate::catalog::file::FILE_ROUTES_POLL;
use crate::catalog::{ServiceName, Snapshot, Subscriber};
use crate::contract::{KUBERNETES, X_SKYLINE_ORIGIN};
use crate::metrics::{self, Metrics, Role, ServiceLabel};
use crate::proxy::outbound::split_service_path;
use crate::proxy::resilience::Resilience;
use crate::proxy::{Body, Destination, Fallback, Forwarder, Host, MeshError, count_hop};
use crate::registry::client::{KvValue, follow_kv};
use crate::role::{self, StartError};
use crate::routing::reach::Admit;
use crate::routing::{self, Endpoint, Protocol, Route};
use crate::serve::activation::Inherited;
use crate::serve::{self, Conn, Handler, Proxy, Recorder};
use crate::tls::MeshTls;
use policy::{Pool, RoutePolicy, TierName, TierSource, Upstream};
use tiers::{Selector, SelectorView};

/// The tier that served a response, for observability.
pub static X_SKYLINE_TIER: HeaderName = HeaderName::from_static("x-skyline-tier");
/// Marks the copy of a request that a shadow (see [`policy::Shadow`]) sends.
pub static X_SKYLINE_SHADOW: HeaderName = HeaderName::from_static("x-skyline-shadow");
/// The most shadow copies one gateway has in flight; past it, copies are skipped (and counted).
pub const SHADOW_IN_FLIGHT: usize = 64;
/// How long a shadow copy may take before it counts as unanswered.
pub const SHADOW_TIMEOUT: Duration = Duration::from_secs(5);
/// The KV prefix of route policies: `skyline/routes/<service>` or `skyline/routes/*`.
pub const KV_ROUTES_PREFIX: &str = "skyline/routes/";
/// Tier state of services that left the catalog is kept this long (their fail-back hold must
/// survive a scale to zero).
pub const SELECTOR_RETENTION: Duration = Duration::from_secs(600);

/// Validated gateway settings (see [`config::GatewayArgs`] for what users write).
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `None`: no admin listener.
    pub admin: Option<SocketAddr>,
    pub catalog: CatalogSource,
    pub upstreams: BTreeMap<String, Upstream>,
    /// Policies from the file, by service name or `*`.
    pub routes: BTreeMap<String, RoutePolicy>,
    /// The hold of policies that do not give one.
    pub default_hold: Duration,
    /// Requests that already took this many Skyline hops get 508 loop-detected.
    pub max_hops: u32,
    /// Where to watch `skyline/routes/` (the registry or Consul); `None`: file policies only.
    pub kv: Option<SocketAddr>,
    /// Route to instances whose health is `warning` as well.
    pub include_warning: bool,
    /// How to read the config file again when it changes, for its `[routes]` and
    /// `[resilience]` (flags and variables still win); `None` when there is no config file.
    pub reload: Option<config::GatewayArgs>,
    /// Timeouts, retries, balancing and ejection of the gateway's calls.
    pub resilience: Resilience,
    /// Mesh TLS on the gateway listener and toward inbound proxies and bridges; `None`: off.
    pub tls: Option<crate::tls::Settings>,
    /// Authorization policies of the file (`[authz]`, without callers); the KV's are watched
    /// in the registry the gateway follows.
    pub authz: crate::authz::Settings,
    /// The access log (read at start; a reload keeps it).
    pub access: crate::access::Settings,
    /// How requests travel to other Skyline proxies (read at start).
    pub peer_protocol: crate::proxy::h2::PeerProtocol,
    /// The admin listener's bearer token, and the registry token sent to the catalog and KV.
    pub tokens: role::Tokens,
}

// === Table ===

/// Every service's tiers, built from one snapshot and the policies in force.
#[derive(Debug, Default, Serialize)]
pub struct Table {
    pub services: HashMap<ServiceName, Tiers>,
    /// The tiers of services the catalog does not know (selector tiers are empty).
    pub unknown: Tiers,
    /// Built from a catalog: false before the catalog's first answer (see
    /// [`Table::without_catalog`]).
    #[serde(skip)]
    pub from_catalog: bool,
}

/// The tiers of one service, best first.
#[derive(Debug, Default, Serialize)]
pub struct Tiers {
    pub policy: Option<Arc<RoutePolicy>>,
    pub tiers: Vec<TierRoute>,
}

#[derive(Debug, Serialize)]
pub struct TierRoute {
    pub name: TierName,
    pub route: Route,
    pub passing: usize,
    pub total: usize,
    pub eligible: bool,
    /// A Kubernetes bridge pool: never used for requests that came from a bridge.
    pub bridge: bool,
    #[serde(skip)]
    pub header: HeaderValue,
    /// The platform of the tier's endpoints, for the access log: a `platform=<name>` selector's
    /// value, or `kubernetes` for the bridges; `None` when the tier does not say.
    #[serde(skip)]
    pub platform: Option<Arc<str>>,
}

impl TierRoute {
    /// Eligible by the catalog, and not found unreachable by requests (see
    /// [`crate::routing::reach`]).
    pub fn usable(&self) -> bool {
        self.eligible && self.route.observed.usable()
    }
}

impl Tiers {
    pub fn tiers(&self) -> &[TierRoute] {
        &self.tiers
    }

    /// Every tier's [`TierRoute::usable`].
    fn usable(&self) -> Vec<bool> {
        self.tiers.iter().map(TierRoute::usable).collect()
    }

    /// Takes over the endpoint states and retry budgets of the same tiers in `previous`.
    fn inherit(&mut self, previous: &Tiers) {
        for tier in &mut self.tiers {
            if let Some(old) = previous.tiers.iter().find(|t| t.name == tier.name) {
                tier.route = std::mem::take(&mut tier.route).inherit(&old.route);
            }
        }
    }

    fn hold(&self) -> Duration {
        self.policy.as_ref().map_or(Duration::ZERO, |p| p.hold)
    }
}

/// The policies in force: the file's, overridden per key by the KV's.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    pub file: BTreeMap<String, RoutePolicy>,
    pub kv: BTreeMap<String, RoutePolicy>,
    pub default_hold: Duration,
}

impl Policies {
    /// `kv[name]`, `file[name]`, `kv["*"]`, `file["*"]`, then the seed's policy.
    pub fn for_service(&self, name: &str) -> RoutePolicy {
        [
            self.kv.get(name),
            self.file.get(name),
            self.kv.get("*"),
            self.file.get("*"),
        ]
        .into_iter()
        .flatten()
        .next()
        .cloned()
        .unwrap_or_else(|| RoutePolicy::seed(self.default_hold))
    }
}

impl Table {
    /// The table of a gateway whose catalog has not answered yet: every service is unknown,
    /// so it goes to the tiers that do not need the catalog (the bridges' fixed addresses).
    pub fn without_catalog(
        policies: &Policies,
        upstreams: &BTreeMap<String, Upstream>,
        include_warning: bool,
    ) -> Self {
        Self {
            from_catalog: false,
            ..Self::build(&Snapshot::default(), policies, upstreams, include_warning)
        }
    }

    pub fn build(
        snapshot: &Snapshot,
        policies: &Policies,
        upstreams: &BTreeMap<String, Upstream>,
        include_warning: bool,
    ) -> Self {
        // The agents' rules for health and weight (see `routing::inbound_endpoints`).
        let health = routing::Policy {
            include_warning,
            ..routing::Policy::default()
        };
        // The upstream pools, shared by every service.
        let pools: BTreeMap<&str, (Vec<Endpoint>, usize, bool)> = upstreams
            .iter()
            .map(|(name, upstream)| {
                // Bridges are Skyline proxies (HTTP/1.1 and h2c on one port); other pools
                // speak what their instances were registered with (HTTP/1.1 when unknown).
                let bridges = upstream.bridge.then_some(Protocol::Both);
                let (endpoints, total) = match &upstream.pool {
                    Pool::Addresses(addrs) => (
                        addrs
                            .iter()
                            .map(|&a| {
                                Endpoint::new(a, 1)
                                    .speaking(bridges.unwrap_or_default())
                                    .with_mesh(upstream.bridge)
                            })
                            .collect(),
                        addrs.len(),
                    ),
                    Pool::Service(service) => {
                        let instances = snapshot.services.get(service.as_str());
                        let all = instances.map_or(&[][..], |i| &i[..]);
                        let up = routing::direct_endpoints(all, health, bridges, upstream.bridge);
                        (up, all.len())
                    }
                };
                (name.as_str(), (endpoints, total, upstream.bridge))
            })
            .collect();
        let tiers_of = |service: Option<&ServiceName>, policy: RoutePolicy| {
            let tiers = policy
                .tiers
                .iter()
                .map(|tier| {
                    let (endpoints, total, bridge) = match &tier.source {
                        TierSource::Select { key, value } => {
                            let instances = service
                                .and_then(|s| snapshot.services.get(s))
                                .map_or(&[][..], |i| &i[..]);
                            let matching: Vec<_> = instances
                                .iter()
                                .filter(|i| i.meta.get(key) == Some(value))
                                .collect();
                            // The nodes' inbound proxies, weighted as the agents weigh them.
                            let endpoints = routing::inbound_endpoints(
                                snapshot,
                                matching.iter().copied(),
                                health,
                            );
                            let passing = matching
                                .iter()
                                .filter(|i| health.routable(i.health))
                                .count();
                            // Eligibility counts instances; the route balances over nodes.
                            (endpoints, (passing, matching.len()), false)
                        }
                        TierSource::Upstream(name) => match pools.get(name.as_str()) {
                            Some((endpoints, total, bridge)) => {
                                (endpoints.clone(), (endpoints.len(), *total), *bridge)
                            }
                            None => (Vec::new(), (0, 0), false),
                        },
                    };
                    let (passing, total) = total;
                    let eligible =
                        !endpoints.is_empty() && tier.min_healthy.eligible(passing, total);
                    let platform = match &tier.source {
                        TierSource::Select { key, value } if key == "platform" => {
                            Some(Arc::from(value.as_str()))
                        }
                        _ if bridge => Some(Arc::from(KUBERNETES)),
                        _ => None,
                    };
                    TierRoute {
                        platform,
                        header: HeaderValue::from_str(tier.name.as_str())
                            .unwrap_or_else(|_| HeaderValue::from_static("tier")),
                        name: tier.name.clone(),
                        route: Route::new(endpoints),
                        passing,
                        total,
                        eligible,
                        bridge,
                    }
                })
                .collect();
            Tiers {
                policy: Some(Arc::new(policy)),
                tiers,
            }
        };
        let mut services = HashMap::with_capacity(snapshot.services.len());
        let named = policies.file.keys().chain(policies.kv.keys());
        let names = snapshot
            .services
            .keys()
            .cloned()
            .chain(named.filter_map(|k| ServiceName::parse(k).ok()));
        for service in names {
            if services.contains_key(&service) {
                continue;
            }
            let tiers = tiers_of(Some(&service), policies.for_service(service.as_str()));
            services.insert(service, tiers);
        }
        let unknown = tiers_of(None, policies.for_service("*"));
        Self {
            services,
            unknown,
            from_catalog: true,
        }
    }

    /// Keeps what was learnt about endpoints (latency, ejections) across a rebuild.
    fn inherit(&mut self, previous: &Table) {
        for (service, tiers) in &mut self.services {
            if let Some(old) = previous.services.get(service) {
                tiers.inherit(old);
            }
        }
        self.unknown.inherit(&previous.unknown);
    }

    pub fn tiers(&self, service: &str) -> (&Tiers, bool) {
        match self.services.get(service) {
            Some(tiers) => (tiers, true),
            None => (&self.unknown, false),
        }
    }
}

// === Gateway ===

/// The gateway's shared state: the table in force and the tier state per service.
#[derive(Debug)]
pub struct Gateway {
    table: ArcSwap<Table>,
    selectors: Mutex<HashMap<ServiceName, Entry>>,
    forwarder: Forwarder,
    resilience: ArcSwap<Resilience>,
    max_hops: u32,
    /// The authorization policies in force (see [`crate::authz`]).
    pub authz: crate::authz::Authz,
    /// The client of shadow copies, apart from the forwarder: copies leave no trace in the
    /// endpoints' state (latency, ejections) that real requests depend on.
    shadow_client: Client<HttpConnector, Empty<Bytes>>,
    shadow_slots: Arc<tokio::sync::Semaphore>,
}

/// A shadow copy to send once the request was answered.
struct ShadowCopy {
    tier: usize,
    addr: SocketAddr,
    method: http::Method,
    target: http::uri::PathAndQuery,
    headers: http::HeaderMap,
}

#[derive(Debug)]
struct Entry {
    selector: Selector,
    seen: Instant,
    /// Per tier name, its answers since the gateway started.
    answers: answers::ServiceAnswers,
    /// What the shadow copies gave since the gateway started.
    shadow: answers::ShadowCounts,
}

/// One tier decision, for `/routes`.
#[derive(Debug, Serialize)]
struct Decision<'a> {
    tiers: &'a Tiers,
    state: Option<SelectorView>,
    chosen: Option<&'a str>,
}

impl Gateway {
    pub fn new(
        table: Table,
        max_hops: u32,
        resilience: Resilience,
        metrics: Arc<Metrics>,
        tls: Option<MeshTls>,
    ) -> Arc<Self> {
        let forwarder = Forwarder::with_tls(metrics, tls);
        Self::with_forwarder(table, max_hops, resilience, forwarder)
    }

    /// [`Gateway::new`] sending through `forwarder`.
    pub fn with_forwarder(
        table: Table,
        max_hops: u32,
        resilience: Resilience,
        forwarder: Forwarder,
    ) -> Arc<Self> {
        let gateway = Arc::new(Self {
            table: ArcSwap::from_pointee(Table::default()),
            selectors: Mutex::new(HashMap::new()),
            forwarder,
            resilience: ArcSwap::from_pointee(resilience),
            max_hops,
            authz: crate::authz::Authz::default(),
            shadow_client: Client::builder(TokioExecutor::new()).build_http(),
            shadow_slots: Arc::new(tokio::sync::Semaphore::new(SHADOW_IN_FLIGHT)),
        });
        gateway.store(table);
        gateway
    }

    /// Swaps the table and records every known service's tier eligibility at once, so a
    /// fail-back hold starts when the catalog changed, not at the next request.
    pub fn store(&self, mut table: Table) {
        let now = Instant::now();
        table.inherit(&self.table.load());
        if let Ok(mut selectors) = self.selectors.lock() {
            for (service, tiers) in &table.services {
                let eligible = tiers.usable();
                let entry = selectors.entry(service.clone()).or_insert_with(|| Entry {
                    selector: Selector::new(&eligible, now, tiers.hold()),
                    seen: now,
                    answers: answers::ServiceAnswers::new(),
                    shadow: answers::ShadowCounts::default(),
                });
                entry.seen = now;
                entry.selector.observe(&eligible, now, tiers.hold());
            }
            // Services gone from the catalog keep their state a while (scale to zero and back),
            // seeing the tiers of an unknown service meanwhile.
            let unknown = table.unknown.usable();
            for (service, entry) in selectors.iter_mut() {
                if !table.services.contains_key(service) {
                    let hold = table.unknown.hold();
                    if entry.selector.tier_count() == unknown.len() {
                        entry.selector.observe(&unknown, now, hold);
                    } else {
                        let none = vec![false; entry.selector.tier_count()];
                        entry.selector.observe(&none, now, hold);
                    }
                }
            }
            selectors.retain(|service, entry| {
                table.services.contains_key(service)
                    || now.saturating_duration_since(entry.seen) < SELECTOR_RETENTION
            });
        }
        self.table.store(Arc::new(table));
    }

    pub fn load(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Chooses the tier for one request to `service`: the index into its tiers.
    fn choose(
        &self,
        service: &str,
        tiers: &Tiers,
        known: bool,
        from_bridge: bool,
    ) -> Option<usize> {
        let eligible: Vec<bool> = tiers
            .tiers
            .iter()
            .map(|t| t.usable() && !(from_bridge && t.bridge))
            .collect();
        let now = Instant::now();
        let split = tiers.policy.as_ref().and_then(|p| p.split.as_deref());
        let stateful = known.then(|| self.selectors.lock().ok()).flatten();
        match stateful {
            Some(mut selectors) => {
                let entry = selectors.get_mut(service)?;
                // A request from a bridge sees a different eligibility: decide without state.
                if from_bridge {
                    let mut probe = entry.selector.clone();
                    return probe.observe(&eligible, now, tiers.hold());
                }
                match split {
                    Some(weights) => entry.selector.observe_split(
                        &eligible,
                        now,
                        tiers.hold(),
                        weights,
                        fastrand::u64(..),
                    ),
                    None => entry.selector.observe(&eligible, now, tiers.hold()),
                }
            }
            // Unknown services have no state to keep: the best eligible tier.
            None => eligible.iter().position(|&e| e),
        }
    }

    /// Counts an answer of tier `tier` (named `name`) of `service` for the emergency fallback
    /// (see [`tiers`]) and the migration reports (see [`answers`]): `error` when it was a 5xx
    /// or none came, `elapsed` after the request arrived.
    fn record(&self, service: &str, tier: usize, name: &TierName, error: bool, elapsed: Duration) {
        if let Ok(mut selectors) = self.selectors.lock() {
            if let Some(entry) = selectors.get_mut(service) {
                entry.selector.record(tier, Instant::now(), error);
                match entry.answers.get_mut(name) {
                    Some(answers) => answers.record(error, elapsed),
                    None => {
                        let mut answers = answers::TierAnswers::default();
                        answers.record(error, elapsed);
                        entry.answers.insert(name.clone(), answers);
                    }
                }
            }
        }
    }

    /// The answers of `service`'s tiers since the gateway started.
    pub fn answers(&self, service: &str) -> Vec<(TierName, answers::TierAnswers)> {
        let Ok(selectors) = self.selectors.lock() else {
            return Vec::new();
        };
        selectors.get(service).map_or_else(Vec::new, |entry| {
            entry
                .answers
                .iter()
                .map(|(name, answers)| (name.clone(), answers.clone()))
                .collect()
        })
    }

    /// What the shadow copies of `service` gave since the gateway started.
    pub fn shadow_counts(&self, service: &str) -> answers::ShadowCounts {
        self.selectors
            .lock()
            .ok()
            .and_then(|s| s.get(service).map(|e| e.shadow))
            .unwrap_or_default()
    }

    fn count_shadow(&self, service: &str, count: impl FnOnce(&mut answers::ShadowCounts)) {
        if let Ok(mut selectors) = self.selectors.lock() {
            if let Some(entry) = selectors.get_mut(service) {
                count(&mut entry.shadow);
            }
        }
    }

    /// Sends `copy` on its own, compares its status class with `answered` (the caller's; a
    /// copy without an answer is class 0) and counts the result; the copy's answer is
    /// discarded.
    fn send_shadow(self: &Arc<Self>, service: String, copy: ShadowCopy, answered: u16) {
        let Ok(slot) = self.shadow_slots.clone().try_acquire_owned() else {
            self.count_shadow(&service, |c| c.skipped += 1);
            return;
        };
        let gateway = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut headers = copy.headers;
            headers.remove(http::header::CONTENT_LENGTH);
            headers.insert(&X_SKYLINE_SHADOW, HeaderValue::from_static("1"));
            let uri = format!("http://{}{}", copy.addr, copy.target);
            let class = match Request::builder()
                .method(copy.method)
                .uri(uri)
                .body(Empty::new())
            {
                Ok(mut req) => {
                    *req.headers_mut() = headers;
                    let sent = gateway.shadow_client.request(req);
                    match tokio::time::timeout(SHADOW_TIMEOUT, sent).await {
                        Ok(Ok(response)) => response.status().as_u16() / 100,
                        _ => 0,
                    }
                }
                Err(_) => 0,
            };
            tracing::debug!(%service, tier = copy.tier, class, answered, "shadow compared");
            gateway.count_shadow(&service, |c| {
                c.compared += 1;
                if class != answered {
                    c.differ += 1;
                }
            });
        });
    }

    /// The dashboard's counters: per service, the answers of its tiers so far, summed per
    /// platform (a tier without one counts under its name).
    pub fn tier_readings(&self) -> Vec<crate::admin::ui::Reading> {
        let table = self.load();
        let Ok(selectors) = self.selectors.lock() else {
            return Vec::new();
        };
        let mut out: BTreeMap<(Arc<str>, Arc<str>), u64> = BTreeMap::new();
        for (service, entry) in selectors.iter() {
            let tiers = table.services.get(service);
            for (name, answers) in &entry.answers {
                let platform = tiers
                    .and_then(|t| t.tiers.iter().find(|t| &t.name == name))
                    .and_then(|t| t.platform.clone())
                    .unwrap_or_else(|| name.shared());
                let total = out
                    .entry((Arc::from(service.as_str()), platform))
                    .or_default();
                *total = total.saturating_add(answers.total());
            }
        }
        out.into_iter().map(|((s, p), n)| (s, p, n)).collect()
    }

    /// The dashboard's view of every service's tiers, and which one requests go to now.
    pub fn tier_views(&self) -> HashMap<String, Vec<crate::admin::ui::TierView>> {
        let table = self.load();
        let now = Instant::now();
        let selectors = self.selectors.lock().ok();
        let mut out = HashMap::with_capacity(table.services.len());
        for (name, tiers) in &table.services {
            let eligible = tiers.usable();
            let choice = selectors.as_ref().and_then(|s| s.get(name)).and_then(|e| {
                let mut probe = e.selector.clone();
                probe.observe(&eligible, now, tiers.hold())
            });
            let split = tiers.policy.as_ref().and_then(|p| p.split.as_deref());
            let views = tiers
                .tiers
                .iter()
                .enumerate()
                .map(|(i, tier)| crate::admin::ui::TierView {
                    name: tier.name.to_string(),
                    platform: tier.platform.as_deref().map(str::to_owned),
                    passing: tier.passing,
                    total: tier.total,
                    eligible: tier.usable(),
                    // With a split, every usable tier with a weight takes requests.
                    chosen: match split {
                        Some(weights) => tier.usable() && weights.get(i).is_some_and(|&w| w > 0),
                        None => choice == Some(i),
                    },
                })
                .collect();
            out.insert(name.to_string(), views);
        }
        out
    }

    /// `/routes`: every service's tiers, tier state and current choice.
    fn describe(&self) -> serde_json::Value {
        let table = self.load();
        let now = Instant::now();
        let selectors = self.selectors.lock().ok();
        let mut services = serde_json::Map::new();
        let mut names: Vec<&ServiceName> = table.services.keys().collect();
        names.sort();
        for name in names {
            let tiers = &table.services[name];
            // The choice a request would get now (without changing the state).
            let eligible = tiers.usable();
            let probe = selectors.as_ref().and_then(|s| s.get(name)).map(|e| {
                let mut probe = e.selector.clone();
                let choice = probe.observe(&eligible, now, tiers.hold());
                (probe.view(now), choice)
            });
            let (state, choice) = probe.map_or((None, None), |(v, c)| (Some(v), c));
            let chosen = choice
                .and_then(|a| tiers.tiers.get(a))
                .map(|t| t.name.as_str());
            let decision = Decision {
                tiers,
                state,
                chosen,
            };
            services.insert(
                name.to_string(),
                serde_json::to_value(&decision).unwrap_or_default(),
            );
        }
        serde_json::json!({
            "services": services,
            "unknown": serde_json::to_value(&table.unknown).unwrap_or_default(),
        })
    }
}

/// `/service/<name>` + `path` (normalised by the policies) + `?query`, the target the gateway
/// forwards once the policies judged `path`.
fn normalised_target(
    name: &str,
    path: &str,
    query: Option<&str>,
) -> Result<http::uri::PathAndQuery, MeshError> {
    let mut target = format!("/service/{name}{path}");
    if let Some(query) = query {
        target.push('?');
        target.push_str(query);
    }
    http::uri::PathAndQuery::from_maybe_shared(Bytes::from(target))
        .map_err(|_| MeshError::bad_request("invalid request target"))
}

// === Handler ===

/// The gateway listener's handler.
#[derive(Clone, Debug)]
pub struct GatewayHandler {
    gateway: Arc<Gateway>,
}

impl GatewayHandler {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

impl Proxy for GatewayHandler {
    type Body = Body;

    /// Chooses the tier and forwards one request; `note.label` is set to the service once it
    /// is parsed, for the metrics, and the tier that answered is noted for the access log.
    async fn proxy(
        &self,
        mut req: Request<Incoming>,
        conn: Conn,
        note: &mut Note,
    ) -> Response<Body> {
        crate::proxy::authorize::strip_untrusted(req.headers_mut(), &conn);
        let arrived = Instant::now();
        let Some(target) = req.uri().path_and_query().cloned() else {
            return MeshError::bad_request("expected /service/<name>/<path>").into_response("");
        };
        let (name, rest) = match split_service_path(target.path()) {
            Ok(split) => split,
            Err(e) => return e.into_response(""),
        };
        if let Err(e) = count_hop(req.headers_mut(), self.gateway.max_hops) {
            return e.into_response(name);
        }
        let from_bridge = req
            .headers_mut()
            .remove(&X_SKYLINE_ORIGIN)
            .is_some_and(|v| v.as_bytes() == b"bridge");
        let table = self.gateway.load();
        note.label = match table.services.get_key_value(name) {
            Some((service, _)) => Some(ServiceLabel::known(service.clone())),
            None => metrics::unverified(name),
        };
        // The policies, as the destination's proxy checks them; the next hop gets the path
        // they judged.
        let normal =
            match crate::proxy::authorize::enforce(&self.gateway.authz, &req, &conn, name, rest) {
                Ok(normal) => normal,
                Err(e) => return crate::proxy::authorize::refusal(&req, e, name),
            };
        let target = match normal {
            None => target.clone(),
            Some(normal) => match normalised_target(name, &normal, target.query()) {
                Ok(t) => t,
                Err(e) => return e.into_response(name),
            },
        };
        let (route, known) = table.tiers(name);
        let chosen = self.gateway.choose(name, route, known, from_bridge);
        // Priority fallback: from the chosen tier down, every tier with an endpoint that
        // requests did not find unreachable, in order; a better tier found unreachable goes
        // first when its trial is due (see `routing::reach`).
        let now = Instant::now();
        let mut chain: Vec<usize> = Vec::with_capacity(route.tiers().len());
        for (i, tier) in route.tiers().iter().enumerate() {
            if tier.route.is_empty() || (from_bridge && tier.bridge) {
                continue;
            }
            let below = chosen.is_some_and(|c| i >= c);
            match tier.route.observed.admit(now, Duration::ZERO) {
                Admit::Use if below => chain.push(i),
                Admit::Trial if below || tier.eligible => chain.push(i),
                _ => {}
            }
        }
        if chain.is_empty() {
            // Every tier with endpoints was found unreachable: try them anyway, best first.
            chain.extend(route.tiers().iter().enumerate().filter_map(|(i, tier)| {
                let skip = tier.route.is_empty() || (from_bridge && tier.bridge);
                (!skip && chosen.is_some_and(|c| i >= c)).then_some(i)
            }));
        }
        let Some((&first, rest)) = chain.split_first() else {
            let usable = route
                .tiers()
                .iter()
                .any(|t| !(from_bridge && t.bridge) && t.total > 0);
            let error = if known || usable {
                MeshError::NoHealthyEndpoint
            } else if !table.from_catalog {
                MeshError::NoCatalog
            } else {
                MeshError::UnknownBeyond("no such service in the catalog, nor on any platform")
            };
            return error.into_response(name);
        };
        let tiers = route.tiers();
        tracing::debug!(service = %name, tier = %tiers[first].name, "gateway route");
        // A shadow copy of an idempotent request, decided before the request goes on (sending
        // consumes it) and sent after it was answered.
        let shadow = match route.policy.as_ref().and_then(|p| p.shadow) {
            Some(shadow)
                if known
                    && !from_bridge
                    && (req.method() == http::Method::GET
                        || req.method() == http::Method::HEAD)
                    && fastrand::u32(0..100) < shadow.percent =>
            {
                tiers
                    .get(shadow.tier)
                    .filter(|t| !t.route.endpoints.is_empty())
                    .map(|t| {
                        // The copy's headers follow the contract as the request's do.
                        let mut headers = req.headers().clone();
                        let rules = crate::proxy::headers::Rules {
                            hop: Host::Keep.into(),
                            first: false,
                            trusted: conn.mesh_peer.is_some(),
                        };
                        crate::proxy::headers::rewrite_request(&mut headers, &rules, &conn.peer_ip);
                        ShadowCopy {
                            tier: shadow.tier,
                            addr: t.route.endpoints[fastrand::usize(..t.route.endpoints.len())]
                                .addr,
                            method: req.method().clone(),
                            target: target.clone(),
                            headers,
                        }
                    })
            }
            _ => None,
        };
        let forwarder = &self.gateway.forwarder;
        let name = name.to_owned();
        // A tier that cannot take the request passes it to the next one; other failures stay
        // within the tier that got it. The selector holds tiers that answer again.
        let next: Vec<&Route> = rest.iter().map(|&i| &tiers[i].route).collect();
        let fallback = Fallback::new(&next, Duration::ZERO);
        let policy = self.gateway.resilience.load_full();
        let upstream = Destination {
            service: &name,
            label: if known { &name } else { "" },
            route: &tiers[first].route,
            policy: &policy,
            first_hop: false,
            fallback: (!rest.is_empty()).then_some(&fallback),
        };
        let forwarded = forwarder
            .forward(req, upstream, target, Host::Keep, &conn, &mut note.trail)
            .await;
        let served = chain.get(fallback.served()).copied().unwrap_or(first);
        let tier = &tiers[served];
        note.tier = Tag::Shared(tier.name.shared());
        note.platform = tier.platform.clone().map_or(Tag::None, Tag::Shared);
        let error = forwarded
            .as_ref()
            .map_or(true, |r| r.status().is_server_error());
        let elapsed = arrived.elapsed();
        forwarder.metrics().gateway_tier(
            if known { &name } else { "" },
            tier.name.shared(),
            error,
            elapsed,
        );
        self.gateway
            .record(&name, served, &tier.name, error, elapsed);
        if let Some(copy) = shadow.filter(|c| c.tier != served) {
            // A mesh error is a 5xx to the caller.
            let answered = forwarded.as_ref().map_or(5, |r| r.status().as_u16() / 100);
            self.gateway.send_shadow(name.clone(), copy, answered);
        }
        match forwarded {
            Ok(mut response) => {
                response
                    .headers_mut()
                    .insert(&X_SKYLINE_TIER, tier.header.clone());
                response
            }
            Err(e) => e.into_response(&name),
        }
    }
}

/// The gateway's admin listener: `/healthz`, `/readyz`, `/routes`, `/explain` (see
/// [`explain`]), `/metrics`, and the dashboard at `/ui` (see [`crate::admin::ui`]).
#[derive(Clone, Debug)]
pub struct GatewayAdmin {
    gateway: Arc<Gateway>,
    catalog: Subscriber,
    metrics: Arc<Metrics>,
    token: Option<crate::config::token::Token>,
    dashboard: Arc<crate::admin::ui::Dashboard>,
}

impl Handler for GatewayAdmin {
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
            crate::admin::ui::DATA_PATH => {
                let snapshot = self.catalog.borrow().snapshot.clone();
                let readings = self.gateway.tier_readings();
                let body = self
                    .dashboard
                    .data(snapshot.as_deref(), self.gateway.tier_views(), &readings)
                    .await;
                return crate::admin::ui::data_response(&body);
            }
            "/readyz" => {
                let state = self.catalog.borrow().clone();
                let ready = state.snapshot.is_some();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (
                    status,
                    serde_json::json!({"ready": ready, "catalog_error": state.error}),
                )
            }
            "/routes" => (StatusCode::OK, self.gateway.describe()),
            "/explain" => match crate::admin::explain_url(req.uri().query()) {
                Ok(url) => crate::admin::explained(self.gateway.explain(&url)),
                Err(refusal) => refusal,
            },
            "/metrics" => {
                let catalog = self.catalog.borrow().clone();
                return crate::admin::metrics_response(&self.metrics, Some(&catalog));
            }
            _ => (
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not-found", "paths": ["/healthz", "/readyz", "/routes", "/explain", "/metrics", "/ui"]}),
            ),
        };
        crate::admin::json_response(status, &body)
    }
}

// === Running ===

/// A running gateway.
pub struct GatewayHandle {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    /// What the gateway listener records, served at the admin's `/metrics`.
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl GatewayHandle {
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn join(mut self) {
        crate::serve::join_all(&mut self.tasks).await;
    }
}

/// The names of the gateway's listeners, as inherited sockets are named (see
/// [`serve::activation`]).
pub const LISTENER_NAMES: [&str; 2] = ["gateway", "admin"];

/// Binds the listeners, follows the catalog (and the KV policies), and serves.
pub async fn spawn(
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<GatewayHandle, StartError> {
    spawn_on(settings, Inherited::none(), shutdown).await
}

/// [`spawn`], serving on the sockets a supervisor passed where it passed one.
pub async fn spawn_on(
    settings: Settings,
    mut inherited: Inherited,
    shutdown: CancellationToken,
) -> Result<GatewayHandle, StartError> {
    let listener = role::listen_at(&mut inherited, "gateway", settings.listen)?;
    let admin = role::listen(&mut inherited, "admin", settings.admin)?;
    inherited.finish(&LISTENER_NAMES)?;
    let mut tasks = JoinSet::new();
    let metrics = Metrics::when(settings.access.metrics);
    let tls = role::mesh_tls(settings.tls.as_ref(), &metrics, &mut tasks, &shutdown)?;
    let (source_name, subscriber) = crate::catalog::follow_catalog(
        &settings.catalog,
        settings.tokens.registry.as_ref(),
        &mut tasks,
        &shutdown,
    );
    // A registry or Consul that has not answered yet: the gateway serves without it, sending
    // every service to the tiers that need no catalog, until it answers (see
    // `catalog::first_read`).
    let remote = !matches!(settings.catalog, CatalogSource::File(_));
    let first =
        crate::catalog::first_read(&subscriber, remote, &source_name, &mut tasks, &shutdown).await;
    let snapshot = match first {
        Ok(snapshot) => snapshot,
        Err(first) => {
            shutdown.cancel();
            return Err(StartError::Catalog {
                source_name,
                error: first.error,
            });
        }
    };
    let (kv_tx, kv_rx) = watch::channel(BTreeMap::new());
    let kv_tx = match settings.kv {
        Some(kv) => {
            tasks.spawn(watch_kv_routes(
                kv,
                settings.tokens.registry.clone(),
                settings.upstreams.clone(),
                settings.default_hold,
                kv_tx,
                metrics.clone(),
                shutdown.clone(),
            ));
            None
        }
        None => Some(kv_tx),
    };
    let (file_tx, file_rx) = watch::channel(settings.routes.clone());
    let policies = Policies {
        file: settings.routes.clone(),
        kv: BTreeMap::new(),
        default_hold: settings.default_hold,
    };
    let table = match &snapshot {
        Some(snapshot) => Table::build(
            snapshot,
            &policies,
            &settings.upstreams,
            settings.include_warning,
        ),
        None => Table::without_catalog(&policies, &settings.upstreams, settings.include_warning),
    };
    let gateway = Gateway::with_forwarder(
        table,
        settings.max_hops,
        settings.resilience.clone(),
        Forwarder::with_tls(metrics.clone(), tls.clone())
            .with_peer_protocol(settings.peer_protocol),
    );
    gateway.authz.set_file(settings.authz.clone());
    // The KV's authorization policies, in the registry the gateway follows (as an agent).
    if let CatalogSource::Consul(registry) = &settings.catalog {
        tasks.spawn(crate::authz::kv::watch(
            *registry,
            settings.tokens.registry.clone(),
            gateway.authz.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    match settings.reload.clone() {
        Some(args) => {
            let watch = watch_file_routes(
                args,
                file_tx,
                gateway.clone(),
                metrics.clone(),
                shutdown.clone(),
            );
            tasks.spawn(watch);
        }
        None => {
            // Nothing to watch: keep the channel open for the follower until shutdown.
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                shutdown.cancelled().await;
                drop(file_tx);
            });
        }
    }
    if let Some(kv_tx) = kv_tx {
        // No KV watch: keep the channel open for the follower until shutdown.
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            shutdown.cancelled().await;
            drop(kv_tx);
        });
    }
    let (applied, applied_rx) = watch::channel(None);
    tasks.spawn(follow(
        subscriber.clone(),
        kv_rx,
        file_rx,
        gateway.clone(),
        policies,
        settings.upstreams.clone(),
        settings.include_warning,
        applied,
    ));
    let addr = listener.local_addr().unwrap_or(settings.listen);
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    // The admin listener in the registry (`skyline-admin`), so Prometheus finds it.
    if let (Some(admin), CatalogSource::Consul(registry)) = (admin_addr, &settings.catalog) {
        let client = crate::registry::client::RegistryClient::new(*registry);
        let register = crate::registration::run_admin(client, "gateway", admin, shutdown.clone());
        tasks.spawn(register);
    }
    // The convergence report (`skyline status`) in the registry or etcd the gateway follows.
    let identity = crate::status::Identity {
        role: "gateway",
        name: answers::gateway_id(addr),
        node: crate::registration::hostname(),
        admin: admin_addr,
        catalog: source_name.clone(),
    };
    if let Some(report) = crate::status::reporter(
        &settings.catalog,
        settings.tokens.registry.as_ref(),
        identity,
        applied_rx,
        subscriber.clone(),
        Arc::new(crate::status::catalog_reasons),
        shutdown.clone(),
    ) {
        tasks.spawn(report);
    }
    if let Some(kv) = settings.kv {
        let id = answers::gateway_id(addr);
        let client = crate::registry::client::RegistryClient::new(kv)
            .with_token(settings.tokens.registry.clone());
        tasks.spawn(answers::publish(
            client,
            gateway.clone(),
            id,
            shutdown.clone(),
        ));
    }
    tasks.spawn(serve::serve_mesh(
        listener,
        GatewayHandler::new(gateway.clone()),
        Recorder::new(Role::Gateway, metrics.clone())
            .with_access(AccessLog::stderr(&settings.access)),
        tls,
        shutdown.clone(),
    ));
    if let Some(admin) = admin {
        // The dashboard shows the migration records of the KV the gateway follows.
        let kv = settings.kv.map(|kv| {
            crate::registry::client::RegistryClient::new(kv)
                .with_token(settings.tokens.registry.clone())
        });
        let dashboard = crate::admin::ui::Dashboard::new("gateway", "platform", kv);
        let counted = gateway.clone();
        tasks.spawn(crate::admin::ui::sample_every(
            dashboard.clone(),
            move || counted.tier_readings(),
            shutdown.clone(),
        ));
        let handler = GatewayAdmin {
            gateway: gateway.clone(),
            catalog: subscriber,
            metrics: metrics.clone(),
            token: settings.tokens.admin.clone(),
            dashboard,
        };
        tasks.spawn(serve::serve(admin, handler, shutdown.clone()));
    }
    tracing::info!(
        gateway = %addr,
        admin = %admin_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        catalog = %source_name,
        "gateway started"
    );
    Ok(GatewayHandle {
        addr,
        admin: admin_addr,
        gateway,
        metrics,
        shutdown,
        tasks,
    })
}

/// Rebuilds the table on every catalog, KV policy or policy file change; `applied` says which
/// catalog version each table was built from.
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    mut catalog: Subscriber,
    mut kv: watch::Receiver<BTreeMap<String, RoutePolicy>>,
    mut file: watch::Receiver<BTreeMap<String, RoutePolicy>>,
    gateway: Arc<Gateway>,
    mut policies: Policies,
    upstreams: BTreeMap<String, Upstream>,
    include_warning: bool,
    applied: crate::catalog::Applied,
) {
    loop {
        policies.kv = kv.borrow_and_update().clone();
        policies.file = file.borrow_and_update().clone();
        let state = catalog.borrow_and_update().clone();
        match &state.snapshot {
            Some(snapshot) => {
                gateway.store(Table::build(
                    snapshot,
                    &policies,
                    &upstreams,
                    include_warning,
                ));
                crate::catalog::mark_applied(&applied, &state);
            }
            None => gateway.store(Table::without_catalog(
                &policies,
                &upstreams,
                include_warning,
            )),
        }
        let changed = tokio::select! {
            changed = catalog.changed() => changed,
            changed = kv.changed() => changed,
            changed = file.changed() => changed,
        };
        if changed.is_err() {
            return;
        }
    }
}

/// Re-reads the config file when it changes, publishes its `[routes]` and applies its
/// `[resilience]`. A file that does not validate is refused with file, line, key and reason,
/// and the policies in force are kept. Each reload counts in `metrics` as accepted or refused.
pub async fn watch_file_routes(
    args: config::GatewayArgs,
    tx: watch::Sender<BTreeMap<String, RoutePolicy>>,
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let Some(path) = args.config.clone() else {
        return;
    };
    let mut file = crate::catalog::file::Watched::new(&path);
    while file.changed(FILE_ROUTES_POLL, &shutdown).await {
        match args.clone().resolve() {
            Ok(settings) => {
                tracing::info!(path = %path.display(), policies = settings.routes.len(), "route policies reloaded");
                metrics.config_reload(true);
                tx.send_replace(settings.routes);
                gateway.resilience.store(Arc::new(settings.resilience));
                if !gateway.authz.file_is(&settings.authz) {
                    tracing::info!(path = %path.display(), rules = settings.authz.policy.rules.len(), "authorization policies reloaded");
                    gateway.authz.set_file(settings.authz);
                }
            }
            Err(error) => {
                tracing::error!(%error, "route policies refused; keeping those in force");
                metrics.config_reload(false);
            }
        }
    }
}

/// Watches `skyline/routes/` in the KV with blocking queries. Each key's value is validated;
/// an invalid one is logged and the key's previous policy kept. A changed key counts in
/// `metrics` as a reload, accepted or refused (the policies found at start do not).
pub async fn watch_kv_routes(
    address: SocketAddr,
    token: Option<crate::config::token::Token>,
    upstreams: BTreeMap<String, Upstream>,
    default_hold: Duration,
    tx: watch::Sender<BTreeMap<String, RoutePolicy>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let parse = |service: &str, value: &str, initial: bool| {
        if service != "*" && !ServiceName::is_valid(service) {
            return KvValue::Refused("not a service name or *".to_owned());
        }
        let parsed = RoutePolicy::parse_text(value, &upstreams, default_hold);
        if !initial {
            metrics.config_reload(parsed.is_ok());
        }
        match parsed {
            Ok(policy) => {
                tracing::info!(key = %format!("{KV_ROUTES_PREFIX}{service}"), "route policy loaded");
                KvValue::Parsed(policy)
            }
            Err(error) => KvValue::Refused(error.to_string()),
        }
    };
    let apply = |policies| {
        tx.send_replace(policies);
    };
    follow_kv(
        address,
        token,
        KV_ROUTES_PREFIX,
        "route policy",
        parse,
        apply,
        shutdown,
    )
    .await;
}
