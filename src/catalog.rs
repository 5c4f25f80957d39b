//! The catalog model: nodes, service instances and their health, as one immutable snapshot, and
//! the [`Discovery`] trait every backend implements.
//!
//! A backend owns a task and publishes *whole* snapshots through a [`Publisher`]; the request path
//! never awaits a backend, it only reads the latest route table built from the latest snapshot.

pub mod consul;
pub mod etcd;
pub mod file;
mod follow;

pub use crate::contract::{InvalidServiceName, ServiceName};
pub use follow::{
    CatalogSource, FIRST_CATALOG_TIMEOUT, FirstReadError, first_read, first_snapshot, follow,
    follow_catalog,
};

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The inbound port a node listens on when its catalog entry does not say otherwise.
pub const DEFAULT_INBOUND_PORT: u16 = 5041;

// === NodeName ===

/// The name of a node, shared: every instance on the node holds the same allocation as the
/// node itself (Consul node names are free-form, so there is nothing to validate).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(Arc<str>);

impl NodeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for NodeName {
    fn from(name: &str) -> Self {
        Self(Arc::from(name))
    }
}

impl From<String> for NodeName {
    fn from(name: String) -> Self {
        Self(Arc::from(name))
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::borrow::Borrow<str> for NodeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for NodeName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for NodeName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for NodeName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl serde::Serialize for NodeName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

// === Node, Instance, Health ===

/// Free-form metadata (`platform = "mesos"`), shared: instances registered alike hold one map
/// (see [`Interner`]), instead of one allocation per entry per instance.
pub type Meta = Arc<BTreeMap<String, String>>;

/// An instance's tags, shared like [`Meta`].
pub type Tags = Arc<[String]>;

/// The nodes of a snapshot, by name.
pub type Nodes = BTreeMap<NodeName, Node>;

/// A node of the mesh: a machine that runs an agent (or a Kubernetes worker that runs a bridge).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: NodeName,
    pub address: IpAddr,
    /// The port of this node's inbound proxy (Consul node meta `skyline-inbound-port`).
    pub inbound_port: u16,
    pub meta: Meta,
}

impl Node {
    /// Where other nodes' outbound proxies send requests for this node's instances.
    pub fn inbound_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.inbound_port)
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// One running copy of a service, registered on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub service: ServiceName,
    /// The name of the node this instance is registered on.
    pub node: NodeName,
    /// Where the instance listens; the node's address when the registration gives none.
    pub address: IpAddr,
    pub port: u16,
    pub tags: Tags,
    /// Free-form metadata, such as `platform = "mesos" | "kubernetes"`.
    pub meta: Meta,
    pub health: Health,
    /// Relative share of traffic; 1 unless the registration says otherwise.
    pub weight: u32,
}

impl Instance {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

// === Interner ===

/// Shares equal node names, meta maps and tag lists among the instances a backend builds.
///
/// At 30,000 instances a map such as `{platform = "mesos"}` costs ~600 bytes per instance when
/// each has its own; shared, it costs one pointer. Values no snapshot uses any more are dropped
/// when the interner has doubled since it last looked.
#[derive(Debug)]
pub struct Interner {
    names: HashSet<NodeName>,
    meta: HashSet<Meta>,
    tags: HashSet<Tags>,
    prune_at: usize,
}

impl Default for Interner {
    fn default() -> Self {
        Self {
            names: HashSet::new(),
            meta: HashSet::new(),
            tags: HashSet::new(),
            prune_at: Self::MIN_PRUNE,
        }
    }
}

impl Interner {
    const MIN_PRUNE: usize = 1024;

    pub fn node(&mut self, name: &str) -> NodeName {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        let shared = NodeName::from(name);
        self.names.insert(shared.clone());
        self.grew();
        shared
    }

    pub fn meta(&mut self, meta: BTreeMap<String, String>) -> Meta {
        if let Some(shared) = self.meta.get(&meta) {
            return shared.clone();
        }
        let shared = Arc::new(meta);
        self.meta.insert(shared.clone());
        self.grew();
        shared
    }

    pub fn tags(&mut self, tags: Vec<String>) -> Tags {
        if let Some(shared) = self.tags.get(tags.as_slice()) {
            return shared.clone();
        }
        let shared: Tags = Arc::from(tags);
        self.tags.insert(shared.clone());
        self.grew();
        shared
    }

    fn len(&self) -> usize {
        self.names.len() + self.meta.len() + self.tags.len()
    }

