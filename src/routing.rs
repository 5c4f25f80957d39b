//! The route table: an immutable value built from one catalog snapshot, published by an atomic
//! pointer swap.
//!
//! Readers call [`Routes::load`] and get the table in force without taking any lock a writer
//! holds; a request that started with one table keeps it (its endpoint is already chosen) while
//! the next request sees the new one. Building is O(instances); lookup is one hash probe.

pub mod balance;
pub mod budget;
pub mod reach;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use crate::catalog::{self, Health, Instance, ServiceName, Snapshot, Subscriber};
use crate::contract::GATEWAY_SERVICE;
use crate::error::MeshError;
pub use balance::{Endpoint, Protocol, Route};

/// How long a higher tier must stay eligible before traffic falls back to it, by default.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(3);

/// Which instances count as routable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Route to instances whose health is `warning` as well as `passing`.
    pub include_warning: bool,
    /// How long a service that becomes routable again keeps going to the catch-all (the
    /// gateway) before the outbound proxy routes it directly: the agent's side of the
    /// gateway's fail-back hold, so a flapping instance does not flap traffic. Zero: at once.
    pub fallback_hold: Duration,
}

impl Policy {
    /// Whether an instance of this health takes requests: the one health rule of every role.
    pub fn routable(self, health: Health) -> bool {
        health == Health::Passing || (self.include_warning && health == Health::Warning)
    }
}

// === Table ===

/// The answer to "where does a request for this service go?".
#[derive(Debug)]
pub enum Lookup<'a> {
    /// The service has routable endpoints.
    Route(&'a Arc<Route>),
    /// The catalog knows the service but none of its instances is routable.
    NoHealthy,
    /// The catalog does not know the service.
    Unknown,
}

/// How long the inbound side keeps serving a local route after it left the catalog.
///
/// Agents apply a catalog change at slightly different moments: for a little while other nodes'
/// outbound proxies still send here. Serving those requests (the instance is usually still up,
/// draining) instead of answering 404 is what keeps a cutover free of failed requests.
pub const INBOUND_DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Every route of one node, built from one snapshot.
///
/// Routes are shared (`Arc`) between successive tables: a catalog change rebuilds only the
/// services whose instances changed, and the others keep their route, round-robin position
/// included.
#[derive(Debug, Default, Serialize)]
pub struct Table {
    /// Outbound: per service, the inbound proxies of nodes that run a routable instance,
    /// weighted by the instances' summed weights on that node.
    pub outbound: HashMap<ServiceName, Arc<Route>>,
    /// Inbound: per service, the routable instances on this node.
    pub inbound: HashMap<ServiceName, Arc<Route>>,
    /// Inbound routes that left the catalog recently, served until their grace ends.
    pub retired: HashMap<ServiceName, Retired>,
    /// The snapshot this table was built from, to tell what the next one changed.
    #[serde(skip)]
    source: Option<Arc<Snapshot>>,
    /// Outbound routes that became routable recently, and until when they count as warming up
    /// (see [`Policy::fallback_hold`]).
    #[serde(skip)]
    pub warming: HashMap<ServiceName, Instant>,
    /// The passing instances of catalog service [`GATEWAY_SERVICE`], addressed directly: the
    /// catch-all when none is configured.
    pub gateways: Arc<Route>,
    /// [`Policy::fallback_hold`]: also how long a route that requests found unreachable must
    /// answer again before the outbound proxy uses it first (see [`reach`]).
    #[serde(skip)]
    pub fallback_hold: Duration,
}

/// A local route that left the catalog, still served for requests already on their way.
#[derive(Debug, Serialize)]
pub struct Retired {
    pub route: Arc<Route>,
    #[serde(skip)]
    pub until: Instant,
}

impl Table {
    /// Builds the routes of node `node` from `snapshot`, every service anew.
    pub fn build(snapshot: &Snapshot, node: &str, policy: Policy) -> Self {
        let mut table = Self {
            gateways: Arc::new(gateway_pool(snapshot, policy)),
            fallback_hold: policy.fallback_hold,
            ..Self::default()
        };
        for (service, instances) in &snapshot.services {
            table.add(service, instances, snapshot, node, policy, None);
        }
        table
    }

