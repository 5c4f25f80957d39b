//! The etcd v3 backend: the catalog as keys under a prefix, each bound to its agent's lease,
//! listed once and then watched by prefix.
//!
//! ```text
//! skyline/nodes/<node>                → {"address","inbound_port","meta"}
//! skyline/instances/<service>/<id>    → {"node","address","port","tags","meta","health","weight"}
//! ```
//!
//! [`EtcdDiscovery`] reads the whole prefix (`Get`), publishes it as one snapshot, then watches
//! the prefix from the listed revision + 1. Each watch answer carries whole revisions; its
//! events are applied to an in-memory copy and published after at most [`COALESCE`], so a burst
//! of changes costs one snapshot and no snapshot is ever half a batch. When the stream breaks it
//! resumes at the last seen revision + 1, so no event is missed; if that revision was compacted
//! the watch is cancelled with a `compact_revision` and the backend lists the prefix again.
//! Each snapshot carries the revision it reflects as its catalog version (the listed revision,
//! then the last event's, or a progress notification's), which `skyline status` compares.
//! While etcd is unreachable the last good snapshot stays in force, [`Publisher::fail`] says
//! why, and retries back off with jitter from [`BACKOFF_START`] to [`BACKOFF_MAX`].
//!
//! The watch runs on one member at a time ([`client::Client::pick`]: one that answers and has a
//! leader). When its stream breaks, the next session picks again starting from the next member,
//! so with one member of three down the catalog is never reported unreachable. A failover may
//! take an election (no member has a leader for a second or two): for [`FAILOVER_GRACE`] after
//! a working watch broke, failures are retried quietly before they are reported.
//!
//! An instance whose node key is missing is not routable: it is left out of the snapshot.
//! [`register::EtcdRegistrar`] writes the keys of one node and keeps its lease alive.

pub mod client;
pub mod register;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use client::Client;
use client::mvccpb::event::EventType;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Backoff, DEFAULT_INBOUND_PORT, Discovery, Health, Instance, Interner, Meta, Node, NodeName,
    Nodes, Publisher, ServiceName, Snapshot, Tags,
};

/// The key prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "skyline/";
/// The etcd client URL when none is configured.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
/// How long changes are gathered before one snapshot is published.
pub const COALESCE: Duration = Duration::from_millis(5);
/// The first delay after an error.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest delay between retries after errors.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long after a working watch broke failures are retried before the catalog is reported
/// unreachable: longer than an etcd leader election (1-2 s with etcd's default timeouts).
pub const FAILOVER_GRACE: Duration = Duration::from_secs(5);
/// The longest wait for one call to etcd (connect, get, put, grant, watch creation).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where to find etcd and under which prefix the catalog lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdDiscovery {
    /// Client URLs of the cluster's members, such as `http://10.0.0.5:2379`.
    pub endpoints: Vec<String>,
    /// The key prefix, ending with `/`; default `skyline/`.
    pub prefix: String,
}

impl EtcdDiscovery {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd call {call} failed")]
    Call {
        call: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("no etcd endpoint configured")]
    NoEndpoints,
    #[error("invalid etcd endpoint {url}")]
    Endpoint {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the etcd member has no leader")]
    NoLeader,
    #[error("etcd call {call} did not answer within {CALL_TIMEOUT:?}")]
    Timeout { call: &'static str },
    #[error("the watch stream ended")]
    WatchClosed,
    #[error("the watch was cancelled: {reason}")]
    WatchCancelled { reason: String },
    #[error("the watch start revision was compacted (compact revision {revision})")]
    Compacted { revision: i64 },
    #[error("an answer from etcd had no header")]
    NoHeader,
    #[error("lease {lease:x} was lost")]
    LeaseLost { lease: i64 },
    #[error("cannot encode the value of {key}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

// === Keys and values ===

/// The key layout under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// What a key under the prefix names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Node(String),
    Instance(ServiceName, String),
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn node(&self, name: &str) -> String {
        format!("{}nodes/{name}", self.prefix)
    }

    pub fn instance(&self, service: &ServiceName, id: &str) -> String {
        format!("{}instances/{service}/{id}", self.prefix)
    }

    /// Names a key; `None` for keys outside the layout (left alone).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        if let Some(node) = rest.strip_prefix("nodes/") {
            return (!node.is_empty()).then(|| Key::Node(node.to_owned()));
        }
        let (service, id) = rest.strip_prefix("instances/")?.split_once('/')?;
        let service = ServiceName::parse(service).ok()?;
        (!id.is_empty()).then(|| Key::Instance(service, id.to_owned()))
    }
}