    /// Forgets the values only the interner still holds, once it has doubled in size.
    fn grew(&mut self) {
        if self.len() < self.prune_at {
            return;
        }
        self.names.retain(|n| Arc::strong_count(&n.0) > 1);
        self.meta.retain(|m| Arc::strong_count(m) > 1);
        self.tags.retain(|t| Arc::strong_count(t) > 1);
        self.prune_at = (self.len() * 2).max(Self::MIN_PRUNE);
    }
}

// === Snapshot ===

/// The whole catalog at one moment. Immutable once built; shared behind an `Arc`.
///
/// Successive snapshots share what did not change: the node map, and each service's instance
/// list, are behind an `Arc` that a backend carries over from the previous snapshot. Cloning a
/// snapshot copies pointers, and comparing two is a pointer check per service before any deep
/// comparison, so one change costs O(services), not O(instances).
#[derive(Clone, Debug, Default, Eq)]
pub struct Snapshot {
    pub nodes: Arc<Nodes>,
    /// Every instance, grouped by service, in a stable order.
    pub services: BTreeMap<ServiceName, Arc<[Instance]>>,
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        same_nodes(&self.nodes, &other.nodes)
            && self.services.len() == other.services.len()
            && self
                .services
                .iter()
                .zip(&other.services)
                .all(|((a, x), (b, y))| a == b && same_instances(x, y))
    }
}

/// Whether two instance lists are equal: the same allocation, or equal element by element.
pub fn same_instances(a: &Arc<[Instance]>, b: &Arc<[Instance]>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// Whether two node maps are equal: the same allocation, or equal entry by entry.
pub fn same_nodes(a: &Arc<Nodes>, b: &Arc<Nodes>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

impl Snapshot {
    pub fn instance_count(&self) -> usize {
        self.services.values().map(|i| i.len()).sum()
    }

    /// Takes over `previous`'s allocation for the node map and for every service whose
    /// instances are equal, so that consumers see unchanged parts as the same pointers.
    /// Returns whether anything differs from `previous`.
    pub fn reuse_unchanged(&mut self, previous: &Snapshot) -> bool {
        let mut changed = self.services.len() != previous.services.len();
        if same_nodes(&self.nodes, &previous.nodes) {
            self.nodes = previous.nodes.clone();
        } else {
            changed = true;
        }
        for (service, instances) in &mut self.services {
            match previous.services.get(service) {
                Some(was) if same_instances(was, instances) => *instances = was.clone(),
                _ => changed = true,
            }
        }
        changed
    }
}

// === Backoff ===

/// Exponential backoff with jitter, for a backend that cannot reach its source: each delay is
/// the current step less up to half of it at random; steps double from `start` up to `max`.
#[derive(Debug)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(start: Duration, max: Duration) -> Self {
        Self {
            start,
            max,
            next: start,
        }
    }

    pub fn reset(&mut self) {
        self.next = self.start;
    }

    pub fn delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        let jitter = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(fastrand::u64(0..=jitter))
    }
}

// === Discovery ===

/// A source of catalog snapshots: the file, the embedded registry, Consul, etcd.
///
/// `run` publishes a first snapshot as soon as it has one, then one per change, until `shutdown`
/// is cancelled. On errors it keeps the last good snapshot in force and reports through
/// [`Publisher::fail`]; it never publishes a partial catalog.
pub trait Discovery: Send + 'static {
    /// A short name for logs and `/readyz`, such as `file:/etc/skyline/catalog.toml`.
    fn describe(&self) -> String;

    fn run(
        self,
        publisher: Publisher,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send;
}

/// What subscribers see: the last good snapshot and how the source is doing.
#[derive(Clone, Debug)]
pub struct CatalogState {
    /// `None` until the source produced its first good snapshot.
    pub snapshot: Option<Arc<Snapshot>>,
    /// When the last good snapshot was published.
    pub updated: Option<Instant>,
    pub updated_wall: Option<SystemTime>,
    /// The last error, cleared by the next good snapshot.
    pub error: Option<String>,
    /// Whether that error is the source refusing this reader (Consul's 401 or 403: a missing
    /// or wrong token), which waiting does not mend, rather than the source being unreachable.
    pub refused: bool,
    /// The catalog version the snapshot reflects, when the source numbers its states: the
    /// highest `X-Consul-Index` of the registry answers it was built from (the in-process
    /// registry computes the same from its state), or the etcd revision the snapshot
    /// reflects. `None` for a file: a file has no version shared between proxies.
    pub version: Option<u64>,
}

