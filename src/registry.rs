//! The embedded registry: a subset of Consul's HTTP API (agent, catalog, health, KV, sessions,
//! txn, status) on hyper 1, with TTL/HTTP/TCP checks, blocking queries and crash-safe state.
//!
//! - [`api`]: HTTP routing, Consul's JSON shapes and status codes, blocking queries.
//! - [`store`]: the state, the ops that change it, and the append-only log that makes them durable.
//! - [`decode`]: Consul's rules for decoding JSON request bodies (case-insensitive keys, aliases).
//! - [`events`]: Consul's user events, kept in memory as one agent keeps them.
//! - [`checks`]: TTL deadlines, HTTP/TCP probes and `DeregisterCriticalServiceAfter`.
//! - [`session`]: sessions, KV locks, their TTLs and invalidation.
//! - [`txn`]: `/v1/txn`, several KV operations applied atomically as one record.
//!
//! One task (the *core*) owns the state and the log. Writes arrive as commands; the core
//! validates each against the current state, applies it, group-commits the batch with one
//! `fdatasync`, and only then publishes the new state and answers. Readers (and blocking
//! queries) see published, hence durable, state only.
//!
//! In-process consumers skip HTTP: [`RegistryHandle::subscribe`] yields a
//! [`catalog::Snapshot`] on every catalog or health change, and
//! [`RegistryHandle::discovery`] wraps it as a [`Discovery`] source.

pub mod api;
pub mod checks;
pub mod client;
pub mod decode;
pub mod events;
pub mod session;
pub mod store;
pub mod txn;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::catalog::{self, Discovery, Instance, Interner, Node, Nodes, Publisher, ServiceName};
use crate::config::token::Token;
use crate::http1::guard::{Guarded, Limits, Rejection};
use api::ApiError;
use checks::{Checks, ProbeResult};
use store::{Op, Record, State, Store, StoreError};

/// The node meta key that gives a node's inbound proxy port.
pub const INBOUND_PORT_META: &str = "skyline-inbound-port";

/// How the embedded registry runs.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Where the log, the snapshot and the `FORMAT` file live. Created when missing.
    pub data_dir: PathBuf,
    /// The registry's own node: the `/v1/agent/*` endpoints register services on it.
    /// Default `local`.
    pub node_name: String,
    /// The address of the registry's own node, as reported in the catalog. Default 127.0.0.1.
    pub node_address: IpAddr,
    /// With a token, every request but `/v1/status/*` must carry it (`X-Consul-Token`,
    /// `Authorization: Bearer` or `?token=`), or gets Consul's ACL answer: 403
    /// `Permission denied` without a token, 403 `ACL not found` with another one.
    pub token: Option<Token>,
}

impl RegistryConfig {
    /// A config with the defaults for everything but the data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            node_name: "local".to_owned(),
            node_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            token: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot open the registry's data directory")]
    Store(#[from] StoreError),
    #[error("cannot read the listener's address")]
    Listener(#[source] std::io::Error),
    #[error("the registry's startup task failed")]
    Startup(#[source] tokio::task::JoinError),
}

/// A running registry.
#[derive(Debug)]
pub struct RegistryHandle {
    addr: SocketAddr,
    shutdown: CancellationToken,
    snapshots: watch::Receiver<Arc<catalog::Snapshot>>,
    versioned: watch::Receiver<Versioned>,
    tasks: Vec<JoinHandle<()>>,
}

/// A catalog snapshot with the catalog version it reflects ([`State::catalog_version`]),
/// republished when either moves (a write that only moves the version, such as a check that
/// passes again, still tells followers that their table stands for the newer version).
#[derive(Clone, Debug)]
pub struct Versioned {
    pub snapshot: Arc<catalog::Snapshot>,
    pub version: u64,
}

// === impl RegistryHandle ===

impl RegistryHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The catalog as a [`catalog::Snapshot`], republished on every catalog or health change
    /// (not on KV writes). Rebuilds are coalesced: a snapshot follows its write by ~20 ms at
    /// most on a small catalog.
    pub fn subscribe(&self) -> watch::Receiver<Arc<catalog::Snapshot>> {
        self.snapshots.clone()
    }

    /// This registry as a [`Discovery`] source, for an agent in the same process.
    pub fn discovery(&self) -> EmbeddedDiscovery {
        EmbeddedDiscovery {
            addr: self.addr,
            snapshots: self.versioned.clone(),
        }
    }

    /// The catalog as it is now.
    pub fn snapshot(&self) -> Arc<catalog::Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// Starts a graceful shutdown (same as cancelling the token given to [`spawn`]).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the server, its connections and the core to finish after shutdown.
    pub async fn join(self) {
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "registry task failed");
            }
        }
    }
}