/// The value of `<prefix>nodes/<node>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeValue {
    pub address: IpAddr,
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

/// The value of `<prefix>instances/<service>/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceValue {
    pub node: String,
    /// Where the instance listens; the node's address when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default = "passing")]
    pub health: Health,
    #[serde(default = "one")]
    pub weight: u32,
}

fn default_inbound_port() -> u16 {
    DEFAULT_INBOUND_PORT
}

fn passing() -> Health {
    Health::Passing
}

fn one() -> u32 {
    1
}

impl NodeValue {
    pub fn of(node: &Node) -> Self {
        Self {
            address: node.address,
            inbound_port: node.inbound_port,
            meta: (*node.meta).clone(),
        }
    }
}

impl InstanceValue {
    pub fn of(instance: &Instance, node: &str) -> Self {
        Self {
            node: node.to_owned(),
            address: Some(instance.address),
            port: instance.port,
            tags: instance.tags.to_vec(),
            meta: (*instance.meta).clone(),
            health: instance.health,
            weight: instance.weight,
        }
    }
}

// === Catalog: the in-memory copy of the prefix ===

/// The catalog as last read from etcd, and the revision it reflects.
///
/// It keeps each value once, with shared strings, and the instance lists of the last snapshot:
/// [`Catalog::snapshot`] rebuilds only the services whose keys changed since (every service when
/// a node changed) and hands the others over as the same `Arc`s.
#[derive(Debug, Default)]
pub struct Catalog {
    nodes: Arc<Nodes>,
    instances: BTreeMap<ServiceName, BTreeMap<String, Stored>>,
    /// The instance lists of the last snapshot.
    built: BTreeMap<ServiceName, Arc<[Instance]>>,
    /// Services whose keys changed since the last snapshot.
    dirty: BTreeSet<ServiceName>,
    /// Whether a node changed since the last snapshot.
    nodes_dirty: bool,
    interner: Interner,
    /// The etcd revision this copy includes every change up to.
    pub revision: i64,
}

/// An instance value as kept between snapshots: [`InstanceValue`] with shared strings.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stored {
    node: NodeName,
    address: Option<IpAddr>,
    port: u16,
    tags: Tags,
    meta: Meta,
    health: Health,
    weight: u32,
}

impl Catalog {
    /// The catalog version of this copy ([`super::CatalogState::version`]): its revision.
    pub fn version(&self) -> Option<u64> {
        u64::try_from(self.revision).ok().filter(|r| *r > 0)
    }

    /// An empty catalog at `revision` that will reuse `previous`'s instance lists and shared
    /// strings for whatever the next listing finds unchanged.
    fn relist(previous: &mut Catalog, revision: i64) -> Self {
        Self {
            built: std::mem::take(&mut previous.built),
            interner: std::mem::take(&mut previous.interner),
            nodes_dirty: true,
            revision,
            ..Self::default()
        }
    }