    /// The routes of one service: outbound always, inbound when this node runs an instance.
    fn add(
        &mut self,
        service: &ServiceName,
        instances: &[Instance],
        snapshot: &Snapshot,
        node: &str,
        policy: Policy,
        previous: Option<&Table>,
    ) {
        let remote = inbound_endpoints(snapshot, instances, policy);
        let here = instances
            .iter()
            .filter(|i| i.node == node && snapshot.nodes.contains_key(&i.node));
        let local = direct_endpoints(here, policy, None, false);
        // Endpoint states (latency, ejections) and the retry budget carry over.
        let inherit = |route: Route, old: Option<&Arc<Route>>| match old {
            Some(old) => route.inherit(old),
            None => route,
        };
        let old = |map: fn(&Table) -> &HashMap<ServiceName, Arc<Route>>| {
            previous.and_then(|t| map(t).get(service))
        };
        let outbound = inherit(Route::new(remote), old(|t| &t.outbound));
        self.outbound.insert(service.clone(), Arc::new(outbound));
        if instances.iter().any(|i| i.node == node) {
            let retired = previous
                .and_then(|t| t.retired.get(service))
                .map(|r| &r.route);
            let inbound = inherit(Route::new(local), old(|t| &t.inbound).or(retired));
            self.inbound.insert(service.clone(), Arc::new(inbound));
        }
    }

    /// Builds the next table from `previous`: services whose instances did not change keep
    /// their routes (a full rebuild only when the nodes changed), and local routes that
    /// `snapshot` no longer serves are retired (see [`INBOUND_DRAIN_GRACE`]).
    pub fn build_after(
        previous: &Table,
        snapshot: &Arc<Snapshot>,
        node: &str,
        policy: Policy,
        now: Instant,
    ) -> Self {
        let mut table = Self {
            outbound: HashMap::with_capacity(snapshot.services.len()),
            source: Some(snapshot.clone()),
            gateways: Arc::new(gateway_pool(snapshot, policy).inherit(&previous.gateways)),
            fallback_hold: policy.fallback_hold,
            ..Self::default()
        };
        let old = previous
            .source
            .as_deref()
            .filter(|old| catalog::same_nodes(&old.nodes, &snapshot.nodes));
        for (service, instances) in &snapshot.services {
            let unchanged = old
                .and_then(|old| old.services.get(service))
                .is_some_and(|was| catalog::same_instances(was, instances));
            match previous.outbound.get(service) {
                Some(route) if unchanged => {
                    table.outbound.insert(service.clone(), route.clone());
                    if let Some(route) = previous.inbound.get(service) {
                        table.inbound.insert(service.clone(), route.clone());
                    }
                }
                _ => table.add(service, instances, snapshot, node, policy, Some(previous)),
            }
        }
        let live = |t: &Table, s: &ServiceName| t.inbound.get(s).is_some_and(|r| !r.is_empty());
        for (service, old) in &previous.retired {
            if old.until > now && !live(&table, service) {
                let retired = Retired {
                    route: old.route.clone(),
                    until: old.until,
                };
                table.retired.insert(service.clone(), retired);
            }
        }
        if !policy.fallback_hold.is_zero() {
            let routable =
                |t: &Table, s: &ServiceName| t.outbound.get(s).is_some_and(|r| !r.is_empty());
            for service in table.outbound.keys() {
                if !routable(&table, service) {
                    continue;
                }
                let until = match previous.warming.get(service) {
                    Some(&until) if until > now => until,
                    Some(_) => continue,
                    None if routable(previous, service) => continue,
                    None => now + policy.fallback_hold,
                };
                table.warming.insert(service.clone(), until);
            }
        }
        for (service, route) in &previous.inbound {
            if !route.is_empty() && !live(&table, service) {
                let route = route.clone();
                let until = now + INBOUND_DRAIN_GRACE;
                table
                    .retired
                    .insert(service.clone(), Retired { route, until });
            }
        }
        table
    }

    pub fn outbound(&self, service: &str) -> Lookup<'_> {
        classify(self.outbound.get(service))
    }

    /// The error for a service the table does not know: `unknown-service` once the table was
    /// built from a catalog, `no-healthy-endpoint` (not sent) before an agent's first read.
    pub fn unknown(&self) -> MeshError {
        if self.source.is_some() {
            MeshError::UnknownService
        } else {
            MeshError::NoCatalog
        }
    }

    /// Whether `service` became routable less than [`Policy::fallback_hold`] ago.
    pub fn warming(&self, service: &str) -> bool {
        self.warming
            .get(service)
            .is_some_and(|&until| until > Instant::now())
    }

    pub fn inbound(&self, service: &str) -> Lookup<'_> {
        match classify(self.inbound.get(service)) {
            Lookup::Route(route) => Lookup::Route(route),
            missing => match self.retired.get(service) {
                Some(retired) if retired.until > Instant::now() => Lookup::Route(&retired.route),
                _ => missing,
            },
        }
    }
}

