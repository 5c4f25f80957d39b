//! The registry's state and how it survives crashes.
//!
//! # Why an append-only log of our own
//!
//! Every write is one [`Record`] (`index` + [`Op`]) appended to `data_dir/log` as
//! `len: u32 LE | crc32(payload): u32 LE | payload (JSON)` and `fdatasync`ed before the HTTP
//! response is sent. When the log grows past a threshold the whole state is written to
//! `data_dir/snapshot` (same framing, one record: write `snapshot.tmp`, fsync, rename, fsync the
//! directory) and the log is emptied. At start the snapshot is loaded and the log replayed over it;
//! records whose index the snapshot already covers are skipped, so a crash between the rename and
//! the truncation is harmless.
//!
//! Only a torn *tail* is dropped at start: the last record, cut short by a crash during its append
//! (a short header, a payload that runs past the end of the file, a checksum mismatch on a record
//! that ends exactly at the end of the file, or zero bytes the file system allocated but never
//! wrote). Such a record was never acknowledged, because acknowledgement waits for its fsync; it is
//! logged with `tracing::warn!` and truncated away. Damage anywhere else (a bad record with
//! readable data after it) is refused with [`StoreError::CorruptLog`], naming the file and offset,
//! and the file is left untouched: acknowledged writes are never dropped silently.
//! [`Store::repair`] (`skyline registry --repair`) keeps every readable record and moves the damaged
//! file aside.
//!
//! We do not use sled (unmaintained) or RocksDB (its C++ build is slow on our 2-core machines and
//! it brings its own write-ahead log whose fsync policy we would have to configure around). The
//! state is small (it must hold 30,000 instances comfortably, a few MiB), lives wholly in memory,
//! and the log is ~200 lines whose fsync points we control.
//!
//! `data_dir/FORMAT` holds the format version; a directory of another version is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use imbl::{OrdMap, OrdSet};
use serde::{Deserialize, Serialize};

use crate::catalog::Health;

/// The on-disk format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Compact the log into a snapshot once it is larger than this many bytes.
pub const DEFAULT_COMPACT_AFTER: u64 = 8 << 20;
/// The longest lock-delay a session can impose (Consul's `MaxLockDelay`).
pub const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);