    /// Applies a put; `true` if the catalog changed. Bad values are logged and read as absent.
    pub fn put(&mut self, keys: &Keys, key: &[u8], value: &[u8]) -> bool {
        match keys.parse(key) {
            None => false,
            Some(Key::Node(name)) => match serde_json::from_slice::<NodeValue>(value) {
                Ok(v) => {
                    let name = self.interner.node(&name);
                    let node = Node {
                        name: name.clone(),
                        address: v.address,
                        inbound_port: v.inbound_port,
                        meta: self.interner.meta(v.meta),
                    };
                    if self.nodes.get(&name) == Some(&node) {
                        return false;
                    }
                    Arc::make_mut(&mut self.nodes).insert(name, node);
                    self.nodes_dirty = true;
                    true
                }
                Err(error) => {
                    tracing::warn!(key = %String::from_utf8_lossy(key), %error, "node value ignored");
                    self.remove_node(&name)
                }
            },
            Some(Key::Instance(service, id)) => {
                match serde_json::from_slice::<InstanceValue>(value) {
                    Ok(v) => {
                        let stored = Stored {
                            node: self.interner.node(&v.node),
                            address: v.address,
                            port: v.port,
                            tags: self.interner.tags(v.tags),
                            meta: self.interner.meta(v.meta),
                            health: v.health,
                            weight: v.weight,
                        };
                        let map = self.instances.entry(service.clone()).or_default();
                        let changed = map.insert(id, stored.clone()) != Some(stored);
                        if changed {
                            self.dirty.insert(service);
                        }
                        changed
                    }
                    Err(error) => {
                        tracing::warn!(key = %String::from_utf8_lossy(key), %error, "instance value ignored");
                        self.remove_instance(&service, &id)
                    }
                }
            }
        }
    }

    /// Applies a delete; `true` if the catalog changed.
    pub fn delete(&mut self, keys: &Keys, key: &[u8]) -> bool {
        match keys.parse(key) {
            None => false,
            Some(Key::Node(name)) => self.remove_node(&name),
            Some(Key::Instance(service, id)) => self.remove_instance(&service, &id),
        }
    }

    fn remove_node(&mut self, name: &str) -> bool {
        if !self.nodes.contains_key(name) {
            return false;
        }
        Arc::make_mut(&mut self.nodes).remove(name);
        self.nodes_dirty = true;
        true
    }

    fn remove_instance(&mut self, service: &ServiceName, id: &str) -> bool {
        let Some(map) = self.instances.get_mut(service) else {
            return false;
        };
        let removed = map.remove(id).is_some();
        if map.is_empty() {
            self.instances.remove(service);
        }
        if removed {
            self.dirty.insert(service.clone());
        }
        removed
    }

    /// The whole catalog as a snapshot; instances on unknown nodes are left out.
    pub fn snapshot(&mut self) -> Snapshot {
        let dirty = std::mem::take(&mut self.dirty);
        let rebuild: Vec<ServiceName> = if std::mem::take(&mut self.nodes_dirty) {
            let all: BTreeSet<&ServiceName> =
                self.instances.keys().chain(self.built.keys()).collect();
            all.into_iter().cloned().collect()
        } else {
            dirty.into_iter().collect()
        };
        for service in rebuild {
            let fresh = self.instances_of(&service);
            if fresh.is_empty() {
                self.built.remove(&service);
            } else if self.built.get(&service).is_none_or(|was| **was != *fresh) {
                self.built.insert(service, fresh.into());
            }
        }
        Snapshot {
            nodes: self.nodes.clone(),
            services: self.built.clone(),
        }
    }

    /// The instances of `service` whose node is known, by id.
    fn instances_of(&self, service: &ServiceName) -> Vec<Instance> {
        let Some(map) = self.instances.get(service) else {
            return Vec::new();
        };
        map.iter()
            .filter_map(|(id, v)| {
                let node = self.nodes.get(&v.node)?;
                Some(Instance {
                    id: id.clone(),
                    service: service.clone(),
                    node: node.name.clone(),
                    address: v.address.unwrap_or(node.address),
                    port: v.port,
                    tags: v.tags.clone(),
                    meta: v.meta.clone(),
                    health: v.health,
                    weight: v.weight.max(1),
                })
            })
            .collect()
    }
}