/// The embedded registry's snapshots fed to a [`Publisher`], without HTTP, each with the
/// catalog version it reflects: the version an agent following the registry over HTTP would
/// report for the same state, so `skyline status` compares both alike.
#[derive(Debug)]
pub struct EmbeddedDiscovery {
    addr: SocketAddr,
    snapshots: watch::Receiver<Versioned>,
}

impl Discovery for EmbeddedDiscovery {
    fn describe(&self) -> String {
        format!("embedded:{}", self.addr)
    }

    async fn run(mut self, publisher: Publisher, shutdown: CancellationToken) {
        loop {
            let Versioned { snapshot, version } = self.snapshots.borrow_and_update().clone();
            publisher.publish_at(snapshot, Some(version));
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        // The registry stopped: keep the last snapshot, say so, wait for shutdown.
                        publisher.fail("the embedded registry has stopped");
                        shutdown.cancelled().await;
                        return;
                    }
                }
            }
        }
    }
}

/// Opens the data directory, replays it, and serves the Consul API on `listener` until
/// `shutdown` is cancelled.
pub async fn spawn(
    listener: tokio::net::TcpListener,
    config: RegistryConfig,
    shutdown: CancellationToken,
) -> Result<RegistryHandle, RegistryError> {
    let addr = listener.local_addr().map_err(RegistryError::Listener)?;
    let dir = config.data_dir.clone();
    let (store, state) = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await
        .map_err(RegistryError::Startup)??;
    tracing::info!(%addr, dir = %config.data_dir.display(), index = state.index, token = config.token.is_some(), "registry started");

    let state = Arc::new(state);
    let (state_tx, state_rx) = watch::channel(state.clone());
    let snapshots = Snapshots::new(state.clone());
    let (snap_tx, snap_rx) = watch::channel(snapshots.current());
    let (versioned_tx, versioned_rx) = watch::channel(Versioned {
        snapshot: snapshots.current(),
        version: state.catalog_version(),
    });
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let (result_tx, result_rx) = mpsc::unbounded_channel();
    let mut checks = Checks::new(result_tx);
    let _ = checks.reset_all(&state, Instant::now());

    let core_stop = CancellationToken::new();
    let core = Core {
        working: (*state).clone(),
        store: Some(store),
        checks,
        state_tx,
        node_name: config.node_name.clone(),
    };
    let core_task = tokio::spawn(core.run(cmd_rx, result_rx, core_stop.clone()));
    let snap_task = tokio::spawn(publish_snapshots(
        state_rx.clone(),
        snapshots,
        snap_tx,
        versioned_tx,
    ));

    let shared = Arc::new(api::Shared {
        cmds: cmd_tx,
        state: state_rx,
        node_name: config.node_name.clone(),
        node_address: config.node_address,
        shutdown: shutdown.clone(),
        events: watch::channel(Arc::new(events::EventLog::default())).0,
        token: config.token.clone(),
    });
    let server_task = tokio::spawn(serve(listener, shared, shutdown.clone(), core_stop));
    Ok(RegistryHandle {
        addr,
        shutdown,
        snapshots: snap_rx,
        versioned: versioned_rx,
        tasks: vec![server_task, core_task, snap_task],
    })
}