/// What a role applied last: the catalog version its route table was built from (see
/// [`CatalogState::version`]) and when (unix ms). `None` until the first table.
pub type Applied = watch::Sender<Option<AppliedVersion>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppliedVersion {
    pub version: Option<u64>,
    /// When the table built from `version` went into force, in unix milliseconds.
    pub at_ms: u64,
}

/// Records that a table built from `state` is in force, when its version differs from the last.
pub fn mark_applied(applied: &Applied, state: &CatalogState) {
    applied.send_if_modified(|last| {
        if last.is_some_and(|l| l.version == state.version) {
            return false;
        }
        *last = Some(AppliedVersion {
            version: state.version,
            at_ms: unix_ms(SystemTime::now()),
        });
        true
    });
}

/// `t` in milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The sending side, handed to a [`Discovery`] backend.
#[derive(Clone, Debug)]
pub struct Publisher {
    tx: watch::Sender<CatalogState>,
}

/// The receiving side: clone freely, one per consumer.
pub type Subscriber = watch::Receiver<CatalogState>;

/// A publisher and its first subscriber, with no snapshot yet.
pub fn channel() -> (Publisher, Subscriber) {
    let (tx, rx) = watch::channel(CatalogState {
        snapshot: None,
        updated: None,
        updated_wall: None,
        error: None,
        refused: false,
        version: None,
    });
    (Publisher { tx }, rx)
}

impl Publisher {
    /// Publishes a new snapshot, unless it equals the one in force (no spurious wake-ups).
    ///
    /// A snapshot handed over whole (not yet shared) first takes over the previous snapshot's
    /// allocations for what did not change (see [`Snapshot::reuse_unchanged`]), so routing
    /// finds unchanged services by pointer whichever backend built it.
    pub fn publish(&self, snapshot: impl Into<Arc<Snapshot>>) {
        self.publish_at(snapshot, None);
    }

    /// [`Publisher::publish`] of the snapshot of catalog version `version` (see
    /// [`CatalogState::version`]). A newer version of an equal snapshot is recorded (and wakes
    /// subscribers): the table built from the old one stands for the new one too.
    pub fn publish_at(&self, snapshot: impl Into<Arc<Snapshot>>, version: Option<u64>) {
        let mut snapshot = snapshot.into();
        self.tx.send_if_modified(|state| {
            let same = match &state.snapshot {
                None => false,
                Some(old) if Arc::ptr_eq(old, &snapshot) => true,
                Some(old) => match Arc::get_mut(&mut snapshot) {
                    Some(fresh) => !fresh.reuse_unchanged(old),
                    None => **old == *snapshot,
                },
            };
            let had_error = state.error.take().is_some();
            state.refused = false;
            let moved = version.is_some() && state.version != version;
            if moved {
                state.version = version;
            }
            if !same {
                state.snapshot = Some(snapshot);
                state.updated = Some(Instant::now());
                state.updated_wall = Some(SystemTime::now());
            }
            !same || had_error || moved
        });
    }

    /// Records a failure; the last good snapshot stays in force.
    pub fn fail(&self, error: impl fmt::Display) {
        self.failed(error.to_string(), false);
    }

    /// Records that the source refused this reader (see [`CatalogState::refused`]); the last
    /// good snapshot stays in force.
    pub fn refuse(&self, error: impl fmt::Display) {
        self.failed(error.to_string(), true);
    }

    fn failed(&self, error: String, refused: bool) {
        self.tx.send_if_modified(|state| {
            let changed =
                state.error.as_deref() != Some(error.as_str()) || state.refused != refused;
            state.error = Some(error);
            state.refused = refused;
            changed
        });
    }

    pub fn subscribe(&self) -> Subscriber {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_names_of_the_contract() {
        for ok in [
            "a",
            "giphy",
            "my-svc.v2",
            "a_b",
            "0",
            "x".repeat(63).as_str(),
        ] {
            assert!(ServiceName::is_valid(ok), "{ok:?}");
        }
    }

    #[test]
    fn refuses_names_outside_the_contract() {
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a/b",
            "a%20",
            "a b",
            ".a",
            "x".repeat(64).as_str(),
            "é",
        ] {
            assert!(!ServiceName::is_valid(bad), "{bad:?}");
        }
    }

    fn instance(service: &str, node: &str, port: u16, interner: &mut Interner) -> Instance {
        Instance {
            id: format!("{service}-{port}"),
            service: ServiceName::parse(service).unwrap(),
            node: interner.node(node),
            address: IpAddr::from([10, 0, 0, 1]),
            port,
            tags: interner.tags(Vec::new()),
            meta: interner.meta(BTreeMap::from([("platform".into(), "mesos".into())])),
            health: Health::Passing,
            weight: 1,
        }
    }