/// What an instance was registered as speaking: meta `protocol = "h2c"` (or the tag `h2c`) is
/// an HTTP/2-only server (a gRPC server, say), which every request reaches over h2c, an
/// HTTP/1.1 caller's too; anything else (no `protocol`, `protocol = "http1"`) is HTTP/1.1, which
/// every request reaches over HTTP/1.1, an HTTP/2 caller's too.
pub fn protocol_of(instance: &Instance) -> Protocol {
    declared_protocol(
        instance.meta.get("protocol").map(|p| &**p),
        instance.tags.iter().map(|t| &**t),
    )
}

/// [`protocol_of`] from an instance's meta `protocol` and its tags (the registry's checks use it
/// on what was registered).
pub fn declared_protocol<'a>(
    protocol: Option<&str>,
    mut tags: impl Iterator<Item = &'a str>,
) -> Protocol {
    let h2c = protocol.is_some_and(|p| p.eq_ignore_ascii_case("h2c")) || tags.any(|t| t == "h2c");
    if h2c { Protocol::H2c } else { Protocol::Http1 }
}

// === From a catalog to endpoints: the rules of every role ===
//
// The agent's outbound routes, the gateway's tiers and pools and the bridge's gateway pool are
// built from these three, so an instance's health and weight mean the same everywhere.

/// The mesh endpoints that reach `instances`: one per node with a routable instance, that
/// node's inbound proxy (a Skyline proxy: HTTP/1.1 and h2c on one port), weighted by the summed
/// weight of the node's routable instances. Nodes in stable (name) order.
pub fn inbound_endpoints<'a>(
    snapshot: &Snapshot,
    instances: impl IntoIterator<Item = &'a Instance>,
    policy: Policy,
) -> Vec<Endpoint> {
    let mut per_node: BTreeMap<&str, u32> = BTreeMap::new();
    for instance in instances {
        if policy.routable(instance.health) {
            let w = per_node.entry(instance.node.as_str()).or_default();
            *w = w.saturating_add(instance.weight);
        }
    }
    per_node
        .into_iter()
        .filter_map(|(name, weight)| {
            let node = snapshot.nodes.get(name)?;
            let endpoint = Endpoint::new(node.inbound_addr(), weight);
            Some(endpoint.speaking(Protocol::Both).with_mesh(true))
        })
        .collect()
}

/// The routable `instances` addressed directly, with their weights, speaking `protocol` (or
/// what each was registered with, when `None`); `mesh` when they are Skyline proxies.
pub fn direct_endpoints<'a>(
    instances: impl IntoIterator<Item = &'a Instance>,
    policy: Policy,
    protocol: Option<Protocol>,
    mesh: bool,
) -> Vec<Endpoint> {
    instances
        .into_iter()
        .filter(|i| policy.routable(i.health))
        .map(|i| {
            let speaks = protocol.unwrap_or_else(|| protocol_of(i));
            Endpoint::new(i.addr(), i.weight)
                .speaking(speaks)
                .with_mesh(mesh)
        })
        .collect()
}

/// The gateway pool: the routable instances of [`GATEWAY_SERVICE`], addressed directly
/// (gateways are Skyline proxies: HTTP/1.1 and h2c on one port).
pub fn gateway_pool(snapshot: &Snapshot, policy: Policy) -> Route {
    let instances = snapshot.services.get(GATEWAY_SERVICE);
    let instances = instances.map_or(&[][..], |i| &i[..]);
    Route::new(direct_endpoints(
        instances,
        policy,
        Some(Protocol::Both),
        true,
    ))
}

fn classify(route: Option<&Arc<Route>>) -> Lookup<'_> {
    match route {
        None => Lookup::Unknown,
        Some(r) if r.is_empty() => Lookup::NoHealthy,
        Some(r) => Lookup::Route(r),
    }
}

// === Routes ===

/// The table in force, shared by every connection of a node.
#[derive(Debug)]
pub struct Routes {
    table: ArcSwap<Table>,
    /// Counts swaps, for the rare reader that waits for the next table.
    version: watch::Sender<u64>,
}

impl Default for Routes {
    fn default() -> Self {
        Self::new(Table::default())
    }
}

impl Routes {
    pub fn new(table: Table) -> Self {
        Self {
            table: ArcSwap::from_pointee(table),
            version: watch::Sender::new(0),
        }
    }

