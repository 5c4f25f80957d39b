//! The catalog model: nodes, service instances and their health, as one immutable snapshot, and
//! the [`Discovery`] trait every backend implements.
//!
//! A backend owns a task and publishes *whole* snapshots through a [`Publisher`]; the request path
//! never awaits a backend, it only reads the latest route table built from the latest snapshot.

pub mod consul;
pub mod etcd;
pub mod file;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The inbound port a node listens on when its catalog entry does not say otherwise.
pub const DEFAULT_INBOUND_PORT: u16 = 5041;

// === ServiceName ===

/// A validated service name: `[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName(Arc<str>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid service name {0:?}: expected 1-63 of [a-z0-9._-], starting and ending with [a-z0-9]"
)]
pub struct InvalidServiceName(pub String);

impl ServiceName {
    /// Checks `name` against the contract's pattern without allocating.
    pub fn is_valid(name: &str) -> bool {
        let b = name.as_bytes();
        let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let inner = |c: u8| edge(c) || matches!(c, b'.' | b'_' | b'-');
        match b {
            [] => false,
            [only] => edge(*only),
            [first, middle @ .., last] => {
                b.len() <= 63 && edge(*first) && edge(*last) && middle.iter().all(|&c| inner(c))
            }
        }
    }

    pub fn parse(name: &str) -> Result<Self, InvalidServiceName> {
        if Self::is_valid(name) {
            Ok(Self(Arc::from(name)))
        } else {
            Err(InvalidServiceName(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::borrow::Borrow<str> for ServiceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for ServiceName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl std::str::FromStr for ServiceName {
    type Err = InvalidServiceName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// === Node, Instance, Health ===

/// A node of the mesh: a machine that runs an agent (or a Kubernetes worker that runs a bridge).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub address: IpAddr,
    /// The port of this node's inbound proxy (Consul node meta `skyline-inbound-port`).
    pub inbound_port: u16,
    pub meta: BTreeMap<String, String>,
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
    pub node: String,
    /// Where the instance listens; the node's address when the registration gives none.
    pub address: IpAddr,
    pub port: u16,
    pub tags: Vec<String>,
    /// Free-form metadata, such as `platform = "mesos" | "kubernetes"`.
    pub meta: BTreeMap<String, String>,
    pub health: Health,
    /// Relative share of traffic; 1 unless the registration says otherwise.
    pub weight: u32,
}

impl Instance {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

// === Snapshot ===

/// The whole catalog at one moment. Immutable once built; shared behind an `Arc`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub nodes: BTreeMap<String, Node>,
    /// Every instance, grouped by service, in a stable order.
    pub services: BTreeMap<ServiceName, Vec<Instance>>,
}

impl Snapshot {
    pub fn instance_count(&self) -> usize {
        self.services.values().map(Vec::len).sum()
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
    });
    (Publisher { tx }, rx)
}

impl Publisher {
    /// Publishes a new snapshot, unless it equals the one in force (no spurious wake-ups).
    pub fn publish(&self, snapshot: Snapshot) {
        self.tx.send_if_modified(|state| {
            let same = state.snapshot.as_deref() == Some(&snapshot);
            let had_error = state.error.take().is_some();
            if !same {
                state.snapshot = Some(Arc::new(snapshot));
                state.updated = Some(Instant::now());
                state.updated_wall = Some(SystemTime::now());
            }
            !same || had_error
        });
    }

    /// Records a failure; the last good snapshot stays in force.
    pub fn fail(&self, error: impl fmt::Display) {
        let error = error.to_string();
        self.tx.send_if_modified(|state| {
            let changed = state.error.as_deref() != Some(error.as_str());
            state.error = Some(error);
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