    /// A snapshot built from scratch, as a backend without memory of the last one would.
    fn fresh(web_port: u16) -> Snapshot {
        let mut interner = Interner::default();
        let mut services = BTreeMap::new();
        for (name, port) in [("web", web_port), ("db", 5432)] {
            let list: Arc<[Instance]> = Arc::new([instance(name, "n1", port, &mut interner)]);
            services.insert(ServiceName::parse(name).unwrap(), list);
        }
        let node = Node {
            name: interner.node("n1"),
            address: IpAddr::from([10, 0, 0, 1]),
            inbound_port: DEFAULT_INBOUND_PORT,
            meta: Meta::default(),
        };
        Snapshot {
            nodes: Arc::new(Nodes::from([(node.name.clone(), node)])),
            services,
        }
    }

    #[tokio::test]
    async fn publishing_an_equal_snapshot_wakes_no_subscriber() {
        let (publisher, mut rx) = channel();
        publisher.publish(fresh(80));
        assert!(rx.has_changed().unwrap());
        let first = rx.borrow_and_update().snapshot.clone().unwrap();
        publisher.publish(fresh(80));
        assert!(!rx.has_changed().unwrap(), "equal snapshot: no wake-up");
        publisher.publish(first.clone());
        assert!(!rx.has_changed().unwrap(), "same snapshot: no wake-up");
        assert!(Arc::ptr_eq(&first, rx.borrow().snapshot.as_ref().unwrap()));
    }

    #[tokio::test]
    async fn a_published_snapshot_takes_over_the_unchanged_services_of_the_last() {
        let (publisher, mut rx) = channel();
        publisher.publish(fresh(80));
        let first = rx.borrow_and_update().snapshot.clone().unwrap();
        publisher.publish(fresh(81));
        assert!(rx.has_changed().unwrap());
        let second = rx.borrow_and_update().snapshot.clone().unwrap();
        assert!(Arc::ptr_eq(&first.services["db"], &second.services["db"]));
        assert!(Arc::ptr_eq(&first.nodes, &second.nodes));
        assert!(!Arc::ptr_eq(
            &first.services["web"],
            &second.services["web"]
        ));
        assert_eq!(second.services["web"][0].port, 81);
    }

    #[test]
    fn snapshots_compare_by_content_whatever_their_sharing() {
        let (a, b) = (fresh(80), fresh(80));
        assert!(!Arc::ptr_eq(&a.services["web"], &b.services["web"]));
        assert_eq!(a, b);
        assert_ne!(a, fresh(81));
        let mut fewer = fresh(80);
        fewer.services.remove("db");
        assert_ne!(a, fewer);
        assert_ne!(fewer, a);
    }

    #[test]
    fn the_interner_shares_equal_values() {
        let mut interner = Interner::default();
        let a = instance("web", "n1", 80, &mut interner);
        let b = instance("db", "n1", 81, &mut interner);
        assert!(Arc::ptr_eq(&a.meta, &b.meta));
        assert!(Arc::ptr_eq(&a.tags, &b.tags));
        assert_eq!(a.node.as_str().as_ptr(), b.node.as_str().as_ptr());
        let other = interner.meta(BTreeMap::from([("platform".into(), "k8s".into())]));
        assert!(!Arc::ptr_eq(&a.meta, &other));
    }

    #[test]
    fn the_interner_forgets_values_nobody_holds() {
        let mut interner = Interner::default();
        let kept = interner.node("kept");
        for n in 0..10 * Interner::MIN_PRUNE {
            interner.node(&format!("gone-{n}"));
        }
        assert!(
            interner.len() < 2 * Interner::MIN_PRUNE,
            "{}",
            interner.len()
        );
        assert_eq!(
            interner.node("kept").as_str().as_ptr(),
            kept.as_str().as_ptr()
        );
    }

    proptest! {
        #[test]
        fn is_valid_matches_the_contract_regex(name in "[a-zA-Z0-9._/%-]{0,70}") {
            let b = name.as_bytes();
            let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
            let expected = !b.is_empty() && b.len() <= 63 && edge(&b[0]) && edge(&b[b.len() - 1])
                && b.iter().all(|c| edge(c) || b"._-".contains(c));
            prop_assert_eq!(ServiceName::is_valid(&name), expected);
        }
    }
}