// === Discovery ===

impl Discovery for EtcdDiscovery {
    fn describe(&self) -> String {
        format!("etcd:{}", self.endpoints.join(","))
    }

    async fn run(self, publisher: Publisher, shutdown: CancellationToken) {
        let client = match Client::new(&self.endpoints) {
            Ok(client) => client,
            Err(error) => {
                // A configuration error: nothing to retry.
                tracing::error!(error = %crate::error_chain(&error), "etcd catalog not started");
                publisher.fail(format!(
                    "{}: {}",
                    self.describe(),
                    crate::error_chain(&error)
                ));
                return;
            }
        };
        let mut watcher = Watcher {
            keys: Keys::new(&self.prefix),
            client,
            config: self,
            catalog: Catalog::default(),
            need_list: true,
            established: false,
        };
        let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
        // Until when failures are retried without being reported (after a working watch broke).
        let mut grace: Option<Instant> = None;
        loop {
            watcher.established = false;
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                r = watcher.session(&publisher) => r,
            };
            let Err(error) = result;
            if let EtcdError::Compacted { revision } = error {
                tracing::info!(
                    revision,
                    "watch revision compacted; listing the catalog again"
                );
                continue;
            }
            let error = crate::error_chain(&error);
            if watcher.established {
                // A stream that worked broke (member killed, leader lost): resume at once, from
                // the next member on.
                tracing::info!(%error, endpoint = %watcher.client.endpoint(), revision = watcher.catalog.revision, "etcd watch interrupted; resuming");
                watcher.client.next_member();
                backoff.reset();
                grace = Some(Instant::now() + FAILOVER_GRACE);
                continue;
            }
            let delay = if grace.is_some_and(|until| Instant::now() < until) {
                tracing::info!(%error, "etcd failover under way; retrying");
                BACKOFF_START
            } else {
                grace = None;
                tracing::warn!(%error, "etcd unreachable; keeping the last good catalog");
                publisher.fail(format!("{}: {error}", watcher.config.describe()));
                backoff.delay()
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

struct Watcher {
    config: EtcdDiscovery,
    client: Client,
    keys: Keys,
    catalog: Catalog,
    /// Set at start and after a compaction: the next session lists before watching.
    need_list: bool,
    /// Whether the current session got as far as a live watch.
    established: bool,
}

impl Watcher {
    /// Lists if needed, then watches until the stream fails. Never returns `Ok`.
    async fn session(&mut self, publisher: &Publisher) -> Result<Infallible, EtcdError> {
        // A member that answers and has a leader: never a dead one to watch from.
        self.client.pick().await?;
        let mut listed = false;
        if self.need_list {
            let answer = self.client.range(self.keys.prefix(), true).await?;
            let revision = answer.header.ok_or(EtcdError::NoHeader)?.revision;
            let mut fresh = Catalog::relist(&mut self.catalog, revision);
            for kv in answer.kvs {
                fresh.put(&self.keys, &kv.key, &kv.value);
            }
            tracing::debug!(
                revision,
                instances = fresh.instances.values().map(BTreeMap::len).sum::<usize>(),
                "etcd catalog listed"
            );
            self.catalog = fresh;
            self.need_list = false;
            publisher.publish_at(self.catalog.snapshot(), self.catalog.version());
            listed = true;
        }

        let mut stream = self
            .client
            .watch(self.keys.prefix(), self.catalog.revision + 1)
            .await?;
        let mut pending: Option<Instant> = None;
        let mut created = false;
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                () = sleep_until(pending) => {
                    publisher.publish_at(self.catalog.snapshot(), self.catalog.version());
                    pending = None;
                    continue;
                }
                () = tokio::time::sleep(CALL_TIMEOUT), if !created => {
                    return Err(EtcdError::Timeout { call: "watch" });
                }
            };
            let message = message?.ok_or(EtcdError::WatchClosed)?;
            if message.canceled {
                if message.compact_revision > 0 {
                    self.need_list = true;
                    return Err(EtcdError::Compacted {
                        revision: message.compact_revision,
                    });
                }
                // Listing again is the safe answer to any cancellation we did not ask for.
                self.need_list = true;
                return Err(EtcdError::WatchCancelled {
                    reason: message.cancel_reason,
                });
            }
            if message.created && !created {
                created = true;
                self.established = true;
                // A resumed session: republish in case a batch was held or an error shown.
                if !listed {
                    pending.get_or_insert_with(Instant::now);
                }
            }
            if message.events.is_empty() {
                if !message.created {
                    // A progress notification: everything up to its revision was sent.
                    if let Some(header) = &message.header
                        && header.revision > self.catalog.revision
                    {
                        self.catalog.revision = header.revision;
                        // The table stands for the newer revision: say so (version only).
                        pending.get_or_insert_with(|| Instant::now() + COALESCE);
                    }
                }
                continue;
            }
            for event in &message.events {
                let Some(kv) = &event.kv else { continue };
                match event.r#type() {
                    EventType::Put => self.catalog.put(&self.keys, &kv.key, &kv.value),
                    EventType::Delete => self.catalog.delete(&self.keys, &kv.key),
                };
                self.catalog.revision = self.catalog.revision.max(kv.mod_revision);
            }
            // Even a batch of keys the catalog ignores moves the version the table stands for
            // (`skyline status` compares it with the last change under the prefix); a snapshot
            // equal to the last one only moves the version (see `Publisher::publish_at`).
            pending.get_or_insert_with(|| Instant::now() + COALESCE);
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(DEFAULT_PREFIX)
    }

    #[test]
    fn keys_name_nodes_and_instances_and_ignore_the_rest() {
        let k = keys();
        let web = ServiceName::parse("web").unwrap();
        assert_eq!(k.node("n1"), "skyline/nodes/n1");
        assert_eq!(k.instance(&web, "web/1"), "skyline/instances/web/web/1");
        assert_eq!(k.parse(b"skyline/nodes/n1"), Some(Key::Node("n1".into())));
        assert_eq!(
            k.parse(b"skyline/instances/web/web/1"),
            Some(Key::Instance(web, "web/1".into()))
        );
        for other in [
            &b"skyline/routes/web"[..],
            b"skyline/nodes/",
            b"skyline/instances/web",
            b"skyline/instances/web/",
            b"skyline/instances/Web/1",
            b"other/nodes/n1",
            b"\xff",
        ] {
            assert_eq!(k.parse(other), None, "{}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn instances_without_their_node_are_left_out_until_it_appears() {
        let k = keys();
        let mut c = Catalog::default();
        assert!(c.put(
            &k,
            b"skyline/instances/web/w1",
            br#"{"node":"n1","port":8080,"health":"warning"}"#
        ));
        assert!(c.snapshot().services.is_empty());
        assert!(c.put(
            &k,
            b"skyline/nodes/n1",
            br#"{"address":"10.0.0.1","inbound_port":6041}"#
        ));
        let s = c.snapshot();
        let i = &s.services["web"][0];
        assert_eq!(i.address, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((i.port, i.health, i.weight), (8080, Health::Warning, 1));
        assert_eq!(s.nodes["n1"].inbound_port, 6041);
        assert!(c.delete(&k, b"skyline/nodes/n1"));
        assert!(c.snapshot().services.is_empty());
        assert!(!c.delete(&k, b"skyline/nodes/n1"), "already gone");
    }

    #[test]
    fn an_unchanged_put_is_not_a_change_and_a_bad_value_reads_as_absent() {
        let k = keys();
        let mut c = Catalog::default();
        let v = br#"{"node":"n1","port":1}"#;
        assert!(c.put(&k, b"skyline/instances/web/w1", v));
        assert!(!c.put(&k, b"skyline/instances/web/w1", v));
        assert!(c.put(&k, b"skyline/instances/web/w1", b"not json"));
        assert!(c.instances.is_empty());
        assert!(!c.put(&k, b"unrelated", v));
    }

    /// Node n1 with instances web/w1 (port 1) and db/d1 (port 2).
    fn web_and_db_on_n1() -> (Keys, Catalog) {
        let k = keys();
        let mut c = Catalog::default();
        c.put(&k, b"skyline/nodes/n1", br#"{"address":"10.0.0.1"}"#);
        c.put(
            &k,
            b"skyline/instances/web/w1",
            br#"{"node":"n1","port":1}"#,
        );
        c.put(&k, b"skyline/instances/db/d1", br#"{"node":"n1","port":2}"#);
        (k, c)
    }

    #[test]
    fn an_update_keeps_the_instances_of_every_service_it_did_not_touch() {
        let (k, mut c) = web_and_db_on_n1();
        let first = c.snapshot();
        c.put(
            &k,
            b"skyline/instances/web/w1",
            br#"{"node":"n1","port":3}"#,
        );
        let second = c.snapshot();
        assert!(Arc::ptr_eq(&first.services["db"], &second.services["db"]));
        assert!(Arc::ptr_eq(&first.nodes, &second.nodes));
        assert!(!Arc::ptr_eq(
            &first.services["web"],
            &second.services["web"]
        ));
        assert_eq!(second.services["web"][0].port, 3);

        // A new node rebuilds every service, yet the unchanged ones keep their allocation.
        c.put(&k, b"skyline/nodes/n2", br#"{"address":"10.0.0.2"}"#);
        let third = c.snapshot();
        assert!(!Arc::ptr_eq(&second.nodes, &third.nodes));
        assert!(Arc::ptr_eq(&second.services["db"], &third.services["db"]));
        assert!(Arc::ptr_eq(&second.services["web"], &third.services["web"]));
        // And the node names of instances are the node's own.
        let w1 = &third.services["web"][0];
        assert_eq!(
            w1.node.as_str().as_ptr(),
            third.nodes["n1"].name.as_str().as_ptr()
        );
    }

    #[test]
    fn a_new_listing_reuses_the_instances_it_finds_unchanged() {
        let (k, mut c) = web_and_db_on_n1();
        let before = c.snapshot();
        let mut listed = Catalog::relist(&mut c, 7);
        listed.put(&k, b"skyline/nodes/n1", br#"{"address":"10.0.0.1"}"#);
        listed.put(
            &k,
            b"skyline/instances/web/w1",
            br#"{"node":"n1","port":1}"#,
        );
        let after = listed.snapshot();
        assert!(Arc::ptr_eq(&before.services["web"], &after.services["web"]));
        assert!(!after.services.contains_key("db"), "gone from the listing");
        assert_eq!(listed.revision, 7);
    }

    #[test]
    fn values_round_trip_through_json() {
        let v = InstanceValue {
            node: "n1".into(),
            address: Some("10.0.0.2".parse().unwrap()),
            port: 9,
            tags: vec!["a".into()],
            meta: BTreeMap::from([("platform".into(), "mesos".into())]),
            health: Health::Critical,
            weight: 3,
        };
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<InstanceValue>(&text).unwrap(), v);
        let n: NodeValue = serde_json::from_str(r#"{"address":"::1"}"#).unwrap();
        assert_eq!(n.inbound_port, DEFAULT_INBOUND_PORT);
    }

    #[test]
    fn backoff_grows_to_its_ceiling_with_jitter() {
        let mut b = Backoff::new(BACKOFF_START, BACKOFF_MAX);
        let first = b.delay();
        assert!(first >= BACKOFF_START / 2 && first <= BACKOFF_START);
        let mut last = first;
        for _ in 0..20 {
            last = b.delay();
        }
        assert!(last >= BACKOFF_MAX / 2 && last <= BACKOFF_MAX);
        b.reset();
        assert!(b.delay() <= BACKOFF_START);
    }
}