const HEADER: usize = 8;
/// No record is this large; a length field above it is corruption. Log records are bounded far
/// below it by the API's body limits; the snapshot, one record, can be larger.
const MAX_RECORD: u32 = 256 << 20;
/// No log record is this large (a write is at most a few MiB of JSON).
const MAX_LOG_RECORD: u32 = 64 << 20;
const FORMAT_FILE: &str = "FORMAT";
const LOG_FILE: &str = "log";
const SNAPSHOT_FILE: &str = "snapshot";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "data directory {} has format version {found:?}; this build reads version {FORMAT_VERSION} only",
        path.display()
    )]
    UnknownFormat { path: PathBuf, found: String },
    #[error("snapshot {} is corrupt: {reason}", path.display())]
    CorruptSnapshot { path: PathBuf, reason: String },
    #[error(
        "registry log {} is damaged at byte {offset} of {len} ({reason}), with records after it; \
         refusing to start rather than drop acknowledged writes (the file is untouched: \
         `skyline registry --repair --data-dir {}` keeps every readable record)",
        path.display(), path.parent().map(|d| d.display().to_string()).unwrap_or_default()
    )]
    CorruptLog {
        path: PathBuf,
        offset: u64,
        len: u64,
        reason: String,
    },
    #[error("record at {}:{offset} passed its checksum but does not decode", path.display())]
    Undecodable {
        path: PathBuf,
        offset: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode a record")]
    Encode(#[source] serde_json::Error),
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

// === State ===

/// The whole registry: nodes with their services and checks, the KV store, and the indexes
/// blocking queries compare against. Cloning is cheap-ish (maps of `Arc`s).
#[derive(Clone, Debug)]
pub struct State {
    /// The index of the last write; starts at 1 and never goes backwards.
    pub index: u64,
    pub nodes: OrdMap<String, Arc<NodeEntry>>,
    pub kv: OrdMap<String, Arc<KvEntry>>,
    /// When each deleted key went away, so a blocking read on a deleted key wakes and the index
    /// of a prefix never goes backwards.
    pub kv_tombstones: OrdMap<String, u64>,
    /// Per service name: the index of the last change to its instances, their checks or nodes.
    /// Kept after the last instance is gone, so the index never goes backwards.
    pub service_index: OrdMap<String, u64>,
    /// The last change to the set of service names or their tags (`/v1/catalog/services`).
    pub services_index: u64,
    /// The last change to the set of nodes (`/v1/catalog/nodes`).
    pub nodes_index: u64,
    /// The last change to anything but the KV store.
    pub catalog_index: u64,
    /// Derived: service name -> (node, service id) of its instances.
    pub by_name: OrdMap<String, OrdSet<(String, String)>>,
    /// Sessions by id ([`super::session`]).
    pub sessions: OrdMap<String, Arc<SessionEntry>>,
    /// The last change to any session (Consul's `sessions` table index): what every session
    /// read returns and blocks on.
    pub sessions_index: u64,
    /// Derived: session id -> the keys whose lock it holds.
    pub session_locks: OrdMap<String, OrdSet<String>>,
    /// Per key: the wall-clock time (Unix milliseconds) before which no session may acquire its
    /// lock, set when the session that held it was invalidated (Consul's lock-delay).
    pub lock_delays: OrdMap<String, u64>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            index: 1,
            nodes: OrdMap::new(),
            kv: OrdMap::new(),
            kv_tombstones: OrdMap::new(),
            service_index: OrdMap::new(),
            services_index: 1,
            nodes_index: 1,
            catalog_index: 1,
            by_name: OrdMap::new(),
            sessions: OrdMap::new(),
            sessions_index: 1,
            session_locks: OrdMap::new(),
            lock_delays: OrdMap::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub address: String,
    pub meta: BTreeMap<String, String>,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub info: NodeInfo,
    pub services: OrdMap<String, Arc<ServiceEntry>>,
    /// Keyed by (service id, check id); node-level checks have an empty service id.
    pub checks: OrdMap<(String, String), Arc<CheckEntry>>,
    /// Check id -> service id.
    pub check_owner: OrdMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            passing: 1,
            warning: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    pub id: String,
    pub name: String,
    pub tags: Vec<String>,
    /// As registered; empty means "the node's address".
    pub address: String,
    pub port: u16,
    pub meta: BTreeMap<String, String>,
    pub weights: Weights,
    pub create_index: u64,
    pub modify_index: u64,
}

/// How the registry runs a check; all `None` for checks whose status is set from outside.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDefinition {
    pub ttl: Option<Duration>,
    pub http: Option<String>,
    pub tcp: Option<String>,
    /// Consul's `H2PING` (`host:port`), over h2c: `H2PingUseTLS` false is the only kind taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2ping: Option<String>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub deregister_critical_after: Option<Duration>,
}

impl CheckDefinition {
    /// Consul's `Type` field.
    pub fn kind(&self) -> &'static str {
        if self.ttl.is_some() {
            "ttl"
        } else if self.http.is_some() {
            "http"
        } else if self.tcp.is_some() {
            "tcp"
        } else if self.h2ping.is_some() {
            "h2ping"
        } else {
            ""
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckEntry {
    pub id: String,
    pub name: String,
    /// Empty for a node-level check.
    pub service_id: String,
    pub service_name: String,
    pub status: Health,
    pub output: String,
    pub notes: String,
    pub definition: CheckDefinition,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    #[serde(with = "b64")]
    pub value: Vec<u8>,
    pub flags: u64,
    /// The session that holds this key's lock, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// How many times a session acquired this key's lock (Consul's `LockIndex`).
    #[serde(default)]
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

/// What happens to the keys a session holds when it is invalidated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behavior {
    /// The locks are released; the keys stay.
    Release,
    /// The keys are deleted (ephemeral keys).
    Delete,
}

impl Behavior {
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

/// A session as created: validated, with its id generated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDef {
    pub id: String,
    pub name: String,
    pub node: String,
    pub lock_delay: Duration,
    pub behavior: Behavior,
    /// As the client wrote it (`"30s"`), empty for none; the session is invalidated when it is
    /// not renewed within twice this.
    pub ttl: String,
    /// Checks of `node` that must not turn critical (Consul's `NodeChecks`, and the deprecated
    /// `Checks`).
    pub node_checks: Vec<String>,
    /// Service checks of `node` that must not turn critical (Consul's `ServiceChecks[].ID`).
    pub service_checks: Vec<String>,
    /// The deprecated `Checks` field, kept to be answered as given.
    pub checks: Vec<String>,
}

impl SessionDef {
    /// Every check the session depends on.
    pub fn all_checks(&self) -> impl Iterator<Item = &str> {
        self.checks
            .iter()
            .chain(&self.node_checks)
            .chain(&self.service_checks)
            .map(String::as_str)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEntry {
    pub def: SessionDef,
    pub create_index: u64,
    pub modify_index: u64,
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

// === Ops ===

/// One durable write. Applying an op never fails: validation happens before it is logged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    Register(Registration),
    /// Removes a service (with its checks), a check, or, with neither, the whole node.
    Deregister {
        node: String,
        service_id: Option<String>,
        check_id: Option<String>,
    },
    CheckStatus {
        node: String,
        check_id: String,
        status: Health,
        output: String,
    },
    KvPut {
        key: String,
        #[serde(with = "b64")]
        value: Vec<u8>,
        flags: u64,
    },
    KvDelete {
        key: String,
        recurse: bool,
    },
    /// Sets a key and makes `session` its lock holder (validated: the session exists and no
    /// other session holds the lock); `LockIndex` grows when the holder changes.
    KvLock {
        key: String,
        #[serde(with = "b64")]
        value: Vec<u8>,
        flags: u64,
        session: String,
    },
    /// Sets a key and clears its lock holder (validated: `session` holds it).
    KvUnlock {
        key: String,
        #[serde(with = "b64")]
        value: Vec<u8>,
        flags: u64,
        session: String,
    },
    SessionCreate(SessionDef),
    /// Invalidates a session at wall-clock time `at_ms` (Unix milliseconds): its locks are
    /// released or its keys deleted, per its behavior, and each such key gets a lock-delay.
    SessionDestroy {
        id: String,
        at_ms: u64,
    },
    /// Several ops applied together at one index: a `/v1/txn` that succeeded as a whole.
    Txn(Vec<Op>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub node: String,
    pub address: String,
    /// `None` keeps the node's meta as it is.
    pub node_meta: Option<BTreeMap<String, String>>,
    pub service: Option<ServiceDef>,
    pub checks: Vec<CheckDef>,
    /// Agent semantics: the service's checks become exactly `checks`.
    pub replace_service_checks: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDef {
    pub id: String,
    pub name: String,
    pub tags: Vec<String>,
    pub address: String,
    pub port: u16,
    pub meta: BTreeMap<String, String>,
    pub weights: Weights,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDef {
    pub id: String,
    pub name: String,
    pub service_id: String,
    /// `None` keeps an existing check's status, or starts a new one critical.
    pub status: Option<Health>,
    pub output: String,
    pub notes: String,
    pub definition: CheckDefinition,
}

/// A logged write: the op and the index it was given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub index: u64,
    pub op: Op,
}

/// A check whose definition or status an op changed: (node, check id).
pub type CheckKey = (String, String);

// === impl State ===

impl State {
    /// The instances of a service name as (node, service) pairs, in a stable order.
    pub fn instances<'a>(
        &'a self,
        name: &str,
    ) -> impl Iterator<Item = (&'a Arc<NodeEntry>, &'a Arc<ServiceEntry>)> + 'a {
        self.by_name
            .get(name)
            .into_iter()
            .flat_map(|set| set.iter())
            .filter_map(|(node, id)| {
                let n = self.nodes.get(node)?;
                Some((n, n.services.get(id)?))
            })
    }

    /// The index a blocking read of `/v1/catalog/service/<name>` or `/v1/health/...` compares.
    pub fn index_of_service(&self, name: &str) -> u64 {
        self.service_index.get(name).copied().unwrap_or(1)
    }

    /// The catalog version of this state as a proxy following it over HTTP computes it: the
    /// highest `X-Consul-Index` of `/v1/catalog/services` and of `/v1/health/service/<name>`
    /// for every service with a mesh name (see `catalog::consul`; `skyline status` computes
    /// the newest version alike). KV writes do not move it.
    pub fn catalog_version(&self) -> u64 {
        self.by_name
            .keys()
            .filter(|name| crate::catalog::ServiceName::is_valid(name))
            .map(|name| self.index_of_service(name))
            .fold(self.services_index, u64::max)
    }

    /// The index of one KV key, or of every key under a prefix.
    pub fn index_of_kv(&self, key: &str, prefix: bool) -> u64 {
        let idx = if prefix {
            let live = prefix_range(&self.kv, key)
                .map(|(_, e)| e.modify_index)
                .max();
            let dead = prefix_range(&self.kv_tombstones, key)
                .map(|(_, i)| *i)
                .max();
            live.max(dead)
        } else {
            self.kv
                .get(key)
                .map(|e| e.modify_index)
                .or_else(|| self.kv_tombstones.get(key).copied())
        };
        idx.unwrap_or(1).max(1)
    }

    fn touch_service(&mut self, name: &str, index: u64) {
        match self.service_index.get_mut(name) {
            Some(i) => *i = index,
            None => {
                self.service_index.insert(name.to_owned(), index);
            }
        }
        self.catalog_index = index;
    }

    fn touch_node_services(&mut self, node: &str, index: u64) {
        let names: BTreeSet<String> = self
            .nodes
            .get(node)
            .map(|n| n.services.values().map(|s| s.name.clone()).collect())
            .unwrap_or_default();
        for name in names {
            self.touch_service(&name, index);
        }
        self.catalog_index = index;
    }

    fn link(&mut self, name: &str, node: &str, id: &str) {
        let pair = (node.to_owned(), id.to_owned());
        match self.by_name.get_mut(name) {
            Some(set) => {
                set.insert(pair);
            }
            None => {
                self.by_name.insert(name.to_owned(), OrdSet::unit(pair));
            }
        }
    }

    fn unlink(&mut self, name: &str, node: &str, id: &str) {
        if let Some(set) = self.by_name.get_mut(name) {
            set.remove(&(node.to_owned(), id.to_owned()));
            if set.is_empty() {
                self.by_name.remove(name);
            }
        }
    }

    /// Applies a logged record; returns the checks whose definition or status it touched.
    pub fn apply(&mut self, record: &Record) -> Vec<CheckKey> {
        let index = record.index;
        self.index = self.index.max(index);
        let mut touched = Vec::new();
        self.apply_op(index, &record.op, &mut touched);
        touched
    }

    fn apply_op(&mut self, index: u64, op: &Op, touched: &mut Vec<CheckKey>) {
        match op {
            Op::Register(reg) => self.apply_register(index, reg, touched),
            Op::Deregister {
                node,
                service_id,
                check_id,
            } => self.apply_deregister(index, node, service_id, check_id, touched),
            Op::CheckStatus {
                node,
                check_id,
                status,
                output,
            } => {
                let name = self.nodes.get_mut(node).and_then(|n| {
                    let owner = n.check_owner.get(check_id)?.clone();
                    let n = Arc::make_mut(n);
                    let c = n.checks.get_mut(&(owner, check_id.clone()))?;
                    let c = Arc::make_mut(c);
                    c.status = *status;
                    c.output.clone_from(output);
                    c.modify_index = index;
                    touched.push((node.clone(), check_id.clone()));
                    Some(c.service_name.clone())
                });
                match name {
                    Some(name) if !name.is_empty() => self.touch_service(&name, index),
                    Some(_) => self.touch_node_services(node, index),
                    None => {}
                }
            }
            Op::KvPut { key, value, flags } => {
                // A plain write keeps the key's lock holder, as Consul's does.
                let (session, lock_index) = self
                    .kv
                    .get(key)
                    .map_or((None, 0), |e| (e.session.clone(), e.lock_index));
                self.kv_set(index, key, value, *flags, session, lock_index);
            }
            Op::KvLock {
                key,
                value,
                flags,
                session,
            } => {
                let lock_index = match self.kv.get(key) {
                    Some(e) if e.session.as_ref() == Some(session) => e.lock_index,
                    Some(e) => e.lock_index + 1,
                    None => 1,
                };
                self.kv_set(index, key, value, *flags, Some(session.clone()), lock_index);
            }
            Op::KvUnlock {
                key, value, flags, ..
            } => {
                let lock_index = self.kv.get(key).map_or(0, |e| e.lock_index);
                self.kv_set(index, key, value, *flags, None, lock_index);
            }
            Op::KvDelete { key, recurse } => {
                let keys: Vec<String> = if *recurse {
                    prefix_range(&self.kv, key)
                        .map(|(k, _)| k.clone())
                        .collect()
                } else {
                    self.kv
                        .contains_key(key)
                        .then(|| key.clone())
                        .into_iter()
                        .collect()
                };
                for k in keys {
                    self.kv_remove(index, &k);
                }
            }
            Op::SessionCreate(def) => {
                self.sessions.insert(
                    def.id.clone(),
                    Arc::new(SessionEntry {
                        def: def.clone(),
                        create_index: index,
                        modify_index: index,
                    }),
                );
                self.sessions_index = index;
            }
            Op::SessionDestroy { id, at_ms } => self.apply_session_destroy(index, id, *at_ms),
            Op::Txn(ops) => {
                for op in ops {
                    self.apply_op(index, op, touched);
                }
            }
        }
    }

    /// Writes a KV entry, keeping its create index and the lock index of sessions.
    fn kv_set(
        &mut self,
        index: u64,
        key: &str,
        value: &[u8],
        flags: u64,
        session: Option<String>,
        lock_index: u64,
    ) {
        let old = self.kv.get(key).cloned();
        let create_index = old.as_ref().map_or(index, |e| e.create_index);
        if let Some(previous) = old.as_ref().and_then(|e| e.session.as_ref()) {
            if Some(previous) != session.as_ref() {
                self.unlink_lock(previous, key);
            }
        }
        if let Some(holder) = &session {
            match self.session_locks.get_mut(holder) {
                Some(keys) => {
                    keys.insert(key.to_owned());
                }
                None => {
                    self.session_locks
                        .insert(holder.clone(), OrdSet::unit(key.to_owned()));
                }
            }
        }
        self.kv.insert(
            key.to_owned(),
            Arc::new(KvEntry {
                value: value.to_vec(),
                flags,
                session,
                lock_index,
                create_index,
                modify_index: index,
            }),
        );
        self.kv_tombstones.remove(key);
    }

    /// Deletes a KV entry and leaves a tombstone at `index`.
    fn kv_remove(&mut self, index: u64, key: &str) {
        if let Some(old) = self.kv.remove(key) {
            if let Some(holder) = &old.session {
                self.unlink_lock(holder, key);
            }
        }
        self.kv_tombstones.insert(key.to_owned(), index);
    }

    fn unlink_lock(&mut self, session: &str, key: &str) {
        if let Some(keys) = self.session_locks.get_mut(session) {
            keys.remove(key);
            if keys.is_empty() {
                self.session_locks.remove(session);
            }
        }
    }

    fn apply_session_destroy(&mut self, index: u64, id: &str, at_ms: u64) {
        let Some(session) = self.sessions.remove(id) else {
            return;
        };
        self.sessions_index = index;
        // Lock-delays that are over by now are dropped, so the map stays small.
        let over: Vec<String> = self
            .lock_delays
            .iter()
            .filter(|(_, until)| **until <= at_ms)
            .map(|(k, _)| k.clone())
            .collect();
        for key in over {
            self.lock_delays.remove(&key);
        }
        let delay = session.def.lock_delay.min(MAX_LOCK_DELAY);
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let keys = self.session_locks.remove(id).unwrap_or_default();
        for key in keys {
            match session.def.behavior {
                Behavior::Release => {
                    if let Some(e) = self.kv.get(&key).cloned() {
                        self.kv_set(index, &key, &e.value, e.flags, None, e.lock_index);
                    }
                }
                Behavior::Delete => self.kv_remove(index, &key),
            }
            if !delay.is_zero() {
                self.lock_delays
                    .insert(key, at_ms.saturating_add(delay_ms.max(1)));
            }
        }
    }

    fn apply_register(&mut self, index: u64, reg: &Registration, touched: &mut Vec<CheckKey>) {
        let node_name = reg.node.clone();
        let mut node_changed = false;
        let node = self.nodes.entry(node_name.clone()).or_insert_with(|| {
            node_changed = true;
            Arc::new(NodeEntry {
                info: NodeInfo {
                    name: node_name.clone(),
                    address: reg.address.clone(),
                    meta: reg.node_meta.clone().unwrap_or_default(),
                    create_index: index,
                    modify_index: index,
                },
                services: OrdMap::new(),
                checks: OrdMap::new(),
                check_owner: OrdMap::new(),
            })
        });
        let address_changed = node.info.address != reg.address;
        let meta_changed = reg.node_meta.as_ref().is_some_and(|m| *m != node.info.meta);
        if address_changed || meta_changed {
            let n = Arc::make_mut(node);
            n.info.address.clone_from(&reg.address);
            if let Some(meta) = &reg.node_meta {
                n.info.meta.clone_from(meta);
            }
            n.info.modify_index = index;
            node_changed = true;
        }
        if node_changed {
            self.nodes_index = index;
            self.touch_node_services(&node_name, index);
        }

        let mut names_touched = BTreeSet::new();
        if let Some(svc) = &reg.service {
            let Some(node) = self.nodes.get_mut(&node_name) else {
                return;
            };
            let n = Arc::make_mut(node);
            let old = n.services.get(&svc.id).cloned();
            let create_index = old.as_ref().map_or(index, |o| o.create_index);
            n.services.insert(
                svc.id.clone(),
                Arc::new(ServiceEntry {
                    id: svc.id.clone(),
                    name: svc.name.clone(),
                    tags: svc.tags.clone(),
                    address: svc.address.clone(),
                    port: svc.port,
                    meta: svc.meta.clone(),
                    weights: svc.weights,
                    create_index,
                    modify_index: index,
                }),
            );
            if reg.replace_service_checks {
                let keep: BTreeSet<&str> = reg
                    .checks
                    .iter()
                    .filter(|c| c.service_id == svc.id)
                    .map(|c| c.id.as_str())
                    .collect();
                let drop: Vec<(String, String)> = range_of(&n.checks, &svc.id)
                    .filter(|((_, cid), _)| !keep.contains(cid.as_str()))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in drop {
                    n.check_owner.remove(&key.1);
                    n.checks.remove(&key);
                    touched.push((node_name.clone(), key.1));
                }
            }
            // A renamed service leaves its old name.
            if let Some(old) = old.filter(|o| o.name != svc.name) {
                self.unlink(&old.name, &node_name, &svc.id);
                if let Some(node) = self.nodes.get_mut(&node_name) {
                    let n = Arc::make_mut(node);
                    let keys: Vec<_> = range_of(&n.checks, &svc.id)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in keys {
                        if let Some(c) = n.checks.get_mut(&key) {
                            Arc::make_mut(c).service_name.clone_from(&svc.name);
                        }
                    }
                }
                names_touched.insert(old.name.clone());
            }
            self.link(&svc.name, &node_name, &svc.id);
            names_touched.insert(svc.name.clone());
            self.services_index = index;
        }

        let mut node_check_touched = false;
        for def in &reg.checks {
            let Some(node) = self.nodes.get_mut(&node_name) else {
                return;
            };
            let n = Arc::make_mut(node);
            // A check that moves to another service leaves its old slot.
            if let Some(prev_owner) = n.check_owner.get(&def.id).cloned() {
                if prev_owner != def.service_id {
                    n.checks.remove(&(prev_owner, def.id.clone()));
                }
            }
            let key = (def.service_id.clone(), def.id.clone());
            let old = n.checks.get(&key).cloned();
            let service_name = n
                .services
                .get(&def.service_id)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            let status = def
                .status
                .or_else(|| old.as_ref().map(|o| o.status))
                .unwrap_or(Health::Critical);
            let output = if def.status.is_none() && def.output.is_empty() {
                old.as_ref().map(|o| o.output.clone()).unwrap_or_default()
            } else {
                def.output.clone()
            };
            n.checks.insert(
                key,
                Arc::new(CheckEntry {
                    id: def.id.clone(),
                    name: def.name.clone(),
                    service_id: def.service_id.clone(),
                    service_name: service_name.clone(),
                    status,
                    output,
                    notes: def.notes.clone(),
                    definition: def.definition.clone(),
                    create_index: old.as_ref().map_or(index, |o| o.create_index),
                    modify_index: index,
                }),
            );
            n.check_owner.insert(def.id.clone(), def.service_id.clone());
            touched.push((node_name.clone(), def.id.clone()));
            if service_name.is_empty() {
                node_check_touched = true;
            } else {
                names_touched.insert(service_name);
            }
        }
        if node_check_touched {
            self.touch_node_services(&node_name, index);
        }
        for name in names_touched {
            self.touch_service(&name, index);
        }
        self.catalog_index = index;
    }

    fn apply_deregister(
        &mut self,
        index: u64,
        node_name: &str,
        service_id: &Option<String>,
        check_id: &Option<String>,
        touched: &mut Vec<CheckKey>,
    ) {
        if !self.nodes.contains_key(node_name) {
            return;
        }
        match (service_id, check_id) {
            (Some(id), _) => {
                let Some(node) = self.nodes.get_mut(node_name) else {
                    return;
                };
                let n = Arc::make_mut(node);
                let Some(svc) = n.services.remove(id) else {
                    return;
                };
                let keys: Vec<_> = range_of(&n.checks, id).map(|(k, _)| k.clone()).collect();
                for key in keys {
                    n.check_owner.remove(&key.1);
                    n.checks.remove(&key);
                    touched.push((node_name.to_owned(), key.1));
                }
                self.unlink(&svc.name, node_name, id);
                self.touch_service(&svc.name, index);
                self.services_index = index;
            }
            (None, Some(cid)) => {
                let Some(node) = self.nodes.get_mut(node_name) else {
                    return;
                };
                let n = Arc::make_mut(node);
                let Some(owner) = n.check_owner.remove(cid) else {
                    return;
                };
                let removed = n.checks.remove(&(owner, cid.clone()));
                touched.push((node_name.to_owned(), cid.clone()));
                match removed {
                    Some(c) if !c.service_name.is_empty() => {
                        self.touch_service(&c.service_name, index)
                    }
                    _ => self.touch_node_services(node_name, index),
                }
            }
            (None, None) => {
                self.touch_node_services(node_name, index);
                if let Some(node) = self.nodes.remove(node_name) {
                    for svc in node.services.values() {
                        self.unlink(&svc.name, node_name, &svc.id);
                    }
                    touched.extend(
                        node.check_owner
                            .keys()
                            .map(|c| (node_name.to_owned(), c.clone())),
                    );
                }
                self.nodes_index = index;
                self.services_index = index;
            }
        }
        self.catalog_index = index;
    }

    /// The health of one instance: the worst of its checks and its node's checks.
    pub fn instance_health(node: &NodeEntry, service_id: &str) -> Health {
        range_of(&node.checks, service_id)
            .chain(range_of(&node.checks, ""))
            .map(|(_, c)| c.status)
            .max()
            .unwrap_or(Health::Passing)
    }

    /// The checks of one instance: its own, then its node's.
    pub fn instance_checks<'a>(
        node: &'a NodeEntry,
        service_id: &'a str,
    ) -> impl Iterator<Item = &'a Arc<CheckEntry>> + 'a {
        range_of(&node.checks, "")
            .chain(range_of(&node.checks, service_id).filter(move |_| !service_id.is_empty()))
            .map(|(_, c)| c)
    }

    /// Finds a check by node and id.
    pub fn check(&self, node: &str, check_id: &str) -> Option<&Arc<CheckEntry>> {
        let n = self.nodes.get(node)?;
        let owner = n.check_owner.get(check_id)?;
        n.checks.get(&(owner.clone(), check_id.to_owned()))
    }
}

/// The entries whose key starts with `prefix`.
pub fn prefix_range<'a, V>(
    map: &'a OrdMap<String, V>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
    map.range::<_, str>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

/// The checks of one service id (or, with `""`, the node-level checks).
fn range_of<'a>(
    checks: &'a OrdMap<(String, String), Arc<CheckEntry>>,
    service_id: &'a str,
) -> impl Iterator<Item = (&'a (String, String), &'a Arc<CheckEntry>)> + 'a {
    let start = (service_id.to_owned(), String::new());
    checks
        .range(start..)
        .take_while(move |((s, _), _)| s == service_id)
}

// === Images (snapshot file contents) ===

#[derive(Serialize)]
struct ImageOut<'a> {
    index: u64,
    nodes: Vec<&'a NodeInfo>,
    services: Vec<(&'a str, &'a ServiceEntry)>,
    checks: Vec<(&'a str, &'a CheckEntry)>,
    kv: Vec<(&'a str, &'a KvEntry)>,
    kv_tombstones: Vec<(&'a str, u64)>,
    service_index: Vec<(&'a str, u64)>,
    services_index: u64,
    nodes_index: u64,
    catalog_index: u64,
    sessions: Vec<&'a SessionEntry>,
    sessions_index: u64,
    lock_delays: Vec<(&'a str, u64)>,
}

#[derive(Deserialize)]
struct ImageIn {
    index: u64,
    nodes: Vec<NodeInfo>,
    services: Vec<(String, ServiceEntry)>,
    checks: Vec<(String, CheckEntry)>,
    kv: Vec<(String, KvEntry)>,
    kv_tombstones: Vec<(String, u64)>,
    service_index: Vec<(String, u64)>,
    services_index: u64,
    nodes_index: u64,
    catalog_index: u64,
    // Snapshots written before sessions existed have none of these.
    #[serde(default)]
    sessions: Vec<SessionEntry>,
    #[serde(default)]
    sessions_index: u64,
    #[serde(default)]
    lock_delays: Vec<(String, u64)>,
}

impl State {
    fn to_image(&self) -> ImageOut<'_> {
        ImageOut {
            index: self.index,
            nodes: self.nodes.values().map(|n| &n.info).collect(),
            services: self
                .nodes
                .values()
                .flat_map(|n| n.services.values().map(|s| (n.info.name.as_str(), &**s)))
                .collect(),
            checks: self
                .nodes
                .values()
                .flat_map(|n| n.checks.values().map(|c| (n.info.name.as_str(), &**c)))
                .collect(),
            kv: self.kv.iter().map(|(k, v)| (k.as_str(), &**v)).collect(),
            kv_tombstones: self
                .kv_tombstones
                .iter()
                .map(|(k, i)| (k.as_str(), *i))
                .collect(),
            service_index: self
                .service_index
                .iter()
                .map(|(k, i)| (k.as_str(), *i))
                .collect(),
            services_index: self.services_index,
            nodes_index: self.nodes_index,
            catalog_index: self.catalog_index,
            sessions: self.sessions.values().map(|s| &**s).collect(),
            sessions_index: self.sessions_index,
            lock_delays: self
                .lock_delays
                .iter()
                .map(|(k, t)| (k.as_str(), *t))
                .collect(),
        }
    }

    fn from_image(image: ImageIn) -> Self {
        let mut state = State {
            index: image.index.max(1),
            kv: image
                .kv
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
            kv_tombstones: image.kv_tombstones.into_iter().collect(),
            service_index: image.service_index.into_iter().collect(),
            services_index: image.services_index.max(1),
            nodes_index: image.nodes_index.max(1),
            catalog_index: image.catalog_index.max(1),
            sessions: image
                .sessions
                .into_iter()
                .map(|s| (s.def.id.clone(), Arc::new(s)))
                .collect(),
            sessions_index: image.sessions_index.max(1),
            lock_delays: image.lock_delays.into_iter().collect(),
            ..State::default()
        };
        for (key, entry) in &state.kv {
            if let Some(holder) = &entry.session {
                match state.session_locks.get_mut(holder) {
                    Some(keys) => {
                        keys.insert(key.clone());
                    }
                    None => {
                        state
                            .session_locks
                            .insert(holder.clone(), OrdSet::unit(key.clone()));
                    }
                }
            }
        }
        let mut nodes: BTreeMap<String, NodeEntry> = image
            .nodes
            .into_iter()
            .map(|info| {
                let entry = NodeEntry {
                    info,
                    services: OrdMap::new(),
                    checks: OrdMap::new(),
                    check_owner: OrdMap::new(),
                };
                (entry.info.name.clone(), entry)
            })
            .collect();
        for (node, svc) in image.services {
            if let Some(n) = nodes.get_mut(&node) {
                state.link(&svc.name, &node, &svc.id);
                n.services.insert(svc.id.clone(), Arc::new(svc));
            }
        }
        for (node, check) in image.checks {
            if let Some(n) = nodes.get_mut(&node) {
                n.check_owner
                    .insert(check.id.clone(), check.service_id.clone());
                n.checks.insert(
                    (check.service_id.clone(), check.id.clone()),
                    Arc::new(check),
                );
            }
        }
        state.nodes = nodes.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        state
    }
}

// === Store ===

/// The durable side: the log file and the snapshot.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    log_path: PathBuf,
    log: File,
    log_len: u64,
    compact_after: u64,
}

/// Encodes one record with its frame (length, CRC32, payload) onto `buf`.
pub fn encode(record: &Record, buf: &mut Vec<u8>) -> Result<(), StoreError> {
    let payload = serde_json::to_vec(record).map_err(StoreError::Encode)?;
    frame(&payload, buf);
    Ok(())
}

fn frame(payload: &[u8], buf: &mut Vec<u8>) {
    // Records are bounded far below u32::MAX by the API's body limits.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

/// Why a frame could not be read.
#[derive(Debug, PartialEq, Eq)]
enum FrameError {
    /// Nothing but zeros: space the file system allocated whose data never reached the disk.
    Unwritten,
    TornHeader,
    TooLong(u32),
    TornPayload {
        want: u32,
        have: usize,
    },
    Checksum {
        want: u32,
        got: u32,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Unwritten => f.write_str("zeros that were never written"),
            FrameError::TornHeader => f.write_str("torn record header"),
            FrameError::TooLong(n) => write!(f, "record length {n} is beyond any record"),
            FrameError::TornPayload { want, have } => {
                write!(f, "torn record: {have} of {want} payload bytes")
            }
            FrameError::Checksum { want, got } => {
                write!(
                    f,
                    "checksum mismatch: stored {want:08x}, computed {got:08x}"
                )
            }
        }
    }
}

/// Reads the frame at the start of `buf`: its payload and total length.
fn read_frame(buf: &[u8]) -> Result<(&[u8], usize), FrameError> {
    read_frame_upto(buf, MAX_RECORD)
}

fn read_frame_upto(buf: &[u8], max: u32) -> Result<(&[u8], usize), FrameError> {
    let (Some(len), Some(crc)) = (buf.get(0..4), buf.get(4..8)) else {
        return Err(FrameError::TornHeader);
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
    let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if len > max {
        return Err(FrameError::TooLong(len));
    }
    let end = HEADER + len as usize;
    let Some(payload) = buf.get(HEADER..end) else {
        return Err(FrameError::TornPayload {
            want: len,
            have: buf.len() - HEADER,
        });
    };
    let got = crc32fast::hash(payload);
    if got != crc {
        return Err(FrameError::Checksum { want: crc, got });
    }
    Ok((payload, end))
}

/// Whether `rest`, the log from a record that failed to read, is what a crash during the last
/// append leaves: a cut-off header or payload, a last record whose bytes did not all reach the
/// disk, or zeros the file system allocated but never wrote. Anything else is damage.
fn is_torn_tail(rest: &[u8], reason: &FrameError) -> bool {
    match reason {
        FrameError::Unwritten | FrameError::TornHeader | FrameError::TornPayload { .. } => true,
        FrameError::Checksum { .. } => rest
            .get(0..4)
            .map(|len| HEADER + u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize)
            .is_some_and(|end| end == rest.len()),
        FrameError::TooLong(_) => false,
    }
}

/// Reads the log record frame at the start of `buf` (the rest of the log).
fn read_log_frame(buf: &[u8]) -> Result<(&[u8], usize), FrameError> {
    // An all-zero frame would pass its checksum (the CRC of nothing is zero).
    if buf.iter().all(|&b| b == 0) {
        return Err(FrameError::Unwritten);
    }
    read_frame_upto(buf, MAX_LOG_RECORD)
}

/// Decodes the record at the start of `buf`, if one is there.
fn read_record(buf: &[u8]) -> Option<(Record, usize)> {
    let (payload, len) = read_log_frame(buf).ok()?;
    let record = serde_json::from_slice(payload).ok()?;
    Some((record, len))
}

/// What [`Store::repair`] kept and dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// Records kept, in order.
    pub kept: usize,
    /// Damaged byte ranges skipped, as `(offset, length)` in the original log.
    pub dropped: Vec<(u64, u64)>,
    /// Where the original log was moved, when anything was dropped.
    pub damaged: Option<PathBuf>,
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(contents).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    std::fs::rename(&tmp, &dst).map_err(io_err("rename", &tmp))?;
    fsync_dir(dir)
}

impl Store {
    /// Opens (or creates) a data directory and replays it into a [`State`].
    pub fn open(dir: &Path) -> Result<(Store, State), StoreError> {
        Self::open_with(dir, DEFAULT_COMPACT_AFTER)
    }

    /// Like [`Store::open`], compacting once the log exceeds `compact_after` bytes.
    pub fn open_with(dir: &Path, compact_after: u64) -> Result<(Store, State), StoreError> {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let format_path = dir.join(FORMAT_FILE);
        match std::fs::read_to_string(&format_path) {
            Ok(found) => {
                if found.trim() != FORMAT_VERSION.to_string() {
                    return Err(StoreError::UnknownFormat {
                        path: dir.to_owned(),
                        found: found.trim().to_owned(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_atomically(dir, FORMAT_FILE, format!("{FORMAT_VERSION}\n").as_bytes())?;
            }
            Err(e) => return Err(io_err("read", &format_path)(e)),
        }

        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let mut state = match std::fs::read(&snapshot_path) {
            Ok(bytes) => {
                let corrupt = |reason: String| StoreError::CorruptSnapshot {
                    path: snapshot_path.clone(),
                    reason,
                };
                let (payload, _) = read_frame(&bytes).map_err(|e| corrupt(e.to_string()))?;
                let image: ImageIn =
                    serde_json::from_slice(payload).map_err(|e| corrupt(e.to_string()))?;
                State::from_image(image)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_err("read", &snapshot_path)(e)),
        };

        let log_path = dir.join(LOG_FILE);
        let mut log = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("open", &log_path))?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes)
            .map_err(io_err("read", &log_path))?;
        let mut offset = 0usize;
        while offset < bytes.len() {
            match read_log_frame(&bytes[offset..]) {
                Ok((payload, len)) => {
                    let record: Record = serde_json::from_slice(payload).map_err(|source| {
                        StoreError::Undecodable {
                            path: log_path.clone(),
                            offset: offset as u64,
                            source,
                        }
                    })?;
                    if record.index > state.index {
                        state.apply(&record);
                    }
                    offset += len;
                }
                Err(reason) => {
                    if !is_torn_tail(&bytes[offset..], &reason) {
                        return Err(StoreError::CorruptLog {
                            path: log_path,
                            offset: offset as u64,
                            len: bytes.len() as u64,
                            reason: reason.to_string(),
                        });
                    }
                    tracing::warn!(
                        file = %log_path.display(),
                        offset,
                        dropped_bytes = bytes.len() - offset,
                        %reason,
                        "truncating the registry log after a torn last record"
                    );
                    log.set_len(offset as u64)
                        .map_err(io_err("truncate", &log_path))?;
                    log.sync_all().map_err(io_err("fsync", &log_path))?;
                    break;
                }
            }
        }
        fsync_dir(dir)?;
        Ok((
            Store {
                dir: dir.to_owned(),
                log_path,
                log,
                log_len: offset as u64,
                compact_after,
            },
            state,
        ))
    }

    /// Appends framed records and makes them durable. On failure the log is cut back to where it
    /// was, so nothing of a failed batch survives a restart.
    pub fn append(&mut self, framed: &[u8]) -> Result<(), StoreError> {
        let res = self
            .log
            .write_all(framed)
            .and_then(|()| self.log.sync_data())
            .map_err(io_err("append to", &self.log_path));
        match res {
            Ok(()) => {
                self.log_len += framed.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.log.set_len(self.log_len);
                Err(e)
            }
        }
    }

    /// Whether the log has grown enough to be compacted.
    pub fn wants_compaction(&self) -> bool {
        self.log_len > self.compact_after
    }

    /// Writes `state` (already durable in the log) as the snapshot, then empties the log.
    pub fn compact(&mut self, state: &State) -> Result<(), StoreError> {
        let payload = serde_json::to_vec(&state.to_image()).map_err(StoreError::Encode)?;
        let mut buf = Vec::with_capacity(payload.len() + HEADER);
        frame(&payload, &mut buf);
        write_atomically(&self.dir, SNAPSHOT_FILE, &buf)?;
        self.log
            .set_len(0)
            .map_err(io_err("truncate", &self.log_path))?;
        self.log
            .sync_all()
            .map_err(io_err("fsync", &self.log_path))?;
        self.log_len = 0;
        Ok(())
    }

    /// The log file's path (tests append garbage to it).
    pub fn log_path(dir: &Path) -> PathBuf {
        dir.join(LOG_FILE)
    }

    /// Rewrites a damaged log with every record that can still be read, in order and with
    /// rising indexes, and moves the original to `log.damaged-<unix seconds>` beside it. A log
    /// with nothing to drop is left as it is. Run it while no registry uses `dir`.
    pub fn repair(dir: &Path) -> Result<Repair, StoreError> {
        let log_path = dir.join(LOG_FILE);
        let bytes = std::fs::read(&log_path).map_err(io_err("read", &log_path))?;
        let mut kept = Vec::with_capacity(bytes.len());
        let mut records = 0;
        let mut last_index = 0;
        let mut dropped: Vec<(u64, u64)> = Vec::new();
        let mut offset = 0usize;
        while offset < bytes.len() {
            match read_record(&bytes[offset..]) {
                Some((record, len)) if record.index > last_index => {
                    last_index = record.index;
                    kept.extend_from_slice(&bytes[offset..offset + len]);
                    records += 1;
                    offset += len;
                }
                // Not a record here: skip a byte and look for the next one.
                _ => {
                    match dropped.last_mut() {
                        Some((start, len)) if *start + *len == offset as u64 => *len += 1,
                        _ => dropped.push((offset as u64, 1)),
                    }
                    offset += 1;
                }
            }
        }
        if dropped.is_empty() {
            return Ok(Repair {
                kept: records,
                dropped,
                damaged: None,
            });
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let damaged = dir.join(format!("{LOG_FILE}.damaged-{stamp}"));
        std::fs::copy(&log_path, &damaged).map_err(io_err("copy", &log_path))?;
        write_atomically(dir, LOG_FILE, &kept)?;
        Ok(Repair {
            kept: records,
            dropped,
            damaged: Some(damaged),
        })
    }

    pub fn log_len(&self) -> u64 {
        self.log_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(index: u64, key: &str, value: &str) -> Record {
        Record {
            index,
            op: Op::KvPut {
                key: key.into(),
                value: value.as_bytes().to_vec(),
                flags: 0,
            },
        }
    }

    fn register(index: u64, node: &str, id: &str, name: &str) -> Record {
        Record {
            index,
            op: Op::Register(Registration {
                node: node.into(),
                address: "10.0.0.1".into(),
                node_meta: None,
                service: Some(ServiceDef {
                    id: id.into(),
                    name: name.into(),
                    tags: vec!["t".into()],
                    address: String::new(),
                    port: 80,
                    meta: BTreeMap::new(),
                    weights: Weights::default(),
                }),
                checks: vec![CheckDef {
                    id: format!("service:{id}"),
                    name: "c".into(),
                    service_id: id.into(),
                    status: Some(Health::Passing),
                    output: String::new(),
                    notes: String::new(),
                    definition: CheckDefinition {
                        ttl: Some(Duration::from_secs(10)),
                        ..CheckDefinition::default()
                    },
                }],
                replace_service_checks: true,
            }),
        }
    }

    fn write(store: &mut Store, state: &mut State, record: Record) {
        let mut buf = Vec::new();
        encode(&record, &mut buf).unwrap();
        store.append(&buf).unwrap();
        state.apply(&record);
    }

    #[test]
    fn replays_every_record_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut state) = Store::open(dir.path()).unwrap();
        write(&mut store, &mut state, register(2, "n1", "web-1", "web"));
        write(&mut store, &mut state, put(3, "a/b", "hello"));
        drop(store);
        let (_, replayed) = Store::open(dir.path()).unwrap();
        assert_eq!(replayed.index, 3);
        assert_eq!(replayed.kv["a/b"].value, b"hello");
        assert_eq!(replayed.instances("web").count(), 1);
        assert_eq!(replayed.index_of_service("web"), 2);
    }

    #[test]
    fn drops_a_torn_tail_and_keeps_the_records_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut state) = Store::open(dir.path()).unwrap();
        write(&mut store, &mut state, put(2, "k1", "v1"));
        let good_len = store.log_len();
        let mut buf = Vec::new();
        encode(&put(3, "k2", "v2"), &mut buf).unwrap();
        // Only half of the second record reached the disk.
        store.append(&buf[..buf.len() / 2]).unwrap();
        drop(store);
        let (store, replayed) = Store::open(dir.path()).unwrap();
        assert_eq!(replayed.kv.len(), 1);
        assert!(replayed.kv.contains_key("k1"));
        assert_eq!(store.log_len(), good_len);
        assert_eq!(
            std::fs::metadata(Store::log_path(dir.path()))
                .unwrap()
                .len(),
            good_len
        );
    }

    #[test]
    fn drops_a_last_record_whose_checksum_does_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut state) = Store::open(dir.path()).unwrap();
        write(&mut store, &mut state, put(2, "k1", "v1"));
        let mut buf = Vec::new();
        encode(&put(3, "k2", "v2"), &mut buf).unwrap();
        let last = buf.len() - 3;
        buf[last] ^= 0x55;
        store.append(&buf).unwrap();
        drop(store);
        let (_, replayed) = Store::open(dir.path()).unwrap();
        assert_eq!(replayed.kv.keys().collect::<Vec<_>>(), ["k1"]);
        assert_eq!(replayed.index, 2);
    }

    /// A log of `n` KV writes (indexes 2..=n+1), and the offset of each record.
    fn log_of(dir: &Path, n: u64) -> Vec<u64> {
        let (mut store, mut state) = Store::open(dir).unwrap();
        let mut offsets = Vec::new();
        for i in 0..n {
            offsets.push(store.log_len());
            write(
                &mut store,
                &mut state,
                put(i + 2, &format!("k{i}"), "value"),
            );
        }
        offsets
    }

    fn damage(dir: &Path, at: u64, bytes: &[u8]) -> Vec<u8> {
        use std::io::{Seek, SeekFrom};
        let path = Store::log_path(dir);
        let mut f = OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(bytes).unwrap();
        drop(f);
        std::fs::read(&path).unwrap()
    }

    #[test]
    fn refuses_a_log_damaged_at_its_start_and_leaves_it_untouched() {
        let dir = tempfile::tempdir().unwrap();
        log_of(dir.path(), 50);
        let before = damage(dir.path(), 0, b"GET / HTTP/1.1\r\nHost: oops\r\n\r\n");
        let Err(err) = Store::open(dir.path()) else {
            panic!("a damaged log is refused");
        };
        assert!(
            matches!(err, StoreError::CorruptLog { offset: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--repair"), "{err}");
        assert_eq!(std::fs::read(Store::log_path(dir.path())).unwrap(), before);
    }

    #[test]
    fn refuses_a_log_damaged_in_its_middle() {
        let dir = tempfile::tempdir().unwrap();
        let offsets = log_of(dir.path(), 50);
        // Flip a byte inside record 20's payload: its checksum fails, 29 records follow.
        let at = offsets[20] + HEADER as u64 + 3;
        let byte = std::fs::read(Store::log_path(dir.path())).unwrap()[at as usize];
        damage(dir.path(), at, &[byte ^ 0x20]);
        let Err(err) = Store::open(dir.path()) else {
            panic!("a damaged log is refused");
        };
        assert!(
            matches!(err, StoreError::CorruptLog { offset, .. } if offset == offsets[20]),
            "{err}"
        );
    }

    #[test]
    fn drops_a_tail_of_zeros_the_file_system_allocated_but_never_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let offsets = log_of(dir.path(), 5);
        let len = std::fs::metadata(Store::log_path(dir.path()))
            .unwrap()
            .len();
        damage(dir.path(), len, &[0; 4096]);
        let (store, state) = Store::open(dir.path()).unwrap();
        assert_eq!(state.kv.len(), 5);
        assert_eq!(store.log_len(), len);
        assert_eq!(offsets.len(), 5);
    }

    #[test]
    fn repair_keeps_every_readable_record_and_the_index_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let offsets = log_of(dir.path(), 50);
        // Damage at the start (records 0 and 1) and in the middle (record 30).
        let original = damage(dir.path(), 0, &[0xab; 40]);
        let at = offsets[30] + HEADER as u64 + 2;
        damage(dir.path(), at, &[original[at as usize] ^ 0x01]);
        assert!(Store::open(dir.path()).is_err());

        let repair = Store::repair(dir.path()).unwrap();
        let damaged = repair.damaged.clone().expect("the damaged log is kept");
        assert!(damaged.exists());
        // The records that start within the 40 damaged bytes are lost, and record 30.
        let lost_at_start = offsets.iter().filter(|&&o| o < 40).count();
        assert_eq!(repair.kept, 50 - lost_at_start - 1, "{repair:?}");
        assert_eq!(repair.dropped.len(), 2, "{repair:?}");
        assert_eq!(repair.dropped[0].0, 0);

        let (_, state) = Store::open(dir.path()).unwrap();
        assert_eq!(state.index, 51, "the last write's index survives");
        assert!(!state.kv.contains_key("k0") && !state.kv.contains_key("k30"));
        let first_kept = format!("k{lost_at_start}");
        assert!(state.kv.contains_key(&first_kept) && state.kv.contains_key("k49"));
        // Nothing left to repair.
        assert_eq!(Store::repair(dir.path()).unwrap().dropped, Vec::new());
    }

    #[test]
    fn a_compacted_store_reopens_to_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut state) = Store::open_with(dir.path(), 0).unwrap();
        write(&mut store, &mut state, register(2, "n1", "web-1", "web"));
        write(&mut store, &mut state, register(3, "n2", "web-2", "web"));
        write(&mut store, &mut state, put(4, "k", "v"));
        write(
            &mut store,
            &mut state,
            Record {
                index: 5,
                op: Op::KvDelete {
                    key: "k".into(),
                    recurse: false,
                },
            },
        );
        assert!(store.wants_compaction());
        store.compact(&state).unwrap();
        assert_eq!(store.log_len(), 0);
        write(&mut store, &mut state, put(6, "after", "x"));
        drop(store);
        let (_, replayed) = Store::open(dir.path()).unwrap();
        assert_eq!(replayed.index, 6);
        assert_eq!(replayed.instances("web").count(), 2);
        assert_eq!(replayed.kv_tombstones["k"], 5);
        assert_eq!(replayed.index_of_kv("k", false), 5);
        assert!(replayed.kv.contains_key("after"));
        assert_eq!(replayed.nodes["n1"].check_owner["service:web-1"], "web-1");
        assert_eq!(replayed.services_index, state.services_index);
    }

    fn session(id: &str, behavior: Behavior) -> SessionDef {
        SessionDef {
            id: id.into(),
            name: String::new(),
            node: "local".into(),
            lock_delay: Duration::from_secs(15),
            behavior,
            ttl: String::new(),
            node_checks: Vec::new(),
            service_checks: Vec::new(),
            checks: Vec::new(),
        }
    }

    #[test]
    fn sessions_and_locks_survive_compaction_and_invalidation_releases_or_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut state) = Store::open_with(dir.path(), 0).unwrap();
        let lock = |index, key: &str, session: &str| Record {
            index,
            op: Op::KvLock {
                key: key.into(),
                value: b"v".to_vec(),
                flags: 0,
                session: session.into(),
            },
        };
        let create = |index, def| Record {
            index,
            op: Op::SessionCreate(def),
        };
        write(
            &mut store,
            &mut state,
            create(2, session("r", Behavior::Release)),
        );
        write(
            &mut store,
            &mut state,
            create(3, session("d", Behavior::Delete)),
        );
        write(&mut store, &mut state, lock(4, "a", "r"));
        write(&mut store, &mut state, lock(5, "b", "d"));
        write(
            &mut store,
            &mut state,
            put(6, "a", "plain write keeps the lock"),
        );
        store.compact(&state).unwrap();
        drop(store);
        let (mut store, mut state) = Store::open(dir.path()).unwrap();
        assert_eq!(state.sessions.len(), 2);
        assert_eq!(state.kv["a"].session.as_deref(), Some("r"));
        assert_eq!(state.kv["a"].lock_index, 1);
        assert_eq!(state.session_locks["d"].len(), 1);
        let destroy = |index, id: &str| Record {
            index,
            op: Op::SessionDestroy {
                id: id.into(),
                at_ms: 1_000,
            },
        };
        write(&mut store, &mut state, destroy(7, "r"));
        write(&mut store, &mut state, destroy(8, "d"));
        assert_eq!(state.kv["a"].session, None);
        assert_eq!(state.kv["a"].modify_index, 7);
        assert!(!state.kv.contains_key("b"));
        assert_eq!(state.kv_tombstones["b"], 8);
        assert_eq!(state.lock_delays["a"], 16_000);
        assert_eq!(state.sessions_index, 8);
        assert!(state.session_locks.is_empty());
    }

    #[test]
    fn records_already_in_the_snapshot_are_not_applied_twice() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut state) = Store::open(dir.path()).unwrap();
        write(&mut store, &mut state, put(2, "k", "v1"));
        write(&mut store, &mut state, put(3, "k", "v2"));
        // A crash between the snapshot's rename and the log's truncation.
        let log = std::fs::read(Store::log_path(dir.path())).unwrap();
        store.compact(&state).unwrap();
        drop(store);
        std::fs::write(Store::log_path(dir.path()), log).unwrap();
        let (_, replayed) = Store::open(dir.path()).unwrap();
        assert_eq!(replayed.kv["k"].value, b"v2");
        assert_eq!(replayed.kv["k"].create_index, 2);
        assert_eq!(replayed.index, 3);
    }

    #[test]
    fn refuses_a_data_directory_of_an_unknown_format() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("FORMAT"), "99\n").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::UnknownFormat { ref found, .. } if found == "99"));
        assert!(err.to_string().contains("this build reads version 1"));
    }

    #[test]
    fn indexes_never_go_backwards_when_things_are_deleted() {
        let mut state = State::default();
        assert_eq!(state.index_of_service("web"), 1);
        state.apply(&register(2, "n1", "web-1", "web"));
        state.apply(&put(3, "p/a", "x"));
        state.apply(&Record {
            index: 4,
            op: Op::Deregister {
                node: "n1".into(),
                service_id: Some("web-1".into()),
                check_id: None,
            },
        });
        state.apply(&Record {
            index: 5,
            op: Op::KvDelete {
                key: "p/".into(),
                recurse: true,
            },
        });
        assert_eq!(state.index_of_service("web"), 4);
        assert_eq!(state.index_of_kv("p/", true), 5);
        assert_eq!(state.index_of_kv("p/a", false), 5);
        assert_eq!(state.instances("web").count(), 0);
        assert_eq!(state.index, 5);
    }

    #[test]
    fn a_write_to_one_service_does_not_move_another_services_index() {
        let mut state = State::default();
        state.apply(&register(2, "n1", "web-1", "web"));
        state.apply(&register(3, "n1", "db-1", "db"));
        state.apply(&Record {
            index: 4,
            op: Op::CheckStatus {
                node: "n1".into(),
                check_id: "service:db-1".into(),
                status: Health::Critical,
                output: "down".into(),
            },
        });
        assert_eq!(state.index_of_service("web"), 2);
        assert_eq!(state.index_of_service("db"), 4);
    }

    #[test]
    fn instance_health_is_the_worst_of_its_checks() {
        let mut state = State::default();
        state.apply(&register(2, "n1", "web-1", "web"));
        let node = &state.nodes["n1"];
        assert_eq!(State::instance_health(node, "web-1"), Health::Passing);
        state.apply(&Record {
            index: 3,
            op: Op::Register(Registration {
                node: "n1".into(),
                address: "10.0.0.1".into(),
                node_meta: None,
                service: None,
                checks: vec![CheckDef {
                    id: "disk".into(),
                    name: "disk".into(),
                    service_id: String::new(),
                    status: Some(Health::Warning),
                    output: String::new(),
                    notes: String::new(),
                    definition: CheckDefinition::default(),
                }],
                replace_service_checks: false,
            }),
        });
        let node = &state.nodes["n1"];
        assert_eq!(State::instance_health(node, "web-1"), Health::Warning);
        assert_eq!(State::instance_checks(node, "web-1").count(), 2);
        // A node check moves the index of every service on the node.
        assert_eq!(state.index_of_service("web"), 3);
    }

    #[test]
    fn renaming_a_service_moves_its_instance_and_both_indexes() {
        let mut state = State::default();
        state.apply(&register(2, "n1", "x-1", "old"));
        state.apply(&register(3, "n1", "x-1", "new"));
        assert_eq!(state.instances("old").count(), 0);
        assert_eq!(state.instances("new").count(), 1);
        assert_eq!(state.index_of_service("old"), 3);
        assert_eq!(state.index_of_service("new"), 3);
        assert_eq!(
            state.check("n1", "service:x-1").unwrap().service_name,
            "new"
        );
        assert!(!state.by_name.contains_key("old"));
    }

    #[test]
    fn deregistering_a_node_removes_its_services_and_checks() {
        let mut state = State::default();
        state.apply(&register(2, "n1", "a-1", "a"));
        state.apply(&register(3, "n2", "a-2", "a"));
        let touched = state.apply(&Record {
            index: 4,
            op: Op::Deregister {
                node: "n1".into(),
                service_id: None,
                check_id: None,
            },
        });
        assert_eq!(touched, [("n1".to_owned(), "service:a-1".to_owned())]);
        assert_eq!(state.instances("a").count(), 1);
        assert_eq!(state.nodes_index, 4);
        assert_eq!(state.index_of_service("a"), 4);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Whatever byte a crash cuts the log at, reopening yields exactly the records that
        /// were wholly written, in order.
        #[test]
        fn a_log_cut_at_any_byte_replays_the_whole_records_before_the_cut(
            values in proptest::collection::vec("[a-z]{0,40}", 1..12),
            cut_permille in 0u64..=1000,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut buf = Vec::new();
            let mut ends = Vec::new();
            for (i, v) in values.iter().enumerate() {
                encode(&put(i as u64 + 2, &format!("k{i}"), v), &mut buf).unwrap();
                ends.push(buf.len() as u64);
            }
            let cut = buf.len() as u64 * cut_permille / 1000;
            {
                let (mut store, _) = Store::open(dir.path()).unwrap();
                store.append(&buf[..cut as usize]).unwrap();
            }
            let (store, state) = Store::open(dir.path()).unwrap();
            let whole = ends.iter().filter(|e| **e <= cut).count();
            proptest::prop_assert_eq!(state.kv.len(), whole);
            proptest::prop_assert_eq!(state.index, whole as u64 + 1);
            proptest::prop_assert_eq!(store.log_len(), if whole == 0 { 0 } else { ends[whole - 1] });
            for (i, v) in values.iter().take(whole).enumerate() {
                proptest::prop_assert_eq!(&state.kv[&format!("k{i}")].value, v.as_bytes());
            }
        }
    }
}