async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<api::Shared>,
    shutdown: CancellationToken,
    core_stop: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "registry accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        // The framing guard every listener of ours has: hyper alone would take a request with
        // both Content-Length and Transfer-Encoding, among others (tests/it/smuggling.rs).
        let limits = Limits::default();
        let (io, verdicts) = Guarded::new(stream, limits);
        let index = AtomicU64::new(0);
        let service = service_fn(move |req| {
            let rejection = verdicts.rejection_for(index.fetch_add(1, Ordering::Relaxed));
            let shared = shared.clone();
            async move {
                match rejection {
                    Some(rejection) => Ok(refused(rejection)),
                    None => api::handle(shared, req).await,
                }
            }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            // Looser than the guard's limits, so the guard always speaks first.
            .max_buf_size(limits.max_head * 2)
            .serve_connection(TokioIo::new(io), service);
        let conn = graceful.watch(conn);
        let span = tracing::debug_span!("registry connection", %peer);
        tokio::spawn(
            async move {
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(5)) => {
            tracing::warn!("registry connections still open after 5s; closing anyway");
        }
    }
    core_stop.cancel();
}

/// The answer to a request the framing guard refused: its status, the mesh's error header,
/// and the end of the connection.
fn refused(rejection: Rejection) -> api::Resp {
    tracing::debug!(reason = rejection.reason, "registry request refused");
    let mut resp = Response::new(Full::new(Bytes::from(format!(
        "bad request: {}\n",
        rejection.reason
    ))));
    *resp.status_mut() = rejection.status;
    let headers = resp.headers_mut();
    headers.insert("x-skyline-error", HeaderValue::from_static("bad-request"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

// === Core ===

/// A write request: validated against the current state by the core, then logged.
pub(crate) struct Command {
    /// Decides on the current state: an op to write, nothing to write, or a client error.
    pub prepare: Prepare,
    /// The index the write got, `None` when nothing was written.
    pub reply: oneshot::Sender<Result<Option<u64>, ApiError>>,
}

pub(crate) type Prepare =
    Box<dyn FnOnce(&State, &mut Checks) -> Result<Option<Op>, ApiError> + Send>;

struct Core {
    /// The state with this batch's writes; equals the published state between batches.
    working: State,
    /// `None` once the log failed beyond repair: every write is refused from then on.
    store: Option<Store>,
    checks: Checks,
    state_tx: watch::Sender<Arc<State>>,
    /// The registry's own node, which always exists for sessions.
    node_name: String,
}

const MAX_BATCH: usize = 256;

impl Core {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut results: mpsc::UnboundedReceiver<ProbeResult>,
        stop: CancellationToken,
    ) {
        let mut next_tick = Instant::now();
        // A crash between a check's change and the invalidation of the sessions that depended
        // on it leaves such sessions behind: they go first.
        let stale: Vec<Op> = session::invalid_sessions(&self.working, &self.node_name)
            .into_iter()
            .map(|id| Op::SessionDestroy {
                id,
                at_ms: session::now_ms(),
            })
            .collect();
        if !stale.is_empty() {
            self.commit(stale, Vec::new(), Instant::now()).await;
        }
        loop {
            let mut batch = Vec::new();
            let mut probes = Vec::new();
            let mut tick = false;
            tokio::select! {
                () = stop.cancelled() => break,
                Some(cmd) = cmds.recv() => batch.push(cmd),
                Some(result) = results.recv() => probes.push(result),
                () = tokio::time::sleep_until(next_tick) => tick = true,
            }
            while batch.len() < MAX_BATCH {
                match cmds.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            while probes.len() < MAX_BATCH {
                match results.try_recv() {
                    Ok(result) => probes.push(result),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            let mut ops = Vec::new();
            for result in probes {
                ops.extend(self.checks.on_result(&self.working, result));
            }
            if tick {
                let (due, next) = self.checks.tick(now);
                ops.extend(due);
                ops.extend(self.checks.sessions.expire(&self.working, now));
                next_tick = next;
            }
            // New or changed checks may be due before the next planned tick.
            if let Some(due) = self.commit(ops, batch, now).await {
                next_tick = next_tick.min(due);
            }
        }
        tracing::debug!("registry core stopped");
    }

    /// Applies internal ops and commands, makes them durable, publishes, answers.
    /// Returns when a check it touched is next due.
    async fn commit(&mut self, ops: Vec<Op>, batch: Vec<Command>, now: Instant) -> Option<Instant> {
        let mut framed = Vec::new();
        let mut touched = Vec::new();
        let mut replies = Vec::with_capacity(batch.len());
        for op in ops {
            // Internal ops were computed on this state; an encode failure just skips one.
            let _ = self.write(op, &mut framed, &mut touched);
        }
        for cmd in batch {
            let outcome = match (cmd.prepare)(&self.working, &mut self.checks) {
                Ok(Some(op)) => self.write(op, &mut framed, &mut touched).map(Some),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            replies.push((cmd.reply, outcome));
        }
        let mut failed = false;
        let mut due = None;
        if !framed.is_empty() {
            if let Err(error) = self.persist(framed).await {
                tracing::error!(error = %crate::error_chain(&error), "registry write failed; batch rolled back");
                failed = true;
                self.working = (**self.state_tx.borrow()).clone();
                due = self.checks.reset_all(&self.working, now);
            } else {
                let published = Arc::new(self.working.clone());
                self.state_tx.send_replace(published.clone());
                due = self.checks.touched(&self.working, &touched, now);
                self.maybe_compact(published).await;
            }
        }
        for (reply, outcome) in replies {
            let outcome = match outcome {
                Ok(_) if failed => {
                    Err(ApiError::unavailable("the write could not be made durable"))
                }
                other => other,
            };
            let _ = reply.send(outcome);
        }
        due
    }

    fn write(
        &mut self,
        op: Op,
        framed: &mut Vec<u8>,
        touched: &mut Vec<store::CheckKey>,
    ) -> Result<u64, ApiError> {
        let record = Record {
            index: self.working.index + 1,
            op,
        };
        store::encode(&record, framed).map_err(|error| {
            tracing::error!(error = %crate::error_chain(&error), "cannot encode a registry record");
            ApiError::internal()
        })?;
        let changed = self.working.apply(&record);
        let invalidated =
            session::invalidated_by(&self.working, &self.node_name, &record.op, &changed);
        touched.extend(changed);
        // Sessions whose node or checks this write took away are invalidated in the same batch.
        for id in invalidated {
            tracing::debug!(session = %id, "session invalidated by a catalog change");
            let op = Op::SessionDestroy {
                id,
                at_ms: session::now_ms(),
            };
            let _ = self.write(op, framed, touched);
        }
        Ok(record.index)
    }

    async fn persist(&mut self, framed: Vec<u8>) -> Result<(), StoreError> {
        let Some(mut store) = self.store.take() else {
            return Err(StoreError::Io {
                action: "write to",
                path: PathBuf::from("<failed store>"),
                source: std::io::Error::other("the store failed earlier"),
            });
        };
        match tokio::task::spawn_blocking(move || {
            let res = store.append(&framed);
            (store, res)
        })
        .await
        {
            Ok((store, res)) => {
                self.store = Some(store);
                res
            }
            Err(join) => Err(StoreError::Io {
                action: "write to",
                path: PathBuf::from("<log>"),
                source: std::io::Error::other(join.to_string()),
            }),
        }
    }

    async fn maybe_compact(&mut self, state: Arc<State>) {
        let Some(mut store) = self.store.take_if(|s| s.wants_compaction()) else {
            return;
        };
        match tokio::task::spawn_blocking(move || {
            let res = store.compact(&state);
            (store, res)
        })
        .await
        {
            Ok((store, res)) => {
                if let Err(error) = res {
                    // The log still holds everything; try again after the next write.
                    tracing::warn!(error = %crate::error_chain(&error), "registry compaction failed");
                }
                self.store = Some(store);
            }
            Err(error) => tracing::error!(%error, "registry compaction task failed"),
        }
    }
}

// === Snapshots for in-process consumers ===

/// Rebuilds the catalog snapshot whenever the catalog part of the state moves. After each
/// rebuild it pauses 20 ms, or as long as the rebuild took if longer, so a registration storm
/// on a large catalog spends at most half a core on it.
async fn publish_snapshots(
    mut state: watch::Receiver<Arc<State>>,
    mut snapshots: Snapshots,
    tx: watch::Sender<Arc<catalog::Snapshot>>,
    versioned: watch::Sender<Versioned>,
) {
    while state.changed().await.is_ok() {
        let current = state.borrow_and_update().clone();
        let version = current.catalog_version();
        let started = Instant::now();
        let moved = snapshots.advance(current);
        if moved {
            tx.send_replace(snapshots.current());
        }
        versioned.send_if_modified(|last| {
            if !moved && last.version == version {
                return false;
            }
            *last = Versioned {
                snapshot: snapshots.current(),
                version,
            };
            true
        });
        tokio::time::sleep(started.elapsed().max(Duration::from_millis(20))).await;
    }
}

/// The registry's state as catalog snapshots, each built from the previous one and what
/// changed: the services whose index moved (a node change moves the index of every service on
/// it), and the node map when the node index moved. Unchanged services keep their `Arc`.
#[derive(Debug)]
pub struct Snapshots {
    state: Arc<State>,
    snapshot: Arc<catalog::Snapshot>,
    interner: Interner,
}

impl Snapshots {
    /// Starts from a full build of `state`.
    pub fn new(state: Arc<State>) -> Self {
        let mut interner = Interner::default();
        let nodes = Arc::new(nodes_of(&state, &mut interner));
        let services = state
            .by_name
            .keys()
            .filter_map(|name| {
                let service = ServiceName::parse(name).ok()?;
                let instances = instances_of(&state, &nodes, &service, &mut interner)?;
                Some((service, instances))
            })
            .collect();
        let snapshot = Arc::new(catalog::Snapshot { nodes, services });
        Self {
            state,
            snapshot,
            interner,
        }
    }

    /// The snapshot of the state last seen.
    pub fn current(&self) -> Arc<catalog::Snapshot> {
        self.snapshot.clone()
    }

    /// Moves to `state`; `true` if the snapshot changed.
    pub fn advance(&mut self, state: Arc<State>) -> bool {
        let previous = std::mem::replace(&mut self.state, state);
        if previous.catalog_index == self.state.catalog_index {
            return false;
        }
        let state = &self.state;
        let mut next = (*self.snapshot).clone();
        if previous.nodes_index != state.nodes_index {
            let nodes = nodes_of(state, &mut self.interner);
            if *next.nodes != nodes {
                next.nodes = Arc::new(nodes);
            }
        }
        for change in previous.service_index.diff(&state.service_index) {
            let name = match change {
                imbl::ordmap::DiffItem::Add(name, _) => name,
                imbl::ordmap::DiffItem::Update { new: (name, _), .. } => name,
                imbl::ordmap::DiffItem::Remove(name, _) => name,
            };
            let Ok(service) = ServiceName::parse(name) else {
                continue;
            };
            match instances_of(state, &next.nodes, &service, &mut self.interner) {
                None => {
                    next.services.remove(&service);
                }
                Some(fresh) => match next.services.get(&service) {
                    Some(was) if **was == *fresh => {}
                    _ => {
                        next.services.insert(service, fresh);
                    }
                },
            }
        }
        if next == *self.snapshot {
            return false;
        }
        self.snapshot = Arc::new(next);
        true
    }
}

/// Maps the registry's state onto the mesh's catalog model, in one full build.
pub fn to_snapshot(state: &State) -> catalog::Snapshot {
    Arc::unwrap_or_clone(Snapshots::new(Arc::new(state.clone())).snapshot)
}

/// The nodes whose address is an IP (the others cannot be routed to, nor their instances).
fn nodes_of(state: &State, interner: &mut Interner) -> Nodes {
    let mut nodes = Nodes::new();
    for entry in state.nodes.values() {
        let info = &entry.info;
        let Ok(address) = info.address.parse::<IpAddr>() else {
            tracing::warn!(node = %info.name, address = %info.address, "node address is not an IP; its instances are left out");
            continue;
        };
        let name = interner.node(&info.name);
        nodes.insert(
            name.clone(),
            Node {
                name,
                address,
                inbound_port: inbound_port(&info.meta),
                meta: interner.meta(info.meta.clone()),
            },
        );
    }
    nodes
}

/// The instances of `service` on the nodes of `nodes`; `None` when there are none.
fn instances_of(
    state: &State,
    nodes: &Nodes,
    service: &ServiceName,
    interner: &mut Interner,
) -> Option<Arc<[Instance]>> {
    let name = service.as_str();
    let mut instances = Vec::new();
    for (node, svc) in state.instances(name) {
        let Some(n) = nodes.get(node.info.name.as_str()) else {
            continue;
        };
        let address = if svc.address.is_empty() {
            n.address
        } else if let Ok(ip) = svc.address.parse() {
            ip
        } else {
            tracing::warn!(service = %name, id = %svc.id, address = %svc.address, "service address is not an IP; instance left out");
            continue;
        };
        instances.push(Instance {
            id: svc.id.clone(),
            service: service.clone(),
            node: n.name.clone(),
            address,
            port: svc.port,
            tags: interner.tags(svc.tags.clone()),
            meta: interner.meta(svc.meta.clone()),
            health: State::instance_health(node, &svc.id),
            weight: svc.weights.passing.max(1),
        });
    }
    (!instances.is_empty()).then(|| instances.into())
}

/// The inbound port in a node's meta, or the default.
pub fn inbound_port(meta: &BTreeMap<String, String>) -> u16 {
    meta.get(INBOUND_PORT_META)
        .and_then(|p| p.parse().ok())
        .unwrap_or(catalog::DEFAULT_INBOUND_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Health;
    use proptest::prelude::*;
    use store::{CheckDef, CheckDefinition, Registration, ServiceDef, Weights};

    const NODES: [&str; 3] = ["n0", "n1", "n2"];
    const NAMES: [&str; 3] = ["web", "db", "Not_A_Mesh_Name"];

    /// One write to the catalog, as the API would log it.
    #[derive(Clone, Debug)]
    enum Change {
        Register {
            node: usize,
            id: usize,
            name: usize,
            port: u16,
            health: Health,
        },
        NodeAddress {
            node: usize,
            address: &'static str,
        },
        NodeCheck {
            node: usize,
            health: Health,
        },
        Check {
            node: usize,
            id: usize,
            health: Health,
        },
        DeregisterService {
            node: usize,
            id: usize,
        },
        DeregisterNode {
            node: usize,
        },
    }

    fn health() -> impl Strategy<Value = Health> {
        prop_oneof![
            Just(Health::Passing),
            Just(Health::Warning),
            Just(Health::Critical)
        ]
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            4 => (0..3usize, 0..6usize, 0..3usize, 1..4u16, health()).prop_map(
                |(node, id, name, port, health)| Change::Register { node, id, name, port, health }
            ),
            1 => (0..3usize, prop_oneof![Just("10.0.0.1"), Just("10.0.0.9"), Just("host.example")])
                .prop_map(|(node, address)| Change::NodeAddress { node, address }),
            1 => (0..3usize, health()).prop_map(|(node, health)| Change::NodeCheck { node, health }),
            2 => (0..3usize, 0..6usize, health())
                .prop_map(|(node, id, health)| Change::Check { node, id, health }),
            1 => (0..3usize, 0..6usize).prop_map(|(node, id)| Change::DeregisterService { node, id }),
            1 => (0..3usize).prop_map(|node| Change::DeregisterNode { node }),
        ]
    }

    fn registration(node: usize, address: &str) -> Registration {
        Registration {
            node: NODES[node].into(),
            address: address.into(),
            node_meta: None,
            service: None,
            checks: Vec::new(),
            replace_service_checks: false,
        }
    }

    fn check(id: String, service_id: String, health: Health) -> CheckDef {
        CheckDef {
            id,
            name: "c".into(),
            service_id,
            status: Some(health),
            output: String::new(),
            notes: String::new(),
            definition: CheckDefinition::default(),
        }
    }

    /// The op of `change` on `state`, with the node's current address kept.
    fn op(state: &State, change: &Change) -> Op {
        let address = |node: usize| {
            state
                .nodes
                .get(NODES[node])
                .map_or_else(|| "10.0.0.1".to_owned(), |n| n.info.address.clone())
        };
        match *change {
            Change::Register {
                node,
                id,
                name,
                port,
                health,
            } => {
                let id = format!("i{id}");
                Op::Register(Registration {
                    service: Some(ServiceDef {
                        id: id.clone(),
                        name: NAMES[name].into(),
                        tags: vec!["v1".into()],
                        address: String::new(),
                        port,
                        meta: BTreeMap::from([("platform".into(), "mesos".into())]),
                        weights: Weights::default(),
                    }),
                    checks: vec![check(format!("service:{id}"), id, health)],
                    replace_service_checks: true,
                    ..registration(node, &address(node))
                })
            }
            Change::NodeAddress { node, address } => Op::Register(registration(node, address)),
            Change::NodeCheck { node, health } => Op::Register(Registration {
                checks: vec![check("serfHealth".into(), String::new(), health)],
                ..registration(node, &address(node))
            }),
            Change::Check { node, id, health } => Op::CheckStatus {
                node: NODES[node].into(),
                check_id: format!("service:i{id}"),
                status: health,
                output: String::new(),
            },
            Change::DeregisterService { node, id } => Op::Deregister {
                node: NODES[node].into(),
                service_id: Some(format!("i{id}")),
                check_id: None,
            },
            Change::DeregisterNode { node } => Op::Deregister {
                node: NODES[node].into(),
                service_id: None,
                check_id: None,
            },
        }
    }

    fn apply(state: &State, change: &Change) -> Arc<State> {
        let mut next = state.clone();
        let op = op(state, change);
        next.apply(&Record {
            index: state.index + 1,
            op,
        });
        Arc::new(next)
    }

    fn web(port: u16) -> Change {
        Change::Register {
            node: 0,
            id: 0,
            name: 0,
            port,
            health: Health::Passing,
        }
    }

    #[test]
    fn an_unchanged_service_keeps_its_instances_and_a_changed_one_does_not() {
        let db = Change::Register {
            node: 1,
            id: 1,
            name: 1,
            port: 5432,
            health: Health::Passing,
        };
        let state = apply(&apply(&State::default(), &web(80)), &db);
        let mut snapshots = Snapshots::new(state.clone());
        let before = snapshots.current();

        assert!(snapshots.advance(apply(&state, &web(81))));
        let after = snapshots.current();
        assert!(Arc::ptr_eq(&before.services["db"], &after.services["db"]));
        assert!(Arc::ptr_eq(&before.nodes, &after.nodes));
        assert!(!Arc::ptr_eq(
            &before.services["web"],
            &after.services["web"]
        ));
        assert_eq!(after.services["web"][0].port, 81);

        // Registering the same thing again moves the indexes but not the snapshot.
        let state = snapshots.state.clone();
        assert!(!snapshots.advance(apply(&state, &web(81))));
        assert!(Arc::ptr_eq(&after, &snapshots.current()));
    }

    #[test]
    fn instances_share_their_node_name_and_meta() {
        let two = Change::Register {
            node: 0,
            id: 1,
            name: 1,
            port: 90,
            health: Health::Passing,
        };
        let state = apply(&apply(&State::default(), &web(80)), &two);
        let snapshot = Snapshots::new(state).current();
        let (a, b) = (&snapshot.services["web"][0], &snapshot.services["db"][0]);
        assert!(Arc::ptr_eq(&a.meta, &b.meta));
        assert!(Arc::ptr_eq(&a.tags, &b.tags));
        assert_eq!(a.node, b.node);
        assert_eq!(a.node.as_str().as_ptr(), b.node.as_str().as_ptr());
    }

    proptest! {
        #[test]
        fn an_incremental_snapshot_equals_a_full_build(
            changes in prop::collection::vec(change(), 1..40)
        ) {
            let mut state = Arc::new(State::default());
            let mut snapshots = Snapshots::new(state.clone());
            for change in &changes {
                state = apply(&state, change);
                snapshots.advance(state.clone());
                prop_assert_eq!(&*snapshots.current(), &to_snapshot(&state), "after {:?}", change);
            }
        }
    }
}