    /// Notified on every swap; subscribe before looking up, so no swap is missed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// How many tables were swapped in since the first: the route-table version.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// The table in force; cheap, lock-free, and never blocked by a writer.
    pub fn load_full(&self) -> Arc<Table> {
        self.table.load_full()
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Table>> {
        self.table.load()
    }

    pub fn store(&self, table: Table) {
        self.table.store(Arc::new(table));
        self.version.send_modify(|v| *v += 1);
    }
}

/// Rebuilds and swaps the table of node `node` on every catalog change, until the catalog
/// publisher goes away; `applied` says which catalog version each table was built from.
pub async fn follow(
    mut catalog: Subscriber,
    routes: Arc<Routes>,
    node: String,
    policy: Policy,
    applied: crate::catalog::Applied,
) {
    loop {
        let state = catalog.borrow_and_update().clone();
        if let Some(snapshot) = &state.snapshot {
            let started = Instant::now();
            let previous = routes.load_full();
            routes.store(Table::build_after(
                &previous, snapshot, &node, policy, started,
            ));
            crate::catalog::mark_applied(&applied, &state);
            tracing::debug!(
                services = snapshot.services.len(),
                took_us = started.elapsed().as_micros() as u64,
                "routes rebuilt"
            );
        }
        if catalog.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::file;
    use balance::{Balance, Outlier, gcd};
    use proptest::prelude::*;
    use std::net::SocketAddr;
    use std::path::Path;

    /// The next endpoint in weighted round-robin order.
    fn rr(route: &Route) -> Endpoint {
        route
            .choose(&[], Balance::RoundRobin, &Outlier::default())
            .unwrap()
            .endpoint
    }

    fn snapshot(text: &str) -> Snapshot {
        file::parse(text, Path::new("t.toml")).unwrap()
    }

    const MESH: &str = r#"
[[node]]
name = "a"
address = "127.0.0.2"
[[node]]
name = "b"
address = "127.0.0.3"
inbound_port = 7041
[[service]]
name = "web"
node = "a"
port = 8000
[[service]]
name = "web"
node = "a"
port = 8001
[[service]]
name = "web"
node = "b"
port = 8000
[[service]]
name = "down"
node = "b"
port = 9000
health = "critical"
[[service]]
name = "shaky"
node = "a"
port = 9100
health = "warning"
"#;

    #[test]
    fn outbound_routes_go_to_nodes_inbound_weighted_by_instances() {
        let table = Table::build(&snapshot(MESH), "b", Policy::default());
        let Lookup::Route(route) = table.outbound("web") else {
            panic!("web must be routable")
        };
        let addrs: Vec<String> = route.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.2:5041", "127.0.0.3:7041"]);
        assert_eq!(route.endpoints[0].weight, 2, "node a runs two instances");
        let mut hits = HashMap::new();
        for _ in 0..300 {
            *hits.entry(rr(route).addr).or_insert(0) += 1;
        }
        assert_eq!(hits[&route.endpoints[0].addr], 200);
        assert_eq!(hits[&route.endpoints[1].addr], 100);
    }

    #[test]
    fn inbound_routes_are_this_nodes_instances_only() {
        let table = Table::build(&snapshot(MESH), "a", Policy::default());
        let Lookup::Route(route) = table.inbound("web") else {
            panic!()
        };
        let ports: Vec<u16> = route.endpoints.iter().map(|e| e.addr.port()).collect();
        assert_eq!(ports, [8000, 8001]);
        assert!(matches!(table.inbound("down"), Lookup::Unknown));
    }

    #[test]
    fn unhealthy_and_unknown_services_are_told_apart() {
        let table = Table::build(&snapshot(MESH), "a", Policy::default());
        assert!(matches!(table.outbound("down"), Lookup::NoHealthy));
        assert!(matches!(table.outbound("shaky"), Lookup::NoHealthy));
        assert!(matches!(table.outbound("nope"), Lookup::Unknown));
        let lenient = Table::build(
            &snapshot(MESH),
            "a",
            Policy {
                include_warning: true,
                ..Policy::default()
            },
        );
        assert!(matches!(lenient.outbound("shaky"), Lookup::Route(_)));
    }

    #[test]
    fn a_swap_leaves_loaded_tables_untouched() {
        let routes = Routes::new(Table::build(&snapshot(MESH), "a", Policy::default()));
        let before = routes.load_full();
        assert_eq!(routes.version(), 0);
        routes.store(Table::default());
        assert_eq!(routes.version(), 1);
        assert!(matches!(before.outbound("web"), Lookup::Route(_)));
        assert!(matches!(routes.load().outbound("web"), Lookup::Unknown));
    }

    #[test]
    fn a_local_route_that_left_the_catalog_is_served_during_its_grace_only() {
        let snap = snapshot(MESH);
        let now = Instant::now();
        let before = Table::build(&snap, "a", Policy::default());
        let mut moved = snap.clone();
        moved.services.retain(|s, _| s.as_str() != "web");
        let moved = Arc::new(moved);
        let after = Table::build_after(&before, &moved, "a", Policy::default(), now);
        assert!(
            matches!(after.outbound("web"), Lookup::Unknown),
            "outbound forgets at once"
        );
        let Lookup::Route(route) = after.inbound("web") else {
            panic!("inbound still serves requests already on their way")
        };
        assert_eq!(route.endpoints.len(), 2);
        // Carried over by later rebuilds until the grace ends, then gone.
        let later = Table::build_after(&after, &moved, "a", Policy::default(), now);
        assert!(matches!(later.inbound("web"), Lookup::Route(_)));
        let expired = Table::build_after(
            &later,
            &moved,
            "a",
            Policy::default(),
            now + INBOUND_DRAIN_GRACE,
        );
        assert!(matches!(expired.inbound("web"), Lookup::Unknown));
        // A service that comes back is live again, not retired.
        let back = Table::build_after(&later, &Arc::new(snap), "a", Policy::default(), now);
        assert!(back.retired.is_empty());
    }

    #[test]
    fn a_change_rebuilds_only_the_services_it_touched() {
        let snap = Arc::new(snapshot(MESH));
        let now = Instant::now();
        let first = Table::build_after(&Table::default(), &snap, "a", Policy::default(), now);
        let mut changed = (*snap).clone();
        let down = ServiceName::parse("down").unwrap();
        let mut instances = changed.services[&down].to_vec();
        instances[0].health = crate::catalog::Health::Passing;
        changed.services.insert(down, instances.into());
        let second = Table::build_after(&first, &Arc::new(changed), "a", Policy::default(), now);
        let web = |t: &Table| t.outbound.get("web").unwrap().clone();
        assert!(
            Arc::ptr_eq(&web(&first), &web(&second)),
            "web did not change: same route"
        );
        assert!(
            matches!(second.outbound("down"), Lookup::Route(_)),
            "down was rebuilt"
        );
        assert!(matches!(first.outbound("down"), Lookup::NoHealthy));
        // A node change (here: an inbound port) rebuilds everything.
        let mut moved = (*snap).clone();
        Arc::make_mut(&mut moved.nodes)
            .get_mut("b")
            .unwrap()
            .inbound_port = 9999;
        let third = Table::build_after(&second, &Arc::new(moved), "a", Policy::default(), now);
        assert!(!Arc::ptr_eq(&web(&second), &web(&third)));
        assert_eq!(web(&third).endpoints[1].addr.port(), 9999);
    }

    #[test]
    fn a_service_routable_again_warms_up_for_the_fallback_hold() {
        let snap = snapshot(MESH);
        let policy = Policy {
            fallback_hold: Duration::from_secs(3),
            ..Policy::default()
        };
        let now = Instant::now();
        let first = Table::build(&snap, "a", policy);
        assert!(!first.warming("web"), "routable at start: no warm-up");
        let mut gone = snap.clone();
        gone.services.retain(|s, _| s.as_str() != "web");
        let (gone, snap) = (Arc::new(gone), Arc::new(snap));
        let without = Table::build_after(&first, &gone, "a", policy, now);
        let back = Table::build_after(&without, &snap, "a", policy, now);
        assert!(back.warming("web"));
        assert_eq!(back.warming["web"], now + Duration::from_secs(3));
        let later = Table::build_after(&back, &snap, "a", policy, now + Duration::from_secs(1));
        assert_eq!(
            later.warming["web"],
            now + Duration::from_secs(3),
            "the hold is not restarted"
        );
        let done = Table::build_after(&later, &snap, "a", policy, now + Duration::from_secs(4));
        assert!(done.warming.is_empty());
        let zero = Table::build_after(&without, &snap, "a", Policy::default(), now);
        assert!(!zero.warming("web"));
    }

    proptest! {
        #[test]
        fn weighted_schedule_gives_each_endpoint_its_share(weights in prop::collection::vec(1u32..50, 1..8)) {
            let endpoints: Vec<Endpoint> = weights.iter().enumerate()
                .map(|(i, &w)| Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)), w))
                .collect();
            let route = Route::new(endpoints);
            let total: u32 = weights.iter().sum();
            let gcd = weights.iter().fold(0, |g, &w| gcd(g, w));
            let rounds = (total / gcd) as usize;
            let mut hits = vec![0u32; weights.len()];
            for _ in 0..rounds {
                hits[(rr(&route).addr.port() - 1000) as usize] += 1;
            }
            for (i, &w) in weights.iter().enumerate() {
                prop_assert_eq!(hits[i], w / gcd);
            }
        }
    }
}
